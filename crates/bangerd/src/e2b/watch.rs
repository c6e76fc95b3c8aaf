//! envd's directory watches on the guest agent's (inotify) `Watch`: the
//! `WatchDir` stream (E2B's async SDK), and the watchers the sync SDK
//! polls (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`). A
//! watcher is its sandbox's only, bounded in number and in the events it
//! keeps, and goes with its VM (the agent's connection closes).

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use banger_agent::proto::{read_msg, write_request, Call, FileStat, Msg};
use banger_core::VmRecord;
use serde_json::{json, Value};

use super::envd::{resolve, rpc, RpcErr, CALL_WITHIN};
use super::http::Request;
use super::process::{timing, Stream};
use crate::daemon::{lock, Daemon};

/// Watchers of one sandbox at most, and of all.
const PER_VM: usize = 16;
const ALL: usize = 256;
/// Events a watcher keeps between two polls, and their bytes; past
/// either the oldest go.
const KEPT: usize = 10_000;
const KEPT_BYTES: usize = 4 << 20;

/// A watcher's events not yet polled.
#[derive(Default)]
struct Kept {
    q: VecDeque<(Value, usize)>,
    bytes: usize,
}

impl Kept {
    fn push(&mut self, e: Value) {
        let n = e.to_string().len();
        self.q.push_back((e, n));
        self.bytes += n;
        while self.q.len() > KEPT || self.bytes > KEPT_BYTES {
            match self.q.pop_front() {
                Some((_, n)) => self.bytes -= n,
                None => break,
            }
        }
    }

    fn drain(&mut self) -> Vec<Value> {
        self.bytes = 0;
        self.q.drain(..).map(|(e, _)| e).collect()
    }
}

/// The sync SDK's watchers, by id.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Watcher>>,
}

struct Watcher {
    vm_id: String,
    conn: UnixStream,
    events: Arc<Mutex<Kept>>,
    live: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The agent's watch ends with its connection (and the reader).
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// envd's event type of the agent's kind.
fn event_type(kind: &str) -> &'static str {
    match kind {
        "create" => "EVENT_TYPE_CREATE",
        "modify" => "EVENT_TYPE_WRITE",
        "remove" => "EVENT_TYPE_REMOVE",
        "rename" => "EVENT_TYPE_RENAME",
        "attrib" => "EVENT_TYPE_CHMOD",
        _ => "EVENT_TYPE_UNSPECIFIED",
    }
}

/// The agent's watch of `path` begun: its connection, past the agent's
/// word that it watches.
fn open(d: &Daemon, vm: &VmRecord, a: &Args) -> Result<UnixStream, RpcErr> {
    let conn = d.agent_connect(vm)?;
    {
        let mut c = banger_agent::deadline::Deadline::new(&conn, CALL_WITHIN);
        write_request(
            &mut c,
            Call::Watch {
                path: a.path.clone(),
                recursive: a.recursive,
                entries: a.entries,
                network_mounts: a.network_mounts,
            },
        )?;
        match read_msg(&mut c)? {
            Msg::Done => {}
            Msg::Error { message } => return Err(RpcErr::from_guest(message)),
            other => return Err(rpc("internal", format!("the agent answered {other:?}"))),
        }
    }
    conn.set_read_timeout(None)
        .map_err(|e| rpc("internal", e.to_string()))?;
    Ok(conn)
}

/// A `FilesystemEvent` of the agent's event under `root`, with the
/// `EntryInfo` of what it is about when the watch asked for it.
fn event(root: &str, path: &str, kind: &str, entry: Option<&FileStat>) -> Value {
    let name = path
        .strip_prefix(root)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(path);
    let mut e = json!({"name": name, "type": event_type(kind)});
    if let Some(s) = entry {
        e["entry"] = super::envd::entry(s);
    }
    e
}

/// A watch's request: `WatchDirRequest` or `CreateWatcherRequest`.
struct Args {
    path: String,
    recursive: bool,
    entries: bool,
    network_mounts: bool,
}

fn args(v: &Value, user: Option<&str>) -> Result<Args, RpcErr> {
    // Connect's JSON names fields in lowerCamelCase; the proto's names
    // are taken too.
    let flag = |camel: &str, snake: &str| v[camel] == true || v[snake] == true;
    Ok(Args {
        path: resolve(v["path"].as_str().unwrap_or_default(), user)?,
        recursive: v["recursive"] == true,
        entries: flag("includeEntry", "include_entry"),
        network_mounts: flag("allowNetworkMounts", "allow_network_mounts"),
    })
}

/// `CreateWatcher`: its id.
pub(super) fn create(
    d: &Daemon,
    vm: &VmRecord,
    v: &Value,
    user: Option<&str>,
) -> Result<Value, RpcErr> {
    let a = args(v, user)?;
    let watchers = &d.api.watchers;
    {
        let mut map = lock(&watchers.map);
        // Those whose watch ended (their VM stopped) go first.
        map.retain(|_, w| w.live.load(std::sync::atomic::Ordering::SeqCst));
        if map.len() >= ALL || map.values().filter(|w| w.vm_id == vm.id).count() >= PER_VM {
            return Err(rpc(
                "resource_exhausted",
                format!("at most {PER_VM} watchers per sandbox: remove one first"),
            ));
        }
    }
    let conn = open(d, vm, &a)?;
    let reader = conn
        .try_clone()
        .map_err(|e| rpc("internal", e.to_string()))?;
    let events = Arc::new(Mutex::new(Kept::default()));
    let live = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (ev, l2, root) = (events.clone(), live.clone(), a.path);
    std::thread::Builder::new()
        .name("e2b-watch".into())
        .spawn(move || {
            let mut r = reader;
            while let Ok(Msg::Event { path, kind, entry }) = read_msg(&mut r) {
                let e = event(&root, &path, &kind, entry.as_deref());
                lock(&ev).push(e);
            }
            l2.store(false, std::sync::atomic::Ordering::SeqCst);
        })
        .map_err(|e| rpc("internal", format!("a watcher's thread: {e}")))?;
    let id = crate::daemon::random_hex(12).map_err(RpcErr::from)?;
    let mut map = lock(&watchers.map);
    // (Looked at again: others may have been made meanwhile.)
    if map.len() >= ALL || map.values().filter(|w| w.vm_id == vm.id).count() >= PER_VM {
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return Err(rpc(
            "resource_exhausted",
            format!("at most {PER_VM} watchers per sandbox: remove one first"),
        ));
    }
    map.insert(
        id.clone(),
        Watcher {
            vm_id: vm.id.clone(),
            conn,
            events,
            live,
        },
    );
    Ok(json!({"watcherId": id}))
}

fn id_of(v: &Value) -> String {
    match &v["watcherId"] {
        Value::Null => v["watcher_id"].as_str().unwrap_or_default().to_string(),
        id => id.as_str().unwrap_or_default().to_string(),
    }
}

/// `GetWatcherEvents`: the events since the last call.
pub(super) fn events(d: &Daemon, vm: &VmRecord, v: &Value) -> Result<Value, RpcErr> {
    let id = id_of(v);
    let map = lock(&d.api.watchers.map);
    let w = map
        .get(&id)
        .filter(|w| w.vm_id == vm.id)
        .ok_or_else(|| rpc("not_found", format!("watcher {id:?} not found")))?;
    let drained = lock(&w.events).drain();
    Ok(json!({"events": drained}))
}

/// `RemoveWatcher`.
pub(super) fn remove(d: &Daemon, vm: &VmRecord, v: &Value) -> Result<Value, RpcErr> {
    let id = id_of(v);
    let mut map = lock(&d.api.watchers.map);
    match map.get(&id) {
        Some(w) if w.vm_id == vm.id => {
            map.remove(&id);
            Ok(json!({}))
        }
        _ => Err(rpc("not_found", format!("watcher {id:?} not found"))),
    }
}

/// `WatchDir`: `start`, then the events as they come, keepalives when
/// quiet, until the client goes, the watch ends, or `Connect-Timeout-Ms`.
pub(super) fn stream(
    d: &Daemon,
    vm: &VmRecord,
    req: &Request,
    v: &Value,
    user: Option<&str>,
    w: &mut TcpStream,
) -> Result<std::io::Result<bool>, RpcErr> {
    let a = args(v, user)?;
    let conn = open(d, vm, &a)?;
    let path = a.path;
    let reader = conn
        .try_clone()
        .map_err(|e| rpc("internal", e.to_string()))?;
    // Bounded: a client that reads slowly holds the agent's watch back,
    // not the daemon's memory.
    let (tx, rx) = mpsc::sync_channel(1024);
    let feeder = std::thread::Builder::new()
        .name("e2b-watchdir".into())
        .spawn(move || {
            let mut r = reader;
            while let Ok(Msg::Event { path, kind, entry }) = read_msg(&mut r) {
                if tx.send((path, kind, entry)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| rpc("internal", format!("a watch's thread: {e}")))?;
    let (keepalive, life) = timing(req);
    let started = Instant::now();
    let run = || -> std::io::Result<bool> {
        let s = Stream::start(w)?;
        s.frame(0, &json!({"start": {}}))?;
        loop {
            let wait = match life {
                Some(l) => keepalive.min(l.saturating_sub(started.elapsed())),
                None => keepalive,
            };
            if life.is_some_and(|l| started.elapsed() >= l) {
                s.end(Some(rpc("deadline_exceeded", "the watch's time ran out")))?;
                return Ok(true);
            }
            match rx.recv_timeout(wait) {
                Ok((p, kind, entry)) => s.frame(
                    0,
                    &json!({"filesystem": event(&path, &p, &kind, entry.as_deref())}),
                )?,
                Err(RecvTimeoutError::Timeout) => {
                    if life.is_some_and(|l| started.elapsed() >= l) {
                        s.end(Some(rpc("deadline_exceeded", "the watch's time ran out")))?;
                        return Ok(true);
                    }
                    s.frame(0, &json!({"keepalive": {}}))?;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    s.end(Some(rpc("unavailable", "the sandbox's watch ended")))?;
                    return Ok(true);
                }
            }
        }
    };
    let r = run();
    // The agent's watch ends with its connection; the feeder with it.
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = feeder.join();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_events_are_bounded_in_number_and_bytes() {
        let mut k = Kept::default();
        for i in 0..KEPT + 5 {
            k.push(json!({"name": i.to_string()}));
        }
        assert_eq!(k.q.len(), KEPT);
        assert_eq!(k.q[0].0["name"], "5", "the oldest went");
        let big = "x".repeat(1 << 20);
        for _ in 0..6 {
            k.push(json!({ "name": big }));
        }
        assert!(
            k.bytes <= KEPT_BYTES && k.q.len() == 3,
            "{} {}",
            k.bytes,
            k.q.len()
        );
        assert_eq!(k.drain().len(), 3);
        assert_eq!((k.bytes, k.q.len()), (0, 0));
    }

    #[test]
    fn events_are_named_under_the_watched_dir() {
        assert_eq!(
            event("/tmp/w", "/tmp/w/a/b.txt", "create", None),
            json!({"name": "a/b.txt", "type": "EVENT_TYPE_CREATE"})
        );
        assert_eq!(
            event("/tmp/w", "/x", "attrib", None)["type"],
            "EVENT_TYPE_CHMOD"
        );
    }
}
