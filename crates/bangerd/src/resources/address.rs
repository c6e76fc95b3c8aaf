//! The guest's address: a /30 out of the configured range, chosen under the
//! network lock among those no VM and no pending release holds. It lives
//! with the VM's row; a deleted VM's address stays reserved until the rest
//! of its release (its tap, which carries the /30) is done.

use std::net::Ipv4Addr;

use banger_core::{Release, VmHandles, VmRecord};

use super::{held, Acq, Item, Resource};
use crate::daemon::lock;
use crate::error::Result;
use crate::host::Host;

#[derive(Debug)]
pub struct Address;

impl Resource for Address {
    fn name(&self) -> &'static str {
        "address"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::GuestAddress]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let _n = lock(host.net_lock);
        let used: Vec<Ipv4Addr> = {
            let store = host.store();
            let vms = store.list_vms()?;
            let releases = store.list_releases()?;
            vms.iter()
                .filter(|v| v.id != cx.vm.id)
                .filter_map(|v| v.runtime.guest_ip.as_deref()?.parse().ok())
                .chain(held::Reserved::of(&releases).addresses)
                .collect()
        };
        let net = host.cfg.subnet.allocate(&used)?;
        cx.vm.runtime.guest_ip = Some(net.guest_ip.to_string());
        // Saved under the lock: the next allocation sees it.
        host.save(cx.vm)
    }

    fn held(&self, _host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        let ip = vm.runtime.guest_ip.as_ref()?.parse().ok()?;
        Some(Item::Address(held::Address { ip: Some(ip) }))
    }

    // `end` keeps the default: released (and so reserved) after the reply.

    fn release(&self, _host: &Host<'_>, _r: &Release, _held: &Item) -> Result<()> {
        // Nothing in the kernel: the record's disappearance frees it.
        Ok(())
    }
}
