//! One process of a container (its init, or an exec): started through the
//! guest agent, its stdio copied between containerd's FIFOs and the agent
//! connection, its exit kept for `state` and `wait`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use banger_agent::client::{Control, Session};
use banger_agent::proto::{Call, ExecSpec, WinSize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("{what} {path}: {source}")]
    Stdio {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path:?}: only FIFOs and files are supported (no {scheme}:// URIs yet)")]
    Uri {
        what: &'static str,
        path: String,
        scheme: String,
    },
    #[error("start {argv0:?} in the guest: {source}")]
    Start {
        argv0: String,
        source: banger_agent::proto::ProtoError,
    },
    #[error("process already finished")]
    Finished,
    #[error("process not started")]
    NotStarted,
    #[error("{0}")]
    Agent(#[from] banger_agent::proto::ProtoError),
}

/// Where a process's stdio goes: the paths containerd gave (FIFOs its
/// client opened, or files); empty means none.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

/// How a process ended: its status (the shell's convention) and when.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

struct St {
    status: Status,
    pid: u32,
    exit: Option<Exit>,
    control: Option<Control>,
    /// Written to end the stdin pump (CloseIO, or the process's exit).
    stop_stdin: Option<File>,
}

pub struct Proc {
    pub exec_id: String,
    pub stdio: Stdio,
    spec: ExecSpec,
    st: Mutex<St>,
    cv: Condvar,
}

/// The status of a process killed by banger or lost with its VM.
pub const KILLED: u32 = 137;

impl Proc {
    pub fn new(exec_id: &str, stdio: Stdio, spec: ExecSpec) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            stdio,
            spec,
            st: Mutex::new(St {
                status: Status::Created,
                pid: 0,
                exit: None,
                control: None,
                stop_stdin: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn st(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts it over `agent` (a connection to its VM's guest agent).
    /// `started` runs with its pid before anything can report its exit,
    /// `exited` once it has ended and its output is written out.
    pub fn start(
        self: &Arc<Self>,
        agent: UnixStream,
        started: impl FnOnce(u32),
        exited: impl FnOnce(u32, Exit) + Send + 'static,
    ) -> Result<u32, ProcError> {
        let mut out = open_output("stdout", &self.stdio.stdout)?;
        let mut err = if self.stdio.terminal {
            Box::new(std::io::sink()) as Box<dyn Write + Send>
        } else {
            open_output("stderr", &self.stdio.stderr)?
        };
        let input = match self.stdio.stdin.as_str() {
            "" => None,
            path => Some(open_input(path)?),
        };
        let mut spec = self.spec.clone();
        spec.stdin = input.is_some();
        let argv0 = spec.argv.first().cloned().unwrap_or_default();
        let session = Session::start(agent, Call::Exec(spec))
            .map_err(|source| ProcError::Start { argv0, source })?;
        let pid = session.pid;
        let control = session.control();
        {
            let mut st = self.st();
            st.status = Status::Running;
            st.pid = pid;
            st.control = Some(control.clone());
        }
        started(pid);
        if let Some(input) = input {
            let (stop_r, stop_w) = nix::unistd::pipe().map_err(|e| ProcError::Stdio {
                what: "stdin",
                path: self.stdio.stdin.clone(),
                source: e.into(),
            })?;
            self.st().stop_stdin = Some(File::from(stop_w));
            let control = control.clone();
            std::thread::spawn(move || pump_stdin(input, File::from(stop_r), &control));
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let status = match session.wait(&mut out, &mut err) {
                Ok(s) => u32::try_from(s.shell_code()).unwrap_or(255),
                Err(e) => {
                    log::warn!("process {pid}: {e}; counted as killed");
                    KILLED
                }
            };
            let exit = Exit {
                status,
                at: SystemTime::now(),
            };
            me.finish(exit);
            exited(pid, exit);
        });
        Ok(pid)
    }

    /// Records its end, ends its stdin pump and wakes its waiters.
    fn finish(&self, exit: Exit) {
        let mut st = self.st();
        st.status = Status::Stopped;
        st.exit = Some(exit);
        st.control = None;
        if let Some(mut w) = st.stop_stdin.take() {
            let _ = w.write_all(b"x");
        }
        drop(st);
        self.cv.notify_all();
    }

    /// A process killed before it started: it will never run.
    pub fn end_unstarted(&self, status: u32) -> Option<Exit> {
        let mut st = self.st();
        if st.status != Status::Created {
            return None;
        }
        drop(st);
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        self.finish(exit);
        st = self.st();
        st.exit
    }

    pub fn status(&self) -> (Status, u32, Option<Exit>) {
        let st = self.st();
        (st.status, st.pid, st.exit)
    }

    /// Blocks until it has ended.
    pub fn wait(&self) -> Exit {
        let mut st = self.st();
        loop {
            if let Some(e) = st.exit {
                return e;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn control(&self) -> Result<Control, ProcError> {
        let st = self.st();
        match (st.status, &st.control) {
            (Status::Running, Some(c)) => Ok(c.clone()),
            (Status::Created, _) => Err(ProcError::NotStarted),
            _ => Err(ProcError::Finished),
        }
    }

    pub fn signal(&self, signal: i32) -> Result<(), ProcError> {
        Ok(self.control()?.signal(signal)?)
    }

    pub fn resize(&self, ws: WinSize) -> Result<(), ProcError> {
        Ok(self.control()?.resize(ws)?)
    }

    /// containerd's CloseIO: the end of the process's input.
    pub fn close_stdin(&self) -> Result<(), ProcError> {
        let control = self.control()?;
        if let Some(mut w) = self.st().stop_stdin.take() {
            let _ = w.write_all(b"x");
        }
        Ok(control.close_stdin()?)
    }
}

/// An output path: a FIFO is opened read-write, so that it never blocks
/// the open and a reader that goes (containerd restarting) is no EPIPE; a
/// file is appended to.
fn open_output(what: &'static str, path: &str) -> Result<Box<dyn Write + Send>, ProcError> {
    if path.is_empty() {
        return Ok(Box::new(std::io::sink()));
    }
    let path = plain_path(what, path)?;
    let err = |source| ProcError::Stdio {
        what,
        path: path.clone(),
        source,
    };
    let is_fifo = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    let f = if is_fifo {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
    } else {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
    }
    .map_err(err)?;
    Ok(Box::new(f))
}

/// The input FIFO, opened without waiting for its writer.
fn open_input(path: &str) -> Result<File, ProcError> {
    let path = plain_path("stdin", path)?;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&path)
        .map_err(|source| ProcError::Stdio {
            what: "stdin",
            path,
            source,
        })
}

/// A stdio path, or a `fifo://`-less one: `file://` is a file, other
/// schemes (`binary://` loggers) are refused by name.
fn plain_path(what: &'static str, path: &str) -> Result<String, ProcError> {
    match path.split_once("://") {
        None => Ok(path.to_string()),
        Some(("file", rest)) => Ok(rest.to_string()),
        Some((scheme, _)) => Err(ProcError::Uri {
            what,
            path: path.to_string(),
            scheme: scheme.to_string(),
        }),
    }
}

/// Copies the stdin FIFO to the process until the FIFO's writer closes it
/// (then the process's stdin is closed) or `stop` is written.
fn pump_stdin(mut input: File, stop: File, control: &Control) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let mut fds = [
            PollFd::new(input.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("stdin: poll: {e}");
                return;
            }
        }
        let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
        let ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if stopped {
            return;
        }
        if !ready {
            continue;
        }
        match input.read(&mut buf) {
            Ok(0) => {
                let _ = control.close_stdin();
                return;
            }
            Ok(n) => {
                if control.stdin(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::warn!("stdin: {e}");
                let _ = control.close_stdin();
                return;
            }
        }
    }
}
