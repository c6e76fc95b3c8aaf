//! The daemon's side of the guest agent: the agent binary that goes into
//! every VM's initramfs (checked to be a static executable, read once,
//! cached by size and mtime), and connections to a running VM's agent over
//! its hybrid vsock.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_agent::proto::{Call, Msg, AGENT_PORT};
use banger_core::VmRecord;
use banger_host::fsutil::WrapIo;

use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

/// How long the vsock handshake may take (a guest under load).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type AgentCacheEntry = (
    (std::path::PathBuf, u64, Option<std::time::SystemTime>),
    Arc<Vec<u8>>,
);

/// Why `path` cannot be the guest agent, if it cannot: the guest has no
/// library the host has, so only a static ELF executable runs everywhere.
pub fn check_static(path: &Path, data: &[u8]) -> std::result::Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "guest agent {}: {why}; build it with ./scripts/build-agent.sh",
            path.display()
        ))
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return bad("not a 64-bit ELF executable");
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            return bad("truncated program headers");
        }
        // PT_INTERP: it needs a dynamic loader.
        if u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) == 3 {
            return bad("dynamically linked");
        }
    }
    Ok(())
}

impl Daemon {
    /// The cpio archive that carries the agent into a VM's initramfs.
    pub(crate) fn agent_archive(&self) -> Result<Arc<Vec<u8>>> {
        let path = self.cfg.agent.clone().ok_or_else(|| {
            DaemonError::Invalid(
                "no guest agent: install banger-agent beside bangerd (./scripts/setup.sh does) or set BANGER_AGENT".into(),
            )
        })?;
        let meta = std::fs::metadata(&path).with_path("stat", &path)?;
        let key = (path.clone(), meta.len(), meta.modified().ok());
        let mut cache = lock(&self.agent_cache);
        if let Some((k, bytes)) = cache.as_ref() {
            if *k == key {
                return Ok(bytes.clone());
            }
        }
        let data = std::fs::read(&path).with_path("read", &path)?;
        check_static(&path, &data).map_err(DaemonError::Invalid)?;
        let bytes = Arc::new(banger_guest::config::agent_archive(&data));
        *cache = Some((key, bytes.clone()));
        Ok(bytes)
    }

    /// A connection to the agent of running VM `vm`.
    pub fn agent_connect(&self, vm: &VmRecord) -> Result<UnixStream> {
        self.agent_connect_within(vm, CONNECT_TIMEOUT)
    }

    fn agent_connect_within(&self, vm: &VmRecord, within: Duration) -> Result<UnixStream> {
        if vm.runtime.shown_state() == banger_core::VmState::Suspended {
            return Err(DaemonError::Invalid(format!(
                "vm {:?} is suspended (its guest saved to disk): resume it first (`banger vm \
                 resume {}`)",
                vm.name, vm.name
            )));
        }
        if !vm.runtime.state().is_up() {
            return Err(DaemonError::Invalid(format!(
                "vm {:?} is {}: start it first (`banger vm start {}`)",
                vm.name,
                vm.runtime.state(),
                vm.name
            )));
        }
        if vm.runtime.paused {
            return Err(DaemonError::Invalid(format!(
                "vm {:?} is paused: resume it first (`banger vm resume {}`)",
                vm.name, vm.name
            )));
        }
        let uds = vm.runtime.vsock_path.clone().ok_or_else(|| {
            DaemonError::Invalid(format!(
                "vm {:?} has no vsock (it was started by an older banger): restart it",
                vm.name
            ))
        })?;
        banger_agent::connect(&uds, AGENT_PORT, within)
            .map_err(|e| DaemonError::Invalid(format!("vm {:?}: guest agent: {e}", vm.name)))
    }

    /// A one-shot call to a VM's agent: the whole of it (the vsock
    /// handshake, the request, every byte of the answer) within `within`,
    /// whatever the guest does.
    pub fn agent_call(&self, vm: &VmRecord, call: Call, within: Duration) -> Result<Msg> {
        let t0 = Instant::now();
        let c = self.agent_connect_within(vm, within.min(CONNECT_TIMEOUT))?;
        let left = within.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err(DaemonError::Invalid(format!(
                "vm {:?}: guest agent: no answer within {:.1} s",
                vm.name,
                within.as_secs_f64()
            )));
        }
        banger_agent::client::call_within(c, call, left)
            .map_err(|e| DaemonError::Invalid(format!("vm {:?}: guest agent: {e}", vm.name)))
    }
}

/// How long `vm stats` waits for a guest's own numbers.
const STATS_TIMEOUT: Duration = Duration::from_secs(1);

impl Daemon {
    /// The guest's memory, load and process count, if its agent answers
    /// in time (a busy or broken guest leaves them out).
    pub(crate) fn guest_sample(&self, vm: &VmRecord) -> Option<banger_core::api::GuestSample> {
        match self.agent_call(vm, Call::Stats, STATS_TIMEOUT) {
            Ok(Msg::Stats(s)) => Some(banger_core::api::GuestSample {
                mem_total_bytes: s.mem_total_kib.saturating_mul(1024),
                mem_available_bytes: s.mem_available_kib.saturating_mul(1024),
                load1: if s.load[0].is_finite() {
                    s.load[0]
                } else {
                    0.0
                },
                processes: s.processes,
                mem_cached_bytes: s.mem_cached_kib.saturating_mul(1024),
                disk_total_bytes: s.disk_total_bytes,
                disk_used_bytes: s.disk_total_bytes.saturating_sub(s.disk_free_bytes),
            }),
            _ => None,
        }
    }

    /// Sets the guest's clock from the host's (Firecracker guests have no
    /// RTC; a restored guest's clock is the snapshot's).
    pub(crate) fn sync_clock(&self, vm: &VmRecord) -> Result<()> {
        self.sync_clock_within(vm, CONNECT_TIMEOUT)
    }

    /// [`Daemon::sync_clock`], the whole call within `within`.
    pub(crate) fn sync_clock_within(
        &self,
        vm: &VmRecord,
        within: std::time::Duration,
    ) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.agent_call(vm, Call::SetClock { unix_ns: now }, within)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_static_executables_are_agents() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        let e = check_static(Path::new("/t"), &me).unwrap_err();
        assert!(e.contains("dynamically linked"), "{e}");
        assert!(check_static(Path::new("/t"), b"#!/bin/sh\n").is_err());
        let busybox = std::fs::read("/bin/busybox").expect("busybox-static (install-deps.sh)");
        check_static(Path::new("/bin/busybox"), &busybox).expect("a static busybox");
    }
}
