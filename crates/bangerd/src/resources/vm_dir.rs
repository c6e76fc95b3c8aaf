//! The VM's directories: VMDir under the state dir (disks, logs, keys, the
//! handles scratch file) and its runtime dir (the VMM's API socket).

use banger_core::{Release, VmHandles, VmRecord};
use banger_host::fsutil;
use serde_json::{json, Value};

use super::{Acq, End, Resource};
use crate::daemon::Daemon;
use crate::error::Result;

#[derive(Debug)]
pub struct VmDir;

fn remove(held: &Value) -> Result<()> {
    for key in ["dir", "run"] {
        if let Some(p) = held[key].as_str() {
            fsutil::remove_dir_all_if_exists(std::path::Path::new(p))?;
        }
    }
    Ok(())
}

impl Resource for VmDir {
    fn name(&self) -> &'static str {
        "vm_dir"
    }

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        fsutil::create_dir_all(&d.cfg.layout.vm_dir(&cx.vm.id))?;
        fsutil::create_dir_all(&d.cfg.layout.vm_runtime_dir(&cx.vm.id))?;
        Ok(())
    }

    fn held(&self, d: &Daemon, vm: &VmRecord, _h: &VmHandles) -> Option<Value> {
        let (dir, run) = (
            d.cfg.layout.vm_dir(&vm.id),
            d.cfg.layout.vm_runtime_dir(&vm.id),
        );
        (dir.exists() || run.exists()).then(|| json!({ "dir": dir, "run": run }))
    }

    fn end(&self, _d: &Daemon, _vm: &VmRecord, held: Value, _how: End) -> Result<Option<Value>> {
        // A VM's files go before its row: a failure here fails the delete.
        remove(&held)?;
        Ok(None)
    }

    fn release(&self, _d: &Daemon, _r: &Release, held: &Value) -> Result<()> {
        remove(held)
    }
}
