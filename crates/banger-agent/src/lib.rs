//! banger's guest agent protocol ([`proto`]) and the host's side of the
//! hybrid vsock ([`connect`]): the daemon, the CLI and the agent share both.

pub mod client;
pub mod deadline;
pub mod meta;
pub mod mux;
pub mod proto;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Connects to the Unix socket at `path`, which must be a socket itself,
/// not a symlink: a VM's sockets live in a directory its unprivileged VMM
/// owns, and a VMM that swapped one for a link to another VM's socket
/// (or the daemon's) must not turn the daemon's connection into a
/// connection there. The socket is pinned by an `O_PATH|O_NOFOLLOW`
/// descriptor, checked with `fstat`, and connected through that
/// descriptor's `/proc/self/fd` name, so nothing can be swapped between
/// the check and the connect.
pub fn connect_nofollow(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let pinned = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !pinned.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is not a socket (a link or a file in its place): not connecting",
                path.display()
            ),
        ));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
}

/// Opens a connection to guest port `port` through a hybrid vsock's Unix
/// socket (Firecracker's and vhost-device-vsock's convention: write
/// `CONNECT <port>\n`, read `OK <host port>\n`). `timeout` bounds the
/// whole handshake; the stream returned has no timeouts.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let s = connect_nofollow(uds)?;
    let mut d = deadline::Deadline::new(&s, timeout);
    d.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: nothing after the line may be consumed here.
    let mut line = Vec::with_capacity(16);
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match d.read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => {
                let text = String::from_utf8_lossy(&line);
                if text.starts_with("OK ") {
                    s.set_read_timeout(None)?;
                    s.set_write_timeout(None)?;
                    return Ok(s);
                }
                return Err(std::io::Error::other(format!(
                    "vsock {}: port {port} refused: {text}",
                    uds.display()
                )));
            }
            _ => line.push(b[0]),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        format!(
            "vsock {}: nothing listens on guest port {port} (the guest agent is not running)",
            uds.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connects_to_a_socket_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        connect_nofollow(&sock).expect("the socket itself");
        let link = d.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = connect_nofollow(&link).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(connect_nofollow(&file).is_err());
        assert!(connect_nofollow(&d.path().join("missing")).is_err());
    }
}
