//! The host resources a VM holds, one module each, under one contract
//! (CNI's ADD/DEL, the seeds' capabilities):
//!
//! - `acquire` makes the resource for the VM and records what it made (on
//!   the runtime, in the handles) before anything else can fail;
//! - `held` says what the resource holds for a VM now, from its sources of
//!   truth in cascade (handle cache and scratch file, then the durable
//!   runtime, then the OS), or nothing;
//! - `end` is the part of the release done before a request answers; it
//!   returns what is left to release after the reply (recorded in the
//!   store as a [`Held`] item of a [`Release`]), or nothing;
//! - `release` does that rest, after the reply or at the next daemon
//!   start. It must succeed on a half-done acquire and on a resource that
//!   is already gone.
//!
//! [`CREATE`] lists what `create` acquires, [`START`] what `start`
//! acquires, in order; teardown walks them backwards. A new resource is a
//! module and a line in one of them: lifecycle, reconcile and release code
//! do not change.

use std::path::{Path, PathBuf};

use banger_core::api::Event;
use banger_core::{Held, ImageRecord, Release, VmHandles, VmRecord};
use banger_host::fsutil;
use serde_json::{json, Value};

use crate::daemon::Daemon;
use crate::error::Result;

pub mod address;
pub mod dns;
pub mod firewall;
pub mod host_key;
pub mod initrd;
pub mod jail;
pub mod ports;
pub mod root_disk;
pub mod tap;
pub mod virtiofs;
pub mod vm_dir;
pub mod vmm;
pub mod volumes;
pub mod vsock;
pub mod work_disk;

/// What a VM's create holds, in the order it is acquired.
pub const CREATE: &[&dyn Resource] = &[
    &address::Address,
    &vm_dir::VmDir,
    &root_disk::RootDisk,
    &work_disk::WorkDisk,
    &host_key::HostKey,
];

/// What a VM's boot holds, in the order it is acquired; the guest is then
/// waited for (`readiness`).
pub const START: &[&dyn Resource] = &[
    &tap::Tap,
    &dns::Dns,
    &volumes::Volumes,
    &root_disk::dm::DmSnapshot,
    &initrd::Initrd,
    // Before every process of the VM: they start in its cgroup, as its user.
    &jail::Jail,
    &vsock::Vsock,
    &virtiofs::Virtiofs,
    &vmm::VmmProcess,
    &ports::Ports,
    // Last: it starts `nft` on a thread, which competes for the CPU.
    &firewall::Firewall,
];

/// The module of a recorded item.
pub fn by_name(name: &str) -> Option<&'static dyn Resource> {
    // Records of older daemons call the firewall "nat".
    let name = if name == "nat" { "firewall" } else { name };
    CREATE
        .iter()
        .chain(START.iter())
        .find(|r| r.name() == name)
        .copied()
}

/// How a teardown ends things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// Wait for the VMM's exit before answering (stop, kill, rollback): the
    /// VM's disks must not be shared with a dying VMM. `delete` does not
    /// wait (the release waits instead: freeing a GiB of guest memory
    /// costs the kernel milliseconds nobody needs to wait for).
    pub wait_vmm: bool,
    /// The VM is going away for good (delete, a failed create).
    pub deleting: bool,
}

/// Work that an acquire started and that finishes while the guest boots
/// (NAT's `nft` runs): joined before the VM counts as started, and before
/// any rollback.
pub type Background = (&'static str, std::thread::JoinHandle<Result<u64>>);

/// What acquiring steps share.
pub struct Acq<'a> {
    pub vm: &'a mut VmRecord,
    pub img: &'a ImageRecord,
    pub handles: VmHandles,
    pub events: &'a mut dyn FnMut(Event),
    /// This boot's id, carried by the guest's ready line.
    pub boot_id: String,
    /// The per-VM initrd (initrd's, for the VMM).
    pub initrd: Option<PathBuf>,
    /// The guest's nameserver (dns's, for the initrd): banger's listener on
    /// its gateway, or none (the host's resolvers).
    pub nameserver: Option<std::net::SocketAddr>,
    /// Where the guest agent says hello (vsock's, for `readiness`).
    pub hello: Option<std::os::unix::net::UnixListener>,
    pub background: Vec<Background>,
}

impl std::fmt::Debug for Acq<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acq")
            .field("vm", &self.vm.name)
            .field("handles", &self.handles)
            .finish_non_exhaustive()
    }
}

pub trait Resource: Sync + std::fmt::Debug {
    /// The name items of this resource are recorded under.
    fn name(&self) -> &'static str;

    /// The phase name `--timings` reports for its acquire.
    fn phase(&self) -> &'static str {
        self.name()
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()>;

    fn held(&self, d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value>;

    /// The default ends nothing before the reply: all of it is released
    /// after.
    fn end(&self, d: &Daemon, vm: &VmRecord, held: Value, how: End) -> Result<Option<Value>> {
        let _ = (d, vm, how);
        Ok(Some(held))
    }

    fn release(&self, d: &Daemon, r: &Release, held: &Value) -> Result<()>;

    /// Whether a failed `end` stops the teardown (a VMM that survives
    /// SIGKILL still uses the VM's tap and disks: nothing after it may be
    /// released). Other failures are recorded and retried after the reply.
    fn blocks_teardown(&self) -> bool {
        false
    }

    /// Takes up again, for a VM reconcile keeps running, what lived in the
    /// previous daemon's process (listeners); kernel objects need nothing.
    fn adopt(&self, d: &Daemon, vm: &VmRecord) -> Result<()> {
        let _ = (d, vm);
        Ok(())
    }
}

/// An item for `resource` (a teardown's deferred work).
pub fn item(resource: &dyn Resource, data: Value) -> Held {
    Held {
        resource: resource.name().to_string(),
        data,
    }
}

/// For resources that are files: the paths that exist, if any.
pub fn files_held(paths: &[PathBuf]) -> Option<Value> {
    let there: Vec<&Path> = paths
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    (!there.is_empty()).then(|| json!({ "paths": there }))
}

/// Removes the files `files_held` listed; gone ones count as removed.
pub fn remove_files(held: &Value) -> Result<()> {
    for p in held["paths"].as_array().into_iter().flatten() {
        if let Some(p) = p.as_str() {
            fsutil::remove_file_if_exists(Path::new(p))?;
        }
    }
    Ok(())
}

/// Removes files right away; a failure is left for the release to retry.
pub fn end_files(vm: &VmRecord, held: Value) -> Result<Option<Value>> {
    match remove_files(&held) {
        Ok(()) => Ok(None),
        Err(e) => {
            tracing::warn!(vm = %vm.name, err = %e, "removing files failed; retried after the reply");
            Ok(Some(held))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_found_by_its_name_once() {
        let names: Vec<&str> = CREATE
            .iter()
            .chain(START.iter())
            .map(|r| r.name())
            .collect();
        for n in &names {
            assert_eq!(names.iter().filter(|m| *m == n).count(), 1, "{n}");
            assert_eq!(by_name(n).map(|r| r.name()), Some(*n));
        }
        assert!(by_name("no-such-thing").is_none());
        assert_eq!(by_name("nat").map(|r| r.name()), Some("firewall"));
    }

    #[test]
    fn files_are_held_while_they_exist() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        assert!(files_held(&[a.clone(), b.clone()]).is_none());
        std::fs::write(&a, "x").unwrap();
        let held = files_held(&[a.clone(), b]).unwrap();
        remove_files(&held).unwrap();
        assert!(!a.exists());
        remove_files(&held).unwrap();
    }
}
