//! `banger doctor`: what this host can do, and what is missing.

use banger_core::api::Check;
use banger_guest::image::{self, Recipe, DEFAULT_IMAGE};
use banger_host::{cmd, firewall, sysinfo};

use crate::daemon::{human_mib, Daemon};
use crate::server::check;

pub fn checks(d: &Daemon) -> Vec<Check> {
    let mut v = Vec::new();
    let kvm = sysinfo::kvm_status();
    v.push(check("kvm", kvm.usable, kvm.detail));
    match d.select_vmm(None) {
        Ok((vmm, accel)) => v.push(check("vmm", true, format!("{vmm} ({accel})"))),
        Err(e) => v.push(check("vmm", false, e.to_string())),
    }
    v.push(root_disk_check(d));
    v.push(check(
        "firecracker",
        d.cfg.firecracker.is_some() && kvm.usable,
        match (&d.cfg.firecracker, kvm.usable) {
            (Some(p), true) => format!("{}: the default VMM", p.display()),
            (Some(p), false) => format!(
                "{}: no usable KVM, so only with --vmm firecracker",
                p.display()
            ),
            (None, _) => "no firecracker binary (PATH or BANGER_FIRECRACKER); QEMU is used".into(),
        },
    ));
    for tool in [
        "qemu-system-x86_64",
        "mkfs.ext4",
        "nft",
        "ssh",
        "mmdebstrap",
    ] {
        let p = cmd::which(tool);
        v.push(check(
            tool,
            p.is_some(),
            p.map(|p| p.display().to_string())
                .unwrap_or_else(|| "missing: run scripts/install-deps.sh".into()),
        ));
    }
    let tun = std::path::Path::new("/dev/net/tun");
    v.push(check(
        "tun",
        tun.exists(),
        if tun.exists() {
            "/dev/net/tun".to_string()
        } else {
            "/dev/net/tun missing: modprobe tun".to_string()
        },
    ));
    v.push(check(
        "virtiofsd",
        d.cfg.virtiofsd.is_some(),
        match &d.cfg.virtiofsd {
            Some(p) => format!("{} (--mount, QEMU)", p.display()),
            None => "missing (only --mount needs it): run scripts/install-deps.sh".into(),
        },
    ));
    let bb = std::path::Path::new("/bin/busybox");
    v.push(check(
        "busybox-static",
        bb.exists(),
        if bb.exists() {
            "/bin/busybox".to_string()
        } else {
            "missing: apt-get install busybox-static".to_string()
        },
    ));
    v.push(check(
        "tun",
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun",
    ));
    match firewall::default_uplink() {
        Some(u) => v.push(check("uplink", true, format!("default route via {u}"))),
        None => v.push(check(
            "uplink",
            false,
            "no default route: guests get no outbound network",
        )),
    }
    let guests = d.cfg.subnet.cidr();
    let overlapping: Vec<String> = firewall::routes()
        .into_iter()
        .filter(|(net, dev)| !dev.starts_with("bgtap") && net.overlaps(&guests))
        .map(|(net, dev)| format!("{net} on {dev}"))
        .collect();
    v.push(check(
        "guest subnet",
        overlapping.is_empty(),
        if overlapping.is_empty() {
            format!("{guests}: no host route overlaps it")
        } else {
            format!(
                "{guests} overlaps the host's route(s) {} (Docker's pools cover 172.16.0.0/12): \
                 start bangerd with --subnet (or BANGER_SUBNET) set to a free range",
                overlapping.join(", ")
            )
        },
    ));
    match cmd::run_with("nft", ["list", "chains"], None, firewall::NFT_TIMEOUT) {
        Ok(out) => {
            let rs = firewall::parse_chains(&out);
            let dropping: Vec<String> = rs.dropping_forward.iter().map(|c| c.to_string()).collect();
            v.push(check(
                "host firewall",
                true,
                if dropping.is_empty() {
                    "no forward chain drops by policy".to_string()
                } else {
                    format!(
                        "{} drop forwarded traffic by policy (Docker does): banger adds two \
                         accepts for its taps at their top, tagged banger",
                        dropping.join(", ")
                    )
                },
            ));
        }
        Err(_) => v.push(check(
            "host firewall",
            false,
            "cannot list the nftables ruleset: run scripts/install-deps.sh (nftables)",
        )),
    }
    v.push(host_dns_check(d));
    let host = sysinfo::host_resources(&d.cfg.layout.state_dir);
    let s = banger_core::sizing::default_sizing(&host);
    v.push(check(
        "sizing",
        true,
        format!(
            "host {} cores, {} MiB, {} free -> default VM {} vCPU, {} MiB, {} disk",
            host.cores,
            host.memory_mib,
            human_mib(host.free_disk_mib),
            s.cpus,
            s.memory_mib,
            human_mib(s.disk_mib)
        ),
    ));
    let image = d.store().image(DEFAULT_IMAGE);
    match image {
        Ok(Some(img)) => {
            let current =
                Recipe::default_for(DEFAULT_IMAGE).is_some_and(|r| image::is_current(&img.dir, &r));
            v.push(check(
                "image",
                current,
                if current {
                    format!("{DEFAULT_IMAGE}: kernel {}", img.kernel_version)
                } else {
                    format!(
                        "{DEFAULT_IMAGE} was built by another version of banger: \
                         `banger image build --force` rebuilds it"
                    )
                },
            ))
        }
        _ => v.push(check(
            "image",
            false,
            format!("{DEFAULT_IMAGE} not built: run `banger image build`"),
        )),
    }
    v
}

/// Whether the host's own resolver sends `.vm` names to banger: resolves
/// `_banger.<suffix>` (which only banger answers) through getaddrinfo, on
/// a thread, for at most 3 seconds.
fn host_dns_check(d: &Daemon) -> Check {
    let suffix = d.cfg.dns_suffix.clone();
    let Some(listen) = d.cfg.dns_listen else {
        return check(
            "host dns",
            false,
            "banger's DNS is not offered to the host (--dns-listen off); `banger ssh-config` still works",
        );
    };
    let name = format!("{}.{suffix}", crate::dns::CHECK_LABEL);
    let (tx, rx) = std::sync::mpsc::channel();
    let n = name.clone();
    std::thread::spawn(move || {
        use std::net::ToSocketAddrs;
        let _ = tx.send(
            (n.as_str(), 0)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>()),
        );
    });
    let resolved = rx.recv_timeout(std::time::Duration::from_secs(3));
    match resolved {
        Ok(Ok(addrs)) if addrs.iter().any(|a| a.ip() == listen.ip()) => check(
            "host dns",
            true,
            format!("the host resolves <name>.{suffix} through banger ({listen})"),
        ),
        _ => check(
            "host dns",
            false,
            format!(
                "the host does not resolve <name>.{suffix}: `banger dns install` routes them to \
                 banger ({listen}); `ssh NAME.{suffix}` works without it through `banger ssh-config`"
            ),
        ),
    }
}

/// Which root-disk strategy new VMs get on each VMM, and why.
fn root_disk_check(d: &Daemon) -> Check {
    use crate::resources::root_disk;
    let host = d.host_disks();
    let mut parts = Vec::new();
    let mut ok = true;
    let default_vmm = d.select_vmm(None).ok().map(|v| v.0);
    for vmm in [
        banger_core::VmmKind::Qemu,
        banger_core::VmmKind::Firecracker,
    ] {
        match d.cfg.root_disk {
            Some(k) => match root_disk::usable(k, vmm, host) {
                Ok(()) => parts.push(format!("{vmm}: {k} (forced)")),
                Err(e) => {
                    // A strategy only the other VMM cannot take is fine.
                    ok &= default_vmm != Some(vmm);
                    parts.push(format!("{vmm}: {e}"));
                }
            },
            None => parts.push(format!("{vmm}: {}", root_disk::best(vmm, host))),
        }
    }
    parts.push(format!(
        "device-mapper {}, reflinks in the state dir {}",
        if host.device_mapper { "yes" } else { "no" },
        if host.reflink { "yes" } else { "no" }
    ));
    check("root-disk", ok, parts.join("; "))
}
