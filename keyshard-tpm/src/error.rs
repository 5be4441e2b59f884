//! Errors of the TPM device layer ([`crate::Tpm`], [`crate::TpmService`]), and how tss-esapi's
//! errors become them: a TPM refusal that a caller acts on gets its own variant, everything else
//! names the command and the TPM's response code.

use tss_esapi::constants::response_code::Tss2ResponseCodeKind;

use crate::blob::BlobError;
use crate::decrypt_key::DecryptKeyError;
use keyshard_attest::tpm::pcr::PcrError;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("TCTI {tcti:?} is not a valid TCTI configuration: {reason}")]
    Tcti { tcti: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("no TPM answers at {tcti}: {detail}")]
    Unreachable { tcti: String, detail: String },
    #[error("TPM2_{command} failed: {detail}")]
    Command {
        command: &'static str,
        detail: String,
    },
    #[error("TPM2_{command} returned something unexpected: {what}")]
    UnexpectedResponse {
        command: &'static str,
        what: &'static str,
    },
    #[error(
        "persistent handle {handle:#010x} holds a key that is not keyshard's {role} ({reason}); \
         remove it (tpm2_evictcontrol -c {handle:#010x}) or configure another handle"
    )]
    UnexpectedKey {
        handle: u32,
        role: &'static str,
        reason: &'static str,
    },
    #[error(
        "the TPM refuses to unseal: PCRs {selection} no longer hold the values the secret was \
         sealed to"
    )]
    PolicyRefused { selection: String },
    #[error(
        "the TPM cannot load the sealed blob: it was sealed by another TPM or storage root key, \
         or it was altered"
    )]
    ForeignBlob,
    #[error("cannot seal {len} bytes: 1 to 128 bytes can be sealed")]
    DataLength { len: usize },
    #[error("cannot measure {len} bytes into a PCR: at most 1024")]
    EventTooLong { len: usize },
    #[error("the TPM has no active {bank} PCR bank")]
    BankUnavailable { bank: &'static str },
    #[error("PCRs {selection} kept changing while they were read")]
    PcrsChanging { selection: String },
    #[error(transparent)]
    Pcr(#[from] PcrError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    DecryptKey(#[from] DecryptKeyError),
    #[error(
        "the TPM cannot load the decrypt key: it was made by another TPM or storage root key, \
         or it was altered"
    )]
    ForeignKey,
    #[error("a {len}-byte point: ECDH takes an uncompressed P-256 point (65 bytes, 0x04 first)")]
    PointFormat { len: usize },
    #[error("the TPM refuses the point: it is not on P-256")]
    PointNotOnCurve,
    #[error(
        "the TPM refuses to activate the credential: it was made for another EK or another \
         key name, or it was altered"
    )]
    CredentialRefused,
    #[error("the TPM owner thread has stopped")]
    ServiceStopped,
    #[error("cannot start the TPM owner thread: {0}")]
    Spawn(String),
    #[error("the batched quote failed: {0}")]
    Batched(String),
}

pub type Result<T> = std::result::Result<T, TpmError>;

/// A closure for `map_err` that turns a failed command into [`TpmError::Command`]. A failure of
/// the software stack or the transport (not an answer of the TPM) is noted for
/// [`take_stack_failure`]: the context that saw it may refuse every later command.
pub(crate) fn command(command: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |e| {
        if is_stack_failure(&e) {
            STACK_FAILED.with(|failed| failed.set(true));
        }
        TpmError::Command {
            command,
            detail: describe(&e),
        }
    }
}

thread_local! {
    /// Set on this thread when a command failed in the TSS stack or its TCTI.
    static STACK_FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a command on this thread failed in the software stack or the transport since the
/// last call (and clears it). After such a failure an ESYS context answers every later command
/// with BAD_SEQUENCE: the TPM service opens a new one.
pub(crate) fn take_stack_failure() -> bool {
    STACK_FAILED.with(|failed| failed.replace(false))
}

/// The response code's layer (bits 16..24) is ESYS (7), SYS (8) or TCTI (10): the stack or the
/// connection failed, not the TPM.
fn is_stack_failure(e: &tss_esapi::Error) -> bool {
    let tss_esapi::Error::Tss2Error(rc) = e else {
        return false;
    };
    raw_code(rc).is_some_and(|code| matches!((code >> 16) & 0xff, 7 | 8 | 10))
}

/// The response code's kind, if `e` is a TPM response code tss-esapi knows.
pub(crate) fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// "PolicyFail: a policy check failed ... [TPM2_RC 0x99d]", or the wrapper error's text.
pub(crate) fn describe(e: &tss_esapi::Error) -> String {
    match e {
        tss_esapi::Error::Tss2Error(rc) => match raw_code(rc) {
            Some(code) => format!("{rc} [TPM2_RC {code:#x}]"),
            None => rc.to_string(),
        },
        tss_esapi::Error::WrapperError(kind) => format!("tss-esapi: {kind}"),
    }
}

/// tss-esapi 7 has no accessor for the raw response code; its Debug output carries it as
/// `.0: N`.
fn raw_code(rc: &tss_esapi::constants::response_code::Tss2ResponseCode) -> Option<u32> {
    let debug = format!("{rc:?}");
    let (_, after) = debug.split_once(".0: ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
