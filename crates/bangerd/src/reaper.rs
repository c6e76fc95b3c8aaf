//! Reaping VMM children. Each spawned VMM gets a thread blocked in wait();
//! when it exits the PID goes to the daemon, which cleans up a VM that was
//! meant to be running (the same teardown as `stop`).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};

use banger_host::process::ProcId;
use std::sync::{Mutex, OnceLock};

static EXITS: OnceLock<Mutex<Sender<i32>>> = OnceLock::new();

/// Installs the channel exits are reported on; returns its receiver.
pub fn install() -> Option<Receiver<i32>> {
    let (tx, rx) = channel();
    EXITS.set(Mutex::new(tx)).ok().map(|_| rx)
}

/// Watches a VMM this daemon did not spawn (adopted at reconcile) through a
/// pidfd, which wakes the moment the process exits; the identity (pid and
/// start time) is checked once the pidfd is open, so it cannot refer to a
/// recycled pid. Reports the exit like `watch` does.
pub fn watch_pid(p: ProcId) {
    let spawned = std::thread::Builder::new()
        .name(format!("watch-{}", p.pid))
        .spawn(move || {
            wait_exit(p);
            if let Some(tx) = EXITS.get() {
                let _ = tx.lock().map(|t| t.send(p.pid));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid = p.pid, err = %e, "cannot start a watcher thread");
    }
}

/// Blocks until process `p` has exited (at once if it is gone already):
/// through a pidfd, whose identity is checked once it is open.
pub fn wait_exit(p: ProcId) {
    match pidfd_open(p.pid) {
        Some(fd) if p.exists() => wait_readable(&fd),
        // No pidfd (an old kernel): poll the identity.
        _ => {
            while p.is_running() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new file
    // descriptor or -1; no memory is passed.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until the pidfd is readable: its process has exited.
fn wait_readable(fd: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(n) if n > 0 => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return,
        }
    }
}

pub fn watch(mut child: std::process::Child) {
    let pid = child.id() as i32;
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
            if let Some(tx) = EXITS.get() {
                let _ = tx.lock().map(|t| t.send(pid));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, err = %e, "cannot start a reaper thread");
    }
}
