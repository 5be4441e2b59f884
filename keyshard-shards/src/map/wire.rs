//! The canonical byte encoding of a shard map, version 1, and its strict parser.
//!
//! All integers are little-endian. There is exactly one encoding of each map: fixed field order,
//! entries in index order, no optional fields, nothing after the last entry; the parser refuses
//! anything else, so the CMS's signature covers the one encoding a client decodes.
//!
//! | field              | size      | meaning                                                |
//! |--------------------|-----------|--------------------------------------------------------|
//! | magic              | 4         | `KSSM`                                                 |
//! | version            | 1         | 1                                                      |
//! | credential length  | 1         | 1..=64                                                 |
//! | credential name    | ...       | the credential's key id, ASCII `A-Z a-z 0-9 . _ -`     |
//! | epoch              | 8         | sharing epoch                                          |
//! | k                  | 1         | threshold, 2..=n                                       |
//! | n                  | 1         | number of shards, one entry each                       |
//! | placement seed     | 32        | what placement hashed with (see `placement`)           |
//! | key check value    | 32        | HMAC-SHA-256 key check value of the credential (`kcv`) |
//! | n entries:         |           |                                                        |
//! | - share index      | 1         | 1, 2, ... n, in order                                  |
//! | - host id length   | 1         | 1..=64                                                 |
//! | - host id          | ...       | ASCII `a-z 0-9 . _ -`; no host appears twice           |
//! | - endpoint length  | 2         | 1..=255                                                |
//! | - endpoint         | ...       | where the host answers, e.g. `https://10.0.0.5:8443`   |
//! | - key name length  | 1         | 1..=66                                                 |
//! | - key name         | ...       | TPM name of the host's certified decrypt key           |

use keyshard_core::bytes::{Reader, Truncated};
use keyshard_core::holder::MAX_KEY_ID_LEN;
use keyshard_core::kcv::KCV_LEN;
use keyshard_core::{KeyCheckValue, KeyId, Threshold};

use super::{Endpoint, KeyName, MapError, Result, ShardLocation, ShardMap};
use crate::names::{HostId, MAX_HOST_ID_LEN};
use crate::placement::{PlacementSeed, SEED_LEN};

pub const MAGIC: [u8; 4] = *b"KSSM";
pub const VERSION: u8 = 1;
const HEADER_MAX: usize = 4 + 1 + 1 + MAX_KEY_ID_LEN + 8 + 1 + 1 + SEED_LEN + KCV_LEN;
const ENTRY_MAX: usize =
    1 + 1 + MAX_HOST_ID_LEN + 2 + super::MAX_ENDPOINT_LEN + 1 + super::MAX_KEY_NAME_LEN;
/// The longest encoded map: 255 entries, every field at its maximum.
pub const MAX_MAP_LEN: usize = HEADER_MAX + 255 * ENTRY_MAX;

fn truncated(t: Truncated) -> MapError {
    MapError::Truncated(t.field)
}

pub(super) fn encode(map: &ShardMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_MAX + map.shards.len() * ENTRY_MAX);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    push_u8_len(&mut out, map.credential.as_str().as_bytes());
    out.extend_from_slice(&map.epoch.to_le_bytes());
    out.push(map.threshold.k());
    out.push(map.threshold.n());
    out.extend_from_slice(map.seed.as_bytes());
    out.extend_from_slice(map.key_check_value.as_bytes());
    for (index, shard) in map.shards() {
        out.push(index);
        push_u8_len(&mut out, shard.host.as_str().as_bytes());
        let endpoint = shard.endpoint.as_str().as_bytes();
        out.extend_from_slice(
            &u16::try_from(endpoint.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
        out.extend_from_slice(endpoint);
        push_u8_len(&mut out, shard.key_name.as_bytes());
    }
    out
}

/// Every variable field here is bounded below 256 bytes by its type.
fn push_u8_len(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

pub(super) fn decode(bytes: &[u8]) -> Result<ShardMap> {
    if bytes.len() > MAX_MAP_LEN {
        return Err(MapError::TooLong {
            len: bytes.len(),
            max: MAX_MAP_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    if r.array::<4>("magic").map_err(truncated)? != MAGIC {
        return Err(MapError::BadMagic);
    }
    let version = r.u8("version").map_err(truncated)?;
    if version != VERSION {
        return Err(MapError::Version(version));
    }
    let credential =
        KeyId::new(r.short_str("credential name").map_err(truncated)?).map_err(MapError::Name)?;
    let epoch = r.u64("epoch").map_err(truncated)?;
    let k = r.u8("k").map_err(truncated)?;
    let n = r.u8("n").map_err(truncated)?;
    let threshold = Threshold::new(k, n).map_err(|_| MapError::Threshold { k, n })?;
    let seed = PlacementSeed::from_bytes(r.array("placement seed").map_err(truncated)?);
    let key_check_value = KeyCheckValue::from_bytes(r.array("key check value").map_err(truncated)?);
    let mut shards = Vec::with_capacity(usize::from(n));
    for expected in 1..=n {
        let index = r.u8("share index").map_err(truncated)?;
        if index != expected {
            return Err(MapError::ShardIndex {
                expected,
                found: index,
            });
        }
        let host =
            HostId::new(r.short_str("host id").map_err(truncated)?).map_err(MapError::Name)?;
        let endpoint_len = r.u16("endpoint").map_err(truncated)?;
        let endpoint = r
            .take(usize::from(endpoint_len), "endpoint")
            .map_err(truncated)?;
        let endpoint = Endpoint::new(std::str::from_utf8(endpoint).unwrap_or("\u{fffd}"))?;
        let key_name_len = r.u8("key name").map_err(truncated)?;
        let key_name = KeyName::new(
            r.take(usize::from(key_name_len), "key name")
                .map_err(truncated)?
                .to_vec(),
        )?;
        shards.push(ShardLocation {
            host,
            endpoint,
            key_name,
        });
    }
    if r.remaining() != 0 {
        return Err(MapError::TrailingBytes(r.remaining()));
    }
    ShardMap::new(credential, epoch, threshold, seed, key_check_value, shards)
}
