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

use banger_agent::proto::{InRoot, Rlimit, MAX_RLIMITS};

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
    Ok(())
}

/// The root is an absolute, normal path of the guest, an existing
/// directory; the rlimits are known and few.
fn check(c: &InRoot) -> Result<(), String> {
    let root = Path::new(&c.root);
    let normal = c.root.starts_with('/')
        && c.root
            .split('/')
            .skip(1)
            .all(|p| !p.is_empty() && p != "." && p != "..");
    if !normal || c.root.contains('\0') {
        return Err(format!(
            "container root {:?}: an absolute path other than /, without . or ..",
            c.root
        ));
    }
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("container root {}: not a directory", c.root)),
        Err(e) => return Err(format!("container root {}: {e}", c.root)),
    }
    if c.rlimits.len() > MAX_RLIMITS {
        return Err(format!("container: over {MAX_RLIMITS} rlimits"));
    }
    for r in &c.rlimits {
        resource(r)?;
        if r.soft > r.hard {
            return Err(format!(
                "container: {} soft limit {} over its hard limit {}",
                r.kind, r.soft, r.hard
            ));
        }
    }
    Ok(())
}

/// The resource number of an OCI rlimit's name.
pub fn resource(r: &Rlimit) -> Result<u32, String> {
    use nix::libc;
    let n = match r.kind.as_str() {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        other => {
            return Err(format!(
                "container: unknown rlimit {:?}",
                other.chars().take(32).collect::<String>()
            ))
        }
    };
    Ok(n as u32)
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
    }
}
