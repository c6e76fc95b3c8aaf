//! The daemon client: one request per connection, events streamed back. The
//! daemon is started on demand when nobody answers on the socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_core::api::{
    ApiError, Envelope, Event, Reply, Request, Response, VmInfo, PROTOCOL_VERSION,
};
use banger_core::Layout;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("talk to bangerd at {path}: {source} (its log: {log})")]
    Io {
        path: PathBuf,
        log: PathBuf,
        source: std::io::Error,
    },
    #[error("permission denied on {path} ({owner}): {hint}")]
    Denied {
        path: PathBuf,
        owner: String,
        hint: String,
    },
    #[error(
        "bangerd is not running at {0}, and only root can start it: `sudo systemctl start \
         banger.socket` where systemd runs, else `sudo banger daemon ping`"
    )]
    NotRunning(PathBuf),
    #[error("bangerd at {0} closed the connection without an answer (see its log: {1})")]
    NoAnswer(PathBuf, PathBuf),
    #[error("bangerd answered with something unreadable: {0}")]
    Garbled(String),
    #[error("cannot start bangerd ({binary}): {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("bangerd exited ({status}) instead of starting; its log {log} ends with:\n{tail}")]
    DaemonExited {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("bangerd did not come up within {secs}s; its log {log} ends with:\n{tail}")]
    NoDaemon {
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

/// Why the socket refused us, and the command that fixes it.
fn denied(path: &std::path::Path) -> ClientError {
    use std::os::unix::fs::MetadataExt;
    let (owner, hint) = match std::fs::metadata(path) {
        Ok(md) if md.mode() & 0o060 != 0 => {
            let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(md.gid()))
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_else(|| md.gid().to_string());
            (
                format!("root:{group} {:o}", md.mode() & 0o777),
                format!(
                    "join the group {group}: `sudo usermod -aG {group} $USER`, then log in \
                     again (or `newgrp {group}`)"
                ),
            )
        }
        Ok(md) => (
            format!("uid {} {:o}", md.uid(), md.mode() & 0o777),
            "only root may use it: create the group (`sudo groupadd --system banger`), \
             restart bangerd, then join it (`sudo usermod -aG banger $USER`)"
                .to_string(),
        ),
        Err(_) => (
            "its directory".to_string(),
            "run as root, or join the group banger".to_string(),
        ),
    };
    ClientError::Denied {
        path: path.to_path_buf(),
        owner,
        hint,
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub layout: Layout,
}

impl Client {
    fn connect(&self) -> Result<UnixStream, ClientError> {
        let path = self.layout.socket();
        match UnixStream::connect(&path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(denied(&path)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if !nix::unistd::geteuid().is_root() {
                    return Err(ClientError::NotRunning(path));
                }
                self.start_daemon()?;
                UnixStream::connect(&path).map_err(|source| ClientError::Io {
                    path,
                    log: self.layout.daemon_log(),
                    source,
                })
            }
            Err(source) => Err(ClientError::Io {
                path,
                log: self.layout.daemon_log(),
                source,
            }),
        }
    }

    /// Whether a daemon answers on the socket (none is started).
    pub fn running(&self) -> bool {
        UnixStream::connect(self.layout.socket()).is_ok()
    }

    fn daemon_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.join("bangerd")))
            .filter(|p| p.is_file())
            .or_else(|| banger_host::cmd::which("bangerd"))
            .unwrap_or_else(|| PathBuf::from("bangerd"))
    }

    /// Starts bangerd detached (own process group, output to its log) and
    /// waits for its socket to answer.
    pub fn start_daemon(&self) -> Result<(), ClientError> {
        let binary = Self::daemon_binary();
        let log_path = self.layout.daemon_log();
        let spawn_err = |source| ClientError::Spawn {
            binary: binary.clone(),
            source,
        };
        std::fs::create_dir_all(&self.layout.state_dir).map_err(spawn_err)?;
        // What this start writes to the log, not an earlier one's lines.
        let from = std::cell::Cell::new(0);
        let spawn = || {
            from.set(std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(spawn_err)?;
            let log2 = log.try_clone().map_err(spawn_err)?;
            let mut cmd = Command::new(&binary);
            cmd.arg("--state-dir")
                .arg(&self.layout.state_dir)
                .arg("--runtime-dir")
                .arg(&self.layout.runtime_dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            // A session of its own: not the caller's terminal's, so it
            // does not end at logout or with the shell's job control.
            // SAFETY: setsid is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
            }
            cmd.spawn().map_err(spawn_err)
        };
        let mut child = spawn()?;
        let start = Instant::now();
        let limit = Duration::from_secs(10);
        while start.elapsed() < limit {
            if UnixStream::connect(self.layout.socket()).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                // It exited. If another daemon holds the lock (one starting
                // for another client, or one still exiting), wait a moment
                // and start another: whichever is left serves. Otherwise
                // this one failed: say why.
                let tail = banger_core::text::escape_control(
                    &banger_host::fsutil::tail_lines_from(&log_path, from.get(), 8),
                    true,
                );
                if tail.contains("only one daemon per state dir") {
                    std::thread::sleep(Duration::from_millis(20));
                    if UnixStream::connect(self.layout.socket()).is_ok() {
                        return Ok(());
                    }
                    child = spawn()?;
                    continue;
                }
                return Err(ClientError::DaemonExited {
                    status: status.to_string(),
                    log: log_path.clone(),
                    tail,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(ClientError::NoDaemon {
            secs: limit.as_secs(),
            tail: banger_core::text::escape_control(
                &banger_host::fsutil::tail_lines_from(&log_path, from.get(), 8),
                true,
            ),
            log: log_path,
        })
    }

    /// Sends `req`; `on_event` sees each progress event; returns the answer.
    ///
    /// A daemon that dies as the request arrives (killed a moment before,
    /// its last thread still closing the socket) resets the connection
    /// before any reply; requests that change nothing are then sent once
    /// more, to the daemon that replaces it.
    pub fn call(
        &self,
        req: Request,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Response, ClientError> {
        let read_only = matches!(
            req,
            Request::Ping
                | Request::VmGet { .. }
                | Request::VmList
                | Request::ImageList
                | Request::Doctor
                | Request::Settle
                | Request::VmStats { .. }
                | Request::DaemonStatus
        );
        match self.call_once(req.clone(), on_event) {
            Err(ClientError::Io { source, .. })
                if read_only
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
                self.call_once(req, on_event)
            }
            r => r,
        }
    }

    fn call_once(
        &self,
        req: Request,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Response, ClientError> {
        let stream = self.send(req)?;
        self.answer(stream, on_event)
    }

    fn io_err(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.layout.socket(),
            log: self.layout.daemon_log(),
            source,
        }
    }

    /// Connects and writes the request line.
    fn send(&self, req: Request) -> Result<UnixStream, ClientError> {
        let mut stream = self.connect()?;
        let mut line = serde_json::to_string(&Envelope {
            version: PROTOCOL_VERSION,
            request: req,
        })
        .map_err(|e| ClientError::Garbled(e.to_string()))?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io_err(e))?;
        Ok(stream)
    }

    /// Reads events until the final reply.
    fn answer(
        &self,
        stream: UnixStream,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Response, ClientError> {
        let reader = BufReader::new(stream);
        for l in reader.lines() {
            let l = l.map_err(|e| self.io_err(e))?;
            match serde_json::from_str::<Reply>(&l) {
                Ok(Reply::Event(e)) => on_event(e),
                Ok(Reply::Ok(r)) => return Ok(r),
                Ok(Reply::Err(e)) => return Err(ClientError::Api(e)),
                Err(e) => return Err(ClientError::Garbled(format!("{e}: {l}"))),
            }
        }
        Err(ClientError::NoAnswer(
            self.layout.socket(),
            self.layout.daemon_log(),
        ))
    }

    /// A connection to VM `name`'s guest agent, handed over by the daemon
    /// (SCM_RIGHTS) past the vsock handshake.
    pub fn agent(&self, name: &str) -> Result<UnixStream, ClientError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let stream = self.send(Request::VmAgent {
            name: name.to_string(),
        })?;
        let mut line: Vec<u8> = Vec::new();
        let mut fd: Option<OwnedFd> = None;
        let mut buf = vec![0u8; 64 << 10];
        while !line.contains(&b'\n') {
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| self.io_err(e.into()))?;
            for c in msg.cmsgs().map_err(|e| self.io_err(e.into()))? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for f in fds {
                        // SAFETY: the kernel just installed this descriptor
                        // in our table for us; nothing else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(f) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            let n = msg.bytes;
            if n == 0 {
                return Err(ClientError::NoAnswer(
                    self.layout.socket(),
                    self.layout.daemon_log(),
                ));
            }
            line.extend_from_slice(&buf[..n]);
        }
        let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
        let text = String::from_utf8_lossy(&line[..end]).into_owned();
        match serde_json::from_str::<Reply>(&text) {
            Ok(Reply::Ok(Response::Agent)) => fd.map(UnixStream::from).ok_or_else(|| {
                ClientError::Garbled("the agent connection came without its descriptor".into())
            }),
            Ok(Reply::Err(e)) => Err(ClientError::Api(e)),
            Ok(other) => Err(ClientError::Garbled(format!("{other:?}"))),
            Err(e) => Err(ClientError::Garbled(format!("{e}: {text}"))),
        }
    }

    /// An `rm` create: the VM lives as long as this connection. `use_vm`
    /// runs once the daemon says the VM is up; then this side of the
    /// connection is shut, the daemon deletes the VM and answers. If this
    /// process dies (Ctrl-C) the connection closes and the daemon deletes
    /// the VM all the same, or cancels its boot. What `use_vm` returned
    /// comes back even when the daemon's answer does not (a daemon that
    /// went meanwhile: the next one deletes the VM once this process is
    /// gone).
    pub fn call_lease<T>(
        &self,
        req: Request,
        on_event: &mut dyn FnMut(Event),
        use_vm: impl FnOnce(&VmInfo) -> T,
    ) -> (Option<T>, Result<Response, ClientError>) {
        let stream = match self.send(req) {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        };
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return (None, Err(self.io_err(e))),
        };
        let mut used = None;
        let mut use_vm = Some(use_vm);
        let mut events = |e: Event| match e {
            Event::Ready { vm } => {
                if let Some(f) = use_vm.take() {
                    used = Some(f(&vm));
                }
                let _ = writer.shutdown(std::net::Shutdown::Write);
            }
            other => on_event(other),
        };
        let r = self.answer(stream, &mut events);
        (used, r)
    }
}
