//! What a new user hits in the first hour (issue 24), each on a real
//! guest in a namespace of the test's own, as in e2e.rs: every vCPU
//! asked for, `exec -it` without a terminal, a working directory that
//! cannot be entered, `attach` that does not own its process, a command
//! told why its VM went.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// The guest sees every vCPU it was given (1 keeps `pci=noacpi`, which
/// saves its boot 0.4 s; more must not lose it their CPUs).
#[test]
fn the_guest_sees_every_vcpu_it_is_given() {
    let inst = Instance::new(&banger_bin()).with_image();
    for (cpus, online, noacpi) in [("2", "0-1", false), ("1", "0", true)] {
        let out = inst.banger(&[
            "vm",
            "run",
            "--rm",
            "--cpus",
            cpus,
            "--",
            "sh",
            "-c",
            "nproc; cat /sys/devices/system/cpu/online; cat /proc/cmdline",
        ]);
        let got = ok(&out, "vm run --cpus");
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(&lines[..2], &[cpus, online], "{got}");
        assert_eq!(lines[2].contains("pci=noacpi"), noacpi, "{got}");
    }
    // The phases named (on the spinner, and by --timings) are those that
    // ran: a VM without volumes, mounts or ports has no such phase.
    let out = inst.banger(&["vm", "run", "--rm", "--timings", "--", "true"]);
    ok(&out, "vm run --timings");
    let err = text(&out.stderr);
    let phases: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("timing "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        phases.contains(&"network") && phases.contains(&"boot"),
        "{err}"
    );
    for idle in ["volumes", "virtiofs", "ports"] {
        assert!(!phases.contains(&idle), "{idle} did nothing: {err}");
    }
    inst.assert_baseline();
}

#[test]
fn exec_names_what_is_wrong_instead_of_hanging_or_blaming_the_command() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "ex"]),
        "vm run -d",
    );

    // -it with a pipe or /dev/null for input: refused at once, as docker's.
    let out = inst.banger(&["vm", "exec", "-it", "ex", "--", "bash"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the input is not a terminal"),
        "{err}"
    );
    assert!(err.contains("leave out -t"), "{err}");
    // From a pipe too, not only /dev/null.
    let mut child = inst
        .banger_cmd(&["vm", "exec", "-it", "ex", "--", "bash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _held_open = child.stdin.take();
    let out = test_infra::bounded::wait_output(child);
    assert!(
        !out.status.success() && text(&out.stderr).contains("the input is not a terminal"),
        "{out:?}"
    );

    // -e NAME passes this shell's value, as docker's; unset, nothing.
    let out = inst
        .banger_cmd(&[
            "vm",
            "exec",
            "-e",
            "FIRST_HOUR_SET",
            "-e",
            "FIRST_HOUR_UNSET",
            "ex",
            "--",
            "env",
        ])
        .env("FIRST_HOUR_SET", "from the host")
        .env_remove("FIRST_HOUR_UNSET")
        .output()
        .unwrap();
    let env = ok(&out, "exec -e NAME");
    assert!(
        env.lines().any(|l| l == "FIRST_HOUR_SET=from the host"),
        "{env}"
    );
    assert!(!env.contains("FIRST_HOUR_UNSET"), "{env}");

    // vm cp to a path that is not absolute: under /root, where exec starts.
    let local = tempfile::tempdir().unwrap();
    let f = local.path().join("notes.txt");
    std::fs::write(&f, "relative\n").unwrap();
    ok(
        &inst.banger(&["vm", "cp", f.to_str().unwrap(), "ex:sub-notes.txt"]),
        "vm cp to a relative path",
    );
    ok(
        &inst.banger(&["vm", "cp", f.to_str().unwrap(), "ex:"]),
        "vm cp to NAME:",
    );
    let out = inst.banger(&[
        "vm",
        "exec",
        "ex",
        "--",
        "cat",
        "/root/sub-notes.txt",
        "/root/notes.txt",
    ]);
    assert_eq!(ok(&out, "cat the copies"), "relative\nrelative\n");
    // -i alone passes the pipe through, and its end.
    let mut child = inst
        .banger_cmd(&["vm", "exec", "-i", "ex", "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"12345").unwrap();
    assert_eq!(
        ok(&test_infra::bounded::wait_output(child), "exec -i").trim(),
        "5"
    );

    // A user whose home does not exist starts in /.
    let out = inst.banger(&[
        "vm",
        "exec",
        "-u",
        "nobody",
        "ex",
        "--",
        "sh",
        "-c",
        "id -un; pwd",
    ]);
    assert_eq!(ok(&out, "exec -u nobody"), "nobody\n/\n");
    // A working directory that cannot be entered is named, with why.
    for (dir, why) in [
        ("/nonexistent", "no such directory"),
        ("/etc/hostname", "not a directory"),
    ] {
        let out = inst.banger(&["vm", "exec", "-w", dir, "ex", "--", "pwd"]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("working directory {dir:?}: {why}")),
            "{dir}: {err}"
        );
        assert!(
            !err.contains("exec \"pwd\""),
            "the command is not blamed: {err}"
        );
    }
    let out = inst.banger(&[
        "vm", "exec", "-u", "nobody", "-w", "/root", "ex", "--", "pwd",
    ]);
    let err = text(&out.stderr);
    assert!(err.contains("nobody may not enter it (mode 0700)"), "{err}");
    // A directory anyone may enter, inside root's home: refused too (the
    // directories on the way count), never run there.
    ok(
        &inst.banger(&[
            "vm",
            "exec",
            "ex",
            "--",
            "sh",
            "-c",
            "mkdir -p /root/pub && chmod 755 /root/pub",
        ]),
        "mkdir /root/pub",
    );
    let out = inst.banger(&[
        "vm",
        "exec",
        "-u",
        "nobody",
        "-w",
        "/root/pub",
        "ex",
        "--",
        "pwd",
    ]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nobody may not pass through /root (mode 0700)"),
        "{err}"
    );
    assert!(text(&out.stdout).is_empty(), "nothing ran: {out:?}");
    ok(&inst.banger(&["vm", "rm", "-f", "ex"]), "rm");
    inst.assert_baseline();
}

/// Reads `child`'s stdout until a line holds `want`.
fn read_until(r: &mut impl BufRead, want: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).unwrap();
        assert!(n > 0, "output ended before {want:?}");
        if line.contains(want) {
            return;
        }
    }
}

#[test]
fn attach_detaches_and_leaves_the_process_running() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "at"]),
        "vm run -d",
    );
    let loop_cmd = "while true; do echo tick; sleep 0.2; done";
    let start = |tag: &str| {
        ok(
            &inst.banger(&[
                "vm", "exec", "-d", "--tag", tag, "at", "--", "sh", "-c", loop_cmd,
            ]),
            "exec -d",
        );
    };
    let running = |tag: &str| {
        let ps = ok(&inst.banger(&["vm", "ps", "at", "--json"]), "ps");
        let list: serde_json::Value = serde_json::from_str(&ps).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["tag"] == tag && p["exit"].is_null())
    };
    start("ticker");
    assert!(running("ticker"));

    // Ctrl-C (SIGINT) and SIGTERM detach; the process carries on.
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let mut a = inst.spawn(&["vm", "attach", "at", "ticker"]);
        let mut out = BufReader::new(a.stdout.take().unwrap());
        read_until(&mut out, "tick");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.id() as i32), sig).unwrap();
        let done = test_infra::bounded::wait_output(a);
        assert_eq!(done.status.code(), Some(0), "{sig}: {done:?}");
        assert!(
            text(&done.stderr).contains("detached from pid"),
            "{}",
            text(&done.stderr)
        );
        assert!(running("ticker"), "{sig} ended the process");
    }

    // The detach keys typed in a terminal (default Ctrl-P Ctrl-Q), and
    // others when asked, leave a process with a PTY running.
    ok(
        &inst.banger(&[
            "vm", "exec", "-d", "-t", "--tag", "tticker", "at", "--", "sh", "-c", loop_cmd,
        ]),
        "exec -dt",
    );
    for (flags, keys) in [
        (vec![], &b"\x10\x11"[..]),
        (vec!["--detach-keys", "ctrl-x,y"], b"\x18y"),
    ] {
        let pty = nix::pty::openpty(None, None).unwrap();
        let mut args = vec!["vm", "attach", "-i"];
        args.extend(flags);
        args.extend(["at", "tticker"]);
        let mut a = inst
            .banger_cmd(&args)
            .stdin(std::fs::File::from(pty.slave))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(a.stdout.take().unwrap());
        read_until(&mut out, "tick");
        let mut master = std::fs::File::from(pty.master);
        master.write_all(keys).unwrap();
        let done = test_infra::bounded::wait_output(a);
        assert_eq!(done.status.code(), Some(0), "{keys:?}: {done:?}");
        assert!(text(&done.stderr).contains("detached from pid"));
        assert!(running("tticker"), "the detach keys ended the process");
    }
    // From a pipe they are the process's bytes (as docker: keys are read
    // from a terminal only), and the pipe's end is its input's end.
    ok(
        &inst.banger(&["vm", "exec", "-d", "-i", "--tag", "cat", "at", "--", "cat"]),
        "exec -di",
    );
    let mut a = inst
        .banger_cmd(&["vm", "attach", "-i", "at", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    a.stdin.take().unwrap().write_all(b"a\x10\x11b\n").unwrap();
    let done = test_infra::bounded::wait_output(a);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(done.stdout, b"a\x10\x11b\n", "{done:?}");
    assert!(!text(&done.stderr).contains("detached"), "{done:?}");
    let out = inst.banger(&["vm", "attach", "--detach-keys", "ctrl-1", "at", "ticker"]);
    assert!(
        text(&out.stderr).contains("\"ctrl-1\" is not a key"),
        "{}",
        text(&out.stderr)
    );

    // --sig-proxy: the signal is the process's.
    let mut a = inst.spawn(&["vm", "attach", "--sig-proxy", "at", "ticker"]);
    let mut out = BufReader::new(a.stdout.take().unwrap());
    read_until(&mut out, "tick");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let done = test_infra::bounded::wait_output(a);
    assert_eq!(done.status.code(), Some(143), "{done:?}");
    assert!(!running("ticker"));
    ok(&inst.banger(&["vm", "rm", "-f", "at"]), "rm");
    inst.assert_baseline();
}

/// A command whose VM banger ends under it says why, in the VM's words,
/// and exits 137.
#[test]
fn a_command_is_told_why_its_vm_went() {
    let inst = Instance::new(&banger_bin()).with_image();
    let out = inst.banger(&["vm", "run", "--rm", "--ttl", "5s", "--", "sleep", "600"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{err}");
    assert!(
        err.contains("stopped by banger: its TTL (5s) passed"),
        "{err}"
    );
    assert!(!err.contains("in the middle of a call"), "{err}");
    inst.settle();
    inst.assert_baseline();

    // `vm kill` from another shell.
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "k"]),
        "vm run -d",
    );
    let mut run = inst.spawn(&[
        "vm",
        "exec",
        "k",
        "--",
        "sh",
        "-c",
        "echo up; exec sleep 600",
    ]);
    let mut out = BufReader::new(run.stdout.take().unwrap());
    read_until(&mut out, "up");
    ok(&inst.banger(&["vm", "kill", "k"]), "vm kill");
    let done = test_infra::bounded::wait_output(run);
    let err = text(&done.stderr);
    assert_eq!(done.status.code(), Some(137), "{err}");
    assert!(err.contains("killed by `banger vm kill`"), "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || inst
            .vm("k")
            .is_some_and(|v| v["state"] == "stopped")),
        "{:?}",
        inst.vm("k")
    );
    ok(&inst.banger(&["vm", "rm", "k"]), "rm");
    inst.assert_baseline();
}

/// `vm --help` names the command every doc uses.
#[test]
fn help_lists_rm_with_delete_as_its_alias() {
    let out = std::process::Command::new(banger_bin())
        .args(["vm", "--help"])
        .output()
        .unwrap();
    let help = ok(&out, "vm --help");
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("rm ")),
        "{help}"
    );
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("delete ")),
        "{help}"
    );
    // The alias is named beside it, as clap shows a visible alias.
    assert!(
        help.lines()
            .any(|l| l.trim_start().starts_with("rm ") && l.contains("[alias: delete]")),
        "{help}"
    );
    let out = std::process::Command::new(banger_bin())
        .args(["vm", "delete", "--help"])
        .output()
        .unwrap();
    ok(&out, "the alias still works");
}

/// A usage line lists what is required: the state and runtime dirs are
/// not, whether their variables are set or not, and the variables still
/// choose them.
#[test]
fn usage_lines_do_not_mark_the_dirs_required_when_their_variables_are_set() {
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut c = std::process::Command::new(banger_bin());
        c.args(args)
            .env_remove("BANGER_STATE_DIR")
            .env_remove("BANGER_RUNTIME_DIR");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let dirs = [
        ("BANGER_STATE_DIR", "/nonexistent/banger-state"),
        ("BANGER_RUNTIME_DIR", "/nonexistent/banger-run"),
    ];
    let out = run(&dirs, &["vm", "exec"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Usage: banger vm exec <NAME> -- <COMMAND>..."),
        "{err}"
    );
    assert!(
        !err.contains("--state-dir") && !err.contains("--runtime-dir"),
        "{err}"
    );
    // A runtime dir that is a file: the socket cannot be in it, so no
    // daemon is started, and the error names the variable's path.
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let out = run(
        &[("BANGER_STATE_DIR", path), ("BANGER_RUNTIME_DIR", path)],
        &["vm", "ls"],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(path), "{err}");
}

/// `vm run` with the default image not built says first that it builds
/// it, and offline (this namespace has no way out) fails at once naming
/// the mirrors and the way around them, instead of after apt's minutes of
/// retries. Nothing of the build is left.
#[test]
fn building_the_default_image_offline_fails_at_once_and_says_why() {
    let inst = Instance::new(&banger_bin());
    let out = inst.banger(&["vm", "run", "--rm", "--", "true"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let building = err
        .find("is not built yet: building it first")
        .unwrap_or_else(|| panic!("{err}"));
    let refused = err
        .find("the Debian mirror the build fetches from does not answer")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(building < refused, "{err}");
    assert!(err.contains("banger image import"), "{err}");
    let images = ok(&inst.banger(&["image", "ls", "--json"]), "image ls");
    assert_eq!(images.trim(), "[]", "no image row");
    let dir = inst.state().join("images");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?} left in {}", dir.display());
    inst.assert_baseline();
}
