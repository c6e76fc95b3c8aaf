//! The VM lifecycle as a small state machine. The daemon asks it before it
//! acts, so "stop a stopped VM" is an error with a reason, not a no-op race.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded; its disks are being prepared. A VM found in this state at
    /// daemon start was cut short and is removed.
    Creating,
    /// Recorded, disks prepared, never booted.
    Created,
    /// VMM spawned, waiting for the guest to say it is ready.
    Starting,
    Running,
    Stopping,
    Stopped,
    /// The last start or stop failed; `last_error` says why. Can be started
    /// again or deleted.
    Error,
    /// Being deleted. A VM found in this state at daemon start is deleted.
    Deleting,
    /// Shown for a running VM whose vCPUs are stopped (`vm pause`): the
    /// store keeps it `Running` with `runtime.paused` (it holds everything
    /// a running VM holds), as docker's paused containers are running ones.
    Paused,
    /// Shown for a stopped VM whose guest's memory and devices are saved
    /// (`vm pause --to-disk`): its VMM is gone and its memory given back;
    /// `vm resume` (or `start`) restores it. Stored `Stopped` with
    /// `runtime.suspended`.
    Suspended,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("vm {name:?} is {state}: cannot {action} it{hint}")]
pub struct TransitionError {
    pub name: String,
    pub state: VmState,
    pub action: &'static str,
    pub hint: &'static str,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Creating => "creating",
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
            VmState::Deleting => "deleting",
            VmState::Paused => "paused",
            VmState::Suspended => "suspended",
        })
    }
}

impl VmState {
    pub fn can_start(self) -> bool {
        matches!(
            self,
            VmState::Created | VmState::Stopped | VmState::Error | VmState::Suspended
        )
    }
    /// (A paused VM is resumed first, then stopped.)
    pub fn can_stop(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
    /// Kill is the forceful stop: allowed whenever a VMM may exist, and in
    /// error (a teardown that could not finish, e.g. a VMM that survived
    /// SIGKILL, is tried again).
    pub fn can_kill(self) -> bool {
        matches!(
            self,
            VmState::Running
                | VmState::Paused
                | VmState::Starting
                | VmState::Stopping
                | VmState::Error
        )
    }
    /// Delete tears down whatever exists, so every state may be deleted; a
    /// running VM is killed first.
    pub fn can_delete(self) -> bool {
        true
    }
    /// Whether a VMM may exist for the VM in this state.
    pub fn is_up(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
        )
    }

    pub fn check(self, name: &str, action: &'static str) -> Result<(), TransitionError> {
        let (ok, hint) = match action {
            "start" => (self.can_start(), " (it is already up or busy)"),
            "stop" => (self.can_stop(), " (only a running VM can be stopped)"),
            "kill" => (self.can_kill(), " (no VMM is running)"),
            "pause" => (
                self == VmState::Running,
                " (only a running VM can be paused)",
            ),
            "resume" => (
                matches!(self, VmState::Paused | VmState::Suspended),
                " (only a paused or suspended VM can be resumed)",
            ),
            _ => (self.can_delete(), ""),
        };
        if ok {
            Ok(())
        } else {
            Err(TransitionError {
                name: name.to_string(),
                state: self,
                action,
                hint,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn transitions() {
        for s in [Created, Stopped, Error] {
            assert!(s.can_start(), "{s}");
            assert!(!s.can_stop(), "{s}");
        }
        assert!(!Created.can_kill() && !Stopped.can_kill());
        assert!(Error.can_kill(), "retries a teardown that could not finish");
        for s in [Starting, Running, Stopping] {
            assert!(!s.can_start(), "{s}");
            assert!(s.can_kill(), "{s}");
        }
        assert!(Running.can_stop());
        assert!(!Stopping.can_stop());
        for s in [
            Creating, Created, Starting, Running, Stopping, Stopped, Error, Deleting, Paused,
        ] {
            assert!(s.can_delete());
        }
        assert!(Paused.can_stop() && Paused.can_kill() && Paused.is_up());
        assert!(!Paused.can_start());
        assert!(Running.check("a", "pause").is_ok());
        assert!(Paused.check("a", "resume").is_ok());
        assert_eq!(
            Paused.check("a", "pause").unwrap_err().to_string(),
            "vm \"a\" is paused: cannot pause it (only a running VM can be paused)"
        );
        assert!(Stopped.check("a", "resume").is_err());
        for s in [Creating, Deleting] {
            assert!(!s.can_start() && !s.can_stop() && !s.can_kill(), "{s}");
        }
    }

    #[test]
    fn errors_name_the_vm_and_state() {
        let e = Stopped.check("web", "stop").unwrap_err().to_string();
        assert_eq!(
            e,
            "vm \"web\" is stopped: cannot stop it (only a running VM can be stopped)"
        );
        assert!(Running.check("web", "start").is_err());
        assert!(Created.check("web", "start").is_ok());
    }

    #[test]
    fn serializes_snake_case() {
        assert_eq!(serde_json::to_string(&Running).unwrap(), "\"running\"");
        let s: VmState = serde_json::from_str("\"stopped\"").unwrap();
        assert_eq!(s, Stopped);
    }
}
