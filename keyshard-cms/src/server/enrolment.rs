//! The enrolment endpoints: an attestation key proven to sit in a genuine TPM (wiring
//! [`crate::enrolment::begin`] and [`crate::enrolment::activate`]).
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `POST /v1/enrolments` | [`EnrolmentBody`] | 201 [`EnrolmentChallenge`]: run TPM2_ActivateCredential on it |
//! | `POST /v1/enrolments/{enrolment}/activate` | [`ActivationBody`] | 200 [`Enrolled`]: the AK is pinned to the id |
//!
//! Refusals: without `--ek-ca` both answer 503 `enrolment_disabled`; an EK certificate that
//! does not chain to the bundle or an AK of the wrong shape is 403 `enrolment_refused`, and so
//! is an enrolment that is unknown, answered already or expired; a wrong activation answer is
//! 403 `activation_refused` (the enrolment is used up); an id pinned to another AK is 409
//! `ak_conflict`, at either step. Beginning an enrolment takes a token of the nonce rate limit
//! (429 `rate_limited`): it writes a record to the store.

use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::api::AppState;
use super::error::ApiError;
use super::hosts::{invalid, path_segment, store_error};
use super::request::ApiJson;
use crate::enrolment::{
    self, EnrolmentError, EnrolmentId, EnrolmentKind, EnrolmentRequest, ek_kind_name,
};

/// `POST /v1/enrolments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentBody {
    /// `host` or `instance`.
    pub kind: String,
    /// The host or instance id (`a-z 0-9 . _ -`, 1..=64).
    pub id: String,
    /// The EK certificate, DER, hex.
    pub ek_certificate: String,
    /// The AK's marshalled TPMT_PUBLIC, hex.
    pub ak_public: String,
}

impl EnrolmentBody {
    /// Every field parsed into its type; the first that does not parse is named in a 422.
    pub fn into_request(self) -> Result<EnrolmentRequest, ApiError> {
        let kind: EnrolmentKind = self
            .kind
            .parse()
            .map_err(|_| invalid("kind: must be host or instance"))?;
        enrolment::check_id(kind, &self.id).map_err(|e| invalid(e.to_string()))?;
        let ek_certificate =
            hex::decode(&self.ek_certificate).map_err(|_| invalid("ek_certificate: not hex"))?;
        let ak_public = hex::decode(&self.ak_public).map_err(|_| invalid("ak_public: not hex"))?;
        Ok(EnrolmentRequest {
            kind,
            id: self.id,
            ek_certificate,
            ak_public,
        })
    }
}

/// The answer to `POST /v1/enrolments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentChallenge {
    /// The enrolment's id, 64 hex digits: the activation's path.
    pub enrolment: String,
    /// Which EK the credential is made to: `rsa2048`, `ecc-p256` or `ecc-p384`.
    pub ek: String,
    /// TPM2B_ID_OBJECT's contents (the credential blob), hex.
    pub id_object: String,
    /// TPM2B_ENCRYPTED_SECRET's contents (the seed encrypted to the EK), hex.
    pub encrypted_secret: String,
    /// How long from now it may be activated.
    pub expires_in_ms: u64,
}

/// `POST /v1/enrolments/{enrolment}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationBody {
    /// What TPM2_ActivateCredential returned, hex.
    pub credential: String,
}

/// The answer to an activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    pub kind: String,
    pub id: String,
    /// The pinned AK's TPM name, hex.
    pub ak_name: String,
}

/// `POST /v1/enrolments`.
pub(super) async fn begin(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EnrolmentBody>,
) -> Result<(StatusCode, axum::Json<EnrolmentChallenge>), ApiError> {
    let bundle = state.ek_ca.clone().ok_or(ApiError::EnrolmentDisabled)?;
    let request = body.into_request()?;
    if !state.nonce_rate.take() {
        return Err(ApiError::RateLimited { what: "enrolments" });
    }
    let begun = enrolment::begin_admitted(
        &*state.store,
        &bundle,
        &request,
        SystemTime::now(),
        state.admission.as_deref(),
    )
    .await
    .map_err(enrolment_error)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(EnrolmentChallenge {
            enrolment: begun.enrolment.to_hex(),
            ek: ek_kind_name(begun.made.ek).to_owned(),
            id_object: hex::encode(&begun.made.id_object),
            encrypted_secret: hex::encode(&begun.made.encrypted_secret),
            expires_in_ms: u64::try_from(begun.expires_in.as_millis()).unwrap_or(u64::MAX),
        }),
    ))
}

/// `POST /v1/enrolments/{enrolment}/activate`.
pub(super) async fn activate(
    State(state): State<AppState>,
    enrolment: Result<Path<String>, PathRejection>,
    ApiJson(body): ApiJson<ActivationBody>,
) -> Result<axum::Json<Enrolled>, ApiError> {
    if state.ek_ca.is_none() {
        return Err(ApiError::EnrolmentDisabled);
    }
    let enrolment = path_segment(enrolment)?;
    let enrolment = EnrolmentId::from_hex(&enrolment)
        .ok_or_else(|| invalid("the enrolment id: not 64 hex digits"))?;
    let credential = Zeroizing::new(
        hex::decode(body.credential.as_bytes()).map_err(|_| invalid("credential: not hex"))?,
    );
    let pin = enrolment::activate(&*state.store, &enrolment, &credential, SystemTime::now())
        .await
        .map_err(enrolment_error)?;
    Ok(axum::Json(Enrolled {
        kind: pin.kind.as_str().to_owned(),
        id: pin.id,
        ak_name: hex::encode(pin.ak_name),
    }))
}

/// The longest refusal reason sent, in characters: an EK certificate's names (which the
/// attester chose) appear in some.
pub const MAX_REASON_CHARS: usize = 300;

/// `text` as one line of at most [`MAX_REASON_CHARS`] characters.
fn bounded(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect()
}

/// Enrolment refusals as API errors (module documentation).
pub(super) fn enrolment_error(error: EnrolmentError) -> ApiError {
    match error {
        EnrolmentError::Store(e) => store_error(e),
        e @ (EnrolmentError::Challenge { .. }
        | EnrolmentError::Unknown { .. }
        | EnrolmentError::Expired { .. }) => ApiError::EnrolmentRefused {
            reason: bounded(&e.to_string()),
        },
        e @ EnrolmentError::ActivationRefused { .. } => ApiError::ActivationRefused {
            reason: e.to_string(),
        },
        e @ (EnrolmentError::AkConflict { .. } | EnrolmentError::EkConflict { .. }) => {
            ApiError::AkConflict {
                reason: e.to_string(),
            }
        }
        e @ EnrolmentError::NotAdmitted(_) => ApiError::Forbidden {
            reason: e.to_string(),
        },
        EnrolmentError::Name(e) => invalid(e.to_string()),
        e @ (EnrolmentError::Record { .. } | EnrolmentError::Random | EnrolmentError::Clock) => {
            log::error!("{e}");
            ApiError::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use keyshard_attest::tpm::ek_cert::EkCertError;
    use keyshard_attest::tpm::enrol::EnrolError;

    use super::*;

    #[test]
    fn a_refusal_naming_the_attesters_certificate_is_one_bounded_line() {
        let error = EnrolmentError::Challenge {
            kind: EnrolmentKind::Host,
            id: "h".to_owned(),
            source: EnrolError::EkCertificate(EkCertError::Untrusted {
                subject: format!("CN=a\nforged: line{}", "x".repeat(5000)),
                issuer: "CN=b".to_owned(),
            }),
        };
        let api = enrolment_error(error);
        assert_eq!(api.code(), "enrolment_refused");
        let message = api.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.chars().count() < MAX_REASON_CHARS + 64, "{message}");
        assert!(message.contains("host h: EK certificate"), "{message}");
    }
}
