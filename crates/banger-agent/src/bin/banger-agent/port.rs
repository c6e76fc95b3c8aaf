//! The agent over a multiplexed byte stream instead of vsock: the guest's
//! end of `banger_agent::mux`. A stream the host opens to the agent's
//! port is served exactly as a vsock connection (one end of a socket pair
//! goes to `serve`); the hello goes out as a stream to the host's hello
//! port.
//!
//! On QEMU (`banger.vport=1` on the kernel's command line) it runs over
//! the virtio-serial port named [`VPORT_NAME`]; the host's end is
//! `banger-vport`. While nothing is connected on the host's side (the
//! helper restarting), the port reads EOF and polls as hung up: the
//! agent looks again every few tens of milliseconds.
//!
//! `--serial PATH` runs it over a Unix socket, as the host-side tests do
//! with `banger-vport` standing in for QEMU's chardev (the socket plays
//! the virtio-serial port): when the connection ends it connects again,
//! as a restarted helper's port comes back.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use banger_agent::mux::{Engine, Mux, Session, Side, UnixOrDevice};
use banger_agent::proto::{write_msg, Msg, AGENT_PORT, HELLO_PORT, VERSION, VPORT_NAME};

use crate::{boot_id, log, serve};

/// How long `--serial` keeps trying to reach its port again.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

fn engine(port: UnixOrDevice) -> std::io::Result<(Engine, Mux)> {
    let on_incoming = Box::new(|p: u32| {
        if p != AGENT_PORT {
            return None;
        }
        let (mine, theirs) = UnixStream::pair().ok()?;
        serve(mine);
        Some(theirs)
    });
    let session = Session::new(Side::Guest, banger_agent::mux::new_epoch());
    Engine::new(session, port, on_incoming)
}

/// Says hello over the mux (the host's helper relays it to the daemon).
fn hello(mux: Mux) {
    let r = mux.connect(HELLO_PORT).and_then(|mut s| {
        write_msg(
            &mut s,
            &Msg::Hello {
                version: VERSION,
                boot_id: boot_id(),
            },
        )
        .map_err(std::io::Error::other)
    });
    if let Err(e) = r {
        log(&format!("hello to the host: {e}"));
    }
}

pub fn serial_main(path: &str) -> ! {
    let conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("connect to {path}: {e}"));
            std::process::exit(1);
        }
    };
    let (mut engine, mux) = match engine(conn.into()) {
        Ok(e) => e,
        Err(e) => {
            log(&format!("start the mux: {e}"));
            std::process::exit(1);
        }
    };
    // The caller (a test) waits for this line, not for a delay.
    println!("serving");
    std::thread::spawn(move || hello(mux));
    loop {
        if let Err(e) = engine.run() {
            log(&format!("the port: {e}"));
            // Not a hot loop against a host that cannot be spoken to.
            std::thread::sleep(Duration::from_secs(1));
        }
        let deadline = Instant::now() + RECONNECT_FOR;
        let conn = loop {
            match UnixStream::connect(path) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    log(&format!("connect to {path} again: {e}"));
                    std::process::exit(1);
                }
            }
        };
        if let Err(e) = engine.reattach(conn.into(), banger_agent::mux::new_epoch()) {
            log(&format!("the port: {e}"));
            std::process::exit(1);
        }
    }
}

/// Whether the kernel's command line asks for the port (the daemon says
/// so for a QEMU VM whose channel is a virtio-serial port).
pub fn wanted() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "banger.vport=1"))
}

/// The port's device: `/dev/<port>` for the entry of
/// `/sys/class/virtio-ports` named [`VPORT_NAME`].
fn find_port() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == VPORT_NAME)
        })
        .map(|e| std::path::Path::new("/dev").join(e.file_name()))
}

/// How long the port may take to appear (the driver adds it once the
/// device says so, after the module loaded).
const PORT_WAIT: Duration = Duration::from_secs(30);
/// How often a port that is not there yet, or whose host side is not
/// connected, is looked at again (neither raises an event).
const LOOK_AGAIN: Duration = Duration::from_millis(20);

pub fn device_main() -> ! {
    let deadline = Instant::now() + PORT_WAIT;
    let dev = loop {
        match find_port() {
            Some(d) if d.exists() => break d,
            _ if Instant::now() < deadline => std::thread::sleep(LOOK_AGAIN),
            _ => {
                log(&format!(
                    "no virtio-serial port named {VPORT_NAME} (virtio_console not loaded?)"
                ));
                // init restarts the agent; do not spin.
                std::thread::sleep(Duration::from_secs(5));
                std::process::exit(1);
            }
        }
    };
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
    };
    let file = match open() {
        Ok(f) => f,
        Err(e) => {
            log(&format!("open {}: {e}", dev.display()));
            std::thread::sleep(Duration::from_secs(5));
            std::process::exit(1);
        }
    };
    let port = match file.try_clone() {
        Ok(p) => p,
        Err(e) => {
            log(&format!("{}: {e}", dev.display()));
            std::process::exit(1);
        }
    };
    let (mut engine, mux) = match engine(UnixOrDevice(port)) {
        Ok(e) => e,
        Err(e) => {
            log(&format!("start the mux on {}: {e}", dev.display()));
            std::process::exit(1);
        }
    };
    // (The line the console shows, as the vsock agent's.)
    log(&format!("listening on {}", dev.display()));
    std::thread::spawn(move || hello(mux));
    loop {
        if let Err(e) = engine.run() {
            log(&format!("{}: {e}", dev.display()));
            std::thread::sleep(Duration::from_secs(1));
        }
        // The host's side went away: look until it is back.
        while host_absent(&file) {
            std::thread::sleep(LOOK_AGAIN);
        }
        let again = file
            .try_clone()
            .map(UnixOrDevice)
            .and_then(|p| engine.reattach(p, banger_agent::mux::new_epoch()));
        if let Err(e) = again {
            log(&format!("{}: {e}", dev.display()));
            std::process::exit(1);
        }
    }
}

/// Whether the port's host side is disconnected (it polls as hung up).
fn host_absent(port: &std::fs::File) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}
