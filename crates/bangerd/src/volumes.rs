//! Named volumes: sparse ext4 files under `<state>/volumes/`, made with
//! `mkfs.ext4`, listed with the VMs that mount them, removed only when no
//! VM does. Which running VM has a volume now is the `volumes` resource's
//! (one at a time).

use std::collections::HashMap;
use std::sync::Mutex;

use banger_core::api::VolumeInfo;
use banger_core::volume::{VolumeMount, MAX_VOLUMES};
use banger_host::cmd;
use banger_host::fsutil::{self, WrapIo};

use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

/// The volumes' state in the daemon.
#[derive(Debug, Default)]
pub(crate) struct Volumes {
    /// Volume name -> id of the running VM that has it.
    pub(crate) attached: Mutex<HashMap<String, String>>,
    /// Serialises creating, deleting, attaching and giving back volumes.
    pub(crate) lock: Mutex<()>,
}

/// The smallest and largest volume banger makes.
const MIN_MIB: u64 = 16;
const MAX_MIB: u64 = 16 << 20;

impl Daemon {
    /// The volume is the caller's (recorded under the volumes' lock).
    pub fn create_volume(
        &self,
        name: &str,
        size_mib: u64,
        caller: &crate::access::Caller,
    ) -> Result<VolumeInfo> {
        banger_core::validate_name(name)
            .map_err(|e| DaemonError::Invalid(format!("volume {name:?}: {e}")))?;
        if !(MIN_MIB..=MAX_MIB).contains(&size_mib) {
            return Err(DaemonError::Invalid(format!(
                "volume {name:?}: --size must be {MIN_MIB} MiB to 16 TiB"
            )));
        }
        let _g = lock(&self.volumes.lock);
        let path = self.cfg.layout.volume(name);
        if path.exists() {
            return Err(DaemonError::Invalid(format!(
                "volume {name:?} exists: `banger volume rm {name}` first, or pick another name"
            )));
        }
        fsutil::create_dir_all(&self.cfg.layout.volumes_dir())?;
        // Made under a temporary name and renamed: a failed mkfs leaves
        // nothing that looks like a volume.
        let tmp = path.with_extension("making");
        let made = (|| {
            let f = std::fs::File::create(&tmp).with_path("create", &tmp)?;
            f.set_len(size_mib << 20).with_path("size", &tmp)?;
            drop(f);
            cmd::run_with(
                "mkfs.ext4",
                [
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-L".as_ref(),
                    name.as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    tmp.as_os_str(),
                ],
                None,
                std::time::Duration::from_secs(300),
            )?;
            // A VM that still names this volume and made it root-only
            // keeps it so (its file was gone; this is its new one).
            let store = self.store();
            let named = store
                .list_vms()?
                .iter()
                .any(|v| v.spec.volumes.iter().any(|m| m.name == name));
            let root_only = named && store.owner(banger_store::Owned::Volume, name)?.root_only;
            store.set_owner(
                banger_store::Owned::Volume,
                name,
                banger_store::Owner {
                    uid: caller.uid,
                    root_only,
                },
            )?;
            drop(store);
            std::fs::rename(&tmp, &path).with_path("rename into", &path)?;
            Ok::<(), DaemonError>(())
        })();
        if let Err(e) = made {
            let _ = fsutil::remove_file_if_exists(&tmp);
            return Err(e);
        }
        self.volume_info(name)
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let dir = self.cfg.layout.volumes_dir();
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(d) => d
                .filter_map(|e| {
                    let n = e.ok()?.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".ext4").map(str::to_string)
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(fsutil::FsError {
                    op: "read dir",
                    path: dir,
                    source: e,
                }
                .into())
            }
        };
        names.sort();
        names.iter().map(|n| self.volume_info(n)).collect()
    }

    fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        use std::os::unix::fs::MetadataExt;
        let path = self.cfg.layout.volume(name);
        let m = std::fs::metadata(&path).map_err(|_| {
            DaemonError::Invalid(format!(
                "no volume {name:?}: `banger volume create {name}` makes one; `banger volume ls` lists them"
            ))
        })?;
        let vms = self.store().list_vms()?;
        let owner = self.store().owner(banger_store::Owned::Volume, name)?;
        let used_by = vms
            .iter()
            .filter(|v| v.spec.volumes.iter().any(|m| m.name == name))
            .map(|v| v.name.clone())
            .collect();
        let attached_to = lock(&self.volumes.attached)
            .get(name)
            .and_then(|id| vms.iter().find(|v| &v.id == id))
            .map(|v| v.name.clone());
        Ok(VolumeInfo {
            name: name.to_string(),
            size_mib: m.len() >> 20,
            disk_bytes: m.blocks() * 512,
            path,
            used_by,
            attached_to,
            owner: owner.uid,
            root_only: owner.root_only,
        })
    }

    /// A clone's volume `name`, a copy of `source` (a snapshot's copy of
    /// its origin's), of `owner` (the volumes' lock held): refused if the
    /// name is taken. Made under a temporary name and renamed.
    pub(crate) fn volume_from(
        &self,
        name: &str,
        source: &std::path::Path,
        owner: banger_store::Owner,
    ) -> Result<()> {
        banger_core::validate_name(name)
            .map_err(|e| DaemonError::Invalid(format!("volume {name:?}: {e}")))?;
        let path = self.cfg.layout.volume(name);
        let named = self.named_by(name)?;
        if path.exists() || !named.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "volume {name:?} exists{}: a clone's copy of a volume is named \
                 <clone>-<volume>; `banger volume rm {name}` first, or name the clone otherwise",
                if named.is_empty() {
                    String::new()
                } else {
                    format!(" (vm(s) {} name it)", named.join(", "))
                }
            )));
        }
        fsutil::create_dir_all(&self.cfg.layout.volumes_dir())?;
        let tmp = path.with_extension("making");
        // What a crash in an earlier copy left.
        fsutil::remove_file_if_exists(&tmp)?;
        let made = fsutil::clone_or_copy(source, &tmp)
            .map_err(DaemonError::from)
            .and_then(|_| {
                Ok(self
                    .store()
                    .set_owner(banger_store::Owned::Volume, name, owner)?)
            })
            .and_then(|()| {
                std::fs::rename(&tmp, &path)
                    .with_path("rename into", &path)
                    .map_err(Into::into)
            });
        if let Err(e) = made {
            let _ = fsutil::remove_file_if_exists(&tmp);
            let _ = self.store().forget_owner(banger_store::Owned::Volume, name);
            return Err(e);
        }
        Ok(())
    }

    /// The VMs whose spec names volume `name`.
    fn named_by(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .store()
            .list_vms()?
            .into_iter()
            .filter(|v| v.spec.volumes.iter().any(|m| m.name == name))
            .map(|v| v.name)
            .collect())
    }

    /// Removes a volume a clone made (the volumes' lock held, the clone's
    /// row gone), unless a VM names or has it now (kept, logged).
    pub(crate) fn forget_volume(&self, name: &str) {
        let named = match self.named_by(name) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(volume = %name, err = %e, "a clone's volume kept: cannot list the VMs");
                return;
            }
        };
        let attached = lock(&self.volumes.attached).contains_key(name);
        if !named.is_empty() || attached {
            tracing::warn!(volume = %name, vms = ?named, "a clone's volume kept: a VM names it");
            return;
        }
        if let Err(e) = fsutil::remove_file_if_exists(&self.cfg.layout.volume(name)) {
            tracing::warn!(volume = %name, err = %e, "a failed clone's volume is left");
            return;
        }
        if let Err(e) = self.store().forget_owner(banger_store::Owned::Volume, name) {
            tracing::warn!(volume = %name, err = %e, "a failed clone's volume's owner is left");
        }
    }

    /// A member may remove only a volume of their own.
    pub fn delete_volume(&self, name: &str, caller: &crate::access::Caller) -> Result<()> {
        let _g = lock(&self.volumes.lock);
        let info = self.volume_info(name)?;
        caller.may_replace(&self.store(), banger_store::Owned::Volume, name, "remove")?;
        if !info.used_by.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "volume {name:?} is mounted by vm(s) {}: delete them first",
                info.used_by.join(", ")
            )));
        }
        fsutil::remove_file_if_exists(&info.path)?;
        self.store()
            .forget_owner(banger_store::Owned::Volume, name)?;
        Ok(())
    }

    /// Asks a running VM with volumes to write its dirty pages out (its
    /// VMM is about to be killed). Best effort, bounded: a guest that does
    /// not answer loses what it had not written, as on a power cut.
    pub(crate) fn flush_volumes(&self, vm: &banger_core::VmRecord) {
        if vm.spec.volumes.is_empty() || !self.vm_alive(vm) {
            return;
        }
        let call = banger_agent::proto::Call::Sync;
        if let Err(e) = self.agent_call(vm, call, std::time::Duration::from_secs(10)) {
            tracing::warn!(vm = %vm.name, err = %e, "could not flush the guest's volumes");
        }
    }

    /// A create's `--volume`s: existing volumes, each once, at distinct
    /// paths, not too many.
    pub(crate) fn check_mounts(&self, mounts: &[VolumeMount]) -> Result<()> {
        if mounts.len() > MAX_VOLUMES {
            return Err(DaemonError::Invalid(format!(
                "{} volumes: a VM takes at most {MAX_VOLUMES}",
                mounts.len()
            )));
        }
        for (i, m) in mounts.iter().enumerate() {
            // As the CLI's parser would (a request may come as raw JSON).
            if banger_core::volume::guest_path(&m.path).ok().as_deref() != Some(m.path.as_str()) {
                return Err(DaemonError::Invalid(format!(
                    "--volume {m}: the guest path must be absolute, normal and of [A-Za-z0-9._/-]"
                )));
            }
            self.volume_info(&m.name)?;
            if mounts[..i].iter().any(|o| o.name == m.name) {
                return Err(DaemonError::Invalid(format!(
                    "--volume {m}: volume {:?} is given twice",
                    m.name
                )));
            }
            if mounts[..i].iter().any(|o| o.path == m.path) || m.path == "/work" {
                return Err(DaemonError::Invalid(format!(
                    "--volume {m}: {} is already a mount point",
                    m.path
                )));
            }
        }
        Ok(())
    }
}
