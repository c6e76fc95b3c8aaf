//! Commands served by the guest agent over vsock (no SSH): `vm exec`,
//! `vm ps`, `vm attach`, `vm signal`, and `vm run`'s command (`vm cp` is
//! `cp.rs`).
//! The daemon hands this process a connection to the agent; everything
//! after that is the agent protocol (`banger_agent::proto`).

use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use banger_agent::client::{self, Control, Session};
use banger_agent::proto::{Call, ExecSpec, Msg, ProcInfo, ProtoError, Target, WinSize};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use crate::client::Client;

#[derive(Debug, Clone, Default, Args)]
pub struct ExecFlags {
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (a PTY; its size follows this one's).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the guest (default: the user's home).
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name or uid, optionally :group or :gid).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Run in the background and print its pid; `vm attach` joins it.
    #[arg(short, long)]
    pub detach: bool,
    /// A name for the process, usable instead of its pid.
    #[arg(long)]
    pub tag: Option<String>,
}

pub(crate) fn agent(client: &Client, name: &str) -> anyhow::Result<UnixStream> {
    Ok(client.agent(name)?)
}

fn spec(flags: &ExecFlags, command: &[String]) -> anyhow::Result<ExecSpec> {
    let mut env = Vec::new();
    for kv in &flags.env {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // docker's `-e NAME`: this environment's value, or nothing.
            None => match std::env::var_os(kv) {
                Some(v) => match v.into_string() {
                    Ok(v) => (kv.clone(), v),
                    Err(v) => bail!(
                        "-e {kv}: its value here is not UTF-8 ({}): pass it as -e {kv}=VALUE",
                        banger_core::text::escape_control(
                            &String::from_utf8_lossy(v.as_bytes()),
                            false
                        )
                    ),
                },
                None if !kv.is_empty() => continue,
                None => (kv.clone(), String::new()),
            },
        };
        if k.is_empty() {
            bail!("-e {kv:?}: want NAME=VALUE");
        }
        env.push((k, v));
    }
    if flags.tty {
        if let Ok(term) = std::env::var("TERM") {
            env.insert(0, ("TERM".into(), term));
        }
    }
    Ok(ExecSpec {
        argv: command.to_vec(),
        env,
        cwd: flags.workdir.clone(),
        user: flags.user.clone(),
        tty: flags.tty.then(terminal_size),
        stdin: flags.interactive,
        detach: flags.detach,
        tag: flags.tag.clone(),
        container: None,
    })
}

fn terminal_size() -> WinSize {
    let mut w = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points to a live local of that type.
    let r = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut w) };
    if r < 0 || w.ws_row == 0 {
        return WinSize { rows: 24, cols: 80 };
    }
    WinSize {
        rows: w.ws_row,
        cols: w.ws_col,
    }
}

/// The local terminal in raw mode for as long as this lives.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter(tty: bool) -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !tty || !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// How a session may be left without ending its process.
#[derive(Debug, Clone)]
pub struct Leave {
    /// Forward INT, TERM, HUP and QUIT to the process (`exec`, `run`);
    /// without, they detach (`attach` unless `--sig-proxy`).
    pub sig_proxy: bool,
    /// A key sequence on the forwarded input that detaches (`attach`).
    pub keys: Vec<u8>,
}

impl Leave {
    const OWN: Leave = Leave {
        sig_proxy: true,
        keys: Vec::new(),
    };
}

/// Forwards this process's signals to the guest's process: window
/// changes as resizes, the rest as signals (with a PTY, Ctrl-C is a byte
/// on stdin, as with ssh -t), or, when they are not to be forwarded, as
/// a detach. Blocked here and taken by one thread with sigwait: no
/// handler, no polling.
fn forward_signals(ctl: Control, tty: bool, proxy: bool, detached: Arc<AtomicBool>) {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGWINCH,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || loop {
        let Ok(sig) = set.wait() else { return };
        let r = match sig {
            Signal::SIGWINCH if tty => ctl.resize(terminal_size()),
            Signal::SIGWINCH => Ok(()),
            s if proxy => ctl.signal(s as i32),
            _ => {
                detached.store(true, Ordering::SeqCst);
                ctl.hang_up();
                return;
            }
        };
        if r.is_err() {
            return;
        }
    });
}

/// Copies `input` to the process's stdin until its end (then closes the
/// process's stdin), or until the detach sequence is typed (then hangs
/// up, leaving the process running).
fn feed(
    ctl: &Control,
    input: impl Read,
    keys: Vec<u8>,
    detached: &AtomicBool,
) -> Result<(), ProtoError> {
    if keys.is_empty() {
        return ctl.feed(input);
    }
    let mut scan = crate::detach::Scanner::new(keys);
    let stopped = ctl.feed_until(input, |b, out| {
        let (pass, done) = scan.scan(b);
        out.extend_from_slice(&pass);
        done
    })?;
    if stopped {
        detached.store(true, Ordering::SeqCst);
        ctl.hang_up();
        return Ok(());
    }
    if !scan.held().is_empty() {
        ctl.stdin(scan.held())?;
    }
    ctl.close_stdin()
}

/// The exit status of a command whose VM banger ended under it (its TTL
/// or idle timeout, an OOM kill, `vm kill`/`vm stop`/`vm rm -f` from
/// elsewhere): docker's status for a container killed under `docker run`.
pub const ENDED_WITH_VM: i32 = 137;

/// Why VM `name` is going or gone, if it is: its recorded reason (the
/// daemon records it before it ends a VM), or its state; `Err` if the
/// daemon could not be asked.
fn vm_went(client: &Client, name: &str) -> Result<Option<String>, String> {
    use banger_core::api::{ErrorKind, Request, Response};
    let got = client.call(
        Request::VmGet {
            name: name.to_string(),
        },
        &mut |_| {},
    );
    match got {
        Ok(Response::Vm(vm)) => Ok(match (vm.state, vm.last_error) {
            (banger_core::VmState::Running | banger_core::VmState::Paused, _) => None,
            (_, Some(e)) => Some(e),
            (st, None) => Some(format!("the VM is {st}")),
        }),
        Err(crate::client::ClientError::Api(e)) if e.kind == ErrorKind::NotFound => {
            Ok(Some("the VM was deleted".into()))
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn say_went(name: &str, why: &str) -> i32 {
    eprintln!(
        "vm {name}: the command ended with its VM: {}",
        banger_core::text::escape_control(why, false)
    );
    ENDED_WITH_VM
}

/// The agent's connection closed under a running command: if the VM went
/// (banger ended it, or its VMM died), says why in the VM's own words. A
/// VMM that died by itself is recorded by its reaper a moment after the
/// connection closes, so a VM still running is asked again for a few
/// seconds.
fn ended_under(client: &Client, name: &str, err: ProtoError) -> anyhow::Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match vm_went(client, name) {
            Ok(Some(why)) => return Ok(say_went(name, &why)),
            Ok(None) if Instant::now() >= deadline => {
                bail!("vm {name}: {err} (the VM still runs)")
            }
            Ok(None) => {}
            Err(asked) => bail!(
                "vm {name}: {err}; the daemon, asked why, did not answer: {}",
                banger_core::text::escape_control(&asked, false)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `command` in VM `name` through its agent, as `docker exec` does;
/// returns the exit status a shell would report.
pub fn exec(
    client: &Client,
    name: &str,
    flags: &ExecFlags,
    command: &[String],
) -> anyhow::Result<i32> {
    if command.is_empty() {
        bail!("vm exec {name}: no command (banger vm exec {name} -- CMD...)");
    }
    // docker's rule: a terminal's input needs a terminal here (its end
    // and its signals cannot be passed through a PTY from a pipe).
    if flags.tty && flags.interactive && !flags.detach && !std::io::stdin().is_terminal() {
        bail!(
            "vm exec {name} -it: the input is not a terminal: leave out -t \
             (-i alone passes a pipe or file through, and its end)"
        );
    }
    let spec = spec(flags, command)?;
    let conn = agent(client, name)?;
    let session = Session::start(conn, Call::Exec(spec)).map_err(|e| anyhow!("vm {name}: {e}"))?;
    if flags.detach {
        let pid = session
            .detached_done()
            .map_err(|e| anyhow!("vm {name}: {e}"))?;
        println!("{pid}");
        return Ok(0);
    }
    let tty = flags.tty;
    attach_session(client, name, session, flags.interactive, tty, Leave::OWN)
}

fn attach_session(
    client: &Client,
    name: &str,
    session: Session,
    stdin: bool,
    tty: bool,
    leave: Leave,
) -> anyhow::Result<i32> {
    let ctl = session.control();
    let pid = session.pid;
    let detached = Arc::new(AtomicBool::new(false));
    forward_signals(ctl.clone(), tty, leave.sig_proxy, detached.clone());
    let raw = RawMode::enter(tty && stdin);
    if stdin {
        let (c, d) = (ctl.clone(), detached.clone());
        std::thread::spawn(move || {
            let _ = feed(&c, std::io::stdin().lock(), leave.keys, &d);
        });
    }
    let r = {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        session.wait(&mut out, &mut err)
    };
    drop(raw);
    if detached.load(Ordering::SeqCst) {
        eprintln!(
            "detached from pid {pid} in vm {name}: it keeps running \
             (`banger vm attach {name} {pid}` joins it again)"
        );
        return Ok(0);
    }
    match r {
        // Killed by a signal: by the guest's shutdown, when banger stops
        // the VM (its TTL), or by someone in the guest.
        Ok(status) if status.signal.is_some() => Ok(match vm_went(client, name) {
            Ok(Some(why)) => say_went(name, &why),
            _ => status.shell_code(),
        }),
        Ok(status) => Ok(status.shell_code()),
        // This side's output went (`| head`): quietly, as a shell's
        // command killed by SIGPIPE; the guest's process is hung up on.
        Err(ProtoError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(128 + nix::libc::SIGPIPE)
        }
        Err(e @ (ProtoError::Closed | ProtoError::Io(_))) => ended_under(client, name, e),
        Err(e) => Err(anyhow!("vm {name}: {e}")),
    }
}

/// Starts `command` in the background in VM `name`; its pid.
pub fn start_detached(client: &Client, name: &str, command: &[String]) -> anyhow::Result<u32> {
    let flags = ExecFlags {
        detach: true,
        ..Default::default()
    };
    let spec = spec(&flags, command)?;
    let session = Session::start(agent(client, name)?, Call::Exec(spec))
        .map_err(|e| anyhow!("vm {name}: {e}"))?;
    session
        .detached_done()
        .map_err(|e| anyhow!("vm {name}: {e}"))
}

/// `vm run`'s command (or, with none and a terminal, a login shell).
pub fn run_in(client: &Client, name: &str, command: &[String]) -> anyhow::Result<i32> {
    let interactive_shell = command.is_empty();
    let tty = interactive_shell && std::io::stdin().is_terminal();
    let argv: Vec<String> = if interactive_shell {
        // A fixed script, no user input: the image's bash if it has one.
        [
            "/bin/sh",
            "-c",
            "command -v bash >/dev/null && exec bash -l; exec sh -l",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    } else {
        command.to_vec()
    };
    let flags = ExecFlags {
        interactive: true,
        tty,
        ..Default::default()
    };
    exec(client, name, &flags, &argv)
}

pub fn ps(client: &Client, name: &str) -> anyhow::Result<Vec<ProcInfo>> {
    match client::call(agent(client, name)?, Call::Ps).map_err(|e| anyhow!("vm {name}: {e}"))? {
        Msg::Processes { list } => Ok(list),
        other => bail!("vm {name}: unexpected agent answer {other:?}"),
    }
}

/// `vm attach`: joins a process without owning it. Signals to this
/// process detach (unless `sig_proxy`), and so does `detach_keys` typed
/// on the forwarded input.
pub fn attach(
    client: &Client,
    name: &str,
    target: &str,
    interactive: bool,
    sig_proxy: bool,
    detach_keys: &str,
) -> anyhow::Result<i32> {
    let keys = crate::detach::parse(detach_keys)?;
    let target: Target = target.parse().unwrap_or_else(|e| match e {});
    let tty = ps(client, name)?
        .iter()
        .any(|p| p.tty && matches_target(p, &target));
    let session = Session::start(agent(client, name)?, Call::Attach { target })
        .map_err(|e| anyhow!("vm {name}: {e}"))?;
    // As docker: the detach keys are looked for only in a terminal's
    // input (a pipe's bytes are the process's, whatever they are).
    let keys = if std::io::stdin().is_terminal() {
        keys
    } else {
        Vec::new()
    };
    let leave = Leave { sig_proxy, keys };
    attach_session(client, name, session, interactive, tty, leave)
}

fn matches_target(p: &ProcInfo, t: &Target) -> bool {
    match t {
        Target::Pid(pid) => p.pid == *pid,
        Target::Tag(tag) => p.tag.as_deref() == Some(tag),
    }
}

/// A signal by name (TERM, SIGTERM) or number.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n)
            .map(|s| s as i32)
            .map_err(|_| anyhow!("{n} is not a signal"));
    }
    let up = s.to_ascii_uppercase();
    let full = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    full.parse::<Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow!("{s:?} is not a signal name (TERM, KILL, INT, HUP, ...)"))
}

pub fn signal(client: &Client, name: &str, target: &str, sig: &str) -> anyhow::Result<()> {
    let signal = parse_signal(sig)?;
    let target: Target = target.parse().unwrap_or_else(|e| match e {});
    client::call(agent(client, name)?, Call::Signal { target, signal })
        .map_err(|e| anyhow!("vm {name}: {e}"))?;
    Ok(())
}

/// Waits (through the agent) until the guest's sshd listens: a VM is
/// ready when its agent is, which can be before sshd.
pub fn wait_ssh(client: &Client, name: &str) -> anyhow::Result<()> {
    // In slices, asking between them whether the guest has given up on
    // sshd (none in the image, or one that does not start): said at once,
    // not after a minute's wait for port 22.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // (Checked first too: each question is bounded, the whole wait
        // by the deadline.)
        if Instant::now() >= deadline {
            bail!("vm {name}: waiting for sshd: nothing listens on port 22 after 60 s");
        }
        if let Some(why) = no_sshd(client, name)? {
            bail!(
                "vm {name} has no sshd: {why}\n`vm ssh` needs one; `banger vm exec -it {name} -- sh` \
                 gives a shell without it, and `banger vm cp` copies files"
            );
        }
        let r = client::call_within(
            agent(client, name)?,
            Call::WaitListen {
                port: 22,
                timeout_ms: 1_000,
            },
            WHY_WAIT,
        );
        match r {
            Ok(_) => return Ok(()),
            Err(ProtoError::Remote(m)) if m.starts_with("nothing listens") => {
                if Instant::now() >= deadline {
                    bail!("vm {name}: waiting for sshd: {m}")
                }
            }
            Err(e) => bail!("vm {name}: waiting for sshd: {e}"),
        }
    }
}

/// What the guest's sshd wrapper (`/usr/lib/banger/sshd`) kept of why
/// there is no sshd, if it gave up: at most [`WHY_MAX`] bytes of it, read
/// within [`WHY_WAIT`] once the command started (the guest writes that
/// file; the start itself is bounded by the agent's 30 s).
fn no_sshd(client: &Client, name: &str) -> anyhow::Result<Option<String>> {
    let flags = ExecFlags::default();
    let argv: Vec<String> = [
        "/usr/lib/banger/busybox",
        "head",
        "-c",
        "4096",
        "/run/banger/sshd.err",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let conn = agent(client, name)?;
    let session = Session::start(conn, Call::Exec(spec(&flags, &argv)?))
        .map_err(|e| anyhow!("vm {name}: {e}"))?;
    let (mut out, mut err) = (Capped::default(), Capped::default());
    let status = session
        .wait_within(&mut out, &mut err, WHY_WAIT)
        .map_err(|e| anyhow!("vm {name}: reading why it has no sshd: {e}"))?;
    let text = String::from_utf8_lossy(&out.0);
    Ok((status.code == Some(0) && !text.trim().is_empty())
        .then(|| banger_core::text::escape_control(text.trim_end(), true)))
}

const WHY_MAX: usize = 4096;
const WHY_WAIT: Duration = Duration::from_secs(5);

/// A buffer that refuses what goes past [`WHY_MAX`].
#[derive(Default)]
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > WHY_MAX {
            return Err(std::io::Error::other(format!(
                "more than the {WHY_MAX} bytes asked for"
            )));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_env_name_passes_this_shells_value_or_nothing() {
        let flags = ExecFlags {
            env: vec![
                "PATH".into(),
                "BANGER_SURELY_UNSET_IN_TESTS".into(),
                "A=b".into(),
            ],
            ..Default::default()
        };
        let s = spec(&flags, &["true".to_string()]).unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(s.env, vec![("PATH".into(), path), ("A".into(), "b".into())]);
        let bad = ExecFlags {
            env: vec!["=x".into()],
            ..Default::default()
        };
        assert!(spec(&bad, &["true".to_string()]).is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}
