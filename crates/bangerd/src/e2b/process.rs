//! envd's `process.Process` on the guest agent: a process started
//! detached (it outlives the stream that started it, as envd's do) and
//! streamed by an attach (`start`, `data`, `end`, keepalives), its life
//! bounded by `Connect-Timeout-Ms`; input, signals, the list.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_agent::client::Session;
use banger_agent::proto::{Call, ExecSpec, Msg, Target, WinSize};
use banger_core::VmRecord;
use base64::Engine;
use serde_json::{json, Value};

use super::envd::{agent_call, resolve, rpc, RpcErr, B64, CALL_WITHIN};
use super::http::{Chunked, Request};
use crate::daemon::Daemon;

/// Keepalives on a quiet stream, unless the client asks more often.
const KEEPALIVE: Duration = Duration::from_secs(50);

/// `Start`: the process started detached (it outlives this stream), then
/// attached to; whether its stdin is to be closed at once.
/// `Start`: the process started detached (it outlives this stream), its
/// end scheduled at `Connect-Timeout-Ms`, then attached to: the session,
/// whether its stdin is to be closed at once, whether it has a PTY.
pub(super) fn start(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    v: &Value,
    user: Option<&str>,
) -> Result<Started, RpcErr> {
    let p = &v["process"];
    let cmd = p["cmd"]
        .as_str()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| rpc("invalid_argument", "process.cmd"))?;
    let args: Vec<String> = p["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    // E2B's commands are a login bash; an image without bash runs them
    // with its sh (a fixed script: the command stays an argument). Whether
    // it has one is asked once per VM.
    let argv: Vec<String> = if cmd == "/bin/bash" && !has_bash(d, vm) {
        [
            "/bin/sh",
            "-c",
            "command -v bash >/dev/null 2>&1 && exec bash \"$@\"; exec sh \"$@\"",
            "sh",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(args)
        .collect()
    } else {
        std::iter::once(cmd.to_string()).chain(args).collect()
    };
    let mut env: Vec<(String, String)> = vm.spec.env.clone();
    if let Some(m) = p["envs"].as_object() {
        for (k, val) in m {
            env.push((k.clone(), val.as_str().unwrap_or_default().to_string()));
        }
    }
    let tty = match &v["pty"]["size"] {
        Value::Object(s) => Some(WinSize {
            rows: s
                .get("rows")
                .and_then(Value::as_u64)
                .unwrap_or(24)
                .min(u16::MAX as u64) as u16,
            cols: s
                .get("cols")
                .and_then(Value::as_u64)
                .unwrap_or(80)
                .min(u16::MAX as u64) as u16,
        }),
        _ => None,
    };
    let cwd = match p["cwd"].as_str() {
        Some(c) => Some(resolve(c, user)?),
        None => None,
    };
    let spec = ExecSpec {
        argv,
        env,
        cwd,
        user: user.map(str::to_string),
        tty,
        stdin: true,
        detach: true,
        tag: v["tag"].as_str().map(str::to_string),
        container: None,
    };
    let pid = Session::start(d.agent_connect(vm)?, Call::Exec(spec))
        .and_then(Session::detached_done)
        .map_err(|e| match e {
            banger_agent::proto::ProtoError::Remote(m) => rpc("invalid_argument", m),
            e => RpcErr::from(e),
        })?;
    // As envd: the call's time is the process's, whoever watches it.
    let deadline = timing(req).1.map(|life| Instant::now() + life);
    if let Some(at) = deadline {
        if let Err(e) = d.kill_at(vm, pid, at) {
            // No time kept for it: it does not run on without one.
            let _ = agent_call(
                d,
                vm,
                Call::Signal {
                    target: Target::Pid(pid),
                    signal: 9,
                },
            );
            return Err(e);
        }
    }
    let session = Session::start(
        d.agent_connect(vm)?,
        Call::Attach {
            target: Target::Pid(pid),
        },
    )?;
    // `stdin: false` (what the SDKs send by default): /dev/null's end at
    // once; absent (older clients): a pipe.
    Ok(Started {
        session,
        close_stdin: v["stdin"] == Value::Bool(false) && tty.is_none(),
        tty: tty.is_some(),
        deadline,
    })
}

/// A process to stream: its session, whether its stdin closes at once,
/// whether it has a PTY, and when its time ends (a `Start`'s).
pub(super) struct Started {
    pub(super) session: Session,
    pub(super) close_stdin: bool,
    pub(super) tty: bool,
    pub(super) deadline: Option<Instant>,
}

/// Writes to the pipe the stream's watcher waits on when dropped, however
/// the stream ends (a panic included).
struct Wake(std::os::fd::OwnedFd);

impl Drop for Wake {
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.0, b"x");
    }
}

/// Whether the VM's guest has `/bin/bash` (asked once per VM: an image
/// does not change under a running VM).
fn has_bash(d: &Daemon, vm: &VmRecord) -> bool {
    static KNOWN: std::sync::Mutex<Option<std::collections::HashMap<String, bool>>> =
        std::sync::Mutex::new(None);
    if let Some(b) = crate::daemon::lock(&KNOWN)
        .as_ref()
        .and_then(|m| m.get(&vm.id).copied())
    {
        return b;
    }
    let b = matches!(
        agent_call(d, vm, Call::Stat { path: "/bin/bash".into() }),
        Ok(Msg::Stat(s)) if s.kind == "file" || s.kind == "symlink"
    );
    let mut known = crate::daemon::lock(&KNOWN);
    let m = known.get_or_insert_with(Default::default);
    // (Bounded: VMs come and go; a full map starts again.)
    if m.len() >= 4096 {
        m.clear();
    }
    m.insert(vm.id.clone(), b);
    b
}

/// Whether process `pid` has a PTY (a joined one's output is `pty`).
pub(super) fn has_tty(d: &Daemon, vm: &VmRecord, pid: u32) -> Result<bool, RpcErr> {
    let Msg::Processes { list } = agent_call(d, vm, Call::Ps)? else {
        return Err(rpc("internal", "the agent did not list its processes"));
    };
    Ok(list.iter().any(|p| p.pid == pid && p.tty))
}

/// A stream's keepalive interval (the client's `Keepalive-Ping-Interval`,
/// bounded) and its life (`Connect-Timeout-Ms`, if any).
pub(super) fn timing(req: &Request) -> (Duration, Option<Duration>) {
    let keepalive = req
        .header("keepalive-ping-interval")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.clamp(1, 3600)))
        .unwrap_or(KEEPALIVE);
    let life = req
        .header("connect-timeout-ms")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    (keepalive, life)
}

/// A Connect server stream on the HTTP connection.
pub(super) struct Stream {
    out: Mutex<Option<Chunked<TcpStream>>>,
    last: Mutex<Instant>,
}

impl Stream {
    /// The stream's answer begun (200, `application/connect+json`).
    pub(super) fn start(w: &TcpStream) -> std::io::Result<Stream> {
        let chunked = Chunked::start(
            w.try_clone()?,
            200,
            &[("Content-Type", "application/connect+json")],
        )?;
        Ok(Stream {
            out: Mutex::new(Some(chunked)),
            last: Mutex::new(Instant::now()),
        })
    }

    /// One envelope (flag 0: a message, 2: the end), sent at once.
    pub(super) fn frame(&self, flag: u8, v: &Value) -> std::io::Result<()> {
        let payload = v.to_string();
        let mut b = Vec::with_capacity(5 + payload.len());
        b.push(flag);
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload.as_bytes());
        let mut out = crate::daemon::lock(&self.out);
        let c = out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the stream has ended"))?;
        c.send(&b)?;
        *crate::daemon::lock(&self.last) = Instant::now();
        Ok(())
    }

    /// The end-of-stream envelope (with the error, if any) and the body's
    /// end.
    pub(super) fn end(&self, error: Option<RpcErr>) -> std::io::Result<()> {
        let trailer = match error {
            Some(e) => json!({"error": {"code": e.code, "message": e.message}}),
            None => json!({}),
        };
        self.frame(2, &trailer)?;
        match crate::daemon::lock(&self.out).take() {
            Some(c) => c.finish(),
            None => Ok(()),
        }
    }
}

/// What the process writes, as data events of `key`.
struct Events<'a> {
    s: &'a Stream,
    key: &'static str,
}

impl Write for Events<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s
            .frame(0, &json!({"event": {"data": {self.key: B64.encode(buf)}}}))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Go's words for how a process ended (envd's `status`).
fn ended(st: &banger_agent::proto::ExitStatus) -> (i32, bool, String) {
    match (st.code, st.signal) {
        (Some(c), _) => (c, true, format!("exit status {c}")),
        (None, Some(s)) => {
            let name = match s {
                1 => "hangup".to_string(),
                2 => "interrupt".to_string(),
                9 => "killed".to_string(),
                15 => "terminated".to_string(),
                n => format!("signal {n}"),
            };
            (-1, false, format!("signal: {name}"))
        }
        (None, None) => (-1, false, "unknown".into()),
    }
}

/// Streams a started (or joined) process: `start`, its output, `end`,
/// keepalives while it is quiet; `Connect-Timeout-Ms` ends its life.
pub(super) fn stream(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    started: Started,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let Started {
        session,
        close_stdin,
        tty,
        deadline,
    } = started;
    let pid = session.pid;
    let control = session.control();
    if close_stdin {
        let _ = control.close_stdin();
    }
    let s = Stream::start(w)?;
    s.frame(0, &json!({"event": {"start": {"pid": pid}}}))?;
    let (keepalive, life) = timing(req);
    let timed_out = std::sync::atomic::AtomicBool::new(false);
    // The watcher below wakes on the stream's end (this pipe), on the
    // client's hanging up (its socket readable: it sends nothing during a
    // stream), or when a keepalive or the call's time is due.
    let (done_r, done_w) = nix::unistd::pipe().map_err(std::io::Error::from)?;
    let wake = Wake(done_w);
    let client = w.try_clone()?;
    let result = std::thread::scope(|sc| {
        let (s, control, timed_out) = (&s, &control, &timed_out);
        let (done_r, client) = (&done_r, &client);
        sc.spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let started = Instant::now();
            // Bytes from the client (a pipelined request) are not its
            // hanging up: from then on only its end is looked for by
            // the writes.
            let mut watch_client = true;
            loop {
                let next = match life {
                    Some(l) => keepalive.min(l.saturating_sub(started.elapsed())),
                    None => keepalive,
                };
                let client_flags = if watch_client {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                };
                let mut fds = [
                    PollFd::new(done_r.as_fd(), PollFlags::POLLIN),
                    PollFd::new(client.as_fd(), client_flags),
                ];
                let ms = next.as_millis().min(i32::MAX as u128) as i32;
                let n = poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                );
                let woke = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
                if woke(0) {
                    return;
                }
                if woke(1) {
                    let mut b = [0u8; 1];
                    if matches!(client.peek(&mut b), Ok(0) | Err(_)) {
                        // The client hung up: the attach goes (the
                        // process runs on, for another to join).
                        control.hang_up();
                        return;
                    }
                    watch_client = false;
                    continue;
                }
                match n {
                    Ok(0) => {
                        // The stream's time is up (a started process is
                        // killed by its own deadline, `kill_at`).
                        if life.is_some_and(|l| started.elapsed() >= l) {
                            timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                            control.hang_up();
                            return;
                        }
                        let quiet = crate::daemon::lock(&s.last).elapsed() >= keepalive;
                        if quiet && s.frame(0, &json!({"event": {"keepalive": {}}})).is_err() {
                            control.hang_up();
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                }
            }
        });
        let mut out = Events {
            s,
            key: if tty { "pty" } else { "stdout" },
        };
        let mut err = Events { s, key: "stderr" };
        let r = session.wait(&mut out, &mut err);
        drop(wake);
        r
    });
    // Its end seen, its deadline goes (a stream that ends before the
    // process leaves it for the process's time).
    if result.is_ok() {
        d.kill_forget(&vm.id, pid);
    }
    match result {
        Ok(st) => {
            let (code, exited, status) = ended(&st);
            let mut end = json!({"exited": exited, "status": status});
            if code != 0 {
                end["exitCode"] = json!(code);
            }
            if !(exited && code == 0) {
                end["error"] = json!(status);
            }
            s.frame(0, &json!({"event": {"end": end}}))?;
            // Killed at its time (`kill_at`): the call's deadline passed.
            let killed_at_its_time =
                st.signal == Some(9) && deadline.is_some_and(|at| Instant::now() >= at);
            let error = (timed_out.load(std::sync::atomic::Ordering::SeqCst) || killed_at_its_time)
                .then(|| {
                    rpc(
                        "deadline_exceeded",
                        "the process's time (Connect-Timeout-Ms) ran out",
                    )
                });
            s.end(error)?;
        }
        Err(banger_agent::proto::ProtoError::Output(_)) => {
            // The client went away: the process runs on.
            return Ok(false);
        }
        Err(_) if timed_out.load(std::sync::atomic::Ordering::SeqCst) => {
            s.end(Some(rpc(
                "deadline_exceeded",
                "the call's time (Connect-Timeout-Ms) ran out",
            )))?;
        }
        Err(e) => {
            let _ = s.end(Some(rpc(
                "unavailable",
                format!("the sandbox's guest agent: {e}"),
            )));
        }
    }
    // (A stream's end leaves the connection to the next request.)
    Ok(true)
}

pub(super) fn list(d: &Daemon, vm: &VmRecord) -> Result<Value, RpcErr> {
    let Msg::Processes { list } = agent_call(d, vm, Call::Ps)? else {
        return Err(rpc("internal", "the agent did not list its processes"));
    };
    let procs: Vec<Value> = list
        .iter()
        .filter(|p| p.exit.is_none())
        .map(|p| {
            let mut v = json!({
                "pid": p.pid,
                "config": {
                    "cmd": p.argv.first().cloned().unwrap_or_default(),
                    "args": p.argv.iter().skip(1).collect::<Vec<_>>(),
                },
            });
            if let Some(t) = &p.tag {
                v["tag"] = json!(t);
            }
            v
        })
        .collect();
    Ok(json!({"processes": procs}))
}

/// Input for a process (`None`: its stdin closed).
pub(super) fn send_input(
    d: &Daemon,
    vm: &VmRecord,
    t: Target,
    data: Option<&[u8]>,
) -> Result<(), RpcErr> {
    use banger_agent::proto::{read_msg, write_frame, write_msg, write_request, Kind};
    let conn = d.agent_connect(vm)?;
    let mut c = banger_agent::deadline::Deadline::new(&conn, CALL_WITHIN);
    write_request(&mut c, Call::Input { target: t })?;
    match data {
        Some(b) => {
            for chunk in b.chunks(banger_agent::proto::CHUNK) {
                write_frame(&mut c, Kind::Stdin, chunk)?;
            }
            write_msg(&mut c, &Msg::Done)?;
        }
        None => {
            write_msg(&mut c, &Msg::CloseStdin)?;
            write_msg(&mut c, &Msg::Done)?;
        }
    }
    match read_msg(&mut c)? {
        Msg::Done => Ok(()),
        Msg::Error { message } => Err(RpcErr::from_guest(message)),
        other => Err(rpc("internal", format!("the agent answered {other:?}"))),
    }
}
