//! The host resources a VM holds, one module each, under one contract
//! (CNI's ADD/DEL, the seeds' capabilities):
//!
//! - `acquire` makes the resource for the VM and records what it made (on
//!   the runtime, in the handles) before anything else can fail;
//! - `held` says what the resource holds for a VM now, from its sources of
//!   truth in cascade (handle cache and scratch file, then the durable
//!   runtime, then the OS), or nothing;
//! - `end` is the part of the release done before a request answers; it
//!   returns what is left to release after the reply (a typed
//!   [`held::Item`], recorded in the store as an item of a [`Release`]),
//!   or nothing;
//! - `release` does that rest, after the reply or at the next daemon
//!   start. It must succeed on a half-done acquire and on a resource that
//!   is already gone.
//!
//! [`CREATE`] lists what `create` acquires, [`START`] what `start`
//! acquires, in order; teardown walks them backwards. A new resource is a
//! module and a line in one of them: lifecycle, reconcile and release code
//! do not change.
//!
//! Every method works in a [`Host`], the daemon's narrow context (the
//! store, the resources' own states, the host objects' locks), never the
//! `Daemon` itself.

use std::path::PathBuf;

use banger_core::api::Event;
use banger_core::{ImageRecord, Release, VmHandles, VmRecord};
use banger_host::fsutil;

pub use held::Item;

use crate::error::Result;
use crate::host::Host;

pub mod address;
pub mod backend;
pub mod dns;
pub mod firewall;
pub mod held;
pub mod host_key;
pub mod initrd;
pub mod jail;
pub mod ports;
pub mod ram;
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
    &ram::Ram,
    &vmm::VmmProcess,
    &ports::Ports,
    // Last: it starts `nft` on a thread, which competes for the CPU.
    &firewall::Firewall,
];

/// What one acquire hands the acquires after it (on the runtime, the
/// handles or a field of [`Acq`]), or the boot's wait after them: each
/// resource names what it gives and what it needs, and the lists' order
/// is checked against them (a reordering that starts a resource before
/// what it uses fails a test, not a boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// `runtime.guest_ip`: the VM's /30.
    GuestAddress,
    /// The VM's directory and runtime directory.
    VmDir,
    /// `runtime.system_overlay`: the root disk (or its upper layer).
    RootDisk,
    /// `runtime.work_disk_path`.
    WorkDisk,
    /// The guest's SSH host key, in the VM's dir.
    HostKey,
    /// `handles.tap_device` (and `runtime.tap_device`).
    Tap,
    /// [`Acq::nameserver`]: what the guest resolves through.
    Nameserver,
    /// The VM's named volumes, attached to it alone.
    Volumes,
    /// `handles.dm_name`: the root disk's dm device.
    DmDevice,
    /// [`Acq::initrd`]: the VM's initramfs.
    Initrd,
    /// `handles.cgroup_dirs` and the VMM's identity: where every process
    /// of the VM starts.
    Confinement,
    /// `runtime.vsock_cid`/`vsock_path` and [`Acq::hello`].
    Vsock,
    /// `handles.virtiofsd`: the mounts' sockets.
    Mounts,
    /// `runtime.ram_path`: the guest's RAM as a file of its own (or none).
    Ram,
    /// `handles.pid`: the VMM.
    Vmm,
    /// [`Acq::background`]: work the boot's wait joins.
    Background,
}

/// What the boot waits for after the acquires (`readiness`, `lifecycle`).
pub const BOOT_NEEDS: &[Handoff] = &[Handoff::Vsock, Handoff::Vmm, Handoff::Background];

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

    /// What this acquire hands the ones after it.
    fn gives(&self) -> &'static [Handoff] {
        &[]
    }

    /// What this acquire uses of the ones before it.
    fn needs(&self) -> &'static [Handoff] {
        &[]
    }

    /// Whether `vm` needs this resource at all (volumes when it has some):
    /// an acquire for a VM that does not is nothing, and reports no phase
    /// (the spinner names only the work that ran).
    fn used(&self, _vm: &VmRecord) -> bool {
        true
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()>;

    /// What the resource holds for `vm` now: its own variant of [`Item`].
    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item>;

    /// The default ends nothing before the reply: all of it is released
    /// after.
    fn end(&self, host: &Host<'_>, vm: &VmRecord, held: Item, how: End) -> Result<Option<Item>> {
        let _ = (host, vm, how);
        Ok(Some(held))
    }

    /// Releases `held`, an item of this resource's variant (the dispatch
    /// in `releases.rs` goes by variant; another is [`mismatch`]).
    fn release(&self, host: &Host<'_>, r: &Release, held: &Item) -> Result<()>;

    /// Whether a failed `end` stops the teardown (a VMM that survives
    /// SIGKILL still uses the VM's tap and disks: nothing after it may be
    /// released). Other failures are recorded and retried after the reply.
    fn blocks_teardown(&self) -> bool {
        false
    }

    /// Takes up again, for a VM reconcile keeps running, what lived in the
    /// previous daemon's process (listeners); kernel objects need nothing.
    fn adopt(&self, host: &Host<'_>, vm: &VmRecord) -> Result<()> {
        let _ = (host, vm);
        Ok(())
    }
}

/// The error for an item handed to a resource that is not its own (a bug:
/// `releases.rs` dispatches by variant).
pub fn mismatch(res: &dyn Resource, vm: &str, held: &Item) -> crate::error::DaemonError {
    crate::error::DaemonError::Release {
        vm: vm.to_string(),
        resource: res.name(),
        reason: format!("handed a {:?} item", held.resource()),
    }
}

/// For resources that are files: the paths that exist, if any.
pub fn files_held(paths: &[PathBuf]) -> Option<held::Files> {
    let there: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .cloned()
        .collect();
    (!there.is_empty()).then_some(held::Files { paths: there })
}

/// Removes the files listed; gone ones count as removed.
pub fn remove_files(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        fsutil::remove_file_if_exists(p)?;
    }
    Ok(())
}

/// Removes files right away; a failure is left for the release to retry.
pub fn end_files(vm: &VmRecord, held: Item) -> Result<Option<Item>> {
    let paths = match &held {
        Item::RootDisk(f)
        | Item::WorkDisk(f)
        | Item::HostKey(f)
        | Item::Initrd(f)
        | Item::Ram(f) => &f.paths,
        _ => return Ok(Some(held)),
    };
    match remove_files(paths) {
        Ok(()) => Ok(None),
        Err(e) => {
            tracing::warn!(vm = %vm.name, err = %e, "removing files failed; retried after the reply");
            Ok(Some(held))
        }
    }
}

/// Releases the files of a files resource's item.
pub fn release_files(res: &dyn Resource, r: &Release, held: &Item) -> Result<()> {
    match held {
        Item::RootDisk(f)
        | Item::WorkDisk(f)
        | Item::HostKey(f)
        | Item::Initrd(f)
        | Item::Ram(f) => remove_files(&f.paths),
        other => Err(mismatch(res, &r.vm_name, other)),
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

    /// Every resource needs only what one before it in CREATE then START
    /// gives, and the boot's wait finds what it needs given.
    #[test]
    fn the_lists_hand_each_resource_what_it_needs() {
        let mut given: Vec<Handoff> = Vec::new();
        for r in CREATE.iter().chain(START.iter()) {
            for n in r.needs() {
                assert!(
                    given.contains(n),
                    "{} needs {n:?}, which nothing before it gives",
                    r.name()
                );
            }
            for g in r.gives() {
                assert!(!given.contains(g), "{g:?} is given twice");
                given.push(*g);
            }
        }
        for n in BOOT_NEEDS {
            assert!(given.contains(n), "the boot needs {n:?}");
        }
        assert_eq!(given.len(), 16, "every handoff has a giver: {given:?}");
    }

    #[test]
    fn files_are_held_while_they_exist() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        assert!(files_held(&[a.clone(), b.clone()]).is_none());
        std::fs::write(&a, "x").unwrap();
        let held = files_held(&[a.clone(), b]).unwrap();
        assert_eq!(held.paths, vec![a.clone()]);
        remove_files(&held.paths).unwrap();
        assert!(!a.exists());
        remove_files(&held.paths).unwrap();
    }
}
