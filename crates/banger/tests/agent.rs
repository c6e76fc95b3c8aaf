//! The guest agent on real guests, over vsock (QEMU's vhost-user-vsock
//! served by vhost-device-vsock), through the CLI: `vm exec` (exit codes,
//! signals, separate streams, binary data both ways, 100 MB out, a PTY
//! whose resizes the guest sees, concurrent execs, detached processes),
//! `vm cp` (trees both ways, modes kept, tar streams), the agent killed
//! and back, the daemon restarted under a running VM, and vsock CIDs never
//! shared by live VMs (also across a daemon restart). Needs root;
//! `scripts/test.sh` runs it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn exec(inst: &Instance, args: &[&str]) -> std::process::Output {
    let mut a = vec!["vm", "exec"];
    a.extend_from_slice(args);
    inst.banger(&a)
}

fn cid(inst: &Instance, name: &str) -> u64 {
    inst.vm(name)
        .and_then(|v| v["vsock_cid"].as_u64())
        .unwrap_or_else(|| panic!("vm {name} has no vsock cid: {:?}", inst.vm(name)))
}

#[test]
fn exec_streams_signals_and_detached_processes() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", "a", "--", "true"]),
        "vm run",
    );

    let out = exec(
        &inst,
        &["a", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("out\n".into(), "err\n".into(), Some(7)),
        "separate streams and the exit code"
    );
    let out = exec(&inst, &["a", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "a signal is 128 + its number"
    );
    let out = exec(
        &inst,
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "-u",
            "nobody",
            "a",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "hi there\n/tmp\n65534\n",
        "{}",
        text(&out.stderr)
    );
    let out = exec(&inst, &["a", "--", "/no/such/program"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/no/such/program"),
        "{}",
        text(&out.stderr)
    );

    // Binary data in and out, byte for byte.
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut child = inst
        .banger_cmd(&["vm", "exec", "-i", "a", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&feed));
    let out = test_infra::bounded::wait_output(child);
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        out.stdout == data,
        "binary stdin came back as it went ({} bytes)",
        out.stdout.len()
    );

    // 100 MB of output, counted as it streams.
    let mut child = inst
        .banger_cmd(&[
            "vm",
            "exec",
            "a",
            "--",
            "head",
            "-c",
            "100000000",
            "/dev/zero",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut so = child.stdout.take().unwrap();
    loop {
        let k = so.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        assert!(buf[..k].iter().all(|&b| b == 0));
        n += k as u64;
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(n, 100_000_000);

    // Several at once.
    let runs: Vec<_> = (0..4)
        .map(|i| {
            inst.spawn(&[
                "vm",
                "exec",
                "a",
                "--",
                "sh",
                "-c",
                &format!("sleep 1; echo {i}"),
            ])
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = test_infra::bounded::wait_output(r);
        assert_eq!(text(&out.stdout), format!("{i}\n"), "{}", text(&out.stderr));
    }

    // Detached: listed, its kept output read by attaching, signalled by
    // tag.
    let out = exec(
        &inst,
        &[
            "-d",
            "--tag",
            "srv",
            "a",
            "--",
            "sh",
            "-c",
            "echo hello; touch /tmp/srv-up; exec sleep 600",
        ],
    );
    let pid: u32 = ok(&out, "exec -d")
        .trim()
        .parse()
        .expect("exec -d prints the pid");
    // Signalled only once it has printed (the file comes after the echo).
    assert!(
        wait_until(Duration::from_secs(30), || exec(
            &inst,
            &["a", "--", "test", "-e", "/tmp/srv-up"]
        )
        .status
        .success()),
        "the detached process never ran"
    );
    let ps: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&inst.banger(&["vm", "ps", "a", "--json"]), "vm ps")).unwrap();
    let p = ps.iter().find(|p| p["pid"] == pid).expect("listed");
    assert_eq!(
        (p["tag"].as_str(), p["detached"].as_bool()),
        (Some("srv"), Some(true))
    );
    ok(
        &inst.banger(&["vm", "signal", "a", "srv", "-s", "KILL"]),
        "vm signal",
    );
    let out = inst.banger(&["vm", "attach", "a", &pid.to_string()]);
    assert_eq!(text(&out.stdout), "hello\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = inst.banger(&["vm", "signal", "a", "nosuch"]);
    assert!(
        text(&out.stderr).contains("no process with tag"),
        "{}",
        text(&out.stderr)
    );

    ok(&inst.banger(&["vm", "delete", "-f", "a"]), "delete");
    inst.assert_baseline();
}

/// `vm exec -t` in a real terminal: the guest's process has a PTY, and a
/// resize of the host's terminal reaches it (SIGWINCH in the guest).
#[test]
fn a_pty_follows_the_terminal_size() {
    use std::os::unix::process::CommandExt;
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", "t", "--", "true"]),
        "vm run",
    );
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = inst.banger_cmd(&[
        "vm",
        "exec",
        "-it",
        "t",
        "--",
        "sh",
        "-c",
        "tty; stty size; trap 'stty size; exit 0' WINCH; echo waiting; while :; do sleep 0.1; done",
    ]);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY between fork and exec: the CLI gets the
    // PTY as its controlling terminal, as in a real terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::libc::setsid();
            nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut resized = false;
    while !seen.contains("40 100") {
        let n = master.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "the terminal closed before the resize was seen: {seen:?}"
        );
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if !resized && seen.contains("waiting") {
            let ws = nix::libc::winsize {
                ws_row: 40,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize from a live local.
            unsafe {
                nix::libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&master),
                    nix::libc::TIOCSWINSZ,
                    &ws,
                )
            };
            resized = true;
        }
    }
    assert!(child.wait().unwrap().success(), "{seen}");
    assert!(
        seen.contains("/dev/pts/"),
        "tty says it is a terminal: {seen:?}"
    );
    assert!(seen.contains("24 80"), "the first size: {seen:?}");
    ok(&inst.banger(&["vm", "delete", "-f", "t"]), "delete");
    inst.assert_baseline();
}

#[test]
fn trees_copy_both_ways_and_the_agent_and_daemon_come_back() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "--name", "c", "--", "true"]),
        "vm run",
    );

    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/secret"), b"\x00\x01binary\xff").unwrap();
    std::fs::set_permissions(
        tree.join("sub/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(tree.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("run.sh", tree.join("link")).unwrap();

    ok(
        &inst.banger(&["vm", "cp", tree.to_str().unwrap(), "c:/root/"]),
        "cp in",
    );
    let out = exec(&inst, &["c", "--", "sh", "-c", "cd /root/tree && stat -c '%a %n' sub sub/secret run.sh && readlink link && ./link && od -An -tx1 sub/secret"]);
    assert_eq!(
        text(&out.stdout),
        "750 sub\n600 sub/secret\n755 run.sh\nrun.sh\nran\n 00 01 62 69 6e 61 72 79 ff\n",
        "{}",
        text(&out.stderr)
    );
    // Renamed on the way in (the destination does not exist).
    ok(
        &inst.banger(&[
            "vm",
            "cp",
            tree.join("run.sh").to_str().unwrap(),
            "c:/tmp/renamed",
        ]),
        "cp file in",
    );
    assert_eq!(
        text(&exec(&inst, &["c", "--", "cat", "/tmp/renamed"]).stdout),
        "#!/bin/sh\necho ran\n"
    );

    // Out again, into a new name.
    let back = local.path().join("back");
    ok(
        &inst.banger(&["vm", "cp", "c:/root/tree", back.to_str().unwrap()]),
        "cp out",
    );
    assert_eq!(
        std::fs::read(back.join("sub/secret")).unwrap(),
        b"\x00\x01binary\xff"
    );
    let mode = |p: PathBuf| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(back.join("sub/secret")), 0o600);
    assert_eq!(mode(back.join("sub")), 0o750);
    assert_eq!(mode(back.join("run.sh")), 0o755);
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        PathBuf::from("run.sh")
    );
    assert!(
        std::fs::read_dir(local.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".banger-cp")),
        "no scratch left"
    );
    // A hostile guest cannot plant a setuid file on the host.
    let out = exec(
        &inst,
        &[
            "c",
            "--",
            "sh",
            "-c",
            "cp /bin/true /root/suid && chmod 4755 /root/suid",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    ok(
        &inst.banger(&["vm", "cp", "c:/root/suid", local.path().to_str().unwrap()]),
        "cp suid out",
    );
    let m = std::fs::metadata(local.path().join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(m & 0o7777, 0o755, "setuid dropped, the rest kept: {m:o}");
    // A tar stream on stdout.
    let out = inst.banger(&["vm", "cp", "c:/etc/hostname", "-"]);
    let mut ar = tar::Archive::new(&out.stdout[..]);
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_string_lossy(), "hostname");
    let mut s = String::new();
    e.read_to_string(&mut s).unwrap();
    assert_eq!(s, "c\n");
    let out = inst.banger(&["vm", "cp", "c:/no/such", local.path().to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("/no/such"),
        "{}",
        text(&out.stderr)
    );

    // The agent killed: init starts it again, and calls work again. (By
    // its name through /proc: the image's busybox has no pkill.)
    let agent_pid = || {
        let out = exec(
            &inst,
            &[
                "c",
                "--",
                "/bin/sh",
                "-c",
                "for p in /proc/[0-9]*; do \
                 [ \"$(cat $p/comm 2>/dev/null)\" = agent ] && echo ${p#/proc/}; done; true",
            ],
        );
        ok(&out, "the agent's pid").trim().to_string()
    };
    let before = agent_pid();
    assert!(!before.is_empty() && !before.contains('\n'), "{before:?}");
    let _ = exec(&inst, &["c", "--", "kill", "-9", &before]);
    assert!(
        wait_until(Duration::from_secs(30), || exec(
            &inst,
            &["c", "--", "true"]
        )
        .status
        .success()),
        "the agent did not come back"
    );
    let after = agent_pid();
    assert!(
        !after.is_empty() && after != before,
        "the agent was not killed and started again: {before} then {after}"
    );
    // The daemon killed and back: the VM's agent answers the new one.
    let before = cid(&inst, "c");
    inst.kill_daemon();
    assert_eq!(text(&exec(&inst, &["c", "--", "hostname"]).stdout), "c\n");
    assert_eq!(cid(&inst, "c"), before, "the CID is durable");

    // Identity and clock at runtime (what a restored clone will need),
    // straight on the VM's vsock socket as the daemon speaks to it.
    let id = inst.vm("c").unwrap()["id"].as_str().unwrap().to_string();
    let uds = inst.runtime().join("vms").join(&id).join("vsock.sock");
    let try_call = |c: banger_agent::proto::Call| {
        let s = banger_agent::connect(
            &uds,
            banger_agent::proto::AGENT_PORT,
            Duration::from_secs(10),
        )
        .expect("connect to the agent");
        banger_agent::client::call(s, c)
    };
    let call = |c: banger_agent::proto::Call| try_call(c).expect("agent call");
    let ident = banger_agent::proto::Identity {
        hostname: Some("renamed".into()),
        ..Default::default()
    };
    assert_eq!(
        call(banger_agent::proto::Call::SetIdentity(ident)),
        banger_agent::proto::Msg::Done
    );
    assert_eq!(
        text(&exec(&inst, &["c", "--", "hostname"]).stdout),
        "renamed\n"
    );
    assert_eq!(
        text(&exec(&inst, &["c", "--", "cat", "/etc/hostname"]).stdout),
        "renamed\n"
    );
    let bad = banger_agent::proto::Identity {
        hostname: Some("a;reboot".into()),
        ..Default::default()
    };
    assert!(try_call(banger_agent::proto::Call::SetIdentity(bad)).is_err());
    // 2033-05-18: the guest's clock follows.
    let t = 2_000_000_000u64 * 1_000_000_000;
    assert_eq!(
        call(banger_agent::proto::Call::SetClock { unix_ns: t }),
        banger_agent::proto::Msg::Done
    );
    let year = text(&exec(&inst, &["c", "--", "date", "-u", "+%Y"]).stdout);
    assert_eq!(year, "2033\n");
    match call(banger_agent::proto::Call::Stats) {
        banger_agent::proto::Msg::Stats(st) => assert!(st.mem_total_kib > 0 && st.processes > 3),
        m => panic!("{m:?}"),
    }

    // A clone's identity: scrambled as a guest restored from another VM's
    // snapshot would be (its address, MAC, resolver, machine id), then
    // `reidentify` gives it this VM's again, from the VM's record.
    let guest = |cmd: &[&str]| {
        let mut args = vec!["c", "--"];
        args.extend_from_slice(cmd);
        text(&exec(&inst, &args).stdout)
    };
    let mac = guest(&["cat", "/sys/class/net/eth0/address"]);
    let resolv = guest(&["cat", "/etc/resolv.conf"]);
    let ip = inst.vm("c").unwrap()["guest_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let template = banger_agent::proto::Identity {
        address: Some(("10.99.0.2/30".into(), "10.99.0.1".into())),
        mac: Some("02:aa:bb:cc:dd:ee".into()),
        nameservers: Some(vec!["10.99.0.1".into()]),
        machine_id: Some("0".repeat(32)),
        entropy: Some(vec![7; 32]),
        ..Default::default()
    };
    assert_eq!(
        call(banger_agent::proto::Call::SetIdentity(template)),
        banger_agent::proto::Msg::Done
    );
    assert_eq!(
        guest(&["cat", "/sys/class/net/eth0/address"]),
        "02:aa:bb:cc:dd:ee\n"
    );
    assert!(guest(&[
        "/usr/lib/banger/busybox",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0"
    ])
    .contains("10.99.0.2/30"));
    // Refused whole: a multicast MAC, four nameservers, too little
    // entropy, a machine id that is not hex; nothing of it is applied.
    for bad in [
        banger_agent::proto::Identity {
            hostname: Some("half".into()),
            mac: Some("01:00:5e:00:00:01".into()),
            ..Default::default()
        },
        banger_agent::proto::Identity {
            hostname: Some("half".into()),
            nameservers: Some(vec!["10.0.0.1".into(); 4]),
            ..Default::default()
        },
        banger_agent::proto::Identity {
            hostname: Some("half".into()),
            entropy: Some(vec![1; 8]),
            ..Default::default()
        },
        banger_agent::proto::Identity {
            hostname: Some("half".into()),
            machine_id: Some("../../etc/passwd".into()),
            ..Default::default()
        },
    ] {
        let r = try_call(banger_agent::proto::Call::SetIdentity(bad.clone()));
        assert!(r.is_err(), "{bad:?}: {r:?}");
    }
    assert_eq!(guest(&["hostname"]), "renamed\n");

    ok(&inst.banger(&["internal", "reidentify", "c"]), "reidentify");
    assert_eq!(guest(&["hostname"]), "c\n");
    assert_eq!(guest(&["cat", "/sys/class/net/eth0/address"]), mac);
    assert!(
        guest(&[
            "/usr/lib/banger/busybox",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0"
        ])
        .contains(&format!("{ip}/30")),
        "{}",
        guest(&[
            "/usr/lib/banger/busybox",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0"
        ])
    );
    assert_eq!(guest(&["cat", "/etc/resolv.conf"]), resolv);
    let machine_id = guest(&["cat", "/etc/machine-id"]);
    assert!(
        machine_id.trim().len() == 32 && machine_id.trim() != "0".repeat(32),
        "{machine_id}"
    );
    // Reachable again over its network, with its pinned host key.
    assert_eq!(
        ok(
            &inst.banger(&["vm", "ssh", "c", "--", "hostname"]),
            "ssh after reidentify"
        ),
        "c\n"
    );
    // A stopped VM's guest cannot be re-identified.
    ok(&inst.banger(&["vm", "stop", "c"]), "stop");
    let out = inst.banger(&["internal", "reidentify", "c"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("only a running VM"),
        "{out:?}"
    );

    ok(&inst.banger(&["vm", "delete", "-f", "c"]), "delete");
    inst.assert_baseline();
}

#[test]
fn live_vms_never_share_a_cid_even_across_a_daemon_restart() {
    let inst = Instance::new(&banger_bin()).with_image();
    let runs: Vec<_> = ["x", "y"]
        .iter()
        .map(|n| inst.spawn(&["vm", "run", "--name", n, "--", "true"]))
        .collect();
    for r in runs {
        let out = test_infra::bounded::wait_output(r);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let (x, y) = (cid(&inst, "x"), cid(&inst, "y"));
    assert_ne!(x, y);
    assert!(x >= 3 && y >= 3, "0-2 are reserved");
    inst.kill_daemon();
    ok(
        &inst.banger(&["vm", "run", "--name", "z", "--", "true"]),
        "vm run z",
    );
    let z = cid(&inst, "z");
    assert!(z != x && z != y, "z got {z}, x has {x}, y has {y}");
    // Each guest answers on its own socket with its own name.
    for n in ["x", "y", "z"] {
        assert_eq!(
            text(&exec(&inst, &[n, "--", "hostname"]).stdout),
            format!("{n}\n")
        );
    }
    // A stopped VM gives its CID back; a new VM may take it.
    ok(&inst.banger(&["vm", "stop", "x"]), "stop x");
    assert_eq!(inst.vm("x").unwrap()["vsock_cid"], serde_json::Value::Null);
    let out = exec(&inst, &["x", "--", "true"]);
    assert!(
        text(&out.stderr).contains("stopped"),
        "exec in a stopped VM: {}",
        text(&out.stderr)
    );
    ok(
        &inst.banger(&["vm", "delete", "-f", "x", "y", "z"]),
        "delete",
    );
    inst.assert_baseline();
}
