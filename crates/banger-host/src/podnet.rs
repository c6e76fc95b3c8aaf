//! A containerd pod's network, given to a VM as Kata Containers gives it:
//! CNI made the pod's network namespace and an interface in it (`eth0`,
//! a veth whose other end is on the CNI bridge); banger adds a tap beside
//! it, and every frame that arrives on either is redirected to the other
//! (an ingress qdisc on each, a u32 filter that matches everything, a
//! `mirred` egress redirect). The guest's NIC takes the interface's MAC,
//! address and default route, so the pod's IP is the guest's and CNI
//! plugins work unchanged; nothing of banger's own networking (its /30,
//! NAT, DNS, firewall) applies.
//!
//! Everything here runs on a thread of its own that joins the pod's
//! namespace (`setns`), never in the daemon's: the namespace is named by
//! a path the caller gives, opened once and checked to be a network
//! namespace (nsfs) that is not the daemon's own.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use netlink_packet_core::{NetlinkPayload, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use nix::libc;
use thiserror::Error;

use crate::tap::{self, TapError};

/// The tap banger adds to a pod's namespace (one VM per pod, so one
/// name); not `bgtap*`, which are the daemon's own namespace's.
pub const POD_TAP: &str = "bgpod0";

#[derive(Debug, Error)]
pub enum PodNetError {
    #[error("pod network namespace {path}: {op}: {source}")]
    Netns {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("pod network namespace {0}: not a network namespace (a file of nsfs, as CNI's /var/run/netns/NAME is)")]
    NotNetns(PathBuf),
    #[error("pod network namespace {0} is bangerd's own: a pod VM needs the pod's namespace, made by CNI")]
    Own(PathBuf),
    #[error("pod network namespace {0} is the host's own (pid 1's): a pod VM needs the pod's namespace, made by CNI")]
    Host(PathBuf),
    #[error("pod network namespace {path}: {why}")]
    Interface { path: PathBuf, why: String },
    #[error("pod network namespace {path}: {source}")]
    Tap { path: PathBuf, source: TapError },
}

/// What the guest's NIC takes from the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// The interface CNI made (`eth0`).
    pub ifname: String,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The default route's gateway, if the namespace has one.
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
    /// The address's subnet is routed straight on the interface (a
    /// connected route), as the guest will have it: not so under CNI's
    /// ptp plugin, which routes it through the gateway.
    pub subnet_on_link: bool,
}

impl PodLink {
    /// Why a guest given this interface's address, with a default route
    /// through its gateway on its link (all the guest takes), would not
    /// have the pod's network; None when it would.
    pub fn refusal(&self) -> Option<String> {
        let Some(gw) = self.gateway else {
            return Some(format!(
                "{} has no default route: a pod VM's guest takes the pod's default route \
                 (give the CNI network's IPAM a route to 0.0.0.0/0)",
                self.ifname
            ));
        };
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        if u32::from(gw) & mask != u32::from(self.address) & mask || gw == self.address {
            return Some(format!(
                "{}'s gateway {gw} is outside its subnet {}/{}: a pod VM takes networks whose \
                 gateway is on the pod's link (CNI's bridge plugin, and IPAMs like it); a /32 \
                 with a link-local gateway (Calico, Cilium) is not built yet",
                self.ifname, self.address, self.prefix
            ));
        }
        if !self.subnet_on_link {
            return Some(format!(
                "{}'s subnet {}/{} is not routed on its link (CNI's ptp plugin routes it \
                 through the gateway): a pod VM's guest takes only the address and the default \
                 route, which is not built yet for such networks",
                self.ifname, self.address, self.prefix
            ));
        }
        None
    }

    /// `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A pod's network namespace, open.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

impl Netns {
    /// Opens `path` and checks that it is a network namespace and not the
    /// calling thread's own.
    pub fn open(path: &Path) -> Result<Netns, PodNetError> {
        let err = |op, source| PodNetError::Netns {
            path: path.to_path_buf(),
            op,
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            // Never blocking (a FIFO), never a controlling terminal: the
            // path is checked to be a namespace only once it is open.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| err("open", e))?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| err("statfs", e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(PodNetError::NotNetns(path.to_path_buf()));
        }
        let ns = file.metadata().map_err(|e| err("stat", e))?;
        // A namespace file that is not a network one fails setns later;
        // the daemon's own is refused here.
        let own = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| err("stat the daemon's own namespace", e))?;
        if (ns.dev(), ns.ino()) == (own.dev(), own.ino()) {
            return Err(PodNetError::Own(path.to_path_buf()));
        }
        // (A daemon without ptrace rights over pid 1 cannot see its
        // namespace, nor open it by that path: nothing to compare.)
        if let Ok(host) = std::fs::metadata("/proc/1/ns/net") {
            if (ns.dev(), ns.ino()) == (host.dev(), host.ino()) {
                return Err(PodNetError::Host(path.to_path_buf()));
            }
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's identity (device and inode of its nsfs file): a
    /// path bound again to another namespace later has another.
    pub fn id(&self) -> Result<(u64, u64), PodNetError> {
        let m = self.file.metadata().map_err(|source| PodNetError::Netns {
            path: self.path.clone(),
            op: "stat",
            source,
        })?;
        Ok((m.dev(), m.ino()))
    }

    /// Runs `f` on a thread of its own that has joined the namespace.
    fn run<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, PodNetError> + Send,
    ) -> Result<T, PodNetError> {
        std::thread::scope(|s| {
            let t = std::thread::Builder::new()
                .name("podnet".into())
                .spawn_scoped(s, || {
                    nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| PodNetError::Netns {
                            path: self.path.clone(),
                            op: "join (setns)",
                            source: e.into(),
                        })?;
                    f()
                })
                .map_err(|source| PodNetError::Netns {
                    path: self.path.clone(),
                    op: "start a thread to join it",
                    source,
                })?;
            t.join().unwrap_or_else(|_| {
                Err(PodNetError::Interface {
                    path: self.path.clone(),
                    why: "the thread that joined it panicked".into(),
                })
            })
        })
    }

    fn tap_err(&self) -> impl Fn(TapError) -> PodNetError + '_ {
        move |source| PodNetError::Tap {
            path: self.path.clone(),
            source,
        }
    }

    /// The pod's interface, as CNI left it.
    pub fn inspect(&self) -> Result<PodLink, PodNetError> {
        self.run(|| self.inspect_here())
    }

    fn inspect_here(&self) -> Result<PodLink, PodNetError> {
        let bad = |why: String| PodNetError::Interface {
            path: self.path.clone(),
            why,
        };
        let mut v4: Vec<(String, Ipv4Addr, u8)> = Vec::new();
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| bad(format!("list interfaces: {e}")))?;
        for a in addrs {
            if a.interface_name == "lo" || a.interface_name == POD_TAP {
                continue;
            }
            let (Some(addr), Some(mask)) = (
                a.address
                    .as_ref()
                    .and_then(|s| s.as_sockaddr_in())
                    .map(|s| s.ip()),
                a.netmask
                    .as_ref()
                    .and_then(|s| s.as_sockaddr_in())
                    .map(|s| s.ip()),
            ) else {
                continue;
            };
            v4.push((a.interface_name, addr, u32::from(mask).count_ones() as u8));
        }
        let (ifname, address, prefix) = match v4.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(bad(
                    "no interface with an IPv4 address: the pod's CNI network gave it none \
                     (a pod VM takes one IPv4 interface, as CNI's bridge or ptp plugins make)"
                        .into(),
                ))
            }
            many => {
                let names: Vec<String> = many
                    .iter()
                    .map(|(n, a, p)| format!("{n} {a}/{p}"))
                    .collect();
                return Err(bad(format!(
                    "{} IPv4 addresses ({}): a pod VM takes exactly one interface with one IPv4 address",
                    many.len(),
                    names.join(", ")
                )));
            }
        };
        let index = tap::index_of(&ifname).map_err(self.tap_err())?;
        let mut link = LinkMessage::default();
        link.header.index = index;
        let answer = tap::exchange(
            &ifname,
            "read the link",
            RouteNetlinkMessage::GetLink(link),
            NLM_F_REQUEST,
        )
        .map_err(self.tap_err())?;
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = answer else {
            return Err(bad(format!(
                "{ifname}: unexpected rtnetlink answer: {answer:?}"
            )));
        };
        let mut mac = None;
        let mut mtu = 1500;
        for a in l.attributes {
            match a {
                LinkAttribute::Address(b) if b.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(&b);
                    mac = Some(m);
                }
                LinkAttribute::Mtu(m) => mtu = m,
                _ => {}
            }
        }
        let mac = mac.ok_or_else(|| bad(format!("{ifname} has no Ethernet address (a pod VM needs an Ethernet interface, a veth as CNI's bridge plugin makes)")))?;
        let routes = std::fs::read_to_string("/proc/thread-self/net/route")
            .map_err(|e| bad(format!("read its routes: {e}")))?;
        Ok(PodLink {
            gateway: default_gateway(&routes, &ifname),
            subnet_on_link: subnet_on_link(&routes, &ifname, address, prefix),
            ifname,
            mac,
            address,
            prefix,
            mtu,
        })
    }

    /// Adds the tap `POD_TAP` (bearing `mark`, up, with the interface's
    /// MTU) and the redirection both ways; on failure, nothing it made is
    /// left. Returns the interface the guest takes after.
    pub fn attach(&self, mark: &str) -> Result<PodLink, PodNetError> {
        tap::check_mark(mark).map_err(self.tap_err())?;
        self.run(|| {
            let link = self.inspect_here()?;
            let mut made = Made::default();
            let r = self.attach_here(&link, mark, &mut made);
            if r.is_err() {
                // Exactly what this attach made, nothing else's; the
                // tap (its mark: what a release finds it all by) only
                // once no redirect to it is left.
                let undone = made
                    .qdiscs
                    .iter()
                    .all(|index| del_ingress(&link.ifname, *index).is_ok());
                if made.tap && undone {
                    let _ = tap::delete(POD_TAP);
                }
            }
            r.map(|()| link)
        })
    }

    fn attach_here(&self, link: &PodLink, mark: &str, made: &mut Made) -> Result<(), PodNetError> {
        let e = self.tap_err();
        // Persistent only once it bears its mark: a daemon that dies
        // before leaves no tap that no release could tell is its own.
        let tun = tap::make_tap(POD_TAP).map_err(&e)?;
        made.tap = true;
        let tap_index = tap::index_of(POD_TAP).map_err(&e)?;
        let mut up = LinkMessage::default();
        up.header.index = tap_index;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        up.attributes.push(LinkAttribute::IfAlias(mark.to_string()));
        up.attributes.push(LinkAttribute::Mtu(link.mtu));
        tap::rtnetlink(
            POD_TAP,
            "mark and bring up",
            vec![(RouteNetlinkMessage::SetLink(up), 0)],
        )
        .map_err(&e)?;
        tap::persist(POD_TAP, &tun).map_err(&e)?;
        drop(tun);
        let if_index = tap::index_of(&link.ifname).map_err(&e)?;
        for (from, from_index, to_index) in [
            (link.ifname.as_str(), if_index, tap_index),
            (POD_TAP, tap_index, if_index),
        ] {
            tap::rtnetlink(
                from,
                "add an ingress qdisc",
                vec![(
                    RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(from_index)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )],
            )
            .map_err(&e)?;
            made.qdiscs.push(from_index);
            tap::rtnetlink(
                from,
                "redirect what arrives (u32 filter, mirred)",
                vec![(
                    RouteNetlinkMessage::NewTrafficFilter(redirect(from_index, to_index)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )],
            )
            .map_err(&e)?;
        }
        Ok(())
    }

    /// A descriptor on the tap's queue, for a VMM that gets its tap as a
    /// descriptor (it works from any namespace).
    /// Only the tap bearing `mark` (the VM's own).
    pub fn open_queue(&self, mark: &str) -> Result<OwnedFd, PodNetError> {
        self.run(|| {
            match tap::mark_of(POD_TAP).map_err(self.tap_err())? {
                Some(m) if m == mark => {}
                other => {
                    return Err(PodNetError::Interface {
                        path: self.path.clone(),
                        why: format!(
                            "tap {POD_TAP} is not this VM's (its mark: {other:?}); the pod's \
                             network changed under it"
                        ),
                    })
                }
            }
            tap::open_queue(POD_TAP).map_err(self.tap_err())
        })
    }

    /// Deletes the interface's ingress qdisc (with the redirect) and the
    /// tap, if the tap bears `mark` (the VM's own: another VM's tap on a
    /// namespace reused is left alone); what is gone already is fine,
    /// anything else is an error (the release is tried again).
    pub fn detach(&self, mark: &str, ifname: &str) -> Result<(), PodNetError> {
        self.run(|| {
            let e = self.tap_err();
            match tap::mark_of(POD_TAP).map_err(&e)? {
                Some(m) if m == mark => {}
                _ => return Ok(()),
            }
            // The qdisc first: a tap deleted before it would leave the
            // pod's interface redirecting into nothing, and no mark to
            // find it by again.
            if let Some(index) = tap::index_if_exists(ifname).map_err(&e)? {
                match del_ingress(ifname, index) {
                    Err(TapError::Io { ref source, .. })
                        if matches!(
                            source.raw_os_error(),
                            Some(libc::ENOENT) | Some(libc::EINVAL)
                        ) => {}
                    r => r.map_err(&e)?,
                }
            }
            tap::delete(POD_TAP).map_err(&e)
        })
    }
}

/// What an attach made so far (its rollback's list).
#[derive(Default)]
struct Made {
    tap: bool,
    /// Interfaces (by index) given an ingress qdisc.
    qdiscs: Vec<u32>,
}

/// Deletes the ingress qdisc of `index` (and so its filters).
fn del_ingress(ifname: &str, index: u32) -> Result<(), TapError> {
    tap::rtnetlink(
        ifname,
        "delete the ingress qdisc",
        vec![(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            0,
        )],
    )
}

/// Detaches a pod VM's tap from the namespace at `path`, if it is still
/// there: a namespace deleted since (CNI's teardown) took the tap with it.
/// `id`: the namespace's identity when the tap was made; a path that
/// opens another namespace now is one whose tap went with the old one.
pub fn release(
    path: &Path,
    id: Option<(u64, u64)>,
    mark: &str,
    ifname: &str,
) -> Result<(), PodNetError> {
    match Netns::open(path) {
        Ok(ns) => match id {
            Some(id) if ns.id()? != id => Ok(()),
            _ => ns.detach(mark, ifname),
        },
        // Bound to the daemon's or the host's namespace since: not the
        // pod's, whose tap went with it.
        Err(PodNetError::Own(_) | PodNetError::Host(_)) => Ok(()),
        Err(PodNetError::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        // Unmounted (a plain file left, or another filesystem): gone.
        Err(PodNetError::NotNetns(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `tc qdisc add dev IFINDEX ingress`.
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev TO` (Kata's; `matchall` is not in
/// every kernel).
fn redirect(from: u32, to: u32) -> TcMessage {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    // Priority 1, protocol ETH_P_ALL in network order.
    m.header.info = (1 << 16) | u32::from((libc::ETH_P_ALL as u16).to_be());
    m.attributes.push(TcAttribute::Kind("u32".into()));
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    let mut generic = TcActionGeneric::default();
    generic.action = TcActionType::Stolen;
    let mut mirror = TcMirror::default();
    mirror.generic = generic;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut act = TcAction::default();
    act.tab = 1;
    act.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![act])),
    ]));
    m
}

/// Whether `/proc/net/route`'s text has `address/prefix`'s subnet routed
/// on `ifname` with no gateway.
fn subnet_on_link(route: &str, ifname: &str, address: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let net = Ipv4Addr::from(u32::from(address) & mask);
    let hex = |a: Ipv4Addr| format!("{:08X}", u32::from_ne_bytes(a.octets()));
    let (net, mask) = (hex(net), hex(Ipv4Addr::from(mask)));
    route.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&ifname)
            && f.get(1) == Some(&net.as_str())
            && f.get(2) == Some(&"00000000")
            && f.get(7) == Some(&mask.as_str())
    })
}

/// The gateway of `ifname`'s default route in `/proc/net/route`'s text
/// (addresses as the kernel's u32 in host order of network-order bytes).
fn default_gateway(route: &str, ifname: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (iface, dest, gw, mask) = (f.first()?, f.get(1)?, f.get(2)?, f.get(7)?);
        if *iface != ifname || *dest != "00000000" || *mask != "00000000" {
            return None;
        }
        let g = u32::from_str_radix(gw, 16).ok()?;
        (g != 0).then(|| Ipv4Addr::from(g.to_ne_bytes()))
    })
}

#[cfg(test)]
#[path = "podnet_tests.rs"]
mod tests;
