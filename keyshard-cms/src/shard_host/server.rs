//! The shard host's HTTPS service: nonces, releases and status, on the CMS's transport (the same
//! TLS 1.3 configuration, accept loop, limits, JSON error model and strict bodies as
//! [`crate::server`]).
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `GET /v1/status` | none | 200 `{"host": ID, "version": "0.1.0"}` |
//! | `POST /v1/nonces` | `{}` or empty | 200 `{"nonce": "<64 hex>", "expires_in_ms": N}`: MAC'd by this process, nothing stored, not rate-limited ([`MemoryNonceBook`]) |
//! | `POST /v1/release` | [`ReleaseRequest`] | 200 [`ReleaseResponse`], or a refusal below |
//!
//! A release, in this order:
//! 1. The body's three byte strings are parsed (grant `KSGR`, sealed shard `KSSE`, evidence
//!    `KSIE`): 422 `invalid_request` naming the field, and nothing is spent.
//! 2. The grant is verified ([`Grant::verify`]): signed by the CMS key, for this host, for this
//!    sealed shard, not expired -> else 403 `grant_refused` with the reason, and the nonce is
//!    not spent: only requests the CMS granted spend (and so fill) the nonce book.
//! 3. The nonce the evidence answers is spent in this host's nonce book
//!    ([`MemoryNonceBook`]): unknown, used or expired -> 403 `nonce_refused`. From here on the
//!    nonce is used up whatever happens, so a refused request cannot be retried with it.
//! 4. [`ShardHost::release`] under the grant's credential, epoch, index and instance policy:
//!    evidence that does not verify -> 403 `evidence_refused` with the `VerifyError` text
//!    (which names changed PCRs); a granted shard this host's TPM cannot open -> 403
//!    `grant_refused`; a TPM that does not answer -> 503 `tpm_unavailable`.
//!
//! Every release and refusal is reported to the service's [`ReleaseObserver`] (the
//! `keyshard shard-host` process prints one line for each) and logged, without secret bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use ed25519_dalek::VerifyingKey;
use keyshard_shards::ecies::{EciesError, SealedShard, SharedPointSource};
use keyshard_shards::grant::{Grant, MAX_GRANT_LEN};
use keyshard_shards::instance::InstanceEvidence;
use keyshard_shards::instance::wire::MAX_EVIDENCE_LEN;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::nonces::{MemoryNonceBook, NonceError};
use super::{ReleaseError, ShardHost, ShardRequest};
use crate::server::api::{with_fallbacks, with_layers};
use crate::server::error::{ApiError, Result, ServerError};
use crate::server::hosts::invalid;
use crate::server::request::ApiJson;
use crate::server::{Limits, serve_connections};

/// `POST /v1/release`: the CMS's grant, the sealed shard it names, and the instance's evidence
/// answering a nonce from this host. Byte strings are hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The grant (`keyshard_shards::grant`).
    pub grant: String,
    /// The sealed shard (`KSSE`) as the CMS stored it and handed it out.
    pub sealed_shard: String,
    /// The instance's evidence (`KSIE`) for a nonce from `POST /v1/nonces` of this host.
    pub evidence: String,
}

/// The answer to a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseResponse {
    /// The shard sealed to the instance's ephemeral key (`KSRS`, `instance::answer`), hex.
    pub released: String,
}

/// `POST /v1/nonces` takes no fields: `{}` or an empty body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostNonceRequest {}

/// The answer to `POST /v1/nonces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostNonceResponse {
    /// 32 random bytes, 64 lowercase hex digits; accepted once, before it expires.
    pub nonce: String,
    /// How long it lives from now.
    pub expires_in_ms: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostStatusResponse {
    pub host: String,
    /// The server's version (the crate's).
    pub version: String,
}

/// What happened to one release request that got as far as its nonce: for the process's
/// one line per release or refusal. Holds no secret bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseEvent {
    Released {
        credential: String,
        epoch: u64,
        index: u8,
        instance: String,
    },
    Refused {
        /// The API error code (`nonce_refused`, `grant_refused`, `evidence_refused`, ...).
        code: &'static str,
        /// The one-line reason sent to the client.
        reason: String,
    },
}

impl std::fmt::Display for ReleaseEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Released {
                credential,
                epoch,
                index,
                instance,
            } => write!(
                f,
                "released shard {index} of {credential} epoch {epoch} to instance {instance}"
            ),
            Self::Refused { code, reason } => write!(f, "refused ({code}): {reason}"),
        }
    }
}

/// Told of every release and refusal.
pub type ReleaseObserver = Arc<dyn Fn(&ReleaseEvent) + Send + Sync>;

struct Inner<K> {
    host: ShardHost<K>,
    cms: VerifyingKey,
    nonces: MemoryNonceBook,
    observer: Option<ReleaseObserver>,
}

/// What the shard host's handlers share: the host (its id and TPM key), the CMS verifying key
/// grants are checked against, the nonce book and the nonce rate limit.
pub struct HostState<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for HostState<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K> std::fmt::Debug for HostState<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("host", &self.inner.host)
            .field("nonces", &self.inner.nonces)
            .finish_non_exhaustive()
    }
}

impl<K: SharedPointSource + Send + Sync + 'static> HostState<K> {
    /// The state of `host`, trusting grants signed by `cms`, issuing nonces from `nonces`.
    pub fn new(host: ShardHost<K>, cms: VerifyingKey, nonces: MemoryNonceBook) -> Self {
        Self {
            inner: Arc::new(Inner {
                host,
                cms,
                nonces,
                observer: None,
            }),
        }
    }

    /// The same, telling `observer` of every release and refusal.
    pub fn with_observer(
        host: ShardHost<K>,
        cms: VerifyingKey,
        nonces: MemoryNonceBook,
        observer: ReleaseObserver,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                host,
                cms,
                nonces,
                observer: Some(observer),
            }),
        }
    }

    fn observe(&self, event: &ReleaseEvent) {
        if let Some(observer) = &self.inner.observer {
            observer(event);
        }
    }
}

/// The shard host's application: its routes with the CMS's fallbacks and layers.
pub fn router<K: SharedPointSource + Send + Sync + 'static>(
    state: HostState<K>,
    limits: &Limits,
) -> Router {
    let routes = Router::new()
        .route("/v1/status", get(status::<K>))
        .route("/v1/nonces", post(issue_nonce::<K>))
        .route("/v1/release", post(release::<K>));
    with_layers(with_fallbacks(routes).with_state(state), limits)
}

async fn status<K: SharedPointSource + Send + Sync + 'static>(
    State(state): State<HostState<K>>,
) -> axum::Json<HostStatusResponse> {
    axum::Json(HostStatusResponse {
        host: state.inner.host.id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn issue_nonce<K: SharedPointSource + Send + Sync + 'static>(
    State(state): State<HostState<K>>,
    ApiJson(HostNonceRequest {}): ApiJson<HostNonceRequest>,
) -> std::result::Result<axum::Json<HostNonceResponse>, ApiError> {
    let nonce = state.inner.nonces.issue().map_err(|e| {
        log::error!("issuing a nonce: {e}");
        ApiError::Internal
    })?;
    Ok(axum::Json(HostNonceResponse {
        nonce: hex::encode(nonce),
        expires_in_ms: u64::try_from(state.inner.nonces.lifetime().as_millis()).unwrap_or(u64::MAX),
    }))
}

/// A request's three byte strings, parsed; nothing spent yet.
#[derive(Debug)]
pub struct ParsedRelease {
    pub grant: Grant,
    pub sealed: SealedShard,
    pub evidence: InstanceEvidence,
}

impl ReleaseRequest {
    /// Parses the grant, sealed shard and evidence (bounded hex, then their strict formats);
    /// a 422 `invalid_request` naming the first that does not parse.
    pub fn parse(&self) -> std::result::Result<ParsedRelease, ApiError> {
        let grant = Grant::from_bytes(&unhex("grant", &self.grant, MAX_GRANT_LEN)?)
            .map_err(|e| invalid(format!("grant: {e}")))?;
        let sealed = SealedShard::from_bytes(&unhex(
            "sealed_shard",
            &self.sealed_shard,
            keyshard_shards::ecies::MAX_SEALED_LEN,
        )?)
        .map_err(|e| invalid(format!("sealed_shard: {e}")))?;
        let evidence =
            InstanceEvidence::from_bytes(&unhex("evidence", &self.evidence, MAX_EVIDENCE_LEN)?)
                .map_err(|e| invalid(format!("evidence: {e}")))?;
        Ok(ParsedRelease {
            grant,
            sealed,
            evidence,
        })
    }
}

/// Hex of at most `max` bytes.
fn unhex(field: &str, text: &str, max: usize) -> std::result::Result<Vec<u8>, ApiError> {
    if text.len() > max.saturating_mul(2) {
        return Err(invalid(format!("{field}: longer than {max} bytes")));
    }
    hex::decode(text).map_err(|_| invalid(format!("{field}: not hex")))
}

async fn release<K: SharedPointSource + Send + Sync + 'static>(
    State(state): State<HostState<K>>,
    ApiJson(request): ApiJson<ReleaseRequest>,
) -> std::result::Result<axum::Json<ReleaseResponse>, ApiError> {
    let parsed = request.parse()?;
    let result = release_parsed(&state, parsed).await;
    match &result {
        Ok((event, _)) => state.observe(event),
        Err(error) => state.observe(&ReleaseEvent::Refused {
            code: error.code(),
            reason: error.to_string(),
        }),
    }
    result.map(|(_, released)| axum::Json(ReleaseResponse { released }))
}

/// Steps 2 to 4 of the module documentation.
async fn release_parsed<K: SharedPointSource + Send + Sync + 'static>(
    state: &HostState<K>,
    parsed: ParsedRelease,
) -> std::result::Result<(ReleaseEvent, String), ApiError> {
    let ParsedRelease {
        grant,
        sealed,
        evidence,
    } = parsed;
    let verified = grant
        .verify(
            &state.inner.cms,
            state.inner.host.id(),
            &sealed,
            SystemTime::now(),
        )
        .map_err(|e| ApiError::GrantRefused {
            reason: e.to_string(),
        })?;
    let spent = state
        .inner
        .nonces
        .consume(evidence.nonce())
        .map_err(|e| match e {
            NonceError::Full(_) => ApiError::RateLimited { what: "releases" },
            other => ApiError::NonceRefused {
                reason: other.to_string(),
            },
        })?;
    let event = ReleaseEvent::Released {
        credential: verified.credential().to_string(),
        epoch: verified.epoch(),
        index: verified.index(),
        instance: verified.instance().to_string(),
    };
    let request = ShardRequest {
        credential: verified.credential().clone(),
        epoch: verified.epoch(),
        index: verified.index(),
        evidence,
    };
    // The TPM's ECDH_ZGen blocks: off the async workers.
    let inner = state.inner.clone();
    let released = tokio::task::spawn_blocking(move || {
        inner
            .host
            .release(&request, &sealed, verified.policy(), spent)
    })
    .await
    .map_err(|e| {
        log::error!("the release task failed: {e}");
        ApiError::Internal
    })?;
    match released {
        Ok(released) => Ok((event, hex::encode(released.shard.to_bytes()))),
        Err(ReleaseError::Evidence(e)) => Err(ApiError::EvidenceRefused {
            reason: e.to_string(),
        }),
        Err(ReleaseError::Shard(EciesError::ZGen(e))) => {
            log::error!("the TPM could not compute the shared point: {e}");
            Err(ApiError::TpmUnavailable)
        }
        Err(ReleaseError::Shard(e)) => Err(ApiError::GrantRefused {
            reason: format!("this host cannot open the granted shard: {e}"),
        }),
        Err(ReleaseError::Answer(e)) => {
            log::error!("sealing the shard to the instance: {e}");
            Err(ApiError::Internal)
        }
    }
}

/// A bound, not yet serving, shard host service.
pub struct ShardHostServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: TlsAcceptor,
    app: Router,
    limits: Limits,
}

impl std::fmt::Debug for ShardHostServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHostServer")
            .field("local_addr", &self.local_addr)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ShardHostServer {
    /// Binds `addr` (port 0: any free port, see [`ShardHostServer::local_addr`]) for the host
    /// service of `state` with the TLS configuration `tls` ([`crate::server::tls`]).
    pub async fn bind<K: SharedPointSource + Send + Sync + 'static>(
        addr: SocketAddr,
        state: HostState<K>,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
    ) -> Result<Self> {
        limits.check()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            local_addr,
            tls: TlsAcceptor::from(tls),
            app: router(state, &limits),
            limits,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, as [`crate::server::CmsServer::serve`] does.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        serve_connections(self.listener, self.tls, self.app, &self.limits, shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::fetch::FetchRequest;

    proptest::proptest! {
        /// What the `cms_request` fuzz target checks for the release and fetch bodies, on every
        /// `cargo test`: any field values give parsed values or one bounded `invalid_request`
        /// line, never a panic.
        #[test]
        fn item2_any_release_or_fetch_fields_give_values_or_a_bounded_refusal(
            text in proptest::collection::vec("[0-9a-f]{0,400}|[ -~]{0,80}", 4),
        ) {
            let release = ReleaseRequest {
                grant: text[0].clone(),
                sealed_shard: text[1].clone(),
                evidence: text[2].clone(),
            };
            let fetch = FetchRequest {
                instance: text[3].clone(),
                evidence: text[2].clone(),
            };
            for error in [release.parse().err(), fetch.parse().err()].into_iter().flatten() {
                let message = error.to_string();
                proptest::prop_assert_eq!(error.code(), "invalid_request");
                proptest::prop_assert!(!message.contains('\n'), "{}", message);
                proptest::prop_assert!(message.len() <= 400, "{}", message);
            }
        }
    }
}
