//! Host directories shared into a guest (`--mount /host/dir:/guest/dir[:ro]`)
//! through virtio-fs: one `virtiofsd` per mount, QEMU only.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MountError {
    #[error("--mount {0:?}: want /host/dir:/guest/dir, optionally :ro or :rw after it")]
    Syntax(String),
    #[error("--mount {spec:?}: {why}")]
    Bad { spec: String, why: String },
}

/// How many host directories one VM may mount.
pub const MAX_MOUNTS: usize = 8;
/// The longest host path accepted.
const MAX_HOST_PATH: usize = 1024;

/// A host directory mounted in a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMount {
    /// Absolute, without `,` (virtiofsd's option separator) or control
    /// characters; the daemon checks it is a directory.
    pub host: PathBuf,
    /// As a volume's ([`crate::volume::guest_path`]).
    pub path: String,
    /// Read-only on the host's side: the guest cannot write whatever it
    /// mounts.
    #[serde(default)]
    pub read_only: bool,
    /// The uid whose directory this is, when a caller who is not root
    /// asked for it: set by the daemon from the socket's peer (whatever a
    /// client sends is replaced), checked again at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

impl HostMount {
    /// What `from_str` checks, for a mount that came as JSON (a client
    /// that skips the CLI skips its parser): the daemon calls it on every
    /// request's mounts.
    pub fn validate(&self) -> Result<(), MountError> {
        let bad = |why: &str| MountError::Bad {
            spec: self.to_string(),
            why: why.to_string(),
        };
        let host = self
            .host
            .to_str()
            .ok_or_else(|| bad("the host path is not UTF-8"))?;
        if !host.starts_with('/') {
            return Err(bad("the host path must be absolute"));
        }
        if host.len() > MAX_HOST_PATH {
            return Err(bad("the host path is over 1024 characters"));
        }
        if host.contains(',') || host.chars().any(char::is_control) {
            return Err(bad(
                "the host path may not hold ',' (virtiofsd's option separator) or control characters",
            ));
        }
        match crate::volume::guest_path(&self.path) {
            Ok(p) if p == self.path => Ok(()),
            Ok(_) => Err(bad("the guest path is not in its normal form")),
            Err(why) => Err(bad(why)),
        }
    }

    /// The virtio-fs tag of the `i`th mount, which the guest mounts by.
    pub fn tag(i: usize) -> String {
        format!("banger{i}")
    }
}

impl std::str::FromStr for HostMount {
    type Err = MountError;

    fn from_str(s: &str) -> Result<Self, MountError> {
        let bad = |why: &str| MountError::Bad {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (rest, read_only) = match s.rsplit_once(':') {
            Some((r, "ro")) => (r, true),
            Some((r, "rw")) => (r, false),
            // A last part that is no path is an option: say which.
            Some((r, opt)) if r.contains(":/") && !opt.contains('/') => {
                return Err(bad(&format!(
                    "{opt:?} is not an option: use :ro (read-only) or :rw (the default)"
                )));
            }
            _ => (s, false),
        };
        // The guest path is the part after the last ":/" (a host path may
        // hold colons, a guest path may not).
        let at = rest
            .rfind(":/")
            .ok_or_else(|| MountError::Syntax(s.to_string()))?;
        let (host, guest) = (&rest[..at], &rest[at + 1..]);
        // The host path's rules are `validate`'s (the daemon's too).
        let path = crate::volume::guest_path(guest).map_err(bad)?;
        let m = HostMount {
            host: PathBuf::from(host),
            path,
            read_only,
            owner: None,
        };
        m.validate()?;
        Ok(m)
    }
}

impl std::fmt::Display for HostMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host.display(), self.path)?;
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_and_refuse_what_would_be_misread() {
        let m: HostMount = "/srv/data:/data:ro".parse().unwrap();
        assert_eq!(m.host, PathBuf::from("/srv/data"));
        assert_eq!((m.path.as_str(), m.read_only), ("/data", true));
        assert_eq!(m.to_string(), "/srv/data:/data:ro");
        let m: HostMount = "/a:b/c:/x/".parse().unwrap();
        assert_eq!((m.host.to_str(), m.path.as_str()), (Some("/a:b/c"), "/x"));
        assert!(!m.read_only);
        assert!(!"/a:/b:rw".parse::<HostMount>().unwrap().read_only);
        for bad in [
            "/a",
            "rel:/x",
            "/a:/",
            "/a,b:/x",
            "/a:/x y",
            "/a:/x;reboot",
            "/a:/../etc",
            "/a\n:/x",
            ":/x",
        ] {
            assert!(bad.parse::<HostMount>().is_err(), "{bad}");
        }
        let e = "/a:/b:bogus".parse::<HostMount>().unwrap_err().to_string();
        assert!(e.contains("\"bogus\" is not an option: use :ro"), "{e}");
        assert_eq!(HostMount::tag(0), "banger0");
    }
}
