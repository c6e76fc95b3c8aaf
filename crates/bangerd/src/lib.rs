//! bangerd: the root daemon that owns all of banger's host state.
//!
//! `run` takes its listener and a shutdown flag as arguments (mini-redis'
//! `run(listener, shutdown)`), so tests can start a daemon on a temporary
//! socket and state dir.

pub mod daemon;
pub mod doctor;
pub mod error;
pub mod handles;
pub mod reaper;
pub mod server;

use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use daemon::{Config, Daemon};
pub use error::DaemonError;

/// Opens the daemon's state, reconciles what survived a restart, and serves
/// on `listener` until `shutdown` is set.
pub fn run(
    cfg: Config,
    listener: UnixListener,
    shutdown: Arc<AtomicBool>,
) -> Result<(), DaemonError> {
    let daemon = Arc::new(Daemon::open(cfg)?);
    daemon.reconcile()?;
    if let Some(rx) = reaper::install() {
        let d = daemon.clone();
        let _ = std::thread::Builder::new()
            .name("vmm-exits".into())
            .spawn(move || {
                for pid in rx {
                    d.on_vmm_exit(pid);
                }
            });
    }
    server::run(daemon, listener, shutdown);
    Ok(())
}
