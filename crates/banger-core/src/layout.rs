//! Every path banger uses derives from one state dir and one runtime dir, so
//! that several instances (tests, benchmarks) run side by side unseen.

use std::path::PathBuf;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/banger";
pub const DEFAULT_RUNTIME_DIR: &str = "/run/banger";
pub const STATE_DIR_ENV: &str = "BANGER_STATE_DIR";
pub const RUNTIME_DIR_ENV: &str = "BANGER_RUNTIME_DIR";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        Layout {
            state_dir: state_dir.into(),
            runtime_dir: runtime_dir.into(),
        }
    }

    /// Flag value, else environment, else default; the caller passes what it
    /// read from the environment so that this stays free of I/O.
    pub fn resolve(
        state_flag: Option<PathBuf>,
        runtime_flag: Option<PathBuf>,
        state_env: Option<PathBuf>,
        runtime_env: Option<PathBuf>,
    ) -> Self {
        Layout {
            state_dir: state_flag
                .or(state_env)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            runtime_dir: runtime_flag
                .or(runtime_env)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR)),
        }
    }

    pub fn db(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("bangerd.lock")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }
    /// Named volumes: `<name>.ext4` each.
    pub fn volumes_dir(&self) -> PathBuf {
        self.state_dir.join("volumes")
    }
    pub fn volume(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(format!("{name}.ext4"))
    }
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.images_dir().join(name)
    }
    /// Caches the daemon can rebuild at will (work-disk templates).
    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }
    /// A freshly made, empty ext4 of `mib` MiB that new work disks are
    /// sparse copies of. The suffix names the mkfs options' version.
    pub fn work_template(&self, mib: u64) -> PathBuf {
        self.cache_dir().join(format!("work-{mib}m-v1.ext4"))
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    /// VMDir: disks, logs, keys and the handles scratch file of one VM.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }
    /// Snapshots (`vm snapshot`): one directory each, by id.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(id)
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.state_dir.join("ssh")
    }
    /// The client key banger logs into every guest with.
    pub fn client_key(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }
    pub fn vm_runtime_dir(&self, id: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(id)
    }
}

/// Per-VM file names inside VMDir.
pub mod vmfiles {
    pub const HANDLES: &str = "handles.json";
    /// A snapshot's device state (QEMU's migration stream, RAM left out).
    pub const SNAP_STATE: &str = "state";
    /// A snapshot's guest RAM (sparse).
    pub const SNAP_RAM: &str = "ram";
    /// The root disk: a qcow2 overlay over the image (QEMU)...
    pub const ROOT_DISK: &str = "root.qcow2";
    /// ...or a raw copy of the image, reflinked where the filesystem can
    /// (Firecracker, which takes raw disks only).
    pub const ROOT_RAW: &str = "root.ext4";
    /// The overlay strategy's upper disk (the image itself is the lower).
    pub const ROOT_UPPER: &str = "root-upper.ext4";
    /// The dm-snapshot strategy's copy-on-write store.
    pub const ROOT_COW: &str = "root.cow";
    pub const WORK_DISK: &str = "work.ext4";
    pub const CONSOLE_LOG: &str = "console.log";
    pub const VMM_LOG: &str = "vmm.log";
    pub const INITRD: &str = "initrd.img";
    pub const HOST_KEY: &str = "ssh_host_ed25519_key";
    pub const KNOWN_HOSTS: &str = "known_hosts";
    pub const API_SOCK: &str = "api.sock";
    /// The hybrid vsock's Unix socket (in the runtime dir); the agent's
    /// hello arrives on `vsock.sock_1025`.
    pub const VSOCK: &str = "vsock.sock";
    /// QEMU's vhost-user socket to its vsock backend (runtime dir).
    pub const VSOCK_BACKEND: &str = "vhost-vsock.sock";
    /// The vsock backend's own output.
    pub const VSOCK_LOG: &str = "vsock.log";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_env_beats_default() {
        let l = Layout::resolve(None, None, None, None);
        assert_eq!(l.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(l.runtime_dir, PathBuf::from(DEFAULT_RUNTIME_DIR));
        let l = Layout::resolve(None, None, Some("/e/s".into()), Some("/e/r".into()));
        assert_eq!(l.socket(), PathBuf::from("/e/r/bangerd.sock"));
        let l = Layout::resolve(Some("/f".into()), None, Some("/e/s".into()), None);
        assert_eq!(l.db(), PathBuf::from("/f/banger.db"));
        assert!(l.vm_dir("abc").starts_with(&l.state_dir));
    }
}
