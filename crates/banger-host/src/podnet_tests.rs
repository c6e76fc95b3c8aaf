//! `podnet`'s tests: the route parsing, the links refused, and a
//! namespace laid out as CNI's (root).

use std::process::Command;

use super::*;

#[test]
fn the_default_route_is_read_in_network_order() {
    let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
    assert_eq!(
        default_gateway(t, "eth0"),
        Some(Ipv4Addr::new(10, 88, 0, 1))
    );
    assert_eq!(default_gateway(t, "eth1"), None);
    let a = Ipv4Addr::new(10, 88, 0, 5);
    assert!(subnet_on_link(t, "eth0", a, 16));
    assert!(!subnet_on_link(t, "eth0", a, 24));
    assert!(!subnet_on_link(t, "eth1", a, 16));
}

/// What a guest could not use is named: no default route, a gateway
/// off the link (Calico's /32 and 169.254.1.1), a subnet routed
/// through the gateway (ptp).
#[test]
fn links_a_guest_cannot_use_are_refused() {
    let ok = PodLink {
        ifname: "eth0".into(),
        mac: [2, 0, 0, 0, 0, 1],
        address: Ipv4Addr::new(10, 88, 0, 5),
        prefix: 16,
        gateway: Some(Ipv4Addr::new(10, 88, 0, 1)),
        mtu: 1500,
        subnet_on_link: true,
    };
    assert_eq!(ok.refusal(), None);
    let none = PodLink {
        gateway: None,
        ..ok.clone()
    };
    assert!(none.refusal().unwrap().contains("no default route"));
    let calico = PodLink {
        prefix: 32,
        gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
        ..ok.clone()
    };
    assert!(calico.refusal().unwrap().contains("outside its subnet"));
    let ptp = PodLink {
        subnet_on_link: false,
        ..ok.clone()
    };
    assert!(ptp.refusal().unwrap().contains("ptp"));
}

fn ip(args: &[&str]) {
    let s = Command::new("ip").args(args).status().expect("ip");
    assert!(s.success(), "ip {args:?}");
}

/// A namespace laid out as CNI's bridge plugin leaves a pod's (a veth
/// `eth0` with an address and a default route): the attach adds the
/// tap and both redirects, which `tc` then shows; the detach leaves
/// the namespace as it was. A file that is not a namespace, and the
/// daemon's own, are refused.
#[test]
fn a_pod_namespace_gets_a_redirected_tap_and_loses_it() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test needs root (it makes network namespaces)");
    }
    let name = format!("bgt-podnet-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let path = PathBuf::from("/run/netns").join(&name);
    let run = || {
        ip(&[
            "-n", &name, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ip(&[
            "-n",
            &name,
            "link",
            "set",
            "eth0",
            "address",
            "0a:58:0a:58:00:05",
        ]);
        ip(&["-n", &name, "addr", "add", "10.88.0.5/16", "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "peer0", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", "10.88.0.1"]);
        let ns = Netns::open(&path).unwrap();
        let link = ns.attach("banger test").unwrap();
        assert_eq!(link.ifname, "eth0");
        assert_eq!(link.mac_string(), "0a:58:0a:58:00:05");
        assert_eq!(
            (link.address, link.prefix),
            (Ipv4Addr::new(10, 88, 0, 5), 16)
        );
        assert_eq!(link.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
        let tc = |dev: &str| {
            let o = Command::new("ip")
                .args([
                    "netns", "exec", &name, "tc", "filter", "show", "dev", dev, "ingress",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert!(
            tc("eth0").contains("Egress Redirect to device bgpod0"),
            "{}",
            tc("eth0")
        );
        assert!(
            tc(POD_TAP).contains("Egress Redirect to device eth0"),
            "{}",
            tc(POD_TAP)
        );
        // A second VM on the same pod is refused, and the first's
        // tap stays.
        assert!(ns.attach("banger test").is_err());
        assert!(tc("eth0").contains("bgpod0"));
        drop(ns.open_queue("banger test").unwrap());
        assert!(ns.open_queue("banger other").is_err());
        // Another VM's release (another mark) leaves it.
        release(&path, None, "banger other", "eth0").unwrap();
        assert!(tc("eth0").contains("bgpod0"));
        // A release of a namespace that is not the one recorded
        // leaves it too.
        release(&path, Some((0, 0)), "banger test", "eth0").unwrap();
        assert!(tc("eth0").contains("bgpod0"));
        release(&path, Some(ns.id().unwrap()), "banger test", "eth0").unwrap();
        assert_eq!(tc("eth0"), "");
        let links = Command::new("ip")
            .args(["-n", &name, "-o", "link"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains("bgpod0"));
        // Twice is fine.
        release(&path, None, "banger test", "eth0").unwrap();
        assert!(matches!(
            Netns::open(Path::new("/etc/hostname")),
            Err(PodNetError::NotNetns(_))
        ));
        assert!(matches!(
            Netns::open(Path::new("/proc/thread-self/ns/net")),
            Err(PodNetError::Own(_))
        ));
    };
    let r = std::panic::catch_unwind(run);
    ip(&["netns", "del", &name]);
    // Gone with its namespace: a release is then nothing.
    release(&path, None, "banger test", "eth0").unwrap();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}
