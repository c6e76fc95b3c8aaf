//! VM lifecycle: create and start (stop, kill and delete: `ending`). Every transition that
//! ends a boot goes through [`Daemon::end_boot`] (teardown, state, last
//! error, save, in one place); every teardown walks the resource lists
//! backwards ([`Daemon::teardown`]).

use std::time::Instant;

use banger_core::api::{CreateVm, Event, VmInfo};
use banger_core::{Held, VmRecord, VmState, VmmKind};
use banger_guest::image::DEFAULT_IMAGE;
use banger_host::sysinfo;
use tracing::{info, warn};

use crate::cancel::Cancel;
use crate::daemon::{lock, micros, phase, random_hex, Daemon, Events, Phase};
use crate::error::{DaemonError, Result};
use crate::failpoint::hit;
use crate::resources::{self, Acq, End, Resource, CREATE, START};

/// The largest root disk `--root-size` makes (sparse: it costs what the
/// guest writes).
const MAX_ROOT_MIB: u64 = 1 << 20;

impl Daemon {
    // ---- create -------------------------------------------------------

    /// Creates a VM (and with `req.start`, boots it; with `req.rm`, deletes
    /// it again if the boot fails). `cancel` cancels the boot.
    pub fn create(&self, req: &CreateVm, events: Events, cancel: Cancel) -> Result<VmInfo> {
        self.create_for(req, &crate::access::Caller::root(), None, events, cancel)
    }

    /// [`Daemon::create`] for `caller` (whose VM may join only a network
    /// of theirs: checked and recorded under the network lock with the
    /// row's insert, so two first VMs of one network cannot both pass);
    /// an `rm` create records the process it lives for (`rm_client`),
    /// before the row exists, so that no crash leaves it without.
    pub fn create_for(
        &self,
        req: &CreateVm,
        caller: &crate::access::Caller,
        rm_client: Option<banger_core::RmClient>,
        events: Events,
        cancel: Cancel,
    ) -> Result<VmInfo> {
        let t0 = Instant::now();
        let name = match &req.name {
            Some(n) => {
                banger_core::validate_name(n)?;
                n.clone()
            }
            None => self.generate_name()?,
        };
        if req.rm && !req.start {
            return Err(DaemonError::Invalid(
                "--rm deletes the VM when its client goes away: it needs a VM that starts (vm run)"
                    .into(),
            ));
        }
        // A clone takes its snapshot's machine (held shared until its row
        // names the snapshot: no `snapshot rm` slips in between).
        let snap_guard = req
            .from
            .as_ref()
            .map(|n| self.snapshot_locks.lock_shared(n));
        let snap = match &req.from {
            Some(from) if from.starts_with(banger_core::SUSPEND_PREFIX) => {
                return Err(DaemonError::Invalid(format!(
                    "--from {from}: that is a suspended VM's saved guest, which only its VM \
                     restores (`banger vm resume`)"
                )))
            }
            Some(from) if crate::warm::is_warm(from) => {
                return Err(DaemonError::Invalid(format!(
                    "--from {from}: that snapshot is the warm-start cache's, which `vm run` \
                     restores by itself; snapshot a VM of your own (`banger vm snapshot`)"
                )))
            }
            Some(from) => {
                let snap = self.clone_source(from, caller)?;
                self.check_clone_request(req, &snap)?;
                Some(snap)
            }
            None => None,
        };
        let image_name = match &snap {
            Some(s) => s.spec.image.clone(),
            None => req
                .image
                .clone()
                .unwrap_or_else(|| self.cfg.default_image.clone()),
        };
        let host = sysinfo::host_resources(&self.cfg.layout.state_dir);
        // The request's sizes, else the config's, else the host's.
        let d = &self.cfg.default_size;
        let size = banger_core::sizing::SizeRequest {
            cpus: req.size.cpus.or(d.cpus),
            memory_mib: req.size.memory_mib.or(d.memory_mib),
            disk_mib: req.size.disk_mib.or(d.disk_mib),
        };
        let mut sizing = match &snap {
            Some(s) => s.spec.sizing,
            None => banger_core::sizing::resolve_with(&size, &self.default_sizing, &host)?,
        };
        crate::resources::tap::check_pod_net(&self.host(), req, snap.is_some(), caller)?;
        // What only QEMU has picks it where no VMM is asked for (the
        // config's default included): virtio-fs for `--mount` (and so
        // every containerd container's root), and a pod VM's tap, handed
        // to QEMU as a descriptor (Firecracker opens its tap by name, in
        // its own namespace: see check_pod_net).
        let needs_qemu = if req.net.pod_netns.is_some() {
            Some("a pod network")
        } else if !req.mounts.is_empty() {
            Some("--mount (virtio-fs, which Firecracker does not have)")
        } else {
            None
        };
        let asked = snap.as_ref().map(|s| s.spec.vmm).or(req.vmm);
        let (vmm, accel) = match (asked, needs_qemu) {
            (None, Some(why)) => {
                let picked = self.select_vmm(Some(VmmKind::Qemu))?;
                if self.select_vmm(None).is_ok_and(|(d, _)| d != VmmKind::Qemu) {
                    events(Event::Progress {
                        message: format!("QEMU, not the default Firecracker: {why} needs it"),
                    });
                }
                picked
            }
            _ => self.select_vmm(asked)?,
        };
        // Firecracker's limit, refused before anything exists.
        let fc_max = banger_vmm::firecracker::MAX_VCPUS;
        if vmm == VmmKind::Firecracker && sizing.cpus > fc_max {
            if size.cpus.is_some() {
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
        if let Some(n) = &req.net.network {
            banger_core::validate_name(n)
                .map_err(|e| DaemonError::Invalid(format!("--network {n:?}: {e}")))?;
        }
        req.check_labels().map_err(DaemonError::Invalid)?;
        if req.net.none && !req.net.allow.is_empty() {
            let ranges: Vec<String> = req.net.allow.iter().map(|c| c.to_string()).collect();
            return Err(DaemonError::Invalid(format!(
                "--net none with --allow-net {}: a guest with no network reaches no range; \
                 leave out one of them",
                ranges.join(",")
            )));
        }
        for note in crate::resources::firewall::check_allow(&self.host(), &req.net.allow)? {
            events(Event::Progress { message: note });
        }
        // A published port in use is refused before anything exists.
        crate::resources::ports::check_free_naming(&self.host(), &name, &req.net.ports)?;
        self.check_mounts(&req.volumes)?;
        self.check_host_mounts(&name, vmm, &req.mounts, &req.volumes)?;
        if image_name == DEFAULT_IMAGE && self.store().image(&image_name)?.is_none() {
            events(Event::Progress {
                message: format!(
                    "image {image_name} is not built yet: building it first, from Debian's \
                     mirrors (a few minutes, once; `banger image build` does it ahead)"
                ),
            });
            self.build_image(&image_name, false, &crate::access::Caller::root(), events)?;
        }
        // The image may not be deleted or rebuilt between this lookup and
        // the row that makes it "in use".
        let image_guard = self.image_locks.lock_shared(&image_name);
        let img = self.image(&image_name)?;
        self.warn_if_outdated(&img, events);
        let root_disk = match &snap {
            Some(s) => s.spec.root_disk(),
            None => crate::resources::root_disk::choose(&self.host(), vmm)?,
        };
        if let Some(mib) = req.root_mib {
            if root_disk == banger_core::RootDiskKind::DmSnapshot {
                return Err(DaemonError::Invalid(format!(
                    "--root-size: a dm-snapshot root disk is the image's size ({root_disk} cannot grow); \
                     leave --root-size out and put data on a volume or /work (--disk-size)"
                )));
            }
            let image_mib = img.rootfs_bytes.div_ceil(1 << 20);
            if mib < image_mib || mib > MAX_ROOT_MIB {
                return Err(DaemonError::Invalid(format!(
                    "--root-size {mib} MiB: image {image_name}'s root filesystem is {image_mib} MiB; give {image_mib} MiB to 1 TiB"
                )));
            }
        }
        // A warm start restores a cached snapshot of this image and these
        // sizes (its name held shared, as `--from`'s, until the row names
        // it); a cold start of a first VM of them leaves one.
        let shape = crate::warm::Shape {
            sizing,
            root_mib: req.root_mib,
            vmm,
            accel: &accel,
            root_disk,
        };
        let plan = self.warm_plan(req, &img, &shape, caller);
        let warm_guard = match &plan {
            crate::warm::Plan::Restore(s) => Some(self.snapshot_locks.lock_shared(s)),
            _ => None,
        };
        // Held now: checked again (a `snapshot rm` may have come first).
        let gone = match &plan {
            crate::warm::Plan::Restore(s) => self.store().snapshot(s)?.is_none(),
            _ => false,
        };
        let plan = if gone { crate::warm::Plan::None } else { plan };
        let (from, warm_save) = match &plan {
            crate::warm::Plan::Restore(s) => (Some(s.clone()), None),
            crate::warm::Plan::Save(w) => (req.from.clone(), Some(w.clone())),
            crate::warm::Plan::None => (req.from.clone(), None),
        };
        // A clone of a VM with volumes gets copies of them, named
        // `<clone>-<volume>`, at the same places.
        let clone_volumes: Vec<(banger_core::volume::VolumeMount, std::path::PathBuf)> = match &snap
        {
            Some(s) => s
                .spec
                .volumes
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mount = banger_core::volume::VolumeMount {
                        name: format!("{name}-{}", m.name),
                        path: m.path.clone(),
                    };
                    (mount, s.dir.join(crate::snapshots::volume_file(i)))
                })
                .collect(),
            None => Vec::new(),
        };
        for (m, _) in &clone_volumes {
            banger_core::validate_name(&m.name).map_err(|e| {
                DaemonError::Invalid(format!(
                    "vm {name:?}: its copy of a volume would be volume {:?}: {e}; pick a shorter \
                     name",
                    m.name
                ))
            })?;
        }
        let volumes = match &snap {
            Some(_) => clone_volumes.iter().map(|(m, _)| m.clone()).collect(),
            None => req.volumes.clone(),
        };
        let _g = self.lock_vm(&name)?;
        let id = random_hex(16)?;
        let mut vm = VmRecord {
            id: id.clone(),
            name: name.clone(),
            spec: banger_core::VmSpec {
                sizing,
                image: image_name.clone(),
                vmm,
                accel: accel.clone(),
                auto_stop: req.auto_stop,
                net: req.net.clone(),
                volumes,
                mounts: req.mounts.clone(),
                root_mib: req.root_mib,
                root_disk: Some(root_disk),
                from_snapshot: from.clone(),
                metadata: req.metadata.clone(),
                env: req.env.clone(),
            },
            runtime: banger_core::VmRuntime {
                state: Some(VmState::Creating),
                api_sock_path: Some(
                    self.cfg
                        .layout
                        .vm_runtime_dir(&id)
                        .join(banger_core::layout::vmfiles::API_SOCK),
                ),
                vm_dir: Some(self.cfg.layout.vm_dir(&id)),
                rm_client: if req.rm { rm_client } else { None },
                restore: from.clone(),
                warm_save,
                ..Default::default()
            },
            created_at: banger_core::unix_now(),
        };
        // Under the volumes' lock, the volumes are checked again and the
        // row that makes them "in use" written: no `volume rm` (and a
        // member's `volume create` under the name) slips in between. What
        // a VM only root may use could write on them stays root's: marked
        // before the VM exists, so that no member's VM takes one between.
        let volume_guard = lock(&self.volumes.lock);
        self.check_mounts(&req.volumes)?;
        let mut made_volumes: Vec<String> = Vec::new();
        let inserted = (|| {
            // A copy of a root-only snapshot's volume is root-only: so is
            // the clone, then (`root_only_data`).
            let snap_root_only = match &snap {
                Some(s) if !clone_volumes.is_empty() => {
                    self.store()
                        .owner(banger_store::Owned::Snapshot, &s.name)?
                        .root_only
                }
                _ => false,
            };
            for (m, from) in &clone_volumes {
                let owner = banger_store::Owner {
                    uid: caller.uid,
                    root_only: snap_root_only,
                };
                self.volume_from(&m.name, from, owner)?;
                made_volumes.push(m.name.clone());
            }
            if crate::access::root_only(&vm) || crate::access::root_only_data(&self.store(), &vm)? {
                let store = self.store();
                for v in &vm.spec.volumes {
                    store.mark_root_only(banger_store::Owned::Volume, &v.name)?;
                }
            }
            hit("create.begin")?;
            let _n = lock(&self.net_lock);
            if let Some(n) = &req.net.network {
                caller.may_join(&self.store(), n)?;
            }
            self.insert_row(&vm)
        })();
        if let Err(e) = inserted {
            made_volumes.iter().for_each(|v| self.forget_volume(v));
            return Err(e);
        }
        // Its row names the snapshot now (`runtime.restore`): `snapshot
        // rm` refuses until it has started.
        drop(snap_guard);
        drop(warm_guard);
        drop(volume_guard);
        drop(image_guard);
        events(Event::Spec {
            line: format!(
                "{name}: {} vCPU, {} MiB, {} disk, image {image_name}, vmm {vmm} ({accel}){}",
                sizing.cpus,
                sizing.memory_mib,
                crate::daemon::human_mib(sizing.disk_mib),
                match (&plan, &req.from) {
                    (crate::warm::Plan::Restore(_), _) =>
                        ", warm start (a snapshot of a freshly booted guest; --cold boots)".into(),
                    (_, Some(s)) => format!(", from snapshot {s}"),
                    _ => String::new(),
                }
            ),
        });
        let made = (|| {
            let mut cx = Acq {
                vm: &mut vm,
                img: &img,
                handles: Default::default(),
                events: &mut *events,
                boot_id: String::new(),
                initrd: None,
                nameserver: None,
                hello: None,
                background: Vec::new(),
            };
            for r in CREATE {
                hit(&format!("create.{}", r.name()))?;
                let t = Phase::start(r.phase());
                r.acquire(&self.host(), &mut cx)?;
                if r.used(cx.vm) {
                    t.done(cx.events);
                }
            }
            cx.vm.runtime.state = Some(VmState::Created);
            self.save(cx.vm)?;
            hit("create.done")
        })();
        if let Err(e) = made {
            warn!(vm = %name, err = %e, "create failed; rolling back");
            self.remove(&mut vm, CREATE_ROLLBACK);
            let _v = lock(&self.volumes.lock);
            made_volumes.iter().for_each(|v| self.forget_volume(v));
            return Err(e);
        }
        phase(events, "create", micros(t0));
        if !req.start {
            return Ok(self.info(&vm));
        }
        match self.start_locked(vm, events, cancel) {
            Ok(vm) => Ok(self.info(&vm)),
            Err(e) => {
                if req.rm {
                    // The daemon's half of --rm: a VM whose boot failed or
                    // was cancelled goes too.
                    if let Ok(mut vm) = self.find(&name) {
                        self.remove(&mut vm, DELETE);
                        self.forget_rm_clone_volumes(&vm);
                    }
                }
                Err(e)
            }
        }
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

    // ---- start --------------------------------------------------------

    pub fn start(&self, name: &str, events: Events) -> Result<VmInfo> {
        let _g = self.lock_vm(name)?;
        let vm = self.find(name)?;
        let vm = self.start_locked(vm, events, Cancel::default())?;
        Ok(self.info(&vm))
    }

    pub(crate) fn start_locked(
        &self,
        mut vm: VmRecord,
        events: Events,
        cancel: Cancel,
    ) -> Result<VmRecord> {
        vm.runtime.state().check(&vm.name, "start")?;
        // A VMM that survived SIGKILL still uses the disks.
        if let Some(p) = resources::vmm::find(&vm, &self.current_handles(&vm), self.expect_vmm(&vm))
        {
            if p.is_running() {
                return Err(DaemonError::VmmSurvives {
                    vm: vm.name.clone(),
                    pid: p.pid,
                    state: banger_host::process::state(p.pid).unwrap_or('?'),
                });
            }
        }
        // Whatever an earlier boot left (a teardown that could not finish)
        // goes first; nothing held, nothing done.
        self.teardown(&mut vm, BOOT)?;
        let t0 = Instant::now();
        self.settle_vm(&vm.id)?;
        let _boot = self.boots.register(&vm.name, cancel.clone());
        hit("start.begin")?;
        // Only a VM's first start leaves a warm snapshot: its disks are
        // still the image's.
        let warm = vm.runtime.warm_save.take();
        vm.runtime.state = Some(VmState::Starting);
        vm.runtime.last_error = None;
        vm.runtime.paused = false;
        self.save(&vm)?;
        match self.boot(&mut vm, events, &cancel, warm.as_ref()) {
            Ok(()) => {
                info!(vm = %vm.name, ms = t0.elapsed().as_millis() as u64, "running");
                Ok(vm)
            }
            Err(e) => {
                warn!(vm = %vm.name, err = %e, "start failed; rolling back");
                let (to, why) = if cancel.is_cancelled() {
                    (VmState::Stopped, format!("its start was cancelled ({e})"))
                } else if vm.runtime.suspended {
                    // Its saved guest is still there: suspended still.
                    (VmState::Stopped, format!("its resume failed: {e}"))
                } else {
                    (VmState::Error, e.to_string())
                };
                let _ = self.end_boot(&mut vm, to, Some(why), true);
                Err(e)
            }
        }
    }

    /// Acquires the boot's resources in order, then waits for the guest.
    fn boot(
        &self,
        vm: &mut VmRecord,
        events: Events,
        cancel: &Cancel,
        warm: Option<&banger_core::WarmSave>,
    ) -> Result<()> {
        let img = self.image(&vm.spec.image)?;
        self.vmm(vm.spec.vmm)?;
        let mut cx = Acq {
            vm,
            img: &img,
            handles: Default::default(),
            events,
            boot_id: String::new(),
            initrd: None,
            nameserver: None,
            hello: None,
            background: Vec::new(),
        };
        let booted = (|| {
            let (mut handles, mut runtime) = (None, None);
            for r in START {
                hit(&format!("start.{}", r.name()))?;
                if cancel.is_cancelled() {
                    return Err(DaemonError::Cancelled(cx.vm.name.clone()));
                }
                let t = Phase::start(r.phase());
                let acquired = r.acquire(&self.host(), &mut cx);
                // Recorded before anything else can fail, even a failed
                // acquire's partial work (a spawned VMM, say); written
                // only when the step changed them.
                if handles.as_ref() != Some(&cx.handles) {
                    self.set_handles(cx.vm, &cx.handles)?;
                    handles = Some(cx.handles.clone());
                }
                if runtime.as_ref() != Some(&cx.vm.runtime) {
                    self.save(cx.vm)?;
                    runtime = Some(cx.vm.runtime.clone());
                }
                acquired?;
                if r.used(cx.vm) {
                    t.done(cx.events);
                }
            }
            let vmm = self.vmm_process(cx.vm).ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no VMM process", cx.vm.name))
            })?;
            // A clone's first start restores its snapshot: no boot, no
            // hello (the guest said it long ago), its identity instead.
            if cx.vm.runtime.restore.is_some() {
                self.restore_guest(cx.vm, cx.events, cancel)?;
                return hit("start.ready");
            }
            let t = Phase::start("boot");
            let hello = cx.hello.take().ok_or_else(|| {
                DaemonError::Invalid(format!("vm {:?} has no vsock to hear from", cx.vm.name))
            })?;
            crate::readiness::wait(self, cx.vm, vmm, &hello, &cx.boot_id, cancel)?;
            t.done(cx.events);
            // Firecracker's guests have no RTC: their clock comes from the
            // host, through the agent that just said hello. (QEMU's read
            // the emulated RTC at boot.)
            if cx.vm.spec.vmm == banger_core::VmmKind::Firecracker {
                let t = Phase::start("clock");
                if let Err(e) = self.sync_clock(cx.vm) {
                    warn!(vm = %cx.vm.name, err = %e, "could not set the guest's clock");
                }
                t.done(cx.events);
            }
            if let Some(w) = warm {
                self.save_warm(cx.vm, w, cx.events)?;
            }
            hit("start.ready")
        })();
        // Work still running in the background (NAT) is joined in every
        // case: a rollback must not race it.
        let mut background = Ok(());
        for (name, job) in cx.background.drain(..) {
            match job.join() {
                Ok(Ok(us)) => phase(cx.events, name, us),
                Ok(Err(e)) => background = background.and(Err(e)),
                Err(_) => {
                    background = background.and(Err(DaemonError::Invalid(format!(
                        "the {name} thread panicked"
                    ))))
                }
            }
        }
        booted?;
        background?;
        cx.vm.runtime.state = Some(VmState::Running);
        cx.vm.runtime.started_at = Some(banger_core::unix_now());
        self.save(cx.vm)
    }

    // ---- the one transition and the one teardown ----------------------

    /// Ends a VM's boot (stop, kill, a failed or cancelled start, the
    /// reaper, reconcile, the auto-stopper): its boot resources torn down,
    /// then state `to` with `why` as its last error, saved. A teardown that
    /// cannot finish (a VMM that survives SIGKILL) leaves the VM in error,
    /// saying why, and fails.
    pub(crate) fn end_boot(
        &self,
        vm: &mut VmRecord,
        to: VmState,
        why: Option<String>,
        wait_vmm: bool,
    ) -> Result<()> {
        let how = Teardown {
            end: End {
                wait_vmm,
                deleting: false,
            },
            ..BOOT
        };
        match self.teardown(vm, how) {
            Ok(()) => {
                vm.runtime.state = Some(to);
                vm.runtime.last_error = why;
                vm.runtime.started_at = None;
                vm.runtime.paused = false;
                vm.runtime.snapshotting = false;
                self.save(vm)
            }
            Err(e) => {
                vm.runtime.paused = false;
                vm.runtime.state = Some(VmState::Error);
                vm.runtime.last_error = Some(e.to_string());
                let _ = self.save(vm);
                Err(e)
            }
        }
    }

    /// Ends what the VM holds of the listed resources, last acquired first:
    /// each resource says what it holds (falling back from the handles to
    /// the runtime to the OS) and ends it; what is left for after the reply
    /// is recorded as one release and handed to the janitor. Idempotent.
    /// Stops at a resource whose end must succeed (the VMM); otherwise a
    /// failed end is recorded for the release to retry.
    pub(crate) fn teardown(&self, vm: &mut VmRecord, how: Teardown) -> Result<()> {
        let t0 = Instant::now();
        let h = self.current_handles(vm);
        let mut later: Vec<Held> = Vec::new();
        for list in how.lists {
            for r in list.iter().rev() {
                let Some(held) = r.held(&self.host(), vm, &h) else {
                    continue;
                };
                let ended = hit(&format!("teardown.{}", r.name()))
                    .and_then(|()| r.end(&self.host(), vm, held.clone(), how.end));
                match ended {
                    Ok(Some(rest)) => later.push(rest.record()),
                    Ok(None) => {}
                    Err(e) if r.blocks_teardown() => {
                        // Nothing after it may go: the handles stay, so a
                        // later teardown starts here again.
                        return Err(e);
                    }
                    Err(e) => {
                        warn!(vm = %vm.name, resource = r.name(), err = %e, "left for the release");
                        later.push(held.record());
                    }
                }
            }
        }
        if !later.is_empty() {
            self.hand_over(vm, later)?;
        }
        let _ = crate::handles::remove_file(&self.cfg.layout.vm_dir(&vm.id));
        self.handles.remove(&vm.id);
        vm.runtime.tap_device = None;
        vm.runtime.pod_link = None;
        // The CID stays reserved by the release record until it is done.
        vm.runtime.vsock_cid = None;
        vm.runtime.vsock_path = None;
        tracing::debug!(vm = %vm.name, us = micros(t0), "teardown");
        Ok(())
    }
}

/// Which resource lists a teardown walks, and how it ends them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Teardown {
    pub lists: &'static [&'static [&'static dyn Resource]],
    pub end: End,
}

/// What a boot holds, the VMM waited for.
pub(crate) const BOOT: Teardown = Teardown {
    lists: &[START],
    end: End {
        wait_vmm: true,
        deleting: false,
    },
};

/// Everything: the VM is deleted.
pub(crate) const DELETE: Teardown = Teardown {
    lists: &[START, CREATE],
    end: End {
        wait_vmm: false,
        deleting: true,
    },
};

/// What a failed create made.
pub(crate) const CREATE_ROLLBACK: Teardown = Teardown {
    lists: &[CREATE],
    end: End {
        wait_vmm: true,
        deleting: true,
    },
};
