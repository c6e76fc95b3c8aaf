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
    /// When the daemon stops the VM on its own (absent in older rows).
    #[serde(default)]
    pub auto_stop: AutoStop,
    /// What the guest may reach (absent in older rows: the default).
    #[serde(default)]
    pub net: NetPolicy,
    /// The root disk's size when it is larger than the image's root
    /// filesystem (`--root-size`); the guest grows its filesystem to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_mib: Option<u64>,
    /// Named volumes mounted in the guest (`--volume NAME:/path`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::VolumeMount>,
    /// Host directories shared through virtio-fs (`--mount`; QEMU only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::mount::HostMount>,
    /// How the root disk is made over the image, chosen by the daemon at
    /// create for this host and VMM (absent in older rows: see
    /// [`VmSpec::root_disk`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<RootDiskKind>,
    /// The snapshot this VM was made from (`vm create --from`), if any:
    /// its first start restores it instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Labels of the user's (the E2B-compatible API's sandbox metadata).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The environment every command started in it through the API gets
    /// (its sandbox's `envVars`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
}

impl VmSpec {
    /// The VM's root-disk strategy; rows from before strategies were
    /// recorded used a qcow2 overlay on QEMU and a copy on Firecracker.
    pub fn root_disk(&self) -> RootDiskKind {
        self.root_disk.unwrap_or(match self.vmm {
            VmmKind::Qemu => RootDiskKind::Qcow2,
            VmmKind::Firecracker => RootDiskKind::Copy,
        })
    }
}

/// How a VM's root disk is made copy-on-write over its image's read-only
/// ext4 (`resources::root_disk` in the daemon has one module for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootDiskKind {
    /// A qcow2 file backed by the image (QEMU only).
    Qcow2,
    /// A device-mapper snapshot of a read-only loop device of the image,
    /// with a sparse COW file on a second loop device.
    DmSnapshot,
    /// A reflink (FICLONE) of the image, where the filesystem has them.
    Reflink,
    /// The image itself, read-only, joined to a sparse per-VM upper disk
    /// by overlayfs in the guest's initramfs.
    Overlay,
    /// A sparse copy of the image: the last resort, linear in its size.
    Copy,
}

impl RootDiskKind {
    pub const ALL: [RootDiskKind; 5] = [
        RootDiskKind::Qcow2,
        RootDiskKind::DmSnapshot,
        RootDiskKind::Reflink,
        RootDiskKind::Overlay,
        RootDiskKind::Copy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RootDiskKind::Qcow2 => "qcow2",
            RootDiskKind::DmSnapshot => "dm-snapshot",
            RootDiskKind::Reflink => "reflink",
            RootDiskKind::Overlay => "overlay",
            RootDiskKind::Copy => "copy",
        }
    }
}

impl std::fmt::Display for RootDiskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RootDiskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RootDiskKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown root disk strategy {s:?}: use qcow2, dm-snapshot, reflink, overlay or copy"
                )
            })
    }
}

/// What a guest may reach beyond itself. By default: the outside world
/// through NAT, and nothing of the host, its networks or other guests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetPolicy {
    /// No outside access at all (`--net none`).
    pub none: bool,
    /// Ranges reachable despite the isolation (`--allow-net`), e.g. a LAN
    /// service the guest needs.
    pub allow: Vec<crate::net::Cidr>,
    /// Host ports that reach guest ports (`-p`, `vm port add|rm`).
    pub ports: Vec<crate::net::PortMap>,
    /// A shared network (`--network NAME`, a DNS label): VMs on one reach
    /// and resolve each other.
    pub network: Option<String>,
    /// A containerd pod's network namespace (made by CNI; root's API
    /// only): the VM's NIC is a tap in it, redirected to and from the
    /// pod's interface, whose MAC and address the guest takes. None of
    /// banger's own networking (NAT, DNS, firewall, ports) applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_netns: Option<std::path::PathBuf>,
}

/// Stop conditions the stats poller enforces, through the same path as
/// `vm stop`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoStop {
    /// Stop this long after the VM was started.
    pub ttl_secs: Option<u64>,
    /// Stop once the guest has been idle (no CPU above a small share of a
    /// core, no network traffic) this long.
    pub idle_secs: Option<u64>,
    /// What the TTL's end does (a sandbox of the E2B-compatible API is
    /// killed, or paused, as E2B's are).
    #[serde(skip_serializing_if = "TtlAction::is_stop")]
    pub at_ttl: TtlAction,
}

/// What a VM's TTL ends in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TtlAction {
    /// Stopped (`--ttl`).
    #[default]
    Stop,
    /// Deleted.
    Delete,
    /// Paused (to disk where it can be snapshotted).
    Pause,
}

impl TtlAction {
    pub fn is_stop(&self) -> bool {
        *self == TtlAction::Stop
    }
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
    /// Unix seconds the current boot became ready (TTLs count from it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// A `--rm` VM's client (pid and start time): the VM is deleted when
    /// that process is gone, also when the daemon that served it was not
    /// there to see it hang up (a crash, an upgrade).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rm_client: Option<RmClient>,
    /// A running VM whose vCPUs are stopped (`vm pause`); cleared by
    /// `resume` and by every end of the boot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// This boot's agent channel rides a virtio-serial port through
    /// `banger-vport` (QEMU, an image whose initramfs has the driver),
    /// not a vsock device: what a QEMU snapshot needs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vport: bool,
    /// This boot's guest RAM is a file of its own (QEMU's
    /// `memory-backend-file,share=on` on tmpfs): what a snapshot copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_path: Option<PathBuf>,
    /// The snapshot the next start restores (a VM made `--from` one that
    /// has not run yet); cleared once the restored guest has run, after
    /// which a start boots it from its disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// A snapshot of this VM was being taken (its vCPUs stopped for it):
    /// a daemon that finds this after a crash runs them again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshotting: bool,
    /// The warm-start snapshot this VM's first boot leaves once its guest
    /// is up (a cold VM whose image and sizes had none); consumed by that
    /// start, whatever becomes of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_save: Option<WarmSave>,
    /// Stopped with its guest saved (`vm pause --to-disk`): `restore`
    /// names the snapshot of its state and RAM (`suspend.<id>`), which
    /// its next start restores as itself (no new identity) and removes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// A pod VM's network (`NetPolicy::pod_netns`), as this boot found
    /// the pod's interface: recorded before its tap is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_link: Option<PodLink>,
}

/// The pod interface a pod VM's guest takes the place of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodLink {
    pub netns: std::path::PathBuf,
    /// The namespace's identity (its nsfs file's device and inode) when
    /// the tap was made: the path may name another one later.
    #[serde(default)]
    pub netns_id: (u64, u64),
    /// The interface CNI made (`eth0`), whose ingress is redirected.
    pub ifname: String,
    /// The tap banger made beside it.
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The interface's MTU, the guest NIC's too.
    #[serde(default = "ethernet_mtu")]
    pub mtu: u32,
}

fn ethernet_mtu() -> u32 {
    1500
}

/// The names of the warm-start cache's snapshots (`warm.<key>`): no name
/// a user gives holds a '.'.
pub const WARM_PREFIX: &str = "warm.";

/// The names of suspended VMs' saved guests (`suspend.<vm id>`).
pub const SUSPEND_PREFIX: &str = "suspend.";

/// A warm-start snapshot to take: its name (`warm.<key>`) and whose it
/// will be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmSave {
    pub snapshot: String,
    pub uid: u32,
}

/// The process a `--rm` VM lives for: its pid and its start time (clock
/// ticks after boot, /proc/PID/stat field 22; a recycled pid never
/// matches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmClient {
    pub pid: i32,
    pub start_time: u64,
}

impl VmRuntime {
    pub fn state(&self) -> VmState {
        self.state.unwrap_or(VmState::Created)
    }

    /// The state users see: [`VmState::Paused`] for a paused running VM.
    pub fn shown_state(&self) -> VmState {
        match self.state() {
            VmState::Running if self.paused => VmState::Paused,
            VmState::Stopped if self.suspended => VmState::Suspended,
            s => s,
        }
    }
}

/// Momentary reality: kernel objects and the VMM process. Never in SQLite;
/// cached in memory by the daemon and mirrored to `VMDir/handles.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmHandles {
    pub pid: Option<i32>,
    /// The VMM's start time (clock ticks after boot, /proc/PID/stat field
    /// 22): with the pid, its identity; a recycled pid never matches.
    pub vmm_start_time: Option<u64>,
    pub tap_device: Option<String>,
    /// QEMU's vsock backend process (vhost-device-vsock): pid and start
    /// time, as the VMM's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_start_time: Option<u64>,
    pub base_loop: Option<String>,
    pub cow_loop: Option<String>,
    pub dm_name: Option<String>,
    pub dm_dev: Option<String>,
    /// The `virtiofsd` of each `--mount` (pid, start time), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtiofsd: Vec<(i32, u64)>,
    /// The VM's cgroup directories (one per hierarchy), as made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_dirs: Vec<std::path::PathBuf>,
    /// A jailed Firecracker's jail dir (`<chroot base>/<exec>/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_dir: Option<std::path::PathBuf>,
}

/// One host resource a VM still holds, as its module recorded it: the
/// module's name and its own description of the object (a tap's name, a
/// VMM's pid and start time, ...). Opaque to everything but that module,
/// so a new kind of resource needs no schema change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub resource: String,
    pub data: serde_json::Value,
}

/// What an ended VM still holds after its request returned: resources whose
/// release is finished after the reply (its NAT rules, its tap, a deleted
/// VM's dying VMM, a deleted VM's address), in the order they are released.
/// Recorded in the store until every item is released, so that a restart
/// finishes the job, and so that the guest address stays reserved until
/// its tap is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The store's id for this record (0 before it is stored).
    pub id: i64,
    pub vm_id: String,
    pub vm_name: String,
    pub items: Vec<Held>,
}

impl Release {
    /// The data of the first item of `resource`, if any.
    pub fn item(&self, resource: &str) -> Option<&serde_json::Value> {
        self.items
            .iter()
            .find(|h| h.resource == resource)
            .map(|h| &h.data)
    }
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

/// One row of the `snapshots` table: a running VM's memory, device state
/// and disks at one moment, consistent with each other (`vm snapshot`);
/// what `vm create --from` restores. Its files are in `dir` and never
/// change once recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub id: String,
    pub dir: PathBuf,
    /// The VM it was taken of (its name then).
    pub vm: String,
    /// That VM's spec then: what a restore must match (image, sizes,
    /// VMM, accelerator, root-disk strategy).
    pub spec: VmSpec,
    /// What made it: a restore by anything else is refused, never misread.
    pub format: SnapshotFormat,
    /// Each file and its size; `state` also by its CRC-32.
    pub files: Vec<SnapshotFile>,
    pub state_crc32: u32,
    pub created_at: i64,
}

/// The makers of a snapshot whose formats must match a restore's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFormat {
    /// banger's version (the guest agent's and the daemon's).
    pub banger: String,
    /// The agent channel's multiplexer version.
    pub mux: u32,
    /// The VMM's version (QEMU's `query-version`).
    pub vmm_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub name: String,
    pub bytes: u64,
}
