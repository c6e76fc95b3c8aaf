//! A pod's directory on the host: the one directory its VM shares (over
//! virtio-fs, at [`crate::spec::GUEST_POD`]). It is a small tmpfs of its
//! own (so the guest, which may write in it, can fill 1 MiB, not the
//! host's /run), a shared mount in a peer group of its own, so that what
//! the shim mounts under it later (a container's root filesystem, its bind
//! mounts) propagates into virtiofsd's mount namespace and so reaches the
//! running guest. Its parent, `<runtime dir>/containerd`, is a private
//! mount, so that none of this propagates anywhere else on the host.
//!
//! The guest can rename and replace anything in the pod's directory, so
//! the shim never follows a path there: it makes each entry relative to a
//! descriptor it holds (`O_NOFOLLOW`, `O_EXCL`), and mounts onto the
//! descriptor (`/proc/self/fd/N`), never onto a name.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use thiserror::Error;

use crate::spec::HostBind;

#[derive(Debug, Error)]
pub enum PodError {
    #[error("pod dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod dir {path}: {op}: {errno}")]
    Sys {
        path: PathBuf,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("pod dir {path}: still mounted after unmounting: {left}")]
    Busy { path: PathBuf, left: String },
    #[error("{0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
}

fn sys<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(nix::errno::Errno) -> PodError + 'a {
    move |errno| PodError::Sys {
        path: path.to_path_buf(),
        op,
        errno,
    }
}

/// How big a pod's directory may grow (it holds only mount points).
const POD_DIR_SIZE: &str = "size=1m,nr_inodes=4096,mode=700";

/// Where pod `pod` of containerd namespace `namespace`, served by the shim
/// whose instance is `nonce`, has its directory.
pub fn dir(runtime_dir: &Path, namespace: &str, pod: &str, nonce: &str) -> PathBuf {
    base(runtime_dir).join(format!(
        "{}-{nonce}",
        crate::spec::label(&format!("{namespace}/{pod}"))
    ))
}

fn base(runtime_dir: &Path) -> PathBuf {
    // The real path: mountinfo names mounts by it (/var/run is /run).
    let rt = std::fs::canonicalize(runtime_dir).unwrap_or_else(|_| runtime_dir.to_path_buf());
    rt.join("containerd")
}

/// Makes the pod's directory: the private base made once, then a tmpfs
/// of its own there, shared.
pub fn make(dir: &Path) -> Result<(), PodError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = dir.parent().unwrap_or(dir).to_path_buf();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&base)
        .map_err(|source| PodError::Io {
            path: base.clone(),
            source,
        })?;
    {
        // One shim at a time checks and binds it (two first pods at once
        // would stack two binds, the second hiding the first's pods).
        let f = std::fs::File::open(&base).map_err(|source| PodError::Io {
            path: base.clone(),
            source,
        })?;
        let _locked = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| sys(&base, "lock")(e))?;
        if !is_mount_point(&base) {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(&base), &base, None::<&str>, flags, None::<&str>)
                .map_err(sys(&base, "bind onto itself"))?;
            mount(
                None::<&str>,
                &base,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(sys(&base, "make private"))?;
        }
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(source) => {
            return Err(PodError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let made = mount(
        Some("banger-pod"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(POD_DIR_SIZE),
    )
    .map_err(sys(dir, "mount its tmpfs"))
    .and_then(|()| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(sys(dir, "make shared"))
    });
    if made.is_err() {
        let _ = remove(dir);
    }
    made
}

/// Opens `path` for `O_PATH` use, not following a final symbolic link.
fn open_path(at: Option<i32>, name: &str, extra: OFlag) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        at,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | extra,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes directory `name` in the directory `at` is, which must not be
/// there yet (whatever is there was put by the guest), and opens it.
fn new_dir(at: &OwnedFd, name: &str, shown: &Path) -> Result<OwnedFd, PodError> {
    nix::sys::stat::mkdirat(Some(at.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
        .map_err(sys(shown, "make (it must not be there yet)"))?;
    open_path(Some(at.as_raw_fd()), name, OFlag::O_DIRECTORY).map_err(sys(shown, "open"))
}

/// Makes an empty file `name` (a file bind's mount point), as `new_dir`.
fn new_file(at: &OwnedFd, name: &str, shown: &Path) -> Result<OwnedFd, PodError> {
    let fd = nix::fcntl::openat(
        Some(at.as_raw_fd()),
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(sys(shown, "make (it must not be there yet)"))?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    open_path(Some(at.as_raw_fd()), name, OFlag::empty()).map_err(sys(shown, "open"))
}

fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Mounts container `key`'s root filesystem and binds in the pod's
/// directory; on failure, unmounts what it mounted.
pub fn mount_container(
    dir: &Path,
    key: &str,
    rootfs: &[Mount],
    bundle: &Path,
    binds: &[HostBind],
) -> Result<(), PodError> {
    let pod = open_dir(dir)?;
    // Made here, or refused: a name already there is the guest's, and is
    // neither used nor cleaned up.
    let c = new_dir(&pod, key, &dir.join(key))?;
    let r = (|| {
        let root = new_dir(&c, "rootfs", &dir.join(key).join("rootfs"))?;
        let ro_bind = crate::rootfs::mount(Path::new(&fd_path(&root)), rootfs)?;
        if ro_bind.is_none() {
            // No mounts: the bundle's rootfs is the root (ctr --rootfs).
            let from = bundle.join("rootfs");
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(
                Some(&from),
                fd_path(&root).as_str(),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(sys(&from, "bind the bundle's rootfs"))?;
        }
        if ro_bind == Some(true) {
            remount_read_only(&c, "rootfs", &dir.join(key).join("rootfs"))?;
        }
        if binds.is_empty() {
            return Ok(());
        }
        let mounts = new_dir(&c, "mounts", &dir.join(key).join("mounts"))?;
        for (i, b) in binds.iter().enumerate() {
            let shown = dir.join(key).join("mounts").join(i.to_string());
            let at = if b.dir {
                new_dir(&mounts, &i.to_string(), &shown)?
            } else {
                new_file(&mounts, &i.to_string(), &shown)?
            };
            // Read-only: not recursive (a submount would stay writable).
            let flags = if b.read_only {
                MsFlags::MS_BIND
            } else {
                MsFlags::MS_BIND | MsFlags::MS_REC
            };
            let at_path = fd_path(&at);
            mount(
                Some(&b.source),
                at_path.as_str(),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(sys(&b.source, "bind"))?;
            if b.read_only {
                remount_read_only(&mounts, &i.to_string(), &shown)?;
            }
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = unmount_container(dir, key, binds.len());
    }
    r
}

/// Remounts read-only the mount just made on `name` in the directory `at`
/// is: the name is opened again (a descriptor taken before the mount is
/// the directory under it, which a remount refuses).
fn remount_read_only(at: &OwnedFd, name: &str, shown: &Path) -> Result<(), PodError> {
    let on = open_path(Some(at.as_raw_fd()), name, OFlag::empty()).map_err(sys(shown, "open"))?;
    mount(
        None::<&str>,
        fd_path(&on).as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys(shown, "remount read-only"))
}

/// The pod's directory, opened to work relative to (a real directory,
/// never a link).
fn open_dir(dir: &Path) -> Result<OwnedFd, PodError> {
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys(dir, "open"))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `name` in the directory `at` is, for listing and
/// removing in it; never through a link.
fn open_subdir(at: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(at.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Unmounts whatever is mounted on `name` in the directory `at` is (all
/// of a stack), by descriptor: the name is opened (crossing into the
/// mount on it) and that mount unmounted, until nothing is mounted there.
fn unmount_at(at: &OwnedFd, name: &str, shown: &Path) -> Result<(), PodError> {
    for _ in 0..8 {
        let on = match open_path(Some(at.as_raw_fd()), name, OFlag::empty()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(sys(shown, "open")(e)),
        };
        match umount2(fd_path(&on).as_str(), MntFlags::MNT_DETACH) {
            Ok(()) => {}
            // Not a mount point (any more).
            Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(e) => return Err(sys(shown, "unmount")(e)),
        }
    }
    Err(PodError::Busy {
        path: shown.to_path_buf(),
        left: "8 mounts stacked".into(),
    })
}

/// Unmounts everything of container `key` (its root and its `n` bind
/// mounts) and removes the directories the shim made for it, all by
/// descriptor from the pod's directory (the guest may have renamed or
/// replaced any of it: a link is never followed, a name the shim did not
/// make is left, and nothing is removed that is not empty).
pub fn unmount_container(dir: &Path, key: &str, n: usize) -> Result<(), PodError> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let pod = open_dir(dir)?;
    let shown = dir.join(key);
    let c = match open_subdir(&pod, key) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(sys(&shown, "open")(e)),
    };
    unmount_at(&c, "rootfs", &shown.join("rootfs"))?;
    let mut left = false;
    match open_subdir(&c, "mounts") {
        Ok(mounts) => {
            for i in 0..n {
                let name = i.to_string();
                unmount_at(&mounts, &name, &shown.join("mounts").join(&name))?;
                let at = Some(mounts.as_raw_fd());
                let gone = unlinkat(at, name.as_str(), UnlinkatFlags::RemoveDir)
                    .or_else(|_| unlinkat(at, name.as_str(), UnlinkatFlags::NoRemoveDir));
                left |= gone.is_err();
            }
        }
        Err(nix::errno::Errno::ENOENT) => {}
        Err(_) => left = true,
    }
    for (at, name) in [(&c, "mounts"), (&c, "rootfs"), (&pod, key)] {
        match unlinkat(Some(at.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(_) => left = true,
        }
    }
    if left {
        // Only mount points were there; what the guest added stays in the
        // pod's tmpfs, which goes with the pod.
        log::warn!("{}: left what the guest put there", shown.display());
    }
    Ok(())
}

/// Unmounts the pod's directory, its containers' mounts with it (a lazy
/// unmount detaches the whole tree: nothing is looked up in what the
/// guest could change), and removes it. Its path is the host's: neither
/// the base nor the name is the guest's to change.
pub fn remove(dir: &Path) -> Result<(), PodError> {
    unmount_under(dir)?;
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PodError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Every mount point at or under `path`, deepest first (this thread's
/// mount table).
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(path))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Unmounts (detached, with everything under it) whatever is mounted on
/// `path` itself, again while something is (mounts stacked on it), then
/// checks that nothing at or under it is left.
fn unmount_under(path: &Path) -> Result<(), PodError> {
    for _ in 0..8 {
        if !is_mount_point(path) {
            break;
        }
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(errno) => {
                return Err(PodError::Sys {
                    path: path.to_path_buf(),
                    op: "unmount",
                    errno,
                })
            }
        }
    }
    let left = mounts_under(path);
    if left.is_empty() {
        return Ok(());
    }
    Err(PodError::Busy {
        path: path.to_path_buf(),
        left: left
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn is_mount_point(path: &Path) -> bool {
    mounts_under(path).iter().any(|p| p == path)
}

/// A mountinfo path, its octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if octal {
            let v = (u32::from(b[i + 1] - b'0') * 64)
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            let v = u8::try_from(v).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape("/end\\"), PathBuf::from("/end\\"));
    }

    /// The guest's tricks in a pod's directory: a name put where the shim
    /// makes one, a symbolic link for a mount point. Nothing is followed
    /// and nothing outside is touched. (Root: mounts; in a mount namespace
    /// of this thread's own.)
    #[test]
    fn a_guest_cannot_point_the_shim_outside_the_pod() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("NOT RUN: mounting needs root");
            return;
        }
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host data").unwrap();
        let source = tmp.path().join("src");
        std::fs::create_dir(&source).unwrap();
        let dir = base(tmp.path()).join("pod-1");
        make(&dir).unwrap();
        // The guest made the container's directory a link out.
        std::os::unix::fs::symlink(&outside, dir.join("k1")).unwrap();
        let bind = HostBind {
            source: source.clone(),
            read_only: true,
            dir: true,
        };
        let e = mount_container(&dir, "k1", &[], tmp.path(), std::slice::from_ref(&bind));
        assert!(e.is_err(), "a name the guest put there is refused");
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "host data"
        );
        assert!(mounts_under(&outside).is_empty(), "nothing mounted outside");
        // A fresh key works, and its removal leaves the host's data.
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(bundle.join("rootfs/file"), "rootfs data").unwrap();
        mount_container(&dir, "k2", &[], &bundle, &[bind]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("k2/rootfs/file")).unwrap(),
            "rootfs data"
        );
        assert!(
            std::fs::write(dir.join("k2/mounts/0/x"), "x").is_err(),
            "read-only"
        );
        unmount_container(&dir, "k2", 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(bundle.join("rootfs/file")).unwrap(),
            "rootfs data",
            "the rootfs is unmounted, never deleted"
        );
        remove(&dir).unwrap();
        assert!(!dir.exists());
        assert!(mounts_under(&dir).is_empty());
        umount2(&base(tmp.path()), MntFlags::MNT_DETACH).unwrap();
    }
}
