//! `vm fork NAME NEW [-n COUNT]`: a running VM's clones, made through a
//! snapshot of it that lives only as long as the fork: taken (the VM goes
//! on as it was), its clones created and restored side by side, then
//! removed (a clone that ran needs nothing of its snapshot). All or
//! nothing: a clone that fails takes the others with it.

use banger_core::api::{CreateVm, VmInfo};
use tracing::warn;

use crate::access::Caller;
use crate::cancel::Cancel;
use crate::daemon::{random_hex, Daemon};
use crate::error::{DaemonError, Result};

/// The most clones one fork makes.
pub const MAX_FORKS: u32 = 32;

/// The names of a fork's clones: `new` for one, `new-1` to `new-N` for
/// more.
pub fn clone_names(new: &str, count: u32) -> Vec<String> {
    if count == 1 {
        vec![new.to_string()]
    } else {
        (1..=count).map(|i| format!("{new}-{i}")).collect()
    }
}

impl Daemon {
    pub fn fork(&self, name: &str, new: &str, count: u32, caller: &Caller) -> Result<Vec<VmInfo>> {
        if count == 0 || count > MAX_FORKS {
            return Err(DaemonError::Invalid(format!(
                "vm fork -n {count}: give 1 to {MAX_FORKS} clones"
            )));
        }
        let names = clone_names(new, count);
        for n in &names {
            banger_core::validate_name(n)
                .map_err(|e| DaemonError::Invalid(format!("vm fork: clone name {n:?}: {e}")))?;
            if self.store().vm_by_name(n)?.is_some() {
                return Err(DaemonError::VmExists(n.clone()));
            }
        }
        let origin = self.find(name)?;
        // The clones' copies of its volumes, checked before it is stopped.
        for n in &names {
            for v in &origin.spec.volumes {
                let copy = format!("{n}-{}", v.name);
                banger_core::validate_name(&copy).map_err(|e| {
                    DaemonError::Invalid(format!(
                        "vm fork: clone {n:?}'s copy of volume {:?} would be volume {copy:?}: \
                         {e}; pick a shorter name",
                        v.name
                    ))
                })?;
                if self.cfg.layout.volume(&copy).exists() {
                    return Err(DaemonError::Invalid(format!(
                        "vm fork: clone {n:?}'s copy of volume {:?} would be volume {copy:?}, \
                         which exists: `banger volume rm {copy}` first, or pick another name",
                        v.name
                    )));
                }
            }
        }
        let snap = format!("fork-{}", random_hex(6)?);
        self.snapshot_vm(name, Some(&snap), caller)?;
        // The clones keep the origin's network policy, but not its
        // published host ports (those are the origin's).
        let mut net = origin.spec.net.clone();
        net.ports.clear();
        let made: Vec<Result<VmInfo>> = std::thread::scope(|s| {
            let jobs: Vec<_> = names
                .iter()
                .map(|n| {
                    let req = CreateVm {
                        name: Some(n.clone()),
                        image: None,
                        size: Default::default(),
                        vmm: None,
                        start: true,
                        rm: false,
                        auto_stop: origin.spec.auto_stop,
                        net: net.clone(),
                        volumes: Vec::new(),
                        root_mib: None,
                        mounts: Vec::new(),
                        from: Some(snap.clone()),
                        cold: false,
                        metadata: origin.spec.metadata.clone(),
                        env: origin.spec.env.clone(),
                    };
                    s.spawn(move || {
                        self.create_for(&req, caller, None, &mut |_| {}, Cancel::default())
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(DaemonError::Invalid(
                            "a fork's clone thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let failed = made.iter().any(Result::is_err);
        if failed {
            // Only what this fork made (a name taken meanwhile is
            // someone else's VM).
            for n in &names {
                let ours = self
                    .find(n)
                    .ok()
                    .filter(|v| v.spec.from_snapshot.as_deref() == Some(snap.as_str()));
                let Some(clone) = ours else {
                    continue;
                };
                match self.delete(n) {
                    // Its copies of the origin's volumes too.
                    Ok(()) | Err(DaemonError::VmNotFound(_)) => self.forget_clone_volumes(&clone),
                    Err(e) => warn!(vm = %n, err = %e, "fork: a clone not rolled back"),
                }
            }
        }
        if let Err(e) = self.delete_snapshot(&snap, &Caller::root()) {
            warn!(snapshot = %snap, err = %e, "fork: its snapshot is left");
        }
        made.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_clone_takes_the_name_more_are_numbered() {
        assert_eq!(clone_names("b", 1), vec!["b"]);
        assert_eq!(clone_names("b", 3), vec!["b-1", "b-2", "b-3"]);
    }
}
