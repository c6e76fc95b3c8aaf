//! The root-disk part of the benchmark: how long `vm create` spends making
//! a VM's root disk (its `root_disk` phase) with each strategy, for an
//! image of 1 GiB and one of 8 GiB, both about 90% full of written data
//! (so a copy has every byte to copy), 20 VMs in a row each. `reflink`
//! runs on an XFS state dir on a loop device; `dm-snapshot` needs
//! device-mapper, which these machines lack.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_infra::{image_cache, text, Instance};

use crate::{row, stats};

fn run(c: &mut Command) {
    let st = c.status().expect("spawn");
    assert!(st.success(), "{c:?} failed");
}

/// An image dir `name` beside the default one: its kernel and initramfs,
/// and a root filesystem grown to `gib` GiB and filled with written
/// blocks up to about 90%.
fn make_image(scratch: &Path, name: &str, gib: u64) -> PathBuf {
    let base = image_cache();
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["vmlinux", "initrd.img"] {
        std::fs::hard_link(base.join(f), dir.join(f)).expect("link");
    }
    let rootfs = dir.join("rootfs.ext4");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(base.join("rootfs.ext4"))
        .arg(&rootfs));
    let bytes = gib << 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rootfs)
        .and_then(|f| f.set_len(bytes))
        .expect("grow");
    run(Command::new("e2fsck")
        .arg("-fy")
        .arg(&rootfs)
        .stdout(std::process::Stdio::null()));
    run(Command::new("resize2fs")
        .arg(&rootfs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null()));
    let mnt = scratch.join(format!("{name}.mnt"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&rootfs)
        .arg(&mnt));
    // 90% of the filesystem minus what the base image holds already.
    let fill_mib = (bytes >> 20) * 9 / 10 - 400;
    run(Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none", "conv=fsync"])
        .arg(format!("of={}/fill", mnt.display()))
        .arg(format!("count={fill_mib}")));
    run(Command::new("umount").arg(&mnt));
    let manifest = std::fs::read_to_string(base.join("manifest.json")).expect("manifest");
    let mut m: serde_json::Value = serde_json::from_str(&manifest).expect("manifest json");
    m["name"] = name.into();
    m["rootfs_bytes"] = bytes.into();
    std::fs::write(dir.join("manifest.json"), m.to_string()).expect("write manifest");
    dir
}

pub fn bench(table: &mut String, banger: &Path, vms: usize) {
    let scratch = tempfile::tempdir_in("/var/tmp").expect("scratch dir");
    let images: Vec<(u64, PathBuf)> = [1, 8]
        .into_iter()
        .map(|g| (g, make_image(scratch.path(), &format!("big{g}g"), g)))
        .collect();
    for strategy in ["qcow2", "overlay", "reflink", "copy"] {
        let mut inst = Instance::new(banger);
        if strategy == "reflink" {
            inst = inst.on_xfs_sized(24);
        }
        let inst = inst.with_env("BANGER_ROOT_DISK", strategy);
        // Both in place before the daemon starts (it indexes images then).
        for (gib, dir) in &images {
            let flags = if strategy == "reflink" { "-a" } else { "-al" };
            run(Command::new("cp")
                .arg(flags)
                .arg(dir)
                .arg(inst.state().join("images").join(format!("big{gib}g"))));
        }
        let mut medians = Vec::new();
        for (gib, _) in &images {
            let name = format!("big{gib}g");
            let mut ms = Vec::new();
            for i in 0..vms {
                let vm = format!("d{gib}x{i}");
                let out =
                    inst.banger(&["vm", "create", "--name", &vm, "--image", &name, "--timings"]);
                assert!(out.status.success(), "{}", text(&out.stderr));
                let t = crate::timings(&text(&out.stderr));
                // In µs: the instant strategies take a fraction of a ms.
                ms.push(1e3 * *t.get("root_disk").expect("a root_disk timing"));
                // Deleted at once: 20 copies of the 8 GiB image would not
                // fit on the disk.
                let out = inst.banger(&["vm", "delete", "-f", &vm]);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
            row(
                table,
                &format!("root disk, {strategy}, {gib} GiB image ({vms} VMs in a row)"),
                &ms,
                "µs",
            );
            medians.push(stats(&ms).0);
        }
        let line = format!(
            "| … {strategy}: 8 GiB / 1 GiB | {:.2} | | | x | {vms} |\n",
            medians[1] / medians[0].max(1e-3)
        );
        print!("{line}");
        table.push_str(&line);
        inst.assert_baseline();
    }
}
