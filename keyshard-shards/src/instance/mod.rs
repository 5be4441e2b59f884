//! Instance evidence: how a compute instance proves itself to a verifier (the CMS, a shard host)
//! before a shard is released to it, and how the released shard reaches only that instance.
//!
//! A request-challenge-attest-response exchange, as in Trustee's KBS protocol:
//!
//! 1. The verifier issues a fresh nonce (32 bytes, single use).
//! 2. The instance makes an ephemeral X25519 key pair for this fetch ([`answer::FetchKey`]) and
//!    has its TPM quote its PCRs with the qualifying data of [`qualifying_data`]:
//!    `SHA-256(26 || "keyshard/instance-quote/v1" || nonce || ephemeral public key)`
//!    (the label after its one-byte length, then 32 + 32 bytes). It sends the quote, the PCR
//!    values it read, the nonce and the public key: an [`InstanceEvidence`].
//! 3. The verifier checks the evidence against the [`InstancePolicy`] the CMS registered for the
//!    instance (its attestation key and golden PCR values) with [`verify`]: the quote is signed by
//!    that AK, its qualifying data binds the verifier's nonce *and* this ephemeral key, and it
//!    covers the golden PCR values. Only a [`VerifiedInstance`] can be released to.
//! 4. The answer is sealed with HPKE to the ephemeral key ([`answer`]), so TLS is not the only
//!    protection and whoever relays the exchange sees ciphertext only.
//!
//! What the binding stops: a quote replayed to another verifier or later (the nonce), and a
//! quote copied by someone who substitutes their own key to receive the shard (the key). What it
//! does not stop: software running inside the attested instance, or root on the instance's host
//! for an instance without memory encryption; the quote proves the boot state, not the runtime.
//!
//! The PCR values in the evidence are never trusted for the verdict: they only name which PCRs
//! changed, and only when they hash to the digest the AK signed.

pub mod answer;
pub mod wire;

#[cfg(test)]
mod tests;

use keyshard_attest::tpm::attest::QuoteAttest;
use keyshard_attest::tpm::{
    AkPublic, PcrValues, Quote, QuoteError, QuoteInfo, differing_pcrs, verify_quote,
};
use sha2::{Digest as _, Sha256};

pub use answer::{FetchKey, FetchPublicKey, ReleasedShard};
pub use wire::FormatError;

/// A verifier's nonce: 32 random bytes, issued for one exchange.
pub const NONCE_LEN: usize = keyshard_attest::tpm::NONCE_LEN;
/// Names the binding and its version in the qualifying data.
const QUOTE_LABEL: &[u8] = b"keyshard/instance-quote/v1";

/// A verifier's nonce.
pub type Nonce = [u8; NONCE_LEN];

/// Why evidence does not verify. Each step has its own variant, so a verifier's log (and a test)
/// tells them apart; none carries secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the evidence answers another nonce than the one this verifier issued")]
    Nonce,
    #[error("the quote is not signed by the instance's registered attestation key")]
    AttestationKey,
    #[error(
        "the quote does not bind this nonce and this ephemeral key: a replayed quote, or one \
         re-used with another key"
    )]
    NotBound,
    #[error("the quote covers {found}, the instance's policy {expected}")]
    Selection { expected: String, found: String },
    #[error("the instance's PCRs changed: {changed} no longer hold the registered golden values")]
    PcrsChanged {
        /// The PCRs that differ, e.g. `sha256:7`.
        changed: String,
    },
    #[error(
        "the instance's PCRs {selection} no longer hold the registered golden values (which \
         ones is unknown: the reported values do not match the quote)"
    )]
    PcrDigest { selection: String },
    #[error("the quote is not a valid TPM quote: {0}")]
    Quote(QuoteError),
}

pub type Result<T> = std::result::Result<T, VerifyError>;

/// The qualifying data the instance's TPM signs: binds the verifier's nonce and the instance's
/// ephemeral key for this fetch (layout in the module documentation).
pub fn qualifying_data(nonce: &Nonce, key: &FetchPublicKey) -> [u8; NONCE_LEN] {
    let mut hash = Sha256::new();
    // The label is 26 bytes: its length fits a byte.
    hash.update([u8::try_from(QUOTE_LABEL.len()).unwrap_or(u8::MAX)]);
    hash.update(QUOTE_LABEL);
    hash.update(nonce);
    hash.update(key.as_bytes());
    hash.finalize().into()
}

/// What a compute instance presents to a verifier; canonical encoding in [`wire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEvidence {
    nonce: Nonce,
    ephemeral: FetchPublicKey,
    quote: Quote,
    pcrs: PcrValues,
}

impl InstanceEvidence {
    /// Evidence for `nonce`: `quote` must have been made with
    /// [`qualifying_data`]`(nonce, ephemeral)`; `pcrs` are the values the instance read for the
    /// quoted selection (they only serve to name changed PCRs).
    pub fn new(nonce: Nonce, ephemeral: FetchPublicKey, quote: Quote, pcrs: PcrValues) -> Self {
        Self {
            nonce,
            ephemeral,
            quote,
            pcrs,
        }
    }

    /// The verifier's nonce this evidence answers.
    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// The ephemeral key the instance wants its answer sealed to.
    pub fn ephemeral(&self) -> &FetchPublicKey {
        &self.ephemeral
    }

    pub fn quote(&self) -> &Quote {
        &self.quote
    }

    /// The PCR values the instance reports (unsigned; see [`verify`]).
    pub fn pcrs(&self) -> &PcrValues {
        &self.pcrs
    }
}

/// Which instances may receive a shard: the attestation key and golden PCR values the CMS
/// registered for an instance (`keyshard instance enroll`). Canonical encoding in [`wire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePolicy {
    ak: AkPublic,
    golden: PcrValues,
}

impl InstancePolicy {
    pub fn new(ak: AkPublic, golden: PcrValues) -> Self {
        Self { ak, golden }
    }

    /// The instance's attestation key.
    pub fn ak(&self) -> &AkPublic {
        &self.ak
    }

    /// The golden PCR values; their selection is what the instance must quote.
    pub fn golden(&self) -> &PcrValues {
        &self.golden
    }
}

/// Evidence that verified: the only thing a shard can be released to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedInstance {
    ephemeral: FetchPublicKey,
    quote: QuoteInfo,
}

impl VerifiedInstance {
    /// The ephemeral key the verified quote binds.
    pub fn ephemeral(&self) -> &FetchPublicKey {
        &self.ephemeral
    }

    /// The TPM's clock and reset counters from the quote.
    pub fn quote_info(&self) -> &QuoteInfo {
        &self.quote
    }
}

/// Verifies `evidence` against `policy` for the nonce this verifier issued, in this order:
/// 1. the evidence names `nonce` ([`VerifyError::Nonce`]);
/// 2. the quote's signature verifies with the policy's AK ([`VerifyError::AttestationKey`]);
/// 3. the quote is a well-formed quote ([`VerifyError::Quote`]);
/// 4. its qualifying data is [`qualifying_data`]`(nonce, evidence's key)`
///    ([`VerifyError::NotBound`]);
/// 5. it covers exactly the golden selection ([`VerifyError::Selection`]);
/// 6. its PCR digest is that of the golden values ([`VerifyError::PcrsChanged`] naming the
///    PCRs when the reported values match the signed digest, else [`VerifyError::PcrDigest`]).
///
/// Whether `nonce` is fresh and unused is the caller's nonce book's business.
pub fn verify(
    evidence: &InstanceEvidence,
    policy: &InstancePolicy,
    nonce: &Nonce,
) -> Result<VerifiedInstance> {
    if evidence.nonce != *nonce {
        return Err(VerifyError::Nonce);
    }
    let bound = qualifying_data(nonce, &evidence.ephemeral);
    match verify_quote(&evidence.quote, &policy.ak, &bound, &policy.golden) {
        Ok(quote) => Ok(VerifiedInstance {
            ephemeral: evidence.ephemeral,
            quote,
        }),
        Err(QuoteError::Signature) => Err(VerifyError::AttestationKey),
        Err(QuoteError::Nonce) => Err(VerifyError::NotBound),
        Err(QuoteError::Selection { expected, found }) => {
            Err(VerifyError::Selection { expected, found })
        }
        Err(QuoteError::PcrDigest { selection }) => Err(name_changed_pcrs(evidence, policy)
            .map_or(VerifyError::PcrDigest { selection }, |changed| {
                VerifyError::PcrsChanged { changed }
            })),
        Err(other) => Err(VerifyError::Quote(other)),
    }
}

/// `sha256:7,8` for the golden PCRs that differ from the reported values, if the reported
/// values are the ones the AK signed (their digest is the quoted digest). The signature has
/// been checked by then, so the quoted digest is the TPM's.
fn name_changed_pcrs(evidence: &InstanceEvidence, policy: &InstancePolicy) -> Option<String> {
    let attest = QuoteAttest::parse(&evidence.quote.attest).ok()?;
    if evidence.pcrs.composite_digest().as_slice() != attest.pcr_digest.as_slice() {
        return None;
    }
    let changed = differing_pcrs(&policy.golden, &evidence.pcrs).ok()?;
    if changed.is_empty() {
        return None;
    }
    let list: Vec<String> = changed.iter().map(u8::to_string).collect();
    Some(format!(
        "{}:{}",
        policy.golden.bank().as_str(),
        list.join(",")
    ))
}
