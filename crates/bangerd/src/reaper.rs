//! Reaping VMM children. Each spawned VMM gets a thread blocked in wait();
//! when it exits the PID goes to the daemon, which cleans up a VM that was
//! meant to be running (the same teardown as `stop`).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

static EXITS: OnceLock<Mutex<Sender<i32>>> = OnceLock::new();

/// Installs the channel exits are reported on; returns its receiver.
pub fn install() -> Option<Receiver<i32>> {
    let (tx, rx) = channel();
    EXITS.set(Mutex::new(tx)).ok().map(|_| rx)
}

/// Watches a VMM this daemon did not spawn (adopted at reconcile): polls
/// until no running process with that PID carries `needle` (its API
/// socket) any more, then reports the exit like `watch` does.
pub fn watch_pid(pid: i32, needle: String) {
    let spawned = std::thread::Builder::new()
        .name(format!("watch-{pid}"))
        .spawn(move || {
            while banger_host::process::matches(pid, &needle) {
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            if let Some(tx) = EXITS.get() {
                let _ = tx.lock().map(|t| t.send(pid));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, err = %e, "cannot start a watcher thread");
    }
}

pub fn watch(mut child: std::process::Child) {
    let pid = child.id() as i32;
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
            if let Some(tx) = EXITS.get() {
                let _ = tx.lock().map(|t| t.send(pid));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, err = %e, "cannot start a reaper thread");
    }
}
