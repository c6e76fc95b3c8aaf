//! Processes, found and checked through /proc. A process is identified by
//! its pid *and* its start time ([`ProcId`]), so a pid the kernel reused for
//! something else never counts. Searching by an argument (the seed's `pgrep
//! -f <apiSock>`) is only how a VMM is found again when every record of it
//! is lost; what is found is then identified the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The arguments of `pid` (argv), if it exists.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// The fields of /proc/PID/stat after the command name (which may contain
/// spaces or parentheses itself): field 3 (state) first.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    stat_fields_at(&format!("/proc/{pid}/stat"))
}

/// As [`stat_fields`], of a `stat` file (a process's or a thread's).
fn stat_fields_at(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let i = stat.rfind(')')?;
    Some(
        stat[i + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// Running and not a zombie.
pub fn is_running(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|st| !matches!(st.as_str(), "Z" | "X"))
}

/// The process's state letter (R, S, D, Z, T, ...).
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The process's threads: their ids and names (`comm`).
pub fn threads(pid: i32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_string()))
        })
        .collect()
}

/// A thread's state letter and its user plus system CPU time in clock
/// ticks.
pub fn thread_stat(pid: i32, tid: i32) -> Option<(char, u64)> {
    let f = stat_fields_at(&format!("/proc/{pid}/task/{tid}/stat"))?;
    let state = f.first()?.chars().next()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((state, ticks))
}

/// Whether every thread of the process is stopped (SIGSTOP: state `T`).
pub fn all_threads_stopped(pid: i32) -> bool {
    let ts = threads(pid);
    !ts.is_empty()
        && ts
            .iter()
            .all(|(tid, _)| matches!(thread_stat(pid, *tid), Some(('T' | 't', _))))
}

/// When the process started, in clock ticks after boot (field 22).
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// User plus system CPU time in clock ticks (fields 14 and 15).
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// A process's identity: its pid and its start time. A pid that the kernel
/// has given to a new process has another start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcId {
    /// The identity of the running process `pid`, if there is one.
    pub fn of(pid: i32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// This very process is still there (zombies included: a zombie still
    /// holds its pid, so the pid cannot have been reused).
    pub fn exists(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// This very process is still there and not a zombie.
    pub fn is_running(&self) -> bool {
        self.exists() && is_running(self.pid)
    }

    /// Sends `sig` if this is still the same process.
    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        if self.exists() {
            signal(self.pid, sig)
        } else {
            Ok(())
        }
    }

    /// Waits until the process is gone (or a zombie), up to `timeout`.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL (threads reniced first, see [`deprioritize`]) and wait.
    pub fn kill_and_wait(&self, timeout: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        deprioritize(self.pid);
        let _ = self.signal(Signal::SIGKILL);
        self.wait_gone(timeout)
    }
}

/// Whether `pid` is a running process with an argument containing `needle`.
pub fn matches(pid: i32, needle: &str) -> bool {
    is_running(pid)
        && cmdline(pid)
            .map(|args| args.iter().any(|a| a.contains(needle)))
            .unwrap_or(false)
}

/// The real uid `pid` runs as (`Uid:` of /proc/PID/status).
pub fn owner(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// When `pid` started, in Unix seconds (the boot time of /proc/stat plus
/// its start time in clock ticks).
pub fn started_unix(pid: i32) -> Option<i64> {
    let btime: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|h| *h > 0)?;
    let ticks = i64::try_from(start_time(pid)?).ok()?;
    Some(btime + ticks / hz)
}

/// What a process found again by its command line must also be: never a
/// substring alone. Its owner, and not older than the VM it would belong
/// to (a process another user started with that path among its arguments
/// is neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub uid: u32,
    /// Unix seconds: the VM's creation.
    pub not_before: i64,
}

impl Expect {
    pub fn admits(&self, pid: i32) -> bool {
        owner(pid) == Some(self.uid)
            // (A second of slack: both clocks round down.)
            && started_unix(pid).is_some_and(|t| t + 1 >= self.not_before)
    }
}

/// [`find_by_arg`], keeping only what `expect` admits.
pub fn find_by_arg_as(needle: &str, expect: Expect) -> Vec<i32> {
    find_by_arg(needle)
        .into_iter()
        .filter(|p| expect.admits(*p))
        .collect()
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

/// The processes (other than this one) with `path` open: `/proc/*/fd`
/// links compared by device and inode (the daemon that holds its state
/// dir's lock file, for `banger daemon stop`).
pub fn holders(path: &std::path::Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|fds| {
                    fds.flatten().any(|fd| {
                        std::fs::metadata(fd.path())
                            .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
                    })
                })
                .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether a Unix socket bound at `path` listens, as seen from `pid`'s
/// network namespace (`/proc/<pid>/net/unix`: `__SO_ACCEPTCON`, 0x10000,
/// in its flags). A socket file exists from `bind`, before `listen`: a
/// VMM that connects to it in between is refused.
pub fn listens_on(pid: i32, path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x1_0000;
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path: the path is
        // the rest of the line after the seventh field.
        let mut rest = line.trim_start();
        let mut flags = None;
        for i in 0..7 {
            let end = rest.find(' ').unwrap_or(rest.len());
            if i == 3 {
                flags = u32::from_str_radix(&rest[..end], 16).ok();
            }
            rest = rest[end..].trim_start_matches(' ');
        }
        rest.as_bytes() == want && flags.is_some_and(|f| f & ACCEPTCON != 0)
    })
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
    /// A socket that is only bound does not listen; once `listen` is
    /// called it does.
    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s p.sock");
        let me = std::process::id() as i32;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(&path).unwrap(),
        )
        .unwrap();
        assert!(path.exists());
        assert!(!super::listens_on(me, &path));
        listen(&fd, Backlog::new(1).unwrap()).unwrap();
        assert!(super::listens_on(me, &path));
        assert!(!super::listens_on(me, &d.path().join("s")));
    }

    #[test]
    fn holders_of_a_file_are_found_by_its_inode() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("lock");
        std::fs::write(&f, "").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&f).unwrap())
            .spawn()
            .unwrap();
        let found = super::holders(&f);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id() as i32]);
        assert!(super::holders(&d.path().join("none")).is_empty());
    }

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
        // Never by the argument alone: also its owner and its age.
        let now = started_unix(pid).unwrap();
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(owner(pid), Some(me));
        let ok = Expect {
            uid: me,
            not_before: now,
        };
        assert!(find_by_arg_as("30", ok).contains(&pid));
        let other_user = Expect {
            uid: me.wrapping_add(4242),
            ..ok
        };
        assert!(!find_by_arg_as("30", other_user).contains(&pid));
        let older = Expect {
            not_before: now + 3600,
            ..ok
        };
        assert!(
            !find_by_arg_as("30", older).contains(&pid),
            "started before its VM"
        );
        assert!(signal(pid, Signal::SIGKILL).is_ok());
        let _ = child.wait();
        assert!(!is_running(pid));
        assert!(signal(pid, Signal::SIGTERM).is_ok(), "gone is fine");
    }

    #[test]
    fn identity_is_pid_and_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let id = ProcId::of(pid).expect("a running child has a start time");
        assert!(id.is_running());
        assert!(
            matches!(state(pid), Some('R' | 'S' | 'D')),
            "a live process: {:?}",
            state(pid)
        );
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_bytes(std::process::id() as i32).unwrap() > 0);
        let recycled = ProcId {
            pid,
            start_time: id.start_time + 1,
        };
        assert!(!recycled.exists(), "another start time is another process");
        assert!(recycled.signal(Signal::SIGKILL).is_ok());
        assert!(id.is_running(), "a stale identity signals nothing");
        assert!(id.kill_and_wait(Duration::from_secs(5)));
        let _ = child.wait();
        assert!(!id.exists());
        assert!(ticks_per_sec() >= 1);
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
