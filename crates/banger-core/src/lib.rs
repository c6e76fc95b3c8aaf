//! banger's domain layer: everything that can be decided without touching the
//! host. VM names, default sizing, the VM state machine, the durable/transient
//! split of VM state (`VmRuntime` vs `VmHandles`), guest addressing, the path
//! layout and the daemon protocol. No crate below this one; no I/O in it.

pub mod api;
pub mod layout;
pub mod model;
pub mod mount;
pub mod name;
pub mod net;
pub mod sizing;
pub mod state;
pub mod volume;

pub use layout::Layout;
pub use model::{
    AutoStop, Held, ImageRecord, NetPolicy, PodLink, Release, RmClient, RootDiskKind, SnapshotFile,
    SnapshotFormat, SnapshotRecord, TtlAction, VmHandles, VmRecord, VmRuntime, VmSpec, VmmKind,
    WarmSave, SUSPEND_PREFIX, WARM_PREFIX,
};

pub mod duration;
pub mod text;
pub use name::{validate_name, NameError};
pub use state::VmState;

/// Seconds since the Unix epoch (0 if the clock is before it): the one
/// timestamp every record uses.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
