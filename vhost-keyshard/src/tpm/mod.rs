//! The host's TPM 2.0, for the `tpm` holder class: seal a share to PCR values, quote the PCRs
//! with an attestation key, and verify quotes in software against golden values.
//!
//! - [`Tpm`] (tss-esapi over a TCTI: `device:/dev/tpmrm0`, or `swtpm:...` in tests) opens the
//!   TPM, keeps a persistent storage root key and attestation key, seals, unseals, reads and
//!   extends PCRs, quotes. [`TpmService`] shares one `Tpm` between threads: a thread owns it
//!   and runs jobs sent over a channel, one at a time. (`Tpm` is `Send`, so a `Mutex<Tpm>`
//!   works too; the service keeps every ESAPI call on one thread and never holds a lock
//!   across TPM commands.)
//! - [`verify_quote`], [`PcrValues`], [`SealedBlob`] and [`differing_pcrs`] need no TPM: the
//!   coordinator's trust decision and the stored formats are plain code, tested without one.
//!
//! A release: `quote(selection, fresh nonce)` -> `verify_quote(quote, pinned AK, nonce,
//! golden)` -> `unseal(blob)`. A changed PCR fails the quote with [`QuoteError::PcrDigest`]
//! ([`Tpm::changed_pcrs`] names it), and the TPM itself refuses the unseal with
//! [`TpmError::PolicyRefused`].
//!
//! libtss2 logs every failed TPM command to stderr (`WARNING:esys:...`), including refusals
//! keyshard expects; binaries set `TSS2_LOG=all+NONE` before the first TPM call to silence it.

mod attest;
mod blob;
mod convert;
mod device;
mod error;
mod keys;
mod measurement;
mod pcr;
mod quote;
mod sealing;
mod service;
mod spec;
mod tcti;
mod wire;

pub use attest::{AttestError, ClockInfo, QuoteAttest, QuotedBank};
pub use blob::{BlobError, SealedBlob};
pub use device::{Startup, Tpm, TpmConfig, TpmInfo};
pub use error::TpmError;
pub use measurement::MAX_EVENT_DATA;
pub use pcr::{PcrError, PcrSelection, PcrValues, differing_pcrs};
pub use quote::{AK_PUBLIC_LEN, AkPublic, NONCE_LEN, Quote, QuoteError, QuoteInfo, verify_quote};
pub use service::TpmService;
pub use spec::{AK_HANDLE, MAX_SEALED_DATA, SRK_HANDLE};
pub use tcti::{DEFAULT_TCTI, resolve_tcti, resolve_tcti_with};
pub use wire::WireError;
