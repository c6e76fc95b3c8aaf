//! A pod's directory on the host: the one directory its VM shares (over
//! virtio-fs, at [`crate::spec::GUEST_POD`]), made a shared mount so that
//! what the shim mounts under it later (a container's root filesystem,
//! its bind mounts) propagates into virtiofsd's mount namespace and so
//! reaches the running guest. One per pod, in banger's runtime dir.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
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
    Mount {
        path: PathBuf,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("{0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PodError + '_ {
    move |source| PodError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mnt<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(nix::errno::Errno) -> PodError + 'a {
    move |errno| PodError::Mount {
        path: path.to_path_buf(),
        op,
        errno,
    }
}

/// Where pod `pod` of containerd namespace `namespace` has its directory.
pub fn dir(runtime_dir: &Path, namespace: &str, pod: &str) -> PathBuf {
    runtime_dir
        .join("containerd")
        .join(crate::spec::label(&format!("{namespace}/{pod}")))
}

/// Makes the pod's directory, a shared mount of its own (mode 0700).
pub fn make(dir: &Path) -> Result<(), PodError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    if is_mount_point(dir) {
        return Ok(()); // made already (a shim that came back)
    }
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(mnt(dir, "bind onto itself"))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(mnt(dir, "make shared"))?;
    Ok(())
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
    let r = (|| {
        let c = dir.join(key);
        let root = c.join("rootfs");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        if !crate::rootfs::mount(&root, rootfs)? {
            // No mounts: the bundle's rootfs is the root (ctr --rootfs).
            mount(
                Some(&bundle.join("rootfs")),
                &root,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(mnt(&root, "bind the bundle's rootfs"))?;
        }
        for (i, b) in binds.iter().enumerate() {
            let at = c.join("mounts").join(i.to_string());
            let parent = c.join("mounts");
            std::fs::create_dir_all(&parent).map_err(io(&parent))?;
            if b.dir {
                std::fs::create_dir_all(&at).map_err(io(&at))?;
            } else {
                std::fs::File::create(&at).map_err(io(&at))?;
            }
            mount(
                Some(&b.source),
                &at,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(mnt(&b.source, "bind"))?;
            if b.read_only {
                mount(
                    None::<&str>,
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(mnt(&at, "remount read-only"))?;
            }
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = unmount_container(dir, key);
    }
    r
}

/// Unmounts everything of container `key` and removes its directory.
pub fn unmount_container(dir: &Path, key: &str) -> Result<(), PodError> {
    let c = dir.join(key);
    unmount_under(&c)?;
    match std::fs::remove_dir_all(&c) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&c)(e)),
    }
}

/// Unmounts the pod's directory and removes it (its containers first).
pub fn remove(dir: &Path) -> Result<(), PodError> {
    unmount_under(dir)?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Whether anything but the pod's own mount is left in it.
pub fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// Every mount point at or under `path`, deepest first (this process's
/// mount table).
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(path))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

fn unmount_under(path: &Path) -> Result<(), PodError> {
    for p in mounts_under(path) {
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(PodError::Mount {
                    path: p,
                    op: "unmount",
                    errno,
                })
            }
        }
    }
    Ok(())
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
}
