//! What a VM is (durable, in SQLite) versus what is currently true about it
//! (transient handles, in memory and in a scratch file). See seeds 000/003.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sizing::Sizing;
use crate::state::VmState;

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        })
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            _ => Err(format!("unknown vmm {s:?}: use qemu or firecracker")),
        }
    }
}

/// Durable intent: what the user asked for. Never changes after create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub sizing: Sizing,
    pub image: String,
    pub vmm: VmmKind,
    /// "kvm" or "tcg" for QEMU; "kvm" for Firecracker.
    pub accel: String,
}

/// The durable runtime record (`vms.runtime_json`): facts that are either
/// durable or derived deterministically from the VM's identity. The tap is
/// mirrored here (seed 000) because it is the one datum that cannot be
/// re-derived; it is cleared at every post-cleanup reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmRuntime {
    pub state: Option<VmState>,
    pub guest_ip: Option<String>,
    pub api_sock_path: Option<PathBuf>,
    pub vsock_path: Option<PathBuf>,
    pub vsock_cid: Option<u32>,
    pub log_path: Option<PathBuf>,
    pub metrics_path: Option<PathBuf>,
    pub dns_name: Option<String>,
    pub vm_dir: Option<PathBuf>,
    pub system_overlay: Option<PathBuf>,
    pub work_disk_path: Option<PathBuf>,
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap_device: Option<String>,
}

impl VmRuntime {
    pub fn state(&self) -> VmState {
        self.state.unwrap_or(VmState::Created)
    }
}

/// Momentary reality: kernel objects and the VMM process. Never in SQLite;
/// cached in memory by the daemon and mirrored to `VMDir/handles.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmHandles {
    pub pid: Option<i32>,
    pub tap_device: Option<String>,
    pub base_loop: Option<String>,
    pub cow_loop: Option<String>,
    pub dm_name: Option<String>,
    pub dm_dev: Option<String>,
}

/// What a VM still holds in the kernel once its VMM is gone: its tap and
/// the NAT rules tagged with its id. Recorded in the store until the
/// daemon's janitor has released both, so that a restart finishes the job,
/// and so that the guest address stays reserved until its tap is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub vm_id: String,
    pub vm_name: String,
    pub tap: String,
    pub guest_ip: Option<String>,
    /// A VMM that was sent SIGKILL but not waited for (`delete`): the
    /// release waits for it first. With the argument that identifies it
    /// (its API socket path), so that a recycled pid is never touched.
    pub vmm_pid: Option<i32>,
    pub vmm_needle: Option<String>,
}

impl VmHandles {
    pub fn is_empty(&self) -> bool {
        *self == VmHandles::default()
    }
}

/// One row of the `vms` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub spec: VmSpec,
    pub runtime: VmRuntime,
    /// Unix seconds.
    pub created_at: i64,
}

impl VmRecord {
    /// The short id used for derived kernel-object names (dm, taps).
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(8)]
    }
}

/// One row of the `images` table: the files a VM boots from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub rootfs_bytes: u64,
    pub kernel_version: String,
    pub created_at: i64,
}
