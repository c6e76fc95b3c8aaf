//! The durable record: SQLite in WAL mode, one `vms` row per VM (its spec
//! and its `runtime_json`, the seeds' VMRuntime) and one `images` row per
//! built image. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`.

use std::path::{Path, PathBuf};

use banger_core::{Held, ImageRecord, Release, VmRecord, VmRuntime, VmSpec};
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

mod owners;
mod snapshots;
mod tokens;

pub use owners::{Owned, Owner};
pub use tokens::ApiToken;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database row for {what}: bad JSON: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("vm {0:?} already exists: pick another name or delete it first")]
    NameTaken(String),
    #[error(
        "an API token named {0:?} exists already: pick another name or `banger api token rm {0}`"
    )]
    TokenTaken(String),
    #[error("database schema version {0} is newer than this banger ({1}): upgrade banger")]
    TooNew(i64, i64),
}

const MIGRATIONS: &[&str] = &[
    // 1: VMs and images.
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec_json TEXT NOT NULL,
        runtime_json TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     );
     CREATE TABLE images (
        name TEXT PRIMARY KEY,
        dir TEXT NOT NULL,
        kernel TEXT NOT NULL,
        initrd TEXT NOT NULL,
        rootfs TEXT NOT NULL,
        rootfs_bytes INTEGER NOT NULL,
        kernel_version TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 2: kernel objects of gone VMMs still to be released (taps, NAT rules).
    "CREATE TABLE releases (
        vm_id TEXT PRIMARY KEY,
        vm_name TEXT NOT NULL,
        tap TEXT NOT NULL,
        guest_ip TEXT,
        vmm_pid INTEGER,
        vmm_needle TEXT,
        created_at INTEGER NOT NULL
     );",
    // 3: releases as a list of typed items (one per resource module), so
    // that a new kind of resource needs no migration; several records per
    // VM. Rows of version 2 become their NAT rules, tap and address.
    "CREATE TABLE releases_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        vm_name TEXT NOT NULL,
        items_json TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     INSERT INTO releases_v3 (vm_id, vm_name, items_json, created_at)
       SELECT vm_id, vm_name, json_array(
           json_object('resource', 'nat', 'data', json_object('vm_id', vm_id)),
           json_object('resource', 'tap', 'data', json_object('name', tap)),
           json_object('resource', 'address', 'data', json_object('ip', guest_ip))),
         created_at
       FROM releases;
     DROP TABLE releases;
     ALTER TABLE releases_v3 RENAME TO releases;
     CREATE INDEX releases_vm ON releases (vm_id);",
    // 4: who made an image or a volume (no row: root), and whether only
    // root may use it (it holds what a VM only root may use could see).
    "CREATE TABLE owners (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        uid INTEGER NOT NULL,
        root_only INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, name)
     );",
    // 5: who else an owner lets use what is theirs (`banger network
    // share`).
    "CREATE TABLE shares (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        uid INTEGER NOT NULL,
        PRIMARY KEY (kind, name, uid)
     );",
    // 6: snapshots (`vm snapshot`), each a JSON record.
    "CREATE TABLE snapshots (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        record_json TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 7: the E2B-compatible API's keys (`banger api token`), each its
    // user's, stored as a SHA-256 of the key.
    "CREATE TABLE api_tokens (
        uid INTEGER NOT NULL,
        name TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (uid, name)
     );",
];

/// A `vms` row that does not decode (written by a newer banger, or damaged):
/// listed with the reason, deletable, otherwise left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenVm {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub reason: String,
}

/// A `vms` row as stored: id, name, spec JSON, runtime JSON, created_at.
type RawVm = (String, String, String, String, i64);

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> StoreError + '_ {
    move |source| StoreError::Json {
        what: what.to_string(),
        source,
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let latest = MIGRATIONS.len() as i64;
        if version > latest {
            return Err(StoreError::TooNew(version, latest));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Runs one SQL statement as is; returns the rows changed. For tests
    /// that damage a database on purpose.
    #[doc(hidden)]
    pub fn raw_execute(&self, sql: &str) -> Result<usize, StoreError> {
        Ok(self.conn.execute(sql, [])?)
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let spec = serde_json::to_string(&vm.spec).map_err(json_err(&vm.name))?;
        let rt = serde_json::to_string(&vm.runtime).map_err(json_err(&vm.name))?;
        let r = self.conn.execute(
            "INSERT INTO vms (id, name, spec_json, runtime_json, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                vm.id,
                vm.name,
                spec,
                rt,
                vm.created_at,
                banger_core::unix_now()
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::NameTaken(vm.name.clone()))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    /// A VM's spec changes only where the user asks (published ports).
    pub fn update_spec(&self, id: &str, spec: &VmSpec) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(json_err(id))?;
        self.conn.execute(
            "UPDATE vms SET spec_json = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, spec, banger_core::unix_now()],
        )?;
        Ok(())
    }

    pub fn update_runtime(&self, id: &str, rt: &VmRuntime) -> Result<(), StoreError> {
        let rt = serde_json::to_string(rt).map_err(json_err(id))?;
        self.conn.execute(
            "UPDATE vms SET runtime_json = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, rt, banger_core::unix_now()],
        )?;
        Ok(())
    }

    fn row_to_vm(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawVm> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        ))
    }

    fn decode(raw: RawVm) -> Result<VmRecord, StoreError> {
        let (id, name, spec, rt, created_at) = raw;
        let spec: VmSpec = serde_json::from_str(&spec).map_err(json_err(&name))?;
        let runtime: VmRuntime = serde_json::from_str(&rt).map_err(json_err(&name))?;
        Ok(VmRecord {
            id,
            name,
            spec,
            runtime,
            created_at,
        })
    }

    const VM_COLS: &'static str = "SELECT id, name, spec_json, runtime_json, created_at FROM vms";

    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let raw = self
            .conn
            .query_row(
                &format!("{} WHERE name = ?1", Self::VM_COLS),
                [name],
                Self::row_to_vm,
            )
            .optional()?;
        raw.map(Self::decode).transpose()
    }

    fn raw_vms(&self) -> Result<Vec<RawVm>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{} ORDER BY created_at, name", Self::VM_COLS))?;
        let rows = stmt.query_map([], Self::row_to_vm)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every VM whose row decodes; see [`Store::broken_vms`] for the rest.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self
            .raw_vms()?
            .into_iter()
            .filter_map(|raw| Self::decode(raw).ok())
            .collect())
    }

    /// The rows that do not decode, with the reason.
    pub fn broken_vms(&self) -> Result<Vec<BrokenVm>, StoreError> {
        let mut out = Vec::new();
        for raw in self.raw_vms()? {
            let (id, name, created_at) = (raw.0.clone(), raw.1.clone(), raw.4);
            if let Err(e) = Self::decode(raw) {
                out.push(BrokenVm {
                    id,
                    name,
                    created_at,
                    reason: e.to_string(),
                });
            }
        }
        Ok(out)
    }

    pub fn delete_vm(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }

    /// Records what a VM leaves to release; returns the record's id.
    pub fn insert_release(&self, r: &Release) -> Result<i64, StoreError> {
        let items = serde_json::to_string(&r.items).map_err(json_err(&r.vm_name))?;
        self.conn.execute(
            "INSERT INTO releases (vm_id, vm_name, items_json, created_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![r.vm_id, r.vm_name, items, banger_core::unix_now()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// What is left of a release after some of its items were done.
    pub fn update_release_items(&self, id: i64, items: &[Held]) -> Result<(), StoreError> {
        let items = serde_json::to_string(items).map_err(json_err("release"))?;
        self.conn.execute(
            "UPDATE releases SET items_json = ?2 WHERE id = ?1",
            params![id, items],
        )?;
        Ok(())
    }

    pub fn delete_release(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM releases WHERE id = ?1", [id])?
            > 0)
    }

    /// The VM's pending releases, oldest first.
    pub fn releases_of(&self, vm_id: &str) -> Result<Vec<Release>, StoreError> {
        Ok(self
            .list_releases()?
            .into_iter()
            .filter(|r| r.vm_id == vm_id)
            .collect())
    }

    pub fn list_releases(&self) -> Result<Vec<Release>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, vm_id, vm_name, items_json FROM releases ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, vm_id, vm_name, items) = row?;
            let items: Vec<Held> = serde_json::from_str(&items).map_err(json_err(&vm_name))?;
            out.push(Release {
                id,
                vm_id,
                vm_name,
                items,
            });
        }
        Ok(out)
    }

    pub fn vm_count(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM vms", [], |r| r.get(0))?)
    }

    pub fn upsert_image(&self, img: &ImageRecord) -> Result<(), StoreError> {
        let p = |p: &Path| p.to_string_lossy().into_owned();
        self.conn.execute(
            "INSERT INTO images (name, dir, kernel, initrd, rootfs, rootfs_bytes, kernel_version, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET dir=excluded.dir, kernel=excluded.kernel,
               initrd=excluded.initrd, rootfs=excluded.rootfs, rootfs_bytes=excluded.rootfs_bytes,
               kernel_version=excluded.kernel_version, created_at=excluded.created_at",
            params![
                img.name,
                p(&img.dir),
                p(&img.kernel),
                p(&img.initrd),
                p(&img.rootfs),
                img.rootfs_bytes as i64,
                img.kernel_version,
                img.created_at
            ],
        )?;
        Ok(())
    }

    fn row_to_image(row: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
        let path = |i| row.get::<_, String>(i).map(PathBuf::from);
        Ok(ImageRecord {
            name: row.get(0)?,
            dir: path(1)?,
            kernel: path(2)?,
            initrd: path(3)?,
            rootfs: path(4)?,
            rootfs_bytes: row.get::<_, i64>(5)? as u64,
            kernel_version: row.get(6)?,
            created_at: row.get(7)?,
        })
    }

    const IMAGE_COLS: &'static str =
        "SELECT name, dir, kernel, initrd, rootfs, rootfs_bytes, kernel_version, created_at FROM images";

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{} WHERE name = ?1", Self::IMAGE_COLS),
                [name],
                Self::row_to_image,
            )
            .optional()?)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{} ORDER BY name", Self::IMAGE_COLS))?;
        let rows = stmt.query_map([], Self::row_to_image)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The image's row and its owner's.
    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        self.forget_owner(Owned::Image, name)?;
        Ok(self
            .conn
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }

    /// Names of VMs that use the image.
    pub fn vms_using_image(&self, image: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_vms()?
            .into_iter()
            .filter(|v| v.spec.image == image)
            .map(|v| v.name)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use banger_core::sizing::Sizing;
    use banger_core::{VmState, VmmKind};

    use super::*;

    fn vm(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            spec: VmSpec {
                sizing: Sizing {
                    cpus: 1,
                    memory_mib: 512,
                    disk_mib: 1024,
                },
                image: "bookworm".into(),
                vmm: VmmKind::Qemu,
                accel: "tcg".into(),
                auto_stop: Default::default(),
                net: Default::default(),
                volumes: Default::default(),
                mounts: Vec::new(),
                root_mib: None,
                root_disk: None,
                from_snapshot: None,
                metadata: Default::default(),
                env: Vec::new(),
            },
            runtime: VmRuntime {
                state: Some(VmState::Created),
                guest_ip: Some("172.30.0.6".into()),
                ..Default::default()
            },
            created_at: 1,
        }
    }

    #[test]
    fn vm_rows_round_trip() {
        let s = Store::open_in_memory().unwrap();
        let a = vm("aaaa", "alpha");
        s.insert_vm(&a).unwrap();
        assert_eq!(s.vm_by_name("alpha").unwrap(), Some(a.clone()));
        assert_eq!(s.vm_by_name("nope").unwrap(), None);
        let mut rt = a.runtime.clone();
        rt.state = Some(VmState::Running);
        rt.tap_device = Some("bgtap0".into());
        s.update_runtime("aaaa", &rt).unwrap();
        assert_eq!(s.vm_by_name("alpha").unwrap().unwrap().runtime, rt);
        assert!(s.delete_vm("aaaa").unwrap());
        assert!(!s.delete_vm("aaaa").unwrap());
        assert_eq!(s.vm_count().unwrap(), 0);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let s = Store::open_in_memory().unwrap();
        s.insert_vm(&vm("a1", "dup")).unwrap();
        let e = s.insert_vm(&vm("a2", "dup")).unwrap_err();
        assert!(
            matches!(e, StoreError::NameTaken(ref n) if n == "dup"),
            "{e}"
        );
        assert_eq!(s.list_vms().unwrap().len(), 1);
    }

    #[test]
    fn runtime_json_upgrades_from_older_rows() {
        // A row written before tap_device existed still decodes.
        let rt: VmRuntime = serde_json::from_str(r#"{"state":"stopped"}"#).unwrap();
        assert_eq!(rt.state(), VmState::Stopped);
        assert_eq!(rt.tap_device, None);
        let s = serde_json::to_string(&VmRuntime::default()).unwrap();
        assert!(!s.contains("tap_device"), "omitted when empty: {s}");
    }

    #[test]
    fn releases_round_trip_as_typed_items() {
        let s = Store::open_in_memory().unwrap();
        let held = |resource: &str, data: serde_json::Value| Held {
            resource: resource.into(),
            data,
        };
        let mut r = Release {
            id: 0,
            vm_id: "a1".into(),
            vm_name: "one".into(),
            items: vec![
                held("nat", serde_json::json!({"vm_id": "a1"})),
                held("tap", serde_json::json!({"name": "bgtap0"})),
            ],
        };
        r.id = s.insert_release(&r).unwrap();
        let mut r2 = r.clone();
        r2.items.truncate(1);
        r2.id = s.insert_release(&r2).unwrap();
        assert_ne!(r.id, r2.id);
        assert_eq!(s.releases_of("a1").unwrap(), vec![r.clone(), r2.clone()]);
        s.update_release_items(r.id, &r.items[1..]).unwrap();
        assert_eq!(s.list_releases().unwrap()[0].items, r.items[1..].to_vec());
        assert_eq!(
            s.list_releases().unwrap()[0].item("tap"),
            Some(&serde_json::json!({"name": "bgtap0"}))
        );
        assert!(s.delete_release(r.id).unwrap());
        assert!(!s.delete_release(r.id).unwrap());
        assert!(s.delete_release(r2.id).unwrap());
        assert!(s.releases_of("a1").unwrap().is_empty());
    }

    #[test]
    fn version_2_releases_become_typed_items() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("old.db");
        {
            let conn = Connection::open(&p).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO releases VALUES ('v1', 'old', 'bgtap4', '172.30.0.6', NULL, NULL, 7)",
                [],
            )
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let r = s.list_releases().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].vm_name, "old");
        let kinds: Vec<&str> = r[0].items.iter().map(|h| h.resource.as_str()).collect();
        assert_eq!(kinds, ["nat", "tap", "address"]);
        assert_eq!(r[0].item("tap").unwrap()["name"], "bgtap4");
        assert_eq!(r[0].item("address").unwrap()["ip"], "172.30.0.6");
    }

    #[test]
    fn an_undecodable_row_is_listed_as_broken_and_the_rest_work() {
        let s = Store::open_in_memory().unwrap();
        s.insert_vm(&vm("good", "fine")).unwrap();
        s.insert_vm(&vm("bad", "mangled")).unwrap();
        s.conn
            .execute(
                "UPDATE vms SET spec_json = '{\"from\":\"the future\"}' WHERE id = 'bad'",
                [],
            )
            .unwrap();
        let vms = s.list_vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "fine");
        let broken = s.broken_vms().unwrap();
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].name, "mangled");
        assert!(broken[0].reason.contains("mangled"), "{}", broken[0].reason);
        assert!(s.vm_by_name("mangled").is_err());
        assert!(s.delete_vm("bad").unwrap());
        assert!(s.broken_vms().unwrap().is_empty());
    }

    #[test]
    fn migrations_persist_and_wal_is_on() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.db");
        {
            let s = Store::open(&p).unwrap();
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
            s.insert_vm(&vm("x", "kept")).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert!(s.vm_by_name("kept").unwrap().is_some());
        let mode: String = s
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        s.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        assert!(matches!(Store::open(&p), Err(StoreError::TooNew(99, _))));
    }

    #[test]
    fn owners_default_to_root_and_root_only_sticks() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.owner(Owned::Image, "a").unwrap(), Owner::default());
        let alice = Owner {
            uid: 4321,
            root_only: false,
        };
        s.set_owner(Owned::Volume, "a", alice).unwrap();
        assert_eq!(s.owner(Owned::Volume, "a").unwrap(), alice);
        assert_eq!(s.owner(Owned::Image, "a").unwrap(), Owner::default());
        s.mark_root_only(Owned::Volume, "a").unwrap();
        assert_eq!(
            s.owner(Owned::Volume, "a").unwrap(),
            Owner {
                uid: 4321,
                root_only: true
            }
        );
        s.mark_root_only(Owned::Image, "b").unwrap();
        assert_eq!(s.owner(Owned::Image, "b").unwrap().uid, 0);
        s.forget_owner(Owned::Volume, "a").unwrap();
        assert_eq!(s.owner(Owned::Volume, "a").unwrap(), Owner::default());
    }

    #[test]
    fn images() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageRecord {
            name: "bookworm".into(),
            dir: "/s/images/bookworm".into(),
            kernel: "/s/images/bookworm/vmlinux".into(),
            initrd: "/s/images/bookworm/initrd.img".into(),
            rootfs: "/s/images/bookworm/rootfs.ext4".into(),
            rootfs_bytes: 1 << 30,
            kernel_version: "6.1.0".into(),
            created_at: 5,
        };
        s.upsert_image(&img).unwrap();
        s.upsert_image(&img).unwrap();
        assert_eq!(s.image("bookworm").unwrap(), Some(img.clone()));
        assert_eq!(s.list_images().unwrap().len(), 1);
        s.insert_vm(&vm("v", "user")).unwrap();
        assert_eq!(s.vms_using_image("bookworm").unwrap(), vec!["user"]);
        assert!(s.delete_image("bookworm").unwrap());
    }
}
