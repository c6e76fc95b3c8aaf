//! banger-agent: the guest's agent, started (and restarted) by the guest's
//! init. It listens on vsock port [`AGENT_PORT`], accepts connections from
//! the host only (CID 2), serves one call per connection on its own thread,
//! and says hello to the host's [`HELLO_PORT`] when it starts, which is how
//! the daemon learns that the guest is up.
//!
//! `banger-agent --unix PATH` serves the same protocol on a Unix socket
//! instead: the host-side tests of exec and files use it. `--serial PATH`
//! serves it through the multiplexer over a Unix socket that plays the
//! virtio-serial port (`port.rs`; the tests run it with `banger-vport`).

mod cgroup;
mod container;
mod exec;
mod files;
mod netcfg;
mod port;
mod system;

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

use banger_agent::proto::{
    self, write_msg, Call, Msg, ProtoError, AGENT_PORT, HELLO_PORT, VERSION,
};

/// VMADDR_CID_HOST: the only peer the agent serves.
const HOST_CID: u32 = 2;
/// VMADDR_CID_ANY.
const ANY_CID: u32 = u32::MAX;

pub(crate) const BOOT_ID_FILE: &str = "/etc/banger-boot-id";

fn log(msg: &str) {
    // The console; a full or missing one is no reason to stop.
    eprintln!("banger-agent: {msg}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--unix") => {
            let Some(path) = args.get(2) else {
                log("usage: banger-agent [--unix PATH]");
                std::process::exit(2);
            };
            let _ = std::fs::remove_file(path);
            let l = match UnixListener::bind(path) {
                Ok(l) => l,
                Err(e) => {
                    log(&format!("bind {path}: {e}"));
                    std::process::exit(1);
                }
            };
            // The caller (a test) waits for this line, not for a delay.
            println!("listening");
            for c in l.incoming().flatten() {
                serve(c);
            }
        }
        Some("--serial") => {
            let Some(path) = args.get(2) else {
                log("usage: banger-agent [--unix PATH | --serial PATH]");
                std::process::exit(2);
            };
            port::serial_main(path)
        }
        Some(other) => {
            log(&format!(
                "unknown argument {other:?}; usage: banger-agent [--unix PATH | --serial PATH]"
            ));
            std::process::exit(2);
        }
        None if port::wanted() => port::device_main(),
        None => vsock_main(),
    }
}

fn vsock_main() {
    let l = match vsock::VsockListener::bind_with_cid_port(ANY_CID, AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            log(&format!(
                "listen on vsock port {AGENT_PORT}: {e} (no virtio-vsock device?)"
            ));
            // init restarts the agent; do not spin.
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::exit(1);
        }
    };
    log(&format!("listening on vsock port {AGENT_PORT}"));
    std::thread::spawn(hello);
    for c in l.incoming() {
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                log(&format!("accept: {e}"));
                continue;
            }
        };
        match c.peer_addr() {
            Ok(a) if a.cid() == HOST_CID => {}
            Ok(a) => {
                log(&format!("refused a connection from cid {}", a.cid()));
                continue;
            }
            Err(_) => continue,
        }
        // Every call is served through the plain socket calls (read,
        // write, shutdown, dup) that AF_VSOCK streams share with Unix
        // ones, so one type serves both.
        serve(UnixStream::from(OwnedFd::from(c)));
    }
}

/// Tells the host the agent is up (with this boot's id, so that a hello
/// from an earlier boot never counts). A connect that times out (the
/// host's vsock backend busy: many guests booting on few cores) is tried
/// again, for at most a minute; a host that does not listen (a restarted
/// daemon) is no error.
fn hello() {
    let boot_id = boot_id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match vsock::VsockStream::connect_with_cid_port(HOST_CID, HELLO_PORT) {
            Ok(mut s) => {
                if let Err(e) = write_msg(
                    &mut s,
                    &Msg::Hello {
                        version: VERSION,
                        boot_id,
                    },
                ) {
                    log(&format!("hello: {e}"));
                }
                return;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    && std::time::Instant::now() < deadline =>
            {
                log(&format!("hello to the host: {e}; trying again"));
            }
            Err(e) => {
                log(&format!("hello to the host: {e}"));
                return;
            }
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID_FILE)
        .map(|s| s.trim().chars().take(64).collect())
        .unwrap_or_default()
}

fn serve(c: UnixStream) {
    let r = std::thread::Builder::new()
        .name("call".into())
        .spawn(move || {
            if let Err(e) = call(c) {
                if !matches!(e, ProtoError::Closed) {
                    log(&format!("call: {e}"));
                }
            }
        });
    if let Err(e) = r {
        log(&format!("cannot start a thread: {e}"));
    }
}

/// Closed by [`Call::Hold`] before a snapshot, opened by `Release` or
/// `SetIdentity`: a clone wakes up with it closed.
static HELD: AtomicBool = AtomicBool::new(false);

fn call(mut c: UnixStream) -> Result<(), ProtoError> {
    let req = proto::read_request(&mut c)?;
    if req.v != VERSION {
        return write_msg(
            &mut c,
            &Msg::error(format!(
                "the agent speaks protocol {VERSION}, the host {}: rebuild the image or update banger",
                req.v
            )),
        );
    }
    let held = HELD.load(Ordering::SeqCst);
    let allowed = matches!(
        req.call,
        Call::Ping
            | Call::SetClock { .. }
            | Call::Sync
            | Call::Hold
            | Call::Release
            | Call::SetIdentity(_)
    );
    if held && !allowed {
        return write_msg(
            &mut c,
            &Msg::error(
                "this guest was restored from a snapshot and has not been given its own \
                 identity yet: nothing runs in it before (banger gives it as the VM starts; \
                 `banger vm restart` if that failed)",
            ),
        );
    }
    let reply = match req.call {
        Call::Hold => {
            HELD.store(true, Ordering::SeqCst);
            Ok(Msg::Done)
        }
        Call::Release => {
            HELD.store(false, Ordering::SeqCst);
            Ok(Msg::Done)
        }
        Call::Ping => Ok(Msg::Pong {
            version: VERSION,
            boot_id: boot_id(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }),
        Call::Exec(spec) => return exec::exec(c, spec),
        Call::Attach { target } => return exec::attach(c, &target),
        Call::Input { target } => return exec::input(c, &target),
        Call::Ps => Ok(Msg::Processes { list: exec::ps() }),
        Call::Signal { target, signal } => exec::signal(&target, signal).map(|()| Msg::Done),
        Call::Resize { target, size } => exec::resize(&target, size).map(|()| Msg::Done),
        Call::GetTar { path } => return files::get_tar(c, &path),
        Call::PutTar { dir } => return files::put_tar(c, &dir),
        Call::Stat { path } => files::stat(&path).map(Msg::Stat),
        Call::SetMeta { path, meta } => files::set_meta(&path, &meta).map(Msg::Stat),
        Call::List { path } => files::list(&path).map(|list| Msg::Entries { list }),
        Call::Mkdir {
            path,
            mode,
            parents,
        } => files::mkdir(&path, mode, parents).map(|()| Msg::Done),
        Call::Move { from, to } => files::rename(&from, &to).map(|()| Msg::Done),
        Call::Remove { path, recursive } => files::remove(&path, recursive).map(|()| Msg::Done),
        Call::Watch {
            path,
            recursive,
            entries,
            network_mounts,
        } => return files::watch(c, &path, recursive, entries, network_mounts),
        Call::Stats => system::stats().map(Msg::Stats),
        Call::Limit { cgroup, limits } => cgroup::limit(&cgroup, &limits).map(|()| Msg::Done),
        Call::CgroupStats { cgroup } => cgroup::sample(&cgroup).map(Msg::Cgroup),
        Call::ContainerGone { root, cgroup } => {
            let killed = cgroup::remove(&cgroup);
            container::unmount_root(&root)
                .and(killed)
                .map(|()| Msg::Done)
        }
        Call::CgroupSignal { cgroup, signal } => {
            cgroup::signal(&cgroup, signal).map(|list| Msg::Pids { list })
        }
        Call::Sync => {
            nix::unistd::sync();
            Ok(Msg::Done)
        }
        Call::SetClock { unix_ns } => system::set_clock(unix_ns).map(|()| Msg::Done),
        Call::SetIdentity(id) => system::set_identity(&id).map(|()| {
            HELD.store(false, Ordering::SeqCst);
            Msg::Done
        }),
        Call::WaitListen { port, timeout_ms } => {
            system::wait_listen(port, timeout_ms).map(|()| Msg::Done)
        }
    };
    // An answer over a frame's bound (a huge directory's list) is said,
    // not a connection closed without a word (nothing was written yet).
    match write_msg(&mut c, &reply.unwrap_or_else(Msg::error)) {
        Err(banger_agent::proto::ProtoError::TooLarge(n)) => write_msg(
            &mut c,
            &Msg::error(format!(
                "the answer is {n} bytes, over the agent's {} a message: ask for less",
                banger_agent::proto::MAX_FRAME
            )),
        ),
        r => r,
    }
}
