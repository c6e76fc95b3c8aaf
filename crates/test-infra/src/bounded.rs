//! Commands a test runs end within a deadline: a hang fails the test that
//! met it, naming the command and what it printed so far (and, through
//! `Instance`'s drop, the daemon's log), instead of holding the whole
//! suite until CI's limit.

use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest a single banger command of a test may take: far above any
/// command's worst case here (an image build is minutes), far below CI's
/// 90 minutes.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// A pipe read to its end by a thread of its own; what it read so far is
/// there to show if the command never ends.
struct Collected {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collected {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Collected {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    b.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
                let _ = tx.send(());
            });
        }
        Collected { buf, done }
    }

    /// What was read, waiting up to `limit` for the pipe's end (a process
    /// the command left behind may hold it open).
    fn take(self, limit: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(limit);
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Waits for `child` to exit, up to `limit`: its status, or None.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new file
    // descriptor or -1; the child is not reaped before we wait on it, so
    // its pid is still its own.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, child.id() as i32, 0) };
    if fd < 0 {
        // No pidfd (an old kernel): unbounded, as before.
        return child.wait().ok();
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = nix::poll::PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, ms) {
            Ok(n) if n > 0 => return child.wait().ok(),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return child.wait().ok(),
        }
    }
}

/// Runs `cmd` (its stdin as the caller set it) to completion within
/// `limit`, its output collected; panics, naming the command and what it
/// printed, if it takes longer (it is killed first).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    finish(child, limit, &what)
}

/// `Child::wait_with_output` within `COMMAND_LIMIT`: the output of a
/// command a test started in the background, or a panic naming it.
pub fn wait_output(child: Child) -> Output {
    let what = format!("the command of pid {}", child.id());
    finish(child, COMMAND_LIMIT, &what)
}

fn finish(mut child: Child, limit: Duration, what: &str) -> Output {
    // As `wait_with_output`: a stdin left piped is closed, not held.
    drop(child.stdin.take());
    let out = Collected::start(child.stdout.take());
    let err = Collected::start(child.stderr.take());
    if let Some(status) = wait_within(&mut child, limit) {
        return Output {
            status,
            stdout: out.take(Duration::from_secs(30)),
            stderr: err.take(Duration::from_secs(30)),
        };
    }
    let _ = child.kill();
    let _ = child.wait();
    let (o, e) = (
        out.take(Duration::from_secs(1)),
        err.take(Duration::from_secs(1)),
    );
    panic!(
        "{what} did not finish within {limit:?} (killed)\n\
         stdout so far:\n{}\nstderr so far:\n{}",
        String::from_utf8_lossy(&o),
        String::from_utf8_lossy(&e)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_ends_gives_its_output_and_one_that_hangs_is_named() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        );
        assert_eq!(
            (out.stdout, out.stderr, out.status.code()),
            (b"out\n".to_vec(), b"err\n".to_vec(), Some(3))
        );
        let hung = std::panic::catch_unwind(|| {
            output_within(
                Command::new("sh").args(["-c", "echo started; exec sleep 600"]),
                Duration::from_secs(5),
            )
        });
        let msg = hung
            .expect_err("a hang fails")
            .downcast::<String>()
            .map(|s| *s)
            .unwrap_or_default();
        assert!(
            msg.contains("did not finish") && msg.contains("started"),
            "{msg}"
        );
    }
}
