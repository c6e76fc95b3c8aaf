//! The stats poller (seed): every `stats_interval`, per running VM, the
//! VMM's CPU time and resident memory, its cgroup's memory and limit, the bytes its disks take on the
//! host, and its tap's traffic. It enforces `AutoStop` (a TTL, an idle
//! timeout) through the same path as `vm stop`, and keeps console logs
//! bounded.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_core::api::VmStats;
use banger_core::duration::format_secs;
use banger_core::{VmRecord, VmState};
use banger_host::process;
use tracing::{info, warn};

use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

/// Below this many bytes per second through its tap, a guest's network
/// counts as quiet (ARP and the like do not keep a VM awake).
const QUIET_NET_BYTES_PER_SEC: f64 = 512.0;

/// How often running VMs' firewall rules are checked (and put back if a
/// firewall reload removed them): one `nft list ruleset` per VM.
const FIREWALL_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    cpu_ticks: u64,
    net_bytes: u64,
    idle_since: Instant,
    stats: VmStats,
}

#[derive(Debug, Default)]
pub struct Samples {
    last: Mutex<HashMap<String, Sample>>,
    /// VMs an auto-stop is under way for.
    stopping: Mutex<HashSet<String>>,
}

/// Whether an interval counts as idle: little CPU and a quiet network.
pub fn is_idle(cpu_percent: f64, net_bytes_per_sec: f64, cpu_threshold: f64) -> bool {
    cpu_percent < cpu_threshold && net_bytes_per_sec < QUIET_NET_BYTES_PER_SEC
}

/// Why the VM should stop now, if it should.
pub fn auto_stop_reason(vm: &VmRecord, now_unix: i64, idle_for: Duration) -> Option<String> {
    let a = vm.spec.auto_stop;
    if let (Some(ttl), Some(started)) = (a.ttl_secs, vm.runtime.started_at) {
        if now_unix.saturating_sub(started) >= ttl as i64 {
            return Some(format!(
                "stopped by banger: its TTL ({}) passed",
                format_secs(ttl)
            ));
        }
    }
    // A paused VM is idle by intent: kept until resumed (its TTL runs on).
    if let (Some(idle), false) = (a.idle_secs, vm.runtime.paused) {
        if idle_for.as_secs() >= idle {
            return Some(format!(
                "stopped by banger: idle for {} (its --idle-timeout)",
                format_secs(idle)
            ));
        }
    }
    None
}

fn read_u64(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// How many guests one `vm stats` asks at once.
const GUEST_ASKS: usize = 16;

impl Daemon {
    /// The poller's thread (started by `serve`).
    pub fn run_poller(self: Arc<Self>) {
        if let Err(e) = process::set_thread_nice(0, 5) {
            warn!(err = %e, "cannot lower the stats poller's priority");
        }
        let tick = self.cfg.stats_interval.min(Duration::from_secs(1));
        let mut next_sample = Instant::now();
        let mut next_firewall_check = Instant::now() + FIREWALL_CHECK;
        loop {
            std::thread::sleep(tick);
            if Instant::now() >= next_firewall_check {
                next_firewall_check = Instant::now() + FIREWALL_CHECK;
                self.repair_firewalls();
            }
            let Ok(vms) = self.store().list_vms() else {
                continue;
            };
            let running: Vec<VmRecord> = vms
                .into_iter()
                .filter(|v| v.runtime.state() == VmState::Running)
                .collect();
            for vm in &running {
                if let Some(log) = &vm.runtime.log_path {
                    if let Err(e) = crate::console::rotate_if_big(log, self.cfg.console_max_bytes) {
                        warn!(vm = %vm.name, err = %e, "cannot rotate the console log");
                    }
                }
            }
            if Instant::now() < next_sample {
                continue;
            }
            next_sample = Instant::now() + self.cfg.stats_interval;
            let ids: HashSet<&str> = running.iter().map(|v| v.id.as_str()).collect();
            lock(&self.stats.last).retain(|id, _| ids.contains(id.as_str()));
            for vm in running {
                let Some(s) = self.sample(&vm) else {
                    continue;
                };
                let idle_for = s.idle_since.elapsed();
                if let Some(why) = auto_stop_reason(&vm, banger_core::unix_now(), idle_for) {
                    self.auto_stop(&vm, why);
                }
            }
        }
    }

    /// Takes a sample of a running VM and keeps it.
    fn sample(&self, vm: &VmRecord) -> Option<Sample> {
        let p = self.vmm_process(vm).filter(|p| p.is_running())?;
        let now = Instant::now();
        let cpu_ticks = process::cpu_ticks(p.pid).unwrap_or(0);
        let tps = process::ticks_per_sec() as f64;
        let tap = self.current_handles(vm).tap_device;
        let (rx, tx) = match &tap {
            // The tap's tx is what the guest receives.
            Some(t) => (
                read_u64(&format!("/sys/class/net/{t}/statistics/tx_bytes")),
                read_u64(&format!("/sys/class/net/{t}/statistics/rx_bytes")),
            ),
            None => (0, 0),
        };
        let disk_bytes: u64 = [
            vm.runtime.system_overlay.as_ref(),
            vm.runtime.work_disk_path.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum();
        let prev = lock(&self.stats.last).get(&vm.id).cloned();
        let (cpu_percent, idle_since) = match &prev {
            Some(prev) => {
                let dt = now.duration_since(prev.at).as_secs_f64().max(1e-3);
                let cpu = cpu_ticks.saturating_sub(prev.cpu_ticks) as f64 / tps / dt * 100.0;
                let net = (rx + tx).saturating_sub(prev.net_bytes) as f64 / dt;
                // A paused VM is not idle (its pause is no idleness to
                // count against --idle-timeout once it runs again).
                let idle = is_idle(cpu, net, self.cfg.idle_cpu_percent) && !vm.runtime.paused;
                (cpu, if idle { prev.idle_since } else { now })
            }
            None => (0.0, now),
        };
        let started = vm.runtime.started_at.unwrap_or_else(banger_core::unix_now);
        let s = Sample {
            at: now,
            cpu_ticks,
            net_bytes: rx + tx,
            idle_since,
            stats: VmStats {
                name: vm.name.clone(),
                state: vm.runtime.shown_state(),
                sampled_at: banger_core::unix_now(),
                cpu_secs: cpu_ticks as f64 / tps,
                cpu_percent,
                rss_bytes: process::rss_bytes(p.pid).unwrap_or(0),
                cgroup_memory_bytes: self
                    .host()
                    .cgroups()
                    .ok()
                    .and_then(|c| c.memory_current(&vm.id))
                    .unwrap_or(0),
                memory_limit_bytes: self
                    .host()
                    .cgroups()
                    .ok()
                    .and_then(|c| c.memory_limit(&vm.id))
                    .unwrap_or(0),
                disk_bytes,
                net_rx_bytes: rx,
                net_tx_bytes: tx,
                uptime_secs: (banger_core::unix_now() - started).max(0) as u64,
                idle_secs: now.duration_since(idle_since).as_secs(),
                guest: None,
            },
        };
        lock(&self.stats.last).insert(vm.id.clone(), s.clone());
        Some(s)
    }

    /// Stops the VM on a thread of its own (a clean stop takes seconds),
    /// once.
    fn auto_stop(self: &Arc<Self>, vm: &VmRecord, why: String) {
        // Paused with a TTL that pauses or deletes (E2B keeps a paused
        // sandbox): kept so until resumed.
        if vm.runtime.paused && vm.spec.auto_stop.at_ttl != banger_core::TtlAction::Stop {
            return;
        }
        if !lock(&self.stats.stopping).insert(vm.id.clone()) {
            return;
        }
        info!(vm = %vm.name, why = %why, "auto-stop");
        // A TTL that ends otherwise than in a stop (the E2B-compatible
        // API's sandboxes: killed, or paused).
        let ttl_passed = vm
            .spec
            .auto_stop
            .ttl_secs
            .zip(vm.runtime.started_at)
            .is_some_and(|(t, s)| banger_core::unix_now().saturating_sub(s) >= t as i64);
        let action = if ttl_passed {
            vm.spec.auto_stop.at_ttl
        } else {
            banger_core::TtlAction::Stop
        };
        let (d, name, id) = (self.clone(), vm.name.clone(), vm.id.clone());
        let paused = vm.runtime.paused;
        let spawned = std::thread::Builder::new()
            .name("auto-stop".into())
            .spawn(move || {
                // Whatever ends this thread (a panic included), the VM
                // may be auto-stopped again.
                struct Done<'a>(&'a Daemon, String);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        lock(&self.0.stats.stopping).remove(&self.1);
                    }
                }
                let _done = Done(&d, id.clone());
                // Decided on a sample: looked at again now (a new timeout,
                // a pause, may have come since).
                let still = d.find(&name).ok().filter(|v| v.id == id).is_some_and(|v| {
                    action == banger_core::TtlAction::Stop
                        || (!v.runtime.paused
                            && v.spec
                                .auto_stop
                                .ttl_secs
                                .zip(v.runtime.started_at)
                                .is_some_and(|(t, s)| {
                                    banger_core::unix_now().saturating_sub(s) >= t as i64
                                }))
                });
                let done = match action {
                    _ if !still => Ok(()),
                    banger_core::TtlAction::Stop => {
                        d.stop_because(&name, Some(why), &mut |_| {}).map(drop)
                    }
                    banger_core::TtlAction::Delete => d.delete_checked(&name, true),
                    // (Paused already: left so until resumed.)
                    banger_core::TtlAction::Pause if paused => Ok(()),
                    banger_core::TtlAction::Pause => {
                        d.suspend(&name).or_else(|_| d.pause(&name)).map(drop)
                    }
                };
                if let Err(e) = done {
                    warn!(vm = %name, err = %e, "auto-stop failed");
                }
            });
        if let Err(e) = spawned {
            warn!(vm = %vm.name, err = %e, "cannot start the auto-stop thread");
            lock(&self.stats.stopping).remove(&vm.id);
        }
    }

    /// The last sample of `name`, or of every running VM; a running VM not
    /// sampled yet is sampled now. Its guest's own numbers are asked for
    /// [`GUEST_ASKS`] VMs at a time.
    pub fn vm_stats(&self, name: Option<&str>) -> Result<Vec<VmStats>> {
        let vms = match name {
            Some(n) => {
                let vm = self.find(n)?;
                if !self.vm_alive(&vm) {
                    return Err(DaemonError::Invalid(format!(
                        "vm {n:?} is {}: stats are sampled while it runs (`banger vm start {n}`)",
                        vm.runtime.state()
                    )));
                }
                vec![vm]
            }
            None => self
                .store()
                .list_vms()?
                .into_iter()
                .filter(|v| v.runtime.state() == VmState::Running)
                .collect(),
        };
        let mut out = Vec::new();
        let mut asked = Vec::new();
        for vm in vms {
            let known = lock(&self.stats.last).get(&vm.id).map(|s| s.stats.clone());
            if let Some(s) = known.or_else(|| self.sample(&vm).map(|s| s.stats)) {
                asked.push((vm, s));
            }
        }
        // The guests are asked at once, up to GUEST_ASKS at a time: one
        // that does not answer costs its own numbers and the call's
        // deadline, not everyone's in turn. (A thread that cannot be made
        // leaves that guest's numbers out.)
        for chunk in asked.chunks(GUEST_ASKS) {
            std::thread::scope(|scope| {
                let pending: Vec<_> = chunk
                    .iter()
                    .map(|(vm, s)| {
                        let h = std::thread::Builder::new()
                            .name("guest-stats".into())
                            .spawn_scoped(scope, move || self.guest_sample(vm))
                            .ok();
                        (h, s.clone())
                    })
                    .collect();
                for (h, mut s) in pending {
                    s.guest = h.and_then(|h| h.join().ok()).flatten();
                    out.push(s);
                }
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use banger_core::AutoStop;

    use super::*;

    fn vm(auto_stop: AutoStop, started_at: Option<i64>) -> VmRecord {
        let mut vm = crate::daemon::testutil::vm_with_tap("i", "n", None);
        vm.spec.auto_stop = auto_stop;
        vm.runtime.started_at = started_at;
        vm
    }

    #[test]
    fn idle_needs_little_cpu_and_a_quiet_network() {
        assert!(is_idle(1.0, 0.0, 5.0));
        assert!(is_idle(4.9, 100.0, 5.0), "an ARP now and then is quiet");
        assert!(!is_idle(5.0, 0.0, 5.0));
        assert!(!is_idle(0.0, 10_000.0, 5.0));
    }

    #[test]
    fn ttl_and_idle_timeout_say_which_limit_stopped_the_vm() {
        let none = vm(AutoStop::default(), Some(0));
        assert_eq!(
            auto_stop_reason(&none, 1_000_000, Duration::from_secs(999)),
            None
        );
        let ttl = vm(
            AutoStop {
                ttl_secs: Some(5),
                ..Default::default()
            },
            Some(100),
        );
        assert_eq!(auto_stop_reason(&ttl, 104, Duration::ZERO), None);
        let why = auto_stop_reason(&ttl, 105, Duration::ZERO).unwrap();
        assert!(why.contains("TTL (5s)"), "{why}");
        let idle = vm(
            AutoStop {
                idle_secs: Some(90),
                ..Default::default()
            },
            Some(0),
        );
        assert_eq!(auto_stop_reason(&idle, 10, Duration::from_secs(89)), None);
        let why = auto_stop_reason(&idle, 10, Duration::from_secs(90)).unwrap();
        assert!(why.contains("idle for 1m30s"), "{why}");
        let mut paused = idle.clone();
        paused.runtime.paused = true;
        assert_eq!(
            auto_stop_reason(&paused, 10, Duration::from_secs(900)),
            None
        );
    }
}
