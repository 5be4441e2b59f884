//! Verdicts on VCEKs, keyed by the SHA-256 of their DER: each VCEK's chain and extensions are
//! checked once (about 1.8 ms of RSA), after which a report costs only its own signature.
//! Refusals are kept too: with pinned anchors a verdict cannot change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::verify::{TrustedVcek, VerifyError};

/// A VCEK's verdict: trusted, with what it says, or why not.
pub type VcekVerdict = Result<Arc<TrustedVcek>, VerifyError>;

/// Enough for every chip and TCB a host fleet has; when full, the cache starts over.
pub const DEFAULT_CAPACITY: usize = 4096;

/// The cache key: SHA-256 of the VCEK's DER as received.
pub type VcekDigest = [u8; 32];

pub fn vcek_digest(der: &[u8]) -> VcekDigest {
    Sha256::digest(der).into()
}

#[derive(Debug)]
pub struct VerdictCache {
    entries: Mutex<HashMap<VcekDigest, VcekVerdict>>,
    capacity: usize,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl VerdictCache {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The cached verdict on the VCEK with this DER, or `check`'s, which is then kept. The check
    /// runs without the lock held, so two threads may both check a new VCEK once.
    pub fn get_or_check(&self, der: &[u8], check: impl FnOnce() -> VcekVerdict) -> VcekVerdict {
        let key = vcek_digest(der);
        if let Some(verdict) = self.lock().get(&key) {
            return verdict.clone();
        }
        let verdict = check();
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(key, verdict.clone());
        verdict
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// A panic elsewhere while holding the lock leaves a map that is still consistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VcekDigest, VcekVerdict>> {
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
        // Full: starts over rather than growing.
        let _ = cache.get_or_check(b"three", || refuse(&mut checks));
        assert_eq!((checks, cache.len()), (3, 1));
        cache.clear();
        assert!(cache.is_empty());
    }
}
