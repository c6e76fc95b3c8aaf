//! Waiting for a guest to say it is ready: the guest agent's hello, with
//! this boot's id, on the VM's vsock (`<socket>_1025`), the moment it
//! connects (poll on the listener; no console scraping). Fails early when
//! the VMM exits, the deadline passes, or the boot is cancelled; the
//! console's last lines say why.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use banger_agent::proto::{read_msg, Msg, VERSION};
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

/// How long a guest may take to finish its hello once connected.
const HELLO_READ: Duration = Duration::from_secs(2);

pub fn wait(
    d: &Daemon,
    vm: &VmRecord,
    vmm: ProcId,
    hello: &UnixListener,
    boot_id: &str,
    cancel: &Cancel,
) -> Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let dir = d.cfg.layout.vm_dir(&vm.id);
    let console = dir.join(vmfiles::CONSOLE_LOG);
    let deadline = Instant::now() + d.cfg.boot_timeout;
    let boot_err = |reason: String| DaemonError::Boot {
        vm: vm.name.clone(),
        reason,
    };
    loop {
        if cancel.is_cancelled() {
            return Err(DaemonError::Cancelled(vm.name.clone()));
        }
        if !vmm.is_running() {
            // Killed by the kernel over its cgroup's memory limit: say so.
            if let Some(oom) = crate::resources::jail::oom_message(&d.host(), vm) {
                return Err(boot_err(oom));
            }
            return Err(boot_err(format!(
                "the VMM exited. Its log:\n{}\nConsole:\n{}",
                guest_tail(&dir.join(vmfiles::VMM_LOG), 10),
                guest_tail(&console, 10)
            )));
        }
        if Instant::now() >= deadline {
            return Err(boot_err(format!(
                "the guest agent did not say hello within {}s. Console:\n{}",
                d.cfg.boot_timeout.as_secs(),
                guest_tail(&console, 10)
            )));
        }
        // The timeout only bounds how late a VMM's death, a cancel or the
        // deadline is noticed.
        let mut fds = [PollFd::new(hello.as_fd(), PollFlags::POLLIN)];
        if !poll(&mut fds, PollTimeout::from(100u8)).is_ok_and(|n| n > 0) {
            continue;
        }
        let Ok((conn, _)) = hello.accept() else {
            continue;
        };
        // A guest controls what it sends: bounded in size and, as a
        // whole, in time (not per read: a trickle ends too), and only a
        // hello with this boot's id counts.
        let d = banger_agent::deadline::Deadline::new(&conn, HELLO_READ);
        match read_msg(&mut d.take(4096)) {
            Ok(Msg::Hello {
                version,
                boot_id: b,
            }) if b == boot_id => {
                if version != VERSION {
                    return Err(boot_err(format!(
                        "the guest agent speaks protocol {version}, this banger {VERSION}"
                    )));
                }
                return Ok(());
            }
            Ok(other) => {
                warn!(vm = %vm.name, msg = %escape_control(&format!("{other:?}"), true), "not this boot's hello; ignored")
            }
            Err(e) => warn!(vm = %vm.name, err = %e, "a bad hello; ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use banger_agent::proto::write_msg;

    use super::*;

    /// A hostile guest at boot: a hello connection that trickles a byte at
    /// a time forever, and one that sends junk, ahead of the real hello.
    /// The wait gives each its whole-exchange deadline and goes on to
    /// the real one; it never waits on the trickle. (Read with a timeout
    /// per read, the trickle would hold the boot until its own deadline;
    /// the watchdog fails that.)
    #[test]
    fn hostile_hellos_at_boot_hold_up_nothing() {
        let d = tempfile::tempdir().unwrap();
        let daemon = crate::daemon::testutil::daemon(d.path());
        let vm = crate::daemon::testutil::vm_with_tap("ib", "boot", None);
        let sock = d.path().join("v.sock_1025");
        let hello = UnixListener::bind(&sock).unwrap();
        // The "VMM": any process that runs while the boot waits.
        let vmm = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        // Ended however the test ends (a panic included): a sleep left
        // behind would hold the test's output pipe open.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let vmm = Reaped(vmm);
        let id = ProcId::of(vmm.0.id() as i32).unwrap();

        let (stop_tx, stop) = mpsc::channel::<()>();
        let guest = {
            let sock = sock.clone();
            std::thread::spawn(move || {
                // Accepted first: a frame of 4000 bytes announced, then a
                // byte every 100 ms (400 s) until the test ends it.
                let mut trickle = UnixStream::connect(&sock).unwrap();
                trickle.write_all(&4000u32.to_be_bytes()).unwrap();
                let mut junk = UnixStream::connect(&sock).unwrap();
                junk.write_all(&[0xff; 64]).unwrap();
                let mut real = UnixStream::connect(&sock).unwrap();
                write_msg(
                    &mut real,
                    &Msg::Hello {
                        version: VERSION,
                        boot_id: "this-boot".into(),
                    },
                )
                .unwrap();
                while stop.try_recv().is_err() {
                    if trickle.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(wait(
                    &daemon,
                    &vm,
                    id,
                    &hello,
                    "this-boot",
                    &Cancel::default(),
                ));
            });
            let r = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the boot waited on a trickling hello");
            assert!(r.is_ok(), "{r:?}");
        });
        // The guest thread may have ended already: its trickle fails once
        // the wait closed that connection.
        let _ = stop_tx.send(());
        guest.join().unwrap();
        drop(vmm);
    }
}
