//! Running host tools (`ip`, `nft`, `mkfs.ext4`, `qemu-img`, ...) with their
//! exit status always checked and their stderr kept for the error. Arguments
//! are passed as a vector: no shell is ever involved.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

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
}

fn render(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args...`, returns stdout; non-zero exit is an error that
/// carries the command line and stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_input(program, args, None)
}

/// Like [`run`], feeding `input` on stdin (used for `nft -f -`).
pub fn run_with_input<I, S>(program: &str, args: I, input: Option<&str>) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let argv: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut cmd = Command::new(program);
    cmd.args(&argv)
        .stdin(if input.is_some() {
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
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            command: render(program, &argv),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
}
