//! Grants: the CMS's signed permission for one shard host to release one shard to one compute
//! instance, for a short time.
//!
//! The CMS decides which instances may fetch a credential (its instance policy) and verifies
//! the instance's evidence before it hands out anything. A shard host does not know the
//! credential's instance policy; it learns from a grant that the CMS admitted this instance,
//! and which attestation key and golden PCR values it must verify the instance's own evidence
//! against. A grant names:
//!
//! - the credential, its epoch and the share index, and the host that holds that share;
//! - the instance and its [`InstancePolicy`] (AK and golden PCRs) as the CMS registered it;
//! - SHA-256 of the sealed shard (`KSSE` bytes) the CMS stored for that slot, so the host
//!   opens exactly that ciphertext and no other the instance might send along;
//! - `not_after_ms`: when it stops being good, ms since the Unix epoch; the CMS issues grants
//!   good for [`LIFETIME`] (120 s).
//!
//! Its encoding is in [`wire`]: the statement, then the CMS's Ed25519 signature (64 bytes) over
//! `"keyshard/grant/v1/signature" || statement`, checked with `verify_strict` against the CMS
//! verifying key the host was configured with.
//!
//! [`Grant::verify`] checks, in this order: the signature ([`GrantError::Signature`]), that the
//! grant is for this host ([`GrantError::Host`]), that the sealed shard is the one granted
//! ([`GrantError::ShardDigest`]), that it has not expired ([`GrantError::Expired`]) and that it
//! does not claim to live longer than a grant can ([`GrantError::TooLong`]: more than
//! [`LIFETIME`] plus [`MAX_CLOCK_SKEW`] ahead). Only a [`VerifiedGrant`] names what to release.
//!
//! What a grant protects against: a host releasing to an instance the CMS did not admit, or
//! against a policy the instance chose itself; a sealed shard swapped for another one stored
//! for this host. What it does not: a revoked instance keeps fetching with a grant it already
//! holds until the grant expires (at most 120 s, plus the clocks' skew); the CMS's signing key
//! is trusted entirely, as for the shard map.

pub mod wire;

#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use keyshard_core::KeyId;
use sha2::{Digest as _, Sha256};

use crate::ecies::SealedShard;
use crate::instance::InstancePolicy;
use crate::instance::wire::FormatError;
use crate::names::{HostId, InstanceId, NameError};

pub use wire::{MAGIC, MAX_GRANT_LEN, VERSION};

/// How long a grant is good from its issue.
pub const LIFETIME: Duration = Duration::from_secs(120);
/// How far a host's clock may lag the CMS's before a grant looks too long-lived to it.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// SHA-256 of the sealed shard.
pub const DIGEST_LEN: usize = 32;
const SIGNATURE_CONTEXT: &[u8] = b"keyshard/grant/v1/signature";

/// Why a grant does not parse or verify. None carries secret bytes (a grant holds none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("grant: {0} is missing or short")]
    Truncated(&'static str),
    #[error("grant: {len} bytes, at most {max} are allowed")]
    TooLarge { len: usize, max: usize },
    #[error("not a grant (bad magic)")]
    BadMagic,
    #[error("grant format version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("grant: {0}")]
    Name(NameError),
    #[error("grant: share index 0 (indexes are 1..=255)")]
    Index,
    #[error("grant: the instance policy is {len} bytes, 1..={max} are allowed")]
    PolicyLength { len: usize, max: usize },
    #[error("grant: {0}")]
    Policy(FormatError),
    #[error("grant: {0} bytes after the signature")]
    TrailingBytes(usize),
    #[error("the grant's signature does not verify under the CMS key")]
    Signature,
    #[error("the CMS verifying key is a weak (small-order) Ed25519 point")]
    WeakKey,
    #[error("the grant is for host {granted}, not for this host ({this})")]
    Host { granted: HostId, this: HostId },
    #[error("the sealed shard is not the one the grant names (its SHA-256 differs)")]
    ShardDigest,
    #[error("the grant expired {ago_ms} ms ago")]
    Expired { ago_ms: u64 },
    #[error(
        "the grant claims to be good for {ahead_ms} ms more, longer than a grant lives \
         ({max_ms} ms with clock skew)"
    )]
    TooLong { ahead_ms: u64, max_ms: u64 },
    #[error("the system clock is before 1970")]
    Clock,
}

pub type Result<T> = std::result::Result<T, GrantError>;

/// What a grant says (everything but the signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantStatement {
    pub credential: KeyId,
    pub epoch: u64,
    /// The share index, 1..=255.
    pub index: u8,
    /// The host that holds the share and may release it.
    pub host: HostId,
    /// The instance it may be released to.
    pub instance: InstanceId,
    /// The instance's registered AK and golden PCR values: what the host verifies its evidence
    /// against.
    pub policy: InstancePolicy,
    /// SHA-256 of the sealed shard's bytes ([`shard_digest`]).
    pub shard_digest: [u8; DIGEST_LEN],
    /// When the grant stops being good, ms since the Unix epoch.
    pub not_after_ms: u64,
}

/// SHA-256 of a sealed shard's encoding: what a grant binds.
pub fn shard_digest(sealed: &SealedShard) -> [u8; DIGEST_LEN] {
    Sha256::digest(sealed.to_bytes()).into()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> Result<u64> {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| GrantError::Clock)?;
    Ok(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

impl GrantStatement {
    /// The statement's canonical encoding ([`wire`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self)
    }

    /// Signs the statement with the CMS key.
    pub fn sign(&self, cms: &SigningKey) -> Grant {
        let signature = cms.sign(&signed_message(&self.to_bytes()));
        Grant {
            statement: self.clone(),
            signature: signature.to_bytes(),
        }
    }
}

fn signed_message(statement: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + statement.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(statement);
    message
}

/// A parsed grant, its signature not checked yet: use [`Grant::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    statement: GrantStatement,
    signature: [u8; SIGNATURE_LEN],
}

impl Grant {
    /// The statement followed by the signature.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.statement.to_bytes();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses a grant strictly ([`wire`]); checks no signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (statement, signature) = wire::decode(bytes)?;
        Ok(Self {
            statement,
            signature,
        })
    }

    /// What the grant claims, unverified: for logs and for telling a client what it holds.
    pub fn statement(&self) -> &GrantStatement {
        &self.statement
    }

    /// Checks the grant for this `host`, releasing `sealed`, at `now` (the steps are in the
    /// module documentation).
    pub fn verify(
        &self,
        cms: &VerifyingKey,
        host: &HostId,
        sealed: &SealedShard,
        now: SystemTime,
    ) -> Result<VerifiedGrant> {
        keyshard_core::keys::check_not_weak(cms).map_err(|_| GrantError::WeakKey)?;
        let signature = Signature::from_bytes(&self.signature);
        cms.verify_strict(&signed_message(&self.statement.to_bytes()), &signature)
            .map_err(|_| GrantError::Signature)?;
        let statement = &self.statement;
        if &statement.host != host {
            return Err(GrantError::Host {
                granted: statement.host.clone(),
                this: host.clone(),
            });
        }
        if shard_digest(sealed) != statement.shard_digest {
            return Err(GrantError::ShardDigest);
        }
        let now_ms = unix_ms(now)?;
        if now_ms > statement.not_after_ms {
            return Err(GrantError::Expired {
                ago_ms: now_ms - statement.not_after_ms,
            });
        }
        let ahead_ms = statement.not_after_ms - now_ms;
        let max_ms = millis(LIFETIME + MAX_CLOCK_SKEW);
        if ahead_ms > max_ms {
            return Err(GrantError::TooLong { ahead_ms, max_ms });
        }
        Ok(VerifiedGrant(statement.clone()))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A grant whose signature, host, shard digest and lifetime checked out: what a host releases
/// under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedGrant(GrantStatement);

impl VerifiedGrant {
    pub fn statement(&self) -> &GrantStatement {
        &self.0
    }

    pub fn credential(&self) -> &KeyId {
        &self.0.credential
    }

    pub fn epoch(&self) -> u64 {
        self.0.epoch
    }

    pub fn index(&self) -> u8 {
        self.0.index
    }

    pub fn instance(&self) -> &InstanceId {
        &self.0.instance
    }

    /// The policy the instance's evidence must verify against.
    pub fn policy(&self) -> &InstancePolicy {
        &self.0.policy
    }
}
