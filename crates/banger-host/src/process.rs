//! Processes, found and checked through /proc. A VMM is identified by its
//! API socket path appearing in its command line (the seed's `pgrep -f
//! <apiSock>`), so a PID that was reused by something else never counts.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Running and not a zombie.
pub fn is_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain
    // spaces or parentheses itself.
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
        None => false,
    }
}

/// Whether `pid` is a running process with an argument containing `needle`.
pub fn matches(pid: i32, needle: &str) -> bool {
    is_running(pid)
        && cmdline(pid)
            .map(|args| args.iter().any(|a| a.contains(needle)))
            .unwrap_or(false)
}

/// All running processes that have an argument containing `needle`.
pub fn find_by_arg(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && matches(*pid, needle))
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends `sig`; a process that is already gone is not an error.
pub fn signal(pid: i32, sig: Signal) -> nix::Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        r => r,
    }
}

/// Sets every thread of `pid` to the lowest priority (nice 19); for a
/// process about to be killed, so that its threads' exit (a VMM frees its
/// guest memory as it goes) yields the CPU to whoever waits on the kill.
/// Best effort: threads that are gone are skipped.
pub fn deprioritize(pid: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            let _ = set_thread_nice(tid, 19);
        }
    }
}

/// Sets the nice value of one thread (`tid`); 0 means the calling thread.
pub fn set_thread_nice(tid: u32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers; for PRIO_PROCESS and a
    // thread id it changes that thread's nice value only.
    let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until `pid` is no longer running (or is a zombie), up to `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if !is_running(pid) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        // A killed VMM is gone within tens of milliseconds; a fine poll
        // keeps teardown from waiting longer than it has to.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILL and wait; returns whether it is gone.
pub fn kill_and_wait(pid: i32, timeout: Duration) -> bool {
    deprioritize(pid);
    let _ = signal(pid, Signal::SIGKILL);
    wait_gone(pid, timeout)
}

pub fn path_needle(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_kills_by_argument() {
        let marker = format!("banger-proc-test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("X", &marker)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(is_running(pid));
        // Until the child has exec'd, its command line is the parent's.
        let end = Instant::now() + Duration::from_secs(5);
        while !matches(pid, "30") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches(pid, "30"));
        assert!(find_by_arg("30").contains(&pid));
        assert!(!matches(pid, &marker), "env is not the command line");
        assert!(find_by_arg("no-such-arg-anywhere-banger").is_empty());
        assert!(signal(pid, Signal::SIGKILL).is_ok());
        let _ = child.wait();
        assert!(!is_running(pid));
        assert!(signal(pid, Signal::SIGTERM).is_ok(), "gone is fine");
    }

    #[test]
    fn zombies_are_not_running() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it exits.
        assert!(wait_gone(pid, Duration::from_secs(5)));
        drop(child);
    }
}
