//! The VM's work disk, mounted at /work in the guest: an empty ext4 that
//! survives stop/start, made as a sparse copy of a cached template (a
//! fraction of a millisecond instead of 7 ms of `mkfs`).

use std::path::PathBuf;
use std::time::Duration;

use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil::{self, WrapIo};
use tracing::info;

use super::{end_files, files_held, Acq, End, Item, Resource};
use crate::daemon::lock;
use crate::error::Result;
use crate::host::Host;

#[derive(Debug)]
pub struct WorkDisk;

/// How long `mkfs.ext4` of a template may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

impl Resource for WorkDisk {
    fn name(&self) -> &'static str {
        "work_disk"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::WorkDisk]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::VmDir]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let path = host.cfg.layout.vm_dir(&cx.vm.id).join(vmfiles::WORK_DISK);
        match &cx.vm.runtime.restore {
            // A clone's is a copy of its snapshot's.
            Some(snap) => {
                let snap = crate::snapshots::restorable(host, snap, cx.vm)?;
                fsutil::clone_or_copy(&snap.dir.join(vmfiles::WORK_DISK), &path)?;
            }
            None => {
                let template = work_template(host, cx.vm.spec.sizing.disk_mib)?;
                fsutil::copy_sparse(&template, &path)?;
            }
        }
        cx.vm.runtime.work_disk_path = Some(path);
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        files_held(&[host.cfg.layout.vm_dir(&vm.id).join(vmfiles::WORK_DISK)]).map(Item::WorkDisk)
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        end_files(vm, held)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        super::release_files(self, r, held)
    }
}

/// The empty ext4 of `mib` MiB new work disks are copied from, made on
/// first use (into a temporary name, then renamed, so that a crash never
/// leaves half a template).
pub(crate) fn work_template(host: &Host<'_>, mib: u64) -> Result<PathBuf> {
    let path = host.cfg.layout.work_template(mib);
    let size = banger_core::sizing::mib_to_bytes(mib);
    // Only a template of the right size counts (a crash can leave a short
    // one behind despite the rename; it is made again).
    let usable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size);
    if usable(&path) {
        return Ok(path);
    }
    let _t = lock(host.template_lock);
    if usable(&path) {
        return Ok(path);
    }
    fsutil::create_dir_all(&host.cfg.layout.cache_dir())?;
    let tmp = path.with_extension("tmp");
    fsutil::remove_file_if_exists(&tmp)?;
    if let Err(e) = make_work_fs(&tmp, mib) {
        let _ = fsutil::remove_file_if_exists(&tmp);
        return Err(e);
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_path("sync", &tmp)?;
    std::fs::rename(&tmp, &path).with_path("rename into", &path)?;
    info!(path = %path.display(), mib, "made a work-disk template");
    Ok(path)
}

/// A work-disk template: a sparse file with an empty ext4 on it (inode
/// tables left for the guest, which mounts it with `noinit_itable`; no
/// discard of a file that is all holes anyway; no reserved GDT blocks for
/// online growth, which banger never does). Changing these options means
/// bumping the version in `Layout::work_template`.
fn make_work_fs(work: &std::path::Path, mib: u64) -> Result<()> {
    let f = std::fs::File::create(work).with_path("create", work)?;
    f.set_len(banger_core::sizing::mib_to_bytes(mib))
        .with_path("size", work)?;
    drop(f);
    banger_host::cmd::run_with(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "banger-work".as_ref(),
            "-O".as_ref(),
            "^resize_inode".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
            work.as_os_str(),
        ],
        None,
        MKFS_TIMEOUT,
    )?;
    Ok(())
}
