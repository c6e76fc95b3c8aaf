//! File helpers whose errors carry the path (youki's WrapIoResult idea).

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("{op} {path}: {source}")]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub trait WrapIo<T> {
    fn with_path(self, op: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> WrapIo<T> for std::io::Result<T> {
    fn with_path(self, op: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|source| FsError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

pub fn create_dir_all(path: &Path) -> Result<(), FsError> {
    std::fs::create_dir_all(path).with_path("create dir", path)
}

pub fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<(), FsError> {
    std::fs::write(path, data).with_path("write", path)
}

/// Writes through a temporary file and a rename, so readers never see half.
pub fn write_atomic(path: &Path, data: impl AsRef<[u8]>) -> Result<(), FsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_path("write", &tmp)?;
    std::fs::rename(&tmp, path).with_path("rename into", path)
}

pub fn read_to_string(path: &Path) -> Result<String, FsError> {
    std::fs::read_to_string(path).with_path("read", path)
}

/// The last `n` lines of a text file, for error messages (empty if the file
/// cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes a file; a missing file is not an error (teardown is idempotent).
pub fn remove_file_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_path("remove", path),
    }
}

/// Removes a directory tree; a missing one is not an error.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_path("remove dir", path),
    }
}
