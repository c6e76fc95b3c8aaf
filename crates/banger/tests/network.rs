//! Guest isolation end to end: what a guest can and cannot reach, seen
//! from inside real guests. The daemon runs in a network namespace of the
//! test's own with a veth uplink to an "outside" namespace that holds the
//! servers (a web server, a "metadata" server on 169.254.169.254, a server
//! on a private range); nothing leaves the machine. Needs root;
//! `scripts/test.sh` runs it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_infra::{ok, text, wait_until, HttpServer, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn sh(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
}

/// The outside namespace's web server on :8080, serving `ok`.
fn outside_web(inst: &Instance) -> (HttpServer, std::path::PathBuf) {
    let www = inst.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("ok"), "ok\n").unwrap();
    (inst.net.http_server(&www, 8080), www)
}

/// curl's exit status for each probe, run at once inside the guest (each
/// bounded by --max-time 3: a dropped packet times out, exit 28).
fn probes(inst: &Instance, vm: &str, probes: &[(&str, String)]) -> BTreeMap<String, i32> {
    let mut script = String::new();
    for (name, args) in probes {
        script.push_str(&format!(
            "( curl -s -o /dev/null --max-time 3 {args}; echo \"{name} $?\" ) &\n"
        ));
    }
    script.push_str("wait\n");
    let out = inst.banger(&["vm", "ssh", vm, "--", "sh", "-c", &script]);
    let stdout = ok(&out, "probes");
    stdout
        .lines()
        .filter_map(|l| {
            let (n, c) = l.split_once(' ')?;
            Some((n.to_string(), c.trim().parse().ok()?))
        })
        .collect()
}

fn busybox_httpd(ns: &str, addr: &str, root: &std::path::Path) -> HttpServer {
    let child = Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "httpd", "-f", "-p", addr, "-h",
        ])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox httpd");
    HttpServer::from_child(child)
}

/// The default policy, and `--net none` and `--allow-net`: a guest reaches
/// the outside world (and nothing else): not the host's services on its
/// gateway or its uplink address, not 169.254.169.254, not a private range
/// beyond the host, not another guest; a spoofed source address does not
/// get out.
#[test]
fn guests_reach_the_outside_world_and_nothing_else() {
    let inst = Instance::new(&banger_bin()).with_image();
    let net = &inst.net;
    // The outside world: a web server, a metadata server and a server on
    // a private range routed through the uplink.
    let (_web, www) = outside_web(&inst);
    sh(
        &net.outside,
        &["ip", "addr", "add", "169.254.169.254/32", "dev", "world0"],
    );
    sh(
        &net.outside,
        &["ip", "addr", "add", "10.77.0.1/32", "dev", "world0"],
    );
    sh(
        &net.ns,
        &["ip", "route", "add", "10.77.0.0/24", "via", &net.outside_ip],
    );
    let _metadata = busybox_httpd(&net.outside, "169.254.169.254:80", &www);
    let _lan = busybox_httpd(&net.outside, "10.77.0.1:8080", &www);
    // A service of the host itself (the daemon's namespace), on every
    // address it has.
    let _host = busybox_httpd(&net.ns, "8081", &www);
    // A resolver of the host's own, on port 53 of its uplink address:
    // guests may only use banger's, on their gateway.
    let _host53 = busybox_httpd(&net.ns, &format!("{}:53", net.inside_ip), &www);

    let _ = inst.daemon_pid();
    let runs = [
        inst.spawn(&["vm", "run", "--name", "a", "--", "true"]),
        inst.spawn(&["vm", "run", "--name", "b", "--", "true"]),
        inst.spawn(&["vm", "run", "--name", "c", "--net", "none", "--", "true"]),
        inst.spawn(&[
            "vm",
            "run",
            "--name",
            "d",
            "--allow-net",
            "10.77.0.0/24",
            // A range around the guests' subnet: other guests stay closed.
            "--allow-net",
            "172.16.0.0/12",
            "--",
            "true",
        ]),
    ];
    for r in runs {
        ok(&test_infra::bounded::wait_output(r), "vm run");
    }
    let ip = |name: &str| inst.guest_ip(name);
    let (a_ip, b_ip) = (ip("a"), ip("b"));
    // The guest's gateway is the host end of its /30: the address before it.
    let gw = {
        let o: Vec<u8> = a_ip.split('.').map(|x| x.parse().unwrap()).collect();
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] - 1)
    };
    let outside = format!("http://{}:8080/ok", net.outside_ip);
    let r = probes(
        &inst,
        "a",
        &[
            ("outside", outside.clone()),
            ("host-gateway", format!("http://{gw}:8081/ok")),
            ("host-uplink", format!("http://{}:8081/ok", net.inside_ip)),
            ("host-port-53", format!("http://{}:53/ok", net.inside_ip)),
            ("metadata", "http://169.254.169.254/ok".into()),
            ("private", "http://10.77.0.1:8080/ok".into()),
            ("other-guest-ssh", format!("telnet://{b_ip}:22")),
        ],
    );
    assert_eq!(r.get("outside"), Some(&0), "{r:?}");
    for blocked in [
        "host-gateway",
        "host-uplink",
        "host-port-53",
        "metadata",
        "private",
        "other-guest-ssh",
    ] {
        assert_eq!(r.get(blocked), Some(&28), "{blocked} must time out: {r:?}");
    }
    // The other guest's sshd is up: the host reaches it.
    let out = inst.banger(&["vm", "ssh", "b", "--", "hostname"]);
    assert_eq!(ok(&out, "ssh b").trim(), "b");

    // Anti-spoofing: only the guest's own address leaves its tap.
    let spoof = "172.30.250.2";
    ok(
        &inst.banger(&[
            "vm",
            "ssh",
            "a",
            "--",
            "ip",
            "addr",
            "add",
            &format!("{spoof}/32"),
            "dev",
            "eth0",
        ]),
        "add a spoofed address",
    );
    let r = probes(
        &inst,
        "a",
        &[
            ("own", outside.clone()),
            ("spoofed", format!("--interface {spoof} {outside}")),
        ],
    );
    assert_eq!(r.get("own"), Some(&0), "{r:?}");
    assert_eq!(r.get("spoofed"), Some(&28), "{r:?}");

    // --net none: nothing out; --allow-net: the range opens, the rest stays.
    let r = probes(&inst, "c", &[("outside", outside.clone())]);
    assert_eq!(r.get("outside"), Some(&28), "--net none: {r:?}");
    let r = probes(
        &inst,
        "d",
        &[
            ("outside", outside.clone()),
            ("private", "http://10.77.0.1:8080/ok".into()),
            ("metadata", "http://169.254.169.254/ok".into()),
            ("other-guest-ssh", format!("telnet://{b_ip}:22")),
        ],
    );
    assert_eq!(r.get("outside"), Some(&0), "{r:?}");
    assert_eq!(
        r.get("private"),
        Some(&0),
        "--allow-net 10.77.0.0/24: {r:?}"
    );
    assert_eq!(r.get("metadata"), Some(&28), "{r:?}");
    assert_eq!(
        r.get("other-guest-ssh"),
        Some(&28),
        "--allow-net 172.16.0.0/12 opened another guest: {r:?}"
    );

    ok(
        &inst.banger(&["vm", "delete", "-f", "a", "b", "c", "d"]),
        "delete",
    );
    inst.assert_baseline();
}

/// banger's rules keep working under a host firewall that drops forwarded
/// traffic by policy (Docker's `FORWARD DROP`, made here the way
/// iptables-nft makes it), and a firewall reload that removed them is
/// noticed and repaired. ip_forward, on before banger (Docker turned it
/// on), stays on after it.
#[test]
fn docker_forward_drop_and_a_firewall_reload() {
    let inst = Instance::new(&banger_bin()).with_image();
    let net = &inst.net;
    let (_web, _) = outside_web(&inst);
    let docker = "table ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n";
    net.nft(docker);
    sh(&net.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

    ok(
        &inst.banger(&["vm", "run", "--name", "e", "--", "true"]),
        "vm run",
    );
    let ip = inst.vm("e").unwrap()["guest_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let outside = format!("http://{}:8080/ok", net.outside_ip);
    let r = probes(&inst, "e", &[("outside", outside.clone())]);
    assert_eq!(
        r.get("outside"),
        Some(&0),
        "through Docker's FORWARD DROP: {r:?}"
    );
    let rules = net.ruleset();
    assert!(
        rules.contains("iifname \"bgtap*\" accept comment \"banger\""),
        "banger's accepts in Docker's chain: {rules}"
    );
    let doctor = ok(&inst.banger(&["doctor"]), "doctor");
    assert!(
        doctor.contains("ip filter FORWARD drop forwarded traffic"),
        "{doctor}"
    );

    // A firewall reload: everything flushed. The daemon puts its rules
    // back (it checks every 10 s) and the guest is online again.
    sh(&net.ns, &["nft", "flush", "ruleset"]);
    assert!(
        wait_until(Duration::from_secs(40), || inst.in_firewall(&ip)),
        "the rules were not put back:\n{}",
        net.ruleset()
    );
    let r = probes(&inst, "e", &[("outside", outside)]);
    assert_eq!(r.get("outside"), Some(&0), "{r:?}");

    // Docker's table again, then the VM goes: no banger rule anywhere, and
    // forwarding stays on for the firewall that relies on it.
    net.nft(docker);
    ok(&inst.banger(&["vm", "delete", "-f", "e"]), "delete");
    inst.settle();
    let rules = net.ruleset();
    assert!(!rules.contains("banger"), "{rules}");
    let fwd = net
        .cmd("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .unwrap();
    assert_eq!(
        text(&fwd.stdout).trim(),
        "1",
        "forwarding left on for Docker"
    );
    sh(&net.ns, &["nft", "delete", "table", "ip", "filter"]);
    sh(&net.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    inst.assert_baseline();
}

/// `busybox wget` of `url` from the daemon's namespace (the host's side):
/// the body, or None when it fails.
fn host_get(inst: &Instance, url: &str) -> Option<String> {
    let out = inst
        .net
        .cmd("timeout")
        // (Bounded by `timeout`: this busybox's wget crashes on -T.)
        .args(["10", "busybox", "wget", "-q", "-O", "-", url])
        .output()
        .ok()?;
    out.status.success().then(|| text(&out.stdout))
}

/// Published ports: a host port on 127.0.0.1 reaches the guest's port;
/// they are listed, added and removed while the VM runs, come back after a
/// daemon crash, and go with the VM; a port in use is a clear error that
/// changes nothing.
#[test]
fn published_ports_reach_the_guest_and_go_with_it() {
    let inst = Instance::new(&banger_bin()).with_image();
    let serve = "mkdir -p /tmp/w && echo published > /tmp/w/x && \
                 /usr/lib/banger/busybox setsid /usr/lib/banger/busybox httpd -f -p 8000 -h /tmp/w \
                 </dev/null >/dev/null 2>&1 &";
    let out = inst.banger(&[
        "vm",
        "run",
        "--name",
        "p",
        "-p",
        "18080:8000",
        "--",
        "sh",
        "-c",
        serve,
    ]);
    ok(&out, "vm run -p");
    // (The guest's server starts in the background: waited for.)
    assert!(
        wait_until(Duration::from_secs(20), || host_get(
            &inst,
            "http://127.0.0.1:18080/x"
        )
        .as_deref()
            == Some("published\n")),
        "the published port never reached the guest's server"
    );
    let show = ok(&inst.banger(&["vm", "show", "p"]), "vm show");
    assert!(show.contains("127.0.0.1:18080/tcp -> 8000/tcp"), "{show}");

    // A port something else holds.
    let www = inst.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("s"), "squat\n").unwrap();
    let _busy = busybox_httpd(&inst.net.ns, "127.0.0.1:18081", &www);
    assert!(
        wait_until(Duration::from_secs(10), || host_get(
            &inst,
            "http://127.0.0.1:18081/s"
        )
        .is_some()),
        "the squatter never listened"
    );
    let out = inst.banger(&["vm", "port", "add", "p", "18081:8000"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("127.0.0.1:18081/tcp") && err.contains("in use"),
        "{err}"
    );
    let out = inst.banger(&["vm", "run", "--name", "q", "-p", "18081:80", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("18081"), "{out:?}");
    assert!(inst.vm("q").is_none(), "a refused port creates nothing");
    let ls = ok(
        &inst.banger(&["vm", "port", "ls", "p", "--json"]),
        "port ls",
    );
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&ls).unwrap(),
        ["127.0.0.1:18080:8000/tcp"]
    );

    // Added and removed while it runs.
    ok(
        &inst.banger(&["vm", "port", "add", "p", "18082:8000"]),
        "port add",
    );
    assert_eq!(
        host_get(&inst, "http://127.0.0.1:18082/x").as_deref(),
        Some("published\n")
    );
    ok(&inst.banger(&["vm", "port", "rm", "p", "18080"]), "port rm");
    assert_eq!(host_get(&inst, "http://127.0.0.1:18080/x"), None);
    // A port another VM publishes: that VM is named.
    let out = inst.banger(&["vm", "create", "--name", "q2", "-p", "18082:80"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is published by vm \"p\""),
        "{err}"
    );
    assert!(inst.vm("q2").is_none(), "a refused port creates nothing");

    // The daemon dies: the next one publishes the kept VM's ports again.
    inst.kill_daemon();
    let _ = inst.daemon_pid();
    assert_eq!(
        host_get(&inst, "http://127.0.0.1:18082/x").as_deref(),
        Some("published\n")
    );

    // A TCP client left open across a restart is ended with the stop (no
    // thread or descriptor of the daemon's stays behind with it), and a
    // UDP port that served a client is free again at once: the restart
    // binds both again.
    ok(
        &inst.banger(&[
            "vm",
            "exec",
            "-d",
            "p",
            "--",
            "/usr/lib/banger/busybox",
            "nc",
            "-l",
            "-p",
            "8001",
        ]),
        "a guest listener that holds its connection",
    );
    ok(
        &inst.banger(&["vm", "port", "add", "p", "18084:8001"]),
        "port add tcp",
    );
    ok(
        &inst.banger(&["vm", "port", "add", "p", "18083:9000/udp"]),
        "port add udp",
    );
    let out = inst
        .net
        .cmd("sh")
        .args(["-c", "echo hi | socat - UDP-SENDTO:127.0.0.1:18083"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut held = inst
        .net
        .cmd("busybox")
        .args(["nc", "127.0.0.1", "18084"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Through the proxy to the guest's listener before the restart: the
    // guest has the connection established (port 8001 = 0x1F41, state 01;
    // busybox's listener may be IPv6's, the connection v4-mapped).
    let established = || {
        let tcp = ok(
            &inst.banger(&[
                "vm",
                "exec",
                "p",
                "--",
                "sh",
                "-c",
                "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true",
            ]),
            "/proc/net/tcp",
        );
        tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(":1F41") && f[3] == "01"
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), established),
        "the held connection never reached the guest"
    );
    ok(
        &inst.banger(&["vm", "restart", "p"]),
        "vm restart with a udp port",
    );
    assert!(
        wait_until(Duration::from_secs(30), || held
            .try_wait()
            .unwrap()
            .is_some()),
        "a client connection outlived its VM's stop"
    );
    let ls = ok(
        &inst.banger(&["vm", "port", "ls", "p", "--json"]),
        "port ls",
    );
    assert!(ls.contains("18083:9000/udp"), "{ls}");

    ok(&inst.banger(&["vm", "delete", "-f", "p"]), "delete");
    assert_eq!(
        host_get(&inst, "http://127.0.0.1:18082/x"),
        None,
        "gone with the VM"
    );
    inst.assert_baseline();
}

/// banger's DNS: a guest resolves its own `<name>.vm` through its gateway,
/// not another VM's; the host resolves every VM's on its loopback
/// address; other names are forwarded to the host's resolvers, a loopback
/// stub included (systemd-resolved's 127.0.0.53 here is a stub the test
/// runs in the daemon's namespace: no guest could reach it directly).
#[test]
fn vm_names_resolve_and_other_names_are_forwarded() {
    let inst = Instance::new(&banger_bin()).with_image();
    let stub_addr: std::net::SocketAddr = "127.0.0.53:53".parse().unwrap();
    let _stub = test_infra::DnsStub::start(
        &inst.net.ns,
        stub_addr,
        "upstream.example",
        std::net::Ipv4Addr::new(192, 0, 2, 7),
    );
    let resolv = inst.dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let out = inst
        .banger_cmd(&["daemon", "ping"])
        .env("BANGER_RESOLV_CONF", &resolv)
        .output()
        .unwrap();
    ok(&out, "a daemon whose resolver is a loopback stub");
    let runs = [
        inst.spawn(&["vm", "run", "--name", "a", "--", "true"]),
        inst.spawn(&["vm", "run", "--name", "b", "--", "true"]),
    ];
    for r in runs {
        ok(&test_infra::bounded::wait_output(r), "vm run");
    }
    let ip = |name: &str| inst.guest_ip(name);
    let (a_ip, b_ip) = (ip("a"), ip("b"));
    let getent = |vm: &str, name: &str| {
        let out = inst.banger(&["vm", "ssh", vm, "--", "getent", "hosts", name]);
        out.status.success().then(|| text(&out.stdout))
    };
    let own = getent("a", "a.vm").expect("a resolves itself");
    assert!(own.starts_with(&a_ip), "{own}");
    assert_eq!(
        getent("a", "b.vm"),
        None,
        "a guest does not resolve another VM"
    );
    assert_eq!(getent("a", "nobody.vm"), None);
    let fwd = getent("a", "upstream.example").expect("forwarded to the host's resolver");
    assert!(fwd.starts_with("192.0.2.7"), "{fwd}");

    // The host asks the loopback listener.
    let lookup = |name: &str| {
        let out = inst
            .net
            .cmd("busybox")
            .args(["nslookup", name, "127.0.0.153"])
            .output()
            .unwrap();
        text(&out.stdout)
    };
    assert!(lookup("a.vm").contains(&a_ip), "{}", lookup("a.vm"));
    // The name `doctor` uses to see whether the host routes `.vm` to
    // banger; this namespace's resolver does not (no `dns install`).
    assert!(
        lookup("_banger.vm").contains("127.0.0.153"),
        "{}",
        lookup("_banger.vm")
    );
    let doctor = ok(&inst.banger(&["doctor"]), "doctor");
    assert!(
        doctor.contains("host dns") && doctor.contains("banger dns install"),
        "{doctor}"
    );
    assert!(lookup("b.vm").contains(&b_ip), "{}", lookup("b.vm"));

    // `ssh <name>.vm` with the snippet `banger ssh-config` prints: banger's
    // key, the pinned host key, the daemon as the way to the VM.
    let cfg = ok(&inst.banger(&["ssh-config"]), "ssh-config");
    assert!(cfg.contains("Host *.vm"), "{cfg}");
    let file = inst.dir.path().join("ssh_config");
    std::fs::write(&file, &cfg).unwrap();
    let out = inst
        .net
        .cmd("ssh")
        .arg("-F")
        .arg(&file)
        .args(["b.vm", "hostname"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(ok(&out, "ssh b.vm").trim(), "b");

    // One guest floods its resolver (answered from the daemon's view of
    // the VMs, no store lock): another still resolves, the CLI answers.
    ok(
        &inst.banger(&[
            "vm",
            "exec",
            "-d",
            "b",
            "--",
            "sh",
            "-c",
            "while :; do getent hosts b.vm; getent hosts x.vm; done >/dev/null 2>&1",
        ]),
        "flood",
    );
    for _ in 0..5 {
        let own = getent("a", "a.vm").expect("a resolves itself during b's flood");
        assert!(own.starts_with(&a_ip), "{own}");
        ok(&inst.banger(&["vm", "ls"]), "vm ls during the flood");
    }

    // A deleted VM's name stops resolving.
    ok(&inst.banger(&["vm", "delete", "-f", "b"]), "delete b");
    assert!(!lookup("b.vm").contains(&b_ip));
    ok(&inst.banger(&["vm", "delete", "-f", "a"]), "delete a");
    inst.assert_baseline();
}

/// A shared network: VMs on it reach each other and resolve each other's
/// names; a VM on no common network reaches and resolves neither, and is
/// not reached.
#[test]
fn vms_on_one_network_reach_and_resolve_each_other() {
    let inst = Instance::new(&banger_bin()).with_image();
    let _ = inst.daemon_pid();
    let runs = [
        inst.spawn(&["vm", "run", "--name", "x", "--network", "lab", "--", "true"]),
        inst.spawn(&["vm", "run", "--name", "y", "--network", "lab", "--", "true"]),
        inst.spawn(&["vm", "run", "--name", "z", "--", "true"]),
    ];
    for r in runs {
        ok(&test_infra::bounded::wait_output(r), "vm run");
    }
    let ip = |name: &str| inst.guest_ip(name);
    let (x, y, z) = (ip("x"), ip("y"), ip("z"));
    // An HTTP request to sshd: answered with its banner (curl exits 1, 8
    // or 56), refused (7), or dropped (28).
    let reached = |code: Option<&i32>| code.is_some_and(|c| *c != 7 && *c != 28);
    let r = probes(
        &inst,
        "x",
        &[
            ("peer", format!("http://{y}:22/")),
            ("stranger", format!("http://{z}:22/")),
        ],
    );
    assert!(reached(r.get("peer")), "x reaches y: {r:?}");
    assert_eq!(r.get("stranger"), Some(&28), "x does not reach z: {r:?}");
    let r = probes(&inst, "z", &[("x", format!("http://{x}:22/"))]);
    assert_eq!(r.get("x"), Some(&28), "z does not reach x: {r:?}");
    let getent = |vm: &str, name: &str| {
        let out = inst.banger(&["vm", "ssh", vm, "--", "getent", "hosts", name]);
        out.status.success().then(|| text(&out.stdout))
    };
    assert!(getent("x", "y.vm").is_some_and(|o| o.starts_with(&y)));
    assert!(getent("y", "x.vm").is_some_and(|o| o.starts_with(&x)));
    assert_eq!(getent("z", "x.vm"), None);
    assert_eq!(getent("x", "z.vm"), None);
    let show = ok(&inst.banger(&["vm", "show", "x"]), "show");
    assert!(show.contains("network      lab"), "{show}");

    // y goes: its pairs go with it.
    ok(&inst.banger(&["vm", "delete", "-f", "y"]), "delete y");
    inst.settle();
    assert!(
        !inst.net.ruleset().contains(&format!(". {y}")),
        "{}",
        inst.net.ruleset()
    );
    let out = inst.banger(&["vm", "create", "--network", "Not_A_Label"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--network"), "{out:?}");
    ok(&inst.banger(&["vm", "delete", "-f", "x", "z"]), "delete");
    inst.assert_baseline();
}
