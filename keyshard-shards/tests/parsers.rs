//! The parsers of untrusted bytes (sealed shards, shard maps, sealed maps) on arbitrary and
//! mutated input: no panic, and whatever parses is the one canonical encoding of what it holds.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use keyshard_core::{KeyCheckValue, KeyId, Threshold};
use keyshard_shards::HostId;
use keyshard_shards::ecies::{P256Point, SealedShard, ShardBinding, seal};
use keyshard_shards::map::{
    ClientKey, Endpoint, KeyName, SealedShardMap, ShardLocation, ShardMap, SignedShardMap,
};
use keyshard_shards::placement::PlacementSeed;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use proptest::prelude::*;

fn sealed_shard() -> Vec<u8> {
    let key = p256::SecretKey::from_bytes(&[7u8; 32].into()).unwrap();
    let point =
        P256Point::from_uncompressed(key.public_key().to_encoded_point(false).as_bytes()).unwrap();
    let binding = ShardBinding {
        credential: KeyId::new("db").unwrap(),
        epoch: 1,
        index: 1,
        host: HostId::new("host-1").unwrap(),
    };
    seal(&point, &binding, b"a shard").unwrap().to_bytes()
}

fn shard_map() -> ShardMap {
    let credential = KeyId::new("db").unwrap();
    let kcv = KeyCheckValue::compute(b"secret", &credential);
    let shards = (1..=3u8)
        .map(|i| ShardLocation {
            host: HostId::new(format!("h{i}")).unwrap(),
            endpoint: Endpoint::new(format!("https://h{i}:1")).unwrap(),
            key_name: KeyName::new(vec![0, 0x0b, i]).unwrap(),
        })
        .collect();
    ShardMap::new(
        credential,
        2,
        Threshold::new(2, 3).unwrap(),
        PlacementSeed::from_bytes([1; 32]),
        kcv,
        shards,
    )
    .unwrap()
}

/// A valid encoding with bytes changed, cut or appended.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    (
        prop::collection::vec((0..len, any::<u8>()), 0..4),
        0..=len + 8,
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(move |(changes, cut, tail)| {
            let mut bytes = valid.clone();
            for (at, value) in changes {
                bytes[at] = value;
            }
            bytes.extend(tail);
            bytes.truncate(cut);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = SealedShard::from_bytes(&bytes);
        let _ = ShardMap::from_bytes(&bytes);
        let _ = SealedShardMap::from_bytes(&bytes);
        let cms = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let _ = SignedShardMap::from_bytes(bytes).verify(&cms);
    }

    #[test]
    fn a_parsed_sealed_shard_is_its_own_encoding(bytes in mutated(sealed_shard())) {
        if let Ok(parsed) = SealedShard::from_bytes(&bytes) {
            prop_assert_eq!(parsed.to_bytes(), bytes);
        }
    }

    #[test]
    fn a_parsed_shard_map_is_its_own_encoding(bytes in mutated(shard_map().to_bytes())) {
        if let Ok(parsed) = ShardMap::from_bytes(&bytes) {
            prop_assert_eq!(parsed.to_bytes(), bytes);
        }
    }

    #[test]
    fn a_mutated_sealed_map_opens_only_unchanged(
        bytes in mutated(
            shard_map()
                .seal(
                    &ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
                    &ClientKey::from_bytes(&[5; 32]).unwrap().public_key(),
                )
                .unwrap()
                .to_bytes(),
        ),
    ) {
        let client = ClientKey::from_bytes(&[5; 32]).unwrap();
        let cms = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let opened = SealedShardMap::from_bytes(&bytes)
            .and_then(|sealed| sealed.open(&client, &cms, &KeyId::new("db").unwrap()));
        if let Ok(map) = opened {
            prop_assert_eq!(map, shard_map());
            prop_assert_eq!(
                SealedShardMap::from_bytes(&bytes).unwrap().to_bytes(),
                bytes
            );
        }
    }
}
