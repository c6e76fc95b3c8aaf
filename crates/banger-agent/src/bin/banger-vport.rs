//! banger-vport: a VM's agent channel on the host, over a virtio-serial
//! port (the channel a QEMU snapshot keeps; docs/design/
//! snapshots-agent-channel.md). One per VM, started by the daemon before
//! the VMM, confined as the VM's user.
//!
//! - `--port-socket PATH`: it listens there; QEMU's `virtserialport`
//!   chardev connects, and the mux ([`banger_agent::mux`]) runs over
//!   that connection. When it ends (QEMU gone, or restarted), the next
//!   connection takes over as a new incarnation (a new epoch): what was
//!   in flight is lost, so every stream of the old one ends, here and, at
//!   the new HELLO, in the guest.
//! - `--uds-path PATH`: Firecracker's hybrid vsock, exactly: a client
//!   connects, writes `CONNECT <port>\n`, reads `OK <n>\n` once the guest
//!   accepted, then the stream; a refused port closes the connection.
//!   Streams the guest opens to an allowed `--guest-port P` reach a
//!   connection to `PATH_P`; any other port is refused.
//!
//! What a guest or a client controls is bounded: the CONNECT line (64
//! bytes, 10 s), handshakes in progress (64), streams (the mux's 256),
//! buffered bytes (a window per stream).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_agent::mux::{Engine, Mux, Session, Side};

const USAGE: &str = "usage: banger-vport --port-socket PATH --uds-path PATH [--guest-port PORT]...";
const LINE_MAX: usize = 64;
const LINE_DEADLINE: Duration = Duration::from_secs(10);
const HANDSHAKES_MAX: usize = 64;
/// Refused guest streams logged, at most.
const LOGGED_REFUSALS: u32 = 16;

fn log(msg: &str) {
    eprintln!("banger-vport: {msg}");
}

struct Args {
    port_socket: PathBuf,
    uds: PathBuf,
    guest_ports: Vec<u32>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut port_socket, mut uds, mut guest_ports) = (None, None, Vec::new());
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value; {USAGE}"));
        match a.as_str() {
            "--port-socket" => port_socket = Some(PathBuf::from(value()?)),
            "--uds-path" => uds = Some(PathBuf::from(value()?)),
            "--guest-port" => {
                let v = value()?;
                guest_ports.push(
                    v.parse()
                        .map_err(|_| format!("--guest-port {v:?}: not a port number"))?,
                );
            }
            _ => return Err(format!("unknown argument {a:?}; {USAGE}")),
        }
    }
    Ok(Args {
        port_socket: port_socket.ok_or(format!("--port-socket is required; {USAGE}"))?,
        uds: uds.ok_or(format!("--uds-path is required; {USAGE}"))?,
        guest_ports,
    })
}

fn bind(path: &Path) -> Result<UnixListener, String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    UnixListener::bind(path).map_err(|e| format!("listen on {}: {e}", path.display()))
}

fn main() {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            log(&e);
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        log(&e);
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    // The clients' socket first: once the port's listens (what the daemon
    // waits for), both do.
    let clients = bind(&args.uds)?;
    let ports = bind(&args.port_socket)?;
    // For a caller that reads it (the tests); the daemon waits for the
    // port's socket to listen.
    println!("listening");
    let (conn, _) = ports
        .accept()
        .map_err(|e| format!("accept on {}: {e}", args.port_socket.display()))?;
    let uds = args.uds.clone();
    let allowed = args.guest_ports.clone();
    // A guest decides how often its streams are refused: the log (a
    // file in the VM's dir) says so a bounded number of times.
    let mut said = 0u32;
    let mut say = move |msg: String| {
        said = said.saturating_add(1);
        if said <= LOGGED_REFUSALS {
            log(&msg);
        }
        if said == LOGGED_REFUSALS {
            log("further refused guest streams are not logged");
        }
    };
    let on_incoming = Box::new(move |port: u32| {
        if !allowed.contains(&port) {
            say(format!("refused the guest's stream to port {port}"));
            return None;
        }
        let target = PathBuf::from(format!("{}_{port}", uds.display()));
        match banger_agent::connect_nofollow(&target) {
            Ok(s) => Some(s),
            Err(e) => {
                say(format!(
                    "guest stream to port {port}: {}: {e}",
                    target.display()
                ));
                None
            }
        }
    });
    let (mut engine, mux) = Engine::new(
        Session::new(Side::Host, banger_agent::mux::new_epoch()),
        conn.into(),
        on_incoming,
    )
    .map_err(|e| format!("start the mux: {e}"))?;
    std::thread::Builder::new()
        .name("clients".into())
        .spawn(move || serve_clients(clients, mux))
        .map_err(|e| format!("start the clients' thread: {e}"))?;
    loop {
        engine.run().map_err(|e| format!("the port: {e}"))?;
        let (conn, _) = ports
            .accept()
            .map_err(|e| format!("accept on {}: {e}", args.port_socket.display()))?;
        engine
            .reattach(conn.into(), banger_agent::mux::new_epoch())
            .map_err(|e| format!("the port: {e}"))?;
    }
}

fn serve_clients(l: UnixListener, mux: Mux) {
    let busy = Arc::new(AtomicUsize::new(0));
    // As Firecracker: the host side's port numbers count up from 2^30.
    let next = Arc::new(AtomicU32::new(1 << 30));
    for c in l.incoming() {
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                log(&format!("accept a client: {e}"));
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= HANDSHAKES_MAX {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let busy_fallback = busy.clone();
        let (busy, mux, next) = (busy.clone(), mux.clone(), next.clone());
        let spawned = std::thread::Builder::new()
            .name("handshake".into())
            .spawn(move || {
                if let Some(port) = connect_line(&c) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let _ = c.set_read_timeout(None);
                    if let Err(e) = mux.attach(port, c, format!("OK {n}\n").into_bytes()) {
                        log(&format!("client stream to port {port}: {e}"));
                    }
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            busy_fallback.fetch_sub(1, Ordering::SeqCst);
            log("cannot start a handshake thread");
        }
    }
}

/// The port of a client's `CONNECT <port>\n`, read within the deadline
/// and the length limit; nothing after the line is consumed.
fn connect_line(mut c: &UnixStream) -> Option<u32> {
    let deadline = Instant::now() + LINE_DEADLINE;
    let mut line = Vec::with_capacity(LINE_MAX);
    let mut b = [0u8; 1];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        c.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match c.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) if line.len() < LINE_MAX => line.push(b[0]),
            _ => return None,
        }
    }
    let text = std::str::from_utf8(&line).ok()?;
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}
