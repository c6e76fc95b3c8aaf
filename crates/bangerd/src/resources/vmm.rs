//! The VMM process (QEMU or Firecracker), identified by its pid and start
//! time (recorded in the handles the moment it is spawned), with its API
//! socket and console log. Killed and waited for before a stop, kill or
//! rollback answers; a deleted VM's is only sent SIGKILL, and the release
//! waits for it. A VMM that survives SIGKILL (uninterruptible sleep in the
//! kernel) stops the teardown: its tap and disks stay in use, the VM is
//! not marked stopped, and it cannot be started on the same disks.

use std::time::Duration;

use banger_core::api::Event;
use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil;
use banger_host::process::{self, ProcId};
use nix::sys::signal::Signal;

use super::{held, root_disk, Acq, End, Item, Resource};
use crate::daemon::kernel_cmdline;
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct VmmProcess;

/// A pod VM's tap queue, opened in its pod's namespace: the very
/// namespace its tap was made in, and the tap bearing the VM's mark.
fn pod_queue(vm: &VmRecord, p: &banger_core::PodLink) -> Result<std::os::fd::OwnedFd> {
    let bad = |e: banger_host::podnet::PodNetError| {
        DaemonError::Invalid(format!("vm {:?}: {e}", vm.name))
    };
    let ns = banger_host::podnet::Netns::open(&p.netns).map_err(bad)?;
    if ns.id().map_err(bad)? != p.netns_id {
        return Err(DaemonError::Invalid(format!(
            "vm {:?}: pod network namespace {} is not the one its tap was made in any more",
            vm.name,
            p.netns.display()
        )));
    }
    ns.open_queue(&super::tap::pod_mark(&vm.id)).map_err(bad)
}

/// How long a SIGKILLed VMM may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The VMM the handles name, if that very process still exists; failing
/// a recorded identity, the process whose command line carries the VM's
/// API socket (the seeds' `pgrep -f <apiSock>`: only when every record of
/// it is lost, and only for a VM that may be up).
pub fn find(vm: &VmRecord, h: &VmHandles, expect: process::Expect) -> Option<ProcId> {
    if let (Some(pid), Some(start_time)) = (h.pid, h.vmm_start_time) {
        let id = ProcId { pid, start_time };
        return id.exists().then_some(id);
    }
    let api = vm.runtime.api_sock_path.as_ref()?;
    // A jailed Firecracker's command line names its socket as seen in its
    // chroot; its `--id` is the VM's id.
    let in_jail = api
        .parent()
        .and_then(std::path::Path::parent)
        .and_then(std::path::Path::file_name)
        .and_then(|n| n.to_str())
        // The jail id is a prefix of the VM's id (16 digits; 8 in older
        // bangers).
        .filter(|n| n.len() >= 8 && vm.id.starts_with(*n))
        .map(str::to_string);
    let needle = match &in_jail {
        Some(id) => id.clone(),
        None => process::path_needle(api),
    };
    let in_jail = in_jail.is_some();
    // The jailer gives the chroot to the VM's user.
    let jailed_uid = api
        .parent()
        .and_then(|root| root.metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    // (Under the jailer other processes' arguments may name the chroot,
    // and so the id, too: the VMM is a Firecracker whose `--id` is the
    // id, running as the VM's user.)
    let id_arg = needle.clone();
    let uid = jailed_uid;
    let the_vmm = |p: &i32| {
        if !in_jail {
            return true;
        }
        let args = process::cmdline(*p).unwrap_or_default();
        let is_fc = args.first().is_some_and(|a0| {
            std::path::Path::new(a0)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("firecracker"))
        });
        let has_id = args.windows(2).any(|w| w[0] == "--id" && w[1] == id_arg)
            || args.iter().any(|a| *a == format!("--id={id_arg}"));
        let owner = banger_host::confine::observe(*p).and_then(|o| o.uids.first().copied());
        is_fc && has_id && uid.is_some() && owner == uid
    };
    let pid = match h.pid {
        Some(p) if process::matches(p, &needle) && expect.admits(p) && the_vmm(&p) => p,
        _ if vm.runtime.state().is_up() => *process::find_by_arg_as(&needle, expect)
            .iter()
            .find(|p| the_vmm(p))?,
        _ => return None,
    };
    ProcId::of(pid)
}

fn survives(vm: &str, id: ProcId) -> DaemonError {
    DaemonError::VmmSurvives {
        vm: vm.to_string(),
        pid: id.pid,
        state: process::state(id.pid).unwrap_or('?'),
    }
}

impl Resource for VmmProcess {
    fn name(&self) -> &'static str {
        "vmm"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Vmm]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[
            super::Handoff::Tap,
            super::Handoff::Initrd,
            super::Handoff::RootDisk,
            super::Handoff::WorkDisk,
            super::Handoff::DmDevice,
            super::Handoff::Volumes,
            super::Handoff::Confinement,
            super::Handoff::Vsock,
            super::Handoff::Mounts,
            super::Handoff::Ram,
        ]
    }

    fn phase(&self) -> &'static str {
        "spawn"
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let vmm = host.vmm(cx.vm.spec.vmm)?;
        let dir = host.cfg.layout.vm_dir(&cx.vm.id);
        let rt_dir = host.cfg.layout.vm_runtime_dir(&cx.vm.id);
        fsutil::create_dir_all(&rt_dir)?;
        // In the jail's chroot for a jailed Firecracker.
        let api_sock = super::jail::socket_dir(host, cx.vm).join(vmfiles::API_SOCK);
        fsutil::remove_file_if_exists(&api_sock)?;
        let console = dir.join(vmfiles::CONSOLE_LOG);
        crate::console::reset(&console)?;
        cx.vm.runtime.api_sock_path = Some(api_sock.clone());
        cx.vm.runtime.log_path = Some(console.clone());
        let pod = cx.vm.runtime.pod_link.clone();
        let (tap, mac) = match &pod {
            Some(p) => (p.tap.clone(), p.mac.clone()),
            None => {
                let tap = cx.handles.tap_device.clone().ok_or_else(|| {
                    DaemonError::Invalid(format!("vm {:?} has no tap for its VMM", cx.vm.name))
                })?;
                (tap, host.guest_net(cx.vm)?.mac())
            }
        };
        let initrd = cx.initrd.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {:?} has no initrd for its VMM", cx.vm.name))
        })?;
        let (root, upper) = root_disk::vmm_disks(host, cx.vm, cx.img, &cx.handles)?;
        let id = super::jail::identity(host, cx.vm)?;
        // A confined QEMU cannot open /dev/net/tun: it gets its tap as a
        // descriptor (held here until the spawn is done).
        // A pod VM's tap is in its pod's namespace: opened there, for
        // QEMU (the only VMM a pod VM is given) to use from its own.
        let tap_fd = match (&pod, &id, cx.vm.spec.vmm) {
            (Some(p), _, banger_core::VmmKind::Qemu) => Some(pod_queue(cx.vm, p)?),
            (Some(_), _, banger_core::VmmKind::Firecracker) => {
                return Err(DaemonError::Invalid(format!(
                    "vm {:?}: a pod network is QEMU's (Firecracker opens its tap by name)",
                    cx.vm.name
                )))
            }
            (None, Some(_), banger_core::VmmKind::Qemu) => {
                Some(banger_host::tap::open_queue(&tap)?)
            }
            _ => None,
        };
        // Its RAM file (`ram`), as a descriptor it inherits (held here
        // until the spawn is done).
        let ram = match &cx.vm.runtime.ram_path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| DaemonError::Invalid(format!("{}: {e}", p.display())))?,
            ),
            None => None,
        };
        let vmm_cfg = banger_vmm::VmConfig {
            name: cx.vm.name.clone(),
            vcpus: cx.vm.spec.sizing.cpus,
            memory_mib: cx.vm.spec.sizing.memory_mib,
            kernel: cx.img.kernel.clone(),
            initrd,
            cmdline: kernel_cmdline(cx.vm.spec.sizing.cpus, cx.vm.runtime.vport),
            disks: vec![
                root,
                banger_vmm::Disk {
                    id: "work".into(),
                    path: dir.join(vmfiles::WORK_DISK),
                    format: "raw".into(),
                    read_only: false,
                },
            ]
            .into_iter()
            // Named volumes after them, in the spec's order (vdc, vdd, ...).
            .chain(cx.vm.spec.volumes.iter().map(|m| banger_vmm::Disk {
                id: format!("vol-{}", m.name),
                path: host.cfg.layout.volume(&m.name),
                format: "raw".into(),
                read_only: false,
            }))
            // The overlay strategy's upper disk last (`overlay::guest_device`).
            .chain(upper)
            .collect(),
            nics: vec![banger_vmm::Nic {
                tap,
                mac,
                mtu: pod.as_ref().map(|p| p.mtu),
                fd: tap_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            }],
            console_log: console,
            vmm_log: dir.join(vmfiles::VMM_LOG),
            api_sock,
            vsock: cx
                .vm
                .runtime
                .vsock_cid
                .zip(cx.vm.runtime.vsock_path.clone())
                .map(|(cid, uds_path)| banger_vmm::Vsock {
                    cid,
                    uds_path,
                    backend: rt_dir.join(vmfiles::VSOCK_BACKEND),
                    serial: cx.vm.runtime.vport,
                }),
            shares: (0..cx.vm.spec.mounts.len())
                .map(|i| banger_vmm::FsShare {
                    tag: banger_core::mount::HostMount::tag(i),
                    socket: super::virtiofs::socket(&rt_dir, i),
                })
                .collect(),
            // The jailer starts as root and drops to the identity itself.
            confine: super::jail::confinement(
                host,
                cx.vm,
                id.clone().filter(|_| !super::jail::jailed(host, cx.vm)),
            )?,
            jail: super::jail::jail_spec(host, cx.vm)?,
            ram_fd: ram.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            incoming: cx.vm.runtime.restore.is_some(),
        };
        // The files it opens become its identity's (the read-only ones are
        // the image's, which it reads through the images' group).
        let mut mine: Vec<&std::path::Path> = vec![&vmm_cfg.console_log, &vmm_cfg.initrd];
        mine.extend(
            vmm_cfg
                .disks
                .iter()
                .filter(|disk| !disk.read_only)
                .map(|disk| disk.path.as_path()),
        );
        super::jail::hand_over(id.as_ref(), &mine)?;
        // A Firecracker restore: the snapshot's files in its chroot first.
        if let (Some(snap), banger_core::VmmKind::Firecracker) =
            (&cx.vm.runtime.restore, cx.vm.spec.vmm)
        {
            let snap = crate::snapshots::restorable(host, snap, cx.vm)?;
            crate::fcsnap::stage(host, cx.vm, &snap)?;
        }
        let spawned = vmm.spawn(&vmm_cfg)?;
        drop(tap_fd);
        drop(ram);
        let start_time = process::start_time(spawned.pid);
        // Watched (and so reaped) before anything else can fail.
        if let Some(child) = spawned.child {
            crate::reaper::watch(child);
        }
        // The VMM runs and is not recorded yet: found again by its
        // command line, owner and age.
        crate::failpoint::hit("start.vmm.spawned")?;
        cx.handles.pid = Some(spawned.pid);
        cx.handles.vmm_start_time = start_time;
        (cx.events)(Event::Progress {
            message: match &cx.vm.runtime.restore {
                Some(snap) => format!(
                    "restoring {} from snapshot {snap} ({} {})",
                    cx.vm.name, cx.vm.spec.vmm, cx.vm.spec.accel
                ),
                None => format!(
                    "booting {} ({} {})",
                    cx.vm.name, cx.vm.spec.vmm, cx.vm.spec.accel
                ),
            },
        });
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        let sock = vm.runtime.api_sock_path.clone();
        let held = match find(vm, h, host.expect_vmm(vm)) {
            Some(id) => held::Vmm {
                pid: Some(id.pid),
                start_time: Some(id.start_time),
                sock,
            },
            None => held::Vmm {
                pid: None,
                start_time: None,
                sock: Some(sock.filter(|s| s.exists())?),
            },
        };
        Some(Item::Vmm(held))
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, how: End) -> Result<Option<Item>> {
        let Item::Vmm(h) = &held else {
            return Err(super::mismatch(self, &vm.name, &held));
        };
        let rest = match h.process() {
            // A VM with volumes: its VMM is gone before they are detached
            // (`volumes.rs`, next in the teardown), or the next VM to
            // attach one meets the dying VMM's lock on it.
            Some(id) if how.wait_vmm || !vm.spec.volumes.is_empty() => {
                // (The failpoint plays a VMM that survives: the test build
                // cannot put a process in state D on demand.)
                let survived =
                    crate::failpoint::hit("vmm.kill").is_err() || !id.kill_and_wait(KILL_WAIT);
                if survived {
                    return Err(survives(&vm.name, id));
                }
                None
            }
            Some(id) => {
                process::deprioritize(id.pid);
                let _ = id.signal(Signal::SIGKILL);
                Some(Item::Vmm(held::Vmm {
                    pid: Some(id.pid),
                    start_time: Some(id.start_time),
                    sock: None,
                }))
            }
            None => None,
        };
        if let Some(s) = &h.sock {
            fsutil::remove_file_if_exists(s)?;
        }
        Ok(rest)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Vmm(held) = held else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        let Some(id) = held.process() else {
            return Ok(());
        };
        if id.kill_and_wait(KILL_WAIT) {
            Ok(())
        } else {
            Err(survives(&r.vm_name, id))
        }
    }

    fn blocks_teardown(&self) -> bool {
        true
    }
}
