//! One process of a container (its init, or an exec): started through the
//! guest agent, its stdio copied between containerd's FIFOs and the agent
//! connection, its exit kept for `state` and `wait`.
//!
//! Signals and resizes do not go through this connection (a process that
//! does not read its stdin would hold them behind its input): the task
//! service sends them as calls of their own, by pid.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use banger_agent::client::{Control, Session};
use banger_agent::proto::{Call, ExecSpec};
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
    /// Being started (its `Start` call holds it).
    Starting,
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
    /// Written to its stdin pump: `c` closes the input (CloseIO) once what
    /// is in the FIFO is passed on, `x` ends the pump (the process ended).
    stop_stdin: Option<File>,
    /// CloseIO came before the pump was there: it closes at its start.
    stdin_closed: bool,
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

/// How long a start may hold a signal back (the agent answers a start
/// within 30 s).
const START_WAIT: Duration = Duration::from_secs(60);

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
                stop_stdin: None,
                stdin_closed: false,
            }),
            cv: Condvar::new(),
        })
    }

    fn st(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the start (Created → Starting): false when it is not
    /// Created (started, or killed before it ran).
    pub fn claim_start(&self) -> bool {
        let mut st = self.st();
        if st.status != Status::Created {
            return false;
        }
        st.status = Status::Starting;
        true
    }

    /// Gives a claim back (Starting → Created): its start did not begin.
    pub fn unclaim(&self) {
        let mut st = self.st();
        if st.status == Status::Starting {
            st.status = Status::Created;
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Starts it (claimed) over `agent` (a connection to its VM's guest
    /// agent). `started` runs with its pid before anything can report its
    /// exit, `exited` once it has ended. A failed start leaves it Created.
    pub fn start(
        self: &Arc<Self>,
        agent: UnixStream,
        started: impl FnOnce(u32),
        exited: impl FnOnce(u32, Exit) + Send + 'static,
    ) -> Result<u32, ProcError> {
        let r = self.start_inner(agent, started, exited);
        if r.is_err() {
            self.unclaim();
        }
        r
    }

    fn start_inner(
        self: &Arc<Self>,
        agent: UnixStream,
        started: impl FnOnce(u32),
        exited: impl FnOnce(u32, Exit) + Send + 'static,
    ) -> Result<u32, ProcError> {
        let out = Output::open("stdout", &self.stdio.stdout)?;
        let err = if self.stdio.terminal {
            Output::none()
        } else {
            Output::open("stderr", &self.stdio.stderr)?
        };
        let input = match self.stdio.stdin.as_str() {
            "" => None,
            path => {
                let f = open_input(path)?;
                let (stop_r, stop_w) = nix::unistd::pipe().map_err(|e| ProcError::Stdio {
                    what: "stdin",
                    path: path.to_string(),
                    source: e.into(),
                })?;
                Some((f, File::from(stop_r), File::from(stop_w)))
            }
        };
        let mut spec = self.spec.clone();
        spec.stdin = input.is_some();
        let argv0 = spec.argv.first().cloned().unwrap_or_default();
        let session = Session::start(agent, Call::Exec(spec))
            .map_err(|source| ProcError::Start { argv0, source })?;
        let pid = session.pid;
        let control = session.control();
        let pump = {
            // Running and its pump's stop in one step: a CloseIO from
            // now on finds the pump (one before is kept and passed on).
            let mut st = self.st();
            st.status = Status::Running;
            st.pid = pid;
            input.map(|(fifo, stop_r, mut stop_w)| {
                if st.stdin_closed {
                    let _ = stop_w.write_all(b"c");
                }
                st.stop_stdin = Some(stop_w);
                (fifo, stop_r)
            })
        };
        self.cv.notify_all();
        started(pid);
        if let Some((fifo, stop_r)) = pump {
            std::thread::spawn(move || pump_stdin(fifo, stop_r, &control));
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let (mut out, mut err) = (out, err);
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
        if let Some(mut w) = st.stop_stdin.take() {
            let _ = w.write_all(b"x");
        }
        drop(st);
        self.cv.notify_all();
    }

    /// A process that will never run (killed before it started, or its
    /// container deleted): it ends with `status`; None if it had started
    /// (a start under way is waited for, [`START_WAIT`] at most).
    pub fn end_unstarted(&self, status: u32) -> Option<Exit> {
        // Under one guard from the look to the end: no start can claim it
        // in between.
        let st = self.st();
        let (mut st, _) = self
            .cv
            .wait_timeout_while(st, START_WAIT, |s| s.status == Status::Starting)
            .unwrap_or_else(|p| p.into_inner());
        if st.status != Status::Created {
            return None;
        }
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        st.status = Status::Stopped;
        st.exit = Some(exit);
        drop(st);
        self.cv.notify_all();
        Some(exit)
    }

    pub fn status(&self) -> (Status, u32, Option<Exit>) {
        let st = self.st();
        (st.status, st.pid, st.exit)
    }

    /// Its status once no start holds it (a start ends within
    /// [`START_WAIT`]).
    pub fn settled(&self) -> (Status, u32) {
        let st = self.st();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, START_WAIT, |s| s.status == Status::Starting)
            .unwrap_or_else(|p| p.into_inner());
        (st.status, st.pid)
    }

    /// Its exit, waited for at most `within`.
    pub fn exit_within(&self, within: Duration) -> Option<Exit> {
        let st = self.st();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, within, |s| s.exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        st.exit
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

    /// containerd's CloseIO: its input ends once what its client wrote is
    /// passed on.
    pub fn close_stdin(&self) {
        let mut st = self.st();
        match st.stop_stdin.take() {
            Some(mut w) => {
                let _ = w.write_all(b"c");
            }
            None => st.stdin_closed = true,
        }
    }
}

/// An output: containerd's FIFO or file, or nothing. A FIFO is opened
/// read-write (never blocking the open; a reader that goes, containerd
/// restarting, is no EPIPE) and non-blocking: a write waits for a reader
/// at most [`STALL`], then the output is dropped until a reader takes it
/// again, so that the process's exit is never held behind it.
struct Output {
    f: Option<File>,
    stalled: bool,
}

/// How long an output with nobody reading it holds the process's exit.
const STALL: Duration = Duration::from_secs(10);

impl Output {
    fn none() -> Output {
        Output {
            f: None,
            stalled: false,
        }
    }

    fn open(what: &'static str, path: &str) -> Result<Output, ProcError> {
        if path.is_empty() {
            return Ok(Output::none());
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
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&path)
        } else {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
        }
        .map_err(err)?;
        Ok(Output {
            f: Some(f),
            stalled: false,
        })
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(f) = self.f.as_mut() else {
            return Ok(buf.len());
        };
        loop {
            match f.write(buf) {
                Ok(n) => {
                    self.stalled = false;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.stalled {
                        return Ok(buf.len()); // dropped: nobody reads
                    }
                    let ms = i32::try_from(STALL.as_millis()).unwrap_or(i32::MAX);
                    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
                    match poll(
                        &mut fds,
                        PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE),
                    ) {
                        Ok(0) => {
                            log::warn!(
                                "output fd {}: nobody read it for {STALL:?}; dropped until \
                                 someone does",
                                f.as_raw_fd()
                            );
                            self.stalled = true;
                            return Ok(buf.len());
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
/// or CloseIO (`c` on `stop`: what is in the FIFO is passed on first),
/// then closes the process's stdin; `x` on `stop` (the process ended)
/// ends it at once.
fn pump_stdin(mut input: File, mut stop: File, control: &Control) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 32 << 10];
    let mut closing = false;
    loop {
        if !closing {
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
            let ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
            if stopped {
                let mut why = [0u8; 1];
                match stop.read(&mut why) {
                    Ok(1) if why[0] == b'c' => closing = true,
                    _ => return, // the process ended
                }
            } else if !ready {
                continue;
            }
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if closing {
                    // All that was written is passed on.
                    let _ = control.close_stdin();
                    return;
                }
            }
            Err(e) => {
                log::warn!("stdin: {e}");
                let _ = control.close_stdin();
                return;
            }
        }
    }
}
