//! A deadline for a whole exchange on a socket, not for each read: a peer
//! that trickles its answer a byte at a time (a hostile guest's agent)
//! still has the exchange end when the deadline passes. Before every read
//! and write the socket's timeout is set to what is left.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// `s` with a deadline at `until`; `within` is how long that was, for the
/// error.
pub struct Deadline<'a> {
    s: &'a UnixStream,
    until: Instant,
    within: Duration,
}

impl<'a> Deadline<'a> {
    pub fn new(s: &'a UnixStream, within: Duration) -> Deadline<'a> {
        Deadline {
            s,
            until: Instant::now() + within,
            within,
        }
    }

    /// What is left, or the error that ends the exchange.
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole answer within {:.1} s", self.within.as_secs_f64()),
            ));
        }
        Ok(left)
    }

    /// A timeout error from the socket is the deadline's: said so.
    fn named(&self, e: io::Error) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole answer within {:.1} s", self.within.as_secs_f64()),
            );
        }
        e
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        // A signal's interruption is no end of the exchange: read again
        // (with what is left).
        loop {
            let left = self.left()?;
            self.s.set_read_timeout(Some(left))?;
            match (&mut &*self.s).read(b) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map_err(|e| self.named(e)),
            }
        }
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        loop {
            let left = self.left()?;
            self.s.set_write_timeout(Some(left))?;
            match (&mut &*self.s).write(b) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map_err(|e| self.named(e)),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends a byte every 50 ms forever: each read is quick,
    /// the exchange is not, and it ends at the deadline.
    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut b = b;
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                if b.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut d = Deadline::new(&a, Duration::from_millis(300));
        let mut sink = Vec::new();
        let e = d.read_to_end(&mut sink).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("within 0.3 s"), "{e}");
        assert!(!sink.is_empty(), "bytes came, and still it ended");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(a);
        t.join().unwrap();
    }
}
