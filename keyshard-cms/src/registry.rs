//! The shard host registry: which shard hosts exist, where they sit, and the certified TPM key
//! each one decrypts shards with, kept in the [`store`](crate::store) under `hosts/<host id>`.
//!
//! # Registration
//!
//! A host asks for a challenge ([`HostRegistry::challenge`]: a single-use store nonce), has its
//! attestation key certify its decrypt key over that nonce (TPM2_Certify), and presents a
//! [`HostRegistration`]. [`HostRegistry::register`] then, in this order:
//! 1. verifies the certification with `keyshard_attest::tpm::verify_certification` (the AK's
//!    signature, a certification of exactly the presented public area, over the nonce, of a
//!    key with the decrypt-key shape: fixedTPM, sensitiveDataOrigin, decrypt, no sign);
//! 2. uses up the nonce (once, on any replica sharing the store, before it expires);
//! 3. refuses an AK or a decrypt key that another host id has registered: one TPM is one host,
//!    so one machine cannot stand in several failure domains and collect their shares;
//! 4. writes the record by compare-and-swap: absent for a new id, the revision it read for a
//!    re-registration. A re-registration must present the same AK: a host id is pinned to its
//!    attestation key, so another TPM cannot take over a registered id.
//!
//! Nothing is stored before step 1 passes: the CMS never holds a key it has not checked, so it
//! never encrypts to one (issue 9, item 2).
//!
//! Step 3 reads every record and is not part of the compare-and-swap: two registrations of
//! one TPM under two new ids at the same moment can both be stored (an index keyed by AK,
//! written in the same transaction, would close that; the store has no multi-key
//! transactions yet).
//!
//! Not checked here: that the AK is bound to an endorsement key of a genuine TPM
//! (TPM2_MakeCredential / ActivateCredential, `keyshard_attest::tpm::enrol`). The caller, the
//! CMS's enrolment endpoint, must have done that before it calls [`HostRegistry::register`];
//! the registry takes the AK it is handed. Nor are the golden PCR values checked against a
//! quote yet: they are recorded for the validator and the checks of later pieces.
//!
//! # Fresh, affirming
//!
//! Placement takes only hosts from [`HostRegistry::fresh_hosts`]. Until the attestation
//! validator issues signed attestation results, "affirming" means: the stored record parses and
//! its certification verifies again when it is read (so a record damaged in the store is never
//! placed on) and, with the operator's host list (`keyshard cms --hosts`,
//! [`crate::admission`]), the list admits it as registered; "fresh" means: registered, with a
//! certification over a CMS nonce, no longer ago than the registry's `max_age`
//! ([`DEFAULT_MAX_AGE`]), and not in the future. A host stays
//! fresh by registering again. Hosts left out are listed with the reason.
//!
//! # Record (JSON, version 1)
//!
//! JSON, because the CMS's API speaks JSON and an operator reads records with `etcdctl get`;
//! byte strings are lowercase hex. Parsing is strict: every field is required, no other field
//! is allowed, `version` must be 1, and every byte string is parsed into its type.
//!
//! | field | value |
//! |---|---|
//! | `version` | 1 |
//! | `id` | the host id (`a-z 0-9 . _ -`, 1..=64); must match the key `hosts/<id>` |
//! | `region`, `operator` | the failure domain |
//! | `endpoint` | where the host answers, e.g. `https://10.0.0.5:8443` |
//! | `weight` | placement weight, 1..=2^32-1 |
//! | `ak` | the AK's public key, SEC1 uncompressed P-256 (65 bytes) |
//! | `golden_pcrs` | the host's golden PCR values: `keyshard_attest::tpm::PcrValues` record |
//! | `decrypt_key_public` | the decrypt key's marshalled TPMT_PUBLIC |
//! | `certify_attest`, `certify_signature` | the TPM2_Certify: TPMS_ATTEST and ECDSA r \|\| s |
//! | `nonce` | the CMS nonce the certification was made over (32 bytes) |
//! | `registered_at_ms` | when the CMS accepted it, ms since the Unix epoch |

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyshard_attest::tpm::{
    AkPublic, Certification, CertifiedKey, CertifyError, PcrValues, verify_certification,
};
use keyshard_shards::map::{Endpoint, KeyName};
use keyshard_shards::placement::Candidate;
use keyshard_shards::{DomainName, FailureDomain, HostId};
use serde::{Deserialize, Serialize};

use crate::admission::{AdmissionError, HostAdmission};
use crate::store::{
    CasOutcome, DeleteOutcome, Expected, Key, KeyPrefix, MAX_LIST_LIMIT, Nonce, Repository,
    Revision, StoreError,
};

/// Where host records live: `hosts/<host id>`.
pub const HOSTS_PREFIX: &str = "hosts/";
/// The record format's version.
pub const RECORD_VERSION: u32 = 1;
/// How long a registration stays fresh unless the registry is told otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// How often [`HostRegistry::remove`] retries when the host registers again meanwhile.
const REMOVE_ATTEMPTS: usize = 8;
/// How long a registration challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(120);

/// What can go wrong in the registry. Nothing secret is registered, so variants may name keys.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("host {host}: the certification of its decrypt key is refused: {source}")]
    Certification { host: HostId, source: CertifyError },
    #[error("host {host}: the registration nonce is refused: {source}")]
    Nonce { host: HostId, source: StoreError },
    #[error(
        "host {host} is registered with another attestation key; remove it before another TPM \
         takes its id"
    )]
    AkChanged { host: HostId },
    #[error(
        "host {host}: its attestation key or decrypt key is registered as host {other}; one TPM \
         is one host, in one failure domain"
    )]
    TpmTaken { host: HostId, other: HostId },
    #[error("host {host} was registered again concurrently; retry with a new challenge")]
    Conflict { host: HostId },
    #[error("host record {key}: {reason}")]
    Record { key: String, reason: String },
    #[error("the system clock is before 1970 or beyond 2^64 ms")]
    Clock,
}

/// Result of registry operations.
pub type Result<T> = std::result::Result<T, RegistryError>;

/// What a shard host presents to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistration {
    pub id: HostId,
    pub domain: FailureDomain,
    pub endpoint: Endpoint,
    pub weight: NonZeroU32,
    /// The attestation key, already bound to the host's EK by enrolment.
    pub ak: AkPublic,
    /// The host's golden PCR values (selection and digests).
    pub golden_pcrs: PcrValues,
    /// The decrypt key's marshalled TPMT_PUBLIC.
    pub decrypt_key_public: Vec<u8>,
    /// TPM2_Certify of the decrypt key by the AK, over `nonce`.
    pub certification: Certification,
    /// The challenge from [`HostRegistry::challenge`].
    pub nonce: Nonce,
}

/// A registered host, its certification verified when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredHost {
    registration: HostRegistration,
    certified: CertifiedKey,
    registered_at_ms: u64,
    revision: Revision,
}

impl RegisteredHost {
    pub fn id(&self) -> &HostId {
        &self.registration.id
    }

    pub fn registration(&self) -> &HostRegistration {
        &self.registration
    }

    /// The verified decrypt key: its TPM name and public point.
    pub fn certified_key(&self) -> &CertifiedKey {
        &self.certified
    }

    /// The decrypt key's TPM name, as the shard map carries it.
    pub fn key_name(&self) -> std::result::Result<KeyName, keyshard_shards::map::MapError> {
        KeyName::new(self.certified.name.to_vec())
    }

    /// When the CMS accepted the registration, ms since the Unix epoch.
    pub fn registered_at_ms(&self) -> u64 {
        self.registered_at_ms
    }

    /// The record's store revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The host as a placement candidate.
    pub fn candidate(&self) -> Candidate {
        Candidate {
            host: self.registration.id.clone(),
            weight: self.registration.weight,
            domain: self.registration.domain.clone(),
        }
    }
}

/// Why [`HostRegistry::fresh_hosts`] left a host out.
#[derive(Debug)]
pub enum Exclusion {
    /// Registered longer ago than the registry's maximum age.
    Stale { age: Duration },
    /// Registered at a time after now: a clock that went backwards, or a forged record.
    Future { ahead: Duration },
    /// The record does not parse or its certification no longer verifies.
    Invalid(RegistryError),
    /// The operator's host list does not admit the host as registered.
    NotAdmitted(AdmissionError),
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stale { age } => write!(f, "registered {} s ago (stale)", age.as_secs()),
            Self::Future { ahead } => {
                write!(f, "registered {} ms in the future", ahead.as_millis())
            }
            Self::Invalid(e) => write!(f, "{e}"),
            Self::NotAdmitted(e) => write!(f, "{e}"),
        }
    }
}

/// The hosts that qualify for placement, and those left out with the reason.
#[derive(Debug, Default)]
pub struct HostListing {
    pub fresh: Vec<RegisteredHost>,
    /// (store key, reason), in key order.
    pub excluded: Vec<(String, Exclusion)>,
}

/// The registry's policy: how long a registration stays fresh, and which hosts the operator
/// admits (`keyshard cms --hosts`; None: every registered host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistry {
    pub max_age: Duration,
    pub admission: Option<Arc<HostAdmission>>,
}

impl Default for HostRegistry {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_MAX_AGE,
            admission: None,
        }
    }
}

impl HostRegistry {
    /// A registration challenge: a single-use nonce, valid for [`CHALLENGE_TTL`].
    pub async fn challenge<R: Repository>(&self, store: &R) -> Result<Nonce> {
        Ok(store.nonce_issue(CHALLENGE_TTL).await?)
    }

    /// Verifies and stores a registration (module documentation), accepted at `now` (the
    /// server passes `SystemTime::now()`; freshness counts from it).
    pub async fn register<R: Repository>(
        &self,
        store: &R,
        registration: HostRegistration,
        now: SystemTime,
    ) -> Result<RegisteredHost> {
        let host = registration.id.clone();
        let certified = verify(&registration)?;
        store
            .nonce_take(&registration.nonce)
            .await
            .map_err(|source| RegistryError::Nonce {
                host: host.clone(),
                source,
            })?;
        let key = host_key(&host)?;
        check_one_tpm_one_host(store, &key, &registration, &certified).await?;
        let expected = match store.get(&key).await? {
            None => Expected::Absent,
            Some(entry) => {
                let previous = decode(&key, &entry.value, entry.revision)?;
                if previous.registration.ak != registration.ak {
                    return Err(RegistryError::AkChanged { host });
                }
                Expected::Revision(entry.revision)
            }
        };
        let registered_at_ms = unix_ms(now)?;
        let value = encode(&registration, registered_at_ms)?;
        match store.compare_and_swap(&key, expected, &value).await? {
            CasOutcome::Written(revision) => {
                log::info!(
                    "registered shard host {host} ({} / {}) at revision {revision}",
                    registration.domain.region,
                    registration.domain.operator
                );
                Ok(RegisteredHost {
                    registration,
                    certified,
                    registered_at_ms,
                    revision,
                })
            }
            CasOutcome::Conflict { .. } => Err(RegistryError::Conflict { host }),
        }
    }

    /// The registered host `id`, verified again, fresh or not; None when it is not registered.
    pub async fn host<R: Repository>(
        &self,
        store: &R,
        id: &HostId,
    ) -> Result<Option<RegisteredHost>> {
        let key = host_key(id)?;
        match store.get(&key).await? {
            None => Ok(None),
            Some(entry) => decode(&key, &entry.value, entry.revision).map(Some),
        }
    }

    /// Removes host `id`'s record, whatever it holds (also a record that no longer parses);
    /// false when there is none. Shards already sealed to the host stay where they are: its
    /// TPM can still open them, and its index counts as lost for those credentials.
    pub async fn remove<R: Repository>(&self, store: &R, id: &HostId) -> Result<bool> {
        let key = host_key(id)?;
        for _ in 0..REMOVE_ATTEMPTS {
            let Some(entry) = store.get(&key).await? else {
                return Ok(false);
            };
            match store.delete(&key, entry.revision).await? {
                DeleteOutcome::Deleted => {
                    log::info!("removed shard host {id}");
                    return Ok(true);
                }
                // Re-registered in between: remove what is there now.
                DeleteOutcome::Conflict { .. } => continue,
            }
        }
        Err(RegistryError::Conflict { host: id.clone() })
    }

    /// Every registered host that is fresh and affirming at `now` (module documentation), in
    /// host id order, and the others with the reason they are left out.
    pub async fn fresh_hosts<R: Repository>(
        &self,
        store: &R,
        now: SystemTime,
    ) -> Result<HostListing> {
        let now_ms = unix_ms(now)?;
        let mut listing = HostListing::default();
        for (key, record) in scan(store).await? {
            match record {
                Err(e) => {
                    log::warn!("shard host record {} left out: {e}", key.as_str());
                    listing
                        .excluded
                        .push((key.as_str().to_owned(), Exclusion::Invalid(e)));
                }
                Ok(host) => match self
                    .freshness(now_ms, host.registered_at_ms)
                    .or_else(|| self.not_admitted(&host))
                {
                    Some(exclusion) => listing.excluded.push((key.as_str().to_owned(), exclusion)),
                    None => listing.fresh.push(host),
                },
            }
        }
        Ok(listing)
    }

    /// None when the operator's list admits `host` as registered (or there is no list): a
    /// record stored before the list, or since removed from it, is not placed on.
    fn not_admitted(&self, host: &RegisteredHost) -> Option<Exclusion> {
        let registration = &host.registration;
        self.admission.as_ref().and_then(|admission| {
            admission
                .check_registration(&registration.id, &registration.domain, registration.weight)
                .err()
                .map(Exclusion::NotAdmitted)
        })
    }

    /// None when a registration at `registered_ms` is fresh at `now_ms`.
    fn freshness(&self, now_ms: u64, registered_ms: u64) -> Option<Exclusion> {
        if registered_ms > now_ms {
            return Some(Exclusion::Future {
                ahead: Duration::from_millis(registered_ms - now_ms),
            });
        }
        let age = Duration::from_millis(now_ms - registered_ms);
        (age > self.max_age).then_some(Exclusion::Stale { age })
    }
}

/// Every host record in key order, each parsed and verified, or why it is not.
async fn scan<R: Repository>(store: &R) -> Result<Vec<(Key, Result<RegisteredHost>)>> {
    let prefix = KeyPrefix::new(HOSTS_PREFIX)?;
    let mut records = Vec::new();
    let mut after: Option<Key> = None;
    loop {
        let page = store.list(&prefix, after.as_ref(), MAX_LIST_LIMIT).await?;
        let next = match (page.more, page.entries.last()) {
            (true, Some((last, _))) => Some(last.clone()),
            _ => None,
        };
        for (key, entry) in page.entries {
            let record = decode(&key, &entry.value, entry.revision);
            records.push((key, record));
        }
        match next {
            Some(last) => after = Some(last),
            None => return Ok(records),
        }
    }
}

/// Refuses a registration whose AK or decrypt key another host id already has.
async fn check_one_tpm_one_host<R: Repository>(
    store: &R,
    key: &Key,
    registration: &HostRegistration,
    certified: &CertifiedKey,
) -> Result<()> {
    for (other_key, record) in scan(store).await? {
        let Ok(other) = record else { continue };
        if &other_key != key
            && (other.registration.ak == registration.ak || other.certified.name == certified.name)
        {
            return Err(RegistryError::TpmTaken {
                host: registration.id.clone(),
                other: other.registration.id,
            });
        }
    }
    Ok(())
}

/// The store key of host `id`.
pub fn host_key(id: &HostId) -> Result<Key> {
    Ok(Key::new(format!("{HOSTS_PREFIX}{id}"))?)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(time: SystemTime) -> Result<u64> {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or(RegistryError::Clock)
}

fn verify(registration: &HostRegistration) -> Result<CertifiedKey> {
    verify_certification(
        &registration.certification,
        &registration.ak,
        registration.nonce.as_bytes(),
        &registration.decrypt_key_public,
    )
    .map_err(|source| RegistryError::Certification {
        host: registration.id.clone(),
        source,
    })
}

/// The JSON record (module documentation).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    id: String,
    region: String,
    operator: String,
    endpoint: String,
    weight: u32,
    ak: String,
    golden_pcrs: String,
    decrypt_key_public: String,
    certify_attest: String,
    certify_signature: String,
    nonce: String,
    registered_at_ms: u64,
}

fn encode(registration: &HostRegistration, registered_at_ms: u64) -> Result<Vec<u8>> {
    let record = Record {
        version: RECORD_VERSION,
        id: registration.id.to_string(),
        region: registration.domain.region.to_string(),
        operator: registration.domain.operator.to_string(),
        endpoint: registration.endpoint.as_str().to_owned(),
        weight: registration.weight.get(),
        ak: hex::encode(registration.ak.to_sec1()),
        golden_pcrs: hex::encode(registration.golden_pcrs.to_bytes()),
        decrypt_key_public: hex::encode(&registration.decrypt_key_public),
        certify_attest: hex::encode(&registration.certification.attest),
        certify_signature: hex::encode(registration.certification.signature),
        nonce: registration.nonce.to_hex(),
        registered_at_ms,
    };
    serde_json::to_vec(&record).map_err(|e| RegistryError::Record {
        key: format!("{HOSTS_PREFIX}{}", registration.id),
        reason: format!("cannot encode: {e}"),
    })
}

/// Parses a stored record strictly and verifies its certification again.
fn decode(key: &Key, bytes: &[u8], revision: Revision) -> Result<RegisteredHost> {
    let bad = |reason: String| RegistryError::Record {
        key: key.as_str().to_owned(),
        reason,
    };
    let record: Record =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a host record: {e}")))?;
    if record.version != RECORD_VERSION {
        return Err(bad(format!(
            "version {} is not supported (expected {RECORD_VERSION})",
            record.version
        )));
    }
    let id = HostId::new(record.id).map_err(|e| bad(e.to_string()))?;
    if key.as_str() != format!("{HOSTS_PREFIX}{id}") {
        return Err(bad(format!("holds the record of host {id}")));
    }
    let domain = FailureDomain {
        region: DomainName::new(record.region).map_err(|e| bad(format!("region: {e}")))?,
        operator: DomainName::new(record.operator).map_err(|e| bad(format!("operator: {e}")))?,
    };
    let endpoint = Endpoint::new(record.endpoint).map_err(|e| bad(e.to_string()))?;
    let weight = NonZeroU32::new(record.weight).ok_or_else(|| bad("weight 0".to_owned()))?;
    let unhex = |field: &'static str, text: &str| {
        hex::decode(text).map_err(|_| bad(format!("{field} is not hex")))
    };
    let ak = AkPublic::from_sec1(&unhex("ak", &record.ak)?).map_err(|e| bad(format!("ak: {e}")))?;
    let golden_pcrs = PcrValues::parse(&unhex("golden_pcrs", &record.golden_pcrs)?)
        .map_err(|e| bad(format!("golden_pcrs: {e}")))?;
    let signature: [u8; 64] = unhex("certify_signature", &record.certify_signature)?
        .try_into()
        .map_err(|_| bad("certify_signature is not 64 bytes".to_owned()))?;
    let nonce = Nonce::from_hex(&record.nonce).map_err(|e| bad(format!("nonce: {e}")))?;
    let registration = HostRegistration {
        id,
        domain,
        endpoint,
        weight,
        ak,
        golden_pcrs,
        decrypt_key_public: unhex("decrypt_key_public", &record.decrypt_key_public)?,
        certification: Certification {
            attest: unhex("certify_attest", &record.certify_attest)?,
            signature,
        },
        nonce,
    };
    let certified = verify(&registration)?;
    Ok(RegisteredHost {
        registration,
        certified,
        registered_at_ms: record.registered_at_ms,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> HostRegistry {
        HostRegistry {
            max_age: Duration::from_secs(60),
            admission: None,
        }
    }

    #[test]
    fn freshness_is_an_age_window_that_refuses_the_future() {
        let r = registry();
        assert!(r.freshness(100_000, 100_000).is_none());
        assert!(r.freshness(160_000, 100_000).is_none());
        assert!(matches!(
            r.freshness(160_001, 100_000),
            Some(Exclusion::Stale { .. })
        ));
        assert!(matches!(
            r.freshness(99_999, 100_000),
            Some(Exclusion::Future { .. })
        ));
    }

    #[test]
    fn records_are_parsed_strictly() {
        let key = Key::new("hosts/h1").unwrap();
        let revision = Revision::new(1).unwrap();
        let full = |version: u32, id: &str, weight: u32| {
            format!(
                r#"{{"version":{version},"id":"{id}","region":"eu","operator":"acme","endpoint":"https://h1","weight":{weight},"ak":"04","golden_pcrs":"00","decrypt_key_public":"00","certify_attest":"00","certify_signature":"00","nonce":"00","registered_at_ms":1}}"#
            )
        };
        for (bytes, expected) in [
            (b"not json".to_vec(), "not a host record"),
            (br#"{"version":1}"#.to_vec(), "missing field"),
            (br#"{"version":1,"extra":1}"#.to_vec(), "unknown field"),
            (full(2, "h1", 1).into_bytes(), "version 2 is not supported"),
            (full(1, "h2", 1).into_bytes(), "holds the record of host h2"),
            (full(1, "h1", 0).into_bytes(), "weight 0"),
            (full(1, "h1", 1).into_bytes(), "ak: "),
            (
                full(1, "h1", 1)
                    .replace(r#""weight":1"#, r#""weight":"1""#)
                    .into_bytes(),
                "invalid type",
            ),
        ] {
            let err = decode(&key, &bytes, revision).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(expected)),
                "{err:?} should say {expected}"
            );
        }
    }
}
