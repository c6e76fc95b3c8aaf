//! Firecracker's stand-in for these machines (`firecracker-double`, a bin
//! of this crate): an instance's daemon started with it as its
//! Firecracker binary.

use crate::{ok, Instance};

impl Instance {
    /// Starts this instance's daemon with `firecracker-double` (built
    /// beside banger) as its Firecracker: `--vmm firecracker` VMs boot.
    pub fn start_daemon_with_firecracker_double(&self) {
        let double = self.banger.with_file_name("firecracker-double");
        assert!(
            double.is_file(),
            "{} missing: `cargo build --workspace --bins` builds it (scripts/test.sh does)",
            double.display()
        );
        let out = self
            .banger_cmd(&["daemon", "ping"])
            .env("BANGER_FIRECRACKER", &double)
            .output()
            .expect("run banger daemon ping");
        ok(&out, "start a daemon with a firecracker binary");
    }
}
