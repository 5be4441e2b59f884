//! Credential put and the shard map: the CMS splits a client's credential into signed
//! fragments, places them on fresh shard hosts, seals each to its host's certified TPM key,
//! and stores the ciphertexts with the signed shard map, the map also sealed to the client.
//!
//! # Put ([`put_credential`])
//!
//! 1. Refuses a name that is already stored (see "One put per name" below).
//! 2. Lists the fresh, affirming hosts ([`HostRegistry::fresh_hosts`]).
//! 3. Places the n shares (`keyshard_shards::placement`: weighted rendezvous hashing on the
//!    caller's seed, no region or operator holding k unless the hosts allow nothing else and the
//!    caller allows correlated placement; refused with the domains' loads otherwise).
//! 4. Deals (keyshard-core's dealer, blahaj Shamir): n fragments of class `host`, holders
//!    `host-1`..`host-n` by share index, signed with the CMS key, epoch [`FIRST_EPOCH`].
//! 5. Seals fragment i to the certified P-256 decrypt key of the host placed at index i,
//!    binding (credential, epoch, i, host) (`keyshard_shards::ecies`): only that host's TPM
//!    opens it, and only for that slot.
//! 6. Builds the shard map (host, endpoint, certified key name per index, seed, key check
//!    value), signs it with the CMS key and seals it to the client's X25519 key (HPKE).
//! 7. Writes all of it as ONE value, `credentials/<name>`, by compare-and-swap on absence: one
//!    write is atomic on both backends (one redb transaction, one etcd transaction), so no
//!    reader ever sees ciphertexts without their map or a half-written epoch.
//!
//! The secret is only read, by the dealer; the fragments (shares and their encodings) live in
//! `Zeroizing` buffers and are wiped when put returns, whatever it returns. The store receives
//! ciphertexts, the signed map (public: hosts, endpoints, key names, seed, key check value)
//! and the sealed map.
//!
//! # One put per name
//!
//! A second put of a stored name is refused ([`CredentialError::Exists`]), and of two racing
//! puts of one name exactly one is stored: the compare-and-swap settles it. Replacing a
//! credential's shards is rotation, which the design does by re-sharing without reconstruction
//! into a new epoch and committing it by compare-and-swap on the record's revision (a later
//! piece); silently dealing a new secret under a stored name would leave clients holding maps
//! of shards that no longer exist. So every record is epoch [`FIRST_EPOCH`] today, and no name
//! and epoch is ever written twice.
//!
//! # Record (JSON, version 1), under `credentials/<name>`
//!
//! | field | value |
//! |---|---|
//! | `version` | 1 |
//! | `name`, `epoch`, `k`, `n` | the credential, its epoch and threshold |
//! | `seed` | the placement seed (32 bytes, hex) |
//! | `correlated` | the domains holding k or more shares (`region eu would hold 3`): empty unless the put allowed it and needed it |
//! | `client` | the client's X25519 public key (hex): whom the sealed map is for |
//! | `instances` | the instances that may fetch it: `[{"id", "ak_name"}]` (AK name hex), 0..=64; absent in records written before it existed, read as none |
//! | `created_at_ms` | when the CMS stored it, ms since the Unix epoch |
//! | `shards` | n entries in index order: `index`, `host`, `sealed` (the sealed shard, `keyshard_shards::ecies::wire`, hex) |
//! | `signed_map` | the shard map and the CMS signature (hex) |
//! | `sealed_map` | the signed map sealed to `client` (hex) |
//!
//! A value holds at most 64 KiB, and each shard costs its sealed fragment (the fragment and 86
//! bytes) and its map entry twice over (signed and sealed map), all in hex. With short names
//! (an 11-byte credential name, `host-N` ids, 30-byte endpoints) that is n <= 72 for a 32-byte
//! credential and n <= 22 for 1 KiB, computed from the formats; a larger put is refused by the
//! store (`StoreError::ValueTooLarge`) and stores nothing.

use std::time::SystemTime;

use ed25519_dalek::SigningKey;
use keyshard_core::dealer::{self, DealError, DealPlan, HolderSlot};
use keyshard_core::{HolderClass, KeyCheckValue, KeyId, Threshold, VerifiedFragment};
use keyshard_shards::ecies::{self, EciesError, P256Point, SealedShard, ShardBinding};
use keyshard_shards::map::{
    ClientPublicKey, MapError, SealedShardMap, ShardLocation, ShardMap, SignedShardMap,
};
use keyshard_shards::placement::{
    self, Placement, PlacementError, PlacementRequest, PlacementSeed,
};
use keyshard_shards::{HostId, InstanceId};
use serde::{Deserialize, Serialize};

use crate::registry::{self, HostRegistry, RegisteredHost, RegistryError};
use crate::store::{CasOutcome, Expected, Key, Repository, Revision, StoreError};

/// Where credential records live: `credentials/<name>`.
pub const CREDENTIALS_PREFIX: &str = "credentials/";
/// The record format's version.
pub const RECORD_VERSION: u32 = 1;
/// The epoch of a credential's first (today: only) sharing.
pub const FIRST_EPOCH: u64 = 1;
/// The most instances a credential's instance policy names.
pub const MAX_INSTANCES: usize = 64;
/// A TPM name of a SHA-256 key: the algorithm (2 bytes) and the digest of the public area.
pub const AK_NAME_LEN: usize = 34;

/// An instance a credential may be fetched by: its id and the TPM name of the attestation key
/// the CMS pinned for it at enrolment. A fetch is refused when the instance's pinned AK has
/// another name (the instance was enrolled again with another TPM since the put).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedInstance {
    pub id: InstanceId,
    pub ak_name: [u8; AK_NAME_LEN],
}

/// What can go wrong putting or reading a credential. No variant carries secret bytes.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("credential {name}: {source}")]
    Placement { name: KeyId, source: PlacementError },
    #[error("credential {name}: splitting: {source}")]
    Deal { name: KeyId, source: DealError },
    #[error("credential {name}: placed host {host} is not among the fresh hosts (a defect)")]
    PlacedUnknownHost { name: KeyId, host: HostId },
    #[error("credential {name}: the dealer made no fragment for share {index} (a defect)")]
    MissingFragment { name: KeyId, index: u8 },
    #[error("credential {name}: sealing share {index} to host {host}: {source}")]
    Seal {
        name: KeyId,
        index: u8,
        host: HostId,
        source: EciesError,
    },
    #[error("credential {name}: the shard map: {source}")]
    Map { name: KeyId, source: MapError },
    #[error("credential {name} exists (epoch {epoch}); rotation is not built yet")]
    Exists { name: KeyId, epoch: u64 },
    #[error("credential {name} is not stored")]
    NotFound { name: KeyId },
    #[error("credential {name}'s map is sealed to another client key")]
    OtherClient { name: KeyId },
    #[error("credential record {name}: {reason}")]
    Record { name: KeyId, reason: String },
    #[error("credential {name}: the instance policy: {reason}")]
    Instances { name: KeyId, reason: String },
}

/// Result of credential operations.
pub type Result<T> = std::result::Result<T, CredentialError>;

/// What to put. Its `Debug` leaves the secret out.
#[derive(Clone, Copy)]
pub struct PutRequest<'a> {
    pub name: &'a KeyId,
    /// The credential's bytes (1..=1024); read by the dealer only.
    pub secret: &'a [u8],
    pub threshold: Threshold,
    /// Whom the shard map is sealed to.
    pub client: &'a ClientPublicKey,
    /// The placement seed, recorded in the map so anyone can recompute the placement
    /// ([`PlacementSeed::random`] for a fresh one).
    pub seed: PlacementSeed,
    /// Place even when no placement keeps every region and operator below k.
    pub allow_correlated: bool,
    /// The instances that may fetch it (0..=[`MAX_INSTANCES`], no id twice); none: map only.
    pub instances: &'a [AdmittedInstance],
}

impl std::fmt::Debug for PutRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutRequest")
            .field("name", self.name)
            .field("secret", &format_args!("({} bytes)", self.secret.len()))
            .field("threshold", &self.threshold)
            .field("client", self.client)
            .field("seed", &self.seed)
            .field("allow_correlated", &self.allow_correlated)
            .field("instances", &self.instances)
            .finish()
    }
}

/// What a put stored.
#[derive(Debug, Clone)]
pub struct PutReceipt {
    pub epoch: u64,
    pub placement: Placement,
    pub revision: Revision,
}

/// A stored credential: its shard ciphertexts and maps, as read back.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    pub name: KeyId,
    pub epoch: u64,
    pub threshold: Threshold,
    pub client: ClientPublicKey,
    pub created_at_ms: u64,
    /// The domains holding k or more shares, as text (`operator acme would hold 3`); empty
    /// unless the put allowed correlated placement and needed it.
    pub correlated: String,
    /// The instances that may fetch it; none: map only.
    pub instances: Vec<AdmittedInstance>,
    /// (share index, host, sealed shard), index 1 first.
    pub shards: Vec<(u8, HostId, SealedShard)>,
    pub signed_map: SignedShardMap,
    pub sealed_map: SealedShardMap,
    /// The record's store revision.
    pub revision: Revision,
}

impl StoredCredential {
    /// The share index and sealed shard stored for `host`: what the host asks for when it
    /// releases its shard. None when the host holds no shard of this credential.
    pub fn shard_for(&self, host: &HostId) -> Option<(u8, &SealedShard)> {
        self.shards
            .iter()
            .find(|(_, h, _)| h == host)
            .map(|(index, _, sealed)| (*index, sealed))
    }
}

/// The store key of credential `name`.
pub fn credential_key(name: &KeyId) -> Result<Key> {
    Ok(Key::new(format!("{CREDENTIALS_PREFIX}{name}"))?)
}

/// Splits, places, seals and stores a credential (module documentation), at `now`.
pub async fn put_credential<R: Repository>(
    store: &R,
    registry: &HostRegistry,
    cms: &SigningKey,
    request: &PutRequest<'_>,
    now: SystemTime,
) -> Result<PutReceipt> {
    let name = request.name;
    let key = credential_key(name)?;
    check_instances(name, request.instances)?;
    if let Some(existing) = load(store, name).await? {
        return Err(CredentialError::Exists {
            name: name.clone(),
            epoch: existing.epoch,
        });
    }
    let created_at_ms = registry::unix_ms(now)?;
    let hosts = registry.fresh_hosts(store, now).await?;
    for (key, reason) in &hosts.excluded {
        log::info!("credential {name}: {key} is not placed on: {reason}");
    }
    let candidates: Vec<_> = hosts.fresh.iter().map(RegisteredHost::candidate).collect();
    let placement = placement::place(&PlacementRequest {
        seed: &request.seed,
        credential: name,
        threshold: request.threshold,
        candidates: &candidates,
        allow_correlated: request.allow_correlated,
    })
    .map_err(|source| CredentialError::Placement {
        name: name.clone(),
        source,
    })?;
    let placed = placed_hosts(name, &placement, &hosts.fresh)?;
    let fragments = deal(name, request, cms)?;
    let shards = seal_shards(name, &placed, &fragments)?;
    // The fragments (shares and encodings, Zeroizing) are wiped here.
    drop(fragments);
    let kcv = KeyCheckValue::compute(request.secret, name);
    let map = shard_map(name, request, kcv, &placed)?;
    let sealed_map = map
        .seal(cms, request.client)
        .map_err(|source| CredentialError::Map {
            name: name.clone(),
            source,
        })?;
    let value = encode(
        request,
        &placement,
        created_at_ms,
        &shards,
        &map.sign(cms),
        &sealed_map,
    )?;
    match store
        .compare_and_swap(&key, Expected::Absent, &value)
        .await?
    {
        CasOutcome::Written(revision) => {
            log::info!(
                "credential {name}: stored epoch {FIRST_EPOCH}, {} of {} on {}",
                request.threshold.k(),
                request.threshold.n(),
                placement
                    .hosts()
                    .iter()
                    .map(HostId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(PutReceipt {
                epoch: FIRST_EPOCH,
                placement,
                revision,
            })
        }
        CasOutcome::Conflict { .. } => Err(CredentialError::Exists {
            name: name.clone(),
            epoch: FIRST_EPOCH,
        }),
    }
}

/// The shard map of `name`, sealed to `client`: what `GET /v1/credentials/NAME/map` will
/// return. Refused when the stored map is sealed to another key.
pub async fn map_for<R: Repository>(
    store: &R,
    name: &KeyId,
    client: &ClientPublicKey,
) -> Result<SealedShardMap> {
    let stored = load(store, name)
        .await?
        .ok_or_else(|| CredentialError::NotFound { name: name.clone() })?;
    if &stored.client != client {
        return Err(CredentialError::OtherClient { name: name.clone() });
    }
    Ok(stored.sealed_map)
}

/// The stored credential `name`, or None.
pub async fn load<R: Repository>(store: &R, name: &KeyId) -> Result<Option<StoredCredential>> {
    let key = credential_key(name)?;
    match store.get(&key).await? {
        None => Ok(None),
        Some(entry) => decode(name, &entry.value, entry.revision).map(Some),
    }
}

/// At most [`MAX_INSTANCES`], no id twice.
fn check_instances(name: &KeyId, instances: &[AdmittedInstance]) -> Result<()> {
    let bad = |reason: String| CredentialError::Instances {
        name: name.clone(),
        reason,
    };
    if instances.len() > MAX_INSTANCES {
        return Err(bad(format!(
            "{} instances, at most {MAX_INSTANCES} are allowed",
            instances.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for instance in instances {
        if !seen.insert(&instance.id) {
            return Err(bad(format!("instance {} is named twice", instance.id)));
        }
    }
    Ok(())
}

/// The registered host of each placed index, in index order.
fn placed_hosts<'h>(
    name: &KeyId,
    placement: &Placement,
    fresh: &'h [RegisteredHost],
) -> Result<Vec<(u8, &'h RegisteredHost)>> {
    placement
        .assignments()
        .map(|(index, host)| {
            fresh
                .iter()
                .find(|h| h.id() == host)
                .map(|h| (index, h))
                .ok_or_else(|| CredentialError::PlacedUnknownHost {
                    name: name.clone(),
                    host: host.clone(),
                })
        })
        .collect()
}

/// Step 4: n signed fragments of class `host`, share index i for holder `host-i`.
fn deal(name: &KeyId, request: &PutRequest<'_>, cms: &SigningKey) -> Result<Vec<VerifiedFragment>> {
    let plan = DealPlan {
        key_id: name.clone(),
        epoch: FIRST_EPOCH,
        k: request.threshold.k(),
        holders: HolderSlot::numbered(HolderClass::Host, request.threshold.n()).collect(),
    };
    // The CMS key signs the fragments; the instance checks them against the CMS verifying key.
    dealer::deal(request.secret, &plan, cms).map_err(|source| CredentialError::Deal {
        name: name.clone(),
        source,
    })
}

/// Step 5: fragment i sealed to the host placed at index i.
fn seal_shards(
    name: &KeyId,
    placed: &[(u8, &RegisteredHost)],
    fragments: &[VerifiedFragment],
) -> Result<Vec<(u8, HostId, SealedShard)>> {
    placed
        .iter()
        .map(|(index, host)| {
            let seal_error = |source| CredentialError::Seal {
                name: name.clone(),
                index: *index,
                host: host.id().clone(),
                source,
            };
            let fragment = fragments
                .iter()
                .find(|f| f.header().index == *index)
                .ok_or_else(|| CredentialError::MissingFragment {
                    name: name.clone(),
                    index: *index,
                })?;
            let recipient =
                P256Point::from_uncompressed(&host.certified_key().point).map_err(seal_error)?;
            let binding = ShardBinding {
                credential: name.clone(),
                epoch: FIRST_EPOCH,
                index: *index,
                host: host.id().clone(),
            };
            let sealed =
                ecies::seal(&recipient, &binding, fragment.encoded()).map_err(seal_error)?;
            Ok((*index, host.id().clone(), sealed))
        })
        .collect()
}

/// Step 6: the shard map.
fn shard_map(
    name: &KeyId,
    request: &PutRequest<'_>,
    kcv: KeyCheckValue,
    placed: &[(u8, &RegisteredHost)],
) -> Result<ShardMap> {
    let map_error = |source| CredentialError::Map {
        name: name.clone(),
        source,
    };
    let shards = placed
        .iter()
        .map(|(_, host)| {
            Ok(ShardLocation {
                host: host.id().clone(),
                endpoint: host.registration().endpoint.clone(),
                key_name: host.key_name().map_err(map_error)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    ShardMap::new(
        name.clone(),
        FIRST_EPOCH,
        request.threshold,
        request.seed,
        kcv,
        shards,
    )
    .map_err(map_error)
}

/// The JSON record (module documentation).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    name: String,
    epoch: u64,
    k: u8,
    n: u8,
    seed: String,
    correlated: String,
    client: String,
    #[serde(default)]
    instances: Vec<AdmittedRecord>,
    created_at_ms: u64,
    shards: Vec<ShardRecord>,
    signed_map: String,
    sealed_map: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmittedRecord {
    id: String,
    ak_name: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardRecord {
    index: u8,
    host: String,
    sealed: String,
}

/// The record of a put (module documentation), as JSON.
fn encode(
    request: &PutRequest<'_>,
    placement: &Placement,
    created_at_ms: u64,
    shards: &[(u8, HostId, SealedShard)],
    signed_map: &SignedShardMap,
    sealed_map: &SealedShardMap,
) -> Result<Vec<u8>> {
    let record = Record {
        version: RECORD_VERSION,
        name: request.name.to_string(),
        epoch: FIRST_EPOCH,
        k: request.threshold.k(),
        n: request.threshold.n(),
        seed: hex::encode(request.seed.as_bytes()),
        correlated: placement.correlated().to_string(),
        client: hex::encode(request.client.as_bytes()),
        instances: request
            .instances
            .iter()
            .map(|instance| AdmittedRecord {
                id: instance.id.to_string(),
                ak_name: hex::encode(instance.ak_name),
            })
            .collect(),
        created_at_ms,
        shards: shards
            .iter()
            .map(|(index, host, sealed)| ShardRecord {
                index: *index,
                host: host.to_string(),
                sealed: hex::encode(sealed.to_bytes()),
            })
            .collect(),
        signed_map: hex::encode(signed_map.as_bytes()),
        sealed_map: hex::encode(sealed_map.to_bytes()),
    };
    serde_json::to_vec(&record).map_err(|e| CredentialError::Record {
        name: request.name.clone(),
        reason: format!("cannot encode: {e}"),
    })
}

/// Parses a stored record strictly.
fn decode(name: &KeyId, bytes: &[u8], revision: Revision) -> Result<StoredCredential> {
    let bad = |reason: String| CredentialError::Record {
        name: name.clone(),
        reason,
    };
    let record: Record =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a credential record: {e}")))?;
    if record.version != RECORD_VERSION {
        return Err(bad(format!(
            "version {} is not supported (expected {RECORD_VERSION})",
            record.version
        )));
    }
    if record.name != name.as_str() {
        return Err(bad(format!("holds the record of {:?}", record.name)));
    }
    let threshold = Threshold::new(record.k, record.n).map_err(|e| bad(e.to_string()))?;
    let unhex =
        |field: &str, text: &str| hex::decode(text).map_err(|_| bad(format!("{field} is not hex")));
    let client: [u8; 32] = unhex("client", &record.client)?
        .try_into()
        .map_err(|_| bad("client is not 32 bytes".to_owned()))?;
    if record.shards.len() != usize::from(threshold.n()) {
        return Err(bad(format!(
            "{} shards for n = {}",
            record.shards.len(),
            threshold.n()
        )));
    }
    let mut shards = Vec::with_capacity(record.shards.len());
    for (expected, shard) in (1..=u8::MAX).zip(&record.shards) {
        if shard.index != expected {
            return Err(bad(format!("shard {expected} has index {}", shard.index)));
        }
        let host = HostId::new(shard.host.clone()).map_err(|e| bad(e.to_string()))?;
        let sealed = SealedShard::from_bytes(&unhex("sealed", &shard.sealed)?)
            .map_err(|e| bad(format!("shard {expected}: {e}")))?;
        shards.push((shard.index, host, sealed));
    }
    let sealed_map = SealedShardMap::from_bytes(&unhex("sealed_map", &record.sealed_map)?)
        .map_err(|e| bad(e.to_string()))?;
    let instances = record
        .instances
        .iter()
        .map(|instance| {
            Ok(AdmittedInstance {
                id: InstanceId::new(instance.id.clone()).map_err(|e| bad(e.to_string()))?,
                ak_name: unhex("ak_name", &instance.ak_name)?
                    .try_into()
                    .map_err(|_| bad(format!("ak_name is not {AK_NAME_LEN} bytes")))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StoredCredential {
        name: name.clone(),
        epoch: record.epoch,
        threshold,
        client: ClientPublicKey::from_bytes(client),
        created_at_ms: record.created_at_ms,
        correlated: record.correlated,
        instances,
        shards,
        signed_map: SignedShardMap::from_bytes(unhex("signed_map", &record.signed_map)?),
        sealed_map,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_request_never_prints_its_secret() {
        let name = KeyId::new("db").unwrap();
        let client = ClientPublicKey::from_bytes([7; 32]);
        let request = PutRequest {
            name: &name,
            secret: b"hunter2-secret",
            threshold: Threshold::new(2, 3).unwrap(),
            client: &client,
            seed: PlacementSeed::from_bytes([1; 32]),
            allow_correlated: false,
            instances: &[],
        };
        let text = format!("{request:?}");
        assert!(text.contains("(14 bytes)"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("104, 117"), "{text}");
    }

    #[test]
    fn records_are_parsed_strictly() {
        let name = KeyId::new("db").unwrap();
        let revision = Revision::new(1).unwrap();
        let record = |version: u32, record_name: &str, n: u8, extra: &str| {
            format!(
                r#"{{"version":{version},"name":"{record_name}","epoch":1,"k":2,"n":{n},"seed":"00","correlated":"","client":"{}","created_at_ms":1,"shards":[]{extra},"signed_map":"00","sealed_map":"00"}}"#,
                "11".repeat(32)
            )
        };
        for (bytes, expected) in [
            (b"[]".to_vec(), "not a credential record"),
            (
                record(2, "db", 2, "").into_bytes(),
                "version 2 is not supported",
            ),
            (
                record(1, "other", 2, "").into_bytes(),
                "holds the record of \"other\"",
            ),
            (record(1, "db", 1, "").into_bytes(), "threshold"),
            (record(1, "db", 2, "").into_bytes(), "0 shards for n = 2"),
            (
                record(1, "db", 2, r#","more":1"#).into_bytes(),
                "unknown field",
            ),
        ] {
            let err = decode(&name, &bytes, revision).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(expected)),
                "{err:?} should say {expected}"
            );
        }
    }
}
