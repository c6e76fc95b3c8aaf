//! A file's metadata as E2B's envd keeps it: extended attributes under
//! [`META_PREFIX`], and the bounds on what banger sets (and shows).

use std::collections::BTreeMap;

/// A file's metadata (E2B's) lives in extended attributes under this
/// prefix, at most [`META_KEYS`] of them, each key at most
/// [`META_KEY_MAX`] bytes (the prefix and key within the kernel's 255) of
/// HTTP token characters, lowercase, values of printable ASCII, keys and
/// values at most [`META_TOTAL_MAX`] bytes in all (as envd: what ext4 keeps
/// in the one block a file's attributes share).
pub const META_PREFIX: &str = "user.e2b.";
pub const META_KEYS: usize = 64;
pub const META_KEY_MAX: usize = 246;
pub const META_TOTAL_MAX: usize = 3072;

/// Why `meta` is no file metadata banger keeps (see [`META_PREFIX`]).
pub fn check_meta(meta: &BTreeMap<String, String>) -> Result<(), String> {
    if meta.len() > META_KEYS {
        return Err(format!("{} metadata keys: at most {META_KEYS}", meta.len()));
    }
    let total: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > META_TOTAL_MAX {
        return Err(format!(
            "{total} bytes of metadata keys and values: at most {META_TOTAL_MAX} in all"
        ));
    }
    for (k, v) in meta {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if k.is_empty() || k.len() > META_KEY_MAX || !k.chars().all(token) {
            return Err(format!(
                "metadata key {:?}: 1 to {META_KEY_MAX} letters, digits or !#$%&'*+-.^_`|~",
                k.chars().take(64).collect::<String>()
            ));
        }
        if k.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("metadata key {k:?}: keys are lowercase"));
        }
        if !v.chars().all(|c| (' '..='~').contains(&c)) {
            return Err(format!(
                "metadata {k:?}: a value is printable ASCII characters only"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_is_bounded_as_envds() {
        assert!(check_meta(&m(&[("purpose", "test"), ("a.b-c_d", "x y")])).is_ok());
        let big = "v".repeat(META_TOTAL_MAX);
        let e = check_meta(&m(&[("k", &big)])).unwrap_err();
        assert!(e.contains("at most 3072"), "{e}");
        assert!(check_meta(&m(&[("k", &big[..META_TOTAL_MAX - 1])])).is_ok());
        let many: BTreeMap<String, String> = (0..=META_KEYS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check_meta(&many).unwrap_err().contains("at most 64"));
        for bad in [
            ("Upper", "v"),
            ("sp ace", "v"),
            ("", "v"),
            ("k", "tab\tin"),
            ("k", "naïve"),
        ] {
            assert!(check_meta(&m(&[bad])).is_err(), "{bad:?}");
        }
        assert!(check_meta(&m(&[(&"k".repeat(META_KEY_MAX + 1), "")])).is_err());
    }
}
