//! Two sessions driven against each other through the real wire format
//! (frames encoded, split at every byte boundary the reader meets).

use super::*;
use crate::mux::frame::Reader;

/// One end and what it has seen.
struct End {
    s: Session,
    reader: Reader,
    events: Vec<Event>,
}

impl End {
    fn new(side: Side, epoch: u32) -> End {
        End {
            s: Session::new(side, epoch),
            reader: Reader::default(),
            events: Vec::new(),
        }
    }

    /// Everything this end would write now.
    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(f) = self.s.next_frame() {
            f.encode(&mut out).unwrap();
        }
        out
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut frames = Vec::new();
        self.reader.push(bytes, &mut frames);
        for f in frames {
            self.s.receive(f, &mut self.events);
        }
    }

    fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The bytes handed to stream `id`'s local end (and consumed).
    fn read(&mut self, id: u32) -> Vec<u8> {
        let mut got = Vec::new();
        let mut rest = Vec::new();
        for e in self.take() {
            match e {
                Event::Data { stream, bytes } if stream == id => got.extend(bytes),
                e => rest.push(e),
            }
        }
        self.events = rest;
        self.s.consumed(id, got.len());
        got
    }
}

/// Moves frames both ways until neither end has more to say.
fn pump(a: &mut End, b: &mut End) {
    for _ in 0..1000 {
        let ab = a.drain();
        let ba = b.drain();
        if ab.is_empty() && ba.is_empty() {
            return;
        }
        b.feed(&ab);
        a.feed(&ba);
    }
    panic!("the sessions never went quiet");
}

fn pair() -> (End, End) {
    let (mut h, mut g) = (End::new(Side::Host, 11), End::new(Side::Guest, 22));
    pump(&mut h, &mut g);
    assert!(h.s.ready() && g.s.ready());
    assert!(h.take().is_empty() && g.take().is_empty());
    (h, g)
}

/// Opens a stream from `a` to `b`'s port 1024 and accepts it.
fn connect(a: &mut End, b: &mut End) -> u32 {
    let id = a.s.open(1024).unwrap();
    pump(a, b);
    assert_eq!(
        b.take(),
        vec![Event::Incoming {
            stream: id,
            port: 1024
        }]
    );
    b.s.accept(id).unwrap();
    pump(a, b);
    assert_eq!(a.take(), vec![Event::Accepted { stream: id }]);
    id
}

#[test]
fn a_stream_carries_bytes_both_ways_and_closes_by_halves() {
    let (mut h, mut g) = pair();
    let id = connect(&mut h, &mut g);
    assert_eq!(id % 2, 1, "the host's ids are odd");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(h.s.send(id, &big), big.len());
    assert_eq!(g.s.send(id, b"hello from the guest"), 20);
    pump(&mut h, &mut g);
    assert_eq!(g.read(id), big);
    assert_eq!(h.read(id), b"hello from the guest");

    // The host writes no more; the guest still can.
    h.s.shutdown_write(id, &mut h.events);
    pump(&mut h, &mut g);
    assert_eq!(g.take(), vec![Event::PeerShutWrite { stream: id }]);
    assert_eq!(h.s.send(id, b"late"), 0, "nothing after the host's FIN");
    assert_eq!(g.s.send(id, b"answer"), 6);
    g.s.shutdown_write(id, &mut g.events);
    pump(&mut h, &mut g);
    assert_eq!(h.read(id), b"answer");
    assert_eq!(
        h.take(),
        vec![
            Event::PeerShutWrite { stream: id },
            Event::Closed { stream: id }
        ]
    );
    assert_eq!(g.take(), vec![Event::Closed { stream: id }]);
    assert_eq!((h.s.streams(), g.s.streams()), (0, 0));
}

#[test]
fn opens_before_the_hello_wait_for_it() {
    let (mut h, mut g) = (End::new(Side::Host, 1), End::new(Side::Guest, 2));
    let id = h.s.open(1024).unwrap();
    let gid = g.s.open(1025).unwrap();
    assert_eq!(gid % 2, 0, "the guest's ids are even");
    pump(&mut h, &mut g);
    assert_eq!(
        g.take(),
        vec![Event::Incoming {
            stream: id,
            port: 1024
        }]
    );
    assert_eq!(
        h.take(),
        vec![Event::Incoming {
            stream: gid,
            port: 1025
        }]
    );
}

/// A sender stops at its credit; the receiver's consumption gives it
/// back. A reader that never consumes holds only its own stream.
#[test]
fn credit_bounds_what_is_in_flight_per_stream() {
    let (mut h, mut g) = pair();
    let slow = connect(&mut h, &mut g);
    let fast = connect(&mut h, &mut g);
    let lots = vec![7u8; 3 * WINDOW as usize];
    assert_eq!(h.s.send(slow, &lots), WINDOW as usize);
    assert_eq!(h.s.send(slow, &lots), 0);
    pump(&mut h, &mut g);
    // The slow stream's reader consumes nothing; the fast one all of it.
    let mut moved = 0;
    for _ in 0..8 {
        moved += h.s.send(fast, &lots[..64 * 1024]);
        pump(&mut h, &mut g);
        let mut rest = Vec::new();
        for e in g.take() {
            match e {
                Event::Data { stream, bytes } if stream == fast => g.s.consumed(fast, bytes.len()),
                e => rest.push(e),
            }
        }
        g.events = rest;
        pump(&mut h, &mut g);
    }
    assert_eq!(
        moved,
        8 * 64 * 1024,
        "the fast stream never waited on the slow one"
    );
    assert_eq!(h.s.credit(slow), 0);
    assert_eq!(g.read(slow).len(), WINDOW as usize);
    pump(&mut h, &mut g);
    assert_eq!(h.s.credit(slow), WINDOW, "consumed bytes are granted back");
}

#[test]
fn data_beyond_the_window_resets_the_stream() {
    let (mut h, mut g) = pair();
    let id = connect(&mut h, &mut g);
    // A hostile host ignores its credit: frames made by hand.
    let mut wire = Vec::new();
    for _ in 0..(WINDOW as usize / MAX_PAYLOAD + 1) {
        let mut f = Frame::new(Kind::Data, 11, id, 0);
        f.payload = vec![1; MAX_PAYLOAD];
        f.encode(&mut wire).unwrap();
    }
    g.feed(&wire);
    let ev = g.take();
    let data = ev
        .iter()
        .filter(|e| matches!(e, Event::Data { .. }))
        .count();
    assert_eq!(data, WINDOW as usize / MAX_PAYLOAD);
    assert_eq!(ev.last(), Some(&Event::Closed { stream: id }));
    assert_eq!(g.s.streams(), 0);
    pump(&mut h, &mut g);
    assert_eq!(
        h.take(),
        vec![Event::Closed { stream: id }],
        "the host hears the RST"
    );
}

/// Opens a peer may not make: an id of this end's parity, id 0, one in
/// use (that stream is reset), one past the stream limit. Each gets an
/// RST; none an Incoming.
#[test]
fn bad_opens_are_refused() {
    let (mut h, mut g) = pair();
    let used = connect(&mut h, &mut g);
    let mut wire = Vec::new();
    for id in [2u32, 0, used] {
        Frame::new(Kind::Open, 11, id, 1024)
            .encode(&mut wire)
            .unwrap();
    }
    g.feed(&wire);
    assert_eq!(g.take(), vec![Event::Closed { stream: used }]);
    assert_eq!(g.s.streams(), 0);

    let mut wire = Vec::new();
    for i in 1..=MAX_STREAMS as u32 + 4 {
        Frame::new(Kind::Open, 11, 2 * i + 1, 1024)
            .encode(&mut wire)
            .unwrap();
    }
    g.feed(&wire);
    assert_eq!(g.take().len(), MAX_STREAMS);
    assert_eq!(g.s.streams(), MAX_STREAMS);
    let rsts = std::iter::from_fn(|| g.s.next_frame())
        .filter(|f| f.kind == Kind::Rst)
        .count();
    assert_eq!(rsts, 3 + 4);
    assert_eq!(g.s.open(1025), Err(MuxError::TooManyStreams(MAX_STREAMS)));
}

/// A snapshot's clone: the guest (same RAM, same epoch) meets a new
/// helper. Its old streams end, new ones work, and the old helper's
/// frames are dropped.
#[test]
fn a_new_peer_resets_the_old_streams() {
    let (mut h1, mut g) = pair();
    let old = connect(&mut h1, &mut g);
    assert_eq!(h1.s.send(old, b"before the snapshot"), 19);
    let in_flight = h1.drain();

    let mut h2 = End::new(Side::Host, 33);
    pump(&mut h2, &mut g);
    assert_eq!(g.take(), vec![Event::Closed { stream: old }]);
    // The origin's frame, cut in half and delivered late: nothing.
    g.feed(&in_flight[..in_flight.len() / 2]);
    g.feed(&[0, 0]);
    g.feed(&in_flight);
    assert!(g.take().is_empty());
    assert!(g.s.dropped > 0);

    let id = connect(&mut h2, &mut g);
    assert_eq!(id, 1, "the new helper's ids start again");
    assert_eq!(h2.s.send(id, b"after"), 5);
    pump(&mut h2, &mut g);
    assert_eq!(g.read(id), b"after");
}

/// A restarted guest agent (new epoch) and the same helper: the helper's
/// streams end, and an open it queued meanwhile reaches the new agent.
#[test]
fn a_restarted_guest_resets_the_hosts_streams() {
    let (mut h, mut g1) = pair();
    let old = connect(&mut h, &mut g1);
    let mut g2 = End::new(Side::Guest, 44);
    pump(&mut h, &mut g2);
    assert_eq!(h.take(), vec![Event::Closed { stream: old }]);
    let id = connect(&mut h, &mut g2);
    assert_ne!(id, old);
}

#[test]
fn another_version_is_not_spoken_to() {
    let (mut h, mut g) = pair();
    let id = connect(&mut h, &mut g);
    let mut wire = Vec::new();
    Frame::new(Kind::Hello, 55, 0, VERSION + 1)
        .encode(&mut wire)
        .unwrap();
    g.feed(&wire);
    assert_eq!(
        g.take(),
        vec![
            Event::Closed { stream: id },
            Event::Incompatible {
                version: VERSION + 1
            }
        ]
    );
    assert!(!g.s.ready());
    assert_eq!(g.s.send(id, b"x"), 0);
}

/// SHUT_RD: the peer drops what it had queued for a reader that left.
#[test]
fn a_reader_that_leaves_stops_the_sender() {
    let (mut h, mut g) = pair();
    let id = connect(&mut h, &mut g);
    g.s.shutdown_read(id, &mut g.events);
    assert_eq!(h.s.send(id, b"queued before the FIN arrives"), 29);
    pump(&mut h, &mut g);
    assert_eq!(h.take(), vec![Event::PeerShutRead { stream: id }]);
    assert!(g.take().is_empty(), "nothing delivered after SHUT_RD");
    assert_eq!(h.s.credit(id), 0);
    // The other direction still works.
    assert_eq!(g.s.send(id, b"still talking"), 13);
    pump(&mut h, &mut g);
    assert_eq!(h.read(id), b"still talking");
}

#[test]
fn frames_for_unknown_streams_get_one_rst_and_no_echo() {
    let (mut h, mut g) = pair();
    let _ = &mut h;
    let mut wire = Vec::new();
    let mut f = Frame::new(Kind::Data, 11, 99, 0);
    f.payload = b"x".to_vec();
    f.encode(&mut wire).unwrap();
    Frame::new(Kind::Rst, 11, 77, 0).encode(&mut wire).unwrap();
    g.feed(&wire);
    let out: Vec<Frame> = std::iter::from_fn(|| g.s.next_frame()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].kind, out[0].stream), (Kind::Rst, 99));
    pump(&mut h, &mut g);
    assert!(h.take().is_empty() && g.take().is_empty());
}

/// A local end that half-closes while its open waits for the HELLO (the
/// agent's hello: written, then closed at once): nothing of the stream
/// precedes its OPEN, and its bytes still arrive.
#[test]
fn half_closes_before_the_hello_follow_the_open() {
    let (mut h, mut g) = (End::new(Side::Host, 1), End::new(Side::Guest, 2));
    let id = g.s.open(1025).unwrap();
    g.s.shutdown_read(id, &mut g.events);
    let early: Vec<Frame> = std::iter::from_fn(|| g.s.next_frame()).collect();
    assert!(
        early.iter().all(|f| f.kind == Kind::Hello),
        "only HELLO before the peer is known: {early:?}"
    );
    g.s.hello(false);
    pump(&mut h, &mut g);
    assert_eq!(
        h.take(),
        vec![
            Event::Incoming {
                stream: id,
                port: 1025
            },
            Event::PeerShutRead { stream: id }
        ]
    );
    h.s.accept(id).unwrap();
    pump(&mut h, &mut g);
    assert_eq!(g.take(), vec![Event::Accepted { stream: id }]);
    assert_eq!(g.s.send(id, b"hello"), 5);
    g.s.shutdown_write(id, &mut g.events);
    pump(&mut h, &mut g);
    assert_eq!(h.read(id), b"hello");
    assert_eq!(
        h.take(),
        vec![
            Event::PeerShutWrite { stream: id },
            Event::Closed { stream: id }
        ]
    );
    assert_eq!(g.take(), vec![Event::Closed { stream: id }]);
}

/// A stream finished both ways, then a late WINDOW (for bytes the peer
/// consumed before it saw the FIN) and late DATA: dropped quietly, no
/// RST that would overtake what this end still had queued.
#[test]
fn late_frames_of_a_finished_stream_are_dropped_quietly() {
    let (mut h, mut g) = pair();
    let id = connect(&mut h, &mut g);
    h.s.shutdown_write(id, &mut h.events);
    g.s.shutdown_write(id, &mut g.events);
    pump(&mut h, &mut g);
    assert_eq!((h.s.streams(), g.s.streams()), (0, 0));
    g.take();
    let mut wire = Vec::new();
    Frame::new(Kind::Window, 11, id, 4096)
        .encode(&mut wire)
        .unwrap();
    Frame::new(Kind::Fin, 11, id, 0)
        .with_flags(SHUT_RD)
        .encode(&mut wire)
        .unwrap();
    g.feed(&wire);
    assert!(std::iter::from_fn(|| g.s.next_frame()).next().is_none());
    assert!(g.take().is_empty());
}

/// What a peer that writes and never reads can make this end queue: one
/// HELLO reply however many HELLOs, one RST per unknown stream however
/// many frames for it.
#[test]
fn answers_to_a_flooding_peer_do_not_pile_up() {
    let (_h, mut g) = pair();
    let mut wire = Vec::new();
    for _ in 0..1000 {
        Frame::new(Kind::Hello, 11, 0, VERSION)
            .encode(&mut wire)
            .unwrap();
        Frame::new(Kind::Window, 11, 99, 1)
            .encode(&mut wire)
            .unwrap();
    }
    g.feed(&wire);
    assert_eq!(g.s.control_backlog(), 2, "one reply, one RST");
    let sent: Vec<Frame> = std::iter::from_fn(|| g.s.next_frame()).collect();
    assert_eq!(sent.len(), 2);
    // Once sent, a new one may be queued again.
    g.feed(&wire[..wire.len() / 1000]);
    assert_eq!(g.s.control_backlog(), 2);
}

/// A restart (the transport came back): every stream closed, a new
/// epoch's HELLO, and the peer resets its side too.
#[test]
fn a_restart_closes_every_stream_on_both_ends() {
    let (mut h, mut g) = pair();
    let a = connect(&mut h, &mut g);
    let b = connect(&mut g, &mut h);
    let mut ev = Vec::new();
    g.s.restart(23, &mut ev);
    assert_eq!(
        ev,
        vec![Event::Closed { stream: a }, Event::Closed { stream: b }]
    );
    assert!(!g.s.ready());
    pump(&mut h, &mut g);
    let mut closed = h.take();
    closed.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        closed,
        vec![Event::Closed { stream: a }, Event::Closed { stream: b }]
    );
    let c = connect(&mut h, &mut g);
    assert_eq!(h.s.send(c, b"again"), 5);
    pump(&mut h, &mut g);
    assert_eq!(g.read(c), b"again");
}
