//! `containerd-shim-banger-v2`: banger as a containerd runtime
//! (`io.containerd.banger.v2`). containerd starts it per container; each
//! container is a banger VM that bangerd makes and holds for it (listed,
//! limited, confined and reconciled as any other), its root filesystem
//! shared in over virtio-fs, its processes run by the guest agent. The
//! shim asks bangerd through its socket with containerd's rights, and does
//! no host work of its own beyond mounting the container's rootfs.

mod events;
mod pod;
mod process;
mod rootfs;
mod spec;
mod stats;
mod task;
mod vm;

use std::path::PathBuf;
use std::sync::Arc;

use banger::client::Client;
use banger_core::layout::{RUNTIME_DIR_ENV, STATE_DIR_ENV};
use banger_core::Layout;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    self as shim, api, util::write_address, Config, DeleteResponse, Error, ExitSignal, Flags,
    StartOpts,
};

/// The runtime's name, as containerd's configuration gives it.
const RUNTIME: &str = "io.containerd.banger.v2";

fn client() -> Client {
    let env_dir = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    Client {
        layout: Layout::resolve(None, None, env_dir(STATE_DIR_ENV), env_dir(RUNTIME_DIR_ENV)),
    }
}

struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// The socket this shim serves on (`-socket`), removed as it ends
    /// (containerd has removed the bundle, whose `address` names it, by
    /// then).
    socket: String,
}

impl shim::Shim for Service {
    type T = task::TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            socket: args.socket.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // Refused before anything exists: a rootless containerd's shim
        // could mount nothing (nor read what its user may not).
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            return Err(Error::Other(format!(
                "{RUNTIME} runs as root, as containerd normally does: it mounts each \
                 container's snapshot and binds its host paths into the pod's directory; this \
                 containerd runs as uid {uid} (a rootless containerd is not supported: use \
                 the system's containerd, or runc)"
            )));
        }
        // One shim per pod (a Kubernetes sandbox, a banger group, or a
        // container alone): its containers share its VM. containerd runs
        // this in the bundle.
        let grouping = spec::load(std::path::Path::new("."))
            .map(|s| spec::pod_of(&s, &opts.id))
            .unwrap_or_else(|_| opts.id.clone());
        let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
        // containerd finds the shim again by this file after a restart.
        write_address(&address)?;
        Ok(address)
    }

    /// The shim is gone (killed): what it held is let go. Its pod VM's
    /// lease ended with its connection, so the daemon deletes that VM
    /// already; asking again covers a daemon that was down meanwhile. The
    /// container's mounts in its pod's directory are unmounted here, and
    /// the directory with its last container.
    fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        // containerd asks this after every task's delete too (its
        // connection closed): while the pod's shim still serves, that shim
        // has let go of what the task held, and the pod's VM is its other
        // containers'.
        if shim_serves() {
            return Ok(deleted());
        }
        // The dead shim's socket, which nobody serves any more.
        if let Ok(address) = containerd_shim::util::read_address() {
            remove_socket(address.trim());
        }
        // What the dead shim's pod was, as its create recorded it: only
        // that (never a later shim's pod of the same name).
        let Some((vm, dir)) = task::read_pod_record(&bundle) else {
            return Ok(deleted());
        };
        // The dead shim's VM first (nothing of the guest's may change
        // under the unmounting), then its pod's whole directory: every
        // container of it was that shim's.
        if let Err(e) = vm::delete(&client(), &vm) {
            eprintln!("{RUNTIME}: {e}");
        }
        if let Err(e) = pod::remove(&dir) {
            eprintln!("{RUNTIME}: {e}");
        }
        Ok(deleted())
    }

    fn wait(&mut self) {
        self.exit.wait();
        remove_socket(&self.socket);
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> task::TaskService {
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let events = events::Events::start(publisher, address, self.namespace.clone());
        task::TaskService::new(&self.namespace, client(), events, self.exit.clone())
    }
}

/// What `delete` answers: the task's end, as runc's shim reports a
/// killed one.
fn deleted() -> DeleteResponse {
    api::DeleteResponse {
        pid: 0,
        exit_status: process::KILLED,
        exited_at: containerd_shim::protos::protobuf::MessageField::some(events::timestamp(
            std::time::SystemTime::now(),
        )),
        ..Default::default()
    }
}

/// Removes the socket file of `address` (`unix:///run/containerd/s/…`),
/// if it is a socket.
fn remove_socket(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = address.trim_start_matches("unix://");
    if path.is_empty() {
        return;
    }
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("{path}: {e}");
        }
    }
}

/// Whether the shim whose address is in this bundle still answers.
fn shim_serves() -> bool {
    let Ok(address) = containerd_shim::util::read_address() else {
        return false;
    };
    let path = address.trim().trim_start_matches("unix://");
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn main() {
    // The shim starts no processes of its own (bangerd does): no reaping
    // that could race a wait.
    let config = Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    shim::run::<Service>(RUNTIME, Some(config));
}
