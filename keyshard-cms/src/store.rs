//! The attestation repository: one async [`Repository`] trait with two backends, an embedded redb
//! file ([`RedbStore`]) and an etcd v3 cluster ([`EtcdStore`]), chosen by a URL ([`Store::open`]).
//!
//! # What it holds
//!
//! Byte values under string [`Key`]s, each with a [`Revision`], and single-use [`Nonce`]s with an
//! expiry. Values are opaque here; the credential service keeps only ciphertexts and public
//! records in them (never a plaintext share).
//!
//! # Keys
//!
//! A key is 1 to [`MAX_KEY_LEN`] bytes of `A-Z a-z 0-9 - _ . : @ + = ~`, in segments separated by
//! `/`: no empty segment (no leading, trailing or doubled `/`) and no `.` or `..` segment, e.g.
//! `hosts/h1` or `credentials/db/epochs/3`. A [`KeyPrefix`] has the same alphabet, may be empty
//! (everything) and may end with `/`; it is a plain string prefix, so `hosts/h1` also matches
//! `hosts/h10`: end it with `/` to list one level. Where the backends put them:
//!
//! | backend | values | nonces |
//! |---|---|---|
//! | redb | table `kv`: key -> (revision, value); table `meta`: `revision` -> the last revision given out | table `nonces`: nonce -> expiry; table `nonce_expiry`: (expiry, nonce) -> () |
//! | etcd | `keyshard/v1/kv/<key>` | `keyshard/v1/nonce/<64 hex digits>`, value: expiry, under a lease |
//!
//! Expiry is milliseconds since the Unix epoch (wall clock), as 8 bytes big-endian in etcd.
//!
//! # What the operations guarantee
//!
//! - [`Repository::compare_and_swap`] writes only if the key's revision is still the one the caller
//!   read ([`Expected::Revision`]) or the key is still absent ([`Expected::Absent`]); of several
//!   writers racing from the same read, exactly one wins and the others get
//!   [`CasOutcome::Conflict`] with the revision that beat them. redb settles it in one write
//!   transaction, etcd in one transaction comparing the key's mod revision (or version 0).
//!   Revisions only grow, also across a delete and re-create, so an old read never matches again.
//! - [`Repository::delete`] is a compare-and-swap too: it deletes only the revision the caller read.
//! - [`Repository::nonce_take`] succeeds at most once per nonce, across every handle sharing the
//!   store (every CMS replica on one etcd cluster), and never once the nonce's expiry has passed.
//!
//! What they do not guarantee: nothing here orders writes to *different* keys (no multi-key
//! transactions yet); expiry is read from the wall clock of the replica that takes the nonce,
//! so replicas whose clocks disagree by d accept a nonce up to d longer (or shorter); and the
//! number of live nonces is not capped here, so whoever hands them out must rate-limit. redb is
//! one process's file: a second [`Store::open`] of the same file fails ([`StoreError::Redb`]),
//! so replicas that share a store use etcd.
//!
//! # Why async
//!
//! The credential service runs on tokio (axum) and etcd-client is async (tonic), so the trait is
//! async; redb's blocking transactions run on tokio's blocking pool. Every call needs a tokio
//! runtime and fails with [`StoreError::NoRuntime`] outside one.

mod etcd;
mod key;
mod nonce;
mod redb;
mod url;

use std::future::Future;
use std::num::NonZeroU64;
use std::time::Duration;

pub use self::etcd::{EtcdStore, REQUEST_TIMEOUT};
pub use self::key::{Key, KeyPrefix, MAX_KEY_LEN};
pub use self::nonce::{MAX_NONCE_TTL, NONCE_LEN, Nonce};
pub use self::redb::RedbStore;
pub use self::url::{EtcdEndpoint, StoreUrl};

/// The largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// The most entries one [`Repository::list`] returns; page with `start_after` for more.
/// With [`MAX_VALUE_LEN`] it bounds one listing to about 6.5 MiB.
pub const MAX_LIST_LIMIT: usize = 100;

/// What can go wrong in the store. Variants never carry a value's bytes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("a value of {len} bytes is larger than the store's limit of {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error("list limit {limit} is not in 1..={max}")]
    ListLimit { limit: usize, max: usize },
    #[error("nonce lifetime {ttl:?} is not in 1 ms..={max:?}")]
    NonceTtl { ttl: Duration, max: Duration },
    #[error("invalid nonce: {reason}")]
    InvalidNonce { reason: &'static str },
    #[error("nonce unknown or already used")]
    NonceUnknown,
    #[error("nonce expired {late_ms} ms ago")]
    NonceExpired { late_ms: u64 },
    #[error("the system clock is before 1970 or beyond 2^64 ms")]
    Clock,
    #[error("no randomness for a nonce: {0}")]
    Random(getrandom::Error),
    #[error("the store needs a tokio runtime; none is running on this thread")]
    NoRuntime,
    #[error("the store's blocking task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("redb {}: {op}: {source}", path.display())]
    Redb {
        path: std::path::PathBuf,
        op: &'static str,
        source: Box<::redb::Error>,
    },
    #[error("etcd {endpoints}: {op}: {source}")]
    Etcd {
        endpoints: String,
        op: &'static str,
        source: Box<etcd_client::Error>,
    },
    #[error("etcd {endpoints}: {op}: no answer within {timeout:?}")]
    EtcdTimeout {
        endpoints: String,
        op: &'static str,
        timeout: Duration,
    },
    #[error("etcd {endpoints}: {op}: unexpected answer: {reason}")]
    EtcdAnswer {
        endpoints: String,
        op: &'static str,
        reason: String,
    },
    #[error("the store holds something it did not write at {location}: {reason}")]
    Corrupt { location: String, reason: String },
    #[error("the store has given out every revision (2^64)")]
    RevisionsExhausted,
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A key's revision: it changes on every write of the key and only grows. On etcd it is the
/// cluster's mod revision; on redb a counter kept in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(NonZeroU64);

impl Revision {
    /// A revision from its number (0 is not a revision).
    pub fn new(number: u64) -> Option<Self> {
        NonZeroU64::new(number).map(Self)
    }

    /// The revision's number, for a caller that sends it and later hands it back.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A value and the revision it was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No value under the key.
    Absent,
    /// The value at this revision, as the caller read it.
    Revision(Revision),
}

impl From<Option<Revision>> for Expected {
    fn from(revision: Option<Revision>) -> Self {
        revision.map_or(Self::Absent, Self::Revision)
    }
}

/// What a compare-and-swap did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// The value is written at this new revision.
    Written(Revision),
    /// Nothing written: the key is at `current` (None: absent), not what the caller expected.
    Conflict { current: Option<Revision> },
}

/// What a compare-and-swap delete did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// Nothing deleted: the key is at `current` (None: absent), not at the revision expected.
    Conflict {
        current: Option<Revision>,
    },
}

/// One page of [`Repository::list`], in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<(Key, Entry)>,
    /// More keys with the prefix follow the last entry: ask again with it as `start_after`.
    pub more: bool,
}

/// The attestation repository: values under keys with compare-and-swap, and single-use nonces.
/// Both backends implement it and pass one test suite (`tests/store_suite.rs`).
pub trait Repository: Send + Sync {
    /// The value under `key` and its revision, or None.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Entry>>> + Send;

    /// Writes `value` under `key` whatever is there; the new revision. For writes that must not
    /// race, use [`Repository::compare_and_swap`].
    fn put(&self, key: &Key, value: &[u8]) -> impl Future<Output = Result<Revision>> + Send;

    /// Writes `value` under `key` only if the key is as `expected`.
    fn compare_and_swap(
        &self,
        key: &Key,
        expected: Expected,
        value: &[u8],
    ) -> impl Future<Output = Result<CasOutcome>> + Send;

    /// Deletes `key` only if it is at revision `expected`.
    fn delete(
        &self,
        key: &Key,
        expected: Revision,
    ) -> impl Future<Output = Result<DeleteOutcome>> + Send;

    /// Up to `limit` (1..=[`MAX_LIST_LIMIT`]) entries whose keys start with `prefix`, in key
    /// order, starting after `start_after` when given.
    fn list(
        &self,
        prefix: &KeyPrefix,
        start_after: Option<&Key>,
        limit: usize,
    ) -> impl Future<Output = Result<Listing>> + Send;

    /// A fresh random nonce that [`Repository::nonce_take`] accepts once within `ttl`
    /// (1 ms..=[`MAX_NONCE_TTL`]).
    fn nonce_issue(&self, ttl: Duration) -> impl Future<Output = Result<Nonce>> + Send;

    /// Uses up `nonce`: Ok once, for the first caller on any handle sharing the store, before
    /// its expiry; [`StoreError::NonceUnknown`] when it was never issued here or is used
    /// already, [`StoreError::NonceExpired`] when it came too late (it is used up then too).
    fn nonce_take(&self, nonce: &Nonce) -> impl Future<Output = Result<()>> + Send;
}

/// The store named by a URL: `redb:PATH` or `etcd:http://HOST:PORT[,http://HOST:PORT...]`.
#[derive(Debug, Clone)]
pub enum Store {
    Redb(RedbStore),
    Etcd(EtcdStore),
}

impl Store {
    /// Parses `url` ([`StoreUrl`]) and opens the store: creates the redb file if missing, or
    /// connects to etcd and checks that it answers within [`REQUEST_TIMEOUT`].
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_url(&url.parse()?).await
    }

    /// Opens the store a parsed URL names (what a command line's value parser made).
    pub async fn open_url(url: &StoreUrl) -> Result<Self> {
        match url {
            StoreUrl::Redb(path) => Ok(Self::Redb(RedbStore::open(path).await?)),
            StoreUrl::Etcd(endpoints) => Ok(Self::Etcd(EtcdStore::connect(endpoints).await?)),
        }
    }
}

impl Repository for Store {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        match self {
            Self::Redb(store) => store.get(key).await,
            Self::Etcd(store) => store.get(key).await,
        }
    }

    async fn put(&self, key: &Key, value: &[u8]) -> Result<Revision> {
        match self {
            Self::Redb(store) => store.put(key, value).await,
            Self::Etcd(store) => store.put(key, value).await,
        }
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expected: Expected,
        value: &[u8],
    ) -> Result<CasOutcome> {
        match self {
            Self::Redb(store) => store.compare_and_swap(key, expected, value).await,
            Self::Etcd(store) => store.compare_and_swap(key, expected, value).await,
        }
    }

    async fn delete(&self, key: &Key, expected: Revision) -> Result<DeleteOutcome> {
        match self {
            Self::Redb(store) => store.delete(key, expected).await,
            Self::Etcd(store) => store.delete(key, expected).await,
        }
    }

    async fn list(
        &self,
        prefix: &KeyPrefix,
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Listing> {
        match self {
            Self::Redb(store) => store.list(prefix, start_after, limit).await,
            Self::Etcd(store) => store.list(prefix, start_after, limit).await,
        }
    }

    async fn nonce_issue(&self, ttl: Duration) -> Result<Nonce> {
        match self {
            Self::Redb(store) => store.nonce_issue(ttl).await,
            Self::Etcd(store) => store.nonce_issue(ttl).await,
        }
    }

    async fn nonce_take(&self, nonce: &Nonce) -> Result<()> {
        match self {
            Self::Redb(store) => store.nonce_take(nonce).await,
            Self::Etcd(store) => store.nonce_take(nonce).await,
        }
    }
}

/// Refuses a value larger than [`MAX_VALUE_LEN`].
fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(StoreError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Refuses a list limit outside 1..=[`MAX_LIST_LIMIT`].
fn check_limit(limit: usize) -> Result<()> {
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(StoreError::ListLimit {
            limit,
            max: MAX_LIST_LIMIT,
        });
    }
    Ok(())
}
