//! The key check value: lets a combiner confirm a rebuilt secret without revealing it.
//!
//! KCV = HMAC-SHA-256(key = secret, message = "keyshard/kcv/v1" || len(key id) || key id).
//! The secret is the HMAC key, so the value says nothing about a high-entropy secret; the key id
//! in the message ties the value to one named secret. It does not depend on the epoch, so it stays
//! the same when rotation re-shares the same secret. A low-entropy secret (a short passphrase)
//! could be guessed offline against it: keyshard is meant for random keys.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::holder::KeyId;

pub const KCV_LEN: usize = 32;
const DOMAIN: &[u8] = b"keyshard/kcv/v1";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyCheckValue([u8; KCV_LEN]);

impl KeyCheckValue {
    pub fn compute(secret: &[u8], key_id: &KeyId) -> Self {
        let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; this arm is unreachable.
            Err(_) => return Self([0; KCV_LEN]),
        };
        mac.update(DOMAIN);
        // Key ids are at most 64 bytes, so their length fits a byte.
        mac.update(&[u8::try_from(key_id.as_str().len()).unwrap_or(u8::MAX)]);
        mac.update(key_id.as_str().as_bytes());
        Self(mac.finalize().into_bytes().into())
    }

    pub fn from_bytes(bytes: [u8; KCV_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KCV_LEN] {
        &self.0
    }

    /// Whether `secret` is the secret this value was computed from, in constant time.
    pub fn matches(&self, secret: &[u8], key_id: &KeyId) -> bool {
        Self::compute(secret, key_id).0.ct_eq(&self.0).into()
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for KeyCheckValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyCheckValue({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_secret_and_key_id() {
        let id = KeyId::new("root").unwrap();
        let kcv = KeyCheckValue::compute(b"secret one", &id);
        assert!(kcv.matches(b"secret one", &id));
        assert!(!kcv.matches(b"secret two", &id));
        assert!(!kcv.matches(b"secret one", &KeyId::new("data").unwrap()));
        assert_ne!(kcv.as_bytes().as_slice(), b"secret one".as_slice());
    }

    #[test]
    fn is_hmac_sha256_of_the_documented_message() {
        // Known answer from Python: hmac.new(bytes([1,2,3]), b"keyshard/kcv/v1\x02k1", sha256).
        let id = KeyId::new("k1").unwrap();
        assert_eq!(
            KeyCheckValue::compute(&[1, 2, 3], &id).to_hex(),
            "1958472bc0c8badcc8a26948ba544a9ec3ab4873cc649dabc4b0536862d59319"
        );
    }
}
