//! The E2B-compatible API (issue 22) against the CLI, in one instance,
//! side by side: E2B's own Python SDK's create → first `commands.run
//! ("true")` result against `vm run --rm -- true`, and a `commands.run
//! ("true")` round trip against `vm exec NAME -- true`. The SDK's times
//! are taken inside its python (its start-up left out); the CLI's from a
//! thread in the daemon's namespace.

use std::path::Path;
use std::time::Instant;

use test_infra::{ok, text, Instance};

use crate::{row, stats};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

const SDK: &str = r#"
import json, sys, time
from e2b import Sandbox
n, m = int(sys.argv[1]), int(sys.argv[2])
creates, runs = [], []
for i in range(n):
    t = time.perf_counter()
    s = Sandbox.create(timeout=600)
    s.commands.run("true")
    creates.append((time.perf_counter() - t) * 1e3)
    if i == n - 1:
        for _ in range(m):
            t = time.perf_counter()
            s.commands.run("true")
            runs.append((time.perf_counter() - t) * 1e3)
    s.kill()
print(json.dumps({"creates": creates, "runs": runs}))
"#;

pub fn bench(table: &mut String, banger: &Path, n: usize) {
    let python = std::env::var("BANGER_E2B_PYTHON")
        .expect("BANGER_E2B_PYTHON: scripts/bench.sh sets it (scripts/e2b-sdk.sh)");
    let inst = Instance::new(banger).with_image();
    let _ = inst.daemon_pid();
    let m = 50;
    let (mut cli_runs, mut execs, mut bash_execs) = (Vec::new(), Vec::new(), Vec::new());
    let mut cli_bash_runs = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.net.enter_on_this_thread();
            for i in 0..n {
                let name = format!("e2b-cli-{i}");
                let t = Instant::now();
                let out = inst.banger_direct(&["vm", "run", "--rm", "--name", &name, "--", "true"]);
                cli_runs.push(ms(t));
                assert!(out.status.success(), "vm run: {}", text(&out.stderr));
                // The same boot, then what the SDK's first run asks the
                // fresh guest for: its login bash, read and translated
                // for the first time.
                let name = format!("e2b-cli-bash-{i}");
                let t = Instant::now();
                let out = inst.banger_direct(&[
                    "vm",
                    "run",
                    "--rm",
                    "--name",
                    &name,
                    "--",
                    "/bin/bash",
                    "-l",
                    "-c",
                    "true",
                ]);
                cli_bash_runs.push(ms(t));
                assert!(out.status.success(), "vm run bash: {}", text(&out.stderr));
            }
            let out = inst.banger_direct(&["vm", "run", "-d", "--name", "e2b-exec"]);
            assert!(out.status.success(), "vm run -d: {}", text(&out.stderr));
            for _ in 0..m {
                let t = Instant::now();
                let out = inst.banger_direct(&["vm", "exec", "e2b-exec", "--", "true"]);
                execs.push(ms(t));
                assert!(out.status.success(), "vm exec: {}", text(&out.stderr));
                // What the SDK's `commands.run` asks the guest for.
                let t = Instant::now();
                let out = inst.banger_direct(&[
                    "vm",
                    "exec",
                    "e2b-exec",
                    "--",
                    "/bin/bash",
                    "-l",
                    "-c",
                    "true",
                ]);
                bash_execs.push(ms(t));
                assert!(out.status.success(), "vm exec bash: {}", text(&out.stderr));
            }
            let out = inst.banger_direct(&["vm", "rm", "-f", "e2b-exec"]);
            assert!(out.status.success(), "vm rm: {}", text(&out.stderr));
        })
        .join()
        .expect("CLI runs");
    });
    let (addr, key) = inst.serve_e2b_api("bench");
    let url = format!("http://{addr}");
    let mut c = inst.net.cmd(&python);
    c.arg("-c")
        .arg(SDK)
        .arg(n.to_string())
        .arg(m.to_string())
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &key);
    let out = test_infra::e2b::without_proxies(&mut c)
        .output()
        .expect("the SDK's python");
    let printed = ok(&out, "the SDK's runs");
    let v: serde_json::Value =
        serde_json::from_str(printed.lines().last().unwrap_or_default()).expect("its JSON");
    let list = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let (creates, runs) = (list("creates"), list("runs"));
    row(table, "`vm run --rm -- true`, wall", &cli_runs, "ms");
    row(
        table,
        "`vm run --rm -- /bin/bash -l -c true` (what the SDK's first run asks), wall",
        &cli_bash_runs,
        "ms",
    );
    row(
        table,
        "E2B SDK: `Sandbox.create()` → first `commands.run(\"true\")`",
        &creates,
        "ms",
    );
    let line = format!(
        "| … SDK create+run − `vm run` (medians) | {:.0} | | | ms | goal ≤ 50 |\n\
         | … SDK create+run − `vm run` of the same login bash (medians) | {:.0} | | | ms | the API's own cost |\n",
        stats(&creates).0 - stats(&cli_runs).0,
        stats(&creates).0 - stats(&cli_bash_runs).0
    );
    print!("{line}");
    table.push_str(&line);
    row(table, "`vm exec NAME -- true`, wall", &execs, "ms");
    row(
        table,
        "`vm exec NAME -- /bin/bash -l -c true` (what the SDK's run asks), wall",
        &bash_execs,
        "ms",
    );
    row(table, "E2B SDK: `commands.run(\"true\")`", &runs, "ms");
    let line = format!(
        "| … SDK run − `vm exec` (medians) | {:.1} | | | ms | goal ≤ 10 |\n\
         | … SDK run − `vm exec` of the same login bash (medians) | {:.1} | | | ms | the API's own cost |\n",
        stats(&runs).0 - stats(&execs).0,
        stats(&runs).0 - stats(&bash_execs).0
    );
    print!("{line}");
    table.push_str(&line);
    ok(&inst.banger(&["api", "stop"]), "api stop");
    inst.assert_baseline();
}
