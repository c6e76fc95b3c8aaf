//! Host subsystems, one narrow module each. Every function acts on the
//! network namespace and mount namespace of the calling process, so tests
//! run the daemon inside a namespace they created.

pub mod acl;
pub mod cgroup;
pub mod cmd;
pub mod confine;
pub mod firewall;
pub mod fsutil;
pub mod podnet;
pub mod process;
pub mod qcow2;
pub mod sshkey;
pub mod sysinfo;
pub mod tap;
