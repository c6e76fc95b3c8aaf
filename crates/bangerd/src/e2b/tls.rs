//! HTTPS on the API's own port, for E2B's SDKs addressed by `E2B_DOMAIN`
//! alone: they reach `https://api.<domain>` and each sandbox's envd at
//! `https://49983-<sandbox ID>.<domain>`. A connection whose first byte is
//! a TLS handshake's is terminated here (rustls) and its plaintext relayed
//! to the same port as any other client's, so one HTTP server serves both.
//!
//! The certificates are for `api.<suffix>`, `localhost` and the listen
//! address, and for each name under the suffix a client asks for (banger's
//! DNS answers `api.<suffix>` and `<port>-<sandbox>.<suffix>` with the
//! API's address for the host), signed by banger's own CA: made once, its key root's
//! (`<state>/api-tls/ca.key`, 0600), its certificate for clients to trust
//! (`<state>/api-ca.pem`, 0644: `SSL_CERT_FILE` for Python,
//! `NODE_EXTRA_CA_CERTS` for Node.js, or the system's store). The servers'
//! own keys live in memory only, new ones at each serve.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::{DaemonError, Result};

/// The first byte of a TLS record carrying a handshake.
pub const HANDSHAKE: u8 = 0x16;
/// How long a client may take over its handshake, and a relayed
/// connection may stay quiet both ways.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_secs(180);

/// The CA's certificate clients trust, under the state dir.
pub const CA_CERT: &str = "api-ca.pem";

/// What serves HTTPS: the server's configuration.
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
    pub relays: Relays,
}

fn invalid(what: &str, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Invalid(format!("the API's TLS: {what}: {e}"))
}

/// The CA's name, key use and name constraints; the same at each start,
/// so that a CA read back signs as the one first made (its subject and
/// key identify it). It may sign for names under `suffix`, `localhost`
/// and loopback addresses only: a user who adds it to the system's store
/// trusts it for nothing else.
fn ca_params(suffix: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid("CA", e))?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName(suffix.to_string()),
            GeneralSubtree::DnsName("localhost".into()),
            GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
            GeneralSubtree::IpAddress(CidrSubnet::V6(
                std::net::Ipv6Addr::LOCALHOST.octets(),
                [0xff; 16],
            )),
        ],
        excluded_subtrees: Vec::new(),
    });
    p.distinguished_name
        .push(DnType::CommonName, "banger E2B-compatible API CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "banger");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// Writes `data` at `path` with `mode`, whole or not at all.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    banger_host::fsutil::write_new_mode(path, data, mode).map_err(|e| invalid("a file", e))
}

/// The CA for names under `suffix`, kept in `<state>/api-tls/` (root's,
/// 0700): its key (`ca.key`, 0600), its certificate (`ca.pem`) and the
/// suffix it was made for (`ca.suffix`, written last: a CA whose making
/// was cut short has none and is made again). Read back when all three
/// are there and the suffix is this one; else made anew. The copy for
/// clients, `<state>/api-ca.pem` (0644), is written from it at each start.
fn ca(state: &Path, suffix: &str) -> Result<(KeyPair, PathBuf)> {
    let dir = state.join("api-tls");
    let key_path = dir.join("ca.key");
    let own_cert = dir.join("ca.pem");
    let suffix_path = dir.join("ca.suffix");
    let public = state.join(CA_CERT);
    std::fs::create_dir_all(&dir).map_err(|e| invalid(&dir.display().to_string(), e))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| invalid(&dir.display().to_string(), e))?;
    let kept = std::fs::read_to_string(&suffix_path)
        .ok()
        .filter(|s| s == suffix)
        .and_then(|_| {
            let key = std::fs::read_to_string(&key_path).ok()?;
            let cert = std::fs::read_to_string(&own_cert).ok()?;
            match KeyPair::from_pem(&key) {
                Ok(k) => Some((k, cert)),
                Err(e) => {
                    tracing::warn!(key = %key_path.display(), err = %e, "the API's CA key does not read: a new CA");
                    None
                }
            }
        });
    let (key, cert) = match kept {
        Some(k) => k,
        None => {
            if suffix_path.exists() {
                tracing::warn!(ca = %public.display(), suffix, "a new CA for the API (another DNS suffix, or the old one's files are damaged): clients must trust the new one");
            }
            let _ = std::fs::remove_file(&suffix_path);
            let key = KeyPair::generate().map_err(|e| invalid("a CA key", e))?;
            let mut params = ca_params(suffix)?;
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params
                .self_signed(&key)
                .map_err(|e| invalid("the CA's certificate", e))?
                .pem();
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_new(&own_cert, cert.as_bytes(), 0o600)?;
            write_new(&suffix_path, suffix.as_bytes(), 0o600)?;
            (key, cert)
        }
    };
    if std::fs::read_to_string(&public).ok().as_deref() != Some(cert.as_str()) {
        write_new(&public, cert.as_bytes(), 0o644)?;
    }
    Ok((key, public))
}

/// How many names' certificates are kept (past it, all are made anew).
const NAMES_KEPT: usize = 1024;

/// The certificates served: one per name asked for (SNI) under the DNS
/// suffix, made as first asked (a wildcard under a one-label suffix such
/// as `vm` is one that TLS clients refuse), else the default one.
#[derive(Debug)]
struct Certs {
    issuer: Issuer<'static, KeyPair>,
    suffix: String,
    default: Arc<CertifiedKey>,
    made: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// A certificate for `names`, signed by `issuer`, with its key.
fn certified(issuer: &Issuer<'static, KeyPair>, names: Vec<String>) -> Result<Arc<CertifiedKey>> {
    let cn = names.first().cloned().unwrap_or_default();
    let mut params = CertificateParams::new(names).map_err(|e| invalid("the names", e))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let key = KeyPair::generate().map_err(|e| invalid("a key", e))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| invalid("the certificate", e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| invalid("the key", e))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signer,
    )))
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A name under the suffix, of DNS's letters: its own certificate.
        let name = hello
            .server_name()
            .map(str::to_ascii_lowercase)
            .filter(|n| {
                n.len() <= 253
                    && n.strip_suffix(&self.suffix)
                        .and_then(|l| l.strip_suffix('.'))
                        .is_some_and(|l| {
                            !l.is_empty()
                                && l.bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                        })
            });
        let Some(name) = name else {
            return Some(self.default.clone());
        };
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = made.get(&name) {
            return Some(c.clone());
        }
        if made.len() >= NAMES_KEPT {
            made.clear();
        }
        let c = certified(&self.issuer, vec![name.clone()]).ok()?;
        made.insert(name, c.clone());
        Some(c)
    }
}

impl Tls {
    /// The server's configuration for `listen`: certificates for
    /// `api.<suffix>`, `localhost` and the listen address, and for each
    /// other name under `suffix` as asked, signed by banger's CA (made the
    /// first time); and where the CA's certificate is.
    pub fn new(state: &Path, suffix: &str, listen: SocketAddr) -> Result<(Tls, PathBuf)> {
        let suffix = suffix.to_ascii_lowercase();
        let (ca_key, ca_path) = ca(state, &suffix)?;
        let issuer = Issuer::new(ca_params(&suffix)?, ca_key);
        let mut names = vec![format!("api.{suffix}"), "localhost".to_string()];
        if let IpAddr::V4(ip) = listen.ip() {
            names.push(ip.to_string());
        }
        let default = certified(&issuer, names)?;
        let certs = Certs {
            issuer,
            suffix,
            default,
            made: Mutex::new(HashMap::new()),
        };
        // ring's provider, deprecated for lacking post-quantum key
        // exchange: for a loopback port that matters not, and it builds
        // without aws-lc's C toolchain.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("the protocol versions", e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(certs));
        Ok((
            Tls {
                config: Arc::new(config),
                relays: Relays::default(),
            },
            ca_path,
        ))
    }

    /// Terminates TLS on `client` (its whole handshake within
    /// [`HANDSHAKE_WITHIN`]) and relays its plaintext to the API's own
    /// port at `plain` and back, until the API's side ends or both stay
    /// quiet for [`QUIET`]. The connection to `plain` is the relay's own
    /// (`Relays`: neither counted against the connections nor taken for
    /// TLS again).
    pub fn relay(&self, mut client: TcpStream, plain: SocketAddr) {
        let Ok(mut conn) = rustls::ServerConnection::new(self.config.clone()) else {
            return;
        };
        if handshake(&mut conn, &mut client).is_err() {
            return;
        }
        let Ok(mut inner) = self.relays.connect(plain) else {
            return;
        };
        let _ = inner.set_write_timeout(Some(QUIET));
        let _ = client.set_write_timeout(Some(QUIET));
        let _ = pump(&mut conn, &mut client, &mut inner);
        let _ = inner.shutdown(std::net::Shutdown::Both);
        conn.send_close_notify();
        let _ = flush(&mut conn, &mut client);
    }
}

/// The relays' own connections to the API's port, by their local
/// address, from their making until the accept loop has seen them.
#[derive(Default)]
pub struct Relays(Mutex<std::collections::HashSet<SocketAddr>>);

impl Relays {
    /// A connection to `to` from a local address recorded first.
    fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        use nix::sys::socket::{
            bind, connect, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
        };
        use std::os::fd::AsRawFd;
        let family = if to.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(to.ip(), 0)),
        )?;
        let local = getsockname::<SockaddrStorage>(fd.as_raw_fd())?;
        let local = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
            (Some(v4), _) => SocketAddr::from(std::net::SocketAddrV4::from(*v4)),
            (_, Some(v6)) => SocketAddr::from(std::net::SocketAddrV6::from(*v6)),
            _ => return Err(std::io::Error::other("a socket of no address family")),
        };
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(local);
        if let Err(e) = connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&local);
            return Err(e.into());
        }
        Ok(TcpStream::from(fd))
    }

    /// Whether `peer` is a relay's own connection (then forgotten).
    pub fn take(&self, peer: SocketAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer)
    }
}

/// What rustls has to send, sent (a signal's interruption retried).
fn flush(conn: &mut rustls::ServerConnection, client: &mut TcpStream) -> std::io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(client) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The handshake, whole within [`HANDSHAKE_WITHIN`] (each read given
/// what is left: a client trickling its hello holds nothing longer).
fn handshake(conn: &mut rustls::ServerConnection, client: &mut TcpStream) -> std::io::Result<()> {
    let until = Instant::now() + HANDSHAKE_WITHIN;
    let _ = client.set_write_timeout(Some(HANDSHAKE_WITHIN));
    while conn.is_handshaking() {
        flush(conn, client)?;
        if !conn.wants_read() {
            continue;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the TLS handshake",
            ));
        }
        client.set_read_timeout(Some(left))?;
        match conn.read_tls(client) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Err(e) = conn.process_new_packets() {
            // (Its alert, for the client to read why.)
            let _ = flush(conn, client);
            return Err(std::io::Error::new(ErrorKind::InvalidData, e));
        }
    }
    flush(conn, client)
}

/// The plaintext the connection holds, written to `inner` while it takes
/// it (once it refuses, the rest is dropped: what the API answered still
/// comes back). Whether the client has closed its side.
fn to_inner(
    conn: &mut rustls::ServerConnection,
    inner: &mut TcpStream,
    inner_takes: &mut bool,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) if *inner_takes => {
                if inner.write_all(&buf[..n]).is_err() {
                    *inner_takes = false;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Both ways at once, on one thread, until the API's side ends (a client
/// that closes its side still gets the answer) or nothing moves for
/// [`QUIET`].
fn pump(
    conn: &mut rustls::ServerConnection,
    client: &mut TcpStream,
    inner: &mut TcpStream,
) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 16 << 10];
    let mut client_open = true;
    let mut inner_takes = true;
    let quiet = PollTimeout::try_from(QUIET).unwrap_or(PollTimeout::NONE);
    let client_closed = |open: &mut bool, inner: &mut TcpStream| {
        *open = false;
        let _ = inner.shutdown(std::net::Shutdown::Write);
    };
    // What came with the handshake's last records is read already.
    if to_inner(conn, inner, &mut inner_takes, &mut buf)? {
        client_closed(&mut client_open, inner);
    }
    loop {
        flush(conn, client)?;
        let (c_ready, i_ready) = {
            let mut fds = vec![PollFd::new(inner.as_fd(), PollFlags::POLLIN)];
            if client_open {
                fds.push(PollFd::new(client.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, quiet) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (fds.get(1).is_some_and(ready), ready(&fds[0]))
        };
        if c_ready {
            match conn.read_tls(client) {
                Ok(0) => client_closed(&mut client_open, inner),
                Ok(_) => {
                    let state = conn
                        .process_new_packets()
                        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
                    let closed = state.peer_has_closed();
                    if to_inner(conn, inner, &mut inner_takes, &mut buf)? || closed {
                        client_closed(&mut client_open, inner);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if i_ready {
            let n = match inner.read(&mut buf) {
                // The API's side is done: all it said is relayed.
                Ok(0) => return flush(conn, client),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // rustls takes what its buffer has room for; the rest goes
            // once that is sent.
            let mut off = 0;
            while off < n {
                let took = conn.writer().write(&buf[off..n])?;
                off += took;
                let had = conn.wants_write();
                flush(conn, client)?;
                if took == 0 && !had {
                    return Err(std::io::Error::new(
                        ErrorKind::WriteZero,
                        "the TLS connection takes nothing",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    use super::*;

    /// A server certificate checked as a client would, against the CA's
    /// certificate on disk.
    fn verify(state: &Path, cert: &CertifiedKey, name: &str) -> std::result::Result<(), String> {
        let pem = std::fs::read(state.join(CA_CERT)).unwrap();
        let ca = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        v.verify_server_cert(
            &cert.cert[0],
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_ca_signs_its_suffixs_names_and_is_trusted_for_no_other() {
        let d = tempfile::tempdir().unwrap();
        let (_, ca_path) = Tls::new(d.path(), "vm", "127.0.0.1:3000".parse().unwrap()).unwrap();
        assert_eq!(ca_path, d.path().join(CA_CERT));
        let key = std::fs::read_to_string(d.path().join("api-tls/ca.key")).unwrap();
        let issuer = || Issuer::new(ca_params("vm").unwrap(), KeyPair::from_pem(&key).unwrap());
        // A second serve reads the same CA back: what it signs verifies
        // against the certificate clients were given.
        Tls::new(d.path(), "vm", "127.0.0.1:3000".parse().unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("api-tls/ca.key")).unwrap(),
            key
        );
        let c = certified(&issuer(), vec!["49983-keen-seal.vm".into()]).unwrap();
        verify(d.path(), &c, "49983-keen-seal.vm").unwrap();
        assert!(
            verify(d.path(), &c, "other.vm").is_err(),
            "its own name only"
        );
        // Even signed by the CA, a name outside its constraints is refused.
        let evil = certified(&issuer(), vec!["bank.example".into()]).unwrap();
        let e = verify(d.path(), &evil, "bank.example").unwrap_err();
        assert!(e.contains("NameConstraintViolation"), "{e}");
        // The clients' copy, lost, is written again from the CA's own.
        let public = std::fs::read_to_string(&ca_path).unwrap();
        std::fs::remove_file(&ca_path).unwrap();
        Tls::new(d.path(), "vm", "127.0.0.1:3000".parse().unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(&ca_path).unwrap(), public);
        let read_key = || std::fs::read_to_string(d.path().join("api-tls/ca.key")).unwrap();
        assert_eq!(read_key(), key);
        // Another suffix: another CA (the old one's constraints exclude it).
        Tls::new(d.path(), "box", "127.0.0.1:3000".parse().unwrap()).unwrap();
        let boxed = read_key();
        assert_ne!(boxed, key);
        assert_ne!(std::fs::read_to_string(&ca_path).unwrap(), public);
        // A damaged key: a new CA, not a port without HTTPS.
        std::fs::write(d.path().join("api-tls/ca.key"), "garbage").unwrap();
        Tls::new(d.path(), "box", "127.0.0.1:3000".parse().unwrap()).unwrap();
        let again = read_key();
        assert!(again != "garbage" && again != boxed);
    }
}
