//! Host directories in real guests (`--mount`, virtio-fs through
//! virtiofsd): a guest reads and writes a read-write mount and the host
//! sees its writes; a read-only mount stays read-only even when the guest
//! remounts it read-write (the host's side enforces it); mounts come back
//! after a stop and a start; bad mounts are refused before anything
//! exists; no virtiofsd is left. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

#[test]
fn host_directories_are_shared_and_read_only_ones_stay_so() {
    let inst = Instance::new(&banger_bin()).with_image();
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("hello"), "from the host\n").unwrap();
    std::fs::write(ro.path().join("keep"), "read only\n").unwrap();
    let rw_arg = format!("{}:/host", rw.path().display());
    let ro_arg = format!("{}:/ro:ro", ro.path().display());

    let out = ok(
        &inst.banger(&[
            "vm",
            "run",
            "--name",
            "m1",
            "--mount",
            &rw_arg,
            "--mount",
            &ro_arg,
            "--",
            "sh",
            "-c",
            "cat /host/hello /ro/keep; echo from the guest > /host/out; \
             echo x > /ro/y 2>/dev/null && echo wrote; \
             mount -o remount,rw /ro; awk '$2 == \"/ro\" {print substr($4, 1, 2)}' /proc/mounts; \
             echo x > /ro/y 2>/dev/null && echo wrote; true",
        ]),
        "vm run with mounts",
    );
    // The guest's remount succeeds (rw), its write still fails: the host's
    // side is read-only.
    assert_eq!(out, "from the host\nread only\nrw\n");
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out")).unwrap(),
        "from the guest\n"
    );
    assert!(
        !ro.path().join("y").exists(),
        "the guest wrote a read-only mount"
    );

    // After a stop and a start the shares are back (new virtiofsds).
    ok(&inst.banger(&["vm", "stop", "m1"]), "stop");
    ok(&inst.banger(&["vm", "start", "m1"]), "start");
    // virtiofsd serves a path of the VM's own dir, where the daemon bound
    // the directory it opened and checked: the user's path is not on its
    // command line (a later swap of it redirects nothing).
    let vfs: Vec<String> = inst
        .processes()
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.contains("virtiofsd"))
        .collect();
    // (virtiofsd forks its sandboxed worker: two processes per mount.)
    assert!(vfs.len() >= 2, "{vfs:?}");
    for c in &vfs {
        assert!(
            c.contains("/share0") || c.contains("/share1"),
            "source is the VM dir's share: {c}"
        );
        assert!(!c.contains(&rw.path().display().to_string()), "{c}");
        assert!(!c.contains(&ro.path().display().to_string()), "{c}");
    }
    std::fs::write(rw.path().join("hello"), "changed on the host\n").unwrap();
    assert_eq!(
        ok(
            &inst.banger(&["vm", "exec", "m1", "--", "cat", "/host/hello"]),
            "exec"
        ),
        "changed on the host\n"
    );
    ok(&inst.banger(&["vm", "delete", "-f", "m1"]), "delete");

    // Bad mounts: refused with the reason, nothing created.
    let missing = format!("{}/nope:/x", rw.path().display());
    let work = format!("{}:/work", rw.path().display());
    let twice = [rw_arg.as_str(), "--mount", rw_arg.as_str()];
    for (args, says) in [
        (vec!["relative:/x"], "must be absolute"),
        (vec![missing.as_str()], "No such file"),
        (vec![work.as_str()], "/work is already a mount point"),
        (twice.to_vec(), "/host is already a mount point"),
    ] {
        let mut a = vec!["vm", "create", "--mount"];
        a.extend(args);
        let out = inst.banger(&a);
        assert!(
            !out.status.success() && text(&out.stderr).contains(says),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }
    inst.assert_baseline();
}

/// Where the daemon's default VMM is Firecracker (a KVM host; here the
/// spec-checked double, and `BANGER_VMM`), a VM that needs virtio-fs
/// (`--mount`, and so every containerd container) gets QEMU without
/// asking, and says why; one that needs nothing of it keeps the default;
/// an explicit `--vmm firecracker` with a mount is refused, naming the
/// fix. (Created, not booted: the choice is made before anything runs.)
#[test]
fn a_mount_picks_qemu_over_a_default_firecracker() {
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_VMM", "firecracker");
    inst.start_daemon_with_firecracker_double();
    let dir = tempfile::tempdir().unwrap();
    let mount = format!("{}:/data", dir.path().display());
    let out = inst.banger(&["vm", "create", "--name", "m", "--mount", &mount]);
    ok(&out, "vm create --mount");
    assert!(
        text(&out.stderr).contains("QEMU, not the default Firecracker: --mount"),
        "{}",
        text(&out.stderr)
    );
    ok(&inst.banger(&["vm", "create", "--name", "f"]), "vm create");
    let vmm = |name: &str| inst.vm(name).expect("the VM")["vmm"].clone();
    assert_eq!(vmm("m"), "qemu");
    assert_eq!(vmm("f"), "firecracker");
    let out = inst.banger(&[
        "vm",
        "create",
        "--name",
        "x",
        "--vmm",
        "firecracker",
        "--mount",
        &mount,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--mount needs virtio-fs, which Firecracker does not have"),
        "{}",
        text(&out.stderr)
    );
    assert!(inst.vm("x").is_none());
    ok(&inst.banger(&["vm", "rm", "m", "f"]), "vm rm");
    inst.assert_baseline();
}
