//! The E2B-compatible API's keys (`api_tokens`): each bound to the local
//! user who made it, stored only as a SHA-256 of the key (the key itself
//! is shown once, when made).

use rusqlite::params;

use crate::{Store, StoreError};

/// One key's row (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub uid: u32,
    pub name: String,
    /// SHA-256 of the key.
    pub hash: Vec<u8>,
    pub created_at: i64,
}

impl Store {
    /// Records a key's hash for `uid` under `name` (refused when the user
    /// has a key of that name).
    pub fn insert_token(&self, t: &ApiToken) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO api_tokens (uid, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.uid, t.name, t.hash, t.created_at],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::TokenTaken(t.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every key's row (all users' when `uid` is `None`), by user and name.
    pub fn list_tokens(&self, uid: Option<u32>) -> Result<Vec<ApiToken>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT uid, name, hash, created_at FROM api_tokens
             WHERE ?1 IS NULL OR uid = ?1 ORDER BY uid, name",
        )?;
        let rows = st.query_map(params![uid], |r| {
            Ok(ApiToken {
                uid: r.get(0)?,
                name: r.get(1)?,
                hash: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes `uid`'s key `name`; whether there was one.
    pub fn delete_token(&self, uid: u32, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM api_tokens WHERE uid = ?1 AND name = ?2",
            params![uid, name],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_each_users_and_names_unique_per_user() {
        let s = Store::open_in_memory().unwrap();
        let t = |uid, name: &str, h: u8| ApiToken {
            uid,
            name: name.into(),
            hash: vec![h; 32],
            created_at: 1,
        };
        s.insert_token(&t(0, "ci", 1)).unwrap();
        s.insert_token(&t(1000, "ci", 2)).unwrap();
        let e = s.insert_token(&t(0, "ci", 3)).unwrap_err().to_string();
        assert!(e.contains("\"ci\" exists already"), "{e}");
        assert_eq!(s.list_tokens(None).unwrap().len(), 2);
        assert_eq!(s.list_tokens(Some(1000)).unwrap()[0].hash, vec![2; 32]);
        assert!(!s.delete_token(1000, "other").unwrap());
        assert!(s.delete_token(1000, "ci").unwrap());
        assert_eq!(s.list_tokens(Some(1000)).unwrap(), vec![]);
    }
}
