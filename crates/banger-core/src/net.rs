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
    #[error("no free guest address left in {0}/{1}: delete unused VMs")]
    Exhausted(Ipv4Addr, u8),
    #[error("{0} is not a guest address of subnet {1}/{2}")]
    Foreign(Ipv4Addr, Ipv4Addr, u8),
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
