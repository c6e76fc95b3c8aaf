//! The guest's network identity set through rtnetlink, in the agent's
//! own process: a restored clone's MAC, address and default route. No
//! `ip` process: under emulation a restored guest translates every new
//! binary's code afresh, and the `ip` commands this replaces cost a
//! clone's identity some 400 ms of its 500.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Sets `ifname`'s MAC (live where the device allows it, else with the
/// link down for the change), then replaces its IPv4 addresses with
/// `ip/prefix` and its default route with one through `gateway`. Taking
/// the last address away has the kernel flush the interface's ARP
/// entries (the template's gateway is not this clone's).
pub fn set(
    ifname: &str,
    mac: Option<[u8; 6]>,
    addr: Option<(Ipv4Addr, u8, Ipv4Addr)>,
) -> Result<(), String> {
    let index = nix::net::if_::if_nametoindex(ifname).map_err(|e| format!("{ifname}: {e}"))?;
    if let Some(mac) = mac {
        let set_mac = |flags: Option<bool>| {
            let mut link = LinkMessage::default();
            link.header.index = index;
            if let Some(up) = flags {
                link.header.flags = if up {
                    LinkFlags::Up
                } else {
                    LinkFlags::empty()
                };
                link.header.change_mask = LinkFlags::Up;
            } else {
                link.attributes.push(LinkAttribute::Address(mac.to_vec()));
            }
            request(RouteNetlinkMessage::SetLink(link), 0)
        };
        if let Err(e) = set_mac(None) {
            if e.raw_os_error() != Some(nix::libc::EBUSY) {
                return Err(format!("{ifname}: set its MAC: {e}"));
            }
            set_mac(Some(false)).map_err(|e| format!("{ifname}: link down: {e}"))?;
            set_mac(None).map_err(|e| format!("{ifname}: set its MAC: {e}"))?;
            set_mac(Some(true)).map_err(|e| format!("{ifname}: link up: {e}"))?;
        }
    }
    if let Some((ip, prefix, gateway)) = addr {
        for (old, old_prefix) in ipv4_addresses(ifname)? {
            let m = address(index, old, old_prefix);
            match request(RouteNetlinkMessage::DelAddress(m), 0) {
                Err(e) if e.raw_os_error() != Some(nix::libc::EADDRNOTAVAIL) => {
                    return Err(format!("{ifname}: remove {old}/{old_prefix}: {e}"))
                }
                _ => {}
            }
        }
        request(
            RouteNetlinkMessage::NewAddress(address(index, ip, prefix)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| format!("{ifname}: add {ip}/{prefix}: {e}"))?;
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.protocol = RouteProtocol::Boot;
        route.header.scope = RouteScope::Universe;
        route.header.kind = RouteType::Unicast;
        route
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        route.attributes.push(RouteAttribute::Oif(index));
        request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| format!("{ifname}: default route via {gateway}: {e}"))?;
    }
    Ok(())
}

/// `xx:xx:xx:xx:xx:xx` as bytes.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The interface's IPv4 addresses and prefix lengths.
fn ipv4_addresses(ifname: &str) -> Result<Vec<(Ipv4Addr, u8)>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("{ifname}: its addresses: {e}"))?;
    Ok(addrs
        .filter(|a| a.interface_name == ifname)
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            let mask = a.netmask?.as_sockaddr_in()?.ip();
            Some((ip, u32::from(mask).count_ones() as u8))
        })
        .collect())
}

fn address(index: u32, ip: Ipv4Addr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    m
}

/// One request with an acknowledgement, on a fresh socket.
fn request(msg: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut reply = Vec::with_capacity(8192);
    sock.recv(&mut reply, 0)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("undecodable rtnetlink answer: {e}"),
        )
    })?;
    match answer.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        NetlinkPayload::Error(_) => Ok(()),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected rtnetlink answer: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("06:00:ac:1e:00:06"),
            Some([6, 0, 0xac, 0x1e, 0, 6])
        );
        for bad in [
            "06:00:ac:1e:00",
            "06:00:ac:1e:00:06:07",
            "zz:00:ac:1e:00:06",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    /// In a network namespace of its own (a thread unshared: nothing of
    /// the host's is touched): a veth link gets a MAC, loses its old
    /// addresses for the new one, and routes by default through the
    /// gateway.
    #[test]
    fn sets_mac_address_and_route_in_a_namespace_of_its_own() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let ip = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {args:?}: {out:?}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            ip(&[
                "link", "add", "eth9", "type", "veth", "peer", "name", "eth8",
            ]);
            ip(&["link", "set", "eth9", "up"]);
            ip(&["addr", "add", "10.1.2.6/30", "dev", "eth9"]);
            set(
                "eth9",
                parse_mac("06:00:0a:01:02:0a"),
                Some((Ipv4Addr::new(10, 1, 2, 10), 30, Ipv4Addr::new(10, 1, 2, 9))),
            )
            .unwrap();
            let link = ip(&["link", "show", "eth9"]);
            assert!(link.contains("06:00:0a:01:02:0a"), "{link}");
            let addrs = ip(&["-4", "addr", "show", "eth9"]);
            assert!(addrs.contains("10.1.2.10/30"), "{addrs}");
            assert!(!addrs.contains("10.1.2.6"), "{addrs}");
            let routes = ip(&["route", "show", "default"]);
            assert!(routes.contains("default via 10.1.2.9 dev eth9"), "{routes}");
            // Again: the same identity applies as well the second time.
            set(
                "eth9",
                None,
                Some((Ipv4Addr::new(10, 1, 2, 10), 30, Ipv4Addr::new(10, 1, 2, 9))),
            )
            .unwrap();
            assert!(set("nope0", None, None).is_err());
        })
        .join()
        .unwrap();
    }
}
