//! The credential service's HTTPS server: the `/v1/` JSON API ([`api`]) on HTTP/1.1 over TLS 1.3.
//!
//! # Transport
//!
//! One accept loop on a tokio TCP listener; each connection gets a TLS handshake (tokio-rustls,
//! [`tls`]) under [`Limits::handshake_timeout`], then hyper's HTTP/1.1 connection serving the
//! axum router. The crates: hyper and tokio-rustls are the HTTP and TLS layers every Rust HTTP
//! stack (axum, reqwest, tonic) is built on; axum gives routing, extractors and tower layers.
//! axum-server would wrap the same loop; writing it here keeps the handshake deadline, the
//! connection cap and the graceful stop in one place that the tests read.
//!
//! # Limits
//!
//! | what | default | when exceeded |
//! |---|---|---|
//! | TLS handshake | 10 s | connection closed (a half-sent ClientHello holds one connection slot at most that long) |
//! | request head (line and headers) | 10 s to arrive, 16 KiB, 64 headers | hyper answers 431 (too large) or closes (too slow); these two answers are hyper's, without a JSON body |
//! | request body | 64 KiB, refused while reading (413 `body_too_large`), before any parsing | |
//! | a request, body read included | 10 s | 503 `timeout` |
//! | connections open at once | 1024 | further connections wait in the kernel's accept queue |
//! | nonces issued | 1000 a second, bursts of 1000 | 429 `rate_limited` with `Retry-After: 1` |
//!
//! Connections speak HTTP/1.1 only (one request at a time each), so the connection cap is also the
//! cap on requests in flight. TLS is 1.3 only: every client this project uses (reqwest, curl with
//! OpenSSL 3) speaks it, and it leaves out 1.2's older key exchanges and cipher suites.
//!
//! # Stopping
//!
//! [`CmsServer::serve`] runs until its `shutdown` future completes: it stops accepting, lets the
//! requests in flight finish (at most [`SHUTDOWN_GRACE`]), and returns.

pub mod api;
pub mod credentials;
pub mod enrolment;
pub mod error;
pub mod fetch;
pub mod hosts;
pub mod instances;
pub mod request;
pub mod tls;
pub mod volumes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub use self::api::{API_VERSION, NonceRequest, NonceResponse, StatusResponse};
pub use self::error::{ApiError, ErrorBody, ErrorDetail, Result, ServerError};
pub use self::request::parse_body;

use crate::store::{MAX_NONCE_TTL, Store};

/// The default request body limit, in bytes.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// How long in-flight requests may take to finish once the server is told to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The smallest head buffer hyper accepts (its own minimum).
const MIN_HEAD_BYTES: usize = 8192;

/// How fast nonces may be issued, over all clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceRate {
    /// Tokens added a second.
    pub per_second: u32,
    /// Tokens saved up at most (the largest burst).
    pub burst: u32,
}

/// The server's limits (see the table in this module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub head_timeout: Duration,
    /// The request line and headers, in bytes (at least 8192: hyper's minimum buffer).
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// How long an issued nonce lives (and the longest a client may ask for).
    pub nonce_ttl: Duration,
    pub nonce_rate: NonceRate,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            max_body: DEFAULT_MAX_BODY,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
            nonce_ttl: Duration::from_secs(30),
            nonce_rate: NonceRate {
                per_second: 1000,
                burst: 1000,
            },
        }
    }
}

impl Limits {
    /// Refuses limits the server cannot work with (zero, or beyond what the parts below allow).
    pub fn check(&self) -> Result<()> {
        let bad = |what: &'static str, value: String, min: &str, max: &str| {
            Err(ServerError::Limit {
                what,
                value,
                min: min.to_owned(),
                max: max.to_owned(),
            })
        };
        if self.max_head_bytes < MIN_HEAD_BYTES {
            return bad(
                "the head limit",
                self.max_head_bytes.to_string(),
                "8192",
                "usize::MAX",
            );
        }
        if self.nonce_ttl.is_zero() || self.nonce_ttl > MAX_NONCE_TTL {
            return bad(
                "the nonce lifetime",
                format!("{:?}", self.nonce_ttl),
                "1ms",
                &format!("{MAX_NONCE_TTL:?}"),
            );
        }
        for (what, value) in [
            ("the connection limit", self.max_connections),
            ("the header count limit", self.max_headers),
            ("the body limit", self.max_body),
            (
                "the nonce rate",
                usize::try_from(self.nonce_rate.per_second).unwrap_or(usize::MAX),
            ),
            (
                "the nonce burst",
                usize::try_from(self.nonce_rate.burst).unwrap_or(usize::MAX),
            ),
        ] {
            if value == 0 {
                return bad(what, "0".to_owned(), "1", "usize::MAX");
            }
        }
        for (what, value) in [
            ("the handshake timeout", self.handshake_timeout),
            ("the head timeout", self.head_timeout),
            ("the request timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return bad(what, "0s".to_owned(), "1ns", "Duration::MAX");
            }
        }
        Ok(())
    }
}

/// A bound, not yet serving, credential service.
pub struct CmsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: TlsAcceptor,
    app: axum::Router,
    limits: Limits,
}

impl std::fmt::Debug for CmsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmsServer")
            .field("local_addr", &self.local_addr)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl CmsServer {
    /// Binds `addr` (port 0: any free port, see [`CmsServer::local_addr`]) for a server on
    /// `store` with the TLS configuration `tls` ([`tls::server_config`]), signing fragments and
    /// shard maps with `signing_key`. Enrolment is disabled: see [`CmsServer::bind_with`].
    pub async fn bind(
        addr: SocketAddr,
        store: Store,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
        signing_key: ed25519_dalek::SigningKey,
    ) -> Result<Self> {
        Self::bind_with(addr, store, tls, limits, signing_key, None).await
    }

    /// [`CmsServer::bind`], with enrolment enabled when `ek_ca` is given: EK certificates must
    /// chain to it (`keyshard cms --ek-ca`).
    pub async fn bind_with(
        addr: SocketAddr,
        store: Store,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
        signing_key: ed25519_dalek::SigningKey,
        ek_ca: Option<keyshard_attest::tpm::ek_cert::CaBundle>,
    ) -> Result<Self> {
        Self::bind_admitting(addr, store, tls, limits, signing_key, ek_ca, None).await
    }

    /// [`CmsServer::bind_with`], admitting only the hosts `admission` lists when it is given
    /// (`keyshard cms --hosts`, [`crate::admission`]).
    pub async fn bind_admitting(
        addr: SocketAddr,
        store: Store,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
        signing_key: ed25519_dalek::SigningKey,
        ek_ca: Option<keyshard_attest::tpm::ek_cert::CaBundle>,
        admission: Option<crate::admission::HostAdmission>,
    ) -> Result<Self> {
        limits.check()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let mut state = api::AppState::new(store, limits.nonce_ttl, limits.nonce_rate, signing_key);
        if let Some(bundle) = ek_ca {
            state = state.with_ek_ca(bundle);
        }
        if let Some(admission) = admission {
            state = state.with_host_admission(admission);
        }
        Ok(Self {
            listener,
            local_addr,
            tls: TlsAcceptor::from(tls),
            app: api::router(state, &limits),
            limits,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish (at most
    /// [`SHUTDOWN_GRACE`]). Errors of one connection (a failed handshake, a client gone) close
    /// that connection only.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let Self {
            listener,
            tls,
            app,
            limits,
            ..
        } = self;
        serve_connections(listener, tls, app, &limits, shutdown).await;
    }
}

/// The accept loop of every HTTPS server here (the CMS's and the shard host's): TLS handshakes
/// under the handshake deadline, HTTP/1.1 connections under the head limits, at most
/// `max_connections` at once, until `shutdown` completes; then requests in flight get
/// [`SHUTDOWN_GRACE`] to finish.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: axum::Router,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head_bytes)
        .max_headers(limits.max_headers);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before accept: wait
                    // a moment rather than spin, and go on.
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small writes go out at once: without this, the TLS 1.3 session ticket written after
        // the handshake holds the first answer back (Nagle) until the client's delayed ACK,
        // 40 ms on Linux: measured as 40 ms added to a fetch's first request to each host.
        if let Err(e) = tcp.set_nodelay(true) {
            log::debug!("TCP_NODELAY for {peer}: {e}");
        }
        let tls = tls.clone();
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    log::debug!("{peer}: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    log::debug!("{peer}: no TLS handshake within {handshake_timeout:?}");
                    return;
                }
            };
            let connection = http.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                log::debug!("{peer}: {e}");
            }
        });
    }
    drop(listener);
    log::info!("stopping: waiting for requests in flight");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("requests still in flight after {SHUTDOWN_GRACE:?}: closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_pass_and_zero_limits_do_not() {
        assert!(Limits::default().check().is_ok());
        let zero_body = Limits {
            max_body: 0,
            ..Limits::default()
        };
        assert!(zero_body.check().unwrap_err().to_string().contains("body"));
        let small_head = Limits {
            max_head_bytes: 100,
            ..Limits::default()
        };
        assert!(small_head.check().is_err());
        let long_nonces = Limits {
            nonce_ttl: MAX_NONCE_TTL + Duration::from_secs(1),
            ..Limits::default()
        };
        assert!(long_nonces.check().is_err());
    }
}
