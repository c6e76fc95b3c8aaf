//! The `overlay` strategy, instant on any host filesystem and any VMM:
//! the image's ext4 is given to the VMM itself, read-only (so every VM of
//! an image shares its page cache), and a per-VM upper disk, an empty
//! sparse ext4 copied from the same cached templates as the work disks,
//! after the VM's other disks. The guest's initramfs mounts the image
//! read-only, the upper disk read-write, and joins them with overlayfs as
//! the root (`ROOT_UPPER` in its env).
//!
//! What it costs: a copy of a template's few hundred KiB of metadata,
//! whatever the image's size. What it gives up: the root filesystem is an
//! overlay, not ext4 (no `resize2fs`, `--root-size` sizes the upper disk
//! instead), and `vm commit` reads the merged tree.

use std::path::PathBuf;

use banger_core::layout::vmfiles;
use banger_core::{ImageRecord, RootDiskKind, VmRecord};
use banger_host::fsutil;

use crate::error::Result;
use crate::host::Host;

/// The upper disk's size when `--root-size` does not say: room for 8 GiB
/// of writes (sparse: it takes what the guest writes). One size for most
/// images, so one template serves them all.
pub const UPPER_DEFAULT_MIB: u64 = 8 << 10;

/// The upper disk's size: what `--root-size` asks for, else the default
/// or the image's size if that is larger (the room the guest would have
/// had on a copy of it).
pub fn upper_mib(vm: &VmRecord, img: &ImageRecord) -> u64 {
    let image_mib = img.rootfs_bytes.div_ceil(1 << 20);
    vm.spec
        .root_mib
        .unwrap_or_else(|| image_mib.max(UPPER_DEFAULT_MIB))
}

/// Makes the VM's upper disk; returns its path.
pub fn make_upper(host: &Host<'_>, vm: &VmRecord, img: &ImageRecord) -> Result<PathBuf> {
    let template = super::super::work_disk::work_template(host, upper_mib(vm, img))?;
    let path = host.cfg.layout.vm_dir(&vm.id).join(vmfiles::ROOT_UPPER);
    fsutil::copy_sparse(&template, &path)?;
    Ok(path)
}

/// The guest's block device for the upper disk: after root, work and the
/// volumes.
pub fn guest_device(vm: &VmRecord) -> Option<String> {
    (vm.spec.root_disk() == RootDiskKind::Overlay)
        .then(|| banger_core::volume::guest_device(vm.spec.volumes.len()))
}
