//! The daemon protocol: newline-delimited JSON over a Unix socket.
//!
//! A client writes one [`Envelope`] line; the daemon answers with zero or
//! more [`Reply::Event`] lines (progress) and exactly one final
//! [`Reply::Ok`] or [`Reply::Err`] line, then closes. The version is checked
//! on every request, so a CLI and a daemon of different builds fail with a
//! clear message instead of misreading each other.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{AutoStop, NetPolicy, VmmKind};
use crate::sizing::SizeRequest;
use crate::state::VmState;

/// 13: guests' agents speak protocol 2 (containers: roots, cgroups), so a
/// client of 13 (the containerd shim) knows its VMs' agents can run them.
pub const PROTOCOL_VERSION: u32 = 13;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    VmCreate(Box<CreateVm>),
    VmStart {
        name: String,
    },
    VmStop {
        name: String,
    },
    VmKill {
        name: String,
    },
    /// Stops the VM's vCPUs; everything else is kept (`vm pause`).
    VmPause {
        name: String,
        /// `--to-disk`: the guest's state and memory saved, its VMM gone
        /// (`vm resume` restores it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        to_disk: bool,
    },
    /// Runs a paused VM's vCPUs again and sets its clock to now.
    VmResume {
        name: String,
    },
    /// Refused for a VM that runs (or boots, or stops) unless `force`
    /// (`vm rm -f`), which kills it first.
    VmDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    VmGet {
        name: String,
    },
    VmList,
    ImageBuild {
        name: String,
        force: bool,
    },
    ImageList,
    ImageDelete {
        name: String,
    },
    /// A new image from an ext4 image, a root tarball, a directory or an
    /// OCI image at `source` (an absolute path on the daemon's host).
    ImageImport {
        name: String,
        source: PathBuf,
    },
    /// A new image from a stopped VM's root filesystem.
    VmCommit {
        name: String,
        image: String,
    },
    Doctor,
    /// Waits until the taps and NAT rules of ended VMs are released
    /// (retrying failed releases): the host is at baseline after it.
    Settle,
    /// The guest console: what the log holds, as `Event::Log` chunks; with
    /// `follow`, then what the guest writes, until the client hangs up or
    /// the VM stops.
    VmLogs {
        name: String,
        follow: bool,
    },
    /// The stats poller's last sample of one VM, or of every running VM.
    VmStats {
        name: Option<String>,
    },
    /// The daemon's pid, version, uptime, VMs by state, pending releases.
    DaemonStatus,
    /// Publishes a host port to a guest port (at once if the VM runs).
    VmPortAdd {
        name: String,
        port: crate::net::PortMap,
    },
    /// Unpublishes the host port `host` (`ADDR:PORT/PROTO` or `PORT`).
    VmPortRm {
        name: String,
        host: String,
    },
    /// A named volume: an ext4 disk of `size_mib` that outlives VMs.
    VolumeCreate {
        name: String,
        size_mib: u64,
    },
    VolumeList,
    /// The `--network` names that have VMs: whose, which VMs, shared
    /// with whom.
    NetworkList,
    /// Lets `user` (a name or a uid) put VMs on the network `name`
    /// (`share`), or no longer. Its owner or root only, while it has VMs.
    NetworkShare {
        name: String,
        user: String,
        share: bool,
    },
    /// Refused while a VM mounts it (the VMs are named).
    VolumeDelete {
        name: String,
    },
    /// A connection to the VM's guest agent: the reply (`Response::Agent`)
    /// carries its file descriptor (SCM_RIGHTS), already past the vsock
    /// handshake; the client then speaks the agent protocol on it directly
    /// (so a session outlives a daemon restart).
    VmAgent {
        name: String,
    },
    /// Gives a running guest its VM's identity again through its agent
    /// (hostname, MAC, address, nameservers, keys) with a new machine id,
    /// boot id and entropy: what a clone restored from a snapshot needs.
    VmReidentify {
        name: String,
    },
    /// A snapshot of a running or paused VM (memory, device state and
    /// disks); the VM goes on as it was. `snapshot` is its name (none:
    /// one is made up).
    VmSnapshot {
        name: String,
        snapshot: Option<String>,
    },
    /// Clones of a running VM, through a snapshot of it that goes once
    /// they run: `new` for one, `new-1` to `new-COUNT` for more.
    VmFork {
        name: String,
        new: String,
        count: u32,
    },
    SnapshotList,
    SnapshotGet {
        name: String,
    },
    SnapshotDelete {
        name: String,
    },
    /// The daemon's effective settings and where each came from.
    ConfigShow,
    /// Root only: the daemon serves the E2B-compatible API on `listen` (a
    /// loopback address and port) from now on, until `ApiStop`.
    ApiServe {
        listen: String,
    },
    /// Where the API is served, if it is.
    ApiStatus,
    /// Root only: the API is no longer served (requests in flight end).
    ApiStop,
    /// A new API key for the caller, named `name`: its only sight.
    ApiTokenCreate {
        name: String,
    },
    /// The caller's API keys (root: everyone's), never the keys.
    ApiTokenList,
    /// Removes the caller's key `name` (root: `uid`'s).
    ApiTokenDelete {
        name: String,
        uid: Option<u32>,
    },
    /// Root only: the daemon stops serving, finishes the requests in
    /// flight and exits; VMs keep running (the next daemon reconciles
    /// them).
    DaemonStop,
}

/// One effective setting of the daemon (`banger config show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// The config file's key (the flag's name with `_`).
    pub key: String,
    pub value: String,
    /// `default`, `file PATH`, `env VAR` or `flag --NAME`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: Option<String>,
    pub size: SizeRequest,
    pub vmm: Option<VmmKind>,
    /// Boot it right away (what `vm run` does).
    pub start: bool,
    /// The VM lives as long as this connection: once booted the daemon
    /// sends `Event::Ready` and waits for the client to hang up (or shut
    /// its writing side), then deletes the VM and answers `Deleted`. A
    /// client that goes away during the boot (Ctrl-C) cancels it. Needs
    /// `start`.
    #[serde(default)]
    pub rm: bool,
    #[serde(default)]
    pub auto_stop: AutoStop,
    #[serde(default)]
    pub net: NetPolicy,
    #[serde(default)]
    pub volumes: Vec<crate::volume::VolumeMount>,
    /// `--root-size`: at least the image's root filesystem.
    #[serde(default)]
    pub root_mib: Option<u64>,
    /// `--mount /host:/guest[:ro]` (virtio-fs, QEMU only).
    #[serde(default)]
    pub mounts: Vec<crate::mount::HostMount>,
    /// `--from SNAP`: the VM is a clone of that snapshot (its image,
    /// sizes and disks), restored instead of booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `--cold`: boot, even where a warm-start snapshot of the image and
    /// sizes is cached (and leave none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// Labels (the E2B-compatible API's sandbox metadata).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The environment of the commands the API starts in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
}

/// Labels and environment at most this many each.
pub const LABELS_MAX: usize = 64;

impl CreateVm {
    /// A create's labels and environment, bounded: names and values of
    /// sensible sizes, names without `=` or control characters (they go into
    /// a guest's environment, and are shown in a terminal escaped).
    pub fn check_labels(&self) -> Result<(), String> {
        if self.metadata.len() > LABELS_MAX || self.env.len() > LABELS_MAX {
            return Err(format!(
                "at most {LABELS_MAX} metadata entries and {LABELS_MAX} environment variables"
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(format!(
                    "metadata {:?}: a key of 1 to 128 bytes, a value of at most 1024",
                    crate::text::escape_control(&k.chars().take(128).collect::<String>(), false)
                ));
            }
        }
        for (k, v) in &self.env {
            let bad = k.is_empty()
                || k.len() > 256
                || v.len() > 32 << 10
                || k.contains('=')
                || k.chars().any(char::is_control)
                || v.contains('\0');
            if bad {
                return Err(format!(
                    "environment variable {:?}: a name of 1 to 256 bytes without '=' or control \
                     characters, a value of at most 32 KiB without NUL",
                    crate::text::escape_control(&k.chars().take(256).collect::<String>(), false)
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Event(Event),
    Ok(Response),
    Err(ApiError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A human-readable progress line.
    Progress { message: String },
    /// The one-line VM spec printed on spawn.
    Spec { line: String },
    /// How far long work is through an amount it knows (bytes of an
    /// archive or a layer being unpacked): the CLI's progress bar.
    Bytes { what: String, done: u64, total: u64 },
    /// A named phase and how long it took, for `--timings`.
    Phase { name: String, micros: u64 },
    /// The VM of an `rm` create is up: the client uses it, then hangs up.
    Ready { vm: Box<VmInfo> },
    /// A chunk of the guest console, as the guest wrote it (control
    /// characters included: the client escapes them before a terminal
    /// sees them).
    Log { text: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong {
        version: u32,
        pid: u32,
    },
    Vm(Box<VmInfo>),
    Vms {
        vms: Vec<VmInfo>,
    },
    Image(ImageInfo),
    Images {
        images: Vec<ImageInfo>,
    },
    Deleted {
        name: String,
    },
    Doctor {
        checks: Vec<Check>,
    },
    Config {
        entries: Vec<ConfigEntry>,
    },
    /// Every release is done; `retried` failed ones were redone.
    Settled {
        retried: u32,
    },
    Stats {
        stats: Vec<VmStats>,
    },
    Status(DaemonStatus),
    /// The daemon is exiting (`DaemonStop`).
    Stopping {
        pid: u32,
    },
    /// The end of a `VmLogs` stream.
    LogEnd,
    /// Sent with the agent connection's descriptor.
    Agent,
    Volume(VolumeInfo),
    Volumes {
        volumes: Vec<VolumeInfo>,
    },
    Networks {
        networks: Vec<NetworkInfo>,
    },
    Snapshot(Box<SnapshotInfo>),
    Snapshots {
        snapshots: Vec<SnapshotInfo>,
    },
    /// Where the E2B-compatible API is served (none: it is not).
    Api {
        listen: Option<String>,
    },
    /// A new API key: shown this once.
    ApiToken {
        name: String,
        key: String,
    },
    ApiTokens {
        tokens: Vec<ApiTokenInfo>,
    },
}

/// An API key as `banger api token ls` shows it (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    pub name: String,
    /// Its user (the rights its requests have).
    pub uid: u32,
    pub created_at: i64,
}

/// A snapshot, as `snapshot ls|show` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub image: String,
    pub vmm: VmmKind,
    pub cpus: u32,
    pub memory_mib: u64,
    /// What its files take on disk (sparse: what they hold).
    pub disk_bytes: u64,
    pub dir: PathBuf,
    pub created_at: i64,
    /// VMs made from it that have not started yet (it cannot be removed
    /// while there are any).
    pub pending: Vec<String>,
    /// The uid that made it (0: root).
    pub owner: u32,
    /// Only root may use it (taken of a VM only root may use).
    pub root_only: bool,
}

/// One sample of the stats poller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    /// Unix seconds of the sample.
    pub sampled_at: i64,
    /// The VMM's CPU time (user + system), and its share of one core over
    /// the last interval (100.0 = one core busy).
    pub cpu_secs: f64,
    pub cpu_percent: f64,
    /// The VMM's resident memory.
    pub rss_bytes: u64,
    /// What the VM's cgroup (the VMM and its helpers) uses, and its limit.
    #[serde(default)]
    pub cgroup_memory_bytes: u64,
    #[serde(default)]
    pub memory_limit_bytes: u64,
    /// Bytes allocated on the host by the VM's disks (root and work).
    pub disk_bytes: u64,
    /// Bytes through the VM's tap, as the guest sees them (rx: received by
    /// the guest).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: u64,
    /// How long the guest has been idle (see `AutoStop::idle_secs`).
    pub idle_secs: u64,
    /// What the guest itself says (its agent), when it answers.
    #[serde(default)]
    pub guest: Option<GuestSample>,
}

/// The guest's own view, from its agent: memory, load, processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSample {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub load1: f64,
    pub processes: u32,
    /// The page cache, and the root filesystem's size and use (0 when the
    /// guest's agent is older than these numbers).
    #[serde(default)]
    pub mem_cached_bytes: u64,
    #[serde(default)]
    pub disk_total_bytes: u64,
    #[serde(default)]
    pub disk_used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub protocol: u32,
    pub uptime_secs: u64,
    /// (state, count), every state that has VMs.
    pub vms: Vec<(VmState, u32)>,
    pub pending_releases: u32,
    /// VMs are `<name>.<dns_suffix>` in banger's DNS and ssh config.
    #[serde(default)]
    pub dns_suffix: String,
    /// Where the host can ask banger's DNS, if anywhere.
    #[serde(default)]
    pub dns_listen: Option<String>,
    /// Client connections open now (this one included).
    #[serde(default)]
    pub connections: u32,
    /// Releases that failed and wait for their retry: why, and when.
    #[serde(default)]
    pub failed_releases: Vec<FailedRelease>,
}

/// A VM's release that failed (a tap that would not go, an `nft` that
/// failed): retried after a backoff while the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRelease {
    pub vm: String,
    pub error: String,
    pub attempts: u32,
    /// Seconds until the next try.
    pub retry_in_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidInput,
    Conflict,
    Host,
    Internal,
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// What the CLI needs to show a VM and to reach it over SSH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: VmState,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub vmm: VmmKind,
    pub accel: String,
    pub guest_ip: Option<String>,
    pub created_at: i64,
    pub last_error: Option<String>,
    pub ssh: SshTarget,
    pub vm_dir: PathBuf,
    #[serde(default)]
    pub auto_stop: AutoStop,
    #[serde(default)]
    pub net: NetPolicy,
    /// The guest's vsock context id while it runs.
    #[serde(default)]
    pub vsock_cid: Option<u32>,
    /// How its root disk is made over the image.
    #[serde(default)]
    pub root_disk: Option<crate::RootDiskKind>,
    /// Its labels (the E2B-compatible API's sandbox metadata).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// When it started, if it runs (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    pub user: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// The alias the host key is pinned under in `known_hosts`.
    pub host_key_alias: String,
}

/// A `--network` name while it has VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    /// Who put its first VM on it (0: root).
    pub owner: u32,
    pub vms: Vec<String>,
    /// The uids its owner lets put VMs on it too.
    pub shared_with: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size_mib: u64,
    /// What its file takes on disk (sparse: what it holds).
    pub disk_bytes: u64,
    pub path: PathBuf,
    /// VMs whose spec mounts it.
    pub used_by: Vec<String>,
    /// The running VM that has it now, if any.
    pub attached_to: Option<String>,
    /// The uid that made it (0: root, or made before owners were kept).
    #[serde(default)]
    pub owner: u32,
    /// Only root may use it (a VM only root may use mounted it).
    #[serde(default)]
    pub root_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub kernel_version: String,
    pub rootfs_bytes: u64,
    pub dir: PathBuf,
    pub created_at: i64,
    /// What its files take on disk.
    #[serde(default)]
    pub disk_bytes: u64,
    /// The VMs made from it (it cannot be removed while there are any).
    #[serde(default)]
    pub used_by: Vec<String>,
    /// The uid that made it (0: root, or made before owners were kept).
    #[serde(default)]
    pub owner: u32,
    /// Only root may use it (committed from a VM only root may use).
    #[serde(default)]
    pub root_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// The command that fixes a failed check, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let e = Envelope {
            version: PROTOCOL_VERSION,
            request: Request::VmStart { name: "a".into() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            format!(r#"{{"version":{PROTOCOL_VERSION},"request":{{"op":"vm_start","name":"a"}}}}"#)
        );
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
        let bad = r#"{"version":3,"request":{"op":"vm_start","name":"a","force":true}}"#;
        assert!(serde_json::from_str::<Envelope>(bad).is_err());
        let bad = r#"{"version":3,"request":{"op":"vm_explode"}}"#;
        assert!(serde_json::from_str::<Envelope>(bad).is_err());
    }

    #[test]
    fn replies_are_tagged() {
        let r = Reply::Err(ApiError {
            kind: ErrorKind::NotFound,
            message: "vm \"x\" not found".into(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"reply":"err","kind":"not_found""#), "{s}");
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), r);
    }
}
