//! The VM's firewall and NAT rules in banger's own nftables table (see
//! `banger_host::firewall` for the policy), tagged with its id. Installed
//! on a thread of its own once the VMM runs, so that its `nft` runs overlap
//! the boot; checked and repaired by the stats poller (a firewall reload
//! that removed them); removed after the reply, found by their tag.

use std::time::Instant;

use banger_core::api::Event;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::firewall::{self, GuestRules};
use serde_json::{json, Value};

use super::{Acq, Resource};
use crate::daemon::{lock, micros, Daemon};
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Firewall;

/// The rules a VM gets: its policy, its tap, the host's uplink and
/// resolvers now.
pub fn rules(d: &Daemon, vm: &VmRecord, tap: &str) -> Result<GuestRules> {
    let uplink = if vm.spec.net.none {
        None
    } else {
        firewall::default_uplink()
    };
    Ok(GuestRules {
        vm_id: vm.id.clone(),
        tap: tap.to_string(),
        guest_ip: d.guest_net(vm)?.guest_ip,
        uplink,
        allow: vm.spec.net.allow.clone(),
        dns: if vm.spec.net.none {
            Vec::new()
        } else {
            banger_guest::config::guest_nameservers(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            )
        },
        guests: d.cfg.subnet.cidr(),
    })
}

impl Resource for Firewall {
    fn name(&self) -> &'static str {
        "firewall"
    }

    fn phase(&self) -> &'static str {
        "nat"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let tap = cx.handles.tap_device.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {:?} has no tap for its firewall", cx.vm.name))
        })?;
        let spec = rules(d, cx.vm, &tap)?;
        if spec.uplink.is_none() && !cx.vm.spec.net.none {
            (cx.events)(Event::Progress {
                message: "no default route on the host: the guest gets no outbound network".into(),
            });
        }
        let nat_lock = d.nat_lock.clone();
        let job = std::thread::Builder::new()
            .name("firewall-up".into())
            .spawn(move || {
                let t = Instant::now();
                let _n = lock(&nat_lock);
                firewall::up(&spec)?;
                Ok(micros(t))
            })
            .map_err(|e| DaemonError::Invalid(format!("cannot start the firewall thread: {e}")))?;
        cx.background.push(("nat-async", job));
        Ok(())
    }

    /// Rules exist only once a tap was recorded.
    fn held(&self, _d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        (h.tap_device.is_some() || vm.runtime.tap_device.is_some())
            .then(|| json!({ "vm_id": vm.id }))
    }

    fn release(&self, d: &Daemon, r: &Release, held: &Value) -> Result<()> {
        let vm_id = held["vm_id"].as_str().unwrap_or(&r.vm_id);
        let _n = lock(&d.nat_lock);
        firewall::down(vm_id).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "firewall",
            reason: e.to_string(),
        })
    }
}

impl Daemon {
    /// Puts back the firewall of every running VM whose rules are not all
    /// there (a firewall reload, `nft flush ruleset`); returns how many
    /// were repaired. Run by reconcile and, periodically, by the poller.
    pub fn repair_firewalls(&self) -> usize {
        let Ok(vms) = self.store().list_vms() else {
            return 0;
        };
        let mut repaired = 0;
        for vm in vms
            .iter()
            .filter(|v| v.runtime.state() == banger_core::VmState::Running)
        {
            let Some(tap) = self.current_handles(vm).tap_device else {
                continue;
            };
            let Ok(spec) = rules(self, vm, &tap) else {
                continue;
            };
            let _n = lock(&self.nat_lock);
            match firewall::is_up(&spec) {
                Ok(true) => {}
                Ok(false) => match firewall::up(&spec) {
                    Ok(()) => {
                        tracing::warn!(vm = %vm.name, "firewall rules were missing; put back");
                        repaired += 1;
                    }
                    Err(e) => tracing::warn!(vm = %vm.name, err = %e, "cannot repair the firewall"),
                },
                Err(e) => tracing::warn!(vm = %vm.name, err = %e, "cannot check the firewall"),
            }
        }
        repaired
    }
}
