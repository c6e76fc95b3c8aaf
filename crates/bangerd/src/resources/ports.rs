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
use serde_json::{json, Value};
use tracing::debug;

use super::{Acq, End, Resource};
use crate::daemon::{lock, Daemon};
use crate::error::{DaemonError, Result};

#[derive(Debug)]
pub struct Ports;

/// How long a connection to the guest may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client silent this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Connections (TCP) or clients (UDP) served at once per published port;
/// past it new ones are closed or dropped, so that a flood cannot make the
/// daemon start threads without bound.
const MAX_CLIENTS: usize = 256;

/// One published port's listener.
#[derive(Debug)]
pub struct Forwarder {
    pub port: PortMap,
    stop: Arc<AtomicBool>,
    /// Where to knock to wake the accept loop.
    local: SocketAddr,
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
        let stop = Arc::new(AtomicBool::new(false));
        let target = SocketAddr::from((guest, port.guest_port));
        let bind = SocketAddr::from((port.host_addr, port.host_port));
        let local = match port.proto {
            Proto::Tcp => {
                let l = TcpListener::bind(bind).map_err(in_use)?;
                let local = l.local_addr().map_err(in_use)?;
                let stop = stop.clone();
                spawn(&port, move || serve_tcp(l, target, &stop))?;
                local
            }
            Proto::Udp => {
                let s = UdpSocket::bind(bind).map_err(in_use)?;
                let local = s.local_addr().map_err(in_use)?;
                s.set_read_timeout(Some(Duration::from_millis(250)))
                    .map_err(in_use)?;
                let stop = stop.clone();
                spawn(&port, move || serve_udp(s, target, &stop))?;
                local
            }
        };
        Ok(Forwarder { port, stop, local })
    }

    /// Stops listening (connections already open run to their end).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.port.proto == Proto::Tcp {
            // Wake the accept loop (a listener on 0.0.0.0 answers on
            // loopback).
            let mut knock = self.local;
            if knock.ip().is_unspecified() {
                knock.set_ip(Ipv4Addr::LOCALHOST.into());
            }
            let _ = TcpStream::connect_timeout(&knock, Duration::from_secs(1));
        }
    }
}

fn spawn(port: &PortMap, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("port-{}", port.host_port))
        .spawn(f)
        .map(|_| ())
        .map_err(|e| DaemonError::Invalid(format!("cannot start the proxy of {port}: {e}")))
}

fn serve_tcp(l: TcpListener, target: SocketAddr, stop: &AtomicBool) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in l.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            open.fetch_sub(1, Ordering::SeqCst);
            continue; // dropped: closed at once
        }
        let count = open.clone();
        let spawned = std::thread::Builder::new()
            .name("port-conn".into())
            .spawn(move || {
                // (The guest's port closed: so is the client's.)
                if let Ok(guest) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                    pipe(client, guest);
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Copies both ways until each side has said it is done.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one = std::thread::spawn(move || copy(a2, b2));
    copy(b, a);
    let _ = one.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn serve_udp(s: UdpSocket, target: SocketAddr, stop: &AtomicBool) {
    // One socket toward the guest per client, so that replies find their
    // way back; forgotten after a minute of silence.
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, Instant)> = HashMap::new();
    let mut buf = [0u8; 65_535];
    while !stop.load(Ordering::SeqCst) {
        clients.retain(|_, (_, seen)| seen.elapsed() < UDP_IDLE);
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
                if sock.connect(target).is_err() {
                    continue;
                }
                let sock = Arc::new(sock);
                let (back, reply) = (sock.clone(), s.try_clone());
                let _ = sock.set_read_timeout(Some(UDP_IDLE));
                if let Ok(reply) = reply {
                    let _ = std::thread::Builder::new()
                        .name("port-udp".into())
                        .spawn(move || {
                            let mut b = [0u8; 65_535];
                            while let Ok(n) = back.recv(&mut b) {
                                if reply.send_to(&b[..n], from).is_err() {
                                    break;
                                }
                            }
                        });
                }
                clients.insert(from, (sock.clone(), Instant::now()));
                sock
            }
        };
        let _ = up.send(&buf[..n]);
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
/// this daemon's does.
pub fn check_free_naming(d: &Daemon, vm: &str, ports: &[PortMap]) -> Result<()> {
    check_free(vm, ports).map_err(|e| match e {
        DaemonError::PortInUse { vm, port, reason } => {
            let by = d.store().list_vms().ok().and_then(|vms| {
                vms.into_iter()
                    .find(|o| {
                        o.name != vm && o.spec.net.ports.iter().any(|q| q.host_side() == port)
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

    fn acquire(&self, d: &Daemon, cx: &mut Acq<'_>) -> Result<()> {
        d.open_ports(cx.vm)
    }

    fn held(&self, d: &Daemon, vm: &VmRecord, _h: &VmHandles) -> Option<Value> {
        let n = d.forwarders.count(&vm.id);
        (n > 0).then(|| json!({ "listeners": n }))
    }

    fn end(&self, d: &Daemon, vm: &VmRecord, _held: Value, _how: End) -> Result<Option<Value>> {
        d.forwarders.stop(&vm.id, None);
        Ok(None)
    }

    fn release(&self, d: &Daemon, r: &Release, _held: &Value) -> Result<()> {
        d.forwarders.stop(&r.vm_id, None);
        Ok(())
    }

    fn adopt(&self, d: &Daemon, vm: &VmRecord) -> Result<()> {
        d.open_ports(vm)
    }
}

impl Daemon {
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
            check_free_naming(self, &vm.name, &[port])?;
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
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let hport = free.local_addr().unwrap().port();
        drop(free);
        let map: PortMap = format!("127.0.0.1:{hport}:{gport}").parse().unwrap();
        let f = Forwarder::start("t", map, Ipv4Addr::LOCALHOST).unwrap();
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
        f.stop();
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(2));
                TcpStream::connect(("127.0.0.1", hport)).is_err()
            }),
            "a stopped listener still answers"
        );
        assert!(check_free("t", &[map]).is_ok());

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
        uf.stop();
    }
}
