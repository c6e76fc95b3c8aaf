//! Firecracker's side of snapshots (`snapshots` has what both VMMs
//! share): its `/snapshot/*` API on a jailed Firecracker.
//!
//! Firecracker reopens a snapshot's drives at the paths it recorded and
//! lets a load override only the taps and the vsock's socket, so clones
//! need the jailer: every VM's chroot holds its drives at the same names
//! (`drive-0`, `drive-1`, ... by position: `banger_vmm::jailer`), and a
//! clone's are its own copies. Without the jailer a snapshot is refused,
//! naming it.
//!
//! - Save: the vCPUs paused (`PATCH /vm`), `PUT /snapshot/create`
//!   (`Full`) into fresh names inside the VM's chroot (Firecracker writes
//!   a memory file that exists in place: a name is never reused), both
//!   files moved into the snapshot's directory and given to root; the
//!   disks are copied by `snapshots` as for QEMU. `GET /version` is
//!   recorded: another Firecracker refuses to load it.
//! - Restore: the snapshot's two files copied (reflinked where the state
//!   dir can) into the clone's chroot, its own (`stage`, before its
//!   Firecracker starts bare), then `PUT /snapshot/load` with the clone's
//!   tap and vsock socket, left paused, resumed by the caller. A failed
//!   load ends that Firecracker (it takes no second one); the start fails
//!   and is rolled back as any other.
//!
//! Firecracker resets the guest's vsock connections at every snapshot (a
//! transport reset event): a `vm exec` running across one ends; the
//! guest's listeners, and so the agent, stay.

use std::path::{Path, PathBuf};

use banger_core::layout::vmfiles;
use banger_core::{SnapshotRecord, VmRecord};
use banger_host::fsutil::{self, WrapIo};
use banger_vmm::firecracker::{self, Load};
use banger_vmm::jailer::{SNAPSHOT_MEM, SNAPSHOT_STATE};

use crate::error::{DaemonError, Result};
use crate::failpoint::hit;
use crate::host::Host;

/// Why a Firecracker VM cannot be snapshotted, if it cannot.
pub(crate) fn refusal(host: &Host<'_>, vm: &VmRecord) -> Option<String> {
    let jailed = crate::resources::jail::chroot(host, vm).is_some_and(|root| {
        vm.runtime
            .api_sock_path
            .as_ref()
            .is_none_or(|api| api.starts_with(&root))
    });
    if jailed {
        // Booted by a banger that named the jail's drives by id: its
        // snapshot would record paths no clone has.
        let root = crate::resources::jail::chroot(host, vm)?;
        if vm.runtime.api_sock_path.is_some() && !root.join("drive-0").exists() {
            return Some(format!(
                "vm {:?} was started by an older banger, whose jail names its disks otherwise: \
                 restart it (`banger vm restart {}`) to snapshot it",
                vm.name, vm.name
            ));
        }
    } else {
        return Some(format!(
            "vm {:?} runs on Firecracker without its jailer: a restored Firecracker reopens the \
             disks at the paths the snapshot recorded, which only a chroot per VM keeps the same \
             for every clone; install Firecracker's jailer (`banger doctor` says where it is \
             looked for) and restart the VM",
            vm.name
        ));
    }
    None
}

fn fc_err(vm: &VmRecord) -> impl Fn(banger_vmm::VmmError) -> DaemonError + '_ {
    move |e| DaemonError::Invalid(format!("vm {:?}: {e}", vm.name))
}

/// The jailed VM's chroot, and the path inside it of `host_path`.
fn chroot(host: &Host<'_>, vm: &VmRecord) -> Result<PathBuf> {
    crate::resources::jail::chroot(host, vm)
        .ok_or_else(|| DaemonError::Invalid(refusal(host, vm).unwrap_or_default()))
}

/// How long Firecracker may take to write a guest's memory and state:
/// a minute, and 20 s per GiB of memory.
fn snapshot_deadline(vm: &VmRecord) -> std::time::Duration {
    std::time::Duration::from_secs(60 + 20 * vm.spec.sizing.memory_mib.div_ceil(1024))
}

/// Saves the VM's state and memory into `dir` (`state`, `ram`), its
/// vCPUs paused (they stay so): Firecracker's version.
pub(crate) fn save(
    host: &Host<'_>,
    vm: &VmRecord,
    api: &Path,
    dir: &Path,
    was_paused: bool,
) -> Result<String> {
    let version = firecracker::version(api).map_err(fc_err(vm))?;
    if !was_paused {
        firecracker::pause(api).map_err(fc_err(vm))?;
    }
    hit("snapshot.stopped")?;
    let root = chroot(host, vm)?;
    // Fresh names (the snapshot's id): Firecracker overwrites a memory
    // file that exists in place.
    let tag = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let made: Vec<(PathBuf, &str)> = vec![
        (
            PathBuf::from(format!("/snapshot-{tag}.state")),
            vmfiles::SNAP_STATE,
        ),
        (
            PathBuf::from(format!("/snapshot-{tag}.mem")),
            vmfiles::SNAP_RAM,
        ),
    ];
    let on_host = |inside: &Path| root.join(inside.strip_prefix("/").unwrap_or(inside));
    let saved = firecracker::create_snapshot(api, &made[0].0, &made[1].0, snapshot_deadline(vm))
        .map_err(fc_err(vm))
        .and_then(|()| hit("snapshot.created"))
        .and_then(|()| {
            for (inside, name) in &made {
                let (from, to) = (on_host(inside), dir.join(name));
                // Moved first into the snapshot's directory (root's,
                // 0700), where the VM's user can no longer change the
                // entry; then it must be a plain file with no other name
                // (not a link a Firecracker gone bad planted to a host
                // file), and it becomes root's: only copies of it reach
                // another VM.
                let adopted = to.with_extension("adopted");
                std::fs::rename(&from, &adopted).with_path("move", &from)?;
                plain_file(vm, &from, &adopted)?;
                if *name == vmfiles::SNAP_STATE {
                    // The state (small) copied into a file of root's: what
                    // its checksum is taken of cannot change after, even
                    // through a descriptor the VMM kept.
                    fsutil::copy_sparse(&adopted, &to)?;
                    fsutil::remove_file_if_exists(&adopted)?;
                } else {
                    std::fs::rename(&adopted, &to).with_path("move", &adopted)?;
                }
                fsutil::set_owner_mode(&to, 0, 0, 0o600)?;
                std::fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .with_path("sync", &to)?;
            }
            Ok(())
        });
    if saved.is_err() {
        for (inside, _) in &made {
            let _ = fsutil::remove_file_if_exists(&on_host(inside));
        }
    }
    saved?;
    hit("snapshot.saved")?;
    Ok(version)
}

/// Refuses (and removes) `to`, moved from the VM's chroot at `from`,
/// unless it is a regular file with one name.
fn plain_file(vm: &VmRecord, from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(to).with_path("stat", to)?;
    if m.file_type().is_file() && m.nlink() == 1 {
        return Ok(());
    }
    // (A link is removed itself, never what it names.)
    let _ = fsutil::remove_file_if_exists(to);
    Err(DaemonError::Invalid(format!(
        "vm {:?}: what its Firecracker left at {} is not a file of its own (a link, or a \
         file with other names): snapshot refused",
        vm.name,
        from.display()
    )))
}

/// Puts the snapshot's state and memory into the clone's chroot (before
/// its Firecracker starts), owned by the clone's VMM user, read-only; the
/// state's copy must match the snapshot's checksum (what is loaded is
/// what was checked).
pub(crate) fn stage(host: &Host<'_>, vm: &VmRecord, snap: &SnapshotRecord) -> Result<()> {
    let root = chroot(host, vm)?;
    fsutil::create_dir_all(&root)?;
    let id = crate::resources::jail::identity(host, vm)?;
    for (from, to) in [
        (vmfiles::SNAP_STATE, SNAPSHOT_STATE),
        (vmfiles::SNAP_RAM, SNAPSHOT_MEM),
    ] {
        let to = root.join(to);
        fsutil::remove_file_if_exists(&to)?;
        fsutil::clone_or_copy(&snap.dir.join(from), &to)?;
        if let Some(id) = &id {
            fsutil::set_owner_mode(&to, id.uid, id.gid, 0o400)?;
        }
    }
    let staged = root.join(SNAPSHOT_STATE);
    if crate::snapshots::crc32_of(&staged)? != snap.state_crc32 {
        return Err(DaemonError::Invalid(format!(
            "snapshot {:?} is damaged: its state does not match its checksum; `banger snapshot \
             rm {}`",
            snap.name, snap.name
        )));
    }
    Ok(())
}

/// What a save cut short (a crash between Firecracker's create and the
/// files' move) left in the VM's chroot: removed.
pub(crate) fn clear_leftovers(host: &Host<'_>, vm: &VmRecord) {
    let Some(root) = crate::resources::jail::chroot(host, vm) else {
        return;
    };
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("snapshot-") && (name.ends_with(".state") || name.ends_with(".mem")) {
            if let Err(err) = fsutil::remove_file_if_exists(&e.path()) {
                tracing::warn!(vm = %vm.name, file = %e.path().display(), err = %err, "a cut-short snapshot's file is left");
            }
        }
    }
}

/// Loads the staged snapshot into the clone's bare Firecracker (its
/// version checked first), with its tap and vsock socket; the microVM is
/// left paused.
pub(crate) fn load(
    host: &Host<'_>,
    vm: &VmRecord,
    snap: &SnapshotRecord,
    api: &Path,
    tap: &str,
) -> Result<()> {
    let version = firecracker::version(api).map_err(fc_err(vm))?;
    if version != snap.format.vmm_version {
        return Err(DaemonError::Invalid(format!(
            "snapshot {:?} was made by Firecracker {}; this host runs Firecracker {version}, \
             which cannot load it: boot a VM of its image and snapshot it again",
            snap.name, snap.format.vmm_version
        )));
    }
    let root = chroot(host, vm)?;
    let inside = |p: &Path| {
        p.strip_prefix(&root)
            .map(|rel| Path::new("/").join(rel))
            .map_err(|_| {
                DaemonError::Invalid(format!(
                    "vm {:?}: {} is outside its jail {}",
                    vm.name,
                    p.display(),
                    root.display()
                ))
            })
    };
    let vsock = vm.runtime.vsock_path.as_deref().map(inside).transpose()?;
    let load = Load {
        state: Path::new("/").join(SNAPSHOT_STATE),
        mem: Path::new("/").join(SNAPSHOT_MEM),
        taps: vec![("eth0".into(), tap.to_string())],
        vsock,
    };
    firecracker::load_snapshot(api, &load, snapshot_deadline(vm)).map_err(|e| {
        let tail =
            crate::readiness::guest_tail(&host.cfg.layout.vm_dir(&vm.id).join(vmfiles::VMM_LOG), 5);
        DaemonError::Invalid(format!(
            "vm {:?}: restoring snapshot {:?}: {e}{}",
            vm.name,
            snap.name,
            if tail.is_empty() {
                String::new()
            } else {
                format!("; Firecracker said: {tail}")
            }
        ))
    })?;
    // Read whole by the load; the memory stays (mapped privately).
    if let Err(e) = fsutil::remove_file_if_exists(&root.join(SNAPSHOT_STATE)) {
        tracing::warn!(vm = %vm.name, err = %e, "the loaded state's copy is left in the jail");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_file_with_one_name_is_taken_from_a_jail() {
        let vm = crate::daemon::testutil::vm_with_tap("1", "fj", None);
        let d = tempfile::tempdir().unwrap();
        let host_file = d.path().join("secret");
        std::fs::write(&host_file, "host's").unwrap();
        let from = Path::new("/snapshot-x.state");
        // A link to a host file: refused, the link gone, the file kept.
        let link = d.path().join("state");
        std::os::unix::fs::symlink(&host_file, &link).unwrap();
        let e = plain_file(&vm, from, &link).unwrap_err().to_string();
        assert!(e.contains("not a file of its own"), "{e}");
        assert!(link.symlink_metadata().is_err());
        assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "host's");
        // Another name of a file: refused too.
        let hard = d.path().join("ram");
        std::fs::hard_link(&host_file, &hard).unwrap();
        assert!(plain_file(&vm, from, &hard).is_err());
        assert!(!hard.exists() && host_file.exists());
        // A file of its own: taken.
        let own = d.path().join("own");
        std::fs::write(&own, "state").unwrap();
        plain_file(&vm, from, &own).unwrap();
        assert!(own.exists());
    }
}
