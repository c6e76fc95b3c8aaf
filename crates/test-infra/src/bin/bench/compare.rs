//! `--compare`: this build side by side with another revision's, in the
//! same run (scripts/bench.sh --compare REV builds REV in a worktree of
//! its own): `vm run --rm -- true` and `vm exec NAME -- true`, the two
//! builds taking turns so that the machine's drift falls on both. Each
//! build has its own instance (namespace, state dir, daemon) and its own
//! guest agent; both boot the same test image.

use std::path::Path;
use std::time::Instant;

use test_infra::{ok, Instance};

use super::{stats, TABLE_HEAD};

fn timed(inst: &Instance, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = inst.banger(args);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ok(&out, &args.join(" "));
    ms
}

/// The table: one row per scenario, the medians of both builds and their
/// ratio.
pub fn bench(this: &Path, other: &Path, other_agent: &str, label: &str, runs: usize) -> String {
    let a = Instance::new(this).with_image();
    // A copy of the image: an older daemon keeps its images' modes its
    // own way, and must not change those of this build's inodes.
    let b = Instance::new(other)
        .with_env("BANGER_AGENT", other_agent)
        .with_image_copied();
    for inst in [&a, &b] {
        ok(
            &inst.banger(&["vm", "run", "--name", "x", "--", "true"]),
            "vm run x",
        );
    }
    let mut runs_ms = [Vec::new(), Vec::new()];
    let mut execs_ms = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (k, inst) in [&a, &b].into_iter().enumerate() {
            let name = format!("r{i}");
            runs_ms[k].push(timed(
                inst,
                &["vm", "run", "--rm", "--name", &name, "--", "true"],
            ));
            ok(&inst.banger(&["daemon", "settle"]), "settle");
        }
        for _ in 0..10 {
            for (k, inst) in [&a, &b].into_iter().enumerate() {
                execs_ms[k].push(timed(inst, &["vm", "exec", "x", "--", "true"]));
            }
        }
    }
    let mut table = TABLE_HEAD
        .replace(
            "| scenario | median | min | max | unit | runs |",
            &format!("| scenario | this build | {label} | this / {label} | unit | runs |"),
        )
        .to_string();
    for (scenario, v) in [
        ("`vm run --rm -- true`", &runs_ms),
        ("`vm exec x -- true`", &execs_ms),
    ] {
        let (m0, m1) = (stats(&v[0]).0, stats(&v[1]).0);
        let line = format!(
            "| {scenario} | {m0:.1} | {m1:.1} | {:.2} | ms (median) | {} |\n",
            m0 / m1,
            v[0].len()
        );
        print!("{line}");
        table.push_str(&line);
    }
    for inst in [&a, &b] {
        ok(&inst.banger(&["vm", "delete", "-f", "x"]), "delete x");
    }
    table
}
