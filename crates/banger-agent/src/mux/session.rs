//! One end of a mux session, with no I/O: frames in ([`Session::receive`]),
//! frames out ([`Session::next_frame`]), and what the local ends of the
//! streams must do ([`Event`]). The engine that owns the port and the
//! local sockets drives it; tests drive two of them against each other.
//!
//! - Epochs. Each end is an incarnation with an epoch of its own, sent in
//!   every frame. HELLO says "I am epoch E": an end that sees a new peer
//!   epoch drops every stream it had with the old peer and answers HELLO
//!   with [`HELLO_REPLY`]. Until it knows its peer, an end sends nothing
//!   but HELLO (opens wait). Frames of any other epoch than the peer's
//!   are dropped: a snapshot's clone talks to a new helper, and nothing
//!   of the origin's streams leaks into the clone's.
//! - Stream ids: the host's are odd, the guest's even (no collisions, as
//!   in yamux and HTTP/2).
//! - Flow control: a sender has [`WINDOW`] bytes of credit per stream and
//!   never sends beyond it; the receiver grants what it handed its local
//!   end, in batches of half a window. DATA beyond the credit resets the
//!   stream: a peer cannot make this end buffer more than a window per
//!   stream.
//! - Half-closes follow vsock's SHUTDOWN: FIN with [`SHUT_WR`] when the
//!   local end reads EOF, with [`SHUT_RD`] when it reads no more. A
//!   stream is gone when both directions are done, or at RST.

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::frame::{Frame, Kind, HELLO_REPLY, MAX_PAYLOAD, SHUT_RD, SHUT_WR};
use super::{MuxError, MAX_STREAMS, VERSION, WINDOW};

/// Which end this is: it picks the parity of the ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

/// What the local end of a stream must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opens `stream` to `port`: [`Session::accept`] or
    /// [`Session::refuse`] it.
    Incoming { stream: u32, port: u32 },
    /// An open of this end's was accepted: data may flow.
    Accepted { stream: u32 },
    /// Bytes for the local end, within its window: hand them on, then
    /// report them with [`Session::consumed`].
    Data { stream: u32, bytes: Vec<u8> },
    /// The peer writes no more: the local end reads EOF once the bytes
    /// before have been handed on.
    PeerShutWrite { stream: u32 },
    /// The peer reads no more: the local end's writes fail.
    PeerShutRead { stream: u32 },
    /// The stream is gone (refused, reset, both directions done, or the
    /// peer is a new incarnation): close the local end once what it was
    /// handed is flushed.
    Closed { stream: u32 },
    /// The peer speaks another mux version: nothing is exchanged.
    Incompatible { version: u32 },
}

#[derive(Debug)]
struct Stream {
    /// Sent to the peer (an OPEN, or an ACCEPT of its open): an epoch
    /// change resets it. A local open queued before the peer is known is
    /// not.
    sent: bool,
    port: u32,
    accepted: bool,
    /// Bytes this end may still send.
    credit: u32,
    /// Bytes the peer may still send.
    window: u32,
    /// Bytes the local end consumed, not yet granted back.
    to_grant: u32,
    /// This end sent FIN SHUT_WR: it sends no more.
    sent_wr: bool,
    /// The peer sent FIN SHUT_RD: this end sends no more.
    got_rd: bool,
    /// The peer sent FIN SHUT_WR: DATA after it breaks the protocol.
    got_wr: bool,
    /// This end sent FIN SHUT_RD: DATA still in flight is dropped.
    sent_rd: bool,
}

impl Stream {
    fn new(sent: bool, port: u32, credit: u32) -> Stream {
        Stream {
            sent,
            port,
            accepted: false,
            credit,
            window: WINDOW,
            to_grant: 0,
            sent_wr: false,
            got_rd: false,
            got_wr: false,
            sent_rd: false,
        }
    }

    /// No more bytes go out.
    fn out_done(&self) -> bool {
        self.sent_wr || self.got_rd
    }

    /// No more bytes come in.
    fn in_done(&self) -> bool {
        self.got_wr || self.sent_rd
    }
}

#[derive(Debug)]
pub struct Session {
    side: Side,
    epoch: u32,
    peer: Option<u32>,
    /// Refused for its version: nothing but HELLO is sent.
    incompatible: bool,
    next_id: u32,
    streams: BTreeMap<u32, Stream>,
    /// HELLO, OPEN, ACCEPT, WINDOW, RST: sent before data.
    control: VecDeque<Frame>,
    /// DATA and FIN, in order per stream.
    data: VecDeque<Frame>,
    /// Streams this end finished or reset with the current peer (the
    /// last [`GONE_KEPT`]): their late frames (a WINDOW for bytes the
    /// peer consumed, DATA sent before our FIN arrived) are dropped
    /// quietly, never answered with an RST that would overtake what this
    /// end still has queued for them.
    gone: VecDeque<u32>,
    gone_set: HashSet<u32>,
    /// Streams with an RST queued (one each).
    rst_queued: HashSet<u32>,
    /// A HELLO reply is queued (one at a time).
    reply_queued: bool,
    /// Frames dropped (another epoch, an unknown stream's), for logs.
    pub dropped: u64,
}

/// How many finished streams' ids are remembered.
const GONE_KEPT: usize = 1024;

/// Control frames queued beyond which the engine stops reading the peer
/// (a peer that writes and never reads makes this end queue an answer
/// per frame: bounded by not reading it).
pub const CONTROL_HIGH: usize = 4096;

impl Session {
    /// A new incarnation with `epoch` (non-zero, not reused: a restored
    /// peer must see it change). It says HELLO first.
    pub fn new(side: Side, epoch: u32) -> Session {
        let mut s = Session {
            side,
            epoch,
            peer: None,
            incompatible: false,
            next_id: match side {
                Side::Host => 1,
                Side::Guest => 2,
            },
            streams: BTreeMap::new(),
            control: VecDeque::new(),
            data: VecDeque::new(),
            gone: VecDeque::new(),
            gone_set: HashSet::new(),
            rst_queued: HashSet::new(),
            reply_queued: false,
            dropped: 0,
        };
        s.hello(false);
        s
    }

    /// Starts over as a new incarnation with `epoch` (the transport
    /// reconnected: what was in flight is lost, so nothing of the old
    /// streams can go on). Every stream is [`Event::Closed`]; HELLO
    /// follows.
    pub fn restart(&mut self, epoch: u32, events: &mut Vec<Event>) {
        for id in std::mem::take(&mut self.streams).into_keys() {
            events.push(Event::Closed { stream: id });
        }
        self.epoch = epoch;
        self.peer = None;
        self.incompatible = false;
        self.control.clear();
        self.data.clear();
        self.gone.clear();
        self.gone_set.clear();
        self.rst_queued.clear();
        self.reply_queued = false;
        self.hello(false);
    }

    /// Control frames waiting (see [`CONTROL_HIGH`]).
    pub fn control_backlog(&self) -> usize {
        self.control.len()
    }

    /// Whether `id` is open and its open was accepted (None: no such
    /// stream).
    pub fn accepted(&self, id: u32) -> Option<bool> {
        self.streams.get(&id).map(|s| s.accepted)
    }

    fn forget(&mut self, id: u32) {
        if self.gone_set.insert(id) {
            self.gone.push_back(id);
            if self.gone.len() > GONE_KEPT {
                if let Some(old) = self.gone.pop_front() {
                    self.gone_set.remove(&old);
                }
            }
        }
    }

    fn queue_rst(&mut self, id: u32) {
        if self.rst_queued.insert(id) {
            self.control
                .push_back(Frame::new(Kind::Rst, self.epoch, id, 0));
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Whether the peer is known (HELLO exchanged): frames flow.
    pub fn ready(&self) -> bool {
        self.peer.is_some() && !self.incompatible
    }

    /// Says HELLO again (the transport reconnected: the other end may be
    /// a new incarnation that has not heard of this one).
    pub fn hello(&mut self, reply: bool) {
        if reply && std::mem::replace(&mut self.reply_queued, true) {
            return;
        }
        let f = Frame::new(Kind::Hello, self.epoch, 0, VERSION);
        self.control
            .push_back(if reply { f.with_flags(HELLO_REPLY) } else { f });
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Opens a stream to the peer's `port`; the OPEN waits for the HELLO
    /// exchange. Data flows after [`Event::Accepted`].
    pub fn open(&mut self, port: u32) -> Result<u32, MuxError> {
        if self.streams.len() >= MAX_STREAMS {
            return Err(MuxError::TooManyStreams(self.streams.len()));
        }
        // Ids wrap after 2^31 opens; one still in use, or 0, is skipped.
        let mut id = self.next_id;
        while id == 0 || self.streams.contains_key(&id) {
            id = id.wrapping_add(2);
        }
        self.next_id = id.wrapping_add(2);
        self.streams.insert(id, Stream::new(false, port, 0));
        self.gone_set.remove(&id);
        if self.ready() {
            self.send_open(id);
        }
        Ok(id)
    }

    /// Sends a local open, and the half-closes its local end made while
    /// it waited for the peer (a stream's frames never precede its OPEN).
    fn send_open(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.sent = true;
        let (port, rd, wr) = (s.port, s.sent_rd, s.sent_wr);
        self.control
            .push_back(Frame::new(Kind::Open, self.epoch, id, port));
        if rd {
            self.control
                .push_back(Frame::new(Kind::Fin, self.epoch, id, 0).with_flags(SHUT_RD));
        }
        if wr {
            self.data
                .push_back(Frame::new(Kind::Fin, self.epoch, id, 0).with_flags(SHUT_WR));
        }
    }

    /// Accepts an [`Event::Incoming`] stream.
    pub fn accept(&mut self, id: u32) -> Result<(), MuxError> {
        let s = self.streams.get_mut(&id).ok_or(MuxError::NoStream(id))?;
        s.accepted = true;
        self.control
            .push_back(Frame::new(Kind::Accept, self.epoch, id, 0));
        Ok(())
    }

    /// Refuses an [`Event::Incoming`] stream (or aborts any stream).
    pub fn refuse(&mut self, id: u32) {
        self.reset(id);
    }

    /// Aborts a stream: RST, and it is gone.
    pub fn reset(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            self.data.retain(|f| f.stream != id);
            self.control
                .retain(|f| f.stream != id || f.kind == Kind::Hello);
            // A stream the peer never heard of ends here.
            if s.sent {
                self.forget(id);
                self.queue_rst(id);
            }
        }
    }

    /// How many bytes the local end of `id` may hand over now (its
    /// credit, 0 before the open is accepted or after its FIN).
    pub fn credit(&self, id: u32) -> u32 {
        self.streams
            .get(&id)
            .filter(|s| s.accepted && !s.out_done())
            .map_or(0, |s| s.credit)
    }

    /// Sends bytes of the local end of `id`; takes at most its credit and
    /// returns how many it took.
    pub fn send(&mut self, id: u32, bytes: &[u8]) -> usize {
        let n = (self.credit(id) as usize).min(bytes.len());
        if n == 0 {
            return 0;
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.credit -= n as u32;
        }
        for chunk in bytes[..n].chunks(MAX_PAYLOAD) {
            let mut f = Frame::new(Kind::Data, self.epoch, id, 0);
            f.payload = chunk.to_vec();
            self.data.push_back(f);
        }
        n
    }

    /// The local end of `id` took `n` bytes of what [`Event::Data`]
    /// handed it: grant them back, in batches.
    pub fn consumed(&mut self, id: u32, n: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.to_grant = s.to_grant.saturating_add(n as u32);
        if s.to_grant >= WINDOW / 2 && !s.in_done() {
            let g = std::mem::take(&mut s.to_grant);
            s.window = s.window.saturating_add(g);
            self.control
                .push_back(Frame::new(Kind::Window, self.epoch, id, g));
        }
    }

    /// The local end of `id` read EOF: FIN after the bytes before it.
    /// A stream done both ways is [`Event::Closed`].
    pub fn shutdown_write(&mut self, id: u32, events: &mut Vec<Event>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.sent_wr {
            return;
        }
        s.sent_wr = true;
        if s.sent {
            self.data
                .push_back(Frame::new(Kind::Fin, self.epoch, id, 0).with_flags(SHUT_WR));
        }
        self.finish_if_done(id, events);
    }

    /// The local end of `id` reads no more: the peer stops sending.
    pub fn shutdown_read(&mut self, id: u32, events: &mut Vec<Event>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.sent_rd {
            return;
        }
        s.sent_rd = true;
        if s.sent {
            self.control
                .push_back(Frame::new(Kind::Fin, self.epoch, id, 0).with_flags(SHUT_RD));
        }
        self.finish_if_done(id, events);
    }

    fn finish_if_done(&mut self, id: u32, events: &mut Vec<Event>) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.out_done() && s.in_done())
        {
            self.streams.remove(&id);
            self.forget(id);
            events.push(Event::Closed { stream: id });
        }
    }

    /// The next frame to write: control frames first; nothing but HELLO
    /// before the peer is known.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let f = if self.ready() {
            self.control.pop_front().or_else(|| self.data.pop_front())
        } else {
            let i = self.control.iter().position(|f| f.kind == Kind::Hello)?;
            self.control.remove(i)
        }?;
        match f.kind {
            Kind::Rst => {
                self.rst_queued.remove(&f.stream);
            }
            Kind::Hello if f.flags & HELLO_REPLY != 0 => self.reply_queued = false,
            _ => {}
        }
        Some(f)
    }

    /// Takes a frame from the peer; what the local ends must do goes to
    /// `events`.
    pub fn receive(&mut self, f: Frame, events: &mut Vec<Event>) {
        if f.kind == Kind::Hello {
            self.on_hello(f, events);
            return;
        }
        if self.peer != Some(f.epoch) || self.incompatible {
            self.dropped += 1;
            return;
        }
        let id = f.stream;
        match f.kind {
            Kind::Hello => {}
            Kind::Open => self.on_open(id, f.arg, events),
            Kind::Rst => {
                if self.streams.remove(&id).is_some() {
                    self.data.retain(|d| d.stream != id);
                    self.forget(id);
                    events.push(Event::Closed { stream: id });
                }
            }
            _ if self.gone_set.contains(&id) => {
                // A late frame of a stream this end is done with.
                self.dropped += 1;
            }
            _ if !self.streams.contains_key(&id) => {
                // A stream this end never had: said once (and never in
                // answer to an RST).
                self.dropped += 1;
                self.queue_rst(id);
            }
            Kind::Accept => {
                let s = self.streams.get_mut(&id).filter(|s| !s.accepted && s.sent);
                match s {
                    Some(s) if ours(self.side, id) => {
                        s.accepted = true;
                        s.credit = WINDOW;
                        events.push(Event::Accepted { stream: id });
                    }
                    _ => self.violation(id, events),
                }
            }
            Kind::Data => {
                let n = f.payload.len() as u32;
                if self
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.sent_rd && !s.got_wr)
                {
                    // Sent before our SHUT_RD reached the peer.
                    self.dropped += 1;
                    return;
                }
                let ok = self
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.accepted && !s.got_wr && n <= s.window);
                if !ok {
                    self.violation(id, events);
                    return;
                }
                if let Some(s) = self.streams.get_mut(&id) {
                    s.window -= n;
                }
                if n > 0 {
                    events.push(Event::Data {
                        stream: id,
                        bytes: f.payload,
                    });
                }
            }
            Kind::Window => {
                if let Some(s) = self.streams.get_mut(&id) {
                    // More than a window in flight is the peer's own
                    // buffering: capped, not trusted.
                    s.credit = s.credit.saturating_add(f.arg).min(WINDOW);
                }
            }
            Kind::Fin => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if f.flags & SHUT_WR != 0 && !s.got_wr {
                    s.got_wr = true;
                    events.push(Event::PeerShutWrite { stream: id });
                }
                if f.flags & SHUT_RD != 0 && !s.got_rd {
                    s.got_rd = true;
                    // What this end queued is not wanted; its FIN still is.
                    self.data.retain(|d| d.stream != id || d.kind == Kind::Fin);
                    events.push(Event::PeerShutRead { stream: id });
                }
                self.finish_if_done(id, events);
            }
        }
    }

    fn on_hello(&mut self, f: Frame, events: &mut Vec<Event>) {
        if f.arg != VERSION {
            self.incompatible = true;
            self.peer = None;
            self.drop_all(events, true);
            events.push(Event::Incompatible { version: f.arg });
            return;
        }
        self.incompatible = false;
        let reply = f.flags & HELLO_REPLY != 0;
        if self.peer != Some(f.epoch) {
            // A new peer: nothing of the old one's streams goes on.
            self.peer = Some(f.epoch);
            self.drop_all(events, false);
            self.data.clear();
            self.control.retain(|c| c.kind == Kind::Hello);
            self.rst_queued.clear();
            self.gone.clear();
            self.gone_set.clear();
            // The reply first: a peer that missed this end's HELLO learns
            // its epoch before the opens that carry it.
            if !reply {
                self.hello(true);
            }
            let pending: Vec<u32> = self.streams.keys().copied().collect();
            for id in pending {
                self.send_open(id);
            }
        } else if !reply {
            self.hello(true);
        }
    }

    /// Drops the streams the old peer knew of (all of them with `every`;
    /// else local opens not yet sent stay, for the new peer).
    fn drop_all(&mut self, events: &mut Vec<Event>, every: bool) {
        let gone: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| every || s.sent)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.streams.remove(&id);
            events.push(Event::Closed { stream: id });
        }
    }

    fn on_open(&mut self, id: u32, port: u32, events: &mut Vec<Event>) {
        if self.streams.contains_key(&id) {
            // The peer's own stream opened twice: it is reset both ways.
            self.violation(id, events);
            return;
        }
        if ours(self.side, id) || id == 0 {
            self.dropped += 1;
            self.queue_rst(id);
            return;
        }
        if self.streams.len() >= MAX_STREAMS {
            self.queue_rst(id);
            return;
        }
        self.streams.insert(id, Stream::new(true, port, WINDOW));
        self.gone_set.remove(&id);
        events.push(Event::Incoming { stream: id, port });
    }

    /// The peer broke the protocol on `id`: the stream is reset.
    fn violation(&mut self, id: u32, events: &mut Vec<Event>) {
        self.dropped += 1;
        if self.streams.contains_key(&id) {
            events.push(Event::Closed { stream: id });
        }
        self.reset(id);
        self.queue_rst(id);
    }
}

/// Whether `id` is of the ids `side` opens.
fn ours(side: Side, id: u32) -> bool {
    match side {
        Side::Host => !id.is_multiple_of(2),
        Side::Guest => id.is_multiple_of(2),
    }
}

#[cfg(test)]
mod tests;
