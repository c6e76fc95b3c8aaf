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
use crate::resources::{self, Item};

/// Items that stay while another of the same release could not go: a
/// tap stays while its firewall elements (keyed by the tap) or its VMM
/// do, or the next VM given that tap from the pool would inherit the old
/// elements and lose its own at the retry; a guest address stays reserved
/// while its tap (which carries the /30), VMM or elements do, or a new
/// VM's tap would route to the old one.
const WAITS_FOR: &[(&str, &[&str])] = &[
    ("tap", &["firewall", "vmm"]),
    // The address's slot is the VMM's uid: it goes to another VM only
    // once that uid's image grant is revoked (jail).
    ("address", &["tap", "vmm", "firewall", "jail"]),
];

/// Whether an item of `resource` must stay because of what stays (`left`).
fn waits(resource: &str, left: &[Held]) -> bool {
    WAITS_FOR
        .iter()
        .any(|(it, on)| *it == resource && left.iter().any(|l| on.contains(&l.resource.as_str())))
}

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
        // Each record on its own too: one that fails (kept for its retry)
        // does not hold back the VM's later ones.
        let mut failed = None;
        for r in pending {
            let t = Instant::now();
            match self.release_items(&r) {
                Ok(left) => {
                    debug_assert!(left.is_empty());
                    self.store().delete_release(r.id)?;
                    tracing::debug!(vm = %r.vm_name, us = micros(t), "released");
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Releases every item, each on its own: one that fails does not keep
    /// the others from going, except those that must outlast it
    /// ([`WAITS_FOR`]). The failed ones stay recorded (for a retry) and
    /// the error names them all.
    fn release_items(&self, r: &Release) -> Result<Vec<Held>> {
        let mut left: Vec<Held> = Vec::new();
        let mut errors = Vec::new();
        for item in resources::held::items(r) {
            if waits(item.resource(), &left) {
                left.push(item.record());
                continue;
            }
            let res = match &item {
                Item::Unknown { why, .. } => Err(DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "record",
                    reason: why.clone(),
                }),
                known => resources::by_name(known.resource()).ok_or_else(|| DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "record",
                    reason: format!("no module releases {:?} items", known.resource()),
                }),
            };
            let res = res.and_then(|res| {
                crate::failpoint::hit(&format!("release.{}", item.resource()))?;
                res.release(&self.host(), r, &item)
            });
            if let Err(e) = res {
                left.push(item.record());
                errors.push(e);
            }
        }
        if errors.is_empty() {
            return Ok(Vec::new());
        }
        if r.id != 0 && left.len() < r.items.len() {
            let _ = self.store().update_release_items(r.id, &left);
        }
        if errors.len() == 1 {
            return Err(errors.remove(0));
        }
        Err(DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "several",
            reason: errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        })
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
        self.host().fill_tap_pool();
        loop {
            let job = self.janitor.next();
            if !self.cfg.release_delay.is_zero() {
                std::thread::sleep(self.cfg.release_delay);
            }
            match self.release_vm(&job.vm_id) {
                Ok(()) => self.janitor.done(&job.vm_id, None),
                Err(e) => {
                    warn!(vm = %job.vm_name, err = %e, "release failed; kept for a retry");
                    self.janitor.failed_job(&job, e.to_string());
                }
            }
            self.host().fill_tap_pool();
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
        self.release_vm(vm_id)?;
        self.janitor.cleared(vm_id);
        Ok(())
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
            match self.release_vm(vm_id) {
                Ok(()) => self.janitor.cleared(vm_id),
                Err(e) => failed.push(e.to_string()),
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

    /// Items are released each on its own; one that fails (here: a
    /// resource a newer banger recorded, and a tap record with a
    /// misspelled key, which must not release as nothing) stays recorded,
    /// for a retry, the others go all the same, and the release says
    /// which failed and why.
    #[test]
    fn a_failed_item_stays_recorded_and_the_others_go() {
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
                held("tap", json!({"nmae": "bgtap9"})),
            ],
        };
        daemon.store().insert_release(&r).unwrap();
        let e = daemon.release_vm("v1").unwrap_err().to_string();
        assert!(e.contains("gone") && e.contains("warp_drive"), "{e}");
        assert!(e.contains("unknown field `nmae`"), "{e}");
        let left = daemon.store().releases_of("v1").unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].items, vec![r.items[1].clone(), r.items[3].clone()]);
        assert!(left[0].item("address").is_none(), "the addresses went");
        // An address outlasts a tap, VMM or firewall elements that would
        // not go; a tap its elements and VMM.
        for stays in ["tap", "vmm", "firewall"] {
            assert!(super::waits("address", &[held(stays, json!({}))]));
        }
        for stays in ["firewall", "vmm"] {
            assert!(super::waits("tap", &[held(stays, json!({}))]));
        }
        assert!(!super::waits("tap", &[held("dns", json!({}))]));
        assert!(!super::waits("firewall", &[held("tap", json!({}))]));
    }

    /// A VM's releases from several boots: one whose item fails stays for
    /// its retry, and the later ones still go.
    #[test]
    fn a_failed_release_does_not_hold_back_the_vms_later_ones() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        let rec = |items: Vec<Held>| Release {
            id: 0,
            vm_id: "v1".into(),
            vm_name: "gone".into(),
            items,
        };
        let failing = rec(vec![Held {
            resource: "warp_drive".into(),
            data: json!({}),
        }]);
        let fine = rec(vec![Held {
            resource: "address".into(),
            data: json!({"ip": "172.30.0.6"}),
        }]);
        daemon.store().insert_release(&failing).unwrap();
        daemon.store().insert_release(&fine).unwrap();
        let e = daemon.release_vm("v1").unwrap_err().to_string();
        assert!(e.contains("warp_drive"), "{e}");
        let left = daemon.store().releases_of("v1").unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].items, failing.items);
    }
}
