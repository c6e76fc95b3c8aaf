//! `vm attach`'s detach key sequence (docker's `--detach-keys`): typed on
//! the attached input, it leaves the process running and ends the attach.
//! The bytes of a sequence being typed are held back until it is either
//! complete (nothing of it is sent) or broken (all of it is sent).

use thiserror::Error;

/// docker's default: Ctrl-P Ctrl-Q.
pub const DEFAULT: &str = "ctrl-p,ctrl-q";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DetachKeysError {
    #[error(
        "--detach-keys {0:?}: {1:?} is not a key: use a character or ctrl-<a-z @ [ \\ ] ^ _>, \
         separated by commas (e.g. ctrl-p,ctrl-q), or \"\" for none"
    )]
    Key(String, String),
}

/// Parses docker's format: comma-separated keys, each one character or
/// `ctrl-X` (X one of a-z, @, [, \, ], ^, _). Empty: no sequence.
pub fn parse(spec: &str) -> Result<Vec<u8>, DetachKeysError> {
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |k: &str| DetachKeysError::Key(spec.to_string(), k.to_string());
    spec.split(',')
        .map(|k| {
            let lower = k.to_ascii_lowercase();
            match lower.strip_prefix("ctrl-") {
                Some(x) if x.len() == 1 => match x.as_bytes()[0] {
                    c @ b'a'..=b'z' => Ok(c - b'a' + 1),
                    b'@' => Ok(0),
                    c @ (b'[' | b'\\' | b']' | b'^' | b'_') => Ok(c - b'@'),
                    _ => Err(bad(k)),
                },
                _ if k.len() == 1 && k.as_bytes()[0].is_ascii_graphic() => Ok(k.as_bytes()[0]),
                _ => Err(bad(k)),
            }
        })
        .collect()
}

/// Watches input for the sequence.
#[derive(Debug)]
pub struct Scanner {
    seq: Vec<u8>,
    matched: usize,
}

impl Scanner {
    pub fn new(seq: Vec<u8>) -> Scanner {
        Scanner { seq, matched: 0 }
    }

    /// The bytes of `input` to pass on, and whether the sequence was just
    /// completed (what followed it in `input` is dropped: the attach ends).
    pub fn scan(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        if self.seq.is_empty() {
            out.extend_from_slice(input);
            return (out, false);
        }
        for &b in input {
            if b != self.seq[self.matched] {
                // Broken: what was held goes on; `b` may start it again.
                out.extend_from_slice(&self.seq[..self.matched]);
                self.matched = 0;
                if b != self.seq[0] {
                    out.push(b);
                    continue;
                }
            }
            self.matched += 1;
            if self.matched == self.seq.len() {
                self.matched = 0;
                return (out, true);
            }
        }
        (out, false)
    }

    /// What is held at the end of the input (sent on, as typed).
    pub fn held(&self) -> &[u8] {
        &self.seq[..self.matched]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_key_names_parse_and_others_are_named() {
        assert_eq!(parse(DEFAULT).unwrap(), vec![0x10, 0x11]);
        assert_eq!(
            parse("ctrl-@,ctrl-[,ctrl-_,x").unwrap(),
            vec![0, 27, 31, b'x']
        );
        assert_eq!(parse("CTRL-A").unwrap(), vec![1]);
        assert_eq!(parse("").unwrap(), Vec::<u8>::new());
        let e = parse("ctrl-p,ctrl-1").unwrap_err().to_string();
        assert!(e.contains("\"ctrl-1\" is not a key"), "{e}");
        assert!(parse("ab").is_err());
        assert!(parse("ctrl-p,").is_err(), "an empty key");
    }

    #[test]
    fn the_sequence_is_held_then_swallowed_or_passed_on() {
        let mut s = Scanner::new(parse(DEFAULT).unwrap());
        assert_eq!(s.scan(b"ls\r"), (b"ls\r".to_vec(), false));
        // Split across reads: held, then detached; nothing of it sent.
        assert_eq!(s.scan(b"a\x10"), (b"a".to_vec(), false));
        assert_eq!(s.held(), b"\x10");
        assert_eq!(s.scan(b"\x11rest"), (Vec::new(), true));
        // Broken: Ctrl-P then x goes on as typed.
        assert_eq!(s.scan(b"\x10x"), (b"\x10x".to_vec(), false));
        // Ctrl-P Ctrl-P Ctrl-Q: the first goes on, the pair detaches.
        assert_eq!(s.scan(b"\x10\x10\x11"), (b"\x10".to_vec(), true));
        // No sequence: everything goes on.
        let mut none = Scanner::new(Vec::new());
        assert_eq!(none.scan(b"\x10\x11"), (b"\x10\x11".to_vec(), false));
    }
}
