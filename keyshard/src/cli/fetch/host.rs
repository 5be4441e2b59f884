//! One shard host's round of a fetch: its nonce, a quote bound to that nonce and the fetch key,
//! the release, and the released shard opened. Everything a host can do wrong (not answer,
//! answer garbage or too much, refuse, release something that does not open) ends as a
//! [`HostFailure`] of that host; nothing here ends the fetch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyshard_attest::tpm::{PcrSelection, PcrValues};
use keyshard_cms::server::ErrorBody;
use keyshard_core::KeyId;
use keyshard_shards::HostId;
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::instance::answer::{AnswerError, MAX_RELEASED_LEN};
use keyshard_shards::instance::{self, FetchKey, InstanceEvidence, NONCE_LEN, ReleasedShard};
use keyshard_tpm::TpmService;
use zeroize::Zeroizing;

use super::api::{NonceResponse, ReleaseRequest, ReleaseResponse};
use crate::cli::credential::{chain, one_line, rustls_error};

/// The largest answer read from a shard host: a released shard in hex, with room for the JSON.
pub const MAX_HOST_ANSWER_LEN: usize = 2 * MAX_RELEASED_LEN + 1024;
/// The longest host error message shown.
const MAX_MESSAGE_SHOWN: usize = 200;

/// Why one host gave no usable share. One line each; never secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFailure {
    #[error("the CMS sent no grant for share {index}")]
    NoGrant { index: u8 },
    #[error("the CMS's grant for share {index} {reason}")]
    Grant { index: u8, reason: String },
    #[error("no answer within {ms} ms")]
    Deadline { ms: u128 },
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("answered more than {max} bytes")]
    TooLarge { max: usize },
    #[error("refused ({status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("answered HTTP {status} without a readable error")]
    UnreadableError { status: u16 },
    #[error("answered a malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("the instance's TPM could not quote: {0}")]
    Quote(String),
    #[error("released an unreadable shard: {0}")]
    Released(AnswerError),
    #[error(
        "released a shard that does not open with this fetch's key as share {index} of epoch \
         {epoch}: another index, epoch, host or fetch, or tampered"
    )]
    DoesNotOpen { index: u8, epoch: u64 },
    #[error("released a share that is not a valid CMS-signed fragment: {0}")]
    Fragment(String),
    #[error("released a share {0}")]
    WrongShare(String),
}

/// What every host round of one fetch shares.
pub struct Round {
    pub http: reqwest::Client,
    pub tpm: TpmService,
    pub key: Arc<FetchKey>,
    pub selection: PcrSelection,
    /// The PCR values read once for the fetch (they only name changed PCRs to a verifier).
    pub pcrs: PcrValues,
    pub credential: KeyId,
    pub epoch: u64,
    /// Set once k shares rebuilt the credential: quotes not yet made are skipped.
    pub done: Arc<AtomicBool>,
}

/// Where one host's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTimings {
    /// `POST /v1/nonces`, connection and TLS handshake included.
    pub nonce: Duration,
    /// The quote, waiting for the TPM included (it quotes for one host at a time).
    pub quote: Duration,
    /// `POST /v1/release`.
    pub release: Duration,
    /// The whole round, from its start to the opened share (or the failure).
    pub round: Duration,
}

/// One host's request, as the CMS granted it and the map located it.
#[derive(Debug, Clone)]
pub struct HostRequest {
    pub index: u8,
    pub host: HostId,
    /// The map's endpoint for the host (signed by the CMS), without a trailing slash.
    pub endpoint: String,
    pub grant: String,
    pub sealed_shard: String,
}

/// Runs one host's round: the opened share (a fragment's bytes, not yet checked) or why not.
pub async fn run(
    round: &Round,
    request: &HostRequest,
    timings: &mut HostTimings,
) -> Result<Zeroizing<Vec<u8>>, HostFailure> {
    let started = Instant::now();
    let url = format!("{}/v1/nonces", request.endpoint);
    let answer = call(&round.http, &url, b"{}".to_vec()).await?;
    let nonce: NonceResponse = parse(&answer, "nonce answer")?;
    let nonce = nonce_bytes(&nonce.nonce).ok_or_else(|| HostFailure::Malformed {
        what: "nonce answer",
        reason: "nonce is not 32 bytes of hex".to_owned(),
    })?;
    timings.nonce = started.elapsed();

    let started = Instant::now();
    let evidence = evidence(round, &nonce).await?;
    timings.quote = started.elapsed();

    let started = Instant::now();
    let body = serde_json::to_vec(&ReleaseRequest {
        grant: &request.grant,
        sealed_shard: &request.sealed_shard,
        evidence: &evidence,
    })
    .map_err(|e| HostFailure::Transport(e.to_string()))?;
    let url = format!("{}/v1/release", request.endpoint);
    let answer = call(&round.http, &url, body).await?;
    let released: ReleaseResponse = parse(&answer, "release answer")?;
    timings.release = started.elapsed();

    let bytes = hex::decode(&released.released).map_err(|_| HostFailure::Malformed {
        what: "release answer",
        reason: "released is not hex".to_owned(),
    })?;
    let released = ReleasedShard::from_bytes(&bytes).map_err(HostFailure::Released)?;
    let binding = ShardBinding {
        credential: round.credential.clone(),
        epoch: round.epoch,
        index: request.index,
        host: request.host.clone(),
    };
    round
        .key
        .open(&released, &binding)
        .map_err(|_| HostFailure::DoesNotOpen {
            index: request.index,
            epoch: round.epoch,
        })
}

/// The instance's evidence for `nonce`, hex: a quote over the fetch's selection whose
/// qualifying data binds `nonce` and the fetch key.
async fn evidence(round: &Round, nonce: &[u8; NONCE_LEN]) -> Result<String, HostFailure> {
    let public = round.key.public_key();
    let qualifying = instance::qualifying_data(nonce, &public);
    let (tpm, selection) = (round.tpm.clone(), round.selection.clone());
    let done = Arc::clone(&round.done);
    // Checked on the TPM's thread: a quote still queued there when k shares have rebuilt the
    // credential is skipped rather than made for nobody.
    let quote = tokio::task::spawn_blocking(move || {
        tpm.call(move |t| {
            if done.load(Ordering::Relaxed) {
                None
            } else {
                Some(t.quote(&selection, &qualifying))
            }
        })
    })
    .await
    .map_err(|e| HostFailure::Quote(e.to_string()))?
    .map_err(|e| HostFailure::Quote(e.to_string()))?
    .ok_or_else(|| HostFailure::Quote("not needed any more".to_owned()))?
    .map_err(|e| HostFailure::Quote(e.to_string()))?;
    let evidence = InstanceEvidence::new(*nonce, public, quote, round.pcrs.clone());
    Ok(hex::encode(evidence.to_bytes()))
}

/// 32 bytes from 64 hex digits.
pub fn nonce_bytes(text: &str) -> Option<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, HostFailure> {
    serde_json::from_slice(body).map_err(|e| HostFailure::Malformed {
        what,
        reason: one_line(&e.to_string(), MAX_MESSAGE_SHOWN),
    })
}

/// POSTs `body` (JSON) to a host; the answer's body when the status is a success, read to
/// [`MAX_HOST_ANSWER_LEN`] at most; the host's error otherwise.
pub async fn call(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, HostFailure> {
    let sent = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let mut response = sent.map_err(|e| transport(&e))?;
    let status = response.status();
    if response
        .content_length()
        .is_some_and(|len| len > MAX_HOST_ANSWER_LEN as u64)
    {
        return Err(HostFailure::TooLarge {
            max: MAX_HOST_ANSWER_LEN,
        });
    }
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(&e))? {
        if answer.len().saturating_add(chunk.len()) > MAX_HOST_ANSWER_LEN {
            return Err(HostFailure::TooLarge {
                max: MAX_HOST_ANSWER_LEN,
            });
        }
        answer.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(answer);
    }
    let error: ErrorBody =
        serde_json::from_slice(&answer).map_err(|_| HostFailure::UnreadableError {
            status: status.as_u16(),
        })?;
    Err(HostFailure::Refused {
        status: status.as_u16(),
        code: one_line(&error.error.code, 64),
        message: one_line(&error.error.message, MAX_MESSAGE_SHOWN),
    })
}

/// A transport failure classified: TLS, connection, other. (Timeouts are the caller's
/// deadline's, which is shorter than the client's.)
fn transport(error: &reqwest::Error) -> HostFailure {
    if let Some(tls) = rustls_error(error) {
        return HostFailure::Tls(tls);
    }
    let reason = std::error::Error::source(error).map_or_else(|| chain(error), chain);
    if error.is_timeout() {
        HostFailure::Transport(format!("timed out: {reason}"))
    } else if error.is_connect() {
        HostFailure::Connect(reason)
    } else {
        HostFailure::Transport(reason)
    }
}
