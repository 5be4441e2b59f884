//! Fuzzes the credential service's shard formats, read from the network and the store: a sealed
//! shard (`KSSE`), a shard map (`KSSM`), a sealed map (`KSMS`), an instance's evidence (`KSIE`)
//! and policy (`KSIP`), a released shard (`KSRS`) and a grant (`KSGR`). None may panic, and whatever
//! parses must be its own canonical encoding (so two encodings never mean one value).

#![no_main]

use keyshard_shards::ecies::SealedShard;
use keyshard_shards::grant::Grant;
use keyshard_shards::instance::{InstanceEvidence, InstancePolicy, ReleasedShard};
use keyshard_shards::map::{SealedShardMap, ShardMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(shard) = SealedShard::from_bytes(data) {
        assert_eq!(shard.to_bytes(), data, "a sealed shard parses only from its own encoding");
    }
    if let Ok(map) = ShardMap::from_bytes(data) {
        assert_eq!(map.to_bytes(), data, "a map parses only from its canonical encoding");
    }
    if let Ok(sealed) = SealedShardMap::from_bytes(data) {
        assert_eq!(sealed.to_bytes(), data, "a sealed map parses only from its own encoding");
    }
    if let Ok(evidence) = InstanceEvidence::from_bytes(data) {
        assert_eq!(evidence.to_bytes(), data, "evidence parses only from its own encoding");
    }
    if let Ok(policy) = InstancePolicy::from_bytes(data) {
        assert_eq!(policy.to_bytes(), data, "a policy parses only from its own encoding");
    }
    if let Ok(released) = ReleasedShard::from_bytes(data) {
        assert_eq!(
            released.to_bytes(),
            data,
            "a released shard parses only from its own encoding"
        );
    }
    if let Ok(grant) = Grant::from_bytes(data) {
        assert_eq!(grant.to_bytes(), data, "a grant parses only from its own encoding");
    }
});
