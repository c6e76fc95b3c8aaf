//! `banger vm commit NAME IMAGE`: a stopped VM's root filesystem, flattened
//! into a new image that boots with the VM's image's kernel and initramfs
//! (what `banger image customize` ends with). How the root is flattened
//! follows the VM's root-disk strategy:
//!
//! - `qcow2`: `qemu-img convert` to raw (sparse);
//! - `reflink`, `copy`: the VM's raw root, cloned or copied;
//! - `dm-snapshot`: the snapshot activated again (the VM is stopped, so its
//!   name is free) and its device copied;
//! - `overlay`: the image and the VM's upper disk mounted read-only, with
//!   overlayfs over both, in a mount namespace of one daemon thread (the
//!   mounts and their loop devices vanish with it, even if the daemon is
//!   killed), and `mkfs.ext4 -d` writing the merged tree. The upper disk
//!   is the guest's: it is checked by `e2fsck` (journal replayed, then a
//!   read-only pass that must find nothing) before the host kernel mounts
//!   it, and mounted `ro,noload,nodev,nosuid,noexec`; ARCHITECTURE.md
//!   "Root disks" says why this, and what it still trusts.
//!
//! Every result is checked and repaired by `e2fsck -fp` (a VM killed
//! rather than stopped leaves a journal to replay, which a read-only
//! `noload` mount of the image would otherwise skip).

use std::path::Path;
use std::time::Duration;

use banger_core::api::{Event, ImageInfo};
use banger_core::layout::vmfiles;
use banger_core::{ImageRecord, RootDiskKind, VmHandles, VmRecord, VmState};
use banger_guest::image::{self, Manifest};
use banger_host::cmd;
use banger_host::fsutil::{self, WrapIo};
use tracing::info;

use crate::daemon::{lock, Daemon, Events};
use crate::error::{DaemonError, Result};
use crate::images::image_info;
use crate::resources::root_disk::dm;

/// How long flattening one root disk may take.
const FLATTEN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Daemon {
    /// The image is the caller's; it is root-only when the VM was (what
    /// its guest could see stays root's), recorded with the image.
    pub fn commit(
        &self,
        vm_name: &str,
        image_name: &str,
        caller: &crate::access::Caller,
        events: Events,
    ) -> Result<ImageInfo> {
        banger_core::validate_name(image_name)?;
        let _images = lock(&self.image_lock);
        self.refuse_existing(image_name)?;
        self.refuse_reserved(image_name, caller)?;
        let _vm_lock = self.lock_vm(vm_name)?;
        let vm = self.find(vm_name)?;
        if !matches!(vm.runtime.state(), VmState::Stopped | VmState::Created) {
            return Err(DaemonError::Invalid(format!(
                "vm {vm_name:?} is {}: `banger vm stop {vm_name}` first (a running guest's disk \
                 is not consistent)",
                vm.runtime.state()
            )));
        }
        let base = self.image(&vm.spec.image)?;
        let dir = self.cfg.layout.image_dir(image_name);
        let work = dir.with_extension("building");
        let root_only =
            crate::access::root_only(&vm) || crate::access::root_only_data(&self.store(), &vm)?;
        let owner = banger_store::Owner {
            uid: caller.uid,
            root_only,
        };
        let r = self.making(image_name, owner, || {
            self.commit_into(&vm, &base, image_name, &dir, &work, events)
        });
        if r.is_err() {
            let _ = fsutil::remove_dir_all_if_exists(&work);
        }
        let rec = r?;
        self.add_image(&rec)?;
        Ok(image_info(&rec))
    }

    fn commit_into(
        &self,
        vm: &VmRecord,
        base: &ImageRecord,
        name: &str,
        dir: &Path,
        work: &Path,
        events: Events,
    ) -> Result<ImageRecord> {
        let mut say = |m: String| {
            info!(vm = %vm.name, image = name, "{m}");
            events(Event::Progress { message: m });
        };
        fsutil::remove_dir_all_if_exists(work)?;
        fsutil::create_dir_all(work)?;
        let kind = vm.spec.root_disk();
        say(format!("flattening vm {}'s {kind} root disk", vm.name));
        let out = work.join(image::ROOTFS_FILE);
        let vm_dir = self.cfg.layout.vm_dir(&vm.id);
        match kind {
            RootDiskKind::Qcow2 => {
                // The overlay was the VMM's to write: its header is
                // checked, and the backing file is the image's, named
                // here, never the one the header names.
                let src = vm_dir.join(vmfiles::ROOT_DISK);
                banger_host::qcow2::check_file(&src)?;
                let spec = banger_host::qcow2::explicit_backing_spec(&src, &base.rootfs);
                cmd::run_with(
                    "qemu-img",
                    [
                        "convert".as_ref(),
                        "-O".as_ref(),
                        "raw".as_ref(),
                        std::ffi::OsStr::new(&spec),
                        out.as_os_str(),
                    ],
                    None,
                    FLATTEN_TIMEOUT,
                )?;
            }
            RootDiskKind::Reflink | RootDiskKind::Copy => {
                fsutil::clone_or_copy(&vm_dir.join(vmfiles::ROOT_RAW), &out)?;
            }
            RootDiskKind::DmSnapshot => self.flatten_dm(vm, base, &out)?,
            RootDiskKind::Overlay => {
                let upper = vm_dir.join(vmfiles::ROOT_UPPER);
                merge_overlay(&base.rootfs, &upper, &out, base.rootfs_bytes)?;
            }
        }
        say("checking the root filesystem (e2fsck -fp)".into());
        e2fsck_preen(&out)?;
        fsutil::clone_or_copy(&base.kernel, &work.join(image::KERNEL_FILE))?;
        fsutil::clone_or_copy(&base.initrd, &work.join(image::INITRD_FILE))?;
        let bytes = std::fs::metadata(&out).with_path("stat", &out)?.len();
        let manifest = Manifest {
            name: name.to_string(),
            kernel_version: base.kernel_version.clone(),
            rootfs_bytes: bytes,
            created_at: banger_core::unix_now(),
            recipe: format!("commit of vm {} (image {})", vm.name, base.name),
        };
        let rec = image::install(dir, work, &manifest)?;
        say(format!(
            "image {name} ready: kernel {}, root filesystem {} MiB",
            manifest.kernel_version,
            bytes >> 20
        ));
        Ok(rec)
    }

    /// The snapshot of a stopped dm-snapshot VM, activated under its own
    /// name again, copied, and torn down.
    fn flatten_dm(&self, vm: &VmRecord, base: &ImageRecord, out: &Path) -> Result<()> {
        let cow = self.cfg.layout.vm_dir(&vm.id).join(vmfiles::ROOT_COW);
        let name = dm::dm_name(&vm.id);
        let _l = lock(&self.dm_lock);
        let mut h = VmHandles::default();
        let r = dm::activate(&dm::Dmsetup, &base.rootfs, &cow, &name, &mut h).and_then(|()| {
            let dev = format!("/dev/mapper/{name}");
            cmd::run_with(
                "cp",
                ["--sparse=always".as_ref(), dev.as_ref(), out.as_os_str()],
                None,
                FLATTEN_TIMEOUT,
            )
            .map(drop)
            .map_err(DaemonError::from)
        });
        let down = dm::deactivate(&dm::Dmsetup, &base.rootfs, &cow, &name);
        r.and(down)
    }
}

/// `e2fsck -fp`: replays the journal and makes the safe repairs; a file
/// system it cannot repair without a human is refused.
fn e2fsck_preen(fs: &Path) -> Result<()> {
    let status = std::process::Command::new("e2fsck")
        .arg("-fp")
        .arg(fs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| DaemonError::Invalid(format!("cannot run e2fsck: {e}")))?;
    // 0: clean; 1: errors corrected; 2: corrected, reboot advised.
    match status.code() {
        Some(0..=2) => Ok(()),
        _ => Err(DaemonError::Invalid(format!(
            "{}: e2fsck -fp could not repair it ({status}): the VM's root filesystem is damaged",
            fs.display()
        ))),
    }
}

/// The overlay strategy's root: `upper`'s `/root` over `lower`, merged by
/// the host's overlayfs (both as read-only lower layers, so whiteouts and
/// opaque dirs apply) in a private mount namespace, written to `out` by
/// `mkfs.ext4 -d`.
fn merge_overlay(lower: &Path, upper: &Path, out: &Path, min_bytes: u64) -> Result<()> {
    e2fsck_preen(upper)?;
    cmd::run_with(
        "e2fsck",
        ["-fn".as_ref(), upper.as_os_str()],
        None,
        FLATTEN_TIMEOUT,
    )
    .map_err(|e| {
        DaemonError::Invalid(format!(
            "{}: the upper disk is not a clean ext4 after repair: {e}",
            upper.display()
        ))
    })?;
    let mnt = out.with_extension("mnt");
    let (l, u, m) = (mnt.join("lower"), mnt.join("upper"), mnt.join("merged"));
    for d in [&l, &u, &m] {
        fsutil::create_dir_all(d)?;
    }
    // One thread, its own mount namespace: nothing mounted here is seen by
    // the host, and all of it goes when the thread ends.
    let r = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            use nix::mount::{mount, MsFlags};
            let sys =
                |what: &str, e: nix::Error| DaemonError::Invalid(format!("vm commit: {what}: {e}"));
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| sys("unshare the mount namespace", e))?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| sys("make / private", e))?;
            for (file, dir) in [(lower, &l), (upper, &u)] {
                cmd::run(
                    "mount",
                    [
                        "-t".as_ref(),
                        "ext4".as_ref(),
                        "-o".as_ref(),
                        "loop,ro,noload,nodev,nosuid,noexec".as_ref(),
                        file.as_os_str(),
                        dir.as_os_str(),
                    ],
                )?;
            }
            // A VM created but never booted has no upper tree yet: its
            // root is the image's.
            let upper_root = u.join("root");
            let merged = upper_root.is_dir();
            if merged {
                let opts = format!("lowerdir={}:{}", upper_root.display(), l.display());
                mount(
                    Some("overlay"),
                    &m,
                    Some("overlay"),
                    MsFlags::MS_RDONLY,
                    Some(opts.as_str()),
                )
                .map_err(|e| sys("mount the merged overlay", e))?;
            }
            image::write_ext4(if merged { &m } else { &l }, out, min_bytes)?;
            // Unmounted here, synchronously, so the loop devices are
            // detached (autoclear) before the request answers; a failure
            // above leaves them to the namespace's end with the thread.
            let mounted = if merged {
                vec![&m, &u, &l]
            } else {
                vec![&u, &l]
            };
            for d in mounted {
                nix::mount::umount(d.as_path()).map_err(|e| sys("unmount", e))?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(DaemonError::Invalid(
                "vm commit: the merge thread panicked".into(),
            ))
        })
    });
    let _ = fsutil::remove_dir_all_if_exists(&mnt);
    r
}
