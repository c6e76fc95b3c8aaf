//! SSH keys: banger's client key and each guest's host key, made with
//! ssh-keygen (ed25519, no passphrase).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cmd::{self, CmdError};

#[derive(Debug, Error)]
pub enum SshKeyError {
    #[error("generate ssh key {path}: {source}")]
    Generate { path: PathBuf, source: CmdError },
    #[error("read public key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `path` and `path.pub` unless `path` exists already.
pub fn ensure(path: &Path, comment: &str) -> Result<(), SshKeyError> {
    if path.exists() && pub_path(path).exists() {
        return Ok(());
    }
    generate(path, comment)
}

pub fn generate(path: &Path, comment: &str) -> Result<(), SshKeyError> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(pub_path(path));
    cmd::run(
        "ssh-keygen",
        [
            "-q".as_ref(),
            "-t".as_ref(),
            "ed25519".as_ref(),
            "-N".as_ref(),
            "".as_ref(),
            "-C".as_ref(),
            comment.as_ref(),
            "-f".as_ref(),
            path.as_os_str(),
        ],
    )
    .map_err(|source| SshKeyError::Generate {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
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
    use super::*;

    #[test]
    fn generates_once() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("id");
        ensure(&k, "test").unwrap();
        let p1 = public_key(&k).unwrap();
        assert!(p1.starts_with("ssh-ed25519 "), "{p1}");
        ensure(&k, "test").unwrap();
        assert_eq!(public_key(&k).unwrap(), p1, "ensure keeps an existing key");
        generate(&k, "test").unwrap();
        assert_ne!(public_key(&k).unwrap(), p1);
    }
}
