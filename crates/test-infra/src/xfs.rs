//! An instance whose state dir is a real XFS filesystem on a loop device
//! (the reflink root-disk strategy's tests and benchmark).

use std::process::Command;

use crate::{text, Instance};

impl Instance {
    /// Puts the state dir on a fresh XFS filesystem (reflinks on) in a
    /// sparse 4 GiB file on a loop device (`mount -o loop`: the loop is
    /// freed when it is unmounted, on drop). Call before `with_image`.
    pub fn on_xfs(self) -> Instance {
        self.on_xfs_sized(4)
    }

    /// `on_xfs` with a filesystem of `gib` GiB.
    pub fn on_xfs_sized(mut self, gib: u64) -> Instance {
        let img = self.dir.path().join("state.xfs");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(gib << 30))
            .expect("xfs image file");
        let st = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img)
            .status()
            .expect("mkfs.xfs (scripts/install-deps.sh installs xfsprogs)");
        assert!(st.success(), "mkfs.xfs");
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(self.state())
            .status()
            .expect("mount");
        assert!(st.success(), "mount the xfs state dir");
        self.xfs = true;
        std::fs::create_dir_all(self.state().join("images")).expect("mkdir images");
        self
    }

    /// The loop devices backing this instance's files (its XFS state dir
    /// while mounted).
    pub fn loops(&self) -> Vec<String> {
        let out = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
            .output()
            .expect("losetup");
        let dir = self.dir.path().to_string_lossy().into_owned();
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(&dir))
            .map(str::to_string)
            .collect()
    }
}
