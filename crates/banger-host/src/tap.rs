//! Tap devices: one per VM, persistent (owned by the daemon, not the VMM),
//! with the host end of the VM's point-to-point /30 on it. Created in the
//! caller's network namespace.

use std::net::Ipv4Addr;

use thiserror::Error;

use crate::cmd::{self, CmdError};

/// Taps banger creates are named `<prefix><n>`; the prefix keeps them apart
/// from everyone else's interfaces.
pub const TAP_PREFIX: &str = "bgtap";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap {tap}: {source}")]
    Cmd { tap: String, source: CmdError },
    #[error("no free tap name left (all of {TAP_PREFIX}0..{TAP_PREFIX}{0} exist)")]
    Exhausted(u32),
}

/// Whether an interface of that name exists in this network namespace.
pub fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The lowest `bgtapN` that neither exists nor is in `reserved`.
pub fn free_name(reserved: &[String]) -> Result<String, TapError> {
    const MAX: u32 = 65_536;
    (0..MAX)
        .map(|n| format!("{TAP_PREFIX}{n}"))
        .find(|n| !reserved.contains(n) && !exists(n))
        .ok_or(TapError::Exhausted(MAX))
}

/// Creates a persistent tap `name` with `host_ip/prefix` on it and brings it
/// up; on failure nothing is left behind.
pub fn create(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<(), TapError> {
    let script = format!(
        "tuntap add dev {name} mode tap\naddr add {host_ip}/{prefix} dev {name}\nlink set dev {name} up\n"
    );
    if let Err(source) = cmd::run_with_input("ip", ["-batch", "-"], Some(&script)) {
        let _ = delete(name);
        return Err(TapError::Cmd {
            tap: name.to_string(),
            source,
        });
    }
    Ok(())
}

/// Deletes the tap; a tap that does not exist is already deleted.
pub fn delete(name: &str) -> Result<(), TapError> {
    if !exists(name) {
        return Ok(());
    }
    cmd::run("ip", ["link", "del", "dev", name]).map_err(|source| TapError::Cmd {
        tap: name.to_string(),
        source,
    })?;
    Ok(())
}
