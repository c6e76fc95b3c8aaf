//! The VM's named volumes, attached for its boot: each volume is held by
//! one running VM at a time (the daemon's `attached` map, under the volume
//! lock, rebuilt from running VMs by `adopt` after a restart). The VMM
//! gets them as disks after root and work (`/dev/vdc`, ...), the guest's
//! init mounts them at their paths.

use banger_core::{Release, VmHandles, VmRecord};

use super::{Acq, End, Item, Resource};
use crate::daemon::lock;
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Volumes;

fn detach(host: &Host<'_>, vm_id: &str) {
    lock(&host.volumes.attached).retain(|_, holder| holder != vm_id);
}

impl Resource for Volumes {
    fn name(&self) -> &'static str {
        "volumes"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Volumes]
    }

    fn used(&self, vm: &VmRecord) -> bool {
        !vm.spec.volumes.is_empty()
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        if !self.used(cx.vm) {
            return Ok(());
        }
        let _g = lock(&host.volumes.lock);
        // What a VM only root may use (its mounts, or root-only data on
        // any of its disks) writes on its volumes stays root's: every one
        // of them is marked, at each start (a volume it took from a
        // member's VM included).
        if crate::access::root_only(cx.vm) || crate::access::root_only_data(&host.store(), cx.vm)? {
            let store = host.store();
            for m in &cx.vm.spec.volumes {
                store.mark_root_only(banger_store::Owned::Volume, &m.name)?;
            }
        }
        let vms = host.store().list_vms()?;
        let mut attached = lock(&host.volumes.attached);
        for m in &cx.vm.spec.volumes {
            if !host.cfg.layout.volume(&m.name).is_file() {
                return Err(DaemonError::Invalid(format!(
                    "vm {:?}: volume {:?} is gone (`banger volume ls`)",
                    cx.vm.name, m.name
                )));
            }
            if let Some(holder) = attached.get(&m.name).filter(|h| **h != cx.vm.id) {
                let holder = vms
                    .iter()
                    .find(|v| &v.id == holder)
                    .map(|v| v.name.clone())
                    .unwrap_or_else(|| holder.clone());
                return Err(DaemonError::Invalid(format!(
                    "vm {:?}: volume {:?} is attached to running vm {holder:?}: stop it first",
                    cx.vm.name, m.name
                )));
            }
        }
        for m in &cx.vm.spec.volumes {
            attached.insert(m.name.clone(), cx.vm.id.clone());
        }
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        let names: Vec<String> = lock(&host.volumes.attached)
            .iter()
            .filter(|(_, holder)| **holder == vm.id)
            .map(|(n, _)| n.clone())
            .collect();
        (!names.is_empty()).then_some(Item::Volumes(super::held::Volumes { names }))
    }

    /// Detached before the reply: the VMM, ended before this, no longer
    /// writes the disks.
    fn end(&self, host: &Host<'_>, vm: &VmRecord, _held: Item, _how: End) -> Result<Option<Item>> {
        detach(host, &vm.id);
        Ok(None)
    }

    fn release(&self, host: &Host<'_>, r: &Release, _held: &Item) -> Result<()> {
        detach(host, &r.vm_id);
        Ok(())
    }

    fn adopt(&self, host: &Host<'_>, vm: &VmRecord) -> Result<()> {
        let mut attached = lock(&host.volumes.attached);
        for m in &vm.spec.volumes {
            attached.insert(m.name.clone(), vm.id.clone());
        }
        Ok(())
    }
}
