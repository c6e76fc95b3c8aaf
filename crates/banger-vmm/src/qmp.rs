//! A minimal QMP client: greeting, capabilities negotiation, commands on
//! one connection ([`Session`]), descriptors passed with `getfd`, and the
//! saving and loading of a VM's device state ([`save_state`],
//! [`load_state`]), which a snapshot and its restore are made of.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::VmmError;

fn api_err(path: &Path, detail: impl std::fmt::Display) -> VmmError {
    VmmError::Api {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// How long one command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest line QMP may send (a reply or an event): a hostile or
/// broken peer cannot grow the daemon's memory without bound.
const MAX_LINE: u64 = 1 << 20;

/// One QMP connection, past the greeting and `qmp_capabilities`.
/// Asynchronous events that arrive between replies are kept for
/// [`Session::wait_event`].
pub struct Session {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl Session {
    pub fn open(path: &Path) -> Result<Session, VmmError> {
        let stream = banger_agent::connect_nofollow(path).map_err(|e| api_err(path, e))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| api_err(path, e))?);
        let mut s = Session {
            path: path.to_path_buf(),
            reader,
            writer: stream,
            events: VecDeque::new(),
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let greeting = s.read_line(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(api_err(path, format!("not a QMP greeting: {greeting}")));
        }
        s.execute("qmp_capabilities", None)?;
        Ok(s)
    }

    /// Reads one JSON line by `deadline`.
    fn read_line(&mut self, deadline: Instant) -> Result<Value, VmmError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(api_err(&self.path, "QMP did not answer in time"));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| api_err(&self.path, e))?;
        let mut line = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| api_err(&self.path, e))?;
        if n == 0 {
            return Err(api_err(&self.path, "QMP closed the connection"));
        }
        serde_json::from_str(&line).map_err(|e| api_err(&self.path, e))
    }

    /// Reads until a reply (not an event), by `deadline`.
    fn reply(&mut self, command: &str, deadline: Instant) -> Result<Value, VmmError> {
        loop {
            let v = self.read_line(deadline)?;
            if v.get("event").is_some() {
                if self.events.len() < 64 {
                    self.events.push_back(v);
                }
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(api_err(&self.path, format!("{command}: {err}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    fn send(&mut self, command: &str, arguments: Option<Value>) -> Result<Vec<u8>, VmmError> {
        let mut cmd = json!({ "execute": command });
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        let mut s = cmd.to_string();
        s.push('\n');
        Ok(s.into_bytes())
    }

    /// Executes one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
        let line = self.send(command, arguments)?;
        self.writer
            .write_all(&line)
            .map_err(|e| api_err(&self.path, e))?;
        self.reply(command, Instant::now() + REPLY_TIMEOUT)
    }

    /// Hands QEMU `fd` under `name` (`getfd`, the descriptor attached to
    /// the command's bytes), for a later `fd:NAME` URI.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let line = self.send("getfd", Some(json!({ "fdname": name })))?;
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(&line)];
        let n = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| api_err(&self.path, format!("getfd: {e}")))?;
        self.writer
            .write_all(&line[n..])
            .map_err(|e| api_err(&self.path, e))?;
        self.reply("getfd", Instant::now() + REPLY_TIMEOUT)
            .map(drop)
    }

    /// Waits by `deadline` for an event `matches` accepts, and returns it.
    pub fn wait_event(
        &mut self,
        matches: impl Fn(&Value) -> bool,
        deadline: Instant,
    ) -> Result<Value, VmmError> {
        if let Some(i) = self.events.iter().position(&matches) {
            if let Some(v) = self.events.remove(i) {
                return Ok(v);
            }
        }
        loop {
            let v = self.read_line(deadline)?;
            if v.get("event").is_some() && matches(&v) {
                return Ok(v);
            }
        }
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

/// Executes one QMP command on a connection of its own and returns its
/// `return` value.
pub fn execute(path: &Path, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
    Session::open(path)?.execute(command, arguments)
}

/// QEMU's version, `MAJOR.MINOR.MICRO` (`query-version`).
pub fn version(s: &mut Session) -> Result<String, VmmError> {
    let v = s.execute("query-version", None)?;
    let q = &v["qemu"];
    match (
        q["major"].as_u64(),
        q["minor"].as_u64(),
        q["micro"].as_u64(),
    ) {
        (Some(a), Some(b), Some(c)) => Ok(format!("{a}.{b}.{c}")),
        _ => Err(api_err(&s.path, format!("query-version: {v}"))),
    }
}

/// What a snapshot and its restore both turn on: RAM that is a shared
/// file is left out of the stream (`x-ignore-shared`: the file is copied
/// instead), and the stream's end is an event.
fn migration_capabilities(s: &mut Session) -> Result<(), VmmError> {
    s.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]})),
    )
    .map(drop)
}

/// Waits for the migration's end by `deadline`: `Ok` once `completed`,
/// an error with QEMU's reason if it failed.
fn migration_end(s: &mut Session, what: &str, deadline: Instant) -> Result<(), VmmError> {
    let ended = |v: &Value| {
        v["event"] == "MIGRATION"
            && matches!(
                v["data"]["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
    };
    let ev = s.wait_event(ended, deadline)?;
    if ev["data"]["status"] == "completed" {
        return Ok(());
    }
    let why = s
        .execute("query-migrate", None)
        .ok()
        .and_then(|v| v["error-desc"].as_str().map(str::to_string))
        .unwrap_or_else(|| ev["data"]["status"].to_string());
    Err(api_err(&s.path, format!("{what}: {why}")))
}

/// Writes a stopped VM's device state (and any RAM that is not a shared
/// file) to `out`, by `deadline`. The VM stays stopped.
pub fn save_state(path: &Path, out: &std::fs::File, deadline: Instant) -> Result<(), VmmError> {
    let mut s = Session::open(path)?;
    migration_capabilities(&mut s)?;
    s.send_fd("banger-state", std::os::fd::AsFd::as_fd(out))?;
    s.execute("migrate", Some(json!({"uri": "fd:banger-state"})))?;
    migration_end(&mut s, "saving the device state", deadline)
}

/// Loads the device state in `input` into a QEMU started with
/// `-incoming defer` (and the same devices), by `deadline`; the VM is
/// then stopped, ready for `cont`. QEMU exits if the state does not load.
pub fn load_state(path: &Path, input: &std::fs::File, deadline: Instant) -> Result<(), VmmError> {
    let mut s = Session::open(path)?;
    migration_capabilities(&mut s)?;
    s.send_fd("banger-state", std::os::fd::AsFd::as_fd(input))?;
    s.execute("migrate-incoming", Some(json!({"uri": "fd:banger-state"})))?;
    migration_end(&mut s, "loading the device state", deadline)
}
