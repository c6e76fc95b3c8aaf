//! The VM's tap (`bgtapN`), with the host end of its /30 on it. Mirrored on
//! the durable runtime (seed 000: the one datum that cannot be re-derived)
//! and in the handles; released after the reply (deleting a tap costs the
//! kernel an RCU grace period, about 20 ms here).

use banger_core::net::GUEST_PREFIX;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::tap;
use serde_json::{json, Value};

use super::{Acq, Resource};
use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Tap;

impl Resource for Tap {
    fn name(&self) -> &'static str {
        "tap"
    }

    fn phase(&self) -> &'static str {
        "network"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let net = d.guest_net(cx.vm)?;
        let name = {
            let _t = lock(&d.tap_lock);
            let name = tap::free_name(&[])?;
            tap::create(&name, net.host_ip, GUEST_PREFIX)?;
            name
        };
        cx.handles.tap_device = Some(name.clone());
        cx.vm.runtime.tap_device = Some(name);
        Ok(())
    }

    /// Cascade: handles (cache, then scratch file), then the runtime.
    fn held(&self, _d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        h.tap_device
            .clone()
            .or_else(|| vm.runtime.tap_device.clone())
            .map(|name| json!({ "name": name }))
    }

    fn release(&self, d: &Daemon, r: &Release, held: &Value) -> Result<()> {
        let Some(name) = held["name"].as_str() else {
            return Ok(());
        };
        // Only a tap banger names is banger's to delete; and not one that
        // another VM's row names now (a daemon that died between deleting
        // a tap and its record, after the name was reused). The released
        // VM's own row may still name it: its request saves the cleared
        // runtime after handing the release over.
        let owned = d
            .store()
            .list_vms()?
            .iter()
            .any(|v| v.id != r.vm_id && v.runtime.tap_device.as_deref() == Some(name));
        if !name.starts_with(tap::TAP_PREFIX) || owned {
            return Ok(());
        }
        tap::delete(name).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "tap",
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use banger_core::Held;

    use crate::daemon::testutil::{daemon, vm_with_tap};

    /// A release deletes its tap even while its own VM's row still names it
    /// (the request saves the cleared runtime after handing the release to
    /// the janitor), but never a tap another VM's row names. Real taps, in
    /// a network namespace private to the test's thread.
    #[test]
    fn releases_delete_their_tap_unless_another_vm_owns_it() {
        let d = tempfile::tempdir().unwrap();
        let daemon = Arc::new(daemon(d.path()));
        let dm = daemon.clone();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let ip = Ipv4Addr::new(172, 30, 0, 1);
            let release = |vm_id: &str, tap: &str| banger_core::Release {
                id: 0,
                vm_id: vm_id.into(),
                vm_name: format!("vm-{vm_id}"),
                items: vec![Held {
                    resource: "tap".into(),
                    data: serde_json::json!({ "name": tap }),
                }],
            };
            // Its own row still names the tap: deleted all the same.
            banger_host::tap::create("bgtap0", ip, 30).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("a1", "a", Some("bgtap0")))
                .unwrap();
            dm.store().insert_release(&release("a1", "bgtap0")).unwrap();
            dm.release_vm("a1").unwrap();
            assert!(
                !banger_host::tap::exists("bgtap0"),
                "its own VM's row does not keep it"
            );
            assert!(dm.store().list_releases().unwrap().is_empty());

            // Another VM's row names it (a daemon died between deleting a
            // tap and its record, and the name was reused): kept.
            banger_host::tap::create("bgtap1", ip, 30).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("b2", "b", Some("bgtap1")))
                .unwrap();
            dm.store()
                .insert_release(&release("gone", "bgtap1"))
                .unwrap();
            dm.release_vm("gone").unwrap();
            assert!(banger_host::tap::exists("bgtap1"), "b's tap is left alone");
            assert!(dm.store().list_releases().unwrap().is_empty());
            banger_host::tap::delete("bgtap1").unwrap();
        })
        .join()
        .expect("release test thread");
    }
}
