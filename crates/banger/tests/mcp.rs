//! `banger mcp` (issue 22) as an MCP client drives it: JSON-RPC over the
//! server's stdin and stdout (initialize, tools/list, tools/call), on a
//! real guest: a VM created, a command run (output and exit code), a file
//! written, read and listed, VMs listed, the VM deleted; arguments the
//! CLI would refuse are refused. Needs root; `scripts/test.sh` runs it.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use test_infra::Instance;

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

struct Mcp {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    next: u64,
}

impl Mcp {
    fn start(inst: &Instance) -> Mcp {
        let mut child = inst
            .banger_cmd(&["mcp"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Mcp {
            child,
            lines,
            next: 1,
        }
    }

    fn send(&mut self, v: &Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    }

    /// A request and its response (notifications in between skipped).
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(600))
                .unwrap_or_else(|e| panic!("{method}: no answer: {e}"));
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            if v["id"] == id {
                return v;
            }
        }
    }

    /// A tool's text, and whether it is an error result.
    fn call(&mut self, tool: &str, args: Value) -> (String, bool) {
        let v = self.request("tools/call", json!({"name": tool, "arguments": args}));
        let r = &v["result"];
        assert!(r.is_object(), "{tool}: {v}");
        let text = r["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (text, r["isError"] == true)
    }
}

#[test]
fn an_mcp_client_creates_and_uses_a_vm() {
    let inst = Instance::new(&banger_bin()).with_image();
    let mut m = Mcp::start(&inst);
    let init = m.request(
        "initialize",
        json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "banger-test", "version": "0"},
        }),
    );
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    m.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let tools = m.request("tools/list", json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for want in [
        "create_vm",
        "run_command",
        "read_file",
        "write_file",
        "list_files",
        "list_vms",
        "delete_vm",
    ] {
        assert!(names.contains(&want), "{want}: {names:?}");
    }

    let (text, err) = m.call("create_vm", json!({"name": "mcp1", "memory": "1024M"}));
    assert!(!err && text.starts_with("mcp1: running"), "{text}");
    let (text, err) = m.call(
        "run_command",
        json!({"vm": "mcp1", "command": "echo out; echo err >&2; hostname; exit 4"}),
    );
    assert!(!err, "{text}");
    assert!(text.starts_with("exit code: 4\n"), "{text}");
    assert!(
        text.contains("out\nmcp1\n") && text.contains("err\n"),
        "{text}"
    );
    let (text, err) = m.call(
        "write_file",
        json!({"vm": "mcp1", "path": "/tmp/mcp/notes.txt", "content": "from the model\n"}),
    );
    assert!(!err, "{text}");
    let (text, err) = m.call(
        "read_file",
        json!({"vm": "mcp1", "path": "/tmp/mcp/notes.txt"}),
    );
    assert!(!err && text == "from the model\n", "{text}");
    let (text, err) = m.call("list_files", json!({"vm": "mcp1", "path": "/tmp/mcp"}));
    assert!(
        !err && text.contains("file\t15\t/tmp/mcp/notes.txt"),
        "{text}"
    );
    let (text, err) = m.call("read_file", json!({"vm": "mcp1", "path": "/nope"}));
    assert!(err, "a missing file is the tool's error: {text}");
    let (text, _) = m.call("list_vms", json!({}));
    assert!(text.contains("mcp1: running"), "{text}");

    // What the CLI refuses is refused, nothing done.
    for (tool, args) in [
        (
            "run_command",
            json!({"vm": "Not A Name", "command": "true"}),
        ),
        ("read_file", json!({"vm": "mcp1", "path": "relative.txt"})),
        ("create_vm", json!({"memory": "lots"})),
        (
            "run_command",
            json!({"vm": "mcp1", "command": "true", "timeout_secs": 0}),
        ),
    ] {
        let v = m.request("tools/call", json!({"name": tool, "arguments": args}));
        assert_eq!(v["error"]["code"], -32602, "{tool}: {v}");
    }
    assert_eq!(inst.vms().len(), 1, "nothing was made");

    let (text, err) = m.call("delete_vm", json!({"vm": "mcp1"}));
    assert!(!err, "{text}");
    assert!(inst.vm("mcp1").is_none());
    drop(m.child.stdin.take());
    let st = test_infra::bounded::wait_output(m.child);
    assert!(st.status.success(), "{st:?}");
    inst.assert_baseline();
}
