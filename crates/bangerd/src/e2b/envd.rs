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

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use banger_agent::client::{self as agent, Session};
use banger_agent::proto::{Call, FileStat, Msg, Target, WinSize};
use banger_core::{VmRecord, VmState};
use base64::Engine;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::http::{self, Request};
use super::{files, process, watch};
use crate::daemon::Daemon;

/// The largest upload `POST /files` takes.
pub const UPLOAD_MAX: usize = 256 << 20;
/// One agent call (a stat, a signal) at most.
pub(super) const CALL_WITHIN: Duration = Duration::from_secs(30);
pub(super) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A Connect error: its code and message (and the HTTP status of both).
#[derive(Debug)]
pub(super) struct RpcErr {
    pub(super) code: &'static str,
    pub(super) message: String,
}

pub(super) fn rpc(code: &'static str, message: impl Into<String>) -> RpcErr {
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
    pub(super) fn busy(message: String) -> RpcErr {
        rpc("resource_exhausted", message)
    }

    pub(super) fn from_guest(message: String) -> RpcErr {
        let code = if message.contains("(os error 2)") {
            "not_found"
        } else if message.contains("(os error 17)") {
            "already_exists"
        } else if message.contains("(os error 13)") || message.contains("(os error 1)") {
            "permission_denied"
        } else if message.contains("(os error 20)")
            || message.contains("(os error 21)")
            // (A watch of a network filesystem not allowed: the request's
            // to change, as envd says.)
            || message.contains("on a network filesystem")
        {
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
pub(super) fn plain(w: &mut TcpStream, status: u16, message: &str) -> std::io::Result<bool> {
    let body = json!({"code": status, "message": message}).to_string();
    http::respond(
        w,
        status,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )?;
    Ok(true)
}

pub(super) fn unary_err(w: &mut TcpStream, e: &RpcErr) -> std::io::Result<bool> {
    let body = json!({"code": e.code, "message": e.message}).to_string();
    http::respond(
        w,
        e.status(),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )?;
    Ok(true)
}

/// One envd request for `vm`, whose token was judged on the request's
/// head (`sandbox`): whether the connection may carry another.
pub fn handle(
    d: &Arc<Daemon>,
    vm: VmRecord,
    req: &Request,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let id = vm.name.clone();
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
        ("GET", "/files") => files::download(d, &vm, req, user.as_deref(), w),
        ("POST", "/files") => files::upload(d, &vm, req, user.as_deref(), w),
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

/// The sandbox `id`, if `token` is an access token of it whose key still
/// stands and whose holder may still use it (else 401; a sandbox gone,
/// or one they may not use, is 502, as E2B's edge answers for one that
/// is not running).
pub(super) fn sandbox(
    d: &Daemon,
    id: &str,
    token: Option<&str>,
) -> std::result::Result<VmRecord, (u16, String)> {
    let refused = || {
        (
            401,
            format!("sandbox {id}: no X-Access-Token, or not one banger gave for it"),
        )
    };
    let t = token.ok_or_else(refused)?;
    let (uid, rest) = t
        .strip_prefix('u')
        .and_then(|r| r.split_once('.'))
        .ok_or_else(refused)?;
    let (name, _) = rest.rsplit_once('.').ok_or_else(refused)?;
    let uid: u32 = uid.parse().map_err(|_| refused())?;
    let key = d
        .store()
        .list_tokens(Some(uid))
        .map_err(|e| (500, e.to_string()))?
        .into_iter()
        .find(|k| k.name == name)
        .ok_or_else(refused)?;
    let want = super::access_token(d, id, &key).map_err(|e| (500, e.to_string()))?;
    if !bool::from(t.as_bytes().ct_eq(want.as_bytes())) {
        return Err(refused());
    }
    let caller = super::caller_for(d, uid).map_err(|f| (f.status, f.message))?;
    let gone = || (502, format!("The sandbox {id} was not found"));
    let vm = d.find(id).map_err(|_| gone())?;
    caller.may_use_in(&d.store(), &vm).map_err(|_| gone())?;
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
pub(super) fn resolve(path: &str, user: Option<&str>) -> Result<String, RpcErr> {
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

pub(super) fn agent_call(d: &Daemon, vm: &VmRecord, c: Call) -> Result<Msg, RpcErr> {
    let conn = d.agent_connect(vm)?;
    match agent::call_within(conn, c, CALL_WITHIN)? {
        Msg::Error { message } => Err(RpcErr::from_guest(message)),
        m => Ok(m),
    }
}

pub(super) fn stat(d: &Daemon, vm: &VmRecord, path: &str) -> Result<FileStat, RpcErr> {
    match agent_call(d, vm, Call::Stat { path: path.into() })? {
        Msg::Stat(s) => Ok(s),
        other => Err(rpc("internal", format!("the agent answered {other:?}"))),
    }
}

/// A user's or group's name as the guest gave it, if it is one (at most
/// 64 characters of what names are made of); else the id.
fn name_or_id(name: Option<&str>, id: u32) -> String {
    match name {
        Some(n)
            if !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-$".contains(c)) =>
        {
            n.to_string()
        }
        _ => id.to_string(),
    }
}

/// envd's `EntryInfo` of a file.
pub(super) fn entry(s: &FileStat) -> Value {
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
        // Names where the guest has them, as envd's; else the ids.
        "owner": name_or_id(s.owner.as_deref(), s.uid),
        "group": name_or_id(s.group.as_deref(), s.gid),
        "modifiedTime": super::rfc3339(s.mtime),
    });
    if let Some(l) = &s.link {
        v["symlinkTarget"] = json!(l);
        v["isSymlink"] = json!(true);
    }
    // The guest's word, checked as an upload's would be (a guest that
    // set more, or worse, shows none).
    if !s.meta.is_empty() && banger_agent::proto::check_meta(&s.meta).is_ok() {
        v["metadata"] = json!(s.meta);
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
pub(super) fn target(v: &Value) -> Result<Target, RpcErr> {
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

pub(super) fn bytes(v: &Value) -> Result<Vec<u8>, RpcErr> {
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
        ("process.Process", "Start") => Some(process::start(d, vm, req, &v, user)),
        ("process.Process", "Connect") => Some(target(&v).and_then(|t| {
            let s = Session::start(d.agent_connect(vm)?, Call::Attach { target: t })?;
            let tty = process::has_tty(d, vm, s.pid)?;
            Ok(process::Started {
                session: s,
                close_stdin: false,
                tty,
                deadline: None,
            })
        })),
        _ => None,
    };
    if (service, method) == ("filesystem.Filesystem", "WatchDir") {
        return match watch::stream(d, vm, req, &v, user, w) {
            Ok(r) => r,
            Err(e) => unary_err(w, &e),
        };
    }
    if let Some(started) = streamed {
        return match started {
            Ok(started) => process::stream(d, vm, req, started, w),
            Err(e) => unary_err(w, &e),
        };
    }
    let r: Result<Value, RpcErr> = match (service, method) {
        ("process.Process", "List") => process::list(d, vm),
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
            process::send_input(d, vm, t, Some(&data)).map(|()| json!({}))
        }),
        ("process.Process", "CloseStdin") => {
            target(&v).and_then(|t| process::send_input(d, vm, t, None).map(|()| json!({})))
        }
        ("process.Process", "Update") => target(&v).and_then(|t| {
            let size = &v["pty"]["size"];
            let ws = WinSize {
                rows: size["rows"].as_u64().unwrap_or(24).min(u16::MAX as u64) as u16,
                cols: size["cols"].as_u64().unwrap_or(80).min(u16::MAX as u64) as u16,
            };
            agent_call(
                d,
                vm,
                Call::Resize {
                    target: t,
                    size: ws,
                },
            )
            .map(|_| json!({}))
            .map_err(|e| {
                if e.code == "unavailable" {
                    // An agent of an older banger (a guest restored from
                    // its snapshot) closes on a call it does not know.
                    rpc(
                        "unimplemented",
                        format!(
                            "{}: if the guest is older than this banger, restart it",
                            e.message
                        ),
                    )
                } else {
                    e
                }
            })
        }),
        ("filesystem.Filesystem", "CreateWatcher") => watch::create(d, vm, &v, user),
        ("filesystem.Filesystem", "GetWatcherEvents") => watch::events(d, vm, &v),
        ("filesystem.Filesystem", "RemoveWatcher") => watch::remove(d, vm, &v),
        ("filesystem.Filesystem", m) => files::filesystem(d, vm, m, &v, user),
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
    fn entries_read_as_envd_writes_them() {
        let e = entry(&FileStat {
            path: "/root/x".into(),
            kind: "file".into(),
            size: 3,
            mode: 0o100644,
            mtime: 0,
            uid: 0,
            gid: 1000,
            link: None,
            meta: [("purpose".to_string(), "test".to_string())].into(),
            owner: Some("root".into()),
            group: None,
        });
        assert_eq!(e["name"], "x");
        assert_eq!((&e["owner"], &e["group"]), (&json!("root"), &json!("1000")));
        assert_eq!(e["metadata"], json!({"purpose": "test"}));
        assert_eq!(e["size"], "3");
        assert_eq!(e["mode"], 0o644);
        assert_eq!(e["permissions"], "-rw-r--r--");
        assert_eq!(e["type"], "FILE_TYPE_FILE");
    }
}
