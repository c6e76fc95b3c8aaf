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
