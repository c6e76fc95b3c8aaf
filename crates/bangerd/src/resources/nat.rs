//! The VM's NAT rules in banger's own nftables table (three per VM, tagged
//! with its id), when the host has a default route. Installed on a thread
//! of its own once the VMM runs, so that its `nft` runs overlap the boot;
//! removed after the reply, found by their tag (no handle needed).

use std::time::Instant;

use banger_core::api::Event;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::nat;
use serde_json::{json, Value};

use super::{Acq, Resource};
use crate::daemon::{lock, micros, Daemon};
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Nat;

impl Resource for Nat {
    fn name(&self) -> &'static str {
        "nat"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let Some(uplink) = nat::default_uplink() else {
            (cx.events)(Event::Progress {
                message: "no default route on the host: the guest gets no outbound network".into(),
            });
            return Ok(());
        };
        let spec = nat::NatSpec {
            vm_id: cx.vm.id.clone(),
            tap: cx.handles.tap_device.clone().ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no tap for its NAT rules", cx.vm.name))
            })?,
            guest_ip: d.guest_net(cx.vm)?.guest_ip,
            uplink,
        };
        let nat_lock = d.nat_lock.clone();
        let job = std::thread::Builder::new()
            .name("nat-up".into())
            .spawn(move || {
                let t = Instant::now();
                let _n = lock(&nat_lock);
                nat::up(&spec)?;
                Ok(micros(t))
            })
            .map_err(|e| DaemonError::Invalid(format!("cannot start the NAT thread: {e}")))?;
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
        nat::down(vm_id).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "nat",
            reason: e.to_string(),
        })
    }
}
