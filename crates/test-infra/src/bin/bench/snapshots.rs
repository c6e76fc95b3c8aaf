//! Snapshots (issue 21), side by side in one instance: `vm run --rm --
//! true` cold and warm; `vm snapshot` of a running VM; `vm fork` to a
//! clone answering `vm exec`; the host memory each extra clone of one
//! snapshot takes (ten of them); a restore's time for a 4 GiB guest
//! against a 256 MiB one; then cold, warm, snapshot and fork on a jailed
//! Firecracker (its doubles here).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use test_infra::{ok, text, Instance};

use crate::{mem_available_kib, row, stats, timings};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `vm run --rm --timings [EXTRA] -- true`, `runs` times, from a thread in
/// the daemon's namespace: the walls, and each phase's times.
fn runs(inst: &Instance, extra: &[&str], runs: usize) -> (Vec<f64>, BTreeMap<String, Vec<f64>>) {
    let mut walls = Vec::new();
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            for i in 0..runs {
                let name = format!("sb-{i}");
                let mut a = vec!["vm", "run", "--rm", "--timings", "--name", &name];
                a.extend_from_slice(extra);
                a.extend(["--", "true"]);
                let t = Instant::now();
                let out = inst.banger_direct(&a);
                walls.push(ms(t));
                assert!(out.status.success(), "vm run: {}", text(&out.stderr));
                for (k, v) in timings(&text(&out.stderr)) {
                    phases.entry(k).or_default().push(v);
                }
                let settled = inst.banger_direct(&["daemon", "settle"]);
                assert!(settled.status.success(), "{}", text(&settled.stderr));
            }
        })
        .join()
        .expect("timed runs");
    });
    (walls, phases)
}

/// The `restore` phase of `vm run -d --timings --from SNAP`, `n` times.
fn restores(inst: &Instance, snap: &str, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let name = format!("{snap}-r{i}");
            let out = inst.banger(&[
                "vm",
                "run",
                "-d",
                "--timings",
                "--from",
                snap,
                "--name",
                &name,
            ]);
            ok(&out, "vm run --from");
            let t = timings(&text(&out.stderr));
            ok(&inst.banger(&["vm", "rm", "-f", &name]), "vm rm");
            t.get("restore").copied().unwrap_or(f64::NAN)
        })
        .collect()
}

pub fn bench(table: &mut String, banger: &Path, n: usize) {
    let inst = Instance::new(banger)
        .with_image()
        .with_env("BANGER_WARM_CACHE", "4G");
    let _ = inst.daemon_pid();

    // Cold and warm `vm run --rm -- true`, the first warm run (which
    // saves the snapshot) apart.
    let (cold, _) = runs(&inst, &["--cold"], n);
    let (first, _) = runs(&inst, &[], 1);
    let (warm, phases) = runs(&inst, &[], n);
    row(
        table,
        "`vm run --rm -- true`, cold (`--cold`), wall",
        &cold,
        "ms",
    );
    row(
        table,
        "… the first warm-able run (boots, then saves its snapshot)",
        &first,
        "ms",
    );
    row(
        table,
        "`vm run --rm -- true`, warm start, wall",
        &warm,
        "ms",
    );
    for (k, v) in &phases {
        row(table, &format!("… warm phase `{k}`"), v, "ms");
    }
    let line = format!(
        "| warm / cold (medians) | {:.2} | | | ratio | |\n",
        stats(&warm).0 / stats(&cold).0
    );
    print!("{line}");
    table.push_str(&line);

    // `vm snapshot` of a running VM, and `vm fork` to a clone that
    // answers `vm exec`.
    ok(
        &inst.banger(&["vm", "run", "-d", "--cold", "--name", "origin"]),
        "origin",
    );
    let (mut snaps, mut forks) = (Vec::new(), Vec::new());
    for i in 0..n {
        let s = format!("s{i}");
        let t = Instant::now();
        ok(
            &inst.banger(&["vm", "snapshot", "origin", &s]),
            "vm snapshot",
        );
        snaps.push(ms(t));
        ok(&inst.banger(&["snapshot", "rm", &s]), "snapshot rm");
        let c = format!("f{i}");
        let t = Instant::now();
        ok(&inst.banger(&["vm", "fork", "origin", &c]), "vm fork");
        ok(&inst.banger(&["vm", "exec", &c, "--", "true"]), "exec");
        forks.push(ms(t));
        ok(&inst.banger(&["vm", "rm", "-f", &c]), "vm rm");
    }
    row(
        table,
        "`vm snapshot` of a running 1280 MiB VM",
        &snaps,
        "ms",
    );
    row(
        table,
        "`vm fork` to a clone answering `vm exec`",
        &forks,
        "ms",
    );

    // Ten clones of one snapshot: the host memory each takes beyond the
    // first (MemAvailable's drop), and each clone's cgroup.
    ok(
        &inst.banger(&["vm", "snapshot", "origin", "ten"]),
        "snapshot",
    );
    ok(&inst.banger(&["vm", "rm", "-f", "origin"]), "vm rm");
    inst.settle();
    let base = mem_available_kib();
    let mut after = Vec::new();
    for i in 0..10 {
        let c = format!("ten-{i}");
        ok(
            &inst.banger(&["vm", "run", "-d", "--from", "ten", "--name", &c]),
            "clone",
        );
        ok(&inst.banger(&["vm", "exec", &c, "--", "true"]), "exec");
        after.push(base.saturating_sub(mem_available_kib()) as f64 / 1024.0);
    }
    let per: Vec<f64> = after.windows(2).map(|w| w[1] - w[0]).collect();
    row(
        table,
        "host memory each extra clone of one snapshot takes (10 clones)",
        &per,
        "MiB",
    );
    let line = format!(
        "| … 10 clones in all (MemAvailable drop) | {:.0} | | | MiB | |\n",
        after.last().copied().unwrap_or(f64::NAN)
    );
    print!("{line}");
    table.push_str(&line);
    for i in 0..10 {
        ok(
            &inst.banger(&["vm", "rm", "-f", &format!("ten-{i}")]),
            "vm rm",
        );
    }
    ok(&inst.banger(&["snapshot", "rm", "ten"]), "snapshot rm");

    // A restore's time by guest memory.
    let mut medians = Vec::new();
    for mem in ["256", "4096"] {
        let vm = format!("m{mem}");
        ok(
            &inst.banger(&["vm", "run", "-d", "--cold", "--memory", mem, "--name", &vm]),
            "vm run",
        );
        let snap = format!("mem{mem}");
        ok(&inst.banger(&["vm", "snapshot", &vm, &snap]), "snapshot");
        ok(&inst.banger(&["vm", "rm", "-f", &vm]), "vm rm");
        let r = restores(&inst, &snap, n);
        row(
            table,
            &format!("phase `restore`, a {mem} MiB guest's snapshot"),
            &r,
            "ms",
        );
        medians.push(stats(&r).0);
        ok(&inst.banger(&["snapshot", "rm", &snap]), "snapshot rm");
    }
    let line = format!(
        "| restore 4096 MiB / 256 MiB (medians) | {:.2} | | | ratio | |\n",
        medians[1] / medians[0]
    );
    print!("{line}");
    table.push_str(&line);
    // The warm cache's snapshot goes with its image's instance; nothing
    // else may be left.
    let left = text(&inst.banger(&["snapshot", "ls", "-q"]).stdout);
    assert!(left.trim().is_empty(), "snapshots left: {left}");
    inst.assert_baseline();
    drop(inst);
    firecracker(table, banger, n);
}

/// The same first rows on Firecracker under its jailer: the real ones
/// where `BANGER_FIRECRACKER` and `BANGER_JAILER` name them, else their
/// doubles (these machines: no KVM), which play the guest with QEMU
/// under TCG, so their numbers are banger's Firecracker path around
/// QEMU's save and load, not Firecracker's.
fn firecracker(table: &mut String, banger: &Path, n: usize) {
    let named = |var: &str, double: &str| {
        std::env::var(var)
            .ok()
            .map(|v| (v, false))
            .unwrap_or_else(|| {
                (
                    banger.with_file_name(double).to_string_lossy().into_owned(),
                    true,
                )
            })
    };
    let (fc, fc_double) = named("BANGER_FIRECRACKER", "firecracker-double");
    let (jailer, _) = named("BANGER_JAILER", "jailer-double");
    let what = if fc_double {
        "Firecracker double"
    } else {
        "Firecracker"
    };
    let inst = Instance::new(banger)
        .with_image()
        .with_env("BANGER_WARM_CACHE", "4G")
        .with_env("BANGER_FIRECRACKER", &fc)
        .with_env("BANGER_JAILER", &jailer);
    let _ = inst.daemon_pid();
    let fcvm = ["--vmm", "firecracker"];
    let (cold, _) = runs(&inst, &["--cold", "--vmm", "firecracker"], n);
    let _ = runs(&inst, &fcvm, 1);
    let (warm, _) = runs(&inst, &fcvm, n);
    row(
        table,
        &format!("{what}, jailed: `vm run --rm -- true`, cold, wall"),
        &cold,
        "ms",
    );
    row(
        table,
        &format!("{what}, jailed: `vm run --rm -- true`, warm start, wall"),
        &warm,
        "ms",
    );
    ok(
        &inst.banger(&[
            "vm",
            "run",
            "-d",
            "--cold",
            "--vmm",
            "firecracker",
            "--name",
            "fo",
        ]),
        "origin",
    );
    let (mut snaps, mut forks) = (Vec::new(), Vec::new());
    for i in 0..n {
        let s = format!("fs{i}");
        let t = Instant::now();
        ok(&inst.banger(&["vm", "snapshot", "fo", &s]), "vm snapshot");
        snaps.push(ms(t));
        ok(&inst.banger(&["snapshot", "rm", &s]), "snapshot rm");
        let c = format!("ff{i}");
        let t = Instant::now();
        ok(&inst.banger(&["vm", "fork", "fo", &c]), "vm fork");
        ok(&inst.banger(&["vm", "exec", &c, "--", "true"]), "exec");
        forks.push(ms(t));
        ok(&inst.banger(&["vm", "rm", "-f", &c]), "vm rm");
    }
    row(
        table,
        &format!("{what}, jailed: `vm snapshot` of a running 1280 MiB VM"),
        &snaps,
        "ms",
    );
    row(
        table,
        &format!("{what}, jailed: `vm fork` to a clone answering `vm exec`"),
        &forks,
        "ms",
    );
    ok(&inst.banger(&["vm", "rm", "-f", "fo"]), "vm rm");
    inst.assert_baseline();
}
