//! Opening, in the guest, a `host` share as a shard host released it (issue 9 item 8): the
//! `KSRS` format of `keyshard_shards::instance` (HPKE base mode, DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, AES-256-GCM, info `keyshard/shard-release/v1`, associated data the release
//! binding: credential, epoch, share index, host).
//!
//! The guest agent cannot link keyshard-shards (it carries aws-lc-rs for the hosts' P-256
//! sealing), so this is the opening half of that format, kept byte for byte the same; the
//! host-level test of the relay (keyshard/tests/host_class.rs) opens shards that real shard
//! hosts sealed with it, so the two cannot drift apart unnoticed.
//!
//! The binding's fields come from the coordinator's answer, which the guest does not trust: a
//! wrong one only makes the shard fail to open. What the guest trusts is the opened bytes'
//! dealer signature and holder, which it checks as for any other share.

use zeroize::Zeroizing;

use crate::bytes::Reader;
use crate::envelope::{ENCAPPED_KEY_LEN, RequestKey, TAG_LEN};
use crate::fragment::MAX_FRAGMENT_LEN;
use crate::holder::KeyId;

/// `KSRS`: a released shard.
pub const MAGIC: [u8; 4] = *b"KSRS";
pub const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + ENCAPPED_KEY_LEN;
/// The longest released shard: one signed fragment, sealed.
pub const MAX_RELEASED_LEN: usize = HEADER_LEN + MAX_FRAGMENT_LEN + TAG_LEN;
/// The longest shard host id the binding carries.
pub const MAX_HOST_ID_LEN: usize = 64;
const INFO: &[u8] = b"keyshard/shard-release/v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardReleaseError {
    #[error("released shard: {0}")]
    Malformed(&'static str),
    #[error("released shard format version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error(
        "the released shard does not open: another request's key, another credential, epoch, \
         index or host, or tampered"
    )]
    Open,
}

/// What a released shard is bound to: the shard host sealed it under these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseBinding<'a> {
    /// The credential the shards are stored as: the volume key's id.
    pub credential: &'a KeyId,
    pub epoch: u64,
    /// The share's slot in the credential, 1..=n.
    pub index: u8,
    /// The releasing shard host's id.
    pub host: &'a str,
}

impl ReleaseBinding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let credential = self.credential.as_str().as_bytes();
        let host = self.host.as_bytes();
        let mut out = Vec::with_capacity(1 + INFO.len() + 1 + credential.len() + 10 + host.len());
        push_short(&mut out, INFO);
        push_short(&mut out, credential);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.push(self.index);
        push_short(&mut out, host);
        out
    }
}

/// Opens `released` (the `KSRS` bytes) with the request key it was sealed to, under `binding`:
/// the shard's bytes (a signed fragment, still to be checked).
pub fn open(
    key: &RequestKey,
    released: &[u8],
    binding: &ReleaseBinding<'_>,
) -> Result<Zeroizing<Vec<u8>>, ShardReleaseError> {
    if released.len() > MAX_RELEASED_LEN {
        return Err(ShardReleaseError::Malformed(
            "longer than the largest released shard",
        ));
    }
    let mut r = Reader::new(released);
    let truncated = |t: crate::bytes::Truncated| ShardReleaseError::Malformed(t.field);
    if r.array::<4>("truncated magic").map_err(truncated)? != MAGIC {
        return Err(ShardReleaseError::Malformed(
            "not a released shard (bad magic)",
        ));
    }
    let version = r.u8("truncated version").map_err(truncated)?;
    if version != VERSION {
        return Err(ShardReleaseError::Version(version));
    }
    let encapped = r
        .array::<ENCAPPED_KEY_LEN>("truncated encapsulated key")
        .map_err(truncated)?;
    if r.remaining() <= TAG_LEN {
        return Err(ShardReleaseError::Malformed("truncated ciphertext"));
    }
    let ciphertext = r.take(r.remaining(), "ciphertext").map_err(truncated)?;
    key.open_with(INFO, &encapped, ciphertext, &binding.associated_data())
        .map_err(|_| ShardReleaseError::Open)
}

/// A byte string after its one-byte length; everything bound is at most 64 bytes.
fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use hpke::aead::AesGcm256;
    use hpke::kdf::HkdfSha256;
    use hpke::kem::X25519HkdfSha256;
    use hpke::{Deserializable, OpModeS, Serializable};

    use super::*;

    /// Seals like a shard host does (keyshard_shards::instance::ReleasedShard::seal).
    fn seal(to: &[u8; 32], shard: &[u8], binding: &ReleaseBinding<'_>) -> Vec<u8> {
        let recipient = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(to).unwrap();
        let (encapped, ciphertext) =
            hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
                &OpModeS::Base,
                &recipient,
                INFO,
                shard,
                &binding.associated_data(),
                &mut rand::rng(),
            )
            .unwrap();
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        out.extend_from_slice(&encapped.to_bytes());
        out.extend_from_slice(&ciphertext);
        out
    }

    #[test]
    fn opens_only_under_its_own_key_and_binding() {
        let key = RequestKey::generate().unwrap();
        let credential = KeyId::new("vm-key").unwrap();
        let binding = ReleaseBinding {
            credential: &credential,
            epoch: 1,
            index: 2,
            host: "host-2",
        };
        let released = seal(&key.public_key(), b"fragment", &binding);
        assert_eq!(
            open(&key, &released, &binding).unwrap().as_slice(),
            b"fragment"
        );

        let other = KeyId::new("other").unwrap();
        for wrong in [
            ReleaseBinding {
                epoch: 2,
                ..binding.clone()
            },
            ReleaseBinding {
                index: 1,
                ..binding.clone()
            },
            ReleaseBinding {
                host: "host-1",
                ..binding.clone()
            },
            ReleaseBinding {
                credential: &other,
                ..binding.clone()
            },
        ] {
            assert_eq!(open(&key, &released, &wrong), Err(ShardReleaseError::Open));
        }
        let stranger = RequestKey::generate().unwrap();
        assert_eq!(
            open(&stranger, &released, &binding),
            Err(ShardReleaseError::Open)
        );
    }

    #[test]
    fn refuses_other_formats_before_any_crypto() {
        let key = RequestKey::generate().unwrap();
        let credential = KeyId::new("vm-key").unwrap();
        let binding = ReleaseBinding {
            credential: &credential,
            epoch: 1,
            index: 1,
            host: "h",
        };
        let released = seal(&key.public_key(), b"fragment", &binding);
        let mut bad_magic = released.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            open(&key, &bad_magic, &binding),
            Err(ShardReleaseError::Malformed(_))
        ));
        let mut bad_version = released.clone();
        bad_version[4] = 2;
        assert_eq!(
            open(&key, &bad_version, &binding),
            Err(ShardReleaseError::Version(2))
        );
        assert!(matches!(
            open(&key, &released[..HEADER_LEN + TAG_LEN], &binding),
            Err(ShardReleaseError::Malformed(_))
        ));
        assert!(matches!(
            open(&key, &vec![0; MAX_RELEASED_LEN + 1], &binding),
            Err(ShardReleaseError::Malformed(_))
        ));
    }
}
