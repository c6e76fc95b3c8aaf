//! `vm pause --to-disk`: a running or paused VM's guest saved (its device
//! state and its RAM, as a snapshot named `suspend.<vm id>` that only this
//! VM restores) and its VMM ended, so that its memory goes back to the
//! host; `vm resume` (or `vm start`) restores it as itself.
//!
//! Its disks and volumes stay where they are (nothing writes them while
//! no VMM runs), so only the state and the RAM are saved. What the VM held
//! to run (VMM, RAM file, tap, firewall, published ports, DNS answer) is
//! released as by a stop; it is stored `Stopped` with `runtime.suspended`
//! and `runtime.restore`, and shown `suspended`. The resume is a clone's
//! restore (`snapshots::restore_guest`) without a new identity: the same
//! name, address, MAC and keys come back, the clock is set to now, and the
//! saved files go once the guest runs. Connections open to its agent end
//! at the suspend (the VMM that carried them is gone); its processes go on
//! after the resume.
//!
//! Crashes: the state is saved with the VM recorded `snapshotting`, the
//! row written, then the VM recorded `suspended`, then its VMM ended. A
//! daemon that finds a VM `snapshotting` but not `suspended` runs it again
//! (the row, which no VM restores, is swept); one `suspended` whose VMM
//! still runs finishes the suspend ([`Daemon::finish_snapshotting`]).

use banger_core::api::VmInfo;
use banger_core::{VmState, SUSPEND_PREFIX};
use banger_host::fsutil;
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};
use crate::failpoint::hit;

/// The suspend steps the failpoint test walks.
pub const FAILPOINTS: &[&str] = &["suspend.saved", "suspend.recorded"];

impl Daemon {
    pub fn suspend(&self, name: &str) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        let shown = vm.runtime.shown_state();
        if !matches!(shown, VmState::Running | VmState::Paused) {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} is {shown}: only a running or paused VM can be paused to disk"
            )));
        }
        if let Some(why) = crate::snapshots::refusal(&vm, false) {
            return Err(DaemonError::Invalid(format!("{why} (vm pause --to-disk)")));
        }
        if !self.vm_alive(&vm) {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?}: its VMM is not running (`banger vm ls` shows what became of it)"
            )));
        }
        let api = vm.runtime.api_sock_path.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {name:?} has no QMP socket: restart it"))
        })?;
        let snap = format!("{SUSPEND_PREFIX}{}", vm.id);
        // What a suspend cut short before this VM was recorded left.
        self.forget_saved(&snap)?;
        let was_paused = vm.runtime.paused;
        self.take_snapshot(&mut vm, &snap, banger_store::Owner::default(), true)?;
        // Stopped now, its state saved and recorded: the VM is recorded
        // suspended, or runs again.
        let recorded = hit("suspend.saved").and_then(|()| {
            vm.runtime.restore = Some(snap.clone());
            vm.runtime.suspended = true;
            self.save(&vm)
        });
        if let Err(e) = recorded {
            vm.runtime.restore = None;
            vm.runtime.suspended = false;
            if let Err(r) = self.run_again(&mut vm, &api, was_paused) {
                warn!(vm = %name, err = %r, "a suspend that failed did not run the VM again");
            }
            if let Err(r) = self.forget_saved(&snap) {
                warn!(vm = %name, err = %r, "a suspend that failed left its saved state");
            }
            return Err(e);
        }
        hit("suspend.recorded")?;
        self.end_suspended(&mut vm)?;
        info!(vm = %name, "suspended to disk");
        Ok(self.info(&vm))
    }

    /// Ends a suspended VM's VMM and what it held to run.
    pub(crate) fn end_suspended(&self, vm: &mut banger_core::VmRecord) -> Result<()> {
        vm.runtime.state = Some(VmState::Stopping);
        self.save(vm)?;
        self.end_boot(vm, VmState::Stopped, None, true)?;
        vm.runtime.snapshotting = false;
        self.save(vm)
    }

    /// Removes a suspend's saved guest (its row, then its files).
    pub(crate) fn forget_saved(&self, snap: &str) -> Result<()> {
        let rec = self.store().snapshot(snap)?;
        if let Some(rec) = rec {
            self.store().delete_snapshot(snap)?;
            fsutil::remove_dir_all_if_exists(&rec.dir)?;
        }
        Ok(())
    }

    /// At the daemon's start, after its VMs were reconciled: saved guests
    /// that no VM will restore (a suspend cut short, a suspended VM whose
    /// deletion a crash cut short) go.
    pub(crate) fn sweep_suspends(&self) {
        let names: Vec<String> = match self.store().list_snapshots() {
            Ok(l) => l
                .into_iter()
                .map(|s| s.name)
                .filter(|n| n.starts_with(SUSPEND_PREFIX))
                .collect(),
            Err(e) => {
                warn!(err = %e, "reconcile: cannot list saved guests");
                return;
            }
        };
        for n in names {
            let waited = self.store().vms_restoring(&n).map(|v| !v.is_empty());
            if let Ok(false) = waited {
                info!(snapshot = %n, "reconcile: removing a saved guest no VM restores");
                if let Err(e) = self.forget_saved(&n) {
                    warn!(snapshot = %n, err = %e, "reconcile: cannot remove it");
                }
            }
        }
    }
}
