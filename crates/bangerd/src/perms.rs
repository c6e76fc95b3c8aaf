//! Who may read what under the state and runtime dirs, now that each VMM
//! runs as a user of its own (`resources::jail`): a VMM passes through
//! the dirs above its own VM's (search permission only, never a listing),
//! reads its own VM's image (an ACL entry for its uid while it runs), and
//! nothing else. The daemon's
//! own files (the database, its log, the client key, other VMs' files)
//! are root's alone.
//!
//! | path | owner, mode |
//! |---|---|
//! | state dir, runtime dir, `vms/` (both), `volumes/` | root, 0711 |
//! | `images/`, each image dir | root, 0711 |
//! | an image's files | root, 0600; + `user:<vm uid>:r` while that VM runs (its mask makes the mode 0640) |
//! | `banger.db` (and `-wal`, `-shm`), `bangerd.log` | root, 0600 |
//! | `ssh/` | root:`<socket group>` 0750 (root 0700 without the group) |
//! | `ssh/id_ed25519` | root, 0600 (root's ssh refuses a key others read) |
//! | `ssh/id_ed25519.group` | the group's own key, root:`<socket group>` 0640 |
//! | `cache/` | root, 0700 |
//! | a VM's state dir | root:`<vm uid>`, 0710 (jail) |
//! | a VM's runtime dir | `<vm uid>`, 0700 (jail) |

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_core::Layout;
use banger_host::fsutil::{self, WrapIo};

use crate::error::Result;

/// (The dirs `prepare` sets are the administrator's: a state dir that is a
/// link to another disk is followed, once, here.)
fn set(path: &Path, gid: u32, mode: u32) -> Result<()> {
    let real = std::fs::canonicalize(path).with_path("resolve", path)?;
    Ok(fsutil::set_owner_mode(&real, 0, gid, mode)?)
}

/// Sets the modes above on what exists (idempotent; run at every start,
/// so older state dirs are brought in line).
pub fn prepare(l: &Layout, socket_gid: Option<u32>) -> Result<()> {
    for (d, gid, mode) in [
        (l.state_dir.clone(), 0, 0o711),
        (l.runtime_dir.clone(), 0, 0o711),
        (l.vms_dir(), 0, 0o711),
        (l.runtime_dir.join("vms"), 0, 0o711),
        (l.volumes_dir(), 0, 0o711),
        (l.cache_dir(), 0, 0o700),
        (l.images_dir(), 0, 0o711),
    ] {
        fsutil::create_dir_all(&d)?;
        set(&d, gid, mode)?;
    }
    share_client_key(l, socket_gid)?;
    // What an import staged (access::stage_as) and a daemon that died
    // mid-import left.
    for e in std::fs::read_dir(l.cache_dir()).with_path("list", &l.cache_dir())? {
        let p = e.with_path("list", &l.cache_dir())?.path();
        let stale = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(crate::access::STAGED_PREFIX));
        if stale && p.symlink_metadata().is_ok_and(|m| m.is_file()) {
            fsutil::remove_file_if_exists(&p)?;
        }
    }
    for f in [
        l.db(),
        PathBuf::from(format!("{}-wal", l.db().display())),
        PathBuf::from(format!("{}-shm", l.db().display())),
        l.daemon_log(),
        l.lock_file(),
    ] {
        if f.exists() {
            set(&f, 0, 0o600)?;
        }
    }
    for e in std::fs::read_dir(l.images_dir()).with_path("list", &l.images_dir())? {
        let p = e.with_path("list", &l.images_dir())?.path();
        if p.is_dir() && p.extension().is_none() {
            share_image(&p)?;
        }
    }
    Ok(())
}

/// The socket's group reads `ssh/` and a key of its own (`id_ed25519.group`,
/// root:group 0640: ssh refuses a key file its own user shares, so root's
/// stays 0600, and the two keys differ, so that a VM only root may use
/// does not let the group's in); without the group, `ssh/` is root's alone
/// and there is no group key. Deleting the group key makes a new one at
/// the next start (VMs take it at their next boot).
fn share_client_key(l: &Layout, socket_gid: Option<u32>) -> Result<()> {
    let dir = l.ssh_dir();
    fsutil::create_dir_all(&dir)?;
    let key = group_key(l);
    let public = banger_host::sshkey::pub_path(&key);
    // A build before the group had a key of its own gave it a copy of
    // root's (and no `.pub`): root's key is then known to the group, so
    // both are made again (guests take them at their next boot).
    if key.exists() {
        let client = l.client_key();
        let copied = !public.exists()
            || std::fs::read(&key).with_path("read", &key)?
                == std::fs::read(&client).with_path("read", &client)?;
        if copied {
            tracing::warn!(
                key = %key.display(),
                "the group's ssh key was a copy of root's: making new keys for both"
            );
            for f in [
                key.clone(),
                public.clone(),
                client.clone(),
                banger_host::sshkey::pub_path(&client),
            ] {
                fsutil::remove_file_if_exists(&f)?;
            }
            banger_host::sshkey::ensure(&client, "banger")?;
        }
    }
    match socket_gid {
        Some(gid) => {
            set(&dir, gid, 0o750)?;
            banger_host::sshkey::ensure(&key, "banger-group")?;
            fsutil::set_owner_mode(&key, 0, gid, 0o640)?;
            fsutil::set_owner_mode(&public, 0, gid, 0o644)?;
        }
        None => {
            set(&dir, 0, 0o700)?;
            fsutil::remove_file_if_exists(&key)?;
            fsutil::remove_file_if_exists(&public)?;
        }
    }
    Ok(())
}

/// The socket group's client key.
pub fn group_key(l: &Layout) -> PathBuf {
    l.client_key().with_file_name("id_ed25519.group")
}

/// An image dir as a VMM may pass it: search only, the files root's (an
/// older banger's images group loses them). A file some running VM's uid
/// may read (an ACL entry: `resources::jail`) keeps the mask that lets it.
pub fn share_image(dir: &Path) -> Result<()> {
    set(dir, 0, 0o711)?;
    for e in std::fs::read_dir(dir).with_path("list", dir)? {
        let p = e.with_path("list", dir)?.path();
        let m = p.symlink_metadata().with_path("stat", &p)?;
        if m.is_file() {
            // Under the file's ACL lock: a grant of another daemon's (a
            // hard link's) must not lose its mask between the two steps.
            let f = banger_host::acl::AclFile::open(&p)?;
            // A filesystem without ACLs has no grants (a VM that needs one
            // is refused at its start, naming why).
            let granted = match f.users() {
                Ok(u) => !u.is_empty(),
                Err(e) => {
                    tracing::warn!(file = %p.display(), err = %e, "cannot read an image file's ACL");
                    false
                }
            };
            f.set_owner_mode(0, 0, if granted { 0o640 } else { 0o600 })?;
        }
    }
    Ok(())
}

/// The first dir above `path` (inclusive) that a user other than root
/// cannot pass through: a confined VMM could not reach its files.
pub fn unreachable_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|a| a.metadata().map(|m| m.mode() & 0o001 == 0).unwrap_or(true))
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> (u32, u32) {
        let m = std::fs::metadata(p).unwrap();
        (m.gid(), m.permissions().mode() & 0o7777)
    }

    #[test]
    fn what_a_vmm_may_pass_read_or_never_see() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let l = Layout::new(d.path().join("state"), d.path().join("run"));
        let img = l.image_dir("bookworm");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(img.join("rootfs.ext4"), "x").unwrap();
        std::fs::create_dir_all(&l.state_dir).unwrap();
        std::fs::write(l.db(), "").unwrap();
        std::fs::write(img.join("vmlinux"), "x").unwrap();
        // An older banger's: the images group read them.
        for f in ["rootfs.ext4", "vmlinux"] {
            fsutil::set_owner_mode(&img.join(f), 0, 4242, 0o640).unwrap();
        }
        // A running VM's uid may read one of them.
        let acls = banger_host::acl::grant_read(&img.join("vmlinux"), 4_000_007).is_ok();
        prepare(&l, None).unwrap();
        assert_eq!(mode(&l.state_dir).1, 0o711);
        assert_eq!(mode(&l.vms_dir()).1, 0o711);
        assert_eq!(mode(&l.ssh_dir()).1, 0o700);
        assert_eq!(mode(&l.db()).1, 0o600);
        assert_eq!(mode(&l.images_dir()), (0, 0o711));
        assert_eq!(mode(&img), (0, 0o711));
        assert_eq!(mode(&img.join("rootfs.ext4")), (0, 0o600));
        if acls {
            assert_eq!(
                mode(&img.join("vmlinux")),
                (0, 0o640),
                "the grant's mask kept"
            );
            assert_eq!(
                banger_host::acl::users(&img.join("vmlinux")).unwrap(),
                vec![4_000_007]
            );
        }
        // The tempdir itself is 0700: a VMM could not get in.
        assert_eq!(
            unreachable_ancestor(&l.vms_dir()).as_deref(),
            Some(d.path())
        );
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(unreachable_ancestor(&l.vms_dir()), None);
    }

    #[test]
    fn a_group_key_copied_from_roots_is_replaced_with_roots() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path().join("s"), d.path().join("r"));
        std::fs::create_dir_all(l.ssh_dir()).unwrap();
        banger_host::sshkey::ensure(&l.client_key(), "banger").unwrap();
        let roots = std::fs::read(l.client_key()).unwrap();
        // What the build before did: a byte copy, no .pub.
        std::fs::write(group_key(&l), &roots).unwrap();
        share_client_key(&l, Some(4242)).unwrap();
        let (client, group) = (
            std::fs::read(l.client_key()).unwrap(),
            std::fs::read(group_key(&l)).unwrap(),
        );
        assert_ne!(client, roots, "root's key is made again");
        assert_ne!(group, roots);
        assert_ne!(group, client);
        assert!(banger_host::sshkey::pub_path(&l.client_key()).exists());
        assert!(banger_host::sshkey::pub_path(&group_key(&l)).exists());
        assert_eq!(mode(&group_key(&l)), (4242, 0o640));
        // A group key of its own is kept.
        share_client_key(&l, Some(4242)).unwrap();
        assert_eq!(std::fs::read(group_key(&l)).unwrap(), group);
        assert_eq!(std::fs::read(l.client_key()).unwrap(), client);
        // A copy with a .pub (the bytes alone say it is root's).
        std::fs::write(group_key(&l), &client).unwrap();
        share_client_key(&l, Some(4242)).unwrap();
        let again = std::fs::read(l.client_key()).unwrap();
        assert_ne!(again, client, "root's key is made again");
        assert_ne!(std::fs::read(group_key(&l)).unwrap(), again);
    }
}
