//! The E2B-compatible API (issue 22) driven by E2B's own JavaScript SDK
//! (`e2b` 2.51.0 on the npm registry, installed by scripts/e2b-js-sdk.sh;
//! run by Node.js inside the daemon's namespace against the loopback port
//! the daemon serves): create with metadata, envs and a timeout, commands
//! with output, exit codes and stdin, a background command listed and
//! killed, files written, read, listed and removed, a PTY, info, metrics,
//! list by metadata, timeout, pause and connect-resume, kill, an unknown
//! sandbox. Needs root; `scripts/test.sh` runs it.

use std::path::PathBuf;

use test_infra::{text, Instance};

/// What the SDK does, in one Node.js process; its last line is JSON.
const SCRIPT: &str = r#"
const { Sandbox, CommandExitError, NotFoundError } = require("e2b");
(async () => {
  const out = {};
  const sbx = await Sandbox.create({
    metadata: { purpose: "e2b-js" },
    envs: { GREETING: "hi from js" },
    timeoutMs: 600000,
  });
  out.id = sbx.sandboxId;
  const r = await sbx.commands.run("echo $GREETING; hostname");
  out.run = [r.stdout, r.exitCode];
  try {
    await sbx.commands.run("echo to-stderr >&2; exit 3");
    out.failed = null;
  } catch (e) {
    out.failed = e instanceof CommandExitError ? [e.exitCode, e.stderr] : String(e);
  }
  const streamed = [];
  await sbx.commands.run("echo one; echo two", { onStdout: (d) => streamed.push(d) });
  out.streamed = streamed.join("");
  const bg = await sbx.commands.run("sleep 300", { background: true });
  out.bg_listed = (await sbx.commands.list()).some((p) => p.pid === bg.pid);
  out.bg_killed = await sbx.commands.kill(bg.pid);
  const cat = await sbx.commands.run("cat", { background: true, stdin: true });
  await sbx.commands.sendStdin(cat.pid, "through stdin\n");
  await sbx.commands.closeStdin(cat.pid);
  out.stdin = (await cat.wait()).stdout;
  await sbx.files.write("/tmp/js/hello.txt", "hello from js");
  out.read = await sbx.files.read("/tmp/js/hello.txt");
  const bytes = new Uint8Array(300000).map((_, i) => i % 251);
  await sbx.files.write("/tmp/js/big.bin", bytes.buffer);
  const back = await sbx.files.read("/tmp/js/big.bin", { format: "bytes" });
  out.big = back.length === bytes.length && back.every((b, i) => b === bytes[i]);
  out.listed_files = (await sbx.files.list("/tmp/js")).map((e) => e.name).sort();
  await sbx.files.remove("/tmp/js/big.bin");
  out.exists = [await sbx.files.exists("/tmp/js/hello.txt"), await sbx.files.exists("/tmp/js/big.bin")];
  const chunks = [];
  const pty = await sbx.pty.create({ rows: 24, cols: 80, onData: (d) => chunks.push(Buffer.from(d)) });
  await sbx.pty.resize(pty.pid, { rows: 33, cols: 90 });
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode("stty size; exit\n"));
  await pty.wait().catch(() => {});
  out.pty = Buffer.concat(chunks).toString().includes("33 90");
  const info = await sbx.getInfo();
  out.info = [info.state, info.metadata, info.cpuCount > 0];
  const m = await sbx.getMetrics();
  out.metrics = [m.length, m.length > 0 && m[0].memUsed > 0 && m[0].memUsed < m[0].memTotal];
  const page = await Sandbox.list({ query: { metadata: { purpose: "e2b-js" } } }).nextItems();
  out.listed = page.map((s) => s.sandboxId);
  await sbx.setTimeout(900000);
  out.paused = await sbx.pause();
  out.state_paused = (await Sandbox.getInfo(sbx.sandboxId)).state;
  const again = await Sandbox.connect(sbx.sandboxId);
  out.after_resume = (await again.commands.run("echo back")).stdout;
  out.killed = await again.kill();
  out.killed_again = await Sandbox.kill(sbx.sandboxId);
  try {
    await Sandbox.connect("no-such-sandbox");
    out.unknown = "connected";
  } catch (e) {
    out.unknown = e instanceof NotFoundError ? "not found" : String(e);
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
"#;

#[test]
fn e2bs_javascript_sdk_drives_banger_vms() {
    let Some(dir) = std::env::var("BANGER_E2B_JS")
        .ok()
        .filter(|d| !d.is_empty())
    else {
        // scripts/e2b-js-sdk.sh printed nothing: this machine's Node.js is
        // older than the SDK needs (it said which on stderr).
        test_infra::not_run_here(
            "e2bs_javascript_sdk_drives_banger_vms",
            "no Node.js >= 20.18.1 for E2B's JavaScript SDK (scripts/e2b-js-sdk.sh says which it found)",
        );
        return;
    };
    let inst = Instance::new(&PathBuf::from(env!("CARGO_BIN_EXE_banger"))).with_image();
    let (addr, key) = inst.serve_e2b_api("js");
    let url = format!("http://{addr}");
    let mut c = inst.net.cmd("node");
    c.arg("-e")
        .arg(SCRIPT)
        // Where `require("e2b")` resolves.
        .env("NODE_PATH", format!("{dir}/node_modules"))
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &key)
        .stdin(std::process::Stdio::null());
    test_infra::e2b::without_proxies(&mut c);
    let out = test_infra::bounded::output_within(&mut c, test_infra::bounded::COMMAND_LIMIT);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default();
    let id = v["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{stdout}");
    use serde_json::json;
    assert_eq!(v["run"], json!([format!("hi from js\n{id}\n"), 0]), "{v}");
    assert_eq!(v["failed"], json!([3, "to-stderr\n"]), "{v}");
    assert_eq!(v["streamed"], "one\ntwo\n", "{v}");
    assert_eq!(v["bg_listed"], true, "{v}");
    assert_eq!(v["bg_killed"], true, "{v}");
    assert_eq!(v["stdin"], "through stdin\n", "{v}");
    assert_eq!(v["read"], "hello from js", "{v}");
    assert_eq!(v["big"], true, "{v}");
    assert_eq!(v["listed_files"], json!(["big.bin", "hello.txt"]), "{v}");
    assert_eq!(v["exists"], json!([true, false]), "{v}");
    assert_eq!(v["pty"], true, "{v}");
    assert_eq!(
        v["info"],
        json!(["running", {"purpose": "e2b-js"}, true]),
        "{v}"
    );
    assert_eq!(v["metrics"], json!([1, true]), "{v}");
    assert_eq!(v["listed"], json!([id]), "{v}");
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(v["state_paused"], "paused", "{v}");
    assert_eq!(v["after_resume"], "back\n", "{v}");
    assert_eq!(v["killed"], true, "{v}");
    assert_eq!(v["killed_again"], false, "{v}");
    assert_eq!(v["unknown"], "not found", "{v}");
    assert!(inst.vm(&id).is_none(), "kill deletes the VM");
    inst.assert_baseline();
}
