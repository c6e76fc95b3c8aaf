//! envd's API (E2B's in-sandbox daemon), served for a sandbox by its
//! VM's guest agent: the Connect protocol with the JSON codec (unary, and
//! server streams as enveloped frames), `process.Process` and
//! `filesystem.Filesystem`, and `GET/POST /files` and `/health`.
//!
//! Requests are routed by `E2b-Sandbox-Id` and must carry the sandbox's
//! `X-Access-Token`. A process started here runs detached in the guest
//! and is streamed by an attach: a client that goes away leaves it
//! running (as envd's), and `Connect-Timeout-Ms` bounds its life. File
//! operations run as root in the guest; a file written for a `username`
//! becomes theirs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent::client::{self as agent, Session};
use banger_agent::proto::{Call, ExecSpec, FileStat, Msg, Target, WinSize};
use banger_core::{VmRecord, VmState};
use base64::Engine;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::http::{self, Chunked, Request};
use crate::daemon::Daemon;

/// The largest upload `POST /files` takes.
pub const UPLOAD_MAX: usize = 256 << 20;
/// One agent call (a stat, a signal) at most.
const CALL_WITHIN: Duration = Duration::from_secs(30);
/// Entries one `ListDir` answers at most (its depth at most 16).
const LIST_MAX: usize = 10_000;
/// Keepalives on a quiet stream, unless the client asks more often.
const KEEPALIVE: Duration = Duration::from_secs(50);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A Connect error: its code and message (and the HTTP status of both).
#[derive(Debug)]
struct RpcErr {
    code: &'static str,
    message: String,
}

fn rpc(code: &'static str, message: impl Into<String>) -> RpcErr {
    RpcErr {
        code,
        message: message.into(),
    }
}

impl RpcErr {
    fn status(&self) -> u16 {
        match self.code {
            "invalid_argument" | "failed_precondition" | "out_of_range" => 400,
            "unauthenticated" => 401,
            "permission_denied" => 403,
            "not_found" => 404,
            "already_exists" | "aborted" => 409,
            "resource_exhausted" => 429,
            "canceled" => 499,
            "unimplemented" => 501,
            "unavailable" => 503,
            "deadline_exceeded" => 504,
            _ => 500,
        }
    }

    /// An agent's error, by the errno it names.
    fn from_guest(message: String) -> RpcErr {
        let code = if message.contains("(os error 2)") {
            "not_found"
        } else if message.contains("(os error 17)") {
            "already_exists"
        } else if message.contains("(os error 13)") || message.contains("(os error 1)") {
            "permission_denied"
        } else if message.contains("(os error 20)") || message.contains("(os error 21)") {
            "invalid_argument"
        } else {
            "internal"
        };
        rpc(code, message)
    }
}

impl From<banger_agent::proto::ProtoError> for RpcErr {
    fn from(e: banger_agent::proto::ProtoError) -> RpcErr {
        match e {
            banger_agent::proto::ProtoError::Remote(m) => RpcErr::from_guest(m),
            e => rpc("unavailable", format!("the sandbox's guest agent: {e}")),
        }
    }
}

impl From<crate::error::DaemonError> for RpcErr {
    fn from(e: crate::error::DaemonError) -> RpcErr {
        rpc("unavailable", e.to_string())
    }
}

/// An error of the HTTP endpoints (`/files`, `/health`), as E2B's.
fn plain(w: &mut TcpStream, status: u16, message: &str) -> std::io::Result<bool> {
    let body = json!({"code": status, "message": message}).to_string();
    http::respond(
        w,
        status,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )?;
    Ok(true)
}

fn unary_err(w: &mut TcpStream, e: &RpcErr) -> std::io::Result<bool> {
    let body = json!({"code": e.code, "message": e.message}).to_string();
    http::respond(
        w,
        e.status(),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )?;
    Ok(true)
}

/// One envd request: whether the connection may carry another.
pub fn handle(d: &Arc<Daemon>, req: &Request, w: &mut TcpStream) -> std::io::Result<bool> {
    let id = req.header("e2b-sandbox-id").unwrap_or_default();
    let vm = match sandbox(d, id, req.header("x-access-token")) {
        Ok(vm) => vm,
        Err((status, m)) => return plain(w, status, &m),
    };
    let user = match user_of(req) {
        Ok(u) => u,
        Err(e) => return plain(w, 401, &e),
    };
    let m = req.method.as_str();
    match (m, req.path.as_str()) {
        ("GET", "/health") => {
            if vm.runtime.shown_state() == VmState::Running {
                http::respond(w, 204, &[], b"")?;
                Ok(true)
            } else {
                plain(w, 502, &format!("The sandbox {id} was not found"))
            }
        }
        ("GET", "/files") => download(d, &vm, req, user.as_deref(), w),
        ("POST", "/files") => upload(d, &vm, req, user.as_deref(), w),
        ("POST", p) => match p.trim_start_matches('/').split_once('/') {
            Some((service, method)) => {
                if vm.runtime.shown_state() != VmState::Running {
                    return unary_err(
                        w,
                        &rpc(
                            "unavailable",
                            format!("The sandbox {id} was not found (it is not running)"),
                        ),
                    );
                }
                call(d, &vm, req, user.as_deref(), service, method, w)
            }
            None => plain(w, 404, &format!("{m} {p}: no such envd route")),
        },
        (m, p) => plain(w, 404, &format!("{m} {p}: no such envd route")),
    }
}

/// The sandbox `id`, if `token` is its access token.
fn sandbox(
    d: &Daemon,
    id: &str,
    token: Option<&str>,
) -> std::result::Result<VmRecord, (u16, String)> {
    let gone = || (502, format!("The sandbox {id} was not found"));
    if banger_core::validate_name(id).is_err() {
        return Err(gone());
    }
    let vm = d.find(id).map_err(|_| gone())?;
    let want = super::access_token(d, &vm.id).map_err(|e| (500, e.to_string()))?;
    let ok = token.is_some_and(|t| bool::from(t.as_bytes().ct_eq(want.as_bytes())));
    if !ok {
        return Err((
            401,
            format!("sandbox {id}: no X-Access-Token, or not its own"),
        ));
    }
    Ok(vm)
}

/// The guest user a request names (`Authorization: Basic base64(user:)`,
/// or `username=` on `/files`): a user name or uid, or none (root).
fn user_of(req: &Request) -> Result<Option<String>, String> {
    let named = match req.header("authorization") {
        Some(a) => {
            let b = a
                .strip_prefix("Basic ")
                .ok_or("Authorization: only Basic (the guest user) is taken")?;
            let text = B64
                .decode(b.trim())
                .ok()
                .and_then(|v| String::from_utf8(v).ok())
                .ok_or("Authorization: not base64 of USER:")?;
            Some(text.split(':').next().unwrap_or_default().to_string())
        }
        None => req.param("username").map(str::to_string),
    };
    match named {
        None => Ok(None),
        Some(u) if u.is_empty() => Ok(None),
        Some(u) => {
            let ok = u.len() <= 32
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                && !u.starts_with('-');
            if ok {
                Ok(Some(u))
            } else {
                Err(format!("user {:?}: not a user name", u.escape_debug()))
            }
        }
    }
}

/// A path as envd takes it: a relative one (or `~`) under the user's
/// home; `.` and `..` resolved; absolute.
fn resolve(path: &str, user: Option<&str>) -> Result<String, RpcErr> {
    if path.is_empty() || path.len() > 4096 || path.contains('\0') {
        return Err(rpc("invalid_argument", format!("path {path:?}")));
    }
    let home = match user {
        None | Some("root") | Some("0") => "/root".to_string(),
        Some(u) => format!("/home/{u}"),
    };
    let full = if let Some(rest) = path.strip_prefix('~') {
        format!("{home}/{rest}")
    } else if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{home}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn agent_call(d: &Daemon, vm: &VmRecord, c: Call) -> Result<Msg, RpcErr> {
    let conn = d.agent_connect(vm)?;
    match agent::call_within(conn, c, CALL_WITHIN)? {
        Msg::Error { message } => Err(RpcErr::from_guest(message)),
        m => Ok(m),
    }
}

fn stat(d: &Daemon, vm: &VmRecord, path: &str) -> Result<FileStat, RpcErr> {
    match agent_call(d, vm, Call::Stat { path: path.into() })? {
        Msg::Stat(s) => Ok(s),
        other => Err(rpc("internal", format!("the agent answered {other:?}"))),
    }
}

/// envd's `EntryInfo` of a file.
fn entry(s: &FileStat) -> Value {
    let name = s.path.rsplit('/').next().unwrap_or_default();
    let (ty, ch) = match s.kind.as_str() {
        "dir" => ("FILE_TYPE_DIRECTORY", 'd'),
        "symlink" => ("FILE_TYPE_SYMLINK", 'L'),
        "file" => ("FILE_TYPE_FILE", '-'),
        _ => ("FILE_TYPE_UNSPECIFIED", '?'),
    };
    let perm = s.mode & 0o777;
    let mut perms = String::from(ch);
    for shift in [6, 3, 0] {
        let bits = (perm >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let mut v = json!({
        "name": name,
        "type": ty,
        "path": s.path,
        "size": s.size.to_string(),
        "mode": perm,
        "permissions": perms,
        "owner": s.uid.to_string(),
        "group": s.gid.to_string(),
        "modifiedTime": super::rfc3339(s.mtime),
    });
    if let Some(l) = &s.link {
        v["symlinkTarget"] = json!(l);
        v["isSymlink"] = json!(true);
    }
    v
}

/// A Connect message's JSON: a unary body, or a stream's first envelope.
fn message(req: &Request) -> Result<Value, RpcErr> {
    let streaming = req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/connect+json"));
    let payload: &[u8] = if streaming {
        let b = &req.body;
        if b.len() < 5 {
            return Err(rpc("invalid_argument", "no message envelope"));
        }
        if b[0] & 1 != 0 {
            return Err(rpc("invalid_argument", "compressed messages are not taken"));
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        b.get(5..5 + len).ok_or_else(|| {
            rpc(
                "invalid_argument",
                "a message shorter than its envelope says",
            )
        })?
    } else if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(payload).map_err(|e| rpc("invalid_argument", format!("message: {e}")))
}

/// A `ProcessSelector`.
fn target(v: &Value) -> Result<Target, RpcErr> {
    let p = &v["process"];
    if let Some(pid) = p["pid"].as_u64() {
        return u32::try_from(pid)
            .map(Target::Pid)
            .map_err(|_| rpc("invalid_argument", format!("pid {pid}")));
    }
    if let Some(tag) = p["tag"].as_str() {
        return Ok(Target::Tag(tag.to_string()));
    }
    Err(rpc("invalid_argument", "process: a pid or a tag"))
}

fn bytes(v: &Value) -> Result<Vec<u8>, RpcErr> {
    B64.decode(v.as_str().unwrap_or_default())
        .map_err(|e| rpc("invalid_argument", format!("bytes: {e}")))
}

fn call(
    d: &Arc<Daemon>,
    vm: &VmRecord,
    req: &Request,
    user: Option<&str>,
    service: &str,
    method: &str,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let v = match message(req) {
        Ok(v) => v,
        Err(e) => return unary_err(w, &e),
    };
    let streamed = match (service, method) {
        ("process.Process", "Start") => Some(start(d, vm, &v, user)),
        ("process.Process", "Connect") => Some(target(&v).and_then(|t| {
            let s = Session::start(d.agent_connect(vm)?, Call::Attach { target: t })?;
            Ok((s, false))
        })),
        _ => None,
    };
    if let Some(started) = streamed {
        return match started {
            Ok((session, close_stdin)) => stream_process(req, session, close_stdin, w),
            Err(e) => unary_err(w, &e),
        };
    }
    let r: Result<Value, RpcErr> = match (service, method) {
        ("process.Process", "List") => list_processes(d, vm),
        ("process.Process", "SendSignal") => target(&v).and_then(|t| {
            let signal = match &v["signal"] {
                Value::String(s) if s == "SIGNAL_SIGKILL" => 9,
                Value::String(s) if s == "SIGNAL_SIGTERM" => 15,
                Value::Number(n) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
                    n.as_i64().unwrap_or(15) as i32
                }
                s => return Err(rpc("invalid_argument", format!("signal {s}"))),
            };
            agent_call(d, vm, Call::Signal { target: t, signal }).map(|_| json!({}))
        }),
        ("process.Process", "SendInput") => target(&v).and_then(|t| {
            let input = &v["input"];
            let data = match (&input["stdin"], &input["pty"]) {
                (Value::String(_), _) => bytes(&input["stdin"])?,
                (_, Value::String(_)) => bytes(&input["pty"])?,
                _ => return Err(rpc("invalid_argument", "input: stdin or pty")),
            };
            send_input(d, vm, t, Some(&data)).map(|()| json!({}))
        }),
        ("process.Process", "CloseStdin") => {
            target(&v).and_then(|t| send_input(d, vm, t, None).map(|()| json!({})))
        }
        ("process.Process", "Update") => target(&v).and_then(|t| {
            let size = &v["pty"]["size"];
            let ws = WinSize {
                rows: size["rows"].as_u64().unwrap_or(24).min(u16::MAX as u64) as u16,
                cols: size["cols"].as_u64().unwrap_or(80).min(u16::MAX as u64) as u16,
            };
            let s = Session::start(d.agent_connect(vm)?, Call::Attach { target: t })?;
            let c = s.control();
            let r = c.resize(ws);
            c.hang_up();
            r.map(|()| json!({})).map_err(RpcErr::from)
        }),
        ("filesystem.Filesystem", m) => filesystem(d, vm, m, &v, user),
        (s, m) => Err(rpc(
            "unimplemented",
            format!("{s}/{m} is not served by banger's envd"),
        )),
    };
    match r {
        Ok(v) => {
            http::respond(
                w,
                200,
                &[("Content-Type", "application/json")],
                v.to_string().as_bytes(),
            )?;
            Ok(true)
        }
        Err(e) => unary_err(w, &e),
    }
}

/// `Start`: the process started detached (it outlives this stream), then
/// attached to; whether its stdin is to be closed at once.
fn start(
    d: &Daemon,
    vm: &VmRecord,
    v: &Value,
    user: Option<&str>,
) -> Result<(Session, bool), RpcErr> {
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
    // with its sh (a fixed script: the command stays an argument).
    let argv: Vec<String> = if cmd == "/bin/bash" {
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
    };
    let pid = Session::start(d.agent_connect(vm)?, Call::Exec(spec))
        .and_then(Session::detached_done)
        .map_err(|e| match e {
            banger_agent::proto::ProtoError::Remote(m) => rpc("invalid_argument", m),
            e => RpcErr::from(e),
        })?;
    let session = Session::start(
        d.agent_connect(vm)?,
        Call::Attach {
            target: Target::Pid(pid),
        },
    )?;
    // `stdin: false` (what the SDKs send by default): /dev/null's end at
    // once; absent (older clients): a pipe.
    Ok((session, v["stdin"] == Value::Bool(false) && tty.is_none()))
}

/// A Connect server stream on the HTTP connection.
struct Stream {
    out: Mutex<Option<Chunked<TcpStream>>>,
    last: Mutex<Instant>,
}

impl Stream {
    fn frame(&self, flag: u8, v: &Value) -> std::io::Result<()> {
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

    fn end(&self, error: Option<RpcErr>) -> std::io::Result<()> {
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
fn stream_process(
    req: &Request,
    session: Session,
    close_stdin: bool,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let pid = session.pid;
    let control = session.control();
    if close_stdin {
        let _ = control.close_stdin();
    }
    let tty = req.body.windows(5).any(|x| x == b"\"pty\"");
    let chunked = Chunked::start(
        w.try_clone()?,
        200,
        &[("Content-Type", "application/connect+json")],
    )?;
    let s = Stream {
        out: Mutex::new(Some(chunked)),
        last: Mutex::new(Instant::now()),
    };
    s.frame(0, &json!({"event": {"start": {"pid": pid}}}))?;
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
    let timed_out = std::sync::atomic::AtomicBool::new(false);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let result = std::thread::scope(|sc| {
        let (s, control, timed_out) = (&s, &control, &timed_out);
        sc.spawn(move || {
            let started = Instant::now();
            loop {
                let next = match life {
                    Some(l) => keepalive.min(l.saturating_sub(started.elapsed())),
                    None => keepalive,
                };
                match done_rx.recv_timeout(next) {
                    Err(RecvTimeoutError::Timeout) => {
                        if life.is_some_and(|l| started.elapsed() >= l) {
                            timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = control.signal(9);
                            return;
                        }
                        let quiet = crate::daemon::lock(&s.last).elapsed() >= keepalive;
                        if quiet && s.frame(0, &json!({"event": {"keepalive": {}}})).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        let mut out = Events {
            s,
            key: if tty { "pty" } else { "stdout" },
        };
        let mut err = Events { s, key: "stderr" };
        let r = session.wait(&mut out, &mut err);
        let _ = done_tx.send(());
        r
    });
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
            let error = timed_out
                .load(std::sync::atomic::Ordering::SeqCst)
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

fn list_processes(d: &Daemon, vm: &VmRecord) -> Result<Value, RpcErr> {
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
fn send_input(d: &Daemon, vm: &VmRecord, t: Target, data: Option<&[u8]>) -> Result<(), RpcErr> {
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
        None => write_msg(&mut c, &Msg::CloseStdin)?,
    }
    match read_msg(&mut c)? {
        Msg::Done => Ok(()),
        Msg::Error { message } => Err(RpcErr::from_guest(message)),
        other => Err(rpc("internal", format!("the agent answered {other:?}"))),
    }
}

fn filesystem(
    d: &Daemon,
    vm: &VmRecord,
    method: &str,
    v: &Value,
    user: Option<&str>,
) -> Result<Value, RpcErr> {
    let path = |key: &str| resolve(v[key].as_str().unwrap_or_default(), user);
    match method {
        "Stat" => Ok(json!({"entry": entry(&stat(d, vm, &path("path")?)?)})),
        "ListDir" => {
            let root = path("path")?;
            let depth = v["depth"].as_u64().unwrap_or(1).clamp(1, 16);
            let top = stat(d, vm, &root)?;
            if top.kind != "dir" {
                return Err(rpc(
                    "invalid_argument",
                    format!("path {root} is not a directory"),
                ));
            }
            let mut out = Vec::new();
            let mut dirs = vec![(root, 1)];
            while let Some((dir, level)) = dirs.pop() {
                let Msg::Entries { mut list } = agent_call(d, vm, Call::List { path: dir })? else {
                    return Err(rpc("internal", "the agent did not list a directory"));
                };
                list.sort_by(|a, b| a.path.cmp(&b.path));
                for e in list {
                    if out.len() >= LIST_MAX {
                        return Err(rpc(
                            "resource_exhausted",
                            format!("over {LIST_MAX} entries: ask for less depth"),
                        ));
                    }
                    if e.kind == "dir" && level < depth {
                        dirs.push((e.path.clone(), level + 1));
                    }
                    out.push(entry(&e));
                }
            }
            Ok(json!({"entries": out}))
        }
        "MakeDir" => {
            let p = path("path")?;
            match stat(d, vm, &p) {
                Ok(s) if s.kind == "dir" => {
                    return Err(rpc("already_exists", format!("directory {p} exists")))
                }
                Ok(_) => {
                    return Err(rpc(
                        "invalid_argument",
                        format!("path {p} exists and is not a directory"),
                    ))
                }
                Err(e) if e.code == "not_found" => {}
                Err(e) => return Err(e),
            }
            agent_call(
                d,
                vm,
                Call::Mkdir {
                    path: p.clone(),
                    mode: 0o755,
                    parents: true,
                },
            )?;
            chown(d, vm, user, &p)?;
            Ok(json!({"entry": entry(&stat(d, vm, &p)?)}))
        }
        "Move" => {
            let (from, to) = (path("source")?, path("destination")?);
            agent_call(
                d,
                vm,
                Call::Move {
                    from,
                    to: to.clone(),
                },
            )?;
            Ok(json!({"entry": entry(&stat(d, vm, &to)?)}))
        }
        "Remove" => {
            let p = path("path")?;
            match agent_call(
                d,
                vm,
                Call::Remove {
                    path: p,
                    recursive: true,
                },
            ) {
                Ok(_) => Ok(json!({})),
                Err(e) if e.code == "not_found" => Ok(json!({})),
                Err(e) => Err(e),
            }
        }
        m => Err(rpc(
            "unimplemented",
            format!("filesystem.Filesystem/{m} is not served by banger's envd yet"),
        )),
    }
}

/// A file made for `user` becomes theirs (`chown`, run as root with the
/// path as an argument).
fn chown(d: &Daemon, vm: &VmRecord, user: Option<&str>, path: &str) -> Result<(), RpcErr> {
    let Some(u) = user.filter(|u| *u != "root" && *u != "0") else {
        return Ok(());
    };
    let spec = ExecSpec {
        argv: vec!["chown".into(), u.to_string(), path.to_string()],
        ..Default::default()
    };
    let s = Session::start(d.agent_connect(vm)?, Call::Exec(spec))?;
    let mut err = Vec::new();
    let st = s.wait_within(&mut std::io::sink(), &mut err, CALL_WITHIN)?;
    if st.code != Some(0) {
        return Err(rpc(
            "unauthenticated",
            format!(
                "user {u:?}: {}",
                String::from_utf8_lossy(&err[..err.len().min(512)]).trim()
            ),
        ));
    }
    Ok(())
}

/// `GET /files`: the file's bytes.
fn download(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    user: Option<&str>,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let path = match resolve(req.param("path").unwrap_or_default(), user) {
        Ok(p) => p,
        Err(e) => return plain(w, 400, &e.message),
    };
    match stat(d, vm, &path) {
        Ok(s) if s.kind == "file" => {}
        Ok(_) => return plain(w, 400, &format!("path {path} is not a file")),
        Err(e) if e.code == "not_found" => return plain(w, 404, &format!("path {path} not found")),
        Err(e) => return plain(w, 500, &e.message),
    }
    let conn = match d.agent_connect(vm) {
        Ok(c) => c,
        Err(e) => return plain(w, 502, &e.to_string()),
    };
    // The agent's tar stream, read here through a pipe as it comes.
    let (rfd, wfd) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return plain(w, 500, &e.to_string()),
    };
    let mut tar_out = std::fs::File::from(wfd);
    let p2 = path.clone();
    let feeder = std::thread::spawn(move || agent::get_tar(conn, &p2, &mut tar_out));
    let mut archive = tar::Archive::new(std::fs::File::from(rfd));
    let sent = (|| -> std::io::Result<bool> {
        let mut entries = archive.entries()?;
        let Some(entry) = entries.next() else {
            return plain(w, 500, &format!("path {path}: the guest sent nothing"));
        };
        let mut entry = entry?;
        let size = entry.size();
        let len = size.to_string();
        let mut head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n").into_bytes();
        w.write_all(&head)?;
        head.clear();
        std::io::copy(&mut (&mut entry).take(size), w)?;
        w.flush()?;
        // The rest of the stream is drained for the feeder to finish.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink())?;
        Ok(true)
    })();
    let _ = feeder.join();
    sent
}

/// The files a `POST /files` carries: (path, bytes) each.
fn uploaded(req: &Request, user: Option<&str>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let ctype = req.header("content-type").unwrap_or_default();
    let single = req.param("path");
    if ctype.starts_with("multipart/form-data") {
        let boundary = ctype
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .map(|b| b.trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
            .ok_or("multipart/form-data without a boundary")?;
        let mut files = Vec::new();
        for (headers, body) in multipart(&req.body, &boundary)? {
            let disp = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-disposition"))
                .map(|(_, v)| v.as_str())
                .unwrap_or_default();
            let param = |name: &str| {
                disp.split(';')
                    .filter_map(|p| p.trim().strip_prefix(&format!("{name}=")))
                    .next()
                    .map(|v| v.trim_matches('"').to_string())
            };
            if param("name").as_deref() != Some("file") {
                continue;
            }
            let path = match single {
                Some(p) => p.to_string(),
                None => param("filename").ok_or("a file part without a filename")?,
            };
            files.push((resolve(&path, user).map_err(|e| e.message)?, body));
        }
        if files.is_empty() {
            return Err("no part named \"file\"".into());
        }
        Ok(files)
    } else {
        if req
            .header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
        {
            return Err("Content-Encoding: only identity is taken".into());
        }
        let path = single.ok_or("path is required for an octet-stream upload")?;
        Ok(vec![(
            resolve(path, user).map_err(|e| e.message)?,
            req.body.clone(),
        )])
    }
}

/// A multipart body's parts: (headers, content) each.
#[allow(clippy::type_complexity)]
fn multipart(body: &[u8], boundary: &str) -> Result<Vec<(Vec<(String, String)>, Vec<u8>)>, String> {
    let delim = format!("--{boundary}").into_bytes();
    let find = |hay: &[u8], from: usize| {
        hay.get(from..)
            .and_then(|h| h.windows(delim.len()).position(|w| w == delim.as_slice()))
            .map(|i| i + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, 0).ok_or("no multipart boundary in the body")? + delim.len();
    loop {
        if body.get(at..at + 2) == Some(b"--") {
            return Ok(parts);
        }
        let next = find(body, at).ok_or("a multipart part without its end")?;
        let part = body
            .get(at..next)
            .ok_or("a bad multipart part")?
            .strip_prefix(b"\r\n")
            .ok_or("a multipart part without CRLF")?;
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let split = part
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("a multipart part without headers")?;
        let headers = String::from_utf8_lossy(&part[..split])
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        parts.push((headers, part[split + 4..].to_vec()));
        if parts.len() > 1000 {
            return Err("over 1000 multipart parts".into());
        }
        at = next + delim.len();
    }
}

/// `POST /files`: each file written (parents made), made the user's.
fn upload(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    user: Option<&str>,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let files = match uploaded(req, user) {
        Ok(f) => f,
        Err(e) => return plain(w, 400, &e),
    };
    let mut written = Vec::new();
    for (path, data) in &files {
        if path == "/" {
            return plain(w, 400, "path / is a directory");
        }
        let conn = match d.agent_connect(vm) {
            Ok(c) => c,
            Err(e) => return plain(w, 502, &e.to_string()),
        };
        let now = banger_core::unix_now().max(0) as u64;
        let put = agent::put_tar(conn, "/", |out| {
            let mut b = tar::Builder::new(out);
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(now);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path.trim_start_matches('/'), data.as_slice())?;
            b.finish()
        });
        if let Err(e) = put {
            let e = RpcErr::from(e);
            let status = if e.message.contains("(os error 28)") {
                507
            } else if e.code == "invalid_argument" {
                400
            } else {
                500
            };
            return plain(w, status, &format!("write {path}: {}", e.message));
        }
        if let Err(e) = chown(d, vm, user, path) {
            return plain(w, 401, &e.message);
        }
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        written.push(json!({"path": path, "name": name, "type": "file"}));
    }
    http::respond(
        w,
        200,
        &[("Content-Type", "application/json")],
        Value::Array(written).to_string().as_bytes(),
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_under_the_users_home() {
        assert_eq!(resolve("a.txt", None).unwrap(), "/root/a.txt");
        assert_eq!(resolve("~/x/../y", Some("user")).unwrap(), "/home/user/y");
        assert_eq!(resolve("/../../etc//passwd", None).unwrap(), "/etc/passwd");
        assert!(resolve("", None).is_err());
    }

    #[test]
    fn multipart_parts_are_split_at_their_boundary() {
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a/b.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XX--\r\n";
        let parts = multipart(body, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].1, b"hello");
        assert!(multipart(b"--XX\r\nbroken", "XX").is_err());
    }

    #[test]
    fn entries_read_as_envd_writes_them() {
        let e = entry(&FileStat {
            path: "/root/x".into(),
            kind: "file".into(),
            size: 3,
            mode: 0o100644,
            mtime: 0,
            uid: 0,
            gid: 0,
            link: None,
        });
        assert_eq!(e["name"], "x");
        assert_eq!(e["size"], "3");
        assert_eq!(e["mode"], 0o644);
        assert_eq!(e["permissions"], "-rw-r--r--");
        assert_eq!(e["type"], "FILE_TYPE_FILE");
    }
}
