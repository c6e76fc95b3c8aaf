//! The VM's place in the firewall: its elements in the sets of banger's
//! own nftables table (see `banger_host::firewall` for the policy).
//! Installed on a thread of its own once the VMM runs, so that its `nft`
//! runs overlap the boot; checked and repaired by the stats poller (a
//! firewall reload that removed them); removed after the reply. The held
//! item is computed at teardown from the VM's records as they are then
//! (its tap, address, policy, peers) and carries the elements, so the
//! release needs nothing else.

use std::time::Instant;

use banger_core::api::Event;
use std::net::Ipv4Addr;

use banger_core::net::Cidr;
use banger_core::{Release, VmHandles, VmRecord};
use banger_host::firewall::{self, GuestRules};

use super::{held, Acq, Item, Resource};
use crate::daemon::{lock, micros, Daemon};
use crate::error::{DaemonError, Result};
use crate::host::Host;

#[derive(Debug)]
pub struct Firewall;

/// The VM's elements: its policy, its tap, the host's resolvers now.
pub fn rules(host: &Host<'_>, vm: &VmRecord, tap: &str) -> Result<GuestRules> {
    let outside = !vm.spec.net.none;
    Ok(GuestRules {
        vm_id: vm.id.clone(),
        tap: tap.to_string(),
        guest_ip: host.guest_net(vm)?.guest_ip,
        outside,
        allow: vm.spec.net.allow.clone(),
        dns: if outside {
            banger_guest::config::guest_nameservers(
                &std::fs::read_to_string(&host.cfg.resolv_conf).unwrap_or_default(),
            )
        } else {
            Vec::new()
        },
        guests: host.cfg.subnet.cidr(),
        networked: vm.spec.net.network.is_some(),
        peers: peers(host, vm)?,
    })
}

/// `--allow-net`'s ranges, checked against what they cannot open: the
/// guests' own subnet (guests reach each other through `--network`), and
/// this host's own addresses (a guest's packets to them are the host's
/// input, which takes only DNS from a tap). A range that is nothing but
/// such addresses is refused; a wider one that holds some is taken, and
/// what stays closed is said (the returned notes).
pub fn check_allow(host: &Host<'_>, allow: &[Cidr]) -> Result<Vec<String>> {
    if allow.is_empty() {
        return Ok(Vec::new());
    }
    judge_allow(allow, host.cfg.subnet.cidr(), &host_addrs()).map_err(DaemonError::Invalid)
}

/// This host's IPv4 addresses (of the daemon's network namespace), with
/// their interfaces.
fn host_addrs() -> Vec<(String, Ipv4Addr)> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|i| {
        let a = i.address?.as_sockaddr_in()?.ip();
        Some((i.interface_name, a))
    })
    .collect()
}

fn judge_allow(
    allow: &[Cidr],
    guests: Cidr,
    host: &[(String, Ipv4Addr)],
) -> std::result::Result<Vec<String>, String> {
    let mut notes = Vec::new();
    for c in allow {
        if c.overlaps(&guests) && c.prefix >= guests.prefix {
            return Err(format!(
                "--allow-net {c}: that is banger's guest subnet ({guests}); guests reach \
                 each other only when they share a network: start both with --network NAME"
            ));
        }
        let loopback = Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8);
        let own: Vec<&(String, Ipv4Addr)> = host.iter().filter(|(_, a)| c.contains(*a)).collect();
        let only_host = (c.prefix == 32 && !own.is_empty())
            || (loopback.overlaps(c) && c.prefix >= loopback.prefix);
        if only_host {
            return Err(format!(
                "--allow-net {c}: that is this host's own address, which a guest never \
                 reaches (only banger's DNS, at its gateway): --allow-net opens ranges \
                 beyond the host; run the service in a VM on the same --network instead"
            ));
        }
        if !own.is_empty() {
            let named: Vec<String> = own.iter().map(|(i, a)| format!("{a} ({i})")).collect();
            notes.push(format!(
                "--allow-net {c}: this host's own addresses in it stay closed to the guest: {}",
                named.join(", ")
            ));
        }
        if c.overlaps(&guests) {
            notes.push(format!(
                "--allow-net {c}: banger's guests in it ({guests}) stay closed to the guest \
                 (VMs reach each other only on a shared --network)"
            ));
        }
    }
    Ok(notes)
}

/// The other VMs of the VM's network that have a tap now.
fn peers(host: &Host<'_>, vm: &VmRecord) -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let Some(net) = &vm.spec.net.network else {
        return Ok(Vec::new());
    };
    let others = host.store().list_vms()?;
    Ok(others
        .iter()
        .filter(|o| o.id != vm.id && o.spec.net.network.as_ref() == Some(net))
        .filter_map(|o| {
            let tap = host.current_handles(o).tap_device?;
            let ip = o.runtime.guest_ip.as_deref()?.parse().ok()?;
            Some((tap, ip))
        })
        .collect())
}

impl Resource for Firewall {
    fn name(&self) -> &'static str {
        "firewall"
    }

    fn gives(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Background]
    }

    fn needs(&self) -> &'static [super::Handoff] {
        &[super::Handoff::Tap, super::Handoff::GuestAddress]
    }

    fn phase(&self) -> &'static str {
        "nat"
    }

    fn acquire(&self, host: &Host<'_>, cx: &mut Acq<'_>) -> Result<()> {
        // A pod VM's tap is in its pod's namespace, under its pod's
        // network policy (CNI's): nothing of the daemon's applies.
        if cx.vm.spec.net.pod_netns.is_some() {
            return Ok(());
        }
        let tap = cx.handles.tap_device.clone().ok_or_else(|| {
            DaemonError::Invalid(format!("vm {:?} has no tap for its firewall", cx.vm.name))
        })?;
        let spec = rules(host, cx.vm, &tap)?;
        if spec.outside && firewall::default_uplink().is_none() {
            (cx.events)(Event::Progress {
                message: "no default route on the host: the guest gets no outbound network".into(),
            });
        }
        let nat_lock = host.nat_lock.clone();
        let job = std::thread::Builder::new()
            .name("firewall-up".into())
            .spawn(move || {
                let t = Instant::now();
                let _n = lock(&nat_lock);
                firewall::up(&spec)?;
                // The elements exist; the boot has not joined this yet.
                crate::failpoint::hit("start.firewall.added")?;
                Ok(micros(t))
            })
            .map_err(|e| DaemonError::Invalid(format!("cannot start the firewall thread: {e}")))?;
        cx.background.push(("nat-async", job));
        Ok(())
    }

    /// Elements exist only once a tap was recorded.
    fn held(&self, host: &Host<'_>, vm: &VmRecord, h: &VmHandles) -> Option<Item> {
        let tap = h
            .tap_device
            .clone()
            .or_else(|| vm.runtime.tap_device.clone())?;
        Some(Item::Firewall(match rules(host, vm, &tap) {
            Ok(r) => held::Firewall::Elements(r),
            // (No address to name the element by: only an older banger's
            // rules, found by the VM's tag, can exist.)
            Err(_) => held::Firewall::Legacy(held::LegacyRules {
                vm_id: vm.id.clone(),
            }),
        }))
    }

    fn release(&self, host: &Host<'_>, r: &Release, held: &Item) -> Result<()> {
        let Item::Firewall(held) = held else {
            return Err(super::mismatch(self, &r.vm_name, held));
        };
        let failed = |e: firewall::FirewallError| DaemonError::Release {
            vm: r.vm_name.clone(),
            resource: "firewall",
            reason: e.to_string(),
        };
        let _n = lock(host.nat_lock);
        // What an older banger left (rules tagged with the VM's id in its
        // `ip banger` table); nothing when that table is not there.
        match held {
            held::Firewall::Elements(rules) => {
                firewall::down_legacy(&rules.vm_id).map_err(failed)?;
                firewall::down(rules).map_err(failed)
            }
            held::Firewall::Legacy(l) => firewall::down_legacy(&l.vm_id).map_err(failed),
        }
    }
}

impl Daemon {
    /// Puts back the firewall elements of every running VM that lacks them
    /// (a firewall reload, `nft flush ruleset`), and banger's accepts in a
    /// foreign forward chain that drops by policy (a firewall started after
    /// banger's table); returns how many VMs were repaired. One `nft` run
    /// when all is well. Run by reconcile and, periodically, by the poller.
    pub fn repair_firewalls(&self) -> usize {
        let Ok(vms) = self.store().list_vms() else {
            return 0;
        };
        let running: Vec<(VmRecord, String)> = vms
            .into_iter()
            .filter(|v| v.runtime.state() == banger_core::VmState::Running)
            .filter_map(|v| {
                let tap = self.current_handles(&v).tap_device?;
                Some((v, tap))
            })
            .collect();
        if running.is_empty() {
            return 0;
        }
        let _n = lock(&self.nat_lock);
        let present = match firewall::present() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(err = %e, "cannot check the firewall");
                return 0;
            }
        };
        let mut repaired = 0;
        for (vm, tap) in &running {
            let Ok(spec) = rules(&self.host(), vm, tap) else {
                continue;
            };
            if present.contains(&(spec.tap.clone(), spec.guest_ip)) {
                continue;
            }
            match firewall::up(&spec) {
                Ok(()) => {
                    tracing::warn!(vm = %vm.name, "firewall elements were missing; put back");
                    repaired += 1;
                }
                Err(e) => tracing::warn!(vm = %vm.name, err = %e, "cannot repair the firewall"),
            }
        }
        match firewall::repair_foreign() {
            Ok(fixed) => {
                for c in fixed {
                    tracing::warn!(chain = %c, "a forward chain that drops by policy appeared; banger's accepts added");
                }
            }
            Err(e) => tracing::warn!(err = %e, "cannot check foreign forward chains"),
        }
        repaired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_net_cannot_open_the_guests_subnet_or_the_hosts_own_addresses() {
        let guests: Cidr = "172.30.0.0/16".parse().unwrap();
        let host = vec![
            ("lo".to_string(), Ipv4Addr::LOCALHOST),
            ("eth0".to_string(), Ipv4Addr::new(10, 0, 0, 5)),
        ];
        let judge = |c: &str| judge_allow(&[c.parse().unwrap()], guests, &host);
        let e = judge("172.30.4.0/24").unwrap_err();
        assert!(e.contains("guest subnet") && e.contains("--network"), "{e}");
        for own in ["10.0.0.5/32", "127.0.0.1/32", "127.0.0.0/8"] {
            let e = judge(own).unwrap_err();
            assert!(e.contains("this host's own address"), "{own}: {e}");
        }
        // A wider range is taken; what stays closed in it is said.
        let notes = judge("10.0.0.0/24").unwrap();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("10.0.0.5 (eth0)"), "{notes:?}");
        assert!(judge("192.168.1.0/24").unwrap().is_empty());
        // A range around the guests' subnet is a LAN that holds it: taken,
        // the guests in it said to stay closed (the firewall drops them).
        let notes = judge("172.16.0.0/12").unwrap();
        assert!(
            notes.iter().any(|n| n.contains("banger's guests in it")),
            "{notes:?}"
        );
    }
}
