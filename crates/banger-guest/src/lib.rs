//! The guest side of banger: the default image (built from Debian's
//! packages), the ELF kernel it boots, its initramfs, and the small per-VM
//! config archive that carries hostname, addresses and SSH keys into it.

pub mod config;
pub mod cpio;
pub mod image;
pub mod kernel;

/// The line the guest prints on its console when sshd listens, followed by
/// the boot id.
pub const READY_MARKER: &str = "banger-ready ";

/// The line the guest prints when sshd never came up, with the boot id.
pub const FAILED_MARKER: &str = "banger-failed ";
