//! Guest addressing: each VM owns a /30 out of the daemon's subnet, with the
//! host end of its tap at .1 and the guest at .2 (point to point). The slot is
//! stored as the guest IP in the VM's runtime, so it survives stop/start.

use std::net::Ipv4Addr;

use thiserror::Error;

/// The default guest subnet: 172.30.0.0/16, 16384 VMs.
pub const DEFAULT_SUBNET: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
pub const DEFAULT_PREFIX: u8 = 16;
pub const GUEST_PREFIX: u8 = 30;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetError {
    #[error("{0:?} is not an IPv4 network: write it as a.b.c.d/n, e.g. 10.1.0.0/16")]
    BadCidr(String),
    #[error("{0}: the host bits are set; the network is {1}")]
    HostBits(String, Cidr),
    #[error("{0:?} is not a port mapping: write [ADDR:]HOST:GUEST[/udp], e.g. 8080:80 or 127.0.0.1:5353:53/udp (ports 1-65535)")]
    BadPort(String),
    #[error("guest subnet {0} is too small: use a prefix of /28 or shorter")]
    SubnetTooSmall(Cidr),
    #[error("no free guest address left in {0}/{1}: delete unused VMs")]
    Exhausted(Ipv4Addr, u8),
    #[error("{0} is not a guest address of subnet {1}/{2}")]
    Foreign(Ipv4Addr, Ipv4Addr, u8),
}

/// An IPv4 network, validated: four octets, a prefix of at most 32, no
/// host bits. What `--allow-net` and `--subnet` take, and what goes into a
/// firewall rule (so nothing else can).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Cidr {
        Cidr { addr, prefix }
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let c = Cidr { addr, prefix };
        let net = Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & c.mask()),
            prefix,
        };
        if net.addr != addr {
            return Err(NetError::HostBits(s.to_string(), net));
        }
        Ok(c)
    }
}

impl TryFrom<String> for Cidr {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

/// A published port's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A published port: a host address and port that reach a guest port
/// (`-p [ADDR:]HOST:GUEST[/udp]`, docker's syntax). The host address
/// defaults to 127.0.0.1: a port is published to the host, not its LAN,
/// unless the user names an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortMap {
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl PortMap {
    /// The host side, as `port rm` names it: `127.0.0.1:8080/tcp`.
    pub fn host_side(&self) -> String {
        format!("{}:{}/{}", self.host_addr, self.host_port, self.proto)
    }
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_addr, self.host_port, self.guest_port, self.proto
        )
    }
}

impl std::str::FromStr for PortMap {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadPort(s.to_string());
        let (spec, proto) = match s.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, Proto::Tcp),
            Some((spec, "udp")) => (spec, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (s, Proto::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [h, g] => (Ipv4Addr::LOCALHOST, *h, *g),
            [a, h, g] => (a.parse().map_err(|_| bad())?, *h, *g),
            _ => return Err(bad()),
        };
        let port = |p: &str| -> Result<u16, NetError> {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)
        };
        Ok(PortMap {
            host_addr: addr,
            host_port: port(host)?,
            guest_port: port(guest)?,
            proto,
        })
    }
}

impl TryFrom<String> for PortMap {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortMap> for String {
    fn from(p: PortMap) -> String {
        p.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Default for Subnet {
    fn default() -> Self {
        Subnet {
            base: DEFAULT_SUBNET,
            prefix: DEFAULT_PREFIX,
        }
    }
}

/// The addresses of one VM's point-to-point link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    pub slot: u32,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
}

impl GuestNet {
    /// A locally administered MAC derived from the guest IP (06:00:a.b.c.d),
    /// the convention Firecracker's examples use.
    pub fn mac(&self) -> String {
        let o = self.guest_ip.octets();
        format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }
}

impl Subnet {
    /// A guest subnet from a network: room for at least four VMs.
    pub fn from_cidr(c: Cidr) -> Result<Subnet, NetError> {
        if c.prefix > 28 {
            return Err(NetError::SubnetTooSmall(c));
        }
        Ok(Subnet {
            base: c.addr,
            prefix: c.prefix,
        })
    }

    pub fn cidr(&self) -> Cidr {
        Cidr::new(self.base, self.prefix)
    }

    pub fn slots(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix) - 2)
    }

    pub fn slot(&self, slot: u32) -> GuestNet {
        let net = u32::from(self.base) + slot * 4;
        GuestNet {
            slot,
            host_ip: Ipv4Addr::from(net + 1),
            guest_ip: Ipv4Addr::from(net + 2),
        }
    }

    pub fn slot_of(&self, guest: Ipv4Addr) -> Result<GuestNet, NetError> {
        let off = u32::from(guest).wrapping_sub(u32::from(self.base));
        if off % 4 != 2 || off / 4 >= self.slots() {
            return Err(NetError::Foreign(guest, self.base, self.prefix));
        }
        Ok(self.slot(off / 4))
    }

    /// The lowest slot whose guest IP is not in `used`. Slot 0 is skipped so
    /// that the network address of the subnet is never a link.
    pub fn allocate<'a>(
        &self,
        used: impl IntoIterator<Item = &'a Ipv4Addr>,
    ) -> Result<GuestNet, NetError> {
        let taken: std::collections::HashSet<u32> = used
            .into_iter()
            .filter_map(|ip| self.slot_of(*ip).ok().map(|g| g.slot))
            .collect();
        (1..self.slots())
            .find(|s| !taken.contains(s))
            .map(|s| self.slot(s))
            .ok_or(NetError::Exhausted(self.base, self.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_point_to_point() {
        let s = Subnet::default();
        let g = s.slot(1);
        assert_eq!(g.host_ip, Ipv4Addr::new(172, 30, 0, 5));
        assert_eq!(g.guest_ip, Ipv4Addr::new(172, 30, 0, 6));
        assert_eq!(g.mac(), "06:00:ac:1e:00:06");
        assert_eq!(s.slot_of(g.guest_ip), Ok(g));
        assert!(s.slot_of(g.host_ip).is_err());
        assert!(s.slot_of(Ipv4Addr::new(10, 0, 0, 2)).is_err());
    }

    #[test]
    fn cidrs_are_validated() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains(Ipv4Addr::new(10, 1, 200, 3)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert!(c.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!c.overlaps(&"192.168.0.0/16".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        for bad in [
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0/16",
            "x/8",
            "10.0.0.0/+8",
            "1.2.3.4/8 ",
            "10.0.0.0/8\"; drop",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let e = "10.1.2.3/16".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("the network is 10.1.0.0/16"), "{e}");
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, "\"10.1.0.0/16\"");
        assert!(serde_json::from_str::<Cidr>("\"10.1.0.1/16\"").is_err());
        assert!(Subnet::from_cidr("10.9.0.0/29".parse().unwrap()).is_err());
        assert_eq!(Subnet::from_cidr(c).unwrap().cidr(), c);
    }

    #[test]
    fn port_maps_read_like_dockers() {
        let p: PortMap = "8080:80".parse().unwrap();
        assert_eq!(p.host_addr, Ipv4Addr::LOCALHOST);
        assert_eq!((p.host_port, p.guest_port, p.proto), (8080, 80, Proto::Tcp));
        assert_eq!(p.to_string(), "127.0.0.1:8080:80/tcp");
        assert_eq!(p.host_side(), "127.0.0.1:8080/tcp");
        let u: PortMap = "0.0.0.0:5353:53/udp".parse().unwrap();
        assert_eq!(u.proto, Proto::Udp);
        assert_eq!(u.host_addr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(u.to_string().parse::<PortMap>().unwrap(), u);
        for bad in [
            "80",
            "0:80",
            "8080:0",
            "70000:80",
            "a:80",
            "8080:80/sctp",
            "1.2.3:80:80",
            ":80",
            "8080:+80",
            "1:2:3:4",
        ] {
            let e = bad.parse::<PortMap>().unwrap_err().to_string();
            assert!(e.contains("not a port mapping"), "{bad}: {e}");
        }
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PortMap>(&j).unwrap(), p);
    }

    #[test]
    fn allocates_lowest_free() {
        let s = Subnet::default();
        let a = s.allocate([]).unwrap();
        assert_eq!(a.slot, 1);
        let used = [s.slot(1).guest_ip, s.slot(2).guest_ip, s.slot(4).guest_ip];
        assert_eq!(s.allocate(&used).unwrap().slot, 3);
        let tiny = Subnet {
            base: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 29,
        };
        assert_eq!(tiny.slots(), 2);
        let used = [tiny.slot(1).guest_ip];
        assert!(matches!(tiny.allocate(&used), Err(NetError::Exhausted(..))));
    }
}
