//! File helpers whose errors carry the path (youki's WrapIoResult idea).

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("{op} {path}: {source}")]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub trait WrapIo<T> {
    fn with_path(self, op: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> WrapIo<T> for std::io::Result<T> {
    fn with_path(self, op: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|source| FsError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

pub fn create_dir_all(path: &Path) -> Result<(), FsError> {
    std::fs::create_dir_all(path).with_path("create dir", path)
}

pub fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<(), FsError> {
    std::fs::write(path, data).with_path("write", path)
}

/// Writes through a temporary file and a rename, so readers never see half.
pub fn write_atomic(path: &Path, data: impl AsRef<[u8]>) -> Result<(), FsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_path("write", &tmp)?;
    std::fs::rename(&tmp, path).with_path("rename into", path)
}

/// Writes a new file whole or not at all, with `mode` from its creation
/// (a secret's 0600 is never looser, not even for a moment): a temporary
/// file beside it, synced, then renamed over `path`.
pub fn write_new_mode(path: &Path, data: impl AsRef<[u8]>, mode: u32) -> Result<(), FsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data.as_ref()).and_then(|()| f.sync_all()))
        .with_path("write", &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).with_path("rename into", path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Sets the owner and mode of `path` itself, never of what a symlink there
/// points at (a directory a confined VMM owns may hold a link it planted
/// where a file of the daemon's was): the inode is pinned by an
/// `O_PATH|O_NOFOLLOW` descriptor, a link is refused, and the changes go
/// through that descriptor's `/proc/self/fd` name.
pub fn set_owner_mode(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), FsError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let pinned = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(path)
        .with_path("open", path)?;
    let m = pinned.metadata().with_path("stat", path)?;
    if m.file_type().is_symlink() {
        return Err(FsError {
            op: "refuse to chown a link at",
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(nix::libc::ELOOP),
        });
    }
    let via = PathBuf::from(format!("/proc/self/fd/{}", pinned.as_raw_fd()));
    std::os::unix::fs::chown(&via, Some(uid), Some(gid)).with_path("chown", path)?;
    std::fs::set_permissions(&via, std::fs::Permissions::from_mode(mode)).with_path("chmod", path)
}

pub fn read_to_string(path: &Path) -> Result<String, FsError> {
    std::fs::read_to_string(path).with_path("read", path)
}

/// The last `n` lines of a text file, for error messages (empty if the file
/// cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    tail_lines_from(path, 0, n)
}

/// The last `n` lines of what a text file holds past byte `from` (what a
/// process appended since: a daemon's log of this start, not earlier ones).
pub fn tail_lines_from(path: &Path, from: u64, n: usize) -> String {
    // The last 64 KiB at most: a log a VMM owns may be huge (and sparse).
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024).max(from)));
        let _ = f.take(64 * 1024).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes a file; a missing file is not an error (teardown is idempotent).
pub fn remove_file_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_path("remove", path),
    }
}

/// Removes a directory tree; a missing one is not an error.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_path("remove dir", path),
    }
}

/// Copies `src` to a new file `dst` keeping its holes: only the extents
/// `SEEK_DATA`/`SEEK_HOLE` report are copied (`copy_file_range`, in the
/// kernel), the rest stays sparse. A fresh ext4 image of several GiB holds a
/// few hundred KiB of data, so this costs a fraction of a millisecond where
/// `mkfs.ext4` costs several. On failure `dst` is removed.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<(), FsError> {
    copy_file(src, dst, false).map(|_| ())
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Copies `src` to a new file `dst`: a reflink (`FICLONE`, instant and
/// sharing blocks, on btrfs and xfs) where the filesystem can, else
/// [`copy_sparse`]. Returns whether it reflinked.
pub fn clone_or_copy(src: &Path, dst: &Path) -> Result<bool, FsError> {
    copy_file(src, dst, true)
}

/// Makes `dst` a reflink of `src` (FICLONE: the two share every block until
/// one is written), or fails: no copy behind the caller's back. `dst` must
/// not exist; nothing is left of it on failure.
pub fn reflink(src: &Path, dst: &Path) -> Result<(), FsError> {
    let (input, output) = open_pair(src, dst)?;
    if let Err(e) = clone_fd(&input, &output) {
        drop(output);
        let _ = std::fs::remove_file(dst);
        return Err(std::io::Error::from_raw_os_error(e as i32)).with_path("reflink into", dst);
    }
    Ok(())
}

/// `src` opened for reading and `dst` created (it must not exist).
fn open_pair(src: &Path, dst: &Path) -> Result<(std::fs::File, std::fs::File), FsError> {
    let input = std::fs::File::open(src).with_path("open", src)?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_path("create", dst)?;
    Ok((input, output))
}

/// FICLONE of `input` into `output`.
fn clone_fd(input: &std::fs::File, output: &std::fs::File) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: both descriptors are open for the duration of the call; the
    // argument is the source descriptor, as FICLONE expects.
    unsafe { ficlone(output.as_raw_fd(), input.as_raw_fd() as nix::libc::c_ulong) }.map(|_| ())
}

/// Whether files in `dir` can be reflinked (tried on two scratch files,
/// removed again).
pub fn reflink_supported(dir: &Path) -> bool {
    let (a, b) = (dir.join(".reflink-probe-a"), dir.join(".reflink-probe-b"));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let ok = std::fs::write(&a, [0u8; 4096]).is_ok() && reflink(&a, &b).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

fn copy_file(src: &Path, dst: &Path, try_reflink: bool) -> Result<bool, FsError> {
    let (input, output) = open_pair(src, dst)?;
    if try_reflink && clone_fd(&input, &output).is_ok() {
        return Ok(true);
    }
    // From here on the file is ours to remove if the copy fails.
    let r = copy_extents(&input, src, &output, dst);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r.map(|()| false)
}

/// Copies the data of `input` (named `src` in errors) into `output`
/// (`dst`), sized as `input`: only its data extents, the holes left holes
/// (`output` must hold nothing yet).
pub fn copy_extents(
    input: &std::fs::File,
    src: &Path,
    output: &std::fs::File,
    dst: &Path,
) -> Result<(), FsError> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;

    let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    let len = input.metadata().with_path("stat", src)?.len();
    output.set_len(len).with_path("size", dst)?;
    let end = i64::try_from(len).unwrap_or(i64::MAX);
    let mut pos: i64 = 0;
    let mut in_kernel = true;
    let mut buf = Vec::new();
    while pos < end {
        let data = match lseek(input.as_raw_fd(), pos, Whence::SeekData) {
            Ok(d) => d,
            // No data after pos: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(errno(e)).with_path("seek data in", src),
        };
        let hole = lseek(input.as_raw_fd(), data, Whence::SeekHole)
            .map_err(errno)
            .with_path("seek hole in", src)?;
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            let n = if in_kernel {
                match nix::fcntl::copy_file_range(
                    input,
                    Some(&mut off_in),
                    output,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(n) => n,
                    // Across filesystems, or a filesystem without it:
                    // through a buffer from here on.
                    Err(
                        nix::errno::Errno::EXDEV
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::ENOSYS,
                    ) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(e) => return Err(errno(e)).with_path("copy into", dst),
                }
            } else {
                use std::os::unix::fs::FileExt;
                if buf.is_empty() {
                    buf = vec![0u8; 1 << 20];
                }
                let chunk = want.min(buf.len());
                let n = input
                    .read_at(&mut buf[..chunk], off_in as u64)
                    .with_path("read", src)?;
                output
                    .write_all_at(&buf[..n], off_out as u64)
                    .with_path("write", dst)?;
                off_in += n as i64;
                off_out += n as i64;
                n
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ))
                .with_path("copy from", src);
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn owner_and_mode_never_go_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (f, l) = (d.path().join("f"), d.path().join("l"));
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let e = set_owner_mode(&l, 4242, 4242, 0o600).unwrap_err();
        assert!(e.to_string().contains("link"), "{e}");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (0, 0o644),
            "the target is untouched"
        );
        set_owner_mode(&f, 4242, 4243, 0o600).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (4242, 4243, 0o600));
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        for (off, byte) in [(0u64, 1u8), (8 << 20, 2), ((64 << 20) - 4096, 3)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        let dst = d.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let m = std::fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "holes kept: {} bytes allocated",
            m.blocks() * 512
        );
        // An existing destination is refused and left alone.
        let e = copy_sparse(&src, &dst).unwrap_err();
        assert!(e.to_string().contains("dst"), "{e}");
        assert!(dst.exists());
        // A missing source names itself.
        let e = copy_sparse(&d.path().join("nope"), &d.path().join("x")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        // Across filesystems (tmpfs to this one): copy_file_range may
        // refuse (EXDEV), the buffered path takes over.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            let other = shm.path().join("src");
            std::fs::copy(&src, &other).unwrap();
            let dst3 = d.path().join("dst3");
            copy_sparse(&other, &dst3).unwrap();
            assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst3).unwrap());
        }
        // clone_or_copy: a reflink where the filesystem has them, else the
        // same sparse copy.
        let dst2 = d.path().join("dst2");
        let reflinked = clone_or_copy(&src, &dst2).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst2).unwrap());
        if !reflinked {
            assert!(std::fs::metadata(&dst2).unwrap().blocks() * 512 < 1 << 20);
        }
    }
}
