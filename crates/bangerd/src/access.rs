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

use banger_store::Owned;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AccessError {
    #[error("cannot tell who is connected to the socket: {0}")]
    PeerCred(nix::Error),
    #[error(
        "image import: an import of yours (uid {uid}) is already in progress; a member \
         imports one at a time (each may stage up to {} GiB in the daemon's cache): wait \
         for it to end",
        STAGE_MAX_BYTES >> 30
    )]
    Busy { uid: u32 },
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
    #[error(
        "{what}: fs.protected_hardlinks is off on this host, so a member could link root's \
         files into their directory: only root may share directories until `sysctl -w \
         fs.protected_hardlinks=1` (and a line in /etc/sysctl.d/)"
    )]
    HardlinksUnprotected { what: String },
    #[error("vm {0:?} shares host directories root named (--mount): only root may use it")]
    RootsVm(String),
    #[error(
        "{kind} {name:?} holds what a VM only root may use could see (it was made from or \
         used by one): only root may use it"
    )]
    RootsData { kind: &'static str, name: String },
    #[error(
        "{kind} {name:?} belongs to uid {owner}, not to you (uid {uid}): only its owner or root \
         may {act} it"
    )]
    NotYours {
        kind: &'static str,
        name: String,
        owner: u32,
        uid: u32,
        act: &'static str,
    },
    #[error("vm {0:?} is made of data only root may use: only root may use it")]
    RootsDataVm(String),
    #[error(
        "--network {name}: that network's VMs are {whose} (uid {owner}), not yours (uid {uid}): \
                  a member joins only networks of their own or shared with them (its VMs could reach and \
         resolve yours, and yours theirs): pick another name, or ask its owner for \
         `banger network share {name} <you>`"
    )]
    NotYourNetwork {
        name: String,
        owner: u32,
        uid: u32,
        whose: &'static str,
    },
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Its supplementary groups when it connected (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn of(stream: &UnixStream) -> Result<Caller, AccessError> {
        let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(AccessError::PeerCred)?;
        // Before Linux 4.13 (no SO_PEERGROUPS): the primary group only.
        let groups = match banger_host::confine::peer_groups(stream) {
            Ok(g) => g,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOPROTOOPT) => Vec::new(),
            Err(e) => {
                return Err(AccessError::PeerCred(nix::Error::from_raw(
                    e.raw_os_error().unwrap_or(0),
                )))
            }
        };
        Ok(Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            groups,
        })
    }

    /// The daemon itself (its own requests, tests of the library).
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: std::process::id() as i32,
            groups: Vec::new(),
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
impl Caller {
    /// A VM of this caller's may join `--network name`: a network is its
    /// first VM's creator's for as long as it has VMs (then free again).
    /// Root joins any; a member their own, one its owner shares with them
    /// (`banger network share`), or one with no VM. The caller is
    /// recorded as the owner of a network it starts, shared with nobody.
    pub fn may_join(
        &self,
        store: &banger_store::Store,
        name: &str,
    ) -> Result<(), crate::error::DaemonError> {
        let has_vms = store
            .list_vms()?
            .iter()
            .any(|v| v.spec.net.network.as_deref() == Some(name));
        if has_vms {
            let owner = store.owner(Owned::Network, name)?.uid;
            if self.is_root()
                || owner == self.uid
                || store.shared_with(Owned::Network, name)?.contains(&self.uid)
            {
                return Ok(());
            }
            return Err(AccessError::NotYourNetwork {
                name: name.to_string(),
                owner,
                uid: self.uid,
                whose: if owner == 0 {
                    "root's"
                } else {
                    "another member's"
                },
            }
            .into());
        }
        // The shares first: no moment where the new owner has the old
        // one's.
        store.forget_shares(Owned::Network, name)?;
        store.set_owner(
            Owned::Network,
            name,
            banger_store::Owner {
                uid: self.uid,
                root_only: false,
            },
        )?;
        Ok(())
    }
}

pub fn root_only(vm: &banger_core::VmRecord) -> bool {
    // A pod VM is on its pod's network, outside banger's isolation, and
    // its start joins whatever namespace the path names then.
    vm.spec.mounts.iter().any(|m| m.owner.is_none()) || vm.spec.net.pod_netns.is_some()
}

/// What an image or a volume is called in errors.
fn kind_name(kind: Owned) -> &'static str {
    match kind {
        Owned::Image => "image",
        Owned::Volume => "volume",
        Owned::Network => "network",
        Owned::Snapshot => "snapshot",
    }
}

/// Who may do what to images and volumes (`banger_store::Owner`): each
/// records who made it; members may remove or replace only their own
/// (or a member could swap the image root boots with `--mount` for one
/// of theirs), and nothing a VM only root may use could write (a volume
/// it mounted, an image committed from it) is a member's to use.
impl Caller {
    /// Refuses removing or replacing `name` to a member who did not make it.
    pub fn may_replace(
        &self,
        store: &banger_store::Store,
        kind: Owned,
        name: &str,
        act: &'static str,
    ) -> Result<(), crate::error::DaemonError> {
        if self.is_root() {
            return Ok(());
        }
        let o = store.owner(kind, name)?;
        if o.uid != self.uid {
            return Err(AccessError::NotYours {
                kind: kind_name(kind),
                name: name.into(),
                owner: o.uid,
                uid: self.uid,
                act,
            }
            .into());
        }
        Ok(())
    }

    /// Refuses a member an image or volume only root may use.
    pub fn may_read(
        &self,
        store: &banger_store::Store,
        kind: Owned,
        name: &str,
    ) -> Result<(), crate::error::DaemonError> {
        if !self.is_root() && store.owner(kind, name)?.root_only {
            return Err(AccessError::RootsData {
                kind: kind_name(kind),
                name: name.into(),
            }
            .into());
        }
        Ok(())
    }

    /// Refuses a member a VM only root may use: root's `--mount`s, or an
    /// image or a volume only root may use.
    pub fn may_use_in(
        &self,
        store: &banger_store::Store,
        vm: &banger_core::VmRecord,
    ) -> Result<(), crate::error::DaemonError> {
        if self.is_root() {
            return Ok(());
        }
        self.may_use(vm)?;
        if root_only_data(store, vm)? {
            return Err(AccessError::RootsDataVm(vm.name.clone()).into());
        }
        Ok(())
    }
}

/// A VM whose image or a volume only root may use.
pub fn root_only_data(
    store: &banger_store::Store,
    vm: &banger_core::VmRecord,
) -> Result<bool, banger_store::StoreError> {
    if store.owner(Owned::Image, &vm.spec.image)?.root_only {
        return Ok(true);
    }
    for v in &vm.spec.volumes {
        if store.owner(Owned::Volume, &v.name)?.root_only {
            return Ok(true);
        }
    }
    Ok(false)
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

/// Members share directories through a virtiofsd that runs as root: with
/// `fs.protected_hardlinks` off, a member could hard-link a file of
/// root's into their own directory and read it from the guest.
pub fn hardlinks_protected(what: &str) -> Result<(), AccessError> {
    let path = Path::new("/proc/sys/fs/protected_hardlinks");
    let on = std::fs::read_to_string(path)
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    if on {
        Ok(())
    } else {
        Err(AccessError::HardlinksUnprotected { what: what.into() })
    }
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
/// The most an import's source may hold, as staged (a file or a tar
/// stream of a directory): a member cannot fill the daemon's disk.
pub const STAGE_MAX_BYTES: u64 = 64 << 30;
/// The callers with a staged import in progress: one each, so that what
/// one member may put in the daemon's cache is bounded
/// (`STAGE_MAX_BYTES`, the staging helper's file size limit).
#[derive(Debug, Default)]
pub struct Staging(std::sync::Mutex<std::collections::HashSet<u32>>);

/// A caller's turn to stage an import; theirs until dropped.
#[derive(Debug)]
pub struct StagingTurn<'a> {
    staging: &'a Staging,
    uid: u32,
}

impl Staging {
    /// `uid`'s turn, or `Busy` while it has one.
    pub fn begin(&self, uid: u32) -> Result<StagingTurn<'_>, AccessError> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(uid) {
            return Err(AccessError::Busy { uid });
        }
        Ok(StagingTurn { staging: self, uid })
    }
}

impl Drop for StagingTurn<'_> {
    fn drop(&mut self) {
        self.staging
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uid);
    }
}

/// What staged files are called in the cache dir (stale ones go at the
/// next start).
pub const STAGED_PREFIX: &str = "import-";

/// Reads `source` with `caller`'s ids (their uid, gid and supplementary
/// groups, no capabilities, an empty environment, no network, its own
/// process group, at most `STAGE_MAX_BYTES` written) into a new
/// root-owned file under `dir`: a regular file as it is (`cat`), a
/// directory as a tar stream (`tar --numeric-owner`, which an import reads
/// like any tarball). Which of the two it is, the caller's own `test -d`
/// says: a stat as root would tell a stranger whether a path exists.
pub fn stage_as(caller: &Caller, source: &Path, dir: &Path) -> Result<Staged, AccessError> {
    use std::os::unix::fs::OpenOptionsExt;
    let what = "image import";
    let err = |at: &Path, e: std::io::Error| AccessError::Stat {
        what: what.into(),
        path: source.into(),
        at: at.into(),
        source: e,
    };
    if !source.is_absolute() {
        return Err(AccessError::Relative {
            what: what.into(),
            path: source.into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let mut name = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|e| err(Path::new("/dev/urandom"), e))?,
        &mut name,
    )
    .map_err(|e| err(Path::new("/dev/urandom"), e))?;
    let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
    let staged = Staged(dir.join(format!("{STAGED_PREFIX}{hex}")));
    let stderr_path = staged.0.with_extension("err");
    let open = |p: &Path, new: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).mode(0o600);
        if new {
            o.create_new(true);
        } else {
            o.create(true).truncate(true);
        }
        o.open(p).map_err(|e| err(p, e))
    };
    let is_dir = {
        let mut test = std::process::Command::new("test");
        test.arg("-d").arg(source);
        let st = run_as(caller, test, None, None, &stderr_path, &err, source)?;
        st.success()
    };
    let cmd = if is_dir {
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
    let out = open(&staged.0, true)?;
    let errf = open(&stderr_path, false)?;
    let status = run_as(
        caller,
        cmd,
        Some(out),
        Some(errf),
        &stderr_path,
        &err,
        source,
    )?;
    let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    if !status.success() {
        let size = std::fs::metadata(&staged.0).map(|m| m.len()).unwrap_or(0);
        let first = if size >= STAGE_MAX_BYTES {
            format!("it holds over {} GiB", STAGE_MAX_BYTES >> 30)
        } else {
            said.lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>()
        };
        return Err(AccessError::Unreadable {
            path: source.into(),
            uid: caller.uid,
            why: banger_core::text::escape_control(&first, false),
        });
    }
    Ok(staged)
}

/// Runs `cmd` confined as `caller` (see `stage_as`), in a process group
/// of its own, killed after `STAGE_TIMEOUT`.
fn run_as(
    caller: &Caller,
    mut cmd: std::process::Command,
    out: Option<std::fs::File>,
    errf: Option<std::fs::File>,
    stderr_path: &Path,
    err: &dyn Fn(&Path, std::io::Error) -> AccessError,
    source: &Path,
) -> Result<std::process::ExitStatus, AccessError> {
    use std::os::unix::process::CommandExt;
    use wait_timeout::ChildExt;
    let confine = banger_host::confine::Confinement {
        identity: Some(banger_host::confine::Identity {
            uid: caller.uid,
            gid: caller.gid,
            groups: caller.groups.clone(),
        }),
        cgroup_procs: Vec::new(),
        new_netns: true,
        private_tmp: false,
        max_file_bytes: Some(STAGE_MAX_BYTES),
    };
    confine
        .apply(&mut cmd)
        .map_err(|e| err(source, std::io::Error::other(e.to_string())))?;
    // The helper runs as the caller: it writes to descriptors of ours,
    // never a path of ours; a signal to the daemon's group misses it.
    cmd.process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(out.map_or_else(std::process::Stdio::null, Into::into))
        .stderr(errf.map_or_else(std::process::Stdio::null, Into::into));
    let mut child = cmd.spawn().map_err(|e| err(source, e))?;
    match child.wait_timeout(STAGE_TIMEOUT) {
        Ok(Some(st)) => Ok(st),
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(stderr_path);
            Err(err(
                source,
                std::io::Error::other(format!(
                    "reading it took over {} minutes",
                    STAGE_TIMEOUT.as_secs() / 60
                )),
            ))
        }
        Err(e) => Err(err(source, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_member_stages_one_import_at_a_time() {
        let s = Staging::default();
        let a = s.begin(4321).unwrap();
        let e = s.begin(4321).unwrap_err();
        assert!(e.to_string().contains("already in progress"), "{e}");
        let b = s.begin(4322).expect("another member's own turn");
        drop(a);
        let _a = s.begin(4321).expect("a turn again once the first ended");
        drop(b);
    }

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
            groups: Vec::new(),
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
