//! A minimal QMP client: greeting, capabilities negotiation, one command.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::VmmError;

fn api_err(path: &Path, detail: impl std::fmt::Display) -> VmmError {
    VmmError::Api {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Presses Ctrl-Alt-Del on the guest's keyboard (QEMU's twin of
/// Firecracker's `SendCtrlAltDel`).
pub fn send_ctrl_alt_del(path: &Path) -> Result<(), VmmError> {
    let keys = json!({"keys": [
        {"type": "qcode", "data": "ctrl"},
        {"type": "qcode", "data": "alt"},
        {"type": "qcode", "data": "delete"}
    ]});
    execute(path, "send-key", Some(keys)).map(|_| ())
}

/// Executes one QMP command and returns its `return` value.
pub fn execute(path: &Path, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
    let stream = banger_agent::connect_nofollow(path).map_err(|e| api_err(path, e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| api_err(path, e))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| api_err(path, e))?);
    let mut writer = stream;
    let mut read = || -> Result<Value, VmmError> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(|e| api_err(path, e))? == 0 {
                return Err(api_err(path, "QMP closed the connection"));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| api_err(path, e))?;
            // Asynchronous events may arrive between replies.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = read()?;
    if greeting.get("QMP").is_none() {
        return Err(api_err(path, format!("not a QMP greeting: {greeting}")));
    }
    let mut send = |cmd: Value| -> Result<(), VmmError> {
        let mut s = cmd.to_string();
        s.push('\n');
        writer.write_all(s.as_bytes()).map_err(|e| api_err(path, e))
    };
    send(json!({"execute": "qmp_capabilities"}))?;
    read()?;
    let mut cmd = json!({ "execute": command });
    if let Some(a) = arguments {
        cmd["arguments"] = a;
    }
    send(cmd)?;
    let reply = read()?;
    if let Some(err) = reply.get("error") {
        return Err(api_err(path, format!("{command}: {err}")));
    }
    Ok(reply.get("return").cloned().unwrap_or(Value::Null))
}
