//! A guest's root tree on the host, seen as the guest sees it: paths are
//! resolved inside the root (symlinks followed relative to it, `..` stopping
//! at it), so an imported tree whose `/etc` is a symlink to the host's
//! `/etc` still gets banger's files written inside itself.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow (the kernel's limit).
const MAX_LINKS: u32 = 40;

/// The host path of the guest path `guest` in the tree at `root`: every
/// existing component is followed as the guest would (absolute symlinks
/// re-rooted at `root`); the result is always under `root`. Missing
/// trailing components are kept as they are.
pub fn resolve(root: &Path, guest: &Path) -> io::Result<PathBuf> {
    let mut todo: VecDeque<OsString> = components(guest).collect();
    let mut cur = root.to_path_buf();
    let mut links = 0;
    let mut missing = false;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            if cur != root {
                cur.pop();
            }
            continue;
        }
        let next = cur.join(&c);
        if missing {
            cur = next;
            continue;
        }
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::other(format!(
                        "{}: more than {MAX_LINKS} symlinks",
                        guest.display()
                    )));
                }
                let target = std::fs::read_link(&next)?;
                if target.is_absolute() {
                    cur = root.to_path_buf();
                }
                for (i, t) in components(&target).enumerate() {
                    todo.insert(i, t);
                }
            }
            Ok(_) => cur = next,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing = true;
                cur = next;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(cur)
}

/// The normal and `..` components of `p` (root and `.` dropped).
fn components(p: &Path) -> impl Iterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

/// Makes the directory `guest` (and its parents) inside the tree.
pub fn create_dir_all(root: &Path, guest: &str) -> io::Result<PathBuf> {
    let p = resolve(root, Path::new(guest))?;
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Writes the file `guest` inside the tree (its parent made if missing),
/// with `mode`.
pub fn write(root: &Path, guest: &str, data: &[u8], mode: u32) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let g = Path::new(guest);
    if let Some(parent) = g.parent() {
        std::fs::create_dir_all(resolve(root, parent)?)?;
    }
    let p = resolve(root, g)?;
    std::fs::write(&p, data)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(p)
}

/// Whether `guest` names an executable regular file in the tree.
pub fn is_executable(root: &Path, guest: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    resolve(root, Path::new(guest))
        .and_then(std::fs::metadata)
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        // Hostile: absolute and `..` links that would leave the root.
        symlink("/etc", root.join("hostetc")).unwrap();
        symlink("../../../../tmp", root.join("up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve(&root, Path::new("/bin/sh")).unwrap(),
            root.join("usr/bin/sh")
        );
        assert_eq!(
            resolve(&root, Path::new("/hostetc/passwd")).unwrap(),
            root.join("etc/passwd"),
            "re-rooted, and missing below"
        );
        assert_eq!(
            resolve(&root, Path::new("/up/x")).unwrap(),
            root.join("tmp/x")
        );
        assert_eq!(
            resolve(&root, Path::new("../../x")).unwrap(),
            root.join("x")
        );
        assert!(resolve(&root, Path::new("/loop/x")).is_err());
        // Writing through the hostile link stays inside.
        let p = write(&root, "/hostetc/inittab", b"x", 0o644).unwrap();
        assert_eq!(p, root.join("etc/inittab"));
        assert!(root.join("hostetc").is_symlink(), "the link itself is kept");
        std::fs::write(root.join("usr/bin/sh"), "").unwrap();
        assert!(!is_executable(&root, "/bin/sh"));
        write(&root, "/bin/sh", b"#!", 0o755).unwrap();
        assert!(is_executable(&root, "/bin/sh"));
    }
}
