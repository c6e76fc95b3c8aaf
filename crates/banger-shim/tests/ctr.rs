//! containerd (Debian's, in the test's namespaces, with its own root and
//! sockets) runs containers through `containerd-shim-banger-v2`: each a
//! banger VM of the test's daemon, its rootfs the image containerd
//! unpacked, its processes the image's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use test_infra::containerd::{busybox_image, Containerd};
use test_infra::{ok, text, wait_until, Instance};

const RUNTIME: &str = "io.containerd.banger.v2";
const IMAGE: &str = "banger.test/busybox:1";
const APP_IMAGE: &str = "banger.test/busybox-app:1";

fn shim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-banger-v2"))
}

fn banger_bin() -> PathBuf {
    shim_bin().with_file_name("banger")
}

/// An instance with its daemon up, a containerd beside it, and the test
/// images imported.
fn setup() -> (Instance, Containerd) {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(&inst.banger(&["daemon", "ping"]), "daemon ping");
    let bin_dir = shim_bin()
        .parent()
        .map(Path::to_path_buf)
        .expect("the shim's directory");
    let ctd = Containerd::start(&inst, &bin_dir);
    for (name, user, file) in [
        (IMAGE, None, "busybox.tar"),
        (APP_IMAGE, Some("app"), "app.tar"),
    ] {
        let work = inst.dir().join(format!("img-{file}"));
        std::fs::create_dir_all(&work).unwrap();
        let tar = work.join(file);
        busybox_image(&work, name, user, &tar);
        ok(
            &ctd.ctr(&inst, &["images", "import", tar.to_str().unwrap()]),
            "ctr images import",
        );
    }
    (inst, ctd)
}

/// Every VM the daemon holds, as `vm ls` lists them.
fn vms(inst: &Instance) -> String {
    ok(&inst.banger(&["vm", "ls"]), "vm ls")
}

fn assert_nothing_left(inst: &Instance, ctd: &Containerd) {
    ctd.assert_clean(inst);
}

#[test]
fn ctr_run_runs_the_image_in_a_banger_vm_and_leaves_nothing() {
    let (inst, ctd) = setup();
    // Output, exit code, the image's and the run's environment, the
    // working directory, root by default.
    let out = ctd.ctr(
        &inst,
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "GREETING=hello",
            "--cwd",
            "/tmp",
            IMAGE,
            "t1",
            "sh",
            "-c",
            "echo $GREETING $FROM_IMAGE; pwd; id -u; test -d /proc/self && echo proc; \
             test -e /bin/busybox && ! test -e /usr/lib/banger/busybox && echo own-root; exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr run exits with the process's code: {out:?}\n{}",
        ctd.log_text()
    );
    assert_eq!(text(&out.stdout), "hello yes\n/tmp\n0\nproc\nown-root\n");
    // Its input, to its end (containerd's CloseIO).
    let mut child = ctd
        .ctr_cmd(
            &inst,
            &["run", "--rm", "--runtime", RUNTIME, IMAGE, "t0", "wc", "-c"],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(&[b'x'; 100_000]).unwrap();
    }
    let out = test_infra::bounded::wait_output(child);
    assert_eq!(ok(&out, "ctr run with stdin").trim(), "100000");
    // The image's user, and its groups from its own /etc/group.
    let out = ctd.ctr(
        &inst,
        &["run", "--rm", "--runtime", RUNTIME, APP_IMAGE, "t2", "id"],
    );
    let id = ok(&out, "ctr run as the image's user");
    assert!(id.starts_with("uid=1000(app) gid=1000(app)"), "{id}");
    assert_eq!(
        ok(&ctd.ctr(&inst, &["task", "ls", "-q"]), "task ls").trim(),
        "",
        "no task left"
    );
    assert_nothing_left(&inst, &ctd);
    // Each shim took its socket with it.
    for id in ["t0", "t1", "t2"] {
        let sock = ctd.shim_socket("default", id);
        assert!(
            !sock.exists(),
            "{id}'s shim socket left: {}",
            sock.display()
        );
    }
}

#[test]
fn a_detached_container_takes_execs_signals_and_questions() {
    let (inst, ctd) = setup();
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                "--memory-limit",
                "104857600",
                IMAGE,
                "t3",
                "sh",
                "-c",
                "trap 'echo got TERM; exit 7' TERM; echo up > /tmp/up; \
                 while true; do sleep 1; done",
            ],
        ),
        "ctr run -d",
    );
    // The VM serves it, and says so.
    let ls = vms(&inst);
    assert!(ls.contains("containerd.id=t3"), "{ls}");
    let exec = |args: &[&str]| {
        let mut a = vec!["task", "exec"];
        a.extend_from_slice(args);
        ctd.ctr(&inst, &a)
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            exec(&["--exec-id", "up", "t3", "cat", "/tmp/up"])
                .status
                .success()
        }),
        "the init ran"
    );
    let out = exec(&[
        "--exec-id",
        "e1",
        "t3",
        "sh",
        "-c",
        "echo in $FROM_IMAGE; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(text(&out.stdout), "in yes\n");
    let out = exec(&["--exec-id", "e2", "--user", "app", "t3", "id", "-u"]);
    assert_eq!(ok(&out, "exec --user app").trim(), "1000");
    // ps lists the init's guest pid; metrics are the VM's.
    let ps = ok(&ctd.ctr(&inst, &["task", "ps", "t3"]), "task ps");
    assert!(
        ps.lines().count() >= 3,
        "a header, the init and its sleep (the container's cgroup): {ps}"
    );
    let metrics = ok(&ctd.ctr(&inst, &["task", "metrics", "t3"]), "task metrics");
    // cgroup v2's metrics, as ctr prints them.
    let usage: u64 = metrics
        .lines()
        .find(|l| l.split_whitespace().next() == Some("memory.usage"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(usage > 0, "the container uses memory: {metrics}");
    // Its limits are its cgroup's in the guest, which its processes are in.
    let metric = |name: &str| -> u64 {
        let m = ok(&ctd.ctr(&inst, &["task", "metrics", "t3"]), "task metrics");
        m.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {m}"))
    };
    assert_eq!(metric("memory.usage_limit"), 104857600);
    assert!(metric("pids.current") >= 2, "the init and its sleep");
    let out = exec(&["--exec-id", "cg", "t3", "cat", "/proc/self/cgroup"]);
    assert!(
        ok(&out, "cat /proc/self/cgroup").starts_with("0::/banger/t3-"),
        "{out:?}"
    );
    // containerd's Update (ctr 1.6 has no `task update`; CRI's
    // UpdateContainerResources calls it), asked of the shim directly.
    update_memory(&ctd, "t3", 209715200);
    assert_eq!(metric("memory.usage_limit"), 209715200);
    // TERM reaches the init, which says so and exits 7.
    ok(
        &ctd.ctr(&inst, &["task", "kill", "-s", "TERM", "t3"]),
        "task kill TERM",
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            ok(&ctd.ctr(&inst, &["task", "ls"]), "task ls").contains("STOPPED")
        }),
        "stopped after TERM"
    );
    // Its trap ran: it exited 7, as containerd's Wait reports it.
    let waited = shim_of(&ctd, "t3")
        .wait(
            ttrpc_deadline(),
            &containerd_shim_protos::shim::shim::WaitRequest {
                id: "t3".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(waited.exit_status, 7, "the init's TERM trap");
    // Nothing more runs in it.
    let late = exec(&["--exec-id", "late", "t3", "true"]);
    assert!(
        !late.status.success() && text(&late.stderr).contains("its init is not running"),
        "{late:?}"
    );
    ok(&ctd.ctr(&inst, &["task", "rm", "t3"]), "task rm");
    ok(&ctd.ctr(&inst, &["container", "rm", "t3"]), "container rm");
    // KILL, of all, on another.
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                "t4",
                "sleep",
                "600",
            ],
        ),
        "ctr run -d t4",
    );
    kill_and_remove(&inst, &ctd, "t4", "KILL", true);
    assert_nothing_left(&inst, &ctd);
}

/// A client of container `id`'s shim, as containerd has.
fn shim_of(ctd: &Containerd, id: &str) -> containerd_shim_protos::shim_sync::TaskClient {
    let bundle = ctd.bundle("default", id);
    let address = std::fs::read_to_string(bundle.join("address")).unwrap();
    let client = containerd_shim_protos::ttrpc::Client::connect(address.trim()).unwrap();
    containerd_shim_protos::shim_sync::TaskClient::new(client)
}

fn ttrpc_deadline() -> containerd_shim_protos::ttrpc::context::Context {
    containerd_shim_protos::ttrpc::context::with_timeout(30_000_000_000)
}

/// Asks container `id`'s shim, as containerd does, to set its memory
/// limit to `bytes`.
fn update_memory(ctd: &Containerd, id: &str, bytes: u64) {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::shim::shim::UpdateTaskRequest;
    let task = shim_of(ctd, id);
    let mut resources = Any::new();
    resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
    resources.value = serde_json::to_vec(&serde_json::json!({"memory": {"limit": bytes}})).unwrap();
    let req = UpdateTaskRequest {
        id: id.to_string(),
        resources: containerd_shim_protos::protobuf::MessageField::some(resources),
        ..Default::default()
    };
    task.update(ttrpc_deadline(), &req).unwrap();
}

/// Kills task `id` with `signal` (`-a` when `all`), waits until it has
/// stopped, and removes it and its container.
fn kill_and_remove(inst: &Instance, ctd: &Containerd, id: &str, signal: &str, all: bool) {
    let mut args = vec!["task", "kill", "-s", signal];
    if all {
        args.push("-a");
    }
    args.push(id);
    ok(&ctd.ctr(inst, &args), &format!("task kill {id}"));
    assert!(
        wait_until(Duration::from_secs(30), || task_status(inst, ctd, id)
            == "STOPPED"),
        "{id} stopped after {signal}"
    );
    ok(
        &ctd.ctr(inst, &["task", "rm", id]),
        &format!("task rm {id}"),
    );
    ok(
        &ctd.ctr(inst, &["container", "rm", id]),
        &format!("container rm {id}"),
    );
}

/// The task's status as `ctr task ls` shows it ("" when it is not listed).
fn task_status(inst: &Instance, ctd: &Containerd, id: &str) -> String {
    let ls = ok(&ctd.ctr(inst, &["task", "ls"]), "task ls");
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_container_outlives_a_containerd_restart_and_goes_with_its_shim() {
    let (inst, mut ctd) = setup();
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                "t5",
                "sleep",
                "600",
            ],
        ),
        "ctr run -d",
    );
    assert_eq!(task_status(&inst, &ctd, "t5"), "RUNNING");
    let shims = ctd.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    // containerd goes and comes back: it finds the shim, and the shim its
    // VM; an exec still runs.
    ctd.restart(&inst);
    assert_eq!(task_status(&inst, &ctd, "t5"), "RUNNING");
    assert_eq!(ctd.shims(), shims, "the same shim");
    let out = ctd.ctr(
        &inst,
        &[
            "task",
            "exec",
            "--exec-id",
            "after",
            "t5",
            "echo",
            "still here",
        ],
    );
    assert_eq!(ok(&out, "exec after the restart"), "still here\n");
    // The shim killed: containerd cleans up through `shim delete`, and the
    // daemon deletes the VM whose lease the shim held.
    let (pid, _) = shims[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || task_status(&inst, &ctd, "t5")
            != "RUNNING"),
        "the task is not running after its shim's death: {}",
        ctd.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(60), || vms(&inst).lines().count() == 1),
        "the VM went with its shim: {}",
        vms(&inst)
    );
    let _ = ctd.ctr(&inst, &["task", "rm", "t5"]);
    ok(&ctd.ctr(&inst, &["container", "rm", "t5"]), "container rm");
    assert_nothing_left(&inst, &ctd);
    // The killed shim's socket went with containerd's cleanup of it.
    let sock = ctd.shim_socket("default", "t5");
    assert!(
        !sock.exists(),
        "the dead shim's socket left: {}",
        sock.display()
    );
}

/// `ctr run -t`: the process has a terminal of the client's size, and a
/// resize of the client's terminal reaches it (SIGWINCH in the guest).
#[test]
fn a_terminal_follows_the_clients_size() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let (inst, ctd) = setup();
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
    let mut cmd = ctd.ctr_cmd(
        &inst,
        &[
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t6",
            "sh",
            "-c",
            "tty; stty size; trap 'stty size; exit 0' WINCH; echo waiting; \
             while :; do sleep 0.1; done",
        ],
    );
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY between fork and exec: ctr gets the
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
        // Each read within a minute: a lost resize fails, not hangs.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&master),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(60_000u16)).unwrap_or(0);
        assert!(ready > 0, "no output for a minute: {seen:?}");
        let n = master.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "the terminal closed before the resize was seen: {seen:?}\n{}",
            ctd.log_text()
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
    let status = test_infra::bounded::wait_within(&mut child, Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{seen}");
    assert!(seen.contains("/dev/pts/"), "a terminal: {seen:?}");
    assert!(seen.contains("24 80"), "the first size: {seen:?}");
    assert_nothing_left(&inst, &ctd);
}

/// What a bad container asks for is refused through containerd, naming
/// the problem, and leaves nothing: a spec banger cannot read (containerd
/// took it), more memory than the host has, a user the image lacks, a
/// host path that is not there; mounts of a host directory and a file,
/// and a hostname, are honoured.
#[test]
fn bad_containers_are_refused_by_name_and_mounts_are_honoured() {
    let (inst, ctd) = setup();
    let run = |args: &[&str]| {
        let mut a = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend_from_slice(args);
        ctd.ctr(&inst, &a)
    };
    let refused = |out: &std::process::Output, what: &str| {
        let err = text(&out.stderr);
        eprintln!("refused: {err}");
        assert!(
            !out.status.success() && err.contains(what),
            "wanted {what:?}: {out:?}\n{}",
            ctd.log_text()
        );
    };
    // A spec containerd passes on but banger cannot read (runc refuses it
    // too): an unknown kind of namespace.
    let spec_out = ok(&ctd.ctr(&inst, &["oci", "spec"]), "ctr oci spec");
    let mut spec: serde_json::Value = serde_json::from_str(&spec_out).unwrap();
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bogus"}));
    spec["process"]["args"] = serde_json::json!(["true"]);
    let bad = inst.dir().join("bad-spec.json");
    std::fs::write(&bad, spec.to_string()).unwrap();
    let out = run(&["--config", bad.to_str().unwrap(), "b1"]);
    refused(&out, "config.json");
    // More memory than the host has.
    let out = run(&["--memory-limit", "1099511627776000", IMAGE, "b2", "true"]);
    refused(&out, "memory");
    // A user the image does not have (containerd resolves it, from the
    // image's own /etc/passwd).
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                "b3",
                "sleep",
                "600",
            ],
        ),
        "run -d",
    );
    let out = ctd.ctr(
        &inst,
        &[
            "task",
            "exec",
            "--exec-id",
            "x",
            "--user",
            "ghost",
            "b3",
            "id",
        ],
    );
    // (containerd's own words: it looks the name up before any runtime.)
    refused(&out, "no users found");
    kill_and_remove(&inst, &ctd, "b3", "KILL", false);
    // A network namespace by path is a pod's network (CNI's; `cri.rs`
    // runs one): the daemon's own is refused, naming it.
    let own = format!("network:/run/netns/{}", inst.net.ns);
    let out = run(&["--with-ns", &own, IMAGE, "b5", "true"]);
    refused(&out, "is bangerd's own");
    // ... also in a banger group.
    let out = run(&[
        "--with-ns",
        &own,
        "--annotation=io.containerd.banger.v2.group=g1",
        IMAGE,
        "b6",
        "true",
    ]);
    refused(&out, "is bangerd's own");
    // A read-only root (a read-only bind of the image's snapshot).
    let out = run(&[
        "--read-only",
        IMAGE,
        "r1",
        "sh",
        "-c",
        "touch /new 2>/dev/null || echo read-only; cat /etc/passwd | head -1",
    ]);
    assert_eq!(
        ok(&out, "run --read-only"),
        "read-only\nroot:x:0:0:root:/root:/bin/sh\n"
    );
    // A host path that is not there.
    let out = run(&[
        "--mount",
        "type=bind,src=/nonexistent-banger,dst=/data,options=rbind:ro",
        IMAGE,
        "b4",
        "true",
    ]);
    refused(&out, "/nonexistent-banger");
    for id in ["b1", "b2", "b4", "b5", "b6"] {
        let _ = ctd.ctr(&inst, &["container", "rm", id]);
    }
    // A directory (read-only) and a file, mounted.
    let share = inst.dir().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello"), "from the host\n").unwrap();
    let file = inst.dir().join("greeting");
    std::fs::write(&file, "a file\n").unwrap();
    let dir_mount = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        share.display()
    );
    let file_mount = format!(
        "type=bind,src={},dst=/etc/greeting,options=rbind:ro",
        file.display()
    );
    let out = run(&[
        "--mount",
        &dir_mount,
        "--mount",
        &file_mount,
        IMAGE,
        "m1",
        "sh",
        "-c",
        "cat /data/hello /etc/greeting; touch /data/new 2>/dev/null || echo read-only",
    ]);
    assert_eq!(
        ok(&out, "run with mounts"),
        "from the host\na file\nread-only\n",
        "{}",
        ctd.log_text()
    );
    assert!(!share.join("new").exists());
    assert_nothing_left(&inst, &ctd);
}

/// Containers of one pod (here a banger group; a Kubernetes sandbox's the
/// same way) share one VM, each in its own root, and the VM goes with the
/// last of them.
#[test]
fn a_pods_containers_share_one_vm_each_in_its_own_root() {
    let (inst, ctd) = setup();
    let group = "--annotation=io.containerd.banger.v2.group=pod1";
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                group,
                IMAGE,
                "p1",
                "sh",
                "-c",
                "echo one > /tmp/one; exec sleep 600",
            ],
        ),
        "run p1",
    );
    ok(
        &ctd.ctr(
            &inst,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                group,
                APP_IMAGE,
                "p2",
                "sleep",
                "601",
            ],
        ),
        "run p2",
    );
    let ls = vms(&inst);
    assert_eq!(ls.lines().count(), 2, "one VM for both: {ls}");
    assert_eq!(
        ctd.shims().len(),
        1,
        "one shim for the pod: {:?}",
        ctd.shims()
    );
    let exec = |id: &str, exec_id: &str, args: &[&str]| {
        let mut a = vec!["task", "exec", "--exec-id", exec_id, id];
        a.extend_from_slice(args);
        ctd.ctr(&inst, &a)
    };
    assert!(
        wait_until(Duration::from_secs(30), || exec(
            "p1",
            "w",
            &["cat", "/tmp/one"]
        )
        .status
        .success()),
        "p1 ran"
    );
    // One machine: each sees the other's process.
    let ps = ok(&exec("p2", "ps", &["ps"]), "ps in p2");
    assert!(ps.contains("sleep 600") && ps.contains("sleep 601"), "{ps}");
    // Two roots: p1's file is not p2's, and p2 is the image's user.
    let other = exec("p2", "c", &["cat", "/tmp/one"]);
    assert!(
        !other.status.success() && text(&other.stderr).contains("No such file"),
        "{other:?}"
    );
    assert_eq!(
        ok(&exec("p2", "u", &["id", "-un"]), "id in p2").trim(),
        "app"
    );
    // p1 goes; the VM stays for p2, and keeps nothing of p1's: no cgroup,
    // nothing mounted in its root.
    kill_and_remove(&inst, &ctd, "p1", "KILL", false);
    let left = ok(
        &exec(
            "p2",
            "left",
            &[
                "sh",
                "-c",
                "ls -d /sys/fs/cgroup/banger/*/; cat /proc/mounts",
            ],
        ),
        "what is left of p1",
    );
    let cgroups: Vec<&str> = left
        .lines()
        .filter(|l| l.starts_with("/sys/fs/cgroup/banger/"))
        .collect();
    assert!(
        cgroups.len() == 1 && cgroups[0].contains("/p2-"),
        "only p2's cgroup: {left}"
    );
    assert!(!left.contains("/p1-"), "nothing of p1 mounted: {left}");
    assert_eq!(
        vms(&inst).lines().count(),
        2,
        "the VM stays: {}",
        ctd.log_text()
    );
    assert_eq!(
        ok(&exec("p2", "again", &["echo", "ok"]), "exec p2").trim(),
        "ok"
    );
    kill_and_remove(&inst, &ctd, "p2", "KILL", false);
    assert_nothing_left(&inst, &ctd);
}

/// A rootless containerd (one running as a user) would start the shim as
/// that user, who can mount nothing and may not read what the user may
/// not: the shim refuses at its start, naming why and what to use, and
/// makes nothing (no socket, no address file in the bundle).
#[test]
fn a_shim_started_by_a_non_root_containerd_says_it_needs_root() {
    use std::os::unix::fs::PermissionsExt;
    let user = test_infra::users::TestUser::new(&[]);
    let bundle = tempfile::Builder::new()
        .prefix("banger-bundle-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(bundle.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = bundle.path().join("containerd.sock");
    let out = test_infra::bounded::output_within(
        std::process::Command::new("setpriv")
            .args(["--reuid", &user.uid.to_string()])
            .args(["--regid", &user.gid.to_string()])
            .arg("--clear-groups")
            .arg(shim_bin())
            .args(["-namespace", "default", "-address"])
            .arg(&socket)
            .args(["-publish-binary", "/bin/true", "-id", "t1", "start"])
            .env("TTRPC_ADDRESS", bundle.path().join("containerd.sock.ttrpc"))
            .current_dir(bundle.path())
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("runs as uid {}", user.uid))
            && err.contains("a rootless containerd is not supported"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(bundle.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
