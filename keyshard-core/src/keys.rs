//! Dealer keys: Ed25519, stored as PKCS#8 (private) and SPKI (public) PEM, so `openssl pkey`
//! reads them and `openssl genpkey -algorithm ed25519` can make one.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use ed25519_dalek::{SigningKey as DealerSigningKey, VerifyingKey as DealerVerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an Ed25519 private key in PKCS#8 PEM form")]
    BadPrivateKey,
    #[error("not an Ed25519 public key in SPKI PEM form")]
    BadPublicKey,
    #[error(
        "the dealer public key is a weak (small-order) Ed25519 point: signatures under it can be \
         forged, so it is refused"
    )]
    WeakKey,
    #[error("could not encode the key")]
    Encode,
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
}

pub type Result<T> = std::result::Result<T, KeyError>;

/// A new dealer key from the operating system's randomness.
pub fn generate() -> Result<SigningKey> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(KeyError::Random)?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn signing_key_to_pem(key: &SigningKey) -> Result<Zeroizing<String>> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| KeyError::Encode)
}

/// A dealer key from PKCS#8 PEM; refused when its public half is weak.
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey> {
    let key = SigningKey::from_pkcs8_pem(pem).map_err(|_| KeyError::BadPrivateKey)?;
    check_not_weak(&key.verifying_key())?;
    Ok(key)
}

pub fn verifying_key_to_pem(key: &VerifyingKey) -> Result<String> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|_| KeyError::Encode)
}

/// A dealer public key from SPKI PEM; refused when weak.
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey> {
    let key = VerifyingKey::from_public_key_pem(pem).map_err(|_| KeyError::BadPublicKey)?;
    check_not_weak(&key)?;
    Ok(key)
}

/// Refuses a small-order public key (the identity point among them): under such a key, a
/// signature with R = the identity and s = 0 verifies for every message with plain `verify`.
/// `verify_strict` refuses those too; refusing the key where it is loaded says why, early.
pub fn check_not_weak(key: &VerifyingKey) -> Result<()> {
    if key.is_weak() {
        return Err(KeyError::WeakKey);
    }
    Ok(())
}

/// A short name for a public key in messages: the first 8 bytes of SHA-256 of its 32 bytes.
pub fn fingerprint(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(digest.get(..8).unwrap_or_default())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_rejects_the_wrong_kind() {
        let key = generate().unwrap();
        let private = signing_key_to_pem(&key).unwrap();
        let public = verifying_key_to_pem(&key.verifying_key()).unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(signing_key_from_pem(&private).unwrap(), key);
        assert_eq!(
            verifying_key_from_pem(&public).unwrap(),
            key.verifying_key()
        );
        assert!(matches!(
            signing_key_from_pem(&public),
            Err(KeyError::BadPrivateKey)
        ));
        assert!(matches!(
            verifying_key_from_pem(&private),
            Err(KeyError::BadPublicKey)
        ));
        assert!(verifying_key_from_pem("garbage").is_err());
    }

    /// The compressed Edwards identity point: y = 1, x = 0.
    pub(crate) const IDENTITY: [u8; 32] = {
        let mut bytes = [0u8; 32];
        bytes[0] = 1;
        bytes
    };

    /// Issue 7 item 12: a weak dealer key is refused where a `--verify-key` file is loaded.
    #[test]
    fn item12_weak_public_keys_are_refused_when_loaded() {
        let weak = VerifyingKey::from_bytes(&IDENTITY).unwrap();
        assert!(weak.is_weak());
        let pem = weak.to_public_key_pem(LineEnding::LF).unwrap();
        assert!(matches!(
            verifying_key_from_pem(&pem),
            Err(KeyError::WeakKey)
        ));
        assert!(matches!(check_not_weak(&weak), Err(KeyError::WeakKey)));
        assert!(check_not_weak(&generate().unwrap().verifying_key()).is_ok());
    }

    #[test]
    fn fresh_keys_differ_and_fingerprints_tell_them_apart() {
        let a = generate().unwrap().verifying_key();
        let b = generate().unwrap().verifying_key();
        assert_ne!(a, b);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
