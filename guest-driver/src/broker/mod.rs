//! The broker client: asks the host coordinator, through the broker mailbox device, for the
//! `tpm` and `sev` shares, and opens the envelopes they come back in.
//!
//! One request at a time: write it (a random request id), then read the answer area, a short
//! sleep between reads (2 ms, growing to 20 ms), until the answer names the request and is final
//! or the deadline passes. An `sev` share takes two requests: a nonce, then the release with an
//! SNP report whose REPORT_DATA binds that nonce and the request's public key. A `host` share
//! takes one request, with VM TPM evidence: the coordinator relays it to the CMS and the shard
//! host (quoting the VM's TPM for the request key) and passes on what the shard host released,
//! sealed to that key; the guest opens it ([`keyshard_core::shard_release`]) and checks it as a
//! signed fragment like any other share.
//!
//! A refusal for rate ([`RefusalCode::RateLimited`]: the coordinator allows each VM a burst of
//! requests, then a few per second) is not a verdict: the client waits [`RATE_LIMITED_PAUSE`]
//! and asks again, as a new request, until the deadline.

pub mod host_check;
pub mod mailbox;
pub mod shares;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyshard_core::broker::{Body, Evidence, Message, MessageError, NONCE_LEN, RefusalCode};
use keyshard_core::envelope::{EnvelopeError, ReleaseContext, RequestKey};
use keyshard_core::manifest::HostAttestation;
use keyshard_core::shard_release::{self, ReleaseBinding, ShardReleaseError};
use keyshard_core::{HolderClass, HolderId};
use zeroize::Zeroizing;

use self::host_check::HostCheckError;
use self::mailbox::{Mailbox, MailboxError};
use crate::snp::{self, ReportSource, SnpError};

/// The first pause between two reads of the answer area; it grows by half each time.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
/// The longest pause between two reads of the answer area.
const MAX_PAUSE: Duration = Duration::from_millis(20);
/// How long to wait before asking again after a refusal for rate: the coordinator's default
/// refill is 2 requests a second.
pub const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(500);
/// How much of the answer area a poll reads: one 4 KiB block, more than the longest answer (a
/// release of the largest fragment, about 1.3 KiB).
const ANSWER_READ_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error("refused by the coordinator: {reason}")]
    Refused { code: RefusalCode, reason: String },
    #[error("no final answer from the coordinator before the deadline ({last})")]
    Timeout { last: LastSeen },
    #[error("unreadable answer from the coordinator: {0}")]
    Answer(MessageError),
    #[error("the coordinator broke the protocol: {0}")]
    Protocol(String),
    #[error("the released share does not open: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("cannot encode the request: {0}")]
    Request(MessageError),
    #[error(transparent)]
    Snp(#[from] SnpError),
    #[error("no randomness for a request id")]
    Random,
    #[error("no longer wanted: the quorum was met")]
    Cancelled,
    #[error("host check failed: {0}")]
    HostCheck(#[from] HostCheckError),
    #[error(transparent)]
    ShardRelease(#[from] ShardReleaseError),
}

pub type Result<T> = std::result::Result<T, BrokerError>;

/// What the answer area showed last, for a timeout's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastSeen {
    /// Zeros: no answer to anything yet.
    Empty,
    /// The answer to another request.
    OtherRequest,
    Pending,
}

impl std::fmt::Display for LastSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "the answer area stayed empty",
            Self::OtherRequest => "the answer area held another request's answer",
            Self::Pending => "still pending",
        })
    }
}

/// A final answer and the request it answers.
#[derive(Debug)]
pub struct Answer {
    pub request_id: u64,
    pub body: Body,
}

/// Talks to the coordinator over one mailbox.
pub struct BrokerClient {
    mailbox: Box<dyn Mailbox>,
    cancel: Option<Arc<AtomicBool>>,
    last_request: Option<u64>,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("mailbox", &self.mailbox.location())
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    pub fn new(mailbox: Box<dyn Mailbox>) -> Self {
        Self {
            mailbox,
            cancel: None,
            last_request: None,
        }
    }

    /// Stops waiting (with [`BrokerError::Cancelled`]) once `cancel` is set.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Where the mailbox is.
    pub fn location(&self) -> String {
        self.mailbox.location()
    }

    /// Sends `body` as a new request and waits until `deadline` for its final answer; a
    /// refusal is [`BrokerError::Refused`].
    pub fn exchange(&mut self, body: Body, deadline: Instant) -> Result<Answer> {
        loop {
            match self.exchange_once(body.clone(), deadline) {
                Err(BrokerError::Refused {
                    code: RefusalCode::RateLimited,
                    reason,
                }) if Instant::now() + RATE_LIMITED_PAUSE < deadline => {
                    log::debug!("{}: {reason}; asking again", self.location());
                    self.pause(RATE_LIMITED_PAUSE)?;
                }
                other => return other,
            }
        }
    }

    /// Waits `pause`, or less if cancelled meanwhile.
    fn pause(&self, pause: Duration) -> Result<()> {
        let until = Instant::now() + pause;
        loop {
            self.check_cancel()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(MAX_PAUSE));
        }
    }

    /// One request and its final answer.
    fn exchange_once(&mut self, body: Body, deadline: Instant) -> Result<Answer> {
        let request_id = self.new_request_id()?;
        let request = Message { request_id, body }
            .encode()
            .map_err(BrokerError::Request)?;
        self.check_cancel()?;
        self.mailbox.write_request(&request, deadline)?;
        self.last_request = Some(request_id);
        let body = self.await_answer(request_id, deadline)?;
        Ok(Answer { request_id, body })
    }

    /// A fresh coordinator nonce, for an SNP report.
    pub fn nonce(&mut self, deadline: Instant) -> Result<[u8; NONCE_LEN]> {
        match self.exchange(Body::NonceRequest, deadline)?.body {
            Body::Nonce {
                nonce,
                valid_for_ms,
            } => {
                log::debug!("nonce from the coordinator, valid for {valid_for_ms} ms");
                Ok(nonce)
            }
            other => Err(unexpected("a nonce", &other)),
        }
    }

    /// A `tpm` holder's signed fragment, accepted only with a host quote that passes
    /// [`host_check::check`] against `host` (the manifest's pins) for a nonce of our own.
    /// Without pins nothing is asked: the share could not be accepted.
    pub fn release_tpm(
        &mut self,
        holder: &HolderId,
        host: Option<&HostAttestation>,
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let host = host.ok_or(HostCheckError::NotPinned)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| BrokerError::Random)?;
        let key = RequestKey::generate()?;
        let evidence = Evidence::TpmNonce { nonce };
        let check = |quote: Option<&keyshard_core::broker::HostQuote>| {
            host_check::check(host, &nonce, quote.ok_or(HostCheckError::NoQuote)?)
        };
        self.release_checked(HolderClass::Tpm, holder, &key, evidence, deadline, &check)
    }

    /// An `sev` holder's signed fragment, for a fresh SNP report from `reports` bound to a
    /// coordinator nonce and this request's key.
    pub fn release_sev(
        &mut self,
        holder: &HolderId,
        reports: &mut dyn ReportSource,
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let nonce = self.nonce(deadline)?;
        let key = RequestKey::generate()?;
        let report = reports.report(&snp::report_data_binding(&nonce, &key.public_key()))?;
        let evidence = Evidence::Snp {
            nonce,
            report,
            vcek: Vec::new(),
        };
        self.release_checked(HolderClass::Sev, holder, &key, evidence, deadline, &|_| {
            Ok(())
        })
    }

    /// A `host` holder's share, as its shard host released it through the coordinator's relay,
    /// opened with this request's key. The bytes are still to be checked as a signed fragment
    /// (the binding comes from the coordinator: a wrong one only keeps the shard from opening).
    pub fn release_host(
        &mut self,
        holder: &HolderId,
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let key = RequestKey::generate()?;
        let request = Body::Release {
            class: HolderClass::Host,
            holder_id: holder.clone(),
            request_key: key.public_key(),
            evidence: Evidence::VmTpm,
        };
        match self.exchange(request, deadline)?.body {
            Body::HostReleased {
                holder_id,
                credential,
                epoch,
                index,
                host,
                released,
            } => {
                if holder_id != *holder {
                    return Err(BrokerError::Protocol(format!(
                        "released host holder {holder_id} for a request for {holder}"
                    )));
                }
                let binding = ReleaseBinding {
                    credential: &credential,
                    epoch,
                    index,
                    host: &host,
                };
                let fragment = shard_release::open(&key, &released, &binding)?;
                log::debug!("{holder}: released by shard host {host}");
                Ok(fragment)
            }
            other => Err(unexpected("a released host share", &other)),
        }
    }

    /// Sends a release request; the answer's host quote must pass `check` before the share is
    /// opened.
    fn release_checked(
        &mut self,
        class: HolderClass,
        holder: &HolderId,
        key: &RequestKey,
        evidence: Evidence,
        deadline: Instant,
        check: &dyn Fn(
            Option<&keyshard_core::broker::HostQuote>,
        ) -> std::result::Result<(), HostCheckError>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let request = Body::Release {
            class,
            holder_id: holder.clone(),
            request_key: key.public_key(),
            evidence,
        };
        let answer = self.exchange(request, deadline)?;
        match answer.body {
            Body::Released {
                class: released_class,
                holder_id,
                envelope,
                host_quote,
            } => {
                if released_class != class || holder_id != *holder {
                    return Err(BrokerError::Protocol(format!(
                        "released {released_class} holder {holder_id} for a request for {class} \
                         holder {holder}"
                    )));
                }
                check(host_quote.as_ref())?;
                let context = ReleaseContext {
                    request_id: answer.request_id,
                    class,
                    holder_id,
                };
                Ok(key.open(&envelope, &context)?)
            }
            other => Err(unexpected("a released share", &other)),
        }
    }

    /// A random request id, never 0 (what a refusal of an unreadable request names) and never
    /// the previous one (whose answer may still be in the answer area).
    fn new_request_id(&self) -> Result<u64> {
        for _ in 0..8 {
            let id = getrandom::u64().map_err(|_| BrokerError::Random)?;
            if id != 0 && Some(id) != self.last_request {
                return Ok(id);
            }
        }
        Err(BrokerError::Random)
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(cancel) if cancel.load(Ordering::Relaxed) => Err(BrokerError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Reads the answer area until it holds the final answer to `request_id`.
    fn await_answer(&mut self, request_id: u64, deadline: Instant) -> Result<Body> {
        let mut pause = FIRST_PAUSE;
        loop {
            self.check_cancel()?;
            let last = match self.read_answer(deadline)? {
                None => LastSeen::Empty,
                Some(message) if message.request_id != request_id => LastSeen::OtherRequest,
                Some(message) => match message.body {
                    Body::Pending => LastSeen::Pending,
                    Body::Refused { code, reason } => {
                        return Err(BrokerError::Refused { code, reason });
                    }
                    body if body.is_request() => {
                        return Err(unexpected("an answer", &body));
                    }
                    body => return Ok(body),
                },
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Timeout { last });
            }
            std::thread::sleep(pause.min(left));
            pause = (pause + pause / 2).min(MAX_PAUSE);
        }
    }

    /// The message in the answer area, or `None` while it is all zeros.
    fn read_answer(&mut self, deadline: Instant) -> Result<Option<Message>> {
        let bytes = self.mailbox.read_answer(ANSWER_READ_LEN, deadline)?;
        if bytes.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        Message::parse(&bytes)
            .map(Some)
            .map_err(BrokerError::Answer)
    }
}

/// The name of a message kind, for errors.
fn kind_name(body: &Body) -> &'static str {
    match body {
        Body::NonceRequest => "a nonce request",
        Body::Release { .. } => "a release request",
        Body::Nonce { .. } => "a nonce",
        Body::Pending => "pending",
        Body::Released { .. } => "a released share",
        Body::HostReleased { .. } => "a released host share",
        Body::Refused { .. } => "a refusal",
    }
}

fn unexpected(wanted: &str, got: &Body) -> BrokerError {
    BrokerError::Protocol(format!("expected {wanted}, got {}", kind_name(got)))
}

#[cfg(test)]
mod tests;
