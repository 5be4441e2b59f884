//! Single-use nonces: 32 random bytes, written as 64 lowercase hex digits, and the expiry
//! arithmetic both backends share (milliseconds since the Unix epoch, wall clock).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Result, StoreError};

/// A nonce's length in bytes.
pub const NONCE_LEN: usize = 32;

/// The longest lifetime a nonce may be given.
pub const MAX_NONCE_TTL: Duration = Duration::from_secs(600);

/// A verifier's challenge: random, single use, short-lived. Not a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// A nonce from the operating system's randomness.
    pub(crate) fn random() -> Result<Self> {
        let mut bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
        Ok(Self(bytes))
    }

    /// The nonce's bytes (what goes into a quote's qualifying data).
    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }

    /// A nonce from its bytes, as an attester sent it back.
    pub fn from_bytes(bytes: [u8; NONCE_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        if text.len() != 2 * NONCE_LEN {
            return Err(StoreError::InvalidNonce {
                reason: "not 64 hex digits",
            });
        }
        let mut bytes = [0u8; NONCE_LEN];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| StoreError::InvalidNonce {
            reason: "not 64 hex digits",
        })?;
        Ok(Self(bytes))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Refuses a lifetime outside 1 ms..=[`MAX_NONCE_TTL`].
pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) || ttl > MAX_NONCE_TTL {
        return Err(StoreError::NonceTtl {
            ttl,
            max: MAX_NONCE_TTL,
        });
    }
    Ok(())
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> Result<u64> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| StoreError::Clock)?;
    u64::try_from(since.as_millis()).map_err(|_| StoreError::Clock)
}

/// When a nonce issued now with `ttl` expires, in milliseconds since the Unix epoch.
pub(crate) fn expiry_ms(ttl: Duration) -> Result<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).map_err(|_| StoreError::Clock)?;
    now_ms()?.checked_add(ttl_ms).ok_or(StoreError::Clock)
}

/// Ok while `now_ms` is before `expiry_ms`; [`StoreError::NonceExpired`] from then on.
pub(crate) fn check_not_expired(expiry_ms: u64, now_ms: u64) -> Result<()> {
    if now_ms >= expiry_ms {
        return Err(StoreError::NonceExpired {
            late_ms: now_ms - expiry_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_round_trip_through_hex_and_refuse_anything_else() {
        let nonce = Nonce::random().unwrap();
        assert_eq!(Nonce::from_hex(&nonce.to_hex()).unwrap(), nonce);
        assert_ne!(Nonce::random().unwrap(), nonce);
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"0".repeat(66)] {
            assert!(
                matches!(Nonce::from_hex(bad), Err(StoreError::InvalidNonce { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn expiry_is_exclusive_and_lifetimes_are_bounded() {
        assert!(check_not_expired(1000, 999).is_ok());
        assert!(matches!(
            check_not_expired(1000, 1000),
            Err(StoreError::NonceExpired { late_ms: 0 })
        ));
        assert!(matches!(
            check_not_expired(1000, 1500),
            Err(StoreError::NonceExpired { late_ms: 500 })
        ));
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(Duration::from_micros(999)).is_err());
        assert!(check_ttl(Duration::from_millis(1)).is_ok());
        assert!(check_ttl(MAX_NONCE_TTL).is_ok());
        assert!(check_ttl(MAX_NONCE_TTL + Duration::from_millis(1)).is_err());
    }
}
