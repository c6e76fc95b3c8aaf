//! The agent over a multiplexed byte stream instead of vsock: the guest's
//! end of `banger_agent::mux`. A stream the host opens to the agent's
//! port is served exactly as a vsock connection (one end of a socket pair
//! goes to `serve`); the hello goes out as a stream to the host's hello
//! port.
//!
//! `--serial PATH` runs it over a Unix socket, as the host-side tests do
//! with `banger-vport` standing in for QEMU's chardev (the socket plays
//! the virtio-serial port): when the connection ends it connects again,
//! as a restarted helper's port comes back.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use banger_agent::mux::{Engine, Mux, Session, Side};
use banger_agent::proto::{write_msg, Msg, AGENT_PORT, HELLO_PORT, VERSION};

use crate::{boot_id, log, serve};

/// How long `--serial` keeps trying to reach its port again.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// A new incarnation's epoch (random, never 0).
fn epoch() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    (u32::from_le_bytes(b) ^ std::process::id().rotate_left(16)).max(1)
}

fn engine(port: UnixStream) -> std::io::Result<(Engine, Mux)> {
    let on_incoming = Box::new(|p: u32| {
        if p != AGENT_PORT {
            return None;
        }
        let (mine, theirs) = UnixStream::pair().ok()?;
        serve(mine);
        Some(theirs)
    });
    let session = Session::new(Side::Guest, epoch());
    Engine::new(session, port.into(), on_incoming)
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
    let (mut engine, mux) = match engine(conn) {
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
        if let Err(e) = engine.reattach(conn.into()) {
            log(&format!("the port: {e}"));
            std::process::exit(1);
        }
    }
}
