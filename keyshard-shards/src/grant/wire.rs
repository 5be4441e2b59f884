//! The byte layout of a grant, version 1, and its strict parser.
//!
//! Integers are little-endian. There is exactly one encoding of each grant: fixed field order,
//! no optional fields, nothing after the signature; the parser refuses anything else, so the
//! CMS's signature covers the one encoding a host decodes.
//!
//! | field               | size | meaning                                                   |
//! |---------------------|------|-----------------------------------------------------------|
//! | magic               | 4    | `KSGR`                                                    |
//! | version             | 1    | 1                                                         |
//! | credential length   | 1    | 1..=64                                                    |
//! | credential name     | ...  | the credential's key id, ASCII `A-Z a-z 0-9 . _ -`        |
//! | epoch               | 8    | sharing epoch                                             |
//! | share index         | 1    | 1..=255                                                   |
//! | host id length      | 1    | 1..=64                                                    |
//! | host id             | ...  | the host that may release, ASCII `a-z 0-9 . _ -`          |
//! | instance id length  | 1    | 1..=64                                                    |
//! | instance id         | ...  | the instance it may release to, ASCII `a-z 0-9 . _ -`     |
//! | policy length       | 2    | P, 1..=[`MAX_POLICY_LEN`]                                 |
//! | instance policy     | P    | `KSIP` record (`instance::wire`): the AK and golden PCRs  |
//! | shard digest        | 32   | SHA-256 of the sealed shard (`KSSE` bytes)                |
//! | not after           | 8    | ms since the Unix epoch                                   |
//! | signature           | 64   | Ed25519 by the CMS key over `"keyshard/grant/v1/signature" \|\| all of the above` |

use keyshard_core::KeyId;
use keyshard_core::bytes::{Reader, Truncated};
use keyshard_core::holder::MAX_KEY_ID_LEN;

use super::{DIGEST_LEN, GrantError, GrantStatement, Result, SIGNATURE_LEN};
use crate::instance::InstancePolicy;
use crate::instance::wire::MAX_POLICY_LEN;
use crate::names::{HostId, InstanceId, MAX_HOST_ID_LEN};

pub const MAGIC: [u8; 4] = *b"KSGR";
pub const VERSION: u8 = 1;
/// The longest grant, signature included.
pub const MAX_GRANT_LEN: usize = 4
    + 1
    + 1
    + MAX_KEY_ID_LEN
    + 8
    + 1
    + 1
    + MAX_HOST_ID_LEN
    + 1
    + MAX_HOST_ID_LEN
    + 2
    + MAX_POLICY_LEN
    + DIGEST_LEN
    + 8
    + SIGNATURE_LEN;

fn truncated(t: Truncated) -> GrantError {
    GrantError::Truncated(t.field)
}

pub(super) fn encode(statement: &GrantStatement) -> Vec<u8> {
    let policy = statement.policy.to_bytes();
    let mut out = Vec::with_capacity(MAX_GRANT_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    push_u8_len(&mut out, statement.credential.as_str().as_bytes());
    out.extend_from_slice(&statement.epoch.to_le_bytes());
    out.push(statement.index);
    push_u8_len(&mut out, statement.host.as_str().as_bytes());
    push_u8_len(&mut out, statement.instance.as_str().as_bytes());
    // A policy is at most MAX_POLICY_LEN bytes (about 1.3 KiB): its length fits two bytes.
    out.extend_from_slice(
        &u16::try_from(policy.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&policy);
    out.extend_from_slice(&statement.shard_digest);
    out.extend_from_slice(&statement.not_after_ms.to_le_bytes());
    out
}

/// Every name here is bounded below 256 bytes by its type.
fn push_u8_len(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

pub(super) fn decode(bytes: &[u8]) -> Result<(GrantStatement, [u8; SIGNATURE_LEN])> {
    if bytes.len() > MAX_GRANT_LEN {
        return Err(GrantError::TooLarge {
            len: bytes.len(),
            max: MAX_GRANT_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    if r.array::<4>("magic").map_err(truncated)? != MAGIC {
        return Err(GrantError::BadMagic);
    }
    let version = r.u8("version").map_err(truncated)?;
    if version != VERSION {
        return Err(GrantError::Version(version));
    }
    let credential =
        KeyId::new(r.short_str("credential name").map_err(truncated)?).map_err(GrantError::Name)?;
    let epoch = r.u64("epoch").map_err(truncated)?;
    let index = r.u8("share index").map_err(truncated)?;
    if index == 0 {
        return Err(GrantError::Index);
    }
    let host = HostId::new(r.short_str("host id").map_err(truncated)?).map_err(GrantError::Name)?;
    let instance = InstanceId::new(r.short_str("instance id").map_err(truncated)?)
        .map_err(GrantError::Name)?;
    let policy_len = usize::from(r.u16("instance policy").map_err(truncated)?);
    if policy_len == 0 || policy_len > MAX_POLICY_LEN {
        return Err(GrantError::PolicyLength {
            len: policy_len,
            max: MAX_POLICY_LEN,
        });
    }
    let policy =
        InstancePolicy::from_bytes(r.take(policy_len, "instance policy").map_err(truncated)?)
            .map_err(GrantError::Policy)?;
    let shard_digest = r.array::<DIGEST_LEN>("shard digest").map_err(truncated)?;
    let not_after_ms = r.u64("not after").map_err(truncated)?;
    let signature = r.array::<SIGNATURE_LEN>("signature").map_err(truncated)?;
    if r.remaining() != 0 {
        return Err(GrantError::TrailingBytes(r.remaining()));
    }
    Ok((
        GrantStatement {
            credential,
            epoch,
            index,
            host,
            instance,
            policy,
            shard_digest,
            not_after_ms,
        },
        signature,
    ))
}
