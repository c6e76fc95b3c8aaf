//! Per-VM NAT in an nftables table of banger's own (`ip banger`), the way
//! Firecracker's network-setup guide keeps its rules apart: adding, checking
//! and deleting are idempotent, and nothing here can touch anyone else's
//! rules. Per VM: one POSTROUTING masquerade for the guest IP out of the
//! uplink, and two FORWARD accepts keyed off the tap. Shared by the daemon
//! and the hidden `banger internal nat up|down` helper.

use std::net::Ipv4Addr;

use thiserror::Error;

use crate::cmd::{self, CmdError};

pub const TABLE: &str = "banger";

/// An `nft` run takes milliseconds; one that hangs (a wedged netlink
/// socket) fails its request after this.
pub const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NatError {
    #[error("nat for {vm}: {source}")]
    Nft { vm: String, source: CmdError },
    #[error("nat for {vm}: cannot parse `nft -j` output: {detail}")]
    Parse { vm: String, detail: String },
    #[error("write /proc/sys/net/ipv4/ip_forward: {0}")]
    Forward(std::io::Error),
    #[error("the NAT worker thread panicked")]
    Thread,
    #[error("interface name {0:?} is not valid for a rule")]
    BadIfname(String),
    #[error("vm id {0:?} is not valid for a rule tag: use a-z, 0-9 and '-'")]
    BadId(String),
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

fn check_id(id: &str) -> Result<(), NatError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NatError::BadId(id.to_string()))
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

/// The comment banger's table carries when forwarding was off before it
/// existed, so that removing the last rule restores it.
const FORWARD_WAS_OFF: &str = "banger: ip_forward was 0";

/// The nft script that adds one VM's rules; with `create_table`, the table
/// and its chains too (with `table_comment`).
pub fn up_script(spec: &NatSpec, create_table: Option<&str>) -> String {
    let t = tag(&spec.vm_id);
    let mut s = String::new();
    if let Some(comment) = create_table {
        let c = if comment.is_empty() {
            String::new()
        } else {
            format!("\tcomment \"{comment}\"\n")
        };
        s.push_str(&format!(
            "table ip {TABLE} {{\n{c}\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             \tchain forward {{ type filter hook forward priority filter; policy accept; }}\n\
             }}\n"
        ));
    }
    s.push_str(&format!(
        "add rule ip {TABLE} postrouting ip saddr {ip} oifname \"{up}\" masquerade comment \"{t}\"\n\
         add rule ip {TABLE} forward iifname \"{tap}\" oifname \"{up}\" accept comment \"{t}\"\n\
         add rule ip {TABLE} forward iifname \"{up}\" oifname \"{tap}\" ct state established,related accept comment \"{t}\"\n",
        ip = spec.guest_ip,
        up = spec.uplink,
        tap = spec.tap,
    ));
    s
}

/// What banger's table holds: its comment and every rule as
/// (chain, handle, comment).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableState {
    pub comment: Option<String>,
    pub rules: Vec<(String, u64, Option<String>)>,
}

impl TableState {
    fn tagged(&self, vm_id: &str) -> Vec<(String, u64)> {
        let t = tag(vm_id);
        self.rules
            .iter()
            .filter(|r| r.2.as_deref() == Some(t.as_str()))
            .map(|r| (r.0.clone(), r.1))
            .collect()
    }
}

/// The table's state; `None` when the table does not exist. One `nft`
/// call: the text listing carries the rule handles and, unlike nft 1.0.6's
/// JSON, the table's comment.
fn table_state(vm_id: &str) -> Result<Option<TableState>, NatError> {
    match cmd::run_with(
        "nft",
        ["-a", "list", "table", "ip", TABLE],
        None,
        NFT_TIMEOUT,
    ) {
        Ok(text) => Ok(Some(parse_table(&text))),
        Err(CmdError::Failed { ref stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(source) => Err(NatError::Nft {
            vm: vm_id.to_string(),
            source,
        }),
    }
}

/// Parses `nft -a list table ip banger`.
pub fn parse_table(text: &str) -> TableState {
    let mut st = TableState::default();
    let mut chain: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.split_whitespace().next().map(str::to_string);
            continue;
        }
        if line.starts_with('}') {
            chain = None;
            continue;
        }
        let quoted = |l: &str| -> Option<String> {
            let i = l.find("comment \"")? + "comment \"".len();
            let j = l[i..].find('"')?;
            Some(l[i..i + j].to_string())
        };
        match (&chain, line.rsplit_once("# handle ")) {
            (Some(c), Some((body, h))) => {
                if let Ok(handle) = h.trim().parse::<u64>() {
                    st.rules.push((c.clone(), handle, quoted(body)));
                }
            }
            (None, None) if line.starts_with("comment \"") => st.comment = quoted(line),
            _ => {}
        }
    }
    st
}

fn nft(vm_id: &str, script: &str) -> Result<(), NatError> {
    cmd::run_with("nft", ["-f", "-"], Some(script), NFT_TIMEOUT).map_err(|source| {
        NatError::Nft {
            vm: vm_id.to_string(),
            source,
        }
    })?;
    Ok(())
}

/// Installs the VM's rules unless they are there already; enables
/// forwarding (remembering in the table's comment that it was off).
/// Callers serialise `up` and `down`.
pub fn up(spec: &NatSpec) -> Result<(), NatError> {
    check_id(&spec.vm_id)?;
    check_ifname(&spec.tap)?;
    check_ifname(&spec.uplink)?;
    let state = table_state(&spec.vm_id)?;
    if let Some(st) = &state {
        if st.tagged(&spec.vm_id).len() == 3 {
            // (A crash may have come between the rules and forwarding.)
            return enable_ip_forward();
        }
        // A partial set (a crash mid-way) is replaced whole.
        delete_rules(&spec.vm_id, &st.tagged(&spec.vm_id))?;
    }
    let create = if state.is_none() {
        let was_off = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map(|v| v.trim() == "0")
            .unwrap_or(false);
        Some(if was_off { FORWARD_WAS_OFF } else { "" })
    } else {
        None
    };
    nft(&spec.vm_id, &up_script(spec, create))?;
    enable_ip_forward()
}

fn delete_rules(vm_id: &str, rules: &[(String, u64)]) -> Result<(), NatError> {
    if rules.is_empty() {
        return Ok(());
    }
    let script: String = rules
        .iter()
        .map(|(chain, h)| format!("delete rule ip {TABLE} {chain} handle {h}\n"))
        .collect();
    nft(vm_id, &script)
}

/// Removes every rule tagged for the VM; none left is success. When no rule
/// of any VM remains, the table goes too and forwarding is switched back
/// off if banger switched it on.
pub fn down(vm_id: &str) -> Result<(), NatError> {
    check_id(vm_id)?;
    let Some(st) = table_state(vm_id)? else {
        return Ok(());
    };
    let mine = st.tagged(vm_id);
    let last = st.rules.len() == mine.len();
    if last {
        // Forwarding first: the table's comment is the only record that it
        // was off, so a crash between the two steps must leave the table
        // (the next `down` finishes) rather than forwarding on.
        if st.comment.as_deref() == Some(FORWARD_WAS_OFF) {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").map_err(NatError::Forward)?;
        }
        // Deleting the table takes its chains and rules along: one call.
        nft(vm_id, &format!("delete table ip {TABLE}\n"))?;
    } else {
        delete_rules(vm_id, &mine)?;
    }
    Ok(())
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
        let spec = NatSpec {
            vm_id: "abc".into(),
            tap: "bgtap0".into(),
            guest_ip: Ipv4Addr::new(172, 30, 0, 6),
            uplink: "eth0".into(),
        };
        assert!(!up_script(&spec, None).contains("table ip"));
        let s = up_script(&spec, Some(FORWARD_WAS_OFF));
        assert!(s.contains("comment \"banger: ip_forward was 0\""), "{s}");
        assert_eq!(s.matches("comment \"banger:abc\"").count(), 3);
        assert!(s.contains("ip saddr 172.30.0.6 oifname \"eth0\" masquerade"));
        assert!(s.contains("iifname \"bgtap0\" oifname \"eth0\" accept"));
    }

    #[test]
    fn parses_the_table_listing() {
        let text = "table ip banger { # handle 5\n\
            \tcomment \"banger: ip_forward was 0\"\n\
            \tchain postrouting { # handle 1\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t\tip saddr 172.30.0.6 oifname \"up0\" masquerade comment \"banger:abc\" # handle 3\n\
            \t}\n\
            \tchain forward { # handle 2\n\
            \t\ttype filter hook forward priority filter; policy accept;\n\
            \t\tiifname \"bgtap0\" oifname \"up0\" accept comment \"banger:abc\" # handle 7\n\
            \t\tiifname \"bgtap1\" oifname \"up0\" accept comment \"banger:other\" # handle 8\n\
            \t\tiifname \"x\" accept # handle 9\n\
            \t}\n\
            }\n";
        let st = parse_table(text);
        assert_eq!(st.comment.as_deref(), Some(FORWARD_WAS_OFF));
        assert_eq!(st.rules.len(), 4);
        assert_eq!(
            st.tagged("abc"),
            vec![("postrouting".into(), 3), ("forward".into(), 7)]
        );
        assert_eq!(st.tagged("other"), vec![("forward".into(), 8)]);
        assert_eq!(parse_table(""), TableState::default());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a\"b").is_err());
        assert!(check_id("0af3-x").is_ok());
        assert!(check_id("a\" counter").is_err());
        assert!(check_id("").is_err());
        assert!(check_ifname("").is_err());
    }
}
