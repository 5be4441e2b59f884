//! The byte layout of a sealed shard, version 1, and its strict parser.
//!
//! | offset | size       | field                                                        |
//! |--------|------------|--------------------------------------------------------------|
//! | 0      | 4          | magic `KSSE`                                                 |
//! | 4      | 1          | version, 1                                                   |
//! | 5      | 65         | ephemeral public key, SEC1 uncompressed `0x04 \|\| X \|\| Y`   |
//! | 70     | L + 16     | AES-256-GCM ciphertext of the shard (L bytes) and its tag    |
//!
//! L is 1..=[`MAX_SHARD_LEN`]: a shard is one signed fragment. The ciphertext runs to the end:
//! the length of the whole is the framing (the store and the API carry it). The ephemeral key
//! must be a point on P-256 other than the identity; anything else is refused before a TPM is
//! asked to multiply it.

use keyshard_core::bytes::Reader;

use super::{EciesError, P256Point, POINT_LEN, Result, TAG_LEN};

pub const MAGIC: [u8; 4] = *b"KSSE";
pub const VERSION: u8 = 1;
/// The longest shard: the largest signed fragment.
pub const MAX_SHARD_LEN: usize = keyshard_core::fragment::MAX_FRAGMENT_LEN;
const HEADER_LEN: usize = MAGIC.len() + 1 + POINT_LEN;
/// The longest sealed shard.
pub const MAX_SEALED_LEN: usize = HEADER_LEN + MAX_SHARD_LEN + TAG_LEN;

/// One shard sealed to one host's key (see the module documentation for what it binds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShard {
    ephemeral: P256Point,
    ciphertext: Vec<u8>,
}

impl SealedShard {
    pub(super) fn new(ephemeral: P256Point, ciphertext: Vec<u8>) -> Result<Self> {
        check_ciphertext_len(ciphertext.len())?;
        Ok(Self {
            ephemeral,
            ciphertext,
        })
    }

    /// The sealer's ephemeral public key: what the host hands to TPM2_ECDH_ZGen.
    pub fn ephemeral(&self) -> &P256Point {
        &self.ephemeral
    }

    /// The AES-256-GCM ciphertext and tag.
    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.ciphertext.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.ephemeral.to_uncompressed());
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses a sealed shard; refuses a wrong magic or version, a short or oversized input and
    /// an ephemeral key that is not a valid P-256 point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_SEALED_LEN {
            return Err(EciesError::Malformed(
                "longer than the largest sealed shard",
            ));
        }
        let mut r = Reader::new(bytes);
        let truncated = |t: keyshard_core::bytes::Truncated| EciesError::Malformed(t.field);
        if r.array::<4>("truncated magic").map_err(truncated)? != MAGIC {
            return Err(EciesError::Malformed("not a sealed shard (bad magic)"));
        }
        let version = r.u8("truncated version").map_err(truncated)?;
        if version != VERSION {
            return Err(EciesError::Version(version));
        }
        let point = r
            .take(POINT_LEN, "truncated ephemeral key")
            .map_err(truncated)?;
        let ephemeral = P256Point::from_uncompressed(point)?;
        let ciphertext = r.take(r.remaining(), "ciphertext").map_err(truncated)?;
        Self::new(ephemeral, ciphertext.to_vec())
    }
}

fn check_ciphertext_len(len: usize) -> Result<()> {
    if len <= TAG_LEN {
        return Err(EciesError::Malformed("truncated ciphertext"));
    }
    if len > MAX_SHARD_LEN + TAG_LEN {
        return Err(EciesError::Malformed(
            "ciphertext longer than the largest shard",
        ));
    }
    Ok(())
}
