//! bangerd: the root daemon that owns all of banger's host state.
//!
//! `run` takes its listener and a stopper as arguments (mini-redis'
//! `run(listener, shutdown)`), so tests can start a daemon on a temporary
//! socket and state dir.

pub mod access;
pub mod agent;
pub mod cancel;
pub mod commit;
pub mod config;
pub mod console;
pub mod daemon;
mod dispatch;
pub mod dns;
pub mod doctor;
pub mod e2b;
pub mod ending;
pub mod error;
pub mod failpoint;
pub mod fcsnap;
pub mod fork;
pub mod handles;
pub mod host;
pub mod identity;
pub mod images;
pub mod janitor;
pub mod lifecycle;
pub mod limits;
pub mod locks;
pub mod networks;
pub mod pause;
pub mod perms;
pub mod readiness;
pub mod reaper;
pub mod reconcile;
pub mod releases;
pub mod resources;
pub mod restore;
pub mod server;
pub mod settings;
pub mod snapshots;
pub mod stats;
pub mod suspend;
pub mod uids;
pub mod volumes;
pub mod warm;
pub mod watch;
pub mod worker;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

pub use daemon::{Config, Daemon};
pub use error::DaemonError;

/// Lowers the calling thread's priority: housekeeping yields to requests.
pub(crate) fn process_nice() -> std::io::Result<()> {
    banger_host::process::set_thread_nice(0, 10)
}

/// Opens the daemon's state, reconciles what survived a restart, and serves
/// on `listener` until `stopper` is told to stop.
pub fn run(
    cfg: Config,
    listener: UnixListener,
    stopper: server::Stopper,
) -> Result<(), DaemonError> {
    let daemon = open(cfg)?;
    serve(daemon, listener, stopper);
    Ok(())
}

/// Opens the state and reconciles it: everything that can fail before the
/// daemon is able to answer, so that the socket appears only once it can.
pub fn open(cfg: Config) -> Result<Arc<Daemon>, DaemonError> {
    let daemon = Arc::new(Daemon::open(cfg)?);
    daemon.set_self(Arc::downgrade(&daemon));
    daemon.reconcile()?;
    Ok(daemon)
}

/// Serves requests until `stopper` is told to stop; VMM exits reported by the
/// reaper are handled on a thread of their own.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener, stopper: server::Stopper) {
    if let Some(rx) = reaper::install() {
        let d = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("vmm-exits".into())
            .spawn(move || {
                for pid in rx {
                    d.on_vmm_exit(pid);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(err = %e, "cannot start the VMM exit handler");
        }
        daemon.watch_adopted();
    }
    daemon.watch_rm_clients();
    let d = daemon.clone();
    let janitor = std::thread::Builder::new()
        .name("janitor".into())
        .spawn(move || d.run_janitor());
    match janitor {
        Ok(_) => daemon.janitor_started(),
        // Releases are then done inline, before each reply.
        Err(e) => tracing::warn!(err = %e, "cannot start the janitor; releasing inline"),
    }
    if let Some(addr) = daemon.cfg.dns_listen {
        match dns::Listener::start(Arc::downgrade(&daemon), addr, dns::Asker::Host) {
            Ok(l) => *daemon.dns.host.lock().unwrap_or_else(|p| p.into_inner()) = Some(l),
            Err(e) => tracing::warn!(err = %e, "no DNS for the host"),
        }
    }
    if let Some(listen) = daemon.cfg.api_listen.clone() {
        if let Err(e) = daemon.api_serve(&listen) {
            tracing::warn!(err = %e, "the E2B-compatible API is not served");
        }
    }
    let d = daemon.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || d.run_poller())
    {
        tracing::warn!(err = %e, "cannot start the stats poller: no stats, no auto-stop");
    }
    server::run(daemon, listener, stopper);
}
