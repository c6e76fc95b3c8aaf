//! The helpers a VMM connects to (QEMU's vsock backend, virtiofsd): one
//! way to wait for a helper just spawned to listen, and to reap it.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use banger_host::process::{self, ProcId};

use crate::watch::Watch;

/// How often a dead helper is noticed while its socket does not appear.
const TICK: Duration = Duration::from_millis(100);

/// Waits until `child` (`what`, just spawned) listens on `socket`, exits,
/// or `within` has passed; then leaves it to a reaper thread of its own
/// (its exit is no event: the VMM's is). The helper's identity comes back
/// even when it failed, so that the caller records it for the teardown;
/// the error names `what` and the tail of its `log`.
pub fn await_socket(
    mut child: Child,
    what: &str,
    socket: &Path,
    log: &Path,
    within: Duration,
) -> (ProcId, Result<(), String>) {
    let pid = child.id() as i32;
    let id = ProcId {
        pid,
        start_time: process::start_time(pid).unwrap_or(0),
    };
    // Created on a path no other thread writes: the watch on its dir
    // reports the socket's creation; the tick bounds how late a dead
    // helper is noticed.
    let watch = Watch::created(socket.parent().unwrap_or(Path::new("/")));
    let deadline = Instant::now() + within;
    let up = loop {
        // The file appears at bind, the listen comes just after: until
        // then, a short tick (the listen raises no inotify event).
        if socket.exists() {
            if process::listens_on(pid, socket) {
                break Ok(());
            }
            if Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!(
                "{what} exited ({status}): {}",
                crate::readiness::guest_tail(log, 5)
            ));
        }
        if Instant::now() >= deadline {
            break Err(format!("{what} did not listen within {within:?}"));
        }
        watch.wait(TICK);
    };
    let _ = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || child.wait());
    (id, up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A helper that listens is up (not one that only made the file); one
    /// that exits first says so with its log; one that neither listens nor exits is given up on in time.
    #[test]
    fn up_exited_or_too_late() {
        let d = tempfile::tempdir().unwrap();
        let (sock, log) = (d.path().join("h.sock"), d.path().join("h.log"));
        std::fs::write(&log, "line one\nthe helper's last words\n").unwrap();

        let listener = Command::new("socat")
            .arg(format!("UNIX-LISTEN:{}", sock.display()))
            .arg("STDOUT")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (id, up) = await_socket(listener, "listener", &sock, &log, Duration::from_secs(60));
        assert!(id.pid > 0);
        assert_eq!(up, Ok(()));
        assert!(id.kill_and_wait(Duration::from_secs(10)));
        let _ = std::fs::remove_file(&sock);

        // A file at the path is not a socket that listens.
        let touch = Command::new("touch").arg(&sock).spawn().unwrap();
        let (_, up) = await_socket(touch, "toucher", &sock, &log, Duration::from_secs(60));
        assert!(up.unwrap_err().starts_with("toucher exited"));
        std::fs::remove_file(&sock).unwrap();

        let fail = Command::new("false").spawn().unwrap();
        let (_, up) = await_socket(fail, "quitter", &sock, &log, Duration::from_secs(60));
        let e = up.unwrap_err();
        assert!(
            e.starts_with("quitter exited") && e.contains("last words"),
            "{e}"
        );

        let sleeper = Command::new("sleep").arg("600").spawn().unwrap();
        let (id, up) = await_socket(sleeper, "sleeper", &sock, &log, Duration::from_millis(200));
        assert_eq!(up.unwrap_err(), "sleeper did not listen within 200ms");
        assert!(id.kill_and_wait(Duration::from_secs(10)));
    }
}
