//! TPM 2.0 quotes checked in software, with no TPM and no tss-esapi: the quoted structure
//! ([`attest`]), PCR selections and values and the PolicyPCR digest ([`pcr`]), the attestation
//! key's public part and the quote's signature ([`quote`]), and the TCG constants and wire
//! reader they share ([`spec`], [`wire`]). `keyshard-tpm` produces what this module checks.
//! A shard host's decrypt key: its public area and name ([`public`]) and its certification by
//! the attestation key ([`certify`]). Enrolment (feature `enrol`): MakeCredential in software
//! ([`credential`]) to an EK whose certificate chains to a CA bundle ([`ek_cert`]), in one
//! call per step for the verifier ([`enrol`]).
//!
//! A release checks `verify_quote(quote, pinned AK, nonce, golden)`: a changed PCR fails it
//! with [`QuoteError::PcrDigest`], and [`differing_pcrs`] names which PCR changed.

pub mod attest;
pub mod certify;
#[cfg(feature = "enrol")]
pub mod credential;
#[cfg(feature = "enrol")]
pub mod ek_cert;
#[cfg(feature = "enrol")]
pub mod enrol;
pub mod pcr;
pub mod public;
pub mod quote;
pub mod spec;
pub mod wire;

pub use attest::{AttestError, CertifyAttest, ClockInfo, QuoteAttest, QuotedBank};
pub use certify::{Certification, CertifiedKey, CertifyError, verify_certification};
pub use pcr::{PcrError, PcrSelection, PcrValues, differing_pcrs};
pub use public::{
    ATTESTATION_KEY_ATTRIBUTES, DECRYPT_KEY_ATTRIBUTES, EccPublic, PublicError, sha256_name,
};
pub use quote::{
    AK_PUBLIC_LEN, AkPublic, NONCE_LEN, Quote, QuoteError, QuoteInfo, verify_quote,
    verify_quote_digest,
};
pub use spec::{AK_HANDLE, MAX_SEALED_DATA, SRK_HANDLE};
pub use wire::WireError;
