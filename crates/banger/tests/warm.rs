//! Warm starts on real QEMU guests (issue 21): the first `vm run` of an
//! image and sizes boots and leaves a snapshot of the freshly booted
//! guest; the next restores it (each VM its own machine); `--cold` boots;
//! a changed image is booted again and its old snapshot goes; `image rm`
//! takes the cache's snapshots of the image with it; on Firecracker
//! through its jailer too. Needs root;
//! `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// The warm-start cache's snapshots, by name.
fn cached(inst: &Instance) -> Vec<String> {
    let out = ok(
        &inst.banger(&["snapshot", "ls", "--all", "-q"]),
        "snapshot ls --all",
    );
    out.lines().map(str::to_string).collect()
}

/// `vm run --rm --timings --name NAME [EXTRA] -- cat /etc/hostname`:
/// its stdout (the hostname) and stderr (the spec line and timings).
fn run(inst: &Instance, name: &str, extra: &[&str]) -> (String, String) {
    let mut a = vec!["vm", "run", "--rm", "--timings", "--name", name];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--", "cat", "/etc/hostname"]);
    let out = inst.banger(&a);
    let stdout = ok(&out, &format!("vm run {name}"));
    (stdout.trim().to_string(), text(&out.stderr))
}

fn warm(stderr: &str) -> bool {
    stderr.contains(", warm start") && stderr.contains("timing restore")
}

fn cold(stderr: &str) -> bool {
    !stderr.contains(", warm start") && stderr.contains("timing boot")
}

#[test]
fn warm_starts_restore_a_freshly_booted_guest_and_follow_the_image() {
    // A copy of the image: this test changes its files.
    let inst = Instance::new(&banger_bin())
        .with_image_copied()
        .with_env("BANGER_WARM_CACHE", "4G");

    // The first run boots, and leaves its snapshot before the command.
    let (host, err) = run(&inst, "first", &[]);
    assert_eq!(host, "first");
    assert!(cold(&err), "the first run boots: {err}");
    assert!(err.contains("timing warm-save"), "and saves: {err}");
    let first = cached(&inst);
    assert_eq!(first.len(), 1, "one warm snapshot: {first:?}");
    assert!(first[0].starts_with("warm."), "{first:?}");
    // Not among the user's snapshots.
    let out = inst.banger(&["snapshot", "ls", "-q"]);
    assert_eq!(ok(&out, "snapshot ls"), "");
    // Nor for `--from`.
    let out = inst.banger(&["vm", "create", "--name", "x", "--from", &first[0]]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("warm-start cache"),
        "{}",
        text(&out.stderr)
    );

    // The next restores it, as itself.
    let (host, err) = run(&inst, "second", &[]);
    assert_eq!(host, "second");
    assert!(warm(&err), "the second run is a warm start: {err}");
    assert!(!err.contains("timing warm-save"), "{err}");

    // Two warm VMs side by side, on a network of their own (the warm
    // snapshot's guest was on the default one), are machines of their
    // own.
    for n in ["w1", "w2"] {
        let out = inst.banger(&["vm", "run", "-d", "--network", "wnet", "--name", n]);
        ok(&out, "vm run -d");
        let err = text(&out.stderr);
        assert!(err.contains(", warm start"), "{n}: {err}");
    }
    let exec = |n: &str, args: &[&str]| {
        let mut a = vec!["vm", "exec", n, "--"];
        a.extend_from_slice(args);
        ok(&inst.banger(&a), "vm exec").trim().to_string()
    };
    let ids: Vec<String> = ["w1", "w2"]
        .iter()
        .map(|n| exec(n, &["cat", "/etc/machine-id"]))
        .collect();
    assert_ne!(ids[0], ids[1], "each clone has a machine id of its own");
    for n in ["w1", "w2"] {
        assert_eq!(exec(n, &["hostname"]), n);
        let ip = inst.guest_ip(n);
        let addrs = exec(n, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(addrs.contains(&format!("{ip}/")), "{n}: {addrs}");
    }
    // Each finds the other by name (banger's DNS for their network).
    let w2 = exec("w1", &["getent", "hosts", "w2.vm"]);
    assert!(w2.starts_with(&inst.guest_ip("w2")), "w2.vm from w1: {w2}");
    ok(&inst.banger(&["vm", "rm", "-f", "w1", "w2"]), "vm rm");

    // --cold boots, and leaves nothing new.
    let (host, err) = run(&inst, "third", &["--cold"]);
    assert_eq!(host, "third");
    assert!(cold(&err), "--cold boots: {err}");
    assert_eq!(cached(&inst), first);

    // The image changes (its initramfs rewritten): the next run boots
    // and replaces the cache's snapshot, whose files go.
    let snap_dir = {
        let out = inst.banger(&["snapshot", "show", &first[0], "--json"]);
        let v: serde_json::Value = serde_json::from_str(&ok(&out, "snapshot show")).unwrap();
        PathBuf::from(v["dir"].as_str().unwrap())
    };
    let initrd = inst.state().join("images/bookworm/initrd.img");
    let bytes = std::fs::read(&initrd).unwrap();
    std::fs::write(&initrd, &bytes).unwrap();
    let (host, err) = run(&inst, "fourth", &[]);
    assert_eq!(host, "fourth");
    assert!(cold(&err), "a changed image boots: {err}");
    let now = cached(&inst);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first, "a new snapshot replaced the old");
    assert!(!snap_dir.exists(), "the old one's files went");
    let (_, err) = run(&inst, "fifth", &[]);
    assert!(warm(&err), "{err}");

    // Removing the image takes its warm snapshots along.
    ok(&inst.banger(&["image", "rm", "bookworm"]), "image rm");
    assert!(cached(&inst).is_empty());
    let left: Vec<_> = std::fs::read_dir(inst.state().join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshot dirs left: {left:?}");
}

/// Warm starts on Firecracker through its jailer (both played by their
/// doubles here): the first run boots and saves through
/// `/snapshot/create`, the next is a clone loaded into a bare
/// Firecracker; without the jailer there is no warm start, and no
/// entry.
#[test]
fn firecracker_warm_starts_through_its_jailer() {
    let bin = banger_bin();
    let (fc, jailer) = (
        bin.with_file_name("firecracker-double"),
        bin.with_file_name("jailer-double"),
    );
    assert!(fc.is_file() && jailer.is_file(), "build the doubles");
    let inst = Instance::new(&bin)
        .with_image()
        .with_env("BANGER_WARM_CACHE", "4G")
        .with_env("BANGER_FIRECRACKER", fc.to_str().unwrap())
        .with_env("BANGER_JAILER", jailer.to_str().unwrap());
    let fcvm = ["--vmm", "firecracker"];
    let (host, err) = run(&inst, "f1", &fcvm);
    assert_eq!(host, "f1");
    assert!(cold(&err) && err.contains("timing warm-save"), "{err}");
    assert_eq!(cached(&inst).len(), 1);
    let (host, err) = run(&inst, "f2", &fcvm);
    assert_eq!(host, "f2");
    assert!(warm(&err), "the second run is a warm start: {err}");
    inst.assert_baseline();
    drop(inst);

    let inst = Instance::new(&bin)
        .with_image()
        .with_env("BANGER_WARM_CACHE", "4G")
        .with_env("BANGER_FIRECRACKER", fc.to_str().unwrap());
    for n in ["n1", "n2"] {
        let (host, err) = run(&inst, n, &fcvm);
        assert_eq!(host, n);
        assert!(cold(&err) && !err.contains("warm-save"), "{err}");
    }
    assert!(cached(&inst).is_empty());
    inst.assert_baseline();
}
