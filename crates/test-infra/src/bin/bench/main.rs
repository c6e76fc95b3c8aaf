//! banger's benchmark: `vm run` latency against a hand-written QEMU command
//! line, the per-phase breakdown of banger's own overhead, ten VMs in
//! parallel, the guest agent (exec round trips, copies), DNS and network
//! setup, snapshots (cold against warm starts, fork, clones' memory). Runs in a network namespace it creates (test_infra::Instance);
//! prints a table and appends it, with the machine's description, to
//! docs/BENCHMARKS.md. `scripts/bench.sh` is the way to run it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_infra::{text, Instance};

mod agent;
mod compare;
mod containerd;
mod e2b;
mod memory;
mod snapshots;
mod storage;

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    };
    (median, s[0], s[s.len() - 1])
}

fn row(out: &mut String, name: &str, v: &[f64], unit: &str) {
    let (m, lo, hi) = stats(v);
    let line = format!(
        "| {name} | {m:.1} | {lo:.1} | {hi:.1} | {unit} | {} |\n",
        v.len()
    );
    print!("{line}");
    out.push_str(&line);
}

/// Parses `timing NAME  12.3 ms` lines of `vm run --timings`.
fn timings(stderr: &str) -> BTreeMap<String, f64> {
    stderr
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "timing").then_some(())?;
            let name = w.next()?.to_string();
            let ms: f64 = w.next()?.parse().ok()?;
            Some((name, ms))
        })
        .collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.to_string()))
        .unwrap_or_default();
    let kernel = text(
        &Command::new("uname")
            .arg("-r")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    );
    let kvm = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.contains(" vmx") || s.contains(" svm"))
        .unwrap_or(false);
    let qemu = text(
        &Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    );
    format!(
        "{cpu}, {cores} cores, {}, host kernel {}, hardware virtualisation: {}, {}",
        mem.replace("MemTotal:", "memory")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        kernel.trim(),
        if kvm { "yes (KVM)" } else { "no (QEMU TCG)" },
        qemu.lines().next().unwrap_or("").trim()
    )
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn vmm_rss_kib(inst: &Instance) -> u64 {
    inst.processes()
        .iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .filter_map(|(pid, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()?
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

struct Plain {
    kernel: PathBuf,
    initrd: PathBuf,
    root: PathBuf,
    work: PathBuf,
    known_hosts: PathBuf,
    alias: String,
    key: PathBuf,
    guest_ip: String,
    host_ip: String,
}

/// What a user would write by hand: the same kernel, initrd, disks and tap,
/// QEMU started directly, and sshd polled until `ssh true` succeeds.
fn plain_run(inst: &Instance, p: &Plain) -> f64 {
    let tap = "bgplain0";
    let ipc = |args: &[&str]| {
        let st = inst.net.cmd("ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ipc(&["tuntap", "add", "dev", tap, "mode", "tap"]);
    ipc(&["addr", "add", &format!("{}/30", p.host_ip), "dev", tap]);
    ipc(&["link", "set", tap, "up"]);
    let t0 = Instant::now();
    let mut qemu = inst
        .net
        .cmd("qemu-system-x86_64")
        .args([
            "-M",
            "pc,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "1024M",
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(&p.kernel)
        .arg("-initrd")
        .arg(&p.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", p.root.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", p.work.display()))
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    // The daemon's namespace is where the guest is reachable, so the probe
    // runs there too: `ssh -o ConnectTimeout=1` in a loop is what people do.
    let mut elapsed = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let st = inst
            .net
            .cmd("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(&p.key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", p.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ConnectTimeout=1",
                "-o",
                "LogLevel=QUIET",
            ])
            .arg("-o")
            .arg(format!("HostKeyAlias={}", p.alias))
            .arg(format!("root@{}", p.guest_ip))
            .arg("true")
            .stdin(Stdio::null())
            .status()
            .expect("ssh");
        if st.success() {
            elapsed = t0.elapsed().as_secs_f64() * 1e3;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    ipc(&["link", "del", tap]);
    elapsed
}

/// Per-VM network setup (tap + firewall rules) and teardown, alone and
/// with `present` other VMs' rules in place, in a namespace of its own.
fn network_bench(table: &mut String, iters: usize, present: u32) {
    use banger_core::net::Subnet;
    use banger_host::firewall::{self, GuestRules};
    use banger_host::tap;
    let ns = test_infra::NetNs::new();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let subnet = Subnet::default();
    let rules = |i: u32, tap: &str| GuestRules {
        vm_id: format!("bench{i}"),
        tap: tap.to_string(),
        guest_ip: subnet.slot(i).guest_ip,
        outside: true,
        allow: Vec::new(),
        dns: Vec::new(),
        guests: subnet.cidr(),
        networked: false,
        peers: Vec::new(),
    };
    let measure = |base: u32| {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for k in 0..iters as u32 {
            let i = base + k;
            let t = Instant::now();
            let name = tap::free_name(&[]).expect("tap name");
            tap::create(&name, subnet.slot(i).host_ip, 30, "banger bench").expect("tap");
            firewall::up(&rules(i, &name)).expect("firewall up");
            up.push(ms(t));
            let t = Instant::now();
            firewall::down(&rules(i, &name)).expect("firewall down");
            tap::delete(&name).expect("tap delete");
            down.push(ms(t));
        }
        (up, down)
    };
    let (a_up, a_down, b_up, b_down) = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_on_this_thread();
            let (a_up, a_down) = measure(1000);
            let mut others = Vec::new();
            for i in 1..=present {
                let name = tap::free_name(&[]).expect("tap name");
                tap::create(&name, subnet.slot(i).host_ip, 30, "banger bench").expect("tap");
                firewall::up(&rules(i, &name)).expect("firewall up");
                others.push((i, name));
            }
            let (b_up, b_down) = measure(2000);
            for (i, name) in others {
                firewall::down(&rules(i, &name)).expect("firewall down");
                tap::delete(&name).expect("tap delete");
            }
            (a_up, a_down, b_up, b_down)
        })
        .join()
        .expect("network bench thread")
    });
    // The tap pool: a tap made at start and deleted at release, against one
    // taken from the pool (address and link up) and given back (address
    // off, link down).
    let (made, deleted, taken, given) = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_on_this_thread();
            let ip = subnet.slot(3000).host_ip;
            let (mut made, mut deleted, mut taken, mut given) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..iters {
                let name = tap::free_name(&[]).expect("tap name");
                let t = Instant::now();
                tap::create(&name, ip, 30, "banger bench").expect("tap");
                made.push(ms(t));
                let t = Instant::now();
                tap::delete(&name).expect("tap delete");
                deleted.push(ms(t));
            }
            let name = tap::free_name(&[]).expect("tap name");
            tap::create_bare(&name, "banger bench").expect("spare");
            for _ in 0..iters {
                let t = Instant::now();
                tap::assign(&name, ip, 30).expect("assign");
                taken.push(ms(t));
                let t = Instant::now();
                tap::reset(&name, ip, 30).expect("reset");
                given.push(ms(t));
            }
            tap::delete(&name).expect("tap delete");
            (made, deleted, taken, given)
        })
        .join()
        .expect("tap pool bench thread")
    });
    row(table, "tap made at start (no pool)", &made, "ms");
    row(table, "tap taken from the pool", &taken, "ms");
    row(table, "tap deleted at release (no pool)", &deleted, "ms");
    row(table, "tap given back to the pool", &given, "ms");
    row(table, "network setup (tap + firewall), alone", &a_up, "ms");
    row(
        table,
        "network teardown (firewall + tap), alone",
        &a_down,
        "ms",
    );
    row(
        table,
        &format!("network setup, {present} other VMs' rules present"),
        &b_up,
        "ms",
    );
    row(
        table,
        &format!("network teardown, {present} other VMs' rules present"),
        &b_down,
        "ms",
    );
    for (what, a, b) in [("setup", &a_up, &b_up), ("teardown", &a_down, &b_down)] {
        let line = format!(
            "| network {what}: with {present} / alone (medians) | {:.2} | | | ratio | |\n",
            stats(b).0 / stats(a).0
        );
        print!("{line}");
        table.push_str(&line);
    }
}

/// A section of the benchmark that runs alone, filling a table.
type Section<'a> = dyn Fn(&mut String) + 'a;

/// Every table's head.
const TABLE_HEAD: &str =
    "| scenario | median | min | max | unit | runs |\n|---|---|---|---|---|---|\n";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(5);
    let parallel: usize = args
        .iter()
        .position(|a| a == "--parallel")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10);
    // `--vmm qemu|firecracker` forces the VMM of the banger runs (default:
    // the daemon's choice, Firecracker where KVM and its binary are there).
    let vmm: Vec<String> = args
        .iter()
        .position(|a| a == "--vmm")
        .and_then(|i| args.get(i + 1))
        .map(|v| vec!["--vmm".to_string(), v.clone()])
        .unwrap_or_default();
    let vmm_args: Vec<&str> = vmm.iter().map(String::as_str).collect();
    // One section alone: `--network-only`, `--storage-only`,
    // `--memory-only`.
    let banger = std::env::current_exe()
        .expect("current exe")
        .with_file_name("banger");
    // `--compare BANGER AGENT LABEL` (scripts/bench.sh --compare REV):
    // this build against another's, side by side.
    if let Some(i) = args.iter().position(|a| a == "--compare") {
        let (Some(other), Some(agent), Some(label)) =
            (args.get(i + 1), args.get(i + 2), args.get(i + 3))
        else {
            panic!("--compare takes the other build's banger, its agent and a label");
        };
        let table = compare::bench(&banger, Path::new(other), agent, label, runs);
        append(
            &table,
            &format!("this build against {label}, taking turns, {runs} runs"),
        );
        return;
    }
    let alone: [(&str, &str, &Section); 6] = [
        ("--network-only", "(no VMs: network setup only)", &|t| {
            network_bench(t, 20, 100)
        }),
        (
            "--storage-only",
            "none booted (vm create only: the root disk's preparation)",
            &|t| storage::bench(t, &banger, 20),
        ),
        (
            "--memory-only",
            "3 VMs of 512 MiB, one after another",
            &|t| memory::bench(t, &banger, 3),
        ),
        (
            "--e2b-only",
            "E2B's Python SDK against the CLI, cold starts (no warm cache)",
            &|t| e2b::bench(t, &banger, runs),
        ),
        (
            "--containerd-only",
            "containerd's runtimes against the CLI, cold starts (no warm cache)",
            &|t| containerd::bench(t, &banger, runs),
        ),
        (
            "--snapshots-only",
            "default size (1 vCPU, 1280 MiB) but where a row says; QEMU, then a jailed Firecracker",
            &|t| snapshots::bench(t, &banger, runs),
        ),
    ];
    for (flag, note, run) in alone {
        if args.iter().any(|a| a == flag) {
            let mut table = String::from(TABLE_HEAD);
            run(&mut table);
            append(&table, note);
            return;
        }
    }
    let mut spec_line = String::new();
    // `--agent-only`: the guest agent's section alone.
    let agent_only = args.iter().any(|a| a == "--agent-only");
    assert!(
        banger.is_file(),
        "{} missing: build with --release",
        banger.display()
    );
    let inst = Instance::new(&banger).with_image();
    let _ = inst.daemon_pid();
    let mut table = String::from(TABLE_HEAD);
    println!("{table}");
    if agent_only {
        agent::bench(&mut table, &inst, &vmm_args, 100);
        append(&table, "(the agent section alone)");
        return;
    }

    // 1 + 3: cold `vm run --rm -- true`, with the phase breakdown.
    let mut walls = Vec::new();
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut overhead = Vec::new();
    // Timed from a thread inside the daemon's namespace, so that the CLI
    // starts the way a user's does (no `ip netns exec` in front of it).
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            for i in 0..runs {
                let name = format!("bench-{i}");
                let t = Instant::now();
                let mut a = vec!["vm", "run", "--rm", "--timings", "--name", &name];
                a.extend(&vmm_args);
                a.extend(["--", "true"]);
                let out = inst.banger_direct(&a);
                let wall = t.elapsed().as_secs_f64() * 1e3;
                assert!(out.status.success(), "vm run: {}", text(&out.stderr));
                if let Some(l) = text(&out.stderr).lines().find(|l| l.contains(", vmm ")) {
                    spec_line = l.to_string();
                }
                let t = timings(&text(&out.stderr));
                let guest = t.get("boot").copied().unwrap_or(0.0)
                    + t.get("command").copied().unwrap_or(0.0);
                overhead.push(wall - guest);
                for (k, v) in t {
                    phases.entry(k).or_default().push(v);
                }
                walls.push(wall);
                // Each run starts cold and alone: the previous run's tap and NAT
                // release (done by the daemon after its reply) is finished first.
                let settled = inst.banger_direct(&["daemon", "settle"]);
                assert!(
                    settled.status.success(),
                    "settle: {}",
                    text(&settled.stderr)
                );
            }
        })
        .join()
        .expect("timed runs");
    });
    row(
        &mut table,
        "`vm run --rm -- true`, cold, wall",
        &walls,
        "ms",
    );
    row(
        &mut table,
        "banger overhead (wall - boot - command)",
        &overhead,
        "ms",
    );
    for (k, v) in &phases {
        row(&mut table, &format!("phase `{k}`"), v, "ms");
    }

    // 2: the same guest by a plain QEMU command line.
    // The reference is always the hand-written QEMU line, on a QEMU VM's
    // files.
    let out = inst.banger(&["vm", "create", "--name", "plain", "--vmm", "qemu"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = inst.banger(&["vm", "start", "plain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value =
        serde_json::from_slice(&inst.banger(&["vm", "show", "plain", "--json"]).stdout)
            .expect("json");
    let dir = PathBuf::from(info["vm_dir"].as_str().expect("vm_dir"));
    let kept = inst.dir.path().join("plain-initrd.img");
    std::fs::copy(dir.join("initrd.img"), &kept).expect("copy initrd");
    let out = inst.banger(&["vm", "stop", "plain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let guest_ip = info["guest_ip"].as_str().expect("ip").to_string();
    let host_ip = {
        let ip: std::net::Ipv4Addr = guest_ip.parse().expect("ipv4");
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    let img = inst.state().join("images/bookworm");
    let p = Plain {
        kernel: img.join("vmlinux"),
        initrd: kept,
        root: dir.join("root.qcow2"),
        work: dir.join("work.ext4"),
        known_hosts: dir.join("known_hosts"),
        alias: "plain".into(),
        key: PathBuf::from(info["ssh"]["key"].as_str().expect("key")),
        guest_ip,
        host_ip,
    };
    let plain: Vec<f64> = (0..runs).map(|_| plain_run(&inst, &p)).collect();
    row(
        &mut table,
        "plain QEMU command line to `ssh true`",
        &plain,
        "ms",
    );
    let (bm, _, _) = stats(&walls);
    let (pm, _, _) = stats(&plain);
    let ratio = format!(
        "| banger / plain (medians) | {:.2} | | | ratio | |\n",
        bm / pm
    );
    print!("{ratio}");
    table.push_str(&ratio);
    let _ = inst.banger(&["vm", "delete", "-f", "plain"]);

    // 4: N VMs started in parallel.
    let base_avail = mem_available_kib();
    let t = Instant::now();
    let children: Vec<_> = (0..parallel)
        .map(|i| {
            let name = format!("par-{i}");
            let mut a = vec!["vm", "run", "--name", &name];
            a.extend(&vmm_args);
            a.extend(["--", "true"]);
            inst.banger_cmd(&a)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn vm run")
        })
        .collect();
    let mut peak_used = 0u64;
    let mut peak_rss = 0u64;
    let mut pending = children;
    let mut failures = 0;
    while !pending.is_empty() {
        peak_used = peak_used.max(base_avail.saturating_sub(mem_available_kib()));
        peak_rss = peak_rss.max(vmm_rss_kib(&inst));
        let mut still = Vec::new();
        for mut c in pending {
            match c.try_wait() {
                Ok(Some(st)) => failures += usize::from(!st.success()),
                _ => still.push(c),
            }
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = t.elapsed().as_secs_f64() * 1e3;
    peak_rss = peak_rss.max(vmm_rss_kib(&inst));
    let par = format!(
        "| {parallel} × `vm run -- true` in parallel, wall | {wall:.0} | | | ms | {} ok |\n\
         | … peak host memory used (MemAvailable drop) | {:.0} | | | MiB | |\n\
         | … peak VMM resident memory, all VMs | {:.0} | | | MiB | |\n",
        parallel - failures,
        peak_used as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    print!("{par}");
    table.push_str(&par);
    for i in 0..parallel {
        let _ = inst.banger(&["vm", "delete", "-f", &format!("par-{i}")]);
    }
    agent::bench(&mut table, &inst, &vmm_args, 100);
    dns_bench(&mut table, &inst, 200);
    network_bench(&mut table, 20, 100);
    snapshots::bench(&mut table, &banger, runs);
    append(&table, &spec_line);
}

/// banger's DNS answer time as the host sees it: `n` queries for a VM's
/// name to the daemon's loopback listener, one at a time.
fn dns_bench(table: &mut String, inst: &Instance, n: usize) {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let out = inst.banger(&["vm", "create", "--name", "dnsbench"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut times = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.connect("127.0.0.153:53").expect("connect");
            let mut buf = [0u8; 512];
            for i in 0..n {
                let mut m = Message::query();
                m.metadata.id = i as u16;
                m.add_query(Query::query(
                    Name::from_ascii("dnsbench.vm.").unwrap(),
                    RecordType::A,
                ));
                let q = m.to_vec().unwrap();
                let t = Instant::now();
                sock.send(&q).expect("send");
                let got = sock.recv(&mut buf).expect("an answer");
                times.push(t.elapsed().as_secs_f64() * 1e6);
                let r = Message::from_vec(&buf[..got]).expect("a DNS answer");
                assert_eq!(r.answers.len(), 1, "dnsbench.vm resolves");
            }
        })
        .join()
        .expect("dns bench thread");
    });
    let _ = inst.banger(&["vm", "delete", "-f", "dnsbench"]);
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    row(table, "DNS answer, `<vm>.vm` from the host", &times, "µs");
    let line = format!("| … p99 | {p99:.1} | | | µs | {n} |\n");
    print!("{line}");
    table.push_str(&line);
}

/// Appends the table, dated and with the machine's description, to
/// docs/BENCHMARKS.md.
fn append(table: &str, spec_line: &str) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/BENCHMARKS.md");
    let date = text(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&doc)
        .expect("open docs/BENCHMARKS.md");
    let _ = write!(
        f,
        "\n## {}\n\nMachine: {}\n\nbanger's VMs: `{}`\n\n{}",
        date.trim(),
        machine(),
        spec_line.trim(),
        table
    );
    println!("\nappended to {}", doc.display());
}
