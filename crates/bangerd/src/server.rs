//! The Unix-socket server: one thread per connection, one request per
//! connection, newline-delimited JSON (see `banger_core::api`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use banger_core::api::{
    ApiError, Envelope, ErrorKind, Event, Reply, Request, Response, PROTOCOL_VERSION,
};
use tracing::{info, info_span, warn};

use crate::cancel::Cancel;
use crate::daemon::Daemon;
pub(crate) use crate::dispatch::vouch;
use crate::dispatch::{dispatch, op_name};
use crate::error::{DaemonError, Result};
use crate::limits::{refuser, Conns, Counted, ShutOnDrop, REQUEST_WITHIN, WRITE_WAIT};

pub(crate) const MAX_REQUEST: u64 = 1 << 20;
/// How long a shutdown waits for requests in flight (a boot wait, an image
/// build) before it gives up on them.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Asks the accept loop to stop: a flag, and a pipe the loop polls beside
/// the listener, so that nothing has to connect to wake it (under socket
/// activation the listener is systemd's, and a wake-up connection would
/// start the next daemon).
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    rx: Arc<std::os::fd::OwnedFd>,
    tx: Arc<std::os::fd::OwnedFd>,
}

impl Stopper {
    pub fn new() -> std::io::Result<Stopper> {
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(std::io::Error::from)?;
        Ok(Stopper {
            flag: Arc::new(AtomicBool::new(false)),
            rx: Arc::new(rx),
            tx: Arc::new(tx),
        })
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&*self.tx, &[1]);
    }

    pub fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }
}

/// Serves until `stopper` is told to stop, then lets the requests in
/// flight finish, so that a SIGTERM never leaves a half-created VM or a
/// half-torn-down one.
pub fn run(daemon: Arc<Daemon>, listener: UnixListener, stopper: Stopper) {
    use std::os::fd::AsFd;
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conns = Arc::new(Conns::default());
    let refusals = refuser();
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(err = %e, "cannot make the listener non-blocking");
    }
    while !stopper.stopping() {
        let mut fds = [
            nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(stopper.rx.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(err = %e, "poll on the listener failed");
                break;
            }
        }
        if stopper.stopping() {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(WRITE_WAIT));
                // The cap per uid, before a thread is spent on it.
                let uid = nix::sys::socket::getsockopt(
                    &stream,
                    nix::sys::socket::sockopt::PeerCredentials,
                )
                .map(|c| c.uid())
                .unwrap_or(u32::MAX);
                if !conns.enter(uid) {
                    // (Not a warning each: a member could fill the log.)
                    tracing::debug!(uid, "refusing a connection: the uid's cap is reached");
                    // Told why by the refuser thread (a full queue of
                    // refusals: closed unanswered).
                    let _ = refusals.try_send((stream, uid));
                    continue;
                }
                let d = daemon.clone();
                let count = in_flight.clone();
                let stop = stopper.clone();
                let open = conns.clone();
                count.fetch_add(1, Ordering::SeqCst);
                let r = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || {
                        // Counted out however `handle` ends (a panic too).
                        let _out = Counted {
                            in_flight: &count,
                            conns: &open,
                            uid,
                        };
                        handle(&d, stream, &stop, &count, &open);
                    });
                if let Err(e) = r {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    conns.leave(uid);
                    warn!(err = %e, "cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the
                // connection stays queued and the listener readable, so
                // the loop backs off rather than spin (waking for a stop).
                warn!(err = %e, "accept failed; retrying in 100 ms");
                let mut fds = [nix::poll::PollFd::new(
                    stopper.rx.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            }
        }
    }
    drop(listener);
    let start = std::time::Instant::now();
    while in_flight.load(Ordering::SeqCst) > 0 {
        if start.elapsed() > DRAIN_LIMIT {
            warn!(
                requests = in_flight.load(Ordering::SeqCst),
                "shutting down with requests still in flight"
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Releases the requests queued (taps, NAT rules) are finished too.
    if !daemon.janitor.wait_idle(DRAIN_LIMIT) {
        warn!(
            releases = daemon.janitor.pending(),
            "shutting down with releases pending; the next daemon finishes them"
        );
    }
    daemon.host().drain_tap_pool();
}

pub(crate) fn write_reply(stream: &mut UnixStream, reply: &Reply) -> bool {
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| {
        r#"{"reply":"err","kind":"internal","message":"unserialisable reply"}"#.into()
    });
    line.push('\n');
    stream.write_all(line.as_bytes()).is_ok()
}

/// What a request can know of its connection: whether the client hung up
/// (for requests that outlive their reply's start: an `rm` create, a
/// followed log), and whether the daemon is shutting down.
pub struct Conn<'a> {
    stream: &'a UnixStream,
    /// Who connected (SO_PEERCRED).
    pub caller: crate::access::Caller,
    pub(crate) stopper: &'a Stopper,
    pub(crate) in_flight: &'a std::sync::atomic::AtomicUsize,
    pub(crate) conns: &'a Conns,
}

impl Conn<'_> {
    /// A token cancelled when the client hangs up (or shuts its writing
    /// side down), watched by a thread that reads the connection.
    pub(crate) fn hangup(&self) -> Result<Cancel> {
        let token = Cancel::default();
        let t = token.clone();
        let mut reader = self
            .stream
            .try_clone()
            .map_err(|e| DaemonError::Invalid(format!("cannot watch the connection: {e}")))?;
        std::thread::Builder::new()
            .name("hangup".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                // Only the client's end (or a real error) cancels, not
                // a signal's interruption.
                loop {
                    match reader.read(&mut buf) {
                        Ok(n) if n > 0 => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
                t.cancel();
            })
            .map_err(|e| DaemonError::Invalid(format!("cannot watch the connection: {e}")))?;
        Ok(token)
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.stopper.stopping()
    }
}

fn handle(
    daemon: &Daemon,
    stream: UnixStream,
    stopper: &Stopper,
    in_flight: &std::sync::atomic::AtomicUsize,
    conns: &Conns,
) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!(err = %e, "cannot clone connection");
            return;
        }
    };
    let _shut = stream.try_clone().ok().map(ShutOnDrop);
    let caller = match crate::access::Caller::of(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!(err = %e, "refusing a connection");
            write_reply(&mut writer, &Reply::Err(DaemonError::from(e).to_api()));
            return;
        }
    };
    // The whole line within its deadline (a client trickling it a byte
    // at a time included); then no timeout: the hang-up watcher reads on.
    let mut line = String::new();
    let got = {
        let d = banger_agent::deadline::Deadline::new(&stream, REQUEST_WITHIN);
        BufReader::new(d.take(MAX_REQUEST)).read_line(&mut line)
    };
    if got.is_err() || line.trim().is_empty() || stream.set_read_timeout(None).is_err() {
        if got.is_err() {
            info!(
                uid = caller.uid,
                "no whole request line within its deadline"
            );
        }
        return;
    }
    let env: Envelope = match serde_json::from_str(&line) {
        Ok(e) => e,
        Err(e) => {
            // Tell an older or newer client apart from garbage.
            let kind = match serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v.get("version")?.as_u64())
            {
                Some(v) if v != u64::from(PROTOCOL_VERSION) => ErrorKind::Version,
                _ => ErrorKind::InvalidInput,
            };
            let message = if kind == ErrorKind::Version {
                version_mismatch(None)
            } else {
                format!("bad request: {e}")
            };
            write_reply(&mut writer, &Reply::Err(ApiError { kind, message }));
            return;
        }
    };
    if env.version != PROTOCOL_VERSION {
        write_reply(
            &mut writer,
            &Reply::Err(ApiError {
                kind: ErrorKind::Version,
                message: version_mismatch(Some(env.version)),
            }),
        );
        return;
    }
    let span = info_span!("request", op = op_name(&env.request), uid = caller.uid);
    let _e = span.enter();
    if let Request::VmAgent { name } = &env.request {
        // Not a request in flight: the daemon only hands the connection
        // over.
        let vm = daemon
            .find(name)
            .and_then(|vm| caller.may_use_in(&daemon.store(), &vm).map(|_| vm))
            .and_then(|vm| {
                // Nothing of a client's runs in a guest before it is
                // handed over (a first boot's warm snapshot is taken
                // just before).
                if vm.runtime.state() == banger_core::VmState::Starting {
                    Err(DaemonError::Invalid(format!(
                        "vm {name:?} is starting: its guest is yours once it runs"
                    )))
                } else {
                    Ok(vm)
                }
            });
        match vm.and_then(|vm| daemon.agent_connect(&vm)) {
            Ok(agent) => {
                if let Err(e) = send_with_fd(&writer, &Reply::Ok(Response::Agent), &agent) {
                    info!(err = %e, "could not hand the agent connection over");
                }
            }
            Err(e) => {
                info!(err = %e, "request failed");
                write_reply(&mut writer, &Reply::Err(e.to_api()));
            }
        }
        return;
    }
    // Events go through a second handle on the same socket; if the client
    // has gone (or the handle cannot be made), the work still finishes.
    let mut event_writer = writer.try_clone().ok();
    let mut events = |ev: Event| {
        if let Some(w) = event_writer.as_mut() {
            if !write_reply(w, &Reply::Event(ev)) {
                event_writer = None;
            }
        }
    };
    let conn = Conn {
        stream: &writer,
        caller,
        stopper,
        in_flight,
        conns,
    };
    let result = dispatch(daemon, env.request, &mut events, &conn);
    let reply = match result {
        Ok(r) => Reply::Ok(r),
        Err(e) => {
            info!(err = %e, "request failed");
            Reply::Err(e.to_api())
        }
    };
    write_reply(&mut writer, &reply);
}

/// What a CLI of another build is told: which side speaks what, and how
/// to get a daemon of the CLI's build (VMs keep running across it).
fn version_mismatch(client: Option<u32>) -> String {
    let client = client.map_or_else(|| "another".to_string(), |v| v.to_string());
    format!(
        "this CLI speaks protocol {client}, the running bangerd (pid {}, version {}) protocol \
         {PROTOCOL_VERSION}: restart the daemon with the CLI's build (`sudo systemctl restart \
         banger` where systemd runs it, else `sudo banger daemon stop`: the next command starts \
         the new one; VMs keep running)",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Writes a reply line with a file descriptor attached (SCM_RIGHTS).
fn send_with_fd(
    stream: &UnixStream,
    reply: &Reply,
    fd: &impl std::os::fd::AsRawFd,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(&line)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    // The descriptor went with the first byte; the rest (never, for a
    // line this short) follows plainly.
    (&*stream).write_all(&line[n..])
}
