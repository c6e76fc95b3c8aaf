//! envd's `filesystem.Filesystem` and `GET/POST /files` on the guest
//! agent: stat, list with depth, make, move, remove; a file read out of the
//! agent's tar stream as it comes, files written as one-entry tars and
//! made the user's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use banger_agent::client::{self as agent, Session};
use banger_agent::proto::{check_meta, Call, ExecSpec, FileStat, Msg};
use banger_core::VmRecord;
use serde_json::{json, Value};

use super::envd::{agent_call, entry, plain, resolve, rpc, stat, RpcErr, CALL_WITHIN};
use super::http::{self, Request};
use crate::daemon::Daemon;

/// Entries one `ListDir` answers at most (its depth at most 16), and the
/// time its walk may take.
const LIST_MAX: usize = 10_000;
const LIST_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);
/// A file transfer's connection to the agent: no read or write of it may
/// stall longer (the guest's side of a copy cannot hold a thread).
const NO_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to the VM's agent for a file transfer, [`NO_STALL`] on
/// each of its reads and writes.
fn transfer_conn(d: &Daemon, vm: &VmRecord) -> Result<std::os::unix::net::UnixStream, String> {
    let c = d.agent_connect(vm).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(NO_STALL))
        .and_then(|()| c.set_write_timeout(Some(NO_STALL)))
        .map_err(|e| format!("the agent connection: {e}"))?;
    Ok(c)
}

pub(super) fn filesystem(
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
            // The whole walk within its own bound, each call within its.
            let until = std::time::Instant::now() + LIST_WITHIN;
            while let Some((dir, level)) = dirs.pop() {
                if std::time::Instant::now() >= until {
                    return Err(rpc(
                        "deadline_exceeded",
                        format!("the listing took over {LIST_WITHIN:?}: ask for less depth"),
                    ));
                }
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
            match other_user(user) {
                // Made by the user (theirs, where they may).
                Some(u) => as_user(d, vm, u, &["mkdir", "-p", "--", &p], None)?,
                None => {
                    agent_call(
                        d,
                        vm,
                        Call::Mkdir {
                            path: p.clone(),
                            mode: 0o755,
                            parents: true,
                        },
                    )?;
                }
            }
            Ok(json!({"entry": entry(&stat(d, vm, &p)?)}))
        }
        "Move" => {
            let (from, to) = (path("source")?, path("destination")?);
            match other_user(user) {
                Some(u) => as_user(d, vm, u, &["mv", "-T", "--", &from, &to], None)?,
                None => {
                    agent_call(
                        d,
                        vm,
                        Call::Move {
                            from,
                            to: to.clone(),
                        },
                    )?;
                }
            }
            Ok(json!({"entry": entry(&stat(d, vm, &to)?)}))
        }
        "Remove" => {
            let p = path("path")?;
            let removed = match other_user(user) {
                Some(u) => as_user(d, vm, u, &["rm", "-rf", "--", &p], None).map(|()| Msg::Done),
                None => agent_call(
                    d,
                    vm,
                    Call::Remove {
                        path: p,
                        recursive: true,
                    },
                ),
            };
            match removed {
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

/// The user a write is made for, when it is not root (whose writes go
/// straight to the agent).
fn other_user(user: Option<&str>) -> Option<&str> {
    user.filter(|u| *u != "root" && *u != "0")
}

/// The first bytes written to it, the rest dropped: a guest's stderr
/// the daemon keeps, whatever its length.
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let room = 512usize.saturating_sub(self.0.len());
        self.0.extend_from_slice(&b[..b.len().min(room)]);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a command run as a user ended, by its exit status: the codes the
/// scripts below exit with, else what its message's last part (the
/// system's word, after the path) says.
fn user_failure(user: &str, code: Option<i32>, err: &[u8]) -> RpcErr {
    let msg = banger_core::text::escape_control(String::from_utf8_lossy(err).trim(), false);
    let why = msg.rsplit(": ").next().unwrap_or_default();
    let code = match code {
        Some(13) => "permission_denied",
        Some(21) => "invalid_argument",
        _ if why.starts_with("Permission denied") => "permission_denied",
        _ if why.starts_with("No such file") => "not_found",
        _ if why.starts_with("File exists") => "already_exists",
        _ => "internal",
    };
    rpc(code, format!("as user {user:?}: {msg}"))
}

/// Runs `argv` in the guest as `user`, `input` its stdin (the guest's
/// kernel judges what they may do): its failure as [`user_failure`] says.
fn as_user(
    d: &Daemon,
    vm: &VmRecord,
    user: &str,
    argv: &[&str],
    input: Option<&[u8]>,
) -> Result<(), RpcErr> {
    let spec = ExecSpec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        user: Some(user.to_string()),
        cwd: Some("/".into()),
        stdin: input.is_some(),
        ..Default::default()
    };
    // (No read or write of the connection stalls past NO_STALL.)
    let conn = transfer_conn(d, vm).map_err(|e| rpc("unavailable", e))?;
    let s = match Session::start(conn, Call::Exec(spec)) {
        Ok(s) => s,
        // A user the guest does not have (as envd's 401).
        Err(banger_agent::proto::ProtoError::Remote(m)) if m.contains("no user") => {
            return Err(rpc("unauthenticated", m))
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(data) = input {
        s.control().feed(data)?;
    }
    let mut err = Capped(Vec::new());
    let st = s.wait_within(&mut std::io::sink(), &mut err, NO_STALL)?;
    if st.code == Some(0) {
        return Ok(());
    }
    Err(user_failure(user, st.code, &err.0))
}

/// A file written as the user (their rights, their file; an existing one
/// truncated in place, as envd does): its directory made where missing,
/// refused with 13 where they may not write, 21 for a directory.
const WRITE_AS_USER: &str = r#"p=$1; d=${p%/*}; [ -n "$d" ] || d=/
[ -d "$p" ] && { printf '%s: is a directory\n' "$p" >&2; exit 21; }
mkdir -p -- "$d" || exit 13
if [ -e "$p" ]; then w=$p; else w=$d; fi
[ -w "$w" ] || { printf '%s: Permission denied\n' "$w" >&2; exit 13; }
exec cat > "$p""#;

/// Makes `meta` the whole metadata of the file at `path` (as envd does on
/// every upload: keys the upload lacks are cleared), and its stat after.
/// An agent older than metadata is let be when there is none to set, and
/// so is a filesystem that keeps none.
fn set_meta(
    d: &Daemon,
    vm: &VmRecord,
    path: &str,
    meta: &BTreeMap<String, String>,
) -> Result<Option<FileStat>, RpcErr> {
    let call = Call::SetMeta {
        path: path.to_string(),
        meta: meta.clone(),
    };
    let conn = d.agent_connect(vm)?;
    match agent::call_within(conn, call, CALL_WITHIN) {
        Ok(Msg::Stat(s)) => Ok(Some(s)),
        // A filesystem without user attributes (as envd: the file is
        // written, its answer claims no metadata).
        Ok(Msg::Error { message }) if message.contains("(os error 95)") => Ok(None),
        Ok(Msg::Error { message }) => Err(RpcErr::from_guest(message)),
        Ok(other) => Err(rpc("internal", format!("the agent answered {other:?}"))),
        // An agent older than the call closes the connection unanswered.
        Err(banger_agent::proto::ProtoError::Closed) if meta.is_empty() => Ok(None),
        Err(banger_agent::proto::ProtoError::Remote(m)) if m.contains("(os error 95)") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether the guest's agent keeps file metadata: asked with a `SetMeta`
/// of no path, which a current agent refuses by name and an agent older
/// than the call (a guest restored from an older snapshot) answers by
/// closing the connection. (status, why) when it does not.
fn keeps_meta(d: &Daemon, vm: &VmRecord) -> Result<(), (u16, String)> {
    let probe = Call::SetMeta {
        path: String::new(),
        meta: BTreeMap::new(),
    };
    let conn = d.agent_connect(vm).map_err(|e| (503, e.to_string()))?;
    match agent::call_within(conn, probe, CALL_WITHIN) {
        Err(banger_agent::proto::ProtoError::Closed) => Err((
            501,
            format!(
                "sandbox {:?}: its guest agent predates file metadata (restart the sandbox's VM \
                 to give it the current agent, or write without metadata)",
                vm.name
            ),
        )),
        _ => Ok(()),
    }
}

/// `GET /files`: the file's bytes.
pub(super) fn download(
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
    let conn = match transfer_conn(d, vm) {
        Ok(c) => c,
        Err(e) => return plain(w, 502, &e),
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

/// The metadata a `POST /files` gives every file it carries: its
/// `X-Metadata-<key>` headers, keys lowercased (as envd does), checked.
fn metadata(req: &Request) -> Result<BTreeMap<String, String>, String> {
    const PREFIX: &str = "x-metadata-";
    let mut meta = BTreeMap::new();
    for (k, v) in req.headers() {
        let Some(key) = k
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| k.get(PREFIX.len()..))
            .filter(|k| !k.is_empty())
        else {
            continue;
        };
        meta.entry(key.to_ascii_lowercase())
            .or_insert_with(|| v.to_string());
    }
    check_meta(&meta)?;
    Ok(meta)
}

/// Files to write: (path, bytes of the request's body) each.
type Files<'a> = Vec<(String, &'a [u8])>;

/// A decoded body, and its share of the uploads in flight.
type Decoded = (Vec<u8>, http::BodyShare);

/// A gzip body (`Content-Encoding: gzip`) decoded, within the upload's
/// bound and holding its share of the uploads in flight (kept until the
/// files are written); `None` for a body sent as it is.
fn decoded(req: &Request) -> Result<Option<Decoded>, (u16, String)> {
    match req.header("content-encoding").map(str::trim) {
        None | Some("") => Ok(None),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(None),
        Some(e) if e.eq_ignore_ascii_case("gzip") => {
            http::gunzip(&req.body, super::envd::UPLOAD_MAX)
                .map(Some)
                .map_err(|e| match e {
                    http::HttpError::TooLarge(_) => (413, e.to_string()),
                    http::HttpError::Busy => (503, e.to_string()),
                    e => (400, e.to_string()),
                })
        }
        // (envd answers 400 too.)
        Some(e) => Err((
            400,
            format!("Content-Encoding {e:?}: only gzip and identity are taken"),
        )),
    }
}

/// The files a `POST /files` carries in `body` (its decoded body).
fn parts<'a>(req: &Request, body: &'a [u8], user: Option<&str>) -> Result<Files<'a>, String> {
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
        for (headers, body) in multipart(body, &boundary)? {
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
        let path = single.ok_or("path is required for an octet-stream upload")?;
        Ok(vec![(resolve(path, user).map_err(|e| e.message)?, body)])
    }
}

/// A multipart part: its headers, and its content within the body.
type Part<'a> = (Vec<(String, String)>, &'a [u8]);

/// A multipart body's parts.
fn multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, String> {
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
        parts.push((headers, &part[split + 4..]));
        if parts.len() > 1000 {
            return Err("over 1000 multipart parts".into());
        }
        at = next + delim.len();
    }
}

/// `POST /files`: each file written (parents made), made the user's.
pub(super) fn upload(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    user: Option<&str>,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let meta = match metadata(req) {
        Ok(m) => m,
        Err(e) => return plain(w, 400, &format!("invalid metadata: {e}")),
    };
    // (The decoded body and its share live until the files are written.)
    let decoded = match decoded(req) {
        Ok(d) => d,
        Err((status, e)) => return plain(w, status, &e),
    };
    let body = decoded
        .as_ref()
        .map_or(req.body.as_slice(), |(b, _)| b.as_slice());
    let files = match parts(req, body, user) {
        Ok(f) => f,
        Err(e) => return plain(w, 400, &e),
    };
    // Metadata for a guest whose agent cannot keep it: said before
    // anything is written.
    if !meta.is_empty() {
        if let Err(e) = keeps_meta(d, vm) {
            return plain(w, e.0, &e.1);
        }
    }
    let mut written = Vec::new();
    for (path, data) in &files {
        if path == "/" {
            return plain(w, 400, "path / is a directory");
        }
        let status_of = |e: &RpcErr| {
            if e.message.contains("(os error 28)") || e.message.contains("No space left") {
                507
            } else {
                match e.code {
                    "permission_denied" => 403,
                    "unauthenticated" => 401,
                    "invalid_argument" => 400,
                    _ => 500,
                }
            }
        };
        match other_user(user) {
            // A user other than root writes with their own rights, in the
            // guest (never root's write of a path they could redirect).
            Some(u) => {
                let argv = ["sh", "-c", WRITE_AS_USER, "sh", path.as_str()];
                if let Err(e) = as_user(d, vm, u, &argv, Some(data)) {
                    return plain(w, status_of(&e), &format!("write {path}: {}", e.message));
                }
            }
            None => {
                let conn = match transfer_conn(d, vm) {
                    Ok(c) => c,
                    Err(e) => return plain(w, 502, &e),
                };
                let now = banger_core::unix_now().max(0) as u64;
                let put = agent::put_tar(conn, "/", |out| {
                    let mut b = tar::Builder::new(out);
                    let mut h = tar::Header::new_gnu();
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_mtime(now);
                    h.set_entry_type(tar::EntryType::Regular);
                    b.append_data(&mut h, path.trim_start_matches('/'), *data)?;
                    b.finish()
                });
                if let Err(e) = put {
                    let e = RpcErr::from(e);
                    return plain(w, status_of(&e), &format!("write {path}: {}", e.message));
                }
            }
        }
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        let mut info = json!({"path": path, "name": name, "type": "file"});
        match set_meta(d, vm, path, &meta) {
            Ok(Some(s)) if !s.meta.is_empty() => info["metadata"] = json!(s.meta),
            Ok(_) => {}
            Err(e) => {
                let status = if e.message.contains("(os error 28)") {
                    507
                } else {
                    500
                };
                return plain(w, status, &format!("write {path}: {}", e.message));
            }
        }
        written.push(info);
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
    fn multipart_parts_are_split_at_their_boundary() {
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a/b.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XX--\r\n";
        let parts = multipart(body, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].1, b"hello");
        assert!(multipart(b"--XX\r\nbroken", "XX").is_err());
    }
}
