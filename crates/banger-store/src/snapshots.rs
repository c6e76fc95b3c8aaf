//! Snapshots (`vm snapshot`): one row each, the record as JSON. A row is
//! written only once every file of the snapshot is on disk, so that a
//! crash leaves no half snapshot listed (only a directory the daemon's
//! start removes).

use banger_core::SnapshotRecord;
use rusqlite::{params, OptionalExtension};

use crate::{Owned, Owner, Store, StoreError};

impl Store {
    /// Records a snapshot and its owner, in one transaction; a name
    /// already taken is refused.
    pub fn insert_snapshot(&self, s: &SnapshotRecord, owner: Owner) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        self.insert_snapshot_row(s)?;
        self.set_owner(Owned::Snapshot, &s.name, owner)?;
        tx.commit()?;
        Ok(())
    }

    fn insert_snapshot_row(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(s).map_err(|source| StoreError::Json {
            what: format!("snapshot {}", s.name),
            source,
        })?;
        match self.conn.execute(
            "INSERT INTO snapshots (name, id, record_json, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![s.name, s.id, json, s.created_at],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::NameTaken(s.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn decode_snapshot(name: &str, json: &str) -> Result<SnapshotRecord, StoreError> {
        serde_json::from_str(json).map_err(|source| StoreError::Json {
            what: format!("snapshot {name}"),
            source,
        })
    }

    pub fn snapshot(&self, name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT record_json FROM snapshots WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| Self::decode_snapshot(name, &j)).transpose()
    }

    /// Every snapshot, by name; a row that does not decode is an error
    /// naming it.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, record_json FROM snapshots ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json) = row?;
            out.push(Self::decode_snapshot(&name, &json)?);
        }
        Ok(out)
    }

    /// The ids of every recorded snapshot (decoded or not): what the
    /// daemon's start keeps of the snapshots directory.
    pub fn snapshot_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id FROM snapshots")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The snapshot's row and its owner's, in one transaction.
    pub fn delete_snapshot(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let gone = self
            .conn
            .execute("DELETE FROM snapshots WHERE name = ?1", [name])?
            > 0;
        self.forget_owner(Owned::Snapshot, name)?;
        tx.commit()?;
        Ok(gone)
    }

    /// Names of snapshots whose VM was made from `image`.
    pub fn snapshots_using_image(&self, image: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.spec.image == image)
            .map(|s| s.name)
            .collect())
    }

    /// Names of VMs whose next start restores `snapshot`.
    pub fn vms_restoring(&self, snapshot: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_vms()?
            .into_iter()
            .filter(|v| v.runtime.restore.as_deref() == Some(snapshot))
            .map(|v| v.name)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use banger_core::sizing::Sizing;
    use banger_core::{SnapshotFile, SnapshotFormat, VmSpec, VmmKind};

    use super::*;

    fn snap(name: &str, id: &str, image: &str) -> SnapshotRecord {
        SnapshotRecord {
            name: name.into(),
            id: id.into(),
            dir: format!("/s/{id}").into(),
            vm: "origin".into(),
            spec: VmSpec {
                sizing: Sizing {
                    cpus: 1,
                    memory_mib: 512,
                    disk_mib: 1024,
                },
                image: image.into(),
                vmm: VmmKind::Qemu,
                accel: "tcg".into(),
                auto_stop: Default::default(),
                net: Default::default(),
                root_mib: None,
                volumes: Vec::new(),
                mounts: Vec::new(),
                root_disk: None,
                from_snapshot: None,
                metadata: Default::default(),
                env: Vec::new(),
            },
            format: SnapshotFormat {
                banger: "1".into(),
                mux: 1,
                vmm_version: "7.2.0".into(),
            },
            files: vec![SnapshotFile {
                name: "state".into(),
                bytes: 3,
            }],
            state_crc32: 7,
            created_at: 5,
        }
    }

    #[test]
    fn snapshots_round_trip_and_names_are_unique() {
        let s = Store::open_in_memory().unwrap();
        let a = snap("a", "id-a", "bookworm");
        s.insert_snapshot(&a, Owner::default()).unwrap();
        s.insert_snapshot(&snap("b", "id-b", "alpine"), Owner::default())
            .unwrap();
        assert_eq!(s.snapshot("a").unwrap(), Some(a));
        assert!(matches!(
            s.insert_snapshot(&snap("a", "id-c", "bookworm"), Owner::default()),
            Err(StoreError::NameTaken(n)) if n == "a"
        ));
        assert_eq!(s.snapshots_using_image("bookworm").unwrap(), vec!["a"]);
        let mut ids = s.snapshot_ids().unwrap();
        ids.sort();
        assert_eq!(ids, vec!["id-a", "id-b"]);
        assert!(s.delete_snapshot("a").unwrap());
        assert!(!s.delete_snapshot("a").unwrap());
        assert_eq!(s.list_snapshots().unwrap().len(), 1);
        assert!(s.snapshot("a").unwrap().is_none());
    }
}
