//! Who owns what (`owners`: images, volumes, networks) and whom an
//! owner lets use it too (`shares`).

use rusqlite::{params, OptionalExtension};

use crate::{Store, StoreError};

/// What an `owners` row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    Image,
    Volume,
    /// A `--network NAME`: whoever put its first VM on it, while it has
    /// VMs.
    Network,
    /// A snapshot (`vm snapshot`).
    Snapshot,
}

impl Owned {
    fn key(self) -> &'static str {
        match self {
            Owned::Image => "image",
            Owned::Volume => "volume",
            Owned::Network => "network",
            Owned::Snapshot => "snapshot",
        }
    }
}

/// Who made an image or a volume (root when nothing is recorded), and
/// whether only root may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    pub uid: u32,
    pub root_only: bool,
}

impl Store {
    /// Root's (not only root's) when no row says otherwise.
    pub fn owner(&self, kind: Owned, name: &str) -> Result<Owner, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT uid, root_only FROM owners WHERE kind = ?1 AND name = ?2",
                params![kind.key(), name],
                |r| {
                    Ok(Owner {
                        uid: r.get(0)?,
                        root_only: r.get(1)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    pub fn set_owner(&self, kind: Owned, name: &str, owner: Owner) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO owners (kind, name, uid, root_only) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, name) DO UPDATE SET uid = ?3, root_only = ?4",
            params![kind.key(), name, owner.uid, owner.root_only],
        )?;
        Ok(())
    }

    /// Only root may use it from now on (its owner stays).
    pub fn mark_root_only(&self, kind: Owned, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO owners (kind, name, uid, root_only) VALUES (?1, ?2, 0, 1)
             ON CONFLICT (kind, name) DO UPDATE SET root_only = 1",
            params![kind.key(), name],
        )?;
        Ok(())
    }

    pub fn forget_owner(&self, kind: Owned, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM owners WHERE kind = ?1 AND name = ?2",
            params![kind.key(), name],
        )?;
        Ok(())
    }

    /// Lets `uid` use what `name` is (its owner's).
    pub fn share(&self, kind: Owned, name: &str, uid: u32) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO shares (kind, name, uid) VALUES (?1, ?2, ?3)",
            params![kind.key(), name, uid],
        )?;
        Ok(())
    }

    /// Whether `uid` was let use it (and is not any more).
    pub fn unshare(&self, kind: Owned, name: &str, uid: u32) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM shares WHERE kind = ?1 AND name = ?2 AND uid = ?3",
            params![kind.key(), name, uid],
        )? > 0)
    }

    /// Whom its owner lets use it, in uid order.
    pub fn shared_with(&self, kind: Owned, name: &str) -> Result<Vec<u32>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT uid FROM shares WHERE kind = ?1 AND name = ?2 ORDER BY uid")?;
        let uids = st
            .query_map(params![kind.key(), name], |r| r.get(0))?
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(uids)
    }

    /// Nobody else may use it (a new owner's shares start empty).
    pub fn forget_shares(&self, kind: Owned, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM shares WHERE kind = ?1 AND name = ?2",
            params![kind.key(), name],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_kept_per_name_and_forgotten_with_their_owner() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("db")).unwrap();
        s.share(Owned::Network, "lab", 1001).unwrap();
        s.share(Owned::Network, "lab", 1000).unwrap();
        s.share(Owned::Network, "lab", 1000).unwrap();
        s.share(Owned::Network, "other", 1002).unwrap();
        assert_eq!(
            s.shared_with(Owned::Network, "lab").unwrap(),
            vec![1000, 1001]
        );
        assert!(s.unshare(Owned::Network, "lab", 1001).unwrap());
        assert!(!s.unshare(Owned::Network, "lab", 1001).unwrap());
        s.forget_shares(Owned::Network, "lab").unwrap();
        assert!(s.shared_with(Owned::Network, "lab").unwrap().is_empty());
        assert_eq!(s.shared_with(Owned::Network, "other").unwrap(), vec![1002]);
    }
}
