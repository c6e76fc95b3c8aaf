//! Processes in a container's root filesystem (containerd's shim): the
//! root is a directory of the guest where the host shared the container's
//! rootfs over virtio-fs; a process is chrooted into it, with the guest's
//! /proc, /sys and /dev bound there first (once, whoever asks first).
//!
//! The VM is the isolation boundary (one VM per pod): the root only keeps
//! the container's files apart from the guest's own, as a chroot does,
//! so what is bound into it is the guest's, not the host's.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

#[cfg(test)]
use banger_agent::proto::Rlimit;
use banger_agent::proto::{Bind, InRoot};

/// What is bound from the guest into each root.
const BOUND: &[&str] = &["proc", "sys", "dev"];

/// One preparation at a time (two execs of one container start together).
static PREPARING: Mutex<()> = Mutex::new(());

/// `c`'s root checked, with /proc, /sys and /dev bound into it.
pub fn prepare(c: &InRoot) -> Result<(), String> {
    check(c)?;
    let root = Path::new(&c.root);
    let _one = PREPARING.lock().unwrap_or_else(|p| p.into_inner());
    for d in BOUND {
        let guest = Path::new("/").join(d);
        let inside = root.join(d);
        match std::fs::symlink_metadata(&inside) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "container root {}: /{d} is not a directory",
                    root.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&inside)
                    .map_err(|e| format!("container root: mkdir {}: {e}", inside.display()))?;
            }
            Err(e) => return Err(format!("container root: {}: {e}", inside.display())),
        }
        let dev = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.dev())
                .map_err(|e| format!("container root: {}: {e}", p.display()))
        };
        if dev(&inside)? == dev(&guest)? {
            continue; // bound already
        }
        nix::mount::mount(
            Some(&guest),
            &inside,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("container root: bind /{d} on {}: {e}", inside.display()))?;
    }
    for b in &c.binds {
        bind(root, b)?;
    }
    Ok(())
}

/// Binds `b.source` (a guest path) at `b.target` in `root`, once: a
/// target that is already `b.source` is left alone.
fn bind(root: &Path, b: &Bind) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let source = Path::new(&b.source);
    let what =
        std::fs::metadata(source).map_err(|e| format!("container mount {}: {e}", b.source))?;
    let inside = root.join(b.target.trim_start_matches('/'));
    // Made where missing, of the source's kind; never through a link (the
    // image's own: a bind must not land outside the root).
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = b.target.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "container mount {}: {} is a symbolic link in the image",
                    b.target,
                    at.display()
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = if last && !what.is_dir() {
                    std::fs::File::create(&at).map(drop)
                } else {
                    std::fs::create_dir(&at)
                };
                made.map_err(|e| {
                    format!("container mount {}: make {}: {e}", b.target, at.display())
                })?;
            }
            Err(e) => {
                return Err(format!(
                    "container mount {}: {}: {e}",
                    b.target,
                    at.display()
                ))
            }
        }
    }
    let now =
        std::fs::metadata(&inside).map_err(|e| format!("container mount {}: {e}", b.target))?;
    if (now.dev(), now.ino()) == (what.dev(), what.ino()) {
        return Ok(()); // bound already
    }
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(source),
        &inside,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("container mount {}: bind {}: {e}", b.target, b.source))?;
    if b.read_only {
        nix::mount::mount(
            None::<&str>,
            &inside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("container mount {}: read-only: {e}", b.target))?;
    }
    Ok(())
}

/// The root is an existing directory of the guest; the rest is as
/// [`InRoot::check_shape`] wants it.
fn check(c: &InRoot) -> Result<(), String> {
    c.check_shape()?;
    match std::fs::symlink_metadata(&c.root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("container root {}: not a directory", c.root)),
        Err(e) => Err(format!("container root {}: {e}", c.root)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_and_rlimits_are_checked_before_anything_is_bound() {
        let bad = |root: &str| {
            check(&InRoot {
                root: root.into(),
                ..Default::default()
            })
            .unwrap_err()
        };
        for r in ["/", "rel/path", "/a/../etc", "/a/./b", ""] {
            assert!(bad(r).contains("an absolute path other than /"), "{r}");
        }
        assert!(bad("/no/such/root/here").contains("No such file"));
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        let with = |kind: &str, soft, hard| {
            check(&InRoot {
                root: root.clone(),
                rlimits: vec![Rlimit {
                    kind: kind.into(),
                    soft,
                    hard,
                }],
                ..Default::default()
            })
        };
        assert!(with("RLIMIT_NOFILE", 1024, 4096).is_ok());
        assert!(with("RLIMIT_BOGUS", 1, 1)
            .unwrap_err()
            .contains("unknown rlimit"));
        assert!(with("RLIMIT_NOFILE", 10, 1)
            .unwrap_err()
            .contains("over its hard limit"));
        let bind = |source: &str, target: &str| {
            check(&InRoot {
                root: root.clone(),
                binds: vec![Bind {
                    source: source.into(),
                    target: target.into(),
                    read_only: false,
                }],
                ..Default::default()
            })
        };
        assert!(bind("/ctr/mounts/0", "/data").is_ok());
        assert!(bind("/ctr/mounts/0", "/data/").is_ok());
        for (s, t) in [
            ("/ctr/m", "/"),
            ("/ctr/m", "/a/../etc"),
            ("rel", "/x"),
            ("/x", "y"),
        ] {
            assert!(bind(s, t).is_err(), "{s} {t}");
        }
        let host = |h: &str| {
            check(&InRoot {
                root: root.clone(),
                hostname: Some(h.into()),
                ..Default::default()
            })
        };
        assert!(host("web-1").is_ok());
        assert!(host("a b").is_err() && host("").is_err() && host(&"x".repeat(65)).is_err());
    }

    #[test]
    fn binds_land_inside_the_root_and_never_through_its_links() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("NOT RUN: binding needs root");
            return;
        }
        // A mount namespace of this thread's own, private: whatever the
        // test binds goes with it.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let src = dir.path().join("src");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "shared").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        let b = |target: &str, read_only| Bind {
            source: src.to_str().unwrap().into(),
            target: target.into(),
            read_only,
        };
        let e = bind(&root, &b("/evil/x", false)).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        bind(&root, &b("/data/in", true)).unwrap();
        // Twice is once.
        bind(&root, &b("/data/in", true)).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("data/in/f")).unwrap(),
            "shared"
        );
        assert!(
            std::fs::write(root.join("data/in/g"), "x").is_err(),
            "read-only"
        );
        nix::mount::umount2(&root.join("data/in"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(
            nix::mount::umount2(&root.join("data/in"), nix::mount::MntFlags::MNT_DETACH).is_err(),
            "bound once"
        );
    }
}
