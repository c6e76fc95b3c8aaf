//! The agent protocol: length-prefixed frames over one vsock stream per
//! call.
//!
//! A frame is `[len: u32 BE][kind: u8][payload: len - 1 bytes]`. Control
//! messages (`kind` 0) carry JSON; process streams and file data carry raw
//! bytes, so binary data costs no encoding. A connection carries one call:
//! the host's first frame is a [`Request`] (protocol version and [`Call`]),
//! then the call's own exchange, ended by a final message ([`Msg::Exited`],
//! [`Msg::Done`] or [`Msg::Error`]). Several calls run at once as several
//! connections: the kernel's per-connection flow control then does what a
//! multiplexer's windows would, and a slow stream never blocks another.
//! A connection costs one `CONNECT` on the VMM's Unix socket (hybrid vsock).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

pub use crate::meta::{check_meta, META_KEYS, META_KEY_MAX, META_PREFIX, META_TOTAL_MAX};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bumped on any incompatible change; a mismatch is refused with both
/// versions named.
pub const VERSION: u32 = 2;

/// The guest port the agent listens on (host-initiated calls).
pub const AGENT_PORT: u32 = 1024;

/// The host port the agent says hello on when it starts (guest-initiated:
/// `<uds_path>_1025` on the host).
pub const HELLO_PORT: u32 = 1025;

/// The name of the virtio-serial port the agent serves on QEMU
/// (`/sys/class/virtio-ports/*/name`), through the multiplexer.
pub const VPORT_NAME: &str = "org.banger.agent";

/// The largest frame either side accepts; data is sent in chunks of at
/// most [`CHUNK`].
pub const MAX_FRAME: usize = 1 << 20;
pub const CHUNK: usize = 64 << 10;

/// Whatever a guest or a host sends in a name, path or argument is bounded.
pub const MAX_ARGS: usize = 4096;

#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("agent frame of unknown kind {0}")]
    Kind(u8),
    #[error("agent message is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("agent connection closed in the middle of a call")]
    Closed,
    /// Writing a process's output here failed (a closed pipe, a full
    /// disk): this side's, not the agent's.
    #[error("writing the output: {0}")]
    Output(io::Error),
    #[error("agent speaks protocol {theirs}, this banger {VERSION}: rebuild the image's agent or update banger")]
    Version { theirs: u32 },
    #[error("the agent said: {0}")]
    Remote(String),
    #[error("unexpected agent message: {0}")]
    Unexpected(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Msg = 0,
    Stdin = 1,
    Stdout = 2,
    Stderr = 3,
    Data = 4,
}

impl TryFrom<u8> for Kind {
    type Error = ProtoError;
    fn try_from(b: u8) -> Result<Self, ProtoError> {
        Ok(match b {
            0 => Kind::Msg,
            1 => Kind::Stdin,
            2 => Kind::Stdout,
            3 => Kind::Stderr,
            4 => Kind::Data,
            k => return Err(ProtoError::Kind(k)),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Msg(Msg),
    Bytes(Kind, Vec<u8>),
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.len() + 1 > MAX_FRAME {
        return Err(ProtoError::TooLarge(payload.len() + 1));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    head[4] = kind as u8;
    // One write for small frames (one vsock packet), two otherwise.
    if payload.len() <= 4096 {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.extend_from_slice(&head);
        buf.extend_from_slice(payload);
        w.write_all(&buf)?;
    } else {
        w.write_all(&head)?;
        w.write_all(payload)?;
    }
    Ok(())
}

pub fn write_msg(w: &mut impl Write, m: &Msg) -> Result<(), ProtoError> {
    write_frame(w, Kind::Msg, &serde_json::to_vec(m)?)
}

/// The next frame's kind and payload, or `None` at a clean end of stream
/// (between frames).
fn read_raw(r: &mut impl Read) -> Result<Option<(Kind, Vec<u8>)>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Closed
        } else {
            e.into()
        }
    })?;
    let kind = Kind::try_from(buf[0])?;
    buf.remove(0);
    Ok(Some((kind, buf)))
}

/// The next frame, or `None` at a clean end of stream (between frames).
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    Ok(match read_raw(r)? {
        None => None,
        Some((Kind::Msg, buf)) => Some(Frame::Msg(serde_json::from_slice(&buf)?)),
        Some((k, buf)) => Some(Frame::Bytes(k, buf)),
    })
}

/// A connection's first frame, the host's call (the agent's side).
pub fn read_request(r: &mut impl Read) -> Result<Request, ProtoError> {
    match read_raw(r)? {
        Some((Kind::Msg, buf)) => Ok(serde_json::from_slice(&buf)?),
        Some((k, _)) => Err(ProtoError::Unexpected(format!(
            "{k:?} bytes before the call"
        ))),
        None => Err(ProtoError::Closed),
    }
}

/// The first frame of a connection: the host's call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub call: Call,
}

pub fn write_request(w: &mut impl Write, call: Call) -> Result<(), ProtoError> {
    let req = Request { v: VERSION, call };
    write_frame(w, Kind::Msg, &serde_json::to_vec(&req)?)
}

/// Which process a call is about: the pid the agent gave it, or the tag
/// the caller chose when it started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Pid(u32),
    Tag(String),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;
    /// A number is a pid, anything else a tag.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<u32>() {
            Ok(p) => Target::Pid(p),
            Err(_) => Target::Tag(s.to_string()),
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pid(p) => write!(f, "pid {p}"),
            Target::Tag(t) => write!(f, "tag {t:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// A user name or uid (and `:group`/`:gid`), as docker's `-u`.
    pub user: Option<String>,
    /// A PTY of this size (stdout and stderr are then one stream).
    pub tty: Option<WinSize>,
    /// Whether the caller sends stdin; without it the process's stdin is
    /// /dev/null.
    pub stdin: bool,
    /// The process outlives the connection: its output is kept (the last
    /// [`KEEP_OUTPUT`] bytes) until someone attaches.
    pub detach: bool,
    pub tag: Option<String>,
    /// Run it inside a container's root filesystem (containerd's shim):
    /// users, groups and the working directory are the container's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<InRoot>,
}

/// Where and how a container's process runs: chrooted into `root` (a
/// directory of the guest, where the host shared the container's root
/// filesystem), with the guest's /proc, /sys and /dev bound into it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InRoot {
    pub root: String,
    /// The supplementary groups as given (an OCI process's
    /// `additionalGids`), instead of those /etc/group lists.
    pub groups: Option<Vec<u32>>,
    pub rlimits: Vec<Rlimit>,
    /// The container's hostname (a UTS namespace of its own per process).
    pub hostname: Option<String>,
    /// Guest paths bound into the root (the container's mounts of host
    /// directories and files, from its pod's directory).
    pub binds: Vec<Bind>,
    /// The container's cgroup (under the guest's `/sys/fs/cgroup/banger/`),
    /// which its processes join as they start.
    pub cgroup: Option<String>,
    /// tmpfs mounts of its spec (`/run`, say).
    pub tmpfs: Vec<Tmpfs>,
    /// The root read-only (the spec's `root.readonly`), once its mount
    /// points are made.
    pub readonly: bool,
}

/// A tmpfs at `target` inside a container's root: `options` among
/// nosuid, nodev, noexec, ro, rw, strictatime, relatime, `size=` and
/// `mode=` (others are refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tmpfs {
    pub target: String,
    pub options: Vec<String>,
}

/// Whether a tmpfs option is one the agent takes.
pub fn tmpfs_option_ok(o: &str) -> bool {
    let value_ok =
        |v: &str| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_alphanumeric());
    matches!(
        o,
        "nosuid" | "nodev" | "noexec" | "ro" | "rw" | "strictatime" | "relatime"
    ) || o.strip_prefix("size=").is_some_and(value_ok)
        || o.strip_prefix("mode=").is_some_and(value_ok)
}

/// A container's limits ([`Call::Limit`]): what is `None` is left as it
/// is; 0 lifts a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub memory_max: Option<u64>,
    /// CFS quota and period, in microseconds.
    pub cpu_max: Option<(u64, u64)>,
}

/// What a container's cgroup uses ([`Msg::Cgroup`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupSample {
    pub memory_bytes: u64,
    /// 0: no limit.
    pub memory_max: u64,
    pub cpu_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub pids: u64,
}

/// A container's cgroup name: 1 to 64 of `[a-z0-9-]`.
pub fn check_cgroup_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cgroup {:?}: 1 to 64 lowercase letters, digits or '-'",
            name.chars().take(64).collect::<String>()
        ))
    }
}

impl InRoot {
    /// Everything that can be checked without the guest's files: the
    /// root and the binds' paths absolute and normal, the hostname a
    /// hostname, the rlimits known and consistent, and few of each.
    pub fn check_shape(&self) -> Result<(), String> {
        if !container_path(&self.root) || self.root.trim_end_matches('/').is_empty() {
            return Err(format!(
                "container root {:?}: an absolute path other than /, without . or ..",
                self.root
            ));
        }
        if self.binds.len() > MAX_BINDS {
            return Err(format!("container: over {MAX_BINDS} mounts"));
        }
        for b in &self.binds {
            let root = b.target.trim_end_matches('/').is_empty();
            if !container_path(&b.source) || !container_path(&b.target) || root {
                return Err(format!(
                    "container mount {:?} on {:?}: absolute paths without . or .., not /",
                    b.source, b.target
                ));
            }
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                return Err(format!(
                    "container hostname {:?}: 1 to 64 letters, digits, '-', '.' or '_'",
                    h.chars().take(64).collect::<String>()
                ));
            }
        }
        if let Some(c) = &self.cgroup {
            check_cgroup_name(c)?;
        }
        if self.tmpfs.len() > MAX_BINDS {
            return Err(format!("container: over {MAX_BINDS} tmpfs mounts"));
        }
        for t in &self.tmpfs {
            if !container_path(&t.target) || t.target.trim_end_matches('/').is_empty() {
                return Err(format!(
                    "container tmpfs on {:?}: an absolute path without . or .., not /",
                    t.target
                ));
            }
            if let Some(o) = t.options.iter().find(|o| !tmpfs_option_ok(o)) {
                return Err(format!(
                    "container tmpfs on {}: option {:?} is not taken (nosuid, nodev, noexec, \
                     ro, rw, size=, mode=)",
                    t.target,
                    o.chars().take(32).collect::<String>()
                ));
            }
        }
        if self.rlimits.len() > MAX_RLIMITS {
            return Err(format!("container: over {MAX_RLIMITS} rlimits"));
        }
        for r in &self.rlimits {
            rlimit_resource(&r.kind).ok_or_else(|| {
                format!(
                    "container: unknown rlimit {:?}",
                    r.kind.chars().take(32).collect::<String>()
                )
            })?;
            if r.soft > r.hard {
                return Err(format!(
                    "container: {} soft limit {} over its hard limit {}",
                    r.kind, r.soft, r.hard
                ));
            }
        }
        Ok(())
    }
}

/// A path in a container: absolute, without empty, `.` or `..` parts (a
/// trailing / aside), nor NUL.
fn container_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains('\0')
        && p.trim_end_matches('/')
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The resource number of an OCI rlimit's name (`RLIMIT_NOFILE`).
pub fn rlimit_resource(kind: &str) -> Option<u32> {
    use nix::libc;
    let n = match kind {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    // The constants are c_uint on glibc and c_int on musl.
    #[allow(clippy::unnecessary_cast)]
    Some(n as u32)
}

/// A guest path bound at `target` inside a container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// At most this many binds per container.
pub const MAX_BINDS: usize = 32;

/// A resource limit, as an OCI process's `rlimits` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE` and the like.
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

/// At most this many rlimits (there are 16 kinds).
pub const MAX_RLIMITS: usize = 16;

/// How much output a detached process keeps for a later attach.
pub const KEEP_OUTPUT: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// Answered by [`Msg::Pong`].
    Ping,
    /// [`Msg::Started`], then stdin frames one way and stdout/stderr frames
    /// the other, [`Msg::CloseStdin`]/[`Msg::Signal`]/[`Msg::Resize`] from
    /// the host, and [`Msg::Exited`] at the end. A detached exec answers
    /// `Started` and `Done`.
    Exec(ExecSpec),
    /// Joins a process started earlier: its kept output, then live, as an
    /// exec.
    Attach {
        target: Target,
    },
    /// [`Msg::Processes`].
    Ps,
    /// Input for a process, without attaching: stdin frames then `Done`
    /// from the host (or `CloseStdin`); answered by `Done`.
    Input {
        target: Target,
    },
    Signal {
        target: Target,
        signal: i32,
    },
    /// Resizes a process's PTY, without attaching (what another client
    /// streams it is not disturbed); answered by `Done`.
    Resize {
        target: Target,
        size: WinSize,
    },
    /// A tar stream of `path` (a file or a tree, named by its last
    /// component) as Data frames, then `Done`.
    GetTar {
        path: String,
    },
    /// Unpacks the tar stream that follows (Data frames, then `Done`) into
    /// the directory `dir`; modes and times are kept.
    PutTar {
        dir: String,
    },
    Stat {
        path: String,
    },
    List {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
        parents: bool,
    },
    Move {
        from: String,
        to: String,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    /// [`Msg::Event`]s until the host closes the connection.
    Watch {
        path: String,
        recursive: bool,
        /// Each event carries the stat of what it is about, where it
        /// still exists.
        #[serde(default)]
        entries: bool,
        /// A path on a network filesystem (NFS, CIFS/SMB, FUSE, so
        /// virtio-fs too), whose events may never come, is refused
        /// unless this is set.
        #[serde(default)]
        network_mounts: bool,
    },
    /// Makes `meta` the file's whole metadata (see [`META_PREFIX`]): the
    /// keys it lacks are removed. Answered with the file's [`Msg::Stat`].
    SetMeta {
        path: String,
        meta: BTreeMap<String, String>,
    },
    /// [`Msg::Stats`].
    Stats,
    /// Sets a container's cgroup limits ([`InRoot::cgroup`]); `Done`.
    Limit {
        cgroup: String,
        limits: Limits,
    },
    /// [`Msg::Cgroup`]: what a container's cgroup uses.
    CgroupStats {
        cgroup: String,
    },
    /// Signals every process of a container's cgroup (0: none, only the
    /// list); [`Msg::Pids`] of those it had.
    CgroupSignal {
        cgroup: String,
        signal: i32,
    },
    /// A container deleted: every process of its cgroup killed, the
    /// cgroup removed once empty (2 s at most), and what the agent mounted
    /// in its root unmounted; `Done`.
    ContainerGone {
        root: String,
        cgroup: String,
    },
    /// Writes the guest's dirty pages to its disks (`sync`), before the
    /// host kills a VM whose volumes must keep what it wrote.
    Sync,
    /// Sets the guest's realtime clock.
    SetClock {
        unix_ns: u64,
    },
    /// Re-identifies a running guest (a restored snapshot's clone); opens
    /// the gate a [`Call::Hold`] closed.
    SetIdentity(Identity),
    /// A snapshot is about to be taken: until [`Call::Release`] or
    /// [`Call::SetIdentity`], the agent answers only `Ping`, `SetClock`,
    /// `Sync`, `Hold`, `Release` and `SetIdentity` (a clone restored from
    /// the snapshot wakes up held, and runs nothing for anyone before it
    /// has its own identity).
    Hold,
    /// Opens the gate of [`Call::Hold`] (the VM snapshotted goes on as
    /// itself; a suspended VM resumed).
    Release,
    /// `Done` once something listens on TCP `port` in the guest (sshd), or
    /// an error after `timeout_ms`.
    WaitListen {
        port: u16,
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    pub hostname: Option<String>,
    /// `(address/prefix, gateway)` for eth0, replacing what it had.
    pub address: Option<(String, String)>,
    /// The sshd host key pair (OpenSSH private key, public line).
    pub host_key: Option<(String, String)>,
    /// eth0's MAC address (`02:..`, lowercase): a clone on a shared
    /// network must not answer ARP with its template's.
    pub mac: Option<String>,
    /// `/etc/resolv.conf`'s nameservers (IPv4, at most 3).
    pub nameservers: Option<Vec<String>>,
    /// root's `authorized_keys` (public key lines).
    pub authorized_keys: Option<String>,
    /// `/etc/machine-id` (32 lowercase hex digits).
    pub machine_id: Option<String>,
    /// Random bytes from the host (32 to 512), credited to the guest's
    /// entropy pool and its CRNG reseeded with them: clones of one
    /// snapshot would otherwise draw the same "random" numbers.
    pub entropy: Option<Vec<u8>>,
    /// The new boot id the daemon's readiness checks look for (hex).
    pub boot_id: Option<String>,
}

/// The largest `authorized_keys` an identity may carry.
pub const MAX_AUTHORIZED_KEYS: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub tag: Option<String>,
    pub argv: Vec<String>,
    pub tty: bool,
    pub detached: bool,
    /// Unix seconds.
    pub started: u64,
    pub exit: Option<ExitStatus>,
    pub attached: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell's convention (and docker's): the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub path: String,
    /// "file", "dir", "symlink" or "other".
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
    pub link: Option<String>,
    /// Its metadata (see [`META_PREFIX`]; the prefix taken off).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// The names of its owner and group in the guest's /etc/passwd and
    /// /etc/group, where they have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Jiffies (USER_HZ) summed over the CPUs: busy and total.
    pub cpu_busy: u64,
    pub cpu_total: u64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub load: [f64; 3],
    pub uptime_secs: f64,
    pub processes: u32,
    /// The page cache (`Cached:`), and the root filesystem's size and
    /// free bytes (0 from an agent older than these fields).
    #[serde(default)]
    pub mem_cached_kib: u64,
    #[serde(default)]
    pub disk_total_bytes: u64,
    #[serde(default)]
    pub disk_free_bytes: u64,
}

/// Loads are compared as values (never NaN: parsed from /proc).
impl Eq for GuestStats {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    Error {
        message: String,
    },
    Pong {
        version: u32,
        boot_id: String,
        hostname: String,
    },
    /// The agent's first words on the hello port.
    Hello {
        version: u32,
        boot_id: String,
    },
    Started {
        pid: u32,
    },
    Exited(ExitStatus),
    CloseStdin,
    Signal {
        signal: i32,
    },
    Resize(WinSize),
    Processes {
        list: Vec<ProcInfo>,
    },
    Stat(FileStat),
    Entries {
        list: Vec<FileStat>,
    },
    Event {
        path: String,
        /// "create", "modify", "remove", "rename", "attrib".
        kind: String,
        /// The stat of `path`, when asked for and it still exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<Box<FileStat>>,
    },
    Stats(GuestStats),
    Cgroup(CgroupSample),
    Pids {
        list: Vec<u32>,
    },
    Done,
}

impl Msg {
    pub fn error(message: impl std::fmt::Display) -> Msg {
        Msg::Error {
            message: message.to_string(),
        }
    }
}

/// Reads the next control message, skipping nothing: bytes where a
/// message is expected are a protocol error.
pub fn read_msg(r: &mut impl Read) -> Result<Msg, ProtoError> {
    match read_frame(r)? {
        Some(Frame::Msg(Msg::Error { message })) => Err(ProtoError::Remote(message)),
        Some(Frame::Msg(m)) => Ok(m),
        Some(Frame::Bytes(k, _)) => Err(ProtoError::Unexpected(format!("{k:?} bytes"))),
        None => Err(ProtoError::Closed),
    }
}

/// A writer that sends what is written as frames of `kind` (at most
/// [`CHUNK`] bytes each): a tar stream, a file.
pub struct FrameWriter<W: Write> {
    inner: W,
    kind: Kind,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, kind: Kind) -> Self {
        FrameWriter {
            inner,
            kind,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Flushes and gives the connection back.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            write_frame(&mut self.inner, self.kind, &self.buf).map_err(io::Error::other)?;
            self.buf.clear();
        }
        self.inner.flush()
    }
}

/// A reader of Data frames up to a `Done` message (its end of file); an
/// `Error` message or any other frame is an error.
pub struct FrameReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// Reads to the end (so the `Done` is consumed) and gives the
    /// connection back.
    pub fn finish(mut self) -> io::Result<R> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.inner)
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match read_frame(&mut self.inner).map_err(io::Error::other)? {
                Some(Frame::Bytes(Kind::Data, b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Frame::Msg(Msg::Done)) => self.done = true,
                Some(Frame::Msg(Msg::Error { message })) => {
                    return Err(io::Error::other(ProtoError::Remote(message)))
                }
                Some(other) => {
                    return Err(io::Error::other(ProtoError::Unexpected(format!(
                        "{other:?}"
                    ))))
                }
                None => return Err(io::Error::other(ProtoError::Closed)),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_garbage() {
        let mut b = Vec::new();
        write_request(&mut b, Call::Ping).unwrap();
        write_frame(&mut b, Kind::Stdout, b"\x00\xffbinary").unwrap();
        write_msg(
            &mut b,
            &Msg::Exited(ExitStatus {
                code: Some(3),
                signal: None,
            }),
        )
        .unwrap();
        let mut r = &b[..];
        assert_eq!(read_request(&mut r).unwrap().call, Call::Ping);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Bytes(Kind::Stdout, b"\x00\xffbinary".to_vec()))
        );
        assert!(matches!(read_msg(&mut r).unwrap(), Msg::Exited(s) if s.shell_code() == 3));
        assert_eq!(read_frame(&mut r).unwrap(), None, "clean end");

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 1, 9][..]),
            Err(ProtoError::Kind(9))
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 9, 2][..]),
            Err(ProtoError::Closed)
        ));
        assert!(write_frame(&mut Vec::new(), Kind::Data, &vec![0; MAX_FRAME]).is_err());
    }

    #[test]
    fn data_streams_through_frames() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut w = FrameWriter::new(Vec::new(), Kind::Data);
        w.write_all(&data).unwrap();
        let mut wire = w.finish().unwrap();
        write_msg(&mut wire, &Msg::Done).unwrap();
        write_msg(
            &mut wire,
            &Msg::Pong {
                version: 1,
                boot_id: "b".into(),
                hostname: "h".into(),
            },
        )
        .unwrap();
        let mut r = FrameReader::new(&wire[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        let mut rest = r.finish().unwrap();
        assert!(
            matches!(read_msg(&mut rest).unwrap(), Msg::Pong { .. }),
            "nothing read past Done"
        );

        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Data, b"abc").unwrap();
        write_msg(&mut wire, &Msg::error("disk full")).unwrap();
        let e = FrameReader::new(&wire[..])
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
    }

    #[test]
    fn targets_parse() {
        assert_eq!("42".parse::<Target>().unwrap(), Target::Pid(42));
        assert_eq!("web".parse::<Target>().unwrap(), Target::Tag("web".into()));
    }
}
