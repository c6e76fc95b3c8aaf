//! The agent channel's multiplexer: many byte streams (one per agent
//! call, exec session or copy) over one byte stream that survives a
//! snapshot (a virtio-serial port on QEMU). The design and why it is not
//! yamux: docs/design/snapshots-agent-channel.md.
//!
//! - [`frame`]: the frames on the wire (COBS, a `0x00` after each, a CRC),
//!   and a reader that resyncs at the next boundary after anything bad.
//! - [`session`]: the protocol's state, with no I/O: epochs (a new
//!   incarnation of either end resets every stream), opens, credit-based
//!   flow control per stream, half-closes, resets, and the bounds a
//!   hostile peer meets.
//! - [`engine`]: the I/O around a session: one thread, one `poll` loop
//!   over the port, the streams' local sockets and a wake pipe; a
//!   [`Mux`] handle opens streams from other threads.
//!
//! The side that runs on the host is the VMM's helper; the guest agent
//! runs the other. Neither trusts the other's frames.

pub mod engine;
pub mod frame;
pub mod session;

pub use engine::{Engine, Mux, OnIncoming, UnixOrDevice};
pub use session::{Session, Side};

use thiserror::Error;

/// The mux protocol's version, carried by HELLO: ends of different
/// versions do not talk (a snapshot restored under a helper of another
/// build is refused, never misread).
pub const VERSION: u32 = 1;

/// What each end may have in flight towards the other, per stream
/// (vsock's default `buf_alloc`).
pub const WINDOW: u32 = 256 * 1024;

/// A new incarnation's epoch: random (a restarted end, or a clone's,
/// never reuses its predecessor's), never 0. Without /dev/urandom, the
/// clock and the pid.
pub fn new_epoch() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    let e = match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.subsec_nanos() ^ std::process::id().rotate_left(16)
        }
    };
    e.max(1)
}

/// Streams open at once in a session, both ends' together.
pub const MAX_STREAMS: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MuxError {
    #[error("mux frame: a payload of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("mux frame: {0} bytes is shorter than a header")]
    TooShort(usize),
    #[error("mux frame: bad COBS encoding ({0})")]
    Cobs(String),
    #[error("mux frame: the CRC does not match")]
    Crc,
    #[error("mux frame: unknown kind {0}")]
    Kind(u8),
    #[error("mux frame: reserved bits set")]
    Reserved,
    #[error("mux frame: a {0:?} frame carries a payload")]
    Payload(frame::Kind),
    #[error("mux: {0} streams are open already")]
    TooManyStreams(usize),
    #[error("mux stream {0}: not open")]
    NoStream(u32),
}
