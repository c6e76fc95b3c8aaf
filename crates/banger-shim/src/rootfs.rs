//! The container's root filesystem, mounted from the snapshotter's mount
//! (containerd leaves that to the shim) in its pod's directory, which the
//! pod's VM shares in over virtio-fs.

use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount as sys_mount, MsFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("rootfs: {n} mounts; banger's runtime takes one (an overlayfs or bind snapshot)")]
    Several { n: usize },
    #[error("rootfs: a {kind:?} mount is not supported (use the overlayfs or native snapshotter)")]
    Kind { kind: String },
    #[error("rootfs: mount {kind} {source_path} on {target}: {errno}")]
    Mount {
        kind: String,
        source_path: String,
        target: String,
        errno: nix::errno::Errno,
    },
}

/// Mounts `mounts` (at most one) at `target`: None when there was none
/// (a bundle whose rootfs is already there), else whether it is a
/// read-only bind, which the caller remounts read-only through the name
/// (a bind ignores `MS_RDONLY` on its first mount). (A spec's
/// `root.readonly` is the guest agent's to make, once the mount points are
/// made.)
pub fn mount(target: &Path, mounts: &[Mount]) -> Result<Option<bool>, RootfsError> {
    let m = match mounts {
        [] => return Ok(None),
        [m] => m,
        more => return Err(RootfsError::Several { n: more.len() }),
    };
    if !matches!(m.type_.as_str(), "overlay" | "bind" | "rbind" | "none") {
        return Err(RootfsError::Kind {
            kind: m.type_.clone(),
        });
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    if m.type_ == "bind" || m.type_ == "rbind" {
        flags |= MsFlags::MS_BIND;
    }
    let data = data.join(",");
    sys_mount(
        Some(m.source.as_str()),
        target,
        Some(m.type_.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|errno| RootfsError::Mount {
        kind: m.type_.clone(),
        source_path: m.source.clone(),
        target: target.display().to_string(),
        errno,
    })?;
    Ok(Some(flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY)))
}
