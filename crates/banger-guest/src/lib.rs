//! The guest side of banger: the default image (built from Debian's
//! packages), the ELF kernel it boots, its initramfs, and the small per-VM
//! config archive that carries hostname, addresses and SSH keys into it;
//! and the import of root filesystems users already have (ext4, tarballs,
//! directories, OCI images).

pub mod config;

/// What long work reports as it goes (an image build, an import): a line
/// for the user, or how far it is through an amount it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report<'a> {
    Line(&'a str),
    /// `done` of `total` bytes of `what` (an archive, a layer).
    Bytes {
        what: &'a str,
        done: u64,
        total: u64,
    },
}

/// The callback long work reports through.
pub type Progress<'a> = dyn FnMut(Report<'_>) + 'a;

/// Reports a line.
pub(crate) fn line(progress: &mut Progress<'_>, text: &str) {
    progress(Report::Line(text))
}

/// A reader that reports how much of `total` has been read, about every
/// hundredth (and at least every 4 MiB), and once at the end.
pub(crate) struct Counting<'p, 'q, R> {
    pub inner: R,
    pub what: &'q str,
    pub total: u64,
    pub done: u64,
    pub next: u64,
    pub progress: &'p mut Progress<'q>,
}

impl<'p, 'q, R> Counting<'p, 'q, R> {
    pub fn new(inner: R, what: &'q str, total: u64, progress: &'p mut Progress<'q>) -> Self {
        Counting {
            inner,
            what,
            total,
            done: 0,
            next: 0,
            progress,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Counting<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.next || n == 0 {
            let step = (self.total / 100).clamp(64 << 10, 4 << 20);
            self.next = self.done + step;
            (self.progress)(Report::Bytes {
                what: self.what,
                done: self.done.min(self.total),
                total: self.total,
            });
        }
        Ok(n)
    }
}
pub mod cpio;
pub mod image;
pub mod import;
pub mod initramfs;
pub mod kernel;
pub mod mirrors;
pub mod oci;
pub mod tree;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_counting_reader_reports_up_to_its_total() {
        let data = vec![7u8; 10 << 20];
        let mut seen = Vec::new();
        {
            let mut p = |r: Report<'_>| {
                if let Report::Bytes { what, done, total } = r {
                    assert_eq!((what, total), ("archive", data.len() as u64));
                    seen.push(done);
                }
            };
            let mut c = Counting::new(&data[..], "archive", data.len() as u64, &mut p);
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).unwrap();
            assert_eq!(sink.len(), data.len());
        }
        assert!(
            seen.len() >= 3 && seen.len() <= 200,
            "{} reports",
            seen.len()
        );
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&(data.len() as u64)));
    }
}
