//! The mux's I/O: one thread, one `poll(2)` loop over the port (the byte
//! stream the session rides on), each stream's local socket and a wake
//! pipe for [`Mux::connect`]. All non-blocking: the port reader never
//! waits on a stream, a stream whose local reader stalls holds at most
//! its window here, and the others go on.
//!
//! A stream's local end is one end of a Unix socket pair (or, on the
//! host, a connection to a listener): the code on the other end reads and
//! writes a plain `UnixStream`, half-closes included.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::session::{Event, Session};

/// What an engine does with a stream the peer opens to `port`: a local
/// end to serve it (its other end is the caller's), or none (refused).
pub type OnIncoming = Box<dyn FnMut(u32) -> Option<UnixStream> + Send>;

/// Most bytes read from a local end per turn (a turn each, round robin).
const TURN: usize = 64 * 1024;
/// Encoded bytes waiting for the port beyond which local ends are not
/// read (the port is the bottleneck: back-pressure, not memory).
const OUT_HIGH: usize = 256 * 1024;

/// A stream's local end.
struct Local {
    sock: UnixStream,
    /// Bytes from the peer not yet written to `sock` (at most a window).
    pending: Vec<u8>,
    /// The peer wrote its last byte: `shutdown(Write)` once flushed.
    eof_after: bool,
    /// The stream is gone: close once flushed.
    close_after: bool,
    /// `sock` read EOF (or was shut for reading): not polled for input.
    read_done: bool,
    /// Its user closed it: nothing is written there any more.
    hup: bool,
    /// What it reads first, once the peer accepts (`Mux::attach`).
    greeting: Vec<u8>,
    /// Bytes at the head of `pending` that are the greeting, not the
    /// peer's (not granted back when written).
    uncounted: usize,
}

/// An open asked for from another thread: the peer's port, the local
/// end, and what the local end reads first once the peer accepts.
struct Request {
    port: u32,
    sock: UnixStream,
    greeting: Vec<u8>,
}

/// A running mux's handle: opens streams to the peer.
#[derive(Clone)]
pub struct Mux {
    requests: Sender<Request>,
    wake: std::sync::Arc<OwnedFd>,
}

impl Mux {
    /// A stream to the peer's `port`: the caller's end of a socket pair.
    /// A refused or reset stream reads EOF.
    pub fn connect(&self, port: u32) -> std::io::Result<UnixStream> {
        let (mine, theirs) = UnixStream::pair()?;
        self.attach(port, theirs, Vec::new())?;
        Ok(mine)
    }

    /// A stream to the peer's `port` whose local end is `sock` (a client's
    /// connection): it reads `greeting` once the peer accepts, then the
    /// stream; a refused one is closed unread.
    pub fn attach(&self, port: u32, sock: UnixStream, greeting: Vec<u8>) -> std::io::Result<()> {
        self.requests
            .send(Request {
                port,
                sock,
                greeting,
            })
            .map_err(|_| std::io::Error::new(ErrorKind::BrokenPipe, "the mux has stopped"))?;
        nix::unistd::write(self.wake.as_fd(), &[1]).map_err(std::io::Error::from)?;
        Ok(())
    }
}

/// The engine: a [`Session`] on a port.
pub struct Engine {
    session: Session,
    port: UnixOrDevice,
    reader: super::frame::Reader,
    out: Vec<u8>,
    locals: HashMap<u32, Local>,
    on_incoming: OnIncoming,
    requests: Receiver<Request>,
    wake_rx: OwnedFd,
    /// Every [`Mux`] handle is gone: the wake pipe is not polled (it
    /// would report POLLHUP forever).
    orphaned: bool,
    /// Turns of the poll loop (a loop that spins shows here).
    pub turns: u64,
    /// The peer's mux version, when it is not this one's: `run` ends.
    incompatible: Option<u32>,
    /// Frames that did not decode, and frames of other epochs.
    pub dropped: u64,
}

/// The port: a Unix socket (tests, the host's helper) or a character
/// device (the guest's virtio-serial port), read and written the same way.
pub struct UnixOrDevice(pub std::fs::File);

impl From<UnixStream> for UnixOrDevice {
    fn from(s: UnixStream) -> Self {
        UnixOrDevice(std::fs::File::from(OwnedFd::from(s)))
    }
}

impl Engine {
    /// An engine for `session` on `port` (made non-blocking here), and
    /// its handle.
    pub fn new(
        session: Session,
        port: UnixOrDevice,
        on_incoming: OnIncoming,
    ) -> std::io::Result<(Engine, Mux)> {
        set_nonblocking(&port.0)?;
        let (tx, rx) = channel();
        let (wake_rx, wake_tx) = nix::unistd::pipe()?;
        set_nonblocking(&wake_rx)?;
        Ok((
            Engine {
                session,
                port,
                reader: Default::default(),
                out: Vec::new(),
                locals: HashMap::new(),
                on_incoming,
                requests: rx,
                wake_rx,
                orphaned: false,
                turns: 0,
                incompatible: None,
                dropped: 0,
            },
            Mux {
                requests: tx,
                wake: std::sync::Arc::new(wake_tx),
            },
        ))
    }

    /// Runs until the port reads EOF or fails (the peer's transport went
    /// away; then [`Engine::reattach`]), or the peer speaks another mux
    /// version (an error that says so).
    pub fn run(&mut self) -> std::io::Result<()> {
        loop {
            if let Some(v) = self.incompatible.take() {
                return Err(std::io::Error::other(format!(
                    "the other end speaks mux version {v}, this one {}: \
                     the guest's agent and the host's banger-vport are of different builds",
                    super::VERSION
                )));
            }
            self.turns += 1;
            self.fill_out();
            let mut ids: Vec<u32> = Vec::with_capacity(self.locals.len());
            let (port_ev, wake_ev, local_ev) = {
                let mut fds = Vec::with_capacity(2 + self.locals.len());
                // A peer that writes and never reads is not read either
                // once this end's answers to it pile up (they are bounded
                // so, not by dropping them).
                let mut port_flags = PollFlags::empty();
                if self.session.control_backlog() < super::session::CONTROL_HIGH {
                    port_flags |= PollFlags::POLLIN;
                }
                if !self.out.is_empty() {
                    port_flags |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(self.port.0.as_fd(), port_flags));
                // A pipe whose writers are all gone reports POLLHUP
                // whatever is asked: left out.
                if !self.orphaned {
                    fds.push(PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN));
                }
                let first_local = fds.len();
                let room = self.out.len() < OUT_HIGH;
                for (id, l) in &self.locals {
                    let mut f = PollFlags::empty();
                    if !l.read_done && !l.close_after && room && self.session.credit(*id) > 0 {
                        f |= PollFlags::POLLIN;
                    }
                    if !l.pending.is_empty() {
                        f |= PollFlags::POLLOUT;
                    }
                    // A hung-up end reports POLLHUP whatever is asked:
                    // polled only when there is something to read.
                    if l.hup && f.is_empty() {
                        continue;
                    }
                    ids.push(*id);
                    fds.push(PollFd::new(l.sock.as_fd(), f));
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let ev = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
                (
                    ev(&fds[0]),
                    fds[1..first_local].first().map_or(PollFlags::empty(), ev),
                    fds[first_local..].iter().map(ev).collect::<Vec<_>>(),
                )
            };
            if wake_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                self.take_requests();
            }
            for (id, ev) in ids.iter().zip(local_ev) {
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    self.hung_up(*id);
                } else if ev.contains(PollFlags::POLLOUT) {
                    self.flush_local(*id);
                }
                if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    self.read_local(*id);
                }
            }
            if port_ev.contains(PollFlags::POLLOUT) && !self.write_port()? {
                return Ok(());
            }
            if port_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                && !self.read_port()?
            {
                return Ok(());
            }
        }
    }

    /// Goes on over a new port (the transport reconnected): says HELLO
    /// again; a peer that is a new incarnation resets the old streams.
    /// What was in flight on the old port is lost, so this end starts
    /// over as a new incarnation (`epoch`): every stream ends (its local
    /// end closes once what it was handed is flushed), and the peer, on
    /// the new epoch's HELLO, ends its side of them too.
    pub fn reattach(&mut self, port: UnixOrDevice, epoch: u32) -> std::io::Result<()> {
        set_nonblocking(&port.0)?;
        self.port = port;
        self.reader = Default::default();
        self.out.clear();
        // A new start: a receiver drops whatever half frame came before.
        self.out.extend_from_slice(&[0, 0]);
        let mut ev = Vec::new();
        self.session.restart(epoch, &mut ev);
        for e in ev {
            self.apply(e);
        }
        Ok(())
    }

    /// Streams with a local end here.
    pub fn streams(&self) -> usize {
        self.locals.len()
    }

    fn take_requests(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&self.wake_rx), &mut buf) {
                Ok(0) => {
                    self.orphaned = true;
                    break;
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        while let Ok(r) = self.requests.try_recv() {
            match self.session.open(r.port) {
                Ok(id) => {
                    self.add_local(id, r.sock);
                    if let Some(l) = self.locals.get_mut(&id) {
                        l.greeting = r.greeting;
                    }
                }
                // Too many streams: the caller's end reads EOF.
                Err(_) => drop(r.sock),
            }
        }
    }

    fn add_local(&mut self, id: u32, sock: UnixStream) {
        if sock.set_nonblocking(true).is_err() {
            self.session.reset(id);
            return;
        }
        self.locals.insert(
            id,
            Local {
                sock,
                pending: Vec::new(),
                eof_after: false,
                close_after: false,
                read_done: false,
                hup: false,
                greeting: Vec::new(),
                uncounted: 0,
            },
        );
    }

    /// Encodes frames for the port while it has room.
    fn fill_out(&mut self) {
        while self.out.len() < OUT_HIGH {
            let Some(f) = self.session.next_frame() else {
                break;
            };
            // A frame the session made is within bounds.
            let _ = f.encode(&mut self.out);
        }
    }

    /// False: the port is gone.
    fn write_port(&mut self) -> std::io::Result<bool> {
        while !self.out.is_empty() {
            match self.port.0.write(&self.out) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_gone(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// False: the port is gone.
    fn read_port(&mut self) -> std::io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match self.port.0.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return Ok(true)
            }
            Err(e) if is_gone(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut frames = Vec::new();
        self.reader.push(&buf[..n], &mut frames);
        let mut events = Vec::new();
        for f in frames {
            self.session.receive(f, &mut events);
        }
        self.dropped = self.reader.dropped + self.session.dropped;
        for e in events {
            self.apply(e);
        }
        Ok(true)
    }

    fn apply(&mut self, e: Event) {
        match e {
            Event::Incoming { stream, port } => match (self.on_incoming)(port) {
                Some(sock) => {
                    if self.session.accept(stream).is_ok() {
                        self.add_local(stream, sock);
                    }
                }
                None => self.session.refuse(stream),
            },
            Event::Accepted { stream } => {
                if let Some(l) = self.locals.get_mut(&stream) {
                    let g = std::mem::take(&mut l.greeting);
                    if !g.is_empty() {
                        // Ahead of the stream's bytes; not the peer's, so
                        // not granted back.
                        l.uncounted += g.len();
                        l.pending.splice(0..0, g);
                        self.flush_local(stream);
                    }
                }
            }
            Event::Incompatible { version } => self.incompatible = Some(version),
            Event::Data { stream, bytes } => {
                if let Some(l) = self.locals.get_mut(&stream) {
                    l.pending.extend_from_slice(&bytes);
                    self.flush_local(stream);
                }
            }
            Event::PeerShutWrite { stream } => {
                if let Some(l) = self.locals.get_mut(&stream) {
                    l.eof_after = true;
                }
                self.flush_local(stream);
            }
            Event::PeerShutRead { stream } => {
                if let Some(l) = self.locals.get_mut(&stream) {
                    // The local writer's next write fails: nobody reads.
                    let _ = l.sock.shutdown(Shutdown::Read);
                    l.read_done = true;
                }
            }
            Event::Closed { stream } => {
                if let Some(l) = self.locals.get_mut(&stream) {
                    l.close_after = true;
                }
                self.flush_local(stream);
            }
        }
    }

    /// Writes what the peer sent into the local end; applies a pending
    /// EOF or close once it is all out.
    fn flush_local(&mut self, id: u32) {
        let Some(l) = self.locals.get_mut(&id) else {
            return;
        };
        let mut wrote = 0;
        let mut broken = false;
        while wrote < l.pending.len() {
            match l.sock.write(&l.pending[wrote..]) {
                Ok(0) => break,
                Ok(n) => wrote += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        l.pending.drain(..wrote);
        let ours = wrote.min(l.uncounted);
        l.uncounted -= ours;
        let wrote = wrote - ours;
        if broken {
            // The local reader is gone: the peer stops sending.
            l.pending.clear();
            l.uncounted = 0;
            let mut ev = Vec::new();
            self.session.consumed(id, wrote);
            self.session.shutdown_read(id, &mut ev);
            for e in ev {
                self.apply(e);
            }
            self.reap(id);
            return;
        }
        self.session.consumed(id, wrote);
        let done = l.pending.is_empty();
        if done && l.close_after {
            self.locals.remove(&id);
        } else if done && l.eof_after {
            let _ = l.sock.shutdown(Shutdown::Write);
            l.eof_after = false;
        }
    }

    /// The local end of `id` is closed by its user: nothing it is sent
    /// can be read there (the peer stops sending); what it wrote before
    /// is still read, up to its EOF.
    fn hung_up(&mut self, id: u32) {
        let Some(l) = self.locals.get_mut(&id) else {
            return;
        };
        if l.hup {
            return;
        }
        l.hup = true;
        l.pending.clear();
        l.uncounted = 0;
        if self.session.accepted(id) == Some(false) && !has_input(&l.sock) {
            // Given up before the peer answered, nothing said (a client's
            // timeout): the open is withdrawn. (One that wrote and closed,
            // as the agent's hello does, is read once accepted.)
            self.session.reset(id);
            self.locals.remove(&id);
            return;
        }
        let mut ev = Vec::new();
        self.session.shutdown_read(id, &mut ev);
        for e in ev {
            self.apply(e);
        }
        self.reap(id);
    }

    /// Drops the local end of `id` if nothing more can pass through it:
    /// its stream is gone and nothing waits to be written, or it is hung
    /// up and its stream is gone or closing.
    fn reap(&mut self, id: u32) {
        let Some(l) = self.locals.get(&id) else {
            return;
        };
        let stream_gone = self.session.accepted(id).is_none();
        if (stream_gone || l.close_after) && (l.pending.is_empty() || l.hup) {
            self.locals.remove(&id);
        }
    }

    /// Reads what the local end of `id` writes, up to its credit.
    fn read_local(&mut self, id: u32) {
        let credit = self.session.credit(id) as usize;
        let Some(l) = self.locals.get_mut(&id) else {
            return;
        };
        if l.read_done || l.close_after || credit == 0 {
            return;
        }
        let mut buf = vec![0u8; credit.min(TURN)];
        match l.sock.read(&mut buf) {
            Ok(0) => {
                l.read_done = true;
                let mut ev = Vec::new();
                self.session.shutdown_write(id, &mut ev);
                for e in ev {
                    self.apply(e);
                }
            }
            Ok(n) => {
                self.session.send(id, &buf[..n]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                self.locals.remove(&id);
                self.session.reset(id);
            }
        }
    }
}

/// Whether bytes wait to be read on `sock` (peeked, not taken).
fn has_input(sock: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    matches!(
        recv(sock.as_raw_fd(), &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
    )
}

fn set_nonblocking(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let raw = fd.as_fd().as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests;
