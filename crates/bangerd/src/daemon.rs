//! The daemon's state: the store, the handle cache, the locks, the VMM
//! drivers; and the queries every module shares (find, liveness, info).
//! What requests do lives in `lifecycle` (VMs), `images`, `releases`,
//! `reconcile` and `stats`; what a VM holds lives in `resources`.

use std::io::Read;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use banger_core::api::{Event, SshTarget, VmInfo};
use banger_core::layout::vmfiles;
use banger_core::net::GuestNet;
use banger_core::{VmHandles, VmRecord, VmState, VmmKind};
use banger_host::fsutil::{self, WrapIo};
use banger_host::process::{self, ProcId};
use banger_host::{sshkey, sysinfo};
use banger_store::Store;
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::Qemu;
use banger_vmm::Vmm;

use crate::cancel::Boots;
pub use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::handles::{self, HandleCache};
use crate::janitor::Janitor;
use crate::locks::KeyedLocks;

/// Where a request's progress goes (the client connection).
pub type Events<'a> = &'a mut dyn FnMut(Event);

#[derive(Debug)]
pub struct Daemon {
    pub cfg: Config,
    /// The host-aware default size, taken once at start: it follows the
    /// free disk, and a default that moved from one VM to the next would
    /// move the warm-start cache's key (a miss on every step).
    pub(crate) default_sizing: banger_core::sizing::Sizing,
    store: Mutex<Store>,
    pub handles: HandleCache,
    /// One per VM name: serialises the operations on one VM.
    pub(crate) vm_locks: KeyedLocks,
    /// One per VM id: serialises the releases of one VM.
    pub(crate) release_locks: KeyedLocks,
    /// Whether the janitor thread runs; without it releases are done inline.
    pub(crate) janitor_running: AtomicBool,
    /// Serialises guest address allocation.
    pub(crate) net_lock: Mutex<()>,
    /// Held while the warm-start cache is trimmed (`warm`).
    pub(crate) warm_lock: Mutex<()>,
    /// Serialises changes to banger's nftables table (shared with the NAT
    /// threads of boots in progress).
    pub(crate) nat_lock: Arc<Mutex<()>>,
    /// Releases of ended VMs' resources, done after the reply.
    pub janitor: Janitor,
    /// Per image: held alone by a build, import, commit or removal of it,
    /// shared by the creates that use it (and by an import or commit that
    /// reads its kernel). One member's import never holds up another
    /// image's VMs.
    pub(crate) image_locks: KeyedLocks,
    /// Per snapshot name: a clone's create reads it shared, its removal
    /// (and its making under that name) exclusively.
    pub(crate) snapshot_locks: KeyedLocks,
    /// Members' staged imports in progress (one each).
    pub(crate) staging: crate::access::Staging,
    /// Serialises rewriting `ssh/known_hosts`.
    pub(crate) known_hosts_lock: Mutex<()>,
    /// Serialises making a work-disk template.
    pub(crate) template_lock: Mutex<()>,
    /// The last image initramfs read, keyed by path, size and mtime.
    pub(crate) initrd_cache: Mutex<Option<crate::images::InitrdCacheEntry>>,
    /// Serialises setting up and tearing down dm-snapshots (their base
    /// loop devices are shared by an image's VMs).
    pub(crate) dm_lock: Mutex<()>,
    /// What this host offers root disks, probed on first use.
    host_disks: std::sync::OnceLock<crate::resources::root_disk::HostDisks>,
    /// Volumes: which running VM has each, and their lock.
    pub(crate) volumes: crate::volumes::Volumes,
    /// The guest agent's archive, keyed by path, size and mtime.
    pub(crate) agent_cache: Mutex<Option<crate::agent::AgentCacheEntry>>,
    /// Boots in progress, cancellable by name.
    pub(crate) boots: Boots,
    /// The stats poller's last samples.
    pub(crate) stats: crate::stats::Samples,
    /// Taps: the spares, and the lock of naming a new one.
    pub(crate) taps: crate::resources::tap::Taps,
    /// Published ports' listeners, per running VM.
    pub(crate) forwarders: crate::resources::ports::Forwarders,
    /// DNS listeners on running VMs' gateways, and the host's.
    pub(crate) dns: crate::dns::Listeners,
    /// What DNS answers from (kept as rows are written: `save`,
    /// `insert_row`, `delete_row`).
    pub(crate) dns_view: crate::dns::View,
    /// This daemon, for the threads it starts (set by `lib::open`).
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
    pub(crate) started: Instant,
    qemu: Qemu,
    firecracker: Option<Firecracker>,
    kvm_usable: bool,
    /// The host's cgroup hierarchy (or why there is none), found at open.
    pub(crate) cgroups: std::result::Result<banger_host::cgroup::Cgroups, String>,
    /// The E2B-compatible API's listener, while it is served.
    pub(crate) api: crate::e2b::Api,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `n` random bytes from the kernel's RNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let path = std::path::Path::new("/dev/urandom");
    let mut buf = vec![0u8; n];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_path("read", path)?;
    Ok(buf)
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> Result<String> {
    Ok(random_bytes(n)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub(crate) fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// One phase of a request: a `phase` tracing span for its duration (its
/// close, logged with `BANGER_LOG=debug`, carries the time) and, when done,
/// an `Event::Phase` with the same number for `--timings`.
pub(crate) struct Phase {
    name: &'static str,
    t: Instant,
    _span: tracing::span::EnteredSpan,
}

impl Phase {
    pub(crate) fn start(name: &'static str) -> Phase {
        Phase {
            name,
            t: Instant::now(),
            _span: tracing::debug_span!("phase", name).entered(),
        }
    }

    pub(crate) fn done(self, events: Events) {
        phase(events, self.name, micros(self.t));
    }
}

pub(crate) fn phase(events: Events, name: &str, us: u64) {
    tracing::debug!(phase = name, us, "phase done");
    events(Event::Phase {
        name: name.into(),
        micros: us,
    })
}

/// The kernel command line for every guest: serial console, no reboot on
/// panic, the i8042 probes skipped except the keyboard that carries
/// Ctrl-Alt-Del, and the boot-time work a disposable VM does not need
/// (timer and TSC checks, crypto self-tests, audit, speculative-execution
/// mitigations inside the guest) skipped. The two blacklisted initcalls
/// were the slowest that a VM does without (kprobe trace events, about
/// 190 ms, and a KDF self-test, about 40 ms, under emulation with
/// `initcall_debug`). Measured under emulation: docs/BENCHMARKS.md.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet \
     i8042.noaux i8042.nomux i8042.nopnp \
     mitigations=off tsc=reliable no_timer_check cryptomgr.notests audit=0 \
     initcall_blacklist=init_kprobe_trace,crypto_kdf108_init";

/// [`KERNEL_CMDLINE`] for a guest of `vcpus` CPUs. A one-CPU guest also
/// routes PCI interrupts without evaluating ACPI's AML link objects
/// (`pci=noacpi`, 0.4 s under emulation; ACPI stays on for power-off).
/// Not with more: `pci=noacpi` also keeps the kernel from reading the
/// IO-APICs from ACPI's MADT, and a kernel built without the MP-table
/// parser (Debian's cloud kernel) then boots one CPU of the N it was given
/// ("smpboot: SMP disabled").
pub fn kernel_cmdline(vcpus: u32, vport: bool) -> String {
    let mut c = KERNEL_CMDLINE.to_string();
    if vcpus <= 1 {
        c.push_str(" pci=noacpi");
    }
    // The agent serves its virtio-serial port, not vsock.
    if vport {
        c.push_str(" banger.vport=1");
    }
    c
}

impl Daemon {
    pub fn open(cfg: Config) -> Result<Daemon> {
        let l = &cfg.layout;
        for d in [
            l.state_dir.clone(),
            l.runtime_dir.clone(),
            l.images_dir(),
            l.vms_dir(),
            l.ssh_dir(),
        ] {
            fsutil::create_dir_all(&d)?;
        }
        sshkey::ensure(&l.client_key(), "banger")?;
        let store = Store::open(&l.db())?;
        // Who may read what, now that VMMs run as users of their own.
        crate::perms::prepare(l, cfg.socket_gid)?;
        let kvm = sysinfo::kvm_status().usable;
        let d = Daemon {
            store: Mutex::new(store),
            handles: HandleCache::default(),
            vm_locks: KeyedLocks::default(),
            release_locks: KeyedLocks::default(),
            janitor_running: AtomicBool::new(false),
            net_lock: Mutex::new(()),
            default_sizing: banger_core::sizing::default_sizing(
                &banger_host::sysinfo::host_resources(&cfg.layout.state_dir),
            ),
            warm_lock: Mutex::new(()),
            nat_lock: Arc::new(Mutex::new(())),
            janitor: Janitor::default(),
            image_locks: KeyedLocks::default(),
            snapshot_locks: KeyedLocks::default(),
            staging: Default::default(),
            template_lock: Mutex::new(()),
            known_hosts_lock: Mutex::new(()),
            initrd_cache: Mutex::new(None),
            agent_cache: Mutex::new(None),
            dm_lock: Mutex::new(()),
            host_disks: std::sync::OnceLock::new(),
            volumes: Default::default(),
            boots: Boots::default(),
            stats: Default::default(),
            taps: Default::default(),
            forwarders: Default::default(),
            dns: Default::default(),
            dns_view: Default::default(),
            me: Default::default(),
            started: Instant::now(),
            qemu: Qemu::new(kvm),
            firecracker: cfg.firecracker.clone().map(Firecracker::new),
            kvm_usable: kvm,
            cgroups: banger_host::cgroup::Cgroups::detect(cfg.cgroup_parent.as_deref())
                .map_err(|e| e.to_string()),
            api: Default::default(),
            cfg,
        };
        d.index_images()?;
        for vm in d.store().list_vms()? {
            d.dns_view.put(&vm);
        }
        Ok(d)
    }

    /// Called once the daemon is in its `Arc`.
    pub fn set_self(&self, me: std::sync::Weak<Daemon>) {
        let _ = self.me.set(me);
    }

    /// A weak handle on this daemon (dangling before `set_self`).
    pub fn weak(&self) -> std::sync::Weak<Daemon> {
        self.me.get().cloned().unwrap_or_default()
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Which VMM a new VM gets: Firecracker needs its binary and usable KVM;
    /// QEMU serves everywhere else.
    pub fn select_vmm(&self, forced: Option<VmmKind>) -> Result<(VmmKind, String)> {
        match (forced.or(self.cfg.vmm), &self.firecracker) {
            // Forced: the user vouches for the host (Firecracker itself
            // refuses to start without KVM, and says so).
            (Some(VmmKind::Firecracker), Some(fc)) => Ok((VmmKind::Firecracker, fc.accel().into())),
            (Some(VmmKind::Firecracker), None) => Err(DaemonError::Unsupported(
                "no firecracker binary: put it on PATH or set BANGER_FIRECRACKER, or use --vmm qemu"
                    .into(),
            )),
            (Some(VmmKind::Qemu), _) | (None, None) => Ok((VmmKind::Qemu, self.qemu.accel.clone())),
            (None, Some(fc)) if self.kvm_usable => Ok((VmmKind::Firecracker, fc.accel().into())),
            (None, Some(_)) => Ok((VmmKind::Qemu, self.qemu.accel.clone())),
        }
    }

    pub(crate) fn vmm(&self, kind: VmmKind) -> Result<&dyn Vmm> {
        match (kind, &self.firecracker) {
            (VmmKind::Qemu, _) => Ok(&self.qemu),
            (VmmKind::Firecracker, Some(fc)) => Ok(fc),
            (VmmKind::Firecracker, None) => Err(DaemonError::Unsupported(
                "this VM runs on firecracker, and no firecracker binary is configured \
                 (PATH or BANGER_FIRECRACKER)"
                    .into(),
            )),
        }
    }

    /// The lock of the VM named `name`, held until dropped. Names are
    /// checked first: a lock entry exists only for valid names, and only
    /// while someone holds or waits for it.
    pub(crate) fn lock_vm(&self, name: &str) -> Result<crate::locks::KeyGuard<'_>> {
        banger_core::validate_name(name)?;
        Ok(self.vm_locks.lock(name))
    }

    /// The VM named `name`; a row this banger cannot read is an error that
    /// says how to remove it.
    pub fn find(&self, name: &str) -> Result<VmRecord> {
        banger_core::validate_name(name).map_err(|_| DaemonError::VmNotFound(name.to_string()))?;
        match self.store().vm_by_name(name) {
            Ok(Some(vm)) => Ok(vm),
            Ok(None) => Err(DaemonError::VmNotFound(name.to_string())),
            Err(e @ banger_store::StoreError::Json { .. }) => Err(DaemonError::Broken {
                name: name.to_string(),
                reason: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The handles as currently known: the cache, completed from the
    /// scratch file.
    pub(crate) fn current_handles(&self, vm: &VmRecord) -> VmHandles {
        let mut h = self.handles.get(&vm.id).unwrap_or_default();
        let s = handles::read_file(&self.cfg.layout.vm_dir(&vm.id));
        if h.pid.is_none() {
            h.pid = s.pid;
            h.vmm_start_time = s.vmm_start_time;
        }
        h.tap_device = h.tap_device.or(s.tap_device);
        h
    }

    /// Records handles in the cache and the scratch file.
    pub(crate) fn set_handles(&self, vm: &VmRecord, h: &VmHandles) -> Result<()> {
        self.handles.set(&vm.id, h.clone());
        handles::write_file(&self.cfg.layout.vm_dir(&vm.id), h)?;
        Ok(())
    }

    /// What the VM's VMM (and its vsock backend) is when found again by
    /// its command line: a process of the VM's own user (root's where
    /// the VMM keeps root), started since the VM was created.
    pub(crate) fn expect_vmm(&self, vm: &VmRecord) -> process::Expect {
        process::Expect {
            uid: crate::resources::jail::identity(&self.host(), vm)
                .ok()
                .flatten()
                .map_or(0, |i| i.uid),
            not_before: vm.created_at,
        }
    }

    /// The VM's VMM, if it is still that very process.
    pub(crate) fn vmm_process(&self, vm: &VmRecord) -> Option<ProcId> {
        let h = self.handles.get(&vm.id)?;
        match (h.pid, h.vmm_start_time) {
            (Some(pid), Some(start_time)) => Some(ProcId { pid, start_time }),
            // A scratch file of an older banger: identified by its socket.
            (Some(pid), None) => {
                let sock = vm.runtime.api_sock_path.as_ref()?;
                (process::matches(pid, &process::path_needle(sock))
                    && self.expect_vmm(vm).admits(pid))
                .then(|| ProcId::of(pid))
                .flatten()
            }
            _ => None,
        }
    }

    /// The one liveness check (seed 003): the VM is meant to be up, and its
    /// VMM is still the process that was spawned for it (pid and start
    /// time), running.
    pub fn vm_alive(&self, vm: &VmRecord) -> bool {
        vm.runtime.state().is_up() && self.vmm_process(vm).is_some_and(|p| p.is_running())
    }

    pub(crate) fn guest_net(&self, vm: &VmRecord) -> Result<GuestNet> {
        let ip = vm
            .runtime
            .guest_ip
            .as_deref()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no guest address", vm.name))
            })?;
        Ok(self.cfg.subnet.slot_of(ip)?)
    }

    /// What this host offers root disks (device-mapper, reflinks in the
    /// state dir), probed once.
    pub fn host_disks(&self) -> crate::resources::root_disk::HostDisks {
        *self.host_disks.get_or_init(|| {
            let dir = self.cfg.layout.images_dir();
            let _ = fsutil::create_dir_all(&dir);
            crate::resources::root_disk::HostDisks::probe(&dir)
        })
    }

    pub fn info(&self, vm: &VmRecord) -> VmInfo {
        let dir = self.cfg.layout.vm_dir(&vm.id);
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: vm.runtime.shown_state(),
            image: vm.spec.image.clone(),
            cpus: vm.spec.sizing.cpus,
            memory_mib: vm.spec.sizing.memory_mib,
            disk_mib: vm.spec.sizing.disk_mib,
            vmm: vm.spec.vmm,
            accel: vm.spec.accel.clone(),
            // A pod VM's guest has its pod's address, not its /30's.
            guest_ip: match (&vm.runtime.pod_link, &vm.spec.net.pod_netns) {
                (Some(p), _) => Some(p.address.to_string()),
                (None, Some(_)) => None,
                (None, None) => vm.runtime.guest_ip.clone(),
            },
            vsock_cid: vm.runtime.vsock_cid,
            root_disk: Some(vm.spec.root_disk()),
            created_at: vm.created_at,
            last_error: vm.runtime.last_error.clone(),
            ssh: SshTarget {
                user: "root".into(),
                key: self.cfg.layout.client_key(),
                known_hosts: dir.join(vmfiles::KNOWN_HOSTS),
                host_key_alias: vm.name.clone(),
            },
            vm_dir: dir,
            auto_stop: vm.spec.auto_stop,
            net: vm.spec.net.clone(),
            metadata: vm.spec.metadata.clone(),
            started_at: vm.runtime.started_at.filter(|_| vm.runtime.state().is_up()),
        }
    }

    /// Every VM; rows this banger cannot read are listed in state error
    /// with the reason.
    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let (vms, broken) = {
            let store = self.store();
            (store.list_vms()?, store.broken_vms()?)
        };
        let mut out: Vec<VmInfo> = vms.iter().map(|v| self.info(v)).collect();
        for b in broken {
            let dir = self.cfg.layout.vm_dir(&b.id);
            out.push(VmInfo {
                id: b.id.clone(),
                name: b.name.clone(),
                state: VmState::Error,
                image: String::new(),
                cpus: 0,
                memory_mib: 0,
                disk_mib: 0,
                vmm: VmmKind::Qemu,
                accel: String::new(),
                guest_ip: None,
                vsock_cid: None,
                root_disk: None,
                metadata: Default::default(),
                started_at: None,
                created_at: b.created_at,
                last_error: Some(
                    DaemonError::Broken {
                        name: b.name.clone(),
                        reason: b.reason,
                    }
                    .to_string(),
                ),
                ssh: SshTarget {
                    user: "root".into(),
                    key: self.cfg.layout.client_key(),
                    known_hosts: dir.join(vmfiles::KNOWN_HOSTS),
                    host_key_alias: b.name,
                },
                vm_dir: dir,
                auto_stop: Default::default(),
                net: Default::default(),
            });
        }
        Ok(out)
    }

    pub(crate) fn save(&self, vm: &VmRecord) -> Result<()> {
        self.store().update_runtime(&vm.id, &vm.runtime)?;
        self.dns_view.update(vm);
        Ok(())
    }

    /// A new VM's row (and DNS's view of it).
    pub(crate) fn insert_row(&self, vm: &VmRecord) -> Result<()> {
        self.store().insert_vm(vm).map_err(|e| match e {
            banger_store::StoreError::NameTaken(n) => DaemonError::VmExists(n),
            e => e.into(),
        })?;
        self.dns_view.put(vm);
        Ok(())
    }

    /// A VM's row gone (and DNS's view of it).
    pub(crate) fn delete_row(&self, id: &str) -> Result<()> {
        self.store().delete_vm(id)?;
        self.dns_view.remove(id);
        Ok(())
    }
}

pub fn human_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// A daemon on a temporary state dir with a finished (fake) default image,
/// as `image build` leaves it; for unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use banger_core::sizing::Sizing;
    use banger_core::{Layout, VmRecord, VmRuntime, VmSpec, VmmKind};
    use banger_guest::image::DEFAULT_IMAGE;

    use super::{Config, Daemon};

    pub fn daemon(dir: &std::path::Path) -> Daemon {
        let layout = Layout::new(dir.join("state"), dir.join("run"));
        let img = layout.image_dir(DEFAULT_IMAGE);
        std::fs::create_dir_all(&img).unwrap();
        for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
            std::fs::write(img.join(f), "x").unwrap();
        }
        std::fs::write(
            img.join("manifest.json"),
            r#"{"name":"bookworm","kernel_version":"6.1","rootfs_bytes":1,"created_at":0}"#,
        )
        .unwrap();
        Daemon::open(Config::new(layout)).unwrap()
    }

    pub fn vm_with_tap(id: &str, name: &str, tap: Option<&str>) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            spec: VmSpec {
                sizing: Sizing {
                    cpus: 1,
                    memory_mib: 512,
                    disk_mib: 1024,
                },
                image: DEFAULT_IMAGE.into(),
                vmm: VmmKind::Qemu,
                accel: "tcg".into(),
                auto_stop: Default::default(),
                net: Default::default(),
                volumes: Default::default(),
                mounts: Default::default(),
                root_mib: None,
                root_disk: None,
                from_snapshot: None,
                metadata: Default::default(),
                env: Vec::new(),
            },
            runtime: VmRuntime {
                tap_device: tap.map(str::to_string),
                ..Default::default()
            },
            created_at: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{daemon, vm_with_tap};
    use super::*;

    #[test]
    fn private_dirs_are_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        // VMMs pass through vms/ to their own dir (never list it); ssh/
        // and the database are root's alone.
        for (p, want) in [
            (daemon.cfg.layout.vms_dir(), 0o711),
            (daemon.cfg.layout.ssh_dir(), 0o700),
            (daemon.cfg.layout.db(), 0o600),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{}", p.display());
        }
    }

    /// One row the daemon cannot read (a newer banger's, a damaged one) is
    /// listed as broken with the reason and can be deleted; the other VMs
    /// work as before.
    #[test]
    fn an_undecodable_row_is_listed_broken_and_deletable() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        daemon
            .store()
            .insert_vm(&vm_with_tap("good1", "fine", None))
            .unwrap();
        let mut bad = vm_with_tap("bad1", "mangled", None);
        bad.spec.image = "x".into();
        daemon.store().insert_vm(&bad).unwrap();
        drop(daemon);
        // Damage the row behind the daemon's back.
        let db = rusqlite_free_update(d.path());
        assert!(db, "row damaged");
        let daemon = super::testutil::daemon(d.path());
        daemon.reconcile().unwrap();
        let list = daemon.list().unwrap();
        assert_eq!(list.len(), 2);
        let broken = list.iter().find(|v| v.name == "mangled").unwrap();
        assert_eq!(broken.state, VmState::Error);
        let why = broken.last_error.as_deref().unwrap();
        assert!(
            why.contains("cannot read") && why.contains("banger vm delete mangled"),
            "{why}"
        );
        let e = daemon.find("mangled").unwrap_err().to_string();
        assert!(e.contains("banger vm delete mangled"), "{e}");
        assert!(daemon.find("fine").is_ok());
        std::fs::create_dir_all(daemon.cfg.layout.vm_dir("bad1")).unwrap();
        daemon.delete("mangled").unwrap();
        assert!(!daemon.cfg.layout.vm_dir("bad1").exists());
        let names: Vec<String> = daemon.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["fine"]);
    }

    /// Rewrites the spec of row `bad1` into JSON no banger version wrote,
    /// through the sqlite3 file format's own tool: the daemon's store is
    /// closed meanwhile.
    fn rusqlite_free_update(dir: &std::path::Path) -> bool {
        let db = dir.join("state").join("banger.db");
        let store = banger_store::Store::open(&db).unwrap();
        store
            .raw_execute("UPDATE vms SET spec_json = '{\"sizing\":7}' WHERE id = 'bad1'")
            .unwrap()
            == 1
    }
}
