//! SSH keys: banger's client key and each guest's host key, Ed25519 in
//! OpenSSH's formats, generated in-process (`ssh-keygen` costs about 12 ms
//! a key; this well under one). Private keys are written 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SshKeyError {
    #[error("generate ssh key {path}: {detail}")]
    Generate { path: PathBuf, detail: String },
    #[error("write ssh key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read public key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `path` and `path.pub` unless both exist already.
pub fn ensure(path: &Path, comment: &str) -> Result<(), SshKeyError> {
    if path.exists() && pub_path(path).exists() {
        return Ok(());
    }
    generate(path, comment)
}

/// A new Ed25519 key pair at `path` (private, 0600) and `path.pub`.
pub fn generate(path: &Path, comment: &str) -> Result<(), SshKeyError> {
    let gen_err = |e: ssh_key::Error| SshKeyError::Generate {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(gen_err)?;
    key.set_comment(comment);
    let private = key.to_openssh(LineEnding::LF).map_err(gen_err)?;
    let public = key.public_key().to_openssh().map_err(gen_err)?;
    write(path, private.as_bytes(), 0o600)?;
    write(&pub_path(path), format!("{public}\n").as_bytes(), 0o644)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), SshKeyError> {
    let err = |source| SshKeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

pub fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// The public key line `ssh-ed25519 AAAA... comment`.
pub fn public_key(path: &Path) -> Result<String, SshKeyError> {
    let p = pub_path(path);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|source| SshKeyError::Read { path: p, source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generates_once_in_formats_openssh_reads() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("id");
        ensure(&k, "test").unwrap();
        let p1 = public_key(&k).unwrap();
        assert!(p1.starts_with("ssh-ed25519 "), "{p1}");
        assert!(p1.ends_with(" test"), "{p1}");
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // OpenSSH derives the same public key from the private file.
        let derived = crate::cmd::run("ssh-keygen", ["-y".as_ref(), "-f".as_ref(), k.as_os_str()])
            .expect("ssh-keygen (openssh-client) reads the key");
        let field = |s: &str| s.split_whitespace().nth(1).unwrap_or("").to_string();
        assert_eq!(field(&derived), field(&p1));
        ensure(&k, "test").unwrap();
        assert_eq!(public_key(&k).unwrap(), p1, "ensure keeps an existing key");
        generate(&k, "test").unwrap();
        assert_ne!(public_key(&k).unwrap(), p1);
    }
}
