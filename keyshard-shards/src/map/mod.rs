//! The shard map: where the shards of one credential epoch are, signed by the CMS and sealed to
//! the client.
//!
//! A map names the credential, its epoch, k and n, the placement seed, the credential's key check
//! value and, per share index, the host, its endpoint and the TPM name of the host's certified
//! decrypt key. Its canonical encoding is in [`wire`]. The CMS hands it out in two layers:
//!
//! 1. **Signed**: `encoding || Ed25519 signature` (64 bytes) by the CMS signing key over
//!    `"keyshard/shard-map/v1/signature" || encoding`; checked with `verify_strict` against the
//!    CMS verifying key the client was configured with.
//! 2. **Sealed**: HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM,
//!    to the client's X25519 public key; info `keyshard/shard-map/v1`, associated data the
//!    credential name (one length byte, then the name). Layout of a sealed map:
//!
//! | offset | size   | field                                       |
//! |--------|--------|---------------------------------------------|
//! | 0      | 4      | magic `KSMS`                                |
//! | 4      | 1      | version, 1                                  |
//! | 5      | 32     | HPKE encapsulated key                       |
//! | 37     | ...    | HPKE ciphertext of the signed map, with tag |
//!
//! Opening needs the client's private key and the CMS verifying key, and checks that the map is
//! for the credential asked for. Sealing keeps the map (which hosts, which endpoints) from
//! anyone but the client; the signature keeps anyone but the CMS, the client included, from
//! making one. The HPKE layer is separate from keyshard-core's release envelope: that one is
//! bound to a guest's one-request key and a release context, this one to a client's long-lived
//! key and a credential name, under its own info label, so neither can stand in for the other.

pub mod wire;

#[cfg(test)]
mod tests;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use keyshard_core::holder::NameError;
use keyshard_core::{KeyCheckValue, KeyId, Threshold};
use zeroize::{Zeroize, Zeroizing};

use crate::names::HostId;
use crate::placement::{Placement, PlacementSeed};

pub use wire::{MAGIC, MAX_MAP_LEN, VERSION};

type Kem = X25519HkdfSha256;

/// Longest endpoint.
pub const MAX_ENDPOINT_LEN: usize = 255;
/// Longest TPM name: a 2-byte hash algorithm and a SHA-512 digest.
pub const MAX_KEY_NAME_LEN: usize = 66;
/// Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// X25519 public and private keys, and the HPKE encapsulated key.
pub const X25519_LEN: usize = 32;
/// AES-256-GCM tag.
const TAG_LEN: usize = 16;
const SIGNATURE_CONTEXT: &[u8] = b"keyshard/shard-map/v1/signature";
const HPKE_INFO: &[u8] = b"keyshard/shard-map/v1";
const SEALED_MAGIC: [u8; 4] = *b"KSMS";
const SEALED_VERSION: u8 = 1;
const SEALED_HEADER_LEN: usize = 4 + 1 + X25519_LEN;
/// The longest sealed map.
pub const MAX_SEALED_MAP_LEN: usize = SEALED_HEADER_LEN + MAX_MAP_LEN + SIGNATURE_LEN + TAG_LEN;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("shard map: {0} is missing or short")]
    Truncated(&'static str),
    #[error("shard map: {len} bytes, at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("not a shard map (bad magic)")]
    BadMagic,
    #[error("shard map format version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("shard map: {0}")]
    Name(NameError),
    #[error("shard map: k = {k}, n = {n} is not a threshold (2 <= k <= n)")]
    Threshold { k: u8, n: u8 },
    #[error("shard map: {found} shards for n = {expected}")]
    ShardCount { expected: u8, found: usize },
    #[error("shard map: entry {expected} has share index {found}")]
    ShardIndex { expected: u8, found: u8 },
    #[error("shard map: host {0} holds two shards")]
    DuplicateHost(HostId),
    #[error("shard map: the endpoint {0}")]
    Endpoint(&'static str),
    #[error("shard map: a key name of {len} bytes, 1..={MAX_KEY_NAME_LEN} are allowed")]
    KeyName { len: usize },
    #[error("shard map: {0} bytes after the last entry")]
    TrailingBytes(usize),
    #[error("the shard map's signature does not verify under the CMS key")]
    Signature,
    #[error("the CMS verifying key is a weak (small-order) Ed25519 point")]
    WeakKey,
    #[error("sealed shard map: {0}")]
    Sealed(&'static str),
    #[error("sealed shard map format version {0} is not supported (expected {SEALED_VERSION})")]
    SealedVersion(u8),
    #[error("the shard map does not open: another client key, another credential, or tampered")]
    Open,
    #[error("the map is for credential {found}, not {expected}")]
    Credential { expected: KeyId, found: KeyId },
    #[error("not a usable X25519 public key")]
    PublicKey,
    #[error("not an X25519 private key")]
    PrivateKey,
    #[error("sealing the shard map failed")]
    Seal,
    #[error("no randomness from the operating system")]
    Random,
}

pub type Result<T> = std::result::Result<T, MapError>;

/// Where a shard host answers: 1..=255 bytes of printable ASCII without spaces (a URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(String);

impl Endpoint {
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        if value.is_empty() {
            return Err(MapError::Endpoint("is empty"));
        }
        if value.len() > MAX_ENDPOINT_LEN {
            return Err(MapError::Endpoint("is longer than 255 bytes"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(MapError::Endpoint(
                "may hold only printable ASCII without spaces",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The TPM name of a host's certified decrypt key (TPM2B_NAME's bytes: hash algorithm and
/// digest of the public area), as the certification named it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyName(Vec<u8>);

impl KeyName {
    pub fn new(bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() || bytes.len() > MAX_KEY_NAME_LEN {
            return Err(MapError::KeyName { len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for KeyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyName({})", hex::encode(&self.0))
    }
}

/// One shard's place: its host, where the host answers, and the host key it is sealed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLocation {
    pub host: HostId,
    pub endpoint: Endpoint,
    pub key_name: KeyName,
}

/// Where the shards of one credential epoch are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    credential: KeyId,
    epoch: u64,
    threshold: Threshold,
    seed: PlacementSeed,
    key_check_value: KeyCheckValue,
    /// Share index `i + 1` at position `i`.
    shards: Vec<ShardLocation>,
}

impl ShardMap {
    /// A map with one location per share, index 1 first; refuses a count other than n and a
    /// host that appears twice.
    pub fn new(
        credential: KeyId,
        epoch: u64,
        threshold: Threshold,
        seed: PlacementSeed,
        key_check_value: KeyCheckValue,
        shards: Vec<ShardLocation>,
    ) -> Result<Self> {
        if shards.len() != usize::from(threshold.n()) {
            return Err(MapError::ShardCount {
                expected: threshold.n(),
                found: shards.len(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for shard in &shards {
            if !seen.insert(&shard.host) {
                return Err(MapError::DuplicateHost(shard.host.clone()));
            }
        }
        Ok(Self {
            credential,
            epoch,
            threshold,
            seed,
            key_check_value,
            shards,
        })
    }

    /// Whether this map's hosts are the ones `placement` chose, index by index: a client that
    /// knows the candidate hosts recomputes the placement from [`ShardMap::seed`] and checks.
    /// Recompute with `allow_correlated: true`: where a placement within the domain bound
    /// exists the result is the same either way, and where none exists the CMS can only have
    /// placed with the override.
    pub fn follows(&self, placement: &Placement) -> bool {
        self.shards
            .iter()
            .map(|s| &s.host)
            .eq(placement.hosts().iter())
    }

    pub fn credential(&self) -> &KeyId {
        &self.credential
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn threshold(&self) -> Threshold {
        self.threshold
    }

    pub fn seed(&self) -> &PlacementSeed {
        &self.seed
    }

    pub fn key_check_value(&self) -> &KeyCheckValue {
        &self.key_check_value
    }

    /// (share index, location) pairs, index 1 first.
    pub fn shards(&self) -> impl Iterator<Item = (u8, &ShardLocation)> {
        (1..=u8::MAX).zip(self.shards.iter())
    }

    /// The location of share `index` (1..=n).
    pub fn shard(&self, index: u8) -> Option<&ShardLocation> {
        self.shards.get(usize::from(index).checked_sub(1)?)
    }

    /// The canonical encoding ([`wire`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self)
    }

    /// Parses the canonical encoding; refuses anything else. Unsigned: for a map from anyone
    /// but this process, use [`SignedShardMap::verify`] or [`SealedShardMap::open`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        wire::decode(bytes)
    }

    /// Signs the canonical encoding with the CMS key.
    pub fn sign(&self, cms: &SigningKey) -> SignedShardMap {
        let encoding = self.to_bytes();
        let signature = cms.sign(&signed_message(&encoding));
        let mut bytes = encoding;
        bytes.extend_from_slice(&signature.to_bytes());
        SignedShardMap(bytes)
    }

    /// Signs with the CMS key and seals to the client's public key.
    pub fn seal(&self, cms: &SigningKey, client: &ClientPublicKey) -> Result<SealedShardMap> {
        let signed = self.sign(cms);
        let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(&client.0)
            .map_err(|_| MapError::PublicKey)?;
        let (encapped, ciphertext) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, Kem>(
            &OpModeS::Base,
            &recipient,
            HPKE_INFO,
            signed.as_bytes(),
            &associated_data(&self.credential),
            &mut rand::rng(),
        )
        .map_err(|_| MapError::Seal)?;
        Ok(SealedShardMap {
            encapped_key: encapped.to_bytes().into(),
            ciphertext,
        })
    }
}

fn signed_message(encoding: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + encoding.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(encoding);
    message
}

fn associated_data(credential: &KeyId) -> Vec<u8> {
    let name = credential.as_str().as_bytes();
    let mut aad = Vec::with_capacity(1 + name.len());
    aad.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    aad.extend_from_slice(name);
    aad
}

/// A map's encoding followed by the CMS's Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedShardMap(Vec<u8>);

impl SignedShardMap {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Checks the signature with the CMS verifying key (refusing a weak key), then parses.
    pub fn verify(&self, cms: &VerifyingKey) -> Result<ShardMap> {
        keyshard_core::keys::check_not_weak(cms).map_err(|_| MapError::WeakKey)?;
        if self.0.len() > MAX_MAP_LEN + SIGNATURE_LEN {
            return Err(MapError::TooLong {
                len: self.0.len(),
                max: MAX_MAP_LEN + SIGNATURE_LEN,
            });
        }
        let split = self
            .0
            .len()
            .checked_sub(SIGNATURE_LEN)
            .ok_or(MapError::Truncated("signature"))?;
        let (encoding, signature) = self.0.split_at(split);
        let signature =
            Signature::from_slice(signature).map_err(|_| MapError::Truncated("signature"))?;
        cms.verify_strict(&signed_message(encoding), &signature)
            .map_err(|_| MapError::Signature)?;
        ShardMap::from_bytes(encoding)
    }
}

/// A signed map sealed to one client's X25519 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShardMap {
    encapped_key: [u8; X25519_LEN],
    ciphertext: Vec<u8>,
}

impl SealedShardMap {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEALED_HEADER_LEN + self.ciphertext.len());
        out.extend_from_slice(&SEALED_MAGIC);
        out.push(SEALED_VERSION);
        out.extend_from_slice(&self.encapped_key);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses a sealed map; refuses a wrong magic or version and a short or oversized input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_SEALED_MAP_LEN {
            return Err(MapError::Sealed("longer than the largest sealed map"));
        }
        let mut r = keyshard_core::bytes::Reader::new(bytes);
        let magic = r
            .array::<4>("")
            .map_err(|_| MapError::Sealed("truncated magic"))?;
        if magic != SEALED_MAGIC {
            return Err(MapError::Sealed("not a sealed shard map (bad magic)"));
        }
        let version = r
            .u8("")
            .map_err(|_| MapError::Sealed("truncated version"))?;
        if version != SEALED_VERSION {
            return Err(MapError::SealedVersion(version));
        }
        let encapped_key = r
            .array::<X25519_LEN>("")
            .map_err(|_| MapError::Sealed("truncated encapsulated key"))?;
        let ciphertext = r
            .take(r.remaining(), "")
            .map_err(|_| MapError::Sealed("truncated ciphertext"))?;
        if ciphertext.len() <= TAG_LEN + SIGNATURE_LEN {
            return Err(MapError::Sealed("truncated ciphertext"));
        }
        Ok(Self {
            encapped_key,
            ciphertext: ciphertext.to_vec(),
        })
    }

    /// Opens with the client's key, checks the CMS signature, and checks that the map is for
    /// `credential`.
    pub fn open(
        &self,
        client: &ClientKey,
        cms: &VerifyingKey,
        credential: &KeyId,
    ) -> Result<ShardMap> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&self.encapped_key)
            .map_err(|_| MapError::Open)?;
        let signed = hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &client.secret,
            &encapped,
            HPKE_INFO,
            &self.ciphertext,
            &associated_data(credential),
        )
        .map_err(|_| MapError::Open)?;
        let map = SignedShardMap(signed).verify(cms)?;
        if map.credential() != credential {
            return Err(MapError::Credential {
                expected: credential.clone(),
                found: map.credential().clone(),
            });
        }
        Ok(map)
    }
}

/// A client's X25519 public key: what the CMS seals maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPublicKey([u8; X25519_LEN]);

impl ClientPublicKey {
    pub const fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; X25519_LEN] {
        &self.0
    }
}

/// A client's X25519 key pair; the private half opens the maps sealed to it.
pub struct ClientKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: ClientPublicKey,
}

impl ClientKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        getrandom::fill(ikm.as_mut_slice()).map_err(|_| MapError::Random)?;
        let (secret, public) = Kem::derive_keypair(ikm.as_slice());
        Ok(Self {
            secret,
            public: ClientPublicKey(public.to_bytes().into()),
        })
    }

    /// From the 32 private-key bytes (RFC 7748 scalar, as [`ClientKey::to_bytes`] gives them).
    pub fn from_bytes(bytes: &[u8; X25519_LEN]) -> Result<Self> {
        let secret =
            <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|_| MapError::PrivateKey)?;
        let public = ClientPublicKey(Kem::sk_to_pk(&secret).to_bytes().into());
        Ok(Self { secret, public })
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; X25519_LEN]> {
        let mut raw = self.secret.to_bytes();
        let mut out = Zeroizing::new([0u8; X25519_LEN]);
        out.copy_from_slice(&raw);
        raw.zeroize();
        out
    }

    pub fn public_key(&self) -> ClientPublicKey {
        self.public
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKey(public {})", hex::encode(self.public.0))
    }
}
