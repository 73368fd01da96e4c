//! The localnet's durable state: named tables of JSON values in an embedded redb database.
//!
//! Owns the database file, its schema version and atomic batches: a [`Batch`] of puts and
//! deletes across tables commits in one durable write transaction, so after a crash (even
//! `kill -9`) the node finds either all of a transaction's effects or none. It names the
//! tables but knows nothing of what their values mean (each is JSON the node decides).

#![forbid(unsafe_code)]

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    BackendError, Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bumped whenever the stored layout changes; a mismatch is refused on open.
pub const SCHEMA_VERSION: u64 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The tables of the localnet, all keyed by text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    System,
    Accounts,
    Models,
    Targets,
    Transactions,
    /// Live objects of the object chain, by id.
    Objects,
    /// Sealed checkpoints, by zero-padded sequence number.
    Checkpoints,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::System,
        Table::Accounts,
        Table::Models,
        Table::Targets,
        Table::Transactions,
        Table::Objects,
        Table::Checkpoints,
    ];

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::System => TableDefinition::new("system"),
            Table::Accounts => TableDefinition::new("accounts"),
            Table::Models => TableDefinition::new("models"),
            Table::Targets => TableDefinition::new("targets"),
            Table::Transactions => TableDefinition::new("transactions"),
            Table::Objects => TableDefinition::new("objects"),
            Table::Checkpoints => TableDefinition::new("checkpoints"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "database {path} has schema version {found}; this build reads version {SCHEMA_VERSION}: start with a new --data-dir"
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("database error: {0}")]
    Db(String),
    #[error("stored value in {table:?}/{key} does not decode: {reason}")]
    Decode {
        table: Table,
        key: String,
        reason: String,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Puts and deletes that commit together.
#[derive(Debug, Default)]
pub struct Batch {
    puts: Vec<(Table, String, Vec<u8>)>,
    deletes: Vec<(Table, String)>,
}

impl Batch {
    pub fn put(&mut self, table: Table, key: impl Into<String>, value: &impl Serialize) {
        let bytes = serde_json::to_vec(value).expect("stored values serialise");
        self.puts.push((table, key.into(), bytes));
    }

    pub fn delete(&mut self, table: Table, key: impl Into<String>) {
        self.deletes.push((table, key.into()));
    }

    /// Appends another batch's writes (they commit together).
    pub fn extend(&mut self, other: Batch) {
        self.puts.extend(other.puts);
        self.deletes.extend(other.deletes);
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Makes the storage a database file lives on: the file itself, or (in tests) a wrapper that
/// fails on demand, as a full disk does.
pub type BackendFactory =
    Arc<dyn Fn(&Path) -> std::io::Result<Box<dyn StorageBackend>> + Send + Sync>;

/// The plain file backend.
pub fn file_backend() -> BackendFactory {
    Arc::new(|path: &Path| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let backend = redb::backends::FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(Box::new(backend) as Box<dyn StorageBackend>)
    })
}

/// A boxed backend, handed to redb (which takes a concrete type). Every call, the file locks
/// included, goes to the inner backend.
#[derive(Debug)]
struct DynBackend(Box<dyn StorageBackend>);

impl StorageBackend for DynBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

pub struct Store {
    /// Always `Some` outside [`Store::reopen`].
    db: Option<Database>,
    path: PathBuf,
    backend: BackendFactory,
}

impl Store {
    /// Opens (or creates) `dir/state.redb` and checks its schema version.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, file_backend())
    }

    /// As [`Store::open`], on the storage `backend` makes.
    pub fn open_with(dir: &Path, backend: BackendFactory) -> Result<Self, StoreError> {
        let path = dir.join("state.redb");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let db = open_database(&path, &backend)?;
        Ok(Store {
            db: Some(db),
            path,
            backend,
        })
    }

    /// Closes and opens the database again. After a failed disk write redb refuses every
    /// further transaction until it is reopened; reopening reads back what is durable.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        // The old handle holds the file lock: it must be gone before the new one opens.
        drop(self.db.take());
        match open_database(&self.path, &self.backend) {
            Ok(db) => {
                self.db = Some(db);
                Ok(())
            }
            Err(e) => {
                // Keep a handle so callers can retry; it fails every transaction meanwhile.
                self.db = open_database(&self.path, &self.backend).ok();
                Err(e)
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.db.is_some()
    }
    /// Commits a batch durably (fsynced before this returns).
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| StoreError::Db("the database could not be reopened".into()))?;
        let txn = db.begin_write().map_err(db_err)?;
        for table in Table::ALL {
            let mut t = txn.open_table(table.definition()).map_err(db_err)?;
            for (_, key, value) in batch.puts.iter().filter(|(tb, ..)| *tb == table) {
                t.insert(key.as_str(), value.as_slice()).map_err(db_err)?;
            }
            for (_, key) in batch.deletes.iter().filter(|(tb, _)| *tb == table) {
                t.remove(key.as_str()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self
            .db
            .as_ref()
            .ok_or_else(|| StoreError::Db("the database could not be reopened".into()))?
            .begin_read()
            .map_err(db_err)?;
        let t = txn.open_table(table.definition()).map_err(db_err)?;
        let Some(v) = t.get(key).map_err(db_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Decode {
                table,
                key: key.to_string(),
                reason: e.to_string(),
            })
    }

    /// Every entry of a table, in key order.
    pub fn load_all<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self
            .db
            .as_ref()
            .ok_or_else(|| StoreError::Db("the database could not be reopened".into()))?
            .begin_read()
            .map_err(db_err)?;
        let t = txn.open_table(table.definition()).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let key = k.value().to_string();
            let value = serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
                table,
                key: key.clone(),
                reason: e.to_string(),
            })?;
            out.push((key, value));
        }
        Ok(out)
    }
}

fn open_database(path: &Path, backend: &BackendFactory) -> Result<Database, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.to_path_buf(),
        reason,
    };
    let storage = backend(path).map_err(|e| open_err(e.to_string()))?;
    let db = Database::builder()
        .create_with_backend(DynBackend(storage))
        .map_err(|e| open_err(e.to_string()))?;
    // An existing database of this schema opens without writing (so it reopens on a full disk).
    let current = {
        let txn = db.begin_read().map_err(db_err)?;
        let found = match txn.open_table(META) {
            Ok(meta) => meta
                .get("schema_version")
                .map_err(db_err)?
                .map(|v| u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8]))),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(db_err(e)),
        };
        match found {
            Some(v) if v != SCHEMA_VERSION => {
                return Err(StoreError::Schema {
                    path: path.to_path_buf(),
                    found: v,
                });
            }
            Some(_) => Table::ALL
                .iter()
                .all(|table| txn.open_table(table.definition()).is_ok()),
            None => false,
        }
    };
    if current {
        return Ok(db);
    }
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let found = meta
            .get("schema_version")
            .map_err(db_err)?
            .map(|v| u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])));
        match found {
            Some(v) if v != SCHEMA_VERSION => {
                return Err(StoreError::Schema {
                    path: path.to_path_buf(),
                    found: v,
                });
            }
            Some(_) => {}
            None => {
                meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
                    .map_err(db_err)?;
            }
        }
        for table in Table::ALL {
            txn.open_table(table.definition()).map_err(db_err)?;
        }
    }
    txn.commit().map_err(db_err)?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut b = Batch::default();
            b.put(Table::Accounts, "a", &5u64);
            b.put(Table::Accounts, "b", &7u64);
            b.put(Table::System, "system", &"state");
            store.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete(Table::Accounts, "a");
            store.commit(b).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all: Vec<(String, u64)> = store.load_all(Table::Accounts).unwrap();
        assert_eq!(all, vec![("b".to_string(), 7)]);
        assert_eq!(
            store
                .get::<String>(Table::System, "system")
                .unwrap()
                .as_deref(),
            Some("state")
        );
        assert_eq!(store.get::<u64>(Table::Models, "x").unwrap(), None);
    }
}
