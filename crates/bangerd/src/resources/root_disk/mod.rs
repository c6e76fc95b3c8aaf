//! The VM's root disk, copy-on-write over the image's read-only ext4, by
//! one of five strategies ([`RootDiskKind`]), chosen at create for this
//! host and VMM ([`choose`]) and recorded in the VM's spec:
//!
//! - `qcow2` (QEMU): a qcow2 file backed by the image, written in-process;
//! - `dm-snapshot` (where device-mapper exists): the seeds' design, see
//!   [`dm`]; the COW file is made here, the kernel objects at each start;
//! - `reflink` (a state dir on XFS or btrfs): a FICLONE of the image;
//! - `overlay` (Firecracker on ext4 without device-mapper): the image
//!   itself as a read-only disk, joined by overlayfs in the guest's
//!   initramfs to a per-VM upper disk copied from a sparse empty-ext4
//!   template, see [`overlay`];
//! - `copy`: a sparse copy, the last resort (linear in the image's size).
//!
//! Every strategy but `copy` costs the same whatever the image's size
//! (`scripts/bench.sh --storage-only`, docs/BENCHMARKS.md). The image's
//! file is never written: it is a qcow2 backing file, a read-only loop
//! device, a reflink source or a read-only disk.

use std::path::PathBuf;

use banger_core::layout::vmfiles;
use banger_core::{ImageRecord, Release, RootDiskKind, VmHandles, VmRecord, VmmKind};
use banger_host::fsutil::{self, WrapIo};

use super::{end_files, files_held, Acq, End, Item, Resource};
use crate::error::{DaemonError, Result};
use crate::host::Host;

pub mod dm;
pub mod overlay;

#[derive(Debug)]
pub struct RootDisk;

/// What this host offers root disks, probed once per daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostDisks {
    /// `/dev/mapper/control` and `dmsetup` are there.
    pub device_mapper: bool,
    /// The state dir's filesystem reflinks (XFS, btrfs).
    pub reflink: bool,
}

impl HostDisks {
    pub fn probe(images_dir: &std::path::Path) -> HostDisks {
        HostDisks {
            device_mapper: dm::available(),
            reflink: fsutil::reflink_supported(images_dir),
        }
    }
}

/// The strategy for a new VM on `vmm`: the configured one
/// (`--root-disk`, `BANGER_ROOT_DISK`) if the VMM and host can take it,
/// else the best this host has.
pub fn choose(host: &Host<'_>, vmm: VmmKind) -> Result<RootDiskKind> {
    let disks = host.host_disks();
    if let Some(k) = host.cfg.root_disk {
        usable(k, vmm, disks).map_err(DaemonError::Invalid)?;
        return Ok(k);
    }
    Ok(best(vmm, disks))
}

/// The best strategy for `vmm` on `host`: QEMU reads qcow2 (the only one
/// that needs nothing of the host); Firecracker takes raw disks only.
pub fn best(vmm: VmmKind, host: HostDisks) -> RootDiskKind {
    match vmm {
        VmmKind::Qemu => RootDiskKind::Qcow2,
        VmmKind::Firecracker if host.device_mapper => RootDiskKind::DmSnapshot,
        VmmKind::Firecracker if host.reflink => RootDiskKind::Reflink,
        VmmKind::Firecracker => RootDiskKind::Overlay,
    }
}

/// Whether `kind` works for `vmm` on `host`; if not, why and what to do.
pub fn usable(
    kind: RootDiskKind,
    vmm: VmmKind,
    host: HostDisks,
) -> std::result::Result<(), String> {
    match kind {
        RootDiskKind::Qcow2 if vmm != VmmKind::Qemu => Err(format!(
            "root disk strategy qcow2 needs QEMU ({vmm} takes raw disks): use --root-disk overlay, reflink or dm-snapshot"
        )),
        RootDiskKind::DmSnapshot if !host.device_mapper => Err(
            "root disk strategy dm-snapshot needs device-mapper (/dev/mapper/control and dmsetup): \
             load dm_snapshot, or use --root-disk overlay"
                .into(),
        ),
        RootDiskKind::Reflink if !host.reflink => Err(
            "root disk strategy reflink needs a state dir on a filesystem with reflinks (XFS, btrfs): \
             use --root-disk overlay"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Every file a root disk may be made of (all strategies: a crash can
/// leave any of them, and a VM's files are its own).
fn all_files(dir: &std::path::Path) -> Vec<PathBuf> {
    [
        vmfiles::ROOT_DISK,
        vmfiles::ROOT_RAW,
        vmfiles::ROOT_UPPER,
        vmfiles::ROOT_COW,
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect()
}

/// The disk the VMM boots from (the guest's /dev/vda), and for `overlay`
/// the upper disk it gets after the VM's other disks.
pub fn vmm_disks(
    host: &Host<'_>,
    vm: &VmRecord,
    img: &ImageRecord,
    h: &VmHandles,
) -> Result<(banger_vmm::Disk, Option<banger_vmm::Disk>)> {
    let dir = host.cfg.layout.vm_dir(&vm.id);
    let disk = |path: PathBuf, format: &str, read_only: bool| banger_vmm::Disk {
        id: "root".into(),
        path,
        format: format.into(),
        read_only,
    };
    Ok(match vm.spec.root_disk() {
        RootDiskKind::Qcow2 => (disk(dir.join(vmfiles::ROOT_DISK), "qcow2", false), None),
        RootDiskKind::Reflink | RootDiskKind::Copy => {
            (disk(dir.join(vmfiles::ROOT_RAW), "raw", false), None)
        }
        RootDiskKind::Overlay => (
            disk(img.rootfs.clone(), "raw", true),
            Some(banger_vmm::Disk {
                id: "upper".into(),
                ..disk(dir.join(vmfiles::ROOT_UPPER), "raw", false)
            }),
        ),
        RootDiskKind::DmSnapshot => {
            let dev = h.dm_dev.clone().ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no dm-snapshot device", vm.name))
            })?;
            (disk(PathBuf::from(dev), "raw", false), None)
        }
    })
}

impl Resource for RootDisk {
    fn name(&self) -> &'static str {
        "root_disk"
    }

    fn gives(&self) -> &'static [crate::resources::Handoff] {
        &[crate::resources::Handoff::RootDisk]
    }

    fn needs(&self) -> &'static [crate::resources::Handoff] {
        &[crate::resources::Handoff::VmDir]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let dir = host.cfg.layout.vm_dir(&cx.vm.id);
        // `--root-size`: the disk is made larger than the image (sparse);
        // the guest's init grows the filesystem into it.
        let grow_to = cx.vm.spec.root_mib.map(|m| m << 20);
        let rootfs = &cx.img.rootfs;
        // A clone's is a copy of its snapshot's (a qcow2 overlay of the
        // same image, or a raw copy).
        if let Some(snap) = &cx.vm.runtime.restore {
            let snap = crate::snapshots::restorable(host, snap, cx.vm)?;
            let file = crate::snapshots::root_file(cx.vm.spec.root_disk()).ok_or_else(|| {
                DaemonError::Invalid(format!(
                    "snapshot {:?} has no root disk a clone can copy",
                    snap.name
                ))
            })?;
            let path = dir.join(file);
            fsutil::clone_or_copy(&snap.dir.join(file), &path)?;
            cx.vm.runtime.system_overlay = Some(path);
            return Ok(());
        }
        let path = match cx.vm.spec.root_disk() {
            RootDiskKind::Qcow2 => {
                let path = dir.join(vmfiles::ROOT_DISK);
                banger_host::qcow2::create_overlay(&path, rootfs, grow_to)?;
                path
            }
            kind @ (RootDiskKind::Reflink | RootDiskKind::Copy) => {
                let path = dir.join(vmfiles::ROOT_RAW);
                if kind == RootDiskKind::Reflink {
                    fsutil::reflink(rootfs, &path)?;
                } else {
                    fsutil::copy_sparse(rootfs, &path)?;
                }
                if let Some(size) = grow_to {
                    grow(&path, size)?;
                }
                path
            }
            RootDiskKind::Overlay => overlay::make_upper(host, cx.vm, cx.img)?,
            RootDiskKind::DmSnapshot => dm::make_cow(&dir, cx.img)?,
        };
        cx.vm.runtime.system_overlay = Some(path);
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        files_held(&all_files(&host.cfg.layout.vm_dir(&vm.id))).map(Item::RootDisk)
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        end_files(vm, held)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        super::release_files(self, r, held)
    }
}

/// Extends a raw disk to `size` bytes (sparse), if it is smaller.
fn grow(path: &std::path::Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_path("open", path)?;
    if f.metadata().with_path("stat", path)?.len() < size {
        f.set_len(size).with_path("grow", path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: HostDisks = HostDisks {
        device_mapper: true,
        reflink: true,
    };
    const NONE: HostDisks = HostDisks {
        device_mapper: false,
        reflink: false,
    };

    #[test]
    fn the_best_strategy_follows_the_vmm_and_the_host() {
        assert_eq!(best(VmmKind::Qemu, NONE), RootDiskKind::Qcow2);
        assert_eq!(best(VmmKind::Qemu, ALL), RootDiskKind::Qcow2);
        assert_eq!(best(VmmKind::Firecracker, ALL), RootDiskKind::DmSnapshot);
        let reflink = HostDisks {
            device_mapper: false,
            reflink: true,
        };
        assert_eq!(best(VmmKind::Firecracker, reflink), RootDiskKind::Reflink);
        // ext4 without device-mapper (this machine): still O(1).
        assert_eq!(best(VmmKind::Firecracker, NONE), RootDiskKind::Overlay);
    }

    #[test]
    fn a_strategy_the_host_or_vmm_cannot_take_is_refused_with_the_fix() {
        let e = usable(RootDiskKind::Qcow2, VmmKind::Firecracker, ALL).unwrap_err();
        assert!(e.contains("needs QEMU") && e.contains("--root-disk"), "{e}");
        let e = usable(RootDiskKind::DmSnapshot, VmmKind::Qemu, NONE).unwrap_err();
        assert!(e.contains("/dev/mapper/control"), "{e}");
        let e = usable(RootDiskKind::Reflink, VmmKind::Firecracker, NONE).unwrap_err();
        assert!(e.contains("XFS"), "{e}");
        for k in [RootDiskKind::Overlay, RootDiskKind::Copy] {
            for vmm in [VmmKind::Qemu, VmmKind::Firecracker] {
                assert!(usable(k, vmm, NONE).is_ok());
            }
        }
    }
}
