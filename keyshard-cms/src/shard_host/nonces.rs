//! A shard host's nonces: issued for one release, good once, and only for a short time. A
//! replayed or late request names a nonce that fails one of these checks.
//!
//! A release needs a [`SpentNonce`]: proof that the nonce its evidence answers was issued by
//! this host and has just been used up. Only this module makes one, from one of two books:
//! - [`MemoryNonceBook`]: the nonces of one host process, MAC'd by it and remembered only once
//!   spent;
//! - the attestation repository ([`take_from_store`] over [`Repository::nonce_take`]): shared
//!   by every process on one store (an etcd lease or a redb table with expiry), so two replicas
//!   never accept the same nonce. Issue those with [`Repository::nonce_issue`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use keyshard_shards::instance::Nonce;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::store::{self, Repository, StoreError};

/// How long an issued nonce stays good: a fetch quotes and asks within a second or two.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(30);
/// Spent nonces remembered at most (each until it would have expired): 48 bytes each.
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("the nonce was not issued by this host (or expired long ago)")]
    Unknown,
    #[error("the nonce was already used (a replayed request)")]
    Replayed,
    #[error("the nonce expired {0:?} ago")]
    Expired(Duration),
    #[error("{0} nonces were spent in the last lifetime: no more are taken until some expire")]
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

/// What a nonce's MAC covers besides its time and random part.
const MAC_CONTEXT: &[u8] = b"keyshard/shard-host-nonce/v1";
/// Bytes of a nonce: issued time, random part, MAC.
const TIME_LEN: usize = 8;
const RANDOM_LEN: usize = 8;
const MAC_LEN: usize = 16;

/// The nonces of one host process: stateless until spent.
///
/// A nonce is `issued_ms (u64 LE, since the book was made) || 8 random bytes || the first 16
/// bytes of HMAC-SHA-256(key, context || issued_ms || random)`, the key drawn at random for
/// this process. Issuing stores nothing, so no caller, however many nonces it asks for, can
/// fill the book or push out a nonce an instance is using: the host does not rate-limit
/// nonces. Spending checks the MAC (issued here), the time (not in the future, not older than
/// the lifetime) and the spent set (not used yet), and remembers the nonce until it would
/// have expired; at most `capacity` are remembered, and beyond that spending fails closed
/// ([`NonceError::Full`]). The server spends a nonce only after the request's CMS grant
/// verified, so only instances the CMS admitted can fill that set. A process restart forgets
/// the key: nonces issued before it are then unknown.
pub struct MemoryNonceBook {
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    capacity: usize,
    /// The origin of the issued times.
    epoch: Instant,
    /// The MAC key, drawn at the first issue.
    key: Mutex<Option<Zeroizing<[u8; 32]>>>,
    /// Spent nonces and when each was issued.
    spent: Mutex<HashMap<Nonce, Instant>>,
}

impl MemoryNonceBook {
    /// A book on the system clock with [`DEFAULT_LIFETIME`] and [`DEFAULT_CAPACITY`].
    pub fn new() -> Self {
        Self::with(Arc::new(SystemClock), DEFAULT_LIFETIME, DEFAULT_CAPACITY)
    }

    /// A book on `clock` whose nonces live `lifetime`, remembering at most `capacity` spent.
    pub fn with(clock: Arc<dyn Clock>, lifetime: Duration, capacity: usize) -> Self {
        let epoch = clock.now();
        Self {
            clock,
            lifetime,
            capacity,
            epoch,
            key: Mutex::new(None),
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// How long an issued nonce stays good.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Spent nonces remembered now.
    pub fn len(&self) -> usize {
        self.spent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The MAC over a nonce's time and random part, under `key`.
    fn mac(key: &[u8; 32], time_and_random: &[u8]) -> Result<Hmac<Sha256>> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).map_err(|_| NonceError::Random)?;
        mac.update(MAC_CONTEXT);
        mac.update(time_and_random);
        Ok(mac)
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
            .field("spent", &self.len())
            .finish_non_exhaustive()
    }
}

impl MemoryNonceBook {
    /// A fresh nonce, issued now; nothing is stored.
    pub fn issue(&self) -> Result<Nonce> {
        let key = {
            let mut key = self.key.lock().unwrap_or_else(PoisonError::into_inner);
            match key.as_ref() {
                Some(key) => key.clone(),
                None => {
                    let mut fresh = Zeroizing::new([0u8; 32]);
                    getrandom::fill(&mut fresh[..]).map_err(|_| NonceError::Random)?;
                    key.insert(fresh).clone()
                }
            }
        };
        let issued_ms = u64::try_from(
            self.clock
                .now()
                .saturating_duration_since(self.epoch)
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let mut nonce = [0u8; keyshard_shards::instance::NONCE_LEN];
        let (time_and_random, tag) = nonce.split_at_mut(TIME_LEN + RANDOM_LEN);
        let (time, random) = time_and_random.split_at_mut(TIME_LEN);
        time.copy_from_slice(&issued_ms.to_le_bytes());
        getrandom::fill(random).map_err(|_| NonceError::Random)?;
        let full = Self::mac(&key, time_and_random)?.finalize().into_bytes();
        let (truncated, _) = full.split_at(MAC_LEN);
        tag.copy_from_slice(truncated);
        Ok(nonce)
    }

    /// Spends `nonce`: it must have been issued here, not used yet, and not be expired. A good
    /// one is remembered as used until it would have expired, so it is taken once.
    pub fn consume(&self, nonce: &Nonce) -> Result<SpentNonce> {
        let now = self.clock.now();
        let key = self
            .key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(NonceError::Unknown)?;
        let (time_and_random, tag) = nonce.split_at(TIME_LEN + RANDOM_LEN);
        Self::mac(&key, time_and_random)?
            .verify_truncated_left(tag)
            .map_err(|_| NonceError::Unknown)?;
        let (time, _) = time_and_random.split_at(TIME_LEN);
        let issued_ms = u64::from_le_bytes(time.try_into().map_err(|_| NonceError::Unknown)?);
        let issued_at = self
            .epoch
            .checked_add(Duration::from_millis(issued_ms))
            .filter(|at| *at <= now)
            .ok_or(NonceError::Unknown)?;
        let age = now.saturating_duration_since(issued_at);
        if let Some(late) = age.checked_sub(self.lifetime).filter(|l| !l.is_zero()) {
            return Err(NonceError::Expired(late));
        }
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        if spent.contains_key(nonce) {
            return Err(NonceError::Replayed);
        }
        let lifetime = self.lifetime;
        spent.retain(|_, at| now.saturating_duration_since(*at) <= lifetime);
        if spent.len() >= self.capacity {
            return Err(NonceError::Full(spent.len()));
        }
        spent.insert(*nonce, issued_at);
        Ok(SpentNonce(*nonce))
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
    fn item6_a_late_nonce_is_refused() {
        let (clock, book) = book(8);
        let nonce = book.issue().unwrap();
        clock.advance(Duration::from_secs(31));
        assert_eq!(
            book.consume(&nonce),
            Err(NonceError::Expired(Duration::from_secs(1)))
        );
        assert!(matches!(book.consume(&nonce), Err(NonceError::Expired(_))));
        // Just inside the lifetime is still good.
        let nonce = book.issue().unwrap();
        clock.advance(Duration::from_secs(30));
        assert!(book.consume(&nonce).is_ok());
    }

    /// Review of issue 9: a shard host kept every issued nonce (4,096 at most) behind a global
    /// rate limit, so one client asking for nonces in a loop made the host answer 429 to every
    /// instance (with the real binaries: a fetch then failed on that host, exit 2). Issuing
    /// now stores nothing: a flood leaves the book empty and a nonce issued before it good;
    /// only spent nonces are remembered, and a full spent set refuses rather than forgets.
    #[test]
    fn review9_a_nonce_flood_stores_nothing_and_spares_a_nonce_in_use() {
        let (clock, book) = book(2);
        let in_use = book.issue().unwrap();
        for _ in 0..100_000 {
            book.issue().unwrap();
        }
        assert!(book.is_empty());
        assert_eq!(book.consume(&in_use), Ok(SpentNonce(in_use)));
        assert_eq!(book.consume(&in_use), Err(NonceError::Replayed));
        // Another book's nonce, a flipped MAC bit, a moved time: not issued here.
        let (_, other) = super::tests::book(2);
        assert_eq!(
            book.consume(&other.issue().unwrap()),
            Err(NonceError::Unknown)
        );
        for byte in [0, 9, 31] {
            let mut forged = book.issue().unwrap();
            forged[byte] ^= 1;
            assert_eq!(
                book.consume(&forged),
                Err(NonceError::Unknown),
                "byte {byte}"
            );
        }
        // The spent set holds 2: a third spend within the lifetime is refused, then expiry frees it.
        assert!(book.consume(&book.issue().unwrap()).is_ok());
        let third = book.issue().unwrap();
        assert_eq!(book.consume(&third), Err(NonceError::Full(2)));
        clock.advance(Duration::from_secs(31));
        assert!(book.consume(&book.issue().unwrap()).is_ok());
        assert_eq!(book.len(), 1, "expired spent entries are dropped");
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
