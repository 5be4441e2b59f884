//! Enrolment: an attestation key (AK) proven to sit in a genuine TPM, and pinned to a host or
//! instance id, kept in the [`store`](crate::store).
//!
//! # The two steps
//!
//! 1. [`begin`]: the attester sends its EK certificate and its AK's public area. The CMS checks
//!    the certificate's path to its CA bundle (`--ek-ca`) and the AK's shape, and makes a fresh
//!    random credential to that EK for that AK's TPM name (TPM2_MakeCredential in software,
//!    `keyshard_attest::tpm::enrol::challenge`). It keeps a [`PendingEnrolment`] under
//!    `enrolments/<64 hex>` for [`ENROLMENT_TTL`]: the kind, the id, the AK, the EK's CA root
//!    and SHA-256 of the credential, never the credential itself.
//! 2. [`activate`]: the attester's TPM ran TPM2_ActivateCredential and sends back what came
//!    out. The CMS removes the pending record by compare-and-swap (so each enrolment is
//!    answered once, on any replica sharing the store), checks that it has not expired and that
//!    the answer hashes to the stored digest, and pins the AK under `aks/<kind>/<id>`
//!    ([`PinnedAk`]). A wrong answer uses the enrolment up too.
//!
//! # What it proves, and what it does not
//!
//! A right answer proves that the AK is in the TPM whose EK the certificate names, and that
//! this EK's certificate chains to a CA the operator trusts: a genuine TPM from a known
//! manufacturer (or swtpm_setup's local CA in tests), not software claiming to be one. It
//! does not prove that the host or instance around that TPM is honest: its PCRs are checked
//! later, by quotes against golden values. The first enrolment of an id pins it: whoever
//! enrols an id first owns it, and another AK is refused for that id ([`EnrolmentError::AkConflict`])
//! until an operator removes the pin. One TPM may enrol several ids; the host registry refuses
//! one AK under two host ids.
//!
//! # Records (JSON, version 1; byte strings lowercase hex)
//!
//! Pending, `enrolments/<enrolment id>`: `{"version":1, "kind":"host"|"instance", "id",
//! "ak": SEC1 P-256 point, "ak_name": TPM name (34 bytes), "ek_root": the CA root's subject,
//! "credential_sha256", "expires_at_ms"}`.
//!
//! Pinned, `aks/<kind>/<id>`: `{"version":1, "kind", "id", "ak", "ak_name", "ek_root",
//! "enrolled_at_ms"}`.
//!
//! Parsing is strict: every field required, no other field, version 1, the key matching the
//! record's kind and id.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyshard_attest::tpm::AkPublic;
use keyshard_attest::tpm::credential::{EkKind, MadeCredential};
use keyshard_attest::tpm::ek_cert::CaBundle;
use keyshard_attest::tpm::enrol::{self, EnrolError, answers_digest};
use keyshard_attest::tpm::public::NAME_LEN;
use keyshard_core::holder::{NameError, check_name};
use keyshard_shards::HostId;
use serde::{Deserialize, Serialize};

use crate::admission::{AdmissionError, HostAdmission};
use crate::store::{
    CasOutcome, DeleteOutcome, Expected, Key, KeyPrefix, MAX_LIST_LIMIT, Repository, Revision,
    StoreError,
};

/// Where pending enrolments live: `enrolments/<64 hex>`.
pub const ENROLMENTS_PREFIX: &str = "enrolments/";
/// Where pinned AKs live: `aks/<kind>/<id>`.
pub const AKS_PREFIX: &str = "aks/";
/// Where the TPM (its EK) behind each enrolled id is recorded: `eks/<SHA-256 of the EK's
/// SubjectPublicKeyInfo, hex>` holds `{"version":1,"kind","id"}`.
pub const EKS_PREFIX: &str = "eks/";
/// How long an enrolment may be activated after it began.
pub const ENROLMENT_TTL: Duration = Duration::from_secs(120);
/// The records' format version.
pub const RECORD_VERSION: u32 = 1;
/// Longest id of an enrolled host or instance (the host id's limit).
pub const MAX_ID_LEN: usize = keyshard_shards::names::MAX_HOST_ID_LEN;
/// Bytes of an enrolment id.
pub const ENROLMENT_ID_LEN: usize = 32;
/// How often a pin is re-read when another activation of the same id wins a race.
const PIN_ATTEMPTS: usize = 4;

/// Why an enrolment step is refused or fails. Nothing here holds the credential.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{kind} {id}: {source}")]
    Challenge {
        kind: EnrolmentKind,
        id: String,
        source: EnrolError,
    },
    #[error("enrolment {enrolment} is unknown, already answered or removed")]
    Unknown { enrolment: EnrolmentId },
    #[error("enrolment {enrolment} expired {late_ms} ms ago")]
    Expired {
        enrolment: EnrolmentId,
        late_ms: u64,
    },
    #[error(
        "enrolment {enrolment} of {kind} {id}: the activated credential is not the one made to \
         its EK for its AK: the AK is not in that TPM"
    )]
    ActivationRefused {
        enrolment: EnrolmentId,
        kind: EnrolmentKind,
        id: String,
    },
    #[error(
        "{kind} {id} is enrolled with another attestation key (ak name {pinned}); remove its \
         pin before another TPM takes the id"
    )]
    AkConflict {
        kind: EnrolmentKind,
        id: String,
        pinned: String,
    },
    #[error(
        "this TPM (EK sha256 {ek}) is enrolled as {kind} {id}: one TPM is one host or one \
         instance, never several, so one machine cannot hold shares as several holders"
    )]
    EkConflict {
        kind: EnrolmentKind,
        id: String,
        ek: String,
    },
    #[error("{0}")]
    NotAdmitted(#[from] AdmissionError),
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("record {key}: {reason}")]
    Record { key: String, reason: String },
    #[error("no randomness for an enrolment id")]
    Random,
    #[error("the system clock is before 1970 or beyond 2^64 ms")]
    Clock,
}

/// Result of enrolment operations.
pub type Result<T> = std::result::Result<T, EnrolmentError>;

/// What enrols: a shard host or a compute instance. Their ids are separate name spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnrolmentKind {
    Host,
    Instance,
}

impl EnrolmentKind {
    /// `host` or `instance`: the API's and the store keys' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Instance => "instance",
        }
    }
}

impl fmt::Display for EnrolmentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EnrolmentKind {
    type Err = EnrolmentError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(Self::Host),
            "instance" => Ok(Self::Instance),
            other => Err(EnrolmentError::Record {
                key: "kind".to_owned(),
                reason: format!(
                    "{:?} is not host or instance",
                    other.chars().take(32).collect::<String>()
                ),
            }),
        }
    }
}

/// Checks an enrolled id: 1..=64 bytes of `a-z 0-9 . _ -`, like a host id.
pub fn check_id(kind: EnrolmentKind, id: &str) -> std::result::Result<(), NameError> {
    let what = match kind {
        EnrolmentKind::Host => "host id",
        EnrolmentKind::Instance => "instance id",
    };
    check_name(what, id, MAX_ID_LEN, "a-z, 0-9, '.', '_' and '-'", |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
    })
}

/// `rsa2048`, `ecc-p256` or `ecc-p384`: how the API names an EK kind.
pub fn ek_kind_name(kind: EkKind) -> &'static str {
    match kind {
        EkKind::Rsa2048 => "rsa2048",
        EkKind::EccP256 => "ecc-p256",
        EkKind::EccP384 => "ecc-p384",
    }
}

/// The EK kind [`ek_kind_name`] names, or None.
pub fn parse_ek_kind(name: &str) -> Option<EkKind> {
    [EkKind::Rsa2048, EkKind::EccP256, EkKind::EccP384]
        .into_iter()
        .find(|kind| ek_kind_name(*kind) == name)
}

/// Names one pending enrolment: 32 random bytes, 64 lowercase hex digits. Not a secret: it
/// only finds the record; the credential answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnrolmentId([u8; ENROLMENT_ID_LEN]);

impl EnrolmentId {
    fn random() -> Result<Self> {
        let mut bytes = [0u8; ENROLMENT_ID_LEN];
        getrandom::fill(&mut bytes).map_err(|_| EnrolmentError::Random)?;
        Ok(Self(bytes))
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; ENROLMENT_ID_LEN];
        (text.len() == 2 * ENROLMENT_ID_LEN)
            .then(|| hex::decode_to_slice(text, &mut bytes).ok())
            .flatten()
            .map(|()| Self(bytes))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn key(&self) -> Result<Key> {
        Ok(Key::new(format!("{ENROLMENTS_PREFIX}{}", self.to_hex()))?)
    }
}

impl fmt::Display for EnrolmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What an attester sends to begin ([`begin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentRequest {
    pub kind: EnrolmentKind,
    /// The host or instance id (checked by [`check_id`]).
    pub id: String,
    /// The EK certificate, DER.
    pub ek_certificate: Vec<u8>,
    /// The AK's marshalled TPMT_PUBLIC.
    pub ak_public: Vec<u8>,
}

/// A begun enrolment: what goes back to the attester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BegunEnrolment {
    pub enrolment: EnrolmentId,
    /// The credential blob and encrypted seed for TPM2_ActivateCredential, to the EK of
    /// `made.ek`.
    pub made: MadeCredential,
    /// How long from now it may be activated.
    pub expires_in: Duration,
}

/// A pending enrolment as the store keeps it (module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEnrolment {
    pub kind: EnrolmentKind,
    pub id: String,
    pub ak: AkPublic,
    pub ak_name: [u8; NAME_LEN],
    pub ek_root: String,
    /// SHA-256 of the EK's SubjectPublicKeyInfo: the TPM, whatever AK it presents.
    pub ek_sha256: [u8; 32],
    /// SHA-256 of the credential made to the EK.
    pub credential_sha256: [u8; 32],
    pub expires_at_ms: u64,
}

/// An AK pinned to an id: the only AK whose quotes and certifications count for that id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedAk {
    pub kind: EnrolmentKind,
    pub id: String,
    pub ak: AkPublic,
    /// The AK's TPM name (SHA-256 name of its public area): what an instance policy pins.
    pub ak_name: [u8; NAME_LEN],
    /// The subject of the CA root the EK certificate chained to.
    pub ek_root: String,
    pub enrolled_at_ms: u64,
}

/// Step 1 (module documentation), at `now`: checks the request against `bundle`, refuses an id
/// already pinned to another AK, and stores the pending enrolment.
pub async fn begin<R: Repository>(
    store: &R,
    bundle: &CaBundle,
    request: &EnrolmentRequest,
    now: SystemTime,
) -> Result<BegunEnrolment> {
    begin_admitted(store, bundle, request, now, None).await
}

/// [`begin`], and when `admission` (the operator's host list, `keyshard cms --hosts`) is given,
/// a host id it does not list, or lists for another TPM's EK, is refused
/// ([`EnrolmentError::NotAdmitted`]) before anything is stored.
pub async fn begin_admitted<R: Repository>(
    store: &R,
    bundle: &CaBundle,
    request: &EnrolmentRequest,
    now: SystemTime,
    admission: Option<&HostAdmission>,
) -> Result<BegunEnrolment> {
    check_id(request.kind, &request.id)?;
    let challenge = enrol::challenge(&request.ek_certificate, bundle, now, &request.ak_public)
        .map_err(|source| EnrolmentError::Challenge {
            kind: request.kind,
            id: request.id.clone(),
            source,
        })?;
    if let Some(pinned) = pinned_ak(store, request.kind, &request.id).await?
        && pinned.ak != challenge.ak
    {
        return Err(conflict(&pinned));
    }
    if let (EnrolmentKind::Host, Some(admission)) = (request.kind, admission) {
        let id = HostId::new(request.id.clone())?;
        admission.check_enrolment(&id, &challenge.ek_sha256)?;
    }
    if let Some((kind, id)) = ek_holder(store, &challenge.ek_sha256).await?
        && (kind, id.as_str()) != (request.kind, request.id.as_str())
    {
        return Err(ek_conflict(kind, id, &challenge.ek_sha256));
    }
    sweep_expired(store, now).await;
    let pending = PendingEnrolment {
        kind: request.kind,
        id: request.id.clone(),
        ak: challenge.ak.clone(),
        ak_name: challenge.ak_name,
        ek_root: challenge.ek_root.clone(),
        ek_sha256: challenge.ek_sha256,
        credential_sha256: challenge.credential_digest(),
        expires_at_ms: unix_ms(now)?.saturating_add(duration_ms(ENROLMENT_TTL)),
    };
    let enrolment = store_pending(store, &pending).await?;
    log::info!(
        "enrolment {enrolment} of {} {} begun (EK under {})",
        pending.kind,
        pending.id,
        pending.ek_root
    );
    Ok(BegunEnrolment {
        enrolment,
        made: challenge.made,
        expires_in: ENROLMENT_TTL,
    })
}

/// Stores `pending` under a fresh enrolment id.
pub async fn store_pending<R: Repository>(
    store: &R,
    pending: &PendingEnrolment,
) -> Result<EnrolmentId> {
    let enrolment = EnrolmentId::random()?;
    let key = enrolment.key()?;
    let value = encode_pending(pending)?;
    match store
        .compare_and_swap(&key, Expected::Absent, &value)
        .await?
    {
        CasOutcome::Written(_) => Ok(enrolment),
        // 2^-256: a second random id is not worth the code.
        CasOutcome::Conflict { .. } => Err(EnrolmentError::Random),
    }
}

/// Step 2 (module documentation), at `now`: `activated` is what the attester's
/// ActivateCredential returned. The pending record is gone afterwards whatever the outcome.
pub async fn activate<R: Repository>(
    store: &R,
    enrolment: &EnrolmentId,
    activated: &[u8],
    now: SystemTime,
) -> Result<PinnedAk> {
    let key = enrolment.key()?;
    let unknown = || EnrolmentError::Unknown {
        enrolment: *enrolment,
    };
    let entry = store.get(&key).await?.ok_or_else(unknown)?;
    match store.delete(&key, entry.revision).await? {
        DeleteOutcome::Deleted => {}
        DeleteOutcome::Conflict { .. } => return Err(unknown()),
    }
    let pending = decode_pending(&key, &entry.value)?;
    let now_ms = unix_ms(now)?;
    if now_ms > pending.expires_at_ms {
        return Err(EnrolmentError::Expired {
            enrolment: *enrolment,
            late_ms: now_ms - pending.expires_at_ms,
        });
    }
    if !answers_digest(&pending.credential_sha256, activated) {
        log::warn!(
            "enrolment {enrolment} of {} {}: wrong activation answer",
            pending.kind,
            pending.id
        );
        return Err(EnrolmentError::ActivationRefused {
            enrolment: *enrolment,
            kind: pending.kind,
            id: pending.id,
        });
    }
    let claimed = claim_ek(store, &pending.ek_sha256, pending.kind, &pending.id).await?;
    let pin = PinnedAk {
        kind: pending.kind,
        id: pending.id,
        ak: pending.ak,
        ak_name: pending.ak_name,
        ek_root: pending.ek_root,
        enrolled_at_ms: now_ms,
    };
    let pinned = pin_ak(store, pin).await;
    if pinned.is_err()
        && let Some(revision) = claimed
    {
        // The id belongs to another TPM: this TPM's claim on it is dropped again.
        if let Err(e) = store.delete(&ek_key(&pending.ek_sha256)?, revision).await {
            log::warn!("releasing an EK claim: {e}");
        }
    }
    pinned
}

/// The (kind, id) the TPM with EK digest `ek` is enrolled as, if any.
pub async fn ek_holder<R: Repository>(
    store: &R,
    ek: &[u8; 32],
) -> Result<Option<(EnrolmentKind, String)>> {
    let key = ek_key(ek)?;
    match store.get(&key).await? {
        None => Ok(None),
        Some(entry) => decode_ek(&key, &entry.value).map(Some),
    }
}

/// Records that the TPM with EK digest `ek` is `kind` `id` (compare-and-swap on an absent
/// key, so of two racing claims one wins); refuses it when the TPM is already another id.
/// Returns the revision written when this call wrote the claim.
async fn claim_ek<R: Repository>(
    store: &R,
    ek: &[u8; 32],
    kind: EnrolmentKind,
    id: &str,
) -> Result<Option<Revision>> {
    let key = ek_key(ek)?;
    let value = to_json(
        EKS_PREFIX,
        &EkRecord {
            version: RECORD_VERSION,
            kind: kind.as_str().to_owned(),
            id: id.to_owned(),
        },
    )?;
    for _ in 0..PIN_ATTEMPTS {
        if let Some(entry) = store.get(&key).await? {
            let (held_kind, held_id) = decode_ek(&key, &entry.value)?;
            if (held_kind, held_id.as_str()) != (kind, id) {
                return Err(ek_conflict(held_kind, held_id, ek));
            }
            return Ok(None);
        }
        match store
            .compare_and_swap(&key, Expected::Absent, &value)
            .await?
        {
            CasOutcome::Written(revision) => return Ok(Some(revision)),
            CasOutcome::Conflict { .. } => continue,
        }
    }
    Err(StoreError::Corrupt {
        location: key.as_str().to_owned(),
        reason: "the EK record keeps changing".to_owned(),
    }
    .into())
}

fn ek_key(ek: &[u8; 32]) -> Result<Key> {
    Ok(Key::new(format!("{EKS_PREFIX}{}", hex::encode(ek)))?)
}

fn ek_conflict(kind: EnrolmentKind, id: String, ek: &[u8; 32]) -> EnrolmentError {
    EnrolmentError::EkConflict {
        kind,
        id,
        ek: hex::encode(ek),
    }
}

/// Pins `pin` under `aks/<kind>/<id>` unless that id is pinned already: to the same AK, the
/// existing pin is kept and returned; to another, [`EnrolmentError::AkConflict`].
pub async fn pin_ak<R: Repository>(store: &R, pin: PinnedAk) -> Result<PinnedAk> {
    let key = pin_key(pin.kind, &pin.id)?;
    let value = encode_pin(&pin)?;
    for _ in 0..PIN_ATTEMPTS {
        if let Some(entry) = store.get(&key).await? {
            let pinned = decode_pin(&key, &entry.value)?;
            if pinned.ak != pin.ak {
                return Err(conflict(&pinned));
            }
            return Ok(pinned);
        }
        match store
            .compare_and_swap(&key, Expected::Absent, &value)
            .await?
        {
            CasOutcome::Written(_) => {
                log::info!(
                    "{} {} enrolled: ak name {}",
                    pin.kind,
                    pin.id,
                    hex::encode(pin.ak_name)
                );
                return Ok(pin);
            }
            // Another activation pinned the id meanwhile: compare with what it pinned.
            CasOutcome::Conflict { .. } => continue,
        }
    }
    Err(StoreError::Corrupt {
        location: key.as_str().to_owned(),
        reason: "the pin keeps changing".to_owned(),
    }
    .into())
}

/// The AK pinned to `id` of `kind`, or None when it is not enrolled.
pub async fn pinned_ak<R: Repository>(
    store: &R,
    kind: EnrolmentKind,
    id: &str,
) -> Result<Option<PinnedAk>> {
    let key = pin_key(kind, id)?;
    match store.get(&key).await? {
        None => Ok(None),
        Some(entry) => decode_pin(&key, &entry.value).map(Some),
    }
}

/// Removes the pending enrolments that expired before `now` (one page of them; each begin
/// sweeps one more), so unanswered enrolments do not pile up. Failures are logged only: a
/// left-over record is refused at activation anyway.
async fn sweep_expired<R: Repository>(store: &R, now: SystemTime) {
    let Ok(now_ms) = unix_ms(now) else { return };
    let Ok(prefix) = KeyPrefix::new(ENROLMENTS_PREFIX) else {
        return;
    };
    let page = match store.list(&prefix, None, MAX_LIST_LIMIT).await {
        Ok(page) => page,
        Err(e) => {
            log::warn!("sweeping expired enrolments: {e}");
            return;
        }
    };
    for (key, entry) in page.entries {
        let expired = decode_pending(&key, &entry.value).map_or(true, |p| p.expires_at_ms < now_ms);
        if expired && let Err(e) = store.delete(&key, entry.revision).await {
            log::warn!("removing expired enrolment {}: {e}", key.as_str());
        }
    }
}

/// The store key of the pin of `id` of `kind`.
pub fn pin_key(kind: EnrolmentKind, id: &str) -> Result<Key> {
    check_id(kind, id)?;
    Ok(Key::new(format!("{AKS_PREFIX}{kind}/{id}"))?)
}

fn conflict(pinned: &PinnedAk) -> EnrolmentError {
    EnrolmentError::AkConflict {
        kind: pinned.kind,
        id: pinned.id.clone(),
        pinned: hex::encode(pinned.ak_name),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch.
fn unix_ms(time: SystemTime) -> Result<u64> {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or(EnrolmentError::Clock)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingRecord {
    version: u32,
    kind: String,
    id: String,
    ak: String,
    ak_name: String,
    ek_root: String,
    ek_sha256: String,
    credential_sha256: String,
    expires_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinRecord {
    version: u32,
    kind: String,
    id: String,
    ak: String,
    ak_name: String,
    ek_root: String,
    enrolled_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EkRecord {
    version: u32,
    kind: String,
    id: String,
}

fn decode_ek(key: &Key, bytes: &[u8]) -> Result<(EnrolmentKind, String)> {
    let r: EkRecord = serde_json::from_slice(bytes)
        .map_err(|e| record_error(key, format!("not an EK record: {e}")))?;
    if r.version != RECORD_VERSION {
        return Err(record_error(
            key,
            format!("version {} is not supported", r.version),
        ));
    }
    let kind: EnrolmentKind = r
        .kind
        .parse()
        .map_err(|e| record_error(key, format!("kind: {e}")))?;
    check_id(kind, &r.id).map_err(|e| record_error(key, e.to_string()))?;
    Ok((kind, r.id))
}

fn encode_pending(p: &PendingEnrolment) -> Result<Vec<u8>> {
    to_json(
        ENROLMENTS_PREFIX,
        &PendingRecord {
            version: RECORD_VERSION,
            kind: p.kind.as_str().to_owned(),
            id: p.id.clone(),
            ak: hex::encode(p.ak.to_sec1()),
            ak_name: hex::encode(p.ak_name),
            ek_root: p.ek_root.clone(),
            ek_sha256: hex::encode(p.ek_sha256),
            credential_sha256: hex::encode(p.credential_sha256),
            expires_at_ms: p.expires_at_ms,
        },
    )
}

fn encode_pin(p: &PinnedAk) -> Result<Vec<u8>> {
    to_json(
        AKS_PREFIX,
        &PinRecord {
            version: RECORD_VERSION,
            kind: p.kind.as_str().to_owned(),
            id: p.id.clone(),
            ak: hex::encode(p.ak.to_sec1()),
            ak_name: hex::encode(p.ak_name),
            ek_root: p.ek_root.clone(),
            enrolled_at_ms: p.enrolled_at_ms,
        },
    )
}

fn to_json<T: Serialize>(what: &str, record: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| EnrolmentError::Record {
        key: what.to_owned(),
        reason: format!("cannot encode: {e}"),
    })
}

/// The parts both records share, parsed: kind, id, AK, AK name.
struct Common {
    kind: EnrolmentKind,
    id: String,
    ak: AkPublic,
    ak_name: [u8; NAME_LEN],
}

fn common(
    key: &Key,
    version: u32,
    kind: &str,
    id: String,
    ak: &str,
    ak_name: &str,
) -> Result<Common> {
    let bad = |reason: String| record_error(key, reason);
    if version != RECORD_VERSION {
        return Err(bad(format!(
            "version {version} is not supported (expected {RECORD_VERSION})"
        )));
    }
    let kind: EnrolmentKind = kind.parse().map_err(|e| bad(format!("kind: {e}")))?;
    check_id(kind, &id).map_err(|e| bad(e.to_string()))?;
    let ak = hex::decode(ak)
        .ok()
        .and_then(|bytes| AkPublic::from_sec1(&bytes).ok())
        .ok_or_else(|| bad("ak is not a hex SEC1 P-256 point".to_owned()))?;
    let ak_name = hex::decode(ak_name)
        .ok()
        .and_then(|bytes| <[u8; NAME_LEN]>::try_from(bytes).ok())
        .ok_or_else(|| bad(format!("ak_name is not {NAME_LEN} hex bytes")))?;
    Ok(Common {
        kind,
        id,
        ak,
        ak_name,
    })
}

fn decode_pending(key: &Key, bytes: &[u8]) -> Result<PendingEnrolment> {
    let r: PendingRecord = serde_json::from_slice(bytes)
        .map_err(|e| record_error(key, format!("not a pending enrolment: {e}")))?;
    let c = common(key, r.version, &r.kind, r.id, &r.ak, &r.ak_name)?;
    let credential_sha256 = hex::decode(&r.credential_sha256)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| record_error(key, "credential_sha256 is not 32 hex bytes".to_owned()))?;
    let ek_sha256 = hex::decode(&r.ek_sha256)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| record_error(key, "ek_sha256 is not 32 hex bytes".to_owned()))?;
    Ok(PendingEnrolment {
        kind: c.kind,
        id: c.id,
        ak: c.ak,
        ak_name: c.ak_name,
        ek_root: r.ek_root,
        ek_sha256,
        credential_sha256,
        expires_at_ms: r.expires_at_ms,
    })
}

fn decode_pin(key: &Key, bytes: &[u8]) -> Result<PinnedAk> {
    let r: PinRecord = serde_json::from_slice(bytes)
        .map_err(|e| record_error(key, format!("not a pinned AK: {e}")))?;
    let c = common(key, r.version, &r.kind, r.id, &r.ak, &r.ak_name)?;
    if key.as_str() != format!("{AKS_PREFIX}{}/{}", c.kind, c.id) {
        return Err(record_error(
            key,
            format!("holds the pin of {} {}", c.kind, c.id),
        ));
    }
    Ok(PinnedAk {
        kind: c.kind,
        id: c.id,
        ak: c.ak,
        ak_name: c.ak_name,
        ek_root: r.ek_root,
        enrolled_at_ms: r.enrolled_at_ms,
    })
}

fn record_error(key: &Key, reason: String) -> EnrolmentError {
    EnrolmentError::Record {
        key: key.as_str().to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use keyshard_attest::tpm::credential::EkKind;
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::store::Store;

    const EK: &[u8] = include_bytes!("../../keyshard-attest/tests/data/ek/ek-rsa2048.der");
    const ROOT: &[u8] = include_bytes!("../../keyshard-attest/tests/data/ek/rootca.pem");
    const ISSUER: &[u8] = include_bytes!("../../keyshard-attest/tests/data/ek/issuer.pem");

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("redb:{}", dir.path().join("s.redb").display()))
            .await
            .unwrap();
        (dir, store)
    }

    /// Within the test EK certificate's validity.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    fn ak(seed: u8) -> AkPublic {
        let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
        AkPublic::from_sec1(secret.public_key().to_sec1_bytes().as_ref()).unwrap()
    }

    fn pending(kind: EnrolmentKind, id: &str, seed: u8, credential: &[u8]) -> PendingEnrolment {
        PendingEnrolment {
            kind,
            id: id.to_owned(),
            ak: ak(seed),
            ak_name: [seed; NAME_LEN],
            ek_root: "CN=test root".to_owned(),
            ek_sha256: [seed; 32],
            credential_sha256: Sha256::digest(credential).into(),
            expires_at_ms: unix_ms(now()).unwrap() + 120_000,
        }
    }

    /// Review of issue 9: one TPM can make as many AKs as it likes, each provable through
    /// the same EK; pinning each under another host id made one machine several "independent"
    /// holders in as many claimed failure domains (and a host and an instance at once). Each
    /// EK now enrols one id: a second id, of either kind, is refused, at the challenge and at
    /// activation.
    #[tokio::test]
    async fn review9_one_tpm_enrols_one_id_whatever_ak_it_presents() {
        let (_dir, store) = store().await;
        let first = store_pending(&store, &pending(EnrolmentKind::Host, "h1", 1, b"a"))
            .await
            .unwrap();
        // The same TPM (EK digest [1; 32]) with a second AK for host h2, and as instance vm-1.
        let mut second = pending(EnrolmentKind::Host, "h2", 2, b"b");
        second.ek_sha256 = [1; 32];
        let second = store_pending(&store, &second).await.unwrap();
        let mut third = pending(EnrolmentKind::Instance, "vm-1", 3, b"c");
        third.ek_sha256 = [1; 32];
        let third = store_pending(&store, &third).await.unwrap();
        activate(&store, &first, b"a", now()).await.unwrap();
        for (enrolment, answer, kind, id) in [
            (second, b"b", EnrolmentKind::Host, "h2"),
            (third, b"c", EnrolmentKind::Instance, "vm-1"),
        ] {
            let err = activate(&store, &enrolment, answer, now())
                .await
                .unwrap_err();
            assert!(
                matches!(err, EnrolmentError::EkConflict { .. })
                    && err.to_string().contains("enrolled as host h1"),
                "{id}: {err}"
            );
            assert!(pinned_ak(&store, kind, id).await.unwrap().is_none(), "{id}");
        }
        assert_eq!(
            ek_holder(&store, &[1; 32]).await.unwrap(),
            Some((EnrolmentKind::Host, "h1".to_owned()))
        );
        // The same TPM and AK for its own id again: the existing pin.
        let again = store_pending(&store, &pending(EnrolmentKind::Host, "h1", 1, b"d"))
            .await
            .unwrap();
        assert_eq!(
            activate(&store, &again, b"d", now()).await.unwrap().ak,
            ak(1)
        );
        // Another TPM taking a pinned id is refused, and does not keep a claim on that id.
        let mut intruder = pending(EnrolmentKind::Host, "h1", 5, b"e");
        intruder.ek_sha256 = [5; 32];
        let intruder = store_pending(&store, &intruder).await.unwrap();
        let err = activate(&store, &intruder, b"e", now()).await.unwrap_err();
        assert!(matches!(err, EnrolmentError::AkConflict { .. }), "{err}");
        assert_eq!(ek_holder(&store, &[5; 32]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn item2_enrolment_a_right_answer_pins_the_ak_once_and_only_once() {
        let (_dir, store) = store().await;
        let p = pending(EnrolmentKind::Host, "host-1", 1, b"the credential");
        let id = store_pending(&store, &p).await.unwrap();
        assert!(
            pinned_ak(&store, EnrolmentKind::Host, "host-1")
                .await
                .unwrap()
                .is_none()
        );
        let pin = activate(&store, &id, b"the credential", now())
            .await
            .unwrap();
        assert_eq!(pin.ak, ak(1));
        assert_eq!(pin.ak_name, [1; NAME_LEN]);
        let read = pinned_ak(&store, EnrolmentKind::Host, "host-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, pin);
        // The instance name space is separate.
        assert!(
            pinned_ak(&store, EnrolmentKind::Instance, "host-1")
                .await
                .unwrap()
                .is_none()
        );
        // Replayed: the pending record is gone.
        assert!(matches!(
            activate(&store, &id, b"the credential", now()).await,
            Err(EnrolmentError::Unknown { .. })
        ));
        // The store holds the digest, never the credential.
        let key = pin_key(EnrolmentKind::Host, "host-1").unwrap();
        let stored = store.get(&key).await.unwrap().unwrap().value;
        assert!(!String::from_utf8_lossy(&stored).contains(&hex::encode(b"the credential")));
    }

    #[tokio::test]
    async fn item2_enrolment_a_wrong_answer_is_refused_and_uses_the_enrolment_up() {
        let (_dir, store) = store().await;
        let p = pending(EnrolmentKind::Instance, "vm-1", 2, b"right");
        let id = store_pending(&store, &p).await.unwrap();
        assert!(matches!(
            activate(&store, &id, b"wrong", now()).await,
            Err(EnrolmentError::ActivationRefused { .. })
        ));
        assert!(matches!(
            activate(&store, &id, b"right", now()).await,
            Err(EnrolmentError::Unknown { .. })
        ));
        assert!(
            pinned_ak(&store, EnrolmentKind::Instance, "vm-1")
                .await
                .unwrap()
                .is_none()
        );
        // Answering the digest itself is no answer.
        let id = store_pending(&store, &p).await.unwrap();
        assert!(matches!(
            activate(&store, &id, &p.credential_sha256, now()).await,
            Err(EnrolmentError::ActivationRefused { .. })
        ));
    }

    #[tokio::test]
    async fn item2_enrolment_an_expired_enrolment_is_refused() {
        let (_dir, store) = store().await;
        let p = pending(EnrolmentKind::Host, "host-1", 1, b"c");
        let id = store_pending(&store, &p).await.unwrap();
        let late = now() + ENROLMENT_TTL + Duration::from_millis(1);
        assert!(matches!(
            activate(&store, &id, b"c", late).await,
            Err(EnrolmentError::Expired { late_ms: 1, .. })
        ));
        assert!(
            pinned_ak(&store, EnrolmentKind::Host, "host-1")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn item2_enrolment_an_id_pinned_to_another_ak_is_refused() {
        let (_dir, store) = store().await;
        let first = store_pending(&store, &pending(EnrolmentKind::Host, "h", 1, b"a"))
            .await
            .unwrap();
        let second = store_pending(&store, &pending(EnrolmentKind::Host, "h", 3, b"b"))
            .await
            .unwrap();
        let again = store_pending(&store, &pending(EnrolmentKind::Host, "h", 1, b"c"))
            .await
            .unwrap();
        let pin = activate(&store, &first, b"a", now()).await.unwrap();
        let err = activate(&store, &second, b"b", now()).await.unwrap_err();
        assert!(
            matches!(&err, EnrolmentError::AkConflict { pinned, .. } if *pinned == hex::encode([1; NAME_LEN])),
            "{err}"
        );
        // The same AK again keeps the first pin.
        let kept = activate(&store, &again, b"c", now()).await.unwrap();
        assert_eq!(kept, pin);
        assert_eq!(
            pinned_ak(&store, EnrolmentKind::Host, "h")
                .await
                .unwrap()
                .unwrap()
                .ak,
            ak(1)
        );
    }

    #[tokio::test]
    async fn begin_checks_the_ek_certificate_and_keeps_no_credential() {
        let (_dir, store) = store().await;
        let bundle = CaBundle::from_pem(&[ROOT, ISSUER].concat()).unwrap();
        // The attest crate's unit test shape of an AK is private; a decrypt key's public area
        // is refused for its attributes, after the EK certificate passed.
        let request = EnrolmentRequest {
            kind: EnrolmentKind::Host,
            id: "host-1".to_owned(),
            ek_certificate: EK.to_vec(),
            ak_public: vec![0; 10],
        };
        let err = begin(&store, &bundle, &request, now()).await.unwrap_err();
        assert!(
            err.to_string().starts_with("host host-1: attestation key"),
            "{err}"
        );
        let only_root = CaBundle::from_pem(ROOT).unwrap();
        let err = begin(&store, &only_root, &request, now())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("EK certificate"), "{err}");
        let bad_id = EnrolmentRequest {
            id: "Host 1".to_owned(),
            ..request
        };
        assert!(matches!(
            begin(&store, &bundle, &bad_id, now()).await,
            Err(EnrolmentError::Name(_))
        ));
        // Nothing was stored by any of them.
        let prefix = KeyPrefix::new("").unwrap();
        assert!(
            store
                .list(&prefix, None, 10)
                .await
                .unwrap()
                .entries
                .is_empty()
        );
    }

    #[tokio::test]
    async fn expired_enrolments_are_swept_and_records_parse_strictly() {
        let (_dir, store) = store().await;
        let mut old = pending(EnrolmentKind::Host, "h", 1, b"a");
        old.expires_at_ms = unix_ms(now()).unwrap() - 1;
        let old_id = store_pending(&store, &old).await.unwrap();
        let fresh_id = store_pending(&store, &pending(EnrolmentKind::Host, "h", 1, b"b"))
            .await
            .unwrap();
        sweep_expired(&store, now()).await;
        assert!(store.get(&old_id.key().unwrap()).await.unwrap().is_none());
        assert!(store.get(&fresh_id.key().unwrap()).await.unwrap().is_some());

        let key = pin_key(EnrolmentKind::Host, "h").unwrap();
        let good = encode_pin(&PinnedAk {
            kind: EnrolmentKind::Host,
            id: "h".to_owned(),
            ak: ak(1),
            ak_name: [1; NAME_LEN],
            ek_root: "CN=r".to_owned(),
            enrolled_at_ms: 1,
        })
        .unwrap();
        assert!(decode_pin(&key, &good).is_ok());
        let text = String::from_utf8(good).unwrap();
        for (bytes, expected) in [
            (
                text.replace(r#""version":1"#, r#""version":2"#),
                "version 2",
            ),
            (text.replace(r#""kind":"host""#, r#""kind":"vm""#), "kind"),
            (text.replace(r#""id":"h""#, r#""id":"g""#), "holds the pin"),
            (
                text.replace(r#""ek_root""#, r#""extra":1,"ek_root""#),
                "unknown field",
            ),
            (text.replace(r#""ak":"04"#, r#""ak":"05"#), "ak is not"),
            ("[]".to_owned(), "not a pinned AK"),
        ] {
            let err = decode_pin(&key, bytes.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        assert_eq!(parse_ek_kind("ecc-p384"), Some(EkKind::EccP384));
        assert_eq!(
            parse_ek_kind(ek_kind_name(EkKind::Rsa2048)),
            Some(EkKind::Rsa2048)
        );
        assert_eq!(parse_ek_kind("rsa"), None);
        assert!(EnrolmentId::from_hex(&"ab".repeat(32)).is_some());
        assert!(EnrolmentId::from_hex(&"ab".repeat(31)).is_none());
        assert!(EnrolmentId::from_hex(&"zz".repeat(32)).is_none());
    }
}
