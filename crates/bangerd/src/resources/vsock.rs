//! The VM's vsock: a context id unique among live VMs (chosen under the
//! network lock, durable in the runtime, reserved until the VM's release
//! is done), the hybrid vsock's Unix socket in the VM's runtime dir, the
//! listener the guest agent says hello on (`<socket>_1025`), and for QEMU
//! the process that speaks Firecracker's host-side protocol on that
//! socket: `banger-vport` behind a virtio-serial port (the agent channel a
//! snapshot keeps), or `vhost-device-vsock` behind a vsock device for an
//! image whose initramfs lacks the virtio-serial driver. Above the
//! socket, both VMMs are one code path.

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_agent::proto::HELLO_PORT;
use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord, VmmKind};
use banger_host::fsutil::{self, WrapIo};
use banger_host::process::{self, ProcId};

use super::{held, Acq, End, Item, Resource};
use crate::daemon::lock;
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Vsock;

/// The first CID a guest may have (0-2 are the hypervisor, loopback and
/// the host).
const FIRST_CID: u32 = 3;
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Where guest-initiated connections to host port `port` arrive.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// The lowest CID from 3 up that `used` does not hold.
pub fn lowest_free(used: &[u32]) -> u32 {
    (FIRST_CID..)
        .find(|c| !used.contains(c))
        .unwrap_or(FIRST_CID)
}

impl Resource for Vsock {
    fn name(&self) -> &'static str {
        "vsock"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Vsock]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Confinement]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let rt_dir = host.cfg.layout.vm_runtime_dir(&cx.vm.id);
        fsutil::create_dir_all(&rt_dir)?;
        // QEMU's agent channel rides a virtio-serial port (which a
        // snapshot keeps) where the image's initramfs can serve it and
        // `banger-vport` is installed; else a vsock device.
        let vport = cx.vm.spec.vmm == VmmKind::Qemu
            && host.cfg.vport.is_some()
            && banger_guest::initramfs::supports_vport(&host.image_initrd(cx.img)?);
        // In the jail's chroot for a jailed Firecracker (which binds it).
        let uds = super::jail::socket_dir(host, cx.vm).join(vmfiles::VSOCK);
        {
            let _n = lock(host.net_lock);
            let store = host.store();
            let used: Vec<u32> = store
                .list_vms()?
                .iter()
                .filter(|v| v.id != cx.vm.id)
                .filter_map(|v| v.runtime.vsock_cid)
                .chain(held::Reserved::of(&store.list_releases()?).cids)
                .collect();
            drop(store);
            cx.vm.runtime.vsock_cid = Some(lowest_free(&used));
            cx.vm.runtime.vsock_path = Some(uds.clone());
            cx.vm.runtime.vport = vport;
            // Saved under the lock: the next allocation sees it.
            host.save(cx.vm)?;
        }
        let hello = port_path(&uds, HELLO_PORT);
        for p in [&uds, &hello, &rt_dir.join(vmfiles::VSOCK_BACKEND)] {
            fsutil::remove_file_if_exists(p)?;
        }
        cx.hello = Some(UnixListener::bind(&hello).with_path("listen on", &hello)?);
        let id = super::jail::identity(host, cx.vm)?;
        // The backend, as the VM's user, connects to it.
        super::jail::hand_over(id.as_ref(), &[&hello])?;
        if cx.vm.spec.vmm == VmmKind::Qemu {
            let cid = cx.vm.runtime.vsock_cid.unwrap_or(FIRST_CID);
            let mut confine = super::jail::confinement(host, cx.vm, id)?;
            let vport = cx.vm.runtime.vport;
            // banger-vport may be a build tree's, under /tmp, which a
            // private /tmp would hide from its own exec; it writes no
            // files (QEMU keeps its private /tmp).
            if vport {
                confine.private_tmp = false;
            }
            let (id, up) = spawn_backend(host, cx.vm, cid, &uds, &confine, vport)?;
            // The backend runs and is not recorded yet: found again by the
            // socket its command line names.
            crate::failpoint::hit("start.vsock.spawned")?;
            cx.handles.vsock_pid = Some(id.pid);
            cx.handles.vsock_start_time = Some(id.start_time);
            up?;
        }
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        let rt_dir = host.cfg.layout.vm_runtime_dir(&vm.id);
        let uds = vm
            .runtime
            .vsock_path
            .clone()
            .unwrap_or_else(|| rt_dir.join(vmfiles::VSOCK));
        let backend = match (h.vsock_pid, h.vsock_start_time) {
            (Some(pid), Some(start_time)) => {
                Some(ProcId { pid, start_time }).filter(ProcId::exists)
            }
            // Every record lost: the process whose command line names the
            // VM's socket.
            _ => process::find_by_arg_as(&process::path_needle(&uds), host.expect_vmm(vm))
                .first()
                .and_then(|p| ProcId::of(*p)),
        };
        let files: Vec<PathBuf> = [
            uds.clone(),
            port_path(&uds, HELLO_PORT),
            rt_dir.join(vmfiles::VSOCK_BACKEND),
        ]
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
        if backend.is_none() && files.is_empty() && vm.runtime.vsock_cid.is_none() {
            return None;
        }
        Some(Item::Vsock(held::Vsock {
            cid: vm.runtime.vsock_cid,
            pid: backend.map(|b| b.pid),
            start_time: backend.map(|b| b.start_time),
            paths: files,
        }))
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        let Item::Vsock(h) = &held else {
            return Err(super::mismatch(self, &vm.name, &held));
        };
        // The backend only serves the VMM, which is gone (or going) by
        // now; a backend that will not die is retried after the reply.
        if let Some(id) = h.backend() {
            let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
        }
        match super::remove_files(&h.paths) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(vm = %vm.name, err = %e, "removing vsock sockets; retried after the reply")
            }
        }
        // What is left: the CID's reservation (and a backend still dying),
        // released after the reply.
        Ok(Some(held))
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Vsock(held) = held else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        if let Some(id) = held.backend() {
            if !id.kill_and_wait(KILL_WAIT) {
                return Err(DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "vsock",
                    reason: format!("the vsock backend (pid {}) survives SIGKILL", id.pid),
                });
            }
        }
        super::remove_files(&held.paths)
    }
}

/// Starts the VM's agent channel process for QEMU: `banger-vport`
/// behind the virtio-serial port with `vport`, else `vhost-device-vsock`
/// behind a vsock device. Either serves Firecracker's hybrid-vsock
/// interface on `uds`; QEMU connects to its other socket once it
/// listens. The process is returned even when it failed to listen, so
/// that the caller records it for the teardown.
fn spawn_backend(
    host: &Host<'_>,
    vm: &VmRecord,
    cid: u32,
    uds: &Path,
    confine: &banger_host::confine::Confinement,
    vport: bool,
) -> Result<(ProcId, Result<()>)> {
    let rt_dir = host.cfg.layout.vm_runtime_dir(&vm.id);
    let socket = rt_dir.join(vmfiles::VSOCK_BACKEND);
    let (what, binary) = if vport {
        ("banger-vport", host.cfg.vport.clone())
    } else {
        ("vhost-device-vsock", host.cfg.vsock_backend.clone())
    };
    let binary = binary.ok_or_else(|| {
        DaemonError::Invalid(format!(
            "vm {:?}: QEMU's agent channel needs {what}, which is not installed: \
             run ./scripts/setup.sh (the package ships it)",
            vm.name
        ))
    })?;
    let log_path = host.cfg.layout.vm_dir(&vm.id).join(vmfiles::VSOCK_LOG);
    let log = std::fs::File::create(&log_path).with_path("create", &log_path)?;
    let log2 = log.try_clone().with_path("dup", &log_path)?;
    let mut cmd = Command::new(&binary);
    confine
        .apply(&mut cmd)
        .map_err(|e| DaemonError::Invalid(format!("vm {:?}: {e}", vm.name)))?;
    if vport {
        cmd.arg("--port-socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(uds)
            // The agent's hello is the only stream a guest may open.
            .arg("--guest-port")
            .arg(HELLO_PORT.to_string());
    } else {
        cmd.arg("--guest-cid")
            .arg(cid.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(uds);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Not in the daemon's process group: a Ctrl-C on a foreground
        // daemon leaves running guests their vsock.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            DaemonError::Invalid(format!("vm {:?}: start {}: {e}", vm.name, binary.display()))
        })?;
    let (id, up) = super::backend::await_socket(child, what, &socket, &log_path, BACKEND_START);
    let up = up.map_err(|reason| DaemonError::Boot {
        vm: vm.name.clone(),
        reason,
    });
    Ok((id, up))
}

/// How long the vsock backend may take to listen.
const BACKEND_START: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_start_at_three_and_fill_gaps() {
        assert_eq!(lowest_free(&[]), 3);
        assert_eq!(lowest_free(&[3, 4, 6]), 5);
        assert_eq!(lowest_free(&[4]), 3);
    }

    #[test]
    fn guest_connections_arrive_on_port_suffixed_sockets() {
        assert_eq!(
            port_path(Path::new("/run/banger/vms/x/vsock.sock"), 1025),
            PathBuf::from("/run/banger/vms/x/vsock.sock_1025")
        );
    }
}
