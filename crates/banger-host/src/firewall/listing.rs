//! Reading what the host shows: routes (`/proc/net/route`) and nftables
//! listings (`nft list chains`, a chain's rules, a set's elements). Only
//! what banger needs is read; everything else of a listing is skipped.

use std::net::Ipv4Addr;

use banger_core::net::Cidr;

use super::TABLE;

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

/// A chain in the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRef {
    pub family: String,
    pub table: String,
    pub chain: String,
}

impl std::fmt::Display for ChainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.chain)
    }
}

/// The base chains of the ruleset (`nft list chains`: no rules, no set
/// elements, so its size does not grow with the VMs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chains {
    /// Whether banger's table exists.
    pub table: bool,
    /// Other tables' base chains hooked at forward with policy drop.
    pub dropping_forward: Vec<ChainRef>,
    /// Other tables' base chains that forward or NAT (someone else relies
    /// on ip_forward).
    pub other_forwarders: Vec<ChainRef>,
}

/// Parses `nft list chains` (or a whole ruleset listing: rules and set
/// contents are skipped).
pub fn parse_chains(text: &str) -> Chains {
    let mut cs = Chains::default();
    let mut depth = 0usize;
    let mut table: Option<(String, String)> = None;
    let mut chain: Option<ChainRef> = None;
    for raw in text.lines() {
        let line = raw.trim();
        // Braces in a comment do not count.
        let code = match line.find('"') {
            Some(i) => &line[..i],
            None => line,
        };
        let (opens, closes) = (code.matches('{').count(), code.matches('}').count());
        match depth {
            0 => {
                if let Some(rest) = line.strip_prefix("table ") {
                    let mut w = rest.split_whitespace();
                    if let (Some(f), Some(n)) = (w.next(), w.next()) {
                        table = Some((f.to_string(), n.to_string()));
                        cs.table |= f == "inet" && n == TABLE;
                    }
                }
            }
            1 => {
                if let (Some(rest), Some((f, t))) = (line.strip_prefix("chain "), &table) {
                    chain = rest.split_whitespace().next().map(|c| ChainRef {
                        family: f.clone(),
                        table: t.clone(),
                        chain: c.to_string(),
                    });
                }
            }
            2 => {
                if let Some(c) = chain
                    .as_ref()
                    .filter(|c| !(c.family == "inet" && c.table == TABLE))
                {
                    if line.starts_with("type ") {
                        let hook = line.split_whitespace().skip_while(|w| *w != "hook").nth(1);
                        if hook == Some("forward") && line.contains("policy drop") {
                            cs.dropping_forward.push(c.clone());
                        }
                        if hook == Some("forward") || line.starts_with("type nat") {
                            cs.other_forwarders.push(c.clone());
                        }
                    }
                }
            }
            _ => {}
        }
        depth = (depth + opens).saturating_sub(closes);
        if depth < 2 {
            chain = None;
        }
        if depth == 0 {
            table = None;
        }
    }
    cs
}

/// The handles of the rules in one chain listing (`nft -a list chain`)
/// whose comment is exactly `tag`.
pub fn tagged_handles(listing: &str, tag: &str) -> Vec<u64> {
    let want = format!("comment \"{tag}\"");
    listing
        .lines()
        .filter_map(|l| {
            let (body, h) = l.rsplit_once("# handle ")?;
            body.contains(&want)
                .then(|| h.trim().parse().ok())
                .flatten()
        })
        .collect()
}

/// The (tap, address) elements of a `nft list set ... guests` listing.
pub fn parse_guests(text: &str) -> Vec<(String, Ipv4Addr)> {
    let Some(i) = text.find("elements = {") else {
        return Vec::new();
    };
    let rest = &text[i + "elements = {".len()..];
    let body = &rest[..rest.find('}').unwrap_or(rest.len())];
    body.split(',')
        .filter_map(|e| {
            let (tap, ip) = e.split_once(" . ")?;
            Some((
                tap.trim().trim_matches('"').to_string(),
                ip.trim().parse().ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_chains_elements_and_tagged_rules() {
        let text = "table ip filter {\n\
            \tchain FORWARD {\n\
            \t\ttype filter hook forward priority filter; policy drop;\n\
            \t}\n\
            }\n\
            table inet banger {\n\
            \tchain from_guest {\n\
            \t}\n\
            \tchain postrouting {\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t}\n\
            }\n\
            table ip nat {\n\
            \tchain POSTROUTING {\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t}\n\
            }\n";
        let cs = parse_chains(text);
        assert!(cs.table);
        assert_eq!(cs.dropping_forward.len(), 1);
        assert_eq!(cs.dropping_forward[0].to_string(), "ip filter FORWARD");
        assert_eq!(cs.other_forwarders.len(), 2, "{:?}", cs.other_forwarders);
        assert_eq!(parse_chains(""), Chains::default());

        let set = "table inet banger {\n\tset guests {\n\t\ttype ifname . ipv4_addr\n\
                   \t\telements = { \"bgtap0\" . 172.30.0.6,\n\t\t\t     \"bgtap1\" . 172.30.0.10 }\n\t}\n}\n";
        assert_eq!(
            parse_guests(set),
            vec![
                ("bgtap0".to_string(), Ipv4Addr::new(172, 30, 0, 6)),
                ("bgtap1".to_string(), Ipv4Addr::new(172, 30, 0, 10))
            ]
        );
        assert!(
            parse_guests("table inet banger { set guests { type ifname . ipv4_addr } }").is_empty()
        );

        let chain = "table ip filter {\n\tchain FORWARD { # handle 1\n\
            \t\toifname \"bgtap*\" accept comment \"banger\" # handle 9\n\
            \t\tiifname \"bgtap*\" accept comment \"banger\" # handle 8\n\
            \t\tcounter packets 0 bytes 0 jump DOCKER-USER # handle 4\n\
            \t\taccept comment \"bangers and mash\" # handle 5\n\t}\n}\n";
        assert_eq!(tagged_handles(chain, "banger"), vec![9, 8]);
    }
}
