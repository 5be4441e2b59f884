//! The host's TPM 2.0, for the `tpm` holder class: seal a share to PCR values, quote the PCRs
//! with an attestation key, read and extend PCRs. The only keyshard crate on tss-esapi (and so
//! on libtss2); checking a quote needs no TPM and lives in `keyshard_attest::tpm`.
//!
//! - [`Tpm`] (tss-esapi over a TCTI: `device:/dev/tpmrm0`, or `swtpm:...` in tests) opens the
//!   TPM, keeps a persistent storage root key and attestation key, seals, unseals, reads and
//!   extends PCRs, quotes. [`TpmService`] shares one `Tpm` between threads: a thread owns it
//!   and runs jobs sent over a channel, one at a time. (`Tpm` is `Send`, so a `Mutex<Tpm>`
//!   works too; the service keeps every ESAPI call on one thread and never holds a lock
//!   across TPM commands.)
//! - [`SealedBlob`] is the stored form of a sealed object: plain code, tested without a TPM.
//! - A shard host's decrypt key: [`Tpm::create_decrypt_key`] makes an ECC P-256 decrypt key
//!   under the SRK, stored as a [`DecryptKey`]; [`Tpm::ecdh_z_gen`] gives the ECDH shared
//!   point for an encrypter's ephemeral key; [`Tpm::certify_decrypt_key`] has the AK certify
//!   it (`keyshard_attest::tpm::verify_certification` checks that).
//! - Enrolment: [`Tpm::endorsement_key`] (an RSA 2048, ECC P-256 or P-384 EK and its NV
//!   certificate), [`Tpm::ak_public_area`] and [`Tpm::activate_credential`], which proves to
//!   a CMS that made a credential in software (`keyshard_attest::tpm::credential`) that the AK
//!   and the certified EK are in one TPM.
//!
//! A release: `quote(selection, fresh nonce)` -> `keyshard_attest::tpm::verify_quote(quote,
//! pinned AK, nonce, golden)` -> `unseal(blob)`. A changed PCR fails the quote with
//! `QuoteError::PcrDigest` ([`Tpm::changed_pcrs`] names it), and the TPM itself refuses the
//! unseal with [`TpmError::PolicyRefused`].
//!
//! libtss2 logs every failed TPM command to stderr (`WARNING:esys:...`), including refusals
//! keyshard expects; binaries set `TSS2_LOG=all+NONE` before the first TPM call to silence it.

mod blob;
mod convert;
mod decrypt_key;
mod device;
mod ecdh;
mod ek;
mod error;
mod keys;
mod measurement;
mod sealing;
mod service;
mod tcti;

pub use blob::{BlobError, SealedBlob};
pub use decrypt_key::{DecryptKey, DecryptKeyError};
pub use device::{Startup, Tpm, TpmConfig, TpmInfo};
pub use ecdh::SharedPoint;
pub use ek::{EndorsementKey, ek_cert_nv_index};
pub use error::TpmError;
pub use measurement::MAX_EVENT_DATA;
pub use service::{BatchWindow, TpmService};
pub use tcti::{DEFAULT_TCTI, resolve_tcti, resolve_tcti_with};
