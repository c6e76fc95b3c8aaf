//! A failpoint of a test instance's daemon that holds a step until the
//! test lets it go: the daemon waits reading a FIFO (`return(gate:PATH)`,
//! bangerd's `failpoint`), which the test opens once it has done what must
//! happen meanwhile. No sleeps: each side waits for the other's event.

use std::path::PathBuf;
use std::time::Duration;

use crate::{ok, wait_until, Instance};

/// A failpoint of the instance's daemon (restarted with it) that waits at
/// a FIFO until the test opens it.
pub struct Gate {
    point: String,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gate {
    pub fn on(inst: &Instance, point: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        inst.kill_daemon();
        let out = inst
            .banger_cmd(&["daemon", "ping"])
            .env(
                "FAILPOINTS",
                format!("{point}=return(gate:{})", path.display()),
            )
            .output()
            .unwrap();
        ok(&out, &format!("a daemon that waits at {point}"));
        Gate {
            point: point.into(),
            path,
            _dir: dir,
        }
    }

    /// Waits until the daemon says `what` waits at the gate.
    pub fn reached(&self, inst: &Instance, what: &str) {
        let log = inst.state().join("bangerd.log");
        let says = format!("failpoint {}: waiting at the gate", self.point);
        assert!(
            wait_until(Duration::from_secs(60), || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&says)),
            "{what} never reached its gate"
        );
    }

    pub fn open(&self) {
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .unwrap(),
        );
    }
}
