//! Processes in a container's root filesystem (containerd's shim): the
//! root is a directory of the guest where the host shared the container's
//! rootfs over virtio-fs; a process is chrooted into it, with the guest's
//! /proc, /sys and /dev bound there first (once, whoever asks first).
//!
//! The VM is the isolation boundary (one VM per pod): the root only keeps
//! the container's files apart from the guest's own, as a chroot does,
//! so what is bound into it is the guest's, not the host's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

#[cfg(test)]
use banger_agent::proto::Rlimit;
use banger_agent::proto::{Bind, InRoot, Tmpfs};
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::stat::{fstat, Mode, SFlag};

/// What is bound from the guest into each root.
const BOUND: &[&str] = &["proc", "sys", "dev"];

/// The most of a file of the image's the agent reads (/etc/passwd).
const SMALL_FILE: u64 = 1 << 20;

/// One preparation at a time (two execs of one container start together).
static PREPARING: Mutex<()> = Mutex::new(());

/// `c`'s root checked, with /proc, /sys and /dev, its binds and its
/// tmpfs mounted into it (once: what is there already is left).
pub fn prepare(c: &InRoot) -> Result<(), String> {
    check(c)?;
    let root = Path::new(&c.root);
    let _one = PREPARING.lock().unwrap_or_else(|p| p.into_inner());
    for d in BOUND {
        let guest = format!("/{d}");
        let at = make_in(root, d, true).map_err(|e| format!("container root: /{d}: {e}"))?;
        if same_file(&at, &guest) {
            continue; // bound already
        }
        mount_at(
            Some(guest.as_str()),
            &at,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )
        .map_err(|e| format!("container root: bind /{d}: {e}"))?;
    }
    // Binds and tmpfs mounts together, the shallower first: a bind
    // under a tmpfs (`/run`, then `/run/x`) lands on the tmpfs.
    enum One<'a> {
        Bind(&'a Bind),
        Tmpfs(&'a Tmpfs),
    }
    let mut all: Vec<(usize, One)> = c
        .binds
        .iter()
        .map(|b| (depth(&b.target), One::Bind(b)))
        .chain(c.tmpfs.iter().map(|t| (depth(&t.target), One::Tmpfs(t))))
        .collect();
    all.sort_by_key(|(d, _)| *d);
    for (_, m) in all {
        match m {
            One::Bind(b) => bind(root, b)?,
            One::Tmpfs(t) => tmpfs(root, t)?,
        }
    }
    if c.readonly {
        read_only_root(root)?;
    }
    Ok(())
}

/// Unmounts what the agent mounted in container root `root` (its /proc,
/// /sys and /dev, binds, tmpfs mounts, read-only self-bind), deepest
/// first, lazily: a deleted container leaves nothing mounted in the
/// guest.
pub fn unmount_root(root: &str) -> Result<(), String> {
    let c = InRoot {
        root: root.to_string(),
        ..Default::default()
    };
    c.check_shape()?;
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("container root {root}: mountinfo: {e}"))?;
    let under = format!("{}/", root.trim_end_matches('/'));
    let mut points: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == root || p.starts_with(&under))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        match nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(format!("container root {root}: unmount {p}: {e}")),
        }
    }
    Ok(())
}

/// Makes the root read-only: a bind of itself (its mounts kept), then a
/// read-only remount of that one mount; once.
fn read_only_root(root: &Path) -> Result<(), String> {
    let st = nix::sys::statvfs::statvfs(root)
        .map_err(|e| format!("container root {}: {e}", root.display()))?;
    if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Ok(());
    }
    nix::mount::mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("container root {}: bind: {e}", root.display()))?;
    nix::mount::mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("container root {}: read-only: {e}", root.display()))
}

/// How many components a path in the container has.
fn depth(p: &str) -> usize {
    p.split('/').filter(|c| !c.is_empty()).count()
}

/// Binds `b.source` (a guest path) at `b.target` in `root`, once: a
/// target that is already `b.source` is left alone. A read-only bind is
/// not recursive (a submount would stay writable).
fn bind(root: &Path, b: &Bind) -> Result<(), String> {
    let what =
        std::fs::metadata(&b.source).map_err(|e| format!("container mount {}: {e}", b.source))?;
    let at = make_in(root, &b.target, what.is_dir())
        .map_err(|e| format!("container mount {}: {e}", b.target))?;
    if same_file(&at, &b.source) {
        return Ok(());
    }
    let flags = if b.read_only {
        MsFlags::MS_BIND
    } else {
        MsFlags::MS_BIND | MsFlags::MS_REC
    };
    mount_at(Some(b.source.as_str()), &at, None, flags, None)
        .map_err(|e| format!("container mount {}: bind {}: {e}", b.target, b.source))?;
    if b.read_only {
        // The mount just made, looked up again (the descriptor is the
        // directory under it).
        let on = make_in(root, &b.target, what.is_dir())
            .map_err(|e| format!("container mount {}: {e}", b.target))?;
        mount_at(
            None,
            &on,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .map_err(|e| format!("container mount {}: read-only: {e}", b.target))?;
    }
    Ok(())
}

/// A tmpfs at `t.target` in `root`, once.
fn tmpfs(root: &Path, t: &Tmpfs) -> Result<(), String> {
    let at =
        make_in(root, &t.target, true).map_err(|e| format!("container tmpfs {}: {e}", t.target))?;
    // Mounted already: the target (reopened, crossing into what is
    // mounted on it) is on another device than its parent.
    let parent = t
        .target
        .trim_end_matches('/')
        .rsplit_once('/')
        .map(|(p, _)| p)
        .unwrap_or("");
    let dev = |path: &str| {
        make_in(root, path, true)
            .ok()
            .and_then(|fd| fstat(fd.as_raw_fd()).ok())
            .map(|s| s.st_dev)
    };
    if dev(&t.target) != dev(parent) {
        return Ok(());
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &t.options {
        match o.as_str() {
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "strictatime" | "relatime" => {}
            other if other.starts_with("size=") || other.starts_with("mode=") => data.push(other),
            _ => {} // (check_shape let only these through)
        }
    }
    let data = data.join(",");
    mount_at(Some("tmpfs"), &at, Some("tmpfs"), flags, Some(&data))
        .map_err(|e| format!("container tmpfs {}: {e}", t.target))
}

/// Mounts on the file or directory `at` is open on (`/proc/self/fd/N`:
/// where it is now, whatever was renamed since).
fn mount_at(
    source: Option<&str>,
    at: &OwnedFd,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    let target = format!("/proc/self/fd/{}", at.as_raw_fd());
    nix::mount::mount(source, target.as_str(), fstype, flags, data)
}

/// Whether `at` is the file at guest path `path` (a bind already made).
fn same_file(at: &OwnedFd, path: &str) -> bool {
    match (fstat(at.as_raw_fd()), nix::sys::stat::stat(path)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Opens (`O_PATH`) `target` inside `root`, making what is missing on the
/// way (directories; the last a directory when `dir`, else an empty file),
/// never through a symbolic link: a component that is one is refused, so
/// nothing of the image's can point a mount outside its root.
pub fn make_in(root: &Path, target: &str, dir: bool) -> Result<OwnedFd, String> {
    let open = |at: i32, name: &str, flags: OFlag| -> nix::Result<OwnedFd> {
        let fd = nix::fcntl::openat(
            Some(at),
            name,
            flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let mut cur = open(
        nix::libc::AT_FDCWD,
        &root.to_string_lossy(),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
    )
    .map_err(|e| format!("{}: {e}", root.display()))?;
    let parts: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match open(cur.as_raw_fd(), part, OFlag::O_PATH) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => {
                let made = if last && !dir {
                    open(
                        cur.as_raw_fd(),
                        part,
                        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY,
                    )
                    .map(drop)
                } else {
                    nix::sys::stat::mkdirat(
                        Some(cur.as_raw_fd()),
                        *part,
                        Mode::from_bits_truncate(0o755),
                    )
                };
                match made {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(format!("make {part}: {e}")),
                }
                open(cur.as_raw_fd(), part, OFlag::O_PATH).map_err(|e| format!("{part}: {e}"))?
            }
            Err(e) => return Err(format!("{part}: {e}")),
        };
        let kind = fstat(next.as_raw_fd())
            .map(|s| SFlag::from_bits_truncate(s.st_mode & SFlag::S_IFMT.bits()))
            .map_err(|e| format!("{part}: {e}"))?;
        if kind == SFlag::S_IFLNK {
            return Err(format!("{part} is a symbolic link in the image"));
        }
        if (!last || dir) && kind != SFlag::S_IFDIR {
            return Err(format!("{part} is not a directory"));
        }
        cur = next;
    }
    Ok(cur)
}

/// Opens `path` inside the container at `root` with `flags`, resolved as
/// the container sees it (its absolute links stay in it; no magic links).
fn open_in_root(root: &str, path: &str, flags: OFlag) -> Result<OwnedFd, nix::errno::Errno> {
    use nix::fcntl::{openat2, OpenHow, ResolveFlag};
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let root_fd = unsafe { OwnedFd::from_raw_fd(root_fd) };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = match path.trim_start_matches('/') {
        "" => ".",
        rel => rel,
    };
    let fd = openat2(root_fd.as_raw_fd(), rel, how)?;
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads `path` of the container at `root`, resolved inside it (its
/// symbolic links as the container sees them), a regular file of at most
/// 1 MiB; "" when there is none.
pub fn read_small(root: &str, path: &str) -> Result<String, String> {
    use std::io::Read;
    let fd = match open_in_root(
        root,
        path,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(String::new()),
        Err(e) => return Err(format!("container {path}: {e}")),
    };
    let f = std::fs::File::from(fd);
    let md = f.metadata().map_err(|e| format!("container {path}: {e}"))?;
    if !md.is_file() {
        return Err(format!("container {path}: not a regular file"));
    }
    let mut s = String::new();
    f.take(SMALL_FILE)
        .read_to_string(&mut s)
        .map_err(|e| format!("container {path}: {e}"))?;
    Ok(s)
}

/// Whether `dir` is a directory inside the container at `root` (resolved
/// as the container sees it).
pub fn is_dir_in(root: &str, dir: &str) -> Result<(), String> {
    let fd = open_in_root(root, dir, OFlag::O_PATH).map_err(|e| match e {
        nix::errno::Errno::ENOENT => "no such directory in the container".to_string(),
        e => e.to_string(),
    })?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Err("not a directory".into());
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
