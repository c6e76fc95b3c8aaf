//! The daemon's configuration: paths, address range, timeouts, the VMM
//! binaries, the stats poller's cadence.

use std::path::PathBuf;
use std::time::Duration;

use banger_core::net::Subnet;
use banger_core::{Layout, VmmKind};

#[derive(Debug, Clone)]
pub struct Config {
    pub layout: Layout,
    pub subnet: Subnet,
    /// How long a guest may take to say it is ready.
    pub boot_timeout: Duration,
    /// How long a clean shutdown may take before the VMM is killed.
    pub stop_timeout: Duration,
    /// Force a VMM instead of choosing by host capability.
    pub vmm: Option<VmmKind>,
    /// A pause before each release the janitor does: a test hook
    /// (`BANGER_TEST_RELEASE_DELAY_MS`) that makes "the daemon died with a
    /// release pending" reproducible. Zero otherwise.
    pub release_delay: Duration,
    /// The firecracker binary (`BANGER_FIRECRACKER`, else `firecracker`
    /// on PATH); none means QEMU only.
    pub firecracker: Option<PathBuf>,
    /// How often the stats poller samples running VMs.
    pub stats_interval: Duration,
    /// Below this share of one core (percent) over a sample, with no
    /// network traffic, a guest counts as idle.
    pub idle_cpu_percent: f64,
    /// The console log is rotated past this size (one older file is kept),
    /// so a guest cannot fill the host's disk.
    pub console_max_bytes: u64,
    /// VMs are named `<name>.<dns_suffix>` in banger's DNS.
    pub dns_suffix: String,
    /// Where the host answers banger's DNS (none: not at all).
    pub dns_listen: Option<std::net::SocketAddr>,
    /// The resolv.conf whose nameservers banger forwards other names to.
    pub resolv_conf: PathBuf,
    /// Spare taps kept warm (0: none; see `resources::tap`).
    pub tap_pool: usize,
    /// The guest agent, a static binary put in every VM's initramfs
    /// (`BANGER_AGENT`, else `banger-agent` beside bangerd or in
    /// `../lib/banger/`).
    pub agent: Option<PathBuf>,
    /// QEMU's vsock backend (`BANGER_VHOST_VSOCK`, else
    /// `vhost-device-vsock` on PATH), for images whose initramfs cannot
    /// serve the agent on a virtio-serial port.
    pub vsock_backend: Option<PathBuf>,
    /// The agent channel's host process for a QEMU VM's virtio-serial
    /// port (`BANGER_VPORT`, else `banger-vport` beside bangerd or in
    /// `../lib/banger/`).
    pub vport: Option<PathBuf>,
    /// Where snapshot-able QEMU VMs keep their RAM, one file each: a
    /// tmpfs (`BANGER_RAM_DIR`, else /dev/shm/banger; `resources::ram`).
    pub ram_dir: PathBuf,
    /// MiB of disk the warm-start snapshots may take (0: none made or
    /// used; `warm`).
    pub warm_cache_mib: u64,
    /// virtiofsd, for `--mount` (QEMU).
    pub virtiofsd: Option<PathBuf>,
    /// Force a root-disk strategy instead of choosing by host and VMM.
    pub root_disk: Option<banger_core::RootDiskKind>,
    /// VMMs run as uid/gid `base + slot` (`resources::jail`).
    pub vmm_uid_base: u32,
    /// The gid a jailed Firecracker runs with (images are read through an
    /// ACL grant to each VM's uid: `resources::jail`).
    pub vmm_images_gid: u32,
    /// What a VM's cgroup allows beyond its guest memory: the VMM's own
    /// memory (QEMU's, TCG's translation cache, the vsock backend).
    pub vmm_memory_overhead_mib: u64,
    /// The pids limit of a VM's cgroup (the VMM's threads and helpers).
    pub vmm_pids_max: u64,
    /// Firecracker's jailer (`BANGER_JAILER`, else `jailer` on the
    /// daemon's PATH): with it, Firecracker runs chrooted as the VM's
    /// user; without it, as root (`resources::jail`).
    pub jailer: Option<PathBuf>,
    /// The VMs' parent cgroup's name (default `banger` under the daemon's
    /// own in cgroup v1, `banger.slice` at the root in v2).
    pub cgroup_parent: Option<String>,
    /// The socket's group (`banger`), if it exists: its members also read
    /// `ssh/` (a copy of the client key, the known hosts).
    pub socket_gid: Option<u32>,
    /// Serve the E2B-compatible API here from the start (`e2b`).
    pub api_listen: Option<String>,
    /// The image a VM boots unless it names one.
    pub default_image: String,
    /// A VM's size where its request does not say (else host-aware).
    pub default_size: banger_core::sizing::SizeRequest,
    /// The effective settings and their sources (`banger config show`).
    pub settings: Vec<banger_core::api::ConfigEntry>,
}

/// QEMU under TCG with its translation cache bounded (`-accel
/// tcg,tb-size`), the vsock backend and virtiofsd: measured in
/// docs/BENCHMARKS.md.
pub const DEFAULT_VMM_MEMORY_OVERHEAD_MIB: u64 = 384;

/// Above systemd's container range (524288..1879048191) and below its
/// foreign range (2147352576..): uids no account uses.
pub const DEFAULT_VMM_UID_BASE: u32 = 1_879_048_192;

impl Config {
    pub fn new(layout: Layout) -> Self {
        Config {
            layout,
            subnet: Subnet::default(),
            boot_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(30),
            vmm: None,
            release_delay: Duration::ZERO,
            firecracker: None,
            stats_interval: Duration::from_secs(2),
            idle_cpu_percent: 5.0,
            console_max_bytes: 1 << 20,
            dns_suffix: "vm".into(),
            dns_listen: None,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            tap_pool: 0,
            agent: None,
            vsock_backend: None,
            vport: None,
            ram_dir: PathBuf::from("/dev/shm/banger"),
            warm_cache_mib: 0,
            virtiofsd: None,
            root_disk: None,
            vmm_uid_base: DEFAULT_VMM_UID_BASE,
            vmm_images_gid: DEFAULT_VMM_UID_BASE,
            vmm_memory_overhead_mib: DEFAULT_VMM_MEMORY_OVERHEAD_MIB,
            vmm_pids_max: 512,
            cgroup_parent: None,
            socket_gid: None,
            api_listen: None,
            default_image: banger_guest::image::DEFAULT_IMAGE.to_string(),
            default_size: Default::default(),
            settings: Vec::new(),
            jailer: None,
        }
    }
}
