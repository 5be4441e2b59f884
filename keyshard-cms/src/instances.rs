//! Compute instances: an instance's registered attestation key and golden PCR values, kept in
//! the [`store`](crate::store) under `instances/<id>`: what the CMS and the shard hosts check an
//! instance's evidence against ([`InstanceRecord::policy`]).
//!
//! # Registration
//!
//! An instance enrols first ([`crate::enrolment`], kind `instance`): its AK is then pinned
//! under `aks/instance/<id>`. It asks for a challenge ([`challenge`]: a single-use store nonce
//! and the PCR selection to quote), quotes its PCRs over the nonce, and presents an
//! [`InstanceRegistration`]. [`register`] then, in this order:
//! 1. looks up the AK pinned to the id ([`InstanceError::NotEnrolled`] without one);
//! 2. uses up the nonce (once, on any replica sharing the store, before it expires);
//! 3. verifies the quote (`keyshard_attest::tpm::verify_quote`): signed by the pinned AK,
//!    qualifying data = the nonce, over exactly the golden selection, PCR digest = SHA-256 of
//!    the golden values. So the golden values are what the instance's TPM holds at enrolment;
//! 4. writes the record by compare-and-swap: absent for a new id, the revision it read for a
//!    re-registration. A re-registration must present the registered golden values (same
//!    selection, same values: [`InstanceError::GoldenChanged`] otherwise). Golden values are
//!    registered once: an instance whose PCRs changed could otherwise quote its new state and
//!    register it, and every later fetch would verify against it; and a narrower selection
//!    would drop the changed PCR from every later check. New values for a re-measured instance
//!    take an operator removing `instances/<id>` from the store first.
//!
//! What this protects against: golden values that the instance's TPM did not hold (a quote
//! over other PCRs, or other values), a replayed quote (the nonce), a quote by another TPM
//! (the pinned AK). What it does not: an instance whose TPM already held a bad state when it
//! registered. The golden values are whatever it measured then; whoever runs `keyshard
//! instance enroll` vouches for that state.
//!
//! # Record (JSON, version 1; byte strings lowercase hex)
//!
//! | field | value |
//! |---|---|
//! | `version` | 1 |
//! | `id` | the instance id (`a-z 0-9 . _ -`, 1..=64); must match the key `instances/<id>` |
//! | `ak` | the AK's public key, SEC1 uncompressed P-256 (65 bytes) |
//! | `ak_name` | the AK's TPM name (34 bytes): what `--instance-policy` pins |
//! | `golden_pcrs` | the golden PCR values: `keyshard_attest::tpm::PcrValues` record |
//! | `registered_at_ms` | when the CMS accepted it, ms since the Unix epoch |
//!
//! # Quote wire format
//!
//! The API carries a quote as one byte string: the TPMS_ATTEST exactly as the TPM signed it
//! (1..=[`MAX_ATTEST_LEN`] bytes), followed by the AK's ECDSA P-256 signature r || s (64 bytes,
//! big-endian). The TPMS_ATTEST must parse as a quote ([`quote_from_wire`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyshard_attest::tpm::attest::QuoteAttest;
use keyshard_attest::tpm::public::NAME_LEN;
use keyshard_attest::tpm::{
    AkPublic, PcrError, PcrSelection, PcrValues, Quote, QuoteError, differing_pcrs, verify_quote,
};
use keyshard_core::policy::PcrBank;
use keyshard_shards::instance::InstancePolicy;
use serde::{Deserialize, Serialize};

use crate::enrolment::{self, EnrolmentError, EnrolmentKind, PinnedAk};
use crate::store::{CasOutcome, Expected, Key, Nonce, Repository, StoreError};

/// Where instance records live: `instances/<id>`.
pub const INSTANCES_PREFIX: &str = "instances/";
/// The record format's version.
pub const RECORD_VERSION: u32 = 1;
/// How long an instance challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// The selection an instance that is not registered yet is asked to quote: the firmware and
/// boot loader PCRs of the SHA-256 bank.
pub const DEFAULT_PCRS: &str = "sha256:0,1,2,3,4,5,6,7";
/// The longest TPMS_ATTEST in a quote (as instance evidence allows).
pub const MAX_ATTEST_LEN: usize = keyshard_shards::instance::wire::MAX_ATTEST_LEN;
/// Bytes of a quote's signature.
const SIGNATURE_LEN: usize = 64;

/// What can go wrong with instances. Nothing secret is registered, so variants may name keys.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enrolment(#[from] EnrolmentError),
    #[error("instance {id} is not enrolled: run keyshard instance enroll first")]
    NotEnrolled { id: InstanceId },
    #[error("instance {id}: the registration nonce is refused: {source}")]
    Nonce { id: InstanceId, source: StoreError },
    #[error("instance {id}: the quote is refused: {source}")]
    Quote { id: InstanceId, source: QuoteError },
    #[error("instance {id} was registered again concurrently; retry with a new challenge")]
    Conflict { id: InstanceId },
    #[error(
        "instance {id} is registered with other golden values ({changed}); its TPM no longer \
         holds what it registered, so it may not re-register itself: an operator removes \
         instances/{id} from the store to register new values"
    )]
    GoldenChanged { id: InstanceId, changed: String },
    #[error("the quote is malformed: {reason}")]
    QuoteFormat { reason: String },
    #[error("instance record {key}: {reason}")]
    Record { key: String, reason: String },
    #[error("PCR selection: {0}")]
    Pcrs(PcrError),
    #[error("the system clock is before 1970 or beyond 2^64 ms")]
    Clock,
}

/// Result of instance operations.
pub type Result<T> = std::result::Result<T, InstanceError>;

/// Names one compute instance: the same type the grants bind (one definition for both crates).
pub use keyshard_shards::InstanceId;

/// A registered instance (module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: InstanceId,
    /// The AK pinned at enrolment.
    pub ak: AkPublic,
    /// The AK's TPM name.
    pub ak_name: [u8; NAME_LEN],
    /// The golden PCR values its quotes must cover.
    pub golden: PcrValues,
    pub registered_at_ms: u64,
}

impl InstanceRecord {
    /// What evidence of this instance is verified against
    /// (`keyshard_shards::instance::verify`).
    pub fn policy(&self) -> InstancePolicy {
        InstancePolicy::new(self.ak.clone(), self.golden.clone())
    }
}

/// A challenge for an instance: the nonce to quote over and the PCRs to quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceChallenge {
    pub nonce: Nonce,
    /// The registered golden selection, or [`DEFAULT_PCRS`] for an instance not registered yet.
    pub pcrs: PcrSelection,
    pub expires_in: Duration,
}

/// What an instance presents to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRegistration {
    pub id: InstanceId,
    /// The golden values: what its TPM holds now.
    pub golden: PcrValues,
    /// The challenge from [`challenge`].
    pub nonce: Nonce,
    /// TPM2_Quote over the golden selection with the nonce as qualifying data.
    pub quote: Quote,
}

/// The selection [`DEFAULT_PCRS`] names.
pub fn default_pcrs() -> Result<PcrSelection> {
    PcrSelection::new(PcrBank::Sha256, &[0, 1, 2, 3, 4, 5, 6, 7]).map_err(InstanceError::Pcrs)
}

/// A challenge for instance `id` (registered or not): a single-use nonce, valid for
/// [`CHALLENGE_TTL`], and the selection to quote.
pub async fn challenge<R: Repository>(store: &R, id: &InstanceId) -> Result<InstanceChallenge> {
    let pcrs = match get_instance(store, id).await? {
        Some(record) => record.golden.selection().clone(),
        None => default_pcrs()?,
    };
    let nonce = store.nonce_issue(CHALLENGE_TTL).await?;
    Ok(InstanceChallenge {
        nonce,
        pcrs,
        expires_in: CHALLENGE_TTL,
    })
}

/// Verifies and stores a registration (module documentation), accepted at `now`. The record,
/// and whether it is new (false: registered again).
pub async fn register<R: Repository>(
    store: &R,
    registration: InstanceRegistration,
    now: SystemTime,
) -> Result<(InstanceRecord, bool)> {
    let id = registration.id.clone();
    let pinned: PinnedAk = enrolment::pinned_ak(store, EnrolmentKind::Instance, id.as_str())
        .await?
        .ok_or_else(|| InstanceError::NotEnrolled { id: id.clone() })?;
    store
        .nonce_take(&registration.nonce)
        .await
        .map_err(|source| InstanceError::Nonce {
            id: id.clone(),
            source,
        })?;
    verify_quote(
        &registration.quote,
        &pinned.ak,
        registration.nonce.as_bytes(),
        &registration.golden,
    )
    .map_err(|source| InstanceError::Quote {
        id: id.clone(),
        source,
    })?;
    let key = instance_key(&id)?;
    let expected = match store.get(&key).await? {
        None => Expected::Absent,
        Some(entry) => {
            let registered = decode(&key, &entry.value)?;
            if registered.golden != registration.golden {
                return Err(InstanceError::GoldenChanged {
                    id,
                    changed: golden_change(&registered.golden, &registration.golden),
                });
            }
            Expected::Revision(entry.revision)
        }
    };
    let record = InstanceRecord {
        id: id.clone(),
        ak: pinned.ak,
        ak_name: pinned.ak_name,
        golden: registration.golden,
        registered_at_ms: unix_ms(now)?,
    };
    match store
        .compare_and_swap(&key, expected, &encode(&record)?)
        .await?
    {
        CasOutcome::Written(_) => {
            log::info!(
                "registered instance {id}: ak name {}, golden {}",
                hex::encode(record.ak_name),
                record.golden.selection()
            );
            Ok((record, expected == Expected::Absent))
        }
        CasOutcome::Conflict { .. } => Err(InstanceError::Conflict { id }),
    }
}

/// What differs between the registered golden values and those presented again: the changed
/// PCRs (`sha256:7 differs`), or both selections when they are not the same.
fn golden_change(registered: &PcrValues, presented: &PcrValues) -> String {
    match differing_pcrs(registered, presented) {
        Ok(changed) => {
            let bank = registered.selection().bank().as_str();
            let list: Vec<String> = changed.iter().map(|i| i.to_string()).collect();
            format!("{bank}:{} differs", list.join(","))
        }
        Err(_) => format!(
            "registered over {}, presented over {}",
            registered.selection(),
            presented.selection()
        ),
    }
}

/// The registered instance `id`, or None when it is not registered.
pub async fn get_instance<R: Repository>(
    store: &R,
    id: &InstanceId,
) -> Result<Option<InstanceRecord>> {
    let key = instance_key(id)?;
    match store.get(&key).await? {
        None => Ok(None),
        Some(entry) => decode(&key, &entry.value).map(Some),
    }
}

/// The store key of instance `id`.
pub fn instance_key(id: &InstanceId) -> Result<Key> {
    Ok(Key::new(format!("{INSTANCES_PREFIX}{id}"))?)
}

/// A quote in the API's wire format (module documentation).
pub fn quote_to_wire(quote: &Quote) -> Vec<u8> {
    [quote.attest.as_slice(), quote.signature.as_slice()].concat()
}

/// Parses the wire format strictly: a TPMS_ATTEST of 1..=[`MAX_ATTEST_LEN`] bytes that parses
/// as a quote, then the 64-byte signature. Checks no signature.
pub fn quote_from_wire(bytes: &[u8]) -> Result<Quote> {
    let bad = |reason: String| InstanceError::QuoteFormat { reason };
    let attest_len = bytes
        .len()
        .checked_sub(SIGNATURE_LEN)
        .filter(|len| *len > 0)
        .ok_or_else(|| bad(format!("{} bytes is too short", bytes.len())))?;
    if attest_len > MAX_ATTEST_LEN {
        return Err(bad(format!(
            "a TPMS_ATTEST of {attest_len} bytes, at most {MAX_ATTEST_LEN} are allowed"
        )));
    }
    let (attest, signature) = bytes.split_at(attest_len);
    QuoteAttest::parse(attest).map_err(|e| bad(format!("not a TPM quote: {e}")))?;
    let signature: [u8; SIGNATURE_LEN] = signature
        .try_into()
        .map_err(|_| bad("the signature is not 64 bytes".to_owned()))?;
    Ok(Quote {
        attest: attest.to_vec(),
        signature,
    })
}

fn unix_ms(time: SystemTime) -> Result<u64> {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or(InstanceError::Clock)
}

/// The JSON record (module documentation).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    id: String,
    ak: String,
    ak_name: String,
    golden_pcrs: String,
    registered_at_ms: u64,
}

fn encode(record: &InstanceRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(&Record {
        version: RECORD_VERSION,
        id: record.id.to_string(),
        ak: hex::encode(record.ak.to_sec1()),
        ak_name: hex::encode(record.ak_name),
        golden_pcrs: hex::encode(record.golden.to_bytes()),
        registered_at_ms: record.registered_at_ms,
    })
    .map_err(|e| InstanceError::Record {
        key: format!("{INSTANCES_PREFIX}{}", record.id),
        reason: format!("cannot encode: {e}"),
    })
}

/// Parses a stored record strictly.
fn decode(key: &Key, bytes: &[u8]) -> Result<InstanceRecord> {
    let bad = |reason: String| InstanceError::Record {
        key: key.as_str().to_owned(),
        reason,
    };
    let record: Record =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not an instance record: {e}")))?;
    if record.version != RECORD_VERSION {
        return Err(bad(format!(
            "version {} is not supported (expected {RECORD_VERSION})",
            record.version
        )));
    }
    let id = InstanceId::new(record.id).map_err(|e| bad(e.to_string()))?;
    if key.as_str() != format!("{INSTANCES_PREFIX}{id}") {
        return Err(bad(format!("holds the record of instance {id}")));
    }
    let ak = hex::decode(&record.ak)
        .ok()
        .and_then(|bytes| AkPublic::from_sec1(&bytes).ok())
        .ok_or_else(|| bad("ak is not a hex SEC1 P-256 point".to_owned()))?;
    let ak_name = hex::decode(&record.ak_name)
        .ok()
        .and_then(|bytes| <[u8; NAME_LEN]>::try_from(bytes).ok())
        .ok_or_else(|| bad(format!("ak_name is not {NAME_LEN} hex bytes")))?;
    let golden = hex::decode(&record.golden_pcrs)
        .map_err(|_| bad("golden_pcrs is not hex".to_owned()))
        .and_then(|bytes| PcrValues::parse(&bytes).map_err(|e| bad(format!("golden_pcrs: {e}"))))?;
    Ok(InstanceRecord {
        id,
        ak,
        ak_name,
        golden,
        registered_at_ms: record.registered_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use keyshard_attest::tpm::attest::{ClockInfo, QuotedBank};
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};

    use super::*;
    use crate::store::Store;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("redb:{}", dir.path().join("s.redb").display()))
            .await
            .unwrap();
        (dir, store)
    }

    fn ak_key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn ak(key: &SigningKey) -> AkPublic {
        AkPublic::from_sec1(key.verifying_key().to_encoded_point(false).as_bytes()).unwrap()
    }

    fn pcrs(pcr7: u8) -> PcrValues {
        PcrValues::new(PcrBank::Sha256, vec![(0, vec![0; 32]), (7, vec![pcr7; 32])]).unwrap()
    }

    /// What a TPM with AK `key` signs for `qualifying` over `actual`.
    fn quote_by(key: &SigningKey, qualifying: &[u8], actual: &PcrValues) -> Quote {
        let attest = QuoteAttest {
            signer_name: [vec![0, 0x0b], vec![0xaa; 32]].concat(),
            extra_data: qualifying.to_vec(),
            clock: ClockInfo {
                clock: 5000,
                reset_count: 3,
                restart_count: 0,
                safe: true,
            },
            firmware_version: 42,
            banks: vec![QuotedBank {
                alg: 0x000b,
                bitmap: actual.selection().bitmap().to_vec(),
            }],
            pcr_digest: actual.composite_digest().to_vec(),
        }
        .to_bytes()
        .unwrap();
        let signature: Signature = key.sign(&attest);
        Quote {
            attest,
            signature: signature.to_bytes().into(),
        }
    }

    async fn enrol(store: &Store, id: &str, seed: u8) {
        enrolment::pin_ak(
            store,
            PinnedAk {
                kind: EnrolmentKind::Instance,
                id: id.to_owned(),
                ak: ak(&ak_key(seed)),
                ak_name: [seed; NAME_LEN],
                ek_root: "CN=test".to_owned(),
                enrolled_at_ms: 1,
            },
        )
        .await
        .unwrap();
    }

    fn vm() -> InstanceId {
        InstanceId::new("vm-1").unwrap()
    }

    #[tokio::test]
    async fn item6_instance_enroll_a_quote_by_the_pinned_ak_over_the_nonce_registers() {
        let (_dir, store) = store().await;
        enrol(&store, "vm-1", 1).await;
        let c = challenge(&store, &vm()).await.unwrap();
        assert_eq!(c.pcrs.to_string(), DEFAULT_PCRS);
        let quote = quote_by(&ak_key(1), c.nonce.as_bytes(), &pcrs(7));
        let registration = InstanceRegistration {
            id: vm(),
            golden: pcrs(7),
            nonce: c.nonce,
            quote,
        };
        let (record, created) = register(&store, registration.clone(), SystemTime::now())
            .await
            .unwrap();
        assert!(created);
        assert_eq!(record.ak_name, [1; NAME_LEN]);
        let read = get_instance(&store, &vm()).await.unwrap().unwrap();
        assert_eq!(read, record);
        assert_eq!(read.policy(), InstancePolicy::new(ak(&ak_key(1)), pcrs(7)));
        // Next challenge asks for the registered selection.
        let c = challenge(&store, &vm()).await.unwrap();
        assert_eq!(c.pcrs.to_string(), "sha256:0,7");
        // A replay of the same registration: its nonce is used up.
        assert!(matches!(
            register(&store, registration, SystemTime::now()).await,
            Err(InstanceError::Nonce { .. })
        ));
        // Registered again with a new nonce: not new.
        let quote = quote_by(&ak_key(1), c.nonce.as_bytes(), &pcrs(7));
        let again = InstanceRegistration {
            id: vm(),
            golden: pcrs(7),
            nonce: c.nonce,
            quote,
        };
        let (_, created) = register(&store, again, SystemTime::now()).await.unwrap();
        assert!(!created);
    }

    #[tokio::test]
    async fn item6_instance_enroll_refuses_what_the_tpm_did_not_quote() {
        let (_dir, store) = store().await;
        // Not enrolled: refused before the nonce is touched.
        let c = challenge(&store, &vm()).await.unwrap();
        let quote = quote_by(&ak_key(1), c.nonce.as_bytes(), &pcrs(7));
        let unenrolled = InstanceRegistration {
            id: vm(),
            golden: pcrs(7),
            nonce: c.nonce,
            quote,
        };
        assert!(matches!(
            register(&store, unenrolled, SystemTime::now()).await,
            Err(InstanceError::NotEnrolled { .. })
        ));
        enrol(&store, "vm-1", 1).await;
        let other_pcrs = PcrValues::new(PcrBank::Sha256, vec![(0, vec![0; 32])]).unwrap();
        for (what, signer, qualifying, quoted, expected) in [
            ("another AK", 2, None, pcrs(7), "not verify"),
            (
                "another nonce",
                1,
                Some([9u8; 32]),
                pcrs(7),
                "another nonce",
            ),
            ("other PCRs", 1, None, other_pcrs, "covers"),
            ("other values", 1, None, pcrs(8), "golden values"),
        ] {
            let c = challenge(&store, &vm()).await.unwrap();
            let qualifying = qualifying.unwrap_or(*c.nonce.as_bytes());
            let registration = InstanceRegistration {
                id: vm(),
                golden: pcrs(7),
                nonce: c.nonce,
                quote: quote_by(&ak_key(signer), &qualifying, &quoted),
            };
            let err = register(&store, registration, SystemTime::now())
                .await
                .unwrap_err();
            assert!(
                matches!(err, InstanceError::Quote { .. }) && err.to_string().contains(expected),
                "{what}: {err}"
            );
            assert!(
                get_instance(&store, &vm()).await.unwrap().is_none(),
                "{what}"
            );
        }
    }

    /// Review of issue 9: an instance whose PCR 7 changed quotes its new state correctly over
    /// a fresh nonce; registering that as its golden values again (or a narrower selection
    /// that leaves PCR 7 out) would make every later fetch verify against it. Refused, and the
    /// record keeps the values first registered.
    #[tokio::test]
    async fn review9_an_instance_cannot_re_register_changed_golden_values() {
        let (_dir, store) = store().await;
        enrol(&store, "vm-1", 1).await;
        let register_now = |golden: PcrValues| {
            let store = &store;
            async move {
                let c = challenge(store, &vm()).await.unwrap();
                let quote = quote_by(&ak_key(1), c.nonce.as_bytes(), &golden);
                let registration = InstanceRegistration {
                    id: vm(),
                    golden,
                    nonce: c.nonce,
                    quote,
                };
                register(store, registration, SystemTime::now()).await
            }
        };
        let (first, created) = register_now(pcrs(7)).await.unwrap();
        assert!(created);
        let err = register_now(pcrs(8)).await.unwrap_err();
        assert!(
            matches!(err, InstanceError::GoldenChanged { .. })
                && err.to_string().contains("sha256:7 differs"),
            "{err}"
        );
        let narrower = PcrValues::new(PcrBank::Sha256, vec![(0, vec![0; 32])]).unwrap();
        let err = register_now(narrower).await.unwrap_err();
        assert!(
            matches!(err, InstanceError::GoldenChanged { .. })
                && err.to_string().contains("presented over sha256:0"),
            "{err}"
        );
        assert_eq!(get_instance(&store, &vm()).await.unwrap().unwrap(), first);
        // The same values again still re-register.
        let (_, created) = register_now(pcrs(7)).await.unwrap();
        assert!(!created);
    }

    #[test]
    fn quotes_round_trip_the_wire_format_and_nothing_else_parses() {
        let quote = quote_by(&ak_key(1), &[1; 32], &pcrs(7));
        let wire = quote_to_wire(&quote);
        assert_eq!(quote_from_wire(&wire).unwrap(), quote);
        for (bytes, expected) in [
            (vec![], "too short"),
            (vec![0; 64], "too short"),
            (wire[1..].to_vec(), "not a TPM quote"),
            ([wire.as_slice(), &[0]].concat(), "not a TPM quote"),
            (vec![0; 64 + MAX_ATTEST_LEN + 1], "at most"),
        ] {
            let err = quote_from_wire(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
    }

    #[test]
    fn records_parse_strictly() {
        let record = InstanceRecord {
            id: vm(),
            ak: ak(&ak_key(1)),
            ak_name: [1; NAME_LEN],
            golden: pcrs(7),
            registered_at_ms: 5,
        };
        let key = instance_key(&vm()).unwrap();
        let text = String::from_utf8(encode(&record).unwrap()).unwrap();
        assert_eq!(decode(&key, text.as_bytes()).unwrap(), record);
        for (bytes, expected) in [
            (
                text.replace(r#""version":1"#, r#""version":2"#),
                "version 2",
            ),
            (
                text.replace(r#""id":"vm-1""#, r#""id":"vm-2""#),
                "holds the record",
            ),
            (
                text.replace(r#""id":"vm-1""#, r#""id":"VM""#),
                "instance id",
            ),
            (
                text.replace(r#""registered_at_ms""#, r#""x":1,"registered_at_ms""#),
                "unknown field",
            ),
            (
                text.replace(r#""golden_pcrs":"4b"#, r#""golden_pcrs":"4c"#),
                "golden_pcrs",
            ),
            ("{}".to_owned(), "missing field"),
        ] {
            let err = decode(&key, bytes.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        assert!(InstanceId::new("vm-1").is_ok());
        assert!(InstanceId::new("Vm").is_err());
        assert!(InstanceId::new("v".repeat(65)).is_err());
        assert_eq!(default_pcrs().unwrap().to_string(), DEFAULT_PCRS);
    }
}
