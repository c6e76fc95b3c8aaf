//! Running host tools (`ip`, `nft`, `mkfs.ext4`, `qemu-img`, ...) with their
//! exit status always checked and their stderr kept for the error. Arguments
//! are passed as a vector: no shell is ever involved.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CmdError {
    #[error("cannot run {program}: {source} (is it installed? see `banger doctor`)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {secs}s and was killed")]
    TimedOut { command: String, secs: u64 },
}

/// How long a tool may run unless its caller says otherwise: a hung tool
/// fails its request instead of holding its locks forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

fn render(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args...` with [`DEFAULT_TIMEOUT`], returns stdout;
/// non-zero exit is an error that carries the command line and stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with(program, args, None, DEFAULT_TIMEOUT)
}

/// Like [`run`], feeding `input` on stdin (used for `nft -f -`).
pub fn run_with_input<I, S>(program: &str, args: I, input: Option<&str>) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with(program, args, input, DEFAULT_TIMEOUT)
}

/// Like [`run_with_input`], killed (with its process group) after `timeout`.
pub fn run_with<I, S>(
    program: &str,
    args: I,
    input: Option<&str>,
    timeout: Duration,
) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_both(program, args, input, timeout).map(|(out, _)| out)
}

/// Like [`run_with`], returning stderr as well (for tools such as debugfs
/// that report failures there with a zero exit status).
pub fn run_both<I, S>(
    program: &str,
    args: I,
    input: Option<&str>,
    timeout: Duration,
) -> Result<(String, String), CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let argv: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut cmd = Command::new(program);
    cmd.args(&argv);
    let (status, stdout, stderr) = run_prepared(cmd, program, input, timeout)?;
    if !status.success() {
        return Err(CmdError::Failed {
            command: render(program, &argv),
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok((stdout, stderr))
}

/// Runs `cmd` as it was set up (a confinement applied, say) in a process
/// group of its own, killed with the group after `timeout`; its status,
/// whatever it is, and what it wrote. `program` names it in errors.
pub fn run_prepared(
    mut cmd: Command,
    program: &str,
    input: Option<&str>,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String), CmdError> {
    let argv: Vec<OsString> = cmd.get_args().map(OsStr::to_os_string).collect();
    let argv: Vec<&OsStr> = argv.iter().map(OsString::as_os_str).collect();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawn_err = |source| CmdError::Spawn {
        program: program.to_string(),
        source,
    };
    // Its own process group, so that a timeout kills what it started too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    // Both pipes drained on threads of their own (a full pipe would block
    // the tool), the exit waited for with a deadline.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = match wait_timeout::ChildExt::wait_timeout(&mut child, timeout) {
        Ok(Some(st)) => st,
        Ok(None) => {
            let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Err(CmdError::TimedOut {
                command: render(program, &argv),
                secs: timeout.as_secs(),
            });
        }
        Err(e) => return Err(spawn_err(e)),
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok((
        status,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    ))
}

/// Whether `program` is found on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_status_and_stderr() {
        assert_eq!(run("echo", ["hi"]).unwrap(), "hi\n");
        let e = run("ls", ["/definitely/not/here"]).unwrap_err().to_string();
        assert!(e.contains("`ls /definitely/not/here` failed"), "{e}");
        assert!(e.contains("No such file"), "{e}");
        let e = run("banger-no-such-tool", ["x"]).unwrap_err().to_string();
        assert!(e.contains("cannot run banger-no-such-tool"), "{e}");
        assert_eq!(
            run_with_input("cat", Vec::<&str>::new(), Some("abc")).unwrap(),
            "abc"
        );
        assert!(which("sh").is_some());
        assert!(which("banger-no-such-tool").is_none());
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_timeout() {
        let t = std::time::Instant::now();
        let e = run_with("sleep", ["30"], None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, CmdError::TimedOut { .. }), "{e}");
        assert!(e.to_string().contains("`sleep 30` did not finish"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "killed, not waited for"
        );
    }
}
