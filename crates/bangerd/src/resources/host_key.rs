//! The guest's SSH host key, generated per VM, and the known_hosts line
//! that pins it for banger's ssh (no trust on first use).

use banger_core::layout::vmfiles;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::{fsutil, sshkey};
use serde_json::Value;

use super::{end_files, files_held, remove_files, Acq, End, Resource};
use crate::daemon::Daemon;
use crate::error::Result;

#[derive(Debug)]
pub struct HostKey;

impl Resource for HostKey {
    fn name(&self) -> &'static str {
        "host_key"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        let dir = d.cfg.layout.vm_dir(&cx.vm.id);
        let key = dir.join(vmfiles::HOST_KEY);
        sshkey::generate(&key, &format!("root@{}", cx.vm.name))?;
        let pubkey = sshkey::public_key(&key)?;
        fsutil::write(
            &dir.join(vmfiles::KNOWN_HOSTS),
            format!("{} {pubkey}\n", cx.vm.name),
        )?;
        Ok(())
    }

    fn held(&self, d: &Daemon, vm: &VmRecord, _h: &VmHandles) -> Option<Value> {
        let dir = d.cfg.layout.vm_dir(&vm.id);
        files_held(&[
            dir.join(vmfiles::HOST_KEY),
            dir.join(format!("{}.pub", vmfiles::HOST_KEY)),
            dir.join(vmfiles::KNOWN_HOSTS),
        ])
    }

    fn end(&self, _d: &Daemon, vm: &VmRecord, held: Value, _how: End) -> Result<Option<Value>> {
        end_files(vm, held)
    }

    fn release(&self, _d: &Daemon, _r: &Release, held: &Value) -> Result<()> {
        remove_files(held)
    }
}
