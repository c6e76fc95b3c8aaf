//! Published ports (`-p [ADDR:]HOST:GUEST[/udp]`, `vm port add|rm`): a
//! userspace proxy in the daemon (docker-proxy's approach) per port,
//! listening on the host address and connecting to the guest's port. A
//! listener that cannot bind is a clear error naming the port; nothing is
//! published by firewall rules, so no `route_localnet` and no DNAT: the
//! guest sees connections from its gateway, and its isolation is unchanged
//! (the host may open connections to its guests). Listeners live in the
//! daemon: they go with it, and reconcile opens them again for the VMs it
//! keeps.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_core::net::{PortMap, Proto};
use banger_core::{Release, VmHandles, VmRecord};
use tracing::debug;

use super::{Acq, End, Item, Resource};
use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Ports;

/// How long a connection to the guest may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client silent this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// A TCP connection with no byte either way for this long is closed (it
/// is ended at once when its VM stops).
pub const TCP_IDLE: Duration = Duration::from_secs(3600);
/// How often a listener's or a UDP client's thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(250);
/// Connections (TCP) or clients (UDP) served at once per published port;
/// past it new ones are closed or dropped, so that a flood cannot make the
/// daemon start threads without bound.
const MAX_CLIENTS: usize = 256;

/// The TCP connections a listener serves now: both sides of each (the
/// client's, and the guest's once connected), shut down when the port
/// stops, so that neither copy thread waits on a guest that went.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Vec<TcpStream>>,
}

/// One published port's listener.
#[derive(Debug)]
pub struct Forwarder {
    pub port: PortMap,
    worker: crate::worker::Worker,
    open: Arc<Mutex<Open>>,
}

impl Forwarder {
    /// Binds the host side now (the error names the port) and serves it on
    /// a thread of its own.
    pub fn start(vm: &str, port: PortMap, guest: Ipv4Addr) -> Result<Forwarder> {
        let in_use = |e: std::io::Error| DaemonError::PortInUse {
            vm: vm.to_string(),
            port: port.host_side(),
            reason: e.to_string(),
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let target = SocketAddr::from((guest, port.guest_port));
        let bind = SocketAddr::from((port.host_addr, port.host_port));
        let worker = match port.proto {
            Proto::Tcp => {
                let l = TcpListener::bind(bind).map_err(in_use)?;
                l.set_nonblocking(true).map_err(in_use)?;
                let open = open.clone();
                spawn(&port, move |stop| serve_tcp(l, target, &stop, &open))?
            }
            Proto::Udp => {
                let s = UdpSocket::bind(bind).map_err(in_use)?;
                s.set_read_timeout(Some(TICK)).map_err(in_use)?;
                spawn(&port, move |stop| serve_udp(s, target, &stop))?
            }
        };
        Ok(Forwarder { port, worker, open })
    }

    /// Stops listening and ends the connections open: once this returns,
    /// the port is free (a restart binds it again at once) and nothing of
    /// it is left (no thread waits on a guest that went).
    pub fn stop(self) {
        // (Its thread looks at the flag every tick.)
        self.worker.stop(|| {});
        for c in lock(&self.open).conns.drain().flat_map(|(_, v)| v) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn spawn(
    port: &PortMap,
    f: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
) -> Result<crate::worker::Worker> {
    crate::worker::Worker::spawn(format!("port-{}", port.host_port), f)
        .map_err(|e| DaemonError::Invalid(format!("cannot start the proxy of {port}: {e}")))
}

fn serve_tcp(l: TcpListener, target: SocketAddr, stop: &AtomicBool, open: &Arc<Mutex<Open>>) {
    use std::os::fd::AsFd;
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [nix::poll::PollFd::new(
            l.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let tick = nix::poll::PollTimeout::try_from(TICK).unwrap_or(nix::poll::PollTimeout::NONE);
        if !matches!(nix::poll::poll(&mut fds, tick), Ok(n) if n > 0) {
            continue;
        }
        let Ok((client, _)) = l.accept() else {
            continue;
        };
        if client.set_nonblocking(false).is_err() || lock(open).conns.len() >= MAX_CLIENTS {
            continue; // dropped: closed at once
        }
        let Ok(mine) = client.try_clone() else {
            continue;
        };
        let id = {
            let mut o = lock(open);
            o.next += 1;
            let id = o.next;
            o.conns.insert(id, vec![mine]);
            id
        };
        let reg = open.clone();
        let spawned = std::thread::Builder::new()
            .name("port-conn".into())
            .spawn(move || {
                // (The guest's port closed: so is the client's.)
                if let Ok(guest) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                    // Registered with the client's side; a port stopped
                    // meanwhile ends it at once.
                    let registered = guest.try_clone().is_ok_and(|g| {
                        let mut o = lock(&reg);
                        match o.conns.get_mut(&id) {
                            Some(v) => {
                                v.push(g);
                                true
                            }
                            None => false,
                        }
                    });
                    if registered {
                        pipe(client, guest, TCP_IDLE);
                    } else {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                }
                lock(&reg).conns.remove(&id);
            });
        if spawned.is_err() {
            lock(open).conns.remove(&id);
        }
    }
}

/// Copies both ways until each side has said it is done, or until no byte
/// has gone either way for `idle` (then both are shut down).
fn pipe(a: TcpStream, b: TcpStream, idle: Duration) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let last = Arc::new(Mutex::new(Instant::now()));
    let l2 = last.clone();
    let one = std::thread::spawn(move || copy(a2, b2, idle, &l2));
    copy(b, a, idle, &last);
    let _ = one.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream, idle: Duration, last: &Mutex<Instant>) {
    let mut buf = [0u8; 64 * 1024];
    let _ = from.set_read_timeout(Some(idle));
    // A peer that stops reading holds this thread no longer than a quiet
    // connection lasts.
    let _ = to.set_write_timeout(Some(idle));
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                *lock(last) = Instant::now();
                if to.write_all(&buf[..n]).is_err() {
                    // Some bytes may be gone: an abort both ways, not an
                    // end the peer would take for a whole stream.
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            // Quiet this way for `idle`: the end if the other way was too.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if lock(last).elapsed() >= idle {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn serve_udp(s: UdpSocket, target: SocketAddr, stop: &Arc<AtomicBool>) {
    // One socket toward the guest per client, so that replies find their
    // way back; forgotten after a minute of silence. Its reply thread ends
    // when it is forgotten or the port stops, and is joined before this
    // returns: then nothing holds the port.
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, Instant)> = HashMap::new();
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut buf = [0u8; 65_535];
    while !stop.load(Ordering::SeqCst) {
        clients.retain(|_, (_, seen)| seen.elapsed() < UDP_IDLE);
        threads.retain(|t| !t.is_finished());
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        let full = clients.len() >= MAX_CLIENTS;
        let up = match clients.get_mut(&from) {
            Some((sock, seen)) => {
                *seen = Instant::now();
                sock.clone()
            }
            None if full => continue,
            None => {
                let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                    continue;
                };
                if sock.connect(target).is_err() || sock.set_read_timeout(Some(TICK)).is_err() {
                    continue;
                }
                let sock = Arc::new(sock);
                let back = Arc::downgrade(&sock);
                let (reply, stop) = (s.try_clone(), stop.clone());
                if let Ok(reply) = reply {
                    let t = std::thread::Builder::new()
                        .name("port-udp".into())
                        .spawn(move || {
                            let mut b = [0u8; 65_535];
                            while !stop.load(Ordering::SeqCst) {
                                // Forgotten (idle): done.
                                let Some(sock) = back.upgrade() else { return };
                                match sock.recv(&mut b) {
                                    Ok(n) => {
                                        if reply.send_to(&b[..n], from).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    if let Ok(t) = t {
                        threads.push(t);
                    }
                }
                clients.insert(from, (sock.clone(), Instant::now()));
                sock
            }
        };
        let _ = up.send(&buf[..n]);
    }
    drop(clients);
    for t in threads {
        let _ = t.join();
    }
}

/// The published ports' listeners of each running VM.
#[derive(Debug, Default)]
pub struct Forwarders {
    map: Mutex<HashMap<String, Vec<Forwarder>>>,
}

impl Forwarders {
    pub fn add(&self, vm_id: &str, f: Forwarder) {
        lock(&self.map)
            .entry(vm_id.to_string())
            .or_default()
            .push(f);
    }

    /// Stops the VM's listener of `port`, or all of them.
    pub fn stop(&self, vm_id: &str, port: Option<&PortMap>) -> usize {
        let mut map = lock(&self.map);
        let Some(list) = map.get_mut(vm_id) else {
            return 0;
        };
        let (gone, kept): (Vec<Forwarder>, Vec<Forwarder>) = list
            .drain(..)
            .partition(|f| port.is_none_or(|p| f.port == *p));
        *list = kept;
        if list.is_empty() {
            map.remove(vm_id);
        }
        drop(map);
        let n = gone.len();
        for f in gone {
            f.stop();
        }
        n
    }

    pub fn count(&self, vm_id: &str) -> usize {
        lock(&self.map).get(vm_id).map_or(0, Vec::len)
    }
}

/// Checks that every port can be bound now (and lets go again): a port in
/// use is refused before anything is created.
pub fn check_free(vm: &str, ports: &[PortMap]) -> Result<()> {
    for p in ports {
        let bind = SocketAddr::from((p.host_addr, p.host_port));
        let r = match p.proto {
            Proto::Tcp => TcpListener::bind(bind).map(drop),
            Proto::Udp => UdpSocket::bind(bind).map(drop),
        };
        r.map_err(|e| DaemonError::PortInUse {
            vm: vm.to_string(),
            port: p.host_side(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// [`check_free`], naming the VM that publishes a port in use, if one of
/// this daemon's does (it listens now: a stopped VM's ports are free).
pub fn check_free_naming(host: &Host<'_>, vm: &str, ports: &[PortMap]) -> Result<()> {
    check_free(vm, ports).map_err(|e| match e {
        DaemonError::PortInUse { vm, port, reason } => {
            // The same port and protocol on an address that overlaps
            // (equal, or either one every address).
            let clash = |p: &PortMap, q: &PortMap| {
                p.host_port == q.host_port
                    && p.proto == q.proto
                    && (p.host_addr == q.host_addr
                        || p.host_addr.is_unspecified()
                        || q.host_addr.is_unspecified())
            };
            let asked = ports.iter().find(|p| p.host_side() == port);
            let by = asked.and_then(|p| {
                let vms = host.store().list_vms().ok()?;
                vms.into_iter()
                    .find(|o| {
                        o.name != vm
                            && host.forwarders.count(&o.id) > 0
                            && o.spec.net.ports.iter().any(|q| clash(p, q))
                    })
                    .map(|o| o.name)
            });
            match by {
                Some(by) => DaemonError::PortHeld { vm, port, by },
                None => DaemonError::PortInUse { vm, port, reason },
            }
        }
        e => e,
    })
}

impl Resource for Ports {
    fn name(&self) -> &'static str {
        "ports"
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::GuestAddress, super::Handoff::Vmm]
    }

    fn used(&self, vm: &VmRecord) -> bool {
        !vm.spec.net.ports.is_empty()
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        host.open_ports(cx.vm)
    }

    fn held(&self, host: &Host<'_>, vm: &VmRecord, _h: &VmHandles) -> Option<Item> {
        let n = host.forwarders.count(&vm.id);
        (n > 0).then_some(Item::Ports(super::held::Ports { listeners: n }))
    }

    fn end(&self, host: &Host<'_>, vm: &VmRecord, _held: Item, _how: End) -> Result<Option<Item>> {
        host.forwarders.stop(&vm.id, None);
        Ok(None)
    }

    fn release(&self, host: &Host<'_>, r: &Release, _held: &Item) -> Result<()> {
        host.forwarders.stop(&r.vm_id, None);
        Ok(())
    }

    fn adopt(&self, host: &Host<'_>, vm: &VmRecord) -> Result<()> {
        host.open_ports(vm)
    }
}

impl Host<'_> {
    /// Opens the VM's published ports that are not open yet; all or none.
    pub(crate) fn open_ports(&self, vm: &VmRecord) -> Result<()> {
        if self.forwarders.count(&vm.id) > 0 {
            return Ok(());
        }
        let guest = self.guest_net(vm)?.guest_ip;
        for p in &vm.spec.net.ports {
            match Forwarder::start(&vm.name, *p, guest) {
                Ok(f) => {
                    debug!(vm = %vm.name, port = %p, "published");
                    self.forwarders.add(&vm.id, f);
                }
                Err(e) => {
                    self.forwarders.stop(&vm.id, None);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Daemon {
    /// `vm port add`: recorded, and opened at once if the VM runs; a port
    /// in use (or already published) changes nothing.
    pub fn port_add(&self, name: &str, port: PortMap) -> Result<banger_core::api::VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        if let Some(p) = vm.spec.net.ports.iter().find(|p| {
            p.host_port == port.host_port && p.proto == port.proto && p.host_addr == port.host_addr
        }) {
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} already publishes {}: `banger vm port rm {name} {}` first",
                p,
                p.host_side()
            )));
        }
        if self.vm_alive(&vm) {
            let f = Forwarder::start(&vm.name, port, self.guest_net(&vm)?.guest_ip)?;
            self.forwarders.add(&vm.id, f);
        } else {
            check_free_naming(&self.host(), &vm.name, &[port])?;
        }
        vm.spec.net.ports.push(port);
        if let Err(e) = self.store().update_spec(&vm.id, &vm.spec) {
            self.forwarders.stop(&vm.id, Some(&port));
            return Err(e.into());
        }
        Ok(self.info(&vm))
    }

    /// `vm port rm`: `host` is `PORT`, `ADDR:PORT` or `ADDR:PORT/PROTO`.
    pub fn port_rm(&self, name: &str, host: &str) -> Result<banger_core::api::VmInfo> {
        let _g = self.lock_vm(name)?;
        let mut vm = self.find(name)?;
        let matches = |p: &PortMap| {
            host == p.host_side()
                || host == format!("{}:{}", p.host_addr, p.host_port)
                || host == p.host_port.to_string()
                || host == format!("{}/{}", p.host_port, p.proto)
        };
        let Some(i) = vm.spec.net.ports.iter().position(matches) else {
            let have: Vec<String> = vm.spec.net.ports.iter().map(|p| p.host_side()).collect();
            return Err(DaemonError::Invalid(format!(
                "vm {name:?} publishes no port {host:?} (it publishes: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        };
        let port = vm.spec.net.ports.remove(i);
        self.store().update_spec(&vm.id, &vm.spec)?;
        self.forwarders.stop(&vm.id, Some(&port));
        Ok(self.info(&vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP forwarder from a free loopback port to `gport`: it, its map
    /// and its host port.
    fn forward_to(gport: u16) -> (Forwarder, PortMap, u16) {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let hport = free.local_addr().unwrap().port();
        drop(free);
        let map: PortMap = format!("127.0.0.1:{hport}:{gport}").parse().unwrap();
        let f = Forwarder::start("t", map, Ipv4Addr::LOCALHOST).unwrap();
        (f, map, hport)
    }

    /// The proxy with real sockets on loopback: TCP both ways with a
    /// half-close, UDP request and reply, a port in use refused by name,
    /// and a stopped listener no longer answering.
    #[test]
    fn forwards_tcp_and_udp_and_refuses_a_port_in_use() {
        // A TCP "guest": echoes in upper case until EOF.
        let guest = TcpListener::bind("127.0.0.1:0").unwrap();
        let gport = guest.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in guest.incoming().flatten() {
                let mut c = c;
                let mut s = String::new();
                let _ = c.read_to_string(&mut s);
                let _ = c.write_all(s.to_uppercase().as_bytes());
            }
        });
        let (f, map, hport) = forward_to(gport);
        let mut c = TcpStream::connect(("127.0.0.1", hport)).unwrap();
        c.write_all(b"hello through").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out, "HELLO THROUGH");
        let e = Forwarder::start("t", map, Ipv4Addr::LOCALHOST)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{hport}/tcp")) && e.contains("in use"),
            "{e}"
        );
        assert!(check_free("t", &[map]).is_err());
        // A client left open across the stop: its connection ends with it.
        let mut left = TcpStream::connect(("127.0.0.1", hport)).unwrap();
        left.write_all(b"x").unwrap();
        f.stop();
        // Once stop returns, the port is free and answers no more.
        assert!(TcpStream::connect(("127.0.0.1", hport)).is_err());
        assert!(check_free("t", &[map]).is_ok());
        left.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Ended: shut down if it was being served, reset if it was still
        // in the listener's queue; never left waiting.
        let mut rest = Vec::new();
        let r = left.read_to_end(&mut rest);
        assert!(
            !matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "the connection open across the stop was not ended: {r:?}"
        );

        // UDP: a "guest" that answers each datagram reversed.
        let ug = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ugport = ug.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = ug.recv_from(&mut b) {
                let mut r = b[..n].to_vec();
                r.reverse();
                let _ = ug.send_to(&r, from);
            }
        });
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let uh = probe.local_addr().unwrap().port();
        drop(probe);
        let umap: PortMap = format!("127.0.0.1:{uh}:{ugport}/udp").parse().unwrap();
        let uf = Forwarder::start("t", umap, Ipv4Addr::LOCALHOST).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.send_to(b"abc", ("127.0.0.1", uh)).unwrap();
        let mut b = [0u8; 16];
        let (n, _) = client.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], b"cba");
        // Stopped, the port is free at once (its client's reply thread
        // included), for a restart to bind it again.
        uf.stop();
        assert!(check_free("t", &[umap]).is_ok());
        let again = Forwarder::start("t", umap, Ipv4Addr::LOCALHOST).unwrap();
        again.stop();
    }

    /// A connection quiet both ways for `idle` is closed; one that talks
    /// is not.
    #[test]
    fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let (s_addr, f_addr) = (server.local_addr().unwrap(), front.local_addr().unwrap());
        let proxy = std::thread::spawn(move || {
            let (client, _) = front.accept().unwrap();
            let guest = TcpStream::connect(s_addr).unwrap();
            pipe(client, guest, Duration::from_millis(300));
        });
        let mut c = TcpStream::connect(f_addr).unwrap();
        let (mut g, _) = server.accept().unwrap();
        // Busy: a byte each 100 ms for a second, each one through.
        for _ in 0..10 {
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            g.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        // Then quiet: both ends see theirs close.
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
        g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(g.read_to_end(&mut rest).unwrap(), 0);
        proxy.join().unwrap();
    }

    /// A stop ends a connection on the guest's side too: the guest that
    /// went sends nothing, and no copy thread is left waiting on it.
    #[test]
    fn a_stop_ends_both_sides_of_a_connection() {
        let guest = TcpListener::bind("127.0.0.1:0").unwrap();
        let gport = guest.local_addr().unwrap().port();
        let (got, ended) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        std::thread::spawn(move || {
            let (mut c, _) = guest.accept().unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            got.0.send(()).unwrap();
            // A guest that never writes: only a shutdown ends this read.
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            ended.0.send(()).unwrap();
        });
        let (f, _, hport) = forward_to(gport);
        let mut c = TcpStream::connect(("127.0.0.1", hport)).unwrap();
        c.write_all(b"x").unwrap();
        got.1.recv_timeout(Duration::from_secs(10)).unwrap();
        f.stop();
        ended
            .1
            .recv_timeout(Duration::from_secs(10))
            .expect("the guest's side of the connection was left open");
    }
}
