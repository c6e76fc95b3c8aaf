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
//! banger's chains run before the usual filter chains (priority filter -
//! 10), and a host firewall that drops forwarded traffic by policy (Docker's
//! `FORWARD DROP`, a distribution's nftables.conf) gets two accepts per VM
//! at the top of its forward chain, tagged like every banger rule, so that
//! what banger's chains let through is not dropped there.

use std::net::Ipv4Addr;

use banger_core::net::Cidr;
use thiserror::Error;

use crate::cmd::{self, CmdError};

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

/// One VM's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRules {
    /// The comment tag on the rules: `banger:<vm id>`.
    pub vm_id: String,
    pub tap: String,
    pub guest_ip: Ipv4Addr,
    /// The interface NAT goes out of; `None` (`--net none`, or no default
    /// route) gives the guest no outside access.
    pub uplink: Option<String>,
    /// Ranges the guest may reach despite `BLOCKED` (`--allow-net`).
    pub allow: Vec<Cidr>,
    /// The host's resolvers the guest may query on port 53 (they are often
    /// on the LAN, which is otherwise closed to guests).
    pub dns: Vec<Ipv4Addr>,
    /// The guests' subnet (other guests are never reachable).
    pub guests: Cidr,
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

fn tag(vm_id: &str) -> String {
    format!("banger:{vm_id}")
}

/// The interface of this namespace's IPv4 default route, from /proc/net/route.
pub fn default_uplink() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_route(&routes)
}

pub fn parse_default_route(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

/// IPv4 routes (destination network, interface) of this namespace, the
/// default route excluded.
pub fn routes() -> Vec<(Cidr, String)> {
    std::fs::read_to_string("/proc/net/route")
        .map(|r| parse_routes(&r))
        .unwrap_or_default()
}

pub fn parse_routes(routes: &str) -> Vec<(Cidr, String)> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
            if mask == 0 {
                return None;
            }
            let prefix = mask.count_ones() as u8;
            Some((Cidr::new(Ipv4Addr::from(dest), prefix), f[0].to_string()))
        })
        .collect()
}

pub fn enable_ip_forward() -> Result<(), FirewallError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(FirewallError::Forward)
}

/// The comment banger's table carries when forwarding was off before it
/// existed, so that removing the last rule restores it.
const FORWARD_WAS_OFF: &str = "banger: ip_forward was 0";

/// The table and its fixed chains, created with the first VM's rules.
pub fn table_script(comment: &str) -> String {
    let c = if comment.is_empty() {
        String::new()
    } else {
        format!("\tcomment \"{comment}\"\n")
    };
    format!(
        "table inet {TABLE} {{\n{c}\
         \tchain input {{ type filter hook input priority filter - 10; policy accept;\n\
         \t\tiifname \"bgtap*\" ct state established,related accept\n\
         \t\tiifname \"bgtap*\" drop\n\t}}\n\
         \tchain from_guest {{\n\t\tmeta nfproto != ipv4 drop\n\t}}\n\
         \tchain to_guest {{\n\t\tct state established,related accept\n\t}}\n\
         \tchain forward {{ type filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname \"bgtap*\" jump from_guest\n\
         \t\tiifname \"bgtap*\" drop\n\
         \t\toifname \"bgtap*\" jump to_guest\n\
         \t\toifname \"bgtap*\" drop\n\t}}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         }}\n"
    )
}

/// The nft script that adds one VM's rules to banger's table, and its two
/// accepts to each foreign forward chain that drops by policy.
pub fn vm_script(r: &GuestRules, foreign: &[ChainRef]) -> String {
    let t = tag(&r.vm_id);
    let tap = &r.tap;
    let g = r.guest_ip;
    let add = |rule: String| {
        format!("add rule inet {TABLE} from_guest iifname \"{tap}\" {rule} comment \"{t}\"\n")
    };
    let mut s = add(format!("ip saddr != {g} drop"));
    for ns in &r.dns {
        s.push_str(&add(format!(
            "ip daddr {ns} meta l4proto {{ tcp, udp }} th dport 53 accept"
        )));
    }
    for a in &r.allow {
        s.push_str(&add(format!("ip daddr {a} accept")));
    }
    let mut blocked: Vec<String> = BLOCKED.iter().map(|b| b.to_string()).collect();
    if !BLOCKED
        .iter()
        .filter_map(|b| b.parse::<Cidr>().ok())
        .any(|b| b.contains(r.guests.addr))
    {
        blocked.push(r.guests.to_string());
    }
    s.push_str(&add(format!("ip daddr {{ {} }} drop", blocked.join(", "))));
    if let Some(up) = &r.uplink {
        s.push_str(&add(format!("oifname \"{up}\" accept")));
    }
    s.push_str(&format!(
        "add rule inet {TABLE} postrouting ip saddr {g} oifname != \"bgtap*\" masquerade comment \"{t}\"\n"
    ));
    for c in foreign {
        for rule in [format!("iifname \"{tap}\""), format!("oifname \"{tap}\"")] {
            s.push_str(&format!(
                "insert rule {} {} {} {rule} accept comment \"{t}\"\n",
                c.family, c.table, c.chain
            ));
        }
    }
    s
}

/// How many rules `vm_script` adds for `r` (with `foreign` chains).
pub fn expected_rules(r: &GuestRules, foreign: usize) -> usize {
    1 + r.dns.len() + r.allow.len() + 1 + usize::from(r.uplink.is_some()) + 1 + 2 * foreign
}

/// A chain in the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRef {
    pub family: String,
    pub table: String,
    pub chain: String,
}

/// What the ruleset holds that banger cares about.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Whether banger's table exists, and its comment.
    pub table: bool,
    pub comment: Option<String>,
    /// Every rule: (chain, handle, comment).
    pub rules: Vec<(ChainRef, u64, Option<String>)>,
    /// Base chains of other tables hooked at forward with policy drop.
    pub dropping_forward: Vec<ChainRef>,
    /// Other tables' base chains that forward or NAT (someone else relies
    /// on ip_forward).
    pub other_forwarders: Vec<ChainRef>,
}

impl Ruleset {
    pub fn tagged(&self, vm_id: &str) -> Vec<(ChainRef, u64)> {
        let t = tag(vm_id);
        self.rules
            .iter()
            .filter(|r| r.2.as_deref() == Some(t.as_str()))
            .map(|r| (r.0.clone(), r.1))
            .collect()
    }

    /// Rules in banger's table that belong to a VM.
    fn vm_rules_in_table(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.0.family == "inet" && r.0.table == TABLE)
            .filter(|r| r.2.as_deref().is_some_and(|c| c.starts_with("banger:")))
            .count()
    }
}

/// Parses `nft -a list ruleset` (text: it carries rule handles and table
/// comments; nft 1.0.6's JSON drops the latter).
pub fn parse_ruleset(text: &str) -> Ruleset {
    let mut rs = Ruleset::default();
    let mut depth = 0usize;
    let mut table: Option<(String, String)> = None;
    let mut chain: Option<ChainRef> = None;
    for raw in text.lines() {
        let line = raw.trim();
        let quoted = |l: &str| -> Option<String> {
            let i = l.find("comment \"")? + "comment \"".len();
            let j = l[i..].find('"')?;
            Some(l[i..i + j].to_string())
        };
        // Braces in a comment do not count.
        let code = match line.find('"') {
            Some(i) => &line[..i],
            None => line,
        };
        let opens = code.matches('{').count();
        let closes = code.matches('}').count();
        if depth == 0 {
            if let Some(rest) = line.strip_prefix("table ") {
                let mut w = rest.split_whitespace();
                if let (Some(f), Some(n)) = (w.next(), w.next()) {
                    table = Some((f.to_string(), n.to_string()));
                    if f == "inet" && n == TABLE {
                        rs.table = true;
                    }
                }
            }
        } else if depth == 1 {
            if let (Some(rest), Some((f, t))) = (line.strip_prefix("chain "), &table) {
                chain = rest.split_whitespace().next().map(|c| ChainRef {
                    family: f.clone(),
                    table: t.clone(),
                    chain: c.to_string(),
                });
            } else if line.starts_with("comment \"") {
                if let Some((f, t)) = &table {
                    if f == "inet" && t == TABLE {
                        rs.comment = quoted(line);
                    }
                }
            }
        } else if depth == 2 {
            if let Some(c) = &chain {
                let ours = c.family == "inet" && c.table == TABLE;
                if line.starts_with("type ") && !ours {
                    let hook = line.split_whitespace().skip_while(|w| *w != "hook").nth(1);
                    let drop = line.contains("policy drop");
                    if hook == Some("forward") && drop {
                        rs.dropping_forward.push(c.clone());
                    }
                    if hook == Some("forward") || line.starts_with("type nat") {
                        rs.other_forwarders.push(c.clone());
                    }
                } else if let Some((body, h)) = line.rsplit_once("# handle ") {
                    if let Ok(handle) = h.trim().parse::<u64>() {
                        rs.rules.push((c.clone(), handle, quoted(body)));
                    }
                }
            }
        }
        depth = (depth + opens).saturating_sub(closes);
        if depth < 2 {
            chain = None;
        }
        if depth == 0 {
            table = None;
        }
    }
    rs
}

fn ruleset(vm_id: &str) -> Result<Ruleset, FirewallError> {
    cmd::run_with("nft", ["-a", "list", "ruleset"], None, NFT_TIMEOUT)
        .map(|t| parse_ruleset(&t))
        .map_err(|source| FirewallError::Nft {
            vm: vm_id.to_string(),
            source,
        })
}

fn nft(vm_id: &str, script: &str) -> Result<(), FirewallError> {
    cmd::run_with("nft", ["-f", "-"], Some(script), NFT_TIMEOUT).map_err(|source| {
        FirewallError::Nft {
            vm: vm_id.to_string(),
            source,
        }
    })?;
    Ok(())
}

fn validate(r: &GuestRules) -> Result<(), FirewallError> {
    check_id(&r.vm_id)?;
    check_ifname(&r.tap)?;
    if let Some(u) = &r.uplink {
        check_ifname(u)?;
    }
    Ok(())
}

/// Whether the VM's rules are all in place (none missing after a firewall
/// reload, say).
pub fn is_up(r: &GuestRules) -> Result<bool, FirewallError> {
    validate(r)?;
    let rs = ruleset(&r.vm_id)?;
    Ok(rs.table && rs.tagged(&r.vm_id).len() == expected_rules(r, rs.dropping_forward.len()))
}

/// Installs the VM's rules unless they are all there already (a partial
/// set, after a crash or a firewall reload, is replaced whole); enables
/// forwarding, remembering in the table's comment that it was off.
/// Callers serialise `up` and `down`.
pub fn up(r: &GuestRules) -> Result<(), FirewallError> {
    validate(r)?;
    let rs = ruleset(&r.vm_id)?;
    let mine = rs.tagged(&r.vm_id);
    if rs.table && mine.len() == expected_rules(r, rs.dropping_forward.len()) {
        // (A crash may have come between the rules and forwarding.)
        return enable_ip_forward();
    }
    let mut script = delete_script(&mine);
    if !rs.table {
        let was_off = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map(|v| v.trim() == "0")
            .unwrap_or(false);
        script.push_str(&table_script(if was_off { FORWARD_WAS_OFF } else { "" }));
    }
    script.push_str(&vm_script(r, &rs.dropping_forward));
    nft(&r.vm_id, &script)?;
    enable_ip_forward()
}

fn delete_script(rules: &[(ChainRef, u64)]) -> String {
    rules
        .iter()
        .map(|(c, h)| {
            format!(
                "delete rule {} {} {} handle {h}\n",
                c.family, c.table, c.chain
            )
        })
        .collect()
}

/// Removes every rule tagged for the VM, wherever it is; none left is
/// success. When no VM's rule remains in banger's table, the table goes
/// too, and forwarding is switched back off if banger switched it on and
/// nothing else forwards (another table hooked at forward or NAT: Docker,
/// libvirt, the host's own firewall).
pub fn down(vm_id: &str) -> Result<(), FirewallError> {
    check_id(vm_id)?;
    let rs = ruleset(vm_id)?;
    let mine = rs.tagged(vm_id);
    let ours_left = rs.vm_rules_in_table()
        - mine
            .iter()
            .filter(|(c, _)| c.family == "inet" && c.table == TABLE)
            .count();
    if rs.table && ours_left == 0 {
        let foreign: Vec<(ChainRef, u64)> = mine
            .into_iter()
            .filter(|(c, _)| !(c.family == "inet" && c.table == TABLE))
            .collect();
        if !foreign.is_empty() {
            nft(vm_id, &delete_script(&foreign))?;
        }
        // Forwarding first: the table's comment is the only record that
        // it was off, so a crash between the two steps must leave the
        // table (the next `down` finishes) rather than forwarding on.
        if rs.comment.as_deref() == Some(FORWARD_WAS_OFF) && rs.other_forwarders.is_empty() {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").map_err(FirewallError::Forward)?;
        }
        // Deleting the table takes its chains and rules along: one call.
        nft(vm_id, &format!("delete table inet {TABLE}\n"))?;
    } else if !mine.is_empty() {
        nft(vm_id, &delete_script(&mine))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> GuestRules {
        GuestRules {
            vm_id: "abc".into(),
            tap: "bgtap0".into(),
            guest_ip: Ipv4Addr::new(172, 30, 0, 6),
            uplink: Some("eth0".into()),
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            dns: vec![Ipv4Addr::new(192, 168, 1, 1)],
            guests: "172.30.0.0/16".parse().unwrap(),
        }
    }

    #[test]
    fn finds_the_default_route_and_the_others() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      veth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                      up0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_default_route(routes), Some("up0".into()));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
        assert_eq!(
            parse_routes(routes),
            vec![("192.168.0.0/24".parse().unwrap(), "veth0".to_string())]
        );
    }

    #[test]
    fn a_vms_rules_are_tagged_and_complete() {
        let r = rules();
        let s = vm_script(&r, &[]);
        assert_eq!(
            s.matches("comment \"banger:abc\"").count(),
            expected_rules(&r, 0)
        );
        assert!(
            s.contains("iifname \"bgtap0\" ip saddr != 172.30.0.6 drop"),
            "{s}"
        );
        assert!(s.contains("ip daddr 192.168.1.1 meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(s.contains("ip daddr 10.1.0.0/16 accept"));
        assert!(s.contains("169.254.0.0/16") && s.contains("172.16.0.0/12"));
        assert!(s.contains("oifname \"eth0\" accept"));
        assert!(s.contains("ip saddr 172.30.0.6 oifname != \"bgtap*\" masquerade"));
        // The allow and DNS accepts come before the block.
        assert!(s.find("10.1.0.0/16 accept").unwrap() < s.find("169.254.0.0/16").unwrap());

        let none = GuestRules {
            uplink: None,
            allow: vec![],
            dns: vec![],
            ..r.clone()
        };
        let s = vm_script(&none, &[]);
        assert!(
            !s.contains("oifname \"eth0\""),
            "--net none: no way out: {s}"
        );
        assert_eq!(s.matches("comment").count(), expected_rules(&none, 0));

        // A guest subnet outside the private ranges is blocked explicitly.
        let odd = GuestRules {
            guests: "198.19.0.0/16".parse().unwrap(),
            ..r.clone()
        };
        assert!(vm_script(&odd, &[]).contains("198.19.0.0/16"));

        let docker = ChainRef {
            family: "ip".into(),
            table: "filter".into(),
            chain: "FORWARD".into(),
        };
        let s = vm_script(&r, std::slice::from_ref(&docker));
        assert!(s.contains(
            "insert rule ip filter FORWARD iifname \"bgtap0\" accept comment \"banger:abc\""
        ));
        assert!(s.contains(
            "insert rule ip filter FORWARD oifname \"bgtap0\" accept comment \"banger:abc\""
        ));
        assert_eq!(
            s.matches("comment \"banger:abc\"").count(),
            expected_rules(&r, 1)
        );
        assert!(table_script(FORWARD_WAS_OFF).contains("comment \"banger: ip_forward was 0\""));
    }

    #[test]
    fn parses_the_ruleset() {
        let text = "table ip filter { # handle 3\n\
            \tset blocked { # handle 9\n\
            \t\ttype ipv4_addr\n\
            \t\telements = { 10.0.0.1, 10.0.0.2,\n\
            \t\t\t     10.0.0.3 }\n\
            \t}\n\
            \tchain FORWARD { # handle 1\n\
            \t\ttype filter hook forward priority filter; policy drop;\n\
            \t\tiifname \"bgtap0\" accept comment \"banger:abc\" # handle 12\n\
            \t\tcounter packets 0 bytes 0 jump DOCKER-USER # handle 4\n\
            \t}\n\
            }\n\
            table inet banger { # handle 5\n\
            \tcomment \"banger: ip_forward was 0\"\n\
            \tchain from_guest { # handle 2\n\
            \t\tmeta nfproto != ipv4 drop # handle 6\n\
            \t\tiifname \"bgtap0\" ip saddr != 172.30.0.6 drop comment \"banger:abc\" # handle 7\n\
            \t\tiifname \"bgtap1\" oifname \"up0\" accept comment \"banger:other\" # handle 8\n\
            \t}\n\
            \tchain postrouting { # handle 3\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t}\n\
            }\n\
            table ip nat { # handle 8\n\
            \tchain POSTROUTING { # handle 1\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t}\n\
            }\n";
        let rs = parse_ruleset(text);
        assert!(rs.table);
        assert_eq!(rs.comment.as_deref(), Some(FORWARD_WAS_OFF));
        let forward = ChainRef {
            family: "ip".into(),
            table: "filter".into(),
            chain: "FORWARD".into(),
        };
        assert_eq!(rs.dropping_forward, vec![forward.clone()]);
        assert_eq!(rs.other_forwarders.len(), 2, "{:?}", rs.other_forwarders);
        let mine = rs.tagged("abc");
        assert_eq!(mine.len(), 2);
        assert_eq!(mine[0], (forward, 12));
        assert_eq!(mine[1].1, 7);
        assert_eq!(rs.tagged("other").len(), 1);
        assert_eq!(rs.vm_rules_in_table(), 2);
        assert_eq!(rs.rules.len(), 5, "{:?}", rs.rules);
        assert_eq!(parse_ruleset(""), Ruleset::default());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a\"b").is_err());
        assert!(check_id("0af3-x").is_ok());
        assert!(check_id("a\" counter").is_err());
        assert!(check_id("").is_err());
    }
}
