//! The guest side of banger: the default image (built from Debian's
//! packages), the ELF kernel it boots, its initramfs, and the small per-VM
//! config archive that carries hostname, addresses and SSH keys into it.

pub mod config;
pub mod cpio;
pub mod image;
pub mod kernel;
