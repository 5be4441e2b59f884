//! A shard host's nonces: issued for one release, good once, and only for a short time. A
//! replayed or late request names a nonce that fails one of these checks.
//!
//! A release needs a [`SpentNonce`]: proof that the nonce its evidence answers was issued by
//! this host and has just been used up. Only this module makes one, from one of two books:
//! - [`MemoryNonceBook`]: the nonces of one host process, in memory;
//! - the attestation repository ([`take_from_store`] over [`Repository::nonce_take`]): shared
//!   by every process on one store (an etcd lease or a redb table with expiry), so two replicas
//!   never accept the same nonce. Issue those with [`Repository::nonce_issue`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keyshard_shards::instance::Nonce;

use crate::store::{self, Repository, StoreError};

/// How long an issued nonce stays good: a fetch quotes and asks within a second or two.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(30);
/// Outstanding nonces kept at most.
pub const DEFAULT_CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("the nonce was not issued by this host (or expired long ago)")]
    Unknown,
    #[error("the nonce was already used (a replayed request)")]
    Replayed,
    #[error("the nonce expired {0:?} ago")]
    Expired(Duration),
    #[error("{0} nonces are outstanding: no more are issued until some are used or expire")]
    Full(usize),
    #[error("no randomness from the operating system")]
    Random,
}

pub type Result<T> = std::result::Result<T, NonceError>;

/// A nonce this host issued, used up just now: what [`super::ShardHost::release`] requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpentNonce(Nonce);

impl SpentNonce {
    /// The nonce that was spent: the one the released-to evidence must answer.
    pub fn nonce(&self) -> &Nonce {
        &self.0
    }
}

/// Spends `nonce` in the shared store: Ok once, for the first caller on any handle sharing it,
/// before its expiry; [`StoreError::NonceUnknown`] or [`StoreError::NonceExpired`] otherwise.
pub async fn take_from_store<R: Repository>(
    store: &R,
    nonce: &Nonce,
) -> std::result::Result<SpentNonce, StoreError> {
    store.nonce_take(&store::Nonce::from_bytes(*nonce)).await?;
    Ok(SpentNonce(*nonce))
}

/// The time source, so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Issued(Instant),
    Used(Instant),
}

impl Entry {
    fn issued_at(self) -> Instant {
        match self {
            Self::Issued(at) | Self::Used(at) => at,
        }
    }
}

/// The nonces of one host process, in memory.
///
/// Used entries are kept until they would have expired, to tell "replayed" from "unknown".
/// When `capacity` entries are outstanding, issuing fails ([`NonceError::Full`]) rather than
/// dropping an outstanding nonce: a flood of challenges then delays new fetches (rate limiting
/// belongs to the server) but never invalidates one in progress.
pub struct MemoryNonceBook {
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Nonce, Entry>>,
}

impl MemoryNonceBook {
    /// A book on the system clock with [`DEFAULT_LIFETIME`] and [`DEFAULT_CAPACITY`].
    pub fn new() -> Self {
        Self::with(Arc::new(SystemClock), DEFAULT_LIFETIME, DEFAULT_CAPACITY)
    }

    pub fn with(clock: Arc<dyn Clock>, lifetime: Duration, capacity: usize) -> Self {
        Self {
            clock,
            lifetime,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long an issued nonce stays good.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Entries kept now (issued or used, not yet expired).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemoryNonceBook {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryNonceBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNonceBook")
            .field("lifetime", &self.lifetime)
            .field("capacity", &self.capacity)
            .field("entries", &self.len())
            .finish()
    }
}

impl MemoryNonceBook {
    /// A fresh random nonce, recorded as issued now.
    pub fn issue(&self) -> Result<Nonce> {
        let mut nonce = [0u8; keyshard_shards::instance::NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| NonceError::Random)?;
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let lifetime = self.lifetime;
        entries.retain(|_, entry| now.saturating_duration_since(entry.issued_at()) <= lifetime);
        if entries.len() >= self.capacity {
            return Err(NonceError::Full(entries.len()));
        }
        entries.insert(nonce, Entry::Issued(now));
        Ok(nonce)
    }

    /// Spends `nonce`: it must have been issued here, not used yet, and not be expired. It is
    /// used up whatever happens next, so a refused release cannot be retried with it.
    pub fn consume(&self, nonce: &Nonce) -> Result<SpentNonce> {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(nonce).copied() {
            None => Err(NonceError::Unknown),
            Some(Entry::Used(_)) => Err(NonceError::Replayed),
            Some(Entry::Issued(at)) => {
                entries.insert(*nonce, Entry::Used(at));
                let age = now.saturating_duration_since(at);
                match age.checked_sub(self.lifetime) {
                    Some(late) if !late.is_zero() => Err(NonceError::Expired(late)),
                    _ => Ok(SpentNonce(*nonce)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves by hand.
    struct TestClock(Mutex<Instant>);

    impl TestClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    fn book(capacity: usize) -> (Arc<TestClock>, MemoryNonceBook) {
        let clock = Arc::new(TestClock(Mutex::new(Instant::now())));
        let book = MemoryNonceBook::with(clock.clone(), Duration::from_secs(30), capacity);
        (clock, book)
    }

    #[test]
    fn item6_a_nonce_is_good_once() {
        let (_, book) = book(8);
        let nonce = book.issue().unwrap();
        assert_ne!(book.issue().unwrap(), nonce);
        assert_eq!(book.consume(&nonce), Ok(SpentNonce(nonce)));
        assert_eq!(book.consume(&nonce), Err(NonceError::Replayed));
        assert_eq!(book.consume(&[7; 32]), Err(NonceError::Unknown));
    }

    #[test]
    fn item6_a_late_nonce_is_refused_and_spent() {
        let (clock, book) = book(8);
        let nonce = book.issue().unwrap();
        clock.advance(Duration::from_secs(31));
        assert_eq!(
            book.consume(&nonce),
            Err(NonceError::Expired(Duration::from_secs(1)))
        );
        assert_eq!(book.consume(&nonce), Err(NonceError::Replayed));
        // Just inside the lifetime is still good.
        let nonce = book.issue().unwrap();
        clock.advance(Duration::from_secs(30));
        assert!(book.consume(&nonce).is_ok());
    }

    #[test]
    fn item6_a_full_book_refuses_to_issue_until_entries_expire() {
        let (clock, book) = book(2);
        let first = book.issue().unwrap();
        let _second = book.issue().unwrap();
        assert_eq!(book.issue(), Err(NonceError::Full(2)));
        // The outstanding nonces stay good: the flood did not push them out.
        assert!(book.consume(&first).is_ok());
        clock.advance(Duration::from_secs(31));
        assert!(book.issue().is_ok());
        assert_eq!(book.len(), 1, "expired entries are dropped");
    }

    #[tokio::test]
    async fn item6_a_store_nonce_is_spent_once_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("redb:{}", dir.path().join("store.redb").display());
        let store = store::Store::open(&url).await.unwrap();
        let replica = store.clone();
        let nonce = *store
            .nonce_issue(Duration::from_secs(30))
            .await
            .unwrap()
            .as_bytes();
        let spent = take_from_store(&store, &nonce).await.unwrap();
        assert_eq!(spent.nonce(), &nonce);
        assert!(matches!(
            take_from_store(&replica, &nonce).await,
            Err(StoreError::NonceUnknown)
        ));
        assert!(matches!(
            take_from_store(&store, &[9; 32]).await,
            Err(StoreError::NonceUnknown)
        ));
    }
}
