//! Verdicts on VCEKs, keyed by the SHA-256 of their DER: each VCEK's chain and extensions are
//! checked once (about 1.8 ms of RSA), after which a report costs only its own signature.
//! Refusals are kept too: with pinned anchors a verdict cannot change. When full, one entry
//! makes room for the next: the oldest refusal if there is one, else the oldest verdict, so a
//! guest that floods the coordinator with bogus VCEKs evicts its own refusals, not the
//! trusted VCEKs every other guest needs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::verify::{TrustedVcek, VerifyError};

/// A VCEK's verdict: trusted, with what it says, or why not.
pub type VcekVerdict = Result<Arc<TrustedVcek>, VerifyError>;

/// Enough for every chip and TCB a host fleet has; when full, one entry is evicted per insert.
pub const DEFAULT_CAPACITY: usize = 4096;

/// The cache key: SHA-256 of the VCEK's DER as received.
pub type VcekDigest = [u8; 32];

pub fn vcek_digest(der: &[u8]) -> VcekDigest {
    Sha256::digest(der).into()
}

#[derive(Debug)]
pub struct VerdictCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

/// The verdicts, and their keys oldest first.
#[derive(Debug, Default)]
struct Entries {
    verdicts: HashMap<VcekDigest, VcekVerdict>,
    order: VecDeque<VcekDigest>,
}

impl Entries {
    fn insert(&mut self, key: VcekDigest, verdict: VcekVerdict, capacity: usize) {
        if self.verdicts.contains_key(&key) {
            // Another thread checked the same VCEK meanwhile: same verdict, nothing to add.
            return;
        }
        while self.verdicts.len() >= capacity && self.evict_one() {}
        self.verdicts.insert(key, verdict);
        self.order.push_back(key);
    }

    /// Removes the oldest refusal, or the oldest verdict when none is a refusal.
    fn evict_one(&mut self) -> bool {
        let refused = self
            .order
            .iter()
            .position(|key| matches!(self.verdicts.get(key), Some(Err(_))));
        let Some(key) = self.order.remove(refused.unwrap_or(0)) else {
            return false;
        };
        self.verdicts.remove(&key);
        true
    }
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl VerdictCache {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            capacity: capacity.max(1),
        }
    }

    /// The cached verdict on the VCEK with this DER, or `check`'s, which is then kept. The check
    /// runs without the lock held, so two threads may both check a new VCEK once.
    pub fn get_or_check(&self, der: &[u8], check: impl FnOnce() -> VcekVerdict) -> VcekVerdict {
        let key = vcek_digest(der);
        if let Some(verdict) = self.lock().verdicts.get(&key) {
            return verdict.clone();
        }
        let verdict = check();
        self.lock().insert(key, verdict.clone(), self.capacity);
        verdict
    }

    /// Whether a verdict on the VCEK with this DER is cached.
    pub fn contains(&self, der: &[u8]) -> bool {
        self.lock().verdicts.contains_key(&vcek_digest(der))
    }

    pub fn len(&self) -> usize {
        self.lock().verdicts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        *self.lock() = Entries::default();
    }

    /// A panic elsewhere while holding the lock leaves entries that are still consistent (no
    /// code that holds it can panic between the two collections' updates).
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::product::Product;

    #[test]
    fn a_verdict_is_checked_once_per_der() {
        let cache = VerdictCache::with_capacity(2);
        let mut checks = 0;
        let refuse = |checks: &mut u32| {
            *checks += 1;
            Err(VerifyError::NoAnchors(Product::Milan))
        };
        for _ in 0..3 {
            let verdict = cache.get_or_check(b"one", || refuse(&mut checks));
            assert_eq!(verdict.err(), Some(VerifyError::NoAnchors(Product::Milan)));
        }
        assert_eq!(checks, 1);
        let _ = cache.get_or_check(b"two", || refuse(&mut checks));
        assert_eq!((checks, cache.len()), (2, 2));
        // Full: one entry (the oldest refusal) makes room, the rest stay.
        let _ = cache.get_or_check(b"three", || refuse(&mut checks));
        assert_eq!((checks, cache.len()), (3, 2));
        assert!(!cache.contains(b"one"));
        assert!(cache.contains(b"two") && cache.contains(b"three"));
        cache.clear();
        assert!(cache.is_empty());
    }

    /// Item 10 of issue 7: a guest that floods the cache with VCEKs that fail evicts one entry
    /// per new VCEK, its own refusals first; the trusted VCEKs stay cached and are not checked
    /// again (a cache that starts over when full would check them all again).
    #[test]
    fn item10_a_flood_of_refused_vceks_evicts_one_refusal_at_a_time() {
        let anchors = crate::snp::TrustAnchors::amd().unwrap();
        let real = crate::snp::fixtures::MILAN_VCEK_DER;
        let trusted = || crate::snp::verify::trust_vcek(&anchors, real).map(Arc::new);
        let cache = VerdictCache::with_capacity(8);
        assert!(cache.get_or_check(real, trusted).is_ok());
        let flood: Vec<Vec<u8>> = (0u32..100).map(|i| i.to_le_bytes().to_vec()).collect();
        for (i, der) in flood.iter().enumerate() {
            let verdict = cache.get_or_check(der, || Err(VerifyError::NoAnchors(Product::Milan)));
            assert!(verdict.is_err());
            assert_eq!(cache.len(), (i + 2).min(8), "after {} bogus VCEKs", i + 1);
            assert!(cache.contains(real), "the trusted VCEK was evicted");
        }
        // Only the 7 newest refusals remain besides it.
        assert!(flood[93..].iter().all(|der| cache.contains(der)));
        assert!(flood[..93].iter().all(|der| !cache.contains(der)));
        let rechecked = cache.get_or_check(real, || panic!("the trusted VCEK was checked again"));
        assert!(rechecked.is_ok());
    }

    #[test]
    fn when_every_entry_is_trusted_the_oldest_goes() {
        let anchors = crate::snp::TrustAnchors::amd().unwrap();
        let real = crate::snp::fixtures::MILAN_VCEK_DER;
        let trusted = crate::snp::verify::trust_vcek(&anchors, real).map(Arc::new);
        let cache = VerdictCache::with_capacity(2);
        for der in [b"a", b"b", b"c"] {
            assert!(cache.get_or_check(der, || trusted.clone()).is_ok());
        }
        assert_eq!(cache.len(), 2);
        assert!(!cache.contains(b"a"));
        assert!(cache.contains(b"b") && cache.contains(b"c"));
    }
}
