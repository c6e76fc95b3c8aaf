//! VM names are DNS labels (RFC 1123): they become the guest hostname and its
//! DNS name, so the rule is checked in the CLI and again in the daemon.

use thiserror::Error;

/// The longest DNS label.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty: a VM name is a DNS label of 1 to 63 characters (a-z, 0-9, '-')")]
    Empty,
    #[error("name {name:?} is {len} characters long: a DNS label has at most 63")]
    TooLong { name: String, len: usize },
    #[error("name {name:?} is not a DNS label: use a-z, 0-9 and '-' ({what})")]
    Invalid { name: String, what: &'static str },
}

/// Checks that `name` is a lowercase RFC 1123 label.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    let invalid = |what| NameError::Invalid {
        name: name.to_string(),
        what,
    };
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid("it may not start or end with '-'"));
    }
    Ok(())
}

const ADJECTIVES: &[&str] = &[
    "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucky", "merry",
    "nimble", "proud", "quick", "rapid", "sharp", "swift", "tidy", "vivid", "witty", "zesty",
];
const NOUNS: &[&str] = &[
    "otter", "badger", "falcon", "heron", "lynx", "marten", "newt", "osprey", "panda", "quail",
    "raven", "robin", "seal", "stoat", "tapir", "viper", "walrus", "wren", "yak", "zebra",
];

/// A generated name, `adjective-noun-NNNN`, from 32 bits of caller-supplied
/// randomness (the core does no I/O, so it does not read a RNG itself).
pub fn generated_name(random: u32) -> String {
    let a = ADJECTIVES[(random as usize) % ADJECTIVES.len()];
    let n = NOUNS[((random >> 8) as usize) % NOUNS.len()];
    format!("{a}-{n}-{:04x}", (random >> 16) & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "hello", "t1", "web-01", &"a".repeat(63), "0abc"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_non_labels_with_the_rule() {
        let e = validate_name("Foo_1").unwrap_err();
        assert!(e.to_string().contains("not a DNS label"), "{e}");
        assert!(e.to_string().contains("a-z, 0-9 and '-'"), "{e}");
        assert!(matches!(validate_name(""), Err(NameError::Empty)));
        assert!(matches!(
            validate_name(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
        for bad in ["-a", "a-", "a.b", "a b", "UPPER", "é", "a_b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_names_are_valid() {
        for r in [0u32, 1, 0xdead_beef, u32::MAX, 123_456_789] {
            let n = generated_name(r);
            assert_eq!(validate_name(&n), Ok(()), "{n}");
        }
        assert_ne!(generated_name(1), generated_name(2 << 16));
    }
}
