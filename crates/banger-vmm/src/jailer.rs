//! Firecracker under its jailer (Firecracker's `docs/jailer.md`): the
//! jailer makes `<chroot_base>/<exec_file_name>/<id>/root`, copies the
//! Firecracker binary in, makes `/dev/net/tun` and `/dev/kvm` there,
//! `pivot_root`s into it in a mount namespace of its own, and execs
//! Firecracker as `uid:gid` with no supplementary groups (its seccomp
//! filters are Firecracker's default). Firecracker then sees nothing of
//! the host but that directory.
//!
//! So every file the API names is put into the chroot before the API is
//! called (hard links: the chroot lives under the state dir, on the VM's
//! filesystem; a block device, a dm-snapshot, is made again there with
//! `mknod`), and the API is given the paths inside it. The sockets
//! (API, vsock) are made inside it by Firecracker itself; the daemon finds
//! them under the chroot. The tap is opened by name from inside, so the
//! daemon makes `uid` its owner (`TUNSETOWNER`) before.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{VmConfig, VmmError};

/// How banger starts one Firecracker through the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// `--chroot-base-dir`.
    pub chroot_base: PathBuf,
    /// `--id`: alphanumeric and '-', at most 64 characters.
    pub id: String,
    pub uid: u32,
    pub gid: u32,
}

/// `<chroot_base>/<exec_file_name>/<id>/root`, the directory the jailed
/// Firecracker sees as `/`.
pub fn chroot_dir(chroot_base: &Path, firecracker: &Path, id: &str) -> PathBuf {
    let name = firecracker
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("firecracker"));
    chroot_base.join(name).join(id).join("root")
}

/// What the jailer leaves for one VM (removed whole at teardown).
pub fn jail_dir(chroot_base: &Path, firecracker: &Path, id: &str) -> PathBuf {
    let root = chroot_dir(chroot_base, firecracker, id);
    root.parent().map(Path::to_path_buf).unwrap_or(root)
}

/// A restore's snapshot files in the chroot, as the daemon puts them
/// there before the jailed Firecracker loads them.
pub const SNAPSHOT_STATE: &str = "snapshot.state";
pub const SNAPSHOT_MEM: &str = "snapshot.mem";

/// Whether `id` is one the jailer takes.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn err(cfg: &VmConfig, path: &Path, source: std::io::Error) -> VmmError {
    VmmError::Io {
        vmm: "jailer".into(),
        vm: cfg.name.clone(),
        path: path.to_path_buf(),
        source,
    }
}

/// Puts `host` into the chroot as `name` (a hard link, or a device node
/// of the same device), owned by `own` where given (shared read-only
/// files, the image's kernel and disk, keep root as owner and are read
/// through the VM uid's ACL grant on their inode); returns the path the jailed Firecracker sees.
fn put(
    cfg: &VmConfig,
    root: &Path,
    host: &Path,
    name: &str,
    own: Option<(u32, u32)>,
) -> Result<PathBuf, VmmError> {
    let inside = root.join(name);
    match std::fs::symlink_metadata(&inside) {
        Ok(_) => std::fs::remove_file(&inside).map_err(|e| err(cfg, &inside, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(cfg, &inside, e)),
    }
    let m = std::fs::metadata(host).map_err(|e| err(cfg, host, e))?;
    if m.file_type().is_block_device() {
        nix::sys::stat::mknod(
            &inside,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            m.rdev(),
        )
        .map_err(|e| err(cfg, &inside, e.into()))?;
    } else {
        std::fs::hard_link(host, &inside).map_err(|e| err(cfg, &inside, e))?;
    }
    if let Some((uid, gid)) = own {
        // (A hard link's owner is the file's: the VM's own files are its
        // identity's already, the log becomes it.)
        nix::unistd::fchownat(
            None,
            &inside,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| err(cfg, &inside, e.into()))?;
    }
    Ok(Path::new("/").join(name))
}

/// The path inside the chroot of `host`, which must lie under it (the
/// daemon puts the VM's sockets there).
fn inside(cfg: &VmConfig, root: &Path, host: &Path) -> Result<PathBuf, VmmError> {
    host.strip_prefix(root)
        .map(|rel| Path::new("/").join(rel))
        .map_err(|_| VmmError::Config {
            vmm: "jailer".into(),
            vm: cfg.name.clone(),
            detail: format!(
                "{} is outside the jail {}: the jailed Firecracker could not reach it",
                host.display(),
                root.display()
            ),
        })
}

/// Lays out the chroot for `cfg` and returns the configuration as the
/// jailed Firecracker sees it (every path inside the chroot).
pub fn prepare(cfg: &VmConfig, spec: &JailSpec, firecracker: &Path) -> Result<VmConfig, VmmError> {
    if !valid_id(&spec.id) {
        return Err(VmmError::Config {
            vmm: "jailer".into(),
            vm: cfg.name.clone(),
            detail: format!("jail id {:?}: alphanumeric and '-', at most 64", spec.id),
        });
    }
    let root = chroot_dir(&spec.chroot_base, firecracker, &spec.id);
    std::fs::create_dir_all(&root).map_err(|e| err(cfg, &root, e))?;
    let own = Some((spec.uid, spec.gid));
    let mut j = cfg.clone();
    j.kernel = put(cfg, &root, &cfg.kernel, "vmlinux", None)?;
    j.initrd = put(cfg, &root, &cfg.initrd, "initrd.img", own)?;
    // By position, not id: a snapshot records these paths, and a clone's
    // drives (its volumes' ids differ) are put at the same ones.
    for (i, (d, host)) in j.disks.iter_mut().zip(&cfg.disks).enumerate() {
        let owner = if host.read_only { None } else { own };
        d.path = put(cfg, &root, &host.path, &format!("drive-{i}"), owner)?;
    }
    // --log-path must exist: the VMM's log is made here, then linked in.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.vmm_log)
        .map_err(|e| err(cfg, &cfg.vmm_log, e))?;
    j.vmm_log = put(cfg, &root, &cfg.vmm_log, "vmm.log", own)?;
    j.api_sock = inside(cfg, &root, &cfg.api_sock)?;
    if let (Some(v), Some(h)) = (j.vsock.as_mut(), cfg.vsock.as_ref()) {
        v.uds_path = inside(cfg, &root, &h.uds_path)?;
    }
    Ok(j)
}

/// The jailer's command line (jailer.md's usage): its own options, then
/// after `--` Firecracker's (the jailer adds `--id` itself).
pub fn args(spec: &JailSpec, firecracker: &Path, jailed: &VmConfig) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |s: &std::ffi::OsStr| a.push(s.to_os_string());
    push("--id".as_ref());
    push(spec.id.as_ref());
    push("--exec-file".as_ref());
    push(firecracker.as_os_str());
    push("--uid".as_ref());
    push(spec.uid.to_string().as_ref());
    push("--gid".as_ref());
    push(spec.gid.to_string().as_ref());
    push("--chroot-base-dir".as_ref());
    push(spec.chroot_base.as_os_str());
    push("--".as_ref());
    push("--api-sock".as_ref());
    push(jailed.api_sock.as_os_str());
    push("--log-path".as_ref());
    push(jailed.vmm_log.as_os_str());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_follow_the_jailer() {
        assert!(valid_id("0123abcd-ef"));
        for bad in ["", "a/b", "a.b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert_eq!(
            chroot_dir(
                Path::new("/srv/jailer"),
                Path::new("/usr/bin/firecracker"),
                "vm1"
            ),
            PathBuf::from("/srv/jailer/firecracker/vm1/root")
        );
        assert_eq!(
            jail_dir(
                Path::new("/srv/jailer"),
                Path::new("/usr/bin/firecracker"),
                "vm1"
            ),
            PathBuf::from("/srv/jailer/firecracker/vm1")
        );
    }
}
