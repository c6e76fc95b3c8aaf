//! What a host resource (`resources/*`) may touch of the daemon: its
//! narrow context. A resource gets a [`Host`], not the [`Daemon`]: the
//! configuration, the store (rows and runtime), the handles of a VM, the
//! state each resource owns (taps, forwarders, DNS listeners, volumes),
//! the locks that serialise one kind of host object (addresses, nftables,
//! device-mapper, templates, `known_hosts`), the VMMs and the images a
//! boot reads. Not the request machinery: VM and release locks, the
//! janitor, boots in progress, image locks, staging, stats.
//!
//! The daemon it wraps is private to this module, so the resource modules
//! reach nothing else through it (the compiler checks the boundary).

use std::sync::{Arc, Mutex, MutexGuard};

use banger_core::net::GuestNet;
use banger_core::{ImageRecord, VmHandles, VmRecord, VmmKind};
use banger_host::cgroup::Cgroups;
use banger_host::process;
use banger_store::Store;
use banger_vmm::Vmm;

use crate::config::Config;
use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

/// The daemon as the host resources see it (see the module's doc).
#[derive(Clone, Copy)]
pub struct Host<'a> {
    d: &'a Daemon,
    pub cfg: &'a Config,
    /// Taps: the spares and the naming lock (`resources::tap`).
    pub taps: &'a crate::resources::tap::Taps,
    /// Published ports' listeners (`resources::ports`).
    pub forwarders: &'a crate::resources::ports::Forwarders,
    /// DNS listeners (`resources::dns`).
    pub dns: &'a crate::dns::Listeners,
    /// Which running VM has each volume (`resources::volumes`).
    pub(crate) volumes: &'a crate::volumes::Volumes,
    /// Serialises guest address allocation.
    pub net_lock: &'a Mutex<()>,
    /// Serialises changes to banger's nftables table; shared with the NAT
    /// threads of boots in progress.
    pub nat_lock: &'a Arc<Mutex<()>>,
    /// Serialises setting up and tearing down dm-snapshots.
    pub dm_lock: &'a Mutex<()>,
    /// Serialises making a work-disk template.
    pub template_lock: &'a Mutex<()>,
    /// Serialises rewriting `ssh/known_hosts`.
    pub known_hosts_lock: &'a Mutex<()>,
}

impl std::fmt::Debug for Host<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("state_dir", &self.cfg.layout.state_dir)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// The narrow context the host resources work in.
    pub(crate) fn host(&self) -> Host<'_> {
        Host {
            d: self,
            cfg: &self.cfg,
            taps: &self.taps,
            forwarders: &self.forwarders,
            dns: &self.dns,
            volumes: &self.volumes,
            net_lock: &self.net_lock,
            nat_lock: &self.nat_lock,
            dm_lock: &self.dm_lock,
            template_lock: &self.template_lock,
            known_hosts_lock: &self.known_hosts_lock,
        }
    }
}

impl<'a> Host<'a> {
    pub fn store(&self) -> MutexGuard<'a, Store> {
        self.d.store()
    }

    /// Writes the VM's runtime (and DNS's view of it).
    pub fn save(&self, vm: &VmRecord) -> Result<()> {
        self.d.save(vm)
    }

    pub fn current_handles(&self, vm: &VmRecord) -> VmHandles {
        self.d.current_handles(vm)
    }

    /// The handles cached for a VM id (nothing read from its dir).
    pub fn cached_handles(&self, vm_id: &str) -> Option<VmHandles> {
        self.d.handles.get(vm_id)
    }

    pub fn set_handles(&self, vm: &VmRecord, h: &VmHandles) -> Result<()> {
        self.d.set_handles(vm, h)
    }

    pub fn guest_net(&self, vm: &VmRecord) -> Result<GuestNet> {
        self.d.guest_net(vm)
    }

    pub fn expect_vmm(&self, vm: &VmRecord) -> process::Expect {
        self.d.expect_vmm(vm)
    }

    pub fn vmm(&self, kind: VmmKind) -> Result<&'a dyn Vmm> {
        self.d.vmm(kind)
    }

    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        self.d.image(name)
    }

    pub fn image_initrd(&self, img: &ImageRecord) -> Result<Arc<Vec<u8>>> {
        self.d.image_initrd(img)
    }

    pub fn agent_archive(&self) -> Result<Arc<Vec<u8>>> {
        self.d.agent_archive()
    }

    pub fn host_disks(&self) -> crate::resources::root_disk::HostDisks {
        self.d.host_disks()
    }

    /// The host's cgroup hierarchy, or why a VM cannot be confined here.
    pub fn cgroups(&self) -> Result<&'a Cgroups> {
        self.d
            .cgroups
            .as_ref()
            .map_err(|e| DaemonError::Unsupported(e.clone()))
    }

    /// What a DNS listener answers from (a weak handle on the daemon: a
    /// listener never keeps it alive).
    pub fn dns_answerer(&self) -> crate::dns::DaemonRef {
        self.d.weak()
    }

    /// Runs `work` with the daemon on a thread of its own, off the
    /// request's path (the tap pool's refill), if the daemon still exists
    /// then.
    pub fn in_background(&self, name: &str, work: fn(Host<'_>)) {
        let me = self.d.weak();
        let _ = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Some(d) = me.upgrade() {
                    let _ = crate::process_nice();
                    work(d.host());
                }
            });
    }
}
