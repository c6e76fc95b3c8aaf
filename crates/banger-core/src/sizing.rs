//! Host-aware default sizing and the bounds a requested size must respect.

use serde::{Deserialize, Serialize};
use thiserror::Error;

const MIB: u64 = 1024 * 1024;

/// What the host offers, read by the daemon (banger-host) and passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResources {
    pub cores: u32,
    pub memory_mib: u64,
    /// Free space on the filesystem that holds the state dir.
    pub free_disk_mib: u64,
}

/// A VM's size: vCPUs, memory and work-disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizing {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// What the user asked for; `None` takes the host-aware default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeRequest {
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
}

pub const MIN_MEMORY_MIB: u64 = 128;
pub const MIN_DISK_MIB: u64 = 64;
pub const MAX_CPUS: u32 = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("--cpus {0} is out of range: use 1 to {1} (this host has {2} cores)")]
    Cpus(u32, u32, u32),
    #[error("--memory {0} MiB is out of range: use {MIN_MEMORY_MIB} MiB to {1} MiB (this host's memory)")]
    Memory(u64, u64),
    #[error("--disk-size {0} MiB is out of range: use {MIN_DISK_MIB} MiB to {1} MiB (free space in the state dir)")]
    Disk(u64, u64),
    #[error("the state dir's filesystem has {1} MiB free, less than a VM's smallest default work disk ({0} MiB): free some space, or ask for a smaller disk with --disk-size (at least {MIN_DISK_MIB} MiB)")]
    NoRoomForDefaultDisk(u64, u64),
}

fn clamp(v: u64, lo: u64, hi: u64) -> u64 {
    v.max(lo).min(hi.max(lo))
}

/// Defaults: half the cores (1..=4), a sixteenth of the memory
/// (512..=2048 MiB, in 256 MiB steps), a twentieth of the free disk
/// (1..=8 GiB, in 256 MiB steps). Small enough that ten VMs fit on a laptop.
pub fn default_sizing(host: &HostResources) -> Sizing {
    let cpus = (host.cores / 2).clamp(1, 4);
    let mem = clamp(host.memory_mib / 16, 512, 2048) / 256 * 256;
    let disk = clamp(host.free_disk_mib / 20, 1024, 8192) / 256 * 256;
    Sizing {
        cpus,
        memory_mib: mem.max(256),
        disk_mib: disk.max(256),
    }
}

/// Resolves a request against the host: defaults fill the gaps, explicit
/// values are checked against what the host can give.
pub fn resolve(req: &SizeRequest, host: &HostResources) -> Result<Sizing, SizingError> {
    resolve_with(req, &default_sizing(host), host)
}

/// [`resolve`] with defaults `d` taken earlier (the daemon's, fixed when
/// it started: a default that followed the free disk from one VM to the
/// next would change the warm-start cache's key under it), checked
/// against what the host can give now.
pub fn resolve_with(
    req: &SizeRequest,
    d: &Sizing,
    host: &HostResources,
) -> Result<Sizing, SizingError> {
    let max_cpus = host.cores.clamp(1, MAX_CPUS);
    let cpus = req.cpus.unwrap_or(d.cpus.min(max_cpus));
    if cpus == 0 || cpus > max_cpus {
        return Err(SizingError::Cpus(cpus, max_cpus, host.cores));
    }
    let memory_mib = req.memory_mib.unwrap_or(d.memory_mib);
    if memory_mib < MIN_MEMORY_MIB || memory_mib > host.memory_mib {
        return Err(SizingError::Memory(memory_mib, host.memory_mib));
    }
    let disk_mib = req.disk_mib.unwrap_or(d.disk_mib);
    if req.disk_mib.is_none() && disk_mib > host.free_disk_mib {
        return Err(SizingError::NoRoomForDefaultDisk(
            disk_mib,
            host.free_disk_mib,
        ));
    }
    if disk_mib < MIN_DISK_MIB || disk_mib > host.free_disk_mib {
        return Err(SizingError::Disk(disk_mib, host.free_disk_mib));
    }
    Ok(Sizing {
        cpus,
        memory_mib,
        disk_mib,
    })
}

/// Parses a size such as `1024`, `512M`, `2G`, `2GiB` into MiB. A bare number
/// is MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number: use e.g. 512M or 2G"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        other => return Err(format!("size {s:?} has unknown unit {other:?}: use M or G")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

pub fn mib_to_bytes(mib: u64) -> u64 {
    mib * MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostResources = HostResources {
        cores: 2,
        memory_mib: 24 * 1024,
        free_disk_mib: 80 * 1024,
    };

    #[test]
    fn defaults_follow_the_host() {
        assert_eq!(
            default_sizing(&HOST),
            Sizing {
                cpus: 1,
                memory_mib: 1536,
                disk_mib: 4096
            }
        );
        let big = HostResources {
            cores: 64,
            memory_mib: 512 * 1024,
            free_disk_mib: 4 << 20,
        };
        assert_eq!(
            default_sizing(&big),
            Sizing {
                cpus: 4,
                memory_mib: 2048,
                disk_mib: 8192
            }
        );
        let tiny = HostResources {
            cores: 1,
            memory_mib: 1024,
            free_disk_mib: 2048,
        };
        let s = default_sizing(&tiny);
        assert_eq!((s.cpus, s.memory_mib, s.disk_mib), (1, 512, 1024));
    }

    #[test]
    fn explicit_sizes_are_bounded() {
        let r = |cpus, memory_mib, disk_mib| {
            resolve(
                &SizeRequest {
                    cpus,
                    memory_mib,
                    disk_mib,
                },
                &HOST,
            )
        };
        assert!(r(Some(2), Some(1024), Some(2048)).is_ok());
        assert_eq!(r(Some(0), None, None), Err(SizingError::Cpus(0, 2, 2)));
        assert!(matches!(
            r(Some(1000), None, None),
            Err(SizingError::Cpus(..))
        ));
        assert!(matches!(
            r(None, Some(0), None),
            Err(SizingError::Memory(..))
        ));
        assert!(matches!(
            r(None, Some(1 << 30), None),
            Err(SizingError::Memory(..))
        ));
        assert!(matches!(r(None, None, Some(0)), Err(SizingError::Disk(..))));
        assert!(matches!(
            r(None, None, Some(1 << 40)),
            Err(SizingError::Disk(..))
        ));
        let e = r(Some(0), None, None).unwrap_err().to_string();
        assert!(e.contains("--cpus 0"), "{e}");
    }

    /// Defaults taken earlier stay what they were while the free disk
    /// moves (the warm-start cache is keyed by them), and are still
    /// checked against what is free now.
    #[test]
    fn defaults_taken_earlier_do_not_drift() {
        let d = default_sizing(&HOST);
        let later = HostResources {
            free_disk_mib: HOST.free_disk_mib - 6 * 1024,
            ..HOST
        };
        assert_ne!(default_sizing(&later).disk_mib, d.disk_mib);
        let r = resolve_with(&SizeRequest::default(), &d, &later).unwrap();
        assert_eq!(r.disk_mib, d.disk_mib);
        let full = HostResources {
            free_disk_mib: 100,
            ..HOST
        };
        assert!(matches!(
            resolve_with(&SizeRequest::default(), &d, &full),
            Err(SizingError::NoRoomForDefaultDisk(..))
        ));
    }

    /// A nearly full disk: the default work disk does not fit, and the
    /// error says so without naming a flag the user never passed; an
    /// explicit small disk still fits.
    #[test]
    fn a_default_disk_that_does_not_fit_is_named_as_the_default() {
        let full = HostResources {
            free_disk_mib: 635,
            ..HOST
        };
        let e = resolve(&SizeRequest::default(), &full).unwrap_err();
        assert_eq!(e, SizingError::NoRoomForDefaultDisk(1024, 635));
        let e = e.to_string();
        assert!(
            e.contains("has 635 MiB free") && e.contains("--disk-size"),
            "{e}"
        );
        assert!(!e.contains("--disk-size 1024"), "{e}");
        let small = SizeRequest {
            disk_mib: Some(256),
            ..SizeRequest::default()
        };
        assert_eq!(resolve(&small, &full).map(|s| s.disk_mib), Ok(256));
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("5X").is_err());
        assert!(parse_size_mib("99999999999999999999T").is_err());
    }
}
