//! `banger dns install|uninstall`: routes the host's `<name>.vm` lookups
//! to banger's DNS. With systemd-resolved, a drop-in gives 127.0.0.153 the
//! routing domain `~vm` (only those names go there); with
//! NetworkManager's dnsmasq, a `server=/vm/...` line does the same. A host
//! with neither is told how, and that `banger ssh-config` needs none of it.
//! `--root` writes under another root (packaging, tests) and reloads
//! nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

const RESOLVED_DROPIN: &str = "etc/systemd/resolved.conf.d/banger.conf";
const NM_DNSMASQ: &str = "etc/NetworkManager/dnsmasq.d/banger.conf";

/// Which of the host's resolvers takes the route.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolver {
    Resolved,
    NetworkManagerDnsmasq,
}

pub fn detect(root: &Path) -> Option<Resolver> {
    if root.join("run/systemd/resolve").is_dir() {
        Some(Resolver::Resolved)
    } else if root.join("etc/NetworkManager/dnsmasq.d").is_dir() {
        Some(Resolver::NetworkManagerDnsmasq)
    } else {
        None
    }
}

fn check_value(what: &str, v: &str) -> anyhow::Result<()> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
    {
        bail!("{what} {v:?} cannot go into a resolver's configuration");
    }
    Ok(())
}

/// The file written for `resolver`, and its text.
pub fn config(
    resolver: &Resolver,
    suffix: &str,
    listen: &str,
) -> anyhow::Result<(PathBuf, String)> {
    check_value("the DNS suffix", suffix)?;
    check_value("the DNS address", listen)?;
    let (ip, port) = listen
        .rsplit_once(':')
        .context("the daemon's DNS address has no port")?;
    Ok(match resolver {
        Resolver::Resolved => (
            PathBuf::from(RESOLVED_DROPIN),
            format!(
                "# Written by `banger dns install`; `banger dns uninstall` removes it.\n\
                 [Resolve]\nDNS={ip}:{port}\nDomains=~{suffix}\n"
            ),
        ),
        Resolver::NetworkManagerDnsmasq => (
            PathBuf::from(NM_DNSMASQ),
            format!(
                "# Written by `banger dns install`; `banger dns uninstall` removes it.\n\
                 server=/{suffix}/{ip}#{port}\n"
            ),
        ),
    })
}

fn reload(resolver: &Resolver) -> anyhow::Result<()> {
    let (prog, args): (&str, &[&str]) = match resolver {
        Resolver::Resolved => ("systemctl", &["try-reload-or-restart", "systemd-resolved"]),
        Resolver::NetworkManagerDnsmasq => ("nmcli", &["general", "reload"]),
    };
    let st = Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("run {prog}"))?;
    if !st.success() {
        bail!("`{prog} {}` failed ({st})", args.join(" "));
    }
    Ok(())
}

pub fn install(root: &Path, suffix: &str, listen: &str) -> anyhow::Result<PathBuf> {
    let Some(r) = detect(root) else {
        bail!(
            "neither systemd-resolved nor NetworkManager's dnsmasq runs here, so there is no \
             per-domain route to add: point a resolver of yours at {listen} for *.{suffix}, or \
             use `banger ssh-config` (ssh NAME.{suffix} needs no DNS)"
        );
    };
    let (rel, text) = config(&r, suffix, listen)?;
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    if root == Path::new("/") {
        reload(&r)?;
    }
    Ok(path)
}

pub fn uninstall(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (rel, r) in [
        (RESOLVED_DROPIN, Resolver::Resolved),
        (NM_DNSMASQ, Resolver::NetworkManagerDnsmasq),
    ] {
        let path = root.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if root == Path::new("/") {
                    reload(&r)?;
                }
                removed.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_route_for_the_resolver_there_is() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let e = install(root, "vm", "127.0.0.153:53")
            .unwrap_err()
            .to_string();
        assert!(e.contains("banger ssh-config"), "{e}");
        std::fs::create_dir_all(root.join("run/systemd/resolve")).unwrap();
        let p = install(root, "vm", "127.0.0.153:53").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("DNS=127.0.0.153:53\nDomains=~vm\n"), "{text}");
        assert_eq!(uninstall(root).unwrap(), vec![p.clone()]);
        assert!(!p.exists());
        assert!(uninstall(root).unwrap().is_empty());
        let (_, nm) = config(&Resolver::NetworkManagerDnsmasq, "vm", "127.0.0.153:53").unwrap();
        assert!(nm.contains("server=/vm/127.0.0.153#53"), "{nm}");
        assert!(config(&Resolver::Resolved, "vm\nDNS=1.2.3.4", "127.0.0.153:53").is_err());
    }
}
