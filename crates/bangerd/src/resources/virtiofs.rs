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

use super::{Acq, End, Item, Resource};
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};
use crate::host::Host;

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

impl Resource for Virtiofs {
    fn name(&self) -> &'static str {
        "virtiofs"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Mounts]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Confinement]
    }

    fn used(&self, vm: &VmRecord) -> bool {
        !vm.spec.mounts.is_empty()
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        if !self.used(cx.vm) {
            return Ok(());
        }
        let binary = host.cfg.virtiofsd.clone().ok_or_else(|| {
            DaemonError::Invalid(format!(
                "vm {:?}: --mount needs virtiofsd: run ./scripts/install-deps.sh",
                cx.vm.name
            ))
        })?;
        let rt_dir = host.cfg.layout.vm_runtime_dir(&cx.vm.id);
        fsutil::create_dir_all(&rt_dir)?;
        for (i, m) in cx.vm.spec.mounts.clone().iter().enumerate() {
            // A directory a caller who is not root shared is still theirs
            // (not swapped for a link since it was checked), and shared
            // read-only whatever its record says (a build before that
            // rule let members share read-write).
            let mut m = m.clone();
            if let Some(uid) = m.owner {
                crate::access::owned_by(uid, None, &m.host, "--mount")?;
                crate::access::hardlinks_protected("--mount")?;
                m.read_only = true;
            }
            let m = &m;
            // The directory is opened here and checked by what was opened;
            // virtiofsd serves that inode, bound at a path only root can
            // change (so no later swap of the user's path can redirect it).
            let dir = pin(m)?;
            let share = host.cfg.layout.vm_dir(&cx.vm.id).join(format!("share{i}"));
            fsutil::create_dir_all(&share)?;
            fsutil::set_owner_mode(&share, 0, 0, 0o700)?;
            let sock = socket(&rt_dir, i);
            fsutil::remove_file_if_exists(&sock)?;
            let log = host
                .cfg
                .layout
                .vm_dir(&cx.vm.id)
                .join(format!("virtiofsd-{i}.log"));
            // virtiofsd keeps root (its own sandbox needs it) but starts in
            // the VM's cgroup; its socket is the VMM's to connect to.
            let confine = super::jail::confinement(host, cx.vm, None)?;
            let (id, up) = spawn(&binary, m, &dir, &share, &sock, &log, &cx.vm.name, &confine)?;
            // Recorded before it is known to be up: a teardown kills it.
            cx.handles.virtiofsd.push((id.pid, id.start_time));
            up?;
            super::jail::hand_over(super::jail::identity(host, cx.vm)?.as_ref(), &[&sock])?;
        }
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        let rt_dir = host.cfg.layout.vm_runtime_dir(&vm.id);
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
                // virtiofsd runs as root.
                let expect = process::Expect {
                    uid: 0,
                    not_before: vm.created_at,
                };
                procs.extend(
                    process::find_by_arg_as(&needle, expect)
                        .into_iter()
                        .filter_map(ProcId::of),
                );
            }
        }
        if procs.is_empty() && socks.is_empty() {
            return None;
        }
        Some(Item::Virtiofs(super::held::Virtiofs {
            procs,
            paths: socks,
        }))
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        let Item::Virtiofs(h) = &held else {
            return Err(super::mismatch(self, &vm.name, &held));
        };
        // They serve only the VMM, gone or going; one that will not die is
        // retried after the reply.
        for id in &h.procs {
            let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
        }
        if let Err(e) = super::remove_files(&h.paths) {
            tracing::warn!(vm = %vm.name, err = %e, "removing virtiofsd sockets; retried after the reply");
        }
        Ok(if h.procs.iter().any(ProcId::exists) {
            Some(held)
        } else {
            None
        })
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Virtiofs(held) = held else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        for id in &held.procs {
            if !id.kill_and_wait(KILL_WAIT) {
                return Err(DaemonError::Release {
                    vm: r.vm_name.clone(),
                    resource: "virtiofs",
                    reason: format!("virtiofsd (pid {}) survives SIGKILL", id.pid),
                });
            }
        }
        super::remove_files(&held.paths)
    }
}

/// Starts one virtiofsd and waits for its socket. The process is returned
/// even when it failed to listen, so that the caller records it.
/// The mount's directory, opened (`O_PATH`), and, for a caller who is not
/// root, owned by them: the check is of the inode virtiofsd will serve.
fn pin(m: &HostMount) -> Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(&m.host)
        .map_err(|e| DaemonError::Invalid(format!("--mount {m}: {}: {e}", m.host.display())))?;
    if let Some(uid) = m.owner {
        let md = f
            .metadata()
            .map_err(|e| DaemonError::Invalid(format!("--mount {m}: {}: {e}", m.host.display())))?;
        if md.uid() != uid {
            return Err(crate::access::AccessError::NotOwner {
                what: "--mount".into(),
                path: m.host.clone(),
                owner: md.uid(),
                uid,
            }
            .into());
        }
    }
    Ok(f.into())
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    binary: &Path,
    m: &HostMount,
    dir: &std::os::fd::OwnedFd,
    share: &Path,
    sock: &Path,
    log_path: &Path,
    vm: &str,
    confine: &banger_host::confine::Confinement,
) -> Result<(ProcId, Result<()>)> {
    let log = std::fs::File::create(log_path).with_path("create", log_path)?;
    let log2 = log.try_clone().with_path("dup", log_path)?;
    // `-o source=` is split on commas by virtiofsd: the path is the VM
    // dir's (the user's path never reaches virtiofsd's command line).
    if share.to_string_lossy().contains(',') {
        return Err(DaemonError::Invalid(format!(
            "{}: the state dir's path holds a ',', which virtiofsd cannot take",
            share.display()
        )));
    }
    let mut source = std::ffi::OsString::from("source=");
    source.push(share);
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
    {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::File::from(dir.try_clone().with_path("dup", &m.host)?)
            .metadata()
            .with_path("stat", &m.host)?;
        let pinned = (md.dev(), md.ino());
        let host = CString::new(m.host.as_os_str().as_bytes()).map_err(|_| {
            DaemonError::Invalid(format!("--mount {m}: the host path holds a NUL byte"))
        })?;
        let at = CString::new(share.as_os_str().as_bytes()).map_err(|_| {
            DaemonError::Invalid(format!("{}: the path holds a NUL byte", share.display()))
        })?;
        let ro = m.read_only;
        // SAFETY: between fork and exec only async-signal-safe system
        // calls run (unshare, open, fstat, mount), on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || shared_view(&host, pinned, &at, ro));
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| DaemonError::Invalid(format!("vm {vm:?}: start {}: {e}", binary.display())))?;
    let (id, up) = super::backend::await_socket(
        child,
        &format!("virtiofsd for --mount {m}"),
        sock,
        log_path,
        START_WAIT,
    );
    Ok((
        id,
        up.map_err(|reason| DaemonError::Boot {
            vm: vm.to_string(),
            reason,
        }),
    ))
}

/// In the child before exec: a mount namespace of its own in which the
/// directory at `host` is bound at `at`, read-only with `ro` (nothing
/// propagates to the host's). It is opened again in the new namespace (a
/// bind takes its source from the caller's own mounts) and must be the
/// inode the daemon checked (`pinned`: device, inode): a path swapped
/// since then fails the start. Not recursive for a read-only share:
/// mounts below the directory are not shared (their own flags would be
/// writable).
fn shared_view(host: &CString, pinned: (u64, u64), at: &CString, ro: bool) -> std::io::Result<()> {
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
    // SAFETY: a NUL-terminated path; the descriptor is this child's.
    let fd = unsafe {
        nix::libc::open(
            host.as_ptr(),
            nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed stat buffer the kernel fills.
    let mut st: nix::libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a valid buffer.
    if unsafe { nix::libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (st.st_dev, st.st_ino) != pinned {
        return Err(std::io::Error::from_raw_os_error(nix::libc::ESTALE));
    }
    // "/proc/self/fd/<fd>", written without allocating.
    let mut from = [0u8; 40];
    let prefix = b"/proc/self/fd/";
    from[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        from[prefix.len() + i] = digits[len - 1 - i];
    }
    let from = std::ffi::CStr::from_bytes_until_nul(&from)
        .map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EINVAL))?;
    let bind = if ro {
        MsFlags::MS_BIND
    } else {
        MsFlags::MS_BIND | MsFlags::MS_REC
    };
    mount(Some(from), at.as_c_str(), None::<&str>, bind, None::<&str>).map_err(err)?;
    if ro {
        // A remount sets every flag anew: the source mount's own
        // (nosuid, nodev, noexec, atime) are kept.
        // (glibc's statvfs is statfs(2) and a copy: the kernel reports
        // the flags, ST_VALID, so it reads no /proc/mounts.)
        // SAFETY: a zeroed statvfs buffer the call fills.
        let mut sfs: nix::libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a valid buffer.
        if unsafe { nix::libc::statvfs(at.as_ptr(), &mut sfs) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = remount_flags(sfs.f_flag);
        mount(
            None::<&str>,
            at.as_c_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// The mount flags of a mount whose `statfs` says `st` (`ST_*`), to keep
/// across a bind remount.
fn remount_flags(st: u64) -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    let mut f = MsFlags::empty();
    for (st_bit, ms) in [
        (nix::libc::ST_NOSUID, MsFlags::MS_NOSUID),
        (nix::libc::ST_NODEV, MsFlags::MS_NODEV),
        (nix::libc::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (nix::libc::ST_NOATIME, MsFlags::MS_NOATIME),
        (nix::libc::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (nix::libc::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st & st_bit != 0 {
            f |= ms;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::testutil::daemon;

    #[test]
    fn a_read_only_remount_keeps_the_sources_flags() {
        use nix::mount::MsFlags;
        let st = nix::libc::ST_NOSUID | nix::libc::ST_NODEV | nix::libc::ST_RELATIME | 32;
        assert_eq!(
            remount_flags(st),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RELATIME
        );
        assert_eq!(remount_flags(0), MsFlags::empty());
    }

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
