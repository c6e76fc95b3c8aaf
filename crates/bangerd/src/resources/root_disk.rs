//! The VM's root disk, copy-on-write over the image's read-only ext4: a
//! qcow2 overlay written in-process for QEMU; for Firecracker (raw disks
//! only) a reflink where the filesystem has them, else a sparse copy.

use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord, VmmKind};
use banger_host::fsutil::{self, WrapIo};
use serde_json::Value;

use super::{end_files, files_held, remove_files, Acq, End, Resource};
use crate::daemon::Daemon;
use crate::error::Result;

#[derive(Debug)]
pub struct RootDisk;

/// The root disk's file name for a VMM.
pub fn file_name(vmm: VmmKind) -> &'static str {
    match vmm {
        VmmKind::Qemu => vmfiles::ROOT_DISK,
        VmmKind::Firecracker => vmfiles::ROOT_RAW,
    }
}

/// Its format, as the VMM is told.
pub fn format(vmm: VmmKind) -> &'static str {
    match vmm {
        VmmKind::Qemu => "qcow2",
        VmmKind::Firecracker => "raw",
    }
}

impl Resource for RootDisk {
    fn name(&self) -> &'static str {
        "root_disk"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let path = d
            .cfg
            .layout
            .vm_dir(&cx.vm.id)
            .join(file_name(cx.vm.spec.vmm));
        // `--root-size`: the disk is made larger than the image (sparse);
        // the guest's init grows the filesystem into it.
        let grow_to = cx.vm.spec.root_mib.map(|m| m << 20);
        match cx.vm.spec.vmm {
            VmmKind::Qemu => banger_host::qcow2::create_overlay(&path, &cx.img.rootfs, grow_to)?,
            VmmKind::Firecracker => {
                let reflinked = fsutil::clone_or_copy(&cx.img.rootfs, &path)?;
                tracing::debug!(vm = %cx.vm.name, reflinked, "raw root disk");
                if let Some(size) = grow_to {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .with_path("open", &path)?;
                    if f.metadata().with_path("stat", &path)?.len() < size {
                        f.set_len(size).with_path("grow", &path)?;
                    }
                }
            }
        }
        cx.vm.runtime.system_overlay = Some(path);
        Ok(())
    }

    fn held(&self, d: &Daemon, vm: &VmRecord, _h: &VmHandles) -> Option<Value> {
        let dir = d.cfg.layout.vm_dir(&vm.id);
        files_held(&[dir.join(file_name(vm.spec.vmm))])
    }

    fn end(&self, _d: &Daemon, vm: &VmRecord, held: Value, _how: End) -> Result<Option<Value>> {
        end_files(vm, held)
    }

    fn release(&self, _d: &Daemon, _r: &Release, held: &Value) -> Result<()> {
        remove_files(held)
    }
}
