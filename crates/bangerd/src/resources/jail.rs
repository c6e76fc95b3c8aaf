//! What confines a VM's processes (issue: a guest that escapes its VMM
//! gets nothing): a cgroup with the VM's limits, which its VMM and the
//! VMM's helpers start in, and for QEMU an unprivileged identity of its
//! own that owns exactly the files and sockets its VMM uses.
//!
//! - **Identity**: uid = gid = `--vmm-uid-base` + the VM's address slot
//!   (unique among the instance's VMs, stable for the VM's life, so its
//!   files keep their owner across stop/start; the daemon claims its range
//!   host-wide at start, `crate::uids`), with one supplementary
//!   group, `--vmm-images-gid`, which may read the images (`kvm`'s group is
//!   added where the VMM uses KVM). Firecracker keeps root until it runs
//!   under its jailer; it gets the cgroup all the same.
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
use serde_json::{json, Value};

use super::{Acq, End, Resource};
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Jail;

impl Daemon {
    /// The host's cgroup hierarchy, or why a VM cannot be confined here.
    pub fn cgroups(&self) -> Result<&Cgroups> {
        self.cgroups
            .as_ref()
            .map_err(|e| DaemonError::Unsupported(e.clone()))
    }
}

/// Whether the VM's Firecracker runs under its jailer.
pub fn jailed(d: &Daemon, vm: &VmRecord) -> bool {
    vm.spec.vmm == VmmKind::Firecracker && d.cfg.jailer.is_some()
}

/// Where the jailer puts its chroots (on the VMs' filesystem: the files a
/// jailed Firecracker opens are hard-linked in).
pub fn chroot_base(d: &Daemon) -> PathBuf {
    d.cfg.layout.state_dir.join("jail")
}

/// The jailed Firecracker's `/` for this VM, if it is jailed.
pub fn chroot(d: &Daemon, vm: &VmRecord) -> Option<PathBuf> {
    let fc = d.cfg.firecracker.as_ref()?;
    jailed(d, vm).then(|| banger_vmm::jailer::chroot_dir(&chroot_base(d), fc, jail_id(vm)))
}

/// Where the VM's VMM makes its sockets (API, vsock): its runtime dir, or
/// its chroot when jailed.
pub fn socket_dir(d: &Daemon, vm: &VmRecord) -> PathBuf {
    chroot(d, vm).unwrap_or_else(|| d.cfg.layout.vm_runtime_dir(&vm.id))
}

/// The identity the VM's VMM and vsock backend run as; none where the VMM
/// keeps root (Firecracker without its jailer). A jailed Firecracker's
/// group is the images' (the jailer leaves it no supplementary group).
pub fn identity(d: &Daemon, vm: &VmRecord) -> Result<Option<Identity>> {
    let fc_jailed = jailed(d, vm);
    if vm.spec.vmm != VmmKind::Qemu && !fc_jailed {
        return Ok(None);
    }
    let slot = d.guest_net(vm)?.slot;
    let base = d.cfg.vmm_uid_base;
    let uid = base.checked_add(slot).ok_or_else(|| {
        DaemonError::Invalid(format!(
            "vm {:?}: --vmm-uid-base {base} + slot {slot} overflows a uid",
            vm.name
        ))
    })?;
    let images = d.cfg.vmm_images_gid;
    let mut groups = vec![images];
    // The accelerator the VMM uses now (a VM created before KVM was
    // usable boots with it once it is).
    let accel = d
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
pub fn jail_spec(d: &Daemon, vm: &VmRecord) -> Result<Option<banger_vmm::jailer::JailSpec>> {
    let (Some(jailer), true) = (d.cfg.jailer.clone(), jailed(d, vm)) else {
        return Ok(None);
    };
    let Some(id) = identity(d, vm)? else {
        return Ok(None);
    };
    Ok(Some(banger_vmm::jailer::JailSpec {
        jailer,
        chroot_base: chroot_base(d),
        id: jail_id(vm).to_string(),
        uid: id.uid,
        gid: id.gid,
    }))
}

/// The jail dir the jailer makes for a jailed VM (`<base>/<exec
/// name>/<jail id>`), where no handle recorded it.
fn jail_dir(d: &Daemon, vm: &VmRecord) -> Option<PathBuf> {
    let fc = d.cfg.firecracker.as_ref().filter(|_| jailed(d, vm))?;
    Some(banger_vmm::jailer::jail_dir(
        &chroot_base(d),
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
pub fn confinement(d: &Daemon, vm: &VmRecord, id: Option<Identity>) -> Result<Confinement> {
    Ok(Confinement {
        // A confined process needs no network (QEMU has its tap as a
        // descriptor; the vsock backend speaks Unix sockets): it gets an
        // empty network namespace of its own. (A jailed Firecracker opens
        // its tap by name: the host's namespace.)
        new_netns: id.is_some() && vm.spec.vmm == VmmKind::Qemu,
        private_tmp: id.is_some() && vm.spec.vmm == VmmKind::Qemu,
        max_file_bytes: None,
        identity: id,
        cgroup_procs: d.cgroups()?.procs_files(&vm.id),
    })
}

/// The VM's limits.
pub fn limits(d: &Daemon, vm: &VmRecord) -> Limits {
    let s = &vm.spec.sizing;
    Limits {
        memory_bytes: (s.memory_mib + d.cfg.vmm_memory_overhead_mib) << 20,
        pids: d.cfg.vmm_pids_max,
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

fn volumes(d: &Daemon, vm: &VmRecord) -> Vec<PathBuf> {
    vm.spec
        .volumes
        .iter()
        .map(|m| d.cfg.layout.volume(&m.name))
        .collect()
}

/// Gives the VM's volumes back to root, each only while this VM's user
/// still owns it (a release after the reply must not take a volume from
/// the VM that has it since), under the volume lock that attaching them
/// takes too.
fn give_back_volumes(d: &Daemon, held: &Value) -> Result<()> {
    let Some(uid) = held["uid"].as_u64().and_then(|u| u32::try_from(u).ok()) else {
        return Ok(());
    };
    let _v = crate::daemon::lock(&d.volume_lock);
    for p in held["volumes"].as_array().into_iter().flatten() {
        if let Some(p) = p.as_str().map(Path::new) {
            if p.symlink_metadata().is_ok_and(|m| m.uid() == uid) {
                chown(p, 0, 0, 0o600)?;
            }
        }
    }
    Ok(())
}

/// Removes a jailed Firecracker's chroot (links to the VM's files, device
/// nodes, its sockets): only ever a dir under the chroot base.
fn remove_jail(d: &Daemon, held: &Value) -> Result<()> {
    if let Some(p) = held["jail"].as_str().map(PathBuf::from) {
        if p.starts_with(chroot_base(d)) {
            banger_host::fsutil::remove_dir_all_if_exists(&p)?;
        }
    }
    Ok(())
}

fn cgroup_dirs(held: &Value) -> Vec<PathBuf> {
    held["cgroup"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(PathBuf::from))
        .collect()
}

/// Kills what is left in the VM's cgroup and waits up to `wait` for it to
/// be empty; whether it is.
fn kill_cgroup(d: &Daemon, held: &Value, wait: std::time::Duration) -> bool {
    let Ok(c) = d.cgroups() else {
        return true;
    };
    let dirs = cgroup_dirs(held);
    let end = std::time::Instant::now() + wait;
    loop {
        c.kill_all(&dirs);
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

fn remove_cgroup(d: &Daemon, vm_id: &str, held: &Value, wait: bool) -> Result<()> {
    let Ok(c) = d.cgroups() else {
        return Ok(());
    };
    // The dirs recorded (the daemon's own cgroup may have moved since).
    let mut dirs = cgroup_dirs(held);
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

    fn phase(&self) -> &'static str {
        "confine"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let c: &Cgroups = d.cgroups()?;
        // Recorded first: a failed create leaves nothing, a later failure
        // finds the dirs in the handles.
        cx.handles.cgroup_dirs = c.dirs(&cx.vm.id);
        c.create(&cx.vm.id, &limits(d, cx.vm))
            .map_err(|e| DaemonError::Invalid(format!("vm {:?}: {e}", cx.vm.name)))?;
        let Some(id) = identity(d, cx.vm)? else {
            return Ok(());
        };
        let l = &d.cfg.layout;
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
        {
            let _v = crate::daemon::lock(&d.volume_lock);
            for v in volumes(d, cx.vm) {
                chown(&v, id.uid, id.gid, 0o600)?;
            }
        }
        if let Some(root) = chroot(d, cx.vm) {
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

    fn held(&self, d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        let dirs: Vec<PathBuf> = if h.cgroup_dirs.is_empty() {
            d.cgroups().map(|c| c.dirs(&vm.id)).unwrap_or_default()
        } else {
            h.cgroup_dirs.clone()
        };
        let dirs: Vec<PathBuf> = dirs.into_iter().filter(|p| p.exists()).collect();
        // Only the volumes this VM's user owns (a volume another running
        // VM has is that VM's user's, and stays so).
        let me = d
            .guest_net(vm)
            .ok()
            .and_then(|n| d.cfg.vmm_uid_base.checked_add(n.slot));
        let vols: Vec<PathBuf> = volumes(d, vm)
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
            .filter(|p| p.starts_with(chroot_base(d)))
            .map(Path::to_path_buf);
        let jail = h
            .jail_dir
            .clone()
            .or(from_api)
            .or_else(|| jail_dir(d, vm))
            .filter(|p| p.exists());
        (!dirs.is_empty() || !vols.is_empty() || jail.is_some())
            .then(|| json!({ "cgroup": dirs, "volumes": vols, "uid": me, "jail": jail }))
    }

    fn end(&self, d: &Daemon, vm: &VmRecord, held: Value, how: End) -> Result<Option<Value>> {
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
        if !kill_cgroup(d, &held, wait) {
            return Ok(Some(held));
        }
        give_back_volumes(d, &held)?;
        remove_jail(d, &held)?;
        // Busy while a deleted VM's VMM is still dying: after the reply.
        match remove_cgroup(d, &vm.id, &held, false) {
            Ok(()) => Ok(None),
            Err(_) => Ok(Some(json!({ "cgroup": held["cgroup"] }))),
        }
    }

    fn release(&self, d: &Daemon, r: &Release, held: &Value) -> Result<()> {
        // Everything of the VM gone first (as in `end`), then its volumes
        // and jail.
        remove_cgroup(d, &r.vm_id, held, true)?;
        give_back_volumes(d, held)?;
        remove_jail(d, held)
    }
}

/// Why a VMM that exited on its own did, if the kernel's OOM killer
/// killed it (or a helper) in the VM's cgroup.
pub fn oom_message(d: &Daemon, vm: &VmRecord) -> Option<String> {
    let c = d.cgroups().ok()?;
    let kills = c.oom_kills(&vm.id)?;
    if kills == 0 {
        return None;
    }
    let limit = c.memory_limit(&vm.id).map(|b| b >> 20).unwrap_or(0);
    Some(format!(
        "the kernel's OOM killer stopped the VM: its VMM and helpers used more than their \
         memory limit of {limit} MiB ({} MiB of guest memory + {} MiB for the VMM); \
         give it more with --memory, or raise bangerd --vmm-memory-overhead",
        vm.spec.sizing.memory_mib, d.cfg.vmm_memory_overhead_mib
    ))
}
