//! Releases after the reply: what a teardown left (see `janitor.rs` for why
//! and for what keeps it correct) is recorded as a [`Release`] of typed
//! items and done by the janitor thread, `settle`, the next start of that
//! VM, or the next daemon; each item by the resource module that made it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use banger_core::{Held, Release, VmRecord};
use banger_host::process;
use tracing::warn;

use crate::daemon::{micros, Daemon};
use crate::error::{DaemonError, Result};
use crate::janitor::Job;
use crate::resources;

/// How long a start or `settle` waits for releases in progress.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Daemon {
    /// Records what a teardown left and has it released: by the janitor
    /// after the reply, or right away when there is none (before `serve`).
    /// Without the record nothing can be deferred: released now.
    pub(crate) fn hand_over(&self, vm: &VmRecord, items: Vec<Held>) -> Result<()> {
        let mut r = Release {
            id: 0,
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            items,
        };
        let recorded = self.store().insert_release(&r);
        match recorded {
            Ok(id) if self.janitor_running.load(Ordering::SeqCst) => {
                r.id = id;
                self.janitor.submit(Job {
                    vm_id: r.vm_id,
                    vm_name: r.vm_name,
                });
                Ok(())
            }
            Ok(_) => {
                if let Err(e) = self.release_vm(&vm.id) {
                    warn!(vm = %vm.name, err = %e, "release failed; kept for a retry");
                }
                Ok(())
            }
            Err(e) => {
                warn!(vm = %vm.name, err = %e, "cannot record the release; releasing now");
                self.release_items(&r).map(|_| ())
            }
        }
    }

    /// Does the VM's recorded releases, oldest first: under the VM's release
    /// lock, the records are read again (a `settle` or a `start` may have
    /// done them meanwhile; a stale copy must never touch what the VM has
    /// been given since).
    pub fn release_vm(&self, vm_id: &str) -> Result<()> {
        let _g = self.release_locks.lock(vm_id);
        let pending = self.store().releases_of(vm_id)?;
        for r in pending {
            let t = Instant::now();
            let left = self.release_items(&r)?;
            debug_assert!(left.is_empty());
            self.store().delete_release(r.id)?;
            tracing::debug!(vm = %r.vm_name, us = micros(t), "released");
        }
        Ok(())
    }

    /// Releases the items in order; a failure keeps it and what follows
    /// (recorded, for a retry) and fails.
    fn release_items(&self, r: &Release) -> Result<Vec<Held>> {
        for (i, item) in r.items.iter().enumerate() {
            let res = resources::by_name(&item.resource).ok_or_else(|| DaemonError::Release {
                vm: r.vm_name.clone(),
                resource: "record",
                reason: format!(
                    "it names a resource this banger does not know ({:?}); a newer banger wrote it",
                    item.resource
                ),
            });
            if let Err(e) = res.and_then(|res| res.release(self, r, &item.data)) {
                if i > 0 && r.id != 0 {
                    let _ = self.store().update_release_items(r.id, &r.items[i..]);
                }
                return Err(e);
            }
        }
        Ok(Vec::new())
    }

    /// The janitor's worker (a thread of `serve`): runs until the process
    /// exits. A failed release keeps its record, for `settle`, the next
    /// start of that VM and the next daemon start.
    pub fn run_janitor(&self) {
        // Housekeeping yields to requests: a niced thread (and the `nft`
        // processes it starts inherit the nice value).
        if let Err(e) = process::set_thread_nice(0, 10) {
            warn!(err = %e, "cannot lower the janitor's priority");
        }
        self.fill_tap_pool();
        loop {
            let job = self.janitor.next();
            if !self.cfg.release_delay.is_zero() {
                std::thread::sleep(self.cfg.release_delay);
            }
            if let Err(e) = self.release_vm(&job.vm_id) {
                warn!(vm = %job.vm_name, err = %e, "release failed; kept for a retry");
            }
            self.janitor.done(&job.vm_id);
            self.fill_tap_pool();
        }
    }

    /// Waits for the VM's pending releases and retries failed ones: a VM
    /// starts only once its previous tap (which carries the same /30) and
    /// rules are gone.
    pub(crate) fn settle_vm(&self, vm_id: &str) -> Result<()> {
        if !self.janitor.wait_vm(vm_id, SETTLE_TIMEOUT) {
            let pending = self.store().releases_of(vm_id)?;
            if let Some(r) = pending.first() {
                return Err(DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "previous boot",
                    reason: format!("still in progress after {SETTLE_TIMEOUT:?}"),
                });
            }
        }
        // A failed one is retried now; its error fails the start.
        self.release_vm(vm_id)
    }

    /// Waits until every pending release is done, retrying failed ones;
    /// `banger daemon settle`. Returns how many were retried.
    pub fn settle(&self) -> Result<usize> {
        if !self.janitor.wait_idle(SETTLE_TIMEOUT) {
            return Err(DaemonError::Invalid(format!(
                "{} release(s) still in progress after {SETTLE_TIMEOUT:?}: see bangerd.log",
                self.janitor.pending()
            )));
        }
        let left = self.store().list_releases()?;
        let mut vms: Vec<&str> = left.iter().map(|r| r.vm_id.as_str()).collect();
        vms.dedup();
        let mut failed = Vec::new();
        for vm_id in &vms {
            if let Err(e) = self.release_vm(vm_id) {
                failed.push(e.to_string());
            }
        }
        if !failed.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "{} release(s) failed (kept; retried at the next settle, start or daemon start):\n{}",
                failed.len(),
                failed.join("\n")
            )));
        }
        Ok(left.len())
    }

    /// Called by `serve` once the janitor thread runs: from then on
    /// releases are deferred to it.
    pub fn janitor_started(&self) {
        self.janitor_running.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use banger_core::{Held, Release};
    use serde_json::json;

    use crate::daemon::testutil::daemon;

    /// Items are released in order; one that fails (here: a resource a
    /// newer banger recorded) keeps itself and what follows recorded, for a
    /// retry, and the release says which.
    #[test]
    fn a_failed_item_keeps_the_rest_recorded() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        let held = |resource: &str, data| Held {
            resource: resource.into(),
            data,
        };
        let r = Release {
            id: 0,
            vm_id: "v1".into(),
            vm_name: "gone".into(),
            items: vec![
                held("address", json!({"ip": "172.30.0.6"})),
                held("warp_drive", json!({})),
                held("address", json!({"ip": "172.30.0.10"})),
            ],
        };
        daemon.store().insert_release(&r).unwrap();
        let e = daemon.release_vm("v1").unwrap_err().to_string();
        assert!(e.contains("gone") && e.contains("warp_drive"), "{e}");
        let left = daemon.store().releases_of("v1").unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].items, r.items[1..].to_vec());
        // The known one keeps reserving its address meanwhile.
        assert_eq!(left[0].item("address").unwrap()["ip"], "172.30.0.10");
    }
}
