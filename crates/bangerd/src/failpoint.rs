//! Failpoints (the `fail` crate) at every step of create, start, stop,
//! kill and delete, compiled in only with the `failpoints` feature (the test
//! suite's build; release builds have none). Configured at daemon start by
//! the `FAILPOINTS` environment variable, e.g. `start.tap=return(err)`:
//! - `return(err)` (or `return`): the step fails with an injected error;
//! - `return(die)`: the daemon process is killed (SIGKILL) at the step, as
//!   a crash would;
//! - `return(gate:PATH)`: the step waits until the test opens the gate: it
//!   reads PATH (a FIFO the test made) to its end, then goes on.

use crate::error::DaemonError;

/// Failpoints inside an acquire, by resource: what happens between
/// naming a kernel object in the VM's records and making it.
const INTERNAL: &[(&str, &str)] = &[
    ("tap", "start.tap.recorded"),
    ("tap", "start.tap.created"),
    ("vsock", "start.vsock.spawned"),
    ("vmm", "start.vmm.spawned"),
    ("firewall", "start.firewall.added"),
];

/// Every failpoint name, in the order a VM's life meets them. The
/// failpoint test loops over all of them.
pub fn names() -> Vec<String> {
    use crate::resources::{CREATE, START};
    let mut v = vec!["create.begin".to_string()];
    v.extend(CREATE.iter().map(|r| format!("create.{}", r.name())));
    v.push("create.done".into());
    v.push("start.begin".into());
    for r in START {
        v.push(format!("start.{}", r.name()));
        // Inside an acquire: after the kernel object is recorded, and
        // after it exists.
        v.extend(
            INTERNAL
                .iter()
                .filter(|(of, _)| *of == r.name())
                .map(|(_, p)| p.to_string()),
        );
    }
    v.push("start.ready".into());
    v.push("stop.begin".into());
    v.push("stop.teardown".into());
    v.extend(START.iter().rev().map(|r| format!("teardown.{}", r.name())));
    v.push("kill.begin".into());
    v.push("delete.begin".into());
    v.extend(
        CREATE
            .iter()
            .rev()
            .map(|r| format!("teardown.{}", r.name())),
    );
    v.push("delete.row".into());
    v
}

/// Evaluates failpoint `name`: an injected error, a crash, or nothing.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> Result<(), DaemonError> {
    match fail::eval(name, |arg| arg.unwrap_or_default()) {
        None => Ok(()),
        Some(a) if a.starts_with("gate:") => {
            let path = &a["gate:".len()..];
            tracing::warn!("failpoint {name}: waiting at the gate {path}");
            let _ = std::fs::read(path);
            Ok(())
        }
        Some(a) if a == "die" => {
            tracing::warn!("failpoint {name}: dying");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort()
        }
        Some(_) => {
            tracing::warn!("failpoint {name}: injecting an error");
            Err(DaemonError::Injected(name.to_string()))
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> Result<(), DaemonError> {
    Ok(())
}

/// The argument failpoint `name` is set to, for a probe that reports
/// what the daemon does there (`return(ARG)`); none when it is not set.
#[cfg(feature = "failpoints")]
pub fn arg(name: &str) -> Option<String> {
    fail::eval(name, |arg| arg.unwrap_or_default())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn arg(_name: &str) -> Option<String> {
    None
}

/// Set up from `FAILPOINTS`; kept for the daemon's lifetime.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}
