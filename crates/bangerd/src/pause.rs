//! `vm pause` and `vm resume`: the VM's vCPUs stopped and run again.
//! A paused VM keeps everything a running one holds (its tap, addresses,
//! DNS name, published ports, memory, and the connections open to its
//! agent, which go on after the resume); it is recorded as running with
//! `runtime.paused`, shown as `paused`, so that a daemon restart finds it
//! paused still. Its agent is not called while paused (a call would wait
//! for a guest that cannot answer): `exec`, `stats` and the volumes' flush
//! say so or skip it. A stop resumes it first, so that the guest can power
//! off cleanly; a kill or `rm -f` needs nothing of the guest.
//!
//! How, per VMM:
//! - Firecracker: its API (`PATCH /vm` Paused/Resumed).
//! - QEMU whose agent channel is its virtio-serial port and which has no
//!   `--mount`: QMP's `stop`/`cont` (what a snapshot needs: QEMU saves a
//!   VM stopped so, and a stopped process cannot answer QMP). `stop`
//!   returns once every vCPU is paused; `banger-vport` keeps what the
//!   host sends (a window per stream) until the guest reads it.
//! - Other QEMU VMs: the VMM process is stopped and continued
//!   (SIGSTOP/SIGCONT, as docker's freezer stops a container's
//!   processes). QMP's `stop`/`cont` stop and restart vhost-user devices,
//!   and vhost-device-vsock 0.3.0 ends its worker thread on any event that
//!   comes while its rings are stopped (a host connection, data for the
//!   guest: `handle_event`'s error leaves its epoll loop), which loses the
//!   agent channel for good; virtiofsd's rings are vhost-user too. A
//!   stopped process runs nothing, vCPUs included; the vsock backend, a
//!   process of its own, keeps what the host sends until the guest reads
//!   it.
//!
//! Which way is decided by the VM's record alone (`runtime.vport`, its
//! mounts), so a daemon restarted in between resumes it the same way.
//! The guest's clock is not stopped (its time source is the host's), so
//! the guest sees the pause as time that passed; its wall clock is set
//! again all the same.

use std::time::{Duration, Instant};

use banger_core::api::VmInfo;
use banger_core::{VmRecord, VmmKind};
use banger_host::process::{self, ProcId};
use banger_vmm::firecracker;
use nix::sys::signal::Signal;
use tracing::warn;

use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

impl Daemon {
    pub fn pause(&self, name: &str) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        vm.runtime.shown_state().check(&vm.name, "pause")?;
        self.set_running(&vm, false)?;
        vm.runtime.paused = true;
        if let Err(e) = self.save(&vm) {
            // Not recorded: it runs again, as the record says.
            if let Err(r) = self.set_running(&vm, true) {
                warn!(vm = %vm.name, err = %r, "cannot resume a VM whose pause was not recorded");
            }
            return Err(e);
        }
        Ok(self.info(&vm))
    }

    pub fn resume(&self, name: &str) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        vm.runtime.shown_state().check(&vm.name, "resume")?;
        // Suspended to disk: its start restores it.
        if vm.runtime.suspended {
            let vm = self.start_locked(vm, &mut |_| {}, crate::cancel::Cancel::default())?;
            return Ok(self.info(&vm));
        }
        self.resume_locked(&mut vm)?;
        Ok(self.info(&vm))
    }

    /// Runs a paused VM's vCPUs again (its lock held), records it, and
    /// sets its clock to the host's (it stood still while paused; a guest
    /// that does not answer in time keeps its own, with a warning).
    pub(crate) fn resume_locked(&self, vm: &mut VmRecord) -> Result<()> {
        self.set_running(vm, true)?;
        vm.runtime.paused = false;
        self.save(vm)?;
        // A snapshot whose VM could not run again after its save left the
        // agent's gate closed (`snapshots::run_again`): opened, best effort.
        if crate::pause::qmp_pauses(vm) || vm.spec.vmm == VmmKind::Firecracker {
            let _ = self.agent_call(
                vm,
                banger_agent::proto::Call::Release,
                Duration::from_secs(2),
            );
        }
        if let Err(e) = self.sync_clock(vm) {
            warn!(vm = %vm.name, err = %e, "resumed, but the guest's clock was not set");
        }
        Ok(())
    }

    /// Runs a paused VM's vCPUs again for what a stop or delete needs of
    /// its guest (`why`), without setting its clock (it is about to go):
    /// whether the guest runs. Not saved: the caller ends the VM.
    pub(crate) fn unpause_for(&self, vm: &mut VmRecord, why: &str) -> bool {
        if !vm.runtime.paused {
            return true;
        }
        match self.set_running(vm, true) {
            Ok(()) => {
                vm.runtime.paused = false;
                true
            }
            Err(e) => {
                warn!(vm = %vm.name, err = %e, "cannot resume a paused VM to {why}");
                false
            }
        }
    }

    /// Stops (`run` false) or runs again the VM's vCPUs, as its VMM
    /// allows (see above).
    fn set_running(&self, vm: &VmRecord, run: bool) -> Result<()> {
        let gone = || {
            DaemonError::Invalid(format!(
                "vm {:?}: its VMM is not running (`banger vm ls` shows what became of it)",
                vm.name
            ))
        };
        let vmm = self
            .vmm_process(vm)
            .filter(|_| self.vm_alive(vm))
            .ok_or_else(gone)?;
        match vm.spec.vmm {
            VmmKind::Firecracker => {
                let sock = vm.runtime.api_sock_path.as_deref().ok_or_else(gone)?;
                if run {
                    firecracker::resume(sock)?;
                } else {
                    firecracker::pause(sock)?;
                }
            }
            VmmKind::Qemu if qmp_pauses(vm) => {
                let sock = vm.runtime.api_sock_path.as_deref().ok_or_else(gone)?;
                let cmd = if run { "cont" } else { "stop" };
                banger_vmm::qmp::execute(sock, cmd, None).map_err(|e| {
                    DaemonError::Invalid(format!("vm {:?}: QMP {cmd}: {e}", vm.name))
                })?;
            }
            VmmKind::Qemu => {
                let sig = if run {
                    Signal::SIGCONT
                } else {
                    Signal::SIGSTOP
                };
                vmm.signal(sig).map_err(|e| {
                    DaemonError::Invalid(format!(
                        "vm {:?}: cannot {} its VMM (pid {}): {e}",
                        vm.name,
                        if run { "continue" } else { "stop" },
                        vmm.pid
                    ))
                })?;
                if !run {
                    // SIGSTOP is asynchronous: paused once the kernel
                    // says the process is stopped (bounded). One that does
                    // not stop in time runs again, as its record says.
                    if let Err(e) = wait_stopped(vm, vmm) {
                        let _ = vmm.signal(Signal::SIGCONT);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a QEMU VM pauses through QMP (`stop`/`cont`) rather than by
/// stopping its process: nothing vhost-user in it (see above).
pub(crate) fn qmp_pauses(vm: &VmRecord) -> bool {
    vm.spec.vmm == VmmKind::Qemu && vm.runtime.vport && vm.spec.mounts.is_empty()
}

/// How long a VMM may take to show as stopped after SIGSTOP.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Waits until every thread of the VMM is stopped (`T` in
/// `/proc/PID/task/*/stat`): a thread in the middle of a system call stops
/// when it returns to user space.
fn wait_stopped(vm: &VmRecord, p: ProcId) -> Result<()> {
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        if process::all_threads_stopped(p.pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DaemonError::Invalid(format!(
                "vm {:?}: its VMM (pid {}) did not stop within {STOP_WAIT:?}",
                vm.name, p.pid
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
