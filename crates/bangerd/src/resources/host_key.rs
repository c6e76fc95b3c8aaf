//! The guest's SSH host key, generated per VM, and the known_hosts line
//! that pins it for banger's ssh (no trust on first use).

use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::{fsutil, sshkey};

use super::{end_files, files_held, Acq, End, Item, Resource};
use crate::error::Result;
use crate::host::Host;

#[derive(Debug)]
pub struct HostKey;

/// Rewrites `<state>/ssh/known_hosts` (what `banger ssh-config` points
/// ssh at) from every VM's pinned key, as `<name>.<suffix> <key>`; one
/// writer at a time. A convenience for the user's ssh: a failure is
/// logged, it never fails a create or a delete.
fn publish_known_hosts(host: &Host<'_>) -> Result<()> {
    let _g = crate::daemon::lock(host.known_hosts_lock);
    if let Err(e) = write_known_hosts(host) {
        tracing::warn!(err = %e, "cannot update ssh/known_hosts for `banger ssh-config`");
    }
    Ok(())
}

fn write_known_hosts(host: &Host<'_>) -> Result<()> {
    let mut text = String::new();
    let vms = host.store().list_vms()?;
    for vm in vms {
        let file = host.cfg.layout.vm_dir(&vm.id).join(vmfiles::KNOWN_HOSTS);
        let Ok(line) = std::fs::read_to_string(&file) else {
            continue;
        };
        if let Some((_, key)) = line.trim().split_once(' ') {
            // Both names: `ssh NAME.vm` (ssh-config), and `vm ssh` of a
            // member of the socket's group (HostKeyAlias NAME), whose ssh
            // cannot read the VM's own file.
            text.push_str(&format!("{}.{} {key}\n", vm.name, host.cfg.dns_suffix));
            text.push_str(&format!("{} {key}\n", vm.name));
        }
    }
    let path = host.cfg.layout.ssh_dir().join("known_hosts");
    fsutil::write_atomic(&path, text)?;
    // The socket group's ssh reads it, whatever umask the daemon has.
    match host.cfg.socket_gid {
        Some(gid) => fsutil::set_owner_mode(&path, 0, gid, 0o640)?,
        None => fsutil::set_owner_mode(&path, 0, 0, 0o600)?,
    }
    Ok(())
}

impl Resource for HostKey {
    fn name(&self) -> &'static str {
        "host_key"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::HostKey]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::VmDir]
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        let dir = host.cfg.layout.vm_dir(&cx.vm.id);
        let key = dir.join(vmfiles::HOST_KEY);
        sshkey::generate(&key, &format!("root@{}", cx.vm.name))?;
        let pubkey = sshkey::public_key(&key)?;
        fsutil::write(
            &dir.join(vmfiles::KNOWN_HOSTS),
            format!("{} {pubkey}\n", cx.vm.name),
        )?;
        publish_known_hosts(host)
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        let dir = host.cfg.layout.vm_dir(&vm.id);
        files_held(&[
            dir.join(vmfiles::HOST_KEY),
            dir.join(format!("{}.pub", vmfiles::HOST_KEY)),
            dir.join(vmfiles::KNOWN_HOSTS),
        ])
        .map(Item::HostKey)
    }

    fn end(&self, host: &Host<'_>, vm: &VmRecord, held: Item, _how: End) -> Result<Option<Item>> {
        let rest = end_files(vm, held)?;
        publish_known_hosts(host)?;
        Ok(rest)
    }

    fn release(&self, _host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        super::release_files(self, r, held)
    }
}
