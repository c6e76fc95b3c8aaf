//! Containers' control groups in the guest (cgroup v2): one per container
//! under `/sys/fs/cgroup/banger/`, which its processes join as they start
//! (the child writes `0` to its `cgroup.procs` before exec), with the
//! memory and CPU limits of its spec, changed by containerd's `update`,
//! and read back for its metrics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use banger_agent::proto::{CgroupSample, Limits};

/// Where cgroup2 is (mounted here by the agent when the guest's init did
/// not).
const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's.
const PARENT: &str = "banger";
/// The controllers containers get.
const CONTROLLERS: &str = "+memory +cpu +pids";

static MAKING: Mutex<()> = Mutex::new(());

pub use banger_agent::proto::check_cgroup_name as check_name;

fn dir(name: &str) -> PathBuf {
    Path::new(ROOT).join(PARENT).join(name)
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cgroup: write {value:?} to {}: {e}", path.display()))
}

/// cgroup2 at [`ROOT`], the controllers on for containers, and `name`'s
/// group made; its `cgroup.procs`, opened for the child to join.
pub fn prepare(name: &str) -> Result<File, String> {
    check_name(name)?;
    let _one = MAKING.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(ROOT);
    if !root.join("cgroup.controllers").exists() {
        nix::mount::mount(
            Some("cgroup2"),
            root,
            Some("cgroup2"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| format!("cgroup: mount cgroup2 on {ROOT}: {e}"))?;
    }
    let parent = root.join(PARENT);
    // The controllers on at each level, whatever an earlier try left.
    enable(root)?;
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cgroup: mkdir {}: {e}", parent.display())),
    }
    enable(&parent)?;
    let d = dir(name);
    match std::fs::create_dir(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cgroup: mkdir {}: {e}", d.display())),
    }
    let procs = d.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| format!("cgroup: open {}: {e}", procs.display()))
}

/// The containers' controllers in `dir`'s subtree, unless they are.
fn enable(dir: &Path) -> Result<(), String> {
    let f = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&f).unwrap_or_default();
    let missing = CONTROLLERS.split(' ').any(|c| {
        !on.split_whitespace()
            .any(|o| o == c.trim_start_matches('+'))
    });
    if missing {
        write(&f, CONTROLLERS)?;
    }
    Ok(())
}

/// Sets `name`'s limits (what is `None` is left as it is; 0 lifts one).
pub fn limit(name: &str, l: &Limits) -> Result<(), String> {
    prepare(name)?;
    let d = dir(name);
    if let Some(m) = l.memory_max {
        let v = if m == 0 {
            "max".to_string()
        } else {
            m.to_string()
        };
        write(&d.join("memory.max"), &v)?;
    }
    if let Some((quota, period)) = l.cpu_max {
        let period = if period == 0 { 100_000 } else { period };
        let v = if quota == 0 {
            format!("max {period}")
        } else {
            format!("{quota} {period}")
        };
        write(&d.join("cpu.max"), &v)?;
    }
    Ok(())
}

/// Sends `signal` to every process of `name` (SIGKILL through
/// `cgroup.kill`, which no fork outruns; 0 only lists them); the pids.
pub fn signal(name: &str, signal: i32) -> Result<Vec<u32>, String> {
    check_name(name)?;
    if !(0..=64).contains(&signal) {
        return Err(format!("{signal} is not a signal"));
    }
    let d = dir(name);
    let procs = match std::fs::read_to_string(d.join("cgroup.procs")) {
        Ok(p) => p,
        // No process of it ever started: none to signal.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cgroup {name}: read cgroup.procs: {e}")),
    };
    let pids: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if signal == nix::libc::SIGKILL {
        write(&d.join("cgroup.kill"), "1")?;
    } else if signal != 0 {
        for pid in &pids {
            // SAFETY: kill(2) takes a pid and a signal number only. A
            // process gone meanwhile is no error.
            unsafe { nix::libc::kill(*pid as i32, signal) };
        }
    }
    Ok(pids)
}

/// Kills every process of `name` and removes it once empty (2 s at most:
/// a cgroup still emptying is left, and goes with the VM).
pub fn remove(name: &str) -> Result<(), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::{Read, Seek};
    check_name(name)?;
    let d = dir(name);
    if !d.exists() {
        return Ok(());
    }
    write(&d.join("cgroup.kill"), "1")?;
    // cgroup.events says when it is empty, and wakes a poll on a change.
    let events = d.join("cgroup.events");
    let mut f = std::fs::File::open(&events)
        .map_err(|e| format!("cgroup {name}: open cgroup.events: {e}"))?;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut s = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
        if s.lines().any(|l| l.trim() == "populated 0") {
            break;
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(()); // still emptying: left to the VM's end
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&f),
            PollFlags::POLLPRI,
        )];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
    match std::fs::remove_dir(&d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cgroup {name}: rmdir: {e}")),
    }
}

/// What `name` uses now.
pub fn sample(name: &str) -> Result<CgroupSample, String> {
    check_name(name)?;
    let d = dir(name);
    let read = |f: &str| {
        std::fs::read_to_string(d.join(f)).map_err(|e| format!("cgroup {name}: read {f}: {e}"))
    };
    let number = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
    let cpu = read("cpu.stat")?;
    let field = |k: &str| {
        cpu.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(CgroupSample {
        memory_bytes: number(&read("memory.current")?),
        memory_max: number(&read("memory.max")?),
        cpu_usec: field("usage_usec "),
        cpu_user_usec: field("user_usec "),
        cpu_system_usec: field("system_usec "),
        pids: number(&read("pids.current")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("t1-9f3a").is_ok());
        for bad in ["", "../x", "a/b", "UP", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
