//! Images: the index the daemon keeps of the finished image dirs, lookups,
//! the in-memory cache of image initramfs, building and deleting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use banger_core::api::{Event, ImageInfo};
use banger_core::ImageRecord;
use banger_guest::image::{self, Recipe, DEFAULT_IMAGE};
use banger_host::fsutil::{self, WrapIo};
use tracing::{info, warn};

use crate::daemon::{lock, Daemon, Events};
use crate::error::{DaemonError, Result};

pub(crate) type InitrdCacheEntry = ((PathBuf, u64, Option<SystemTime>), Arc<Vec<u8>>);

impl Daemon {
    /// Makes the `images` table match the finished image dirs on disk,
    /// after clearing what a build, import or commit that died left
    /// (nothing makes images before the daemon serves): a half-made
    /// `<name>.building` goes; a `<name>.old` moved aside for a rebuild
    /// goes back if the new one never took its place, else goes.
    pub(crate) fn index_images(&self) -> Result<()> {
        let dir = self.cfg.layout.images_dir();
        let entries = || -> Result<Vec<PathBuf>> {
            let mut v = Vec::new();
            for e in std::fs::read_dir(&dir).with_path("read dir", &dir)? {
                v.push(e.with_path("read dir", &dir)?.path());
            }
            Ok(v)
        };
        for path in entries()? {
            let whole = path.with_extension("");
            let r = match path.extension().and_then(|x| x.to_str()) {
                Some("old") if !whole.exists() => {
                    std::fs::rename(&path, &whole).with_path("restore", &whole)
                }
                Some("old" | "building") => fsutil::remove_dir_all_if_exists(&path),
                _ => Ok(()),
            };
            if let Err(err) = r {
                warn!(%err, "cleaning an unfinished image dir");
            }
        }
        let mut found = Vec::new();
        for path in entries()? {
            if path.extension().is_some() {
                continue;
            }
            match image::load(&path) {
                Ok(Some(rec)) => found.push(rec),
                Ok(None) => {}
                Err(err) => warn!(%err, "skipping image dir"),
            }
        }
        let store = self.store();
        for rec in &found {
            store.upsert_image(rec)?;
        }
        for rec in store.list_images()? {
            if !found.iter().any(|f| f.name == rec.name) {
                store.delete_image(&rec.name)?;
            }
        }
        Ok(())
    }

    /// A new image in the index, its files readable by the VMMs' group.
    /// Records a made image. Its owner's row was written before its dir
    /// was renamed into place (`making`): a daemon that dies in between
    /// leaves a dir the next start adopts with the right owner.
    pub(crate) fn add_image(&self, rec: &ImageRecord) -> Result<()> {
        crate::perms::share_image(&self.cfg.layout.image_dir(&rec.name))?;
        self.store().upsert_image(rec)?;
        Ok(())
    }

    /// Runs `make` (which renames the image's dir into place) with the
    /// image's owner recorded first; a failure takes the row back.
    pub(crate) fn making<T>(
        &self,
        name: &str,
        owner: banger_store::Owner,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let before = self.store().owner(banger_store::Owned::Image, name)?;
        self.store()
            .set_owner(banger_store::Owned::Image, name, owner)?;
        let r = make();
        if r.is_err() {
            // The old image (a failed rebuild keeps it) keeps its owner.
            let _ = self
                .store()
                .set_owner(banger_store::Owned::Image, name, before);
        }
        r
    }

    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        self.store().image(name)?.ok_or_else(|| {
            DaemonError::ImageMissing(
                name.to_string(),
                if name == DEFAULT_IMAGE {
                    "run `banger image build`".to_string()
                } else {
                    format!("the image banger can build is {DEFAULT_IMAGE} (`banger image build`); `banger image ls` lists the built ones")
                },
            )
        })
    }

    /// The image's initramfs, read once per image file and kept in memory
    /// (every start appends the VM's config archive to it).
    pub(crate) fn image_initrd(&self, img: &ImageRecord) -> Result<Arc<Vec<u8>>> {
        let meta = std::fs::metadata(&img.initrd).with_path("stat", &img.initrd)?;
        let key = (img.initrd.clone(), meta.len(), meta.modified().ok());
        let mut cache = lock(&self.initrd_cache);
        if let Some((k, bytes)) = cache.as_ref() {
            if *k == key {
                return Ok(bytes.clone());
            }
        }
        let bytes = Arc::new(std::fs::read(&img.initrd).with_path("read", &img.initrd)?);
        *cache = Some((key, bytes.clone()));
        Ok(bytes)
    }

    /// Says so when an image was built by another banger (its guest recipe
    /// differs), with the command that rebuilds it.
    pub(crate) fn warn_if_outdated(&self, img: &ImageRecord, events: Events) {
        if let Some(recipe) = Recipe::default_for(&img.name) {
            if !image::is_current(&img.dir, &recipe) {
                events(Event::Progress {
                    message: format!(
                        "image {} was built by another version of banger (its guest recipe \
                         differs): `banger image build --force` rebuilds it",
                        img.name
                    ),
                });
            }
        }
    }

    /// An image of banger's recipe is root's whoever asked for it (its
    /// files are Debian's, not the caller's); a member may rebuild only an
    /// image of their own (checked under the image's lock).
    pub fn build_image(
        &self,
        name: &str,
        force: bool,
        caller: &crate::access::Caller,
        events: Events,
    ) -> Result<ImageInfo> {
        let recipe = Recipe::default_for(name)
            .ok_or_else(|| DaemonError::Image(image::ImageError::Unknown(name.to_string())))?;
        let _g = self.image_locks.lock(name);
        // Bind first: the store guard must be gone before the store is
        // locked again below.
        let existing = self.store().image(name)?;
        if let Some(rec) = existing {
            if !force {
                events(Event::Progress {
                    message: format!("image {name} is already built (use --force to rebuild)"),
                });
                return Ok(image_info(&rec));
            }
            caller.may_replace(&self.store(), banger_store::Owned::Image, name, "rebuild")?;
            self.refuse_if_used(name)?;
        }
        let dir = self.cfg.layout.image_dir(name);
        let rec = self.making(name, banger_store::Owner::default(), || {
            Ok(image::build(name, &dir, &recipe, &mut |r| {
                report(name, r, events)
            })?)
        })?;
        self.add_image(&rec)?;
        Ok(image_info(&rec))
    }

    /// `banger image import NAME SOURCE`: see [`banger_guest::import`].
    /// The default image, when built, lends its kernel to a tree without
    /// one.
    pub fn import_image(
        &self,
        name: &str,
        source: &std::path::Path,
        caller: &crate::access::Caller,
        events: Events,
    ) -> Result<ImageInfo> {
        banger_core::validate_name(name)?;
        if !source.is_absolute() {
            return Err(DaemonError::Invalid(format!(
                "image import: {} is not an absolute path",
                source.display()
            )));
        }
        if caller.is_root() {
            return self.import_from(name, source, caller.uid, events);
        }
        // A caller who is not root imports what they can read: the
        // source is read by a process with their ids into a file of the
        // daemon's, which the import then reads (nothing they swap later
        // reaches it, nothing only root can read gets in).
        self.refuse_existing(name)?;
        self.refuse_reserved(name, caller)?;
        // One at a time per member: what one member stages is bounded.
        let _turn = self.staging.begin(caller.uid)?;
        let staged = crate::access::stage_as(caller, source, &self.cfg.layout.cache_dir())?;
        events(Event::Progress {
            message: format!("read {} as uid {}", source.display(), caller.uid),
        });
        let r = self.import_from(name, staged.path(), caller.uid, events);
        drop(staged);
        r
    }

    fn import_from(
        &self,
        name: &str,
        source: &std::path::Path,
        owner: u32,
        events: Events,
    ) -> Result<ImageInfo> {
        // (The lender is not rebuilt or removed while it lends its kernel;
        // taken first, so that a commit into it that waits for this
        // image's lock cannot hold it against us.)
        let _lender = (name != DEFAULT_IMAGE).then(|| self.image_locks.lock_shared(DEFAULT_IMAGE));
        let _g = self.image_locks.lock(name);
        crate::failpoint::hit("image.import.locked")?;
        self.refuse_existing(name)?;
        // The default image lends its kernel (and modules) to a tree
        // without one, unless only root may read it and the caller is not
        // root.
        let base = {
            let store = self.store();
            let lend = owner == 0
                || !store
                    .owner(banger_store::Owned::Image, DEFAULT_IMAGE)?
                    .root_only;
            if lend {
                store.image(DEFAULT_IMAGE)?
            } else {
                None
            }
        };
        let busybox = Recipe::default_for(DEFAULT_IMAGE)
            .map(|r| r.busybox)
            .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
        let dir = self.cfg.layout.image_dir(name);
        let owner = banger_store::Owner {
            uid: owner,
            root_only: false,
        };
        let rec = self.making(name, owner, || {
            Ok(banger_guest::import::import(
                name,
                &dir,
                source,
                base.as_ref(),
                &busybox,
                &mut |r| report(name, r, events),
            )?)
        })?;
        self.add_image(&rec)?;
        Ok(image_info(&rec))
    }

    /// A new image's name must be free (imports and commits never replace
    /// an image).
    /// A member may not make an image under the name root's VMs get by
    /// default (a recipe's, or the configured default image's): root would
    /// boot the member's files without having named them.
    pub(crate) fn refuse_reserved(&self, name: &str, caller: &crate::access::Caller) -> Result<()> {
        if !caller.is_root()
            && (Recipe::default_for(name).is_some() || name == self.cfg.default_image)
        {
            return Err(DaemonError::Invalid(format!(
                "image {name:?} is the name of banger's default image: only root may make an \
                 image under it; pick another name"
            )));
        }
        Ok(())
    }

    pub(crate) fn refuse_existing(&self, name: &str) -> Result<()> {
        if self.store().image(name)?.is_some() || self.cfg.layout.image_dir(name).exists() {
            return Err(DaemonError::Invalid(format!(
                "image {name:?} already exists: pick another name or `banger image rm {name}`"
            )));
        }
        Ok(())
    }

    /// Refused while a VM or a snapshot needs the image; the warm-start
    /// snapshots of it go first (they would never be used again).
    fn refuse_if_used(&self, name: &str) -> Result<()> {
        self.drop_warm_of_image(name)?;
        let store = self.store();
        let mut users: Vec<String> = store
            .vms_using_image(name)?
            .into_iter()
            .map(|v| format!("vm {v}"))
            .collect();
        // A snapshot's root disk is an overlay of the image.
        users.extend(
            store
                .snapshots_using_image(name)?
                .into_iter()
                .map(|s| format!("snapshot {s}")),
        );
        if users.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::ImageInUse {
                name: name.to_string(),
                users: users.join(", "),
            })
        }
    }

    /// Every image, with its size on disk and the VMs made from it.
    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let store = self.store();
        let mut out = Vec::new();
        for rec in store.list_images()? {
            let mut info = image_info(&rec);
            info.used_by = store.vms_using_image(&rec.name)?;
            info.disk_bytes = disk_bytes(&rec.dir);
            let o = store.owner(banger_store::Owned::Image, &rec.name)?;
            (info.owner, info.root_only) = (o.uid, o.root_only);
            out.push(info);
        }
        Ok(out)
    }

    /// A member may remove only an image of their own (checked under the
    /// image's lock, so no build or import of it slips in between).
    pub fn delete_image(&self, name: &str, caller: &crate::access::Caller) -> Result<()> {
        let _g = self.image_locks.lock(name);
        let rec = self.image(name)?;
        caller.may_replace(&self.store(), banger_store::Owned::Image, name, "remove")?;
        self.refuse_if_used(name)?;
        // A deleted VM's grant may still wait for its release.
        crate::resources::jail::revoke_all(&self.host(), &rec.dir)?;
        fsutil::remove_dir_all_if_exists(&rec.dir)?;
        self.store().delete_image(name)?;
        Ok(())
    }
}

pub fn image_info(r: &ImageRecord) -> ImageInfo {
    ImageInfo {
        name: r.name.clone(),
        kernel_version: r.kernel_version.clone(),
        rootfs_bytes: r.rootfs_bytes,
        dir: r.dir.clone(),
        created_at: r.created_at,
        disk_bytes: 0,
        used_by: Vec::new(),
        owner: 0,
        root_only: false,
    }
}

/// What the files of an image dir take on disk (allocated blocks: a sparse
/// root filesystem counts what it holds).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// An image build's or import's report as the client's event: a line
/// (logged too), or a byte count for its progress bar.
fn report(image: &str, r: banger_guest::Report<'_>, events: Events) {
    match r {
        banger_guest::Report::Line(m) => {
            info!(image, "{m}");
            events(Event::Progress {
                message: m.to_string(),
            })
        }
        banger_guest::Report::Bytes { what, done, total } => events(Event::Bytes {
            what: what.to_string(),
            done,
            total,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::access::Caller;
    use crate::daemon::testutil::{daemon, vm_with_tap};

    #[test]
    fn rebuilding_an_image_in_use_is_refused_without_hanging() {
        let d = tempfile::tempdir().unwrap();
        let daemon = Arc::new(daemon(d.path()));
        daemon
            .store()
            .insert_vm(&vm_with_tap("v1", "user", None))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = daemon.clone();
        std::thread::spawn(move || {
            let r = d2.build_image(DEFAULT_IMAGE, true, &Caller::root(), &mut |_| {});
            let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("build_image --force hung (store lock taken twice)");
        let e = r.unwrap_err();
        assert!(e.contains("used by vm user"), "{e}");
        // Without --force the built image is reported, not rebuilt.
        let info = daemon
            .build_image(DEFAULT_IMAGE, false, &Caller::root(), &mut |_| {})
            .unwrap();
        assert_eq!(info.kernel_version, "6.1");
    }

    #[test]
    fn what_a_dead_build_left_is_cleared_at_start() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        let images = daemon.cfg.layout.images_dir();
        let bookworm = daemon.cfg.layout.image_dir(DEFAULT_IMAGE);
        // A half import, and a rebuild that died between its two renames.
        std::fs::create_dir_all(images.join("half.building/rootfs")).unwrap();
        std::fs::rename(&bookworm, bookworm.with_extension("old")).unwrap();
        daemon.index_images().unwrap();
        assert!(!images.join("half.building").exists());
        assert!(bookworm.is_dir() && !bookworm.with_extension("old").exists());
        assert!(daemon.image(DEFAULT_IMAGE).is_ok(), "the old image is back");
        // An `.old` beside a finished image is the replaced one.
        std::fs::create_dir_all(bookworm.with_extension("old")).unwrap();
        daemon.index_images().unwrap();
        assert!(!bookworm.with_extension("old").exists());
    }

    #[test]
    fn unknown_images_are_named_and_unused_ones_deleted() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        assert!(daemon.image(DEFAULT_IMAGE).is_ok());
        let e = daemon.image("other").unwrap_err().to_string();
        assert!(e.contains("image \"other\" is not built"), "{e}");
        daemon.delete_image(DEFAULT_IMAGE, &Caller::root()).unwrap();
        assert!(daemon.image(DEFAULT_IMAGE).is_err());
        assert!(!daemon.cfg.layout.image_dir(DEFAULT_IMAGE).exists());
    }

    #[test]
    fn members_make_no_image_under_the_default_images_name() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        let alice = Caller {
            uid: 4321,
            gid: 4321,
            pid: 1,
            groups: Vec::new(),
        };
        let e = daemon.refuse_reserved(DEFAULT_IMAGE, &alice).unwrap_err();
        assert!(e.to_string().contains("only root may make"), "{e}");
        daemon.refuse_reserved("mine", &alice).unwrap();
        daemon
            .refuse_reserved(DEFAULT_IMAGE, &Caller::root())
            .unwrap();
    }
}
