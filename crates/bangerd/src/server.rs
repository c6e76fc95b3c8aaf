//! The Unix-socket server: one thread per connection, one request per
//! connection, newline-delimited JSON (see `banger_core::api`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use banger_core::api::{
    ApiError, Check, DaemonStatus, Envelope, ErrorKind, Event, Reply, Request, Response,
    PROTOCOL_VERSION,
};
use tracing::{info, info_span, warn};

use crate::cancel::Cancel;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};
use crate::limits::{refuser, Conns, Counted, ShutOnDrop, REQUEST_WITHIN, WRITE_WAIT};

pub(crate) const MAX_REQUEST: u64 = 1 << 20;
/// How long a shutdown waits for requests in flight (a boot wait, an image
/// build) before it gives up on them.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Asks the accept loop to stop: a flag, and a pipe the loop polls beside
/// the listener, so that nothing has to connect to wake it (under socket
/// activation the listener is systemd's, and a wake-up connection would
/// start the next daemon).
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    rx: Arc<std::os::fd::OwnedFd>,
    tx: Arc<std::os::fd::OwnedFd>,
}

impl Stopper {
    pub fn new() -> std::io::Result<Stopper> {
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(std::io::Error::from)?;
        Ok(Stopper {
            flag: Arc::new(AtomicBool::new(false)),
            rx: Arc::new(rx),
            tx: Arc::new(tx),
        })
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&*self.tx, &[1]);
    }

    pub fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }
}

/// Serves until `stopper` is told to stop, then lets the requests in
/// flight finish, so that a SIGTERM never leaves a half-created VM or a
/// half-torn-down one.
pub fn run(daemon: Arc<Daemon>, listener: UnixListener, stopper: Stopper) {
    use std::os::fd::AsFd;
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conns = Arc::new(Conns::default());
    let refusals = refuser();
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(err = %e, "cannot make the listener non-blocking");
    }
    while !stopper.stopping() {
        let mut fds = [
            nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(stopper.rx.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(err = %e, "poll on the listener failed");
                break;
            }
        }
        if stopper.stopping() {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(WRITE_WAIT));
                // The cap per uid, before a thread is spent on it.
                let uid = nix::sys::socket::getsockopt(
                    &stream,
                    nix::sys::socket::sockopt::PeerCredentials,
                )
                .map(|c| c.uid())
                .unwrap_or(u32::MAX);
                if !conns.enter(uid) {
                    // (Not a warning each: a member could fill the log.)
                    tracing::debug!(uid, "refusing a connection: the uid's cap is reached");
                    // Told why by the refuser thread (a full queue of
                    // refusals: closed unanswered).
                    let _ = refusals.try_send((stream, uid));
                    continue;
                }
                let d = daemon.clone();
                let count = in_flight.clone();
                let stop = stopper.clone();
                let open = conns.clone();
                count.fetch_add(1, Ordering::SeqCst);
                let r = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || {
                        // Counted out however `handle` ends (a panic too).
                        let _out = Counted {
                            in_flight: &count,
                            conns: &open,
                            uid,
                        };
                        handle(&d, stream, &stop, &count, &open);
                    });
                if let Err(e) = r {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    conns.leave(uid);
                    warn!(err = %e, "cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the
                // connection stays queued and the listener readable, so
                // the loop backs off rather than spin (waking for a stop).
                warn!(err = %e, "accept failed; retrying in 100 ms");
                let mut fds = [nix::poll::PollFd::new(
                    stopper.rx.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            }
        }
    }
    drop(listener);
    let start = std::time::Instant::now();
    while in_flight.load(Ordering::SeqCst) > 0 {
        if start.elapsed() > DRAIN_LIMIT {
            warn!(
                requests = in_flight.load(Ordering::SeqCst),
                "shutting down with requests still in flight"
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Releases the requests queued (taps, NAT rules) are finished too.
    if !daemon.janitor.wait_idle(DRAIN_LIMIT) {
        warn!(
            releases = daemon.janitor.pending(),
            "shutting down with releases pending; the next daemon finishes them"
        );
    }
    daemon.host().drain_tap_pool();
}

pub(crate) fn write_reply(stream: &mut UnixStream, reply: &Reply) -> bool {
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| {
        r#"{"reply":"err","kind":"internal","message":"unserialisable reply"}"#.into()
    });
    line.push('\n');
    stream.write_all(line.as_bytes()).is_ok()
}

/// What a request can know of its connection: whether the client hung up
/// (for requests that outlive their reply's start: an `rm` create, a
/// followed log), and whether the daemon is shutting down.
pub struct Conn<'a> {
    stream: &'a UnixStream,
    /// Who connected (SO_PEERCRED).
    pub caller: crate::access::Caller,
    stopper: &'a Stopper,
    in_flight: &'a std::sync::atomic::AtomicUsize,
    conns: &'a Conns,
}

impl Conn<'_> {
    /// A token cancelled when the client hangs up (or shuts its writing
    /// side down), watched by a thread that reads the connection.
    fn hangup(&self) -> Result<Cancel> {
        let token = Cancel::default();
        let t = token.clone();
        let mut reader = self
            .stream
            .try_clone()
            .map_err(|e| DaemonError::Invalid(format!("cannot watch the connection: {e}")))?;
        std::thread::Builder::new()
            .name("hangup".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                // Only the client's end (or a real error) cancels, not
                // a signal's interruption.
                loop {
                    match reader.read(&mut buf) {
                        Ok(n) if n > 0 => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
                t.cancel();
            })
            .map_err(|e| DaemonError::Invalid(format!("cannot watch the connection: {e}")))?;
        Ok(token)
    }

    fn shutting_down(&self) -> bool {
        self.stopper.stopping()
    }
}

fn handle(
    daemon: &Daemon,
    stream: UnixStream,
    stopper: &Stopper,
    in_flight: &std::sync::atomic::AtomicUsize,
    conns: &Conns,
) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!(err = %e, "cannot clone connection");
            return;
        }
    };
    let _shut = stream.try_clone().ok().map(ShutOnDrop);
    let caller = match crate::access::Caller::of(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!(err = %e, "refusing a connection");
            write_reply(&mut writer, &Reply::Err(DaemonError::from(e).to_api()));
            return;
        }
    };
    // The whole line within its deadline (a client trickling it a byte
    // at a time included); then no timeout: the hang-up watcher reads on.
    let mut line = String::new();
    let got = {
        let d = banger_agent::deadline::Deadline::new(&stream, REQUEST_WITHIN);
        BufReader::new(d.take(MAX_REQUEST)).read_line(&mut line)
    };
    if got.is_err() || line.trim().is_empty() || stream.set_read_timeout(None).is_err() {
        if got.is_err() {
            info!(
                uid = caller.uid,
                "no whole request line within its deadline"
            );
        }
        return;
    }
    let env: Envelope = match serde_json::from_str(&line) {
        Ok(e) => e,
        Err(e) => {
            // Tell an older or newer client apart from garbage.
            let kind = match serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v.get("version")?.as_u64())
            {
                Some(v) if v != u64::from(PROTOCOL_VERSION) => ErrorKind::Version,
                _ => ErrorKind::InvalidInput,
            };
            let message = if kind == ErrorKind::Version {
                version_mismatch(None)
            } else {
                format!("bad request: {e}")
            };
            write_reply(&mut writer, &Reply::Err(ApiError { kind, message }));
            return;
        }
    };
    if env.version != PROTOCOL_VERSION {
        write_reply(
            &mut writer,
            &Reply::Err(ApiError {
                kind: ErrorKind::Version,
                message: version_mismatch(Some(env.version)),
            }),
        );
        return;
    }
    let span = info_span!("request", op = op_name(&env.request), uid = caller.uid);
    let _e = span.enter();
    if let Request::VmAgent { name } = &env.request {
        // Not a request in flight: the daemon only hands the connection
        // over.
        let vm = daemon
            .find(name)
            .and_then(|vm| caller.may_use_in(&daemon.store(), &vm).map(|_| vm))
            .and_then(|vm| {
                // Nothing of a client's runs in a guest before it is
                // handed over (a first boot's warm snapshot is taken
                // just before).
                if vm.runtime.state() == banger_core::VmState::Starting {
                    Err(DaemonError::Invalid(format!(
                        "vm {name:?} is starting: its guest is yours once it runs"
                    )))
                } else {
                    Ok(vm)
                }
            });
        match vm.and_then(|vm| daemon.agent_connect(&vm)) {
            Ok(agent) => {
                if let Err(e) = send_with_fd(&writer, &Reply::Ok(Response::Agent), &agent) {
                    info!(err = %e, "could not hand the agent connection over");
                }
            }
            Err(e) => {
                info!(err = %e, "request failed");
                write_reply(&mut writer, &Reply::Err(e.to_api()));
            }
        }
        return;
    }
    // Events go through a second handle on the same socket; if the client
    // has gone (or the handle cannot be made), the work still finishes.
    let mut event_writer = writer.try_clone().ok();
    let mut events = |ev: Event| {
        if let Some(w) = event_writer.as_mut() {
            if !write_reply(w, &Reply::Event(ev)) {
                event_writer = None;
            }
        }
    };
    let conn = Conn {
        stream: &writer,
        caller,
        stopper,
        in_flight,
        conns,
    };
    let result = dispatch(daemon, env.request, &mut events, &conn);
    let reply = match result {
        Ok(r) => Reply::Ok(r),
        Err(e) => {
            info!(err = %e, "request failed");
            Reply::Err(e.to_api())
        }
    };
    write_reply(&mut writer, &reply);
}

/// What a CLI of another build is told: which side speaks what, and how
/// to get a daemon of the CLI's build (VMs keep running across it).
fn version_mismatch(client: Option<u32>) -> String {
    let client = client.map_or_else(|| "another".to_string(), |v| v.to_string());
    format!(
        "this CLI speaks protocol {client}, the running bangerd (pid {}, version {}) protocol \
         {PROTOCOL_VERSION}: restart the daemon with the CLI's build (`sudo systemctl restart \
         banger` where systemd runs it, else `sudo banger daemon stop`: the next command starts \
         the new one; VMs keep running)",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Writes a reply line with a file descriptor attached (SCM_RIGHTS).
fn send_with_fd(
    stream: &UnixStream,
    reply: &Reply,
    fd: &impl std::os::fd::AsRawFd,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(&line)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    // The descriptor went with the first byte; the rest (never, for a
    // line this short) follows plainly.
    (&*stream).write_all(&line[n..])
}

fn op_name(r: &Request) -> &'static str {
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

pub fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
        fix: None,
    }
}

/// A check that, failed, says the command that fixes it.
pub fn check_fix(name: &str, ok: bool, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    let mut c = check(name, ok, detail);
    if !ok {
        c.fix = Some(fix.into());
    }
    c
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
