//! The daemon's one inotify wrapper: wakes a waiter when an entry is
//! created in a directory (a helper's socket appearing) or a file is
//! written (the console log). Without inotify (out of watches) it falls
//! back to short sleeps: a waiter always rechecks its condition, so a
//! missed or spurious wake-up only costs latency.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::warn;

/// How long a waiter sleeps when there is no watch.
const FALLBACK: Duration = Duration::from_millis(10);

pub struct Watch(Option<Inotify>);

impl Watch {
    /// Wakes on each entry created in `dir`.
    pub fn created(dir: &Path) -> Watch {
        Watch::new(dir, AddWatchFlags::IN_CREATE)
    }

    /// Wakes on each write to `file`.
    pub fn modified(file: &Path) -> Watch {
        Watch::new(file, AddWatchFlags::IN_MODIFY)
    }

    fn new(path: &Path, what: AddWatchFlags) -> Watch {
        let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .and_then(|i| i.add_watch(path, what).map(|_| i));
        match ino {
            Ok(i) => Watch(Some(i)),
            Err(e) => {
                warn!(path = %path.display(), err = %e, "no inotify watch; polling");
                Watch(None)
            }
        }
    }

    /// Returns once something happened since the last call, or after
    /// `timeout` (the caller rechecks either way).
    pub fn wait(&self, timeout: Duration) {
        let Some(ino) = &self.0 else {
            std::thread::sleep(FALLBACK.min(timeout));
            return;
        };
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, t).is_ok_and(|n| n > 0) {
            // Drained: one wake-up per batch of events is enough.
            while ino.read_events().is_ok_and(|e| !e.is_empty()) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A creation in the dir wakes a waiter long before its timeout, and a
    /// write to the file does too; with nothing happening it times out.
    #[test]
    fn wakes_on_what_it_watches() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("log");
        std::fs::write(&f, "").unwrap();
        let (dir_w, file_w) = (Watch::created(d.path()), Watch::modified(&f));
        let long = Duration::from_secs(600);

        std::fs::write(d.path().join("sock"), "").unwrap();
        let t = Instant::now();
        dir_w.wait(long);
        assert!(t.elapsed() < long, "woken by the creation");

        std::fs::write(&f, "x").unwrap();
        let t = Instant::now();
        file_w.wait(long);
        assert!(t.elapsed() < long, "woken by the write");

        let t = Instant::now();
        file_w.wait(Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(20), "nothing happened");
    }
}
