//! The E2B-compatible API (issue 22): E2B's REST API (`rest`) and envd's
//! (`envd`) on one loopback TCP port, so that E2B's own SDKs drive banger
//! VMs with only `E2B_API_URL`, `E2B_SANDBOX_URL` and `E2B_API_KEY` set.
//! Off by default; `banger api serve --listen 127.0.0.1:PORT` (or the
//! `api_listen` setting) makes the running daemon serve it.
//!
//! - A sandbox is a VM (its ID is the VM's name), a template an image
//!   (`base`: the default image).
//! - REST requests carry `X-API-Key`: a key made by `banger api token
//!   create`, stored as a SHA-256, compared in constant time, and bound to
//!   the local user who made it, whose rights the request has (a member
//!   of the socket group who left it has none).
//! - envd requests carry `E2b-Sandbox-Id` and `X-Access-Token`: the token
//!   a sandbox's create or connect answered, derived from the VM's id and
//!   a secret of the daemon's (`<state>/api.secret`, root's), compared in
//!   constant time; they are translated into guest agent calls.
//! - Everything a client sends is bounded (heads, bodies, the time a
//!   request may take: `http`), and so are the connections served at once.

pub mod envd;
mod files;
pub mod http;
mod kills;
mod process;
pub mod rest;
mod tls;
mod watch;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use banger_core::api::ApiTokenInfo;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::access::Caller;
use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

/// Connections served at once; more are answered 503 and closed.
const CONNS_MAX: usize = 128;

/// The listener while the API is served.
#[derive(Default)]
pub struct Api {
    running: Mutex<Option<Running>>,
    /// envd's watchers (the sync SDK's `watch_dir`).
    watchers: watch::Watchers,
    /// Processes to end at their call's time (`kill_at`).
    kills: kills::Kills,
    /// `api.secret`, once read.
    secret: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = lock(&self.running).as_ref().map(|r| r.addr);
        f.debug_struct("Api").field("listen", &at).finish()
    }
}

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: std::thread::JoinHandle<()>,
}

/// An API error: an HTTP status and a message (E2B's `{code, message}`).
#[derive(Debug)]
pub struct Fault {
    pub status: u16,
    pub message: String,
}

impl Fault {
    pub fn new(status: u16, message: impl Into<String>) -> Fault {
        Fault {
            status,
            message: message.into(),
        }
    }
}

impl From<DaemonError> for Fault {
    fn from(e: DaemonError) -> Fault {
        use banger_core::api::ErrorKind;
        let status = match e.kind() {
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => 409,
            ErrorKind::InvalidInput => 400,
            _ => 500,
        };
        Fault::new(status, e.to_string())
    }
}

impl Daemon {
    /// Serves the API on `listen` (a loopback address; port 0 picks one):
    /// where it listens. Serving already: refused, naming where.
    pub fn api_serve(&self, listen: &str) -> Result<String> {
        let addr: SocketAddr = listen.parse().map_err(|_| {
            DaemonError::Invalid(format!(
                "--listen {listen:?}: an address and port, e.g. 127.0.0.1:3000"
            ))
        })?;
        if !addr.ip().is_loopback() {
            return Err(DaemonError::Invalid(format!(
                "--listen {addr}: the API is served on a loopback address only (127.0.0.1 or \
                 ::1): its keys travel in clear"
            )));
        }
        let mut running = lock(&self.api.running);
        if let Some(r) = running.as_ref() {
            return Err(DaemonError::Invalid(format!(
                "the API is served on {} already: `banger api stop` first",
                r.addr
            )));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| DaemonError::Invalid(format!("--listen {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| DaemonError::Invalid(format!("--listen {addr}: {e}")))?;
        // The secret envd tokens are derived from, made before any request.
        secret(self)?;
        // HTTPS on the same port (E2B_DOMAIN's clients); without it, plain
        // HTTP still is.
        let tls = match tls::Tls::new(&self.cfg.layout.state_dir, &self.cfg.dns_suffix, addr) {
            Ok((t, ca)) => {
                info!(ca = %ca.display(), "the API takes HTTPS too");
                Some(Arc::new(t))
            }
            Err(e) => {
                warn!(err = %e, "the API is served without HTTPS");
                None
            }
        };
        let me = self.weak().upgrade().ok_or_else(|| {
            DaemonError::Invalid("the daemon is not serving (no handle on itself)".into())
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let accept = std::thread::Builder::new()
            .name("e2b-api".into())
            .spawn(move || accept_loop(me, listener, s2, tls))
            .map_err(|e| DaemonError::Invalid(format!("cannot start the API's thread: {e}")))?;
        info!(%addr, "serving the E2B-compatible API");
        *running = Some(Running { addr, stop, accept });
        Ok(addr.to_string())
    }

    /// The IPv4 address the API is served on, if it is: what banger's DNS
    /// answers the host for `api.<suffix>` and `<port>-<sandbox>.<suffix>`.
    pub(crate) fn api_ipv4(&self) -> Option<std::net::Ipv4Addr> {
        match lock(&self.api.running).as_ref()?.addr {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        }
    }

    /// Where the API is served, if it is.
    pub fn api_status(&self) -> Option<String> {
        lock(&self.api.running).as_ref().map(|r| r.addr.to_string())
    }

    /// Stops serving the API (requests in flight finish).
    pub fn api_stop(&self) -> Result<()> {
        let Some(r) = lock(&self.api.running).take() else {
            return Err(DaemonError::Invalid("the API is not served".into()));
        };
        r.stop.store(true, Ordering::SeqCst);
        // The accept loop wakes on a connection of its own.
        let _ = TcpStream::connect(r.addr);
        if r.accept.join().is_err() {
            warn!("the API's accept thread panicked");
        }
        info!(addr = %r.addr, "the E2B-compatible API is no longer served");
        Ok(())
    }

    /// The sandbox `name` ends `secs` from now (`only_extend`: unless it
    /// ends later already): its TTL, counted from its start, set so.
    pub fn set_ttl_from_now(&self, name: &str, secs: u64, only_extend: bool) -> Result<()> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        let started = vm.runtime.started_at.unwrap_or_else(banger_core::unix_now);
        let ran = (banger_core::unix_now() - started).max(0) as u64;
        let ttl = ran + secs;
        if only_extend && vm.spec.auto_stop.ttl_secs.is_some_and(|t| t >= ttl) {
            return Ok(());
        }
        vm.spec.auto_stop.ttl_secs = Some(ttl);
        self.store().update_spec(&vm.id, &vm.spec)?;
        Ok(())
    }

    /// A new API key for `caller`, named `name`: (name, key).
    pub fn api_token_create(&self, caller: &Caller, name: &str) -> Result<(String, String)> {
        banger_core::validate_name(name)
            .map_err(|e| DaemonError::Invalid(format!("token name {name:?}: {e}")))?;
        let key = format!("banger_{}", crate::daemon::random_hex(24)?);
        self.store().insert_token(&banger_store::ApiToken {
            uid: caller.uid,
            name: name.to_string(),
            hash: Sha256::digest(key.as_bytes()).to_vec(),
            created_at: banger_core::unix_now(),
        })?;
        info!(uid = caller.uid, name, "API key made");
        Ok((name.to_string(), key))
    }

    /// The caller's keys (root: everyone's).
    pub fn api_token_list(&self, caller: &Caller) -> Result<Vec<ApiTokenInfo>> {
        let uid = (!caller.is_root()).then_some(caller.uid);
        Ok(self
            .store()
            .list_tokens(uid)?
            .into_iter()
            .map(|t| ApiTokenInfo {
                name: t.name,
                uid: t.uid,
                created_at: t.created_at,
            })
            .collect())
    }

    /// Removes the caller's key `name` (root may name another user's).
    pub fn api_token_delete(&self, caller: &Caller, name: &str, uid: Option<u32>) -> Result<()> {
        let uid = match uid {
            Some(u) if u != caller.uid && !caller.is_root() => {
                return Err(DaemonError::Invalid(
                    "only root removes another user's API keys".into(),
                ))
            }
            Some(u) => u,
            None => caller.uid,
        };
        if !self.store().delete_token(uid, name)? {
            return Err(DaemonError::Invalid(format!(
                "no API key {name:?} of uid {uid}: `banger api token ls` lists them"
            )));
        }
        Ok(())
    }
}

/// A connection's place among [`CONNS_MAX`], given back when dropped
/// (whatever ends its thread, a panic included).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    d: Arc<Daemon>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    tls: Option<Arc<tls::Tls>>,
) {
    let conns = Arc::new(AtomicUsize::new(0));
    let Ok(me) = listener.local_addr() else {
        return;
    };
    for s in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: a moment before the next try,
                // not a spin.
                warn!(err = %e, "the API's accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        // A TLS relay's own connection: its client holds the slot, and
        // what it carries is plaintext.
        let relayed = tls
            .as_ref()
            .is_some_and(|t| s.peer_addr().is_ok_and(|p| t.relays.take(p)));
        if !relayed && conns.fetch_add(1, Ordering::SeqCst) >= CONNS_MAX {
            conns.fetch_sub(1, Ordering::SeqCst);
            let mut s = s;
            let _ = http::respond(
                &mut s,
                503,
                &[
                    ("Content-Type", "application/json"),
                    ("Connection", "close"),
                ],
                br#"{"code":503,"message":"too many connections to banger's API"}"#,
            );
            continue;
        }
        let slot = (!relayed).then(|| Slot(conns.clone()));
        let (d, stop, tls) = (d.clone(), stop.clone(), tls.clone());
        // (A thread that cannot start drops its slot with the closure.)
        let spawned = std::thread::Builder::new()
            .name("e2b-conn".into())
            .spawn(move || {
                let _slot = slot;
                match tls.filter(|_| !relayed && starts_tls(&s)) {
                    Some(t) => t.relay(s, me),
                    None => serve(&d, s, &stop),
                }
            });
        if spawned.is_err() {
            warn!("cannot start a thread for an API connection");
        }
    }
}

/// The body a request may carry, judged on its head, before any of it is
/// read: its credentials first (a key, or a sandbox's token), then its
/// size (uploads are large, the rest JSON).
/// What a request's credentials were found to stand for, on its head.
enum Vouched {
    /// envd's: the sandbox's VM.
    Envd(Box<banger_core::VmRecord>),
    /// REST's: the key's user, and the key.
    Rest(Box<(Caller, Key)>),
    /// `GET /health`, which needs none.
    Health,
}

fn body_max(
    d: &Daemon,
    req: &http::Request,
) -> std::result::Result<(usize, Vouched), (u16, String)> {
    if let Some(id) = req
        .header("e2b-sandbox-id")
        .or_else(|| envd_host(req.header("host")))
    {
        let vm = envd::sandbox(d, id, req.header("x-access-token"))?;
        let max = if req.method == "POST" && req.path == "/files" {
            envd::UPLOAD_MAX
        } else {
            1 << 20
        };
        return Ok((max, Vouched::Envd(Box::new(vm))));
    }
    if req.method == "GET" && req.path == "/health" {
        return Ok((0, Vouched::Health));
    }
    let key = req.header("x-api-key").ok_or((
        401,
        "no X-API-Key: make one with `banger api token create`".to_string(),
    ))?;
    let who = caller_of(d, key).map_err(|f| (f.status, f.message))?;
    Ok((1 << 20, Vouched::Rest(Box::new(who))))
}

/// Whether a new connection's first byte (waited for as long as a first
/// request's) is a TLS handshake's.
fn starts_tls(s: &TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut b = [0u8; 1];
    loop {
        match s.peek(&mut b) {
            Ok(1) => return b[0] == tls::HANDSHAKE,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
}

/// The sandbox an envd request names by host, as SDKs without
/// `E2B_SANDBOX_URL` (and those before the `E2b-Sandbox-Id` header)
/// address it: `49983-<sandbox ID>.<domain>[:port]`. Any other port's
/// host (a sandbox's own service) is no envd request.
fn envd_host(host: Option<&str>) -> Option<&str> {
    let (label, _) = host?.split_once('.')?;
    let id = label.strip_prefix(ENVD_PORT_PREFIX)?;
    (!id.is_empty()).then_some(id)
}

/// envd's port in E2B's sandboxes, as it starts a host name.
const ENVD_PORT_PREFIX: &str = "49983-";

fn serve(d: &Arc<Daemon>, s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    let mut conn = match http::Conn::new(s) {
        Ok(c) => c,
        Err(_) => return,
    };
    loop {
        // Credentials are judged once, on the head; what they stand for
        // goes on to the handler.
        let vouched = std::cell::RefCell::new(None);
        let req = match conn.next(&|r| {
            let (max, v) = body_max(d, r)?;
            *vouched.borrow_mut() = Some(v);
            Ok(max)
        }) {
            Ok(Some(r)) => r,
            Ok(None) | Err(http::HttpError::Closed) => return,
            Err(e) => {
                let status = match e {
                    http::HttpError::TooLarge(_) => 413,
                    http::HttpError::Timeout => 408,
                    http::HttpError::Refused(s, _) => s,
                    http::HttpError::Busy => 503,
                    _ => 400,
                };
                let _ = rest::fault(&mut conn.w, &Fault::new(status, e.to_string()), true);
                conn.drain(4 << 20, std::time::Duration::from_secs(2));
                return;
            }
        };
        let Some(vouched) = vouched.into_inner() else {
            return;
        };
        let keep = match route(d, &req, vouched, &mut conn.w) {
            Ok(keep) => keep,
            Err(_) => return,
        };
        if !keep || req.close || stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Answers one request: whether the connection may carry another (a
/// streamed answer ends it).
fn route(
    d: &Arc<Daemon>,
    req: &http::Request,
    vouched: Vouched,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    match vouched {
        Vouched::Envd(vm) => envd::handle(d, *vm, req, w),
        Vouched::Health => {
            http::respond(w, 204, &[], b"")?;
            Ok(true)
        }
        Vouched::Rest(who) => {
            let (caller, key) = *who;
            rest::handle(d, &caller, &key, req, w)
        }
    }
}

/// The API key a request came with (its row).
pub type Key = banger_store::ApiToken;

/// The local user whose key `key` is, as a caller of theirs (their
/// groups now: a member who left the socket group has no rights left),
/// and the key's row.
fn caller_of(d: &Daemon, key: &str) -> std::result::Result<(Caller, Key), Fault> {
    let hash = Sha256::digest(key.as_bytes());
    let tokens = d
        .store()
        .list_tokens(None)
        .map_err(|e| Fault::new(500, e.to_string()))?;
    // Every row compared, in constant time each.
    let mut found = None;
    for t in tokens {
        if bool::from(t.hash.as_slice().ct_eq(hash.as_slice())) {
            found = Some(t);
        }
    }
    let key = found.ok_or_else(|| Fault::new(401, "this API key is not one of banger's"))?;
    Ok((caller_for(d, key.uid)?, key))
}

/// User `uid` as a caller: their groups now, refused once they are no
/// longer in the socket group.
pub(crate) fn caller_for(d: &Daemon, uid: u32) -> std::result::Result<Caller, Fault> {
    if uid == 0 {
        return Ok(Caller::root());
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .ok_or_else(|| Fault::new(401, format!("the API key's user (uid {uid}) is gone")))?;
    let name = std::ffi::CString::new(user.name.clone())
        .map_err(|_| Fault::new(401, "the API key's user has a bad name"))?;
    let groups: Vec<u32> = nix::unistd::getgrouplist(&name, user.gid)
        .map_err(|e| Fault::new(500, format!("the groups of uid {uid}: {e}")))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    if let Some(gid) = d.cfg.socket_gid {
        if !groups.contains(&gid) {
            return Err(Fault::new(
                401,
                format!(
                    "the API key's user {} is no longer in banger's socket group",
                    user.name
                ),
            ));
        }
    }
    Ok(Caller {
        uid,
        gid: user.gid.as_raw(),
        pid: 0,
        groups,
    })
}

/// The daemon's secret for envd tokens: `<state>/api.secret`, 32 random
/// bytes, root's and 0600, made once.
fn secret(d: &Daemon) -> Result<Vec<u8>> {
    let mut cached = lock(&d.api.secret);
    if let Some(s) = cached.as_ref() {
        return Ok(s.clone());
    }
    let s = read_or_make_secret(d)?;
    *cached = Some(s.clone());
    Ok(s)
}

fn read_or_make_secret(d: &Daemon) -> Result<Vec<u8>> {
    let path = d.cfg.layout.state_dir.join("api.secret");
    match std::fs::read(&path) {
        Ok(s) if s.len() == 32 => return Ok(s),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(DaemonError::Invalid(format!("{}: {e}", path.display())));
        }
    }
    let s = crate::daemon::random_bytes(32)?;
    // Root's and 0600 from its creation: never readable by anyone else,
    // not even for a moment.
    banger_host::fsutil::write_new_mode(&path, &s, 0o600)
        .map_err(|e| DaemonError::Invalid(e.to_string()))?;
    Ok(s)
}

/// The envd access token of sandbox `name` for the holder of `key` (what
/// its create and connect answer, and every envd request must carry):
/// `u<uid>.<key name>.<MAC>`, the MAC a SHA-256 of the daemon's secret,
/// the sandbox and the key. It is good while the key is (removed, or its
/// user out of the group, it is refused) and names its holder.
pub(crate) fn access_token(d: &Daemon, name: &str, key: &Key) -> Result<String> {
    let mut h = Sha256::new();
    h.update(secret(d)?);
    h.update(b"envd:");
    h.update(name.as_bytes());
    h.update(format!(":{}:{}:", key.uid, key.name).as_bytes());
    h.update(&key.hash);
    let mac: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("u{}.{}.{mac}", key.uid, key.name))
}

/// RFC 3339 (UTC, seconds) of a unix time.
pub(crate) fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_hosts_name_their_sandbox() {
        assert_eq!(
            envd_host(Some("49983-keen-seal.e2b.local:3000")),
            Some("keen-seal")
        );
        assert_eq!(envd_host(Some("49983-a.localhost")), Some("a"));
        // Another port's service, the API's own host, nothing: not envd.
        assert_eq!(envd_host(Some("8080-keen-seal.e2b.local")), None);
        assert_eq!(envd_host(Some("api.e2b.local")), None);
        assert_eq!(envd_host(Some("49983-.e2b.local")), None);
        assert_eq!(envd_host(Some("127.0.0.1:3000")), None);
        assert_eq!(envd_host(None), None);
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
