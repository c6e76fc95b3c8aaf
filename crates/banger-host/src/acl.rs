//! POSIX access ACLs, as far as banger needs them: read access for one
//! user at a time added to and taken from a file, and the users a file
//! names. The ACL is the `system.posix_acl_access` extended attribute in
//! the kernel's own format (acl(5); `include/uapi/linux/posix_acl_xattr.h`:
//! a version word, then entries of tag, permissions and id, little-endian,
//! sorted by tag and id), read and written with the `xattr` crate: no
//! libacl, and no `setfacl` process per file.
//!
//! An edit (a read, a change, a write) holds an exclusive `flock` on the
//! file: the daemons of one host share images' inodes (hard links), and
//! two of them granting at once must not lose one of the grants. (QEMU's
//! own image locks are byte-range locks, which flock does not touch.)

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use xattr::FileExt;

use thiserror::Error;

const XATTR: &str = "system.posix_acl_access";
const VERSION: u32 = 2;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

const READ: u16 = 4;

#[derive(Debug, Error)]
pub enum AclError {
    #[error("{path}: {op} its ACL: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: not a regular file (only an image's files are granted)")]
    NotAFile { path: PathBuf },
    #[error("{path}: its ACL is not one this kernel writes ({why})")]
    Malformed { path: PathBuf, why: String },
    #[error(
        "{path}: its filesystem has no POSIX ACLs (a VMM's access to an image needs them: \
         keep the state dir on ext4, XFS or btrfs, or mount it with `acl`)"
    )]
    Unsupported { path: PathBuf },
}

type Result<T> = std::result::Result<T, AclError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

fn io_err(op: &'static str, path: &Path, e: io::Error) -> AclError {
    if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) {
        AclError::Unsupported {
            path: path.to_path_buf(),
        }
    } else {
        AclError::Io {
            op,
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn decode(path: &Path, b: &[u8]) -> Result<Vec<Entry>> {
    let bad = |why: &str| AclError::Malformed {
        path: path.to_path_buf(),
        why: why.into(),
    };
    if b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
        return Err(bad("its length"));
    }
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION {
        return Err(bad("its version"));
    }
    Ok(b[4..]
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut v = VERSION.to_le_bytes().to_vec();
    for e in entries {
        v.extend_from_slice(&e.tag.to_le_bytes());
        v.extend_from_slice(&e.perm.to_le_bytes());
        v.extend_from_slice(&e.id.to_le_bytes());
    }
    v
}

/// A regular file opened (never followed) for an ACL edit, locked until
/// dropped.
pub struct AclFile {
    file: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl AclFile {
    pub fn open(path: &Path) -> Result<AclFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| io_err("open", path, e))?;
        let m = file.metadata().map_err(|e| io_err("stat", path, e))?;
        if !m.is_file() {
            return Err(AclError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("lock", path, e.into()))?;
        Ok(AclFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The file's ACL: its extended attribute, or the three entries its
    /// mode stands for.
    fn read(&self) -> Result<Vec<Entry>> {
        match self
            .file
            .get_xattr(XATTR)
            .map_err(|e| io_err("read", &self.path, e))?
        {
            Some(b) => decode(&self.path, &b),
            None => {
                let mode = self
                    .file
                    .metadata()
                    .map_err(|e| io_err("stat", &self.path, e))?
                    .mode();
                let bits = |shift: u32| ((mode >> shift) & 7) as u16;
                Ok(vec![
                    Entry {
                        tag: USER_OBJ,
                        id: UNDEFINED_ID,
                        perm: bits(6),
                    },
                    Entry {
                        tag: GROUP_OBJ,
                        id: UNDEFINED_ID,
                        perm: bits(3),
                    },
                    Entry {
                        tag: OTHER,
                        id: UNDEFINED_ID,
                        perm: bits(0),
                    },
                ])
            }
        }
    }

    /// Writes `entries` back with the mask acl(5) requires: the union of
    /// the group class (the owning group, named users and groups), present
    /// only while there are named entries. (The kernel folds an ACL that
    /// only restates the mode back into the mode.)
    fn write(&self, mut entries: Vec<Entry>) -> Result<()> {
        entries.retain(|e| e.tag != MASK);
        let named = entries.iter().any(|e| e.tag == USER || e.tag == GROUP);
        if named {
            let perm = entries
                .iter()
                .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
                .fold(0, |m, e| m | e.perm);
            entries.push(Entry {
                tag: MASK,
                id: UNDEFINED_ID,
                perm,
            });
        }
        entries.sort();
        self.file
            .set_xattr(XATTR, &encode(&entries))
            .map_err(|e| io_err("write", &self.path, e))
    }

    /// Lets `uid` read the file, whatever its mode says about its group
    /// and others.
    pub fn grant_read(&self, uid: u32) -> Result<()> {
        let mut entries = self.read()?;
        entries.retain(|e| !(e.tag == USER && e.id == uid));
        entries.push(Entry {
            tag: USER,
            id: uid,
            perm: READ,
        });
        self.write(entries)
    }

    /// Takes from `uid` what `grant_read` gave it (nothing if it had
    /// nothing).
    pub fn revoke(&self, uid: u32) -> Result<()> {
        let entries = self.read()?;
        if !entries.iter().any(|e| e.tag == USER && e.id == uid) {
            return Ok(());
        }
        self.write(
            entries
                .into_iter()
                .filter(|e| !(e.tag == USER && e.id == uid))
                .collect(),
        )
    }

    /// The users the ACL names.
    pub fn users(&self) -> Result<Vec<u32>> {
        Ok(self
            .read()?
            .into_iter()
            .filter(|e| e.tag == USER)
            .map(|e| e.id)
            .collect())
    }

    /// Sets the file's owner and mode under the lock (with named entries,
    /// the group bits are the ACL's mask).
    pub fn set_owner_mode(&self, uid: u32, gid: u32, mode: u32) -> Result<()> {
        std::os::unix::fs::fchown(&*self.file, Some(uid), Some(gid))
            .map_err(|e| io_err("chown", &self.path, e))?;
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("chmod", &self.path, e))
    }
}

/// [`AclFile::grant_read`] on `path`.
pub fn grant_read(path: &Path, uid: u32) -> Result<()> {
    AclFile::open(path)?.grant_read(uid)
}

/// [`AclFile::revoke`] on `path`.
pub fn revoke(path: &Path, uid: u32) -> Result<()> {
    AclFile::open(path)?.revoke(uid)
}

/// [`AclFile::users`] of `path`.
pub fn users(path: &Path) -> Result<Vec<u32>> {
    AclFile::open(path)?.users()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        p.metadata().unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_grant_lets_one_user_read_and_a_revoke_restores_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rootfs.ext4");
        std::fs::write(&f, b"image").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        match grant_read(&f, 4_000_001) {
            Err(AclError::Unsupported { .. }) => {
                eprintln!("NOT RUN: the test dir's filesystem has no ACLs");
                return;
            }
            Err(AclError::Io { source, .. })
                if source.raw_os_error() == Some(nix::libc::EINVAL) =>
            {
                eprintln!("NOT RUN: uid 4000001 is not mapped here (a user namespace)");
                return;
            }
            r => r.unwrap(),
        }
        grant_read(&f, 4_000_002).unwrap();
        grant_read(&f, 4_000_001).unwrap();
        assert_eq!(users(&f).unwrap(), vec![4_000_001, 4_000_002]);
        // The mask (shown as the group bits) opens reading to the named
        // users; the owning group itself still has nothing.
        assert_eq!(mode(&f), 0o640);
        let acl = AclFile::open(&f).unwrap().read().unwrap();
        assert!(acl
            .iter()
            .any(|e| e.tag == GROUP_OBJ && e.perm == 0 && e.id == UNDEFINED_ID));
        revoke(&f, 4_000_001).unwrap();
        assert_eq!(users(&f).unwrap(), vec![4_000_002]);
        revoke(&f, 4_000_001).unwrap();
        revoke(&f, 4_000_002).unwrap();
        assert!(users(&f).unwrap().is_empty());
        assert_eq!(mode(&f), 0o600, "the ACL folded back into the mode");
        assert_eq!(xattr::get(&f, XATTR).unwrap(), None);
    }

    #[test]
    fn the_kernels_format_round_trips_and_junk_is_refused() {
        let e = vec![
            Entry {
                tag: USER_OBJ,
                id: UNDEFINED_ID,
                perm: 6,
            },
            Entry {
                tag: USER,
                id: 7,
                perm: 4,
            },
        ];
        let b = encode(&e);
        assert_eq!(b.len(), 4 + 16);
        assert_eq!(&b[..4], &[2, 0, 0, 0]);
        assert_eq!(decode(Path::new("f"), &b).unwrap(), e);
        assert!(decode(Path::new("f"), &b[..7]).is_err());
        assert!(decode(Path::new("f"), &[1, 0, 0, 0]).is_err());
    }
}
