//! The compute instance endpoints: a challenge, an instance's registration (its golden PCR
//! values, quoted by its pinned AK) and its record (wiring [`crate::instances`]).
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `POST /v1/instances/{id}/challenge` | `{}` or empty | 200 [`InstanceChallengeResponse`]: quote `pcrs` over `nonce` |
//! | `PUT /v1/instances/{id}` | [`InstanceRegistrationBody`] | 201 (new) or 200 (registered again) [`InstanceRegistered`] |
//! | `GET /v1/instances/{id}` | none | 200 [`InstanceSummary`], or 404 `not_found` |
//!
//! A registration is refused, and nothing is stored, when the id has no pinned AK (403
//! `not_enrolled`), its nonce is unknown, used or expired (403 `nonce_refused`), or the quote
//! does not verify against the pinned AK, the nonce and the golden values (403
//! `evidence_refused`, naming the step: signature, nonce, selection or PCR digest). Challenges
//! take a token of the nonce rate limit (429 `rate_limited`).

use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keyshard_attest::tpm::PcrValues;
use serde::{Deserialize, Serialize};

use super::api::AppState;
use super::enrolment::enrolment_error;
use super::error::ApiError;
use super::hosts::{EmptyRequest, invalid, path_segment, store_error};
use super::request::ApiJson;
use crate::instances::{self, InstanceError, InstanceId, InstanceRegistration, quote_from_wire};
use crate::store::{Nonce, StoreError};

/// The answer to `POST /v1/instances/{id}/challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceChallengeResponse {
    /// 32 random bytes, 64 hex digits: the quote's qualifying data (for a registration), or
    /// bound into it (for a fetch, `keyshard_shards::instance::qualifying_data`).
    pub nonce: String,
    /// The PCRs to quote, e.g. `sha256:0,7`.
    pub pcrs: String,
    pub expires_in_ms: u64,
}

/// `PUT /v1/instances/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRegistrationBody {
    /// The golden PCR values (`keyshard_attest::tpm::PcrValues` record), hex.
    pub golden_pcrs: String,
    /// The challenge's nonce, 64 hex digits.
    pub nonce: String,
    /// TPM2_Quote over the golden selection with the nonce as qualifying data, in the quote
    /// wire format of [`crate::instances`] (TPMS_ATTEST || r || s), hex.
    pub quote: String,
}

impl InstanceRegistrationBody {
    /// The registration of instance `id`, every field parsed; the first that does not parse
    /// is named in a 422.
    pub fn into_registration(self, id: &str) -> Result<InstanceRegistration, ApiError> {
        let id = instance_id(id)?;
        let golden = hex::decode(&self.golden_pcrs)
            .map_err(|_| invalid("golden_pcrs: not hex"))
            .and_then(|bytes| {
                PcrValues::parse(&bytes).map_err(|e| invalid(format!("golden_pcrs: {e}")))
            })?;
        let nonce = Nonce::from_hex(&self.nonce).map_err(|e| invalid(format!("nonce: {e}")))?;
        let quote = hex::decode(&self.quote)
            .map_err(|_| invalid("quote: not hex"))
            .and_then(|bytes| {
                quote_from_wire(&bytes).map_err(|e| invalid(format!("quote: {e}")))
            })?;
        Ok(InstanceRegistration {
            id,
            golden,
            nonce,
            quote,
        })
    }
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRegistered {
    pub id: String,
    /// The pinned AK's TPM name, hex: what `--instance-policy` pins.
    pub ak_name: String,
}

/// `GET /v1/instances/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSummary {
    pub id: String,
    pub ak_name: String,
    /// The golden selection, e.g. `sha256:0,7`.
    pub pcrs: String,
}

/// `POST /v1/instances/{id}/challenge`.
pub(super) async fn challenge(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(_empty): ApiJson<EmptyRequest>,
) -> Result<axum::Json<InstanceChallengeResponse>, ApiError> {
    let id = instance_id(&path_segment(id)?)?;
    if !state.nonce_rate.take() {
        return Err(ApiError::RateLimited { what: "nonces" });
    }
    let challenge = instances::challenge(&*state.store, &id)
        .await
        .map_err(instance_error)?;
    Ok(axum::Json(InstanceChallengeResponse {
        nonce: challenge.nonce.to_hex(),
        pcrs: challenge.pcrs.to_string(),
        expires_in_ms: u64::try_from(challenge.expires_in.as_millis()).unwrap_or(u64::MAX),
    }))
}

/// `PUT /v1/instances/{id}`.
pub(super) async fn register(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(body): ApiJson<InstanceRegistrationBody>,
) -> Result<(StatusCode, axum::Json<InstanceRegistered>), ApiError> {
    let registration = body.into_registration(&path_segment(id)?)?;
    let (record, created) = instances::register(&*state.store, registration, SystemTime::now())
        .await
        .map_err(instance_error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(InstanceRegistered {
            id: record.id.to_string(),
            ak_name: hex::encode(record.ak_name),
        }),
    ))
}

/// `GET /v1/instances/{id}`.
pub(super) async fn get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<InstanceSummary>, ApiError> {
    let id = instance_id(&path_segment(id)?)?;
    let record = instances::get_instance(&*state.store, &id)
        .await
        .map_err(instance_error)?
        .ok_or_else(|| ApiError::NotFound {
            path: format!("/v1/instances/{id}"),
        })?;
    Ok(axum::Json(InstanceSummary {
        id: record.id.to_string(),
        ak_name: hex::encode(record.ak_name),
        pcrs: record.golden.selection().to_string(),
    }))
}

fn instance_id(id: &str) -> Result<InstanceId, ApiError> {
    InstanceId::new(id).map_err(|e| invalid(e.to_string()))
}

/// Instance refusals as API errors (module documentation).
pub(super) fn instance_error(error: InstanceError) -> ApiError {
    match error {
        InstanceError::Store(e) => store_error(e),
        InstanceError::Enrolment(e) => enrolment_error(e),
        e @ InstanceError::NotEnrolled { .. } => ApiError::NotEnrolled {
            reason: e.to_string(),
        },
        InstanceError::Nonce { id, source } => match source {
            StoreError::NonceUnknown | StoreError::NonceExpired { .. } => ApiError::NonceRefused {
                reason: format!("instance {id}: {source}"),
            },
            other => store_error(other),
        },
        InstanceError::Quote { id, source } => ApiError::EvidenceRefused {
            reason: format!("instance {id}: {source}"),
        },
        e @ (InstanceError::Conflict { .. } | InstanceError::GoldenChanged { .. }) => {
            ApiError::Conflict {
                reason: e.to_string(),
            }
        }
        InstanceError::QuoteFormat { reason } => invalid(format!("quote: {reason}")),
        e @ (InstanceError::Record { .. } | InstanceError::Pcrs(_) | InstanceError::Clock) => {
            log::error!("{e}");
            ApiError::Internal
        }
    }
}
