//! The guest's serial console log (the VM's LogPath). The VMM appends to it
//! (O_APPEND); the daemon keeps it bounded by rotation: past
//! `console_max_bytes` its content moves to `console.log.1` (replacing the
//! older one) and the log is truncated, so a guest that prints forever
//! holds at most about twice the limit on the host's disk. `vm logs`
//! reads both, oldest first.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use banger_host::fsutil::{self, WrapIo};

use crate::error::Result;

/// The rotated-out part of a console log.
pub fn older(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// An empty console log for a new boot (the previous boot's is kept as the
/// older part, so `vm logs` still shows how it ended).
pub fn reset(path: &Path) -> Result<()> {
    // Its tail only (a VMM owns the log and may have made it huge).
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        rotate_if_big(path, 0).map(|_| ())?;
    }
    fsutil::write(path, "")?;
    Ok(())
}

/// What a rotation keeps of a log at most, whatever the configured bound.
const KEEP_MAX: u64 = 4 << 20;

/// Rotates the log if it passed `max` bytes; returns whether it did.
pub fn rotate_if_big(path: &Path, max: u64) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() <= max {
        return Ok(false);
    }
    // Copy, then truncate in place: the VMM keeps its descriptor, and its
    // O_APPEND writes land at the new end. (What it writes between the two
    // steps is lost: a few bytes out of a megabyte.) Only the last `max`
    // bytes are kept: the VMM owns the file and could make it sparse and
    // huge, which a whole copy would make dense on the host's disk.
    let old = older(path);
    let tmp = old.with_extension("tmp");
    // (A reset rotates with `max` 0: it keeps up to `KEEP_MAX`.)
    let keep = if max == 0 {
        KEEP_MAX
    } else {
        max.min(KEEP_MAX)
    };
    {
        let mut src = std::fs::File::open(path).with_path("open", path)?;
        src.seek(SeekFrom::Start(meta.len().saturating_sub(keep)))
            .with_path("seek", path)?;
        let mut dst = std::fs::File::create(&tmp).with_path("create", &tmp)?;
        std::io::copy(&mut std::io::Read::take(src, keep), &mut dst).with_path("copy", path)?;
    }
    std::fs::rename(&tmp, &old).with_path("rename into", &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .with_path("truncate", path)?;
    Ok(true)
}

/// Reads a log on from `pos`, following a truncation back to its start.
/// Returns the new bytes and the position after them.
pub fn read_from(path: &Path, pos: u64) -> Result<(Vec<u8>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).with_path("open", path).map_err(Into::into),
    };
    let len = f.metadata().with_path("stat", path)?.len();
    let pos = if len < pos { 0 } else { pos };
    // Never more than `KEEP_MAX` at once, from the end (a log a VMM made
    // huge is not read whole into the daemon).
    let pos = pos.max(len.saturating_sub(KEEP_MAX));
    f.seek(SeekFrom::Start(pos)).with_path("seek", path)?;
    let mut buf = Vec::new();
    f.take(KEEP_MAX)
        .read_to_end(&mut buf)
        .with_path("read", path)?;
    let end = pos + buf.len() as u64;
    Ok((buf, end))
}

impl crate::daemon::Daemon {
    /// `vm logs`: the console as kept (the older part first), in chunks;
    /// with `follow`, then what the guest writes until the client hangs up,
    /// the daemon shuts down, or the VM is no longer running.
    pub fn logs(
        &self,
        name: &str,
        follow: bool,
        events: crate::daemon::Events,
        hangup: &crate::cancel::Cancel,
        shutdown: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let vm = self.find(name)?;
        let log = self
            .cfg
            .layout
            .vm_dir(&vm.id)
            .join(banger_core::layout::vmfiles::CONSOLE_LOG);
        let mut send = |bytes: &[u8]| {
            for chunk in bytes.chunks(64 * 1024) {
                events(banger_core::api::Event::Log {
                    text: String::from_utf8_lossy(chunk).into_owned(),
                });
            }
        };
        let (old, _) = read_from(&older(&log), 0)?;
        send(&old);
        let (now, mut pos) = read_from(&log, 0)?;
        send(&now);
        if !follow {
            return Ok(());
        }
        let watch = crate::watch::Watch::modified(&log);
        loop {
            watch.wait(std::time::Duration::from_millis(250));
            let (new, next) = read_from(&log, pos)?;
            pos = next;
            send(&new);
            let running = self.find(name).is_ok_and(|v| self.vm_alive(&v));
            if hangup.is_cancelled()
                || shutdown.load(std::sync::atomic::Ordering::SeqCst)
                || !running
            {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_guest_that_prints_forever_stays_bounded() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        reset(&log).unwrap();
        // The VMM's descriptor, opened the way QEMU's append=on does.
        let mut vmm = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let line = [b'x'; 1023];
        for i in 0..4096 {
            vmm.write_all(&line).unwrap();
            vmm.write_all(b"\n").unwrap();
            if i % 64 == 0 {
                rotate_if_big(&log, 64 * 1024).unwrap();
            }
        }
        rotate_if_big(&log, 64 * 1024).unwrap();
        let total =
            std::fs::metadata(&log).unwrap().len() + std::fs::metadata(older(&log)).unwrap().len();
        assert!(
            total <= 2 * 64 * 1024 + 64 * 1024,
            "{total} bytes kept of 4 MiB written"
        );
        // Writes after a rotation land at the start, not past a hole.
        rotate_if_big(&log, 0).unwrap();
        vmm.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after\n");
        // A reader past the end follows the truncation.
        let (bytes, pos) = read_from(&log, 1 << 20).unwrap();
        assert_eq!(bytes, b"after\n");
        assert_eq!(pos, 6);
        // A console the VMM made sparse and huge: only the last `max`
        // bytes are copied (not a TiB of zeros).
        let huge = d.path().join("huge.log");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        rotate_if_big(&huge, 4096).unwrap();
        assert_eq!(std::fs::metadata(older(&huge)).unwrap().len(), 4096);
        assert_eq!(std::fs::metadata(&huge).unwrap().len(), 0);
        // A new boot keeps the previous one's log as the older part.
        reset(&log).unwrap();
        assert_eq!(std::fs::read(older(&log)).unwrap(), b"after\n");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    }
}
