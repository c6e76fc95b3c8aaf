//! Whether the Debian mirror an image build fetches from answers, asked
//! before the build starts: offline, mmdebstrap (through apt) retries for
//! minutes before it fails; this says so in seconds.
//!
//! The build runs mmdebstrap with no mirror of its own, so it fetches
//! from mmdebstrap's default, `http://deb.debian.org/debian` (its updates
//! and security suites are on the same host). That host taking a TCP
//! connection is enough. With a proxy configured (apt's
//! `Acquire::*::Proxy`, or `http_proxy`) nothing is asked: the way out is
//! not this host's to judge.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long the whole check may take (name lookups included).
pub const CHECK_WAIT: Duration = Duration::from_secs(10);
/// How long one connection may take.
const CONNECT_WAIT: Duration = Duration::from_secs(4);

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error(
        "the Debian mirror the build fetches from does not answer ({tried}): building an \
         image needs it. Check the network (or set apt's proxy), or import an image instead: \
         `banger image import NAME ROOTFS.tar`"
    )]
    Unreachable { tried: String },
}

/// Whether apt (or the environment) sends this host's fetches through a
/// proxy.
fn proxied(apt_conf: &[String]) -> bool {
    let env = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    env || apt_proxy(apt_conf)
}

/// Whether apt's configuration names a proxy.
fn apt_proxy(apt_conf: &[String]) -> bool {
    apt_conf.iter().any(|t| {
        t.lines().any(|l| {
            let l = l.trim().to_ascii_lowercase();
            !l.starts_with("//") && !l.starts_with('#') && l.contains("::proxy")
        })
    })
}

/// What mmdebstrap fetches from when it is given no mirror.
pub const DEFAULT_MIRROR: (&str, u16) = ("deb.debian.org", 80);

/// The texts of apt's configuration files (`/etc/apt/apt.conf` and
/// `apt.conf.d/`).
fn apt_conf() -> Vec<String> {
    let dir = Path::new("/etc/apt");
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string(dir.join("apt.conf")) {
        out.push(t);
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("apt.conf.d")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path()) {
                out.push(t);
            }
        }
    }
    out
}

/// Asks the mirror the build fetches from (see the module's text); at
/// most [`CHECK_WAIT`].
pub fn check() -> Result<(), MirrorError> {
    if proxied(&apt_conf()) {
        return Ok(());
    }
    let (host, port) = DEFAULT_MIRROR;
    check_hosts(vec![(host.to_string(), port)], CHECK_WAIT)
}

/// One of `hosts` takes a connection within `wait`, or an error naming
/// what each said.
pub fn check_hosts(hosts: Vec<(String, u16)>, wait: Duration) -> Result<(), MirrorError> {
    if hosts.is_empty() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel();
    let count = hosts.len();
    for (host, port) in hosts {
        let tx = tx.clone();
        // Name lookups have no timeout of their own: each on a thread,
        // waited for no longer than the deadline (a late one is dropped).
        std::thread::spawn(move || {
            let said = match (host.as_str(), port).to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = String::from("no address");
                    let mut ok = false;
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, CONNECT_WAIT) {
                            Ok(_) => {
                                ok = true;
                                break;
                            }
                            Err(e) => last = e.to_string(),
                        }
                    }
                    if ok {
                        Ok(())
                    } else {
                        Err(last)
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send((format!("{host}:{port}"), said));
        });
    }
    drop(tx);
    let deadline = Instant::now() + wait;
    let mut tried = Vec::new();
    while tried.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Ok(()))) => return Ok(()),
            Ok((h, Err(e))) => tried.push(format!("{h}: {e}")),
            Err(_) => {
                tried.push(format!("no answer within {} s", wait.as_secs()));
                break;
            }
        }
    }
    Err(MirrorError::Unreachable {
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apt_proxy_is_seen() {
        assert!(apt_proxy(&[
            "Acquire::http::Proxy \"http://cache:3142\";".into()
        ]));
        assert!(!apt_proxy(&["// Acquire::http::Proxy \"x\";".into()]));
        assert!(!apt_proxy(
            &["Acquire::Check-Valid-Until \"false\";".into()]
        ));
    }

    #[test]
    fn a_mirror_that_answers_passes_and_none_answering_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        check_hosts(vec![("127.0.0.1".into(), port)], CHECK_WAIT).unwrap();
        drop(l);
        // The port is closed now: refused, at once, and said.
        let e = check_hosts(vec![("127.0.0.1".into(), port)], CHECK_WAIT)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}: ")), "{e}");
        assert!(e.contains("banger image import"), "{e}");
        assert!(check_hosts(Vec::new(), CHECK_WAIT).is_ok());
    }
}
