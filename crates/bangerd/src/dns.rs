//! bangerd's DNS: `<name>.<suffix>` (default `vm`) answered with the VM's
//! address; every other name forwarded to the host's resolvers as the
//! daemon sees them (a loopback stub such as systemd-resolved's 127.0.0.53
//! included, which guests could never reach themselves). Messages are
//! parsed and built with hickory-proto; nothing of a query is trusted: a
//! message that does not parse is dropped, names are compared lowercased,
//! answers are built from the store, forwarded replies are relayed only if
//! they parse and carry the query's id.
//!
//! Who may resolve what: the host (the loopback listener) every VM; a guest
//! (the listener on its gateway address) only itself, since VMs on no
//! common network cannot reach each other either.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tracing::{debug, warn};

use crate::daemon::Daemon;
use crate::error::{DaemonError, Result};

/// TTL of banger's answers: short, VMs come and go.
const TTL: u32 = 5;
/// How long an upstream resolver may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries in flight per listener; past it a query gets SERVFAIL
/// at once (a guest flooding its resolver cannot make the daemon start
/// threads without bound).
pub const MAX_FORWARDS: usize = 16;

/// `_banger.<suffix>` answers with the host listener's address: what
/// `doctor` resolves to see whether the host's resolver routes `.vm`
/// names to banger.
pub const CHECK_LABEL: &str = "_banger";

/// What DNS answers from: every VM's name, id, address and network, kept
/// current by the lifecycle as it writes rows (create, `Daemon::save`,
/// delete), so that a query never takes the store's lock nor decodes a
/// row: a guest flooding its resolver slows neither other guests nor the
/// CLI.
#[derive(Debug, Default)]
pub struct View(std::sync::RwLock<ViewInner>);

#[derive(Debug, Default)]
struct ViewInner {
    /// By VM name.
    by_name: std::collections::HashMap<String, Entry>,
    /// VM id to name.
    names: std::collections::HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: String,
    ip: Option<Ipv4Addr>,
    network: Option<String>,
}

impl View {
    fn entry(vm: &banger_core::VmRecord) -> Entry {
        Entry {
            id: vm.id.clone(),
            // A pod VM's /30 is not its guest's address (it has its
            // pod's, on the pod's network): not published.
            ip: vm
                .runtime
                .guest_ip
                .as_deref()
                .and_then(|i| i.parse().ok())
                .filter(|_| vm.spec.net.pod_netns.is_none()),
            network: vm.spec.net.network.clone(),
        }
    }

    /// A VM's row was written: its entry, new or replaced.
    pub fn put(&self, vm: &banger_core::VmRecord) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = v.names.insert(vm.id.clone(), vm.name.clone()) {
            if old != vm.name {
                v.by_name.remove(&old);
            }
        }
        v.by_name.insert(vm.name.clone(), Self::entry(vm));
    }

    /// A VM's runtime was saved: its entry changes, if it has one (a row
    /// deleted meanwhile does not come back).
    pub fn update(&self, vm: &banger_core::VmRecord) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if v.names.get(&vm.id) == Some(&vm.name) {
            v.by_name.insert(vm.name.clone(), Self::entry(vm));
        }
    }

    /// A VM's row was deleted.
    pub fn remove(&self, id: &str) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = v.names.remove(id) {
            v.by_name.remove(&name);
        }
    }

    /// Whether a VM is named `name` (with an address or not).
    fn has(&self, name: &str) -> bool {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        v.by_name.contains_key(name)
    }

    /// `name`'s address, for `asker`: the host, any VM; a guest, itself or
    /// a VM of its network.
    fn lookup(&self, name: &str, asker: &Asker) -> Option<Ipv4Addr> {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        let e = v.by_name.get(name)?;
        if let Asker::Guest(id) = asker {
            let same_net = || {
                let me = v.by_name.get(v.names.get(id)?)?;
                Some(me.network.is_some() && me.network == e.network)
            };
            if *id != e.id && !same_net().unwrap_or(false) {
                return None;
            }
        }
        e.ip
    }
}

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker {
    Host,
    /// A guest, by VM id.
    Guest(String),
}

/// The upstream resolvers: the nameservers of the daemon's resolv.conf
/// (`BANGER_RESOLV_CONF` overrides the path), loopback ones included.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::from((ip, 53)))
        .collect()
}

/// What to answer, decided from the query alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Drop it (not a DNS query we can make sense of).
    Ignore,
    /// Answer now with these bytes.
    Reply(Vec<u8>),
    /// Not ours: forward as is.
    Forward,
}

/// Decides the answer to `query`; `lookup` maps a VM name to its address
/// (None: no such VM, or not for this asker).
pub fn plan(query: &[u8], suffix: &str, lookup: &dyn Fn(&str) -> Option<Ipv4Addr>) -> Plan {
    let Ok(msg) = Message::from_vec(query) else {
        return Plan::Ignore;
    };
    if msg.metadata.message_type != MessageType::Query {
        return Plan::Ignore;
    }
    let id = msg.metadata.id;
    let reply = |code: ResponseCode, answers: Vec<Record>| {
        let mut r = Message::response(id, msg.metadata.op_code);
        r.metadata.recursion_desired = msg.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.authoritative = code != ResponseCode::FormErr;
        r.metadata.response_code = code;
        r.add_queries(msg.queries.iter().cloned());
        for a in answers {
            r.add_answer(a);
        }
        r.to_vec().map(Plan::Reply).unwrap_or(Plan::Ignore)
    };
    let [q] = msg.queries.as_slice() else {
        return reply(ResponseCode::FormErr, Vec::new());
    };
    if msg.metadata.op_code != OpCode::Query {
        return reply(ResponseCode::NotImp, Vec::new());
    }
    let name = q.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    let Some(label) = name.strip_suffix(suffix).and_then(|n| n.strip_suffix('.')) else {
        return if name == suffix {
            reply(ResponseCode::NoError, Vec::new())
        } else {
            Plan::Forward
        };
    };
    match lookup(label) {
        None => reply(ResponseCode::NXDomain, Vec::new()),
        Some(ip) if q.query_type() == RecordType::A || q.query_type() == RecordType::ANY => reply(
            ResponseCode::NoError,
            vec![Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip)))],
        ),
        // The name exists, with no record of that type (AAAA, ...).
        Some(_) => reply(ResponseCode::NoError, Vec::new()),
    }
}

/// Asks the upstreams in turn; the first reply that parses and carries the
/// query's id is relayed.
pub fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = Message::from_vec(query).ok()?.metadata.id;
    for up in upstreams {
        let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            continue;
        };
        if sock.set_read_timeout(Some(UPSTREAM_TIMEOUT)).is_err()
            || sock.connect(up).is_err()
            || sock.send(query).is_err()
        {
            continue;
        }
        // Replies that do not parse or carry another id (stray, or
        // spoofed) are skipped until the deadline.
        let deadline = std::time::Instant::now() + UPSTREAM_TIMEOUT;
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if Message::from_vec(&buf[..n]).is_ok_and(|m| m.metadata.id == id) {
                buf.truncate(n);
                return Some(buf);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                break;
            }
        }
    }
    None
}

/// A SERVFAIL for a query no upstream answered.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    let mut r = Message::error_msg(
        msg.metadata.id,
        msg.metadata.op_code,
        ResponseCode::ServFail,
    );
    r.add_queries(msg.queries);
    r.to_vec().ok()
}

/// The daemon's DNS listeners: one per running VM (on its gateway), and
/// the host's (`--host-dns`).
#[derive(Debug, Default)]
pub struct Listeners {
    /// By VM id.
    pub(crate) vms: std::sync::Mutex<std::collections::HashMap<String, Listener>>,
    pub(crate) host: std::sync::Mutex<Option<Listener>>,
}

/// A listener: a UDP socket answered by a thread of its own until `stop`,
/// which wakes the thread and waits for it, so that the address is free
/// again when it returns (a VM's restart binds it at once).
#[derive(Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    sock: UdpSocket,
    worker: crate::worker::Worker,
}

/// A UDP socket bound to `addr` with SO_REUSEADDR: a reply a forwarding
/// thread of a stopped listener still sends holds that one open for a
/// moment, and must not keep the next listener from binding.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(UdpSocket::from(fd))
}

impl Listener {
    pub fn start(d: DaemonRef, addr: SocketAddr, asker: Asker) -> Result<Listener> {
        let sock = bind_udp(addr)
            .map_err(|e| DaemonError::Invalid(format!("cannot answer DNS on {addr}: {e}")))?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| DaemonError::Invalid(format!("DNS socket {addr}: {e}")))?;
        let theirs = sock
            .try_clone()
            .map_err(|e| DaemonError::Invalid(format!("DNS socket {addr}: {e}")))?;
        let worker = crate::worker::Worker::spawn("dns".into(), move |stop| {
            serve(&d, &theirs, &asker, &stop)
        })
        .map_err(|e| DaemonError::Invalid(format!("cannot start the DNS thread: {e}")))?;
        Ok(Listener { addr, sock, worker })
    }

    pub fn stop(&self) {
        // Woken out of its recv at once: a socket shut for reading returns.
        self.worker.stop(|| {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                nix::sys::socket::Shutdown::Read,
            );
        });
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a listener thread needs of the daemon (a weak handle, so that a
/// listener never keeps a daemon alive).
pub type DaemonRef = std::sync::Weak<Daemon>;

fn serve(d: &DaemonRef, sock: &UdpSocket, asker: &Asker, stop: &AtomicBool) {
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Some(daemon) = d.upgrade() else { return };
        let query = buf[..n].to_vec();
        match daemon.dns_plan(&query, asker) {
            Plan::Ignore => {}
            Plan::Reply(r) => {
                let _ = sock.send_to(&r, from);
            }
            Plan::Forward => {
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if let Some(r) = servfail(&query) {
                        let _ = sock.send_to(&r, from);
                    }
                    continue;
                }
                // Upstreams can be slow: not on the listener's thread.
                let ups = daemon.dns_upstreams();
                let Ok(reply_sock) = sock.try_clone() else {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    continue;
                };
                let count = in_flight.clone();
                let spawned = std::thread::Builder::new()
                    .name("dns-fwd".into())
                    .spawn(move || {
                        if let Some(r) = forward(&query, &ups).or_else(|| servfail(&query)) {
                            let _ = reply_sock.send_to(&r, from);
                        }
                        count.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
    debug!(addr = ?sock.local_addr().ok(), "dns listener stopped");
}

impl Daemon {
    /// The answer plan for a query from `asker`.
    pub fn dns_plan(&self, query: &[u8], asker: &Asker) -> Plan {
        let lookup = |name: &str| -> Option<Ipv4Addr> {
            // A name no VM can have (VM names are DNS labels): the host's
            // check that `.vm` names reach banger (`doctor`).
            if name == CHECK_LABEL {
                return match self.cfg.dns_listen {
                    Some(SocketAddr::V4(a)) => Some(*a.ip()),
                    _ => Some(Ipv4Addr::LOCALHOST),
                };
            }
            if let Some(ip) = self.dns_view.lookup(name, asker) {
                return Some(ip);
            }
            // (A VM of that name without an address is still that VM.)
            if self.dns_view.has(name) {
                return None;
            }
            // The E2B-compatible API's names, for the host only (a VM of
            // that name comes first): `api` and `<port>-<sandbox>`.
            if *asker != Asker::Host {
                return None;
            }
            let api = self.api_ipv4()?;
            let sandbox = name
                .split_once('-')
                .filter(|(port, _)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
                .map(|(_, vm)| vm);
            match sandbox {
                _ if name == "api" => Some(api),
                Some(vm) if self.dns_view.has(vm) => Some(api),
                _ => None,
            }
        };
        plan(query, &self.cfg.dns_suffix, &lookup)
    }

    pub fn dns_upstreams(&self) -> Vec<SocketAddr> {
        let text = std::fs::read_to_string(&self.cfg.resolv_conf).unwrap_or_default();
        let ups = upstreams(&text);
        if ups.is_empty() {
            warn!(path = %self.cfg.resolv_conf.display(), "no upstream resolver to forward to");
        }
        ups
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn answer(p: Plan) -> Message {
        match p {
            Plan::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn vm_names_are_answered_and_the_rest_forwarded() {
        let lookup = |n: &str| (n == "web").then_some(Ipv4Addr::new(172, 30, 0, 6));
        let r = answer(plan(&query("Web.VM.", RecordType::A), "vm", &lookup));
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 6))));
        let r = answer(plan(&query("web.vm.", RecordType::AAAA), "vm", &lookup));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty(), "no IPv6: an empty answer");
        let r = answer(plan(&query("ghost.vm.", RecordType::A), "vm", &lookup));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = answer(plan(&query("a.b.vm.", RecordType::A), "vm", &lookup));
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NXDomain,
            "one label only"
        );
        assert_eq!(
            plan(&query("example.com.", RecordType::A), "vm", &lookup),
            Plan::Forward
        );
        assert_eq!(
            plan(&query("notvm.", RecordType::A), "vm", &lookup),
            Plan::Forward,
            "the suffix is a whole label"
        );
        let r = answer(plan(&query("web.test.", RecordType::A), "test", &lookup));
        assert_eq!(r.answers.len(), 1, "the suffix is configurable");
    }

    #[test]
    fn garbage_is_dropped_and_odd_queries_refused() {
        let none = |_: &str| None;
        assert_eq!(plan(b"\x00\x01garbage", "vm", &none), Plan::Ignore);
        assert_eq!(plan(&[], "vm", &none), Plan::Ignore);
        let mut two = Message::query();
        two.metadata.id = 7;
        two.add_query(Query::query(
            Name::from_ascii("a.vm.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.vm.").unwrap(),
            RecordType::A,
        ));
        let r = answer(plan(&two.to_vec().unwrap(), "vm", &none));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut resp = Message::response(9, OpCode::Query);
        resp.add_query(Query::query(
            Name::from_ascii("a.vm.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            plan(&resp.to_vec().unwrap(), "vm", &none),
            Plan::Ignore,
            "not a query"
        );
    }

    #[test]
    fn forwarding_relays_only_a_matching_reply() {
        // An upstream on loopback that answers everything with 192.0.2.7,
        // once with the wrong id first.
        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = up.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = up.recv_from(&mut b) {
                let q = Message::from_vec(&b[..n]).unwrap();
                let mut wrong = Message::response(q.metadata.id.wrapping_add(1), OpCode::Query);
                wrong.add_queries(q.queries.clone());
                let _ = up.send_to(&wrong.to_vec().unwrap(), from);
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.add_queries(q.queries.clone());
                r.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                ));
                let _ = up.send_to(&r.to_vec().unwrap(), from);
            }
        });
        let q = query("example.com.", RecordType::A);
        let dead = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = forward(&q, &[dead, addr]).expect("the second upstream answers");
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.answers.len(), 1);
        let sf = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(sf.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(
            upstreams("nameserver 127.0.0.53\n# x\nnameserver 10.0.0.1\nsearch lan\n"),
            vec![
                SocketAddr::from(([127, 0, 0, 53], 53)),
                SocketAddr::from(([10, 0, 0, 1], 53))
            ]
        );
    }

    /// A resolver flooded with names to forward sends at most
    /// [`MAX_FORWARDS`] upstream at once; the rest get SERVFAIL at once.
    /// Counted at a silent upstream (it answers nothing: every forward
    /// waits out its timeout), in a network namespace of the test's
    /// thread (port 53 on its own loopback).
    #[test]
    fn forwards_in_flight_are_capped() {
        let d = tempfile::tempdir().unwrap();
        let resolv = d.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let mut daemon = crate::daemon::testutil::daemon(d.path());
        daemon.cfg.resolv_conf = resolv;
        let daemon = std::sync::Arc::new(daemon);
        let weak = std::sync::Arc::downgrade(&daemon);
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            let upstream = UdpSocket::bind("127.0.0.1:53").unwrap();
            let listener =
                Listener::start(weak, "127.0.0.1:5353".parse().unwrap(), Asker::Host).unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
            let n = MAX_FORWARDS + 4;
            for i in 0..n {
                let q = query(&format!("name{i}.example.com."), RecordType::A);
                client.send_to(&q, "127.0.0.1:5353").unwrap();
            }
            let mut buf = [0u8; 4096];
            for _ in 0..n {
                let got = client.recv(&mut buf).expect("every query is answered");
                let m = Message::from_vec(&buf[..got]).unwrap();
                assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
            }
            upstream.set_nonblocking(true).unwrap();
            let mut reached = 0;
            while upstream.recv(&mut buf).is_ok() {
                reached += 1;
            }
            assert_eq!(reached, MAX_FORWARDS, "queries sent upstream at once");
            drop(listener);
        })
        .join()
        .unwrap();
    }

    /// A guest's query is answered while the store is locked (a long
    /// write, or a flood of other requests holding it): DNS never waits on
    /// the store. (Answered from the rows, a lookup here would block until
    /// the lock is let go; the watchdog fails it instead.)
    #[test]
    fn queries_are_answered_while_the_store_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let daemon = std::sync::Arc::new(crate::daemon::testutil::daemon(d.path()));
        let mut web = crate::daemon::testutil::vm_with_tap("iw", "web", None);
        web.runtime.guest_ip = Some("172.30.0.6".into());
        daemon.insert_row(&web).unwrap();
        let held = daemon.store();
        let (tx, rx) = std::sync::mpsc::channel();
        let asker = daemon.clone();
        std::thread::spawn(move || {
            let p = asker.dns_plan(&query("web.vm.", RecordType::A), &Asker::Guest("iw".into()));
            let _ = tx.send(p);
        });
        let p = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a DNS answer waited on the store's lock");
        drop(held);
        let r = answer(p);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 6))));
    }

    /// The view answers as the store would: the host any VM, a guest
    /// itself or its network's; a saved runtime moves the address; a
    /// deleted row is gone and a late save does not bring it back.
    #[test]
    fn the_view_follows_the_rows_and_scopes_guests() {
        let vm = |id: &str, name: &str, ip: &str, net: Option<&str>| {
            let mut v = crate::daemon::testutil::vm_with_tap(id, name, None);
            v.runtime.guest_ip = Some(ip.into());
            v.spec.net.network = net.map(String::from);
            v
        };
        let view = View::default();
        let (a, b, c) = (
            vm("ia", "a", "172.30.0.2", Some("lab")),
            vm("ib", "b", "172.30.0.6", Some("lab")),
            vm("ic", "c", "172.30.0.10", None),
        );
        for v in [&a, &b, &c] {
            view.put(v);
        }
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let guest = |id: &str| Asker::Guest(id.into());
        assert_eq!(view.lookup("c", &Asker::Host), ip("172.30.0.10"));
        assert_eq!(view.lookup("b", &guest("ia")), ip("172.30.0.6"));
        assert_eq!(view.lookup("c", &guest("ic")), ip("172.30.0.10"));
        assert_eq!(view.lookup("a", &guest("ic")), None, "not its network");
        assert_eq!(view.lookup("c", &guest("ia")), None);
        assert_eq!(view.lookup("nope", &Asker::Host), None);
        let mut moved = c.clone();
        moved.runtime.guest_ip = Some("172.30.0.14".into());
        view.update(&moved);
        assert_eq!(view.lookup("c", &Asker::Host), ip("172.30.0.14"));
        view.remove("ic");
        view.update(&moved);
        assert_eq!(view.lookup("c", &Asker::Host), None, "a late save");
    }
}
