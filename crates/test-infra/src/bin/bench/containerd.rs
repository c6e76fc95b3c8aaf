//! banger as a containerd runtime (issue 23), side by side in one run:
//! `ctr run --rm --runtime io.containerd.banger.v2 IMAGE ID true` against
//! banger's own `vm run --rm -- true` (the shim's overhead) and against
//! containerd's default runc runtime (what a VM costs over a container).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use test_infra::containerd::{busybox_image, Containerd};
use test_infra::{bounded, ok, text, Instance};

use crate::{row, stats};

const IMAGE: &str = "banger.test/busybox:1";

pub fn bench(table: &mut String, banger: &Path, n: usize) {
    let inst = Instance::new(banger).with_image();
    let _ = inst.daemon_pid();
    let bin_dir = banger.parent().expect("the binaries' directory");
    let ctd = Containerd::start(&inst, bin_dir);
    let work = inst.dir().join("bench-image");
    std::fs::create_dir_all(&work).expect("mkdir");
    let tar = work.join("busybox.tar");
    busybox_image(&work, IMAGE, None, &tar);
    ok(
        &ctd.ctr(
            &inst,
            &["images", "import", tar.to_str().unwrap_or_default()],
        ),
        "ctr images import",
    );
    let sock = ctd.socket();
    let (mut vm_runs, mut shim_runs, mut runc_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut mount_runs = Vec::new();
    // What the container's rootfs share costs a boot: `vm run` with a
    // virtio-fs mount of a directory.
    let shared = work.join("tree");
    let mount = format!("{}:/ctr/rootfs", shared.display());
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            let ctr = |args: &[&str]| {
                bounded::output_within(
                    Command::new("ctr")
                        .arg("--address")
                        .arg(&sock)
                        .args(["--namespace", "default"])
                        .args(args)
                        .stdin(Stdio::null()),
                    bounded::COMMAND_LIMIT,
                )
            };
            for i in 0..n {
                let t = Instant::now();
                let out = inst.banger_direct(&["vm", "run", "--rm", "--", "true"]);
                vm_runs.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.status.success(), "vm run: {}", text(&out.stderr));
                let t = Instant::now();
                let out =
                    inst.banger_direct(&["vm", "run", "--rm", "--mount", &mount, "--", "true"]);
                mount_runs.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(
                    out.status.success(),
                    "vm run --mount: {}",
                    text(&out.stderr)
                );
                let id = format!("bench-banger-{i}");
                let t = Instant::now();
                let out = ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    "io.containerd.banger.v2",
                    IMAGE,
                    &id,
                    "true",
                ]);
                shim_runs.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(
                    out.status.success(),
                    "ctr run (banger): {}",
                    text(&out.stderr)
                );
                let id = format!("bench-runc-{i}");
                let t = Instant::now();
                let out = ctr(&["run", "--rm", IMAGE, &id, "true"]);
                runc_runs.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(
                    out.status.success(),
                    "ctr run (runc): {}",
                    text(&out.stderr)
                );
            }
        })
        .join()
        .expect("the runs");
    });
    row(table, "`vm run --rm -- true`, wall", &vm_runs, "ms");
    row(
        table,
        "`vm run --rm --mount DIR:/ctr/rootfs -- true` (the rootfs share), wall",
        &mount_runs,
        "ms",
    );
    row(
        table,
        "`ctr run --rm --runtime io.containerd.banger.v2 … true`, wall",
        &shim_runs,
        "ms",
    );
    row(
        table,
        "`ctr run --rm … true` (runc), wall",
        &runc_runs,
        "ms",
    );
    // What the shim itself spent, from its own timing lines (containerd's
    // log): its create and delete, less the VM's boot and deletion inside
    // them, which `vm run` does as well.
    let log = ctd.log_text();
    let us = |line: &str, key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.trim_matches('"').strip_prefix(key)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let own = |what: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains(&format!("banger-shim timing {what} bench-banger-")))
            .map(|l| (us(l, "total_us=") - us(l, "vm_us=")) / 1e3)
            .collect()
    };
    let (creates, deletes) = (own("create"), own("delete"));
    let shim_own: Vec<f64> = creates.iter().zip(&deletes).map(|(c, d)| c + d).collect();
    row(
        table,
        "the shim's own create + delete (its VM's boot and deletion left out)",
        &shim_own,
        "ms",
    );
    let line = format!(
        "| … banger's runtime − `vm run` (medians) | {:.0} | | | ms | all of containerd's path |\n\
         | … banger's runtime − `vm run --mount` (medians) | {:.0} | | | ms | the same VM work |\n\
         | … the shim's own create + delete (median) | {:.1} | | | ms | goal ≤ 50 |\n",
        stats(&shim_runs).0 - stats(&vm_runs).0,
        stats(&shim_runs).0 - stats(&mount_runs).0,
        stats(&shim_own).0,
    );
    print!("{line}");
    table.push_str(&line);
}
