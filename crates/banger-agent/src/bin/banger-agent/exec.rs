//! Processes started for the host: with pipes or a PTY, attached to the
//! connection that started them or detached (output kept for a later
//! attach), listed, given input and signalled by pid or tag.
//!
//! Each process has pump threads that read its output and write it to the
//! attached connection (blocking: the connection's flow control is the
//! process's backpressure) or, with nobody attached, keep the last
//! [`KEEP_OUTPUT`] bytes. A waiter thread reaps it, lets the pumps drain,
//! and sends the exit status.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use banger_agent::proto::{
    read_frame, write_frame, write_msg, ExecSpec, ExitStatus, Frame, Kind, Msg, ProcInfo,
    ProtoError, Target, WinSize, KEEP_OUTPUT, MAX_ARGS,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Finished detached processes kept for `ps` and a late attach.
const KEEP_EXITED: usize = 64;
/// How long output may go on after the process exited (a background child
/// holding its stdout) before the exit is reported anyway.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

type Sink = Arc<Mutex<UnixStream>>;

struct Proc {
    pid: u32,
    tag: Option<String>,
    argv: Vec<String>,
    tty: bool,
    detached: bool,
    started: u64,
    stdin: Mutex<Option<File>>,
    /// The PTY's master, for resizes.
    master: Option<File>,
    st: Mutex<State>,
    cv: Condvar,
}

#[derive(Default)]
struct State {
    /// The connections attached to it: its output goes to each (at most
    /// [`SINKS_MAX`]).
    sinks: Vec<Sink>,
    kept: VecDeque<(Kind, Vec<u8>)>,
    kept_bytes: usize,
    pumps: usize,
    exit: Option<ExitStatus>,
}

fn table() -> MutexGuard<'static, HashMap<u32, Arc<Proc>>> {
    static T: OnceLock<Mutex<HashMap<u32, Arc<Proc>>>> = OnceLock::new();
    T.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn find(target: &Target) -> Result<Arc<Proc>, String> {
    let t = table();
    let found = match target {
        Target::Pid(p) => t.get(p).cloned(),
        Target::Tag(tag) => t.values().find(|p| p.tag.as_deref() == Some(tag)).cloned(),
    };
    found.ok_or_else(|| format!("no process with {target} (see `banger vm ps`)"))
}

pub fn ps() -> Vec<ProcInfo> {
    let mut list: Vec<ProcInfo> = table()
        .values()
        .map(|p| {
            let st = lock(&p.st);
            ProcInfo {
                pid: p.pid,
                tag: p.tag.clone(),
                argv: p.argv.clone(),
                tty: p.tty,
                detached: p.detached,
                started: p.started,
                exit: st.exit,
                attached: !st.sinks.is_empty(),
            }
        })
        .collect();
    list.sort_by_key(|p| p.pid);
    list
}

pub fn signal(target: &Target, signal: i32) -> Result<(), String> {
    let p = find(target)?;
    send_signal(&p, signal)
}

/// Resizes the PTY of a process that has one.
pub fn resize(target: &Target, ws: WinSize) -> Result<(), String> {
    let p = find(target)?;
    if lock(&p.st).exit.is_some() {
        return Err(format!("process {} has exited", p.pid));
    }
    match &p.master {
        Some(m) => set_winsize(m, ws),
        None => Err(format!("process {} has no PTY to resize", p.pid)),
    }
}

fn send_signal(p: &Proc, signal: i32) -> Result<(), String> {
    // Real-time signals too (32 to 64), which nix's `Signal` does not name.
    if !(1..=64).contains(&signal) {
        return Err(format!("{signal} is not a signal"));
    }
    if lock(&p.st).exit.is_some() {
        return Err(format!("process {} has exited", p.pid));
    }
    // SAFETY: kill(2) takes a pid and a signal number and touches no memory.
    if unsafe { nix::libc::kill(p.pid as i32, signal) } < 0 {
        return Err(format!(
            "signal process {}: {}",
            p.pid,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A user as docker's `-u`: `name|uid[:group|gid]`, from the guest's
/// /etc/passwd and /etc/group (no NSS in a static binary).
#[derive(Debug)]
struct User {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: String,
    name: String,
}

/// `spec`'s user, from the passwd and group files under `root` (the
/// guest's own, or a container's).
fn lookup_user(spec: Option<&str>, root: &str) -> Result<User, String> {
    let spec = spec.unwrap_or("root");
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // Read within the root, as it sees them (its own symbolic links), a
    // regular file of at most 1 MiB each: an image's are the image's.
    let root = match root.trim_end_matches('/') {
        "" => "/",
        r => r,
    };
    let whose = if root == "/" { "guest" } else { "container" };
    let passwd = crate::container::read_small(root, "/etc/passwd")?;
    let groups = crate::container::read_small(root, "/etc/group")?;
    // A number is a uid (never a name that looks like one: an image's
    // line "1000:x:0:0:..." does not make uid 1000 root).
    let numeric = user.parse::<u32>().is_ok();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && if numeric { f[2] == user } else { f[0] == user });
    let (uid, mut gid, home, name) = match entry {
        Some(f) => (
            f[2].parse().map_err(|_| format!("bad uid for {user}"))?,
            f[3].parse().map_err(|_| format!("bad gid for {user}"))?,
            f[5].to_string(),
            f[0].to_string(),
        ),
        // An image without /etc/passwd (a bare busybox tree) still has root.
        None if user == "root" => (0, 0, "/root".to_string(), "root".to_string()),
        None => match user.parse::<u32>() {
            Ok(uid) => (uid, uid, "/".to_string(), user.to_string()),
            Err(_) => return Err(format!("no user {user:?} in the {whose}'s /etc/passwd")),
        },
    };
    let gfields: Vec<Vec<&str>> = groups.lines().map(|l| l.split(':').collect()).collect();
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => match gfields.iter().find(|f| f.len() >= 3 && f[0] == g) {
                Some(f) => f[2].parse().map_err(|_| format!("bad gid for group {g}"))?,
                None => return Err(format!("no group {g:?} in the {whose}'s /etc/group")),
            },
        };
    }
    let mut sup: Vec<u32> = gfields
        .iter()
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == name))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    sup.push(gid);
    sup.sort_unstable();
    sup.dedup();
    Ok(User {
        uid,
        gid,
        groups: sup,
        home,
        name,
    })
}

/// Where the command starts: `-w DIR`, checked here so that a failure
/// names the directory and why (the spawn's own error would blame the
/// command), or the user's home, or `/` when the home is not a directory
/// the user can enter (nobody's `/nonexistent`), as `su` and docker do.
fn workdir(asked: Option<&str>, user: &User, root: &str) -> Result<String, String> {
    let root = root.trim_end_matches('/');
    if !root.is_empty() {
        // A container's: its own (OCI's default is /), looked up inside it
        // as it sees it; the child enters it after its chroot, as the
        // user (the kernel has the word on permissions).
        let dir = asked.unwrap_or("/");
        if !dir.starts_with('/') {
            return Err(format!(
                "exec: working directory {dir:?}: not an absolute path"
            ));
        }
        crate::container::is_dir_in(root, dir)
            .map_err(|why| format!("exec: working directory {dir:?}: {why}"))?;
        return Ok(dir.to_string());
    }
    let Some(dir) = asked else {
        return Ok(if enterable(&user.home, user).is_ok() {
            user.home.clone()
        } else {
            "/".into()
        });
    };
    // Absolute, as docker's: the command is started in it twice (as root,
    // then as the user), from different places.
    if !dir.starts_with('/') {
        return Err(format!(
            "exec: working directory {dir:?}: not an absolute path (-w /{dir}?)"
        ));
    }
    enterable(dir, user).map_err(|why| format!("exec: working directory {dir:?}: {why}"))?;
    Ok(dir.to_string())
}

/// Whether `user` can make `dir` its working directory: it exists, is a
/// directory, and they may search it and every directory on the way to
/// it (root may search any, mode 000 too: CAP_DAC_OVERRIDE). Mode bits
/// only; the child enters the directory again as the user
/// (`spawn`), so an ACL that refuses them is enforced all the same.
fn enterable(dir: &str, user: &User) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such directory in the guest".to_string(),
        _ => e.to_string(),
    })?;
    if !m.is_dir() {
        return Err("not a directory".into());
    }
    if user.uid == 0 {
        return Ok(());
    }
    let searchable = |m: &std::fs::Metadata| {
        let bits = if m.uid() == user.uid {
            0o100
        } else if user.groups.contains(&m.gid()) {
            0o010
        } else {
            0o001
        };
        m.mode() & bits != 0
    };
    if !searchable(&m) {
        return Err(format!(
            "{} may not enter it (mode {:04o})",
            user.name,
            m.mode() & 0o7777
        ));
    }
    // The directories on the way (`/root` of `/root/sub`).
    let mut on_the_way = std::path::Path::new(dir).ancestors().skip(1);
    if let Some((a, m)) = on_the_way.find_map(|a| {
        let m = std::fs::metadata(a).ok()?;
        (!searchable(&m)).then(|| (a.to_path_buf(), m))
    }) {
        return Err(format!(
            "{} may not pass through {} (mode {:04o})",
            user.name,
            a.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

fn validate(spec: &ExecSpec) -> Result<(), String> {
    if spec.argv.is_empty() {
        return Err("exec: no command".into());
    }
    if spec.argv.len() + spec.env.len() > MAX_ARGS {
        return Err(format!("exec: over {MAX_ARGS} arguments and variables"));
    }
    for (k, _) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("exec: {k:?} is not an environment variable name"));
        }
    }
    if spec
        .argv
        .iter()
        .chain(spec.env.iter().map(|(_, v)| v))
        .any(|a| a.contains('\0'))
    {
        return Err("exec: an argument or value holds a NUL byte".into());
    }
    if let Some(tag) = &spec.tag {
        if tag.is_empty() || tag.len() > 64 || tag.parse::<u32>().is_ok() {
            return Err(format!(
                "exec: tag {tag:?} must be 1-64 characters and not a number"
            ));
        }
        if table()
            .values()
            .any(|p| p.tag.as_deref() == Some(tag) && lock(&p.st).exit.is_none())
        {
            return Err(format!("exec: a running process already has tag {tag:?}"));
        }
    }
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn set_winsize(fd: &impl AsRawFd, ws: WinSize) -> Result<(), String> {
    let w = nix::libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which
    // points to a live local of that type; the fd is a PTY master we own.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &w) };
    if r < 0 {
        return Err(format!("resize: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Starts the process; what it reads and writes is wired up by the caller.
fn spawn(spec: &ExecSpec) -> Result<Arc<Proc>, String> {
    validate(spec)?;
    // Its cgroup's `cgroup.procs`, which the child writes itself into.
    let join_cgroup = match spec.container.as_ref().and_then(|c| c.cgroup.as_deref()) {
        Some(name) => Some(crate::cgroup::prepare(name)?),
        None => None,
    };
    // (Before the root's /sys is bound: the container sees cgroup2.)
    let root = match &spec.container {
        Some(c) => {
            crate::container::prepare(c)?;
            c.root.clone()
        }
        None => String::new(),
    };
    let mut user = lookup_user(spec.user.as_deref(), &root)?;
    if let Some(groups) = spec.container.as_ref().and_then(|c| c.groups.as_ref()) {
        user.groups = groups.clone();
        user.groups.push(user.gid);
        user.groups.sort_unstable();
        user.groups.dedup();
    }
    let rlimits: Vec<(u32, nix::libc::rlimit)> = match &spec.container {
        Some(c) => c
            .rlimits
            .iter()
            .map(|r| {
                banger_agent::proto::rlimit_resource(&r.kind)
                    .ok_or_else(|| format!("exec: unknown rlimit {:?}", r.kind))
                    .map(|n| {
                        (
                            n,
                            nix::libc::rlimit {
                                rlim_cur: r.soft,
                                rlim_max: r.hard,
                            },
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let join_fd = join_cgroup.as_ref().map(|f| f.as_raw_fd());
    let root_c = (!root.is_empty())
        .then(|| std::ffi::CString::new(root.as_str()))
        .transpose()
        .map_err(|_| format!("exec: container root {root:?} holds a NUL byte"))?;
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear();
    cmd.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    cmd.env("HOME", &user.home);
    cmd.env("USER", &user.name);
    cmd.env("LOGNAME", &user.name);
    let hostname = spec.container.as_ref().and_then(|c| c.hostname.clone());
    match &hostname {
        Some(h) => {
            cmd.env("HOSTNAME", h);
        }
        None => {
            if let Ok(h) = nix::unistd::gethostname() {
                cmd.env("HOSTNAME", h);
            }
        }
    }
    let hostname_c = hostname
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| "exec: a hostname holds a NUL byte".to_string())?;
    if spec.tty.is_some() {
        cmd.env("TERM", "xterm");
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let cwd = workdir(spec.cwd.as_deref(), &user, &root)?;
    if root.is_empty() {
        cmd.current_dir(&cwd);
    }
    // Entered again once the child is the user: the kernel's own check.
    let cwd_c = std::ffi::CString::new(cwd.as_str())
        .map_err(|_| format!("exec: working directory {cwd:?} holds a NUL byte"))?;
    let mut master = None;
    let mut out_pipes = None;
    let mut stdin_w = None;
    if let Some(ws) = spec.tty {
        let pty = nix::pty::openpty(None, None).map_err(|e| format!("open a pty: {e}"))?;
        let m = File::from(pty.master);
        set_winsize(&m, ws)?;
        let slave = File::from(pty.slave);
        let dup = |f: &File| {
            f.try_clone()
                .map(Stdio::from)
                .map_err(|e| format!("pty: {e}"))
        };
        cmd.stdin(dup(&slave)?)
            .stdout(dup(&slave)?)
            .stderr(Stdio::from(slave));
        stdin_w = Some(m.try_clone().map_err(|e| format!("pty: {e}"))?);
        master = Some(m);
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if spec.stdin || spec.detach {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        out_pipes = Some(());
    }
    let tty = spec.tty.is_some();
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (setsid, ioctl, write, chroot,
    // unshare, sethostname, setrlimit, setgroups, setgid, setuid, chdir,
    // signal) on values computed before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A container's process: its cgroup, its root, then its limits
            // (set while still root, so a hard limit may be raised), then
            // its user.
            if let Some(fd) = join_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(r) = &root_c {
                if libc::chroot(r.as_ptr()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Its hostname, in a UTS namespace of its own.
            if let Some(h) = &hostname_c {
                if libc::unshare(libc::CLONE_NEWUTS) < 0
                    || libc::sethostname(h.as_ptr(), h.as_bytes().len()) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (resource, limit) in &rlimits {
                if libc::setrlimit(*resource, limit) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent ignores SIGPIPE (Rust's runtime); its children get
            // the default back, as from a shell.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("exec {:?}: {e}", spec.argv[0]))?;
    drop(cmd); // the parent's copies of the PTY's slave
    let pid = child.id();
    if out_pipes.is_some() {
        stdin_w = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    }
    let p = Arc::new(Proc {
        pid,
        tag: spec.tag.clone(),
        argv: spec.argv.clone(),
        tty,
        detached: spec.detach,
        started: now(),
        stdin: Mutex::new(stdin_w),
        master,
        st: Mutex::new(State::default()),
        cv: Condvar::new(),
    });
    let mut outputs: Vec<(Kind, File)> = Vec::new();
    if let Some(m) = &p.master {
        outputs.push((
            Kind::Stdout,
            m.try_clone().map_err(|e| format!("pty: {e}"))?,
        ));
    }
    if let Some(o) = child.stdout.take() {
        outputs.push((Kind::Stdout, File::from(OwnedFd::from(o))));
    }
    if let Some(e) = child.stderr.take() {
        outputs.push((Kind::Stderr, File::from(OwnedFd::from(e))));
    }
    lock(&p.st).pumps = outputs.len();
    table().insert(pid, p.clone());
    for (kind, f) in outputs {
        let p = p.clone();
        std::thread::spawn(move || pump(&p, kind, f));
    }
    let waiter = p.clone();
    std::thread::spawn(move || wait(&waiter, child));
    Ok(p)
}

fn pump(p: &Proc, kind: Kind, mut f: File) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // A PTY's master reads EIO once the last slave is closed: its end.
        let n = match f.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let sinks = {
            let mut st = lock(&p.st);
            if st.sinks.is_empty() {
                st.kept_bytes += n;
                st.kept.push_back((kind, buf[..n].to_vec()));
                while st.kept_bytes > KEEP_OUTPUT {
                    match st.kept.pop_front() {
                        Some((_, b)) => st.kept_bytes -= b.len(),
                        None => break,
                    }
                }
                continue;
            }
            st.sinks.clone()
        };
        for sink in &sinks {
            if write_frame(&mut *lock(sink), kind, &buf[..n]).is_err() {
                gone(p, sink);
            }
        }
    }
    let mut st = lock(&p.st);
    st.pumps -= 1;
    p.cv.notify_all();
}

/// An attached connection failed or left: a detached process carries on
/// (with its other clients, or alone), an attached one is killed with its
/// last session (as ssh's would be).
fn gone(p: &Proc, sink: &Sink) {
    let mut st = lock(&p.st);
    let before = st.sinks.len();
    st.sinks.retain(|s| !Arc::ptr_eq(s, sink));
    if st.sinks.len() < before && st.sinks.is_empty() && !p.detached && st.exit.is_none() {
        let _ = kill(Pid::from_raw(-(p.pid as i32)), Signal::SIGKILL);
    }
}

/// Connections attached to one process at once at most.
const SINKS_MAX: usize = 16;

fn wait(p: &Proc, mut child: std::process::Child) {
    let status = child.wait().ok();
    let exit = match status {
        Some(s) => ExitStatus {
            code: s.code(),
            signal: s.signal(),
        },
        None => ExitStatus {
            code: None,
            signal: None,
        },
    };
    let mut st = lock(&p.st);
    let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
    while st.pumps > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        st =
            p.cv.wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
    }
    st.exit = Some(exit);
    *lock(&p.stdin) = None;
    for sink in std::mem::take(&mut st.sinks) {
        let mut s = lock(&sink);
        let _ = write_msg(&mut *s, &Msg::Exited(exit));
        // Wakes the connection's reader: the call is over.
        let _ = s.shutdown(Shutdown::Read);
    }
    p.cv.notify_all();
    drop(st);
    let mut t = table();
    if !p.detached {
        t.remove(&p.pid);
    } else {
        let mut done: Vec<(u64, u32)> = t
            .values()
            .filter(|q| q.detached && lock(&q.st).exit.is_some())
            .map(|q| (q.started, q.pid))
            .collect();
        done.sort_unstable();
        for (_, pid) in done.iter().take(done.len().saturating_sub(KEEP_EXITED)) {
            t.remove(pid);
        }
    }
}

/// The host's side of a running call: stdin, stdin's end, signals and
/// resizes, until the connection ends.
fn serve_input(p: &Proc, c: &mut UnixStream, until_done: bool) -> Result<(), ProtoError> {
    loop {
        match read_frame(c)? {
            None => return Ok(()),
            Some(Frame::Bytes(Kind::Stdin, data)) => {
                let mut stdin = lock(&p.stdin);
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&data).is_err() {
                        // The process closed its stdin: later input is
                        // dropped, as a pipe's reader that went away.
                        *stdin = None;
                    }
                }
            }
            Some(Frame::Msg(Msg::CloseStdin)) => *lock(&p.stdin) = None,
            Some(Frame::Msg(Msg::Signal { signal })) => {
                if let Err(e) = send_signal(p, signal) {
                    crate::log(&e);
                }
            }
            Some(Frame::Msg(Msg::Resize(ws))) => {
                if let Some(m) = &p.master {
                    let _ = set_winsize(m, ws);
                }
            }
            Some(Frame::Msg(Msg::Done)) if until_done => return Ok(()),
            Some(other) => {
                return Err(ProtoError::Unexpected(format!("{other:?}")));
            }
        }
    }
}

pub fn exec(mut c: UnixStream, spec: ExecSpec) -> Result<(), ProtoError> {
    match spawn(&spec) {
        Ok(p) => join(&p, c, spec.detach),
        Err(e) => write_msg(&mut c, &Msg::error(e)),
    }
}

pub fn attach(mut c: UnixStream, target: &Target) -> Result<(), ProtoError> {
    match find(target) {
        Ok(p) => join(&p, c, false),
        Err(e) => write_msg(&mut c, &Msg::error(e)),
    }
}

/// Makes the connection one of the process's sinks: its pid, the output
/// kept while no one was attached, then live output (or its exit, if it
/// is over); then serves the connection's input until it ends. A detached
/// exec only gets the pid. Several clients may be attached at once, each
/// getting all of the output from its attach on.
fn join(p: &Proc, mut c: UnixStream, detach: bool) -> Result<(), ProtoError> {
    let sink: Sink = Arc::new(Mutex::new(c.try_clone()?));
    {
        let mut st = lock(&p.st);
        if st.sinks.len() >= SINKS_MAX && !detach {
            drop(st);
            return write_msg(
                &mut c,
                &Msg::error(format!(
                    "process {} has {SINKS_MAX} clients attached already",
                    p.pid
                )),
            );
        }
        let mut w = lock(&sink);
        write_msg(&mut *w, &Msg::Started { pid: p.pid })?;
        if detach {
            return write_msg(&mut *w, &Msg::Done);
        }
        for (kind, data) in st.kept.drain(..) {
            write_frame(&mut *w, kind, &data)?;
        }
        st.kept_bytes = 0;
        if let Some(exit) = st.exit {
            return write_msg(&mut *w, &Msg::Exited(exit));
        }
        st.sinks.push(sink.clone());
    }
    let r = serve_input(p, &mut c, false);
    gone(p, &sink);
    r
}

pub fn input(mut c: UnixStream, target: &Target) -> Result<(), ProtoError> {
    let p = match find(target) {
        Ok(p) => p,
        Err(e) => return write_msg(&mut c, &Msg::error(e)),
    };
    serve_input(&p, &mut c, true)?;
    write_msg(&mut c, &Msg::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_are_refused_before_anything_runs() {
        let spec = |argv: &[&str]| ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(validate(&spec(&[])).is_err());
        assert!(validate(&spec(&["a\0b"])).is_err());
        let mut s = spec(&["true"]);
        s.env = vec![("A=B".into(), "c".into())];
        assert!(validate(&s).is_err());
        s.env = vec![];
        s.tag = Some("123".into());
        assert!(validate(&s).unwrap_err().contains("not a number"));
        s.tag = Some("web".into());
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn a_working_directory_is_checked_and_a_missing_home_is_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("wd");
        std::fs::create_dir(&d).unwrap();
        let user = |uid: u32, home: &str| User {
            uid,
            gid: uid,
            groups: vec![uid],
            home: home.into(),
            name: format!("u{uid}"),
        };
        let dir = d.to_str().unwrap();
        assert_eq!(workdir(None, &user(0, dir), "").unwrap(), dir);
        assert_eq!(
            workdir(None, &user(65534, "/nonexistent"), "").unwrap(),
            "/"
        );
        let e = workdir(Some("/nonexistent"), &user(0, "/"), "").unwrap_err();
        assert!(e.contains("\"/nonexistent\": no such directory"), "{e}");
        let e = workdir(Some("/etc/hostname"), &user(0, "/"), "").unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        let e = workdir(Some("tmp"), &user(0, "/"), "").unwrap_err();
        assert!(e.contains("not an absolute path (-w /tmp?)"), "{e}");
        // 0700 and root's: another user may not enter it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = workdir(Some(dir), &user(4242, "/"), "").unwrap_err();
        assert!(e.contains("u4242 may not enter it"), "{e}");
        assert_eq!(workdir(None, &user(4242, dir), "").unwrap(), "/");
        // A directory anyone may enter, inside one they may not reach.
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = workdir(Some(sub.to_str().unwrap()), &user(4242, "/"), "").unwrap_err();
        assert!(
            e.contains(&format!("u4242 may not pass through {dir} (mode 0700)")),
            "{e}"
        );
        assert!(workdir(Some(sub.to_str().unwrap()), &user(0, "/"), "").is_ok());
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert_eq!(
            workdir(Some(dir), &user(0, "/"), "").unwrap(),
            dir,
            "root enters any"
        );
    }

    #[test]
    fn users_resolve_from_passwd() {
        let root = lookup_user(None, "/").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user(Some("0:0"), "/").unwrap().uid, 0);
        let n = lookup_user(Some("4242"), "/").unwrap();
        assert_eq!(
            (n.uid, n.gid),
            (4242, 4242),
            "a bare uid is allowed, as docker's"
        );
        assert!(lookup_user(Some("no-such-user-here"), "/")
            .unwrap_err()
            .contains("/etc/passwd"));
    }

    #[test]
    fn a_containers_users_and_directories_are_its_own() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("srv/app")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/srv/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "extra:x:77:app\n").unwrap();
        let u = lookup_user(Some("app"), r).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1234, 2345, "/srv/app"));
        assert_eq!(u.groups, vec![77, 2345], "the container's /etc/group");
        assert!(lookup_user(Some("app"), "/").is_err(), "not the guest's");
        // Its working directory is looked for inside it, OCI's default /.
        assert_eq!(workdir(Some("/srv/app"), &u, r).unwrap(), "/srv/app");
        assert_eq!(workdir(None, &u, r).unwrap(), "/");
        let e = workdir(Some("/nowhere"), &u, r).unwrap_err();
        assert!(e.contains("\"/nowhere\": no such directory"), "{e}");
        // What is above the root (the guest's 0700 pod directory) is not on
        // the container's way.
        use std::os::unix::fs::PermissionsExt;
        let pod = tempfile::tempdir().unwrap();
        let inner = pod.path().join("c/rootfs");
        std::fs::create_dir_all(inner.join("srv/app")).unwrap();
        std::fs::set_permissions(pod.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let inner_r = inner.to_str().unwrap();
        assert_eq!(workdir(Some("/srv/app"), &u, inner_r).unwrap(), "/srv/app");
        // Looked up inside the root: an absolute link is the container's.
        std::os::unix::fs::symlink("/srv", inner.join("link")).unwrap();
        assert_eq!(
            workdir(Some("/link/app"), &u, inner_r).unwrap(),
            "/link/app"
        );
        let e = workdir(Some("/srv/app/../../../.."), &u, inner_r);
        assert!(e.is_ok(), "`..` stays in the root: {e:?}");
        // A hostile image: a name that looks like a uid is not one, and
        // /etc/passwd that is not a file is refused, not read.
        std::fs::write(
            root.path().join("etc/passwd"),
            "1234:x:0:0::/root:/bin/sh\napp:x:1234:2345::/srv/app:/bin/sh\n",
        )
        .unwrap();
        let u = lookup_user(Some("1234"), r).unwrap();
        assert_eq!((u.uid, u.name.as_str()), (1234, "app"));
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        // (A link out lands inside the root: the guest's /dev/zero is not
        // read through it.)
        std::os::unix::fs::symlink("/dev/zero", root.path().join("etc/passwd")).unwrap();
        assert!(lookup_user(Some("app"), r).is_err());
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(
            &root.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let e = lookup_user(Some("app"), r).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
