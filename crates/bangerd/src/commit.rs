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
//!
//! The tools that read guest-written bytes (`qemu-img`, every `e2fsck`)
//! run confined as the VMM would ([`Tools`]): as the VM's own user (where
//! its VMM has one), in the VM's cgroup (its memory and pids limits) made
//! for the commit, with no network and a bound on the file they write,
//! and killed at a deadline; the file they check or write is the VM
//! user's only while they do. What needs root (the overlay's mounts,
//! copying a dm device) runs as root, with the deadline. No lock every
//! create needs is held meanwhile: the new image's own, the VM's, and the
//! dm lock only while the snapshot is set up and taken down.

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
use crate::resources::jail;
use crate::resources::root_disk::dm;
use banger_host::confine::Confinement;

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
        let _image = self.image_locks.lock(image_name);
        self.refuse_existing(image_name)?;
        self.refuse_reserved(image_name, caller)?;
        let _vm_lock = self.lock_vm(vm_name)?;
        let vm = self.find(vm_name)?;
        // What its last stop left is released first: a pending release
        // would revoke the image grant the commit's tools are given.
        self.settle_vm(&vm.id)?;
        if vm.runtime.suspended {
            return Err(DaemonError::Invalid(format!(
                "vm {vm_name:?} is suspended: its guest's memory is not on its disk; `banger vm \
                 resume {vm_name}` then `banger vm stop {vm_name}` first (or `vm stop` to discard \
                 the saved guest)"
            )));
        }
        if !matches!(vm.runtime.state(), VmState::Stopped | VmState::Created) {
            return Err(DaemonError::Invalid(format!(
                "vm {vm_name:?} is {}: `banger vm stop {vm_name}` first (a running guest's disk \
                 is not consistent)",
                vm.runtime.state()
            )));
        }
        // Its kernel is the new image's: not rebuilt or removed meanwhile.
        let _base_lock =
            (vm.spec.image != image_name).then(|| self.image_locks.lock_shared(&vm.spec.image));
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
        let tools = Tools::new(self, vm)?;
        // (The tests hold a commit here, its locks taken, its tools' cgroup
        // made: nothing a `vm create` needs is held.)
        crate::failpoint::hit("commit.tools")?;
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
                // Written by qemu-img as the VM's user: made here first.
                std::fs::File::create(&out).with_path("create", &out)?;
                let (status, stderr) = tools.lend(&out, || {
                    tools.run(
                        "qemu-img",
                        &[
                            "convert".as_ref(),
                            "-O".as_ref(),
                            "raw".as_ref(),
                            std::ffi::OsStr::new(&spec),
                            out.as_os_str(),
                        ],
                    )
                })?;
                if !status.success() {
                    return Err(DaemonError::Invalid(format!(
                        "vm commit {}: qemu-img convert failed ({status}): {}",
                        vm.name,
                        banger_core::text::escape_control(stderr.trim(), false)
                    )));
                }
            }
            RootDiskKind::Reflink | RootDiskKind::Copy => {
                fsutil::clone_or_copy(&vm_dir.join(vmfiles::ROOT_RAW), &out)?;
            }
            RootDiskKind::DmSnapshot => self.flatten_dm(vm, base, &out)?,
            RootDiskKind::Overlay => {
                let upper = vm_dir.join(vmfiles::ROOT_UPPER);
                merge_overlay(&tools, &base.rootfs, &upper, &out, base.rootfs_bytes)?;
            }
        }
        say("checking the root filesystem (e2fsck -fp)".into());
        tools.e2fsck_preen(&out)?;
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
        let mut h = VmHandles::default();
        // The dm lock (every dm-snapshot start needs it) only while the
        // snapshot is set up and taken down, not during the copy.
        let up = {
            let _l = lock(&self.dm_lock);
            dm::activate(&dm::Dmsetup, &base.rootfs, &cow, &name, &mut h)
        };
        let r = up.and_then(|()| {
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
        let down = {
            let _l = lock(&self.dm_lock);
            dm::deactivate(&dm::Dmsetup, &base.rootfs, &cow, &name)
        };
        r.and(down)
    }
}

/// How a commit runs the host's tools on guest-written bytes: confined as
/// the VM's VMM would be, in the VM's cgroup (made for the commit, gone
/// with this).
struct Tools<'a> {
    d: &'a Daemon,
    vm: &'a VmRecord,
    conf: Confinement,
    cgroup: bool,
    /// The image the VM's user may read while the tools run (a qcow2
    /// root's backing file): granted here, revoked on drop.
    image: Option<(std::path::PathBuf, u32)>,
}

impl<'a> Tools<'a> {
    fn new(d: &'a Daemon, vm: &'a VmRecord) -> Result<Tools<'a>> {
        let identity = jail::identity(&d.host(), vm)?;
        // The VM is stopped: its cgroup is made again for the commit.
        let cgroup = d
            .host()
            .cgroups()
            .is_ok_and(|c| c.create(&vm.id, &jail::limits(&d.host(), vm)).is_ok());
        let cgroup_procs = if cgroup {
            d.host()
                .cgroups()
                .map(|c| c.procs_files(&vm.id))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut tools = Tools {
            d,
            vm,
            image: None,
            conf: Confinement {
                identity,
                cgroup_procs,
                new_netns: true,
                private_tmp: false,
                max_file_bytes: Some(MAX_OUT_BYTES),
            },
            cgroup,
        };
        // The VM is stopped, so its own grant is gone: one for the commit
        // (recorded first, so that a grant that fails half-way is revoked
        // with the rest when `tools` drops).
        if let Some(id) = &tools.conf.identity {
            let dir = d.cfg.layout.image_dir(&vm.spec.image);
            let uid = id.uid;
            tools.image = Some((dir.clone(), uid));
            jail::grant_image(&dir, uid)?;
        }
        Ok(tools)
    }

    /// `f`, the tool's to read and write while `run` goes (owned by the
    /// VM's user, mode 0600), then its owner and mode as they were.
    fn lend<T>(&self, f: &Path, run: impl FnOnce() -> Result<T>) -> Result<T> {
        use std::os::unix::fs::MetadataExt;
        let Some(id) = &self.conf.identity else {
            return run();
        };
        let was = std::fs::metadata(f).with_path("stat", f)?;
        fsutil::set_owner_mode(f, id.uid, id.gid, 0o600)?;
        let r = run();
        let back = fsutil::set_owner_mode(f, was.uid(), was.gid(), was.mode() & 0o7777);
        let r = r?;
        back?;
        Ok(r)
    }

    /// Runs `program args` confined; its status, and stderr for errors.
    fn run(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<(std::process::ExitStatus, String)> {
        // The tests' probe: who a tool runs as, and in which cgroup, told
        // by a shell confined as the tool is (failpoint builds only).
        if let Some(path) = crate::failpoint::arg("commit.tool.probe") {
            let mut p = std::process::Command::new("/bin/sh");
            p.args(["-c", "id -u; cat /proc/self/cgroup"]);
            self.conf
                .apply(&mut p)
                .map_err(|e| DaemonError::Invalid(format!("vm commit: probe: {e}")))?;
            let (_, out, _) = cmd::run_prepared(p, "sh", None, FLATTEN_TIMEOUT)?;
            std::fs::write(&path, format!("{program}\n{out}"))
                .with_path("write", std::path::Path::new(&path))?;
        }
        let mut c = std::process::Command::new(program);
        c.args(args);
        self.conf
            .apply(&mut c)
            .map_err(|e| DaemonError::Invalid(format!("vm commit: confining {program}: {e}")))?;
        let (status, _, stderr) = cmd::run_prepared(c, program, None, FLATTEN_TIMEOUT)?;
        Ok((status, stderr))
    }

    /// `e2fsck -fp`: replays the journal and makes the safe repairs; a
    /// file system it cannot repair without a human is refused.
    fn e2fsck_preen(&self, fs: &Path) -> Result<()> {
        let (status, _) =
            self.lend(fs, || self.run("e2fsck", &["-fp".as_ref(), fs.as_os_str()]))?;
        // 0: clean; 1: errors corrected; 2: corrected, reboot advised.
        match status.code() {
            Some(0..=2) => Ok(()),
            _ => Err(DaemonError::Invalid(format!(
                "{}: e2fsck -fp could not repair it ({status}): the VM's root filesystem is damaged",
                fs.display()
            ))),
        }
    }

    /// `e2fsck -fn`: a read-only pass that must find nothing.
    fn e2fsck_clean(&self, fs: &Path) -> Result<()> {
        let (status, stderr) =
            self.lend(fs, || self.run("e2fsck", &["-fn".as_ref(), fs.as_os_str()]))?;
        if status.success() {
            return Ok(());
        }
        Err(DaemonError::Invalid(format!(
            "{}: the upper disk is not a clean ext4 after repair ({status}): {}",
            fs.display(),
            banger_core::text::escape_control(stderr.trim(), false)
        )))
    }
}

impl Drop for Tools<'_> {
    fn drop(&mut self) {
        if let Some((dir, uid)) = &self.image {
            if let Err(e) = jail::revoke_image(dir, *uid) {
                tracing::warn!(vm = %self.vm.name, err = %e, "cannot revoke the commit's image grant");
            }
        }
        if self.cgroup {
            if let Ok(c) = self.d.host().cgroups() {
                if let Err(e) = c.remove(&self.vm.id) {
                    tracing::warn!(vm = %self.vm.name, err = %e, "cannot remove the commit's cgroup");
                }
            }
        }
    }
}

/// The largest file a commit's tool may write (a VM's largest root).
const MAX_OUT_BYTES: u64 = 1 << 40;

/// The overlay strategy's root: `upper`'s `/root` over `lower`, merged by
/// the host's overlayfs (both as read-only lower layers, so whiteouts and
/// opaque dirs apply) in a private mount namespace, written to `out` by
/// `mkfs.ext4 -d`.
fn merge_overlay(
    tools: &Tools<'_>,
    lower: &Path,
    upper: &Path,
    out: &Path,
    min_bytes: u64,
) -> Result<()> {
    tools.e2fsck_preen(upper)?;
    tools.e2fsck_clean(upper)?;
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
