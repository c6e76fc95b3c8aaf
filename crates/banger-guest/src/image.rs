//! Building the default image: a Debian bookworm root filesystem from
//! Debian's packages (mmdebstrap), with its own cloud kernel and modules,
//! openssh-server and busybox init; shipped as an ext4 file, the ELF kernel
//! extracted from it, and a small initramfs (static busybox plus the virtio
//! modules). The image dir holds a `manifest.json`; the daemon indexes it in
//! SQLite.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_core::ImageRecord;
use banger_host::cmd::{self, CmdError};
use banger_host::fsutil::{self, FsError, WrapIo};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::initramfs::{initramfs, INITRAMFS_MODULES, OPTIONAL_MODULES};
use crate::kernel::{self, KernelError};
use crate::tree;

pub const DEFAULT_IMAGE: &str = "bookworm";
pub const MANIFEST: &str = "manifest.json";
pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initrd.img";
pub const ROOTFS_FILE: &str = "rootfs.ext4";

pub(crate) const INIT: &str = include_str!("../assets/init");
const INITTAB: &str = include_str!("../assets/inittab");
const SSHD_CONFIG: &str = include_str!("../assets/sshd_config");
const SSHD_WRAPPER: &str = include_str!("../assets/sshd");

/// What goes into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub suite: String,
    pub packages: Vec<String>,
    /// A static busybox from the host, the initramfs' only program.
    pub busybox: PathBuf,
}

impl Recipe {
    /// What the image is made of, as a short stable id (FNV-1a over the
    /// suite, packages, initramfs modules and the guest assets compiled into
    /// this banger): an image whose manifest carries another id was built by
    /// a different banger and may lack what this one relies on (e.g. the
    /// initramfs' virtio_mmio for Firecracker).
    pub fn id(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |s: &str| {
            for b in s.bytes().chain([0u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        feed(&self.suite);
        self.packages.iter().for_each(|p| feed(p));
        INITRAMFS_MODULES
            .iter()
            .chain(OPTIONAL_MODULES)
            .for_each(|m| feed(m));
        for asset in [INIT, INITTAB, SSHD_CONFIG, SSHD_WRAPPER] {
            feed(asset);
        }
        format!("{h:016x}")
    }

    pub fn default_for(name: &str) -> Option<Recipe> {
        (name == DEFAULT_IMAGE).then(|| Recipe {
            suite: "bookworm".into(),
            packages: [
                "linux-image-cloud-amd64",
                "openssh-server",
                "iproute2",
                "ca-certificates",
                "curl",
                "e2fsprogs",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            busybox: PathBuf::from("/bin/busybox"),
        })
    }
}

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("unknown image {0:?}: the images banger can build are: {DEFAULT_IMAGE}")]
    Unknown(String),
    #[error("image {name}: {source}")]
    Fs { name: String, source: FsError },
    #[error("image {name}: {source}")]
    Cmd { name: String, source: CmdError },
    #[error("image {name}: {source}")]
    Mirrors {
        name: String,
        source: crate::mirrors::MirrorError,
    },
    #[error("image {name}: mmdebstrap failed ({status}); its last lines:\n{tail}")]
    Bootstrap {
        name: String,
        status: String,
        tail: String,
    },
    #[error("image {name}: kernel {path}: {source}")]
    Kernel {
        name: String,
        path: PathBuf,
        source: KernelError,
    },
    #[error("image {name}: {what}")]
    Layout { name: String, what: String },
    #[error("image {name}: {source}")]
    Import {
        name: String,
        source: crate::import::ImportError,
    },
    #[error("image {name}: manifest {path}: {detail}")]
    Manifest {
        name: String,
        path: PathBuf,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kernel_version: String,
    pub rootfs_bytes: u64,
    pub created_at: i64,
    /// `Recipe::id` of what built it; empty for images older than the field.
    #[serde(default)]
    pub recipe: String,
}

impl Manifest {
    pub fn record(&self, dir: &Path) -> ImageRecord {
        ImageRecord {
            name: self.name.clone(),
            dir: dir.to_path_buf(),
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            rootfs: dir.join(ROOTFS_FILE),
            rootfs_bytes: self.rootfs_bytes,
            kernel_version: self.kernel_version.clone(),
            created_at: self.created_at,
        }
    }
}

/// Reads a finished image's manifest; `None` when the dir holds no complete
/// image (a build that never finished has no manifest).
/// Whether the image in `dir` was built from `recipe` as this banger has it
/// (false for a missing or unreadable manifest).
pub fn is_current(dir: &Path, recipe: &Recipe) -> bool {
    std::fs::read_to_string(dir.join(MANIFEST))
        .ok()
        .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
        .is_some_and(|m| m.recipe == recipe.id())
}

pub fn load(dir: &Path) -> Result<Option<ImageRecord>, ImageError> {
    let path = dir.join(MANIFEST);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ImageError::Manifest {
                name,
                path,
                detail: e.to_string(),
            })
        }
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::Manifest {
        name: name.clone(),
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let rec = m.record(dir);
    for f in [&rec.kernel, &rec.initrd, &rec.rootfs] {
        if !f.is_file() {
            return Err(ImageError::Manifest {
                name,
                path,
                detail: format!(
                    "{} is missing: rebuild with `banger image build --force`",
                    f.display()
                ),
            });
        }
    }
    Ok(Some(rec))
}

/// Builds image `name` into `dir` (through `dir.building`, renamed at the
/// end so a crash never leaves a half image that looks whole).
pub fn build(
    name: &str,
    dir: &Path,
    recipe: &Recipe,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let work = dir.with_extension("building");
    let r = build_into(name, dir, &work, recipe, progress);
    if r.is_err() {
        // A failed build leaves nothing (it can be gigabytes).
        let _ = fsutil::remove_dir_all_if_exists(&work);
    }
    r
}

fn build_into(
    name: &str,
    dir: &Path,
    work: &Path,
    recipe: &Recipe,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    // Offline, mmdebstrap would retry for minutes: asked first, in seconds.
    crate::mirrors::check().map_err(|source| ImageError::Mirrors {
        name: name.to_string(),
        source,
    })?;
    fsutil::remove_dir_all_if_exists(work).map_err(fs)?;
    fsutil::create_dir_all(work).map_err(fs)?;
    let rootfs = work.join("rootfs");

    crate::line(
        progress,
        &format!(
            "bootstrapping Debian {} with mmdebstrap (about a minute)",
            recipe.suite
        ),
    );
    bootstrap(name, recipe, &rootfs, progress)?;

    crate::line(progress, "installing banger's guest init and sshd config");
    customize(&rootfs, &recipe.busybox).map_err(fs)?;
    let kernel = KernelFrom::Tree {
        busybox: recipe.busybox.clone(),
    };
    assemble(name, dir, work, &rootfs, &kernel, &recipe.id(), progress)
}

/// Where an image's kernel, initramfs and modules come from.
pub(crate) enum KernelFrom<'a> {
    /// The root tree's own `/boot/vmlinuz-*` and `/lib/modules`.
    Tree { busybox: PathBuf },
    /// Another image's (an imported tree without a kernel): its vmlinux
    /// and initramfs, and its modules copied into the tree.
    Image(&'a ImageRecord),
}

/// The second half of every image: the kernel and initramfs, the ext4 root
/// filesystem written from `rootfs`, the manifest, and the swap of `work`
/// into `dir`.
pub(crate) fn assemble(
    name: &str,
    dir: &Path,
    work: &Path,
    rootfs: &Path,
    kernel: &KernelFrom,
    recipe: &str,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    let busybox = match kernel {
        KernelFrom::Tree { busybox } => busybox,
        KernelFrom::Image(base) => {
            crate::line(
                progress,
                &format!(
                    "no kernel in the tree: using image {}'s (kernel {})",
                    base.name, base.kernel_version
                ),
            );
            crate::import::borrow_kernel(name, base, rootfs, work)?;
            return finish(
                name,
                dir,
                work,
                rootfs,
                &base.kernel_version,
                recipe,
                progress,
            );
        }
    };
    crate::line(progress, "extracting the kernel");
    let (kver, vmlinuz) = find_kernel(name, rootfs)?;
    let bz = std::fs::read(&vmlinuz)
        .with_path("read", &vmlinuz)
        .map_err(fs)?;
    let elf = kernel::extract_vmlinux(&bz).map_err(|source| ImageError::Kernel {
        name: name.to_string(),
        path: vmlinuz.clone(),
        source,
    })?;
    fsutil::write(&work.join(KERNEL_FILE), &elf).map_err(fs)?;

    crate::line(progress, "building the initramfs");
    let initrd = initramfs(name, rootfs, &kver, busybox)?;
    fsutil::write(&work.join(INITRD_FILE), &initrd).map_err(fs)?;
    finish(name, dir, work, rootfs, &kver, recipe, progress)
}

/// Writes the ext4 root filesystem and the manifest next to the kernel and
/// initramfs in `work`, then swaps `work` into `dir`.
fn finish(
    name: &str,
    dir: &Path,
    work: &Path,
    rootfs: &Path,
    kver: &str,
    recipe: &str,
    progress: &mut crate::Progress<'_>,
) -> Result<ImageRecord, ImageError> {
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    let cmd_err = |source| ImageError::Cmd {
        name: name.to_string(),
        source,
    };
    crate::line(progress, "writing the ext4 root filesystem");
    let mib = write_ext4(rootfs, &work.join(ROOTFS_FILE), 0).map_err(cmd_err)?;
    fsutil::remove_dir_all_if_exists(rootfs).map_err(fs)?;

    let manifest = Manifest {
        name: name.to_string(),
        kernel_version: kver.to_string(),
        rootfs_bytes: mib * 1024 * 1024,
        created_at: banger_core::unix_now(),
        recipe: recipe.to_string(),
    };
    let rec = install(dir, work, &manifest)?;
    crate::line(
        progress,
        &format!(
            "image {name} ready: kernel {}, root filesystem {mib} MiB",
            manifest.kernel_version
        ),
    );
    Ok(rec)
}

/// Writes the tree at `tree` as a new ext4 file `out` (`mkfs.ext4 -d`),
/// sized for what the tree holds plus a quarter and 512 MiB (the
/// filesystem's own metadata and the user's packages), at least
/// `min_bytes`; returns its size in MiB.
pub fn write_ext4(tree: &Path, out: &Path, min_bytes: u64) -> Result<u64, CmdError> {
    let used: u64 = cmd::run("du", ["-sb".as_ref(), tree.as_os_str()])?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1 << 30);
    let mib = ((used >> 20) * 5 / 4 + 512)
        .max(min_bytes >> 20)
        .div_ceil(64)
        * 64;
    cmd::run_with(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "banger-root".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            out.as_os_str(),
            format!("{mib}M").as_ref(),
        ],
        None,
        MKFS_TIMEOUT,
    )?;
    Ok(mib)
}

/// Finishes an image whose kernel, initramfs and root filesystem are in
/// `work` (the `.building` dir next to `dir`): writes its manifest and
/// swaps it into `dir` (an old image there is moved aside first and removed
/// only once the new one is in place).
pub fn install(dir: &Path, work: &Path, manifest: &Manifest) -> Result<ImageRecord, ImageError> {
    let name = &manifest.name;
    let fs = |source| ImageError::Fs {
        name: name.to_string(),
        source,
    };
    let json = serde_json::to_string_pretty(manifest).map_err(|e| ImageError::Layout {
        name: name.to_string(),
        what: e.to_string(),
    })?;
    fsutil::write(&work.join(MANIFEST), json).map_err(fs)?;
    let old = dir.with_extension("old");
    fsutil::remove_dir_all_if_exists(&old).map_err(fs)?;
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_path("move aside", dir)
            .map_err(fs)?;
    }
    if let Err(e) = std::fs::rename(work, dir).with_path("rename into", dir) {
        let _ = std::fs::rename(&old, dir);
        return Err(fs(e));
    }
    fsutil::remove_dir_all_if_exists(&old).map_err(fs)?;
    Ok(manifest.record(dir))
}

/// How long mmdebstrap may take (62 s measured here) before the build is
/// failed and its processes killed: a stalled mirror must not hold the
/// image lock forever.
const BOOTSTRAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// How long writing the root filesystem may take.
const MKFS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

fn bootstrap(
    name: &str,
    recipe: &Recipe,
    rootfs: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<(), ImageError> {
    let mut child = Command::new("mmdebstrap")
        .args([
            "--mode=root",
            "--variant=minbase",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        ])
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg(&recipe.suite)
        .arg(rootfs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ImageError::Cmd {
            name: name.to_string(),
            source: CmdError::Spawn {
                program: "mmdebstrap".into(),
                source,
            },
        })?;
    // A watchdog kills mmdebstrap's process group at the deadline; its
    // stderr then ends and the wait below returns.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let group = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let late = finished.recv_timeout(BOOTSTRAP_TIMEOUT)
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if late {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        late
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(msg) = line.strip_prefix("I: ") {
                crate::line(progress, &format!("mmdebstrap: {msg}"));
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|source| ImageError::Cmd {
        name: name.to_string(),
        source: CmdError::Spawn {
            program: "mmdebstrap".into(),
            source,
        },
    })?;
    drop(done);
    if watchdog.join().unwrap_or(false) {
        return Err(ImageError::Cmd {
            name: name.to_string(),
            source: CmdError::TimedOut {
                command: "mmdebstrap".into(),
                secs: BOOTSTRAP_TIMEOUT.as_secs(),
            },
        });
    }
    if !status.success() {
        return Err(ImageError::Bootstrap {
            name: name.to_string(),
            status: status.to_string(),
            tail: tail.join("\n"),
        });
    }
    Ok(())
}

/// Installs banger's guest side into a root tree: the static busybox (PID 1
/// and the guest scripts), inittab, sshd's wrapper and config, an empty fstab and
/// machine-id, the dirs init mounts on; removes the shared host keys and
/// generic initrd. Every path is resolved inside `root` ([`tree`]): an
/// imported tree's symlinks never lead a write out of it.
pub(crate) fn customize(root: &Path, busybox: &Path) -> Result<(), FsError> {
    let io = |what: &str| {
        let p = root.join(what.trim_start_matches('/'));
        move |e: std::io::Error| FsError {
            op: "write in the image tree",
            path: p,
            source: e,
        }
    };
    for d in ["/work", "/root", "/run", "/tmp", "/proc", "/sys", "/dev"] {
        tree::create_dir_all(root, d).map_err(io(d))?;
    }
    let bb = std::fs::read(busybox).with_path("read", busybox)?;
    let files: [(&str, &[u8], u32); 6] = [
        ("/usr/lib/banger/busybox", &bb, 0o755),
        ("/usr/lib/banger/sshd", SSHD_WRAPPER.as_bytes(), 0o755),
        ("/etc/inittab", INITTAB.as_bytes(), 0o644),
        (
            "/etc/ssh/sshd_config.d/banger.conf",
            SSHD_CONFIG.as_bytes(),
            0o644,
        ),
        (
            "/etc/fstab",
            b"# banger mounts / and /work from its initramfs\n",
            0o644,
        ),
        ("/etc/machine-id", b"", 0o444),
    ];
    for (path, data, mode) in files {
        tree::write(root, path, data, mode).map_err(io(path))?;
    }
    // Host keys come per VM at boot; the ones the package made are shared
    // by every VM of the image, so they go. So does the generic initrd.
    for dir in ["/etc/ssh", "/boot"] {
        let d = tree::resolve(root, Path::new(dir)).map_err(io(dir))?;
        if !d.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d).with_path("read dir", &d)? {
            let e = e.with_path("read dir", &d)?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ssh_host_") || n.starts_with("initrd.img") {
                fsutil::remove_file_if_exists(&e.path())?;
            }
        }
    }
    Ok(())
}

pub(crate) fn find_kernel(name: &str, root: &Path) -> Result<(String, PathBuf), ImageError> {
    let boot = tree::resolve(root, Path::new("/boot"))
        .with_path("resolve", &root.join("boot"))
        .map_err(|source| ImageError::Fs {
            name: name.to_string(),
            source,
        })?;
    let entries = std::fs::read_dir(&boot)
        .with_path("read dir", &boot)
        .map_err(|source| ImageError::Fs {
            name: name.to_string(),
            source,
        })?;
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        // A version names files and is shown to users: plain characters.
        .filter(|v| {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
        })
        .collect();
    found.sort();
    let kver = found.pop().ok_or_else(|| ImageError::Layout {
        name: name.to_string(),
        what: format!("no kernel (vmlinuz-*) in {}", boot.display()),
    })?;
    let file = format!("/boot/vmlinuz-{kver}");
    let path = tree::resolve(root, Path::new(&file))
        .with_path("resolve", &boot.join(&file[6..]))
        .map_err(|source| ImageError::Fs {
            name: name.to_string(),
            source,
        })?;
    Ok((kver, path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn recipe_ids_are_stable_and_follow_the_recipe() {
        let r = super::Recipe::default_for(super::DEFAULT_IMAGE).unwrap();
        assert_eq!(r.id(), r.id());
        assert_eq!(r.id().len(), 16);
        let mut other = r.clone();
        other.packages.push("vim".into());
        assert_ne!(r.id(), other.id());

        let d = tempfile::tempdir().unwrap();
        assert!(!super::is_current(d.path(), &r), "no manifest");
        let m = |recipe: &str| {
            format!(
                r#"{{"name":"bookworm","kernel_version":"6.1","rootfs_bytes":1,"created_at":0{recipe}}}"#
            )
        };
        std::fs::write(d.path().join(super::MANIFEST), m("")).unwrap();
        assert!(
            !super::is_current(d.path(), &r),
            "older manifest, no recipe id"
        );
        std::fs::write(
            d.path().join(super::MANIFEST),
            m(&format!(r#","recipe":"{}""#, r.id())),
        )
        .unwrap();
        assert!(super::is_current(d.path(), &r));
    }

    use super::*;

    #[test]
    fn only_the_default_image_has_a_recipe() {
        assert!(Recipe::default_for(DEFAULT_IMAGE).is_some());
        assert!(Recipe::default_for("alpine").is_none());
    }

    #[test]
    fn incomplete_image_dirs_are_not_images() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), None);
        std::fs::write(
            d.path().join(MANIFEST),
            r#"{"name":"x","kernel_version":"6.1","rootfs_bytes":1,"created_at":0}"#,
        )
        .unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");
        for f in [KERNEL_FILE, INITRD_FILE, ROOTFS_FILE] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        assert_eq!(load(d.path()).unwrap().unwrap().kernel_version, "6.1");
    }
}
