//! Per-VM NAT in an nftables table of banger's own (`ip banger`), the way
//! Firecracker's network-setup guide keeps its rules apart: adding, checking
//! and deleting are idempotent, and nothing here can touch anyone else's
//! rules. Per VM: one POSTROUTING masquerade for the guest IP out of the
//! uplink, and two FORWARD accepts keyed off the tap. Shared by the daemon
//! and the hidden `banger internal nat up|down` helper.

use std::net::Ipv4Addr;

use serde_json::Value;
use thiserror::Error;

use crate::cmd::{self, CmdError};

pub const TABLE: &str = "banger";

#[derive(Debug, Error)]
pub enum NatError {
    #[error("nat for {vm}: {source}")]
    Nft { vm: String, source: CmdError },
    #[error("nat for {vm}: cannot parse `nft -j` output: {detail}")]
    Parse { vm: String, detail: String },
    #[error("enable ip_forward: {0}")]
    Forward(std::io::Error),
    #[error("interface name {0:?} is not valid for a rule")]
    BadIfname(String),
}

/// What one VM's rules are keyed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSpec {
    /// The comment tag on the rules: `banger:<vm id>`.
    pub vm_id: String,
    pub tap: String,
    pub guest_ip: Ipv4Addr,
    pub uplink: String,
}

fn check_ifname(n: &str) -> Result<(), NatError> {
    let ok = !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NatError::BadIfname(n.to_string()))
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

pub fn enable_ip_forward() -> Result<(), NatError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NatError::Forward)
}

/// The nft script that adds one VM's rules (and the table, if missing).
pub fn up_script(spec: &NatSpec) -> String {
    let t = tag(&spec.vm_id);
    format!(
        "table ip {TABLE} {{\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         \tchain forward {{ type filter hook forward priority filter; policy accept; }}\n\
         }}\n\
         add rule ip {TABLE} postrouting ip saddr {ip} oifname \"{up}\" masquerade comment \"{t}\"\n\
         add rule ip {TABLE} forward iifname \"{tap}\" oifname \"{up}\" accept comment \"{t}\"\n\
         add rule ip {TABLE} forward iifname \"{up}\" oifname \"{tap}\" ct state established,related accept comment \"{t}\"\n",
        ip = spec.guest_ip,
        up = spec.uplink,
        tap = spec.tap,
    )
}

/// Handles of the rules tagged for `vm_id`, as (chain, handle).
fn tagged_rules(vm_id: &str) -> Result<Vec<(String, u64)>, NatError> {
    let out = match cmd::run("nft", ["-j", "-a", "list", "table", "ip", TABLE]) {
        Ok(o) => o,
        // No table: no rules.
        Err(CmdError::Failed { ref stderr, .. }) if stderr.contains("No such file") => {
            return Ok(Vec::new())
        }
        Err(source) => {
            return Err(NatError::Nft {
                vm: vm_id.to_string(),
                source,
            })
        }
    };
    parse_tagged(&out, &tag(vm_id)).map_err(|detail| NatError::Parse {
        vm: vm_id.to_string(),
        detail,
    })
}

pub fn parse_tagged(json: &str, tag: &str) -> Result<Vec<(String, u64)>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no nftables array")?;
    Ok(items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r.get("comment").and_then(Value::as_str) == Some(tag))
        .filter_map(|r| {
            Some((
                r.get("chain")?.as_str()?.to_string(),
                r.get("handle")?.as_u64()?,
            ))
        })
        .collect())
}

/// Installs the VM's rules unless they are there already; enables forwarding.
pub fn up(spec: &NatSpec) -> Result<(), NatError> {
    check_ifname(&spec.tap)?;
    check_ifname(&spec.uplink)?;
    enable_ip_forward()?;
    if tagged_rules(&spec.vm_id)?.len() == 3 {
        return Ok(());
    }
    // A partial set (a crash mid-way) is replaced whole.
    down(&spec.vm_id)?;
    cmd::run_with_input("nft", ["-f", "-"], Some(&up_script(spec))).map_err(|source| {
        NatError::Nft {
            vm: spec.vm_id.clone(),
            source,
        }
    })?;
    Ok(())
}

/// Removes every rule tagged for the VM; none left is success.
pub fn down(vm_id: &str) -> Result<(), NatError> {
    let rules = tagged_rules(vm_id)?;
    if rules.is_empty() {
        return Ok(());
    }
    let script: String = rules
        .iter()
        .map(|(chain, h)| format!("delete rule ip {TABLE} {chain} handle {h}\n"))
        .collect();
    cmd::run_with_input("nft", ["-f", "-"], Some(&script)).map_err(|source| NatError::Nft {
        vm: vm_id.to_string(),
        source,
    })?;
    Ok(())
}

/// Number of rules currently tagged for the VM (for tests and doctor).
pub fn rule_count(vm_id: &str) -> Result<usize, NatError> {
    Ok(tagged_rules(vm_id)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_default_route() {
        let routes = "Iface\tDestination\tGateway \tFlags\n\
                      veth0\t0000A8C0\t00000000\t0001\n\
                      up0\t00000000\t0100A8C0\t0003\n";
        assert_eq!(parse_default_route(routes), Some("up0".into()));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    }

    #[test]
    fn script_is_keyed_by_tag() {
        let s = up_script(&NatSpec {
            vm_id: "abc".into(),
            tap: "bgtap0".into(),
            guest_ip: Ipv4Addr::new(172, 30, 0, 6),
            uplink: "eth0".into(),
        });
        assert_eq!(s.matches("comment \"banger:abc\"").count(), 3);
        assert!(s.contains("ip saddr 172.30.0.6 oifname \"eth0\" masquerade"));
        assert!(s.contains("iifname \"bgtap0\" oifname \"eth0\" accept"));
    }

    #[test]
    fn parses_tagged_rules() {
        let j = r#"{"nftables":[{"metainfo":{}},{"table":{"name":"banger"}},
            {"rule":{"chain":"forward","handle":7,"comment":"banger:abc"}},
            {"rule":{"chain":"forward","handle":8,"comment":"banger:other"}},
            {"rule":{"chain":"postrouting","handle":9,"comment":"banger:abc"}}]}"#;
        assert_eq!(
            parse_tagged(j, "banger:abc").unwrap(),
            vec![("forward".into(), 7), ("postrouting".into(), 9)]
        );
        assert!(parse_tagged("{}", "x").is_err());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a\"b").is_err());
        assert!(check_ifname("").is_err());
    }
}
