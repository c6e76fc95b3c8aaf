//! `banger image import NAME FILE|DIR`: an image from a root filesystem the
//! user already has: an ext4 image, a tarball (plain or gzip), a directory,
//! or an OCI image (an OCI layout directory, or `docker save` output, as a
//! directory or a tar archive; see [`crate::oci`]). Every format becomes a
//! root tree under the image's `.building` dir; the tree is checked for
//! what banger needs (a shell; sshd is optional), gets banger's guest side the way
//! `image build` installs it, and is written out as the image's ext4 by
//! [`image::assemble`]. A tree without a kernel borrows the default image's.
//!
//! Everything here is untrusted: tar entries stay inside the tree (the
//! `tar` crate refuses `..` and paths through symlinks leading out), paths
//! in the tree are resolved inside it ([`crate::tree`]), and a user's ext4
//! is read in user space (e2fsck, then debugfs), never mounted.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_core::ImageRecord;
use banger_host::cmd;
use banger_host::fsutil::{self, WrapIo};
use thiserror::Error;

use crate::image::{self, ImageError, KernelFrom};
use crate::oci::{self, OciError};
use crate::tree;

/// What an import's source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ext4,
    Tar,
    Dir,
    OciLayout,
    DockerArchive,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Ext4 => "ext4 image",
            Format::Tar => "root filesystem tarball",
            Format::Dir => "root filesystem directory",
            Format::OciLayout => "OCI image layout",
            Format::DockerArchive => "docker save archive",
        })
    }
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{path}: {what}")]
    Source { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the imported tree has no {what}: {fix}")]
    Missing { what: String, fix: String },
    #[error(transparent)]
    Oci(#[from] OciError),
}

/// How long e2fsck, debugfs or cp may take on one import.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Imports `src` as image `name` into `dir` (through `dir.building`, which
/// a failure removes). `base` lends its kernel to a tree without one.
pub fn import(
    name: &str,
    dir: &Path,
    src: &Path,
    base: Option<&ImageRecord>,
    busybox: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let work = dir.with_extension("building");
    let r = import_into(name, dir, &work, src, base, busybox, progress);
    if r.is_err() {
        let _ = fsutil::remove_dir_all_if_exists(&work);
    }
    r
}

fn import_into(
    name: &str,
    dir: &Path,
    work: &Path,
    src: &Path,
    base: Option<&ImageRecord>,
    busybox: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let err = |source: ImportError| ImageError::Import {
        name: name.to_string(),
        source,
    };
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    let format = detect(src).map_err(err)?;
    crate::line(progress, &format!("importing {} ({format})", src.display()));
    fsutil::remove_dir_all_if_exists(work).map_err(fs)?;
    fsutil::create_dir_all(work).map_err(fs)?;
    // Owner-only while it holds an untrusted tree (setuid files included).
    set_mode(work, 0o700).map_err(err)?;
    let rootfs = work.join("rootfs");
    match format {
        Format::Ext4 => ext4_tree(src, &rootfs).map_err(err)?,
        Format::Dir => copy_dir(src, &rootfs).map_err(err)?,
        Format::OciLayout => {
            oci::unpack_layout(src, &rootfs, progress).map_err(|e| err(e.into()))?
        }
        Format::DockerArchive => {
            oci::unpack_docker(src, &rootfs, progress).map_err(|e| err(e.into()))?
        }
        Format::Tar => {
            let input = work.join("input");
            fsutil::create_dir_all(&input).map_err(fs)?;
            let skipped = unpack_file(src, &input, false, "unpacking", progress).map_err(err)?;
            match classify_dir(&input) {
                Format::OciLayout => {
                    crate::line(progress, "the archive is an OCI image layout");
                    oci::unpack_layout(&input, &rootfs, progress).map_err(|e| err(e.into()))?
                }
                Format::DockerArchive => {
                    crate::line(progress, "the archive is docker save output");
                    oci::unpack_docker(&input, &rootfs, progress).map_err(|e| err(e.into()))?
                }
                _ => {
                    report_skipped(skipped, progress);
                    std::fs::rename(&input, &rootfs)
                        .with_path("rename into", &rootfs)
                        .map_err(fs)?;
                }
            }
            fsutil::remove_dir_all_if_exists(&input).map_err(fs)?;
        }
    }
    set_mode(&rootfs, 0o755).map_err(err)?;
    check_tree(&rootfs).map_err(err)?;
    crate::line(progress, "installing banger's guest init and sshd config");
    image::customize(&rootfs, busybox).map_err(fs)?;
    let kernel = match (own_kernel(name, &rootfs), base) {
        (Ok(()), _) => KernelFrom::Tree {
            busybox: busybox.to_path_buf(),
        },
        (Err(why), Some(base)) => {
            crate::line(
                progress,
                &format!("{why}: the kernel will be image {}'s", base.name),
            );
            KernelFrom::Image(base)
        }
        (Err(why), None) => {
            return Err(err(ImportError::Missing {
                what: "usable kernel".into(),
                fix: format!(
                    "{why}; imports without one borrow the default image's kernel: \
                     run `banger image build` first"
                ),
            }))
        }
    };
    image::assemble(name, dir, work, &rootfs, &kernel, "import", progress)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ImportError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ImportError::Io {
            path: p.to_path_buf(),
            source,
        }
    })
}

fn report_skipped(n: u64, progress: &mut crate::Progress<'_>) {
    if n > 0 {
        crate::line(
            progress,
            &format!("skipped {n} device node(s) and fifo(s): a banger guest's /dev is devtmpfs"),
        );
    }
}

/// What `src` is, from its type and first bytes.
pub fn detect(src: &Path) -> Result<Format, ImportError> {
    let source = |what: &str| ImportError::Source {
        path: src.to_path_buf(),
        what: what.to_string(),
    };
    let meta = std::fs::metadata(src).map_err(|e| source(&e.to_string()))?;
    if meta.is_dir() {
        return Ok(classify_dir(src));
    }
    if !meta.is_file() {
        return Err(source("not a file or a directory"));
    }
    let mut head = vec![0u8; 4096];
    let mut f = std::fs::File::open(src).map_err(|e| source(&e.to_string()))?;
    let n = read_up_to(&mut f, &mut head).map_err(|e| source(&e.to_string()))?;
    let head = &head[..n];
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xef]) {
        return Ok(Format::Ext4);
    }
    if at(0, &[0x1f, 0x8b]) || at(257, b"ustar") {
        return Ok(Format::Tar);
    }
    for (magic, what, tool) in [
        (&b"\xfd7zXZ\0"[..], "xz", "xz -d"),
        (&b"\x28\xb5\x2f\xfd"[..], "zstd", "zstd -d"),
        (&b"BZh"[..], "bzip2", "bzip2 -d"),
    ] {
        if at(0, magic) {
            return Err(source(&format!(
                "compressed with {what}, which import does not read: decompress it first \
                 (`{tool} FILE`), or recompress with gzip"
            )));
        }
    }
    Err(source(
        "not an ext4 image, a tar archive (plain or gzip), an OCI image or a directory",
    ))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A directory is an OCI layout (`oci-layout`, or `index.json` and
/// `blobs/`), `docker save` output (`manifest.json` and no `/etc`), or a
/// root tree.
fn classify_dir(d: &Path) -> Format {
    if d.join("oci-layout").is_file()
        || (d.join("index.json").is_file() && d.join("blobs").is_dir())
    {
        Format::OciLayout
    } else if d.join("manifest.json").is_file() && !d.join("etc").exists() {
        Format::DockerArchive
    } else {
        Format::Dir
    }
}

/// Unpacks the tar file `src` (plain or gzip) into `root`; returns how many
/// device nodes and fifos it skipped.
/// `what` names it in the byte counts reported through `progress`.
pub(crate) fn unpack_file(
    src: &Path,
    root: &Path,
    layer: bool,
    what: &str,
    progress: &mut crate::Progress<'_>,
) -> Result<u64, ImportError> {
    let io = |source| ImportError::Io {
        path: src.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(src).map_err(io)?;
    let total = f.metadata().map_err(io)?.len();
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut f, &mut magic).map_err(io)?;
    f.rewind().map_err(io)?;
    let r = std::io::BufReader::new(crate::Counting::new(f, what, total, progress));
    let res = if n == 2 && magic == [0x1f, 0x8b] {
        unpack(flate2::read::GzDecoder::new(r), root, layer)
    } else {
        unpack(r, root, layer)
    };
    res.map_err(io)
}

/// Unpacks a tar stream into `root`, owners, modes and xattrs kept. With
/// `layer` (an OCI layer), whiteout entries are skipped (see
/// [`oci::whiteouts`]) and an entry replaces what lower layers left at its
/// path when the kinds differ (a directory over a file, or the reverse).
pub fn unpack(r: impl Read, root: &Path, layer: bool) -> std::io::Result<u64> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    let mut skipped = 0;
    for e in ar.entries()? {
        let mut e = e?;
        let kind = e.header().entry_type();
        let path = e.path()?.into_owned();
        if layer
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(oci::WHITEOUT))
        {
            continue;
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            skipped += 1;
            continue;
        }
        if layer {
            replace_other_kind(root, &path, kind.is_dir())?;
        }
        if !e.unpack_in(root)? {
            return Err(std::io::Error::other(format!(
                "entry {:?} leads out of the root (`..`): refused",
                path.display().to_string()
            )));
        }
    }
    Ok(skipped)
}

/// Removes what is at `path` in the tree when it is not of the kind about to
/// be unpacked there.
fn replace_other_kind(root: &Path, path: &Path, dir: bool) -> std::io::Result<()> {
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let at = tree::resolve(root, parent)?.join(file);
    match std::fs::symlink_metadata(&at) {
        Ok(m) if m.is_dir() && !dir => std::fs::remove_dir_all(&at),
        Ok(m) if !m.is_dir() && dir => std::fs::remove_file(&at),
        _ => Ok(()),
    }
}

/// A directory tree, copied with everything `cp -a` keeps (owners, modes,
/// hard links, xattrs, device nodes); the user's directory is not touched.
fn copy_dir(src: &Path, rootfs: &Path) -> Result<(), ImportError> {
    fsutil::create_dir_all(rootfs).map_err(|e| ImportError::Io {
        path: rootfs.to_path_buf(),
        source: e.source,
    })?;
    let from = src.join(".");
    cmd::run_with(
        "cp",
        [
            "-a".as_ref(),
            "--reflink=auto".as_ref(),
            from.as_os_str(),
            rootfs.as_os_str(),
        ],
        None,
        TOOL_TIMEOUT,
    )
    .map_err(|e| ImportError::Source {
        path: src.to_path_buf(),
        what: e.to_string(),
    })?;
    Ok(())
}

/// An ext4 image's tree, read in user space: `e2fsck -fn` must find it
/// clean (a crafted filesystem is refused before anything reads it), then
/// debugfs `rdump`s the root's entries. debugfs keeps owners, modes and
/// times; hard links become copies, and device nodes and xattrs stay
/// behind (noted in the docs).
fn ext4_tree(src: &Path, rootfs: &Path) -> Result<(), ImportError> {
    let source = |what: String| ImportError::Source {
        path: src.to_path_buf(),
        what,
    };
    cmd::run_with(
        "e2fsck",
        ["-fn".as_ref(), src.as_os_str()],
        None,
        TOOL_TIMEOUT,
    )
    .map_err(|e| {
        source(format!(
            "e2fsck -fn found problems ({e}): repair it with `e2fsck -f {}`, then import again",
            src.display()
        ))
    })?;
    let run = |request: &str| debugfs(src, request).map_err(source);
    let listing = run("ls -p /")?;
    let mut names = Vec::new();
    let mut root_mode = None;
    for line in listing.lines() {
        // `/inode/mode/uid/gid/name/size/`
        let f: Vec<&str> = line.trim().split('/').collect();
        if f.len() < 7 {
            continue;
        }
        let name = f[5];
        if name == "." {
            root_mode = u32::from_str_radix(f[2], 8).ok();
        }
        if name == "." || name == ".." || name == "lost+found" {
            continue;
        }
        if !plain_word(name) {
            return Err(source(format!(
                "the root directory has an entry named {name:?}: banger imports root entries with \
                 plain names only"
            )));
        }
        names.push(format!("/{name}"));
    }
    if !plain_word(&rootfs.to_string_lossy()) {
        return Err(source(format!(
            "the state dir path {} has spaces or quotes, which debugfs cannot take",
            rootfs.display()
        )));
    }
    fsutil::create_dir_all(rootfs).map_err(|e| ImportError::Io {
        path: rootfs.to_path_buf(),
        source: e.source,
    })?;
    if !names.is_empty() {
        run(&format!("rdump {} {}", names.join(" "), rootfs.display()))?;
    }
    if let Some(m) = root_mode {
        set_mode(rootfs, m & 0o7777)?;
    }
    Ok(())
}

/// A word debugfs' command parser takes as is.
fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\'))
}

/// What banger needs in a guest: a shell (scripts, `vm run`'s login
/// shell). Commands, files and readiness go through the guest agent, so
/// sshd is not needed: an image without one boots and runs commands, and
/// only `vm ssh` says that it has none.
fn check_tree(root: &Path) -> Result<(), ImportError> {
    if !tree::is_executable(root, "/bin/sh") {
        return Err(ImportError::Missing {
            what: "shell (/bin/sh)".into(),
            fix:
                "banger runs guest commands through it; install one (e.g. dash or busybox) in the \
                  image and import again"
                    .into(),
        });
    }
    Ok(())
}

/// Whether the tree's own kernel can boot it: a `/boot/vmlinuz-*` whose
/// modules dir has the initramfs' modules uncompressed.
fn own_kernel(name: &str, root: &Path) -> Result<(), String> {
    let (kver, _) =
        image::find_kernel(name, root).map_err(|_| "the tree has no kernel".to_string())?;
    let dep = tree::resolve(
        root,
        &Path::new("/lib/modules").join(&kver).join("modules.dep"),
    )
    .and_then(std::fs::read_to_string)
    .map_err(|_| format!("the tree's kernel {kver} has no modules.dep"))?;
    let order = crate::initramfs::module_load_order(&dep, crate::initramfs::INITRAMFS_MODULES)
        .map_err(|e| format!("the tree's kernel {kver}: {e}"))?;
    match order.iter().find(|m| !m.ends_with(".ko")) {
        Some(m) => Err(format!(
            "the tree's kernel {kver} has compressed modules ({m}), which banger's initramfs \
             does not load"
        )),
        None => Ok(()),
    }
}

/// The kernel of `base` for a tree without one: its vmlinux and initramfs
/// into `work`, its modules into the tree's `/lib/modules` (read from the
/// base image's ext4 with debugfs).
pub(crate) fn borrow_kernel(
    name: &str,
    base: &ImageRecord,
    rootfs: &Path,
    work: &Path,
) -> Result<(), ImageError> {
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    fsutil::clone_or_copy(&base.kernel, &work.join(image::KERNEL_FILE)).map_err(fs)?;
    fsutil::clone_or_copy(&base.initrd, &work.join(image::INITRD_FILE)).map_err(fs)?;
    let err = |what: String| ImageError::Import {
        name: name.to_string(),
        source: ImportError::Source {
            path: base.rootfs.clone(),
            what,
        },
    };
    let modules = tree::create_dir_all(rootfs, "/lib/modules").map_err(|e| err(e.to_string()))?;
    if modules.join(&base.kernel_version).exists() || !plain_word(&base.kernel_version) {
        return Ok(());
    }
    if !plain_word(&modules.to_string_lossy()) {
        return Err(err(format!(
            "{} has spaces or quotes, which debugfs cannot take",
            modules.display()
        )));
    }
    let request = format!(
        "rdump /lib/modules/{} {}",
        base.kernel_version,
        modules.display()
    );
    debugfs(&base.rootfs, &request).map(drop).map_err(err)
}

/// Runs one debugfs request on `image` (read-only); its stdout. debugfs
/// exits 0 whatever happened: its first stderr line is its banner, any
/// other is a failure.
fn debugfs(image: &Path, request: &str) -> Result<String, String> {
    let (out, err) = cmd::run_both(
        "debugfs",
        ["-R".as_ref(), request.as_ref(), image.as_os_str()],
        None,
        TOOL_TIMEOUT,
    )
    .map_err(|e| e.to_string())?;
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .take(5)
        .collect();
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(format!("debugfs {request:?}: {}", errors.join("; ")))
    }
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
