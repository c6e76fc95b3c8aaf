//! The E2B-compatible API (issue 22) driven by E2B's own Python SDK
//! (`e2b` 2.63.0, installed by scripts/e2b-sdk.sh into a venv; the test
//! runs it inside the daemon's namespace against the loopback port the
//! daemon serves): create with metadata and envs, commands with output
//! and exit codes, background commands listed and killed, files written,
//! read, listed and made, directories watched (polled and streamed),
//! info, list filtered by metadata, timeout,
//! connect by ID, pause and resume, kill; keys: made, listed, refused
//! when unknown or removed; what a raw client may send (no key, a bad
//! token, oversized or malformed bodies) refused with E2B's errors; PTYs
//! resized while they stream, stdin and its end, a process joined once
//! its first client left, a 5 MiB file. Needs root; `scripts/test.sh`
//! runs it.

use std::path::PathBuf;
use std::process::Output;

use test_infra::{ok, text, Instance};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn python() -> String {
    std::env::var("BANGER_E2B_PYTHON").unwrap_or_else(|_| {
        panic!(
            "BANGER_E2B_PYTHON is not set: scripts/test.sh sets it (scripts/e2b-sdk.sh installs \
             E2B's Python SDK and prints its python)"
        )
    })
}

/// `script` run by the SDK's python in the daemon's namespace, against
/// the API at `addr` with key `key`; its stdout's last line as JSON.
fn sdk(inst: &Instance, addr: &str, key: &str, script: &str) -> (serde_json::Value, Output) {
    let url = format!("http://{addr}");
    let mut c = inst.net.cmd(python());
    c.arg("-c")
        .arg(format!("{PRELUDE}{script}"))
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", key)
        .stdin(std::process::Stdio::null());
    test_infra::e2b::without_proxies(&mut c);
    let out = test_infra::bounded::output_within(&mut c, test_infra::bounded::COMMAND_LIMIT);
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().to_string();
    let v = serde_json::from_str(&last).unwrap_or(serde_json::Value::Null);
    (v, out)
}

const CREATE: &str = r#"
import json
from e2b import Sandbox
sbx = Sandbox.create(metadata={"purpose": "e2b-test"}, envs={"GREETING": "hi there"}, timeout=600)
r = sbx.commands.run("echo $GREETING; hostname; id -un")
print(json.dumps({"id": sbx.sandbox_id, "stdout": r.stdout, "stderr": r.stderr, "exit": r.exit_code}))
"#;

const USE: &str = r#"
import json, sys
from e2b import Sandbox, SandboxQuery, CommandExitException
sbx = Sandbox.connect(sys.argv[1] if len(sys.argv) > 1 else ID)
out = {}
try:
    sbx.commands.run("echo to-stderr >&2; exit 3")
except CommandExitException as e:
    out["failed"] = [e.exit_code, e.stderr]
bg = sbx.commands.run("sleep 300", background=True)
out["bg_listed"] = bg.pid in [p.pid for p in sbx.commands.list()]
out["bg_killed"] = sbx.commands.kill(bg.pid)
sbx.files.write("/tmp/e2b/hello.txt", "hello world")
out["read"] = sbx.files.read("/tmp/e2b/hello.txt")
out["exists"] = [sbx.files.exists("/tmp/e2b/hello.txt"), sbx.files.exists("/nope")]
out["made"] = sbx.files.make_dir("/tmp/e2b/sub")
out["listed_files"] = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
# A command's time: watched, it ends as a timeout; unwatched, it ends
# all the same.
import time
from e2b import TimeoutException
try:
    sbx.commands.run("sleep 30", timeout=2)
    out["timed_out"] = False
except TimeoutException:
    out["timed_out"] = True
p3 = sbx.commands.run("sleep 300", background=True, timeout=2)
p3.disconnect()
gone = False
for _ in range(200):
    if p3.pid not in [q.pid for q in sbx.commands.list()]:
        gone = True
        break
    time.sleep(0.1)
out["ended_unwatched"] = gone
# Input, and its end.
p = sbx.commands.run("cat", background=True, stdin=True)
sbx.commands.send_stdin(p.pid, "through stdin\n")
sbx.commands.close_stdin(p.pid)
out["stdin"] = p.wait().stdout
# A process joined by another client once its first one left.
p2 = sbx.commands.run("sleep 1; echo joined", background=True)
p2.disconnect()
out["joined"] = sbx.commands.connect(p2.pid).wait().stdout
# Two clients streaming one process at once.
p4 = sbx.commands.run("sleep 1; echo both", background=True)
j4 = sbx.commands.connect(p4.pid)
out["both"] = [j4.wait().stdout, p4.wait().stdout]
# A PTY, resized while it streams, typed into.
from e2b import PtySize
h = sbx.pty.create(PtySize(rows=24, cols=80))
sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
sbx.pty.send_stdin(h.pid, b"stty size; exit\n")
chunks = []
h.wait(on_pty=lambda b: chunks.append(b))
out["pty"] = "30 100" in b"".join(chunks).decode(errors="replace")
# A large file both ways.
big = bytes(range(256)) * (5 * 4096)
sbx.files.write("/tmp/e2b/big.bin", big)
out["big"] = sbx.files.read("/tmp/e2b/big.bin", format="bytes") == big
sbx.files.remove("/tmp/e2b/big.bin")
# File metadata (user.e2b.* attributes, on the root filesystem): given on a write, read back by
# get_info and list, replaced whole by the next write; a gzip upload;
# owners by name.
w = sbx.files.write("/root/meta.txt", "m", metadata={"Purpose": "test", "run": "1"})
out["meta_written"] = w.metadata
out["meta_info"] = sbx.files.get_info("/root/meta.txt").metadata
out["meta_listed"] = [e.metadata for e in sbx.files.list("/root") if e.name == "meta.txt"]
sbx.files.write("/root/meta.txt", "m2")
out["meta_cleared"] = sbx.files.get_info("/root/meta.txt").metadata
sbx.files.remove("/root/meta.txt")
# /tmp is a tmpfs in banger's guests, whose kernel may keep no user
# attributes there: the file is written, and the answer claims only
# what was kept.
out["meta_tmpfs"] = [sbx.files.write("/tmp/e2b/m.txt", "m", metadata={"k": "v"}).metadata,
    sbx.files.get_info("/tmp/e2b/m.txt").metadata]
sbx.files.remove("/tmp/e2b/m.txt")
sbx.files.write("/tmp/e2b/gz.txt", "zipped " * 1000, gzip=True)
out["gzip"] = sbx.files.read("/tmp/e2b/gz.txt") == "zipped " * 1000
sbx.files.remove("/tmp/e2b/gz.txt")
hello = sbx.files.get_info("/tmp/e2b/hello.txt")
out["owner"] = [hello.owner, hello.group]
# Watches: the sync SDK polls a watcher, the async one streams.
import time, asyncio
h = sbx.files.watch_dir("/tmp/e2b", include_entry=True)
sbx.files.write("/tmp/e2b/w.txt", "x")
seen = []
entries = []
for _ in range(100):
    for e in h.get_new_events():
        seen.append(e.name)
        if e.entry is not None:
            entries.append([e.entry.name, e.entry.type.value])
    if "w.txt" in seen:
        break
    time.sleep(0.05)
h.stop()
out["watched"] = "w.txt" in seen
out["watch_entry"] = ["w.txt", "file"] in entries
from e2b import AsyncSandbox
async def watch_async():
    a = await AsyncSandbox.connect(sbx.sandbox_id)
    names = []
    wh = await a.files.watch_dir("/tmp/e2b", on_event=lambda e: names.append(e.name))
    await a.files.write("/tmp/e2b/a.txt", "y")
    for _ in range(100):
        if "a.txt" in names:
            break
        await asyncio.sleep(0.05)
    await wh.stop()
    return "a.txt" in names
out["async_watched"] = asyncio.run(watch_async())
info = sbx.get_info()
out["info"] = [info.state.value, info.metadata, info.cpu_count > 0]
m = sbx.get_metrics()
out["metrics"] = [len(m), m[0].cpu_count == info.cpu_count, 0 < m[0].mem_used < m[0].mem_total,
    0 < m[0].mem_cache, 0 < m[0].disk_used < m[0].disk_total, 0 <= m[0].cpu_used_pct <= 100]
page = Sandbox.list(query=SandboxQuery(metadata={"purpose": "e2b-test"})).next_items()
out["listed"] = [s.sandbox_id for s in page]
none = Sandbox.list(query=SandboxQuery(metadata={"purpose": "other"})).next_items()
out["listed_other"] = [s.sandbox_id for s in none]
sbx.set_timeout(900)
out["paused"] = sbx.pause()
out["paused_again"] = sbx.pause()
out["paused_metrics"] = len(Sandbox.get_metrics(sbx.sandbox_id))
back = Sandbox.connect(sbx.sandbox_id)
out["after_resume"] = back.commands.run("echo back").stdout
out["killed"] = back.kill()
out["killed_again"] = Sandbox.kill(sbx.sandbox_id)
print(json.dumps(out))
"#;

/// What a client that is not an SDK may send: refused, named, bounded.
/// What every script gets first: raw HTTP to the API (`ask`: the status
/// and the body) and the key's headers (`key`).
const PRELUDE: &str = r#"
import json, http.client, os
host, port = os.environ["E2B_API_URL"][len("http://"):].split(":")
def ask(method, path, body=b"", headers=None):
    c = http.client.HTTPConnection(host, int(port), timeout=300)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return [r.status, data.decode(errors="replace")]
key = {"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"}
"#;

const RAW: &str = r#"
out = {}
out["no_key"] = ask("GET", "/v2/sandboxes")[0]
out["too_big"] = ask("POST", "/v2/sandboxes", b"x" * (2 << 20), key)[0]
out["bad_json"] = ask("POST", "/v2/sandboxes", b"{", key)
out["unknown"] = ask("GET", "/sandboxes/no-such-sandbox", b"", key)
sid = SANDBOX
token = json.loads(ask("GET", "/sandboxes/" + sid, b"", key)[1])["envdAccessToken"]
envd = {"E2b-Sandbox-Id": sid, "Content-Type": "application/json"}
out["no_token"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/"}', envd)[0]
out["bad_token"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/"}', dict(envd, **{"X-Access-Token": token[:-1] + ("1" if token[-1] == "0" else "0")}))[0]
envd["X-Access-Token"] = token
out["stat"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/etc/hostname"}', envd)
# Addressed by host name, as SDKs without E2B_SANDBOX_URL do.
by_host = {"Host": "49983-" + sid + ".e2b.local", "X-Access-Token": token, "Content-Type": "application/json"}
out["by_host"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/etc/hostname"}', by_host)[0]
envd["Content-Type"] = "application/connect+json"
out["short_envelope"] = ask("POST", "/process.Process/Start", b"\x00\x00\x00\x10{}", envd)
# Uploads: too much metadata, an unknown coding, a gzip bomb.
raw = dict(envd, **{"Content-Type": "application/octet-stream"})  # (envd's is connect+json by now)
out["meta_many"] = ask("POST", "/files?path=/tmp/raw.txt", b"x", dict(raw, **{"X-Metadata-k%d" % i: "v" for i in range(65)}))
out["coding"] = ask("POST", "/files?path=/tmp/raw.txt", b"x", dict(raw, **{"Content-Encoding": "br"}))[0]
import zlib
z = zlib.compressobj(9, zlib.DEFLATED, 31)
bomb = b"".join(z.compress(bytes(1 << 20)) for _ in range(257)) + z.flush()
out["bomb"] = [len(bomb) < (1 << 20), ask("POST", "/files?path=/tmp/bomb", bomb, dict(raw, **{"Content-Encoding": "gzip"}))[0]]
# Unknown services and methods, and a user's write where it may not.
j = dict(envd, **{"Content-Type": "application/json"})
out["no_service"] = ask("POST", "/nope.Nope/Stat", b'{}', j)
out["no_method"] = ask("POST", "/filesystem.Filesystem/Explode", b'{"path":"/"}', j)
import base64
nobody = dict(j, **{"Authorization": "Basic " + base64.b64encode(b"nobody:").decode()})
out["mkdir_not_yours"] = ask("POST", "/filesystem.Filesystem/MakeDir", b'{"path":"/root/nope/deeper"}', nobody)
out["mkdir_yours"] = ask("POST", "/filesystem.Filesystem/MakeDir", b'{"path":"/tmp/nobodys/dir"}', nobody)
out["remove_not_yours"] = ask("POST", "/filesystem.Filesystem/Remove", b'{"path":"/etc/hostname"}', nobody)[0]
out["hostname_kept"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/etc/hostname"}', j)[0]
octet = dict(raw, **{"Content-Type": "application/octet-stream"})
out["upload_yours"] = ask("POST", "/files?path=/tmp/nobodys/f.txt&username=nobody", b"mine", octet)[0]
out["upload_yours_owner"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/tmp/nobodys/f.txt"}', j)
out["upload_onto_dir"] = ask("POST", "/files?path=/tmp/nobodys&username=nobody", b"x", octet)[0]
out["not_yours"] = ask("POST", "/files?path=/root/denied.txt&username=nobody", b"x", dict(raw, **{"Content-Type": "application/octet-stream"}))[0]
out["denied_absent"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/root/denied.txt"}', j)[0]
out["stat_after"] = ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/tmp/bomb"}', dict(envd, **{"Content-Type": "application/json"}))[0]
many = ask("GET", "/sandboxes/metrics?sandbox_ids=" + sid + ",no-such-sandbox", b"", key)
out["many_metrics"] = [many[0], sorted(json.loads(many[1])["sandboxes"])]
out["bad_start"] = ask("GET", "/sandboxes/" + sid + "/metrics?start=soon", b"", key)[0]
print(json.dumps(out))
"#;

/// A watch of a network filesystem (a `--mount`: virtio-fs, FUSE to the
/// guest's kernel) is refused unless asked for, as envd does.
const NETWORK_WATCH: &str = r#"
import json, time
from e2b import Sandbox
sbx = Sandbox.connect(NAME)
out = {}
try:
    sbx.files.watch_dir("/host")
    out["refused"] = "watched"
except Exception as e:
    out["refused"] = [type(e).__name__, "network filesystem" in str(e)]
h = sbx.files.watch_dir("/host", allow_network_mounts=True)
sbx.files.write("/host/seen.txt", "x")
seen = []
for _ in range(100):
    seen += [e.name for e in h.get_new_events()]
    if "seen.txt" in seen:
        break
    time.sleep(0.05)
h.stop()
out["allowed"] = "seen.txt" in seen
print(json.dumps(out))
"#;

const BAD_KEY: &str = r#"
import json
from e2b import Sandbox
try:
    Sandbox.create()
    print(json.dumps({"refused": False}))
except Exception as e:
    print(json.dumps({"refused": True, "kind": type(e).__name__, "message": str(e)}))
"#;

#[test]
fn e2bs_sdk_drives_banger_vms() {
    let inst = Instance::new(&banger_bin()).with_image();
    let addr = ok(
        &inst.banger(&["api", "serve", "--listen", "127.0.0.1:0"]),
        "api serve",
    )
    .trim()
    .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(
        ok(&inst.banger(&["api", "status"]), "api status").trim(),
        addr
    );
    let key = ok(
        &inst.banger(&["api", "token", "create", "sdk"]),
        "token create",
    )
    .lines()
    .last()
    .unwrap_or_default()
    .to_string();
    assert!(key.starts_with("banger_"), "{key}");
    let listed = ok(&inst.banger(&["api", "token", "ls", "--json"]), "token ls");
    assert!(
        listed.contains("\"sdk\"") && !listed.contains(&key),
        "{listed}"
    );

    // Create and a first command.
    let (v, out) = sdk(&inst, &addr, &key, CREATE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        v["stdout"].as_str().unwrap(),
        format!("hi there\n{id}\nroot\n"),
        "{v}"
    );
    assert_eq!(v["exit"], 0);
    // A banger VM, with its metadata.
    let vm = inst.vm(&id).expect("the sandbox is a VM");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["metadata"]["purpose"], "e2b-test", "{vm}");
    let table = ok(&inst.banger(&["vm", "ls"]), "vm ls");
    assert!(
        table.lines().next().unwrap_or_default().contains("LABELS")
            && table
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("purpose=e2b-test")),
        "vm ls shows a sandbox's metadata: {table}"
    );

    // What a client that is not an SDK may send.
    let (v, out) = sdk(
        &inst,
        &addr,
        &key,
        &RAW.replace("SANDBOX", &format!("{id:?}")),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["no_key"], 401, "{v}");
    assert_eq!(v["too_big"], 413, "{v}");
    assert_eq!(v["bad_json"][0], 400, "{v}");
    assert!(
        v["bad_json"][1].as_str().unwrap().contains("\"code\":400"),
        "{v}"
    );
    assert_eq!(v["unknown"][0], 404, "{v}");
    assert_eq!(v["no_token"], 401, "{v}");
    assert_eq!(v["bad_token"], 401, "{v}");
    assert_eq!(v["stat"][0], 200, "{v}");
    assert!(
        v["stat"][1]
            .as_str()
            .unwrap()
            .contains("\"name\":\"hostname\""),
        "{v}"
    );
    assert_eq!(v["short_envelope"][0], 400, "{v}");
    assert_eq!(v["by_host"], 200, "{v}");
    assert_eq!(v["meta_many"][0], 400, "{v}");
    assert!(
        v["meta_many"][1]
            .as_str()
            .unwrap()
            .contains("65 metadata keys: at most 64"),
        "{v}"
    );
    assert_eq!(v["coding"], 400, "{v}");
    assert_eq!(v["bomb"], serde_json::json!([true, 413]), "{v}");
    assert_eq!(v["stat_after"], 404, "nothing written: {v}");
    for k in ["no_service", "no_method"] {
        assert_eq!(v[k][0], 501, "{k}: {v}");
        assert!(
            v[k][1].as_str().unwrap().contains("unimplemented"),
            "{k}: {v}"
        );
    }
    assert_eq!(v["not_yours"], 403, "nobody may not write /root: {v}");
    assert_eq!(v["denied_absent"], 404, "nothing written: {v}");
    assert_eq!(v["upload_yours"], 200, "{v}");
    assert!(
        v["upload_yours_owner"][1]
            .as_str()
            .unwrap()
            .contains("\"owner\":\"nobody\""),
        "written as theirs: {v}"
    );
    assert_eq!(v["upload_onto_dir"], 400, "{v}");
    assert_eq!(v["mkdir_not_yours"][0], 403, "{v}");
    assert!(
        v["mkdir_not_yours"][1]
            .as_str()
            .unwrap()
            .contains("permission_denied"),
        "{v}"
    );
    assert_eq!(v["mkdir_yours"][0], 200, "{v}");
    assert!(
        v["mkdir_yours"][1]
            .as_str()
            .unwrap()
            .contains("\"owner\":\"nobody\""),
        "made as theirs: {v}"
    );
    assert_eq!(v["remove_not_yours"], 403, "{v}");
    assert_eq!(v["hostname_kept"], 200, "nothing removed: {v}");
    assert_eq!(v["many_metrics"], serde_json::json!([200, [id]]), "{v}");
    assert_eq!(v["bad_start"], 400, "{v}");
    assert!(
        v["short_envelope"][1]
            .as_str()
            .unwrap()
            .contains("invalid_argument"),
        "{v}"
    );

    // Everything else, from another client connecting by ID.
    let script = USE.replace("ID", &format!("{id:?}"));
    let (v, out) = sdk(&inst, &addr, &key, &script);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["failed"], serde_json::json!([3, "to-stderr\n"]), "{v}");
    assert_eq!(v["bg_listed"], true, "{v}");
    assert_eq!(v["bg_killed"], true, "{v}");
    assert_eq!(v["read"], "hello world", "{v}");
    assert_eq!(v["exists"], serde_json::json!([true, false]), "{v}");
    assert_eq!(v["made"], true, "{v}");
    assert_eq!(
        v["listed_files"],
        serde_json::json!(["hello.txt", "sub"]),
        "{v}"
    );
    assert_eq!(
        v["info"],
        serde_json::json!(["running", {"purpose": "e2b-test"}, true]),
        "{v}"
    );
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["ended_unwatched"], true, "{v}");
    assert_eq!(v["stdin"], "through stdin\n", "{v}");
    assert_eq!(v["joined"], "joined\n", "{v}");
    assert_eq!(v["both"], serde_json::json!(["both\n", "both\n"]), "{v}");
    assert_eq!(v["pty"], true, "{v}");
    assert_eq!(v["big"], true, "{v}");
    assert_eq!(v["watched"], true, "{v}");
    assert_eq!(v["watch_entry"], true, "{v}");
    let meta = serde_json::json!({"purpose": "test", "run": "1"});
    assert_eq!(v["meta_written"], meta, "{v}");
    assert_eq!(v["meta_info"], meta, "{v}");
    assert_eq!(v["meta_listed"], serde_json::json!([meta]), "{v}");
    assert_eq!(v["meta_cleared"], serde_json::Value::Null, "{v}");
    assert_eq!(v["meta_tmpfs"][0], v["meta_tmpfs"][1], "{v}");
    assert_eq!(v["gzip"], true, "{v}");
    assert_eq!(v["owner"], serde_json::json!(["root", "root"]), "{v}");
    assert_eq!(v["async_watched"], true, "{v}");
    assert_eq!(v["listed"], serde_json::json!([id]), "{v}");
    assert_eq!(v["listed_other"], serde_json::json!([]), "{v}");
    assert_eq!(
        v["metrics"],
        serde_json::json!([1, true, true, true, true, true]),
        "{v}"
    );
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(
        v["paused_metrics"], 0,
        "a paused sandbox has no sample: {v}"
    );
    assert_eq!(v["paused_again"], false, "a paused sandbox: 409: {v}");
    assert_eq!(v["after_resume"], "back\n", "{v}");
    assert_eq!(v["killed"], true, "{v}");
    assert_eq!(v["killed_again"], false, "gone: 404: {v}");
    assert!(inst.vm(&id).is_none(), "kill deletes the VM");

    // A network filesystem's watch: refused, unless allowed.
    let shared = tempfile::tempdir().unwrap();
    let mount = format!("{}:/host", shared.path().display());
    ok(
        &inst.banger(&["vm", "run", "-d", "--name", "mnt", "--mount", &mount]),
        "vm run -d --mount",
    );
    let (v, out) = sdk(
        &inst,
        &addr,
        &key,
        &NETWORK_WATCH.replace("NAME", "\"mnt\""),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        v["refused"],
        serde_json::json!(["InvalidArgumentException", true]),
        "{v}"
    );
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(
        std::fs::read_to_string(shared.path().join("seen.txt")).unwrap(),
        "x"
    );
    ok(&inst.banger(&["vm", "rm", "-f", "mnt"]), "vm rm");

    // Keys: an unknown one, and one removed, are refused.
    let (v, _) = sdk(&inst, &addr, "banger_not-a-key", BAD_KEY);
    assert_eq!(v["refused"], true, "{v}");
    assert_eq!(v["kind"], "AuthenticationException", "{v}");
    ok(&inst.banger(&["api", "token", "rm", "sdk"]), "token rm");
    let (v, _) = sdk(&inst, &addr, &key, BAD_KEY);
    assert_eq!(v["refused"], true, "{v}");
    // Stopped, the port is closed.
    ok(&inst.banger(&["api", "stop"]), "api stop");
    assert_eq!(
        ok(&inst.banger(&["api", "status"]), "api status").trim(),
        ""
    );
    let (v, _) = sdk(&inst, &addr, &key, BAD_KEY);
    assert_eq!(v["refused"], true, "{v}");
    inst.assert_baseline();
}

/// A key has its maker's rights and no more: a member's key does not see
/// or reach a VM only root may use (root's `--mount`), root's does; once
/// the member has left the socket group, their key is refused.
#[test]
fn a_members_key_has_the_members_rights() {
    use test_infra::users::{TestGroup, TestUser};
    let group = TestGroup::create();
    let member = TestUser::new(&[&group]);
    let inst = Instance::new(&banger_bin())
        .with_image()
        .with_env("BANGER_SOCKET_GROUP", &group.name);
    ok(
        &inst.banger(&[
            "vm",
            "run",
            "-d",
            "--name",
            "rootvm",
            "--mount",
            "/etc:/mnt:ro",
        ]),
        "root's VM with root's mount",
    );
    let addr = ok(
        &inst.banger(&["api", "serve", "--listen", "127.0.0.1:0"]),
        "api serve",
    )
    .trim()
    .to_string();
    let key_of = |out: std::process::Output| {
        ok(&out, "token create")
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    let root_key = key_of(inst.banger(&["api", "token", "create", "root"]));
    let member_key = key_of(inst.banger_as(&member, &["api", "token", "create", "mine"]));
    // A member lists their own keys only; serving is root's.
    let listed = ok(
        &inst.banger_as(&member, &["api", "token", "ls", "--json"]),
        "member token ls",
    );
    assert!(
        listed.contains("\"mine\"") && !listed.contains("\"root\""),
        "{listed}"
    );
    let out = inst.banger_as(&member, &["api", "stop"]);
    assert!(
        text(&out.stderr).contains("root's"),
        "{}",
        text(&out.stderr)
    );

    const ASK: &str = r#"
listed = ask("GET", "/v2/sandboxes", headers=key)
ids = [s["sandboxID"] for s in json.loads(listed[1])] if listed[0] == 200 else listed
print(json.dumps({"listed": ids, "info": ask("GET", "/sandboxes/rootvm", headers=key)[0],
                  "kill": ask("DELETE", "/sandboxes/rootvm", headers=key)[0]}))
"#;
    let (v, out) = sdk(&inst, &addr, &member_key, ASK);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["listed"], serde_json::json!([]), "{v}");
    assert_eq!(v["info"], 404, "{v}");
    assert_eq!(v["kill"], 404, "{v}");
    assert!(
        inst.vm("rootvm").is_some(),
        "the member's key removed nothing"
    );
    let (v, _) = sdk(
        &inst,
        &addr,
        &root_key,
        ASK.replace(
            "\"kill\": ask(\"DELETE\", \"/sandboxes/rootvm\", headers=key)[0]",
            "\"kill\": 0",
        )
        .as_str(),
    );
    assert_eq!(v["listed"], serde_json::json!(["rootvm"]), "{v}");
    assert_eq!(v["info"], 200, "{v}");

    // A sandbox of the member's: its envd token ends with their key.
    const ENVD: &str = r#"
st, made = ask("POST", "/v2/sandboxes", b'{"templateID":"base"}', key)
s = json.loads(made)
envd = {"E2b-Sandbox-Id": s["sandboxID"], "X-Access-Token": s["envdAccessToken"],
        "Content-Type": "application/json"}
print(json.dumps({"made": st, "id": s["sandboxID"], "token": s["envdAccessToken"],
                  "stat": ask("POST", "/filesystem.Filesystem/Stat", b'{"path":"/"}', envd)[0]}))
"#;
    let second = key_of(inst.banger_as(&member, &["api", "token", "create", "spare"]));
    let (v, out) = sdk(&inst, &addr, &member_key, ENVD);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        (v["made"].clone(), v["stat"].clone()),
        (201.into(), 200.into()),
        "{v}"
    );
    let (sid, token) = (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    );
    ok(
        &inst.banger_as(&member, &["api", "token", "rm", "mine"]),
        "token rm",
    );
    let stat_again = format!(
        r#"
st = ask("POST", "/filesystem.Filesystem/Stat", b'{{"path":"/"}}',
         {{"E2b-Sandbox-Id": "{sid}", "X-Access-Token": "{token}",
          "Content-Type": "application/json"}})[0]
print(json.dumps({{"stat": st}}))
"#
    );
    let (v, _) = sdk(&inst, &addr, &second, &stat_again);
    assert_eq!(v["stat"], 401, "the token went with its key: {v}");
    ok(&inst.banger(&["vm", "rm", "-f", &sid]), "rm the member's");
    let member_key = second;

    // Out of the group, the member's key is refused.
    let gone = std::process::Command::new("gpasswd")
        .args(["-d", &member.name, &group.name])
        .output()
        .unwrap();
    assert!(gone.status.success(), "{}", text(&gone.stderr));
    let (v, _) = sdk(&inst, &addr, &member_key, ASK);
    assert_eq!(v["listed"][0], 401, "{v}");
    assert!(
        v["listed"][1]
            .as_str()
            .unwrap()
            .contains("no longer in banger's socket group"),
        "{v}"
    );
    ok(&inst.banger(&["vm", "rm", "-f", "rootvm"]), "rm");
    inst.assert_baseline();
}
