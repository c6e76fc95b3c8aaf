//! Named volumes on real guests: data that outlives its VM, one running VM
//! at a time, refused removal while mounted, bad mounts refused before
//! anything exists. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn volumes(inst: &Instance) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(&inst.banger(&["volume", "ls", "--json"]), "volume ls")).unwrap()
}

#[test]
fn a_volume_outlives_its_vm_and_has_one_running_vm_at_a_time() {
    let inst = Instance::new(&banger_bin()).with_image();
    ok(
        &inst.banger(&["volume", "create", "data", "--size", "64M"]),
        "volume create",
    );
    let v = volumes(&inst);
    assert_eq!(
        (v[0]["name"].as_str(), v[0]["size_mib"].as_u64()),
        (Some("data"), Some(64))
    );
    let out = inst.banger(&["volume", "create", "data"]);
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );

    // Bad mounts are refused before a VM exists.
    for (args, says) in [
        (vec!["--volume", "nosuch:/x"], "no volume \"nosuch\""),
        (vec!["--volume", "data:/a;reboot"], "only letters"),
        (
            vec!["--volume", "data:/x", "--volume", "data:/y"],
            "given twice",
        ),
        (vec!["--volume", "data:/work"], "already a mount point"),
    ] {
        let mut a = vec!["vm", "create", "--name", "bad"];
        a.extend(args);
        let out = inst.banger(&a);
        assert!(
            !out.status.success() && text(&out.stderr).contains(says),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(
        inst.vms().is_empty(),
        "nothing was created: {:?}",
        inst.vms()
    );

    let out = inst.banger(&[
        "vm",
        "run",
        "--name",
        "a",
        "--volume",
        "data:/srv/data",
        "--",
        "sh",
        "-c",
        "echo kept > /srv/data/f && grep -c ' /srv/data ext4 ' /proc/mounts",
    ]);
    assert_eq!(ok(&out, "vm run with a volume").trim(), "1");
    assert_eq!(volumes(&inst)[0]["attached_to"], "a");

    // A second VM with it does not start while the first runs.
    ok(
        &inst.banger(&["vm", "create", "--name", "b", "--volume", "data:/data"]),
        "create b",
    );
    let out = inst.banger(&["vm", "start", "b"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("attached to running vm \"a\""),
        "{}",
        text(&out.stderr)
    );
    let out = inst.banger(&["volume", "rm", "data"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("a, b"),
        "removal refused naming the VMs: {}",
        text(&out.stderr)
    );

    // The data outlives a.
    ok(&inst.banger(&["vm", "delete", "-f", "a"]), "delete a");
    ok(&inst.banger(&["vm", "start", "b"]), "start b");
    let out = inst.banger(&["vm", "exec", "b", "--", "cat", "/data/f"]);
    assert_eq!(text(&out.stdout), "kept\n", "{}", text(&out.stderr));
    assert_eq!(volumes(&inst)[0]["attached_to"], "b");
    // A daemon restart remembers who has it.
    inst.kill_daemon();
    assert_eq!(volumes(&inst)[0]["attached_to"], "b");

    ok(&inst.banger(&["vm", "delete", "-f", "b"]), "delete b");
    ok(&inst.banger(&["volume", "rm", "data"]), "volume rm");
    assert!(volumes(&inst).is_empty());
    inst.assert_baseline();
}

/// `--root-size` grows the root filesystem beyond the image's; the guest
/// sees the space. Too small a size is refused before anything exists.
#[test]
fn root_size_grows_the_root_filesystem() {
    let inst = Instance::new(&banger_bin()).with_image();
    let out = inst.banger(&["vm", "create", "--name", "tiny", "--root-size", "64M"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("root filesystem is"),
        "{}",
        text(&out.stderr)
    );
    assert!(inst.vms().is_empty());
    let out = inst.banger(&[
        "vm",
        "run",
        "--name",
        "big",
        "--root-size",
        "4G",
        "--",
        "sh",
        "-c",
        "df -m / | tail -1",
    ]);
    let line = ok(&out, "vm run --root-size");
    let size_mib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("df's size");
    assert!(size_mib > 3500, "the guest sees about 4 GiB: {line}");
    ok(&inst.banger(&["vm", "delete", "-f", "big"]), "delete");
    inst.assert_baseline();
}
