//! Root-disk strategies on real guests: five VMs from one image each see
//! only their own writes, keep them across a restart, and leave the
//! image's bytes unchanged; everything (files, loop devices) is gone
//! afterwards. `reflink` runs on a real XFS filesystem on a loop device;
//! `dm-snapshot` needs device-mapper, which this kernel lacks (its
//! sequence is tested in bangerd's unit tests). Needs root;
//! `scripts/test.sh` runs it.

use std::path::PathBuf;
use std::process::Command;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

/// The image's root filesystem's checksum.
fn image_sum(inst: &Instance) -> String {
    let rootfs = inst.state().join("images/bookworm/rootfs.ext4");
    let out = Command::new("cksum").arg(&rootfs).output().expect("cksum");
    assert!(out.status.success(), "cksum {}", rootfs.display());
    text(&out.stdout)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn exec(inst: &Instance, vm: &str, script: &str) -> String {
    ok(
        &inst.banger(&["vm", "exec", vm, "--", "sh", "-c", script]),
        &format!("exec in {vm}: {script}"),
    )
}

fn five_vms_share_one_image(inst: Instance, strategy: &str, root_fs: &str) {
    let before = image_sum(&inst);
    let names: Vec<String> = (1..=5).map(|i| format!("s{i}")).collect();
    for n in &names {
        ok(&inst.banger(&["vm", "create", "--name", n]), "create");
    }
    // Boot them together (the daemon takes requests in parallel).
    let starts: Vec<_> = names
        .iter()
        .map(|n| inst.spawn(&["vm", "start", n]))
        .collect();
    for (n, s) in names.iter().zip(starts) {
        let out = test_infra::bounded::wait_output(s);
        ok(&out, &format!("start {n}"));
    }
    for n in &names {
        let show = ok(&inst.banger(&["vm", "show", n]), "show");
        assert!(
            show.lines()
                .any(|l| l.contains("root disk") && l.contains(strategy)),
            "{n} is not on {strategy}:\n{show}"
        );
        exec(
            &inst,
            n,
            &format!("echo {n} > /etc/written-by && rm /etc/debian_version && sync"),
        );
    }
    for n in &names {
        // Each sees its own write and deletion only.
        let seen = exec(
            &inst,
            n,
            "cat /etc/written-by; test -e /etc/debian_version && echo kept; stat -f -c %T /",
        );
        assert_eq!(
            seen,
            format!("{n}\n{root_fs}\n"),
            "{n} saw another's writes"
        );
    }
    // A write survives a stop and a start.
    ok(&inst.banger(&["vm", "stop", "s1"]), "stop");
    ok(&inst.banger(&["vm", "start", "s1"]), "start again");
    assert_eq!(exec(&inst, "s1", "cat /etc/written-by"), "s1\n");

    for n in &names {
        ok(&inst.banger(&["vm", "delete", "-f", n]), "delete");
    }
    assert_eq!(image_sum(&inst), before, "the image changed");
    inst.assert_baseline();
}

#[test]
fn overlay_root_disks_on_ext4() {
    let inst = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "overlay")
        .with_image();
    // The guest's root is an overlay of the read-only image.
    five_vms_share_one_image(inst, "overlay", "overlayfs");
}

#[test]
fn reflinked_root_disks_on_xfs() {
    let inst = Instance::new(&banger_bin())
        .on_xfs()
        .with_env("BANGER_ROOT_DISK", "reflink")
        .with_image();
    let doctor = ok(&inst.banger(&["doctor"]), "doctor");
    assert!(doctor.contains("reflinks in the state dir yes"), "{doctor}");
    five_vms_share_one_image(inst, "reflink", "ext2/ext3");
}

#[test]
fn copied_root_disks_and_a_strategy_the_host_lacks() {
    // This host's state dir (ext4) has no reflinks: forcing them is
    // refused at create, naming the fix, and leaves nothing.
    let refused = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "reflink")
        .with_image();
    let out = refused.banger(&["vm", "create", "--name", "r"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("--root-disk overlay"),
        "{}",
        text(&out.stderr)
    );
    refused.assert_baseline();

    let inst = Instance::new(&banger_bin())
        .with_env("BANGER_ROOT_DISK", "copy")
        .with_image();
    five_vms_share_one_image(inst, "copy", "ext2/ext3");
}

#[test]
fn an_xfs_state_dir_leaves_no_loop_device() {
    let inst = Instance::new(&banger_bin()).on_xfs();
    assert_eq!(inst.loops().len(), 1, "the state dir's loop");
    let dir = inst.dir.path().to_path_buf();
    drop(inst);
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "BACK-FILE"])
        .output()
        .expect("losetup");
    assert!(
        !text(&out.stdout).contains(dir.to_str().unwrap()),
        "loop left: {}",
        text(&out.stdout)
    );
}
