//! `banger doctor`: what this host can do, and what is missing.

use banger_core::api::Check;
use banger_guest::image::{self, Recipe, DEFAULT_IMAGE};
use banger_host::{cmd, firewall, sysinfo};

use crate::daemon::{human_mib, Daemon};

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
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("nft", "nftables"),
        ("ssh", "openssh-client"),
        ("mmdebstrap", "mmdebstrap"),
    ] {
        let p = cmd::which(tool);
        v.push(check_fix(
            tool,
            p.is_some(),
            p.map(|p| p.display().to_string())
                .unwrap_or_else(|| "missing".into()),
            format!("apt-get install {package}"),
        ));
    }
    v.push(check_fix(
        "vhost-device-vsock",
        d.cfg.vsock_backend.is_some(),
        match &d.cfg.vsock_backend {
            Some(p) => format!(
                "{} (QEMU's vsock, for images without the virtio-serial driver)",
                p.display()
            ),
            None => "missing: QEMU guests of images without the virtio-serial driver get no agent"
                .into(),
        },
        "cargo install --locked vhost-device-vsock --root /usr/local",
    ));
    v.push(check_fix(
        "banger-vport",
        d.cfg.vport.is_some(),
        match &d.cfg.vport {
            Some(p) => format!(
                "{} (QEMU's agent channel on a virtio-serial port)",
                p.display()
            ),
            None => "missing: QEMU guests use a vsock device, and cannot be snapshotted".into(),
        },
        "./scripts/setup.sh (the package ships it in /usr/lib/banger)",
    ));
    // Snapshot-able QEMU VMs keep their RAM there (`resources::ram`).
    let ram_dir = d
        .cfg
        .ram_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    let free_mib = nix::sys::statvfs::statvfs(ram_dir)
        .map(|s| (s.blocks_available() * s.fragment_size()) >> 20)
        .unwrap_or(0);
    v.push(check_fix(
        "ram dir",
        free_mib >= 1280,
        format!(
            "{}: {free_mib} MiB free for snapshot-able VMs' RAM (a VM whose memory does not fit \
             boots without a RAM file, and cannot be snapshotted)",
            d.cfg.ram_dir.display()
        ),
        "mount -o remount,size=75% /dev/shm (or BANGER_RAM_DIR=another tmpfs)",
    ));
    let tun = std::path::Path::new("/dev/net/tun");
    v.push(check_fix(
        "tun",
        tun.exists(),
        if tun.exists() {
            "/dev/net/tun"
        } else {
            "/dev/net/tun missing"
        },
        "modprobe tun",
    ));
    v.push(check_fix(
        "virtiofsd",
        d.cfg.virtiofsd.is_some(),
        match &d.cfg.virtiofsd {
            Some(p) => format!("{} (--mount, QEMU)", p.display()),
            None => "missing (only --mount needs it)".into(),
        },
        "apt-get install qemu-system-common",
    ));
    let bb = std::path::Path::new("/bin/busybox");
    v.push(check_fix(
        "busybox-static",
        bb.exists(),
        if bb.exists() {
            "/bin/busybox"
        } else {
            "missing"
        },
        "apt-get install busybox-static",
    ));
    let group = d
        .cfg
        .settings
        .iter()
        .find(|e| e.key == "socket_group")
        .map(|e| e.value.clone())
        .unwrap_or_else(|| "banger".into());
    v.push(check_fix(
        "socket group",
        d.cfg.socket_gid.is_some(),
        match d.cfg.socket_gid {
            Some(_) => {
                format!("members of {group} use banger without sudo (`usermod -aG {group} USER`)")
            }
            None => format!("no group {group}: only root can use banger"),
        },
        format!("groupadd --system {group}, then restart bangerd (`systemctl restart banger`)"),
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
    v.push(check_fix(
        "guest subnet",
        overlapping.is_empty(),
        if overlapping.is_empty() {
            format!("{guests}: no host route overlaps it")
        } else {
            format!(
                "{guests} overlaps the host's route(s) {} (Docker's pools cover 172.16.0.0/12): \
                 give bangerd a free range",
                overlapping.join(", ")
            )
        },
        "echo 'subnet = \"10.213.0.0/16\"' >> /etc/banger/config.toml, then restart bangerd \
         (any range no host route covers)",
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
        Err(_) => v.push(check_fix(
            "host firewall",
            false,
            "cannot list the nftables ruleset",
            "apt-get install nftables",
        )),
    }
    v.push(host_dns_check(d));
    let host = sysinfo::host_resources(&d.cfg.layout.state_dir);
    let s = d.default_sizing;
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
            v.push(check_fix(
                "image",
                current,
                if current {
                    format!("{DEFAULT_IMAGE}: kernel {}", img.kernel_version)
                } else {
                    format!("{DEFAULT_IMAGE} was built by another version of banger")
                },
                "banger image build --force",
            ))
        }
        _ => v.push(check_fix(
            "image",
            false,
            format!("{DEFAULT_IMAGE} not built"),
            "banger image build",
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
        _ => check_fix(
            "host dns",
            false,
            format!(
                "the host does not resolve <name>.{suffix} through banger ({listen}); `ssh \
                 NAME.{suffix}` works without it through `banger ssh-config`"
            ),
            "banger dns install",
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

pub fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
        fix: None,
    }
}

/// A check that, failed, says the command that fixes it.
pub fn check_fix(name: &str, ok: bool, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    let mut c = check(name, ok, detail);
    if !ok {
        c.fix = Some(fix.into());
    }
    c
}
