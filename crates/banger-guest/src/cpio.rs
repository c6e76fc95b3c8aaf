//! A writer for the "newc" cpio format the kernel unpacks initramfs from.
//! The kernel accepts several archives concatenated, which is how the
//! per-VM config is appended to the image's shared initramfs.

#[derive(Debug, Default)]
pub struct Archive {
    buf: Vec<u8>,
    ino: u32,
}

impl Archive {
    pub fn new() -> Self {
        Archive::default()
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: usize) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size as u32,
            0,
            0,
            0,
            0,
            (name.len() + 1) as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.header(name, 0o040_755, 2, 0);
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.header(name, 0o100_000 | (mode & 0o7777), 1, data.len());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 1, 0);
        // Pad to 512 like cpio(1) does.
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_cpio_reads_it() {
        let mut a = Archive::new();
        a.dir("etc").file("etc/hello", 0o644, b"hi there\n");
        a.file("x", 0o755, b"");
        let bytes = a.finish();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        // Unpack with the system's cpio implementation when one exists.
        let Some(bb) = banger_host::cmd::which("busybox") else {
            panic!("busybox is required for this test: apt-get install busybox-static");
        };
        let d = tempfile::tempdir().unwrap();
        let arc = d.path().join("a.cpio");
        std::fs::write(&arc, &bytes).unwrap();
        let out = std::process::Command::new(bb)
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&arc)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("etc/hello")).unwrap(),
            "hi there\n"
        );
        assert!(d.path().join("x").exists());
    }
}
