//! Coordinator nonces for SEV-SNP releases: issued to one VM, good for one release, and only for
//! a short time. A replayed or relayed report names a nonce that fails one of these.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyshard_core::broker::NONCE_LEN;

pub type Nonce = [u8; NONCE_LEN];

/// How long an issued nonce stays good.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(60);
/// Outstanding nonces per VM: a guest that asks again and again cannot grow the book.
pub const MAX_OUTSTANDING: usize = 64;

/// The time source, so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NonceError {
    #[error("nonce was never issued to this VM")]
    Unknown,
    #[error("nonce was already used")]
    Replayed,
    #[error("nonce expired {0:?} ago")]
    Expired(Duration),
    #[error("no randomness from the operating system")]
    Random,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Issued(Instant),
    Used(Instant),
}

/// The nonces of one VM.
pub struct NonceBook {
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<Nonce, Entry>>,
}

impl NonceBook {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh random nonce. The oldest entries go first when the book is full.
    pub fn issue(&self) -> Result<Nonce, NonceError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| NonceError::Random)?;
        let now = self.clock.now();
        let mut entries = self.entries.lock().map_err(|_| NonceError::Random)?;
        // Used entries are kept until they would have expired, to tell "replayed" from "unknown".
        entries.retain(|_, entry| {
            let (Entry::Issued(at) | Entry::Used(at)) = *entry;
            now.saturating_duration_since(at) <= NONCE_LIFETIME
        });
        while entries.len() >= MAX_OUTSTANDING {
            let oldest = entries
                .iter()
                .min_by_key(|(_, entry)| match entry {
                    Entry::Issued(at) | Entry::Used(at) => *at,
                })
                .map(|(nonce, _)| *nonce);
            match oldest {
                Some(nonce) => entries.remove(&nonce),
                None => break,
            };
        }
        entries.insert(nonce, Entry::Issued(now));
        Ok(nonce)
    }

    /// Spends `nonce`: it must have been issued here, not used, and not be older than
    /// [`NONCE_LIFETIME`].
    pub fn redeem(&self, nonce: &Nonce) -> Result<(), NonceError> {
        let now = self.clock.now();
        let mut entries = self.entries.lock().map_err(|_| NonceError::Random)?;
        match entries.get(nonce).copied() {
            None => Err(NonceError::Unknown),
            Some(Entry::Used(_)) => Err(NonceError::Replayed),
            Some(Entry::Issued(at)) => {
                let age = now.saturating_duration_since(at);
                entries.insert(*nonce, Entry::Used(at));
                if age > NONCE_LIFETIME {
                    return Err(NonceError::Expired(age - NONCE_LIFETIME));
                }
                Ok(())
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

    fn book() -> (Arc<TestClock>, NonceBook) {
        let clock = Arc::new(TestClock(Mutex::new(Instant::now())));
        let book = NonceBook::new(clock.clone());
        (clock, book)
    }

    #[test]
    fn a_nonce_is_good_once() {
        let (_, book) = book();
        let nonce = book.issue().unwrap();
        assert_eq!(book.redeem(&nonce), Ok(()));
        assert_eq!(book.redeem(&nonce), Err(NonceError::Replayed));
    }

    #[test]
    fn unknown_nonces_are_refused() {
        let (_, book) = book();
        book.issue().unwrap();
        assert_eq!(book.redeem(&[0; 32]), Err(NonceError::Unknown));
        // Another VM's book knows nothing of this one's nonces.
        let (_, other) = self::book();
        let nonce = book.issue().unwrap();
        assert_eq!(other.redeem(&nonce), Err(NonceError::Unknown));
    }

    #[test]
    fn nonces_expire_after_60_seconds() {
        let (clock, book) = book();
        let fresh = book.issue().unwrap();
        let stale = book.issue().unwrap();
        clock.advance(Duration::from_secs(60));
        assert_eq!(book.redeem(&fresh), Ok(()));
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            book.redeem(&stale),
            Err(NonceError::Expired(Duration::from_secs(1)))
        );
        // An expired nonce stays spent.
        assert_eq!(book.redeem(&stale), Err(NonceError::Replayed));
    }

    #[test]
    fn the_book_is_bounded_and_drops_the_oldest() {
        let (clock, book) = book();
        let first = book.issue().unwrap();
        clock.advance(Duration::from_millis(1));
        let rest: Vec<Nonce> = (0..MAX_OUTSTANDING)
            .map(|_| {
                clock.advance(Duration::from_millis(1));
                book.issue().unwrap()
            })
            .collect();
        assert_eq!(book.entries.lock().unwrap().len(), MAX_OUTSTANDING);
        assert_eq!(book.redeem(&first), Err(NonceError::Unknown));
        assert_eq!(book.redeem(rest.last().unwrap()), Ok(()));
    }
}
