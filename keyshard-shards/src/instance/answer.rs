//! A released shard: sealed by a shard host to the ephemeral key a verified instance bound in
//! its quote, and opened by the instance with the private half.
//!
//! HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; info
//! `keyshard/shard-release/v1`; associated data the release binding (integers little-endian):
//!
//! | field            | size    | value                                         |
//! |------------------|---------|-----------------------------------------------|
//! | label length     | 1       | 25                                            |
//! | label            | 25      | `keyshard/shard-release/v1`                   |
//! | credential len   | 1       | 1..=64                                        |
//! | credential name  | ...     | the credential's key id (ASCII)               |
//! | epoch            | 8       | sharing epoch                                 |
//! | share index      | 1       | 1..=255                                       |
//! | host id length   | 1       | 1..=64                                        |
//! | host id          | ...     | the releasing shard host's id (ASCII)         |
//!
//! So an answer opens only with the fetch's private key, and only as the shard of the
//! credential, epoch, index and host the instance asked for: one host's answer cannot be passed
//! off as another's or as another index. The binding is the same [`ShardBinding`] as the one the
//! shard was sealed to the host under, under another label, so neither ciphertext can stand in
//! for the other.
//!
//! A released shard's layout:
//!
//! | offset | size   | field                                          |
//! |--------|--------|------------------------------------------------|
//! | 0      | 4      | magic `KSRS`                                   |
//! | 4      | 1      | version, 1                                     |
//! | 5      | 32     | HPKE encapsulated key                          |
//! | 37     | L + 16 | HPKE ciphertext of the shard (L bytes) and tag |
//!
//! L is 1..=[`MAX_SHARD_LEN`]; the length of the whole is the framing.

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use keyshard_core::bytes::Reader;
use zeroize::Zeroizing;

use super::VerifiedInstance;
use crate::ecies::{MAX_SHARD_LEN, ShardBinding};

type Kem = X25519HkdfSha256;

/// X25519 public and private keys, and the HPKE encapsulated key.
pub const X25519_LEN: usize = 32;
pub const MAGIC: [u8; 4] = *b"KSRS";
pub const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 4 + 1 + X25519_LEN;
/// The longest released shard.
pub const MAX_RELEASED_LEN: usize = HEADER_LEN + MAX_SHARD_LEN + TAG_LEN;
const HPKE_INFO: &[u8] = b"keyshard/shard-release/v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("released shard: {0}")]
    Malformed(&'static str),
    #[error("released shard format version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("the shard is {len} bytes long, 1..={max} are allowed")]
    ShardLength { len: usize, max: usize },
    #[error("the instance's ephemeral key is not a usable X25519 public key")]
    PublicKey,
    #[error("sealing the released shard failed")]
    Seal,
    #[error(
        "the released shard does not open: another fetch's key, another credential, epoch, \
         index or host, or tampered"
    )]
    Open,
    #[error("no randomness from the operating system")]
    Random,
}

pub type Result<T> = std::result::Result<T, AnswerError>;

/// The public half of an instance's ephemeral key for one fetch, bound in its quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPublicKey([u8; X25519_LEN]);

impl FetchPublicKey {
    pub const fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; X25519_LEN] {
        &self.0
    }
}

/// An instance's ephemeral X25519 key pair for one fetch; the private half never leaves the
/// instance and is dropped with the fetch.
pub struct FetchKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: FetchPublicKey,
}

impl FetchKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        getrandom::fill(ikm.as_mut_slice()).map_err(|_| AnswerError::Random)?;
        let (secret, public) = Kem::derive_keypair(ikm.as_slice());
        Ok(Self {
            secret,
            public: FetchPublicKey(public.to_bytes().into()),
        })
    }

    pub fn public_key(&self) -> FetchPublicKey {
        self.public
    }

    /// Opens a shard released to this key under `binding` (the credential, epoch, index and
    /// host the instance asked).
    pub fn open(
        &self,
        released: &ReleasedShard,
        binding: &ShardBinding,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&released.encapped_key)
            .map_err(|_| AnswerError::Open)?;
        hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.secret,
            &encapped,
            HPKE_INFO,
            &released.ciphertext,
            &associated_data(binding),
        )
        .map(Zeroizing::new)
        .map_err(|_| AnswerError::Open)
    }
}

impl std::fmt::Debug for FetchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FetchKey(public {})", hex::encode(self.public.0))
    }
}

/// A shard sealed to a verified instance's ephemeral key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedShard {
    encapped_key: [u8; X25519_LEN],
    ciphertext: Vec<u8>,
}

impl ReleasedShard {
    /// Seals `shard` to the key that `instance`'s verified quote binds, under `binding`. The
    /// caller keeps `shard` in a zeroizing buffer and drops it right after.
    pub fn seal(instance: &VerifiedInstance, binding: &ShardBinding, shard: &[u8]) -> Result<Self> {
        if shard.is_empty() || shard.len() > MAX_SHARD_LEN {
            return Err(AnswerError::ShardLength {
                len: shard.len(),
                max: MAX_SHARD_LEN,
            });
        }
        let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(instance.ephemeral().as_bytes())
            .map_err(|_| AnswerError::PublicKey)?;
        let (encapped, ciphertext) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, Kem>(
            &OpModeS::Base,
            &recipient,
            HPKE_INFO,
            shard,
            &associated_data(binding),
            &mut rand::rng(),
        )
        .map_err(|_| AnswerError::Seal)?;
        Ok(Self {
            encapped_key: encapped.to_bytes().into(),
            ciphertext,
        })
    }

    /// The layout in the module documentation.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.ciphertext.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.encapped_key);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses a released shard; refuses a wrong magic or version and a short or oversized
    /// input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_RELEASED_LEN {
            return Err(AnswerError::Malformed(
                "longer than the largest released shard",
            ));
        }
        let mut r = Reader::new(bytes);
        let truncated = |t: keyshard_core::bytes::Truncated| AnswerError::Malformed(t.field);
        if r.array::<4>("truncated magic").map_err(truncated)? != MAGIC {
            return Err(AnswerError::Malformed("not a released shard (bad magic)"));
        }
        let version = r.u8("truncated version").map_err(truncated)?;
        if version != VERSION {
            return Err(AnswerError::Version(version));
        }
        let encapped_key = r
            .array::<X25519_LEN>("truncated encapsulated key")
            .map_err(truncated)?;
        if r.remaining() <= TAG_LEN {
            return Err(AnswerError::Malformed("truncated ciphertext"));
        }
        let ciphertext = r.take(r.remaining(), "ciphertext").map_err(truncated)?;
        Ok(Self {
            encapped_key,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

/// The release binding's bytes (table in the module documentation).
fn associated_data(binding: &ShardBinding) -> Vec<u8> {
    let credential = binding.credential.as_str().as_bytes();
    let host = binding.host.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + HPKE_INFO.len() + 1 + credential.len() + 10 + host.len());
    push_short(&mut out, HPKE_INFO);
    push_short(&mut out, credential);
    out.extend_from_slice(&binding.epoch.to_le_bytes());
    out.push(binding.index);
    push_short(&mut out, host);
    out
}

/// A byte string after its one-byte length: everything bound here is at most 64 bytes by its
/// type (the label is 25).
fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}
