//! The guest as a whole: stats for the daemon's poller, the clock, the
//! guest's identity (for restored clones), and waiting for a listener.

use std::time::{Duration, Instant};

use banger_agent::proto::{GuestStats, Identity};

/// The guest's CPU, memory and load, from /proc.
pub fn stats() -> Result<GuestStats, String> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
    let stat = read("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    let mem = read("/proc/meminfo")?;
    let kib = |key: &str| {
        mem.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let load: Vec<f64> = read("/proc/loadavg")?
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    let uptime = read("/proc/uptime")?
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // The root filesystem: its size and its free blocks (root's reserve
    // counted free, as envd's numbers do).
    let disk = nix::sys::statvfs::statvfs("/").ok().map(|v| {
        let frag = v.fragment_size();
        (
            v.blocks().saturating_mul(frag),
            v.blocks_free().saturating_mul(frag),
        )
    });
    let processes = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u32
        })
        .unwrap_or(0);
    Ok(GuestStats {
        cpu_busy: total.saturating_sub(idle),
        cpu_total: total,
        mem_total_kib: kib("MemTotal:"),
        mem_available_kib: kib("MemAvailable:"),
        load: [
            load.first().copied().unwrap_or(0.0),
            load.get(1).copied().unwrap_or(0.0),
            load.get(2).copied().unwrap_or(0.0),
        ],
        uptime_secs: uptime,
        processes,
        mem_cached_kib: kib("Cached:"),
        disk_total_bytes: disk.map_or(0, |d| d.0),
        disk_free_bytes: disk.map_or(0, |d| d.1),
    })
}

pub fn set_clock(unix_ns: u64) -> Result<(), String> {
    use nix::sys::time::TimeSpec;
    use nix::time::{clock_settime, ClockId};
    let ts = TimeSpec::new(
        (unix_ns / 1_000_000_000) as i64,
        (unix_ns % 1_000_000_000) as i64,
    );
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| format!("set the clock: {e}"))
}

/// A DNS label, as the daemon validates VM names (the host is trusted, but
/// a name goes into files and a command line here).
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
}

/// Gives the guest the identity a restored clone needs: everything is
/// checked before anything changes, then applied in an order that keeps
/// the guest reachable by the agent (vsock needs no network).
pub fn set_identity(id: &Identity) -> Result<(), String> {
    check_identity(id)?;
    // First what can fail for reasons of the guest's own (its kernel's
    // ioctls), so that a refusal leaves the rest as it was.
    if let Some(bytes) = &id.entropy {
        add_entropy(bytes)?;
    }
    if let Some(h) = &id.hostname {
        nix::unistd::sethostname(h).map_err(|e| format!("sethostname {h}: {e}"))?;
        write("/etc/hostname", &format!("{h}\n"), 0o644)?;
        write(
            "/etc/hosts",
            &format!("127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n"),
            0o644,
        )?;
    }
    let mac = match &id.mac {
        Some(m) => Some(crate::netcfg::parse_mac(m).ok_or_else(|| format!("mac {m:?}"))?),
        None => None,
    };
    let addr = match &id.address {
        Some((cidr, gw)) => {
            let bad = || format!("address {cidr:?} via {gw:?}");
            let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
            Some((
                ip.parse().map_err(|_| bad())?,
                prefix.parse().map_err(|_| bad())?,
                gw.parse().map_err(|_| bad())?,
            ))
        }
        None => None,
    };
    crate::netcfg::set("eth0", mac, addr)?;
    if let Some(ns) = &id.nameservers {
        let text: String = ns.iter().map(|n| format!("nameserver {n}\n")).collect();
        write("/etc/resolv.conf", &text, 0o644)?;
    }
    if let Some(keys) = &id.authorized_keys {
        std::fs::create_dir_all("/root/.ssh").map_err(|e| format!("mkdir /root/.ssh: {e}"))?;
        write("/root/.ssh/authorized_keys", keys, 0o600)?;
    }
    if let Some(m) = &id.machine_id {
        write("/etc/machine-id", &format!("{m}\n"), 0o444)?;
    }
    if let Some(b) = &id.boot_id {
        write(crate::BOOT_ID_FILE, &format!("{b}\n"), 0o644)?;
    }
    if let Some((key, public)) = &id.host_key {
        // The sshd wrapper starts it again once it stops (even one that
        // started in between, from a half-written pair).
        write(SSHD_RESTART, "", 0o644)?;
        write("/etc/ssh/ssh_host_ed25519_key", key, 0o600)?;
        write("/etc/ssh/ssh_host_ed25519_key.pub", public, 0o644)?;
        restart_sshd();
    }
    Ok(())
}

/// Every field as the daemon made it (the host is trusted, but each one
/// goes into a file, a command line or an ioctl here).
fn check_identity(id: &Identity) -> Result<(), String> {
    if let Some(h) = &id.hostname {
        if !valid_hostname(h) {
            return Err(format!("hostname {h:?} is not a DNS label"));
        }
    }
    if let Some(mac) = &id.mac {
        let parts: Vec<&str> = mac.split(':').collect();
        let hex = parts.len() == 6
            && parts.iter().all(|p| {
                p.len() == 2
                    && p.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
        // Unicast (bit 0 of the first octet clear).
        let unicast = hex && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0);
        if !unicast {
            return Err(format!(
                "mac {mac:?} is not a unicast xx:xx:xx:xx:xx:xx address"
            ));
        }
    }
    if let Some((cidr, gw)) = &id.address {
        let (ip, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("address {cidr:?} is not ADDRESS/PREFIX"))?;
        ip.parse::<std::net::Ipv4Addr>()
            .map_err(|_| format!("address {ip:?} is not IPv4"))?;
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix {prefix:?} is not 0-32"))?;
        gw.parse::<std::net::Ipv4Addr>()
            .map_err(|_| format!("gateway {gw:?} is not IPv4"))?;
    }
    if let Some(ns) = &id.nameservers {
        if ns.len() > 3 {
            return Err(format!("{} nameservers: resolv.conf takes 3", ns.len()));
        }
        for n in ns {
            n.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("nameserver {n:?} is not IPv4"))?;
        }
    }
    if let Some(keys) = &id.authorized_keys {
        let line_ok = |l: &str| {
            l.is_empty()
                || (l.starts_with("ssh-") || l.starts_with("ecdsa-"))
                    && l.chars().all(|c| c == ' ' || c.is_ascii_graphic())
        };
        if keys.len() > banger_agent::proto::MAX_AUTHORIZED_KEYS || !keys.lines().all(line_ok) {
            return Err("authorized_keys: only public key lines, at most 16 KiB".into());
        }
    }
    if let Some(m) = &id.machine_id {
        if m.len() != 32
            || !m
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("machine id {m:?} is not 32 lowercase hex digits"));
        }
    }
    if let Some(b) = &id.boot_id {
        if b.is_empty() || b.len() > 64 || !b.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("boot id {b:?} is not 1 to 64 hex digits"));
        }
    }
    if let Some(e) = &id.entropy {
        if !(32..=512).contains(&e.len()) {
            return Err(format!("{} bytes of entropy: give 32 to 512", e.len()));
        }
    }
    if let Some((key, public)) = &id.host_key {
        if !key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
            || !public.starts_with("ssh-ed25519 ")
            || key.len() > 4096
            || public.len() > 1024
        {
            return Err("host key: an OpenSSH ed25519 key pair".into());
        }
    }
    Ok(())
}

/// Credits `bytes` to the kernel's input pool (`RNDADDENTROPY`) and
/// reseeds its CRNG from it at once (`RNDRESEEDCRNG`), so that what the
/// guest draws next differs from every other clone's.
fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
    const RNDADDENTROPY: u64 = 0x4008_5203;
    const RNDRESEEDCRNG: u64 = 0x5207;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Whole u32 words for the kernel's copy.
    while info.len() % 4 != 0 {
        info.push(0);
    }
    // SAFETY: `info` is a rand_pool_info of `bytes.len()` bytes of data
    // that outlives the call; the second ioctl takes no argument.
    unsafe {
        if nix::libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) != 0 {
            return Err(format!(
                "RNDADDENTROPY: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Before Linux 4.17 there is no RNDRESEEDCRNG: the CRNG takes the
        // credited entropy at its next reseed.
        if nix::libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(nix::libc::EINVAL) | Some(nix::libc::ENOTTY)
            ) {
                return Err(format!("RNDRESEEDCRNG: {e}"));
            }
        }
    }
    Ok(())
}

fn write(path: &str, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = format!("{path}.banger-tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("write {path}: {e}"))
}

/// The listening sshd (a child of init) is told to go; init starts it
/// again with the new key. Sessions already open stay.
/// Stops the guest's listening sshd: the `/usr/sbin/sshd` that banger's
/// sshd wrapper runs (sessions are that one's children, or init's once an
/// earlier restart orphaned them, and go on), which the wrapper starts
/// again with the new host key ([`SSHD_RESTART`]). By executable and
/// parent, not by name: the wrapper script is called `sshd` too. With no
/// such sshd (not started yet: it will read the new key), the marker goes.
fn restart_sshd() {
    const SSHD: &str = "/usr/sbin/sshd";
    const WRAPPER: &[u8] = b"/usr/lib/banger/sshd";
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut stopped = false;
    for e in dir.filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.as_os_str() == SSHD) {
            continue;
        }
        // "pid (comm) state ppid ...": the comm may hold ") ".
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                let (_, rest) = st.rsplit_once(") ")?;
                rest.split_whitespace().nth(1)?.parse::<i32>().ok()
            });
        let by_wrapper = ppid.is_some_and(|pp| {
            std::fs::read(format!("/proc/{pp}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == WRAPPER))
        });
        if by_wrapper {
            stopped |= nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
            .is_ok();
        }
    }
    if !stopped {
        let _ = std::fs::remove_file(SSHD_RESTART);
    }
}

/// Left for the guest's sshd wrapper: the sshd it runs is stopped on
/// purpose, to be started again.
const SSHD_RESTART: &str = "/run/banger/sshd.restart";

/// Whether something listens on TCP `port` (IPv4 or IPv6), from
/// /proc/net/tcp{,6}: state 0A is LISTEN.
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|p| {
        std::fs::read_to_string(p).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut f = l.split_whitespace();
                let local = f.nth(1).unwrap_or_default();
                let state = f.nth(1).unwrap_or_default();
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

pub fn wait_listen(port: u16, timeout_ms: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.min(600_000));
    // The kernel has no event for a new listener; a 10 ms look at a
    // /proc file costs the guest nothing measurable.
    while !listening(port) {
        if Instant::now() >= deadline {
            return Err(format!(
                "nothing listens on port {port} after {timeout_ms} ms"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostnames_are_labels() {
        assert!(super::valid_hostname("web-1"));
        assert!(!super::valid_hostname("a;reboot"));
        assert!(!super::valid_hostname("-x"));
        assert!(!super::valid_hostname(""));
    }

    #[test]
    fn stats_read_proc() {
        let s = super::stats().unwrap();
        assert!(s.cpu_total >= s.cpu_busy && s.cpu_total > 0);
        assert!(s.mem_total_kib > 0 && s.processes > 0);
    }
}
