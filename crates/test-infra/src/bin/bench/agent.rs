//! The guest agent's part of the benchmark: `vm exec -- true` round trips
//! (p50/p99) against `vm ssh -- true`, and copying 256 MiB each way with
//! `vm cp` against the same bytes through `vm ssh` (ssh's transport, as
//! scp uses it), and re-identifying a guest as a restored clone would be.

use std::process::Stdio;
use std::time::Instant;

use test_infra::{text, Instance};

use crate::row;

fn percentile(v: &[f64], p: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[(s.len() * p / 100).min(s.len() - 1)]
}

/// The `… p99` row under a row of milliseconds.
fn p99_row(table: &mut String, v: &[f64]) {
    let line = format!(
        "| … p99 | {:.1} | | | ms | {} |\n",
        percentile(v, 99),
        v.len()
    );
    print!("{line}");
    table.push_str(&line);
}

pub fn bench(table: &mut String, inst: &Instance, vmm_args: &[&str], execs: usize) {
    let mut a = vec!["vm", "run", "--name", "agentbench"];
    a.extend(vmm_args);
    a.extend(["--", "true"]);
    let out = inst.banger(&a);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (mut exec, mut exec_static, mut ssh) = (Vec::new(), Vec::new(), Vec::new());
    let mut reidentify = Vec::new();
    let scratch = tempfile::tempdir_in("/var/tmp").expect("scratch dir");
    let blob = scratch.path().join("blob");
    let mib = 256usize;
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    std::fs::write(&blob, &data).expect("write the blob");
    drop(data);
    let (mut cp_in, mut cp_out, mut ssh_in, mut ssh_out) = (0.0, 0.0, 0.0, 0.0);
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            // Warm: the first call pays for the page cache.
            let _ = inst.banger_direct(&["vm", "exec", "agentbench", "--", "true"]);
            for _ in 0..execs {
                let t = Instant::now();
                let out = inst.banger_direct(&["vm", "exec", "agentbench", "--", "true"]);
                exec.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
            // The same with a static program: what is left is banger's part
            // (the dynamic loader of /usr/bin/true runs under emulation).
            let busybox = [
                "vm",
                "exec",
                "agentbench",
                "--",
                "/usr/lib/banger/busybox",
                "true",
            ];
            for _ in 0..execs {
                let t = Instant::now();
                let out = inst.banger_direct(&busybox);
                exec_static.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
            for _ in 0..10 {
                let t = Instant::now();
                let out = inst.banger_direct(&["vm", "ssh", "agentbench", "--", "true"]);
                ssh.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
            let timed = |args: &[&str],
                         stdin: Option<&std::path::Path>,
                         stdout: Option<&std::path::Path>| {
                let mut c = std::process::Command::new(&inst.banger);
                c.arg("--state-dir")
                    .arg(inst.state())
                    .arg("--runtime-dir")
                    .arg(inst.runtime())
                    .args(args)
                    .stdin(match stdin {
                        Some(p) => Stdio::from(std::fs::File::open(p).expect("open")),
                        None => Stdio::null(),
                    })
                    .stdout(match stdout {
                        Some(p) => Stdio::from(std::fs::File::create(p).expect("create")),
                        None => Stdio::null(),
                    })
                    .stderr(Stdio::piped());
                let t = Instant::now();
                let out = c.output().expect("run banger");
                assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
                t.elapsed().as_secs_f64() * 1e3
            };
            let b = blob.to_str().expect("utf-8 path");
            cp_in = timed(&["vm", "cp", b, "agentbench:/work/blob"], None, None);
            let back = scratch.path().join("back");
            cp_out = timed(
                &["vm", "cp", "agentbench:/work/blob", back.to_str().unwrap()],
                None,
                None,
            );
            assert_eq!(
                std::fs::metadata(&back).map(|m| m.len()).unwrap_or(0),
                (mib << 20) as u64
            );
            ssh_in = timed(
                &[
                    "vm",
                    "ssh",
                    "agentbench",
                    "--",
                    "sh",
                    "-c",
                    "cat > /work/blob2",
                ],
                Some(&blob),
                None,
            );
            let back2 = scratch.path().join("back2");
            ssh_out = timed(
                &["vm", "ssh", "agentbench", "--", "cat", "/work/blob2"],
                None,
                Some(&back2),
            );
            assert_eq!(
                std::fs::metadata(&back2).map(|m| m.len()).unwrap_or(0),
                (mib << 20) as u64
            );
            // A clone's re-identification (what a restore will add): the
            // whole identity call, sshd's restart included.
            for _ in 0..execs.clamp(1, 20) {
                let t = Instant::now();
                let out = inst.banger_direct(&["internal", "reidentify", "agentbench"]);
                reidentify.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
        })
        .join()
        .expect("agent bench thread");
    });
    let _ = inst.banger(&["vm", "delete", "-f", "agentbench"]);
    row(
        table,
        "`vm exec -- true` round trip (agent, vsock)",
        &exec,
        "ms",
    );
    p99_row(table, &exec);
    row(
        table,
        "`vm exec -- busybox true` (a static program) round trip",
        &exec_static,
        "ms",
    );
    p99_row(table, &exec_static);
    row(
        table,
        "`vm ssh -- true` round trip (for comparison)",
        &ssh,
        "ms",
    );
    row(
        table,
        "`banger internal reidentify` (a clone's identity through the agent)",
        &reidentify,
        "ms",
    );
    let rate = |ms: f64| mib as f64 / (ms / 1e3);
    let lines = format!(
        "| `vm cp` {mib} MiB into the guest | {:.0} | | | MiB/s | 1 |\n\
         | `vm cp` {mib} MiB out of the guest | {:.0} | | | MiB/s | 1 |\n\
         | the same through `vm ssh` (cat), in | {:.0} | | | MiB/s | 1 |\n\
         | the same through `vm ssh` (cat), out | {:.0} | | | MiB/s | 1 |\n",
        rate(cp_in),
        rate(cp_out),
        rate(ssh_in),
        rate(ssh_out)
    );
    print!("{lines}");
    table.push_str(&lines);
}
