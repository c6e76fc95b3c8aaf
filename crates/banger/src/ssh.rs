//! The ssh command line banger runs to reach a guest: banger's own key, the
//! guest's host key pinned in the VM's known_hosts (no trust on first use),
//! nothing from the user's ssh config.

use std::ffi::OsString;
use std::path::PathBuf;

use banger_core::api::VmInfo;

/// The key and known_hosts this user's ssh can read: root's own (the
/// VM's pinned key), or, for a member of the socket's group, the group's
/// own key and the known_hosts of every VM (`bangerd`'s perms.rs).
fn key_files(key: &std::path::Path, vm_known: &std::path::Path) -> (PathBuf, PathBuf) {
    if nix::unistd::geteuid().is_root() {
        (key.to_path_buf(), vm_known.to_path_buf())
    } else {
        (
            key.with_file_name("id_ed25519.group"),
            key.with_file_name("known_hosts"),
        )
    }
}

/// Quotes `cmd` for the remote shell, which re-splits what ssh sends.
pub fn remote_command(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            shlex::try_quote(a)
                .map(|q| q.into_owned())
                .unwrap_or_else(|_| format!("'{}'", a.replace('\'', "'\\''").replace('\0', "")))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn args(vm: &VmInfo, ip: &str, cmd: &[String], tty: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut o = |s: String| a.push(OsString::from(s));
    o("-F".into());
    o("/dev/null".into());
    let (key, known) = key_files(&vm.ssh.key, &vm.ssh.known_hosts);
    o("-i".into());
    o(key.to_string_lossy().into_owned());
    for opt in [
        "IdentitiesOnly=yes".to_string(),
        format!("UserKnownHostsFile={}", known.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        "StrictHostKeyChecking=yes".into(),
        format!("HostKeyAlias={}", vm.ssh.host_key_alias),
        // The guest's host keys are banger's to manage, not ssh's.
        "UpdateHostKeys=no".into(),
        // X25519 key exchange: in a guest under emulation, the default
        // post-quantum hybrid (sntrup761x25519) costs about 300 ms more per
        // connection (measured; docs/BENCHMARKS.md). The link is a tap to a
        // VM on this host: its traffic never leaves the machine.
        "KexAlgorithms=curve25519-sha256,curve25519-sha256@libssh.org".into(),
        "LogLevel=ERROR".into(),
        "ConnectTimeout=20".into(),
        "ServerAliveInterval=15".into(),
    ] {
        o("-o".into());
        o(opt);
    }
    // -tt: a terminal even when stdin is not one (`vm ssh -t` asked).
    o(if tty { "-tt" } else { "-T" }.into());
    o(format!("{}@{}", vm.ssh.user, ip));
    if !cmd.is_empty() {
        o("--".into());
        o(remote_command(cmd));
    }
    a
}

/// The `Host *.<suffix>` block `banger ssh-config` prints: banger's key,
/// its known_hosts of every VM's pinned key, and this binary as the proxy.
pub fn config_snippet(layout: &banger_core::Layout, suffix: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let q = |p: &std::path::Path| -> anyhow::Result<String> {
        let s = p.to_string_lossy();
        if s.chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '%' || c.is_control())
        {
            anyhow::bail!("{s:?} cannot go into an ssh config (white space, quotes or %)");
        }
        Ok(s.into_owned())
    };
    Ok(format!(
        "# banger's VMs as <name>.{suffix}: `Include` this file from ~/.ssh/config\n\
         Host *.{suffix}\n\
         \tUser root\n\
         \tIdentityFile {key}\n\
         \tIdentitiesOnly yes\n\
         \tUserKnownHostsFile {known}\n\
         \tGlobalKnownHostsFile /dev/null\n\
         \tStrictHostKeyChecking yes\n\
         \tUpdateHostKeys no\n\
         \tKexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org\n\
         \tProxyCommand {exe} --state-dir {state} --runtime-dir {run} internal ssh-proxy %h\n",
        key = q(&key_files(&layout.client_key(), &layout.client_key()).0)?,
        known = q(&layout.ssh_dir().join("known_hosts"))?,
        exe = q(&exe)?,
        state = q(&layout.state_dir)?,
        run = q(&layout.runtime_dir)?,
    ))
}

/// Pipes stdin/stdout to port 22 of the VM named by `host`.
pub fn proxy(client: &crate::client::Client, host: &str) -> anyhow::Result<i32> {
    use std::io::{Read, Write};
    let name = host.split('.').next().unwrap_or(host).to_string();
    let r = client.call(
        banger_core::api::Request::VmGet { name },
        &mut crate::progress,
    )?;
    let banger_core::api::Response::Vm(vm) = r else {
        anyhow::bail!("unexpected answer from bangerd");
    };
    let ip: std::net::Ipv4Addr = vm
        .guest_ip
        .as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("vm {:?} has no address", vm.name))?;
    crate::guest::wait_ssh(client, &vm.name)?;
    let sock = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from((ip, 22)),
        std::time::Duration::from_secs(20),
    )?;
    let mut up = sock.try_clone()?;
    let mut down = sock;
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 32 * 1024];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = [0u8; 32 * 1024];
    let mut stdout = std::io::stdout().lock();
    while let Ok(n) = down.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
            break;
        }
    }
    drop(t);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_remote_shell() {
        let c = |v: &[&str]| remote_command(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(c(&["cat", "/etc/hostname"]), "cat /etc/hostname");
        assert_eq!(
            c(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
            "sh -c 'echo out; echo err >&2; exit 7'"
        );
        assert_eq!(c(&["echo", "it's"]), r#"echo "it's""#);
        assert_eq!(c(&["printf", ""]), "printf ''");
    }
}
