//! The VM's directories: VMDir under the state dir (disks, logs, keys, the
//! handles scratch file) and its runtime dir (the VMM's API socket).

use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil;

use super::{held, Acq, End, Item, Resource};
use crate::error::Result;
use crate::host::Host;

#[derive(Debug)]
pub struct VmDir;

fn remove(res: &VmDir, vm: &str, held: &Item) -> Result<()> {
    let Item::VmDir(h) = held else {
        return Err(super::mismatch(res, vm, held));
    };
    fsutil::remove_dir_all_if_exists(&h.dir)?;
    Ok(fsutil::remove_dir_all_if_exists(&h.run)?)
}

impl Resource for VmDir {
    fn name(&self) -> &'static str {
        "vm_dir"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::VmDir]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let dir = host.cfg.layout.vm_dir(&cx.vm.id);
        fsutil::create_dir_all(&dir)?;
        // A clone's disks are copies of another VM's data: nobody else
        // reads them (its start hands the dir to its VMM's user).
        if cx.vm.runtime.restore.is_some() {
            fsutil::set_owner_mode(&dir, 0, 0, 0o700)?;
        }
        fsutil::create_dir_all(&host.cfg.layout.vm_runtime_dir(&cx.vm.id))?;
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        let (dir, run) = (
            host.cfg.layout.vm_dir(&vm.id),
            host.cfg.layout.vm_runtime_dir(&vm.id),
        );
        (dir.exists() || run.exists()).then_some(Item::VmDir(held::VmDir { dir, run }))
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        // A VM's files go before its row: a failure here fails the delete.
        remove(self, &vm.name, &held)?;
        Ok(None)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        remove(self, &r.vm_name, held)
    }
}
