//! The canonical byte layouts of instance evidence and an instance policy, version 1, and their
//! strict parsers. Integers are little-endian; every length is checked before anything is read,
//! nothing may follow the last field, and whatever parses re-encodes to the same bytes.
//!
//! Evidence:
//!
//! | offset | size | field                                                            |
//! |--------|------|------------------------------------------------------------------|
//! | 0      | 4    | magic `KSIE`                                                     |
//! | 4      | 1    | version, 1                                                       |
//! | 5      | 32   | the verifier's nonce this evidence answers                       |
//! | 37     | 32   | the instance's ephemeral X25519 public key                       |
//! | 69     | 2    | A: length of the quote's TPMS_ATTEST, 1..=[`MAX_ATTEST_LEN`]     |
//! | 71     | A    | TPMS_ATTEST of a TPM2_Quote (must parse as one)                  |
//! | 71+A   | 64   | the AK's ECDSA P-256 signature, r \|\| s, big-endian             |
//! | 135+A  | 2    | P: length of the PCR record, 1..=[`MAX_PCR_RECORD_LEN`]          |
//! | 137+A  | P    | the PCR values the instance read (`KSPV` record, keyshard-attest)|
//!
//! Policy:
//!
//! | offset | size | field                                                            |
//! |--------|------|------------------------------------------------------------------|
//! | 0      | 4    | magic `KSIP`                                                     |
//! | 4      | 1    | version, 1                                                       |
//! | 5      | 65   | the instance's attestation key, SEC1 uncompressed P-256 point    |
//! | 70     | 2    | P: length of the golden PCR record, 1..=[`MAX_PCR_RECORD_LEN`]   |
//! | 72     | P    | the golden PCR values (`KSPV` record, keyshard-attest)           |

use keyshard_attest::tpm::attest::{AttestError, QuoteAttest};
use keyshard_attest::tpm::{AK_PUBLIC_LEN, AkPublic, PcrError, PcrValues, Quote};
use keyshard_core::bytes::{Reader, Truncated};

use super::answer::FetchPublicKey;
use super::{InstanceEvidence, InstancePolicy, NONCE_LEN};

pub const EVIDENCE_MAGIC: [u8; 4] = *b"KSIE";
pub const POLICY_MAGIC: [u8; 4] = *b"KSIP";
pub const VERSION: u8 = 1;
/// The longest TPMS_ATTEST accepted: a quote is a few hundred bytes (a TPM's TPM2B_ATTEST
/// buffer is about 1 KiB).
pub const MAX_ATTEST_LEN: usize = 1024;
/// The longest PCR record: all 24 PCRs of a SHA-384 bank.
pub const MAX_PCR_RECORD_LEN: usize = 8 + 24 * (1 + 48);
const SIGNATURE_LEN: usize = 64;
/// The longest evidence.
pub const MAX_EVIDENCE_LEN: usize =
    4 + 1 + NONCE_LEN + 32 + 2 + MAX_ATTEST_LEN + SIGNATURE_LEN + 2 + MAX_PCR_RECORD_LEN;
/// The longest policy.
pub const MAX_POLICY_LEN: usize = 4 + 1 + AK_PUBLIC_LEN + 2 + MAX_PCR_RECORD_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: {field} is missing or short")]
    Truncated {
        what: &'static str,
        field: &'static str,
    },
    #[error("{what}: {len} bytes, at most {max} are allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("not {what} (bad magic)")]
    Magic { what: &'static str },
    #[error("{what} format version {version} is not supported (expected {VERSION})")]
    Version { what: &'static str, version: u8 },
    #[error("{what}: the {field} is {len} bytes, 1..={max} are allowed")]
    FieldLength {
        what: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("instance evidence: the quote is not a TPM quote: {0}")]
    Attest(AttestError),
    #[error("{what}: the PCR values: {source}")]
    Pcrs {
        what: &'static str,
        source: PcrError,
    },
    #[error("instance policy: the attestation key is not an uncompressed P-256 point")]
    AkKey,
    #[error("{what}: {extra} bytes after the last field")]
    Trailing { what: &'static str, extra: usize },
}

pub type Result<T> = std::result::Result<T, FormatError>;

const EVIDENCE: &str = "instance evidence";
const POLICY: &str = "instance policy";

impl InstanceEvidence {
    /// The layout in the module documentation.
    pub fn to_bytes(&self) -> Vec<u8> {
        let pcrs = self.pcrs.to_bytes();
        let mut out =
            Vec::with_capacity(4 + 1 + 64 + 2 + self.quote.attest.len() + 64 + 2 + pcrs.len());
        out.extend_from_slice(&EVIDENCE_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(self.ephemeral.as_bytes());
        push_sized(&mut out, &self.quote.attest);
        out.extend_from_slice(&self.quote.signature);
        push_sized(&mut out, &pcrs);
        out
    }

    /// Parses evidence strictly: magic, version, bounded lengths, a TPMS_ATTEST that parses as
    /// a quote, a valid PCR record, nothing after it. Checks no signature: that is
    /// [`super::verify`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        header(
            &mut r,
            bytes.len(),
            EVIDENCE,
            EVIDENCE_MAGIC,
            MAX_EVIDENCE_LEN,
        )?;
        let nonce = r.array::<NONCE_LEN>("nonce").map_err(truncated(EVIDENCE))?;
        let ephemeral = FetchPublicKey::from_bytes(
            r.array::<32>("ephemeral key")
                .map_err(truncated(EVIDENCE))?,
        );
        let attest = sized(&mut r, EVIDENCE, "quote", MAX_ATTEST_LEN)?;
        QuoteAttest::parse(attest).map_err(FormatError::Attest)?;
        let signature = r
            .array::<SIGNATURE_LEN>("signature")
            .map_err(truncated(EVIDENCE))?;
        let pcrs = pcr_record(&mut r, EVIDENCE)?;
        finish(&r, EVIDENCE)?;
        Ok(Self {
            nonce,
            ephemeral,
            quote: Quote {
                attest: attest.to_vec(),
                signature,
            },
            pcrs,
        })
    }
}

impl InstancePolicy {
    /// The layout in the module documentation.
    pub fn to_bytes(&self) -> Vec<u8> {
        let golden = self.golden.to_bytes();
        let mut out = Vec::with_capacity(4 + 1 + AK_PUBLIC_LEN + 2 + golden.len());
        out.extend_from_slice(&POLICY_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.ak.to_sec1());
        push_sized(&mut out, &golden);
        out
    }

    /// Parses a policy strictly: magic, version, a valid P-256 AK, a valid PCR record, nothing
    /// after it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        header(&mut r, bytes.len(), POLICY, POLICY_MAGIC, MAX_POLICY_LEN)?;
        let ak = r
            .take(AK_PUBLIC_LEN, "attestation key")
            .map_err(truncated(POLICY))?;
        let ak = AkPublic::from_sec1(ak).map_err(|_| FormatError::AkKey)?;
        let golden = pcr_record(&mut r, POLICY)?;
        finish(&r, POLICY)?;
        Ok(Self { ak, golden })
    }
}

fn truncated(what: &'static str) -> impl Fn(Truncated) -> FormatError {
    move |t| FormatError::Truncated {
        what,
        field: t.field,
    }
}

fn header(
    r: &mut Reader<'_>,
    len: usize,
    what: &'static str,
    magic: [u8; 4],
    max: usize,
) -> Result<()> {
    if len > max {
        return Err(FormatError::TooLong { what, len, max });
    }
    if r.array::<4>("magic").map_err(truncated(what))? != magic {
        return Err(FormatError::Magic { what });
    }
    let version = r.u8("version").map_err(truncated(what))?;
    if version != VERSION {
        return Err(FormatError::Version { what, version });
    }
    Ok(())
}

/// A two-byte length, 1..=`max`, then that many bytes.
fn sized<'a>(
    r: &mut Reader<'a>,
    what: &'static str,
    field: &'static str,
    max: usize,
) -> Result<&'a [u8]> {
    let len = usize::from(r.u16(field).map_err(truncated(what))?);
    if len == 0 || len > max {
        return Err(FormatError::FieldLength {
            what,
            field,
            len,
            max,
        });
    }
    r.take(len, field).map_err(truncated(what))
}

fn pcr_record(r: &mut Reader<'_>, what: &'static str) -> Result<PcrValues> {
    let record = sized(r, what, "PCR record", MAX_PCR_RECORD_LEN)?;
    PcrValues::parse(record).map_err(|source| FormatError::Pcrs { what, source })
}

fn finish(r: &Reader<'_>, what: &'static str) -> Result<()> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(FormatError::Trailing { what, extra }),
    }
}

/// Appends a two-byte length and `body`. Every body written here is bounded far below 64 KiB
/// by its type (a TPMS_ATTEST from a TPM, a PCR record of at most 24 values).
fn push_sized(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(body);
}
