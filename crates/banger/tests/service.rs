//! banger as a service (issue 12): the config file and `config show`,
//! systemd's units (checked by systemd-analyze), socket activation (by
//! systemd-socket-activate, which hands bangerd its socket as systemd
//! does), the man pages (rendered by man), doctor's fixes. A daemon in a
//! namespace of the test's own, as in e2e.rs; these tests boot no guest.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn bangerd_bin() -> PathBuf {
    banger_bin().with_file_name("bangerd")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config(inst: &Instance) -> Vec<serde_json::Value> {
    let out = ok(&inst.banger(&["config", "show", "--json"]), "config show");
    serde_json::from_str(&out).unwrap()
}

fn entry<'a>(entries: &'a [serde_json::Value], key: &str) -> &'a serde_json::Value {
    entries.iter().find(|e| e["key"] == key).expect(key)
}

#[test]
fn the_config_file_and_where_each_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "# a user's settings\ntap_pool = 1\ndns_suffix = \"box\"\nmemory = \"700M\"\ncpus = 1\n",
    )
    .unwrap();
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_CONFIG", &file.to_string_lossy())
        .with_env("BANGER_BOOT_TIMEOUT", "99");
    let c = config(&inst);
    let from_file = format!("file {}", file.display());
    assert_eq!(entry(&c, "tap_pool")["value"], "1");
    assert_eq!(entry(&c, "tap_pool")["source"], from_file.as_str());
    assert_eq!(entry(&c, "dns_suffix")["value"], "box");
    assert_eq!(entry(&c, "boot_timeout")["value"], "99");
    assert_eq!(
        entry(&c, "boot_timeout")["source"],
        "env BANGER_BOOT_TIMEOUT"
    );
    assert_eq!(entry(&c, "subnet")["source"], "default");
    // The table says the same.
    let table = ok(&inst.banger(&["config", "show"]), "config show");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["dns_suffix", "box", "file", &file.to_string_lossy()]),
        "{table}"
    );
    // The file's sizes are a VM's defaults; its request still wins.
    ok(&inst.banger(&["vm", "create", "--name", "c1"]), "create");
    ok(
        &inst.banger(&["vm", "create", "--name", "c2", "--memory", "600M"]),
        "create",
    );
    let vms = test_infra::vm_list(&inst.banger(&["vm", "ls", "--json"]));
    let mem = |n: &str| {
        vms.iter().find(|v| v["name"] == n).unwrap()["memory_mib"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((mem("c1"), mem("c2")), (700, 600));
    ok(&inst.banger(&["vm", "rm", "c1", "c2"]), "rm");
    inst.settle();

    // A key the daemon does not know: it does not start, and says which.
    std::fs::write(&file, "tap_pool = 1\ndns_sufix = \"box\"\n").unwrap();
    inst.kill_daemon();
    let out = inst.banger(&["vm", "ls"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown key \"dns_sufix\""),
        "{err}"
    );
    std::fs::write(&file, "tap_pool = \"lots\"\n").unwrap();
    let out = inst.banger(&["vm", "ls"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tap_pool: invalid value 'lots'"),
        "{err}"
    );
    // This start's error only (not the failure before it), and no
    // terminal colour codes, in the CLI's message or in the log.
    assert!(
        !err.contains("dns_sufix"),
        "an earlier start's lines: {err}"
    );
    assert!(!err.contains('\x1b'), "colour codes: {err:?}");
    let log = std::fs::read_to_string(inst.state().join("bangerd.log")).unwrap();
    assert!(!log.contains('\x1b'), "colour codes in the log: {log:?}");
    std::fs::write(&file, "").unwrap();
    ok(&inst.banger(&["vm", "ls"]), "an empty file is fine");
    inst.assert_baseline();
}

#[test]
fn socket_activation_serves_on_the_socket_it_is_given() {
    let inst = Instance::new(&banger_bin());
    std::fs::create_dir_all(inst.runtime()).unwrap();
    let sock = inst.runtime().join("bangerd.sock");
    // As systemd's banger.socket does: the socket exists before bangerd,
    // which gets it as fd 3 on the first connection.
    let mut activator = inst
        .net
        .cmd("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .args(
            inst.env()
                .iter()
                .flat_map(|(k, v)| ["-E".to_string(), format!("{k}={v}")]),
        )
        .arg(bangerd_bin())
        .arg("--state-dir")
        .arg(inst.state())
        .arg("--runtime-dir")
        .arg(inst.runtime())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    // A failed assertion below must not leave the activator (or the
    // bangerd it became) running.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let reap = Reap(activator.id());
    assert!(
        wait_until(std::time::Duration::from_secs(10), || sock.exists()),
        "the activator made no socket"
    );
    let pid = inst.daemon_pid();
    // The daemon is the activator's process itself (it execs bangerd).
    assert_eq!(pid as u32, activator.id(), "bangerd got the socket");
    let status = ok(&inst.banger(&["daemon", "status", "--json"]), "status");
    assert!(status.contains("\"pid\""), "{status}");
    // SIGTERM: it exits, and leaves the socket, which is systemd's.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = activator.wait().unwrap();
    // Reaped: its pid is no longer ours to signal.
    std::mem::forget(reap);
    assert!(st.success(), "bangerd exits cleanly: {st:?}");
    assert!(sock.exists(), "the socket stays for the next activation");
    std::fs::remove_file(&sock).unwrap();
    inst.assert_baseline();
}

#[test]
fn systemd_units_and_man_pages_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    std::fs::create_dir_all(man.join("man1")).unwrap();
    std::fs::create_dir_all(man.join("man8")).unwrap();
    ok(
        &Command::new(banger_bin())
            .args(["internal", "man"])
            .arg(man.join("man1"))
            .output()
            .unwrap(),
        "internal man",
    );
    let page = ok(
        &Command::new(bangerd_bin())
            .arg("--print-man")
            .output()
            .unwrap(),
        "bangerd --print-man",
    );
    std::fs::write(man.join("man8/bangerd.8"), page).unwrap();
    let pages: Vec<String> = std::fs::read_dir(man.join("man1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [
        "banger.1",
        "banger-vm.1",
        "banger-vm-run.1",
        "banger-config-show.1",
    ] {
        assert!(pages.iter().any(|x| x == p), "{p} in {pages:?}");
    }
    assert!(
        !pages.iter().any(|p| p.contains("internal")),
        "hidden commands get no page: {pages:?}"
    );
    // man renders each without a warning.
    for p in ["man1/banger-vm-run.1", "man1/banger.1", "man8/bangerd.8"] {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(man.join(p))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        let rendered = ok(&out, p);
        assert!(text(&out.stderr).is_empty(), "{p}: {}", text(&out.stderr));
        assert!(rendered.contains("banger"), "{p}: {rendered}");
    }
    let run = String::from_utf8(
        Command::new("man")
            .arg("-l")
            .arg(man.join("man1/banger-vm-run.1"))
            .env("MANWIDTH", "100")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(run.contains("--detach") && run.contains("--rm"), "{run}");

    // The units, with ExecStart at the binary built here and the man
    // pages they name on MANPATH: systemd-analyze verifies both.
    for u in ["banger.socket", "banger.service"] {
        let body = std::fs::read_to_string(repo().join("packaging/systemd").join(u)).unwrap();
        let body = body.replace("/usr/bin/bangerd", &bangerd_bin().to_string_lossy());
        std::fs::write(dir.path().join(u), body).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("banger.socket"))
        .arg(dir.path().join("banger.service"))
        .env("MANPATH", &man)
        .output()
        .unwrap();
    ok(&out, "systemd-analyze verify");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let service = std::fs::read_to_string(dir.path().join("banger.service")).unwrap();
    for line in ["KillMode=process", "Delegate=yes", "Requires=banger.socket"] {
        assert!(service.contains(line), "{line}");
    }
    let socket = std::fs::read_to_string(dir.path().join("banger.socket")).unwrap();
    for line in [
        "SocketGroup=banger",
        "SocketMode=0660",
        "ListenStream=/run/banger/bangerd.sock",
    ] {
        assert!(socket.contains(line), "{line}");
    }
}

#[test]
fn doctor_says_the_command_that_fixes_each_finding() {
    let inst = Instance::new(&banger_bin());
    let out = ok(&inst.banger(&["doctor", "--json"]), "doctor");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let by = |n: &str| checks.iter().find(|c| c["name"] == n).expect(n).clone();
    // This instance has no socket group and no image.
    let g = by("socket group");
    assert_eq!(g["ok"], false);
    assert_eq!(
        g["fix"],
        "groupadd --system banger-test-no-group, then restart bangerd (`systemctl restart banger`)"
    );
    assert_eq!(by("image")["fix"], "banger image build");
    for c in &checks {
        if c["ok"] == true {
            assert!(c.get("fix").is_none(), "a passed check has no fix: {c}");
        }
    }
    let table = ok(&inst.banger(&["doctor"]), "doctor");
    assert!(table.contains("fix: banger image build"), "{table}");
    inst.assert_baseline();
}

#[test]
fn another_build_is_told_how_to_restart_the_daemon_and_stop_stops_it() {
    use std::io::{BufRead, Write};
    let inst = Instance::new(&banger_bin());
    let pid = inst.daemon_pid();
    // The daemon the CLI started leads a session of its own: no terminal's
    // hangup or job control reaches it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "session id (stat field 6): {stat}"
    );
    // A CLI of an older build (protocol 4), as bytes on the socket.
    let mut s =
        std::os::unix::net::UnixStream::connect(inst.runtime().join("bangerd.sock")).unwrap();
    s.write_all(b"{\"version\":4,\"request\":{\"op\":\"ping\"}}\n")
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["kind"], "version", "{line}");
    let msg = reply["message"].as_str().unwrap();
    for says in [
        "this CLI speaks protocol 4",
        &format!("pid {pid}"),
        &format!("protocol {}", banger_core::api::PROTOCOL_VERSION),
        "sudo systemctl restart banger",
        "sudo banger daemon stop",
    ] {
        assert!(msg.contains(says), "{says:?} in {msg}");
    }

    // daemon stop: it drains and exits; the lock is free after it.
    let out = inst.banger(&["daemon", "stop"]);
    assert_eq!(ok(&out, "daemon stop").trim(), pid.to_string());
    assert!(!banger_host::process::is_running(pid), "bangerd exited");
    let out = inst.banger(&["daemon", "stop"]);
    assert!(
        out.status.success() && text(&out.stderr).contains("not running"),
        "{out:?}"
    );
    assert_ne!(inst.daemon_pid(), pid, "the next command starts a new one");
    inst.assert_baseline();
}
