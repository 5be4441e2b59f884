//! The `/v1/` API: the router, its handlers and the layers every request goes through (body limit,
//! deadline, panic guard, JSON answers for unknown paths, versions and methods).
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `GET /v1/status` | none | 200 `{"version": "0.1.0", "store": "redb"}` (`store`: `redb` or `etcd`) |
//! | `POST /v1/nonces` | `{}` or empty; optional `"ttl_ms": N` (1..= the server's nonce lifetime) | 200 `{"nonce": "<64 hex digits>", "expires_in_ms": N}` |
//!
//! | `POST /v1/hosts/challenge`, `PUT /v1/hosts/{id}`, `GET /v1/hosts` | see [`super::hosts`] | |
//! | `POST /v1/credentials/{name}`, `GET /v1/credentials/{name}/map` | see [`super::credentials`] | |
//! | `POST /v1/credentials/{name}/fetch` | see [`super::fetch`] | |
//! | `POST /v1/volumes/{key id}/host-shares` | see [`super::volumes`] | |
//! | `POST /v1/enrolments`, `POST /v1/enrolments/{enrolment}/activate` | see [`super::enrolment`] | |
//! | `POST /v1/instances/{id}/challenge`, `PUT /v1/instances/{id}`, `GET /v1/instances/{id}` | see [`super::instances`] | |
//!
//! Anything else is an [`ApiError`] (see [`super::error`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};

use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::ek_cert::CaBundle;

use super::error::ApiError;
use super::request::{ApiJson, BodyLimit};
use super::{Limits, NonceRate};
use super::{credentials, enrolment, fetch, hosts, instances, volumes};
use crate::admission::HostAdmission;
use crate::registry::HostRegistry;
use crate::store::{Repository, Store};

/// The API version this server serves, as the first path segment.
pub const API_VERSION: &str = "v1";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(super) store: Arc<Store>,
    nonce_ttl: Duration,
    pub(super) nonce_rate: Arc<TokenBucket>,
    /// The CMS's Ed25519 key: signs fragments and shard maps.
    pub(super) signing_key: Arc<SigningKey>,
    pub(super) registry: HostRegistry,
    /// The CAs EK certificates must chain to; None: enrolment is disabled.
    pub(super) ek_ca: Option<Arc<CaBundle>>,
    /// The operator's list of admitted hosts (`keyshard cms --hosts`); None: any host id,
    /// domain and weight a host claims.
    pub(super) admission: Option<Arc<HostAdmission>>,
}

impl AppState {
    /// The state of a server on `store`, handing out nonces that live `nonce_ttl` and signing
    /// fragments and maps with `signing_key`.
    pub fn new(
        store: Store,
        nonce_ttl: Duration,
        nonce_rate: NonceRate,
        signing_key: SigningKey,
    ) -> Self {
        Self {
            store: Arc::new(store),
            nonce_ttl,
            nonce_rate: Arc::new(TokenBucket::new(nonce_rate)),
            signing_key: Arc::new(signing_key),
            registry: HostRegistry::default(),
            ek_ca: None,
            admission: None,
        }
    }

    /// Enables enrolment: EK certificates must chain to `bundle` (`--ek-ca`).
    pub fn with_ek_ca(mut self, bundle: CaBundle) -> Self {
        self.ek_ca = Some(Arc::new(bundle));
        self
    }

    /// Admits only the hosts `admission` lists, in their domains and weights (`--hosts`).
    pub fn with_host_admission(mut self, admission: HostAdmission) -> Self {
        let admission = Arc::new(admission);
        self.registry.admission = Some(admission.clone());
        self.admission = Some(admission);
        self
    }
}

/// The application: routes, fallbacks and layers, ready to serve on any connection.
pub fn router(state: AppState, limits: &Limits) -> Router {
    let routes = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nonces", post(issue_nonce))
        .route("/v1/hosts", get(hosts::list))
        .route("/v1/hosts/challenge", post(hosts::challenge))
        .route("/v1/hosts/{id}", put(hosts::register))
        .route("/v1/credentials/{name}", post(credentials::put))
        .route("/v1/credentials/{name}/map", get(credentials::map))
        .route("/v1/credentials/{name}/fetch", post(fetch::fetch))
        .route(
            "/v1/volumes/{key_id}/host-shares",
            post(volumes::put_host_shares),
        )
        .route("/v1/enrolments", post(enrolment::begin))
        .route(
            "/v1/enrolments/{enrolment}/activate",
            post(enrolment::activate),
        )
        .route(
            "/v1/instances/{id}",
            put(instances::register).get(instances::get),
        )
        .route("/v1/instances/{id}/challenge", post(instances::challenge));
    with_layers(with_fallbacks(routes).with_state(state), limits)
}

/// The JSON answers for unknown paths, versions and methods, on any router (the CMS's and the
/// shard host's).
pub(crate) fn with_fallbacks<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
}

/// The layers every request goes through (body limit, deadline, panic guard), on any router
/// (the CMS's and the shard host's).
pub(crate) fn with_layers(app: Router, limits: &Limits) -> Router {
    let deadline = limits.request_timeout;
    app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body))
        .layer(axum::Extension(BodyLimit(limits.max_body)))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            within(deadline, request, next)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                log::error!("a request handler panicked");
                ApiError::Internal.into_response()
            },
        ))
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusResponse {
    /// The server's version (the crate's).
    pub version: String,
    /// Which store backend: `redb` or `etcd`.
    pub store: String,
}

async fn status(State(state): State<AppState>) -> axum::Json<StatusResponse> {
    let store = match *state.store {
        Store::Redb(_) => "redb",
        Store::Etcd(_) => "etcd",
    };
    axum::Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        store: store.to_owned(),
    })
}

/// `POST /v1/nonces`: every field is optional, so `{}` and an empty body ask for the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceRequest {
    /// A shorter lifetime than the server's, in milliseconds (1..= the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// The answer to `POST /v1/nonces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceResponse {
    /// 32 random bytes as 64 lowercase hex digits; accepted once, before it expires.
    pub nonce: String,
    /// How long it lives from now.
    pub expires_in_ms: u64,
}

impl NonceRequest {
    /// The lifetime asked for, checked against the server's `max`.
    pub fn ttl(&self, max: Duration) -> Result<Duration, ApiError> {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        match self.ttl_ms {
            None => Ok(max),
            Some(ms) if (1..=max_ms).contains(&ms) => Ok(Duration::from_millis(ms)),
            Some(ms) => Err(ApiError::InvalidRequest {
                reason: format!("ttl_ms {ms} is not in 1..={max_ms}"),
            }),
        }
    }
}

async fn issue_nonce(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<NonceRequest>,
) -> Result<axum::Json<NonceResponse>, ApiError> {
    let ttl = request.ttl(state.nonce_ttl)?;
    if !state.nonce_rate.take() {
        return Err(ApiError::RateLimited { what: "nonces" });
    }
    let nonce = state.store.nonce_issue(ttl).await.map_err(|e| {
        log::error!("issuing a nonce: {e}");
        ApiError::StoreUnavailable
    })?;
    Ok(axum::Json(NonceResponse {
        nonce: nonce.to_hex(),
        expires_in_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
    }))
}

/// Unknown paths: `/vN/...` for another N is an unsupported version, anything else not found.
async fn unknown_path(uri: Uri) -> ApiError {
    let path = uri.path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let shown: String = path.chars().take(128).collect();
    if first != API_VERSION && is_version(first) {
        return ApiError::UnsupportedVersion {
            version: first.to_owned(),
        };
    }
    ApiError::NotFound { path: shown }
}

/// Whether `segment` reads as an API version: `v` and 1 to 4 digits.
fn is_version(segment: &str) -> bool {
    segment
        .strip_prefix('v')
        .is_some_and(|n| (1..=4).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
}

async fn wrong_method(method: Method) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.as_str().chars().take(32).collect(),
    }
}

/// Answers 503 `timeout` when the request takes longer than `deadline` (reading the body
/// included).
async fn within(deadline: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout {
            ms: deadline.as_millis(),
        }
        .into_response(),
    }
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: NonceRate,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(rate: NonceRate) -> Self {
        Self {
            rate,
            state: Mutex::new((f64::from(rate.burst), Instant::now())),
        }
    }

    /// Takes a token if one is there.
    pub(crate) fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        let earned = now.duration_since(*last).as_secs_f64() * f64::from(self.rate.per_second);
        *tokens = (*tokens + earned).min(f64::from(self.rate.burst));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::super::error::ErrorBody;
    use super::*;

    async fn app(limits: Limits) -> (tempfile::TempDir, Router) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("redb:{}", dir.path().join("s.redb").display()))
            .await
            .unwrap();
        let state = AppState::new(
            store,
            limits.nonce_ttl,
            limits.nonce_rate,
            SigningKey::from_bytes(&[0x11; 32]),
        );
        (dir, router(state, &limits))
    }

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, Vec<u8>) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    fn code(body: &[u8]) -> String {
        serde_json::from_slice::<ErrorBody>(body)
            .unwrap()
            .error
            .code
    }

    #[tokio::test]
    async fn versions_paths_and_methods_are_told_apart() {
        let (_dir, app) = app(Limits::default()).await;
        for (method, path, status, expected) in [
            ("GET", "/v2/status", 404, "unsupported_version"),
            ("GET", "/v10/nonces", 404, "unsupported_version"),
            ("GET", "/v1/nope", 404, "not_found"),
            ("GET", "/", 404, "not_found"),
            ("GET", "/vx/status", 404, "not_found"),
            ("GET", "/v1/nonces", 405, "method_not_allowed"),
            ("PUT", "/v1/status", 405, "method_not_allowed"),
        ] {
            let (got, body) = call(&app, method, path, "").await;
            assert_eq!(got.as_u16(), status, "{method} {path}");
            assert_eq!(code(&body), expected, "{method} {path}");
        }
    }

    #[tokio::test]
    async fn item1_a_body_over_the_limit_is_refused_by_its_declared_length_before_reading() {
        let limits = Limits {
            max_body: 16,
            ..Limits::default()
        };
        let (_dir, app) = app(limits).await;
        let (status, body) = call(&app, "POST", "/v1/nonces", &" ".repeat(17)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(code(&body), "body_too_large");
        // A declared gigabyte with no body sent: refused on the header alone.
        let request = Request::builder()
            .method("POST")
            .uri("/v1/nonces")
            .header("content-length", "1073741824")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn item1_nonce_issue_is_rate_limited() {
        let limits = Limits {
            nonce_rate: NonceRate {
                per_second: 1,
                burst: 3,
            },
            ..Limits::default()
        };
        let (_dir, app) = app(limits).await;
        for _ in 0..3 {
            let (status, _) = call(&app, "POST", "/v1/nonces", "{}").await;
            assert_eq!(status, StatusCode::OK);
        }
        let (status, body) = call(&app, "POST", "/v1/nonces", "{}").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(code(&body), "rate_limited");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _) = call(&app, "POST", "/v1/nonces", "{}").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_refused_nonce_request_takes_no_token() {
        let limits = Limits {
            nonce_rate: NonceRate {
                per_second: 1,
                burst: 1,
            },
            ..Limits::default()
        };
        let (_dir, app) = app(limits).await;
        for _ in 0..3 {
            let (status, _) = call(&app, "POST", "/v1/nonces", r#"{"ttl_ms": 0}"#).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        }
        let (status, _) = call(&app, "POST", "/v1/nonces", "").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_slow_request_gets_a_timeout_error() {
        let limits = Limits {
            request_timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let deadline = limits.request_timeout;
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .layer(middleware::from_fn(move |request: Request, next: Next| {
                within(deadline, request, next)
            }));
        let started = Instant::now();
        let (status, body) = call(&app, "GET", "/slow", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(code(&body), "timeout");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn ttls_outside_the_servers_are_refused() {
        let max = Duration::from_secs(30);
        assert_eq!(NonceRequest::default().ttl(max).unwrap(), max);
        let asked = |ms| NonceRequest { ttl_ms: Some(ms) }.ttl(max);
        assert_eq!(asked(1).unwrap(), Duration::from_millis(1));
        assert_eq!(asked(30_000).unwrap(), max);
        assert!(asked(0).is_err());
        assert!(asked(30_001).is_err());
        assert!(asked(u64::MAX).is_err());
    }
}
