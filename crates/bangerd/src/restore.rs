//! A snapshot's restore: what a `--from SNAP` create takes of it and
//! checks, and a clone's (or a suspended VM's) first start, its VMM
//! started with `-incoming defer` (`resources::vmm`), or a bare
//! Firecracker given `/snapshot/load` (`fcsnap`): the state loaded,
//! the guest run and given its identity (a clone) or only the clock (a
//! resumed VM). See `snapshots` for the files and their checks.

use std::path::Path;
use std::time::{Duration, Instant};

use banger_core::layout::vmfiles;
use banger_core::{SnapshotRecord, VmRecord, VmmKind};
use banger_host::fsutil::WrapIo;
use banger_store::Owned;
use tracing::warn;

use crate::access::Caller;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};
use crate::failpoint::hit;
use crate::snapshots::{check_record, crc32_of, restorable, IDENTIFY_TIMEOUT, STATE_TIMEOUT};

impl Daemon {
    /// What a `--from SNAP` create takes of the snapshot: its record,
    /// checked (files, versions, this host's accelerator), and the
    /// caller's right to it.
    pub(crate) fn clone_source(&self, name: &str, caller: &Caller) -> Result<SnapshotRecord> {
        let snap = self
            .store()
            .snapshot(name)?
            .ok_or_else(|| DaemonError::SnapshotNotFound(name.to_string()))?;
        caller.may_read(&self.store(), Owned::Snapshot, name)?;
        check_record(&snap)?;
        let (_, accel) = self.select_vmm(Some(snap.spec.vmm))?;
        if accel != snap.spec.accel {
            return Err(DaemonError::Invalid(format!(
                "snapshot {name:?} was made under {} and this host runs {} under {accel}: \
                 QEMU cannot load it here",
                snap.spec.accel, snap.spec.vmm
            )));
        }
        Ok(snap)
    }

    /// The restore of a clone's first start, its VMM started with
    /// `-incoming defer` (`resources::vmm`): loads the snapshot's state,
    /// records that the guest has run (a later start boots from the
    /// disks), runs it, and gives it this VM's identity and the clock.
    pub(crate) fn restore_guest(
        &self,
        vm: &mut VmRecord,
        events: crate::daemon::Events,
        cancel: &crate::cancel::Cancel,
    ) -> Result<()> {
        let cancelled = |vm: &VmRecord| {
            if cancel.is_cancelled() {
                Err(DaemonError::Cancelled(vm.name.clone()))
            } else {
                Ok(())
            }
        };
        let name = vm.runtime.restore.clone().unwrap_or_default();
        let snap = restorable(&self.host(), &name, vm)?;
        let api =
            vm.runtime.api_sock_path.clone().ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no API socket", vm.name))
            })?;
        let qmp = |e: banger_vmm::VmmError| {
            let tail = crate::readiness::guest_tail(
                &self.cfg.layout.vm_dir(&vm.id).join(vmfiles::VMM_LOG),
                5,
            );
            DaemonError::Invalid(format!(
                "vm {:?}: restoring snapshot {name:?}: {e}{}",
                vm.name,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; QEMU said: {tail}")
                }
            ))
        };
        let t = crate::daemon::Phase::start("restore");
        let state = snap.dir.join(vmfiles::SNAP_STATE);
        if crc32_of(&state)? != snap.state_crc32 {
            return Err(DaemonError::Invalid(format!(
                "snapshot {name:?} is damaged: {} does not match its checksum; `banger \
                 snapshot rm {name}`",
                state.display()
            )));
        }
        let firecracker = vm.spec.vmm == VmmKind::Firecracker;
        if firecracker {
            cancelled(vm)?;
            let tap = self.current_handles(vm).tap_device.ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no tap for its restore", vm.name))
            })?;
            crate::fcsnap::load(&self.host(), vm, &snap, &api, &tap)?;
        } else {
            let deadline = Instant::now() + STATE_TIMEOUT;
            let alive = || self.vm_alive(vm);
            let mut session = wait_qmp(&api, deadline, &alive).map_err(qmp)?;
            let version = banger_vmm::qmp::version(&mut session).map_err(qmp)?;
            drop(session);
            if version != snap.format.vmm_version {
                return Err(DaemonError::Invalid(format!(
                    "snapshot {name:?} was made by QEMU {}; this host runs QEMU {version}, \
                     which cannot load it: boot a VM of its image and snapshot it again",
                    snap.format.vmm_version
                )));
            }
            cancelled(vm)?;
            let input = std::fs::File::open(&state).with_path("open", &state)?;
            banger_vmm::qmp::load_state(&api, &input, deadline).map_err(qmp)?;
        }
        hit("restore.loaded")?;
        // (Until the guest runs, a cancel leaves the VM as it was.)
        cancelled(vm)?;
        let suspended = vm.runtime.suspended;
        vm.runtime.restore = None;
        vm.runtime.suspended = false;
        self.save(vm)?;
        let ran = if firecracker {
            crate::snapshots::set_vcpus(vm, &api, true)
        } else {
            banger_vmm::qmp::execute(&api, "cont", None)
                .map(drop)
                .map_err(qmp)
        }
        .and_then(|()| hit("restore.running"));
        if let Err(e) = ran {
            // Whatever becomes of this start, the saved guest is done
            // with: the VM's next start boots from its disks.
            if suspended {
                if let Err(f) = self.forget_saved(&name) {
                    warn!(vm = %vm.name, err = %f, "its saved guest is left for the next start");
                }
            }
            return Err(e);
        }
        t.done(events);
        if suspended {
            // Itself again: no new identity; its saved guest goes.
            if let Err(e) = self.forget_saved(&name) {
                warn!(vm = %vm.name, err = %e, "resumed, but its saved guest was not removed");
            }
            self.release_guest(vm);
            let t = crate::daemon::Phase::start("clock");
            let deadline = Instant::now() + IDENTIFY_TIMEOUT;
            if let Err(e) = self.until_agent_answers(vm, deadline, Some(cancel), &|left| {
                self.sync_clock_within(vm, left)
            }) {
                warn!(vm = %vm.name, err = %e, "resumed, but the guest's clock was not set");
            }
            t.done(events);
            return Ok(());
        }
        let t = crate::daemon::Phase::start("identity");
        self.identify_clone(vm, cancel)?;
        t.done(events);
        if let Err(e) = self.sync_clock(vm) {
            warn!(vm = %vm.name, err = %e, "restored, but the guest's clock was not set");
        }
        Ok(())
    }

    /// Gives a restored guest its identity: its agent answers once the
    /// new `banger-vport` and the guest have said hello; a connection
    /// refused before that is tried again until the deadline.
    fn identify_clone(&self, vm: &VmRecord, cancel: &crate::cancel::Cancel) -> Result<()> {
        let t0 = Instant::now();
        let deadline = t0 + IDENTIFY_TIMEOUT;
        let tries = std::sync::atomic::AtomicU32::new(0);
        let last = std::sync::Mutex::new(Duration::ZERO);
        let r = self.until_agent_answers(vm, deadline, Some(cancel), &|left| {
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = Instant::now();
            let r = self.apply_identity(vm, left);
            if let Ok(mut l) = last.lock() {
                *l = t.elapsed();
            }
            r
        });
        tracing::debug!(
            vm = %vm.name,
            tries = tries.load(std::sync::atomic::Ordering::Relaxed),
            call_ms = last.lock().map(|l| l.as_millis() as u64).unwrap_or(0),
            ms = t0.elapsed().as_millis() as u64,
            "identity applied"
        );
        r
    }

    /// `call` (given the time left) until the restored guest's agent
    /// answers it: a connection refused before its new `banger-vport` and
    /// the guest have said hello is tried again until `deadline`, or
    /// until `cancel` (a start cancelled).
    pub(crate) fn until_agent_answers(
        &self,
        vm: &VmRecord,
        deadline: Instant,
        cancel: Option<&crate::cancel::Cancel>,
        call: &dyn Fn(Duration) -> Result<()>,
    ) -> Result<()> {
        loop {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return Err(DaemonError::Cancelled(vm.name.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match call(left) {
                Ok(()) => return Ok(()),
                Err(e) if left <= Duration::from_millis(50) || !self.vm_alive(vm) => return Err(e),
                Err(e) => {
                    tracing::debug!(vm = %vm.name, err = %e, "identity: not yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// `vm create --from`: the new VM's record takes the snapshot's image,
    /// sizes, VMM and root-disk strategy (a request that asks for others
    /// is refused), and its first start restores it.
    pub(crate) fn check_clone_request(
        &self,
        req: &banger_core::api::CreateVm,
        snap: &SnapshotRecord,
    ) -> Result<()> {
        let name = &snap.name;
        let s = &snap.spec;
        let mut differs = Vec::new();
        if req.image.as_deref().is_some_and(|i| i != s.image) {
            differs.push(format!("--image (it is of image {})", s.image));
        }
        if req.vmm.is_some_and(|v| v != s.vmm) {
            differs.push(format!("--vmm (it runs on {})", s.vmm));
        }
        if req.size.cpus.is_some_and(|c| c != s.sizing.cpus) {
            differs.push(format!("--cpus (it has {})", s.sizing.cpus));
        }
        if req
            .size
            .memory_mib
            .is_some_and(|m| m != s.sizing.memory_mib)
        {
            differs.push(format!("--memory (it has {} MiB)", s.sizing.memory_mib));
        }
        if req.size.disk_mib.is_some_and(|m| m != s.sizing.disk_mib) {
            differs.push(format!("--disk-size (it has {} MiB)", s.sizing.disk_mib));
        }
        if req.root_mib.is_some() {
            differs.push("--root-size (its root disk is the snapshot's)".into());
        }
        if !req.volumes.is_empty() || !req.mounts.is_empty() {
            differs.push(
                "--volume and --mount (a restored guest has the devices it was saved with)".into(),
            );
        }
        if differs.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::Invalid(format!(
                "--from {name}: a clone is the snapshot's machine; leave out {}",
                differs.join(", ")
            )))
        }
    }
}

/// QMP once QEMU listens (it was just spawned), by `deadline`, while it
/// lives.
fn wait_qmp(
    api: &Path,
    deadline: Instant,
    alive: &dyn Fn() -> bool,
) -> std::result::Result<banger_vmm::qmp::Session, banger_vmm::VmmError> {
    loop {
        match banger_vmm::qmp::Session::open(api) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || !alive() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
