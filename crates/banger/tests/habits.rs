//! docker's habits (issue 12): `vm run -d`, `rm` of a running VM needs
//! `-f`, `prune`, `restart`, `ls -q` and `--filter`, `ssh -t/-T`, a stop
//! that says what it waits for, columns that fit their content. Real
//! guests in a namespace of the test's own, as in e2e.rs.

use std::path::PathBuf;

use test_infra::{ok, text, vm_list, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn state(inst: &Instance, name: &str) -> String {
    vm_list(&inst.banger(&["vm", "ls", "--json"]))
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|| "gone".into())
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn docker_habits() {
    let inst = Instance::new(&banger_bin()).with_image();

    // run -d: the VM stays up, the command runs in the background, the
    // name is all stdout holds.
    let out = inst.banger(&[
        "vm",
        "run",
        "-d",
        "--name",
        "bg",
        "--",
        "sh",
        "-c",
        "echo up > /tmp/mark; exec sleep 600",
    ]);
    assert_eq!(ok(&out, "run -d"), "bg\n");
    assert_eq!(state(&inst, "bg"), "running");
    let ps = ok(&inst.banger(&["vm", "ps", "bg", "--json"]), "ps");
    let procs: Vec<serde_json::Value> = serde_json::from_str(&ps).unwrap();
    assert!(
        procs
            .iter()
            .any(|p| p["argv"][0] == "sh" && p["exit"].is_null()),
        "{ps}"
    );
    // The detached command runs on its own time: wait (in the guest,
    // bounded) for the file it writes rather than racing it.
    let out = inst.banger(&[
        "vm",
        "exec",
        "bg",
        "--",
        "timeout",
        "120",
        "sh",
        "-c",
        "until [ -s /tmp/mark ]; do sleep 0.05; done; cat /tmp/mark",
    ]);
    assert_eq!(ok(&out, "mark"), "up\n");

    // A long name: the NAME column is as wide as it.
    let long = "a-name-that-is-much-longer-than-twenty-four-characters";
    ok(
        &inst.banger(&["vm", "create", "--name", long]),
        "create long",
    );

    // ls -q and --filter.
    let all = ok(&inst.banger(&["vm", "ls", "-q"]), "ls -q");
    let mut names = lines(&all);
    names.sort();
    assert_eq!(names, vec![long, "bg"]);
    let running = ok(
        &inst.banger(&["vm", "ls", "-q", "--filter", "state=running"]),
        "filter",
    );
    assert_eq!(running, "bg\n");
    let created = ok(
        &inst.banger(&[
            "vm",
            "ls",
            "-q",
            "--filter",
            "state=created",
            "--filter",
            "name=much",
        ]),
        "filter twice",
    );
    assert_eq!(created, format!("{long}\n"));
    for (bad, says) in [
        ("state=asleep", "one of creating, created"),
        ("colour=red", "unknown filter \"colour\""),
        ("state", "want KEY=VALUE"),
    ] {
        let out = inst.banger(&["vm", "ls", "--filter", bad]);
        assert!(
            !out.status.success() && text(&out.stderr).contains(says),
            "--filter {bad}: {}",
            text(&out.stderr)
        );
    }
    let table = ok(&inst.banger(&["vm", "ls"]), "ls");
    let t = lines(&table);
    let ip_col = t[0].find("STATE").unwrap();
    assert!(ip_col > long.len(), "{table}");
    for row in &t[1..] {
        assert_eq!(
            row[ip_col..].split_whitespace().next(),
            Some(if row.starts_with("bg") {
                "running"
            } else {
                "created"
            }),
            "columns line up: {table}"
        );
    }

    // rm of a running VM is refused without -f, and changes nothing.
    let out = inst.banger(&["vm", "rm", "bg"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is running") && err.contains("vm rm -f bg"),
        "{err}"
    );
    assert_eq!(state(&inst, "bg"), "running");
    let out = inst.banger(&["vm", "exec", "bg", "--", "cat", "/tmp/mark"]);
    assert_eq!(ok(&out, "still up"), "up\n");

    // ssh -t gives CMD a terminal; -T (and the default for CMD) none.
    let out = inst.banger(&["vm", "ssh", "-t", "bg", "--", "tty"]);
    assert!(
        ok(&out, "ssh -t").trim().starts_with("/dev/pts/"),
        "{out:?}"
    );
    for args in [
        vec!["vm", "ssh", "-T", "bg", "--", "tty"],
        vec!["vm", "ssh", "bg", "--", "tty"],
    ] {
        let out = inst.banger(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(text(&out.stdout).trim(), "not a tty", "{args:?}");
    }

    // stop says what it waits for.
    let out = inst.banger(&["vm", "stop", "bg"]);
    ok(&out, "stop");
    assert!(
        text(&out.stderr).contains("bg: waiting for the guest to power off"),
        "{}",
        text(&out.stderr)
    );

    // restart: a stopped VM starts; a running one stops and starts (a new
    // boot: /tmp is empty again).
    ok(&inst.banger(&["vm", "restart", "bg"]), "restart stopped");
    assert_eq!(state(&inst, "bg"), "running");
    ok(
        &inst.banger(&["vm", "exec", "bg", "--", "touch", "/tmp/again"]),
        "touch",
    );
    let out = inst.banger(&["vm", "restart", "bg"]);
    ok(&out, "restart running");
    assert!(text(&out.stderr).contains("waiting for the guest to power off"));
    assert_eq!(state(&inst, "bg"), "running");
    let out = inst.banger(&["vm", "exec", "bg", "--", "test", "-e", "/tmp/again"]);
    assert_eq!(out.status.code(), Some(1), "a new boot: {out:?}");

    // prune: asks on a terminal, refuses without one unless -f, and
    // leaves running VMs alone.
    let out = inst.banger(&["vm", "prune"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("-f"),
        "{out:?}"
    );
    assert_eq!(state(&inst, long), "created", "prune without -f kept it");
    let out = inst.banger(&["vm", "prune", "-f"]);
    assert_eq!(ok(&out, "prune"), format!("{long}\n"));
    assert_eq!(state(&inst, long), "gone");
    assert_eq!(state(&inst, "bg"), "running");

    // On a terminal, a boot shows a spinner naming its phases; elsewhere
    // (every call above) plain lines only.
    let cmd = inst.banger_cmd(&["vm", "run", "--rm", "--name", "spin", "--", "true"]);
    let words: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let line = shlex::try_join(words.iter().map(String::as_str)).unwrap();
    let mut script = std::process::Command::new("script");
    script.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            script.env(k, v);
        }
    }
    let out = script.stdin(std::process::Stdio::null()).output().unwrap();
    let tty = text(&out.stdout);
    assert!(out.status.success(), "{tty}");
    // The spinner's own text: the phases done so far (the daemon's plain
    // line "booting spin (qemu tcg)" is there either way).
    assert!(
        tty.contains("booting spin: step ") && tty.contains("waiting for the guest"),
        "a spinner on the terminal: {tty:?}"
    );
    let out = inst.banger(&["vm", "run", "--rm", "--name", "nospin", "--", "true"]);
    ok(&out, "run");
    let plain = text(&out.stderr);
    assert!(
        !plain.contains("booting nospin: step") && !plain.contains('\r') && !plain.contains('\x1b'),
        "no spinner off a terminal: {plain:?}"
    );

    // rm -f kills and deletes.
    ok(&inst.banger(&["vm", "rm", "-f", "bg"]), "rm -f");
    assert_eq!(ok(&inst.banger(&["vm", "ls", "-q"]), "ls"), "");
    inst.assert_baseline();
}
