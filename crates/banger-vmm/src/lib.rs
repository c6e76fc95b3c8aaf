//! The VMM trait and its drivers.
//!
//! A driver turns a [`VmConfig`] (kernel, initrd, command line, disks, one
//! tap, sizes, console log, API socket) into a running VMM process, and asks
//! that process for a clean guest shutdown. Everything else (taps, disks,
//! records, readiness) is the daemon's, so the Firecracker driver fits the
//! same trait: the Firecracker driver's `spawn` starts `firecracker --api-sock <api_sock>` and
//! issues PUT /machine-config, /boot-source, /drives/{id},
//! /network-interfaces/{id}, /actions InstanceStart; its `request_shutdown`
//! is PUT /actions SendCtrlAltDel, which is exactly what the QEMU driver does
//! through QMP `send-key`.

use std::path::PathBuf;

use banger_core::VmmKind;
use thiserror::Error;

pub mod firecracker;
pub mod jailer;
pub mod qemu;
pub mod qmp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub id: String,
    pub path: PathBuf,
    /// "raw" or "qcow2" (QEMU only; Firecracker takes raw).
    pub format: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
    /// A descriptor attached to the tap (`banger_host::tap::open_queue`),
    /// which the caller keeps open until `spawn` returns: the VMM gets it
    /// instead of opening `/dev/net/tun` (QEMU only).
    pub fd: Option<i32>,
    /// The MTU the guest's NIC is told (QEMU's `host_mtu`), where it is
    /// not Ethernet's 1500 (a containerd pod's network).
    pub mtu: Option<u32>,
}

/// Everything a VMM needs to boot one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The first disk is the root disk (/dev/vda).
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// The guest's serial console goes here (the VM's LogPath).
    pub console_log: PathBuf,
    /// The VMM's own stdout/stderr.
    pub vmm_log: PathBuf,
    /// QMP for QEMU, the REST API socket for Firecracker. The process is
    /// later found by this path in its command line.
    pub api_sock: PathBuf,
    pub vsock: Option<Vsock>,
    /// Host directories over virtio-fs (QEMU only).
    pub shares: Vec<FsShare>,
    /// Who the VMM runs as and the cgroups it starts in.
    pub confine: banger_host::confine::Confinement,
    /// Firecracker only: start it through its jailer (`jailer`); the
    /// API socket and the vsock socket above are then inside the chroot.
    pub jail: Option<jailer::JailSpec>,
    /// QEMU only: the guest's RAM is this file, given as a descriptor the
    /// VMM inherits and mapped shared (`memory-backend-file,share=on`), so
    /// that a snapshot copies it instead of streaming it; the caller keeps
    /// it open until `spawn` returns.
    pub ram_fd: Option<i32>,
    /// A restore instead of a boot: QEMU waits for a saved device state
    /// (`-incoming defer`, then [`qmp::load_state`]); Firecracker stays
    /// bare, configured by nothing, for [`firecracker::load_snapshot`].
    pub incoming: bool,
}

/// A `vhost-user-fs` device: its backend's (virtiofsd's) socket and the
/// tag the guest mounts it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    pub tag: String,
    pub socket: PathBuf,
}

/// A virtio-vsock device with Firecracker's host side (hybrid vsock): the
/// host connects to `uds_path` and writes `CONNECT <port>`; the guest's
/// connections to host port P arrive on `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vsock {
    pub cid: u32,
    pub uds_path: PathBuf,
    /// QEMU only: the socket of the agent channel's host process, which
    /// serves `uds_path` (Firecracker's hybrid-vsock interface): with
    /// `serial`, `banger-vport` behind a virtio-serial port; else
    /// `vhost-device-vsock`, the vhost-user backend of a vsock device.
    pub backend: PathBuf,
    /// QEMU only: the channel is a virtio-serial port (which a snapshot
    /// keeps), not a vsock device.
    pub serial: bool,
}

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("start {vmm} for vm {vm:?}: {source}")]
    Spawn {
        vmm: String,
        vm: String,
        source: std::io::Error,
    },
    #[error("{vmm} for vm {vm:?}: {path}: {source}")]
    Io {
        vmm: String,
        vm: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api socket {path}: {detail}")]
    Api { path: PathBuf, detail: String },
    #[error("confine {vmm} for vm {vm:?}: {source}")]
    Confine {
        vmm: String,
        vm: String,
        source: banger_host::confine::ConfineError,
    },
    #[error("{vmm} cannot run vm {vm:?}: {detail}")]
    Config {
        vmm: String,
        vm: String,
        detail: String,
    },
}

/// A spawned VMM.
#[derive(Debug)]
pub struct VmmProcess {
    pub pid: i32,
    /// Present when this process spawned it (reaped by the daemon); absent
    /// for a VMM found again after a daemon restart.
    pub child: Option<std::process::Child>,
}

pub trait Vmm: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> VmmKind;
    /// "kvm" or "tcg".
    fn accel(&self) -> &str;
    /// Starts the VMM; returns once the process exists (not once the guest
    /// booted: readiness is the daemon's to detect).
    fn spawn(&self, cfg: &VmConfig) -> Result<VmmProcess, VmmError>;
    /// Asks the guest to power off cleanly (Ctrl-Alt-Del).
    fn request_shutdown(&self, api_sock: &std::path::Path) -> Result<(), VmmError>;
}
