//! A request's dispatch: each `banger_core::api::Request` to the daemon's
//! method for it, after `vouch` has judged what the caller may ask (the
//! socket server's and the E2B-compatible API's requests alike).

use banger_core::api::{DaemonStatus, Event, Request, Response, PROTOCOL_VERSION};

use std::sync::atomic::Ordering;

use tracing::warn;

use crate::cancel::Cancel;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};
use crate::server::Conn;

pub(crate) fn op_name(r: &Request) -> &'static str {
    match r {
        Request::Ping => "ping",
        Request::VmCreate(_) => "vm_create",
        Request::VmStart { .. } => "vm_start",
        Request::VmStop { .. } => "vm_stop",
        Request::VmKill { .. } => "vm_kill",
        Request::VmPause { .. } => "vm_pause",
        Request::VmResume { .. } => "vm_resume",
        Request::VmReidentify { .. } => "vm_reidentify",
        Request::VmDelete { .. } => "vm_delete",
        Request::VmGet { .. } => "vm_get",
        Request::VmList => "vm_list",
        Request::ImageBuild { .. } => "image_build",
        Request::ImageList => "image_list",
        Request::ImageDelete { .. } => "image_delete",
        Request::ImageImport { .. } => "image_import",
        Request::VmCommit { .. } => "vm_commit",
        Request::Doctor => "doctor",
        Request::ConfigShow => "config_show",
        Request::DaemonStop => "daemon_stop",
        Request::Settle => "settle",
        Request::VmLogs { .. } => "vm_logs",
        Request::VmStats { .. } => "vm_stats",
        Request::DaemonStatus => "daemon_status",
        Request::VmPortAdd { .. } => "vm_port_add",
        Request::VmPortRm { .. } => "vm_port_rm",
        Request::VmAgent { .. } => "vm_agent",
        Request::VolumeCreate { .. } => "volume_create",
        Request::VolumeList => "volume_list",
        Request::NetworkList => "network_list",
        Request::NetworkShare { .. } => "network_share",
        Request::VolumeDelete { .. } => "volume_delete",
        Request::VmSnapshot { .. } => "vm_snapshot",
        Request::VmFork { .. } => "vm_fork",
        Request::SnapshotList => "snapshot_list",
        Request::SnapshotGet { .. } => "snapshot_get",
        Request::SnapshotDelete { .. } => "snapshot_delete",
        Request::ApiServe { .. } => "api_serve",
        Request::ApiStatus => "api_status",
        Request::ApiStop => "api_stop",
        Request::ApiTokenCreate { .. } => "api_token_create",
        Request::ApiTokenList => "api_token_list",
        Request::ApiTokenDelete { .. } => "api_token_delete",
    }
}

pub fn dispatch(
    daemon: &Daemon,
    req: Request,
    events: &mut dyn FnMut(Event),
    conn: &Conn,
) -> Result<Response> {
    let req = vouch(daemon, req, &conn.caller)?;
    let caller = &conn.caller;
    Ok(match req {
        Request::Ping => Response::Pong {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        },
        Request::VmCreate(c) if c.rm => return run_rm(daemon, &c, events, conn),
        Request::VmCreate(c) => Response::Vm(Box::new(daemon.create_for(
            &c,
            caller,
            None,
            events,
            Cancel::default(),
        )?)),
        Request::VmStart { name } => Response::Vm(Box::new(daemon.start(&name, events)?)),
        Request::VmStop { name } => Response::Vm(Box::new(daemon.stop(&name, events)?)),
        Request::VmKill { name } => Response::Vm(Box::new(daemon.kill(&name)?)),
        Request::VmPause {
            name,
            to_disk: false,
        } => Response::Vm(Box::new(daemon.pause(&name)?)),
        Request::VmPause {
            name,
            to_disk: true,
        } => Response::Vm(Box::new(daemon.suspend(&name)?)),
        Request::VmResume { name } => Response::Vm(Box::new(daemon.resume(&name)?)),
        Request::VmReidentify { name } => Response::Vm(Box::new(daemon.reidentify(&name)?)),
        Request::VmDelete { name, force } => {
            daemon.delete_checked(&name, force)?;
            Response::Deleted { name }
        }
        Request::VmGet { name } => {
            let vm = daemon.find(&name)?;
            Response::Vm(Box::new(daemon.info(&vm)))
        }
        Request::VmList => Response::Vms {
            vms: daemon.list()?,
        },
        Request::ImageBuild { name, force } => {
            Response::Image(daemon.build_image(&name, force, caller, events)?)
        }
        Request::ImageList => Response::Images {
            images: daemon.list_images()?,
        },
        Request::ImageDelete { name } => {
            daemon.delete_image(&name, caller)?;
            Response::Deleted { name }
        }
        Request::ImageImport { name, source } => {
            Response::Image(daemon.import_image(&name, &source, caller, events)?)
        }
        Request::VmCommit { name, image } => {
            Response::Image(daemon.commit(&name, &image, caller, events)?)
        }
        Request::DaemonStop => {
            if !conn.caller.is_root() {
                return Err(DaemonError::Invalid(
                    "only root may stop bangerd (`sudo banger daemon stop`)".into(),
                ));
            }
            conn.stopper.stop();
            Response::Stopping {
                pid: std::process::id(),
            }
        }
        Request::ConfigShow => Response::Config {
            entries: daemon.cfg.settings.clone(),
        },
        Request::Doctor => Response::Doctor {
            checks: crate::doctor::checks(daemon),
        },
        Request::Settle => Response::Settled {
            retried: daemon.settle()? as u32,
        },
        Request::VmLogs { name, follow } => {
            let hangup = if follow {
                conn.hangup()?
            } else {
                Cancel::default()
            };
            daemon.logs(&name, follow, events, &hangup, conn.stopper.flag())?;
            Response::LogEnd
        }
        Request::VmStats { name } => Response::Stats {
            stats: daemon.vm_stats(name.as_deref())?,
        },
        Request::DaemonStatus => Response::Status(status(daemon, conn.conns.total())?),
        Request::VmPortAdd { name, port } => Response::Vm(Box::new(daemon.port_add(&name, port)?)),
        Request::VmPortRm { name, host } => Response::Vm(Box::new(daemon.port_rm(&name, &host)?)),
        Request::VolumeCreate { name, size_mib } => {
            Response::Volume(daemon.create_volume(&name, size_mib, caller)?)
        }
        Request::VolumeList => Response::Volumes {
            volumes: daemon.list_volumes()?,
        },
        Request::NetworkList => Response::Networks {
            networks: daemon.list_networks()?,
        },
        Request::NetworkShare { name, user, share } => Response::Networks {
            networks: vec![daemon.share_network(&name, &user, share, caller)?],
        },
        Request::VolumeDelete { name } => {
            daemon.delete_volume(&name, caller)?;
            Response::Deleted { name }
        }
        Request::VmSnapshot { name, snapshot } => Response::Snapshot(Box::new(
            daemon.snapshot_vm(&name, snapshot.as_deref(), caller)?,
        )),
        Request::VmFork { name, new, count } => Response::Vms {
            vms: daemon.fork(&name, &new, count, caller)?,
        },
        Request::SnapshotList => Response::Snapshots {
            snapshots: daemon.list_snapshots()?,
        },
        Request::SnapshotGet { name } => Response::Snapshot(Box::new(daemon.snapshot_info(&name)?)),
        Request::SnapshotDelete { name } => {
            daemon.delete_snapshot(&name, caller)?;
            Response::Deleted { name }
        }
        Request::ApiServe { listen } => {
            root_only(caller, "api serve")?;
            Response::Api {
                listen: Some(daemon.api_serve(&listen)?),
            }
        }
        Request::ApiStatus => Response::Api {
            listen: daemon.api_status(),
        },
        Request::ApiStop => {
            root_only(caller, "api stop")?;
            daemon.api_stop()?;
            Response::Api { listen: None }
        }
        Request::ApiTokenCreate { name } => {
            let (name, key) = daemon.api_token_create(caller, &name)?;
            Response::ApiToken { name, key }
        }
        Request::ApiTokenList => Response::ApiTokens {
            tokens: daemon.api_token_list(caller)?,
        },
        Request::ApiTokenDelete { name, uid } => {
            daemon.api_token_delete(caller, &name, uid)?;
            Response::Deleted { name }
        }
        // Served by `handle` (it passes a descriptor).
        Request::VmAgent { name } => {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?}: the agent connection is handed over by the server only"
            )))
        }
    })
}

/// What a request names on the host is checked against who sent it (see
/// `access`): a caller who is not root names only their own paths, and a
/// mount records whose it is.
pub(crate) fn vouch(
    daemon: &Daemon,
    req: Request,
    caller: &crate::access::Caller,
) -> Result<Request> {
    // A VM only root may use (access::root_only) is refused to the others.
    let named = match &req {
        Request::VmStart { name }
        | Request::VmStop { name }
        | Request::VmKill { name }
        | Request::VmPause { name, .. }
        | Request::VmResume { name }
        | Request::VmReidentify { name }
        | Request::VmDelete { name, .. }
        | Request::VmLogs { name, .. }
        | Request::VmPortAdd { name, .. }
        | Request::VmPortRm { name, .. }
        | Request::VmCommit { name, .. }
        | Request::VmSnapshot { name, .. }
        | Request::VmFork { name, .. }
        | Request::VmAgent { name } => Some(name.as_str()),
        Request::VmStats { name } => name.as_deref(),
        _ => None,
    };
    use banger_store::Owned;
    if let (Some(name), false) = (named, caller.is_root()) {
        match daemon.find(name) {
            Ok(vm) => caller.may_use_in(&daemon.store(), &vm)?,
            Err(DaemonError::Broken { .. }) | Err(DaemonError::VmNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(match req {
        Request::VmCreate(mut c) => {
            if !caller.is_root() {
                let store = daemon.store();
                let image = c.image.as_deref().unwrap_or(&daemon.cfg.default_image);
                caller.may_read(&store, Owned::Image, image)?;
                for v in &c.volumes {
                    caller.may_read(&store, Owned::Volume, &v.name)?;
                }
            }
            for m in &mut c.mounts {
                m.validate()
                    .map_err(|e| DaemonError::Invalid(e.to_string()))?;
                caller.may_name(&m.host, "--mount")?;
                if !caller.is_root() {
                    crate::access::hardlinks_protected("--mount")?;
                }
                // virtiofsd runs as root and keeps the guest's ids: what a
                // guest's root wrote in a member's directory would be
                // root's on the host (a setuid shell). Read-only for them.
                if !caller.is_root() && !m.read_only {
                    return Err(DaemonError::Invalid(format!(
                        "--mount {m}: a member of the banger group may share a directory \
                         read-only only (add :ro): what the guest's root writes there would \
                         be root's on the host; `banger vm cp` or a volume carries data back"
                    )));
                }
                m.owner = (!caller.is_root()).then_some(caller.uid);
            }
            Request::VmCreate(c)
        }
        other => other,
    })
}

/// `vm run --rm`: the VM lives as long as the client's connection. A
/// client that goes away during the boot cancels it (and the VM goes);
/// once the VM is up the client is told (`Event::Ready`) and the daemon
/// waits for it to hang up, then deletes the VM. A daemon shutting down
/// stops waiting and leaves the VM running: the next daemon adopts it and
/// deletes it when its client process is gone (`watch_rm_clients`).
fn run_rm(
    daemon: &Daemon,
    c: &banger_core::api::CreateVm,
    events: &mut dyn FnMut(Event),
    conn: &Conn,
) -> Result<Response> {
    let hangup = conn.hangup()?;
    let client = banger_host::process::ProcId::of(conn.caller.pid).map(|p| banger_core::RmClient {
        pid: p.pid,
        start_time: p.start_time,
    });
    let vm = daemon.create_for(c, &conn.caller, client, events, hangup.clone())?;
    let name = vm.name.clone();
    events(Event::Ready { vm: Box::new(vm) });
    // Not a request in flight for the shutdown's drain while it waits.
    conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    while !hangup.wait(std::time::Duration::from_millis(200)) && !conn.shutting_down() {}
    conn.in_flight.fetch_add(1, Ordering::SeqCst);
    if !hangup.is_cancelled() {
        warn!(vm = %name, "shutting down: the --rm VM is left running");
        return Ok(Response::Vm(Box::new(daemon.info(&daemon.find(&name)?))));
    }
    match daemon.delete(&name) {
        Ok(()) | Err(DaemonError::VmNotFound(_)) => Ok(Response::Deleted { name }),
        Err(e) => Err(e),
    }
}

fn status(daemon: &Daemon, connections: u32) -> Result<DaemonStatus> {
    let vms = daemon.list()?;
    let mut by_state: Vec<(banger_core::VmState, u32)> = Vec::new();
    for v in &vms {
        match by_state.iter_mut().find(|(s, _)| *s == v.state) {
            Some((_, n)) => *n += 1,
            None => by_state.push((v.state, 1)),
        }
    }
    Ok(DaemonStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        uptime_secs: daemon.started.elapsed().as_secs(),
        vms: by_state,
        pending_releases: daemon.store().list_releases()?.len() as u32,
        dns_suffix: daemon.cfg.dns_suffix.clone(),
        dns_listen: daemon.cfg.dns_listen.map(|a| a.to_string()),
        connections,
        failed_releases: daemon
            .janitor
            .failures()
            .into_iter()
            .map(|f| banger_core::api::FailedRelease {
                vm: f.job.vm_name,
                error: f.error,
                attempts: f.attempts,
                retry_in_secs: if f.retrying {
                    0
                } else {
                    f.due
                        .saturating_duration_since(std::time::Instant::now())
                        .as_secs()
                },
            })
            .collect(),
    })
}

/// Refuses a request only root may make.
fn root_only(caller: &crate::access::Caller, what: &str) -> Result<()> {
    if caller.is_root() {
        Ok(())
    } else {
        Err(DaemonError::Invalid(format!(
            "`banger {what}` is root's: it opens a TCP port for every user's API keys"
        )))
    }
}
