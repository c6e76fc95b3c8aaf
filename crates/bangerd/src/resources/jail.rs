//! What confines a VM's processes (issue: a guest that escapes its VMM
//! gets nothing): a cgroup with the VM's limits, which its VMM and the
//! VMM's helpers start in, and for QEMU an unprivileged identity of its
//! own that owns exactly the files and sockets its VMM uses.
//!
//! - **Identity**: uid = gid = `--vmm-uid-base` + the VM's address slot
//!   (unique among the instance's VMs, stable for the VM's life, so its
//!   files keep their owner across stop/start; the daemon claims its range
//!   host-wide at start, `crate::uids`), with no supplementary group but
//!   `kvm`'s where the VMM uses KVM. Firecracker keeps root until it runs
//!   under its jailer; it gets the cgroup all the same.
//! - **Its image, no other**: while the VM's processes live, a POSIX ACL
//!   entry on each file of its image lets the VM's uid read it (the
//!   kernel, the root filesystem a qcow2 or overlay root reads); images
//!   are otherwise root's alone (`perms`). Revoked when the VM's processes
//!   are gone, before its address (and so its uid) can go to another VM;
//!   a daemon's start revokes what no running VM holds ([`sweep_grants`]).
//!   Chosen over a group per image (a second range of ids to claim
//!   host-wide, and a group kept for every image, used or not) and over
//!   descriptors handed to the VMM (QEMU's `-kernel` takes only a path).
//! - **Files**: the VM's state dir is `root:<uid> 0710` (the VMM passes
//!   through it, cannot list it, create, rename or delete in it: no link
//!   can be planted where the daemon writes); the files its VMM opens (the
//!   writable disks, the console log, the initrd) are `<uid> 0600`
//!   ([`hand_over`], by the VMM's resource); its runtime dir, where its
//!   processes make their sockets, is `<uid> 0700` (the daemon connects
//!   there only through `banger_agent::connect_nofollow`); a volume is
//!   `<uid> 0600` while the VM has it and root's again after.
//! - **cgroup** (`banger_host::cgroup`): memory = the VM's memory plus
//!   `--vmm-memory-overhead` (the VMM's own use, measured: docs/BENCHMARKS.md),
//!   no swap, pids, a CPU weight of 100 per vCPU; an OOM kill in it is the
//!   VM's last error ([`oom_message`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_core::{Release, VmHandles, VmRecord, VmmKind};
use banger_host::cgroup::{Cgroups, Limits};
use banger_host::confine::{Confinement, Identity};

use super::{held, Acq, End, Item, Resource};
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Jail;

/// Whether the VM's Firecracker runs under its jailer.
pub fn jailed(host: &Host<'_>, vm: &VmRecord) -> bool {
    vm.spec.vmm == VmmKind::Firecracker && host.cfg.jailer.is_some()
}

/// Where the jailer puts its chroots (on the VMs' filesystem: the files a
/// jailed Firecracker opens are hard-linked in).
pub fn chroot_base(host: &Host<'_>) -> PathBuf {
    host.cfg.layout.state_dir.join("jail")
}

/// The jailed Firecracker's `/` for this VM, if it is jailed.
pub fn chroot(host: &Host<'_>, vm: &VmRecord) -> Option<PathBuf> {
    let fc = host.cfg.firecracker.as_ref()?;
    jailed(host, vm).then(|| banger_vmm::jailer::chroot_dir(&chroot_base(host), fc, jail_id(vm)))
}

/// Where the VM's VMM makes its sockets (API, vsock): its runtime dir, or
/// its chroot when jailed.
pub fn socket_dir(host: &Host<'_>, vm: &VmRecord) -> PathBuf {
    chroot(host, vm).unwrap_or_else(|| host.cfg.layout.vm_runtime_dir(&vm.id))
}

/// The identity the VM's VMM and vsock backend run as; none where the VMM
/// keeps root (Firecracker without its jailer). A jailed Firecracker's
/// group is the images' (the jailer leaves it no supplementary group).
pub fn identity(host: &Host<'_>, vm: &VmRecord) -> Result<Option<Identity>> {
    let fc_jailed = jailed(host, vm);
    if vm.spec.vmm != VmmKind::Qemu && !fc_jailed {
        return Ok(None);
    }
    let slot = host.guest_net(vm)?.slot;
    let base = host.cfg.vmm_uid_base;
    let uid = base.checked_add(slot).ok_or_else(|| {
        DaemonError::Invalid(format!(
            "vm {:?}: --vmm-uid-base {base} + slot {slot} overflows a uid",
            vm.name
        ))
    })?;
    let images = host.cfg.vmm_images_gid;
    let mut groups = Vec::new();
    // The accelerator the VMM uses now (a VM created before KVM was
    // usable boots with it once it is).
    let accel = host
        .vmm(vm.spec.vmm)
        .map(|v| v.accel().to_string())
        .unwrap_or_default();
    if accel == "kvm" {
        if let Ok(m) = std::fs::metadata("/dev/kvm") {
            groups.push(m.gid());
        }
    }
    if fc_jailed {
        return Ok(Some(Identity {
            uid,
            gid: images,
            groups: Vec::new(),
        }));
    }
    Ok(Some(Identity {
        uid,
        gid: uid,
        groups,
    }))
}

/// The jailer's part of the VMM's configuration, for a jailed VM.
pub fn jail_spec(host: &Host<'_>, vm: &VmRecord) -> Result<Option<banger_vmm::jailer::JailSpec>> {
    let (Some(jailer), true) = (host.cfg.jailer.clone(), jailed(host, vm)) else {
        return Ok(None);
    };
    let Some(id) = identity(host, vm)? else {
        return Ok(None);
    };
    Ok(Some(banger_vmm::jailer::JailSpec {
        jailer,
        chroot_base: chroot_base(host),
        id: jail_id(vm).to_string(),
        uid: id.uid,
        gid: id.gid,
    }))
}

/// The jail dir the jailer makes for a jailed VM (`<base>/<exec
/// name>/<jail id>`), where no handle recorded it.
fn jail_dir(host: &Host<'_>, vm: &VmRecord) -> Option<PathBuf> {
    let fc = host.cfg.firecracker.as_ref().filter(|_| jailed(host, vm))?;
    Some(banger_vmm::jailer::jail_dir(
        &chroot_base(host),
        fc,
        jail_id(vm),
    ))
}

/// The jailer's `--id` for the VM: 16 hex digits of its id, few enough
/// that its sockets' paths in the chroot stay within a Unix socket's 108
/// bytes, enough that two VMs never share one.
pub fn jail_id(vm: &VmRecord) -> &str {
    &vm.id[..vm.id.len().min(16)]
}

/// What the VM's processes start with: its identity (if any) and its
/// cgroups.
pub fn confinement(host: &Host<'_>, vm: &VmRecord, id: Option<Identity>) -> Result<Confinement> {
    Ok(Confinement {
        // A confined process needs no network (QEMU has its tap as a
        // descriptor; the vsock backend speaks Unix sockets): it gets an
        // empty network namespace of its own. (A jailed Firecracker opens
        // its tap by name: the host's namespace.)
        new_netns: id.is_some() && vm.spec.vmm == VmmKind::Qemu,
        private_tmp: id.is_some() && vm.spec.vmm == VmmKind::Qemu,
        max_file_bytes: None,
        identity: id,
        cgroup_procs: host.cgroups()?.procs_files(&vm.id),
    })
}

/// The VM's limits.
pub fn limits(host: &Host<'_>, vm: &VmRecord) -> Limits {
    let s = &vm.spec.sizing;
    Limits {
        memory_bytes: (s.memory_mib + host.cfg.vmm_memory_overhead_mib) << 20,
        pids: host.cfg.vmm_pids_max,
        cpu_weight: 100 * u64::from(s.cpus.max(1)),
    }
}

fn chown(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    Ok(banger_host::fsutil::set_owner_mode(path, uid, gid, mode)?)
}

/// Gives the VMM's identity the files it opens (a missing one is skipped:
/// the VMM reports it). Block devices (a dm-snapshot) included.
pub fn hand_over(id: Option<&Identity>, paths: &[&Path]) -> Result<()> {
    let Some(id) = id else {
        return Ok(());
    };
    for p in paths {
        // A device (a dm-snapshot under /dev/mapper, a link udev made) is
        // the node itself; anything else is never followed.
        let p = if p.starts_with("/dev/") {
            std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
        } else {
            p.to_path_buf()
        };
        if p.symlink_metadata().is_ok() {
            chown(&p, id.uid, id.gid, 0o600)?;
        }
    }
    Ok(())
}

/// Serialises the edits of images' ACLs (a read, a change, a write).
static GRANTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The files of an image dir (never followed).
fn image_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .collect()
}

/// Lets `uid` read the image's files.
pub(crate) fn grant_image(dir: &Path, uid: u32) -> Result<()> {
    let _g = crate::daemon::lock(&GRANTS);
    for f in image_files(dir) {
        banger_host::acl::grant_read(&f, uid)?;
    }
    Ok(())
}

/// Takes back what [`grant_image`] gave `uid` (an image removed since has
/// nothing left to take back).
pub(crate) fn revoke_image(dir: &Path, uid: u32) -> Result<()> {
    let _g = crate::daemon::lock(&GRANTS);
    // Every file tried, the first error reported.
    let mut first = None;
    for f in image_files(dir) {
        match banger_host::acl::revoke(&f, uid) {
            Err(banger_host::acl::AclError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first.get_or_insert(e);
            }
            Ok(()) => {}
        }
    }
    first.map_or(Ok(()), |e| Err(e.into()))
}

/// Revokes every grant of this daemon's on its images that no running VM
/// of its holds (a daemon that died between a VM's end and its release):
/// run at start, after reconcile. `live` is (image dir, uid) of each VM
/// whose processes run. Only this daemon's uids (its claimed range): an
/// image's inode may be another daemon's too (a hard link), with grants
/// of that daemon's VMs.
pub fn sweep_grants(host: &Host<'_>, live: &[(PathBuf, u32)]) -> Result<()> {
    let images = host.cfg.layout.images_dir();
    let dirs: Vec<PathBuf> = std::fs::read_dir(&images)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()))
        .collect();
    sweep(host, &dirs, live)
}

/// Revokes every grant of this daemon's on an image that is going away
/// (no VM uses it; a deleted VM's release may still be pending): on a
/// hard-linked inode a grant would outlive the dir.
pub fn revoke_all(host: &Host<'_>, dir: &Path) -> Result<()> {
    sweep(host, &[dir.to_path_buf()], &[])
}

fn sweep(host: &Host<'_>, dirs: &[PathBuf], live: &[(PathBuf, u32)]) -> Result<()> {
    let base = host.cfg.vmm_uid_base;
    let ours = |uid: u32| {
        uid >= base && u64::from(uid) < u64::from(base) + u64::from(host.cfg.subnet.slots())
    };
    let _g = crate::daemon::lock(&GRANTS);
    // Every file tried, the first error reported.
    let mut first = None;
    for dir in dirs {
        for f in image_files(dir) {
            let r = banger_host::acl::AclFile::open(&f).and_then(|acl| {
                for uid in acl.users()? {
                    if ours(uid) && !live.iter().any(|(d, u)| d == dir && *u == uid) {
                        tracing::info!(file = %f.display(), uid, "revoking an image grant no VM holds");
                        acl.revoke(uid)?;
                    }
                }
                Ok(())
            });
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), |e| Err(e.into()))
}

/// Revokes the VM's image grant, if it has one; only ever in the images
/// dir.
fn revoke_granted(host: &Host<'_>, held: &held::Jail) -> Result<()> {
    match (&held.image, held.uid) {
        (Some(dir), Some(uid)) if dir.starts_with(host.cfg.layout.images_dir()) => {
            revoke_image(dir, uid)
        }
        _ => Ok(()),
    }
}

fn volumes(host: &Host<'_>, vm: &VmRecord) -> Vec<PathBuf> {
    vm.spec
        .volumes
        .iter()
        .map(|m| host.cfg.layout.volume(&m.name))
        .collect()
}

/// Gives the VM's volumes back to root, each only while this VM's user
/// still owns it (a release after the reply must not take a volume from
/// the VM that has it since), under the volume lock that attaching them
/// takes too.
fn give_back_volumes(host: &Host<'_>, held: &held::Jail) -> Result<()> {
    let Some(uid) = held.uid else {
        return Ok(());
    };
    let _v = crate::daemon::lock(&host.volumes.lock);
    for p in &held.volumes {
        if p.symlink_metadata().is_ok_and(|m| m.uid() == uid) {
            chown(p, 0, 0, 0o600)?;
        }
    }
    Ok(())
}

/// Removes a jailed Firecracker's chroot (links to the VM's files, device
/// nodes, its sockets): only ever a dir under the chroot base.
fn remove_jail(host: &Host<'_>, held: &held::Jail) -> Result<()> {
    if let Some(p) = &held.jail {
        if p.starts_with(chroot_base(host)) {
            banger_host::fsutil::remove_dir_all_if_exists(p)?;
        }
    }
    Ok(())
}

/// Kills what is left in the VM's cgroup and waits up to `wait` for it to
/// be empty; whether it is.
fn kill_cgroup(host: &Host<'_>, held: &held::Jail, wait: std::time::Duration) -> bool {
    let Ok(c) = host.cgroups() else {
        return true;
    };
    let dirs = &held.cgroup;
    let end = std::time::Instant::now() + wait;
    loop {
        c.kill_all(dirs);
        if dirs.iter().all(|d| c.procs_in(d).is_empty()) {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// How long a teardown waits for a VM's last processes before it leaves
/// its volumes to the release.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the last exits in a VM's cgroup may take.
const EMPTY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn remove_cgroup(host: &Host<'_>, vm_id: &str, held: &held::Jail, wait: bool) -> Result<()> {
    let Ok(c) = host.cgroups() else {
        return Ok(());
    };
    // The dirs recorded (the daemon's own cgroup may have moved since).
    let mut dirs = held.cgroup.clone();
    if dirs.is_empty() {
        dirs = c.dirs(vm_id);
    }
    if wait {
        c.kill_and_remove(&dirs, EMPTY_WAIT)
    } else {
        c.remove_dirs(&dirs)
    }
    .map_err(|e| DaemonError::Release {
        vm: vm_id.to_string(),
        resource: "jail",
        reason: e.to_string(),
    })
}

impl Resource for Jail {
    fn name(&self) -> &'static str {
        "jail"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Confinement]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[
            super::Handoff::Tap,
            super::Handoff::Volumes,
            super::Handoff::GuestAddress,
        ]
    }

    fn phase(&self) -> &'static str {
        "confine"
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let c: &Cgroups = host.cgroups()?;
        // Recorded first: a failed create leaves nothing, a later failure
        // finds the dirs in the handles.
        cx.handles.cgroup_dirs = c.dirs(&cx.vm.id);
        c.create(&cx.vm.id, &limits(host, cx.vm))
            .map_err(|e| DaemonError::Invalid(format!("vm {:?}: {e}", cx.vm.name)))?;
        let Some(id) = identity(host, cx.vm)? else {
            return Ok(());
        };
        let l = &host.cfg.layout;
        for top in [l.vms_dir(), l.runtime_dir.join("vms")] {
            if let Some(a) = crate::perms::unreachable_ancestor(&top) {
                return Err(DaemonError::Invalid(format!(
                    "vm {:?}: its VMM runs as uid {} and cannot pass through {} to reach its \
                     files: `chmod o+x {}` (search only; nothing becomes readable)",
                    cx.vm.name,
                    id.uid,
                    a.display(),
                    a.display()
                )));
            }
        }
        let rt = l.vm_runtime_dir(&cx.vm.id);
        banger_host::fsutil::create_dir_all(&rt)?;
        chown(&l.vm_dir(&cx.vm.id), 0, id.uid, 0o710)?;
        chown(&rt, id.uid, id.gid, 0o700)?;
        grant_image(&cx.img.dir, id.uid)?;
        {
            let _v = crate::daemon::lock(&host.volumes.lock);
            for v in volumes(host, cx.vm) {
                chown(&v, id.uid, id.gid, 0o600)?;
            }
        }
        if let Some(root) = chroot(host, cx.vm) {
            // A jailed Firecracker opens its tap by name, as its user.
            if let Some(tap) = &cx.handles.tap_device {
                banger_host::tap::set_owner(tap, id.uid)?;
            }
            // Recorded before it exists: a teardown removes it whatever
            // Firecracker binary is configured by then.
            cx.handles.jail_dir = root.parent().map(Path::to_path_buf);
            banger_host::fsutil::create_dir_all(&root)?;
        }
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        let dirs: Vec<PathBuf> = if h.cgroup_dirs.is_empty() {
            host.cgroups().map(|c| c.dirs(&vm.id)).unwrap_or_default()
        } else {
            h.cgroup_dirs.clone()
        };
        let dirs: Vec<PathBuf> = dirs.into_iter().filter(|p| p.exists()).collect();
        // Only the volumes this VM's user owns (a volume another running
        // VM has is that VM's user's, and stays so).
        let me = host
            .guest_net(vm)
            .ok()
            .and_then(|n| host.cfg.vmm_uid_base.checked_add(n.slot));
        let vols: Vec<PathBuf> = volumes(host, vm)
            .into_iter()
            .filter(|p| p.metadata().is_ok_and(|m| Some(m.uid()) == me))
            .collect();
        // Recorded; else where the VM's API socket says (a jail of an older
        // banger's); else where this configuration would put it.
        let from_api = vm
            .runtime
            .api_sock_path
            .as_ref()
            .and_then(|a| a.parent()?.parent())
            .filter(|p| p.starts_with(chroot_base(host)))
            .map(Path::to_path_buf);
        let jail = h
            .jail_dir
            .clone()
            .or(from_api)
            .or_else(|| jail_dir(host, vm))
            .filter(|p| p.exists());
        // Whenever the VMM has an identity of its own, whatever the ACLs
        // say now (revoking is idempotent; a grant that cannot be read
        // must still be taken back before the uid goes to another VM).
        let confined = identity(host, vm).ok().flatten().is_some();
        let image = (confined && me.is_some()).then(|| host.cfg.layout.image_dir(&vm.spec.image));
        let some = !dirs.is_empty() || !vols.is_empty() || jail.is_some() || image.is_some();
        some.then_some(Item::Jail(held::Jail {
            cgroup: dirs,
            volumes: vols,
            uid: me,
            jail,
            image,
        }))
    }

    fn end(&self, host: &Host<'_>, vm: &VmRecord, held: Item, how: End) -> Result<Option<Item>> {
        let Item::Jail(h) = &held else {
            return Err(super::mismatch(self, &vm.name, &held));
        };
        // Whatever is left of the VM's processes (a helper a hijacked
        // backend forked) dies before its volumes go to another VM; while
        // any is still exiting, the volumes wait for the release. (A
        // delete does not wait for its VMM to free its memory: the release
        // does.)
        let wait = if how.wait_vmm {
            END_WAIT
        } else {
            std::time::Duration::ZERO
        };
        if !kill_cgroup(host, h, wait) {
            return Ok(Some(held));
        }
        give_back_volumes(host, h)?;
        revoke_granted(host, h)?;
        remove_jail(host, h)?;
        // Busy while a deleted VM's VMM is still dying: after the reply.
        match remove_cgroup(host, &vm.id, h, false) {
            Ok(()) => Ok(None),
            Err(_) => Ok(Some(Item::Jail(held::Jail {
                cgroup: h.cgroup.clone(),
                ..Default::default()
            }))),
        }
    }

    fn release(&self, host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Jail(held) = held else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        // Everything of the VM gone first (as in `end`), then its volumes
        // and jail.
        remove_cgroup(host, &r.vm_id, held, true)?;
        give_back_volumes(host, held)?;
        revoke_granted(host, held)?;
        remove_jail(host, held)
    }
}

/// Why a VMM that exited on its own did, if the kernel's OOM killer
/// killed it (or a helper) in the VM's cgroup.
pub fn oom_message(host: &Host<'_>, vm: &VmRecord) -> Option<String> {
    let c = host.cgroups().ok()?;
    let kills = c.oom_kills(&vm.id)?;
    if kills == 0 {
        return None;
    }
    let limit = c.memory_limit(&vm.id).map(|b| b >> 20).unwrap_or(0);
    Some(format!(
        "the kernel's OOM killer stopped the VM: its VMM and helpers used more than their \
         memory limit of {limit} MiB ({} MiB of guest memory + {} MiB for the VMM); \
         give it more with --memory, or raise bangerd --vmm-memory-overhead",
        vm.spec.sizing.memory_mib, host.cfg.vmm_memory_overhead_mib
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep takes back this daemon's grants that no running VM holds,
    /// keeps a running VM's, and leaves another daemon's (a uid outside
    /// its range, on a hard-linked inode) alone.
    #[test]
    fn a_sweep_revokes_only_this_daemons_stale_grants() {
        let tmp = tempfile::tempdir().unwrap();
        let d = crate::daemon::testutil::daemon(tmp.path());
        let dir = d.cfg.layout.image_dir(banger_guest::image::DEFAULT_IMAGE);
        let base = d.cfg.vmm_uid_base;
        let (stale, running, elsewhere) = (base + 5, base + 6, base - 1);
        let f = dir.join("rootfs.ext4");
        for uid in [stale, running, elsewhere] {
            if let Err(e) = banger_host::acl::grant_read(&f, uid) {
                eprintln!("NOT RUN: no ACLs here ({e})");
                return;
            }
        }
        sweep_grants(&d.host(), &[(dir.clone(), running)]).unwrap();
        let mut users = banger_host::acl::users(&f).unwrap();
        users.sort();
        assert_eq!(users, vec![elsewhere, running]);
        // The image goes: the running VM's grant too (none may use it by
        // then), another daemon's stays.
        revoke_all(&d.host(), &dir).unwrap();
        assert_eq!(banger_host::acl::users(&f).unwrap(), vec![elsewhere]);
    }
}
