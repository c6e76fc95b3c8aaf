//! Snapshots on real QEMU guests (issue 21): `vm snapshot` of a running
//! VM, clones made `--from` it at once, each its own machine (hostname,
//! address, MAC, host key, machine id, files of its own) with the
//! origin's files; the origin goes on; `snapshot rm` removes every file
//! and is refused while a clone waits to be restored; what cannot be
//! restored (damaged files, another banger's snapshot, other sizes, a
//! `--mount` VM, a stopped VM) is refused with the fix named. Needs root;
//! `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{ok, text, wait_until, Gate, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// `vm exec NAME -- ARGS`'s output, trimmed.
fn exec(inst: &Instance, name: &str, args: &[&str]) -> String {
    let mut a = vec!["vm", "exec", name, "--"];
    a.extend_from_slice(args);
    ok(&inst.banger(&a), &format!("exec {args:?} in {name}"))
        .trim()
        .to_string()
}

fn err_of(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// A detached process in `name` that counts in /tmp/count, tagged
/// `counter`.
fn start_counter(inst: &Instance, name: &str) {
    let out = inst.banger(&[
        "vm",
        "exec",
        "-d",
        "--tag",
        "counter",
        name,
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
    ]);
    ok(&out, "exec -d");
}

/// The count a detached `counter` in `name` has reached.
fn read_count(inst: &Instance, name: &str) -> u64 {
    inst.guest_number(name, "/tmp/count")
}

fn snapshot_dir(inst: &Instance, snap: &str) -> PathBuf {
    let out = inst.banger(&["snapshot", "show", snap, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "snapshot show")).unwrap();
    PathBuf::from(v["dir"].as_str().unwrap())
}

#[test]
fn clones_of_a_snapshot_are_machines_of_their_own() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["volume", "create", "ov", "--size", "16M"]),
        "volume create",
    );
    ok(
        &inst.banger(&[
            "vm", "run", "-d", "--name", "origin", "--volume", "ov:/data",
        ]),
        "vm run -d origin",
    );
    exec(
        &inst,
        "origin",
        &[
            "sh",
            "-c",
            "echo root-data > /root/r && echo work-data > /work/w && echo vol-data > /data/v \
             && sync",
        ],
    );
    let out = inst.banger(&["vm", "snapshot", "origin", "s1"]);
    assert_eq!(ok(&out, "vm snapshot"), "s1\n");
    // The origin goes on, and what it writes now is not the snapshot's.
    assert_eq!(inst.vm("origin").unwrap()["state"], "running");
    exec(
        &inst,
        "origin",
        &["sh", "-c", "echo later > /root/later && sync"],
    );
    let out = inst.banger(&["snapshot", "ls", "-q"]);
    assert_eq!(ok(&out, "snapshot ls"), "s1\n");
    let dir = snapshot_dir(&inst, "s1");
    for f in ["state", "ram", "root.qcow2", "work.ext4"] {
        assert!(dir.join(f).is_file(), "{f} in {}", dir.display());
    }

    // Two clones at once.
    let spawn = |n: &str| inst.spawn(&["vm", "run", "-d", "--from", "s1", "--name", n]);
    let (mut a, mut b) = (spawn("c1"), spawn("c2"));
    for (c, n) in [(&mut a, "c1"), (&mut b, "c2")] {
        let st = test_infra::bounded::wait_within(c, std::time::Duration::from_secs(300))
            .expect("a clone is made within its bound");
        assert!(st.success(), "vm run --from s1 --name {n}: {st}");
    }
    let mut machine_ids = vec![exec(&inst, "origin", &["cat", "/etc/machine-id"])];
    let mut host_keys = vec![exec(
        &inst,
        "origin",
        &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
    )];
    let mut macs = vec![exec(
        &inst,
        "origin",
        &["cat", "/sys/class/net/eth0/address"],
    )];
    for n in ["c1", "c2"] {
        assert_eq!(inst.vm(n).unwrap()["state"], "running");
        // Its own name, and the origin's files of the moment.
        assert_eq!(exec(&inst, n, &["hostname"]), n);
        assert_eq!(exec(&inst, n, &["cat", "/etc/hostname"]), n);
        assert_eq!(exec(&inst, n, &["cat", "/root/r"]), "root-data");
        assert_eq!(exec(&inst, n, &["cat", "/work/w"]), "work-data");
        // A copy of the origin's volume, its own (`<clone>-<volume>`).
        assert_eq!(exec(&inst, n, &["cat", "/data/v"]), "vol-data");
        let out = inst.banger(&["volume", "ls", "--json"]);
        let vols: Vec<serde_json::Value> = serde_json::from_str(&ok(&out, "volume ls")).unwrap();
        let mine: Vec<&str> = vols
            .iter()
            .filter(|v| v["used_by"].as_array().unwrap().iter().any(|u| u == n))
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(mine, vec![format!("{n}-ov")]);
        let later = inst.banger(&["vm", "exec", n, "--", "test", "-e", "/root/later"]);
        assert!(!later.status.success(), "{n} sees what origin wrote after");
        // Its own address, on its own tap: the guest has it, and the host
        // reaches it by SSH with its own pinned host key.
        let ip = inst.guest_ip(n);
        let addrs = exec(&inst, n, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(addrs.contains(&format!("{ip}/")), "{n} is at {ip}: {addrs}");
        let out = inst.banger(&["vm", "ssh", n, "--", "hostname"]);
        assert_eq!(ok(&out, "vm ssh").trim(), n);
        machine_ids.push(exec(&inst, n, &["cat", "/etc/machine-id"]));
        host_keys.push(exec(
            &inst,
            n,
            &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
        ));
        macs.push(exec(&inst, n, &["cat", "/sys/class/net/eth0/address"]));
    }
    for v in [&machine_ids, &host_keys, &macs] {
        let mut u = v.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 3, "each machine its own: {v:?}");
    }
    assert_ne!(inst.guest_ip("c1"), inst.guest_ip("c2"));
    // Writes in one are not seen in the others.
    exec(
        &inst,
        "c1",
        &[
            "sh",
            "-c",
            "echo mine > /work/c1-only && echo mine > /data/c1-only && sync",
        ],
    );
    for n in ["c2", "origin"] {
        for f in ["/work/c1-only", "/data/c1-only"] {
            let out = inst.banger(&["vm", "exec", n, "--", "test", "-e", f]);
            assert!(!out.status.success(), "{n} sees c1's {f}");
        }
    }
    // A clone that ran boots from its own disks after a stop.
    ok(&inst.banger(&["vm", "stop", "c2"]), "stop c2");
    ok(&inst.banger(&["vm", "start", "c2"]), "start c2");
    assert_eq!(exec(&inst, "c2", &["cat", "/root/r"]), "root-data");
    assert_eq!(exec(&inst, "c2", &["hostname"]), "c2");

    // A clone not started yet keeps its snapshot.
    ok(
        &inst.banger(&["vm", "create", "--from", "s1", "--name", "c3"]),
        "vm create --from",
    );
    let err = err_of(&inst.banger(&["snapshot", "rm", "s1"]));
    assert!(err.contains("needed by vm(s) c3"), "{err}");
    ok(&inst.banger(&["vm", "rm", "c3"]), "vm rm c3");
    ok(&inst.banger(&["snapshot", "rm", "s1"]), "snapshot rm");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert_eq!(ok(&inst.banger(&["snapshot", "ls", "-q"]), "ls"), "");
    // The clones live on without it.
    assert_eq!(exec(&inst, "c1", &["cat", "/work/c1-only"]), "mine");
    ok(
        &inst.banger(&["vm", "rm", "-f", "origin", "c1", "c2"]),
        "vm rm -f",
    );
    // The clones' volumes outlive them, as volumes do; c3's too.
    let out = inst.banger(&["volume", "ls", "-q"]);
    assert_eq!(ok(&out, "volume ls"), "c1-ov\nc2-ov\nc3-ov\nov\n");
    for v in ["c1-ov", "c2-ov", "c3-ov", "ov"] {
        ok(&inst.banger(&["volume", "rm", v]), "volume rm");
    }
    inst.assert_baseline();
}

#[test]
fn what_cannot_be_restored_is_refused_with_the_fix() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "create", "--name", "cold"]),
        "vm create",
    );
    let err = err_of(&inst.banger(&["vm", "snapshot", "cold", "s"]));
    assert!(err.contains("only a running or paused VM"), "{err}");
    let err = err_of(&inst.banger(&["vm", "run", "-d", "--from", "nope"]));
    assert!(err.contains("snapshot \"nope\" not found"), "{err}");

    // A paused VM stays paused through its snapshot.
    ok(&inst.banger(&["vm", "start", "cold"]), "start");
    ok(&inst.banger(&["vm", "pause", "cold"]), "pause");
    ok(
        &inst.banger(&["vm", "snapshot", "cold", "s"]),
        "snapshot a paused VM",
    );
    assert_eq!(inst.vm("cold").unwrap()["state"], "paused");
    ok(&inst.banger(&["vm", "resume", "cold"]), "resume");
    assert_eq!(exec(&inst, "cold", &["echo", "on"]), "on");
    let err = err_of(&inst.banger(&["vm", "snapshot", "cold", "s"]));
    assert!(err.contains("snapshot \"s\" already exists"), "{err}");

    // A clone is the snapshot's machine: other sizes are refused.
    let err = err_of(&inst.banger(&["vm", "run", "-d", "--from", "s", "--memory", "3G"]));
    assert!(
        err.contains("--from s: a clone is the snapshot's machine; leave out --memory"),
        "{err}"
    );

    let dir = snapshot_dir(&inst, "s");
    // A damaged device state: refused by its checksum, nothing left.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let err = err_of(&inst.banger(&["vm", "run", "--rm", "--from", "s", "--", "true"]));
    assert!(
        err.contains("is damaged") && err.contains("checksum"),
        "{err}"
    );
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    // A truncated RAM file: refused by its size before anything is made.
    let (ram, kept) = (dir.join("ram"), dir.join("ram.kept"));
    let len = std::fs::metadata(&ram).unwrap().len();
    std::fs::rename(&ram, &kept).unwrap();
    let f = std::fs::File::create(&ram).unwrap();
    f.set_len(len / 2).unwrap();
    let err = err_of(&inst.banger(&["vm", "create", "--from", "s", "--name", "t"]));
    assert!(err.contains("is damaged") && err.contains("ram"), "{err}");
    assert!(inst.vm("t").is_none(), "a refused clone leaves no VM");
    std::fs::rename(&kept, &ram).unwrap();
    // Another banger's snapshot is refused, never misread.
    let store = banger_store::Store::open(&inst.state().join("banger.db")).unwrap();
    store
        .raw_execute(
            "UPDATE snapshots SET record_json = \
             json_set(record_json, '$.format.banger', '0.0.1') WHERE name = 's'",
        )
        .unwrap();
    let err = err_of(&inst.banger(&["vm", "create", "--from", "s", "--name", "t"]));
    assert!(err.contains("was made by banger 0.0.1"), "{err}");
    store
        .raw_execute(&format!(
            "UPDATE snapshots SET record_json = \
             json_set(record_json, '$.format.banger', '{}') WHERE name = 's'",
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap();
    drop(store);
    // Repaired, it restores (the paused VM's clone runs).
    let out = inst.banger(&[
        "vm",
        "run",
        "--rm",
        "--from",
        "s",
        "--",
        "cat",
        "/etc/hostname",
    ]);
    let name = ok(&out, "vm run --rm --from s");
    assert!(!name.trim().is_empty() && name.trim() != "cold", "{name}");

    // The image a snapshot needs cannot be removed.
    let err = err_of(&inst.banger(&["image", "rm", "bookworm"]));
    assert!(err.contains("snapshot s"), "{err}");
    ok(&inst.banger(&["snapshot", "rm", "s"]), "snapshot rm");
    ok(&inst.banger(&["vm", "rm", "-f", "cold"]), "vm rm -f");
    inst.assert_baseline();
}

#[test]
fn a_vm_with_a_mount_is_refused_a_snapshot() {
    let inst = Instance::new(&banger_bin()).with_image();
    let shared = tempfile::tempdir_in("/var/tmp").unwrap();
    let m = format!("{}:/mnt/host:ro", shared.path().display());
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "m", "--mount", &m]),
        "vm run --mount",
    );
    let err = err_of(&inst.banger(&["vm", "snapshot", "m", "s"]));
    assert!(
        err.contains("has --mount shares") && err.contains("vm cp"),
        "{err}"
    );
    assert_eq!(ok(&inst.banger(&["snapshot", "ls", "-q"]), "ls"), "");
    assert_eq!(exec(&inst, "m", &["echo", "on"]), "on");
    ok(&inst.banger(&["vm", "rm", "-f", "m"]), "vm rm -f");
    inst.assert_baseline();
}

#[test]
fn a_fork_clones_a_running_vm_with_its_processes() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "o"]),
        "vm run -d o",
    );
    // A detached process that counts in a file: each clone has it too,
    // and it counts on there, in the clone's own file.
    start_counter(&inst, "o");
    let err = err_of(&inst.banger(&["vm", "fork", "o", "f", "-n", "0"]));
    assert!(err.contains("give 1 to 32 clones"), "{err}");
    let err = err_of(&inst.banger(&["vm", "fork", "o", "o"]));
    assert!(err.contains("vm \"o\" already exists"), "{err}");

    let out = inst.banger(&["vm", "fork", "o", "f", "-n", "3"]);
    assert_eq!(ok(&out, "vm fork"), "f-1\nf-2\nf-3\n");
    // The fork's snapshot is gone with it.
    assert_eq!(ok(&inst.banger(&["snapshot", "ls", "-q"]), "ls"), "");
    for n in ["f-1", "f-2", "f-3"] {
        assert_eq!(inst.vm(n).unwrap()["state"], "running");
        assert_eq!(exec(&inst, n, &["hostname"]), n);
        let out = inst.banger(&["vm", "ps", n, "--json"]);
        let ps: Vec<serde_json::Value> = serde_json::from_str(&ok(&out, "ps")).unwrap();
        assert!(
            ps.iter()
                .any(|p| p["tag"] == "counter" && p["exit"].is_null()),
            "{n} runs the origin's process: {ps:?}"
        );
        let a = read_count(&inst, n);
        let b = test_infra::wait_until(std::time::Duration::from_secs(60), || {
            exec(&inst, n, &["cat", "/tmp/count"])
                .parse::<u64>()
                .is_ok_and(|b| b > a)
        });
        assert!(b, "{n}'s counter goes on from {a}");
    }
    assert_eq!(exec(&inst, "o", &["hostname"]), "o");
    ok(
        &inst.banger(&["vm", "rm", "-f", "o", "f-1", "f-2", "f-3"]),
        "vm rm -f",
    );
    inst.assert_baseline();
}

#[test]
fn pause_to_disk_ends_the_vmm_and_resume_brings_the_guest_back() {
    let inst = Instance::new(&banger_bin()).with_image();
    // A VM with a volume keeps it: refused (it would give it up).
    ok(
        &inst.banger(&["volume", "create", "sv", "--size", "16M"]),
        "volume create",
    );
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "v", "--volume", "sv:/data"]),
        "vm run -d v",
    );
    let err = err_of(&inst.banger(&["vm", "pause", "--to-disk", "v"]));
    assert!(err.contains("has volumes"), "{err}");
    assert_eq!(inst.vm("v").unwrap()["state"], "running");
    ok(&inst.banger(&["vm", "rm", "-f", "v"]), "vm rm v");
    ok(&inst.banger(&["volume", "rm", "sv"]), "volume rm");

    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "s"]),
        "vm run -d s",
    );
    start_counter(&inst, "s");
    exec(&inst, "s", &["sh", "-c", "echo kept > /dev/shm/mark"]);
    let machine_id = exec(&inst, "s", &["cat", "/etc/machine-id"]);
    let ip = inst.guest_ip("s");
    let before = read_count(&inst, "s");

    ok(
        &inst.banger(&["vm", "pause", "--to-disk", "s"]),
        "pause --to-disk",
    );
    let vm = inst.vm("s").unwrap();
    assert_eq!(vm["state"], "suspended");
    assert!(inst.vmm_processes().is_empty(), "its VMM is gone");
    let ram_files: Vec<_> = std::fs::read_dir(
        inst.env()
            .iter()
            .find(|(k, _)| k == "BANGER_RAM_DIR")
            .map(|(_, v)| v.clone())
            .unwrap(),
    )
    .map(|d| d.flatten().map(|e| e.path()).collect())
    .unwrap_or_default();
    assert!(
        ram_files.is_empty(),
        "its memory is given back: {ram_files:?}"
    );
    // Its saved guest is no snapshot of the user's, and no one removes it.
    assert_eq!(ok(&inst.banger(&["snapshot", "ls", "-q"]), "ls"), "");
    let saved = ok(&inst.banger(&["snapshot", "ls", "-a", "-q"]), "ls -a");
    let saved = saved.trim().to_string();
    assert!(saved.starts_with("suspend."), "{saved}");
    let err = err_of(&inst.banger(&["snapshot", "rm", &saved]));
    assert!(err.contains("vm \"s\"'s saved guest"), "{err}");
    let err = err_of(&inst.banger(&["vm", "run", "--from", &saved, "--name", "t"]));
    assert!(err.contains("only its VM restores"), "{err}");
    let err = err_of(&inst.banger(&["vm", "exec", "s", "--", "true"]));
    assert!(err.contains("suspended"), "{err}");
    let err = err_of(&inst.banger(&["vm", "pause", "--to-disk", "s"]));
    assert!(err.contains("only a running or paused VM"), "{err}");

    // Back as itself, its processes and volume with it.
    ok(&inst.banger(&["vm", "resume", "s"]), "resume");
    assert_eq!(inst.vm("s").unwrap()["state"], "running");
    assert_eq!(exec(&inst, "s", &["cat", "/etc/machine-id"]), machine_id);
    assert_eq!(exec(&inst, "s", &["hostname"]), "s");
    assert_eq!(inst.guest_ip("s"), ip);
    assert_eq!(exec(&inst, "s", &["cat", "/dev/shm/mark"]), "kept");
    let ps: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&inst.banger(&["vm", "ps", "s", "--json"]), "ps")).unwrap();
    assert!(
        ps.iter()
            .any(|p| p["tag"] == "counter" && p["exit"].is_null()),
        "its process lives: {ps:?}"
    );
    let after = read_count(&inst, "s");
    assert!(
        after >= before,
        "the counter went on from {before}: {after}"
    );
    let goes_on = test_infra::wait_until(std::time::Duration::from_secs(60), || {
        exec(&inst, "s", &["cat", "/tmp/count"])
            .parse::<u64>()
            .is_ok_and(|n| n > after)
    });
    assert!(goes_on, "and counts on");
    // The saved guest went with the resume.
    assert_eq!(
        ok(&inst.banger(&["snapshot", "ls", "-a", "-q"]), "ls -a"),
        ""
    );

    // `vm stop` discards a saved guest: the next start boots.
    ok(
        &inst.banger(&["vm", "pause", "--to-disk", "s"]),
        "pause --to-disk",
    );
    ok(&inst.banger(&["vm", "stop", "s"]), "vm stop");
    assert_eq!(inst.vm("s").unwrap()["state"], "stopped");
    assert_eq!(
        ok(&inst.banger(&["snapshot", "ls", "-a", "-q"]), "ls -a"),
        ""
    );
    ok(&inst.banger(&["vm", "start", "s"]), "vm start");
    let out = inst.banger(&["vm", "exec", "s", "--", "cat", "/dev/shm/mark"]);
    assert!(!out.status.success(), "a boot has a new memory");

    // A suspended VM deleted takes its saved guest along.
    ok(
        &inst.banger(&["vm", "pause", "--to-disk", "s"]),
        "pause --to-disk",
    );
    ok(&inst.banger(&["vm", "rm", "s"]), "vm rm");
    assert_eq!(
        ok(&inst.banger(&["snapshot", "ls", "-a", "-q"]), "ls -a"),
        ""
    );
    let left: Vec<_> = std::fs::read_dir(inst.state().join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshot dirs left: {left:?}");
    inst.assert_baseline();
}

/// A kill while a clone's restore is under way cancels it: the run fails
/// saying so, and the clone is left stopped with nothing held (its next
/// start restores it).
#[test]
fn a_kill_cancels_a_restore_under_way() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "o"]),
        "vm run -d o",
    );
    ok(&inst.banger(&["vm", "snapshot", "o", "s"]), "vm snapshot");
    ok(&inst.banger(&["vm", "rm", "-f", "o"]), "vm rm o");
    let gate = Gate::on(&inst, "restore.loaded");
    let run = inst.spawn(&["vm", "run", "-d", "--from", "s", "--name", "c"]);
    gate.reached(&inst, "the restore");
    let kill = inst.spawn(&["vm", "kill", "c"]);
    let log = inst.state().join("bangerd.log");
    assert!(
        wait_until(std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("kill: cancelling the boot in progress")
        }),
        "the kill never cancelled the restore"
    );
    gate.open();
    let out = test_infra::bounded::wait_output(run);
    assert!(!out.status.success(), "the restore went on: {out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("cancel"), "{err}");
    ok(&test_infra::bounded::wait_output(kill), "vm kill");
    assert_eq!(inst.vm("c").unwrap()["state"], "stopped");
    assert!(
        inst.vmm_processes().is_empty(),
        "{:?}",
        inst.vmm_processes()
    );
    // Its next start restores it (a daemon without the gate).
    inst.kill_daemon();
    ok(&inst.banger(&["vm", "start", "c"]), "vm start c");
    let out = inst.banger(&["vm", "exec", "c", "--", "cat", "/etc/hostname"]);
    assert_eq!(ok(&out, "exec c"), "c\n");
    ok(&inst.banger(&["vm", "rm", "-f", "c"]), "vm rm c");
    ok(&inst.banger(&["snapshot", "rm", "s"]), "snapshot rm");
    inst.assert_baseline();
}
