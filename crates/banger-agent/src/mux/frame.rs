//! The mux's frames on the wire: COBS-encoded, each ended by a `0x00`
//! (COBS leaves no zero byte inside a frame, so every `0x00` is a
//! boundary and a reader resyncs at the next one, whatever came before:
//! half a frame from a VM's previous incarnation, or bytes a guest made
//! up). Decoded, a frame is, little-endian:
//!
//! `kind u8 | flags u8 | reserved u16 (0) | epoch u32 | stream u32 | arg u32 | payload | crc32`
//!
//! The CRC (over everything before it) rejects the splice of a frame cut
//! by a snapshot and the start of the next one.

use super::MuxError;

/// The most one DATA frame carries.
pub const MAX_PAYLOAD: usize = 16 * 1024;
const HEADER: usize = 16;
const CRC: usize = 4;
/// The longest decoded frame.
pub const MAX_FRAME: usize = HEADER + MAX_PAYLOAD + CRC;
/// The longest encoded frame, without its `0x00`: COBS adds a byte per
/// 254, plus one.
pub const MAX_ENCODED: usize = MAX_FRAME + MAX_FRAME / 254 + 1;

/// `flags` of a HELLO that answers one.
pub const HELLO_REPLY: u8 = 1;
/// `flags` of a FIN: the sender writes no more (its local end read EOF).
pub const SHUT_WR: u8 = 1;
/// `flags` of a FIN: the sender reads no more (its local end shut reading).
pub const SHUT_RD: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// "I am a new incarnation with epoch `epoch`"; `arg` is the mux
    /// version. A peer that sees a new epoch drops every stream.
    Hello = 1,
    /// Open a stream to port `arg`.
    Open = 2,
    /// The stream is open.
    Accept = 3,
    /// Bytes of the stream, within the sender's credit.
    Data = 4,
    /// `arg` more bytes of credit for the receiver of this frame.
    Window = 5,
    /// A half-close (`flags`: [`SHUT_WR`], [`SHUT_RD`]).
    Fin = 6,
    /// The stream is gone (refused, aborted, or unknown to the sender).
    Rst = 7,
}

impl Kind {
    fn of(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Open,
            3 => Kind::Accept,
            4 => Kind::Data,
            5 => Kind::Window,
            6 => Kind::Fin,
            7 => Kind::Rst,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    /// The sender's epoch.
    pub epoch: u32,
    pub stream: u32,
    pub arg: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, epoch: u32, stream: u32, arg: u32) -> Frame {
        Frame {
            kind,
            flags: 0,
            epoch,
            stream,
            arg,
            payload: Vec::new(),
        }
    }

    pub fn with_flags(mut self, flags: u8) -> Frame {
        self.flags = flags;
        self
    }

    /// Appends the frame's encoding and its `0x00` to `out`. A payload
    /// over [`MAX_PAYLOAD`] is a bug of the caller's: refused.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MuxError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(MuxError::TooLong(self.payload.len()));
        }
        let mut raw = Vec::with_capacity(HEADER + self.payload.len() + CRC);
        raw.push(self.kind as u8);
        raw.push(self.flags);
        raw.extend_from_slice(&[0, 0]);
        raw.extend_from_slice(&self.epoch.to_le_bytes());
        raw.extend_from_slice(&self.stream.to_le_bytes());
        raw.extend_from_slice(&self.arg.to_le_bytes());
        raw.extend_from_slice(&self.payload);
        let crc = crc32fast::hash(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        let start = out.len();
        out.resize(start + cobs::max_encoding_length(raw.len()), 0);
        let n = cobs::encode(&raw, &mut out[start..]);
        out.truncate(start + n);
        out.push(0);
        Ok(())
    }

    /// A frame from one encoded frame (the bytes between two `0x00`).
    pub fn decode(encoded: &[u8]) -> Result<Frame, MuxError> {
        if encoded.len() > MAX_ENCODED {
            return Err(MuxError::TooLong(encoded.len()));
        }
        let mut raw = vec![0u8; encoded.len()];
        let n = cobs::decode(encoded, &mut raw)
            .map_err(|e| MuxError::Cobs(format!("{e:?}")))?
            .frame_size();
        raw.truncate(n);
        if raw.len() < HEADER + CRC {
            return Err(MuxError::TooShort(raw.len()));
        }
        let (body, crc) = raw.split_at(raw.len() - CRC);
        let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != want {
            return Err(MuxError::Crc);
        }
        let kind = Kind::of(body[0]).ok_or(MuxError::Kind(body[0]))?;
        if body[2] != 0 || body[3] != 0 {
            return Err(MuxError::Reserved);
        }
        let word = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
        let payload = body[HEADER..].to_vec();
        if kind != Kind::Data && !payload.is_empty() {
            return Err(MuxError::Payload(kind));
        }
        Ok(Frame {
            kind,
            flags: body[1],
            epoch: word(4),
            stream: word(8),
            arg: word(12),
            payload,
        })
    }
}

/// Splits a byte stream into frames. Bounded: what runs longer than the
/// longest frame without a `0x00` is dropped up to the next one.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// In the middle of an overlong run: drop until the next `0x00`.
    skipping: bool,
    /// Frames (or runs) that did not decode, for the logs and tests.
    pub dropped: u64,
}

impl Reader {
    /// Feeds bytes read from the wire; every frame they complete goes to
    /// `out`, in order. Bad frames are counted in `dropped`, never
    /// returned: the stream goes on at the next boundary.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Frame>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == 0) {
                Some(i) => {
                    self.take(&bytes[..i]);
                    let run = std::mem::take(&mut self.buf);
                    if std::mem::take(&mut self.skipping) {
                        // The overlong run's end: already counted.
                    } else if !run.is_empty() {
                        match Frame::decode(&run) {
                            Ok(f) => out.push(f),
                            Err(_) => self.dropped += 1,
                        }
                    }
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.take(bytes);
                    bytes = &[];
                }
            }
        }
    }

    fn take(&mut self, part: &[u8]) {
        if self.skipping {
            return;
        }
        if self.buf.len() + part.len() > MAX_ENCODED {
            self.buf.clear();
            self.skipping = true;
            self.dropped += 1;
            return;
        }
        self.buf.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(stream: u32, payload: &[u8]) -> Frame {
        let mut f = Frame::new(Kind::Data, 7, stream, 0);
        f.payload = payload.to_vec();
        f
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let frames = vec![
            Frame::new(Kind::Hello, 1, 0, 1).with_flags(HELLO_REPLY),
            Frame::new(Kind::Open, 1, 3, 1024),
            data(3, &[0, 0, 1, 0, 255, 0]),
            data(3, &vec![0u8; MAX_PAYLOAD]),
            data(
                5,
                &(0..=255u8).cycle().take(MAX_PAYLOAD).collect::<Vec<_>>(),
            ),
            Frame::new(Kind::Window, 2, 3, 256 * 1024),
            Frame::new(Kind::Fin, 2, 3, 0).with_flags(SHUT_WR | SHUT_RD),
            Frame::new(Kind::Rst, u32::MAX, u32::MAX, u32::MAX),
        ];
        let bytes = wire(&frames);
        assert_eq!(bytes.iter().filter(|b| **b == 0).count(), frames.len());

        let mut r = Reader::default();
        let mut got = Vec::new();
        r.push(&bytes, &mut got);
        assert_eq!(got, frames);

        let mut r = Reader::default();
        let mut got = Vec::new();
        for b in &bytes {
            r.push(std::slice::from_ref(b), &mut got);
        }
        assert_eq!(got, frames);
        assert_eq!(r.dropped, 0);
    }

    #[test]
    fn an_oversized_payload_is_refused() {
        let mut out = Vec::new();
        assert!(data(1, &vec![1; MAX_PAYLOAD + 1]).encode(&mut out).is_err());
        assert!(out.is_empty());
    }

    /// A frame cut short, and the next one spliced on after a new start
    /// (`00 00`): the cut one is dropped, the next one arrives.
    #[test]
    fn a_cut_frame_is_dropped_and_the_next_one_read() {
        let a = wire(&[data(1, b"the first frame, cut by a snapshot")]);
        let b = wire(&[data(3, b"the next incarnation's frame")]);
        let mut bytes = a[..a.len() / 2].to_vec();
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&b);
        let mut r = Reader::default();
        let mut got = Vec::new();
        r.push(&bytes, &mut got);
        assert_eq!(got, vec![data(3, b"the next incarnation's frame")]);
        assert_eq!(r.dropped, 1);

        // Without the new start's zeros: the splice fails its CRC.
        let mut bytes = a[..a.len() / 2].to_vec();
        bytes.extend_from_slice(&b);
        let mut r = Reader::default();
        let mut got = Vec::new();
        r.push(&bytes, &mut got);
        assert!(got.is_empty());
        assert_eq!(r.dropped, 1);
    }

    /// What a hostile peer can write: garbage, an endless run without a
    /// boundary, bad kinds, reserved bits, payloads on control frames,
    /// flipped bits. None of it is a frame; a good frame after it is.
    #[test]
    fn hostile_bytes_are_dropped_and_bounded() {
        let good = data(9, b"still here");
        let mut bytes = vec![0xff; 3 * MAX_ENCODED];
        bytes.push(0);
        bytes.extend_from_slice(b"\x01\x02\x03garbage\x00");
        for (i, patch) in [(0usize, 9u8), (2, 1)] {
            let mut raw = vec![1u8, 0, 0, 0];
            raw.extend_from_slice(&[0; 12]);
            raw[i] = patch;
            let crc = crc32fast::hash(&raw);
            raw.extend_from_slice(&crc.to_le_bytes());
            bytes.extend_from_slice(&cobs::encode_vec(&raw));
            bytes.push(0);
        }
        let mut with_payload = Frame::new(Kind::Open, 1, 1, 1024);
        with_payload.payload = b"x".to_vec();
        let mut raw_enc = Vec::new();
        // `encode` leaves the payload rule to the reader, which a hostile
        // peer skips: an OPEN with a payload...
        with_payload.encode(&mut raw_enc).unwrap();
        bytes.extend_from_slice(&raw_enc);
        let mut flipped = wire(std::slice::from_ref(&good));
        flipped[5] ^= 0x10;
        if flipped[5] == 0 {
            flipped[5] = 0x33;
        }
        bytes.extend_from_slice(&flipped);
        bytes.extend_from_slice(&wire(std::slice::from_ref(&good)));

        let mut r = Reader::default();
        let mut got = Vec::new();
        for chunk in bytes.chunks(1000) {
            r.push(chunk, &mut got);
            assert!(r.buf.len() <= MAX_ENCODED);
        }
        assert_eq!(got, vec![good]);
        assert_eq!(r.dropped, 6);
    }
}
