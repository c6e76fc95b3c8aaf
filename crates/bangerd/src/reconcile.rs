//! What survives a daemon restart, and VMMs that exit on their own.
//!
//! At startup, releases left pending are done first; then every VM is put
//! in a state the new daemon can stand behind: one cut short while being
//! created or deleted is removed; one recorded as up is either still
//! running (its handles are rebuilt from the scratch file and /proc) or is
//! demoted to stopped after its resources are torn down.

use banger_core::{VmRecord, VmState};
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::error::Result;
use crate::handles;
use crate::lifecycle::{CREATE_ROLLBACK, DELETE};

impl Daemon {
    pub fn reconcile(&self) -> Result<()> {
        // (Listed first: a store guard must not live through the loop,
        // whose releases take the store again.)
        let leftover = self.store().list_releases()?;
        let mut done: Vec<String> = Vec::new();
        for r in leftover {
            if done.contains(&r.vm_id) {
                continue;
            }
            info!(vm = %r.vm_name, "reconcile: release left pending");
            if let Err(e) = self.release_vm(&r.vm_id) {
                warn!(vm = %r.vm_name, err = %e, "release failed; kept for a retry");
            }
            done.push(r.vm_id);
        }
        // Spare taps a previous daemon left (it died with its pool).
        self.host().drain_tap_pool();
        let vms = self.store().list_vms()?;
        for vm in vms {
            self.reconcile_vm(vm)?;
        }
        // A tap of this daemon's that nothing records would route a slot
        // another VM gets (belt and braces: an acquire records its tap's
        // name before making it).
        self.host().sweep_stray_taps();
        // Snapshots a crash cut short (no row names them).
        if let Err(e) = self.sweep_snapshots() {
            warn!(err = %e, "reconcile: snapshots cut short not swept");
        }
        // Saved guests no VM restores (a suspend cut short).
        self.sweep_suspends();
        // Warm-start snapshots this build cannot restore, or beyond the
        // cache's bound (which may have shrunk).
        self.trim_warm();
        // The VMs kept running get their firewall back if it went (a host
        // reboot of the firewall, a flush while no daemon ran).
        self.repair_firewalls();
        // Image grants whose VM is gone (a daemon that died between a VM's
        // end and its release).
        let live: Vec<(std::path::PathBuf, u32)> = self
            .store()
            .list_vms()?
            .iter()
            .filter(|vm| vm.runtime.state() == VmState::Running)
            .filter_map(|vm| {
                let uid = self
                    .cfg
                    .vmm_uid_base
                    .checked_add(self.guest_net(vm).ok()?.slot)?;
                Some((self.cfg.layout.image_dir(&vm.spec.image), uid))
            })
            .collect();
        if let Err(e) = crate::resources::jail::sweep_grants(&self.host(), &live) {
            warn!(err = %e, "reconcile: image grants not swept");
        }
        Ok(())
    }

    fn reconcile_vm(&self, mut vm: VmRecord) -> Result<()> {
        let st = vm.runtime.state();
        match st {
            VmState::Creating => {
                info!(vm = %vm.name, "reconcile: cut short while being created; removing it");
                self.remove(&mut vm, CREATE_ROLLBACK);
                self.forget_clone_volumes(&vm);
                return Ok(());
            }
            VmState::Deleting => {
                info!(vm = %vm.name, "reconcile: cut short while being deleted; finishing");
                self.rediscover(&vm);
                self.remove(&mut vm, DELETE);
                self.forget_rm_clone_volumes(&vm);
                return Ok(());
            }
            // A VM in error may still hold what a teardown that could not
            // finish left (its tap, a VMM that survived SIGKILL).
            VmState::Error if vm.runtime.tap_device.is_some() || vm.runtime.pod_link.is_some() => {}
            s if !s.is_up() => return Ok(()),
            _ => {}
        }
        let h = self.rediscover(&vm);
        if st == VmState::Running && self.vm_alive(&vm) {
            info!(vm = %vm.name, pid = ?h.pid, "reconcile: still running");
            // Stopped for a snapshot a crash cut short: it runs again (or
            // its suspend is finished, and it runs no more).
            if !self.finish_snapshotting(&mut vm) {
                return Ok(());
            }
            let _ = handles::write_file(&self.cfg.layout.vm_dir(&vm.id), &h);
            // What lived in the old daemon's process (listeners).
            for r in crate::resources::START {
                if let Err(e) = r.adopt(&self.host(), &vm) {
                    warn!(vm = %vm.name, resource = r.name(), err = %e, "reconcile: cannot take it up again");
                }
            }
            return Ok(());
        }
        info!(vm = %vm.name, "reconcile: not running; cleaning up");
        let (to, why) = if st == VmState::Error {
            (VmState::Error, vm.runtime.last_error.clone())
        } else if st == VmState::Starting && vm.runtime.suspended {
            // A resume cut short: its saved guest is still there.
            (
                VmState::Stopped,
                Some("the daemon restarted while the VM was resuming".to_string()),
            )
        } else if st == VmState::Starting {
            (
                VmState::Error,
                Some("the daemon restarted while the VM was starting".to_string()),
            )
        } else {
            (VmState::Stopped, vm.runtime.last_error.clone())
        };
        if let Err(e) = self.end_boot(&mut vm, to, why, true) {
            warn!(vm = %vm.name, err = %e, "reconcile: teardown failed");
        }
        Ok(())
    }

    /// Rebuilds the VM's handles from its scratch file and /proc.
    fn rediscover(&self, vm: &VmRecord) -> banger_core::VmHandles {
        let dir = self.cfg.layout.vm_dir(&vm.id);
        let sock = vm.runtime.api_sock_path.clone().unwrap_or_default();
        let mut h = handles::rediscover(&dir, &sock, self.expect_vmm(vm));
        if h.tap_device.is_none() {
            h.tap_device = vm.runtime.tap_device.clone();
        }
        self.handles.set(&vm.id, h.clone());
        h
    }

    /// Watches the VMMs reconcile kept (not children of this daemon), so
    /// that their exit is cleaned up like a child's.
    pub fn watch_adopted(&self) {
        let Ok(vms) = self.store().list_vms() else {
            return;
        };
        for vm in vms {
            if vm.runtime.state() != VmState::Running {
                continue;
            }
            if let Some(p) = self.vmm_process(&vm) {
                crate::reaper::watch_pid(p);
            }
        }
    }

    /// The `--rm` VMs a daemon finds at its start have no client
    /// connection to it: each is deleted once its client process is gone
    /// (at once if it is already), on a thread of its own.
    pub fn watch_rm_clients(&self) {
        let Ok(vms) = self.store().list_vms() else {
            return;
        };
        for vm in vms {
            let Some(c) = vm.runtime.rm_client else {
                continue;
            };
            let me = self.weak();
            let name = vm.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rm-{}", c.pid))
                .spawn(move || {
                    crate::reaper::wait_exit(banger_host::process::ProcId {
                        pid: c.pid,
                        start_time: c.start_time,
                    });
                    let Some(d) = me.upgrade() else { return };
                    // Still that VM, still that client's.
                    let same = d
                        .find(&vm.name)
                        .is_ok_and(|v| v.id == vm.id && v.runtime.rm_client == Some(c));
                    if same {
                        tracing::info!(vm = %vm.name, pid = c.pid, "its --rm client is gone: deleting it");
                        if let Err(e) = d.delete(&vm.name) {
                            tracing::warn!(vm = %vm.name, err = %e, "cannot delete an --rm VM");
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(vm = %name, err = %e, "cannot watch an --rm VM's client");
            }
        }
    }

    /// Called by the reaper when a VMM exits: a VM that was meant to be
    /// running is cleaned up exactly like `stop` does.
    pub fn on_vmm_exit(&self, pid: i32) {
        let Ok(vms) = self.store().list_vms() else {
            return;
        };
        let Some(vm) = vms
            .into_iter()
            .find(|v| self.handles.get(&v.id).and_then(|h| h.pid) == Some(pid))
        else {
            return;
        };
        let Ok(_g) = self.lock_vm(&vm.name) else {
            return;
        };
        let Ok(mut vm) = self.find(&vm.name) else {
            return;
        };
        let st = vm.runtime.state();
        if !matches!(st, VmState::Running | VmState::Error)
            || self.handles.get(&vm.id).and_then(|h| h.pid) != Some(pid)
            || self.vm_alive(&vm)
        {
            return;
        }
        warn!(vm = %vm.name, pid, "VMM exited on its own; cleaning up");
        let why = if st == VmState::Error {
            // Its teardown had failed (it survived SIGKILL); now it is gone.
            "its VMM, which had survived SIGKILL, has exited; the VM is stopped".to_string()
        } else if let Some(oom) = crate::resources::jail::oom_message(&self.host(), &vm) {
            warn!(vm = %vm.name, "{oom}");
            oom
        } else {
            "the guest powered off or its VMM exited".to_string()
        };
        if let Err(e) = self.end_boot(&mut vm, VmState::Stopped, Some(why), true) {
            warn!(vm = %vm.name, err = %e, "cleanup after the VMM's exit failed");
        }
    }
}
