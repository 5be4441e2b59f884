//! The report signature: ECDSA P-384 with SHA-384 by the VCEK, checked with aws-lc-rs over the
//! raw signed bytes `0..0x2A0` as received. (The `sev` crate hashes its own re-encoding of the
//! parsed report instead, which drops the reserved bytes of the TCB fields.)

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, ParsedPublicKey};

use super::report::{Report, SIG_COMPONENT_LEN};

/// The report's SIGNATURE_ALGO for ECDSA P-384 with SHA-384, the only one defined.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// Bytes of a P-384 scalar.
const SCALAR_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("bytes {SCALAR_LEN}..{SIG_COMPONENT_LEN} of the signature's r or s are not zero")]
    Padding,
    #[error("the VCEK's key is not a valid P-384 point")]
    Key,
    #[error("the report's signature does not verify under the VCEK's key")]
    Invalid,
}

pub type Result<T> = std::result::Result<T, SignatureError>;

/// The VCEK's key (an uncompressed SEC1 point), parsed once and kept with the VCEK.
pub fn vcek_key(point: &[u8]) -> Result<ParsedPublicKey> {
    ParsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point).map_err(|_| SignatureError::Key)
}

/// A 72-byte little-endian component as the 48-byte big-endian scalar; the top 24 bytes must be
/// zero (they are not signed, so anything there would be malleable).
fn big_endian_scalar(le: &[u8; SIG_COMPONENT_LEN]) -> Result<[u8; SCALAR_LEN]> {
    let (low, high) = le
        .split_first_chunk::<SCALAR_LEN>()
        .ok_or(SignatureError::Padding)?;
    if high.iter().any(|&b| b != 0) {
        return Err(SignatureError::Padding);
    }
    let mut be = *low;
    be.reverse();
    Ok(be)
}

/// The signature as aws-lc-rs's FIXED encoding wants it: big-endian r || s, 96 bytes.
pub fn fixed_signature(report: &Report) -> Result<Vec<u8>> {
    let r = big_endian_scalar(report.signature_r())?;
    let s = big_endian_scalar(report.signature_s())?;
    Ok(r.iter().chain(s.iter()).copied().collect())
}

/// Checks the signature over the raw signed bytes.
pub fn verify_report_signature(report: &Report, key: &ParsedPublicKey) -> Result<()> {
    let signature = fixed_signature(report)?;
    key.verify_sig(report.signed_bytes(), &signature)
        .map_err(|_| SignatureError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::fixtures::{MILAN_VCEK_DER, milan_report_bytes};
    use crate::snp::report::{OFF_SIG_R, OFF_SIG_S, SIGNED_LEN};
    use crate::snp::vcek::Vcek;

    fn key() -> ParsedPublicKey {
        vcek_key(
            &Vcek::from_der(MILAN_VCEK_DER)
                .unwrap()
                .info()
                .unwrap()
                .public_key,
        )
        .unwrap()
    }

    fn check(bytes: &[u8]) -> Result<()> {
        verify_report_signature(&Report::from_bytes(bytes).unwrap(), &key())
    }

    #[test]
    fn real_report_verifies() {
        check(&milan_report_bytes()).unwrap();
    }

    #[test]
    fn any_flipped_signed_byte_fails() {
        let good = milan_report_bytes();
        let key = key();
        for offset in 0..SIGNED_LEN {
            let mut bytes = good.clone();
            bytes[offset] ^= 0x01;
            let report = Report::from_bytes(&bytes).unwrap();
            assert_eq!(
                verify_report_signature(&report, &key),
                Err(SignatureError::Invalid),
                "offset {offset:#x}"
            );
        }
    }

    #[test]
    fn signature_bytes_and_padding() {
        let good = milan_report_bytes();
        let mut bytes = good.clone();
        bytes[OFF_SIG_S] ^= 0x01;
        assert_eq!(check(&bytes), Err(SignatureError::Invalid));
        let mut bytes = good.clone();
        bytes[OFF_SIG_R + 60] = 1;
        assert_eq!(check(&bytes), Err(SignatureError::Padding));
        let mut bytes = good.clone();
        bytes[OFF_SIG_S + 71] = 1;
        assert_eq!(check(&bytes), Err(SignatureError::Padding));
        // The unsigned reserved tail after the signature is covered by nothing.
        let mut bytes = good;
        bytes[0x400] ^= 0xFF;
        check(&bytes).unwrap();
    }

    #[test]
    fn a_bad_point_is_not_a_key() {
        assert_eq!(vcek_key(&[0x04; 97]).err(), Some(SignatureError::Key));
        assert_eq!(vcek_key(&[]).err(), Some(SignatureError::Key));
    }
}
