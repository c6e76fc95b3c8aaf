//! The guest side of banger: the default image (built from Debian's
//! packages), the ELF kernel it boots, its initramfs, and the small per-VM
//! config archive that carries hostname, addresses and SSH keys into it;
//! and the import of root filesystems users already have (ext4, tarballs,
//! directories, OCI images).

pub mod config;
pub mod cpio;
pub mod image;
pub mod import;
pub mod initramfs;
pub mod kernel;
pub mod oci;
pub mod tree;
