//! What the host offers: cores, memory, free disk, usable KVM.

use std::path::Path;

use banger_core::sizing::HostResources;

pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

/// Free space (for root) on the filesystem holding `path`, in MiB.
pub fn free_disk_mib(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size() / (1024 * 1024))
        .unwrap_or(0)
}

pub fn host_resources(state_dir: &Path) -> HostResources {
    HostResources {
        cores: cores(),
        memory_mib: memory_mib(),
        free_disk_mib: free_disk_mib(state_dir),
    }
}

/// Why KVM can or cannot be used, as `doctor` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmStatus {
    pub usable: bool,
    pub detail: String,
}

/// KVM is usable when /dev/kvm exists and the CPU advertises hardware
/// virtualisation (vmx/svm). A paravirtual /dev/kvm without those flags
/// (what these machines have) does not boot stock guest kernels.
pub fn kvm_status() -> KvmStatus {
    if !Path::new("/dev/kvm").exists() {
        return KvmStatus {
            usable: false,
            detail: "/dev/kvm is absent".into(),
        };
    }
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    if hw {
        KvmStatus {
            usable: true,
            detail: "/dev/kvm present, CPU has vmx/svm".into(),
        }
    } else {
        KvmStatus {
            usable: false,
            detail: "/dev/kvm present but the CPU has no vmx/svm flag (paravirtual KVM): guests run under emulation".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_host() {
        let h = host_resources(Path::new("/"));
        assert!(h.cores >= 1);
        assert!(h.memory_mib >= 64);
        assert!(h.free_disk_mib > 0);
        let k = kvm_status();
        assert!(!k.detail.is_empty());
    }
}
