//! Named persistent volumes: ext4 disks that outlive VMs, attached to one
//! running VM at a time and mounted at a path in the guest
//! (`--volume NAME:/path`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("--volume {0:?}: want NAME:/path (a volume name, then an absolute path in the guest)")]
    Syntax(String),
    #[error("--volume {spec:?}: {why}")]
    Path { spec: String, why: String },
    #[error("--volume {spec:?}: volume name: {why}")]
    Name { spec: String, why: String },
}

/// The longest guest path a volume may be mounted at.
pub const MAX_PATH: usize = 256;

/// A volume mounted into a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    /// Absolute; only `[A-Za-z0-9._/-]`, no `.` or `..` components: it is
    /// written into the guest's init config and used by its shell.
    pub path: String,
}

impl std::str::FromStr for VolumeMount {
    type Err = VolumeError;

    fn from_str(s: &str) -> Result<Self, VolumeError> {
        let (name, path) = s
            .split_once(':')
            .ok_or_else(|| VolumeError::Syntax(s.to_string()))?;
        crate::validate_name(name).map_err(|e| VolumeError::Name {
            spec: s.to_string(),
            why: e.to_string(),
        })?;
        let path = guest_path(path).map_err(|why| VolumeError::Path {
            spec: s.to_string(),
            why: why.to_string(),
        })?;
        Ok(VolumeMount {
            name: name.to_string(),
            path,
        })
    }
}

/// A mount point in the guest (volumes, `--mount`): absolute, not `/`, at
/// most [`MAX_PATH`] characters of `[A-Za-z0-9._/-]`, no `.` or `..`
/// components (it is written into the guest's init config and used by its
/// shell); returned without a trailing `/`.
pub fn guest_path(path: &str) -> Result<String, &'static str> {
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() {
        return Err("the guest path must be absolute and not /");
    }
    if path.len() > MAX_PATH {
        return Err("the guest path is over 256 characters");
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return Err("the guest path may hold only letters, digits, '.', '_', '-' and '/'");
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err("the guest path may not hold . or .. components");
    }
    Ok(path.trim_end_matches('/').to_string())
}

impl std::fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.path)
    }
}

/// The guest's block device of the `i`th volume: after the root (vda) and
/// work (vdb) disks.
pub fn guest_device(i: usize) -> String {
    let letter = (b'c' + (i as u8 % 24)) as char;
    format!("vd{letter}")
}

/// How many volumes a VM may have (devices vdc..vdy; vdz is left for the
/// overlay root disk strategy's upper disk).
pub const MAX_VOLUMES: usize = 23;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_and_refuse_what_a_shell_would_misread() {
        let m: VolumeMount = "data:/srv/data/".parse().unwrap();
        assert_eq!((m.name.as_str(), m.path.as_str()), ("data", "/srv/data"));
        assert_eq!(m.to_string(), "data:/srv/data");
        for bad in [
            "data",
            "data:relative",
            "data:/",
            "data:/a b",
            "data:/a;reboot",
            "data:/a/../etc",
            "data:/$(x)",
            "Bad_Name:/x",
            ":/x",
        ] {
            assert!(bad.parse::<VolumeMount>().is_err(), "{bad}");
        }
        assert!(format!("v:/{}", "a".repeat(300))
            .parse::<VolumeMount>()
            .is_err());
        assert_eq!(guest_device(0), "vdc");
        assert_eq!(guest_device(1), "vdd");
    }
}
