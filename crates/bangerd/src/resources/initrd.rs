//! The per-VM initrd: the image's initramfs with the guest agent's archive
//! and the VM's config archive appended (hostname, address, keys, this
//! boot's id). Written at each
//! start, removed at each teardown.

use std::io::Write;

use banger_core::layout::vmfiles;
use banger_core::net::GUEST_PREFIX;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil::{self, WrapIo};
use banger_host::sshkey;

use super::{end_files, files_held, Acq, End, Item, Resource};
use crate::daemon::random_hex;
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Initrd;

impl Resource for Initrd {
    fn name(&self) -> &'static str {
        "initrd"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Initrd]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[
            super::Handoff::Nameserver,
            super::Handoff::HostKey,
            super::Handoff::GuestAddress,
        ]
    }

    fn phase(&self) -> &'static str {
        "config"
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let dir = host.cfg.layout.vm_dir(&cx.vm.id);
        cx.boot_id = random_hex(8)?;
        let cfg = guest_config(host, cx.vm, &cx.boot_id, cx.nameserver)?;
        let base = host.image_initrd(cx.img)?;
        let agent = host.agent_archive()?;
        let path = dir.join(vmfiles::INITRD);
        let mut f = std::fs::File::create(&path).with_path("create", &path)?;
        f.write_all(&base)
            .and_then(|()| f.write_all(&agent))
            .and_then(|()| f.write_all(&cfg.archive()))
            .with_path("write", &path)?;
        cx.initrd = Some(path);
        Ok(())
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        files_held(&[host.cfg.layout.vm_dir(&vm.id).join(vmfiles::INITRD)]).map(Item::Initrd)
    }

    fn end(&self, _host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        end_files(vm, held)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        super::release_files(self, r, held)
    }
}

/// What a VM's guest is told about itself (the config archive at each
/// boot, and `identity` for a clone re-identified after a restore).
pub(crate) fn guest_config(
    host: &Host<'_>,
    vm: &VmRecord,
    boot_id: &str,
    nameserver: Option<std::net::SocketAddr>,
) -> Result<banger_guest::config::GuestConfig> {
    let dir = host.cfg.layout.vm_dir(&vm.id);
    let net = host.guest_net(vm)?;
    // A pod VM's guest takes its pod's interface: its MAC, address and
    // default route (check_pod_net made sure it has one).
    let (guest_ip, gateway, prefix, mac) = match &vm.runtime.pod_link {
        Some(p) => (
            p.address,
            p.gateway.ok_or_else(|| {
                DaemonError::Invalid(format!(
                    "vm {:?}: pod network namespace {} has no default route",
                    vm.name,
                    p.netns.display()
                ))
            })?,
            p.prefix,
            p.mac.clone(),
        ),
        None => (net.guest_ip, net.host_ip, GUEST_PREFIX, net.mac()),
    };
    let mut client_pub = sshkey::public_key(&host.cfg.layout.client_key())?;
    // The socket group's key too, unless only root may use this VM.
    let group_key = crate::perms::group_key(&host.cfg.layout);
    let roots = crate::access::root_only(vm) || crate::access::root_only_data(&host.store(), vm)?;
    if host.cfg.socket_gid.is_some() && !roots && group_key.exists() {
        client_pub.push('\n');
        client_pub.push_str(&sshkey::public_key(&group_key)?);
    }
    let host_key_path = dir.join(vmfiles::HOST_KEY);
    Ok(banger_guest::config::GuestConfig {
        hostname: vm.name.clone(),
        guest_ip,
        gateway,
        prefix,
        mac,
        nameservers: match nameserver {
            Some(std::net::SocketAddr::V4(ns)) => vec![*ns.ip()],
            // Its pod's containers get containerd's resolv.conf.
            _ if vm.runtime.pod_link.is_some() => Vec::new(),
            _ => banger_guest::config::guest_nameservers(
                &std::fs::read_to_string(&host.cfg.resolv_conf).unwrap_or_default(),
            ),
        },
        authorized_keys: format!("{client_pub}\n"),
        host_key: fsutil::read_to_string(&host_key_path)?,
        host_key_pub: sshkey::public_key(&host_key_path)?,
        boot_id: boot_id.to_string(),
        // An overlay root has no ext4 to grow: its upper disk was made
        // the size asked for.
        grow_root: vm.spec.root_mib.is_some()
            && vm.spec.root_disk() != banger_core::RootDiskKind::Overlay,
        root_upper: crate::resources::root_disk::overlay::guest_device(vm),
        mounts: vm
            .spec
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    banger_core::mount::HostMount::tag(i),
                    m.path.clone(),
                    m.read_only,
                )
            })
            .collect(),
        volumes: vm
            .spec
            .volumes
            .iter()
            .enumerate()
            .map(|(i, m)| (banger_core::volume::guest_device(i), m.path.clone()))
            .collect(),
    })
}
