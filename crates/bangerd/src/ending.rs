//! The ends of a VM's life: stop (a clean power-off), kill, delete, and
//! the removal of what a failed create or a crash left. Each goes through
//! `lifecycle`'s one transition ([`Daemon::end_boot`]) and one teardown.

use std::time::Instant;

use banger_core::api::{Event, VmInfo};
use banger_core::{VmRecord, VmState};
use tracing::warn;

use crate::daemon::{lock, micros, Daemon, Events};
use crate::error::{DaemonError, Result};
use crate::failpoint::hit;
use crate::lifecycle::{Teardown, DELETE};

/// A killed VM's last word: what a command running in it is told.
const KILLED: &str = "killed by `banger vm kill`";

impl Daemon {
    pub fn stop(&self, name: &str, events: Events) -> Result<VmInfo> {
        self.stop_because(name, None, events)
    }

    /// A clean power-off (Ctrl-Alt-Del, the VMM killed after the stop
    /// timeout); `why` becomes the VM's last error (the stats poller's
    /// auto-stop says which limit it hit).
    pub(crate) fn stop_because(
        &self,
        name: &str,
        why: Option<String>,
        events: Events,
    ) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        // The auto-stopper decided on a record read before the lock: a VM
        // paused since is left alone (its idle time is no reason).
        if why.is_some() && vm.runtime.paused {
            return Ok(self.info(&vm));
        }
        // Suspended (or a resume that failed): its saved guest goes, and
        // its next start boots.
        if why.is_none() && vm.runtime.suspended && !vm.runtime.state().is_up() {
            self.discard_saved(&mut vm)?;
            return Ok(self.info(&vm));
        }
        if !self.vm_alive(&vm) && vm.runtime.state() == VmState::Running {
            // Stale: the VMM died behind our back. Clean and report stopped.
            self.end_boot(
                &mut vm,
                VmState::Stopped,
                Some("its VMM had exited".into()),
                true,
            )?;
            return Ok(self.info(&vm));
        }
        vm.runtime.state().check(&vm.name, "stop")?;
        hit("stop.begin")?;
        vm.runtime.state = Some(VmState::Stopping);
        // Why, before the guest goes: a command running in it reads this
        // when its connection closes (`vm run --ttl`).
        if why.is_some() {
            vm.runtime.last_error = why.clone();
        }
        self.save(&vm)?;
        // From here a failure still ends the VM (in error, saying why):
        // it is never left `stopping` for the next daemon to sort out.
        let stopped = self.stop_stopping(&mut vm, why, events);
        if let Err(e) = stopped {
            let _ = self.end_boot(&mut vm, VmState::Error, Some(e.to_string()), true);
            return Err(e);
        }
        Ok(self.info(&vm))
    }

    /// The rest of a stop, once the VM is `stopping`: a clean shutdown
    /// asked for and waited for (at most the stop timeout), then the end.
    fn stop_stopping(&self, vm: &mut VmRecord, why: Option<String>, events: Events) -> Result<()> {
        // A paused guest cannot hear the request: it runs again first;
        // if it cannot, it is killed.
        let can_ask = self.unpause_for(vm, "stop it");
        let clean = match (self.vmm_process(vm), vm.runtime.api_sock_path.clone()) {
            (Some(p), Some(sock)) if can_ask => {
                let asked = self
                    .vmm(vm.spec.vmm)
                    .and_then(|v| v.request_shutdown(&sock).map_err(Into::into));
                if let Err(e) = &asked {
                    warn!(vm = %vm.name, err = %e, "clean shutdown request failed; killing");
                } else {
                    events(Event::Progress {
                        message: format!(
                            "{}: waiting for the guest to power off (at most {}s; `banger vm kill {}` ends it now)",
                            vm.name,
                            self.cfg.stop_timeout.as_secs(),
                            vm.name
                        ),
                    });
                }
                asked.is_ok() && p.wait_gone(self.cfg.stop_timeout)
            }
            _ => false,
        };
        if !clean {
            warn!(vm = %vm.name, "guest did not power off in time; killing the VMM");
            events(Event::Progress {
                message: format!("{}: the guest did not power off: killing its VMM", vm.name),
            });
        }
        hit("stop.teardown")?;
        self.end_boot(vm, VmState::Stopped, why, true)
    }

    pub fn kill(&self, name: &str) -> Result<VmInfo> {
        // A boot in progress is cancelled first: it holds the VM's lock
        // until it has rolled back.
        let cancelled = self.boots.cancel(name);
        if cancelled {
            tracing::info!(vm = %name, "kill: cancelling the boot in progress");
        }
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        if cancelled && !vm.runtime.state().can_kill() {
            return Ok(self.info(&vm));
        }
        vm.runtime.state().check(&vm.name, "kill")?;
        hit("kill.begin")?;
        // Why, before the VMM goes (as for a stop): a command running in
        // it asks as its connection closes, and a VM still Running would
        // not be gone to it.
        vm.runtime.state = Some(VmState::Stopping);
        vm.runtime.last_error = Some(KILLED.into());
        self.save(&vm)?;
        self.end_boot(&mut vm, VmState::Stopped, Some(KILLED.into()), true)?;
        Ok(self.info(&vm))
    }

    /// `vm rm`: a VM that runs, boots or is stopping is deleted only with
    /// `force` (docker's `rm -f`), which kills it.
    pub fn delete_checked(&self, name: &str, force: bool) -> Result<()> {
        if force {
            return self.delete(name);
        }
        // At once for a VM that boots (its boot holds the lock), and again
        // under the lock: a start that slipped in between is not killed.
        self.refuse_live(name)?;
        let _g = self.lock_vm(name)?;
        self.refuse_live(name)?;
        self.delete_locked(name)
    }

    /// A VM that runs, boots or stops is not deleted without `-f`.
    fn refuse_live(&self, name: &str) -> Result<()> {
        match self.find(name) {
            Ok(vm) => {
                let st = vm.runtime.state();
                // A "running" VM whose VMM died behind our back is stopped
                // in all but its record: no -f needed.
                let live = st != VmState::Running || self.vm_alive(&vm);
                if live && matches!(st, VmState::Running | VmState::Starting | VmState::Stopping) {
                    return Err(DaemonError::Running(vm.name.clone(), st));
                }
                Ok(())
            }
            Err(DaemonError::Broken { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        self.boots.cancel(name);
        let _g = self.lock_vm(name)?;
        self.delete_locked(name)
    }

    /// The delete itself, the VM's lock held.
    fn delete_locked(&self, name: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut vm = match self.find(name) {
            Err(DaemonError::Broken { .. }) => return self.delete_broken(name),
            r => r?,
        };
        hit("delete.begin")?;
        // A delete kills the VMM; what the guest wrote to its volumes is
        // written out first (a paused guest runs again for that).
        if !vm.spec.volumes.is_empty() {
            self.unpause_for(&mut vm, "flush its volumes");
        }
        self.flush_volumes(&vm);
        vm.runtime.state = Some(VmState::Deleting);
        self.save(&vm)?;
        if let Err(e) = self.teardown(&mut vm, DELETE) {
            vm.runtime.state = Some(VmState::Error);
            vm.runtime.last_error = Some(e.to_string());
            let _ = self.save(&vm);
            return Err(e);
        }
        // Everything it held is gone: a row that cannot be deleted leaves
        // a VM in error saying so, for a second `rm`.
        if let Err(e) = hit("delete.row").and_then(|()| self.delete_row(&vm.id)) {
            vm.runtime.state = Some(VmState::Error);
            vm.runtime.last_error = Some(format!(
                "deleted but for its record ({e}): `banger vm rm {}` again",
                vm.name
            ));
            let _ = self.save(&vm);
            return Err(e);
        }
        self.forget_rm_clone_volumes(&vm);
        // A suspended VM's saved guest goes with it (a crash before this
        // leaves it to the next start's sweep).
        if let Some(s) = vm.runtime.restore.as_deref() {
            if vm.runtime.suspended {
                if let Err(e) = self.forget_saved(s) {
                    warn!(vm = %vm.name, err = %e, "its saved guest is left for the next start");
                }
            }
        }
        tracing::debug!(vm = %vm.name, us = micros(t0), "deleted");
        Ok(())
    }

    /// A `--rm` clone's copies of its snapshot's volumes go with it (as
    /// docker's anonymous volumes with `--rm`); another VM's stay.
    pub(crate) fn forget_rm_clone_volumes(&self, vm: &VmRecord) {
        if vm.runtime.rm_client.is_some() {
            self.forget_clone_volumes(vm);
        }
    }

    /// A clone's copies of its snapshot's volumes go (its row gone: a
    /// failed or cut-short create, a fork rolled back, a `--rm` clone).
    /// A clone's volumes are all such copies (`--from` takes no
    /// `--volume`).
    pub(crate) fn forget_clone_volumes(&self, vm: &VmRecord) {
        if vm.spec.from_snapshot.is_none() {
            return;
        }
        let _v = lock(&self.volumes.lock);
        for m in &vm.spec.volumes {
            self.forget_volume(&m.name);
        }
    }

    /// A row this banger cannot read: its directories and the row go (what
    /// else it held cannot be known from it; reconcile and the releases
    /// cover a VMM or tap that outlived its record).
    fn delete_broken(&self, name: &str) -> Result<()> {
        let broken = self.store().broken_vms()?;
        let Some(b) = broken.into_iter().find(|b| b.name == name) else {
            return Err(DaemonError::VmNotFound(name.to_string()));
        };
        banger_host::fsutil::remove_dir_all_if_exists(&self.cfg.layout.vm_runtime_dir(&b.id))?;
        banger_host::fsutil::remove_dir_all_if_exists(&self.cfg.layout.vm_dir(&b.id))?;
        self.delete_row(&b.id)?;
        Ok(())
    }

    /// Removes a VM whose create failed, or a VM the daemon found cut
    /// short: whatever it holds, then its row. Best effort.
    pub(crate) fn remove(&self, vm: &mut VmRecord, how: Teardown) {
        if let Err(e) = self.teardown(vm, how) {
            warn!(vm = %vm.name, err = %e, "teardown failed");
            vm.runtime.state = Some(VmState::Error);
            vm.runtime.last_error = Some(e.to_string());
            let _ = self.save(vm);
            return;
        }
        if let Err(e) = self.delete_row(&vm.id) {
            warn!(vm = %vm.name, err = %e, "cannot delete the row");
        }
    }
}
