//! Each guest's firewall and NAT, in an nftables table of banger's own
//! (`inet banger`), the way Firecracker's network-setup guide keeps its
//! rules apart: adding, checking and deleting are idempotent, and removing
//! a VM's rules is finding its tag.
//!
//! The policy (ARCHITECTURE.md, "Guest isolation"):
//! - nothing from a tap reaches the host itself (input), except replies to
//!   connections the host opened;
//! - forwarded traffic from a tap must carry its guest's own address
//!   (anti-spoofing), goes out through NAT to the outside world, and never
//!   to a link-local address (the metadata address above all), a private or
//!   shared range of the host's networks, or another guest; `--allow-net`
//!   opens chosen ranges, `--net none` closes the outside too;
//! - traffic to a tap is only the replies to what its guest opened;
//! - anything not IPv4 from a tap is dropped.
//!
//! The rules are fixed; what is per VM lives in nftables sets (its tap and
//! address, whether it may go out, its allowed ranges), so adding or
//! removing a VM is adding or deleting set elements: its cost, and the cost
//! of a packet's way through the chains, do not grow with the number of
//! VMs.
//!
//! banger's chains run before the usual filter chains (priority filter -
//! 10), and a host firewall that drops forwarded traffic by policy (Docker's
//! `FORWARD DROP`, a distribution's nftables.conf) gets two accepts for
//! banger's taps at the top of its forward chain, tagged `banger`, so that
//! what banger's chains let through is not dropped there.

use std::net::Ipv4Addr;

use banger_core::net::Cidr;
use thiserror::Error;

use crate::cmd::{self, CmdError};

mod listing;
pub use listing::{
    default_uplink, parse_chains, parse_default_route, parse_guests, parse_routes, routes,
    tagged_handles, ChainRef, Chains,
};

pub const TABLE: &str = "banger";

/// An `nft` run takes milliseconds; one that hangs (a wedged netlink
/// socket) fails its request after this.
pub const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Destinations a guest never reaches through NAT unless allowed: this
/// network, the host's private and shared ranges, loopback, link-local
/// (169.254.169.254, the cloud metadata address), IETF protocol
/// assignments, multicast and reserved. (198.18.0.0/15, the benchmarking
/// range, is left to routing: the tests' outside world lives there.)
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

#[derive(Debug, Error)]
pub enum FirewallError {
    #[error("firewall of vm {vm}: {source}")]
    Nft { vm: String, source: CmdError },
    #[error("write /proc/sys/net/ipv4/ip_forward: {0}")]
    Forward(std::io::Error),
    #[error("the firewall thread panicked")]
    Thread,
    #[error("interface name {0:?} is not valid for a rule")]
    BadIfname(String),
    #[error("vm id {0:?} is not valid for a rule tag: use a-z, 0-9 and '-'")]
    BadId(String),
}

/// One VM's place in the firewall.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRules {
    /// Names the VM in errors.
    pub vm_id: String,
    pub tap: String,
    pub guest_ip: Ipv4Addr,
    /// Whether the guest may go out through NAT (not with `--net none`).
    pub outside: bool,
    /// Ranges the guest may reach despite `BLOCKED` (`--allow-net`).
    pub allow: Vec<Cidr>,
    /// The host's resolvers guests may query on port 53 (they are often on
    /// the LAN, which is otherwise closed to guests).
    pub dns: Vec<Ipv4Addr>,
    /// The guests' subnet (other guests are never reachable, except
    /// `peers`).
    pub guests: Cidr,
    /// Whether the VM is on a shared network (`--network`).
    #[serde(default)]
    pub networked: bool,
    /// The VMs on its network that have a tap now: (tap, address). Each
    /// pair is opened both ways; VMs that join later open theirs with it.
    #[serde(default)]
    pub peers: Vec<(String, Ipv4Addr)>,
}

fn check_ifname(n: &str) -> Result<(), FirewallError> {
    let ok = !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(FirewallError::BadIfname(n.to_string()))
    }
}

fn check_id(id: &str) -> Result<(), FirewallError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FirewallError::BadId(id.to_string()))
    }
}

pub fn enable_ip_forward() -> Result<(), FirewallError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(FirewallError::Forward)
}

/// The comment banger's table carries when forwarding was off before it
/// existed, so that removing the last VM restores it.
const FORWARD_WAS_OFF: &str = "banger: ip_forward was 0";

/// The comment on banger's accepts in other tables' forward chains.
const FOREIGN_TAG: &str = "banger";

/// The table, its sets and its fixed chains, created with the first VM.
pub fn table_script(comment: &str, guests: Cidr) -> String {
    let c = if comment.is_empty() {
        String::new()
    } else {
        format!("\tcomment \"{comment}\"\n")
    };
    let mut blocked: Vec<String> = BLOCKED.iter().map(|b| b.to_string()).collect();
    blocked.push(guests.to_string());
    format!(
        "table inet {TABLE} {{\n{c}\
         \tset guests {{ type ifname . ipv4_addr; }}\n\
         \tset outside {{ type ifname; }}\n\
         \tset allow {{ type ifname . ipv4_addr; flags interval; }}\n\
         \tset peers {{ type ifname . ipv4_addr; }}\n\
         \tset dns {{ type ipv4_addr; }}\n\
         \tset blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }} }}\n\
         \tchain input {{ type filter hook input priority filter - 10; policy accept;\n\
         \t\tiifname \"bgtap*\" ct state established,related accept\n\
         \t\tiifname \"bgtap*\" fib daddr . iif type local meta l4proto {{ tcp, udp }} th dport 53 accept\n\
         \t\tiifname \"bgtap*\" drop\n\t}}\n\
         \tchain from_guest {{\n\
         \t\tmeta nfproto != ipv4 drop\n\
         \t\tiifname . ip saddr != @guests drop\n\
         \t\tiifname . ip daddr @peers accept\n\
         \t\tip daddr {guests} drop\n\
         \t\tiifname @outside ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept\n\
         \t\tiifname . ip daddr @allow accept\n\
         \t\tip daddr @blocked drop\n\
         \t\tiifname @outside oifname != \"bgtap*\" accept\n\t}}\n\
         \tchain to_guest {{\n\t\tct state established,related accept\n\
         \t\tiifname . ip daddr @peers accept\n\t}}\n\
         \tchain forward {{ type filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname \"bgtap*\" jump from_guest\n\
         \t\tiifname \"bgtap*\" drop\n\
         \t\toifname \"bgtap*\" jump to_guest\n\
         \t\toifname \"bgtap*\" drop\n\t}}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"bgtap*\" oifname != \"bgtap*\" masquerade\n\t}}\n\
         }}\n",
        blocked = blocked.join(", "),
        guests = guests,
    )
}

/// The set elements of one VM: (set, element).
fn elements(r: &GuestRules) -> Vec<(&'static str, String)> {
    let tap = &r.tap;
    let mut v = vec![("guests", format!("\"{tap}\" . {}", r.guest_ip))];
    if r.outside {
        v.push(("outside", format!("\"{tap}\"")));
    }
    for a in &r.allow {
        v.push(("allow", format!("\"{tap}\" . {a}")));
    }
    for (ptap, pip) in &r.peers {
        v.push(("peers", format!("\"{tap}\" . {pip}")));
        v.push(("peers", format!("\"{ptap}\" . {}", r.guest_ip)));
    }
    v
}

/// The nft script that adds one VM (and the host's resolvers).
pub fn add_script(r: &GuestRules) -> String {
    let mut s: String = elements(r)
        .iter()
        .map(|(set, e)| format!("add element inet {TABLE} {set} {{ {e} }}\n"))
        .collect();
    if r.outside && !r.dns.is_empty() {
        let dns: Vec<String> = r.dns.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(
            "add element inet {TABLE} dns {{ {} }}\n",
            dns.join(", ")
        ));
    }
    s
}

/// The nft commands that remove one VM, one per element.
pub fn delete_commands(r: &GuestRules) -> Vec<String> {
    elements(r)
        .iter()
        .map(|(set, e)| format!("delete element inet {TABLE} {set} {{ {e} }}\n"))
        .collect()
}

fn nft_out(what: &str, args: &[&str], input: Option<&str>) -> Result<String, FirewallError> {
    cmd::run_with("nft", args, input, NFT_TIMEOUT).map_err(|source| FirewallError::Nft {
        vm: what.to_string(),
        source,
    })
}

fn nft(what: &str, script: &str) -> Result<(), FirewallError> {
    nft_out(what, &["-f", "-"], Some(script)).map(|_| ())
}

fn chains(what: &str) -> Result<Chains, FirewallError> {
    nft_out(what, &["list", "chains"], None).map(|t| parse_chains(&t))
}

fn validate(r: &GuestRules) -> Result<(), FirewallError> {
    check_id(&r.vm_id)?;
    check_ifname(&r.tap)?;
    for (t, _) in &r.peers {
        check_ifname(t)?;
    }
    Ok(())
}

/// The VMs in the firewall now, as (tap, address) pairs; empty when
/// banger's table is gone (a firewall reload, a flush). One `nft` run for
/// all VMs: what the periodic check compares the running VMs with.
pub fn present() -> Result<Vec<(String, Ipv4Addr)>, FirewallError> {
    if !chains("firewall")?.table {
        return Ok(Vec::new());
    }
    let text = nft_out("firewall", &["list", "set", "inet", TABLE, "guests"], None)?;
    Ok(parse_guests(&text))
}

/// Adds the VM to the firewall (creating the table first if need be,
/// remembering in its comment whether forwarding was off); enables
/// forwarding. Idempotent: adding an element that is there is no error.
/// Callers serialise `up` and `down`.
pub fn up(r: &GuestRules) -> Result<(), FirewallError> {
    validate(r)?;
    let cs = chains(&r.vm_id)?;
    let mut script = String::new();
    if !cs.table {
        let was_off = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map(|v| v.trim() == "0")
            .unwrap_or(false);
        script.push_str(&table_script(
            if was_off { FORWARD_WAS_OFF } else { "" },
            r.guests,
        ));
        script.push_str(&foreign_accepts(&cs.dropping_forward));
    }
    script.push_str(&add_script(r));
    nft(&r.vm_id, &script)?;
    enable_ip_forward()
}

/// banger's two accepts at the top of foreign forward chains.
fn foreign_accepts(chains: &[ChainRef]) -> String {
    let mut s = String::new();
    for c in chains {
        for dir in ["iifname", "oifname"] {
            s.push_str(&format!(
                "insert rule {c} {dir} \"bgtap*\" accept comment \"{FOREIGN_TAG}\"\n"
            ));
        }
    }
    s
}

/// Puts banger's accepts into foreign forward chains that drop by policy
/// and lack them (a firewall that started after banger's table); returns
/// the chains it fixed. Nothing to do without banger's table.
pub fn repair_foreign() -> Result<Vec<ChainRef>, FirewallError> {
    let cs = chains("firewall")?;
    if !cs.table {
        return Ok(Vec::new());
    }
    let mut missing = Vec::new();
    for c in cs.dropping_forward {
        let listing = nft_out(
            "firewall",
            &["-a", "list", "chain", &c.family, &c.table, &c.chain],
            None,
        )?;
        if tagged_handles(&listing, FOREIGN_TAG).len() < 2 {
            missing.push(c);
        }
    }
    if !missing.is_empty() {
        nft("firewall", &foreign_accepts(&missing))?;
    }
    Ok(missing)
}

/// Removes the VM from the firewall; what is already gone counts as
/// removed. When no VM is left, the table goes too (with banger's accepts
/// in foreign chains), and forwarding is switched back off if banger
/// switched it on and nothing else forwards (another table hooked at
/// forward or NAT: Docker, libvirt, the host's own firewall).
pub fn down(r: &GuestRules) -> Result<(), FirewallError> {
    validate(r)?;
    let cs = chains(&r.vm_id)?;
    if !cs.table {
        return Ok(());
    }
    let mut cmds = delete_commands(r);
    if r.networked {
        // Peers that joined after it opened pairs with it too: every pair
        // naming its tap or its address goes.
        let listing = nft_out(&r.vm_id, &["list", "set", "inet", TABLE, "peers"], None)?;
        for (t, ip) in parse_guests(&listing) {
            if t == r.tap || ip == r.guest_ip {
                let c = format!("delete element inet {TABLE} peers {{ \"{t}\" . {ip} }}\n");
                if !cmds.contains(&c) {
                    cmds.push(c);
                }
            }
        }
    }
    if nft(&r.vm_id, &cmds.concat()).is_err() {
        // Some element was gone already (a half-done up, a repeated
        // down): one at a time, the missing ones skipped.
        for c in &cmds {
            match nft(&r.vm_id, c) {
                Err(FirewallError::Nft {
                    source: CmdError::Failed { ref stderr, .. },
                    ..
                }) if stderr.contains("No such file") || stderr.contains("not exist") => {}
                other => other?,
            }
        }
    }
    let guests = nft_out(&r.vm_id, &["list", "set", "inet", TABLE, "guests"], None)?;
    if !parse_guests(&guests).is_empty() {
        return Ok(()); // other VMs remain
    }
    let table = nft_out(&r.vm_id, &["list", "table", "inet", TABLE], None)?;
    let was_off = table.contains(&format!("comment \"{FORWARD_WAS_OFF}\""));
    let mut script = String::new();
    for c in &cs.dropping_forward {
        let listing = nft_out(
            &r.vm_id,
            &["-a", "list", "chain", &c.family, &c.table, &c.chain],
            None,
        )?;
        for h in tagged_handles(&listing, FOREIGN_TAG) {
            script.push_str(&format!("delete rule {c} handle {h}\n"));
        }
    }
    // Forwarding first: the table's comment is the only record that it
    // was off, so a crash between the two steps must leave the table (the
    // next `down` finishes) rather than forwarding on.
    if was_off && cs.other_forwarders.is_empty() {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").map_err(FirewallError::Forward)?;
    }
    script.push_str(&format!("delete table inet {TABLE}\n"));
    nft(&r.vm_id, &script)
}

/// Removes what an older banger (rules tagged `banger:<vm id>` in a table
/// `ip banger`) left for a VM, and that table once it holds no VM's rule.
pub fn down_legacy(vm_id: &str) -> Result<(), FirewallError> {
    check_id(vm_id)?;
    let tables = nft_out(vm_id, &["list", "tables"], None)?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table ip {TABLE}"))
    {
        return Ok(());
    }
    let listing = nft_out(vm_id, &["-a", "list", "table", "ip", TABLE], None)?;
    let mut script = String::new();
    let mut chain = String::new();
    let mut others = 0;
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.split_whitespace().next().unwrap_or("").to_string();
        } else if let Some((body, h)) = line.rsplit_once("# handle ") {
            if body.contains(&format!("comment \"banger:{vm_id}\"")) {
                script.push_str(&format!(
                    "delete rule ip {TABLE} {chain} handle {}\n",
                    h.trim()
                ));
            } else if body.contains("comment \"banger:") {
                others += 1;
            }
        }
    }
    if others == 0 {
        script = format!("delete table ip {TABLE}\n");
    }
    nft(vm_id, &script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> GuestRules {
        GuestRules {
            vm_id: "abc".into(),
            tap: "bgtap0".into(),
            guest_ip: Ipv4Addr::new(172, 30, 0, 6),
            outside: true,
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            dns: vec![Ipv4Addr::new(192, 168, 1, 1)],
            guests: "172.30.0.0/16".parse().unwrap(),
            networked: false,
            peers: vec![],
        }
    }

    #[test]
    fn a_vm_is_set_elements_and_the_rules_are_fixed() {
        let r = rules();
        let add = add_script(&r);
        assert!(
            add.contains("add element inet banger guests { \"bgtap0\" . 172.30.0.6 }"),
            "{add}"
        );
        assert!(add.contains("add element inet banger outside { \"bgtap0\" }"));
        assert!(add.contains("add element inet banger allow { \"bgtap0\" . 10.1.0.0/16 }"));
        assert!(add.contains("add element inet banger dns { 192.168.1.1 }"));
        assert!(!add.contains("add rule"), "no rule per VM: {add}");
        let del = delete_commands(&r);
        assert_eq!(del.len(), 3);
        assert!(del
            .iter()
            .all(|c| c.starts_with("delete element inet banger ")));

        let none = GuestRules {
            outside: false,
            allow: vec![],
            ..r.clone()
        };
        let add = add_script(&none);
        assert!(
            !add.contains("outside") && !add.contains("dns"),
            "--net none: {add}"
        );

        let t = table_script(FORWARD_WAS_OFF, "198.19.0.0/16".parse().unwrap());
        assert!(t.contains("comment \"banger: ip_forward was 0\""));
        assert!(
            t.contains("iifname . ip saddr != @guests drop"),
            "anti-spoofing: {t}"
        );
        assert!(t.contains("169.254.0.0/16") && t.contains("172.16.0.0/12"));
        assert!(
            t.contains("198.19.0.0/16"),
            "the guests' own subnet is blocked"
        );
        // The allow and DNS accepts come before the block, the way out after.
        let (dns, allow, block, out) = (
            t.find("@dns").unwrap(),
            t.find("@allow accept").unwrap(),
            t.find("@blocked drop").unwrap(),
            t.find("iifname @outside oifname").unwrap(),
        );
        assert!(dns < block && allow < block && block < out, "{t}");
        // Other guests stay closed whatever --allow-net opens: only a
        // network's peers are accepted before it.
        let (peers, guests) = (
            t.find("@peers accept").unwrap(),
            t.find("ip daddr 198.19.0.0/16 drop").unwrap(),
        );
        assert!(peers < guests && guests < allow, "{t}");
        assert!(
            t.contains("iifname \"bgtap*\" drop"),
            "nothing reaches the host"
        );

        let docker = ChainRef {
            family: "ip".into(),
            table: "filter".into(),
            chain: "FORWARD".into(),
        };
        let f = foreign_accepts(std::slice::from_ref(&docker));
        assert!(f.contains(
            "insert rule ip filter FORWARD iifname \"bgtap*\" accept comment \"banger\""
        ));
        assert!(f.contains(
            "insert rule ip filter FORWARD oifname \"bgtap*\" accept comment \"banger\""
        ));
    }

    /// The real nft, in a network namespace private to the test's thread:
    /// the table is accepted, VMs come and go as elements, up and down are
    /// idempotent, a foreign dropping chain gets banger's accepts (and
    /// loses them with the last VM), ip_forward is restored.
    #[test]
    fn real_nft_takes_the_table_and_its_elements() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the tests run as root");
            let docker = "table ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n";
            nft("test", docker).unwrap();
            let a = rules();
            let b = GuestRules {
                vm_id: "def".into(),
                tap: "bgtap1".into(),
                guest_ip: Ipv4Addr::new(172, 30, 0, 10),
                outside: false,
                allow: vec![],
                ..rules()
            };
            up(&a).unwrap();
            up(&a).unwrap();
            up(&b).unwrap();
            let mut p = present().unwrap();
            p.sort();
            assert_eq!(p, vec![("bgtap0".into(), a.guest_ip), ("bgtap1".into(), b.guest_ip)]);
            assert_eq!(repair_foreign().unwrap(), vec![], "accepts already there");
            let fwd = |_: ()| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
            assert_eq!(fwd(()).trim(), "1");
            down(&a).unwrap();
            down(&a).unwrap();
            assert_eq!(present().unwrap(), vec![("bgtap1".into(), b.guest_ip)]);
            // A peer on a shared network: pairs both ways, and all of them
            // gone with either VM.
            let c = GuestRules {
                vm_id: "ghi".into(),
                tap: "bgtap2".into(),
                guest_ip: Ipv4Addr::new(172, 30, 0, 14),
                networked: true,
                peers: vec![("bgtap1".into(), b.guest_ip)],
                ..rules()
            };
            up(&c).unwrap();
            let pairs = || {
                parse_guests(&nft_out("test", &["list", "set", "inet", TABLE, "peers"], None).unwrap())
            };
            let mut p = pairs();
            p.sort();
            assert_eq!(
                p,
                vec![("bgtap1".into(), c.guest_ip), ("bgtap2".into(), b.guest_ip)]
            );
            down(&GuestRules {
                networked: true,
                ..b.clone()
            })
            .unwrap();
            assert!(pairs().is_empty(), "the pairs go with either VM");
            down(&c).unwrap();
            assert!(present().unwrap().is_empty());
            let listing = nft_out("test", &["-a", "list", "ruleset"], None).unwrap();
            assert!(!listing.contains("banger"), "{listing}");
            // Another table forwards (Docker's): forwarding is left on.
            assert_eq!(fwd(()).trim(), "1");
            nft("test", "delete table ip filter\n").unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
            up(&a).unwrap();
            down(&a).unwrap();
            assert_eq!(fwd(()).trim(), "0", "banger turned it on, nobody else forwards");
            down(&a).unwrap();
        })
        .join()
        .expect("firewall test thread");
    }

    #[test]
    fn rule_values_are_checked() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a\"b").is_err());
        assert!(check_id("0af3-x").is_ok());
        assert!(check_id("a\" counter").is_err());
        assert!(check_id("").is_err());
    }
}
