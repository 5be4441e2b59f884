//! The release envelope: how the coordinator hands a share to one guest request and no one else.
//!
//! HPKE (RFC 9180) in base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and AES-256-GCM.
//! The guest makes a fresh X25519 key pair for each request and sends only the public half; the
//! coordinator seals the share to it. The request id, holder class and holder id are the
//! associated data, so an envelope cannot be replayed as the answer to another request or
//! passed off as another holder's share.

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::holder::{HolderClass, HolderId};

type Kem = X25519HkdfSha256;

/// HPKE `info`: names the protocol and its version.
const INFO: &[u8] = b"keyshard/release/v1";
pub const PUBLIC_KEY_LEN: usize = 32;
/// The encapsulated key that opens the envelope together with the guest's secret key.
pub const ENCAPPED_KEY_LEN: usize = 32;
/// AES-256-GCM tag.
pub const TAG_LEN: usize = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("no randomness from the operating system")]
    Random,
    #[error("not an X25519 public key")]
    PublicKey,
    #[error("the envelope does not open: wrong key, another request, or tampered")]
    Open,
    #[error("sealing failed")]
    Seal,
}

pub type Result<T> = std::result::Result<T, EnvelopeError>;

/// What an envelope is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseContext {
    pub request_id: u64,
    pub class: HolderClass,
    pub holder_id: HolderId,
}

impl ReleaseContext {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(10 + self.holder_id.as_str().len());
        aad.extend_from_slice(&self.request_id.to_le_bytes());
        aad.push(self.class.code());
        aad.extend_from_slice(self.holder_id.as_str().as_bytes());
        aad
    }
}

/// A sealed share: the encapsulated key and the ciphertext (plaintext length + 16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub encapped_key: [u8; ENCAPPED_KEY_LEN],
    pub ciphertext: Vec<u8>,
}

/// The guest's key pair for one request; the secret half never leaves the guest.
pub struct RequestKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl RequestKey {
    pub fn generate() -> Result<Self> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        getrandom::fill(ikm.as_mut_slice()).map_err(|_| EnvelopeError::Random)?;
        let (secret, public) = Kem::derive_keypair(ikm.as_slice());
        let public: [u8; PUBLIC_KEY_LEN] = public.to_bytes().into();
        Ok(Self { secret, public })
    }

    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }

    /// Opens an envelope sealed to this key for `context`.
    pub fn open(
        &self,
        envelope: &Envelope,
        context: &ReleaseContext,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&envelope.encapped_key)
            .map_err(|_| EnvelopeError::Open)?;
        hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.secret,
            &encapped,
            INFO,
            &envelope.ciphertext,
            &context.aad(),
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::Open)
    }
}

impl RequestKey {
    /// Opens HPKE ciphertext sealed to this key under another protocol's `info` and `aad` (a
    /// shard host's released shard: [`crate::shard_release`]).
    pub(crate) fn open_with(
        &self,
        info: &[u8],
        encapped_key: &[u8; ENCAPPED_KEY_LEN],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapped_key)
            .map_err(|_| EnvelopeError::Open)?;
        hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.secret,
            &encapped,
            info,
            ciphertext,
            aad,
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::Open)
    }
}

impl std::fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestKey(public {})", hex::encode(self.public))
    }
}

/// Seals `share` to the guest's request key `recipient`, bound to `context`.
pub fn seal(
    recipient: &[u8; PUBLIC_KEY_LEN],
    share: &[u8],
    context: &ReleaseContext,
) -> Result<Envelope> {
    let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient)
        .map_err(|_| EnvelopeError::PublicKey)?;
    let (encapped, ciphertext) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &recipient,
        INFO,
        share,
        &context.aad(),
        &mut rand::rng(),
    )
    .map_err(|_| EnvelopeError::Seal)?;
    Ok(Envelope {
        encapped_key: encapped.to_bytes().into(),
        ciphertext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(request_id: u64) -> ReleaseContext {
        ReleaseContext {
            request_id,
            class: HolderClass::Tpm,
            holder_id: HolderId::new("tpm-1").unwrap(),
        }
    }

    #[test]
    fn only_the_request_key_opens_only_its_own_request() {
        let key = RequestKey::generate().unwrap();
        let envelope = seal(&key.public_key(), b"a signed fragment", &context(7)).unwrap();
        assert_eq!(envelope.ciphertext.len(), 17 + TAG_LEN);
        assert_ne!(&envelope.ciphertext[..17], b"a signed fragment");
        assert_eq!(
            key.open(&envelope, &context(7)).unwrap().as_slice(),
            b"a signed fragment"
        );

        assert_eq!(key.open(&envelope, &context(8)), Err(EnvelopeError::Open));
        let other_holder = ReleaseContext {
            holder_id: HolderId::new("tpm-2").unwrap(),
            ..context(7)
        };
        assert_eq!(key.open(&envelope, &other_holder), Err(EnvelopeError::Open));
        let other_key = RequestKey::generate().unwrap();
        assert_eq!(
            other_key.open(&envelope, &context(7)),
            Err(EnvelopeError::Open)
        );
    }

    #[test]
    fn tampering_anywhere_fails() {
        let key = RequestKey::generate().unwrap();
        let envelope = seal(&key.public_key(), &[9; 40], &context(1)).unwrap();
        for i in 0..envelope.ciphertext.len() {
            let mut bad = envelope.clone();
            bad.ciphertext[i] ^= 1;
            assert_eq!(
                key.open(&bad, &context(1)),
                Err(EnvelopeError::Open),
                "byte {i}"
            );
        }
        let mut bad = envelope.clone();
        bad.encapped_key[0] ^= 1;
        assert!(key.open(&bad, &context(1)).is_err());
    }

    #[test]
    fn debug_shows_only_the_public_key() {
        let key = RequestKey::generate().unwrap();
        let text = format!("{key:?}");
        assert_eq!(
            text,
            format!("RequestKey(public {})", hex::encode(key.public_key()))
        );
    }
}
