//! The `dm-snapshot` strategy, the seeds' design, where device-mapper
//! exists: one read-only loop device per base image, shared by its VMs
//! (BaseLoop); a sparse COW file per VM (made at create, kept across
//! stop/start: the snapshot is persistent) on its own loop device
//! (COWLoop); a `snapshot` target named from the VM's short id (DMName,
//! DMDev), which the VMM opens as its root disk.
//!
//! The kernel objects exist while the VM runs: [`DmSnapshot`] is a START
//! resource. Their names live in the handle cache and handles.json, never
//! in SQLite; when those are lost they are found again from the kernel
//! (the dm name from the VM's id, the loops by backing file). Both loops
//! are detached lazily right after the snapshot takes them (the kernel
//! then sets autoclear), so they vanish with the snapshot's removal even
//! if the daemon is gone by then: a loop device never outlives its VM.
//! Teardown removes the snapshot, then any loop an interrupted activation
//! left, and tolerates every object being gone already.
//!
//! Loop devices are driven with `losetup` and device-mapper with
//! `dmsetup`, behind [`DeviceMapper`]; this machine's kernel has no
//! device-mapper, so its tests run the real loop devices against a
//! recording fake that checks every table as the kernel would, and the
//! test on the real `dmsetup` says by name that it did not run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_core::layout::vmfiles;
use banger_core::{ImageRecord, Release, RootDiskKind, VmHandles, VmRecord};
use banger_host::cmd::{self, CmdError};
use banger_host::fsutil::WrapIo;

use crate::daemon::lock;
use crate::error::{DaemonError, Result};
use crate::host::Host;
use crate::resources::{held, Acq, End, Item, Resource};

/// The snapshot's chunk: 4 KiB, in 512-byte sectors.
pub const CHUNK_SECTORS: u64 = 8;

/// How long `dmsetup remove --retry` may keep retrying a busy device.
const DMSETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether this host has device-mapper.
pub fn available() -> bool {
    Path::new("/dev/mapper/control").exists() && cmd::which("dmsetup").is_some()
}

/// The device-mapper operations the strategy needs.
pub trait DeviceMapper: Send + Sync {
    /// Creates and resumes device `name` with a one-line `table`.
    fn create(&self, name: &str, table: &str) -> Result<()>;
    /// Removes device `name`, which must exist.
    fn remove(&self, name: &str) -> Result<()>;
    fn exists(&self, name: &str) -> Result<bool>;
}

/// The real device-mapper, through `dmsetup`.
#[derive(Debug)]
pub struct Dmsetup;

impl DeviceMapper for Dmsetup {
    fn create(&self, name: &str, table: &str) -> Result<()> {
        cmd::run("dmsetup", ["create", name, "--table", table])?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        cmd::run_with(
            "dmsetup",
            ["remove", "--retry", name],
            None,
            DMSETUP_TIMEOUT,
        )?;
        Ok(())
    }

    fn exists(&self, name: &str) -> Result<bool> {
        // `dmsetup ls`: "NAME\t(MAJ:MIN)" per device, or "No devices found".
        let out = cmd::run("dmsetup", ["ls"])?;
        Ok(out
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name)))
    }
}

/// The snapshot's name: banger's prefix and the VM's short id (an id is
/// 32 hex digits, so nothing in it needs escaping).
pub fn dm_name(vm_id: &str) -> String {
    format!("banger-{}", &vm_id[..vm_id.len().min(12)])
}

/// The COW file's size for an image: every chunk of the origin rewritten,
/// plus the exception store's metadata (16 bytes per 4 KiB chunk) and its
/// header. Sparse: it takes what the guest writes.
pub fn cow_bytes(image_bytes: u64) -> u64 {
    image_bytes + image_bytes / 128 + (1 << 20)
}

/// Makes the VM's empty COW file (at create); returns its path.
pub fn make_cow(vm_dir: &Path, img: &ImageRecord) -> Result<PathBuf> {
    let path = vm_dir.join(vmfiles::ROOT_COW);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_path("create", &path)?;
    f.set_len(cow_bytes(img.rootfs_bytes))
        .with_path("size", &path)?;
    Ok(path)
}

/// A loop device as `losetup --list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDev {
    pub name: String,
    pub read_only: bool,
}

/// The loop devices backed by `file`.
pub fn loops_of(file: &Path) -> Result<Vec<LoopDev>> {
    let out = cmd::run(
        "losetup",
        [
            "--list".as_ref(),
            "--noheadings".as_ref(),
            "--output".as_ref(),
            "NAME,RO".as_ref(),
            "--associated".as_ref(),
            file.as_os_str(),
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.to_string();
            Some(LoopDev {
                name,
                read_only: w.next() == Some("1"),
            })
        })
        .collect())
}

fn attach(file: &Path, read_only: bool) -> Result<String> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
    if read_only {
        args.push("--read-only".as_ref());
    }
    args.push(file.as_os_str());
    let dev = cmd::run("losetup", args)?.trim().to_string();
    if !dev.starts_with("/dev/loop") {
        return Err(DaemonError::Invalid(format!(
            "losetup attached {} as {dev:?}, not a loop device",
            file.display()
        )));
    }
    Ok(dev)
}

/// Detaches `dev`; while something holds it the kernel only marks it
/// autoclear. One that is gone already counts as detached.
fn detach(dev: &str) -> Result<()> {
    match cmd::run("losetup", ["--detach", dev]) {
        Ok(_) => Ok(()),
        Err(CmdError::Failed { stderr, .. }) if stderr.contains("No such device") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A block device's size in 512-byte sectors, from sysfs.
pub fn sectors(dev: &str) -> Result<u64> {
    let base = dev.rsplit('/').next().unwrap_or(dev);
    let path = PathBuf::from(format!("/sys/class/block/{base}/size"));
    let text = std::fs::read_to_string(&path).with_path("read", &path)?;
    text.trim()
        .parse()
        .map_err(|_| DaemonError::Invalid(format!("{}: not a size: {text:?}", path.display())))
}

/// Whether anything in the kernel (a dm device) holds `dev`.
fn has_holders(dev: &str) -> bool {
    let base = dev.rsplit('/').next().unwrap_or(dev);
    std::fs::read_dir(format!("/sys/class/block/{base}/holders"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Sets up the snapshot `name` of `image` with its COW store `cow`,
/// recording each object in `h` as soon as it exists. Callers hold the
/// daemon's dm lock (the base loop is shared).
pub fn activate(
    dm: &dyn DeviceMapper,
    image: &Path,
    cow: &Path,
    name: &str,
    h: &mut VmHandles,
) -> Result<()> {
    let base = match loops_of(image)?.into_iter().find(|l| l.read_only) {
        Some(l) => l.name,
        None => attach(image, true)?,
    };
    h.base_loop = Some(base.clone());
    let cow_loop = attach(cow, false)?;
    h.cow_loop = Some(cow_loop.clone());
    let table = format!(
        "0 {} snapshot {base} {cow_loop} P {CHUNK_SECTORS}",
        sectors(&base)?
    );
    dm.create(name, &table)?;
    h.dm_name = Some(name.to_string());
    h.dm_dev = Some(format!("/dev/mapper/{name}"));
    detach(&cow_loop)?;
    detach(&base)?;
    Ok(())
}

/// Tears down what [`activate`] made (all of it or part): the snapshot,
/// then loops of the COW file, then the image's read-only loops nothing
/// holds any more. Callers hold the dm lock.
pub fn deactivate(dm: &dyn DeviceMapper, image: &Path, cow: &Path, name: &str) -> Result<()> {
    if dm.exists(name)? {
        dm.remove(name)?;
    }
    for l in loops_of(cow)? {
        detach(&l.name)?;
    }
    for l in loops_of(image)? {
        if l.read_only && !has_holders(&l.name) {
            detach(&l.name)?;
        }
    }
    Ok(())
}

/// The START resource holding the snapshot's kernel objects.
#[derive(Debug)]
pub struct DmSnapshot;

fn paths(host: &Host<'_>, vm: &VmRecord) -> Result<(PathBuf, PathBuf)> {
    let img = host.image(&vm.spec.image)?;
    Ok((
        img.rootfs,
        host.cfg.layout.vm_dir(&vm.id).join(vmfiles::ROOT_COW),
    ))
}

impl Resource for DmSnapshot {
    fn name(&self) -> &'static str {
        "dm_snapshot"
    }

    fn gives(&self) -> &'static [crate::resources::Handoff] {
        &[crate::resources::Handoff::DmDevice]
    }

    fn needs(&self) -> &'static [crate::resources::Handoff] {
        &[crate::resources::Handoff::RootDisk]
    }

    fn used(&self, vm: &VmRecord) -> bool {
        vm.spec.root_disk() == RootDiskKind::DmSnapshot
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        if !self.used(cx.vm) {
            return Ok(());
        }
        let cow = host.cfg.layout.vm_dir(&cx.vm.id).join(vmfiles::ROOT_COW);
        let _l = lock(host.dm_lock);
        activate(
            &Dmsetup,
            &cx.img.rootfs,
            &cow,
            &dm_name(&cx.vm.id),
            &mut cx.handles,
        )
    }

    /// Cascade: the handles, else the kernel (the dm name follows from the
    /// VM's id; loops are found by backing file at release).
    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        if vm.spec.root_disk() != RootDiskKind::DmSnapshot {
            return None;
        }
        let (image, cow) = paths(host, vm).ok()?;
        let name = h.dm_name.clone().unwrap_or_else(|| dm_name(&vm.id));
        let there = h.dm_name.is_some()
            || h.cow_loop.is_some()
            || Dmsetup.exists(&name).unwrap_or(true)
            || loops_of(&cow).map(|l| !l.is_empty()).unwrap_or(true);
        there.then_some(Item::DmSnapshot(held::DmSnapshot { name, image, cow }))
    }

    /// The snapshot goes now if the VMM is gone (stop), else after it is
    /// (delete's release waits for the VMM first).
    fn end(&self, host: &Host<'_>, r: &VmRecord, held: Item, how: End) -> Result<Option<Item>> {
        let Item::DmSnapshot(h) = &held else {
            return Err(crate::resources::mismatch(self, &r.name, &held));
        };
        if !how.wait_vmm {
            return Ok(Some(held));
        }
        match release_held(host, h) {
            Ok(()) => Ok(None),
            Err(e) => {
                tracing::warn!(vm = %r.name, err = %e, "dm-snapshot teardown failed; retried after the reply");
                Ok(Some(held))
            }
        }
    }

    fn release(&self, host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::DmSnapshot(held) = held else {
            return Err(crate::resources::mismatch(self, &r.vm_name, held));
        };
        release_held(host, held).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "dm_snapshot",
            reason: e.to_string(),
        })
    }
}

fn release_held(host: &Host<'_>, held: &held::DmSnapshot) -> Result<()> {
    let _l = lock(host.dm_lock);
    deactivate(&Dmsetup, &held.image, &held.cow, &held.name)
}

#[cfg(test)]
#[path = "dm_tests.rs"]
mod tests;
