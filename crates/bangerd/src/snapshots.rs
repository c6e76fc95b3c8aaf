//! Snapshots: `vm snapshot`, `snapshot ls|show|rm`, and the restore of
//! one into a new VM (`vm create|run --from`), on QEMU and on a jailed
//! Firecracker (its `/snapshot/*` API: `fcsnap`).
//!
//! A snapshot is a directory of files that never change once recorded:
//! - `state`: QEMU's migration stream of the stopped VM, RAM left out
//!   (`x-ignore-shared`: the RAM is a shared file, `resources::ram`), or
//!   Firecracker's microVM state;
//! - `ram`: a sparse copy of that file (Firecracker's memory file);
//! - the root disk's file (the qcow2 overlay of the image, or the raw
//!   copy) and the work disk, copied (reflinks where the state dir has
//!   them) while the VM is stopped, so that memory and disks agree.
//!
//! The row is written last, once every file is synced: a crash before it
//! leaves a directory no row names, which the next daemon's start
//! removes ([`Daemon::sweep_snapshots`]). A VM is stopped (QMP `stop`)
//! for the save and the copies and runs again after, or stays paused; a
//! daemon that dies in between finds `runtime.snapshotting` and runs it
//! again ([`Daemon::finish_snapshotting`]).
//!
//! A clone is a new VM (its own name, address, MAC, tap, host key) whose
//! disks are copies of the snapshot's and whose first start restores it:
//! its RAM file is a copy of the snapshot's, QEMU starts with the same
//! devices and `-incoming defer`, loads `state`, and runs; its new
//! `banger-vport` says hello with a new epoch, which drops the streams the
//! origin had open in the guest; then the guest is given the clone's
//! identity (`identity`: hostname, address, MAC, keys, machine id, boot
//! id, entropy) and clock. Once it ran, the clone is a VM like any other:
//! its next start boots from its disks.
//!
//! What a restore checks, each refused with the fix named: the snapshot's
//! banger and mux versions (a guest agent of another build would be
//! misread), its files and their sizes, the CRC-32 of `state`, QEMU's
//! version and accelerator (QEMU cannot load another's state), and room
//! for the RAM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_agent::proto::{Call, Msg};
use banger_core::api::SnapshotInfo;
use banger_core::layout::vmfiles;
use banger_core::{
    RootDiskKind, SnapshotFile, SnapshotFormat, SnapshotRecord, VmRecord, VmState, VmmKind,
};
use banger_host::fsutil::{self, WrapIo};
use banger_store::{Owned, Owner};
use tracing::{info, warn};

use crate::access::Caller;
use crate::daemon::{random_hex, Daemon};
use crate::error::{DaemonError, Result};
use crate::failpoint::hit;
use crate::host::Host;

/// How long QEMU may take to write or read a device state (a few hundred
/// KiB, plus the ROMs).
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest may take to take its identity.
pub(crate) const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest's agent may take to close or open its gate.
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// The snapshot steps the failpoint test walks (a failure or a crash at
/// each leaves no half snapshot listed and the VM as it was).
pub const FAILPOINTS: &[&str] = &[
    "snapshot.begin",
    "snapshot.stopped",
    "snapshot.created",
    "snapshot.saved",
    "snapshot.copied",
    "restore.loaded",
    "restore.running",
];

/// This build's format: what a snapshot must have been made with.
pub(crate) fn this_format(vmm_version: String) -> SnapshotFormat {
    SnapshotFormat {
        banger: env!("CARGO_PKG_VERSION").to_string(),
        mux: banger_agent::mux::VERSION,
        vmm_version,
    }
}

/// A snapshot's copy of its VM's volume number `i` (in the spec's order).
pub fn volume_file(i: usize) -> String {
    format!("volume-{i}.ext4")
}

/// The file the root disk of a VM of `kind` is, if a snapshot can copy it
/// (the overlay's upper disk: the image under it is read-only and shared).
pub fn root_file(kind: RootDiskKind) -> Option<&'static str> {
    match kind {
        RootDiskKind::Qcow2 => Some(vmfiles::ROOT_DISK),
        RootDiskKind::Reflink | RootDiskKind::Copy => Some(vmfiles::ROOT_RAW),
        RootDiskKind::Overlay => Some(vmfiles::ROOT_UPPER),
        RootDiskKind::DmSnapshot => None,
    }
}

/// Snapshot `name` if it can be restored by this build for `vm`: its
/// files are there at their sizes, its versions are this build's, and
/// `vm` is of its image, sizes and VMM.
pub fn restorable(host: &Host<'_>, name: &str, vm: &VmRecord) -> Result<SnapshotRecord> {
    let snap = host
        .store()
        .snapshot(name)?
        .ok_or_else(|| DaemonError::SnapshotNotFound(name.to_string()))?;
    check_record(&snap)?;
    let (a, b) = (&snap.spec, &vm.spec);
    if a.image != b.image || a.sizing != b.sizing || a.vmm != b.vmm {
        return Err(DaemonError::Invalid(format!(
            "vm {:?} is not of snapshot {name:?}'s image, sizes and VMM",
            vm.name
        )));
    }
    Ok(snap)
}

/// The checks a snapshot passes before anything is made of it.
pub(crate) fn check_record(snap: &SnapshotRecord) -> Result<()> {
    let name = &snap.name;
    let mine = this_format(String::new());
    if snap.format.banger != mine.banger || snap.format.mux != mine.mux {
        return Err(DaemonError::Invalid(format!(
            "snapshot {name:?} was made by banger {} (agent channel v{}); this is banger {} \
             (v{}): its guest cannot be restored by this one. Boot a VM of its image and \
             snapshot it again (`banger snapshot rm {name}`)",
            snap.format.banger, snap.format.mux, mine.banger, mine.mux
        )));
    }
    for f in &snap.files {
        let p = snap.dir.join(&f.name);
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == f.bytes => {}
            Ok(m) => {
                return Err(DaemonError::Invalid(format!(
                    "snapshot {name:?} is damaged: {} is {} bytes, {} when it was made; \
                     `banger snapshot rm {name}`",
                    p.display(),
                    m.len(),
                    f.bytes
                )))
            }
            Err(e) => {
                return Err(DaemonError::Invalid(format!(
                    "snapshot {name:?} is damaged: {}: {e}; `banger snapshot rm {name}`",
                    p.display()
                )))
            }
        }
    }
    Ok(())
}

/// The CRC-32 of a file, read in full.
pub(crate) fn crc32_of(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path).with_path("open", path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).with_path("read", path)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Syncs a file to disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_path("sync", path)?;
    Ok(())
}

/// QMP command `cmd` on VM `name`'s socket `api`, its error naming both.
fn qmp_cmd(name: &str, api: &Path, cmd: &str) -> Result<()> {
    banger_vmm::qmp::execute(api, cmd, None)
        .map(drop)
        .map_err(|e| DaemonError::Invalid(format!("vm {name:?}: QMP {cmd}: {e}")))
}

/// Why a VM cannot be snapshotted, if it cannot: for clones (its disks
/// copied), or (`clones` false) for its own suspend, which keeps its
/// disks and volumes where they are.
pub(crate) fn refusal(host: &Host<'_>, vm: &VmRecord, clones: bool) -> Option<String> {
    let name = &vm.name;
    if let Some(ns) = &vm.spec.net.pod_netns {
        return Some(format!(
            "vm {name:?} is a containerd pod's (its network is pod namespace {}'s): a \
             snapshot would take the pod's address and MAC along",
            ns.display()
        ));
    }
    if vm.spec.vmm == VmmKind::Firecracker {
        return crate::fcsnap::refusal(host, vm).or_else(|| disks_refusal(vm, clones));
    }
    if !vm.spec.mounts.is_empty() {
        return Some(format!(
            "vm {name:?} has --mount shares: QEMU cannot save a VM with virtio-fs devices \
             (vhost-user is not migratable); copy the data in with `banger vm cp` instead"
        ));
    }
    if !vm.runtime.vport {
        return Some(format!(
            "vm {name:?}'s agent channel is not the virtio-serial port (its image was built \
             by an older banger, or banger-vport is missing: `banger doctor`); rebuild the \
             image and restart the VM"
        ));
    }
    if vm.runtime.ram_path.is_none() {
        return Some(format!(
            "vm {name:?}'s RAM is not a file of its own (it booted before banger kept one, or \
             the RAM tmpfs had no room: see the daemon's log); restart it"
        ));
    }
    disks_refusal(vm, clones)
}

/// Why a clone could not have its own copy of the VM's disks, if not.
fn disks_refusal(vm: &VmRecord, clones: bool) -> Option<String> {
    if clones && root_file(vm.spec.root_disk()).is_none() {
        return Some(format!(
            "vm {:?}'s root disk ({}) cannot be copied by a snapshot: create the VM with \
             --root-disk reflink or copy to snapshot it",
            vm.name,
            vm.spec.root_disk()
        ));
    }
    None
}

/// Stops (`run` false) or runs the VM's vCPUs for a save: QMP on QEMU,
/// `PATCH /vm` on Firecracker.
pub(crate) fn set_vcpus(vm: &VmRecord, api: &Path, run: bool) -> Result<()> {
    match vm.spec.vmm {
        VmmKind::Qemu => qmp_cmd(&vm.name, api, if run { "cont" } else { "stop" }),
        VmmKind::Firecracker => if run {
            banger_vmm::firecracker::resume(api)
        } else {
            banger_vmm::firecracker::pause(api)
        }
        .map_err(|e| DaemonError::Invalid(format!("vm {:?}: {e}", vm.name))),
    }
}

impl Daemon {
    /// `vm snapshot NAME [SNAP]`.
    pub fn snapshot_vm(
        &self,
        name: &str,
        snapshot: Option<&str>,
        caller: &Caller,
    ) -> Result<SnapshotInfo> {
        let snap_name = match snapshot {
            Some(s) => {
                banger_core::validate_name(s)
                    .map_err(|e| DaemonError::Invalid(format!("snapshot name {s:?}: {e}")))?;
                s.to_string()
            }
            None => format!("{name}-{}", random_hex(3)?),
        };
        // The snapshot name's lock before the VM's, as a clone's create
        // takes them.
        let _s = self.snapshot_locks.lock(&snap_name);
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        if vm.runtime.state() != VmState::Running {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} is {}: only a running or paused VM can be snapshotted \
                 (`banger vm start {name}`)",
                vm.runtime.state()
            )));
        }
        if let Some(why) = refusal(&self.host(), &vm, true) {
            return Err(DaemonError::Invalid(why));
        }
        if self.store().snapshot(&snap_name)?.is_some() {
            return Err(DaemonError::Invalid(format!(
                "snapshot {snap_name:?} already exists: pick another name or `banger snapshot \
                 rm {snap_name}`"
            )));
        }
        if vm.runtime.api_sock_path.is_none() {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} has no API socket: restart it"
            )));
        }
        if !self.vm_alive(&vm) {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?}: its VMM is not running (`banger vm ls` shows what became of it)"
            )));
        }
        let root_only =
            crate::access::root_only(&vm) || crate::access::root_only_data(&self.store(), &vm)?;
        self.take_snapshot(
            &mut vm,
            &snap_name,
            Owner {
                uid: caller.uid,
                root_only,
            },
            false,
        )?;
        self.snapshot_info(&snap_name)
    }

    /// Snapshots `vm` (running or stopped for its start, its lock and the
    /// snapshot name's held, the name free) as `snap_name` of `owner`: the
    /// VM goes on as it was (or is recorded paused if it cannot). With
    /// `suspend` (`vm pause --to-disk`), only its state and RAM are saved
    /// (its disks stay its own) and, once the row is written, it is left
    /// stopped and recorded `snapshotting` for the caller to end.
    pub(crate) fn take_snapshot(
        &self,
        vm: &mut VmRecord,
        snap_name: &str,
        owner: Owner,
        suspend: bool,
    ) -> Result<()> {
        let name = vm.name.clone();
        let api = vm.runtime.api_sock_path.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {name:?} has no API socket: restart it"))
        })?;
        let id = random_hex(16)?;
        let dir = self.cfg.layout.snapshot_dir(&id);
        let was_paused = vm.runtime.paused;
        // Recorded first: a crash from here on has the next daemon run
        // the VM again and open its agent's gate (`finish_snapshotting`).
        vm.runtime.snapshotting = true;
        self.save(vm)?;
        // The guest's agent closes its gate: what is restored of this
        // moment runs nothing for anyone before it has an identity.
        if let Err(e) = self.hold_guest(vm, &api, was_paused) {
            // (A hold whose answer was lost may have been taken.)
            self.release_guest(vm);
            vm.runtime.snapshotting = false;
            let _ = self.save(vm);
            return Err(e);
        }
        let t0 = Instant::now();
        let made = Ok(())
            .and_then(|()| fsutil::create_dir_all(&dir).map_err(Into::into))
            .and_then(|()| fsutil::set_owner_mode(&dir, 0, 0, 0o700).map_err(Into::into))
            .and_then(|()| self.save_files(vm, &api, &dir, was_paused, !suspend));
        // A save cut short may still stream: cancelled before the VM runs
        // again (its end would stop the VM once more).
        if made.is_err() && vm.spec.vmm == VmmKind::Qemu {
            let _ = banger_vmm::qmp::execute(&api, "migrate_cancel", None);
        }
        let rec = made.map(|(files, crc, vmm_version)| SnapshotRecord {
            name: snap_name.to_string(),
            id,
            dir: dir.clone(),
            vm: vm.name.clone(),
            spec: vm.spec.clone(),
            format: this_format(vmm_version),
            files,
            state_crc32: crc,
            created_at: banger_core::unix_now(),
        });
        if suspend {
            // Recorded, it stays stopped for its suspend; else it runs.
            let inserted = rec.and_then(|r| Ok(self.store().insert_snapshot(&r, owner)?));
            if let Err(e) = inserted {
                let _ = fsutil::remove_dir_all_if_exists(&dir);
                let _ = self.run_again(vm, &api, was_paused);
                return Err(e);
            }
            info!(vm = %name, snapshot = %snap_name, ms = t0.elapsed().as_millis() as u64, "state saved for a suspend");
            return Ok(());
        }
        // The VM goes on as it was, whatever happened.
        let resumed = self.run_again(vm, &api, was_paused);
        let rec = match rec.and_then(|r| resumed.map(|()| r)) {
            Ok(r) => r,
            Err(e) => {
                let _ = fsutil::remove_dir_all_if_exists(&dir);
                return Err(e);
            }
        };
        if let Err(e) = self.store().insert_snapshot(&rec, owner) {
            let _ = fsutil::remove_dir_all_if_exists(&dir);
            return Err(e.into());
        }
        info!(vm = %name, snapshot = %snap_name, ms = t0.elapsed().as_millis() as u64, "snapshot made");
        Ok(())
    }

    /// A VM stopped for a save runs again (a paused one for a moment too:
    /// after a save QEMU has handed its disks over (inactive), and only
    /// `cont` takes them back; its agent's gate opens only while it
    /// runs), its agent's gate opened; recorded, as paused if it cannot
    /// run.
    pub(crate) fn run_again(&self, vm: &mut VmRecord, api: &Path, was_paused: bool) -> Result<()> {
        let resumed = set_vcpus(vm, api, true).and_then(|()| {
            self.release_guest(vm);
            if was_paused {
                set_vcpus(vm, api, false)
            } else {
                Ok(())
            }
        });
        vm.runtime.snapshotting = false;
        if resumed.is_err() {
            // Stopped still: recorded as paused, for `vm resume`.
            vm.runtime.paused = true;
        }
        let saved = self.save(vm);
        resumed.and(saved)
    }

    /// Closes the guest agent's gate ([`Call::Hold`]) before a save; a
    /// paused VM runs for the moment of the call. Refused, nothing done,
    /// when the agent does not take it.
    fn hold_guest(&self, vm: &VmRecord, api: &Path, was_paused: bool) -> Result<()> {
        let name = &vm.name;
        let mut running = vm.clone();
        running.runtime.paused = false;
        if was_paused {
            set_vcpus(vm, api, true)?;
        }
        let held = match self.agent_call(&running, Call::Hold, HOLD_TIMEOUT) {
            Ok(Msg::Done) => Ok(()),
            Ok(other) => Err(DaemonError::Invalid(format!(
                "vm {name:?}: its guest agent did not take the hold a snapshot needs ({}): an \
                 agent of an older banger? restart the VM",
                banger_core::text::escape_control(&format!("{other:?}"), false)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))),
            Err(e) => Err(e),
        };
        if was_paused {
            set_vcpus(vm, api, false)?;
        }
        held
    }

    /// Opens the guest agent's gate again (the VM snapshotted goes on as
    /// itself; a suspended one resumed), retried while its channel comes
    /// back; a failure is logged (its agent then refuses calls until the
    /// VM restarts).
    pub(crate) fn release_guest(&self, vm: &VmRecord) {
        let mut running = vm.clone();
        running.runtime.paused = false;
        let deadline = Instant::now() + HOLD_TIMEOUT;
        let released = self.until_agent_answers(&running, deadline, None, &|left| match self
            .agent_call(&running, Call::Release, left)?
        {
            Msg::Done => Ok(()),
            other => Err(DaemonError::Invalid(format!(
                "vm {:?}: Release answered {other:?}",
                vm.name
            ))),
        });
        if let Err(e) = released {
            warn!(vm = %vm.name, err = %e, "its guest agent's gate stays closed");
        }
    }

    /// The save and the copies, the VM stopped: each file with its size,
    /// the state's CRC-32 and QEMU's version.
    fn save_files(
        &self,
        vm: &VmRecord,
        api: &Path,
        dir: &Path,
        was_paused: bool,
        disks: bool,
    ) -> Result<(Vec<SnapshotFile>, u32, String)> {
        hit("snapshot.begin")?;
        let state = dir.join(vmfiles::SNAP_STATE);
        let (vmm_version, mut copies) = if vm.spec.vmm == VmmKind::Firecracker {
            // Its state and memory files made by Firecracker itself.
            let v = crate::fcsnap::save(&self.host(), vm, api, dir, was_paused)?;
            (v, Vec::new())
        } else {
            let qmp =
                |e: banger_vmm::VmmError| DaemonError::Invalid(format!("vm {:?}: {e}", vm.name));
            let mut session = banger_vmm::qmp::Session::open(api).map_err(qmp)?;
            let vmm_version = banger_vmm::qmp::version(&mut session).map_err(qmp)?;
            drop(session);
            if !was_paused {
                banger_vmm::qmp::execute(api, "stop", None).map_err(qmp)?;
            }
            hit("snapshot.stopped")?;
            let out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&state)
                .with_path("create", &state)?;
            banger_vmm::qmp::save_state(api, &out, Instant::now() + STATE_TIMEOUT).map_err(qmp)?;
            hit("snapshot.created")?;
            out.sync_all().with_path("sync", &state)?;
            drop(out);
            hit("snapshot.saved")?;
            let ram =
                vm.runtime.ram_path.clone().ok_or_else(|| {
                    DaemonError::Invalid(format!("vm {:?} has no RAM file", vm.name))
                })?;
            let copies: Vec<(PathBuf, String)> = vec![(ram, vmfiles::SNAP_RAM.into())];
            (vmm_version, copies)
        };
        let vm_dir = self.cfg.layout.vm_dir(&vm.id);
        let root = root_file(vm.spec.root_disk()).unwrap_or(vmfiles::ROOT_DISK);
        if disks {
            copies.push((vm_dir.join(root), root.into()));
            copies.push((vm_dir.join(vmfiles::WORK_DISK), vmfiles::WORK_DISK.into()));
            // Its volumes, in their order: each clone gets a copy.
            for (i, m) in vm.spec.volumes.iter().enumerate() {
                copies.push((self.cfg.layout.volume(&m.name), volume_file(i)));
            }
        }
        for (from, to) in &copies {
            let to = dir.join(to);
            fsutil::clone_or_copy(from, &to)?;
            sync(&to)?;
        }
        hit("snapshot.copied")?;
        let mut files = Vec::new();
        let made_here = if vm.spec.vmm == VmmKind::Firecracker {
            &[vmfiles::SNAP_STATE, vmfiles::SNAP_RAM][..]
        } else {
            &[vmfiles::SNAP_STATE][..]
        };
        let names = made_here
            .iter()
            .copied()
            .chain(copies.iter().map(|(_, n)| n.as_str()));
        for name in names {
            let p = dir.join(name);
            let bytes = std::fs::metadata(&p).with_path("stat", &p)?.len();
            files.push(SnapshotFile {
                name: name.to_string(),
                bytes,
            });
        }
        sync(dir)?;
        Ok((files, crc32_of(&state)?, vmm_version))
    }

    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        let store = self.store();
        let s = store
            .snapshot(name)?
            .ok_or_else(|| DaemonError::SnapshotNotFound(name.to_string()))?;
        let pending = store.vms_restoring(name)?;
        let owner = store.owner(Owned::Snapshot, name)?;
        Ok(info(&s, pending, owner))
    }

    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let store = self.store();
        let mut out = Vec::new();
        for s in store.list_snapshots()? {
            let pending = store.vms_restoring(&s.name)?;
            let owner = store.owner(Owned::Snapshot, &s.name)?;
            out.push(info(&s, pending, owner));
        }
        Ok(out)
    }

    /// `snapshot rm`: refused while a VM made from it has not started
    /// (its start reads the snapshot). The row goes first: a crash after
    /// it leaves a directory the next start removes.
    pub fn delete_snapshot(&self, name: &str, caller: &Caller) -> Result<()> {
        if let Some(id) = name.strip_prefix(banger_core::SUSPEND_PREFIX) {
            let vms = self.store().list_vms()?;
            let vm = vms.into_iter().find(|v| v.id == id).map(|v| v.name);
            return Err(DaemonError::Invalid(format!(
                "snapshot {name:?} is {}'s saved guest (`vm pause --to-disk`): `banger vm resume` \
                 restores it, `banger vm stop` discards it",
                vm.map(|n| format!("vm {n:?}"))
                    .unwrap_or_else(|| "a suspended VM".into())
            )));
        }
        let _g = self.snapshot_locks.lock(name);
        caller.may_replace(&self.store(), Owned::Snapshot, name, "remove")?;
        self.remove_snapshot_held(name)
    }

    /// Removes snapshot `name` (its name's lock held): refused while a VM
    /// made from it has not started yet. The row goes first: a crash
    /// after it leaves a directory the next start removes.
    pub(crate) fn remove_snapshot_held(&self, name: &str) -> Result<()> {
        let rec = self
            .store()
            .snapshot(name)?
            .ok_or_else(|| DaemonError::SnapshotNotFound(name.to_string()))?;
        let pending = self.store().vms_restoring(name)?;
        if !pending.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "snapshot {name:?} is needed by vm(s) {} made from it, which have not started \
                 yet: start or delete them first",
                pending.join(", ")
            )));
        }
        self.store().delete_snapshot(name)?;
        fsutil::remove_dir_all_if_exists(&rec.dir)?;
        Ok(())
    }

    /// Removes snapshot directories no row names (a save cut short by a
    /// crash): run at the daemon's start.
    pub fn sweep_snapshots(&self) -> Result<()> {
        let ids = self.store().snapshot_ids()?;
        let dir = self.cfg.layout.snapshots_dir();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !ids.contains(&id) {
                info!(dir = %e.path().display(), "reconcile: removing a snapshot cut short");
                if let Err(err) = fsutil::remove_dir_all_if_exists(&e.path()) {
                    warn!(dir = %e.path().display(), err = %err, "reconcile: cannot remove it");
                }
            }
        }
        Ok(())
    }

    /// A VM found stopped for a snapshot a crash cut short runs again
    /// (unless it was paused before), and one recorded suspended has its
    /// VMM ended; called by reconcile for a VM kept running: whether it
    /// still runs.
    pub(crate) fn finish_snapshotting(&self, vm: &mut VmRecord) -> bool {
        if !vm.runtime.snapshotting {
            return true;
        }
        if vm.runtime.suspended {
            info!(vm = %vm.name, "reconcile: finishing a suspend");
            if let Err(e) = self.end_suspended(vm) {
                warn!(vm = %vm.name, err = %e, "reconcile: cannot end a suspended VM's VMM");
            }
            return false;
        }
        if vm.spec.vmm == VmmKind::Firecracker {
            crate::fcsnap::clear_leftovers(&self.host(), vm);
        }
        if let Some(api) = &vm.runtime.api_sock_path {
            if let Err(e) = set_vcpus(vm, api, true) {
                warn!(vm = %vm.name, err = %e, "reconcile: cannot run a VM a snapshot stopped");
                // Stopped still: recorded as paused, for `vm resume`.
                vm.runtime.paused = true;
            } else {
                // Its agent's gate, closed for the save, opens again.
                self.release_guest(vm);
                if vm.runtime.paused {
                    let _ = set_vcpus(vm, api, false);
                }
            }
        }
        vm.runtime.snapshotting = false;
        if let Err(e) = self.save(vm) {
            warn!(vm = %vm.name, err = %e, "reconcile: cannot record the snapshot's end");
        }
        true
    }
}

fn info(s: &SnapshotRecord, pending: Vec<String>, owner: Owner) -> SnapshotInfo {
    use std::os::unix::fs::MetadataExt;
    let disk_bytes = s
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(s.dir.join(&f.name)).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    SnapshotInfo {
        name: s.name.clone(),
        vm: s.vm.clone(),
        image: s.spec.image.clone(),
        vmm: s.spec.vmm,
        cpus: s.spec.sizing.cpus,
        memory_mib: s.spec.sizing.memory_mib,
        disk_bytes,
        dir: s.dir.clone(),
        created_at: s.created_at,
        pending,
        owner: owner.uid,
        root_only: owner.root_only,
    }
}
