//! The ssh command line banger runs to reach a guest: banger's own key, the
//! guest's host key pinned in the VM's known_hosts (no trust on first use),
//! nothing from the user's ssh config.

use std::ffi::OsString;

use banger_core::api::VmInfo;

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
    o("-i".into());
    o(vm.ssh.key.to_string_lossy().into_owned());
    for opt in [
        "IdentitiesOnly=yes".to_string(),
        format!("UserKnownHostsFile={}", vm.ssh.known_hosts.display()),
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
    o(if tty { "-t" } else { "-T" }.into());
    o(format!("{}@{}", vm.ssh.user, ip));
    if !cmd.is_empty() {
        o("--".into());
        o(remote_command(cmd));
    }
    a
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
