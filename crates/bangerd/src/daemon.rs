//! The daemon's state and the operations requests map onto.

use std::collections::HashMap;
use std::io::Read;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use banger_core::api::{Event, ImageInfo, SshTarget, VmInfo};
use banger_core::layout::vmfiles;
use banger_core::net::{Subnet, GUEST_PREFIX};
use banger_core::{ImageRecord, Layout, Release, VmHandles, VmRecord, VmState, VmmKind};
use banger_guest::image::{self, Recipe, DEFAULT_IMAGE};
use banger_host::fsutil::{self, WrapIo};
use banger_host::{nat, process, sshkey, sysinfo, tap};
use banger_store::Store;
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::Qemu;
use banger_vmm::Vmm;
use tracing::{info, warn};

use crate::error::{DaemonError, Result};
use crate::handles::{self, HandleCache};
use crate::janitor::Janitor;

/// Where a request's progress goes (the client connection).
pub type Events<'a> = &'a mut dyn FnMut(Event);

#[derive(Debug, Clone)]
pub struct Config {
    pub layout: Layout,
    pub subnet: Subnet,
    /// How long a guest may take to say it is ready.
    pub boot_timeout: Duration,
    /// How long a clean shutdown may take before the VMM is killed.
    pub stop_timeout: Duration,
    /// Force a VMM instead of choosing by host capability.
    pub vmm: Option<VmmKind>,
    /// A pause before each release the janitor does: a test hook
    /// (`BANGER_TEST_RELEASE_DELAY_MS`) that makes "the daemon died with a
    /// release pending" reproducible. Zero otherwise.
    pub release_delay: Duration,
    /// The firecracker binary (`BANGER_FIRECRACKER`, else `firecracker`
    /// on PATH); none means QEMU only.
    pub firecracker: Option<std::path::PathBuf>,
}

impl Config {
    pub fn new(layout: Layout) -> Self {
        Config {
            layout,
            subnet: Subnet::default(),
            boot_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(30),
            vmm: None,
            release_delay: Duration::ZERO,
            firecracker: None,
        }
    }
}

#[derive(Debug)]
pub struct Daemon {
    pub cfg: Config,
    store: Mutex<Store>,
    pub handles: HandleCache,
    vm_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    release_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Whether the janitor thread runs; without it releases are done inline.
    janitor_running: std::sync::atomic::AtomicBool,
    /// Serialises guest address allocation.
    net_lock: Mutex<()>,
    /// Serialises picking a free tap name with creating it.
    tap_lock: Mutex<()>,
    /// Serialises changes to banger's nftables table.
    nat_lock: Mutex<()>,
    /// Releases of gone VMs' taps and NAT rules, done after the reply.
    pub janitor: Janitor,
    image_lock: Mutex<()>,
    /// Serialises making a work-disk template.
    template_lock: Mutex<()>,
    /// The last image initramfs read, keyed by path, size and mtime.
    initrd_cache: Mutex<Option<InitrdCacheEntry>>,
    qemu: Qemu,
    firecracker: Option<Firecracker>,
    kvm_usable: bool,
}

type InitrdCacheEntry = (
    (std::path::PathBuf, u64, Option<std::time::SystemTime>),
    Arc<Vec<u8>>,
);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `n` random bytes as hex, from the kernel's RNG.
pub fn random_hex(n: usize) -> Result<String> {
    let path = std::path::Path::new("/dev/urandom");
    let mut buf = vec![0u8; n];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_path("read", path)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// Reports a finished phase to the client (`--timings`) and to the log
/// (`BANGER_LOG=debug`).
/// One phase of a request: a `phase` tracing span for its duration (its
/// close, logged with `BANGER_LOG=debug`, carries the time) and, when done,
/// an `Event::Phase` with the same number for `--timings`.
struct Phase {
    name: &'static str,
    t: Instant,
    _span: tracing::span::EnteredSpan,
}

impl Phase {
    fn start(name: &'static str) -> Phase {
        Phase {
            name,
            t: Instant::now(),
            _span: tracing::debug_span!("phase", name).entered(),
        }
    }

    fn done(self, events: Events) {
        phase(events, self.name, self.t);
    }
}

fn phase(events: Events, name: &str, t: Instant) {
    let us = micros(t);
    tracing::debug!(phase = name, us, "phase done");
    events(Event::Phase {
        name: name.into(),
        micros: us,
    })
}

/// The kernel command line for every guest: serial console, no reboot on
/// panic, the i8042 probes skipped except the keyboard that carries
/// Ctrl-Alt-Del, PCI interrupts routed without evaluating ACPI's AML link
/// objects (0.4 s under emulation; ACPI stays on for power-off), and the
/// boot-time work a disposable VM does not need (timer and TSC checks, crypto
/// self-tests, audit, speculative-execution mitigations inside the guest)
/// skipped. The two blacklisted initcalls were the slowest that a VM does
/// without (kprobe trace events, about 190 ms, and a KDF self-test, about
/// 40 ms, under emulation with `initcall_debug`). Measured under emulation:
/// docs/BENCHMARKS.md.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet \
     i8042.noaux i8042.nomux i8042.nopnp pci=noacpi \
     mitigations=off tsc=reliable no_timer_check cryptomgr.notests audit=0 \
     initcall_blacklist=init_kprobe_trace,crypto_kdf108_init";

/// How long a start or `settle` waits for releases in progress.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

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
        // VM dirs hold guests' private host keys (also inside each per-VM
        // initrd) and the client key lives in ssh/: root only.
        for d in [l.vms_dir(), l.ssh_dir(), l.runtime_dir.clone()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                .with_path("chmod", &d)?;
        }
        sshkey::ensure(&l.client_key(), "banger")?;
        let store = Store::open(&l.db())?;
        let kvm = sysinfo::kvm_status().usable;
        let d = Daemon {
            store: Mutex::new(store),
            handles: HandleCache::default(),
            vm_locks: Mutex::new(HashMap::new()),
            release_locks: Mutex::new(HashMap::new()),
            janitor_running: std::sync::atomic::AtomicBool::new(false),
            net_lock: Mutex::new(()),
            tap_lock: Mutex::new(()),
            nat_lock: Mutex::new(()),
            janitor: Janitor::default(),
            image_lock: Mutex::new(()),
            template_lock: Mutex::new(()),
            initrd_cache: Mutex::new(None),
            qemu: Qemu::new(kvm),
            firecracker: cfg.firecracker.clone().map(Firecracker::new),
            kvm_usable: kvm,
            cfg,
        };
        d.index_images()?;
        Ok(d)
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn vm_lock(&self, name: &str) -> Arc<Mutex<()>> {
        lock(&self.vm_locks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Serialises the releases of one VM (janitor, `settle`, a `start`
    /// waiting for its own): each takes this, then re-reads the record.
    fn release_lock(&self, vm_id: &str) -> Arc<Mutex<()>> {
        lock(&self.release_locks)
            .entry(vm_id.to_string())
            .or_default()
            .clone()
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

    fn vmm(&self, kind: VmmKind) -> Result<&dyn Vmm> {
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

    // ---- images -------------------------------------------------------

    /// Makes the `images` table match the finished image dirs on disk.
    fn index_images(&self) -> Result<()> {
        let dir = self.cfg.layout.images_dir();
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).with_path("read dir", &dir)? {
            let e = e.with_path("read dir", &dir)?;
            if e.path().extension().is_some() {
                continue; // an unfinished `<name>.building`
            }
            match image::load(&e.path()) {
                Ok(Some(rec)) => found.push(rec),
                Ok(None) => {}
                Err(err) => warn!(%err, "skipping image dir"),
            }
        }
        let store = self.store();
        for rec in &found {
            store.upsert_image(rec)?;
        }
        for rec in store.list_images()? {
            if !found.iter().any(|f| f.name == rec.name) {
                store.delete_image(&rec.name)?;
            }
        }
        Ok(())
    }

    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        self.store().image(name)?.ok_or_else(|| {
            DaemonError::ImageMissing(
                name.to_string(),
                if name == DEFAULT_IMAGE {
                    "run `banger image build`".to_string()
                } else {
                    format!("the image banger can build is {DEFAULT_IMAGE} (`banger image build`); `banger image ls` lists the built ones")
                },
            )
        })
    }

    /// The image's initramfs, read once per image file and kept in memory
    /// (every start appends the VM's config archive to it).
    fn image_initrd(&self, img: &ImageRecord) -> Result<Arc<Vec<u8>>> {
        let meta = std::fs::metadata(&img.initrd).with_path("stat", &img.initrd)?;
        let key = (img.initrd.clone(), meta.len(), meta.modified().ok());
        let mut cache = lock(&self.initrd_cache);
        if let Some((k, bytes)) = cache.as_ref() {
            if *k == key {
                return Ok(bytes.clone());
            }
        }
        let bytes = Arc::new(std::fs::read(&img.initrd).with_path("read", &img.initrd)?);
        *cache = Some((key, bytes.clone()));
        Ok(bytes)
    }

    pub fn build_image(&self, name: &str, force: bool, events: Events) -> Result<ImageInfo> {
        let recipe = Recipe::default_for(name)
            .ok_or_else(|| DaemonError::Image(image::ImageError::Unknown(name.to_string())))?;
        let _g = lock(&self.image_lock);
        // Bind first: the store guard must be gone before the store is
        // locked again below.
        let existing = self.store().image(name)?;
        if let Some(rec) = existing {
            if !force {
                events(Event::Progress {
                    message: format!("image {name} is already built (use --force to rebuild)"),
                });
                return Ok(image_info(&rec));
            }
            let users = self.store().vms_using_image(name)?;
            if !users.is_empty() {
                return Err(DaemonError::ImageInUse {
                    name: name.to_string(),
                    users: users.join(", "),
                });
            }
        }
        let dir = self.cfg.layout.image_dir(name);
        let rec = image::build(name, &dir, &recipe, &mut |m| {
            info!(image = name, "{m}");
            events(Event::Progress {
                message: m.to_string(),
            })
        })?;
        self.store().upsert_image(&rec)?;
        Ok(image_info(&rec))
    }

    pub fn delete_image(&self, name: &str) -> Result<()> {
        let _g = lock(&self.image_lock);
        let rec = self.image(name)?;
        let users = self.store().vms_using_image(name)?;
        if !users.is_empty() {
            return Err(DaemonError::ImageInUse {
                name: name.to_string(),
                users: users.join(", "),
            });
        }
        fsutil::remove_dir_all_if_exists(&rec.dir)?;
        self.store().delete_image(name)?;
        Ok(())
    }

    // ---- VM queries ---------------------------------------------------

    pub fn find(&self, name: &str) -> Result<VmRecord> {
        self.store()
            .vm_by_name(name)?
            .ok_or_else(|| DaemonError::VmNotFound(name.to_string()))
    }

    /// The one liveness check (seed 003): the VM is meant to be up, and its
    /// VMM process is running with the VM's API socket in its command line.
    pub fn vm_alive(&self, vm: &VmRecord) -> bool {
        if !matches!(
            vm.runtime.state(),
            VmState::Running | VmState::Starting | VmState::Stopping
        ) {
            return false;
        }
        let (Some(pid), Some(sock)) = (
            self.handles.get(&vm.id).and_then(|h| h.pid),
            vm.runtime.api_sock_path.as_ref(),
        ) else {
            return false;
        };
        process::matches(pid, &process::path_needle(sock))
    }

    pub fn info(&self, vm: &VmRecord) -> VmInfo {
        let dir = self.cfg.layout.vm_dir(&vm.id);
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: vm.runtime.state(),
            image: vm.spec.image.clone(),
            cpus: vm.spec.sizing.cpus,
            memory_mib: vm.spec.sizing.memory_mib,
            disk_mib: vm.spec.sizing.disk_mib,
            vmm: vm.spec.vmm,
            accel: vm.spec.accel.clone(),
            guest_ip: vm.runtime.guest_ip.clone(),
            created_at: vm.created_at,
            last_error: vm.runtime.last_error.clone(),
            ssh: SshTarget {
                user: "root".into(),
                key: self.cfg.layout.client_key(),
                known_hosts: dir.join(vmfiles::KNOWN_HOSTS),
                host_key_alias: vm.name.clone(),
            },
            vm_dir: dir,
        }
    }

    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let vms = self.store().list_vms()?;
        Ok(vms.iter().map(|v| self.info(v)).collect())
    }

    fn save(&self, vm: &VmRecord) -> Result<()> {
        self.store().update_runtime(&vm.id, &vm.runtime)?;
        Ok(())
    }

    // ---- create -------------------------------------------------------

    pub fn create(&self, req: &banger_core::api::CreateVm, events: Events) -> Result<VmInfo> {
        let t0 = Phase::start("create");
        let name = match &req.name {
            Some(n) => {
                banger_core::validate_name(n)?;
                n.clone()
            }
            None => self.generate_name()?,
        };
        let image_name = req
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let host = sysinfo::host_resources(&self.cfg.layout.state_dir);
        let mut sizing = banger_core::sizing::resolve(&req.size, &host)?;
        let (vmm, accel) = self.select_vmm(req.vmm)?;
        // Firecracker's limit, refused before anything exists.
        let fc_max = banger_vmm::firecracker::MAX_VCPUS;
        if vmm == VmmKind::Firecracker && sizing.cpus > fc_max {
            if req.size.cpus.is_some() {
                return Err(DaemonError::Invalid(format!(
                    "--cpus {}: Firecracker takes at most {fc_max} vCPUs",
                    sizing.cpus
                )));
            }
            sizing.cpus = fc_max;
        }
        if self.store().vm_by_name(&name)?.is_some() {
            return Err(DaemonError::VmExists(name));
        }
        if image_name == DEFAULT_IMAGE && self.store().image(&image_name)?.is_none() {
            events(Event::Progress {
                message: format!("image {image_name} is not built yet: building it now"),
            });
            self.build_image(&image_name, false, events)?;
        }
        // The image may not be deleted or rebuilt between this lookup and
        // the row that makes it "in use".
        let image_guard = lock(&self.image_lock);
        let img = self.image(&image_name)?;
        if let Some(recipe) = Recipe::default_for(&image_name) {
            if !image::is_current(&img.dir, &recipe) {
                events(Event::Progress {
                    message: format!(
                        "image {image_name} was built by another version of banger (its guest \
                         recipe differs): `banger image build --force` rebuilds it"
                    ),
                });
            }
        }

        let vl = self.vm_lock(&name);
        let _g = lock::<()>(&vl);
        let id = random_hex(16)?;
        let dir = self.cfg.layout.vm_dir(&id);
        let vm = {
            let _n = lock::<()>(&self.net_lock);
            // Addresses of VMs and of releases still pending (their tap
            // still carries the /30).
            let used: Vec<Ipv4Addr> = {
                let store = self.store();
                let vms = store.list_vms()?;
                let releases = store.list_releases()?;
                vms.iter()
                    .filter_map(|v| v.runtime.guest_ip.as_deref())
                    .chain(releases.iter().filter_map(|r| r.guest_ip.as_deref()))
                    .filter_map(|ip| ip.parse().ok())
                    .collect()
            };
            let net = self.cfg.subnet.allocate(&used)?;
            let vm = VmRecord {
                id: id.clone(),
                name: name.clone(),
                spec: banger_core::VmSpec {
                    sizing,
                    image: image_name.clone(),
                    vmm,
                    accel: accel.clone(),
                },
                runtime: banger_core::VmRuntime {
                    state: Some(VmState::Created),
                    guest_ip: Some(net.guest_ip.to_string()),
                    api_sock_path: Some(
                        self.cfg.layout.vm_runtime_dir(&id).join(vmfiles::API_SOCK),
                    ),
                    log_path: Some(dir.join(vmfiles::CONSOLE_LOG)),
                    vm_dir: Some(dir.clone()),
                    system_overlay: Some(dir.join(root_disk_name(vmm))),
                    work_disk_path: Some(dir.join(vmfiles::WORK_DISK)),
                    ..Default::default()
                },
                created_at: banger_core::unix_now(),
            };
            self.store().insert_vm(&vm).map_err(|e| match e {
                banger_store::StoreError::NameTaken(n) => DaemonError::VmExists(n),
                e => e.into(),
            })?;
            vm
        };
        drop(image_guard);
        events(Event::Spec {
            line: format!(
                "{name}: {} vCPU, {} MiB, {} disk, image {image_name}, vmm {vmm} ({accel})",
                sizing.cpus,
                sizing.memory_mib,
                human_mib(sizing.disk_mib)
            ),
        });
        if let Err(e) = self.prepare_disks(&vm, &img) {
            let _ = fsutil::remove_dir_all_if_exists(&dir);
            let _ = self.store().delete_vm(&id);
            return Err(e);
        }
        t0.done(events);
        if req.start {
            let vm = self.start_locked(vm, events)?;
            return Ok(self.info(&vm));
        }
        Ok(self.info(&vm))
    }

    fn generate_name(&self) -> Result<String> {
        for _ in 0..32 {
            let r = u32::from_str_radix(&random_hex(4)?, 16).unwrap_or(0);
            let n = banger_core::name::generated_name(r);
            if self.store().vm_by_name(&n)?.is_none() {
                return Ok(n);
            }
        }
        Err(DaemonError::Invalid(
            "could not find a free generated name: pass --name".into(),
        ))
    }

    /// VMDir with a copy-on-write root over the image (a qcow2 overlay), a
    /// fresh ext4 work disk, the guest's host key and the pinned known_hosts.
    /// All in-process and each well under a millisecond (the work disk is a
    /// sparse copy of a cached template), so they run one after the other.
    fn prepare_disks(&self, vm: &VmRecord, img: &ImageRecord) -> Result<()> {
        let dir = self.cfg.layout.vm_dir(&vm.id);
        let template = self.work_template(vm.spec.sizing.disk_mib)?;
        fsutil::create_dir_all(&dir)?;
        match vm.spec.vmm {
            VmmKind::Qemu => create_root_overlay(&dir, img)?,
            VmmKind::Firecracker => {
                // Raw: a reflink where the filesystem has them, else a
                // sparse copy of the image (the copy-on-write strategies
                // of a later issue make this instant everywhere).
                let reflinked = fsutil::clone_or_copy(&img.rootfs, &dir.join(vmfiles::ROOT_RAW))?;
                tracing::debug!(vm = %vm.name, reflinked, "raw root disk");
            }
        }
        fsutil::copy_sparse(&template, &dir.join(vmfiles::WORK_DISK))?;
        create_host_key(&dir, &vm.name)
    }

    /// The empty ext4 of `mib` MiB new work disks are copied from, made on
    /// first use (into a temporary name, then renamed, so that a crash never
    /// leaves half a template).
    fn work_template(&self, mib: u64) -> Result<std::path::PathBuf> {
        let path = self.cfg.layout.work_template(mib);
        let size = banger_core::sizing::mib_to_bytes(mib);
        // Only a template of the right size counts (a crash can leave a
        // short one behind despite the rename; it is made again).
        let usable = |p: &std::path::Path| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size)
        };
        if usable(&path) {
            return Ok(path);
        }
        let _t = lock::<()>(&self.template_lock);
        if usable(&path) {
            return Ok(path);
        }
        fsutil::create_dir_all(&self.cfg.layout.cache_dir())?;
        let tmp = path.with_extension("tmp");
        fsutil::remove_file_if_exists(&tmp)?;
        if let Err(e) = make_work_fs(&tmp, mib) {
            let _ = fsutil::remove_file_if_exists(&tmp);
            return Err(e);
        }
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_path("sync", &tmp)?;
        std::fs::rename(&tmp, &path).with_path("rename into", &path)?;
        info!(path = %path.display(), mib, "made a work-disk template");
        Ok(path)
    }

    // ---- start --------------------------------------------------------

    pub fn start(&self, name: &str, events: Events) -> Result<VmInfo> {
        let vl = self.vm_lock(name);
        let _g = lock::<()>(&vl);
        let vm = self.find(name)?;
        let vm = self.start_locked(vm, events)?;
        Ok(self.info(&vm))
    }

    fn start_locked(&self, mut vm: VmRecord, events: Events) -> Result<VmRecord> {
        vm.runtime.state().check(&vm.name, "start")?;
        let t0 = Instant::now();
        self.settle_vm(&vm.id)?;
        vm.runtime.state = Some(VmState::Starting);
        vm.runtime.last_error = None;
        self.save(&vm)?;
        let booted = self.boot(&mut vm, events).and_then(|()| {
            vm.runtime.state = Some(VmState::Running);
            self.save(&vm)
        });
        match booted {
            Ok(()) => {
                info!(vm = %vm.name, ms = t0.elapsed().as_millis() as u64, "running");
                Ok(vm)
            }
            Err(e) => {
                warn!(vm = %vm.name, err = %e, "start failed; rolling back");
                self.teardown(&mut vm, true);
                vm.runtime.state = Some(VmState::Error);
                vm.runtime.last_error = Some(e.to_string());
                let _ = self.save(&vm);
                Err(e)
            }
        }
    }

    fn boot(&self, vm: &mut VmRecord, events: Events) -> Result<()> {
        let img = self.image(&vm.spec.image)?;
        self.vmm(vm.spec.vmm)?;
        let dir = self.cfg.layout.vm_dir(&vm.id);
        let guest_ip: Ipv4Addr = vm
            .runtime
            .guest_ip
            .as_deref()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no guest address", vm.name))
            })?;
        let net = self.cfg.subnet.slot_of(guest_ip)?;

        // Network: a tap from the pool, then NAT when there is an uplink.
        let t = Phase::start("network");
        let tap_name = {
            let _n = lock::<()>(&self.tap_lock);
            let name = tap::free_name(&[])?;
            tap::create(&name, net.host_ip, GUEST_PREFIX)?;
            name
        };
        let h = VmHandles {
            tap_device: Some(tap_name.clone()),
            ..Default::default()
        };
        vm.runtime.tap_device = Some(tap_name.clone());
        self.handles.set(&vm.id, h.clone());
        handles::write_file(&dir, &h)?;
        self.save(vm)?;
        t.done(events);

        // NAT is not needed until the guest is up: it is installed on a
        // thread of its own once the VMM is spawned, while the guest boots
        // (so that its `nft` runs do not compete with config and spawn for
        // the CPU), and joined before the VM counts as started (its failure
        // fails the start).
        let uplink = nat::default_uplink();
        if uplink.is_none() {
            events(Event::Progress {
                message: "no default route on the host: the guest gets no outbound network".into(),
            });
        }
        let spec = uplink.map(|uplink| nat::NatSpec {
            vm_id: vm.id.clone(),
            tap: tap_name.clone(),
            guest_ip,
            uplink,
        });
        let (pid, console, boot_id) = self.launch(vm, &img, net, tap_name, h, events)?;
        std::thread::scope(|s| {
            let job = spec.map(|spec| {
                s.spawn(move || {
                    let t = Instant::now();
                    let _n = lock::<()>(&self.nat_lock);
                    nat::up(&spec).map(|()| micros(t))
                })
            });
            let t = Phase::start("boot");
            let booted = self.wait_ready(vm, pid, &console, &boot_id);
            if booted.is_ok() {
                t.done(events);
            }
            let nat = match job {
                Some(j) => j.join().unwrap_or(Err(nat::NatError::Thread)),
                None => Ok(0),
            };
            booted?;
            let us = nat?;
            if us > 0 {
                tracing::debug!(phase = "nat-async", us, "phase done");
                events(Event::Phase {
                    name: "nat-async".into(),
                    micros: us,
                });
            }
            Ok(())
        })
    }

    /// The part of start after the tap: per-VM initrd and the VMM. Returns
    /// the VMM's pid, the console log and this boot's id for `wait_ready`.
    fn launch(
        &self,
        vm: &mut VmRecord,
        img: &ImageRecord,
        net: banger_core::net::GuestNet,
        tap_name: String,
        mut h: VmHandles,
        events: Events,
    ) -> Result<(i32, std::path::PathBuf, String)> {
        let vmm = self.vmm(vm.spec.vmm)?;
        let dir = self.cfg.layout.vm_dir(&vm.id);
        let guest_ip = net.guest_ip;

        // Per-VM initrd: the image's initramfs plus this VM's config.
        let t = Phase::start("config");
        let boot_id = random_hex(8)?;
        let client_pub = sshkey::public_key(&self.cfg.layout.client_key())?;
        let host_key_path = dir.join(vmfiles::HOST_KEY);
        let cfg = banger_guest::config::GuestConfig {
            hostname: vm.name.clone(),
            guest_ip,
            gateway: net.host_ip,
            prefix: GUEST_PREFIX,
            mac: net.mac(),
            nameservers: banger_guest::config::guest_nameservers(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
            authorized_keys: format!("{client_pub}\n"),
            host_key: fsutil::read_to_string(&host_key_path)?,
            host_key_pub: sshkey::public_key(&host_key_path)?,
            boot_id: boot_id.clone(),
        };
        let base = self.image_initrd(img)?;
        let initrd_path = dir.join(vmfiles::INITRD);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&initrd_path).with_path("create", &initrd_path)?;
            f.write_all(&base)
                .and_then(|()| f.write_all(&cfg.archive()))
                .with_path("write", &initrd_path)?;
        }
        let rt_dir = self.cfg.layout.vm_runtime_dir(&vm.id);
        fsutil::create_dir_all(&rt_dir)?;
        let api_sock = rt_dir.join(vmfiles::API_SOCK);
        fsutil::remove_file_if_exists(&api_sock)?;
        let console = dir.join(vmfiles::CONSOLE_LOG);
        fsutil::write(&console, "")?;
        vm.runtime.api_sock_path = Some(api_sock.clone());
        vm.runtime.log_path = Some(console.clone());
        t.done(events);

        let t = Phase::start("spawn");
        let vcfg = banger_vmm::VmConfig {
            name: vm.name.clone(),
            vcpus: vm.spec.sizing.cpus,
            memory_mib: vm.spec.sizing.memory_mib,
            kernel: img.kernel.clone(),
            initrd: initrd_path,
            cmdline: KERNEL_CMDLINE.to_string(),
            disks: vec![
                banger_vmm::Disk {
                    id: "root".into(),
                    path: dir.join(root_disk_name(vm.spec.vmm)),
                    format: match vm.spec.vmm {
                        VmmKind::Qemu => "qcow2".into(),
                        VmmKind::Firecracker => "raw".into(),
                    },
                    read_only: false,
                },
                banger_vmm::Disk {
                    id: "work".into(),
                    path: dir.join(vmfiles::WORK_DISK),
                    format: "raw".into(),
                    read_only: false,
                },
            ],
            nics: vec![banger_vmm::Nic {
                tap: tap_name,
                mac: net.mac(),
            }],
            console_log: console.clone(),
            vmm_log: dir.join(vmfiles::VMM_LOG),
            api_sock,
        };
        let proc_ = vmm.spawn(&vcfg)?;
        // Watched (and so reaped) before anything else can fail.
        if let Some(child) = proc_.child {
            crate::reaper::watch(child);
        }
        h.pid = Some(proc_.pid);
        self.handles.set(&vm.id, h.clone());
        handles::write_file(&dir, &h)?;
        t.done(events);
        events(Event::Progress {
            message: format!("booting {} ({} {})", vm.name, vm.spec.vmm, vm.spec.accel),
        });

        Ok((proc_.pid, console, boot_id))
    }

    /// Waits for the guest's ready line (carrying this boot's id) on the
    /// console log, failing early if the VMM exits.
    fn wait_ready(
        &self,
        vm: &VmRecord,
        pid: i32,
        console: &std::path::Path,
        boot_id: &str,
    ) -> Result<()> {
        let marker = format!("{}{boot_id}", banger_guest::READY_MARKER);
        let fail_marker = format!("{}{boot_id}", banger_guest::FAILED_MARKER);
        let deadline = Instant::now() + self.cfg.boot_timeout;
        // Woken by inotify when the VMM writes the console (no polling
        // sleep between the ready line and its detection); the timeout
        // only bounds how late a VMM's death or the deadline is noticed.
        let watch = ConsoleWatch::new(console);
        let mut file = std::fs::File::open(console).with_path("open", console)?;
        let mut buf = Vec::new();
        loop {
            let mut chunk = Vec::new();
            // The file is only appended to: reading on from where the last
            // read stopped yields exactly the new bytes.
            let new = file.read_to_end(&mut chunk).unwrap_or(0);
            buf.extend_from_slice(&chunk);
            // Only the new bytes (and a marker's length before them) can
            // hold a line that was not there at the last look.
            let from = buf
                .len()
                .saturating_sub(new + fail_marker.len().max(marker.len()));
            let window = String::from_utf8_lossy(&buf[from..]);
            if window.contains(&marker) {
                return Ok(());
            }
            if window.contains(&fail_marker) {
                return Err(DaemonError::Boot {
                    vm: vm.name.clone(),
                    reason: format!(
                        "sshd never listened in the guest. Console:\n{}",
                        fsutil::tail_lines(console, 10)
                    ),
                });
            }
            if !process::is_running(pid) {
                let dir = self.cfg.layout.vm_dir(&vm.id);
                return Err(DaemonError::Boot {
                    vm: vm.name.clone(),
                    reason: format!(
                        "the VMM exited. Its log:\n{}\nConsole:\n{}",
                        fsutil::tail_lines(&dir.join(vmfiles::VMM_LOG), 10),
                        fsutil::tail_lines(console, 10)
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::Boot {
                    vm: vm.name.clone(),
                    reason: format!(
                        "no ready signal within {}s. Console:\n{}",
                        self.cfg.boot_timeout.as_secs(),
                        fsutil::tail_lines(console, 10)
                    ),
                });
            }
            watch.wait(Duration::from_millis(100));
        }
    }

    // ---- stop, kill, delete -------------------------------------------

    pub fn stop(&self, name: &str) -> Result<VmInfo> {
        let vl = self.vm_lock(name);
        let _g = lock::<()>(&vl);
        let mut vm = self.find(name)?;
        if !self.vm_alive(&vm) && vm.runtime.state() == VmState::Running {
            // Stale: the VMM died behind our back. Clean and report stopped.
            self.teardown(&mut vm, true);
            vm.runtime.state = Some(VmState::Stopped);
            self.save(&vm)?;
            return Ok(self.info(&vm));
        }
        vm.runtime.state().check(&vm.name, "stop")?;
        vm.runtime.state = Some(VmState::Stopping);
        self.save(&vm)?;
        let pid = self.handles.get(&vm.id).and_then(|h| h.pid);
        let clean = match (pid, vm.runtime.api_sock_path.clone()) {
            (Some(pid), Some(sock)) => {
                let asked = self
                    .vmm(vm.spec.vmm)
                    .and_then(|v| v.request_shutdown(&sock).map_err(Into::into));
                if let Err(e) = &asked {
                    warn!(vm = %vm.name, err = %e, "clean shutdown request failed; killing");
                }
                asked.is_ok() && process::wait_gone(pid, self.cfg.stop_timeout)
            }
            _ => false,
        };
        if !clean {
            warn!(vm = %vm.name, "guest did not power off in time; killing the VMM");
        }
        self.teardown(&mut vm, true);
        vm.runtime.state = Some(VmState::Stopped);
        self.save(&vm)?;
        Ok(self.info(&vm))
    }

    pub fn kill(&self, name: &str) -> Result<VmInfo> {
        let vl = self.vm_lock(name);
        let _g = lock::<()>(&vl);
        let mut vm = self.find(name)?;
        vm.runtime.state().check(&vm.name, "kill")?;
        self.teardown(&mut vm, true);
        vm.runtime.state = Some(VmState::Stopped);
        self.save(&vm)?;
        Ok(self.info(&vm))
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let vl = self.vm_lock(name);
        let _g = lock::<()>(&vl);
        let t0 = Instant::now();
        let mut vm = self.find(name)?;
        // The VMM is sent SIGKILL and not waited for: its files go now
        // (unlinking open files is fine), and the janitor waits for its
        // exit before releasing its tap.
        self.teardown(&mut vm, false);
        // If removing the files fails, the row must not claim a VMM or tap.
        vm.runtime.state = Some(VmState::Stopped);
        self.save(&vm)?;
        fsutil::remove_dir_all_if_exists(&self.cfg.layout.vm_runtime_dir(&vm.id))?;
        fsutil::remove_dir_all_if_exists(&self.cfg.layout.vm_dir(&vm.id))?;
        self.store().delete_vm(&vm.id)?;
        tracing::debug!(vm = %vm.name, us = micros(t0), "deleted");
        // The name's lock stays: a request may be waiting on it, and a new
        // VM of the same name must share it.
        Ok(())
    }

    /// Ends what a VM holds. Its VMM is sent SIGKILL and, with `wait_vmm`,
    /// waited for (a VM that is stopped, killed or restarted must not share
    /// its disks with a dying VMM; a deleted one's disks go away, so
    /// `delete` lets the janitor wait instead: the process exit of a guest
    /// of a GiB costs the kernel several milliseconds). Its per-boot files
    /// are removed. Its tap and NAT rules (and a VMM not waited for) are
    /// recorded as a [`Release`] and handed to the janitor, which finishes
    /// them after the reply (see `janitor.rs`); the runtime's tap is
    /// cleared. Best effort and idempotent; each source of truth falls back
    /// to the next (handle cache -> scratch file -> runtime.tap_device).
    pub fn teardown(&self, vm: &mut VmRecord, wait_vmm: bool) {
        let t0 = Instant::now();
        let dir = self.cfg.layout.vm_dir(&vm.id);
        let cached = self.handles.get(&vm.id);
        let scratch = handles::read_file(&dir);
        // The cached or scratch PID, else a /proc search by API socket.
        let pid: Vec<i32> = match cached.as_ref().and_then(|h| h.pid).or(scratch.pid) {
            Some(p) => vec![p],
            None => vm
                .runtime
                .api_sock_path
                .as_ref()
                .map(|s| process::find_by_arg(&process::path_needle(s)))
                .unwrap_or_default(),
        };
        let needle = vm
            .runtime
            .api_sock_path
            .as_ref()
            .map(|s| process::path_needle(s));
        let tap_name = cached
            .and_then(|h| h.tap_device)
            .or(scratch.tap_device)
            .or(vm.runtime.tap_device.clone());
        let mut dying = None;
        for p in pid {
            // Only a process that still carries this VM's socket is ours.
            let Some(n) = needle.as_ref().filter(|n| process::matches(p, n)) else {
                continue;
            };
            if wait_vmm || tap_name.is_none() {
                if !process::kill_and_wait(p, Duration::from_secs(10)) {
                    warn!(vm = %vm.name, pid = p, "VMM did not die after SIGKILL");
                }
            } else {
                process::deprioritize(p);
                let _ = process::signal(p, nix::sys::signal::Signal::SIGKILL);
                dying = Some((p, n.clone()));
            }
        }
        let t_vmm = micros(t0);
        if let Some(s) = &vm.runtime.api_sock_path {
            let _ = fsutil::remove_file_if_exists(s);
        }
        let _ = fsutil::remove_file_if_exists(&dir.join(vmfiles::INITRD));
        // NAT rules exist only after the tap is recorded: no tap, nothing
        // to release.
        if let Some(tap) = tap_name {
            let r = Release {
                vm_id: vm.id.clone(),
                vm_name: vm.name.clone(),
                tap: tap.clone(),
                guest_ip: vm.runtime.guest_ip.clone(),
                vmm_pid: dying.as_ref().map(|d| d.0),
                vmm_needle: dying.map(|d| d.1),
            };
            let recorded = self.store().insert_release(&r);
            let deferred = self
                .janitor_running
                .load(std::sync::atomic::Ordering::SeqCst);
            match recorded {
                Ok(()) if deferred => self.janitor.submit(r),
                Ok(()) => {
                    // No janitor (before `serve`, or it could not start).
                    if let Err(e) = self.release_now(&r.vm_id) {
                        warn!(vm = %vm.name, err = %e, "release failed; kept for a retry");
                    }
                }
                Err(e) => {
                    // Without the record the release cannot be deferred.
                    warn!(vm = %vm.name, err = %e, "cannot record the release; releasing now");
                    if let Err(e) = self.release(&r) {
                        // The tap stays recorded: the next teardown retries.
                        warn!(vm = %vm.name, err = %e, "release failed");
                        vm.runtime.tap_device = Some(tap);
                        return;
                    }
                }
            }
        }
        let _ = handles::remove_file(&dir);
        self.handles.remove(&vm.id);
        vm.runtime.tap_device = None;
        tracing::debug!(vm = %vm.name, vmm_us = t_vmm, total_us = micros(t0), "teardown");
    }

    /// Does the VM's recorded release, if it still has one: under the VM's
    /// release lock, the record is read again (a `settle` or a `start` may
    /// have done it meanwhile, and a stale copy must never touch a tap or
    /// rules the VM has since been given), released, and deleted.
    pub fn release_now(&self, vm_id: &str) -> Result<()> {
        let rl = self.release_lock(vm_id);
        let _g = lock::<()>(&rl);
        let Some(r) = self.store().release(vm_id)? else {
            return Ok(());
        };
        self.release(&r)?;
        self.store().delete_release(&r.vm_id, &r.tap)?;
        Ok(())
    }

    /// The kernel side of a release: waits for a VMM that was signalled but
    /// not waited for, removes the VM's NAT rules, then its tap (unless a VM
    /// in the store records a tap of that name now: a daemon that died
    /// between deleting a tap and its record).
    fn release(&self, r: &Release) -> Result<()> {
        let t = Instant::now();
        let failed = |reason: String| DaemonError::Release {
            vm: r.vm_name.clone(),
            tap: r.tap.clone(),
            reason,
        };
        if let (Some(pid), Some(needle)) = (r.vmm_pid, r.vmm_needle.as_deref()) {
            // Signalled by `teardown`; waited for here. A pid that no
            // longer carries the VM's socket is someone else's (or gone).
            let deadline = Instant::now() + Duration::from_secs(10);
            while process::matches(pid, needle) {
                if Instant::now() >= deadline {
                    return Err(failed(format!("its VMM (pid {pid}) survives SIGKILL")));
                }
                let _ = process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        {
            let _n = lock::<()>(&self.nat_lock);
            nat::down(&r.vm_id).map_err(|e| failed(e.to_string()))?;
        }
        // (The released VM's own row may still name the tap: its request
        // saves the cleared runtime after handing the release over.)
        let owned =
            self.store().list_vms()?.iter().any(|v| {
                v.id != r.vm_id && v.runtime.tap_device.as_deref() == Some(r.tap.as_str())
            });
        // Only a tap banger names is banger's to delete.
        if r.tap.starts_with(tap::TAP_PREFIX) && !owned {
            tap::delete(&r.tap).map_err(|e| failed(e.to_string()))?;
        }
        tracing::debug!(vm = %r.vm_name, tap = %r.tap, us = micros(t), "released");
        Ok(())
    }

    /// The janitor's worker (a thread of `serve`): runs until the process
    /// exits. A failed release keeps its record, for `settle`, the next
    /// start of that VM and the next daemon start.
    pub fn run_janitor(&self) {
        // Housekeeping yields to requests: a niced thread (and the `nft`
        // processes it starts inherit the nice value).
        if let Err(e) = process::set_thread_nice(0, 10) {
            warn!(err = %e, "cannot lower the janitor's priority");
        }
        loop {
            let r = self.janitor.next();
            if !self.cfg.release_delay.is_zero() {
                std::thread::sleep(self.cfg.release_delay);
            }
            if let Err(e) = self.release_now(&r.vm_id) {
                warn!(vm = %r.vm_name, err = %e, "release failed; kept for a retry");
            }
            self.janitor.done(&r.vm_id);
        }
    }

    /// Waits for the VM's pending release and retries a failed one: a VM
    /// starts only once its previous tap (which carries the same /30) and
    /// rules are gone.
    fn settle_vm(&self, vm_id: &str) -> Result<()> {
        if !self.janitor.wait_vm(vm_id, SETTLE_TIMEOUT) {
            let pending = self.store().release(vm_id)?;
            if let Some(r) = pending {
                return Err(DaemonError::Release {
                    vm: r.vm_name,
                    tap: r.tap,
                    reason: format!("still in progress after {SETTLE_TIMEOUT:?}"),
                });
            }
        }
        // A failed one is retried now; its error fails the start.
        self.release_now(vm_id)
    }

    /// Waits until every pending release is done, retrying failed ones;
    /// `banger daemon settle`. Returns how many were retried.
    pub fn settle(&self) -> Result<usize> {
        if !self.janitor.wait_idle(SETTLE_TIMEOUT) {
            return Err(DaemonError::Invalid(format!(
                "{} release(s) still in progress after {SETTLE_TIMEOUT:?}: see bangerd.log",
                self.janitor.pending()
            )));
        }
        let left = self.store().list_releases()?;
        let mut failed = Vec::new();
        for r in &left {
            if let Err(e) = self.release_now(&r.vm_id) {
                failed.push(e.to_string());
            }
        }
        if !failed.is_empty() {
            return Err(DaemonError::Invalid(format!(
                "{} release(s) failed (kept; retried at the next settle, start or daemon start):\n{}",
                failed.len(),
                failed.join("\n")
            )));
        }
        Ok(left.len())
    }

    /// Called by `serve` once the janitor thread runs: from then on
    /// releases are deferred to it.
    pub fn janitor_started(&self) {
        self.janitor_running
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    // ---- reconcile ----------------------------------------------------

    /// At startup: every VM recorded as up is either still running (its
    /// handles are rebuilt from the scratch file and /proc) or is demoted to
    /// stopped after its kernel objects are torn down.
    pub fn reconcile(&self) -> Result<()> {
        // Releases a previous daemon left undone are done first (the
        // janitor starts only with `serve`).
        // (Listed first: a store guard must not live through the loop,
        // whose releases take the store again.)
        let leftover = self.store().list_releases()?;
        for r in leftover {
            info!(vm = %r.vm_name, tap = %r.tap, "reconcile: release left pending");
            if let Err(e) = self.release_now(&r.vm_id) {
                warn!(vm = %r.vm_name, err = %e, "release failed; kept for a retry");
            }
        }
        let vms = self.store().list_vms()?;
        for mut vm in vms {
            let st = vm.runtime.state();
            if !matches!(st, VmState::Running | VmState::Starting | VmState::Stopping) {
                continue;
            }
            let dir = self.cfg.layout.vm_dir(&vm.id);
            let sock = vm.runtime.api_sock_path.clone().unwrap_or_default();
            let mut h = handles::rediscover(&dir, &sock);
            if h.tap_device.is_none() {
                h.tap_device = vm.runtime.tap_device.clone();
            }
            self.handles.set(&vm.id, h.clone());
            if st == VmState::Running && self.vm_alive(&vm) {
                info!(vm = %vm.name, pid = ?h.pid, "reconcile: still running");
                let _ = handles::write_file(&dir, &h);
                continue;
            }
            info!(vm = %vm.name, "reconcile: not running; cleaning up");
            self.teardown(&mut vm, true);
            vm.runtime.state = Some(if st == VmState::Starting {
                VmState::Error
            } else {
                VmState::Stopped
            });
            if st == VmState::Starting {
                vm.runtime.last_error =
                    Some("the daemon restarted while the VM was starting".into());
            }
            self.save(&vm)?;
        }
        Ok(())
    }

    /// Watches the VMMs reconcile kept (not children of this daemon), so
    /// that their exit is cleaned up like a child's.
    pub fn watch_adopted(&self) {
        let Ok(vms) = self.store().list_vms() else {
            return;
        };
        for vm in vms {
            if vm.runtime.state() != VmState::Running {
                continue;
            }
            if let (Some(pid), Some(sock)) = (
                self.handles.get(&vm.id).and_then(|h| h.pid),
                vm.runtime.api_sock_path.as_ref(),
            ) {
                crate::reaper::watch_pid(pid, process::path_needle(sock));
            }
        }
    }

    /// Called by the reaper when a VMM this daemon spawned exits: a VM that
    /// was meant to be running is cleaned up exactly like `stop` does.
    pub fn on_vmm_exit(&self, pid: i32) {
        let Ok(vms) = self.store().list_vms() else {
            return;
        };
        let Some(vm) = vms
            .into_iter()
            .find(|v| self.handles.get(&v.id).and_then(|h| h.pid) == Some(pid))
        else {
            return;
        };
        let vl = self.vm_lock(&vm.name);
        let _g = lock::<()>(&vl);
        let Ok(mut vm) = self.find(&vm.name) else {
            return;
        };
        if vm.runtime.state() != VmState::Running
            || self.handles.get(&vm.id).and_then(|h| h.pid) != Some(pid)
        {
            return;
        }
        warn!(vm = %vm.name, pid, "VMM exited on its own; cleaning up");
        self.teardown(&mut vm, true);
        vm.runtime.state = Some(VmState::Stopped);
        vm.runtime.last_error = Some("the guest powered off or its VMM exited".into());
        let _ = self.save(&vm);
    }
}

/// Wakes `wait_ready` when the console log changes: an inotify watch, or
/// (if inotify is unavailable, e.g. out of watches) a 10 ms sleep.
struct ConsoleWatch(Option<nix::sys::inotify::Inotify>);

impl ConsoleWatch {
    fn new(path: &std::path::Path) -> Self {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .and_then(|i| i.add_watch(path, AddWatchFlags::IN_MODIFY).map(|_| i));
        match ino {
            Ok(i) => ConsoleWatch(Some(i)),
            Err(e) => {
                warn!(path = %path.display(), err = %e, "no inotify on the console log; polling it");
                ConsoleWatch(None)
            }
        }
    }

    /// Returns when the file was written since the last call, or after
    /// `timeout`.
    fn wait(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Some(ino) = &self.0 else {
            std::thread::sleep(Duration::from_millis(10));
            return;
        };
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, ms).is_ok_and(|n| n > 0) {
            // Drain: one wake-up per batch of writes is enough.
            while ino.read_events().is_ok_and(|ev| !ev.is_empty()) {}
        }
    }
}

pub fn image_info(r: &ImageRecord) -> ImageInfo {
    ImageInfo {
        name: r.name.clone(),
        kernel_version: r.kernel_version.clone(),
        rootfs_bytes: r.rootfs_bytes,
        dir: r.dir.clone(),
        created_at: r.created_at,
    }
}

pub fn human_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The root disk's file name: a qcow2 overlay for QEMU, a raw copy for
/// Firecracker.
fn root_disk_name(vmm: VmmKind) -> &'static str {
    match vmm {
        VmmKind::Qemu => vmfiles::ROOT_DISK,
        VmmKind::Firecracker => vmfiles::ROOT_RAW,
    }
}

/// The VM's root disk: a qcow2 overlay over the image's read-only ext4,
/// written in-process (banger_host::qcow2).
fn create_root_overlay(dir: &std::path::Path, img: &ImageRecord) -> Result<()> {
    banger_host::qcow2::create_overlay(&dir.join(vmfiles::ROOT_DISK), &img.rootfs)?;
    Ok(())
}

/// A work-disk template: a sparse file with an empty ext4 on it (inode
/// tables left for the guest, which mounts it with `noinit_itable`; no
/// discard of a file that is all holes anyway; no reserved GDT blocks for
/// online growth, which banger never does). Changing these options means
/// bumping the version in `Layout::work_template`.
fn make_work_fs(work: &std::path::Path, mib: u64) -> Result<()> {
    let f = std::fs::File::create(work).with_path("create", work)?;
    f.set_len(banger_core::sizing::mib_to_bytes(mib))
        .with_path("size", work)?;
    drop(f);
    banger_host::cmd::run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "banger-work".as_ref(),
            "-O".as_ref(),
            "^resize_inode".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
            work.as_os_str(),
        ],
    )?;
    Ok(())
}

/// The guest's host key and the known_hosts line that pins it.
fn create_host_key(dir: &std::path::Path, name: &str) -> Result<()> {
    let key = dir.join(vmfiles::HOST_KEY);
    sshkey::generate(&key, &format!("root@{name}"))?;
    let pubkey = sshkey::public_key(&key)?;
    fsutil::write(
        &dir.join(vmfiles::KNOWN_HOSTS),
        format!("{name} {pubkey}\n"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use banger_core::sizing::Sizing;
    use banger_core::{VmRuntime, VmSpec};

    use super::*;

    fn daemon(dir: &std::path::Path) -> Daemon {
        let layout = Layout::new(dir.join("state"), dir.join("run"));
        // A finished image dir, as `image build` leaves it.
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

    #[test]
    fn rebuilding_an_image_in_use_is_refused_without_hanging() {
        let d = tempfile::tempdir().unwrap();
        let daemon = Arc::new(daemon(d.path()));
        daemon
            .store()
            .insert_vm(&vm_with_tap("v1", "user", None))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = daemon.clone();
        std::thread::spawn(move || {
            let r = d2.build_image(DEFAULT_IMAGE, true, &mut |_| {});
            let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("build_image --force hung (store lock taken twice)");
        let e = r.unwrap_err();
        assert!(e.contains("used by vm(s) user"), "{e}");
        // Without --force the built image is reported, not rebuilt.
        let info = daemon
            .build_image(DEFAULT_IMAGE, false, &mut |_| {})
            .unwrap();
        assert_eq!(info.kernel_version, "6.1");
    }

    fn vm_with_tap(id: &str, name: &str, tap: Option<&str>) -> VmRecord {
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
            },
            runtime: VmRuntime {
                tap_device: tap.map(str::to_string),
                ..Default::default()
            },
            created_at: 0,
        }
    }

    /// A release deletes its tap even while its own VM's row still names it
    /// (the request saves the cleared runtime after handing the release to
    /// the janitor), but never a tap another VM's row names. Real taps, in
    /// a network namespace private to the test's thread.
    #[test]
    fn releases_delete_their_tap_unless_another_vm_owns_it() {
        let d = tempfile::tempdir().unwrap();
        let daemon = Arc::new(daemon(d.path()));
        let dm = daemon.clone();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let ip = Ipv4Addr::new(172, 30, 0, 1);
            let release = |vm_id: &str, tap: &str| Release {
                vm_id: vm_id.into(),
                vm_name: format!("vm-{vm_id}"),
                tap: tap.into(),
                guest_ip: Some("172.30.0.2".into()),
                vmm_pid: None,
                vmm_needle: None,
            };
            // Its own row still names the tap: deleted all the same.
            tap::create("bgtap0", ip, 30).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("a1", "a", Some("bgtap0")))
                .unwrap();
            let r = release("a1", "bgtap0");
            dm.store().insert_release(&r).unwrap();
            dm.release_now("a1").unwrap();
            assert!(!tap::exists("bgtap0"), "its own VM's row does not keep it");
            assert!(dm.store().list_releases().unwrap().is_empty());

            // Another VM's row names it (a daemon died between deleting a
            // tap and its record, and the name was reused): kept.
            tap::create("bgtap1", ip, 30).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("b2", "b", Some("bgtap1")))
                .unwrap();
            let r = release("gone", "bgtap1");
            dm.store().insert_release(&r).unwrap();
            dm.release_now("gone").unwrap();
            assert!(tap::exists("bgtap1"), "b's tap is left alone");
            assert!(dm.store().list_releases().unwrap().is_empty());
            tap::delete("bgtap1").unwrap();
        })
        .join()
        .expect("release test thread");
    }

    #[test]
    fn unknown_images_are_named_and_unused_ones_deleted() {
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        assert!(daemon.image(DEFAULT_IMAGE).is_ok());
        let e = daemon.image("other").unwrap_err().to_string();
        assert!(e.contains("image \"other\" is not built"), "{e}");
        daemon.delete_image(DEFAULT_IMAGE).unwrap();
        assert!(daemon.image(DEFAULT_IMAGE).is_err());
        assert!(!daemon.cfg.layout.image_dir(DEFAULT_IMAGE).exists());
    }

    #[test]
    fn private_dirs_are_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let daemon = daemon(d.path());
        for dir in [daemon.cfg.layout.vms_dir(), daemon.cfg.layout.ssh_dir()] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
    }
}
