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

/// How long a guest may take to sync its disks before a suspend.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
        if let Some(why) = crate::snapshots::refusal(&self.host(), &vm, false) {
            return Err(DaemonError::Invalid(format!("{why} (vm pause --to-disk)")));
        }
        // A volume is one VM's while it runs: a suspended VM would give it
        // up, and another VM could write it under the saved guest's
        // memory of it.
        if !vm.spec.volumes.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} has volumes: a VM paused to disk would give them up while its \
                 guest's memory still holds their filesystems; `banger vm pause {name}` keeps \
                 everything, or stop it"
            )));
        }
        if !self.vm_alive(&vm) {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?}: its VMM is not running (`banger vm ls` shows what became of it)"
            )));
        }
        let api = vm.runtime.api_sock_path.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {name:?} has no API socket: restart it"))
        })?;
        let snap = format!("{SUSPEND_PREFIX}{}", vm.id);
        let _s = self.snapshot_locks.lock(&snap);
        // What a suspend cut short before this VM was recorded left.
        self.forget_saved(&snap)?;
        let was_paused = vm.runtime.paused;
        // The guest's dirty pages to its disks first: a suspended VM that
        // is deleted or committed has them there.
        if !was_paused {
            if let Err(e) = self.agent_call(&vm, banger_agent::proto::Call::Sync, SYNC_TIMEOUT) {
                warn!(vm = %name, err = %e, "suspend: the guest did not sync its disks");
            }
        }
        let owner = banger_store::Owner {
            uid: 0,
            root_only: true,
        };
        self.take_snapshot(&mut vm, &snap, owner, true)?;
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
        // Recorded suspended: it ends, whatever happens next.
        let step = hit("suspend.recorded");
        self.end_suspended(&mut vm)?;
        step?;
        info!(vm = %name, "suspended to disk");
        Ok(self.info(&vm))
    }

    /// Ends a suspended VM's VMM and what it held to run (`end_boot`
    /// clears `snapshotting`).
    pub(crate) fn end_suspended(&self, vm: &mut banger_core::VmRecord) -> Result<()> {
        vm.runtime.state = Some(VmState::Stopping);
        let saved = self.save(vm);
        self.end_boot(vm, VmState::Stopped, None, true)?;
        saved
    }

    /// `vm stop` of a suspended VM: its saved guest is discarded (as a
    /// power cut would: the disks are as the guest last synced them) and
    /// its next start boots.
    pub(crate) fn discard_saved(&self, vm: &mut banger_core::VmRecord) -> Result<()> {
        let Some(snap) = vm.runtime.restore.clone() else {
            return Ok(());
        };
        let _s = self.snapshot_locks.lock(&snap);
        vm.runtime.restore = None;
        vm.runtime.suspended = false;
        self.save(vm)?;
        self.forget_saved(&snap)?;
        info!(vm = %vm.name, "its saved guest discarded");
        Ok(())
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
        // The VMs' rows, and the ids of those this build cannot read
        // (whose saved guests are kept: nothing says they are not theirs).
        let rows = {
            let store = self.store();
            match (store.list_vms(), store.broken_vms()) {
                (Ok(v), Ok(b)) => Some((v, b)),
                _ => None,
            }
        };
        let Some((vms, broken)) = rows else {
            warn!("reconcile: cannot list the VMs: saved guests kept");
            return;
        };
        for n in names {
            let id = n.strip_prefix(SUSPEND_PREFIX).unwrap_or_default();
            let waited = broken.iter().any(|b| b.id == id)
                || vms
                    .iter()
                    .any(|v| v.id == id && v.runtime.restore.as_deref() == Some(n.as_str()));
            if !waited {
                info!(snapshot = %n, "reconcile: removing a saved guest no VM restores");
                if let Err(e) = self.forget_saved(&n) {
                    warn!(snapshot = %n, err = %e, "reconcile: cannot remove it");
                }
            }
        }
    }
}
