//! What one client of the daemon's socket may hold (issue 20): its
//! request line within a deadline, its writes bounded, at most
//! [`MAX_CONNS_PER_UID`] connections per uid but root's (the rest answered
//! by one refuser thread), and a connection shut down when its request
//! ends. `server.rs` applies them.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use banger_core::api::{ApiError, ErrorKind, Reply};
use tracing::warn;

use crate::server::{write_reply, MAX_REQUEST};

/// How long a client may take to send its whole request line.
pub(crate) const REQUEST_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one write to a client may wait for it to read (a client that
/// stops reading its events does not hold a request's thread, and the
/// locks it holds, beyond this).
pub(crate) const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How many connections one uid other than root may hold open at once.
pub const MAX_CONNS_PER_UID: u32 = 32;

/// A connection's place in the counts, given back when its thread ends.
pub(crate) struct Counted<'a> {
    pub(crate) in_flight: &'a std::sync::atomic::AtomicUsize,
    pub(crate) conns: &'a Conns,
    pub(crate) uid: u32,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.conns.leave(self.uid);
    }
}

/// Shuts the connection down both ways when its request is done, however
/// it ends: the hang-up watcher's read (`Conn::hangup`) returns then, so
/// no thread or descriptor outlives the request while the client keeps
/// its end open.
pub(crate) struct ShutOnDrop(pub(crate) UnixStream);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The connections open now, by uid: the accept loop's count for the cap.
#[derive(Debug, Default)]
pub struct Conns(std::sync::Mutex<std::collections::HashMap<u32, u32>>);

impl Conns {
    /// Counts a connection of `uid` in, unless `uid` (not root) is at the
    /// cap.
    pub(crate) fn enter(&self, uid: u32) -> bool {
        let mut m = crate::daemon::lock(&self.0);
        let n = m.entry(uid).or_insert(0);
        if uid != 0 && *n >= MAX_CONNS_PER_UID {
            return false;
        }
        *n += 1;
        true
    }

    pub(crate) fn leave(&self, uid: u32) {
        let mut m = crate::daemon::lock(&self.0);
        if let Some(n) = m.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&uid);
            }
        }
    }

    pub fn total(&self) -> u32 {
        crate::daemon::lock(&self.0).values().sum()
    }
}

/// One thread that answers the connections over a uid's cap: it reads
/// the request line first (within a second: a client whose request is
/// still unread when the socket closes would see its write fail, not the
/// answer), then says why. The accept loop never waits on it; at most
/// 64 wait their turn.
pub(crate) fn refuser() -> std::sync::mpsc::SyncSender<(UnixStream, u32)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(UnixStream, u32)>(64);
    let spawned = std::thread::Builder::new()
        .name("refuser".into())
        .spawn(move || {
            for (mut stream, uid) in rx {
                let wait = std::time::Duration::from_secs(1);
                let _ = stream.set_write_timeout(Some(wait));
                let mut line = String::new();
                let d = banger_agent::deadline::Deadline::new(&stream, wait);
                let _ = BufReader::new(d.take(MAX_REQUEST)).read_line(&mut line);
                write_reply(
                    &mut stream,
                    &Reply::Err(ApiError {
                        kind: ErrorKind::Conflict,
                        message: format!(
                            "uid {uid} has {MAX_CONNS_PER_UID} connections to bangerd open \
                             already (its cap): wait for one to end, or end a \
                             `vm logs -f` or `vm run --rm` of yours"
                        ),
                    }),
                );
            }
        });
    if let Err(e) = spawned {
        warn!(err = %e, "cannot start the refuser thread: refused connections are closed unanswered");
    }
    tx
}
