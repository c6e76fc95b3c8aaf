//! The daemon's error: every failure a request can meet, each mapped to the
//! protocol's error kind, each naming the VM, image, path or device.

use banger_core::api::{ApiError, ErrorKind};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("vm {0:?} not found: `banger vm ls` lists the VMs")]
    VmNotFound(String),
    #[error("vm {0:?} already exists: pick another name or `banger vm delete {0}`")]
    VmExists(String),
    #[error(transparent)]
    Name(#[from] banger_core::NameError),
    #[error(transparent)]
    Sizing(#[from] banger_core::sizing::SizingError),
    #[error(transparent)]
    Transition(#[from] banger_core::state::TransitionError),
    #[error("image {0:?} is not built: {1}")]
    ImageMissing(String, String),
    #[error("image {name:?} is used by {users}: delete them first")]
    ImageInUse { name: String, users: String },
    #[error("snapshot {0:?} not found: `banger snapshot ls` lists the snapshots")]
    SnapshotNotFound(String),
    #[error(transparent)]
    Image(#[from] banger_guest::image::ImageError),
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    #[error(transparent)]
    Fs(#[from] banger_host::fsutil::FsError),
    #[error(transparent)]
    Cmd(#[from] banger_host::cmd::CmdError),
    #[error(transparent)]
    Tap(#[from] banger_host::tap::TapError),
    #[error(transparent)]
    Firewall(#[from] banger_host::firewall::FirewallError),
    #[error(transparent)]
    Qcow2(#[from] banger_host::qcow2::Qcow2Error),
    #[error(transparent)]
    Acl(#[from] banger_host::acl::AclError),
    #[error(transparent)]
    SshKey(#[from] banger_host::sshkey::SshKeyError),
    #[error(transparent)]
    Vmm(#[from] banger_vmm::VmmError),
    #[error(transparent)]
    Net(#[from] banger_core::net::NetError),
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
    #[error("vm {vm:?} did not boot: {reason}")]
    Boot { vm: String, reason: String },
    #[error("releasing the {resource} of vm {vm:?}: {reason}")]
    Release {
        vm: String,
        resource: &'static str,
        reason: String,
    },
    #[error(
        "the VMM of vm {vm:?} (pid {pid}) survives SIGKILL (its state is {state}; D means stuck \
         in the kernel, e.g. on I/O): its tap and disks stay in use, so the VM is not stopped \
         and cannot start again until it is gone; `banger vm kill {vm}` tries again"
    )]
    VmmSurvives { vm: String, pid: i32, state: char },
    #[error("vm {vm:?}: host port {port} cannot be published: {reason} (something else listens there: pick another host port)")]
    PortInUse {
        vm: String,
        port: String,
        reason: String,
    },
    #[error("vm {vm:?}: host port {port} is published by vm {by:?}: pick another host port, or `banger vm port rm {by} {port}`")]
    PortHeld {
        vm: String,
        port: String,
        by: String,
    },
    #[error("the boot of vm {0:?} was cancelled")]
    Cancelled(String),
    #[error("failpoint {0} (injected by a test)")]
    Injected(String),
    #[error("vm {name:?} has a database record this banger cannot read ({reason}): `banger vm delete {name}` removes it")]
    Broken { name: String, reason: String },
    #[error("vm {0:?} is {1}: stop it first (`banger vm stop {0}`) or delete it anyway with `banger vm rm -f {0}`")]
    Running(String, banger_core::VmState),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

impl DaemonError {
    pub fn kind(&self) -> ErrorKind {
        use DaemonError::*;
        match self {
            VmNotFound(_) | ImageMissing(..) | SnapshotNotFound(_) => ErrorKind::NotFound,
            VmExists(_) => ErrorKind::AlreadyExists,
            Store(banger_store::StoreError::NameTaken(_)) => ErrorKind::AlreadyExists,
            Name(_) | Sizing(_) | Invalid(_) | Unsupported(_) | Access(_) => {
                ErrorKind::InvalidInput
            }
            Transition(_)
            | Running(..)
            | ImageInUse { .. }
            | VmmSurvives { .. }
            | Cancelled(_)
            | Broken { .. }
            | PortInUse { .. }
            | PortHeld { .. } => ErrorKind::Conflict,
            Store(_) => ErrorKind::Internal,
            _ => ErrorKind::Host,
        }
    }

    pub fn to_api(&self) -> ApiError {
        ApiError {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}
