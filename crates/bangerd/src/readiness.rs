//! Waiting for a guest to say it is ready: the ready line with this boot's
//! id on the serial console, read as inotify reports writes. Fails early
//! when the VMM exits, the guest reports a failed sshd, the deadline
//! passes, or the boot is cancelled.

use std::path::Path;
use std::time::{Duration, Instant};

use banger_core::layout::vmfiles;
use banger_core::text::escape_control;
use banger_core::VmRecord;
use banger_host::fsutil;
use banger_host::process::ProcId;
use tracing::warn;

use crate::cancel::Cancel;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

/// The last lines of a guest-written file, safe to put in an error that a
/// terminal will show.
pub fn guest_tail(path: &Path, n: usize) -> String {
    escape_control(&fsutil::tail_lines(path, n), true)
}

pub fn wait(d: &Daemon, vm: &VmRecord, vmm: ProcId, boot_id: &str, cancel: &Cancel) -> Result<()> {
    let dir = d.cfg.layout.vm_dir(&vm.id);
    let console = dir.join(vmfiles::CONSOLE_LOG);
    let marker = format!("{}{boot_id}", banger_guest::READY_MARKER);
    let fail_marker = format!("{}{boot_id}", banger_guest::FAILED_MARKER);
    let keep = fail_marker.len().max(marker.len());
    let deadline = Instant::now() + d.cfg.boot_timeout;
    // Woken by inotify when the VMM writes the console (no polling sleep
    // between the ready line and its detection); the timeout only bounds
    // how late a VMM's death, a cancel or the deadline is noticed.
    let watch = ConsoleWatch::new(&console);
    let mut pos = 0;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let (new, next) = crate::console::read_from(&console, pos)?;
        if next < pos {
            tail.clear(); // rotated under us
        }
        pos = next;
        // Only the new bytes (and a marker's length before them) can hold
        // a line that was not there at the last look.
        tail.extend_from_slice(&new);
        let window = String::from_utf8_lossy(&tail).into_owned();
        if window.contains(&marker) {
            return Ok(());
        }
        if window.contains(&fail_marker) {
            return Err(DaemonError::Boot {
                vm: vm.name.clone(),
                reason: format!(
                    "sshd never listened in the guest. Console:\n{}",
                    guest_tail(&console, 10)
                ),
            });
        }
        let cut = tail.len().saturating_sub(keep);
        tail.drain(..cut);
        if cancel.is_cancelled() {
            return Err(DaemonError::Cancelled(vm.name.clone()));
        }
        if !vmm.is_running() {
            return Err(DaemonError::Boot {
                vm: vm.name.clone(),
                reason: format!(
                    "the VMM exited. Its log:\n{}\nConsole:\n{}",
                    guest_tail(&dir.join(vmfiles::VMM_LOG), 10),
                    guest_tail(&console, 10)
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(DaemonError::Boot {
                vm: vm.name.clone(),
                reason: format!(
                    "no ready signal within {}s. Console:\n{}",
                    d.cfg.boot_timeout.as_secs(),
                    guest_tail(&console, 10)
                ),
            });
        }
        watch.wait(Duration::from_millis(100));
    }
}

/// Wakes a reader when a file changes: an inotify watch, or (if inotify is
/// unavailable, e.g. out of watches) a 10 ms sleep.
pub struct ConsoleWatch(Option<nix::sys::inotify::Inotify>);

impl ConsoleWatch {
    pub fn new(path: &Path) -> Self {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .and_then(|i| i.add_watch(path, AddWatchFlags::IN_MODIFY).map(|_| i));
        match ino {
            Ok(i) => ConsoleWatch(Some(i)),
            Err(e) => {
                warn!(path = %path.display(), err = %e, "no inotify on the console log; polling it");
                ConsoleWatch(None)
            }
        }
    }

    /// Returns when the file was written since the last call, or after
    /// `timeout`.
    pub fn wait(&self, timeout: Duration) {
        use std::os::fd::AsFd;

        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(ino) = &self.0 else {
            std::thread::sleep(Duration::from_millis(10).min(timeout));
            return;
        };
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, ms).is_ok_and(|n| n > 0) {
            // Drain: one wake-up per batch of writes is enough.
            while ino.read_events().is_ok_and(|ev| !ev.is_empty()) {}
        }
    }
}
