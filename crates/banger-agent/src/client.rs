//! The host's side of agent calls, over any connection to the agent (the
//! daemon's proxy for the CLI, the vsock socket for the daemon, a Unix
//! socket in tests).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::deadline::Deadline;

use crate::proto::{
    read_frame, read_msg, write_frame, write_msg, write_request, Call, ExitStatus, Frame,
    FrameReader, FrameWriter, Kind, Msg, ProtoError, WinSize, CHUNK,
};

/// A one-shot call: the request and its one answer.
pub fn call(mut c: UnixStream, call: Call) -> Result<Msg, ProtoError> {
    write_request(&mut c, call)?;
    read_msg(&mut c)
}

/// A one-shot call whose whole exchange ends within `within`, however the
/// agent trickles its answer (the daemon's calls to a guest).
pub fn call_within(c: UnixStream, call: Call, within: Duration) -> Result<Msg, ProtoError> {
    let mut d = Deadline::new(&c, within);
    write_request(&mut d, call)?;
    read_msg(&mut d)
}

/// What a session's user sends while the process runs; cheap to clone and
/// usable from any thread (a signal handler's thread, a stdin pump).
#[derive(Clone)]
pub struct Control(Arc<Mutex<UnixStream>>);

impl Control {
    fn send(&self, m: &Msg) -> Result<(), ProtoError> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_msg(&mut *w, m)
    }

    pub fn signal(&self, signal: i32) -> Result<(), ProtoError> {
        self.send(&Msg::Signal { signal })
    }

    pub fn resize(&self, ws: WinSize) -> Result<(), ProtoError> {
        self.send(&Msg::Resize(ws))
    }

    pub fn close_stdin(&self) -> Result<(), ProtoError> {
        self.send(&Msg::CloseStdin)
    }

    pub fn stdin(&self, data: &[u8]) -> Result<(), ProtoError> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, Kind::Stdin, data)
    }

    /// Copies `input` to the process's stdin until its end, then closes
    /// the process's stdin (what `docker exec -i` does at EOF).
    pub fn feed(&self, input: impl Read) -> Result<(), ProtoError> {
        self.feed_until(input, |b, out| {
            out.extend_from_slice(b);
            false
        })?;
        self.close_stdin()
    }

    /// Copies `input` to the process's stdin through `pass`, which puts
    /// what to send of each chunk in its second argument and says whether
    /// to stop there; true if it did, false at the input's end (stdin is
    /// left open either way).
    pub fn feed_until(
        &self,
        mut input: impl Read,
        mut pass: impl FnMut(&[u8], &mut Vec<u8>) -> bool,
    ) -> Result<bool, ProtoError> {
        let mut buf = vec![0u8; CHUNK];
        let mut out = Vec::with_capacity(CHUNK);
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            out.clear();
            let stop = pass(&buf[..n], &mut out);
            if !out.is_empty() {
                self.stdin(&out)?;
            }
            if stop {
                return Ok(true);
            }
        }
    }

    /// Leaves the call: the connection is shut both ways (the session's
    /// reader sees its end). A detached process carries on in the guest.
    pub fn hang_up(&self) {
        let w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(Shutdown::Both);
    }

    /// Ends an `Input` call.
    pub fn done(&self) -> Result<(), ProtoError> {
        self.send(&Msg::Done)
    }
}

/// How long an agent may take to say a process started (a guest under
/// heavy load answers in well under a second).
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// A process started (or attached to) through the agent.
pub struct Session {
    r: UnixStream,
    control: Control,
    pub pid: u32,
}

impl Session {
    /// Sends `call` (an `Exec` or an `Attach`) and waits for the process's
    /// pid.
    pub fn start(c: UnixStream, call: Call) -> Result<Session, ProtoError> {
        // The request and the agent's word that the process started are
        // bounded; what the process then does takes as long as it takes.
        let pid = {
            let mut d = Deadline::new(&c, START_WITHIN);
            write_request(&mut d, call)?;
            read_msg(&mut d)?
        };
        c.set_read_timeout(None)?;
        c.set_write_timeout(None)?;
        let pid = match pid {
            Msg::Started { pid } => pid,
            other => return Err(ProtoError::Unexpected(format!("{other:?}"))),
        };
        let w = c.try_clone()?;
        Ok(Session {
            r: c,
            control: Control(Arc::new(Mutex::new(w))),
            pid,
        })
    }

    /// For a detached exec (which answers `Done` instead of output):
    /// reads that `Done` (within [`START_WITHIN`]) and returns the pid.
    pub fn detached_done(mut self) -> Result<u32, ProtoError> {
        self.r.set_read_timeout(Some(START_WITHIN))?;
        match read_msg(&mut self.r)? {
            Msg::Done => Ok(self.pid),
            other => Err(ProtoError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Writes the process's output until it exits; returns its status.
    pub fn wait(self, out: &mut dyn Write, err: &mut dyn Write) -> Result<ExitStatus, ProtoError> {
        let Session { mut r, .. } = self;
        let status = wait_on(&mut r, out, err);
        let _ = r.shutdown(Shutdown::Both);
        status
    }

    /// [`Session::wait`], all of it within `within` (a short command the
    /// host asks, whose guest must not hold the caller).
    pub fn wait_within(
        self,
        out: &mut dyn Write,
        err: &mut dyn Write,
        within: Duration,
    ) -> Result<ExitStatus, ProtoError> {
        let Session { r, .. } = self;
        let status = wait_on(&mut Deadline::new(&r, within), out, err);
        let _ = r.shutdown(Shutdown::Both);
        status
    }
}

/// The process's output, written out, until its exit status.
fn wait_on(
    r: &mut impl Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<ExitStatus, ProtoError> {
    loop {
        match read_frame(r)? {
            Some(Frame::Bytes(Kind::Stdout, b)) => {
                out.write_all(&b)
                    .and_then(|()| out.flush())
                    .map_err(ProtoError::Output)?;
            }
            Some(Frame::Bytes(Kind::Stderr, b)) => {
                err.write_all(&b)
                    .and_then(|()| err.flush())
                    .map_err(ProtoError::Output)?;
            }
            Some(Frame::Msg(Msg::Exited(s))) => return Ok(s),
            Some(Frame::Msg(Msg::Error { message })) => return Err(ProtoError::Remote(message)),
            Some(other) => return Err(ProtoError::Unexpected(format!("{other:?}"))),
            None => return Err(ProtoError::Closed),
        }
    }
}

/// Writes `path`'s tar stream (from the guest) to `out`.
pub fn get_tar(mut c: UnixStream, path: &str, out: &mut dyn Write) -> Result<(), ProtoError> {
    write_request(&mut c, Call::GetTar { path: path.into() })?;
    let mut r = FrameReader::new(c);
    // A failed write is this side's output, not the connection.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n]).map_err(ProtoError::Output)?;
    }
}

/// Sends a tar stream, written by `fill`, to be unpacked in the guest's
/// directory `dir`.
pub fn put_tar(
    mut c: UnixStream,
    dir: &str,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), ProtoError> {
    write_request(&mut c, Call::PutTar { dir: dir.into() })?;
    let mut w = FrameWriter::new(c.try_clone()?, Kind::Data);
    let filled = fill(&mut w);
    // Whatever happened, the stream is ended, so the agent answers (with
    // its own error first, if it had one: a missing directory).
    let mut c2 = w.finish()?;
    write_msg(&mut c2, &Msg::Done)?;
    let answer = read_msg(&mut c);
    filled?;
    match answer? {
        Msg::Done => Ok(()),
        other => Err(ProtoError::Unexpected(format!("{other:?}"))),
    }
}
