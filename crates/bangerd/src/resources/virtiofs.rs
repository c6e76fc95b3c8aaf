//! Host directories in the guest (`--mount /host:/guest[:ro]`): one
//! `virtiofsd` per mount, started before QEMU (which connects to its
//! vhost-user socket, `fs<i>.sock` in the VM's runtime dir, as a
//! `vhost-user-fs-pci` device tagged `banger<i>`); the guest's initramfs
//! mounts each tag. virtiofsd sandboxes itself (its own mount, pid and net
//! namespaces, `pivot_root` into the shared dir, seccomp). A read-only
//! mount is read-only on the host's side: virtiofsd starts in a mount
//! namespace of its own where the directory is bind-mounted read-only, so
//! a guest that remounts it read-write still cannot write. Firecracker has
//! no virtio-fs: such a create is refused, pointing at volumes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_core::mount::{HostMount, MAX_MOUNTS};
use banger_core::volume::VolumeMount;
use banger_core::{Release, VmHandles, VmRecord, VmmKind};
use banger_host::fsutil::{self, WrapIo};
use banger_host::process::{self, ProcId};
use serde_json::{json, Value};

use super::vsock::DirWatch;
use super::{Acq, End, Resource};
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Virtiofs;

/// How long a virtiofsd may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The vhost-user socket of the `i`th mount, in the VM's runtime dir.
pub fn socket(rt_dir: &Path, i: usize) -> PathBuf {
    rt_dir.join(format!("fs{i}.sock"))
}

impl Daemon {
    /// A create's `--mount`s: QEMU only, virtiofsd installed, existing
    /// host directories, guest paths distinct from each other, from the
    /// volumes' and from /work.
    pub(crate) fn check_host_mounts(
        &self,
        name: &str,
        vmm: VmmKind,
        mounts: &[HostMount],
        volumes: &[VolumeMount],
    ) -> Result<()> {
        if mounts.is_empty() {
            return Ok(());
        }
        if vmm == VmmKind::Firecracker {
            return Err(DaemonError::Unsupported(format!(
                "vm {name:?}: --mount needs virtio-fs, which Firecracker does not have: put the \
                 data on a volume (`banger volume create NAME`, then --volume NAME:/path), or \
                 boot with --vmm qemu"
            )));
        }
        if self.cfg.virtiofsd.is_none() {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?}: --mount needs virtiofsd, which is not installed: run \
                 ./scripts/install-deps.sh (Debian ships it with qemu-system-common)"
            )));
        }
        if mounts.len() > MAX_MOUNTS {
            return Err(DaemonError::Invalid(format!(
                "{} --mounts: a VM takes at most {MAX_MOUNTS}",
                mounts.len()
            )));
        }
        for (i, m) in mounts.iter().enumerate() {
            if !m.host.is_dir() {
                return Err(DaemonError::Invalid(format!(
                    "--mount {m}: {} is not a directory on the host",
                    m.host.display()
                )));
            }
            let taken = mounts[..i].iter().any(|o| o.path == m.path)
                || volumes.iter().any(|v| v.path == m.path)
                || m.path == "/work";
            if taken {
                return Err(DaemonError::Invalid(format!(
                    "--mount {m}: {} is already a mount point",
                    m.path
                )));
            }
        }
        Ok(())
    }
}

fn ids(held: &Value) -> Vec<ProcId> {
    held["procs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some(ProcId {
                        pid: i32::try_from(p["pid"].as_i64()?).ok()?,
                        start_time: p["start_time"].as_u64()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Resource for Virtiofs {
    fn name(&self) -> &'static str {
        "virtiofs"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        if cx.vm.spec.mounts.is_empty() {
            return Ok(());
        }
        let binary = d.cfg.virtiofsd.clone().ok_or_else(|| {
            DaemonError::Invalid(format!(
                "vm {:?}: --mount needs virtiofsd: run ./scripts/install-deps.sh",
                cx.vm.name
            ))
        })?;
        let rt_dir = d.cfg.layout.vm_runtime_dir(&cx.vm.id);
        fsutil::create_dir_all(&rt_dir)?;
        for (i, m) in cx.vm.spec.mounts.clone().iter().enumerate() {
            // A directory a caller who is not root shared is still theirs
            // (not swapped for a link since it was checked).
            if let Some(uid) = m.owner {
                crate::access::owned_by(uid, None, &m.host, "--mount")?;
            }
            let sock = socket(&rt_dir, i);
            fsutil::remove_file_if_exists(&sock)?;
            let log = d
                .cfg
                .layout
                .vm_dir(&cx.vm.id)
                .join(format!("virtiofsd-{i}.log"));
            // virtiofsd keeps root (its own sandbox needs it) but starts in
            // the VM's cgroup; its socket is the VMM's to connect to.
            let confine = super::jail::confinement(d, cx.vm, None)?;
            let (id, up) = spawn(&binary, m, &sock, &log, &cx.vm.name, &confine)?;
            // Recorded before it is known to be up: a teardown kills it.
            cx.handles.virtiofsd.push((id.pid, id.start_time));
            up?;
            super::jail::hand_over(super::jail::identity(d, cx.vm)?.as_ref(), &[&sock])?;
        }
        Ok(())
    }

    fn held(&self, d: &Daemon, vm: &VmRecord, h: &VmHandles) -> Option<Value> {
        let rt_dir = d.cfg.layout.vm_runtime_dir(&vm.id);
        let socks: Vec<PathBuf> = (0..MAX_MOUNTS)
            .map(|i| socket(&rt_dir, i))
            .filter(|p| p.symlink_metadata().is_ok())
            .collect();
        let mut procs: Vec<ProcId> = h
            .virtiofsd
            .iter()
            .map(|&(pid, start_time)| ProcId { pid, start_time })
            .filter(ProcId::exists)
            .collect();
        if h.virtiofsd.is_empty() {
            // Every record lost: the processes whose command line names
            // one of the VM's sockets.
            for i in 0..vm.spec.mounts.len().min(MAX_MOUNTS) {
                let needle = process::path_needle(&socket(&rt_dir, i));
                procs.extend(
                    process::find_by_arg(&needle)
                        .into_iter()
                        .filter_map(ProcId::of),
                );
            }
        }
        if procs.is_empty() && socks.is_empty() {
            return None;
        }
        Some(json!({
            "procs": procs.iter().map(|p| json!({"pid": p.pid, "start_time": p.start_time})).collect::<Vec<_>>(),
            "paths": socks,
        }))
    }

    fn end(&self, _d: &Daemon, vm: &VmRecord, held: Value, _how: End) -> Result<Option<Value>> {
        // They serve only the VMM, gone or going; one that will not die is
        // retried after the reply.
        for id in ids(&held) {
            let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
        }
        if let Err(e) = super::remove_files(&held) {
            tracing::warn!(vm = %vm.name, err = %e, "removing virtiofsd sockets; retried after the reply");
        }
        Ok(if ids(&held).iter().any(ProcId::exists) {
            Some(held)
        } else {
            None
        })
    }

    fn release(&self, _d: &Daemon, r: &Release, held: &Value) -> Result<()> {
        for id in ids(held) {
            if !id.kill_and_wait(KILL_WAIT) {
                return Err(DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "virtiofs",
                    reason: format!("virtiofsd (pid {}) survives SIGKILL", id.pid),
                });
            }
        }
        super::remove_files(held)
    }
}

/// Starts one virtiofsd and waits for its socket. The process is returned
/// even when it failed to listen, so that the caller records it.
fn spawn(
    binary: &Path,
    m: &HostMount,
    sock: &Path,
    log_path: &Path,
    vm: &str,
    confine: &banger_host::confine::Confinement,
) -> Result<(ProcId, Result<()>)> {
    let log = std::fs::File::create(log_path).with_path("create", log_path)?;
    let log2 = log.try_clone().with_path("dup", log_path)?;
    // `-o source=` is split on commas by virtiofsd: HostMount refuses them.
    let mut source = std::ffi::OsString::from("source=");
    source.push(&m.host);
    let mut cmd = Command::new(binary);
    confine
        .apply(&mut cmd)
        .map_err(|e| DaemonError::Invalid(format!("vm {vm:?}: {e}")))?;
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg("-o")
        .arg(&source)
        .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Not in the daemon's process group (as the vsock backend).
        .process_group(0);
    if m.read_only {
        let dir = CString::new(m.host.as_os_str().as_bytes()).map_err(|_| {
            DaemonError::Invalid(format!("--mount {m}: the host path holds a NUL byte"))
        })?;
        // SAFETY: between fork and exec only async-signal-safe system
        // calls run (unshare, mount), on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || read_only_view(&dir));
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| DaemonError::Invalid(format!("vm {vm:?}: start {}: {e}", binary.display())))?;
    let pid = child.id() as i32;
    let id = ProcId {
        pid,
        start_time: process::start_time(pid).unwrap_or(0),
    };
    let watch = DirWatch::new(sock.parent().unwrap_or(Path::new("/")));
    let deadline = std::time::Instant::now() + START_WAIT;
    let up = loop {
        if sock.exists() {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!(
                "virtiofsd for --mount {m} exited ({status}): {}",
                crate::readiness::guest_tail(log_path, 5)
            ));
        }
        if std::time::Instant::now() >= deadline {
            break Err(format!(
                "virtiofsd for --mount {m} did not listen within {}s",
                START_WAIT.as_secs()
            ));
        }
        watch.wait(Duration::from_millis(100));
    };
    let _ = std::thread::Builder::new()
        .name(format!("reap-virtiofsd-{pid}"))
        .spawn(move || child.wait());
    Ok((
        id,
        up.map_err(|reason| DaemonError::Boot {
            vm: vm.to_string(),
            reason,
        }),
    ))
}

/// In the child before exec: a mount namespace of its own in which `dir`
/// is a read-only bind mount of itself (nothing propagates to the host's).
fn read_only_view(dir: &CString) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let err = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(err)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(err)?;
    mount(
        Some(dir.as_c_str()),
        dir.as_c_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    mount(
        None::<&str>,
        dir.as_c_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::testutil::daemon;

    #[test]
    fn firecracker_and_a_missing_virtiofsd_are_refused_naming_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        let m: Vec<HostMount> = vec![format!("{}:/x", d.path().display()).parse().unwrap()];
        let e = daemon
            .check_host_mounts("v", VmmKind::Firecracker, &m, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Firecracker does not have") && e.contains("--volume NAME:/path"),
            "{e}"
        );
        let e = daemon
            .check_host_mounts("v", VmmKind::Qemu, &m, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtiofsd, which is not installed"), "{e}");
        daemon
            .check_host_mounts("v", VmmKind::Firecracker, &[], &[])
            .expect("no mounts, nothing to refuse");
        assert_eq!(
            socket(Path::new("/run/vm"), 2),
            PathBuf::from("/run/vm/fs2.sock")
        );
    }
}
