//! The VM's place in the firewall: its elements in the sets of banger's
//! own nftables table (see `banger_host::firewall` for the policy).
//! Installed on a thread of its own once the VMM runs, so that its `nft`
//! runs overlap the boot; checked and repaired by the stats poller (a
//! firewall reload that removed them); removed after the reply. The held
//! item records the elements themselves, so the release needs nothing else.

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

/// The VM's elements: its policy, its tap, the host's resolvers now.
pub fn rules(d: &Daemon, vm: &VmRecord, tap: &str) -> Result<GuestRules> {
    let outside = !vm.spec.net.none;
    Ok(GuestRules {
        vm_id: vm.id.clone(),
        tap: tap.to_string(),
        guest_ip: d.guest_net(vm)?.guest_ip,
        outside,
        allow: vm.spec.net.allow.clone(),
        dns: if outside {
            banger_guest::config::guest_nameservers(
                &std::fs::read_to_string(&d.cfg.resolv_conf).unwrap_or_default(),
            )
        } else {
            Vec::new()
        },
        guests: d.cfg.subnet.cidr(),
        networked: vm.spec.net.network.is_some(),
        peers: peers(d, vm)?,
    })
}

/// The other VMs of the VM's network that have a tap now.
fn peers(d: &Daemon, vm: &VmRecord) -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let Some(net) = &vm.spec.net.network else {
        return Ok(Vec::new());
    };
    let others = d.store().list_vms()?;
    Ok(others
        .iter()
        .filter(|o| o.id != vm.id && o.spec.net.network.as_ref() == Some(net))
        .filter_map(|o| {
            let tap = d.current_handles(o).tap_device?;
            let ip = o.runtime.guest_ip.as_deref()?.parse().ok()?;
            Some((tap, ip))
        })
        .collect())
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
        if spec.outside && firewall::default_uplink().is_none() {
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

    /// Elements exist only once a tap was recorded.
    fn held(&self, d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        let tap = h
            .tap_device
            .clone()
            .or_else(|| vm.runtime.tap_device.clone())?;
        match rules(d, vm, &tap) {
            Ok(r) => serde_json::to_value(r).ok(),
            // (No address to name the element by: only an older banger's
            // rules, found by the VM's tag, can exist.)
            Err(_) => Some(json!({ "vm_id": vm.id })),
        }
    }

    fn release(&self, d: &Daemon, r: &Release, held: &Value) -> Result<()> {
        let failed = |e: firewall::FirewallError| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "firewall",
            reason: e.to_string(),
        };
        let _n = lock(&d.nat_lock);
        // What an older banger left (rules tagged with the VM's id in its
        // `ip banger` table); nothing when that table is not there.
        let vm_id = held["vm_id"].as_str().unwrap_or(&r.vm_id);
        firewall::down_legacy(vm_id).map_err(failed)?;
        match serde_json::from_value::<GuestRules>(held.clone()) {
            Ok(rules) => firewall::down(&rules).map_err(failed),
            Err(_) => Ok(()),
        }
    }
}

impl Daemon {
    /// Puts back the firewall elements of every running VM that lacks them
    /// (a firewall reload, `nft flush ruleset`), and banger's accepts in a
    /// foreign forward chain that drops by policy (a firewall started after
    /// banger's table); returns how many VMs were repaired. One `nft` run
    /// when all is well. Run by reconcile and, periodically, by the poller.
    pub fn repair_firewalls(&self) -> usize {
        let Ok(vms) = self.store().list_vms() else {
            return 0;
        };
        let running: Vec<(VmRecord, String)> = vms
            .into_iter()
            .filter(|v| v.runtime.state() == banger_core::VmState::Running)
            .filter_map(|v| {
                let tap = self.current_handles(&v).tap_device?;
                Some((v, tap))
            })
            .collect();
        if running.is_empty() {
            return 0;
        }
        let _n = lock(&self.nat_lock);
        let present = match firewall::present() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(err = %e, "cannot check the firewall");
                return 0;
            }
        };
        let mut repaired = 0;
        for (vm, tap) in &running {
            let Ok(spec) = rules(self, vm, tap) else {
                continue;
            };
            if present.contains(&(spec.tap.clone(), spec.guest_ip)) {
                continue;
            }
            match firewall::up(&spec) {
                Ok(()) => {
                    tracing::warn!(vm = %vm.name, "firewall elements were missing; put back");
                    repaired += 1;
                }
                Err(e) => tracing::warn!(vm = %vm.name, err = %e, "cannot repair the firewall"),
            }
        }
        match firewall::repair_foreign() {
            Ok(fixed) => {
                for c in fixed {
                    tracing::warn!(chain = %c, "a forward chain that drops by policy appeared; banger's accepts added");
                }
            }
            Err(e) => tracing::warn!(err = %e, "cannot check foreign forward chains"),
        }
        repaired
    }
}
