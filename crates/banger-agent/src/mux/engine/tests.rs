//! Engines on real sockets: a host and a guest end joined by a socket
//! pair standing in for the virtio-serial port.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::mux::frame::{Frame, Kind, Reader, HELLO_REPLY};
use crate::mux::session::Side;

/// A safety net for a broken engine (a test that would hang fails
/// instead); never what a test waits on.
const HANG: Duration = Duration::from_secs(120);

/// Serves port 1024 with an echo (each stream's end is reported on
/// `ended`), port 7 with a reader that reads nothing until `gate` opens;
/// refuses the rest.
fn guest_services(ended: mpsc::Sender<u32>, gate: mpsc::Receiver<()>) -> OnIncoming {
    let gate = std::sync::Mutex::new(Some(gate));
    Box::new(move |port| {
        let (mine, theirs) = UnixStream::pair().ok()?;
        match port {
            1024 => {
                let ended = ended.clone();
                thread::spawn(move || {
                    let mut s = mine;
                    let mut buf = [0u8; 8192];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let _ = ended.send(1024);
                });
            }
            7 => {
                let gate = gate.lock().ok()?.take()?;
                thread::spawn(move || {
                    let _ = gate.recv();
                    let mut s = mine;
                    let mut all = Vec::new();
                    let _ = s.read_to_end(&mut all);
                    let _ = s.write_all(&(all.len() as u64).to_le_bytes());
                });
            }
            _ => return None,
        }
        Some(theirs)
    })
}

fn start(side: Side, epoch: u32, port: UnixStream, on: OnIncoming) -> Mux {
    let (mut e, mux) = Engine::new(Session::new(side, epoch), port.into(), on).unwrap();
    thread::spawn(move || e.run());
    mux
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

/// 64 streams at once, each echoing 256 KiB, while another stream's
/// reader reads nothing: all 64 finish with that one still stuck, then
/// it drains once let go. A refused port reads EOF.
#[test]
fn many_streams_flow_while_one_reader_stalls() {
    let (hp, gp) = UnixStream::pair().unwrap();
    let (ended_tx, ended) = mpsc::channel();
    let (gate_tx, gate) = mpsc::channel();
    let _guest = start(Side::Guest, 2, gp, guest_services(ended_tx, gate));
    let host = start(Side::Host, 1, hp, Box::new(|_| None));

    let stalled = host.connect(7).unwrap();
    stalled.set_write_timeout(Some(HANG)).unwrap();
    let (stuck_tx, stuck) = mpsc::channel();
    let total = 4 << 20;
    let writer = {
        let mut s = stalled.try_clone().unwrap();
        thread::spawn(move || {
            let r = s.write_all(&vec![5u8; total]);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = stuck_tx.send(());
            r
        })
    };

    let workers: Vec<_> = (0..64)
        .map(|i| {
            let s = host.connect(1024).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            thread::spawn(move || {
                let data = pattern(i, 256 * 1024);
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let t = thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                let mut r = s;
                r.read_to_end(&mut back).unwrap();
                t.join().unwrap();
                back == data
            })
        })
        .collect();
    for w in workers {
        assert!(w.join().unwrap(), "a stream's echo differed");
    }
    for _ in 0..64 {
        assert_eq!(ended.recv_timeout(HANG), Ok(1024));
    }
    assert!(
        stuck.try_recv().is_err(),
        "4 MiB fit past a reader that reads nothing: no flow control"
    );

    gate_tx.send(()).unwrap();
    writer.join().unwrap().unwrap();
    let mut n = [0u8; 8];
    let mut r = stalled;
    r.set_read_timeout(Some(HANG)).unwrap();
    r.read_exact(&mut n).unwrap();
    assert_eq!(u64::from_le_bytes(n), total as u64);

    let mut refused = host.connect(9).unwrap();
    refused.set_read_timeout(Some(HANG)).unwrap();
    let mut buf = Vec::new();
    assert_eq!(refused.read_to_end(&mut buf).unwrap(), 0);
}

/// The test as the host: a session of its own on the raw port.
struct RawHost {
    s: Session,
    port: UnixStream,
    reader: Reader,
}

impl RawHost {
    fn new(epoch: u32, port: UnixStream) -> RawHost {
        RawHost::on(Side::Host, epoch, port)
    }

    /// The test as either end.
    fn on(side: Side, epoch: u32, port: UnixStream) -> RawHost {
        port.set_read_timeout(Some(HANG)).unwrap();
        RawHost {
            s: Session::new(side, epoch),
            port,
            reader: Reader::default(),
        }
    }

    fn flush(&mut self) {
        let mut out = Vec::new();
        while let Some(f) = self.s.next_frame() {
            f.encode(&mut out).unwrap();
        }
        self.port.write_all(&out).unwrap();
    }

    /// Reads frames until `done` holds for what they caused.
    fn until(&mut self, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            self.flush();
            if done(&events) {
                return events;
            }
            let mut buf = [0u8; 65536];
            let n = self
                .port
                .read(&mut buf)
                .expect("the guest engine went quiet");
            assert!(n > 0, "the guest engine closed the port");
            let mut frames = Vec::new();
            self.reader.push(&buf[..n], &mut frames);
            for f in frames {
                self.s.receive(f, &mut events);
            }
        }
    }

    fn echo(&mut self, id: u32, bytes: &[u8]) {
        assert_eq!(self.s.send(id, bytes), bytes.len());
        let want = bytes.to_vec();
        let ev = self.until(|ev| {
            let got: Vec<u8> = ev
                .iter()
                .filter_map(|e| match e {
                    Event::Data { stream, bytes } if *stream == id => Some(bytes.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            got.len() >= want.len()
        });
        let got: Vec<u8> = ev
            .into_iter()
            .filter_map(|e| match e {
                Event::Data { bytes, .. } => Some(bytes),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got, bytes);
    }
}

/// A snapshot's clone, from the guest's side: its engine (same state)
/// meets a new helper in the middle of a frame of the old one's. The old
/// streams end (their local ends read EOF), nothing of the old frame
/// arrives, and the new helper's streams work.
#[test]
fn a_new_host_mid_frame_resets_the_guests_streams() {
    let (hp, gp) = UnixStream::pair().unwrap();
    let (ended_tx, ended) = mpsc::channel();
    let (_gate_tx, gate) = mpsc::channel();
    let _guest = start(Side::Guest, 2, gp, guest_services(ended_tx, gate));

    // Opens wait for the HELLO exchange.
    let mut h1 = RawHost::new(100, hp.try_clone().unwrap());
    let id = h1.s.open(1024).unwrap();
    h1.until(|ev| ev.contains(&Event::Accepted { stream: id }));
    h1.echo(id, b"before the snapshot");

    // Half of a frame in flight when the origin was saved.
    let mut cut = Vec::new();
    let mut f = Frame::new(Kind::Data, 100, id, 0);
    f.payload = b"this frame never arrives whole".to_vec();
    f.encode(&mut cut).unwrap();
    hp.try_clone()
        .unwrap()
        .write_all(&cut[..cut.len() / 2])
        .unwrap();

    // The clone's helper: a new epoch, a new start.
    let mut h2 = RawHost::new(200, hp);
    h2.port.write_all(&[0, 0]).unwrap();
    let id2 = h2.s.open(1024).unwrap();
    h2.until(|ev| ev.contains(&Event::Accepted { stream: id2 }));
    assert_eq!(
        ended.recv_timeout(HANG),
        Ok(1024),
        "the origin's stream ended"
    );
    h2.echo(id2, b"after the restore");
}

/// An engine whose port closes returns; reattached over a new port it
/// says HELLO again, and a new peer's streams work.
#[test]
fn an_engine_reattaches_to_a_new_port() {
    let (hp, gp) = UnixStream::pair().unwrap();
    let (ended_tx, _ended) = mpsc::channel();
    let (_gate_tx, gate) = mpsc::channel();
    let (mut g, _mux) = Engine::new(
        Session::new(Side::Guest, 2),
        gp.into(),
        guest_services(ended_tx, gate),
    )
    .unwrap();
    drop(hp);
    g.run().unwrap();

    let (hp, gp) = UnixStream::pair().unwrap();
    g.reattach(gp.into(), 7).unwrap();
    let t = thread::spawn(move || g.run());
    let mut h = RawHost::new(300, hp);
    // The guest's HELLO (not a reply) comes first after the new start.
    let mut buf = [0u8; 4096];
    let n = h.port.read(&mut buf).unwrap();
    let mut frames = Vec::new();
    h.reader.push(&buf[..n], &mut frames);
    assert_eq!(frames[0].kind, Kind::Hello);
    assert_eq!(frames[0].flags & HELLO_REPLY, 0);
    let mut ev = Vec::new();
    for f in frames {
        h.s.receive(f, &mut ev);
    }
    let id = h.s.open(1024).unwrap();
    h.until(|ev| ev.contains(&Event::Accepted { stream: id }));
    h.echo(id, b"over the new port");
    drop(h);
    t.join().unwrap().unwrap();
}

/// An engine whose every handle is gone (the agent's hello thread held
/// its last) goes on serving, without spinning on the wake pipe's hangup.
#[test]
fn an_engine_without_handles_does_not_spin() {
    let (hp, gp) = UnixStream::pair().unwrap();
    let (ended_tx, _ended) = mpsc::channel();
    let (_gate_tx, gate) = mpsc::channel();
    let (mut g, mux) = Engine::new(
        Session::new(Side::Guest, 2),
        gp.into(),
        guest_services(ended_tx, gate),
    )
    .unwrap();
    drop(mux);
    let host = thread::spawn(move || {
        let mut h = RawHost::new(400, hp);
        let id = h.s.open(1024).unwrap();
        h.until(|ev| ev.contains(&Event::Accepted { stream: id }));
        for i in 0..10 {
            h.echo(id, format!("round {i}").as_bytes());
        }
    });
    // Returns once the host's end closes.
    g.run().unwrap();
    host.join().unwrap();
    assert!(
        g.turns < 1000,
        "{} turns of the loop for ten echoes",
        g.turns
    );
}

/// Local ends are dropped once nothing more can pass through them: a
/// client that gives up before the peer accepted (its open withdrawn
/// with an RST), and one that closes while bytes for it still wait (its
/// stream reset by the peer).
#[test]
fn local_ends_that_can_carry_nothing_more_are_dropped() {
    let (hp, gp) = UnixStream::pair().unwrap();
    let (mut host, mux) =
        Engine::new(Session::new(Side::Host, 1), hp.into(), Box::new(|_| None)).unwrap();
    let (give_up_tx, give_up) = mpsc::channel::<()>();
    let (gone_tx, gone) = mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let patient = mux.connect(1024).unwrap();
        let impatient = mux.connect(1024).unwrap();
        give_up.recv().unwrap();
        drop(impatient);
        gone.recv().unwrap();
        drop(patient);
    });
    // The test as the guest (on a thread of its own while the host's
    // engine runs here): it accepts the first open only, sends it bytes
    // its client never reads, and resets it.
    let guest = thread::spawn(move || {
        let mut g = RawHost::on(Side::Guest, 2, gp);
        let ev = g.until(|ev| {
            ev.iter()
                .filter(|e| matches!(e, Event::Incoming { .. }))
                .count()
                == 2
        });
        let ids: Vec<u32> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Incoming { stream, .. } => Some(*stream),
                _ => None,
            })
            .collect();
        let (patient, impatient) = (ids[0], ids[1]);
        g.s.accept(patient).unwrap();
        give_up_tx.send(()).unwrap();
        g.until(|ev| ev.contains(&Event::Closed { stream: impatient }));
        // More than the client's socket takes: some wait in the engine.
        let n = super::super::WINDOW as usize;
        assert_eq!(g.s.send(patient, &vec![9u8; n]), n);
        g.flush();
        g.s.reset(patient);
        // A probe the host refuses: by its RST, the host's engine has
        // taken in everything before it (the reset included).
        let probe = g.s.open(5).unwrap();
        g.until(|ev| ev.contains(&Event::Closed { stream: probe }));
        gone_tx.send(()).unwrap();
        client.join().unwrap();
        // Another: the host's engine has taken in the client's close (a
        // poll reports both, and local ends are handled before the
        // port), and the test ends.
        let probe = g.s.open(5).unwrap();
        g.until(|ev| ev.contains(&Event::Closed { stream: probe }));
    });
    // Returns once the guest's end closes.
    host.run().unwrap();
    guest.join().unwrap();
    assert_eq!(host.streams(), 0, "a local end was kept");
}
