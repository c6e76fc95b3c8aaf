//! Tap devices: one per VM, persistent (owned by the daemon, not the VMM),
//! with the host end of the VM's point-to-point /30 on it. Created in the
//! calling thread's network namespace, in-process: the tap itself through
//! the `/dev/net/tun` ioctls `ip tuntap` uses (`TUNSETIFF`, `TUNSETPERSIST`),
//! its address, link state and deletion through rtnetlink messages built
//! with netlink-packet-route. No `ip` process: creating a tap costs a few
//! hundred microseconds instead of a few milliseconds.
//!
//! Every tap carries its maker's mark in its alias (`IFLA_IFALIAS`, what
//! `ip link` shows as `alias`): a daemon sweeps only the taps that bear its
//! own mark, never another daemon's of the same namespace.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::libc;
use thiserror::Error;

/// Taps banger creates are named `<prefix><n>`; the prefix keeps them apart
/// from everyone else's interfaces.
pub const TAP_PREFIX: &str = "bgtap";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap {tap}: {op}: {source}")]
    Io {
        tap: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("tap {tap}: {op}: {source}")]
    Ioctl {
        tap: String,
        op: &'static str,
        source: nix::errno::Errno,
    },
    #[error("tap name {0:?} is not a valid interface name (1-15 characters, no '/', ':', space)")]
    BadName(String),
    #[error("no free tap name left (all of {TAP_PREFIX}0..{TAP_PREFIX}{0} exist)")]
    Exhausted(u32),
    #[error("tap mark {0:?} is not 1-{MARK_MAX} printable ASCII characters")]
    BadMark(String),
}

/// The longest alias the kernel takes: `IFALIASZ` (256) counts the NUL
/// netlink sends after it, and the kernel refuses 256.
pub const MARK_MAX: usize = 254;

pub(crate) fn check_mark(mark: &str) -> Result<(), TapError> {
    let ok = !mark.is_empty()
        && mark.len() <= MARK_MAX
        && mark.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadMark(mark.to_string()))
    }
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);

/// Whether an interface of that name exists in this network namespace.
pub fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The lowest `bgtapN` that neither exists nor is in `reserved`.
pub fn free_name(reserved: &[String]) -> Result<String, TapError> {
    const MAX: u32 = 65_536;
    (0..MAX)
        .map(|n| format!("{TAP_PREFIX}{n}"))
        .find(|n| !reserved.contains(n) && !exists(n))
        .ok_or(TapError::Exhausted(MAX))
}

pub(crate) fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Creates a persistent tap `name` bearing `mark`, with `host_ip/prefix`
/// on it, and brings it up. Fails if an interface of that name exists (it
/// is never adopted); on failure nothing this call created is left behind.
pub fn create(name: &str, host_ip: Ipv4Addr, prefix: u8, mark: &str) -> Result<(), TapError> {
    check_name(name)?;
    check_mark(mark)?;
    make_persistent_tap(name)?;
    let configured = nix::net::if_::if_nametoindex(name)
        .map_err(|source| TapError::Ioctl {
            tap: name.to_string(),
            op: "look up the new tap's index",
            source,
        })
        .and_then(|index| configure(name, index, host_ip, prefix, Some(mark)));
    if let Err(e) = configured {
        let _ = delete(name);
        return Err(e);
    }
    Ok(())
}

/// Creates a persistent tap `name` bearing `mark`, down and without an
/// address: a spare for the pool, configured when a VM gets it
/// ([`assign`]).
pub fn create_bare(name: &str, mark: &str) -> Result<(), TapError> {
    check_name(name)?;
    check_mark(mark)?;
    make_persistent_tap(name)?;
    let marked = index_of(name).and_then(|index| {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes
            .push(LinkAttribute::IfAlias(mark.to_string()));
        rtnetlink(
            name,
            "set its mark",
            vec![(RouteNetlinkMessage::SetLink(link), 0)],
        )
    });
    if let Err(e) = marked {
        let _ = delete(name);
        return Err(e);
    }
    Ok(())
}

/// The mark (alias) the tap bears, if it exists and has one.
pub fn mark_of(name: &str) -> Result<Option<String>, TapError> {
    check_name(name)?;
    let Some(index) = index_if_exists(name)? else {
        return Ok(None);
    };
    let mut link = LinkMessage::default();
    link.header.index = index;
    let answer = exchange(
        name,
        "read its mark",
        RouteNetlinkMessage::GetLink(link),
        NLM_F_REQUEST,
    )?;
    match answer {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
            Ok(l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfAlias(s) => Some(s),
                _ => None,
            }))
        }
        NetlinkPayload::Error(e) if e.raw_code() == -libc::ENODEV => Ok(None),
        NetlinkPayload::Error(e) => Err(TapError::Io {
            tap: name.to_string(),
            op: "read its mark",
            source: e.to_io(),
        }),
        other => Err(TapError::Io {
            tap: name.to_string(),
            op: "read its mark",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected rtnetlink answer: {other:?}"),
            ),
        }),
    }
}

/// The `bgtap*` interfaces of this network namespace that bear `mark`
/// (asked of netlink, in the calling thread's namespace; sysfs would show
/// the namespace it was mounted in).
pub fn marked(mark: &str) -> Vec<String> {
    let mut names: Vec<String> = nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .map(|a| a.interface_name)
        .filter(|n| n.starts_with(TAP_PREFIX))
        .collect();
    names.sort();
    names.dedup();
    names.retain(|n| matches!(mark_of(n), Ok(Some(m)) if m == mark));
    names
}

/// The interface's index, or None when there is no such interface
/// (ENODEV; any other failure is an error, never taken for "gone").
pub(crate) fn index_if_exists(name: &str) -> Result<Option<u32>, TapError> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(i) => Ok(Some(i)),
        Err(nix::errno::Errno::ENODEV) => Ok(None),
        Err(source) => Err(TapError::Ioctl {
            tap: name.to_string(),
            op: "look up its index",
            source,
        }),
    }
}

pub(crate) fn index_of(name: &str) -> Result<u32, TapError> {
    nix::net::if_::if_nametoindex(name).map_err(|source| TapError::Ioctl {
        tap: name.to_string(),
        op: "look up the tap's index",
        source,
    })
}

/// Puts `host_ip/prefix` on an existing tap and brings it up.
pub fn assign(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<(), TapError> {
    check_name(name)?;
    let index = index_of(name)?;
    configure(name, index, host_ip, prefix, None)
}

/// Takes `host_ip/prefix` off the tap and brings it down: a tap back in
/// the pool, as [`create_bare`] made it. An address already gone is fine.
pub fn reset(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<(), TapError> {
    check_name(name)?;
    let index = index_of(name)?;
    let addr = address(index, host_ip, prefix);
    match rtnetlink(
        name,
        "remove the address",
        vec![(RouteNetlinkMessage::DelAddress(addr), 0)],
    ) {
        Err(TapError::Io { ref source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::ENOENT)
            ) => {}
        r => r?,
    }
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.change_mask = LinkFlags::Up;
    rtnetlink(
        name,
        "bring down",
        vec![(RouteNetlinkMessage::SetLink(link), 0)],
    )
}

/// `TUNSETIFF` with `IFF_TUN_EXCL` (a new tap or an error, never someone
/// else's), then `TUNSETPERSIST` so that the tap outlives this descriptor.
pub(crate) fn make_persistent_tap(name: &str) -> Result<(), TapError> {
    let tun = make_tap(name)?;
    persist(name, &tun)
}

/// Makes the tap `name` persistent (`TUNSETPERSIST`) through `tun`, the
/// descriptor that made it ([`make_tap`]).
pub(crate) fn persist(name: &str, tun: &std::fs::File) -> Result<(), TapError> {
    // SAFETY: `tun` is attached to the tap; the argument is a plain int.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }.map_err(|source| TapError::Ioctl {
        tap: name.to_string(),
        op: "make persistent (TUNSETPERSIST)",
        source,
    })?;
    Ok(())
}

/// A new tap `name` (`TUNSETIFF` with `IFF_TUN_EXCL`), owned by root, that
/// lives only while the returned descriptor does, until [`persist`]: a
/// process that dies before it is persistent leaves nothing.
pub(crate) fn make_tap(name: &str) -> Result<std::fs::File, TapError> {
    let tun = attach(
        name,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL,
        "create (TUNSETIFF)",
    )?;
    // Owned by root: a tap with no owner may be attached to by anyone who
    // can open /dev/net/tun (0666 on most distributions), a guest's
    // traffic read or a start made to fail; owned, only its owner or
    // CAP_NET_ADMIN can.
    // SAFETY: `tun` is attached to the tap; the argument is a plain int.
    // (Not persistent yet: closing `tun` removes the tap.)
    unsafe { tun_set_owner(tun.as_raw_fd(), 0) }.map_err(|source| TapError::Ioctl {
        tap: name.to_string(),
        op: "set its owner (TUNSETOWNER)",
        source,
    })?;
    Ok(tun)
}

/// A fresh `/dev/net/tun` descriptor attached (`TUNSETIFF`) to the tap
/// `name` with `flags`: creating it, or attaching to an existing one.
fn attach(name: &str, flags: libc::c_int, op: &'static str) -> Result<std::fs::File, TapError> {
    attach_at(std::path::Path::new("/dev/net/tun"), name, flags, op)
}

fn attach_at(
    dev: &std::path::Path,
    name: &str,
    flags: libc::c_int,
    op: &'static str,
) -> Result<std::fs::File, TapError> {
    check_name(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|source| TapError::Io {
            tap: name.to_string(),
            op: "open the tun device",
            source,
        })?;
    // SAFETY: ifreq is plain old data, for which all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `ifr` a valid
    // ifreq (NUL-terminated name: check_name bounds it below IFNAMSIZ) that
    // outlives the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &ifr) }.map_err(|source| TapError::Ioctl {
        tap: name.to_string(),
        op,
        source,
    })?;
    Ok(tun)
}

/// Attaches a descriptor to the existing tap `name` (with virtio-net
/// headers on), for a VMM that gets its tap as a descriptor and so never
/// opens `/dev/net/tun` itself (the confined QEMU). The descriptor is
/// close-on-exec; the tap's one queue is this descriptor's until every
/// copy of it is closed.
pub fn open_queue(name: &str) -> Result<std::os::fd::OwnedFd, TapError> {
    open_queue_at(std::path::Path::new("/dev/net/tun"), name)
}

/// [`open_queue`] through the tun device node `dev` (a jail's own, as a
/// jailed Firecracker opens it): an unprivileged caller succeeds only on
/// a tap whose owner it is ([`set_owner`]).
pub fn open_queue_at(dev: &std::path::Path, name: &str) -> Result<std::os::fd::OwnedFd, TapError> {
    let tun = attach_at(
        dev,
        name,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        "attach (TUNSETIFF)",
    )?;
    Ok(tun.into())
}

nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);

/// Makes `uid` the tap's owner (`TUNSETOWNER`): that user may then attach
/// to it without `CAP_NET_ADMIN` (a jailed Firecracker opens its tap by
/// name). Root (0) takes it back.
pub fn set_owner(name: &str, uid: u32) -> Result<(), TapError> {
    let tun = attach(name, libc::IFF_TAP | libc::IFF_NO_PI, "attach (TUNSETIFF)")?;
    // SAFETY: `tun` is attached to the tap; the argument is a plain int.
    unsafe { tun_set_owner(tun.as_raw_fd(), uid as libc::c_int) }.map_err(|source| {
        TapError::Ioctl {
            tap: name.to_string(),
            op: "set its owner (TUNSETOWNER)",
            source,
        }
    })?;
    Ok(())
}

/// The message naming `host_ip/prefix` on interface `index`.
fn address(index: u32, host_ip: Ipv4Addr, prefix: u8) -> AddressMessage {
    let mut addr = AddressMessage::default();
    addr.header.family = AddressFamily::Inet;
    addr.header.prefix_len = prefix;
    addr.header.index = index;
    addr.attributes
        .push(AddressAttribute::Local(IpAddr::V4(host_ip)));
    addr.attributes
        .push(AddressAttribute::Address(IpAddr::V4(host_ip)));
    addr
}

/// The host address and link up (and the mark, for a new tap), in one
/// rtnetlink exchange.
fn configure(
    name: &str,
    index: u32,
    host_ip: Ipv4Addr,
    prefix: u8,
    mark: Option<&str>,
) -> Result<(), TapError> {
    let addr = address(index, host_ip, prefix);
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    if let Some(m) = mark {
        link.attributes.push(LinkAttribute::IfAlias(m.to_string()));
    }
    rtnetlink(
        name,
        "add the address and bring up",
        vec![
            (
                RouteNetlinkMessage::NewAddress(addr),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
            (RouteNetlinkMessage::SetLink(link), 0),
        ],
    )
}

/// Deletes the tap; a tap that does not exist is already deleted. (The
/// kernel's unregister waits for an RCU grace period: tens of milliseconds
/// on a busy host, which is why the daemon does this after its reply.)
pub fn delete(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    let Some(index) = index_if_exists(name)? else {
        return Ok(());
    };
    let mut link = LinkMessage::default();
    link.header.index = index;
    match rtnetlink(
        name,
        "delete",
        vec![(RouteNetlinkMessage::DelLink(link), 0)],
    ) {
        // Gone in between: deleted all the same.
        Err(TapError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Ok(())
        }
        r => r,
    }
}

/// Sends each message with `NLM_F_REQUEST | NLM_F_ACK` (and its extra
/// flags) and waits for its acknowledgement; the first error stops the
/// exchange.
pub(crate) fn rtnetlink(
    tap: &str,
    op: &'static str,
    msgs: Vec<(RouteNetlinkMessage, u16)>,
) -> Result<(), TapError> {
    for (msg, flags) in msgs {
        match exchange(tap, op, msg, NLM_F_REQUEST | NLM_F_ACK | flags)? {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(TapError::Io {
                    tap: tap.to_string(),
                    op,
                    source: e.to_io(),
                })
            }
            NetlinkPayload::Error(_) => {}
            other => {
                return Err(TapError::Io {
                    tap: tap.to_string(),
                    op,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("unexpected rtnetlink answer: {other:?}"),
                    ),
                })
            }
        }
    }
    Ok(())
}

/// One request on a fresh NETLINK_ROUTE socket, and its one answer.
pub(crate) fn exchange(
    tap: &str,
    op: &'static str,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<NetlinkPayload<RouteNetlinkMessage>, TapError> {
    let io_err = |source: std::io::Error| TapError::Io {
        tap: tap.to_string(),
        op,
        source,
    };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io_err)?;
    sock.bind_auto().map_err(io_err)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(io_err)?;
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = flags;
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    sock.send(&buf, 0).map_err(io_err)?;
    let mut reply = Vec::with_capacity(8192);
    sock.recv(&mut reply, 0).map_err(io_err)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).map_err(|e| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("undecodable rtnetlink answer: {e}"),
        ))
    })?;
    Ok(answer.payload)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs `f` on a thread of its own in a new, empty network namespace
    /// (unshare affects only the calling thread), so that nothing here
    /// touches the host's interfaces. Commands it spawns inherit it.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            f()
        })
        .join()
        .expect("netns thread")
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn create_configures_and_delete_removes() {
        in_new_netns(|| {
            assert_eq!(free_name(&[]).unwrap(), "bgtap0");
            assert_eq!(free_name(&["bgtap0".into()]).unwrap(), "bgtap1");
            create("bgtap0", Ipv4Addr::new(172, 30, 0, 1), 30, "banger /s").unwrap();
            assert!(exists("bgtap0"));
            assert_eq!(mark_of("bgtap0").unwrap().as_deref(), Some("banger /s"));
            assert_eq!(free_name(&[]).unwrap(), "bgtap1");
            let link = ip(&["-d", "link", "show", "dev", "bgtap0"]);
            assert!(link.contains("tun type tap"), "{link}");
            assert!(link.contains("pi off"), "{link}");
            assert!(link.contains("persist on"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            assert!(link.contains("alias banger /s"), "{link}");
            let addr = ip(&["-4", "-o", "addr", "show", "dev", "bgtap0"]);
            assert!(addr.contains("inet 172.30.0.1/30"), "{addr}");
            let route = ip(&["-4", "route", "show", "dev", "bgtap0"]);
            assert!(route.contains("172.30.0.0/30"), "{route}");

            delete("bgtap0").unwrap();
            assert!(!exists("bgtap0"));
            delete("bgtap0").unwrap();
        });
    }

    #[test]
    fn a_spare_is_assigned_and_reset_for_the_pool() {
        in_new_netns(|| {
            let ip4 = Ipv4Addr::new(172, 30, 0, 9);
            create_bare("bgtap0", "banger /s").unwrap();
            assert!(!ip(&["link", "show", "dev", "bgtap0"]).contains(",UP"));
            assign("bgtap0", ip4, 30).unwrap();
            assert!(ip(&["link", "show", "dev", "bgtap0"]).contains(",UP"));
            let addr = ip(&["-4", "-o", "addr", "show", "dev", "bgtap0"]);
            assert!(addr.contains("inet 172.30.0.9/30"), "{addr}");
            reset("bgtap0", ip4, 30).unwrap();
            reset("bgtap0", ip4, 30).unwrap();
            // Another owner (a jailed Firecracker's user) and back to root.
            set_owner("bgtap0", 4242).unwrap();
            set_owner("bgtap0", 0).unwrap();
            let addr = ip(&["-4", "-o", "addr", "show", "dev", "bgtap0"]);
            assert!(addr.trim().is_empty(), "{addr}");
            assert!(!ip(&["link", "show", "dev", "bgtap0"]).contains(",UP"));
            // Reused with another address, its mark kept.
            assign("bgtap0", Ipv4Addr::new(172, 30, 0, 13), 30).unwrap();
            assert_eq!(mark_of("bgtap0").unwrap().as_deref(), Some("banger /s"));
            delete("bgtap0").unwrap();
            assert_eq!(mark_of("bgtap0").unwrap(), None);
        });
    }

    /// Only the taps bearing the mark asked for are listed: another
    /// daemon's, an unmarked one and other interfaces are not.
    #[test]
    fn taps_are_listed_by_their_mark() {
        in_new_netns(|| {
            create("bgtap0", Ipv4Addr::new(172, 30, 0, 1), 30, "banger /a").unwrap();
            create_bare("bgtap1", "banger /a").unwrap();
            create_bare("bgtap2", "banger /b").unwrap();
            ip(&["tuntap", "add", "dev", "bgtap3", "mode", "tap"]);
            ip(&["tuntap", "add", "dev", "other0", "mode", "tap"]);
            ip(&["link", "set", "dev", "other0", "alias", "banger /a"]);
            assert_eq!(marked("banger /a"), vec!["bgtap0", "bgtap1"]);
            assert_eq!(marked("banger /b"), vec!["bgtap2"]);
            assert_eq!(mark_of("bgtap3").unwrap(), None);
            assert!(marked("banger /c").is_empty());
        });
    }

    #[test]
    fn an_existing_interface_is_never_adopted_nor_removed() {
        in_new_netns(|| {
            ip(&["tuntap", "add", "dev", "bgtap3", "mode", "tap"]);
            let e = create("bgtap3", Ipv4Addr::new(172, 30, 0, 5), 30, "m").unwrap_err();
            assert!(e.to_string().contains("tap bgtap3: create"), "{e}");
            assert!(exists("bgtap3"), "the other tap is left alone");
            let addr = ip(&["-4", "-o", "addr", "show", "dev", "bgtap3"]);
            assert!(addr.is_empty(), "and unconfigured: {addr}");

            // A failure after the tap exists (here: a prefix longer than
            // 32, which the kernel refuses) removes it.
            let e = create("bgtap4", Ipv4Addr::new(172, 30, 0, 9), 33, "m").unwrap_err();
            assert!(e.to_string().contains("bgtap4"), "{e}");
            assert!(!exists("bgtap4"), "rolled back");
        });
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a/b", "x y", "0123456789abcdef", "a:b"] {
            let e = create(n, Ipv4Addr::new(172, 30, 0, 1), 30, "m").unwrap_err();
            assert!(matches!(e, TapError::BadName(_)), "{n:?}: {e}");
            assert!(matches!(delete(n), Err(TapError::BadName(_))), "{n:?}");
        }
        let long = "m".repeat(MARK_MAX + 1);
        for m in ["", "a\nb", long.as_str()] {
            let e = create_bare("bgtap0", m).unwrap_err();
            assert!(matches!(e, TapError::BadMark(_)), "{m:?}: {e}");
        }
    }
}
