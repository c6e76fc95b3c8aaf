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
use std::os::unix::fs::OpenOptionsExt;
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
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            invalid(&path.display().to_string(), e)
        })
}

/// The CA for names under `suffix`: its key read back from
/// `<state>/api-tls/ca.key`, or made (with its certificate at
/// `<state>/api-ca.pem`); made anew when the suffix it was made for
/// (`ca.suffix`) is another.
fn ca(state: &Path, suffix: &str) -> Result<(KeyPair, PathBuf)> {
    let dir = state.join("api-tls");
    let key_path = dir.join("ca.key");
    let suffix_path = dir.join("ca.suffix");
    let cert_path = state.join(CA_CERT);
    let same_suffix = std::fs::read_to_string(&suffix_path).is_ok_and(|s| s == suffix);
    if let (Ok(pem), true, true) = (
        std::fs::read_to_string(&key_path),
        cert_path.exists(),
        same_suffix,
    ) {
        let key =
            KeyPair::from_pem(&pem).map_err(|e| invalid(&key_path.display().to_string(), e))?;
        return Ok((key, cert_path));
    }
    if cert_path.exists() {
        tracing::warn!(ca = %cert_path.display(), suffix, "a new CA for the API, for another DNS suffix: clients must trust the new one");
    }
    std::fs::create_dir_all(&dir).map_err(|e| invalid(&dir.display().to_string(), e))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| invalid(&dir.display().to_string(), e))?;
    let key = KeyPair::generate().map_err(|e| invalid("a CA key", e))?;
    let mut params = ca_params(suffix)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params
        .self_signed(&key)
        .map_err(|e| invalid("the CA's certificate", e))?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_new(&suffix_path, suffix.as_bytes(), 0o600)?;
    Ok((key, cert_path))
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
            },
            ca_path,
        ))
    }

    /// Terminates TLS on `client` (its handshake within
    /// [`HANDSHAKE_WITHIN`]) and relays its plaintext to `plain` (a
    /// connection to the API's own port) and back, until either side ends
    /// or both stay quiet for [`QUIET`].
    pub fn relay(&self, mut client: TcpStream, plain: SocketAddr) {
        let Ok(mut conn) = rustls::ServerConnection::new(self.config.clone()) else {
            return;
        };
        let _ = client.set_write_timeout(Some(HANDSHAKE_WITHIN));
        let _ = client.set_read_timeout(Some(HANDSHAKE_WITHIN));
        let until = Instant::now() + HANDSHAKE_WITHIN;
        while conn.is_handshaking() {
            if Instant::now() >= until || conn.complete_io(&mut client).is_err() {
                return;
            }
        }
        let Ok(mut inner) = TcpStream::connect_timeout(&plain, Duration::from_secs(2)) else {
            return;
        };
        let _ = inner.set_write_timeout(Some(QUIET));
        let _ = client.set_write_timeout(Some(QUIET));
        let _ = pump(&mut conn, &mut client, &mut inner);
        let _ = inner.shutdown(std::net::Shutdown::Both);
        conn.send_close_notify();
        let _ = conn.complete_io(&mut client);
    }
}

/// The plaintext the connection holds, written to `inner`: whether the
/// client has closed its side.
fn to_inner(
    conn: &mut rustls::ServerConnection,
    inner: &mut TcpStream,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => inner.write_all(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Both ways at once, on one thread: what the client's TLS carries to
/// `inner`, what `inner` answers back through it.
fn pump(
    conn: &mut rustls::ServerConnection,
    client: &mut TcpStream,
    inner: &mut TcpStream,
) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 16 << 10];
    let mut inner_open = true;
    let quiet = PollTimeout::try_from(QUIET).unwrap_or(PollTimeout::NONE);
    // What came with the handshake's last records is read already.
    if to_inner(conn, inner, &mut buf)? {
        let _ = inner.shutdown(std::net::Shutdown::Write);
    }
    loop {
        while conn.wants_write() {
            conn.write_tls(client)?;
        }
        let (c_ready, i_ready) = {
            let mut fds = vec![PollFd::new(client.as_fd(), PollFlags::POLLIN)];
            if inner_open {
                fds.push(PollFd::new(inner.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, quiet) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if c_ready {
            match conn.read_tls(client) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            conn.process_new_packets()
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
            if to_inner(conn, inner, &mut buf)? {
                let _ = inner.shutdown(std::net::Shutdown::Write);
            }
        }
        if i_ready {
            match inner.read(&mut buf) {
                Ok(0) => {
                    inner_open = false;
                    conn.send_close_notify();
                }
                Ok(n) => {
                    // rustls takes what its buffer has room for; the
                    // rest goes once that is sent.
                    let mut off = 0;
                    while off < n {
                        let took = conn.writer().write(&buf[off..n])?;
                        off += took;
                        let mut sent = false;
                        while conn.wants_write() {
                            conn.write_tls(client)?;
                            sent = true;
                        }
                        if took == 0 && !sent {
                            return Err(std::io::Error::new(
                                ErrorKind::WriteZero,
                                "the TLS connection takes nothing",
                            ));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !inner_open && !conn.wants_write() {
            return Ok(());
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
        // Another suffix: another CA (the old one's constraints exclude it).
        Tls::new(d.path(), "box", "127.0.0.1:3000".parse().unwrap()).unwrap();
        assert_ne!(
            std::fs::read_to_string(d.path().join("api-tls/ca.key")).unwrap(),
            key
        );
    }
}
