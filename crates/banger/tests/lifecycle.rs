//! The daemon's lifecycle end to end, with real guests in a network
//! namespace of the test's own: boots that are cancelled (by `vm kill`, by
//! `vm delete`, by a `vm run --rm` client interrupted or killed), ten boots
//! at once, the stats poller's TTL and idle auto-stop, `vm stats`,
//! `daemon status` and `vm logs`. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn state(inst: &Instance, name: &str) -> String {
    inst.vm(name)
        .map(|v| v["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| "gone".into())
}

/// Waits until the VM's boot is under way: its VMM runs and it is still
/// starting.
fn wait_booting(inst: &Instance, name: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || !inst.vmm_processes().is_empty()
            && state(inst, name) == "starting"),
        "{name} never started booting: {:?}",
        inst.vms()
    );
}

/// `vm kill` and `vm delete` end a boot in progress: the boot is cancelled
/// and rolled back (its `vm run` fails saying so), nothing it acquired is
/// left. How long the cancel took is printed (a measurement, not a check).
#[test]
fn kill_and_delete_cancel_a_boot_in_progress() {
    let inst = Instance::new(&banger_bin()).with_image();
    let run = inst.spawn(&["vm", "run", "--name", "slow", "--", "true"]);
    wait_booting(&inst, "slow");
    let t = Instant::now();
    let out = inst.banger(&["vm", "kill", "slow"]);
    eprintln!("vm kill of a booting VM took {:?}", t.elapsed());
    ok(&out, "vm kill during boot");
    let out = test_infra::bounded::wait_output(run);
    assert!(!out.status.success(), "the cancelled run fails");
    assert!(
        text(&out.stderr).contains("cancelled"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(state(&inst, "slow"), "stopped");
    assert!(inst.vmm_processes().is_empty());
    let vm = inst.vm("slow").unwrap();
    assert!(
        vm["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled"),
        "{vm}"
    );
    inst.settle();
    assert!(inst.taps().is_empty(), "{:?}", inst.taps());

    // Started again, and deleted while it boots.
    let start = inst.spawn(&["vm", "start", "slow"]);
    wait_booting(&inst, "slow");
    let t = Instant::now();
    ok(
        &inst.banger(&["vm", "delete", "-f", "slow"]),
        "vm delete during boot",
    );
    eprintln!("vm delete of a booting VM took {:?}", t.elapsed());
    let out = test_infra::bounded::wait_output(start);
    assert!(!out.status.success(), "the cancelled start fails");
    inst.assert_baseline();
}

/// `--rm` is the daemon's job: a `vm run --rm` interrupted during its boot
/// (Ctrl-C) cancels the boot and the VM goes; one killed while its command
/// runs in the guest takes the VM with it too.
#[test]
fn run_rm_clients_that_go_away_take_their_vm_with_them() {
    let inst = Instance::new(&banger_bin()).with_image();
    let run = inst.spawn(&["vm", "run", "--rm", "--name", "intr", "--", "true"]);
    wait_booting(&inst, "intr");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status();
    let out = test_infra::bounded::wait_output(run);
    assert!(!out.status.success());
    assert!(
        wait_until(Duration::from_secs(30), || inst.vm("intr").is_none()),
        "the interrupted run's VM is deleted: {:?}",
        inst.vms()
    );
    inst.assert_baseline();

    // Up and running its command: the client is killed outright.
    let mut run = inst.spawn(&["vm", "run", "--rm", "--name", "lease", "--", "sleep", "600"]);
    assert!(
        wait_until(Duration::from_secs(60), || state(&inst, "lease")
            == "running"),
        "{:?}",
        inst.vms()
    );
    let _ = run.kill();
    let _ = run.wait();
    assert!(
        wait_until(Duration::from_secs(30), || inst.vm("lease").is_none()),
        "the killed client's VM is deleted: {:?}",
        inst.vms()
    );
    inst.assert_baseline();
}

/// `--rm` outlives the daemon that served it: a daemon killed while the
/// command runs leaves the VM to the next one, which deletes it once the
/// client process is gone (it waits for a client still running its
/// command; one gone already, at once). The command's status is still
/// the client's.
#[test]
fn rm_is_kept_across_a_daemon_crash() {
    use std::io::{BufRead, BufReader, Write};
    let inst = Instance::new(&banger_bin()).with_image();
    let mut run = inst
        .banger_cmd(&[
            "vm",
            "run",
            "--rm",
            "--name",
            "dur",
            "--",
            "sh",
            "-c",
            "echo up; read x; exit 7",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    inst.kill_daemon();
    inst.daemon_pid();
    // The next daemon keeps it while its client runs the command.
    assert_eq!(state(&inst, "dur"), "running", "{:?}", inst.vms());
    run.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let done = test_infra::bounded::wait_output(run);
    let err = text(&done.stderr);
    assert_eq!(done.status.code(), Some(7), "{err}");
    assert!(err.contains("bangerd went while the command ran"), "{err}");
    assert!(
        wait_until(Duration::from_secs(30), || inst.vm("dur").is_none()),
        "the --rm VM outlived its client: {:?}",
        inst.vms()
    );
    inst.assert_baseline();

    // A client killed while no daemon ran: deleted by the next at once.
    let mut run = inst.spawn(&["vm", "run", "--rm", "--name", "dur2", "--", "sleep", "600"]);
    assert!(
        wait_until(Duration::from_secs(60), || state(&inst, "dur2")
            == "running"),
        "{:?}",
        inst.vms()
    );
    inst.kill_daemon();
    let _ = run.kill();
    let _ = run.wait();
    inst.daemon_pid();
    assert!(
        wait_until(Duration::from_secs(30), || inst.vm("dur2").is_none()),
        "the --rm VM of a client gone is kept: {:?}",
        inst.vms()
    );
    inst.assert_baseline();
}

/// Ten `vm run` at once all succeed with distinct names, addresses and
/// taps, and `vm ls` answers while they boot (it returns VMs still
/// starting: it did not wait for the boots).
#[test]
fn ten_runs_at_once_and_ls_answers_during_the_boots() {
    let inst = Instance::new(&banger_bin()).with_image();
    let _ = inst.daemon_pid();
    let names: Vec<String> = (0..10).map(|i| format!("par{i}")).collect();
    let runs: Vec<Child> = names
        .iter()
        .map(|n| {
            inst.spawn(&[
                "vm", "run", "--name", n, "--memory", "384M", "--", "hostname",
            ])
        })
        .collect();
    let mut saw_starting = false;
    assert!(
        wait_until(Duration::from_secs(60), || {
            let vms = inst.vms();
            saw_starting = vms.iter().any(|v| v["state"] == "starting");
            saw_starting
        }),
        "vm ls never showed a VM while it booted"
    );
    for (n, r) in names.iter().zip(runs) {
        let out = test_infra::bounded::wait_output(r);
        assert_eq!(ok(&out, "parallel vm run").trim(), n);
    }
    let vms = inst.vms();
    assert_eq!(vms.len(), 10);
    let mut ips: Vec<&str> = vms
        .iter()
        .map(|v| v["guest_ip"].as_str().unwrap())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    assert_eq!(ips.len(), 10, "distinct addresses");
    assert_eq!(inst.taps().len(), 10, "a tap each");
    let mut args = vec!["vm", "delete", "-f"];
    args.extend(names.iter().map(String::as_str));
    ok(&inst.banger(&args), "delete all");
    inst.assert_baseline();
}

/// The stats poller's TTL and idle timeout stop their VMs through the same
/// path as `vm stop` (clean, everything released, LastError saying which
/// limit).
#[test]
fn ttl_and_idle_timeout_stop_their_vms() {
    let inst = Instance::new(&banger_bin()).with_image();
    let _ = inst.daemon_pid();
    let runs = [
        inst.spawn(&["vm", "run", "--name", "ttl", "--ttl", "5s", "--", "true"]),
        inst.spawn(&[
            "vm",
            "run",
            "--name",
            "idle",
            "--idle-timeout",
            "4s",
            "--",
            "true",
        ]),
    ];
    for r in runs {
        ok(&test_infra::bounded::wait_output(r), "vm run");
    }
    for (name, why) in [("ttl", "TTL (5s)"), ("idle", "idle for 4s")] {
        assert!(
            wait_until(Duration::from_secs(90), || state(&inst, name) == "stopped"),
            "{name} was not stopped: {:?}",
            inst.vm(name)
        );
        let vm = inst.vm(name).unwrap();
        let err = vm["last_error"].as_str().unwrap_or("");
        assert!(err.contains(why), "{name}: {err}");
    }
    inst.settle();
    assert!(inst.taps().is_empty(), "auto-stop released the taps");
    assert!(inst.vmm_processes().is_empty());
    let out = inst.banger(&["vm", "stats", "ttl"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is stopped"), "{out:?}");
    ok(
        &inst.banger(&["vm", "delete", "-f", "ttl", "idle"]),
        "delete",
    );
    inst.assert_baseline();
}

/// `vm stats` and `daemon status` report on a running VM; `vm logs` shows
/// the guest console with control characters escaped, and the console log
/// stays bounded however much the guest prints.
#[test]
fn stats_status_and_logs_escaped_and_bounded() {
    let inst = Instance::new(&banger_bin()).with_image();
    let max = 64 * 1024;
    let out = inst
        .banger_cmd(&["daemon", "ping"])
        .env("BANGER_CONSOLE_MAX_BYTES", max.to_string())
        .output()
        .unwrap();
    ok(&out, "start a daemon with a small console bound");
    ok(
        &inst.banger(&["vm", "run", "--name", "noisy", "--", "true"]),
        "vm run",
    );
    // (The command ran over vsock; ssh puts traffic on the tap.)
    ok(
        &inst.banger(&["vm", "ssh", "noisy", "--", "true"]),
        "vm ssh",
    );
    let out = inst.banger(&["vm", "stats", "noisy", "--json"]);
    let stats: Vec<serde_json::Value> = serde_json::from_str(&ok(&out, "vm stats")).unwrap();
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert_eq!(s["name"], "noisy");
    assert!(s["rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    // Its cgroup: in use, below its limit of the VM's memory plus the
    // VMM's overhead.
    let limit = s["memory_limit_bytes"].as_u64().unwrap();
    let used = s["cgroup_memory_bytes"].as_u64().unwrap();
    let mib_of = |v: u64| v >> 20;
    assert!(used > 1 << 20 && used < limit, "{s}");
    assert_eq!(
        mib_of(limit),
        inst.vm("noisy").unwrap()["memory_mib"].as_u64().unwrap()
            + bangerd::config::DEFAULT_VMM_MEMORY_OVERHEAD_MIB,
        "{s}"
    );
    assert!(s["disk_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cpu_secs"].as_f64().unwrap() > 0.0, "{s}");
    // The guest's own numbers, from its agent: at most the VM's memory
    // (the kernel keeps some), and a few processes.
    let g = &s["guest"];
    let total = g["mem_total_bytes"].as_u64().expect("the agent's sample");
    let mib = inst.vm("noisy").unwrap()["memory_mib"].as_u64().unwrap();
    assert!(total > (mib << 20) / 2 && total <= mib << 20, "{s}");
    assert!(g["mem_available_bytes"].as_u64().unwrap() < total, "{s}");
    assert!(g["processes"].as_u64().unwrap() > 3, "{s}");
    assert!(
        s["net_rx_bytes"].as_u64().unwrap() > 0,
        "ssh went through the tap: {s}"
    );
    let table = ok(&inst.banger(&["vm", "stats"]), "vm stats table");
    assert!(
        table.starts_with("NAME") && table.contains("noisy"),
        "{table}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&inst.banger(&["daemon", "status", "--json"]), "status")).unwrap();
    assert_eq!(st["pid"].as_i64().unwrap(), i64::from(inst.daemon_pid()));
    assert_eq!(st["protocol"], banger_core::api::PROTOCOL_VERSION);
    assert_eq!(st["vms"], serde_json::json!([["running", 1]]), "{st}");
    assert_eq!(st["pending_releases"], 0);
    ok(
        &inst.banger(&[
            "vm",
            "ssh",
            "noisy",
            "--",
            "sh",
            "-c",
            "printf 'evil\\033]0;pwned\\007\\033[2Jdone\\n' > /dev/ttyS0",
        ]),
        "write to the console",
    );
    let logs = ok(&inst.banger(&["vm", "logs", "noisy"]), "vm logs");
    assert!(
        logs.contains("banger-agent: listening"),
        "the agent's line: {logs}"
    );
    assert!(
        logs.contains("evil\\x1b]0;pwned\\x07\\x1b[2Jdone"),
        "escaped: {logs:?}"
    );
    assert!(!logs.contains('\u{1b}'), "no raw escape reaches a terminal");

    // A guest that prints on: bursts of 100 KB, each time until the daemon
    // has rotated the log; on disk it never holds more than the two files'
    // bound plus a burst.
    let id = inst.vm("noisy").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = inst.state().join("vms").join(&id).join("console.log");
    let older = inst.state().join("vms").join(&id).join("console.log.1");
    let burst = 100_000u64;
    let mut written = 0;
    for _ in 0..4 {
        ok(
            &inst.banger(&[
                "vm",
                "ssh",
                "noisy",
                "--",
                "sh",
                "-c",
                &format!("head -c {burst} /dev/zero | tr '\\0' x > /dev/ttyS0"),
            ]),
            "a burst on the console",
        );
        written += burst;
        assert!(
            wait_until(Duration::from_secs(30), || std::fs::metadata(&log)
                .map(|m| m.len() <= max)
                .unwrap_or(false)),
            "the console log was not rotated"
        );
        let kept = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(&older).map(|m| m.len()).unwrap_or(0);
        assert!(
            kept <= 2 * max + burst,
            "{kept} bytes kept after {written} written"
        );
    }
    // `vm logs -f` follows what the guest writes, and ends when the VM
    // stops.
    let mut follow = inst
        .banger_cmd(&["vm", "logs", "-f", "noisy"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    ok(
        &inst.banger(&[
            "vm",
            "ssh",
            "noisy",
            "--",
            "sh",
            "-c",
            "echo followed-line > /dev/ttyS0",
        ]),
        "write a line to follow",
    );
    // (Bounded: a follower that never shows the line fails, not hangs.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if l.contains("followed-line") {
            seen = true;
            break;
        }
    }
    assert!(seen, "vm logs -f never showed the new line");
    ok(&inst.banger(&["vm", "stop", "noisy"]), "stop");
    let st = follow.wait().unwrap();
    assert!(st.success(), "vm logs -f ends cleanly when the VM stops");
    ok(&inst.banger(&["vm", "delete", "-f", "noisy"]), "delete");
    inst.assert_baseline();
}

/// The tap pool (`BANGER_TAP_POOL`): spares are made warm, a start takes
/// one (and the pool is refilled), a release gives it back or deletes it,
/// a clean shutdown deletes the spares, and after a crash the next daemon
/// does.
#[test]
fn a_warm_tap_pool_hands_out_and_takes_back_taps() {
    let inst = Instance::new(&banger_bin()).with_image();
    let pooled_daemon = || {
        let out = inst
            .banger_cmd(&["daemon", "ping"])
            .env("BANGER_TAP_POOL", "2")
            .output()
            .unwrap();
        ok(&out, "a daemon with a pool of two taps");
        assert!(
            wait_until(Duration::from_secs(10), || inst.taps().len() == 2),
            "{:?}",
            inst.taps()
        );
    };
    pooled_daemon();
    let spares = inst.taps();
    ok(
        &inst.banger(&["vm", "run", "--name", "w", "--", "true"]),
        "run",
    );
    let ip = inst.vm("w").unwrap()["guest_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let rules = inst.net.ruleset();
    let used = spares
        .iter()
        .find(|t| rules.contains(&format!("\"{t}\" . {ip}")))
        .unwrap_or_else(|| panic!("w's tap is not one of the spares {spares:?}:\n{rules}"));
    assert!(
        wait_until(Duration::from_secs(10), || inst.taps().len() == 3),
        "the pool is refilled: {:?}",
        inst.taps()
    );
    ok(&inst.banger(&["vm", "delete", "-f", "w"]), "delete");
    inst.settle();
    let left = inst.taps();
    assert_eq!(left.len(), 2, "back to the pool's size: {left:?}");
    let _ = used;

    // A clean shutdown deletes the spares.
    let pid = inst.daemon_pid();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(30), || inst.taps().is_empty()),
        "spares left after a clean shutdown: {:?}",
        inst.taps()
    );
    // After a crash, the next daemon (without a pool) deletes them.
    pooled_daemon();
    inst.kill_daemon();
    assert_eq!(inst.taps().len(), 2);
    inst.assert_baseline();
}
