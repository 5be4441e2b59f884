//! The shard host endpoints: a registration challenge, a host's registration (wiring
//! [`crate::registry::HostRegistry::challenge`] and
//! [`crate::registry::HostRegistry::register`]) and the host listing.
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `POST /v1/hosts/challenge` | `{}` or empty | 200 `{"nonce": "<64 hex>", "expires_in_ms": N}`: certify the decrypt key over it |
//! | `PUT /v1/hosts/{id}` | [`HostRegistrationRequest`] | 201 (new) or 200 (registered again) [`HostRegistered`]; or the refusal |
//! | `GET /v1/hosts` | none | 200 [`HostList`]: the fresh hosts and those left out with the reason |
//!
//! Byte strings in the registration are lowercase or uppercase hex. A registration is refused,
//! and nothing is stored, when its AK is not the one enrolled for the host id (403
//! `not_enrolled`, see [`super::enrolment`]), its certification does not verify (403 `certification_refused`),
//! its challenge is unknown, used or expired (403 `nonce_refused`), the id is held by another
//! attestation key or the TPM by another id (409 `host_conflict`), or another registration of
//! the id won a race (409 `conflict`). With the operator's host list (`keyshard cms --hosts`,
//! [`crate::admission`]), an id it does not list, or a registration in another region or
//! operator than listed or heavier than its `max_weight`, is refused first (403 `forbidden`).

use std::num::NonZeroU32;
use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keyshard_attest::tpm::{AkPublic, Certification, PcrValues};
use keyshard_shards::map::Endpoint;
use keyshard_shards::{DomainName, FailureDomain, HostId};
use serde::{Deserialize, Serialize};

use super::api::{AppState, NonceResponse};
use super::error::ApiError;
use super::request::ApiJson;
use crate::enrolment::{self, EnrolmentKind};
use crate::registry::{self, CHALLENGE_TTL, HostRegistration, RegistryError};
use crate::store::{Nonce, Repository, StoreError};

/// `PUT /v1/hosts/{id}`: what a shard host presents (the id is the path's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRegistrationRequest {
    /// The failure domain's region and operator (`a-z 0-9 . _ -`, 1..=64).
    pub region: String,
    pub operator: String,
    /// Where the host answers, e.g. `https://10.0.0.5:8443`.
    pub endpoint: String,
    /// Placement weight, 1..=2^32-1.
    pub weight: u32,
    /// The attestation key's public key, uncompressed SEC1 P-256 (65 bytes), hex.
    pub ak: String,
    /// The golden PCR values (`keyshard_attest::tpm::PcrValues` record), hex.
    pub golden_pcrs: String,
    /// The decrypt key's marshalled TPMT_PUBLIC, hex.
    pub decrypt_key_public: String,
    /// TPM2_Certify's TPMS_ATTEST, hex.
    pub certify_attest: String,
    /// TPM2_Certify's ECDSA signature r || s (64 bytes), hex.
    pub certify_signature: String,
    /// The challenge from `POST /v1/hosts/challenge` (64 hex digits).
    pub nonce: String,
}

impl HostRegistrationRequest {
    /// The request body that presents `registration` (its id goes in the path).
    pub fn from_registration(registration: &HostRegistration) -> Self {
        Self {
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
        }
    }

    /// The registration of host `id`, every field parsed into its type; the first field that
    /// does not parse is named in a 422 `invalid_request`.
    pub fn into_registration(self, id: &str) -> Result<HostRegistration, ApiError> {
        let id = HostId::new(id).map_err(|e| invalid(format!("host id: {e}")))?;
        let domain = FailureDomain {
            region: DomainName::new(self.region).map_err(|e| invalid(format!("region: {e}")))?,
            operator: DomainName::new(self.operator)
                .map_err(|e| invalid(format!("operator: {e}")))?,
        };
        let endpoint =
            Endpoint::new(self.endpoint).map_err(|e| invalid(format!("endpoint: {e}")))?;
        let weight =
            NonZeroU32::new(self.weight).ok_or_else(|| invalid("weight: must be 1 or more"))?;
        let ak = AkPublic::from_sec1(&unhex("ak", &self.ak)?)
            .map_err(|e| invalid(format!("ak: {e}")))?;
        let golden_pcrs = PcrValues::parse(&unhex("golden_pcrs", &self.golden_pcrs)?)
            .map_err(|e| invalid(format!("golden_pcrs: {e}")))?;
        let signature: [u8; 64] = unhex("certify_signature", &self.certify_signature)?
            .try_into()
            .map_err(|_| invalid("certify_signature: must be 64 bytes"))?;
        let nonce = Nonce::from_hex(&self.nonce).map_err(|e| invalid(format!("nonce: {e}")))?;
        Ok(HostRegistration {
            id,
            domain,
            endpoint,
            weight,
            ak,
            golden_pcrs,
            decrypt_key_public: unhex("decrypt_key_public", &self.decrypt_key_public)?,
            certification: Certification {
                attest: unhex("certify_attest", &self.certify_attest)?,
                signature,
            },
            nonce,
        })
    }
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRegistered {
    pub id: String,
    pub region: String,
    pub operator: String,
    /// The certified decrypt key's TPM name, hex: what shard maps carry.
    pub key_name: String,
    pub registered_at_ms: u64,
    /// The record's store revision.
    pub revision: u64,
}

/// `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostList {
    /// The hosts placement may use now, in id order.
    pub hosts: Vec<HostSummary>,
    /// The records left out, with the reason (stale, in the future, invalid).
    pub excluded: Vec<ExcludedHost>,
}

/// One fresh host: public facts only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSummary {
    pub id: String,
    pub region: String,
    pub operator: String,
    pub endpoint: String,
    pub weight: u32,
    /// The certified decrypt key's TPM name, hex.
    pub key_name: String,
    pub registered_at_ms: u64,
}

/// A host record placement does not use, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExcludedHost {
    /// The store key (`hosts/<id>`).
    pub key: String,
    pub reason: String,
}

/// `POST /v1/hosts/challenge`: a single-use nonce, rate-limited with the other nonces. The body
/// must be empty or `{}`.
pub(super) async fn challenge(
    State(state): State<AppState>,
    ApiJson(_empty): ApiJson<EmptyRequest>,
) -> Result<axum::Json<NonceResponse>, ApiError> {
    if !state.nonce_rate.take() {
        return Err(ApiError::RateLimited { what: "nonces" });
    }
    let nonce = state
        .registry
        .challenge(&*state.store)
        .await
        .map_err(registry_error)?;
    Ok(axum::Json(NonceResponse {
        nonce: nonce.to_hex(),
        expires_in_ms: u64::try_from(CHALLENGE_TTL.as_millis()).unwrap_or(u64::MAX),
    }))
}

/// A request with no fields: `{}` or an empty body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// `PUT /v1/hosts/{id}`.
pub(super) async fn register(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<HostRegistrationRequest>,
) -> Result<(StatusCode, axum::Json<HostRegistered>), ApiError> {
    let id = path_segment(id)?;
    let registration = request.into_registration(&id)?;
    if let Some(admission) = &state.admission {
        admission
            .check_registration(&registration.id, &registration.domain, registration.weight)
            .map_err(|e| ApiError::Forbidden {
                reason: e.to_string(),
            })?;
    }
    check_enrolled(&state, &registration).await?;
    let key = registry::host_key(&registration.id).map_err(registry_error)?;
    let existed = state
        .store
        .get(&key)
        .await
        .map_err(|e| registry_error(e.into()))?
        .is_some();
    let host = state
        .registry
        .register(&*state.store, registration, SystemTime::now())
        .await
        .map_err(registry_error)?;
    let key_name = host.key_name().map_err(|e| {
        log::error!("host {}: its key name: {e}", host.id());
        ApiError::Internal
    })?;
    let domain = &host.registration().domain;
    let answer = HostRegistered {
        id: host.id().to_string(),
        region: domain.region.to_string(),
        operator: domain.operator.to_string(),
        key_name: hex::encode(key_name.as_bytes()),
        registered_at_ms: host.registered_at_ms(),
        revision: host.revision().get(),
    };
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(answer)))
}

/// Refuses a registration whose AK is not the one pinned to the host id by enrolment
/// (403 `not_enrolled`): only an AK proven to sit in a genuine TPM registers a host.
async fn check_enrolled(state: &AppState, registration: &HostRegistration) -> Result<(), ApiError> {
    let id = registration.id.as_str();
    let pinned = enrolment::pinned_ak(&*state.store, EnrolmentKind::Host, id)
        .await
        .map_err(super::enrolment::enrolment_error)?;
    match pinned {
        Some(pin) if pin.ak == registration.ak => Ok(()),
        Some(_) => Err(ApiError::NotEnrolled {
            reason: format!(
                "host {id}: the registration's attestation key is not the one enrolled for this \
                 id"
            ),
        }),
        None => Err(ApiError::NotEnrolled {
            reason: format!("host {id} is not enrolled: enrol its TPM's attestation key first"),
        }),
    }
}

/// `GET /v1/hosts`.
pub(super) async fn list(State(state): State<AppState>) -> Result<axum::Json<HostList>, ApiError> {
    let listing = state
        .registry
        .fresh_hosts(&*state.store, SystemTime::now())
        .await
        .map_err(registry_error)?;
    let mut hosts = Vec::with_capacity(listing.fresh.len());
    for host in &listing.fresh {
        let registration = host.registration();
        let key_name = host.key_name().map_err(|e| {
            log::error!("host {}: its key name: {e}", host.id());
            ApiError::Internal
        })?;
        hosts.push(HostSummary {
            id: host.id().to_string(),
            region: registration.domain.region.to_string(),
            operator: registration.domain.operator.to_string(),
            endpoint: registration.endpoint.as_str().to_owned(),
            weight: registration.weight.get(),
            key_name: hex::encode(key_name.as_bytes()),
            registered_at_ms: host.registered_at_ms(),
        });
    }
    let excluded = listing
        .excluded
        .iter()
        .map(|(key, reason)| ExcludedHost {
            key: key.clone(),
            reason: reason.to_string(),
        })
        .collect();
    Ok(axum::Json(HostList { hosts, excluded }))
}

/// The registry's refusals as API errors (module documentation).
pub(super) fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::Store(e) => store_error(e),
        RegistryError::Certification { host, source } => ApiError::CertificationRefused {
            reason: format!("host {host}: {source}"),
        },
        RegistryError::Nonce { host, source } => match source {
            StoreError::NonceUnknown | StoreError::NonceExpired { .. } => ApiError::NonceRefused {
                reason: format!("host {host}: {source}"),
            },
            other => store_error(other),
        },
        e @ (RegistryError::AkChanged { .. } | RegistryError::TpmTaken { .. }) => {
            ApiError::HostConflict {
                reason: e.to_string(),
            }
        }
        e @ RegistryError::Conflict { .. } => ApiError::Conflict {
            reason: e.to_string(),
        },
        e @ (RegistryError::Record { .. } | RegistryError::Clock) => {
            log::error!("{e}");
            ApiError::Internal
        }
    }
}

/// A store failure as an API error: a key or value the request made invalid is the request's
/// fault, the rest the store's.
pub(crate) fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::ValueTooLarge { len, max } => ApiError::InvalidRequest {
            reason: format!("the record would be {len} bytes, over the store's limit of {max}"),
        },
        StoreError::InvalidKey { reason, .. } => ApiError::InvalidRequest {
            reason: format!("the name makes an invalid store key: {reason}"),
        },
        other => {
            log::error!("store: {other}");
            ApiError::StoreUnavailable
        }
    }
}

/// A path parameter, or a 422 when it does not decode (not UTF-8).
pub(crate) fn path_segment(
    segment: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    segment.map(|Path(value)| value).map_err(|rejection| {
        invalid(format!(
            "the path: {}",
            rejection.body_text().chars().take(100).collect::<String>()
        ))
    })
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    hex::decode(text).map_err(|_| invalid(format!("{field}: not hex")))
}

pub(crate) fn invalid(reason: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        reason: reason.into(),
    }
}
