//! Who is on the other end of the socket, and what a caller who is not
//! root may name on the host.
//!
//! The socket is `root:banger 0660`: members of the group use every VM
//! (as docker's group does), but they are not root on the host. The daemon
//! opens host paths a request names (a `--mount` directory, an `image
//! import` source) as root, so for a caller who is not root such a path
//! must be the caller's own: owned by their uid, reached through no
//! symbolic link, under directories they can search. The kernel tells who
//! the caller is (SO_PEERCRED); nothing the client writes is believed.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AccessError {
    #[error("cannot tell who is connected to the socket: {0}")]
    PeerCred(nix::Error),
    #[error("{what} {path}: give an absolute path")]
    Relative { what: String, path: PathBuf },
    #[error("{what} {path}: {at} cannot be read ({source})")]
    Stat {
        what: String,
        path: PathBuf,
        at: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {at} is a symbolic link: give the real path (`realpath {}`)", path.display())]
    Symlink {
        what: String,
        path: PathBuf,
        at: PathBuf,
    },
    #[error("{what} {path}: uid {uid} cannot search {at}")]
    NoSearch {
        what: String,
        path: PathBuf,
        at: PathBuf,
        uid: u32,
    },
    #[error("vm {0:?} shares host directories root named (--mount): only root may use it")]
    RootsVm(String),
    #[error("image import {path}: uid {uid} cannot read it: {why}")]
    Unreadable {
        path: PathBuf,
        uid: u32,
        why: String,
    },
    #[error(
        "{what} {path}: it belongs to uid {owner}, not to you (uid {uid}): a member of the \
         banger group may only name what is their own (or run this as root)"
    )]
    NotOwner {
        what: String,
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
}

/// The process at the other end of a connection, as the kernel saw it
/// connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Caller {
    pub fn of(stream: &UnixStream) -> Result<Caller, AccessError> {
        let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(AccessError::PeerCred)?;
        Ok(Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        })
    }

    /// The daemon itself (its own requests, tests of the library).
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: std::process::id() as i32,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Root may name anything; anyone else only what is theirs (see the
    /// module's comment). `what` names the flag or request in errors.
    pub fn may_name(&self, path: &Path, what: &str) -> Result<(), AccessError> {
        if self.is_root() {
            return Ok(());
        }
        owned_by(self.uid, Some(self.gid), path, what)
    }
}

/// A VM only root may use: one that shares a host directory root named
/// (`--mount` by root: its owner is not recorded). Members of the group
/// cannot start it, reach its agent, its console or its ports, and their
/// ssh key is not among its authorized ones.
pub fn root_only(vm: &banger_core::VmRecord) -> bool {
    vm.spec.mounts.iter().any(|m| m.owner.is_none())
}

impl Caller {
    /// Refuses a caller who is not root a VM only root may use.
    pub fn may_use(&self, vm: &banger_core::VmRecord) -> Result<(), AccessError> {
        if self.is_root() || !root_only(vm) {
            return Ok(());
        }
        Err(AccessError::RootsVm(vm.name.clone()))
    }
}

/// `path` is `uid`'s: absolute, no component a symbolic link, the last
/// owned by `uid`, and (with `gid`) every directory above it searchable by
/// `uid`/`gid` (checked again, without `gid`, when a stopped VM starts).
pub fn owned_by(uid: u32, gid: Option<u32>, path: &Path, what: &str) -> Result<(), AccessError> {
    if !path.is_absolute() {
        return Err(AccessError::Relative {
            what: what.into(),
            path: path.into(),
        });
    }
    let mut at = PathBuf::from("/");
    let comps: Vec<Component> = path.components().collect();
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::RootDir => continue,
            Component::Normal(n) => at.push(n),
            // `..` or `.`: the path is not the real one.
            _ => {
                return Err(AccessError::Symlink {
                    what: what.into(),
                    path: path.into(),
                    at: at.clone(),
                })
            }
        }
        let md = std::fs::symlink_metadata(&at).map_err(|source| AccessError::Stat {
            what: what.into(),
            path: path.into(),
            at: at.clone(),
            source,
        })?;
        if md.file_type().is_symlink() {
            return Err(AccessError::Symlink {
                what: what.into(),
                path: path.into(),
                at,
            });
        }
        let last = i + 1 == comps.len();
        if last {
            if md.uid() != uid {
                return Err(AccessError::NotOwner {
                    what: what.into(),
                    path: path.into(),
                    owner: md.uid(),
                    uid,
                });
            }
        } else if let Some(gid) = gid {
            let mode = md.mode();
            let search = if md.uid() == uid {
                mode & 0o100 != 0
            } else if md.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !search {
                return Err(AccessError::NoSearch {
                    what: what.into(),
                    path: path.into(),
                    at,
                    uid,
                });
            }
        }
    }
    Ok(())
}

/// A file of the daemon's holding what `source` held, as its caller could
/// read it (removed when dropped).
pub struct Staged(PathBuf);

impl Staged {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How long reading an import's source as its caller may take.
const STAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// Reads `source` with `caller`'s ids (their uid, gid and supplementary
/// groups, no capabilities, an empty environment, no network) into a new
/// root-owned file under `dir`: a regular file as it is (`cat`), a
/// directory as a tar stream (`tar --numeric-owner`, which an import reads
/// like any tarball). Anything else is refused.
pub fn stage_as(caller: &Caller, source: &Path, dir: &Path) -> Result<Staged, AccessError> {
    use std::os::unix::fs::OpenOptionsExt;
    use wait_timeout::ChildExt;
    let what = "image import";
    let err = |at: &Path, e: std::io::Error| AccessError::Stat {
        what: what.into(),
        path: source.into(),
        at: at.into(),
        source: e,
    };
    // Only what the caller can see says what it is: a stat as root would
    // tell a stranger whether a path exists.
    let mut cmd = if source.is_dir() {
        let mut c = std::process::Command::new("tar");
        c.arg("--numeric-owner")
            .arg("-C")
            .arg(source)
            .args(["-cf", "-", "."]);
        c
    } else {
        let mut c = std::process::Command::new("cat");
        c.arg("--").arg(source);
        c
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let mut name = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|e| err(Path::new("/dev/urandom"), e))?,
        &mut name,
    )
    .map_err(|e| err(Path::new("/dev/urandom"), e))?;
    let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
    let staged = Staged(dir.join(format!("import-{hex}")));
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged.0)
        .map_err(|e| err(&staged.0, e))?;
    let stderr_path = staged.0.with_extension("err");
    let errf = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&stderr_path)
        .map_err(|e| err(&stderr_path, e))?;
    let confine = banger_host::confine::Confinement {
        identity: Some(banger_host::confine::Identity {
            uid: caller.uid,
            gid: caller.gid,
            groups: caller_groups(caller),
        }),
        cgroup_procs: Vec::new(),
        new_netns: true,
        private_tmp: false,
    };
    confine
        .apply(&mut cmd)
        .map_err(|e| err(source, std::io::Error::other(e.to_string())))?;
    // The helper runs as the caller: it writes to a descriptor of ours,
    // never a path of ours.
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(errf)
        .spawn()
        .map_err(|e| err(source, e))?;
    let status = match child.wait_timeout(STAGE_TIMEOUT) {
        Ok(Some(st)) => st,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&stderr_path);
            return Err(err(
                source,
                std::io::Error::other(format!(
                    "reading it took over {} minutes",
                    STAGE_TIMEOUT.as_secs() / 60
                )),
            ));
        }
        Err(e) => return Err(err(source, e)),
    };
    let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    if !status.success() {
        let first = said
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>();
        return Err(AccessError::Unreadable {
            path: source.into(),
            uid: caller.uid,
            why: banger_core::text::escape_control(&first, false),
        });
    }
    Ok(staged)
}

/// The caller's supplementary groups, as the kernel has them for its
/// process (it is alive: it waits for the reply).
fn caller_groups(caller: &Caller) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{}/status", caller.pid))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_callers_own_directory_only() {
        let d = tempfile::tempdir().unwrap();
        let mine = d.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::os::unix::fs::chown(&mine, Some(4321), Some(4321)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let alice = Caller {
            uid: 4321,
            gid: 4321,
            pid: 1,
        };
        alice.may_name(&mine, "--mount").unwrap();
        Caller::root()
            .may_name(Path::new("/etc"), "--mount")
            .unwrap();

        // Root's directory.
        let e = alice.may_name(Path::new("/etc"), "--mount").unwrap_err();
        assert!(
            e.to_string()
                .contains("belongs to uid 0, not to you (uid 4321)"),
            "{e}"
        );
        // A link to it, however it is reached.
        let link = mine.join("etc");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let e = alice.may_name(&link, "--mount").unwrap_err();
        assert!(matches!(e, AccessError::Symlink { .. }), "{e}");
        let e = alice
            .may_name(&mine.join("etc/../etc"), "--mount")
            .unwrap_err();
        assert!(matches!(e, AccessError::Symlink { .. }), "{e}");
        // Behind a directory the caller cannot search.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = alice.may_name(&mine, "--mount").unwrap_err();
        assert!(matches!(e, AccessError::NoSearch { .. }), "{e}");
        // Relative paths are not resolved against the daemon's directory.
        let e = alice.may_name(Path::new("mine"), "--mount").unwrap_err();
        assert!(matches!(e, AccessError::Relative { .. }), "{e}");
    }
}
