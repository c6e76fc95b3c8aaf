//! Snapshots on Firecracker (issue 21), through its jailer: played here
//! by `jailer-double` and `firecracker-double` (these machines have no
//! KVM), which checks every request against Firecracker's spec and its
//! rules (`/snapshot/create` only paused, `/snapshot/load` only on a bare
//! process and fatal when it fails, drives reopened at the paths the
//! snapshot recorded, the vsock's socket bound afresh) and plays the
//! guest with QEMU's migration. `vm snapshot` of a running VM, a clone
//! `--from` it with the origin's files and processes and an identity of
//! its own, `vm fork`, `vm pause --to-disk` and `resume`; without the
//! jailer a snapshot is refused, naming it. Needs root; `scripts/test.sh`
//! runs it.

use std::path::PathBuf;

use test_infra::{ok, text, wait_until, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn doubles() -> (PathBuf, PathBuf) {
    let bin = banger_bin();
    let (fc, jailer) = (
        bin.with_file_name("firecracker-double"),
        bin.with_file_name("jailer-double"),
    );
    assert!(
        fc.is_file() && jailer.is_file(),
        "build the doubles: cargo build --workspace --bins"
    );
    (fc, jailer)
}

fn exec(inst: &Instance, name: &str, args: &[&str]) -> String {
    let mut a = vec!["vm", "exec", name, "--"];
    a.extend_from_slice(args);
    ok(&inst.banger(&a), &format!("exec {args:?} in {name}"))
        .trim()
        .to_string()
}

/// The count a detached `counter` in `name` has reached.
fn count(inst: &Instance, name: &str) -> u64 {
    inst.guest_number(name, "/tmp/count")
}

/// `name`'s chroot (while it runs).
fn jail(inst: &Instance, name: &str) -> PathBuf {
    let id = inst.vm(name).unwrap()["id"].as_str().unwrap().to_string();
    inst.state()
        .join("jail/firecracker-double")
        .join(&id[..16])
        .join("root")
}

/// The snapshot files in `name`'s chroot.
fn snapshot_files(inst: &Instance, name: &str) -> Vec<String> {
    std::fs::read_dir(jail(inst, name))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot"))
        .collect()
}

/// What the double logged of the API calls of `name`'s Firecracker (its
/// jail's `vmm.log`, while it runs).
fn api_log(inst: &Instance, name: &str) -> String {
    let log = jail(inst, name).join("vmm.log");
    std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()))
}

#[test]
fn firecracker_snapshots_clone_fork_and_suspend() {
    let (fc, jailer) = doubles();
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_FIRECRACKER", fc.to_str().unwrap())
        .with_env("BANGER_JAILER", jailer.to_str().unwrap());
    ok(
        &inst.banger(&["vm", "run", "-d", "--vmm", "firecracker", "--name", "fa"]),
        "vm run -d --vmm firecracker",
    );
    exec(&inst, "fa", &["sh", "-c", "echo origin > /root/mark"]);
    ok(
        &inst.banger(&[
            "vm",
            "exec",
            "-d",
            "--tag",
            "counter",
            "fa",
            "--",
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
        ]),
        "exec -d",
    );
    assert!(wait_until(std::time::Duration::from_secs(30), || count(
        &inst, "fa"
    ) > 2));

    // The snapshot: made paused, version recorded, the origin runs on.
    ok(&inst.banger(&["vm", "snapshot", "fa", "s1"]), "vm snapshot");
    let log = api_log(&inst, "fa");
    assert!(log.contains("GET /version  -> 200"), "{log}");
    // Moved out of its jail, root's now.
    assert!(
        snapshot_files(&inst, "fa").is_empty(),
        "{:?}",
        snapshot_files(&inst, "fa")
    );
    assert!(
        log.contains("PUT /snapshot/create") && !log.contains("-> 400"),
        "{log}"
    );
    let show: serde_json::Value = serde_json::from_str(&ok(
        &inst.banger(&["snapshot", "show", "s1", "--json"]),
        "show",
    ))
    .unwrap();
    assert_eq!(show["vmm"], "firecracker", "{show}");
    let before = count(&inst, "fa");
    assert!(wait_until(std::time::Duration::from_secs(30), || count(
        &inst, "fa"
    )
        > before));

    // A clone: the origin's files and counter, its own identity.
    ok(
        &inst.banger(&["vm", "run", "-d", "--from", "s1", "--name", "fb"]),
        "vm run --from",
    );
    assert_eq!(exec(&inst, "fb", &["cat", "/etc/hostname"]), "fb");
    assert_eq!(exec(&inst, "fb", &["cat", "/root/mark"]), "origin");
    let at = count(&inst, "fb");
    assert!(wait_until(std::time::Duration::from_secs(30), || count(
        &inst, "fb"
    ) > at));
    let log = api_log(&inst, "fb");
    assert!(log.contains("PUT /snapshot/load"), "{log}");
    // Its own copy of the memory stays (mapped), the state's goes.
    assert_eq!(snapshot_files(&inst, "fb"), vec!["snapshot.mem"]);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(jail(&inst, "fb").join("snapshot.mem")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o400);
        assert_ne!(m.uid(), 0, "its VMM user's");
    }
    assert!(
        !log.contains("PUT /machine-config") && !log.contains("-> 400"),
        "a restore configures nothing: {log}"
    );
    // Its own tap (the origin's is still the origin's).
    let key = "\"host_dev_name\":\"";
    let at_tap = log
        .find(key)
        .unwrap_or_else(|| panic!("no tap override: {log}"))
        + key.len();
    let tap = &log[at_tap..at_tap + log[at_tap..].find('"').unwrap()];
    assert!(
        inst.taps().iter().any(|t| t == tap),
        "{tap}: {:?}",
        inst.taps()
    );
    assert!(
        !api_log(&inst, "fa").contains(&format!("{key}{tap}\"")),
        "{tap}"
    );
    assert_ne!(inst.guest_ip("fa"), inst.guest_ip("fb"));
    exec(&inst, "fb", &["sh", "-c", "echo clone > /root/mark"]);
    assert_eq!(exec(&inst, "fa", &["cat", "/root/mark"]), "origin");

    // A fork of the running origin.
    ok(&inst.banger(&["vm", "fork", "fa", "fc"]), "vm fork");
    assert_eq!(exec(&inst, "fc", &["cat", "/etc/hostname"]), "fc");
    assert_eq!(exec(&inst, "fc", &["cat", "/root/mark"]), "origin");

    // To disk and back: itself, its counter further on.
    ok(
        &inst.banger(&["vm", "pause", "--to-disk", "fa"]),
        "pause --to-disk",
    );
    assert_eq!(inst.vm("fa").unwrap()["state"], "suspended");
    ok(&inst.banger(&["vm", "resume", "fa"]), "resume");
    assert_eq!(exec(&inst, "fa", &["cat", "/etc/hostname"]), "fa");
    let at = count(&inst, "fa");
    assert!(wait_until(std::time::Duration::from_secs(30), || count(
        &inst, "fa"
    ) > at));

    for vm in ["fa", "fb", "fc"] {
        ok(&inst.banger(&["vm", "rm", "-f", vm]), "rm");
    }
    ok(&inst.banger(&["snapshot", "rm", "s1"]), "snapshot rm");
    // (The jails, each VM's chroot, are among the files it checks.)
    inst.assert_baseline();
}

/// Without the jailer, a Firecracker VM's snapshot is refused, naming
/// it, and nothing is left of it.
#[test]
fn firecracker_without_its_jailer_is_refused_a_snapshot() {
    let (fc, _) = doubles();
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_FIRECRACKER", fc.to_str().unwrap());
    ok(
        &inst.banger(&["vm", "run", "-d", "--vmm", "firecracker", "--name", "nj"]),
        "vm run -d",
    );
    let out = inst.banger(&["vm", "snapshot", "nj", "s"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("without its jailer"), "{err}");
    let out = inst.banger(&["snapshot", "ls", "-a", "--json"]);
    assert_eq!(ok(&out, "snapshot ls").trim(), "[]");
    ok(&inst.banger(&["vm", "rm", "-f", "nj"]), "rm");
    inst.assert_baseline();
}
