//! The embedded backend: one redb file, one write transaction per change (so a compare-and-swap
//! reads and writes under redb's single writer lock), run on tokio's blocking pool.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::nonce::{self, Nonce};
use super::{
    CasOutcome, DeleteOutcome, Entry, Expected, Key, KeyPrefix, Listing, Repository, Result,
    Revision, StoreError, check_limit, check_value,
};

/// key -> (revision, value).
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// `revision` -> the last revision given out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
/// nonce -> expiry (ms since the Unix epoch).
const NONCES: TableDefinition<&[u8], u64> = TableDefinition::new("nonces");
/// (expiry, nonce) -> (): the nonces in expiry order, for sweeping.
const NONCE_EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("nonce_expiry");

/// How many expired nonces one [`RedbStore::nonce_issue`] removes at most: more than it adds,
/// so expired nonces never pile up, and few enough that one issue stays quick.
const SWEEP_BATCH: usize = 64;

/// The page cache redb may fill (its default is 1 GiB).
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A store in one redb file. Clones share the open database; a second [`RedbStore::open`] of the
/// same file, from this process or another, fails while one is open.
#[derive(Debug, Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
}

impl Inner {
    /// Wraps a redb error with the file and the operation.
    fn err<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> StoreError + '_ {
        move |source| redb_error(&self.path, op, source)
    }

    fn write(&self, op: &'static str) -> Result<WriteTransaction> {
        self.db.begin_write().map_err(self.err(op))
    }
}

fn redb_error(path: &Path, op: &'static str, source: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb {
        path: path.to_owned(),
        op,
        source: Box::new(source.into()),
    }
}

/// Runs `work` on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let handle = tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
    handle
        .spawn_blocking(work)
        .await
        .map_err(StoreError::Task)?
}

impl RedbStore {
    /// Opens the redb file at `path`, creating it (and its tables) when missing.
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_owned();
        blocking(move || {
            let db = redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                // The format redb 3 reads too, so a later upgrade keeps the file.
                .create_with_file_format_v3(true)
                .create(&path)
                .map_err(|e| redb_error(&path, "open", e))?;
            let inner = Inner { db, path };
            let txn = inner.write("create tables")?;
            txn.open_table(KV).map_err(inner.err("create tables"))?;
            txn.open_table(META).map_err(inner.err("create tables"))?;
            txn.open_table(NONCES).map_err(inner.err("create tables"))?;
            txn.open_table(NONCE_EXPIRY)
                .map_err(inner.err("create tables"))?;
            txn.commit().map_err(inner.err("create tables"))?;
            log::info!("store: redb {}", inner.path.display());
            Ok(Self {
                inner: Arc::new(inner),
            })
        })
        .await
    }

    /// The file this store keeps its data in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `work` with the database on tokio's blocking pool.
    async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || work(&inner)).await
    }

    /// How many nonces the file holds, expired ones included (for tests of the sweep).
    #[cfg(test)]
    async fn nonce_count(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        self.run(|inner| {
            let txn = inner.db.begin_read().map_err(inner.err("count nonces"))?;
            let nonces = txn.open_table(NONCES).map_err(inner.err("count nonces"))?;
            let index = txn
                .open_table(NONCE_EXPIRY)
                .map_err(inner.err("count nonces"))?;
            let count = nonces.len().map_err(inner.err("count nonces"))?;
            let indexed = index.len().map_err(inner.err("count nonces"))?;
            if count != indexed {
                return Err(StoreError::Corrupt {
                    location: "nonce tables".to_owned(),
                    reason: format!("{count} nonces but {indexed} expiry entries"),
                });
            }
            Ok(count)
        })
        .await
    }
}

/// A stored revision number as a [`Revision`]; 0 was never written.
fn stored_revision(key: &str, number: u64) -> Result<Revision> {
    Revision::new(number).ok_or_else(|| StoreError::Corrupt {
        location: format!("key {key:?}"),
        reason: "revision 0".to_owned(),
    })
}

/// The next revision, counted in the `meta` table of `txn`.
fn next_revision(inner: &Inner, txn: &WriteTransaction) -> Result<Revision> {
    let mut meta = txn.open_table(META).map_err(inner.err("next revision"))?;
    let last = meta
        .get(META_REVISION)
        .map_err(inner.err("next revision"))?
        .map_or(0, |guard| guard.value());
    let next = last
        .checked_add(1)
        .and_then(Revision::new)
        .ok_or(StoreError::RevisionsExhausted)?;
    meta.insert(META_REVISION, next.get())
        .map_err(inner.err("next revision"))?;
    Ok(next)
}

/// The revision of `key` in `txn`, or None.
fn current_revision(inner: &Inner, txn: &WriteTransaction, key: &str) -> Result<Option<Revision>> {
    let kv = txn.open_table(KV).map_err(inner.err("read"))?;
    let stored = kv.get(key).map_err(inner.err("read"))?;
    stored
        .map(|guard| stored_revision(key, guard.value().0))
        .transpose()
}

/// Writes `value` at the next revision in `txn`.
fn write_value(inner: &Inner, txn: &WriteTransaction, key: &str, value: &[u8]) -> Result<Revision> {
    let revision = next_revision(inner, txn)?;
    let mut kv = txn.open_table(KV).map_err(inner.err("write"))?;
    kv.insert(key, (revision.get(), value))
        .map_err(inner.err("write"))?;
    Ok(revision)
}

/// Removes up to [`SWEEP_BATCH`] nonces that expired before `now_ms`.
fn sweep_expired(inner: &Inner, txn: &WriteTransaction, now_ms: u64) -> Result<usize> {
    let mut index = txn
        .open_table(NONCE_EXPIRY)
        .map_err(inner.err("sweep nonces"))?;
    let mut expired = Vec::new();
    let upper: (u64, &[u8]) = (now_ms, &[]);
    for item in index
        .extract_from_if(..upper, |_, _| true)
        .map_err(inner.err("sweep nonces"))?
        .take(SWEEP_BATCH)
    {
        let (key, _) = item.map_err(inner.err("sweep nonces"))?;
        expired.push(key.value().1.to_vec());
    }
    let mut nonces = txn.open_table(NONCES).map_err(inner.err("sweep nonces"))?;
    for nonce in &expired {
        nonces
            .remove(nonce.as_slice())
            .map_err(inner.err("sweep nonces"))?;
    }
    Ok(expired.len())
}

impl Repository for RedbStore {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let key = key.as_str().to_owned();
        self.run(move |inner| {
            let txn = inner.db.begin_read().map_err(inner.err("get"))?;
            let kv = txn.open_table(KV).map_err(inner.err("get"))?;
            let Some(guard) = kv.get(key.as_str()).map_err(inner.err("get"))? else {
                return Ok(None);
            };
            let (revision, value) = guard.value();
            Ok(Some(Entry {
                value: value.to_vec(),
                revision: stored_revision(&key, revision)?,
            }))
        })
        .await
    }

    async fn put(&self, key: &Key, value: &[u8]) -> Result<Revision> {
        check_value(value)?;
        let key = key.as_str().to_owned();
        let value = value.to_vec();
        self.run(move |inner| {
            let txn = inner.write("put")?;
            let revision = write_value(inner, &txn, &key, &value)?;
            txn.commit().map_err(inner.err("put"))?;
            Ok(revision)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expected: Expected,
        value: &[u8],
    ) -> Result<CasOutcome> {
        check_value(value)?;
        let key = key.as_str().to_owned();
        let value = value.to_vec();
        self.run(move |inner| {
            // One write transaction: redb runs one at a time, so nothing changes the key
            // between this read and the write below.
            let txn = inner.write("compare-and-swap")?;
            let current = current_revision(inner, &txn, &key)?;
            if Expected::from(current) != expected {
                txn.abort().map_err(inner.err("compare-and-swap"))?;
                return Ok(CasOutcome::Conflict { current });
            }
            let revision = write_value(inner, &txn, &key, &value)?;
            txn.commit().map_err(inner.err("compare-and-swap"))?;
            Ok(CasOutcome::Written(revision))
        })
        .await
    }

    async fn delete(&self, key: &Key, expected: Revision) -> Result<DeleteOutcome> {
        let key = key.as_str().to_owned();
        self.run(move |inner| {
            let txn = inner.write("delete")?;
            let current = current_revision(inner, &txn, &key)?;
            if current != Some(expected) {
                txn.abort().map_err(inner.err("delete"))?;
                return Ok(DeleteOutcome::Conflict { current });
            }
            {
                let mut kv = txn.open_table(KV).map_err(inner.err("delete"))?;
                kv.remove(key.as_str()).map_err(inner.err("delete"))?;
            }
            txn.commit().map_err(inner.err("delete"))?;
            Ok(DeleteOutcome::Deleted)
        })
        .await
    }

    async fn list(
        &self,
        prefix: &KeyPrefix,
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Listing> {
        check_limit(limit)?;
        let prefix = prefix.clone();
        let start_after = start_after.map(|key| key.as_str().to_owned());
        self.run(move |inner| {
            let txn = inner.db.begin_read().map_err(inner.err("list"))?;
            let kv = txn.open_table(KV).map_err(inner.err("list"))?;
            let lower = match start_after.as_deref() {
                Some(after) if after >= prefix.as_str() => Bound::Excluded(after),
                _ => Bound::Included(prefix.as_str()),
            };
            let mut entries = Vec::new();
            let mut more = false;
            for item in kv
                .range::<&str>((lower, Bound::Unbounded))
                .map_err(inner.err("list"))?
            {
                let (key, stored) = item.map_err(inner.err("list"))?;
                let key = key.value();
                if !prefix.matches(key) {
                    break;
                }
                if entries.len() == limit {
                    more = true;
                    break;
                }
                let (revision, value) = stored.value();
                let checked = Key::new(key).map_err(|e| StoreError::Corrupt {
                    location: "table kv".to_owned(),
                    reason: e.to_string(),
                })?;
                entries.push((
                    checked,
                    Entry {
                        value: value.to_vec(),
                        revision: stored_revision(key, revision)?,
                    },
                ));
            }
            Ok(Listing { entries, more })
        })
        .await
    }

    async fn nonce_issue(&self, ttl: Duration) -> Result<Nonce> {
        nonce::check_ttl(ttl)?;
        let nonce = Nonce::random()?;
        self.run(move |inner| {
            let now = nonce::now_ms()?;
            let expiry = nonce::expiry_ms(ttl)?;
            let txn = inner.write("issue nonce")?;
            let swept = sweep_expired(inner, &txn, now)?;
            {
                let mut nonces = txn.open_table(NONCES).map_err(inner.err("issue nonce"))?;
                let bytes: &[u8] = nonce.as_bytes();
                if nonces
                    .insert(bytes, expiry)
                    .map_err(inner.err("issue nonce"))?
                    .is_some()
                {
                    return Err(StoreError::Corrupt {
                        location: "table nonces".to_owned(),
                        reason: "a fresh random nonce is already there".to_owned(),
                    });
                }
                let mut index = txn
                    .open_table(NONCE_EXPIRY)
                    .map_err(inner.err("issue nonce"))?;
                index
                    .insert((expiry, bytes), ())
                    .map_err(inner.err("issue nonce"))?;
            }
            txn.commit().map_err(inner.err("issue nonce"))?;
            if swept > 0 {
                log::debug!("store: swept {swept} expired nonces");
            }
            Ok(nonce)
        })
        .await
    }

    async fn nonce_take(&self, nonce: &Nonce) -> Result<()> {
        let nonce = *nonce;
        let expiry = self
            .run(move |inner| {
                let txn = inner.write("take nonce")?;
                let bytes: &[u8] = nonce.as_bytes();
                let expiry = {
                    let mut nonces = txn.open_table(NONCES).map_err(inner.err("take nonce"))?;
                    let removed = nonces.remove(bytes).map_err(inner.err("take nonce"))?;
                    removed.map(|guard| guard.value())
                };
                let Some(expiry) = expiry else {
                    txn.abort().map_err(inner.err("take nonce"))?;
                    return Ok(None);
                };
                {
                    let mut index = txn
                        .open_table(NONCE_EXPIRY)
                        .map_err(inner.err("take nonce"))?;
                    index
                        .remove((expiry, bytes))
                        .map_err(inner.err("take nonce"))?;
                }
                txn.commit().map_err(inner.err("take nonce"))?;
                Ok(Some(expiry))
            })
            .await?;
        // Used up either way: a late nonce is gone too.
        let expiry = expiry.ok_or(StoreError::NonceUnknown)?;
        nonce::check_not_expired(expiry, nonce::now_ms()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap();
        (dir, store)
    }

    /// Issue item 7: expired nonces do not pile up in the redb file. Without the sweep in
    /// `nonce_issue` the file would still hold the expired nonce.
    #[tokio::test]
    async fn item7_redb_issuing_a_nonce_sweeps_expired_ones() {
        let (_dir, store) = store().await;
        let expired = store.nonce_issue(Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let live = store.nonce_issue(Duration::from_secs(60)).await.unwrap();
        assert_eq!(store.nonce_count().await.unwrap(), 1);
        assert!(matches!(
            store.nonce_take(&expired).await,
            Err(StoreError::NonceUnknown)
        ));
        store.nonce_take(&live).await.unwrap();
        assert_eq!(store.nonce_count().await.unwrap(), 0);
    }

    /// One sweep removes at most SWEEP_BATCH nonces, the oldest first, and only expired ones.
    #[tokio::test]
    async fn a_sweep_is_bounded_and_keeps_live_nonces() {
        let (_dir, store) = store().await;
        let mut issued = Vec::new();
        for _ in 0..2 * SWEEP_BATCH + 1 {
            issued.push(store.nonce_issue(Duration::from_secs(60)).await.unwrap());
        }
        let later = nonce::now_ms().unwrap() + 61_000;
        let sweep = |now: u64| {
            let store = store.clone();
            async move {
                store
                    .run(move |inner| {
                        let txn = inner.write("test sweep")?;
                        let swept = sweep_expired(inner, &txn, now)?;
                        txn.commit().map_err(inner.err("test sweep"))?;
                        Ok(swept)
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(sweep(nonce::now_ms().unwrap()).await, 0);
        assert_eq!(
            store.nonce_count().await.unwrap(),
            2 * SWEEP_BATCH as u64 + 1
        );
        assert_eq!(sweep(later).await, SWEEP_BATCH);
        assert_eq!(store.nonce_count().await.unwrap(), SWEEP_BATCH as u64 + 1);
        assert_eq!(sweep(later).await, SWEEP_BATCH);
        assert_eq!(sweep(later).await, 1);
        assert_eq!(sweep(later).await, 0);
        assert_eq!(store.nonce_count().await.unwrap(), 0);
        assert!(matches!(
            store.nonce_take(&issued[0]).await,
            Err(StoreError::NonceUnknown)
        ));
    }
}
