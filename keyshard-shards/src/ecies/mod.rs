//! Shard encryption to a shard host's TPM-held P-256 key: ECIES over aws-lc-rs primitives.
//!
//! The CMS seals each shard (a signed fragment) to the certified P-256 decrypt key of the host
//! that placement chose; the host opens it with TPM2_ECDH_ZGen, so its private key never leaves
//! the TPM. The `hpke` crate cannot drive a TPM-held key, hence this construction by hand:
//!
//! 1. The sealer makes an ephemeral P-256 key pair `(e, E = e·G)` for this one shard.
//! 2. `Z` = the x-coordinate of `e·H` (H the host's public key), 32 bytes, big-endian: what ECDH
//!    in aws-lc-rs returns, and what TPM2_ECDH_ZGen returns as `outPoint.x` (left-padded to 32
//!    bytes if a TPM drops leading zeros) when given `E`, since `h·E = e·H`.
//! 3. `HKDF-SHA256(ikm = Z, salt = E || H, info = binding)` gives 44 bytes: the AES-256-GCM key
//!    (32) and nonce (12). Both points are SEC1 uncompressed (65 bytes each). A fresh `e` per
//!    shard makes the key, and so the nonce, single use.
//! 4. `AES-256-GCM(key, nonce, aad = binding, plaintext = shard)`.
//!
//! The binding (HKDF info and AEAD associated data, the same bytes) names what the shard is for;
//! opening with any other credential, epoch, index or host fails. Integers are little-endian:
//!
//! | field            | size    | value                                         |
//! |------------------|---------|-----------------------------------------------|
//! | label length     | 1       | 23                                            |
//! | label            | 23      | `keyshard/shard-ecies/v1`                     |
//! | credential len   | 1       | 1..=64                                        |
//! | credential name  | ...     | the credential's key id (ASCII)               |
//! | epoch            | 8       | sharing epoch                                 |
//! | share index      | 1       | 1..=255, the share's x coordinate             |
//! | host id length   | 1       | 1..=64                                        |
//! | host id          | ...     | the shard host's id (ASCII)                   |
//!
//! The sealed shard's byte layout is in [`wire`]. Known-answer vectors made independently (with
//! Python's `cryptography`) are in `tests/kat/`.

pub mod wire;

#[cfg(any(test, feature = "testing"))]
mod software;
#[cfg(test)]
mod tests;

use aws_lc_rs::agreement::{self, ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey};
use aws_lc_rs::{aead, hkdf};
use keyshard_core::KeyId;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use zeroize::{Zeroize, Zeroizing};

use crate::names::HostId;

#[cfg(any(test, feature = "testing"))]
pub use software::SoftwareHostKey;
pub use wire::{MAGIC, MAX_SEALED_LEN, MAX_SHARD_LEN, SealedShard, VERSION};

/// Length of one P-256 coordinate and of `Z`.
pub const COORDINATE_LEN: usize = 32;
/// A SEC1 uncompressed P-256 point: `0x04 || X || Y`.
pub const POINT_LEN: usize = 65;
/// AES-256-GCM tag.
pub const TAG_LEN: usize = 16;
/// Names the construction and its version in the binding.
const LABEL: &[u8] = b"keyshard/shard-ecies/v1";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum EciesError {
    #[error("not a P-256 point: {0}")]
    Point(&'static str),
    #[error("the shard is {len} bytes long, 1..={max} are allowed")]
    ShardLength { len: usize, max: usize },
    #[error("sealed shard: {0}")]
    Malformed(&'static str),
    #[error("sealed shard format version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("no ephemeral key could be made")]
    Ephemeral,
    #[error("the key agreement failed")]
    Agreement,
    #[error("the host could not compute the shared point: {0}")]
    ZGen(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the key derivation failed")]
    Derive,
    #[error("sealing failed")]
    Seal,
    #[error(
        "the shard does not open: another host's key, another credential, epoch, index or host, \
         or tampered"
    )]
    Open,
}

pub type Result<T> = std::result::Result<T, EciesError>;

/// A point on P-256 other than the identity: a host's public key or an ephemeral key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct P256Point(p256::PublicKey);

impl P256Point {
    /// From SEC1 uncompressed bytes (`0x04 || X || Y`); refuses other forms, points off the curve
    /// and the identity.
    pub fn from_uncompressed(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != POINT_LEN || bytes.first() != Some(&0x04) {
            return Err(EciesError::Point("expected 65 bytes, 0x04 || X || Y"));
        }
        p256::PublicKey::from_sec1_bytes(bytes)
            .map(Self)
            .map_err(|_| EciesError::Point("not on the curve"))
    }

    /// From affine coordinates as a TPM gives them (TPMS_ECC_POINT: big-endian, at most 32
    /// bytes each, leading zeros possibly dropped).
    pub fn from_coordinates(x: &[u8], y: &[u8]) -> Result<Self> {
        let x = Zeroizing::new(left_pad(x)?);
        let y = Zeroizing::new(left_pad(y)?);
        let mut encoded =
            p256::EncodedPoint::from_affine_coordinates(&(*x).into(), &(*y).into(), false);
        let point = Option::<p256::PublicKey>::from(p256::PublicKey::from_encoded_point(&encoded));
        encoded.zeroize();
        point.map(Self).ok_or(EciesError::Point("not on the curve"))
    }

    /// SEC1 uncompressed: `0x04 || X || Y`.
    pub fn to_uncompressed(&self) -> [u8; POINT_LEN] {
        let encoded = self.0.to_encoded_point(false);
        let mut out = [0u8; POINT_LEN];
        if let Some(slot) = out.get_mut(..encoded.len()) {
            slot.copy_from_slice(encoded.as_bytes());
        }
        out
    }

    /// The x-coordinate, 32 bytes big-endian (TPMS_ECC_POINT.x).
    pub fn x(&self) -> [u8; COORDINATE_LEN] {
        self.coordinate(1)
    }

    /// The y-coordinate, 32 bytes big-endian (TPMS_ECC_POINT.y).
    pub fn y(&self) -> [u8; COORDINATE_LEN] {
        self.coordinate(1 + COORDINATE_LEN)
    }

    fn coordinate(&self, start: usize) -> [u8; COORDINATE_LEN] {
        let bytes = self.to_uncompressed();
        let mut out = [0u8; COORDINATE_LEN];
        if let Some(slice) = bytes.get(start..start + COORDINATE_LEN) {
            out.copy_from_slice(slice);
        }
        out
    }

    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn as_public_key(&self) -> &p256::PublicKey {
        &self.0
    }
}

impl std::fmt::Debug for P256Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "P256Point({})", hex::encode(self.to_uncompressed()))
    }
}

/// A big-endian coordinate of at most 32 bytes, left-padded with zeros to 32.
fn left_pad(bytes: &[u8]) -> Result<[u8; COORDINATE_LEN]> {
    let start = COORDINATE_LEN
        .checked_sub(bytes.len())
        .ok_or(EciesError::Point("a coordinate is longer than 32 bytes"))?;
    let mut out = [0u8; COORDINATE_LEN];
    if let Some(slot) = out.get_mut(start..) {
        slot.copy_from_slice(bytes);
    }
    Ok(out)
}

/// The ECDH shared point `h·E` that a host computed from a shard's ephemeral key. Only its
/// x-coordinate (`Z`) is kept, zeroized on drop.
pub struct SharedPoint {
    x: Zeroizing<[u8; COORDINATE_LEN]>,
}

impl SharedPoint {
    /// From the coordinates TPM2_ECDH_ZGen returns in `outPoint` (big-endian, at most 32 bytes
    /// each, left-padded). The point must be on the curve: a source that returns garbage is
    /// refused here rather than read as a wrong key later.
    pub fn from_coordinates(x: &[u8], y: &[u8]) -> Result<Self> {
        let point = P256Point::from_coordinates(x, y)?;
        Ok(Self {
            x: Zeroizing::new(point.x()),
        })
    }
}

impl std::fmt::Debug for SharedPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPoint(..)")
    }
}

/// Whatever holds a shard host's P-256 decrypt key: the host's TPM (TPM2_ECDH_ZGen on the key's
/// handle) or, in tests, `SoftwareHostKey`.
pub trait SharedPointSource {
    /// What computing the point can fail with (a TPM error, for example); it must not carry
    /// secret bytes.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The public half of the decrypt key: what the CMS sealed to.
    fn public_key(&self) -> P256Point;

    /// `h·ephemeral`, the shared point, with `h` the private decrypt key.
    fn z_gen(&self, ephemeral: &P256Point) -> std::result::Result<SharedPoint, Self::Error>;
}

/// What a sealed shard is for: opening it under any other binding fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardBinding {
    pub credential: KeyId,
    pub epoch: u64,
    /// The share's x coordinate, 1..=n.
    pub index: u8,
    /// The host the shard is sealed to.
    pub host: HostId,
}

impl ShardBinding {
    /// The binding's bytes (table in the module documentation): HKDF info and AEAD associated
    /// data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let credential = self.credential.as_str().as_bytes();
        let host = self.host.as_str().as_bytes();
        let mut out = Vec::with_capacity(1 + LABEL.len() + 1 + credential.len() + 10 + host.len());
        push_short(&mut out, LABEL);
        push_short(&mut out, credential);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.push(self.index);
        push_short(&mut out, host);
        out
    }
}

/// A byte string after its one-byte length. Everything bound here is at most 64 bytes by its
/// type (the label is 23), so the length always fits.
fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

/// Seals `shard` to the host key `recipient` under `binding`, with a fresh ephemeral key.
pub fn seal(recipient: &P256Point, binding: &ShardBinding, shard: &[u8]) -> Result<SealedShard> {
    check_shard_len(shard.len())?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ephemeral =
        EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| EciesError::Ephemeral)?;
    let ephemeral_public = ephemeral
        .compute_public_key()
        .map_err(|_| EciesError::Ephemeral)?;
    let ephemeral_public = P256Point::from_uncompressed(ephemeral_public.as_ref())?;
    let peer = UnparsedPublicKey::new(&ECDH_P256, recipient.to_uncompressed());
    let z = agreement::agree_ephemeral(ephemeral, peer, EciesError::Agreement, copy_z)?;
    seal_with_z(recipient, ephemeral_public, &z, binding, shard)
}

/// [`seal`] with a chosen ephemeral scalar (32 bytes, big-endian): for known-answer tests only.
/// Reusing a scalar for two shards reuses the AES-GCM key and nonce.
#[cfg(any(test, feature = "testing"))]
pub fn seal_with_ephemeral_scalar(
    recipient: &P256Point,
    ephemeral_scalar: &[u8; COORDINATE_LEN],
    binding: &ShardBinding,
    shard: &[u8],
) -> Result<SealedShard> {
    check_shard_len(shard.len())?;
    let ephemeral = agreement::PrivateKey::from_private_key(&ECDH_P256, ephemeral_scalar)
        .map_err(|_| EciesError::Ephemeral)?;
    let ephemeral_public = ephemeral
        .compute_public_key()
        .map_err(|_| EciesError::Ephemeral)?;
    let ephemeral_public = P256Point::from_uncompressed(ephemeral_public.as_ref())?;
    let peer = UnparsedPublicKey::new(&ECDH_P256, recipient.to_uncompressed());
    let z = agreement::agree(&ephemeral, peer, EciesError::Agreement, copy_z)?;
    seal_with_z(recipient, ephemeral_public, &z, binding, shard)
}

/// Opens a sealed shard with the host key behind `host`, under `binding`.
pub fn open<S: SharedPointSource + ?Sized>(
    host: &S,
    binding: &ShardBinding,
    sealed: &SealedShard,
) -> Result<Zeroizing<Vec<u8>>> {
    let shared = host
        .z_gen(sealed.ephemeral())
        .map_err(|e| EciesError::ZGen(Box::new(e)))?;
    let info = binding.to_bytes();
    let (key, nonce) = derive(sealed.ephemeral(), &host.public_key(), &shared.x, &info)?;
    let mut buffer = Zeroizing::new(sealed.ciphertext().to_vec());
    let plaintext_len = key
        .open_in_place(
            nonce,
            aead::Aad::from(info.as_slice()),
            buffer.as_mut_slice(),
        )
        .map_err(|_| EciesError::Open)?
        .len();
    buffer.truncate(plaintext_len);
    Ok(buffer)
}

fn check_shard_len(len: usize) -> Result<()> {
    if len == 0 || len > MAX_SHARD_LEN {
        return Err(EciesError::ShardLength {
            len,
            max: MAX_SHARD_LEN,
        });
    }
    Ok(())
}

fn copy_z(z: &[u8]) -> Result<Zeroizing<[u8; COORDINATE_LEN]>> {
    let mut out = Zeroizing::new([0u8; COORDINATE_LEN]);
    if z.len() != COORDINATE_LEN {
        return Err(EciesError::Agreement);
    }
    out.copy_from_slice(z);
    Ok(out)
}

fn seal_with_z(
    recipient: &P256Point,
    ephemeral: P256Point,
    z: &[u8; COORDINATE_LEN],
    binding: &ShardBinding,
    shard: &[u8],
) -> Result<SealedShard> {
    let info = binding.to_bytes();
    let (key, nonce) = derive(&ephemeral, recipient, z, &info)?;
    let mut buffer = Zeroizing::new(shard.to_vec());
    key.seal_in_place_append_tag(nonce, aead::Aad::from(info.as_slice()), &mut *buffer)
        .map_err(|_| EciesError::Seal)?;
    SealedShard::new(ephemeral, buffer.to_vec())
}

/// HKDF output length: the AES-256-GCM key and nonce.
struct OkmLen;

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        KEY_LEN + NONCE_LEN
    }
}

/// Step 3: the AES-256-GCM key and nonce for one shard.
fn derive(
    ephemeral: &P256Point,
    recipient: &P256Point,
    z: &[u8; COORDINATE_LEN],
    info: &[u8],
) -> Result<(aead::LessSafeKey, aead::Nonce)> {
    let mut salt = [0u8; 2 * POINT_LEN];
    let (first, second) = salt.split_at_mut(POINT_LEN);
    first.copy_from_slice(&ephemeral.to_uncompressed());
    second.copy_from_slice(&recipient.to_uncompressed());
    let mut okm = Zeroizing::new([0u8; KEY_LEN + NONCE_LEN]);
    hkdf::Salt::new(hkdf::HKDF_SHA256, &salt)
        .extract(z)
        .expand(&[info], OkmLen)
        .and_then(|okm_out| okm_out.fill(okm.as_mut_slice()))
        .map_err(|_| EciesError::Derive)?;
    let (key_bytes, nonce_bytes) = okm.split_at(KEY_LEN);
    let key =
        aead::UnboundKey::new(&aead::AES_256_GCM, key_bytes).map_err(|_| EciesError::Derive)?;
    let nonce =
        aead::Nonce::try_assume_unique_for_key(nonce_bytes).map_err(|_| EciesError::Derive)?;
    Ok((aead::LessSafeKey::new(key), nonce))
}
