//! The VM's tap (`bgtapN`), with the host end of its /30 on it. Mirrored on
//! the durable runtime (seed 000: the one datum that cannot be re-derived)
//! and in the handles; released after the reply (deleting a tap costs the
//! kernel an RCU grace period, about 20 ms here).
//!
//! The pool (seed; `--tap-pool N`, default 0): N spare taps, down and
//! without an address, made by the janitor; a start takes one and puts the
//! VM's address on it, a release takes the address off and gives it back
//! (or deletes it when the pool is full). The spares' names are kept in
//! `<runtime>/tap-pool`, so that a daemon that died is followed by one
//! that deletes them; a clean shutdown deletes them too.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use banger_core::net::GUEST_PREFIX;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::{fsutil, tap};
use serde_json::{json, Value};
use tracing::warn;

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
        let spare = d.take_spare();
        let name = match spare {
            Some(n) => match tap::assign(&n, net.host_ip, GUEST_PREFIX) {
                Ok(()) => n,
                Err(e) => {
                    warn!(tap = %n, err = %e, "a spare tap would not take the address; a new one");
                    let _ = tap::delete(&n);
                    new_tap(d, net.host_ip)?
                }
            },
            None => new_tap(d, net.host_ip)?,
        };
        cx.handles.tap_device = Some(name.clone());
        cx.vm.runtime.tap_device = Some(name);
        Ok(())
    }

    /// Cascade: handles (cache, then scratch file), then the runtime.
    fn held(&self, d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        let name = h
            .tap_device
            .clone()
            .or_else(|| vm.runtime.tap_device.clone())?;
        let host_ip = d.guest_net(vm).ok().map(|n| n.host_ip);
        Some(json!({ "name": name, "host_ip": host_ip }))
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
        let host_ip = held["host_ip"].as_str().and_then(|s| s.parse().ok());
        if let Some(ip) = host_ip {
            if d.give_back(name, ip) {
                return Ok(());
            }
        }
        tap::delete(name).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "tap",
            reason: e.to_string(),
        })
    }
}

/// A new tap with the VM's address, its name chosen under the tap lock.
fn new_tap(d: &Daemon, host_ip: Ipv4Addr) -> Result<String> {
    let _t = lock(&d.tap_lock);
    let name = tap::free_name(&[])?;
    tap::create(&name, host_ip, GUEST_PREFIX)?;
    Ok(name)
}

/// The spare taps.
#[derive(Debug, Default)]
pub struct TapPool {
    spare: Mutex<Vec<String>>,
}

impl Daemon {
    fn pool_file(&self) -> std::path::PathBuf {
        self.cfg.layout.runtime_dir.join("tap-pool")
    }

    fn save_pool(&self, spare: &[String]) {
        let mut text = spare.join("\n");
        text.push('\n');
        if let Err(e) = fsutil::write_atomic(&self.pool_file(), text) {
            warn!(err = %e, "cannot record the tap pool");
        }
    }

    fn take_spare(&self) -> Option<String> {
        let mut spare = lock(&self.tap_pool.spare);
        let n = spare.pop()?;
        self.save_pool(&spare);
        drop(spare);
        // Refilled off the request's path.
        let me = self.weak();
        let _ = std::thread::Builder::new()
            .name("tap-pool".into())
            .spawn(move || {
                if let Some(d) = me.upgrade() {
                    let _ = crate::process_nice();
                    d.fill_tap_pool();
                }
            });
        Some(n)
    }

    /// Puts a released tap back in the pool if it has room (address off,
    /// link down); false: the caller deletes it.
    fn give_back(&self, name: &str, host_ip: Ipv4Addr) -> bool {
        let mut spare = lock(&self.tap_pool.spare);
        if spare.len() >= self.cfg.tap_pool || !tap::exists(name) {
            return false;
        }
        // Root's again (a jailed Firecracker's user owned it).
        if let Err(e) =
            tap::reset(name, host_ip, GUEST_PREFIX).and_then(|()| tap::set_owner(name, 0))
        {
            warn!(tap = %name, err = %e, "cannot reset a tap for the pool; deleting it");
            return false;
        }
        spare.push(name.to_string());
        self.save_pool(&spare);
        true
    }

    /// Makes spares until the pool has its size (the janitor's, after each
    /// release and at start).
    pub fn fill_tap_pool(&self) {
        loop {
            if lock(&self.tap_pool.spare).len() >= self.cfg.tap_pool {
                return;
            }
            let made = {
                let _t = lock(&self.tap_lock);
                tap::free_name(&[]).and_then(|n| {
                    // Recorded before it exists: a daemon killed in between
                    // leaves a name the next one finds gone, never a tap
                    // nobody knows of.
                    let mut names = lock(&self.tap_pool.spare).clone();
                    names.push(n.clone());
                    self.save_pool(&names);
                    tap::create_bare(&n).map(|()| n)
                })
            };
            match made {
                Ok(n) => {
                    let mut spare = lock(&self.tap_pool.spare);
                    spare.push(n);
                    self.save_pool(&spare);
                }
                Err(e) => {
                    warn!(err = %e, "cannot make a spare tap");
                    return;
                }
            }
        }
    }

    /// Deletes the spares (a clean shutdown), and those a previous daemon
    /// recorded (reconcile), unless a VM or a pending release names one.
    pub fn drain_tap_pool(&self) {
        let mut names: Vec<String> = std::mem::take(&mut *lock(&self.tap_pool.spare));
        if let Ok(text) = std::fs::read_to_string(self.pool_file()) {
            names.extend(text.lines().map(str::to_string).filter(|l| !l.is_empty()));
        }
        names.sort();
        names.dedup();
        let named: Vec<String> = {
            let store = self.store();
            let vms = store.list_vms().unwrap_or_default();
            let releases = store.list_releases().unwrap_or_default();
            vms.iter()
                .filter_map(|v| v.runtime.tap_device.clone())
                .chain(
                    releases
                        .iter()
                        .filter_map(|r| r.item("tap")?["name"].as_str().map(str::to_string)),
                )
                .collect()
        };
        for n in names.iter().filter(|n| !named.contains(n)) {
            // (A name recorded just before its tap was made may have none.)
            if n.starts_with(tap::TAP_PREFIX) && tap::exists(n) {
                if let Err(e) = tap::delete(n) {
                    warn!(tap = %n, err = %e, "cannot delete a spare tap");
                }
            }
        }
        let _ = fsutil::remove_file_if_exists(&self.pool_file());
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
