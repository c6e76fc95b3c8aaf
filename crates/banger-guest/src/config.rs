//! The per-VM config archive: a small cpio appended to the image's shared
//! initramfs (the kernel unpacks concatenated archives in order). It carries
//! what differs per VM: hostname, addresses, DNS, the client's public key and
//! the guest's host key. Nothing is written into the root disk by the host.

use std::net::Ipv4Addr;

use crate::cpio::Archive;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Already validated as a DNS label.
    pub hostname: String,
    pub guest_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub nameservers: Vec<Ipv4Addr>,
    pub authorized_keys: String,
    pub host_key: String,
    pub host_key_pub: String,
    /// Echoed back in the agent's hello so a stale one never counts.
    pub boot_id: String,
    /// The root disk is larger than its filesystem (`--root-size`).
    pub grow_root: bool,
    /// Named volumes: (block device, mount path), both validated
    /// (`banger_core::volume`): nothing in them needs quoting.
    pub volumes: Vec<(String, String)>,
    /// The overlay root's upper disk (`vdX`), if the root is an overlay of
    /// the read-only image on /dev/vda.
    pub root_upper: Option<String>,
    /// virtio-fs mounts: (tag, mount path, read-only), all validated
    /// (`banger_core::mount`).
    pub mounts: Vec<(String, String, bool)>,
}

impl GuestConfig {
    /// `/banger/env`, sourced by the initramfs' /init. Every value is a
    /// validated name, an address or hex, so nothing needs quoting beyond
    /// the single quotes.
    pub fn env_file(&self) -> String {
        let volumes: Vec<String> = self
            .volumes
            .iter()
            .map(|(dev, path)| format!("{dev}:{path}"))
            .collect();
        let mounts: Vec<String> = self
            .mounts
            .iter()
            .map(|(tag, path, ro)| format!("{tag}:{path}:{}", if *ro { "ro" } else { "rw" }))
            .collect();
        format!(
            "HOSTNAME='{}'\nIP='{}'\nPREFIX='{}'\nGW='{}'\nMAC='{}'\nBOOT_ID='{}'\nVOLUMES='{}'\nGROW_ROOT='{}'\nROOT_UPPER='{}'\nMOUNTS='{}'\n",
            self.hostname,
            self.guest_ip,
            self.prefix,
            self.gateway,
            self.mac,
            self.boot_id,
            volumes.join(" "),
            u8::from(self.grow_root),
            self.root_upper.as_deref().unwrap_or(""),
            mounts.join(" ")
        )
    }

    pub fn resolv_conf(&self) -> String {
        if self.nameservers.is_empty() {
            // The host end of the link: nothing answers there yet, but
            // resolvers fail fast instead of timing out on a missing file.
            return format!("nameserver {}\n", self.gateway);
        }
        self.nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect()
    }

    pub fn archive(&self) -> Vec<u8> {
        let mut a = Archive::new();
        a.dir("banger")
            .file("banger/env", 0o644, self.env_file().as_bytes())
            .file("banger/resolv.conf", 0o644, self.resolv_conf().as_bytes())
            .file(
                "banger/authorized_keys",
                0o600,
                self.authorized_keys.as_bytes(),
            )
            .file(
                "banger/ssh_host_ed25519_key",
                0o600,
                self.host_key.as_bytes(),
            )
            .file(
                "banger/ssh_host_ed25519_key.pub",
                0o644,
                self.host_key_pub.as_bytes(),
            );
        a.finish()
    }
}

/// The archive that carries the guest agent (a static binary) into every
/// VM's initramfs, as `/banger/agent`; built once per daemon.
pub fn agent_archive(agent: &[u8]) -> Vec<u8> {
    let mut a = Archive::new();
    a.dir("banger").file("banger/agent", 0o755, agent);
    a.finish()
}

/// Nameservers from a resolv.conf that a guest can reach: loopback resolvers
/// (systemd-resolved's 127.0.0.53) are host-local, so they are dropped.
pub fn guest_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuestConfig {
        GuestConfig {
            hostname: "hello".into(),
            guest_ip: Ipv4Addr::new(172, 30, 0, 6),
            gateway: Ipv4Addr::new(172, 30, 0, 5),
            prefix: 30,
            mac: "06:00:ac:1e:00:06".into(),
            nameservers: vec![],
            authorized_keys: "ssh-ed25519 AAAA banger\n".into(),
            host_key: "PRIVATE".into(),
            host_key_pub: "ssh-ed25519 BBBB host".into(),
            boot_id: "00ff".into(),
            volumes: vec![("vdc".into(), "/srv/data".into())],
            grow_root: false,
            root_upper: Some("vdd".into()),
            mounts: vec![("banger0".into(), "/src".into(), true)],
        }
    }

    #[test]
    fn env_and_resolv() {
        let c = cfg();
        let env = c.env_file();
        assert!(env.contains("HOSTNAME='hello'\n"));
        assert!(env.contains("IP='172.30.0.6'\n"));
        assert!(env.contains("GW='172.30.0.5'\n"));
        assert!(env.contains("VOLUMES='vdc:/srv/data'\n"));
        assert!(env.contains("MOUNTS='banger0:/src:ro'\n"));
        assert!(env.contains("ROOT_UPPER='vdd'\n"));
        assert_eq!(c.resolv_conf(), "nameserver 172.30.0.5\n");
        let ns = guest_nameservers("# x\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nsearch lan\n");
        assert_eq!(ns, vec![Ipv4Addr::new(10, 1, 2, 3)]);
        let c = GuestConfig {
            nameservers: ns,
            ..c
        };
        assert_eq!(c.resolv_conf(), "nameserver 10.1.2.3\n");
        let a = c.archive();
        assert!(a.windows(10).any(|w| w == b"banger/env"));
    }
}
