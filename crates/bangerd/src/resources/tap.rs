//! The VM's tap (`bgtapN`), with the host end of its /30 on it. Mirrored on
//! the durable runtime (seed 000: the one datum that cannot be re-derived)
//! and in the handles; released after the reply (deleting a tap costs the
//! kernel an RCU grace period, about 20 ms here).
//!
//! The pool (seed; `--tap-pool N`, default 0): N spare taps, down and
//! without an address, made by the janitor; a start takes one and puts the
//! VM's address on it, a release takes the address off and gives it back
//! (or deletes it when the pool is full). The spares' names are kept in
//! `<runtime>/tap-pool`, so that a daemon that died is followed by one
//! that deletes them; a clean shutdown deletes them too.
//!
//! Every tap bears the daemon's mark (its alias: `banger <state dir>`), so
//! that reconcile can delete the taps of its own that no record names
//! (`sweep_stray_taps`) and never another daemon's of the namespace.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use banger_core::net::GUEST_PREFIX;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::{fsutil, podnet, tap};
use tracing::warn;

use super::{held, Acq, Item, Resource};
use crate::daemon::lock;
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Tap;

impl Resource for Tap {
    fn name(&self) -> &'static str {
        "tap"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Tap]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::GuestAddress]
    }

    fn phase(&self) -> &'static str {
        "network"
    }

    /// The tap's name is recorded (handles and runtime) before the tap is
    /// made or a spare taken over: a daemon killed in between leaves a
    /// record naming a tap that is not there (its release is then
    /// nothing), never a tap no record names.
    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        if let Some(ns) = cx.vm.spec.net.pod_netns.clone() {
            return pod_tap(host, cx, &ns);
        }
        let net = host.guest_net(cx.vm)?;
        // A spare is never in neither the pool nor a record (the sweep
        // counts on it): taken and recorded under the naming lock.
        let spare = {
            let _t = lock(&host.taps.naming);
            match host.take_spare() {
                Some(n) => {
                    record(host, cx, &n)?;
                    Some(n)
                }
                None => None,
            }
        };
        if let Some(n) = spare {
            match tap::assign(&n, net.host_ip, GUEST_PREFIX) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(tap = %n, err = %e, "a spare tap would not take the address; a new one");
                    let _ = tap::delete(&n);
                }
            }
        }
        new_tap(host, cx, net.host_ip)
    }

    /// Cascade: handles (cache, then scratch file), then the runtime.
    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        if let Some(p) = &vm.runtime.pod_link {
            return Some(Item::Tap(held::Tap {
                name: p.tap.clone(),
                host_ip: None,
                pod_netns: Some(p.netns.clone()),
                pod_ifname: Some(p.ifname.clone()),
                pod_netns_id: Some(p.netns_id),
            }));
        }
        let name = h
            .tap_device
            .clone()
            .or_else(|| vm.runtime.tap_device.clone())?;
        let host_ip = host.guest_net(vm).ok().map(|n| n.host_ip);
        Some(Item::Tap(held::Tap {
            name,
            host_ip,
            pod_netns: None,
            pod_ifname: None,
            pod_netns_id: None,
        }))
    }

    fn release(&self, host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Tap(held::Tap {
            name,
            host_ip,
            pod_netns,
            pod_ifname,
            pod_netns_id,
        }) = held
        else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        if let Some(ns) = pod_netns {
            // In the pod's namespace, if it is still there (CNI's
            // teardown deletes it, and the tap with it).
            return podnet::release(
                ns,
                *pod_netns_id,
                &pod_mark(&r.vm_id),
                pod_ifname.as_deref().unwrap_or("eth0"),
            )
            .map_err(|e| DaemonError::Release {
                vm: r.vm_name.clone(),
                resource: "tap",
                reason: e.to_string(),
            });
        }
        let name = name.as_str();
        // Only a tap banger names is banger's to delete; and not one that
        // another VM's row names now (a daemon that died between deleting
        // a tap and its record, after the name was reused). The released
        // VM's own row may still name it: its request saves the cleared
        // runtime after handing the release over.
        // Under the tap lock, with the pool's spares counted: a name this
        // release records may have been recorded before its tap existed
        // and never made; if it was made since, it is someone else's.
        let _t = lock(&host.taps.naming);
        let owned = host
            .store()
            .list_vms()?
            .iter()
            .any(|v| v.id != r.vm_id && v.runtime.tap_device.as_deref() == Some(name))
            || lock(&host.taps.spare).iter().any(|s| s == name);
        if !name.starts_with(tap::TAP_PREFIX) || owned {
            return Ok(());
        }
        if let Some(ip) = *host_ip {
            if host.give_back(name, ip) {
                return Ok(());
            }
        }
        tap::delete(name).map_err(|e| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "tap",
            reason: e.to_string(),
        })
    }
}

/// A pod network (`NetPolicy::pod_netns`, containerd's shim) is
/// root's, alone, and a namespace CNI has given one IPv4 interface:
/// checked before anything exists.
pub(crate) fn check_pod_net(
    host: &Host<'_>,
    req: &banger_core::api::CreateVm,
    clone: bool,
    caller: &crate::access::Caller,
) -> Result<()> {
    let Some(path) = &req.net.pod_netns else {
        return Ok(());
    };
    let bad = |why: String| {
        DaemonError::Invalid(format!("pod network namespace {}: {why}", path.display()))
    };
    if caller.uid != 0 {
        return Err(bad(
            "only root may give a VM a pod's network (bangerd joins the namespace); \
             containerd's shim runs as root"
                .into(),
        ));
    }
    let n = &req.net;
    if n.none || !n.allow.is_empty() || !n.ports.is_empty() || n.network.is_some() {
        return Err(bad(
            "a pod VM's network is its pod's (CNI's): --net none, --allow-net, -p and \
             --network do not apply; leave them out"
                .into(),
        ));
    }
    if clone {
        return Err(bad(
            "a clone (--from) has its snapshot's network; a pod VM boots cold".into(),
        ));
    }
    if req.vmm == Some(banger_core::VmmKind::Firecracker) {
        return Err(bad(
            "a pod VM runs on QEMU, which takes its tap as a descriptor from the pod's \
             namespace (Firecracker opens its tap by name in its own: not built yet); \
             leave --vmm out or give qemu"
                .into(),
        ));
    }
    if !path.is_absolute() {
        return Err(bad("give an absolute path".into()));
    }
    let ns =
        banger_host::podnet::Netns::open(path).map_err(|e| DaemonError::Invalid(e.to_string()))?;
    let link = ns
        .inspect()
        .map_err(|e| DaemonError::Invalid(e.to_string()))?;
    if let Some(why) = link.refusal() {
        return Err(bad(why));
    }
    // One VM per pod namespace: another's tap is there (or will be).
    let id = ns.id().map_err(|e| DaemonError::Invalid(e.to_string()))?;
    for v in host.store().list_vms()? {
        // (By path; by identity only for a VM up on it now: a
        // namespace's inode may be a deleted one's again.)
        let same = v.spec.net.pod_netns.as_deref() == Some(path.as_path())
            || (v.runtime.state().is_up()
                && v.runtime
                    .pod_link
                    .as_ref()
                    .is_some_and(|p| p.netns_id == id));
        if same {
            return Err(bad(format!(
                "vm {:?} has this pod's network already: one VM per pod namespace",
                v.name
            )));
        }
    }
    Ok(())
}

/// A pod VM's tap, in its pod's namespace: the pod's interface is
/// recorded (runtime, written out) before the tap is made, so that a
/// daemon killed in between is followed by a release that finds what it
/// may have made.
fn pod_tap(host: &Host<'_>, cx: &mut Acq<'_>, path: &std::path::Path) -> Result<()> {
    let bad = |e: podnet::PodNetError| DaemonError::Invalid(format!("vm {:?}: {e}", cx.vm.name));
    let ns = podnet::Netns::open(path).map_err(bad)?;
    let netns_id = ns.id().map_err(bad)?;
    let record = |link: &podnet::PodLink| banger_core::PodLink {
        netns: path.to_path_buf(),
        netns_id,
        mtu: link.mtu,
        ifname: link.ifname.clone(),
        tap: podnet::POD_TAP.to_string(),
        mac: link.mac_string(),
        address: link.address,
        prefix: link.prefix,
        gateway: link.gateway,
    };
    let seen = ns.inspect().map_err(bad)?;
    // Checked at create, and again here: a stopped pod VM's namespace
    // may not be what it was.
    if let Some(why) = seen.refusal() {
        return Err(DaemonError::Invalid(format!(
            "vm {:?}: pod network namespace {}: {why}",
            cx.vm.name,
            path.display()
        )));
    }
    cx.vm.runtime.pod_link = Some(record(&seen));
    host.save(cx.vm)?;
    crate::failpoint::hit("start.tap.recorded")?;
    let link = ns.attach(&pod_mark(&cx.vm.id)).map_err(bad)?;
    if link != seen {
        cx.vm.runtime.pod_link = Some(record(&link));
        host.save(cx.vm)?;
    }
    Ok(())
}

/// The mark of a pod VM's tap: the VM's own (every pod tap is `bgpod0`,
/// so a release must never take another VM's, on a namespace reused).
pub fn pod_mark(vm_id: &str) -> String {
    format!("banger pod {vm_id}")
}

/// Names the VM's tap in its handles and runtime, both written out.
fn record(host: &Host<'_>, cx: &mut Acq<'_>, name: &str) -> Result<()> {
    cx.handles.tap_device = Some(name.to_string());
    cx.vm.runtime.tap_device = Some(name.to_string());
    host.set_handles(cx.vm, &cx.handles)?;
    host.save(cx.vm)
}

/// The mark of the taps a daemon of `state_dir` makes: the dir itself
/// where it fits an alias, else a hash of it.
pub fn mark(state_dir: &std::path::Path) -> String {
    let plain = format!("banger {}", state_dir.display());
    let fits =
        plain.len() <= tap::MARK_MAX && plain.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if fits {
        return plain;
    }
    // FNV-1a over the path's bytes: the same mark from every build.
    use std::os::unix::ffi::OsStrExt;
    let h = state_dir
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("banger #{h:016x}")
}

/// A new tap with the VM's address, its name chosen, recorded and the tap
/// made under the tap lock.
fn new_tap(host: &Host<'_>, cx: &mut Acq<'_>, host_ip: Ipv4Addr) -> Result<()> {
    let _t = lock(&host.taps.naming);
    let name = tap::free_name(&host.tap_names_held()?)?;
    record(host, cx, &name)?;
    crate::failpoint::hit("start.tap.recorded")?;
    tap::create(
        &name,
        host_ip,
        GUEST_PREFIX,
        &mark(&host.cfg.layout.state_dir),
    )?;
    crate::failpoint::hit("start.tap.created")?;
    Ok(())
}

/// The taps' state in the daemon.
#[derive(Debug, Default)]
pub struct Taps {
    /// The pool's spares.
    pub(crate) spare: Mutex<Vec<String>>,
    /// Serialises picking a free tap name with recording and making it.
    pub(crate) naming: Mutex<()>,
}

impl Host<'_> {
    fn pool_file(&self) -> std::path::PathBuf {
        self.cfg.layout.runtime_dir.join("tap-pool")
    }

    fn save_pool(&self, spare: &[String]) {
        let mut text = spare.join("\n");
        text.push('\n');
        if let Err(e) = fsutil::write_atomic(&self.pool_file(), text) {
            warn!(err = %e, "cannot record the tap pool");
        }
    }

    fn take_spare(&self) -> Option<String> {
        let mut spare = lock(&self.taps.spare);
        let n = spare.pop()?;
        self.save_pool(&spare);
        drop(spare);
        // Refilled off the request's path.
        self.in_background("tap-pool", |host| host.fill_tap_pool());
        Some(n)
    }

    /// Puts a released tap back in the pool if it has room (address off,
    /// link down); false: the caller deletes it.
    /// Every tap name something records, made or not yet (VM rows, the
    /// handles, pending releases, the pool): none is handed out again
    /// while it is, though the kernel may not list it. Called under the
    /// tap lock. A store that cannot be read fails it (the sweep would
    /// take every VM's tap for a stray).
    fn tap_names_held(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = lock(&self.taps.spare).clone();
        let store = self.store();
        for v in store.list_vms()? {
            names.extend(v.runtime.tap_device.clone());
            names.extend(self.cached_handles(&v.id).and_then(|h| h.tap_device));
        }
        names.extend(held::Reserved::of(&store.list_releases()?).taps);
        Ok(names)
    }

    fn give_back(&self, name: &str, host_ip: Ipv4Addr) -> bool {
        let mut spare = lock(&self.taps.spare);
        if spare.len() >= self.cfg.tap_pool || !tap::exists(name) {
            return false;
        }
        // Root's again (a jailed Firecracker's user owned it).
        if let Err(e) =
            tap::reset(name, host_ip, GUEST_PREFIX).and_then(|()| tap::set_owner(name, 0))
        {
            warn!(tap = %name, err = %e, "cannot reset a tap for the pool; deleting it");
            return false;
        }
        spare.push(name.to_string());
        self.save_pool(&spare);
        true
    }

    /// Makes spares until the pool has its size (the janitor's, after each
    /// release and at start).
    pub fn fill_tap_pool(&self) {
        loop {
            if lock(&self.taps.spare).len() >= self.cfg.tap_pool {
                return;
            }
            // Under the naming lock until it is a spare: never a tap of
            // this daemon's that nothing names.
            let _t = lock(&self.taps.naming);
            let made = self.tap_names_held().and_then(|held| {
                let n = tap::free_name(&held)?;
                // Recorded before it exists: a daemon killed in between
                // leaves a name the next one finds gone, never a tap
                // nobody knows of.
                let mut names = lock(&self.taps.spare).clone();
                names.push(n.clone());
                self.save_pool(&names);
                tap::create_bare(&n, &mark(&self.cfg.layout.state_dir))?;
                Ok(n)
            });
            match made {
                Ok(n) => {
                    let mut spare = lock(&self.taps.spare);
                    spare.push(n);
                    self.save_pool(&spare);
                }
                Err(e) => {
                    warn!(err = %e, "cannot make a spare tap");
                    return;
                }
            }
        }
    }

    /// Deletes the taps bearing this daemon's mark that nothing records
    /// (no VM row, handle, pending release or spare): each would route a
    /// slot another VM may get. Run by reconcile, before the janitor
    /// makes spares. Another daemon's taps bear another mark: left alone.
    /// Nothing is swept when the records cannot be read.
    pub(crate) fn sweep_stray_taps(&self) {
        let _t = lock(&self.taps.naming);
        let held = match self.tap_names_held() {
            Ok(h) => h,
            Err(e) => {
                warn!(err = %e, "reconcile: taps not swept: the records cannot be read");
                return;
            }
        };
        for name in tap::marked(&mark(&self.cfg.layout.state_dir)) {
            if held.contains(&name) {
                continue;
            }
            warn!(tap = %name, "reconcile: deleting a tap of this daemon's that no record names");
            if let Err(e) = tap::delete(&name) {
                warn!(tap = %name, err = %e, "cannot delete a stray tap");
            }
        }
    }

    /// Deletes the spares (a clean shutdown), and those a previous daemon
    /// recorded (reconcile), unless a VM or a pending release names one.
    pub fn drain_tap_pool(&self) {
        let mut names: Vec<String> = std::mem::take(&mut *lock(&self.taps.spare));
        if let Ok(text) = std::fs::read_to_string(self.pool_file()) {
            names.extend(text.lines().map(str::to_string).filter(|l| !l.is_empty()));
        }
        names.sort();
        names.dedup();
        let named: Vec<String> = {
            let store = self.store();
            let vms = store.list_vms().unwrap_or_default();
            let releases = store.list_releases().unwrap_or_default();
            vms.iter()
                .filter_map(|v| v.runtime.tap_device.clone())
                .chain(held::Reserved::of(&releases).taps)
                .collect()
        };
        for n in names.iter().filter(|n| !named.contains(n)) {
            // (A name recorded just before its tap was made may have none.)
            if n.starts_with(tap::TAP_PREFIX) && tap::exists(n) {
                if let Err(e) = tap::delete(n) {
                    warn!(tap = %n, err = %e, "cannot delete a spare tap");
                }
            }
        }
        let _ = fsutil::remove_file_if_exists(&self.pool_file());
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use banger_core::Held;

    use crate::daemon::testutil::{daemon, vm_with_tap};

    /// A release deletes its tap even while its own VM's row still names it
    /// (the request saves the cleared runtime after handing the release to
    /// the janitor), but never a tap another VM's row names. Real taps, in
    /// a network namespace private to the test's thread.
    #[test]
    fn releases_delete_their_tap_unless_another_vm_owns_it_and_strays_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let daemon = Arc::new(daemon(d.path()));
        let dm = daemon.clone();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let ip = Ipv4Addr::new(172, 30, 0, 1);
            let release = |vm_id: &str, tap: &str| banger_core::Release {
                id: 0,
                vm_id: vm_id.into(),
                vm_name: format!("vm-{vm_id}"),
                items: vec![Held {
                    resource: "tap".into(),
                    data: serde_json::json!({ "name": tap }),
                }],
            };
            let mine = super::mark(&dm.cfg.layout.state_dir);
            // Its own row still names the tap: deleted all the same.
            banger_host::tap::create("bgtap0", ip, 30, &mine).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("a1", "a", Some("bgtap0")))
                .unwrap();
            dm.store().insert_release(&release("a1", "bgtap0")).unwrap();
            dm.release_vm("a1").unwrap();
            assert!(
                !banger_host::tap::exists("bgtap0"),
                "its own VM's row does not keep it"
            );
            assert!(dm.store().list_releases().unwrap().is_empty());

            // Another VM's row names it (a daemon died between deleting a
            // tap and its record, and the name was reused): kept.
            banger_host::tap::create("bgtap1", ip, 30, &mine).unwrap();
            dm.store()
                .insert_vm(&vm_with_tap("b2", "b", Some("bgtap1")))
                .unwrap();
            dm.store()
                .insert_release(&release("gone", "bgtap1"))
                .unwrap();
            dm.release_vm("gone").unwrap();
            assert!(banger_host::tap::exists("bgtap1"), "b's tap is left alone");
            assert!(dm.store().list_releases().unwrap().is_empty());

            // Reconcile: a tap of this daemon's that nothing records goes;
            // b's stays, a pending release's stays, and so do another
            // daemon's and an unmarked one.
            banger_host::tap::create("bgtap5", ip, 30, &mine).unwrap();
            banger_host::tap::create_bare("bgtap6", "banger /elsewhere").unwrap();
            let out = std::process::Command::new("ip")
                .args(["tuntap", "add", "dev", "bgtap7", "mode", "tap"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            banger_host::tap::create_bare("bgtap8", &mine).unwrap();
            dm.store()
                .insert_release(&release("pending", "bgtap8"))
                .unwrap();
            dm.host().sweep_stray_taps();
            assert!(
                !banger_host::tap::exists("bgtap5"),
                "a stray tap is deleted"
            );
            for t in ["bgtap1", "bgtap6", "bgtap7", "bgtap8"] {
                assert!(banger_host::tap::exists(t), "{t} is left alone");
                banger_host::tap::delete(t).unwrap();
            }
        })
        .join()
        .expect("release test thread");
    }
}
