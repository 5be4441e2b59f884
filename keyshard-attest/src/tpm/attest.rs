//! A strict parser for the TPMS_ATTEST of a TPM2_Quote and of a TPM2_Certify (TPM 2.0 Part 2,
//! 10.12.12), the bytes the attestation key signs. No TPM and no tss-esapi: this runs on the
//! verifier's side. Both share the header; the body follows the type.
//!
//! ```text
//! magic            u32   TPM_GENERATED_VALUE 0xff544347
//! type             u16   TPM_ST_ATTEST_QUOTE 0x8018 or TPM_ST_ATTEST_CERTIFY 0x8017
//! qualifiedSigner  TPM2B_NAME   (u16 size + bytes)
//! extraData        TPM2B_DATA   (u16 size + bytes): the verifier's nonce
//! clockInfo        clock u64, resetCount u32, restartCount u32, safe u8
//! firmwareVersion  u64
//! -- a quote (TPMS_QUOTE_INFO):
//! pcrSelect        TPML_PCR_SELECTION: count u32, then count x (hash u16, sizeofSelect u8,
//!                  pcrSelect[sizeofSelect])
//! pcrDigest        TPM2B_DIGEST (u16 size + bytes)
//! -- a certification (TPMS_CERTIFY_INFO):
//! name             TPM2B_NAME: the certified object's name
//! qualifiedName    TPM2B_NAME: its qualified name (the names of its parents folded in)
//! ```

use super::spec::{self, TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY, TPM_ST_ATTEST_QUOTE};
use super::wire::{Reader, WireError};

/// More banks than any TPM has (TPM2_NUM_PCR_BANKS is 16): refused.
const MAX_BANKS: u32 = 16;
/// TPM2_PCR_SELECT_MAX: a bitmap for up to 32 PCRs.
const MAX_SELECT_SIZE: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("magic is {found:#010x}, not TPM_GENERATED_VALUE: the TPM did not produce this")]
    Magic { found: u32 },
    #[error("attestation type is {found:#06x}, not a quote (0x8018)")]
    NotAQuote { found: u16 },
    #[error("attestation type is {found:#06x}, not a certification (0x8017)")]
    NotACertification { found: u16 },
    #[error("PCR selection lists {count} banks")]
    TooManyBanks { count: u32 },
    #[error("PCR selection bitmap of {size} bytes")]
    SelectTooLarge { size: u8 },
}

pub type Result<T> = std::result::Result<T, AttestError>;

/// TPMS_CLOCK_INFO: lets a verifier notice a TPM reset or restart between two quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// One TPMS_PCR_SELECTION as quoted: the bank's algorithm id and its PCR bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotedBank {
    pub alg: u16,
    pub bitmap: Vec<u8>,
}

impl QuotedBank {
    /// The PCR indices set in the bitmap.
    pub fn indices(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (byte_index, byte) in (0u8..).zip(self.bitmap.iter()) {
            for bit in 0..8u8 {
                if byte & (1 << bit) != 0 {
                    out.push(byte_index.saturating_mul(8).saturating_add(bit));
                }
            }
        }
        out
    }
}

/// A parsed quote, fields in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteAttest {
    pub signer_name: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: ClockInfo,
    pub firmware_version: u64,
    pub banks: Vec<QuotedBank>,
    pub pcr_digest: Vec<u8>,
}

impl QuoteAttest {
    /// Parses the whole structure; trailing bytes are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let header = Header::read(&mut r, TPM_ST_ATTEST_QUOTE)
            .map_err(|e| e.or_wrong_type(|found| AttestError::NotAQuote { found }))?;
        let Header {
            signer_name,
            extra_data,
            clock,
            firmware_version,
        } = header;
        let count = r.u32("pcrSelect.count")?;
        if count > MAX_BANKS {
            return Err(AttestError::TooManyBanks { count });
        }
        let mut banks = Vec::new();
        for _ in 0..count {
            let alg = r.u16("pcrSelect.hash")?;
            let size = r.u8("pcrSelect.sizeofSelect")?;
            if size > MAX_SELECT_SIZE {
                return Err(AttestError::SelectTooLarge { size });
            }
            let bitmap = r.bytes(usize::from(size), "pcrSelect.pcrSelect")?.to_vec();
            banks.push(QuotedBank { alg, bitmap });
        }
        let pcr_digest = r.sized("pcrDigest")?.to_vec();
        r.finish()?;
        Ok(Self {
            signer_name,
            extra_data,
            clock,
            firmware_version,
            banks,
            pcr_digest,
        })
    }

    /// The quoted selection as text, for error messages: "sha256:0,7", banks joined by "+",
    /// unknown algorithms by number.
    pub fn selection_text(&self) -> String {
        if self.banks.is_empty() {
            return "nothing".to_owned();
        }
        let parts: Vec<String> = self
            .banks
            .iter()
            .map(|bank| {
                let name = spec::bank_from_alg(bank.alg).map_or_else(
                    || format!("alg {:#06x}", bank.alg),
                    |b| b.as_str().to_owned(),
                );
                let indices: Vec<String> = bank.indices().iter().map(u8::to_string).collect();
                format!("{name}:{}", indices.join(","))
            })
            .collect();
        parts.join("+")
    }

    /// Encodes the TPMS_ATTEST; the inverse of [`QuoteAttest::parse`]. For tests and tools
    /// that build evidence (a TPM makes these bytes itself). None if a field is too long.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        write_header(
            &mut out,
            TPM_ST_ATTEST_QUOTE,
            &self.signer_name,
            &self.extra_data,
            &self.clock,
            self.firmware_version,
        )?;
        out.extend_from_slice(&u32::try_from(self.banks.len()).ok()?.to_be_bytes());
        for bank in &self.banks {
            out.extend_from_slice(&bank.alg.to_be_bytes());
            out.push(u8::try_from(bank.bitmap.len()).ok()?);
            out.extend_from_slice(&bank.bitmap);
        }
        super::wire::put_sized(&mut out, &self.pcr_digest)?;
        Some(out)
    }
}

/// The fields every TPMS_ATTEST starts with, after magic and type.
struct Header {
    signer_name: Vec<u8>,
    extra_data: Vec<u8>,
    clock: ClockInfo,
    firmware_version: u64,
}

/// Why a header did not read: a parse error, or another type than expected (which each
/// structure names with its own variant).
enum HeaderError {
    Attest(AttestError),
    WrongType(u16),
}

impl HeaderError {
    fn or_wrong_type(self, wrong: impl FnOnce(u16) -> AttestError) -> AttestError {
        match self {
            Self::Attest(e) => e,
            Self::WrongType(found) => wrong(found),
        }
    }
}

impl From<WireError> for HeaderError {
    fn from(e: WireError) -> Self {
        Self::Attest(AttestError::Wire(e))
    }
}

impl Header {
    /// Magic, type (must be `kind`), and the common fields.
    fn read(r: &mut Reader<'_>, kind: u16) -> std::result::Result<Self, HeaderError> {
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(HeaderError::Attest(AttestError::Magic { found: magic }));
        }
        let found = r.u16("type")?;
        if found != kind {
            return Err(HeaderError::WrongType(found));
        }
        Ok(Self {
            signer_name: r.sized("qualifiedSigner")?.to_vec(),
            extra_data: r.sized("extraData")?.to_vec(),
            clock: ClockInfo {
                clock: r.u64("clock")?,
                reset_count: r.u32("resetCount")?,
                restart_count: r.u32("restartCount")?,
                safe: r.u8("safe")? != 0,
            },
            firmware_version: r.u64("firmwareVersion")?,
        })
    }
}

/// Appends magic, `kind` and the common fields. None if a field is too long.
fn write_header(
    out: &mut Vec<u8>,
    kind: u16,
    signer_name: &[u8],
    extra_data: &[u8],
    clock: &ClockInfo,
    firmware_version: u64,
) -> Option<()> {
    out.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    super::wire::put_sized(out, signer_name)?;
    super::wire::put_sized(out, extra_data)?;
    out.extend_from_slice(&clock.clock.to_be_bytes());
    out.extend_from_slice(&clock.reset_count.to_be_bytes());
    out.extend_from_slice(&clock.restart_count.to_be_bytes());
    out.push(u8::from(clock.safe));
    out.extend_from_slice(&firmware_version.to_be_bytes());
    Some(())
}

/// A parsed TPM2_Certify attestation, fields in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifyAttest {
    pub signer_name: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: ClockInfo,
    pub firmware_version: u64,
    /// The certified object's name: nameAlg || H(TPMT_PUBLIC).
    pub name: Vec<u8>,
    pub qualified_name: Vec<u8>,
}

impl CertifyAttest {
    /// Parses the whole structure; trailing bytes are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let header = Header::read(&mut r, TPM_ST_ATTEST_CERTIFY)
            .map_err(|e| e.or_wrong_type(|found| AttestError::NotACertification { found }))?;
        let name = r.sized("certifyInfo.name")?.to_vec();
        let qualified_name = r.sized("certifyInfo.qualifiedName")?.to_vec();
        r.finish()?;
        Ok(Self {
            signer_name: header.signer_name,
            extra_data: header.extra_data,
            clock: header.clock,
            firmware_version: header.firmware_version,
            name,
            qualified_name,
        })
    }

    /// Encodes the TPMS_ATTEST; the inverse of [`CertifyAttest::parse`]. For tests and tools
    /// that build evidence. None if a field is too long.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        write_header(
            &mut out,
            TPM_ST_ATTEST_CERTIFY,
            &self.signer_name,
            &self.extra_data,
            &self.clock,
            self.firmware_version,
        )?;
        super::wire::put_sized(&mut out, &self.name)?;
        super::wire::put_sized(&mut out, &self.qualified_name)?;
        Some(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> QuoteAttest {
        QuoteAttest {
            signer_name: vec![0, 0x0b, 1, 2, 3],
            extra_data: vec![0x5a; 32],
            clock: ClockInfo {
                clock: 1234,
                reset_count: 1,
                restart_count: 2,
                safe: true,
            },
            firmware_version: 0x2019_1023_0016_3636,
            banks: vec![QuotedBank {
                alg: 0x000b,
                bitmap: vec![0x81, 0, 0],
            }],
            pcr_digest: vec![0xdd; 32],
        }
    }

    #[test]
    fn round_trips_and_names_the_selection() {
        let a = sample();
        let bytes = a.to_bytes().unwrap();
        assert_eq!(&bytes[..6], &[0xff, 0x54, 0x43, 0x47, 0x80, 0x18]);
        let parsed = QuoteAttest::parse(&bytes).unwrap();
        assert_eq!(parsed, a);
        assert_eq!(parsed.selection_text(), "sha256:0,7");
        assert_eq!(parsed.banks[0].indices(), vec![0, 7]);
    }

    #[test]
    fn refuses_every_truncation_and_trailing_bytes() {
        let bytes = sample().to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                QuoteAttest::parse(&bytes[..cut]).is_err(),
                "cut at {cut} parsed"
            );
        }
        let mut long = bytes;
        long.push(0);
        assert!(matches!(
            QuoteAttest::parse(&long),
            Err(AttestError::Wire(WireError::Trailing { .. }))
        ));
    }

    #[test]
    fn refuses_other_magic_types_and_oversized_selections() {
        let bytes = sample().to_bytes().unwrap();
        let mut bad = bytes.clone();
        bad[0] = 0;
        assert_eq!(
            QuoteAttest::parse(&bad),
            Err(AttestError::Magic { found: 0x0054_4347 })
        );
        let mut bad = bytes.clone();
        bad[5] = 0x17; // TPM_ST_ATTEST_CERTIFY
        assert_eq!(
            QuoteAttest::parse(&bad),
            Err(AttestError::NotAQuote { found: 0x8017 })
        );
        let mut a = sample();
        a.banks[0].bitmap = vec![0; 5];
        assert_eq!(
            QuoteAttest::parse(&a.to_bytes().unwrap()),
            Err(AttestError::SelectTooLarge { size: 5 })
        );
        let mut a = sample();
        a.banks = vec![a.banks[0].clone(); 17];
        assert_eq!(
            QuoteAttest::parse(&a.to_bytes().unwrap()),
            Err(AttestError::TooManyBanks { count: 17 })
        );
    }

    #[test]
    fn names_unknown_and_multiple_banks() {
        let mut a = sample();
        a.banks.push(QuotedBank {
            alg: 0x000d,
            bitmap: vec![0x02],
        });
        assert_eq!(a.selection_text(), "sha256:0,7+alg 0x000d:1");
        a.banks.clear();
        assert_eq!(a.selection_text(), "nothing");
    }

    pub(crate) fn certify_sample() -> CertifyAttest {
        CertifyAttest {
            signer_name: vec![0, 0x0b, 9, 9],
            extra_data: vec![0x5a; 32],
            clock: sample().clock,
            firmware_version: 7,
            name: vec![0, 0x0b, 1, 2, 3],
            qualified_name: vec![0, 0x0b, 4, 5, 6],
        }
    }

    #[test]
    fn a_certification_round_trips_and_refuses_truncation_and_other_types() {
        let c = certify_sample();
        let bytes = c.to_bytes().unwrap();
        assert_eq!(&bytes[..6], &[0xff, 0x54, 0x43, 0x47, 0x80, 0x17]);
        assert_eq!(CertifyAttest::parse(&bytes).unwrap(), c);
        for cut in 0..bytes.len() {
            assert!(CertifyAttest::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            CertifyAttest::parse(&long),
            Err(AttestError::Wire(WireError::Trailing { .. }))
        ));
        let quote = sample().to_bytes().unwrap();
        assert_eq!(
            CertifyAttest::parse(&quote),
            Err(AttestError::NotACertification { found: 0x8018 })
        );
        assert_eq!(
            QuoteAttest::parse(&bytes),
            Err(AttestError::NotAQuote { found: 0x8017 })
        );
        let mut bad = bytes;
        bad[3] = 0;
        assert_eq!(
            CertifyAttest::parse(&bad),
            Err(AttestError::Magic { found: 0xff54_4300 })
        );
    }
}
