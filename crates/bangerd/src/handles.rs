//! VMHandles (seed 003): what is currently true about a VM's kernel objects
//! and VMM process. An in-memory cache, mirrored to `VMDir/handles.json` so
//! that a restarted daemon can rebuild it; never in SQLite.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use banger_core::layout::vmfiles;
use banger_core::VmHandles;
use banger_host::fsutil::{self, FsError};
use banger_host::process;

#[derive(Debug, Default)]
pub struct HandleCache {
    map: Mutex<HashMap<String, VmHandles>>,
}

impl HandleCache {
    pub fn get(&self, vm_id: &str) -> Option<VmHandles> {
        self.lock().get(vm_id).cloned()
    }

    pub fn set(&self, vm_id: &str, h: VmHandles) {
        self.lock().insert(vm_id.to_string(), h);
    }

    pub fn remove(&self, vm_id: &str) -> Option<VmHandles> {
        self.lock().remove(vm_id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmHandles>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (each operation is one insert or remove), so poisoning is ignored.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn write_file(vm_dir: &Path, h: &VmHandles) -> Result<(), FsError> {
    let json = serde_json::to_vec_pretty(h).unwrap_or_default();
    fsutil::write_atomic(&vm_dir.join(vmfiles::HANDLES), json)
}

/// The scratch file's handles; a missing or corrupt file reads as empty.
pub fn read_file(vm_dir: &Path) -> VmHandles {
    std::fs::read(vm_dir.join(vmfiles::HANDLES))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn remove_file(vm_dir: &Path) -> Result<(), FsError> {
    fsutil::remove_file_if_exists(&vm_dir.join(vmfiles::HANDLES))
}

/// Handles as the OS shows them: the scratch file's VMM if that very
/// process (pid and start time) is still there; else the process whose
/// command line carries the VM's API socket, found again and identified by
/// its own start time. The rest of the scratch file is kept even when the
/// process is gone, so that cleanup can still tear kernel objects down.
pub fn rediscover(vm_dir: &Path, api_sock: &Path, expect: process::Expect) -> VmHandles {
    let mut h = read_file(vm_dir);
    if let (Some(pid), Some(start_time)) = (h.pid, h.vmm_start_time) {
        if (process::ProcId { pid, start_time }).is_running() {
            return h;
        }
    }
    let needle = process::path_needle(api_sock);
    let found = process::find_by_arg_as(&needle, expect)
        .into_iter()
        .next()
        .and_then(process::ProcId::of);
    h.pid = found.map(|p| p.pid);
    h.vmm_start_time = found.map(|p| p.start_time);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process's uid, since `not_before`.
    fn anyone_since(not_before: i64) -> process::Expect {
        process::Expect {
            uid: nix::unistd::getuid().as_raw(),
            not_before,
        }
    }

    #[test]
    fn scratch_file_round_trip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_file(d.path()).is_empty(), "missing reads as empty");
        let h = VmHandles {
            pid: Some(42),
            tap_device: Some("bgtap3".into()),
            ..Default::default()
        };
        write_file(d.path(), &h).unwrap();
        assert_eq!(read_file(d.path()), h);
        std::fs::write(d.path().join(vmfiles::HANDLES), "{not json").unwrap();
        assert!(read_file(d.path()).is_empty(), "corrupt reads as empty");
        remove_file(d.path()).unwrap();
        remove_file(d.path()).unwrap();
    }

    #[test]
    fn rediscover_keeps_scratch_contents_when_the_process_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let h = VmHandles {
            pid: Some(i32::MAX - 1),
            tap_device: Some("bgtap9".into()),
            ..Default::default()
        };
        write_file(d.path(), &h).unwrap();
        let r = rediscover(d.path(), &d.path().join("api.sock"), anyone_since(0));
        assert_eq!(r.pid, None, "dead pid dropped");
        assert_eq!(r.tap_device.as_deref(), Some("bgtap9"));
    }

    #[test]
    fn rediscover_finds_the_process_by_its_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        // A process whose command line names the socket, as a VMM's does.
        std::fs::write(&sock, "").unwrap();
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&sock)
            .spawn()
            .unwrap();
        write_file(d.path(), &VmHandles::default()).unwrap();
        let pid = child.id() as i32;
        let mut r = VmHandles::default();
        for _ in 0..200 {
            r = rediscover(d.path(), &sock, anyone_since(0));
            if r.pid.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Not another user's, nor one older than its VM.
        let mut other = anyone_since(0);
        other.uid = other.uid.wrapping_add(4242);
        assert_eq!(rediscover(d.path(), &sock, other).pid, None);
        let later = anyone_since(banger_core::unix_now() + 3600);
        assert_eq!(rediscover(d.path(), &sock, later).pid, None);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r.pid, Some(pid));
        assert!(r.vmm_start_time.is_some(), "identified by its start time");
        let cache = HandleCache::default();
        cache.set("v", r.clone());
        assert_eq!(cache.get("v"), Some(r));
        assert!(cache.remove("v").is_some());
        assert!(cache.get("v").is_none());
    }
}
