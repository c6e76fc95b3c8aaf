//! The VM's DNS listener: a UDP socket on its gateway address (the host end
//! of its /30), port 53, answered by `crate::dns` (its own name, and every
//! other name forwarded to the host's resolvers). The guest is given that
//! address as its nameserver. If it cannot be bound (a resolver of the
//! host's holds port 53 on every address), the guest is given the host's
//! resolvers instead, and told so. Lives in the daemon: reconcile opens it
//! again for the VMs it keeps.

use std::net::SocketAddr;

use banger_core::api::Event;
use banger_core::{Release, VmHandles, VmRecord};

use super::{Acq, End, Item, Resource};
use crate::daemon::lock;
use crate::dns::{Asker, Listener};
use crate::error::Result;
use crate::host::Host;

#[derive(Debug)]
pub struct Dns;

impl Host<'_> {
    /// Opens the VM's listener unless it is open; returns its address.
    fn open_dns(&self, vm: &VmRecord) -> Result<SocketAddr> {
        let addr = SocketAddr::from((self.guest_net(vm)?.host_ip, 53));
        let mut map = lock(&self.dns.vms);
        if !map.contains_key(&vm.id) {
            let l = Listener::start(self.dns_answerer(), addr, Asker::Guest(vm.id.clone()))?;
            map.insert(vm.id.clone(), l);
        }
        Ok(addr)
    }
}

impl Resource for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Nameserver]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        // (It binds the gateway's address, which the tap carries.)
        &[super::Handoff::GuestAddress, super::Handoff::Tap]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        // A pod VM resolves as its pod does (containerd gives each
        // container its resolv.conf).
        if cx.vm.spec.net.pod_netns.is_some() {
            cx.nameserver = None;
            return Ok(());
        }
        match host.open_dns(cx.vm) {
            Ok(addr) => cx.nameserver = Some(addr),
            Err(e) => {
                (cx.events)(Event::Progress {
                    message: format!(
                        "{e}: the guest uses the host's resolvers, and `<name>.{}` names do not \
                         resolve in it",
                        host.cfg.dns_suffix
                    ),
                });
                cx.nameserver = None;
            }
        }
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        lock(&host.dns.vms)
            .contains_key(&vm.id)
            .then(|| Item::Dns(Default::default()))
    }

    fn end(&self, host: &Host<'_>, vm: &VmRecord, _held: Item, _how: End) -> Result<Option<Item>> {
        // Dropped (stopped, its thread joined) after the map's lock is let go.
        let l = lock(&host.dns.vms).remove(&vm.id);
        drop(l);
        Ok(None)
    }

    fn release(&self, host: &Host<'_>, r: &Release, _held: &Item) -> Result<()> {
        let l = lock(&host.dns.vms).remove(&r.vm_id);
        drop(l);
        Ok(())
    }

    fn adopt(&self, host: &Host<'_>, vm: &VmRecord) -> Result<()> {
        host.open_dns(vm).map(|_| ())
    }
}
