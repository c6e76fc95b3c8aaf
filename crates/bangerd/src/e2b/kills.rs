//! envd processes ended at their call's time (`Connect-Timeout-Ms`),
//! whoever watches them: one thread, started with the first deadline,
//! sleeping until the next; a process is killed only in its VM's same
//! boot, and tried again a little later while the VM is paused or silent.

use std::sync::Mutex;

use banger_core::VmRecord;
use tracing::warn;

use super::envd;
use crate::daemon::{lock, Daemon};

/// Processes started through envd to be killed at their deadline
/// (`Connect-Timeout-Ms`), whoever watches them: one thread, started with
/// the first, sleeping until the next.
#[derive(Default)]
pub(super) struct Kills {
    due: Mutex<Vec<Due>>,
    wake: std::sync::Condvar,
    started: std::sync::OnceLock<()>,
}

struct Due {
    at: std::time::Instant,
    vm_name: String,
    vm_id: String,
    /// The boot its process belongs to (a restarted VM numbers its
    /// processes afresh: a deadline of the one before is dropped).
    started: Option<i64>,
    pid: u32,
    /// Tries left while the VM is paused or its agent does not answer.
    tries: u8,
}

/// Deadlines kept at once at most.
const KILLS_MAX: usize = 10_000;

impl Daemon {
    /// Kills process `pid` of `vm` at `at` (its call's time), if it still
    /// runs then.
    pub(super) fn kill_at(
        &self,
        vm: &VmRecord,
        pid: u32,
        at: std::time::Instant,
    ) -> std::result::Result<(), envd::RpcErr> {
        let kills = &self.api.kills;
        let mut due = lock(&kills.due);
        if due.len() >= KILLS_MAX {
            return Err(envd::RpcErr::busy(format!(
                "over {KILLS_MAX} processes with a time: start one without (timeout 0)"
            )));
        }
        due.push(Due {
            at,
            vm_name: vm.name.clone(),
            vm_id: vm.id.clone(),
            started: vm.runtime.started_at,
            pid,
            tries: 20,
        });
        kills.wake.notify_all();
        drop(due);
        if kills.started.set(()).is_ok() {
            let weak = self.weak();
            let spawned = std::thread::Builder::new()
                .name("e2b-kills".into())
                .spawn(move || kill_loop(weak));
            if spawned.is_err() {
                warn!("cannot start the thread that ends envd processes at their time");
            }
        }
        Ok(())
    }
}

impl Daemon {
    /// A process whose end was seen needs no deadline any more.
    pub(super) fn kill_forget(&self, vm_id: &str, pid: u32) {
        lock(&self.api.kills.due).retain(|k| !(k.vm_id == vm_id && k.pid == pid));
    }

    /// Ends one process at its time: its VM's same boot only; a paused or
    /// silent VM is tried again a little later, a few times.
    fn kill_due(&self, mut k: Due) {
        let Ok(vm) = self.find(&k.vm_name) else {
            return;
        };
        if vm.id != k.vm_id || vm.runtime.started_at != k.started {
            return;
        }
        let done = !vm.runtime.paused
            && self.agent_connect(&vm).is_ok_and(|conn| {
                banger_agent::client::call_within(
                    conn,
                    banger_agent::proto::Call::Signal {
                        target: banger_agent::proto::Target::Pid(k.pid),
                        signal: 9,
                    },
                    std::time::Duration::from_secs(10),
                )
                .is_ok()
            });
        if !done && vm.runtime.state().is_up() && k.tries > 0 {
            k.tries -= 1;
            k.at = std::time::Instant::now() + std::time::Duration::from_secs(30);
            lock(&self.api.kills.due).push(k);
        }
    }
}

fn kill_loop(d: std::sync::Weak<Daemon>) {
    loop {
        let Some(daemon) = d.upgrade() else { return };
        let ready: Vec<Due> = {
            let kills = &daemon.api.kills;
            let mut due = lock(&kills.due);
            let now = std::time::Instant::now();
            if !due.iter().any(|k| k.at <= now) {
                let next = due.iter().map(|k| k.at).min();
                let wait = next.map_or(std::time::Duration::from_secs(60), |n| {
                    n.saturating_duration_since(now)
                });
                // (Woken by a new deadline, or at the next one.)
                let (g, _) = kills
                    .wake
                    .wait_timeout(due, wait)
                    .unwrap_or_else(|p| p.into_inner());
                drop(g);
                continue;
            }
            let (ready, later): (Vec<Due>, Vec<Due>) = due.drain(..).partition(|k| k.at <= now);
            *due = later;
            ready
        };
        // Side by side, 16 at a time: one silent guest holds up no other.
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let batch: Vec<Due> = ready.by_ref().take(16).collect();
            std::thread::scope(|s| {
                for k in batch {
                    let daemon = &daemon;
                    s.spawn(move || daemon.kill_due(k));
                }
            });
        }
    }
}
