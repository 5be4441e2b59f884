//! The API's error model: every refusal is one [`ApiError`], sent as JSON
//! `{"error": {"code": "...", "message": "..."}}` with its HTTP status; and the server's own
//! errors ([`ServerError`]: TLS files, binding, the store) that stop it from starting.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why a request was refused. The message never holds a secret: request values are not echoed
/// (see [`super::request`]), and store failures say only that the store failed (the log has the
/// details).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no such resource: {path}")]
    NotFound { path: String },
    #[error("API version {version} is not served; this server serves /v1/")]
    UnsupportedVersion { version: String },
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: String },
    #[error("the body must be JSON (Content-Type: application/json), not {content_type}")]
    UnsupportedMediaType { content_type: String },
    #[error("the body is larger than the limit of {max} bytes")]
    BodyTooLarge { max: usize },
    #[error("the body could not be read: {reason}")]
    BodyUnreadable { reason: String },
    #[error("malformed JSON: {reason}")]
    MalformedJson { reason: String },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("the certification is refused: {reason}")]
    CertificationRefused { reason: String },
    #[error("the nonce is refused: {reason}")]
    NonceRefused { reason: String },
    #[error("{reason}")]
    HostConflict { reason: String },
    #[error("{reason}")]
    Conflict { reason: String },
    #[error("{reason}")]
    Exists { reason: String },
    #[error("placement refused: {reason}")]
    PlacementRefused { reason: String },
    #[error("{reason}")]
    Forbidden { reason: String },
    #[error("the grant is refused: {reason}")]
    GrantRefused { reason: String },
    #[error("enrolment is disabled: the CMS was started without --ek-ca")]
    EnrolmentDisabled,
    #[error("the enrolment is refused: {reason}")]
    EnrolmentRefused { reason: String },
    #[error("the activation is refused: {reason}")]
    ActivationRefused { reason: String },
    #[error("{reason}")]
    AkConflict { reason: String },
    #[error("{reason}")]
    NotEnrolled { reason: String },
    #[error("the evidence is refused: {reason}")]
    EvidenceRefused { reason: String },
    #[error("too many requests for {what}; retry in a second")]
    RateLimited { what: &'static str },
    #[error("the request took longer than {ms} ms")]
    Timeout { ms: u128 },
    #[error("the store is unavailable; retry later")]
    StoreUnavailable,
    #[error("the TPM did not answer; retry later")]
    TpmUnavailable,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The stable, machine-readable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyUnreadable { .. } => "body_unreadable",
            Self::MalformedJson { .. } => "malformed_json",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::CertificationRefused { .. } => "certification_refused",
            Self::NonceRefused { .. } => "nonce_refused",
            Self::HostConflict { .. } => "host_conflict",
            Self::Conflict { .. } => "conflict",
            Self::Exists { .. } => "exists",
            Self::PlacementRefused { .. } => "placement_refused",
            Self::Forbidden { .. } => "forbidden",
            Self::GrantRefused { .. } => "grant_refused",
            Self::EnrolmentDisabled => "enrolment_disabled",
            Self::EnrolmentRefused { .. } => "enrolment_refused",
            Self::ActivationRefused { .. } => "activation_refused",
            Self::AkConflict { .. } => "ak_conflict",
            Self::NotEnrolled { .. } => "not_enrolled",
            Self::EvidenceRefused { .. } => "evidence_refused",
            Self::RateLimited { .. } => "rate_limited",
            Self::Timeout { .. } => "timeout",
            Self::StoreUnavailable => "store_unavailable",
            Self::TpmUnavailable => "tpm_unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status sent with it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } | Self::UnsupportedVersion { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyUnreadable { .. } | Self::MalformedJson { .. } => StatusCode::BAD_REQUEST,
            Self::InvalidRequest { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::CertificationRefused { .. }
            | Self::NonceRefused { .. }
            | Self::Forbidden { .. }
            | Self::GrantRefused { .. }
            | Self::EnrolmentRefused { .. }
            | Self::ActivationRefused { .. }
            | Self::NotEnrolled { .. }
            | Self::EvidenceRefused { .. } => StatusCode::FORBIDDEN,
            Self::HostConflict { .. }
            | Self::AkConflict { .. }
            | Self::Conflict { .. }
            | Self::Exists { .. }
            | Self::PlacementRefused { .. } => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout { .. }
            | Self::StoreUnavailable
            | Self::TpmUnavailable
            | Self::EnrolmentDisabled => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `{"error": {"code": ..., "message": ...}}`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code and a one-line message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            log::warn!("answered {}: {self}", status.as_u16());
        } else {
            log::debug!("refused {}: {}", status.as_u16(), self.code());
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Self::RateLimited { .. } = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// What stops the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} must be {min}..={max}, not {value}")]
    Limit {
        what: &'static str,
        value: String,
        min: String,
        max: String,
    },
}

/// Result of starting the server.
pub type Result<T> = std::result::Result<T, ServerError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_one_line_with_its_code_and_status() {
        let errors = [
            ApiError::NotFound { path: "/x".into() },
            ApiError::UnsupportedVersion {
                version: "v2".into(),
            },
            ApiError::MethodNotAllowed {
                method: "PUT".into(),
            },
            ApiError::UnsupportedMediaType {
                content_type: "text/plain".into(),
            },
            ApiError::BodyTooLarge { max: 10 },
            ApiError::BodyUnreadable { reason: "x".into() },
            ApiError::MalformedJson { reason: "x".into() },
            ApiError::InvalidRequest { reason: "x".into() },
            ApiError::CertificationRefused { reason: "x".into() },
            ApiError::NonceRefused { reason: "x".into() },
            ApiError::HostConflict { reason: "x".into() },
            ApiError::Conflict { reason: "x".into() },
            ApiError::Exists { reason: "x".into() },
            ApiError::PlacementRefused { reason: "x".into() },
            ApiError::Forbidden { reason: "x".into() },
            ApiError::GrantRefused { reason: "x".into() },
            ApiError::EnrolmentDisabled,
            ApiError::EnrolmentRefused { reason: "x".into() },
            ApiError::ActivationRefused { reason: "x".into() },
            ApiError::AkConflict { reason: "x".into() },
            ApiError::NotEnrolled { reason: "x".into() },
            ApiError::EvidenceRefused { reason: "x".into() },
            ApiError::RateLimited { what: "nonces" },
            ApiError::Timeout { ms: 5 },
            ApiError::StoreUnavailable,
            ApiError::TpmUnavailable,
            ApiError::Internal,
        ];
        let mut codes = std::collections::HashSet::new();
        for error in errors {
            let body = error.body();
            assert_eq!(body.error.code, error.code());
            assert!(!body.error.message.contains('\n'), "{error:?}");
            assert!(error.status().is_client_error() || error.status().is_server_error());
            assert!(codes.insert(error.code()), "code {} twice", error.code());
        }
    }
}
