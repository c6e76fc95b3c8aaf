//! The guest's RAM as a file of its own, for a QEMU VM that can be
//! snapshotted (its agent channel on the virtio-serial port, no `--mount`:
//! `pause::qmp_pauses`): a sparse file on tmpfs (`--ram-dir`,
//! /dev/shm/banger), mapped shared by QEMU (`memory-backend-file,share=on`).
//! A snapshot then leaves the RAM out of QEMU's migration stream
//! (`x-ignore-shared`) and copies this file instead (holes kept), and a
//! restore copies a snapshot's RAM into a new one before QEMU maps it.
//!
//! It costs what anonymous memory would: tmpfs pages are allocated as the
//! guest touches them and charged to the VM's cgroup. It is the VM's
//! user's, mode 0600; QEMU, whose private /dev/shm hides the path, gets it
//! as an inherited descriptor (`resources::vmm`). Made at each start,
//! removed at each teardown. When the tmpfs has less room free than the
//! guest's memory, the VM boots without one (it cannot be snapshotted),
//! with a warning: a full tmpfs would kill the guest when it touches a
//! page the tmpfs cannot give.

use std::path::{Path, PathBuf};

use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil::{self, WrapIo};
use tracing::warn;

use super::{end_files, files_held, Acq, End, Item, Resource};
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Ram;

/// The VM's RAM file.
pub fn path(host: &Host<'_>, vm: &VmRecord) -> PathBuf {
    host.cfg.ram_dir.join(&vm.id)
}

/// The RAM dir is in a world-writable place (/dev/shm): what is there
/// under its name and is not root's directory (a user's file, link or
/// directory made first, to stop VMs from starting or to get at their
/// memory) is moved aside, logged, before the daemon makes its own.
pub fn claim_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        m => m.with_path("stat", dir)?,
    };
    if m.is_dir() && m.uid() == 0 {
        return Ok(());
    }
    let aside = dir.with_extension(format!("foreign-{}", crate::daemon::random_hex(4)?));
    warn!(
        dir = %dir.display(),
        uid = m.uid(),
        aside = %aside.display(),
        "the RAM dir's name was taken by something not root's: moved aside"
    );
    std::fs::rename(dir, &aside).with_path("move aside", dir)?;
    Ok(())
}

/// Whether the RAM dir's filesystem (its parent's, before it exists) has
/// room for `bytes` more of a guest's memory ([`available`], less what
/// starts under way reserved).
pub fn room_for(dir: &Path, bytes: u64) -> bool {
    available(dir).saturating_sub(reserved()) >= bytes
}

/// Bytes of the RAM dir's filesystem that no VM may yet take: what is
/// free, less what the sparse RAM files there may still grow by (each
/// file's size less its allocated blocks: a guest touches its memory
/// as it runs, so a tmpfs that had room for every VM at its start may
/// not have it later).
pub fn available(dir: &Path) -> u64 {
    let at = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(dir)
    };
    free_bytes(at).unwrap_or(0).saturating_sub(outstanding(dir))
}

/// What the files in `dir` may still take: each one's size less its
/// allocated blocks.
fn outstanding(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len().saturating_sub(m.blocks() * 512))
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0)
}

/// RAM files being made (counted before they exist, so that two starts
/// at once cannot both take the last room).
static RESERVED: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

fn reserved() -> u64 {
    *RESERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A reservation of `bytes` of the RAM dir, if it has them; given back
/// when dropped (by then the file exists and counts itself).
struct Reservation(u64);

impl Reservation {
    fn take(dir: &Path, bytes: u64) -> Option<Reservation> {
        let mut r = RESERVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (available(dir).saturating_sub(*r) >= bytes).then(|| {
            *r += bytes;
            Reservation(bytes)
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = RESERVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *r = r.saturating_sub(self.0);
    }
}

/// Bytes free for an unprivileged writer on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

impl Resource for Ram {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Ram]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        // The channel decides whether it can be snapshotted; the
        // confinement whose the file is.
        &[super::Handoff::Vsock, super::Handoff::Confinement]
    }

    fn used(&self, vm: &VmRecord) -> bool {
        crate::pause::qmp_pauses(vm)
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        cx.vm.runtime.ram_path = None;
        let restore = match &cx.vm.runtime.restore {
            Some(s) => Some(crate::snapshots::restorable(host, s, cx.vm)?),
            None => None,
        };
        if !self.used(cx.vm) {
            return match restore {
                // Firecracker maps its snapshot's memory file itself.
                Some(_) if cx.vm.spec.vmm == banger_core::VmmKind::Qemu => {
                    Err(DaemonError::Invalid(format!(
                        "vm {:?} cannot restore snapshot {:?}: its agent channel is not the \
                     virtio-serial port (the image's initramfs has no virtio_console, or \
                     banger-vport is missing: `banger doctor`)",
                        cx.vm.name,
                        cx.vm.runtime.restore.as_deref().unwrap_or_default()
                    )))
                }
                _ => Ok(()),
            };
        }
        let dir = &host.cfg.ram_dir;
        {
            // One start at a time claims and makes it (two would move
            // each other's directory aside).
            static CLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _c = CLAIM
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            claim_dir(dir)?;
            fsutil::create_dir_all(dir)?;
            // Root's alone: QEMU reopens its file through the descriptor
            // it inherits (/proc/self/fd), which searches no directory, so
            // no one else can open a file here, not even while a restore
            // fills one before it is handed over.
            fsutil::set_owner_mode(dir, 0, 0, 0o700)?;
        }
        let bytes = cx.vm.spec.sizing.memory_mib << 20;
        let reservation = Reservation::take(dir, bytes);
        if reservation.is_none() {
            let msg = format!(
                "{} has {} MiB its RAM files may not yet take, less than vm {:?}'s {} MiB of \
                 memory",
                dir.display(),
                available(dir).saturating_sub(reserved()) >> 20,
                cx.vm.name,
                bytes >> 20
            );
            if restore.is_some() {
                return Err(DaemonError::Invalid(format!(
                    "{msg}: a restore needs its RAM there; free some, or give the tmpfs more \
                     room (`mount -o remount,size=... {}`)",
                    dir.display()
                )));
            }
            warn!(vm = %cx.vm.name, "{msg}: it boots without a RAM file and cannot be snapshotted");
            return Ok(());
        }
        let file = path(host, cx.vm);
        fsutil::remove_file_if_exists(&file)?;
        // Recorded before it exists: a crash from here on leaves nothing
        // the release does not find.
        cx.vm.runtime.ram_path = Some(file.clone());
        match &restore {
            Some(snap) => fsutil::copy_sparse(
                &snap.dir.join(banger_core::layout::vmfiles::SNAP_RAM),
                &file,
            )?,
            None => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&file)
                    .with_path("create", &file)?;
                f.set_len(bytes).with_path("size", &file)?;
            }
        }
        drop(reservation);
        let id = super::jail::identity(host, cx.vm)?;
        super::jail::hand_over(id.as_ref(), &[&file])?;
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        // The file of a VM's id is its own, whatever the runtime says (a
        // crash between its making and the runtime's save).
        files_held(&[path(host, vm)]).map(Item::Ram)
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        // Unlinked under a running VMM, its pages go when QEMU unmaps them.
        end_files(vm, held)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        super::release_files(self, r, held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_sparse_ram_files_may_still_take_is_not_available() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        assert_eq!(outstanding(t.path()), 0);
        let f = std::fs::File::create(t.path().join("vm")).unwrap();
        f.set_len(64 << 20).unwrap();
        (&f).write_all(&[1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        // 63 MiB not yet touched (the filesystem may allocate a little
        // more than was written).
        let left = outstanding(t.path());
        assert!(
            (62 << 20..=63 << 20).contains(&left),
            "a 64 MiB sparse file with 1 MiB written may take {left} bytes more"
        );
        assert!(available(t.path()) <= free_bytes(t.path()).unwrap());
        // A reservation counts until dropped.
        let r = Reservation::take(t.path(), 1 << 20).expect("room for 1 MiB");
        assert!(reserved() >= 1 << 20);
        drop(r);
        assert!(Reservation::take(t.path(), u64::MAX / 2).is_none());
    }

    #[test]
    fn a_ram_dir_name_someone_else_took_is_moved_aside() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("banger");
        // Nothing there, or root's own directory: left as it is.
        claim_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep"), b"").unwrap();
        claim_dir(&dir).unwrap();
        assert!(dir.join("keep").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        // A link, a file, another user's directory: moved aside.
        std::os::unix::fs::symlink("/etc", &dir).unwrap();
        claim_dir(&dir).unwrap();
        assert!(std::fs::symlink_metadata(&dir).is_err(), "the link went");
        std::fs::write(&dir, b"x").unwrap();
        claim_dir(&dir).unwrap();
        assert!(!dir.exists());
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        claim_dir(&dir).unwrap();
        assert!(!dir.exists());
        let aside: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
        assert!(
            aside
                .iter()
                .any(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == 65534)),
            "another user's directory is kept aside, not deleted"
        );
        assert!(std::fs::metadata("/etc/passwd").is_ok());
    }
}
