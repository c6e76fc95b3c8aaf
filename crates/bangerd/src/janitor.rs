//! The queue of releases: what a VM held once its request returned (its NAT
//! rules, its tap, a deleted VM's dying VMM and reserved address). A
//! request that ends a VM (`delete`, `stop`, `kill`, a failed start, a VMM
//! that exits) ends what must end before it answers, records the rest as
//! a [`banger_core::Release`] in the store and queues the VM here; one
//! worker thread does the rest after the reply. Deleting a tap costs the kernel an
//! RCU grace period (about 20 ms here, measured in the `RTM_DELLINK` call
//! itself) and the NAT listing and delete two `nft` runs, so doing them
//! after the reply takes them off every request's latency.
//!
//! What keeps this correct:
//! - the store row is written before the request returns and deleted only
//!   once both are gone, so a daemon that dies in between finishes the job
//!   at its next start (`reconcile`);
//! - a pending release keeps its guest address reserved (a new VM's tap with
//!   the same /30 would route to the old tap), and `start` of the same VM
//!   waits for its release, so the rules it is about to add cannot be
//!   deleted by the release of its previous boot;
//! - a tap name is not reused until the tap is gone (the allocator reads the
//!   kernel's list);
//! - shutdown waits for the queue, and `banger daemon settle` waits for it
//!   (and retries what failed) for anyone who needs the host at baseline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A VM whose recorded releases are to be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub vm_id: String,
    pub vm_name: String,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    /// VM ids queued or in flight.
    busy: HashSet<String>,
    /// Failed releases waiting for their retry, by VM id.
    failed: HashMap<String, Failed>,
}

/// A VM whose last release failed: why, how often, and when it is tried
/// again (queued then, unless something else did it first).
#[derive(Debug, Clone)]
pub struct Failed {
    pub job: Job,
    pub error: String,
    pub attempts: u32,
    pub due: Instant,
    /// Its retry is queued or running now.
    pub retrying: bool,
}

/// The wait before retry `n` (1 s, 2 s, 4 s, ... at most a minute).
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

#[derive(Debug, Default)]
pub struct Janitor {
    st: Mutex<State>,
    cv: Condvar,
}

impl Janitor {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a VM whose release is recorded in the store.
    pub fn submit(&self, r: Job) {
        let mut st = self.lock();
        if st.busy.insert(r.vm_id.clone()) {
            st.queue.push_back(r);
        } else if !st.queue.iter().any(|q| q.vm_id == r.vm_id) {
            // In flight: run again after it, for the newer record.
            st.queue.push_back(r);
        }
        // (Still queued: that run does every record of the VM.)
        self.cv.notify_all();
    }

    /// The next VM to release; blocks until there is one (a new one, or a
    /// failed one whose retry is due).
    pub fn next(&self) -> Job {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let due: Vec<String> = st
                .failed
                .iter()
                .filter(|(_, f)| !f.retrying && f.due <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                if let Some(f) = st.failed.get_mut(&id) {
                    // Not again until this try says how it went.
                    f.retrying = true;
                    let job = f.job.clone();
                    if st.busy.insert(id) {
                        st.queue.push_back(job);
                    }
                }
            }
            if let Some(r) = st.queue.pop_front() {
                return r;
            }
            let wake = st
                .failed
                .values()
                .filter(|f| !f.retrying)
                .map(|f| f.due)
                .min();
            st = match wake {
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    self.cv
                        .wait_timeout(st, left.max(Duration::from_millis(1)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Marks a release finished: done (`None`), or failed with `error`,
    /// then tried again after a backoff.
    pub fn done(&self, vm_id: &str, error: Option<String>) {
        let mut st = self.lock();
        if !st.queue.iter().any(|q| q.vm_id == vm_id) {
            st.busy.remove(vm_id);
        }
        match error {
            None => {
                st.failed.remove(vm_id);
            }
            Some(error) => {
                let attempts = st.failed.get(vm_id).map_or(0, |f| f.attempts) + 1;
                let job = st
                    .failed
                    .get(vm_id)
                    .map(|f| f.job.clone())
                    .unwrap_or_else(|| Job {
                        vm_id: vm_id.to_string(),
                        vm_name: vm_id.to_string(),
                    });
                st.failed.insert(
                    vm_id.to_string(),
                    Failed {
                        job,
                        error,
                        attempts,
                        due: Instant::now() + backoff(attempts),
                        retrying: false,
                    },
                );
            }
        }
        self.cv.notify_all();
    }

    /// Records the VM a failed job was for (its name, for the retry).
    pub fn failed_job(&self, job: &Job, error: String) {
        {
            let mut st = self.lock();
            let attempts = st.failed.get(&job.vm_id).map_or(0, |f| f.attempts);
            st.failed.insert(
                job.vm_id.clone(),
                Failed {
                    job: job.clone(),
                    error: error.clone(),
                    attempts,
                    due: Instant::now(),
                    retrying: false,
                },
            );
        }
        self.done(&job.vm_id, Some(error));
    }

    /// A VM's releases were done by someone else (`settle`, its start):
    /// no retry is due.
    pub fn cleared(&self, vm_id: &str) {
        self.lock().failed.remove(vm_id);
        self.cv.notify_all();
    }

    /// The failed releases waiting for a retry.
    pub fn failures(&self) -> Vec<Failed> {
        self.lock().failed.values().cloned().collect()
    }

    /// Waits until `pred` holds for the state; false on timeout.
    fn wait(&self, timeout: Duration, pred: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !pred(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits until nothing of `vm_id` is queued or in flight.
    pub fn wait_vm(&self, vm_id: &str, timeout: Duration) -> bool {
        self.wait(timeout, |st| !st.busy.contains(vm_id))
    }

    /// Waits until the queue is empty and nothing is in flight.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait(timeout, |st| st.busy.is_empty())
    }

    pub fn pending(&self) -> usize {
        self.lock().busy.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn rel(id: &str, _tap: &str) -> Job {
        Job {
            vm_id: id.into(),
            vm_name: format!("vm-{id}"),
        }
    }

    #[test]
    fn waits_follow_the_worker() {
        let j = Arc::new(Janitor::default());
        j.submit(rel("a", "bgtap0"));
        j.submit(rel("b", "bgtap1"));
        assert_eq!(j.pending(), 2);
        assert!(!j.wait_vm("a", Duration::from_millis(5)));
        assert!(j.wait_vm("zzz", Duration::ZERO), "nothing pending for it");

        let worker = {
            let j = j.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..2 {
                    let r = j.next();
                    seen.push(r.vm_id.clone());
                    j.done(&r.vm_id, None);
                }
                seen
            })
        };
        assert!(j.wait_idle(Duration::from_secs(10)));
        assert_eq!(worker.join().unwrap(), vec!["a", "b"]);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn a_resubmitted_vm_is_queued_once() {
        let j = Janitor::default();
        j.submit(rel("a", "bgtap0"));
        j.submit(rel("a", "bgtap2"));
        let r = j.next();
        assert_eq!(r.vm_id, "a");
        j.done("a", None);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn a_release_submitted_while_one_is_in_flight_runs_after_it() {
        let j = Janitor::default();
        j.submit(rel("a", "bgtap0"));
        let first = j.next();
        j.submit(rel("a", "bgtap1"));
        j.done(&first.vm_id, None);
        assert_eq!(j.pending(), 1, "the second is still queued");
        let second = j.next();
        assert_eq!(second.vm_id, "a");
        j.done(&second.vm_id, None);
        assert!(j.wait_vm("a", Duration::ZERO));
    }

    /// A failed release is queued again after its backoff, doubling, and
    /// is forgotten once done; its error is kept meanwhile.
    #[test]
    fn a_failed_release_is_retried_after_a_backoff() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(30), Duration::from_secs(60));
        let j = Janitor::default();
        j.submit(rel("a", ""));
        let job = j.next();
        let t0 = Instant::now();
        j.failed_job(&job, "nft: busy".into());
        assert_eq!(j.pending(), 0, "not busy while it waits");
        let f = j.failures();
        assert_eq!(
            (f.len(), f[0].attempts, f[0].error.as_str()),
            (1, 1, "nft: busy")
        );
        // The retry comes by itself (no submit), a backoff later.
        let again = j.next();
        assert_eq!(again, job);
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        j.done(&again.vm_id, None);
        assert!(j.failures().is_empty());
    }
}
