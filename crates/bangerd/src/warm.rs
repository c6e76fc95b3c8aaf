//! Warm starts: a `vm run` (or `vm create`) of an image and sizes booted
//! before restores a snapshot of that freshly booted guest instead of
//! booting it.
//!
//! The first VM of a key boots cold and, once its guest has said hello
//! and before it is handed over (nothing of the user's has run in it
//! yet), is snapshotted as `warm.<key>` (`snapshots`, the same files and
//! checks as `vm snapshot`; a hundred or so milliseconds of that one
//! start). The key hashes everything that shapes a freshly booted guest:
//! the image (its record's time, kernel, initramfs and root filesystem
//! files), the sizes, `--root-size`, the VMM and its binary, the
//! accelerator, the root-disk strategy, the guest agent's binary, this
//! banger's version, and whose VM it is (a snapshot holds what the guest
//! had in memory: one user's warm starts never restore another's guest).
//! A change to any of them is another key; the old entry is no longer
//! found, and goes when its image is removed or rebuilt, when the cache
//! is over its bound (`--warm-cache`, least recently used first), or at
//! the daemon's start if this build cannot restore it.
//!
//! A warm clone is a clone like any other (`vm create --from`): its own
//! name, address, MAC, host key, machine id and entropy, applied by the
//! guest agent before the VM is handed over.
//!
//! What has no warm start: `--cold`, `--from`, `--mount` and `--volume`
//! VMs, Firecracker VMs without its jailer, a QEMU guest without its
//! agent on the virtio-serial port or without a RAM file (`snapshots`
//! says why), and a daemon with `--warm-cache 0`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_core::sizing::Sizing;
use banger_core::{ImageRecord, RootDiskKind, VmmKind, WarmSave};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::access::Caller;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

pub use banger_core::WARM_PREFIX as PREFIX;

pub fn is_warm(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// What a new VM does about warm starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: it cannot have one, or was asked not to.
    None,
    /// It restores this cached snapshot instead of booting.
    Restore(String),
    /// It boots, and leaves this snapshot once up.
    Save(WarmSave),
}

/// What shapes a freshly booted guest, besides its image.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub sizing: Sizing,
    pub root_mib: Option<u64>,
    pub vmm: VmmKind,
    pub accel: &'a str,
    pub root_disk: RootDiskKind,
}

/// A file as the key sees it: its path, size and modification time (an
/// absent file is a stamp too).
fn stamp(p: Option<&Path>) -> String {
    match p.map(|p| (p, std::fs::metadata(p))) {
        Some((p, Ok(m))) => format!(
            "{}:{}:{}.{}",
            p.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Some((p, Err(_))) => format!("{}:-", p.display()),
        None => "-".into(),
    }
}

/// The cache key of a guest of `img` shaped by `shape`, booted for `uid`
/// by this build with these binaries.
pub fn key(
    img: &ImageRecord,
    shape: &Shape<'_>,
    uid: u32,
    vmm_binary: Option<&Path>,
    agent: Option<&Path>,
) -> String {
    let parts = [
        "banger-warm-v1".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
        banger_agent::mux::VERSION.to_string(),
        img.name.clone(),
        img.created_at.to_string(),
        img.kernel_version.clone(),
        stamp(Some(&img.kernel)),
        stamp(Some(&img.initrd)),
        stamp(Some(&img.rootfs)),
        img.rootfs_bytes.to_string(),
        format!(
            "{}:{}:{}",
            shape.sizing.cpus, shape.sizing.memory_mib, shape.sizing.disk_mib
        ),
        format!("{:?}", shape.root_mib),
        shape.vmm.to_string(),
        shape.accel.to_string(),
        shape.root_disk.to_string(),
        stamp(vmm_binary),
        stamp(agent),
        uid.to_string(),
    ];
    let mut h = Sha256::new();
    for p in &parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes a snapshot's files take on disk.
fn disk_use(s: &banger_core::SnapshotRecord) -> u64 {
    s.files
        .iter()
        .filter_map(|f| std::fs::metadata(s.dir.join(&f.name)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// When a snapshot was last used (its directory's modification time,
/// set at each restore).
fn last_used(s: &banger_core::SnapshotRecord) -> i64 {
    std::fs::metadata(&s.dir)
        .map(|m| m.mtime())
        .unwrap_or(s.created_at)
}

impl Daemon {
    /// At create, the image locked: whether the new VM restores a warm
    /// snapshot, leaves one, or neither.
    pub(crate) fn warm_plan(
        &self,
        req: &banger_core::api::CreateVm,
        img: &ImageRecord,
        shape: &Shape<'_>,
        caller: &Caller,
    ) -> Plan {
        // Only a cache: what goes wrong here makes a cold start.
        self.plan_for(req, img, shape, caller).unwrap_or_else(|e| {
            warn!(err = %e, "warm: no warm start for this VM");
            Plan::None
        })
    }

    fn plan_for(
        &self,
        req: &banger_core::api::CreateVm,
        img: &ImageRecord,
        shape: &Shape<'_>,
        caller: &Caller,
    ) -> Result<Plan> {
        let copyable = crate::snapshots::root_file(shape.root_disk).is_some();
        if self.cfg.warm_cache_mib == 0
            || req.cold
            || req.from.is_some()
            || !req.mounts.is_empty()
            || !req.volumes.is_empty()
            // A pod VM's network is its pod's (`NetPolicy::pod_netns`).
            || req.net.pod_netns.is_some()
            // Firecracker's snapshots need its jailer (`fcsnap`).
            || (shape.vmm == VmmKind::Firecracker && self.cfg.jailer.is_none())
            || !copyable
            // A QEMU restore needs its RAM on the tmpfs (a boot without
            // room goes on without a RAM file, and saves nothing).
            || (shape.vmm == VmmKind::Qemu
                && !crate::resources::ram::room_for(
                    &self.cfg.ram_dir,
                    shape.sizing.memory_mib << 20,
                ))
        {
            return Ok(Plan::None);
        }
        let name = self.warm_name(img, shape, caller.uid);
        // Bound first: the store's guard must be gone before the calls
        // below take it again.
        let found = self.store().snapshot(&name)?;
        // (The key holds the uid; the owner is checked all the same.)
        let theirs = match &found {
            Some(_) => {
                self.store()
                    .owner(banger_store::Owned::Snapshot, &name)?
                    .uid
                    == caller.uid
            }
            None => true,
        };
        if !theirs {
            return Ok(Plan::None);
        }
        match found {
            Some(snap) => match self.clone_source(&name, caller) {
                Ok(_) => {
                    // Used: the last to be evicted.
                    if let Err(e) = std::fs::File::open(&snap.dir)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                    {
                        warn!(snapshot = %name, err = %e, "warm: cannot mark it used");
                    }
                    Ok(Plan::Restore(name))
                }
                Err(e) => {
                    // Not restorable by this build: it goes, and this VM
                    // boots and leaves a new one.
                    warn!(snapshot = %name, err = %e, "warm: dropping a snapshot this build cannot restore");
                    self.drop_warm(&name);
                    Ok(Plan::Save(WarmSave {
                        snapshot: name,
                        uid: caller.uid,
                    }))
                }
            },
            None => {
                self.drop_superseded(&name, &img.name, shape, caller.uid)?;
                Ok(Plan::Save(WarmSave {
                    snapshot: name,
                    uid: caller.uid,
                }))
            }
        }
    }

    /// The name of the warm snapshot of a guest of `img` shaped by
    /// `shape`, for `uid`, with this host's binaries now.
    fn warm_name(&self, img: &ImageRecord, shape: &Shape<'_>, uid: u32) -> String {
        let qemu = banger_host::cmd::which(banger_vmm::qemu::QEMU_BINARY);
        let k = key(img, shape, uid, qemu.as_deref(), self.cfg.agent.as_deref());
        format!("{PREFIX}{k}")
    }

    /// The warm snapshots of the same image name, shape and user as `keep`
    /// under another key go: something that shapes the guest changed (the
    /// image was rebuilt, its kernel replaced, QEMU or the agent upgraded),
    /// and they would never be restored again.
    fn drop_superseded(&self, keep: &str, image: &str, shape: &Shape<'_>, uid: u32) -> Result<()> {
        let stale: Vec<String> = {
            let store = self.store();
            let mut out = Vec::new();
            for s in store.list_snapshots()? {
                let sp = &s.spec;
                let same = is_warm(&s.name)
                    && s.name != keep
                    && sp.image == image
                    && sp.sizing == shape.sizing
                    && sp.root_mib == shape.root_mib
                    && sp.vmm == shape.vmm
                    && sp.accel == shape.accel
                    && sp.root_disk() == shape.root_disk
                    && store.owner(banger_store::Owned::Snapshot, &s.name)?.uid == uid;
                if same {
                    out.push(s.name);
                }
            }
            out
        };
        for s in stale {
            info!(snapshot = %s, "warm: superseded (its image, kernel or binaries changed)");
            self.drop_warm(&s);
        }
        Ok(())
    }

    /// At the end of a first cold boot, before the VM is handed over:
    /// takes its warm snapshot (unless another VM of the key made it
    /// meanwhile), then trims the cache. A failure leaves the VM running
    /// (it is logged, the start goes on), unless the VM was left stopped.
    pub(crate) fn save_warm(
        &self,
        vm: &mut banger_core::VmRecord,
        ws: &WarmSave,
        events: crate::daemon::Events,
    ) -> Result<()> {
        if let Some(why) = crate::snapshots::refusal(&self.host(), vm, true) {
            info!(vm = %vm.name, "warm: no snapshot of this guest: {why}");
            return Ok(());
        }
        // What shapes the guest may have changed since its create (a VM
        // created, then started later): saved only under today's key.
        let img = self.image(&vm.spec.image)?;
        let shape = Shape {
            sizing: vm.spec.sizing,
            root_mib: vm.spec.root_mib,
            vmm: vm.spec.vmm,
            accel: &vm.spec.accel,
            root_disk: vm.spec.root_disk(),
        };
        if self.warm_name(&img, &shape, ws.uid) != ws.snapshot {
            info!(vm = %vm.name, "warm: its image or binaries changed since its create: no snapshot");
            return Ok(());
        }
        let t = crate::daemon::Phase::start("warm-save");
        let made = {
            // Not waited for (the VM's lock is held, and a create that
            // restores this snapshot holds its name then waits for a VM
            // name): a name someone holds is being made or used.
            let Some(_s) = self.snapshot_locks.try_lock(&ws.snapshot) else {
                return Ok(());
            };
            let found = self.store().snapshot(&ws.snapshot)?;
            match found {
                Some(_) => Ok(false),
                None => {
                    let root_only = crate::access::root_only(vm)
                        || crate::access::root_only_data(&self.store(), vm)?;
                    let owner = banger_store::Owner {
                        uid: ws.uid,
                        root_only,
                    };
                    self.take_snapshot(vm, &ws.snapshot, owner, false)
                        .map(|_| true)
                }
            }
        };
        match made {
            Ok(true) => {
                t.done(events);
                self.trim_warm();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) if vm.runtime.paused => Err(e),
            Err(e) => {
                warn!(vm = %vm.name, err = %e, "warm: no warm-start snapshot made; the VM runs on");
                Ok(())
            }
        }
    }

    /// Removes a warm snapshot if nobody holds its name now (tried, never
    /// waited for: a first boot's save and trim run under its VM's lock,
    /// and a create that restores one holds its name, then waits for a
    /// VM's) and nothing waits to restore it; logged otherwise.
    pub(crate) fn drop_warm(&self, name: &str) {
        let Some(_g) = self.snapshot_locks.try_lock(name) else {
            info!(snapshot = %name, "warm: in use, kept for now");
            return;
        };
        match self.remove_snapshot_held(name) {
            Ok(()) => info!(snapshot = %name, "warm: removed"),
            Err(DaemonError::SnapshotNotFound(_)) => {}
            Err(e) => warn!(snapshot = %name, err = %e, "warm: not removed"),
        }
    }

    /// Drops warm snapshots, least recently used first, until the cache
    /// fits its bound; and every one this build cannot restore.
    pub(crate) fn trim_warm(&self) {
        let _g = crate::daemon::lock(&self.warm_lock);
        let mut warm: Vec<_> = match self.store().list_snapshots() {
            Ok(l) => l.into_iter().filter(|s| is_warm(&s.name)).collect(),
            Err(e) => {
                warn!(err = %e, "warm: cannot list the cache");
                return;
            }
        };
        warm.sort_by_cached_key(|s| std::cmp::Reverse(last_used(s)));
        let bound = self.cfg.warm_cache_mib.saturating_mul(1 << 20);
        let mut used = 0u64;
        for s in warm {
            if crate::snapshots::check_record(&s).is_err() {
                self.drop_warm(&s.name);
                continue;
            }
            used += disk_use(&s);
            if used > bound {
                self.drop_warm(&s.name);
            }
        }
    }

    /// The warm snapshots of image `name` go (it is being removed or
    /// rebuilt; the image's lock held).
    pub(crate) fn drop_warm_of_image(&self, image: &str) -> Result<()> {
        let using = self.store().snapshots_using_image(image)?;
        for s in using {
            if is_warm(&s) {
                self.drop_warm(&s);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::testutil::{daemon, vm_with_tap};
    use banger_core::{SnapshotFile, SnapshotRecord};

    /// A warm snapshot of `bytes` on disk, last used at `used` (seconds
    /// since the epoch), as `take_snapshot` records one.
    fn cached(d: &Daemon, key: &str, bytes: usize, used: i64) -> SnapshotRecord {
        let name = format!("{PREFIX}{key}");
        let dir = d.cfg.layout.snapshot_dir(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), vec![1u8; bytes]).unwrap();
        let rec = SnapshotRecord {
            name: name.clone(),
            id: key.into(),
            dir: dir.clone(),
            vm: "a".into(),
            spec: vm_with_tap("i", "a", None).spec,
            format: crate::snapshots::this_format("QEMU 7.2".into()),
            files: vec![SnapshotFile {
                name: "state".into(),
                bytes: bytes as u64,
            }],
            state_crc32: 0,
            created_at: 0,
        };
        d.store()
            .insert_snapshot(&rec, banger_store::Owner::default())
            .unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(used as u64);
        std::fs::File::open(&dir).unwrap().set_modified(t).unwrap();
        rec
    }

    fn names(d: &Daemon) -> Vec<String> {
        let mut n: Vec<String> = d
            .store()
            .list_snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        n.sort();
        n
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_within_its_bound() {
        let t = tempfile::tempdir().unwrap();
        let mut d = daemon(t.path());
        d.cfg.warm_cache_mib = 2;
        let old = cached(&d, "a0", 900 << 10, 100);
        cached(&d, "b0", 900 << 10, 300);
        cached(&d, "c0", 900 << 10, 200);
        // Another build's: dropped whatever its age.
        let mut other = cached(&d, "d0", 4096, 400);
        other.format.banger = "0.0.1".into();
        d.store().delete_snapshot(&other.name).unwrap();
        d.store()
            .insert_snapshot(&other, banger_store::Owner::default())
            .unwrap();
        d.trim_warm();
        assert_eq!(names(&d), vec!["warm.b0", "warm.c0"]);
        assert!(!old.dir.exists(), "an evicted snapshot's files go");
        assert!(!other.dir.exists());
        d.cfg.warm_cache_mib = 0;
        d.trim_warm();
        assert!(names(&d).is_empty());
    }

    fn img(dir: &Path) -> ImageRecord {
        ImageRecord {
            name: "bookworm".into(),
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd"),
            rootfs: dir.join("rootfs.ext4"),
            rootfs_bytes: 1 << 30,
            kernel_version: "6.1".into(),
            created_at: 1,
        }
    }

    #[test]
    fn keys_change_with_whatever_shapes_the_guest() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("initrd"), b"a").unwrap();
        let i = img(d.path());
        let shape = Shape {
            sizing: Sizing {
                cpus: 1,
                memory_mib: 1024,
                disk_mib: 2048,
            },
            root_mib: None,
            vmm: VmmKind::Qemu,
            accel: "tcg",
            root_disk: RootDiskKind::Qcow2,
        };
        let k = key(&i, &shape, 0, None, None);
        assert_eq!(k.len(), 16);
        assert_eq!(k, key(&i, &shape, 0, None, None));
        assert_ne!(k, key(&i, &shape, 1000, None, None));
        let mut s2 = shape;
        s2.sizing.memory_mib = 2048;
        assert_ne!(k, key(&i, &s2, 0, None, None));
        let mut i2 = i.clone();
        i2.created_at = 2;
        assert_ne!(k, key(&i2, &shape, 0, None, None));
        // The initramfs rewritten (another size).
        std::fs::write(d.path().join("initrd"), b"ab").unwrap();
        assert_ne!(k, key(&i, &shape, 0, None, None));
        assert!(banger_core::validate_name(&format!("{PREFIX}{k}")).is_err());
    }
}
