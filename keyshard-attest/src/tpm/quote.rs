//! TPM quotes and their verification in software, against a pinned attestation key, a fresh
//! nonce and golden PCR values: what the coordinator trusts before it asks the TPM to unseal.

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};

use super::attest::{AttestError, QuoteAttest};
use super::pcr::{PcrSelection, PcrValues};
use super::spec::{self, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE};

/// Bytes of the qualifying data (nonce) a quote carries.
pub const NONCE_LEN: usize = 32;
/// Bytes of an uncompressed SEC1 P-256 point: 0x04 || x || y.
pub const AK_PUBLIC_LEN: usize = 65;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("the attestation key is not an uncompressed P-256 point")]
    AkKey,
    #[error("the quote's signature does not verify with the attestation key")]
    Signature,
    #[error("the quote is malformed: {0}")]
    Malformed(AttestError),
    #[error("the quote's magic is {found:#010x}, not TPM_GENERATED_VALUE")]
    Magic { found: u32 },
    #[error("the attestation is of type {found:#06x}, not a quote")]
    NotAQuote { found: u16 },
    #[error("the quote answers another nonce (stale or replayed)")]
    Nonce,
    #[error("the quote covers {found}, not {expected}")]
    Selection { expected: String, found: String },
    #[error("the quoted PCR digest does not match the golden values of {selection}")]
    PcrDigest { selection: String },
}

pub type Result<T> = std::result::Result<T, QuoteError>;

/// A TPM2_Quote as the TPM returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The marshalled TPMS_ATTEST: exactly the bytes that were signed.
    pub attest: Vec<u8>,
    /// ECDSA P-256 signature over SHA-256(attest): r || s, 32 bytes each, big-endian.
    pub signature: [u8; 64],
}

/// What a verified quote says beyond "the PCRs hold the golden values".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuoteInfo {
    /// Milliseconds the TPM has been powered, as the TPM counts them.
    pub clock: u64,
    /// TPM resets (reboots) so far; a change between two quotes means a reboot.
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
}

/// The public half of the attestation key: a P-256 ECDSA key, pinned by the verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkPublic(VerifyingKey);

impl AkPublic {
    /// From the 65-byte uncompressed SEC1 encoding (0x04 || x || y).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != AK_PUBLIC_LEN || bytes.first() != Some(&0x04) {
            return Err(QuoteError::AkKey);
        }
        VerifyingKey::from_sec1_bytes(bytes)
            .map(Self)
            .map_err(|_| QuoteError::AkKey)
    }

    /// From the TPM's TPMS_ECC_POINT coordinates, which may lack leading zero bytes.
    pub fn from_coordinates(x: &[u8], y: &[u8]) -> Result<Self> {
        let mut sec1 = [0u8; AK_PUBLIC_LEN];
        sec1[0] = 0x04;
        let (xs, ys) = sec1[1..].split_at_mut(32);
        left_pad(xs, x).ok_or(QuoteError::AkKey)?;
        left_pad(ys, y).ok_or(QuoteError::AkKey)?;
        Self::from_sec1(&sec1)
    }

    /// The 65-byte uncompressed SEC1 encoding.
    pub fn to_sec1(&self) -> Vec<u8> {
        self.0.to_encoded_point(false).as_bytes().to_vec()
    }

    /// Whether `signature` (r || s) is this key's ECDSA-SHA256 signature over `message`.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        // p256's Verifier hashes the message with SHA-256: the AK's ECDSA-SHA256 scheme.
        Signature::from_slice(signature).is_ok_and(|sig| self.0.verify(message, &sig).is_ok())
    }
}

/// Copies a big-endian integer into `out`, right-aligned. None if it does not fit.
pub fn left_pad(out: &mut [u8], value: &[u8]) -> Option<()> {
    let start = value.iter().position(|b| *b != 0).unwrap_or(value.len());
    let value = value.get(start..)?;
    let offset = out.len().checked_sub(value.len())?;
    out.get_mut(offset..)?.copy_from_slice(value);
    Some(())
}

/// Verifies a quote, in this order, each failure its own [`QuoteError`]:
/// 1. the signature over the attest bytes, with `ak` (nothing else counts before this);
/// 2. magic TPM_GENERATED_VALUE, then type TPM_ST_ATTEST_QUOTE;
/// 3. the structure parses completely;
/// 4. extraData is `nonce` (freshness);
/// 5. the quoted PCR selection is exactly the golden values' bank and indices;
/// 6. the quoted PCR digest is SHA-256 over the golden values.
///
/// On a [`QuoteError::PcrDigest`] the TPM's PCRs differ from the golden values; read them
/// (`Tpm::read_pcrs`) and call [`super::differing_pcrs`] to name which.
pub fn verify_quote(
    quote: &Quote,
    ak: &AkPublic,
    nonce: &[u8; NONCE_LEN],
    golden: &PcrValues,
) -> Result<QuoteInfo> {
    verify_quote_digest(
        quote,
        ak,
        nonce,
        golden.selection(),
        &golden.composite_digest(),
    )
}

/// [`verify_quote`] against a golden PCR *digest* (SHA-256 over the golden values of
/// `selection`, in order) instead of the values: what a guest checks, whose manifest pins only
/// the digest. The same checks in the same order.
pub fn verify_quote_digest(
    quote: &Quote,
    ak: &AkPublic,
    nonce: &[u8; NONCE_LEN],
    expected: &PcrSelection,
    golden_digest: &[u8; 32],
) -> Result<QuoteInfo> {
    if !ak.verifies(&quote.attest, &quote.signature) {
        return Err(QuoteError::Signature);
    }
    check_header(&quote.attest)?;
    let attest = QuoteAttest::parse(&quote.attest).map_err(QuoteError::Malformed)?;
    if attest.extra_data != nonce {
        return Err(QuoteError::Nonce);
    }
    let matches = match attest.banks.as_slice() {
        [bank] => {
            spec::bank_from_alg(bank.alg) == Some(expected.bank())
                && bank.indices() == expected.indices()
        }
        _ => false,
    };
    if !matches {
        return Err(QuoteError::Selection {
            expected: expected.to_string(),
            found: attest.selection_text(),
        });
    }
    if attest.pcr_digest != golden_digest {
        return Err(QuoteError::PcrDigest {
            selection: expected.to_string(),
        });
    }
    Ok(QuoteInfo {
        clock: attest.clock.clock,
        reset_count: attest.clock.reset_count,
        restart_count: attest.clock.restart_count,
        firmware_version: attest.firmware_version,
    })
}

/// Magic and type, read from the raw bytes so that they get their own errors.
fn check_header(bytes: &[u8]) -> Result<()> {
    let mut r = super::wire::Reader::new(bytes);
    let magic = r
        .u32("magic")
        .map_err(|e| QuoteError::Malformed(e.into()))?;
    if magic != TPM_GENERATED_VALUE {
        return Err(QuoteError::Magic { found: magic });
    }
    let kind = r.u16("type").map_err(|e| QuoteError::Malformed(e.into()))?;
    if kind != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteError::NotAQuote { found: kind });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use keyshard_core::policy::PcrBank;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;

    use super::super::attest::QuotedBank;
    use super::super::attest::tests::sample;
    use super::*;

    const NONCE: [u8; 32] = [0x5a; 32];

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn ak(key: &SigningKey) -> AkPublic {
        AkPublic::from_sec1(key.verifying_key().to_encoded_point(false).as_bytes()).unwrap()
    }

    fn golden() -> PcrValues {
        PcrValues::new(PcrBank::Sha256, vec![(0, vec![1; 32]), (7, vec![2; 32])]).unwrap()
    }

    /// A quote over `attest` bytes, signed like a TPM would with `key`.
    fn signed(key: &SigningKey, attest: Vec<u8>) -> Quote {
        let sig: Signature = key.sign(&attest);
        Quote {
            attest,
            signature: sig.to_bytes().into(),
        }
    }

    fn good_attest() -> QuoteAttest {
        let mut a = sample();
        a.extra_data = NONCE.to_vec();
        a.pcr_digest = golden().composite_digest().to_vec();
        a
    }

    fn verify_attest(a: &QuoteAttest) -> Result<QuoteInfo> {
        let k = key(1);
        verify_quote(
            &signed(&k, a.to_bytes().unwrap()),
            &ak(&k),
            &NONCE,
            &golden(),
        )
    }

    #[test]
    fn a_good_quote_verifies_and_reports_the_clock() {
        let info = verify_attest(&good_attest()).unwrap();
        assert_eq!(info.reset_count, 1);
        assert_eq!(info.restart_count, 2);
        assert_eq!(info.clock, 1234);
    }

    #[test]
    fn each_mismatch_has_its_own_error() {
        let mut a = good_attest();
        a.extra_data = vec![0; 32];
        assert_eq!(verify_attest(&a), Err(QuoteError::Nonce));

        let mut a = good_attest();
        a.banks[0].bitmap = vec![0x01, 0, 0];
        assert_eq!(
            verify_attest(&a),
            Err(QuoteError::Selection {
                expected: "sha256:0,7".into(),
                found: "sha256:0".into()
            })
        );
        let mut a = good_attest();
        a.banks[0].alg = 0x0004;
        assert!(matches!(
            verify_attest(&a),
            Err(QuoteError::Selection { found, .. }) if found == "sha1:0,7"
        ));
        let mut a = good_attest();
        a.banks.push(QuotedBank {
            alg: 0x0004,
            bitmap: vec![0x80, 0, 0],
        });
        assert!(matches!(
            verify_attest(&a),
            Err(QuoteError::Selection { .. })
        ));

        let mut a = good_attest();
        a.pcr_digest[0] ^= 1;
        assert_eq!(
            verify_attest(&a),
            Err(QuoteError::PcrDigest {
                selection: "sha256:0,7".into()
            })
        );
    }

    #[test]
    fn magic_and_type_are_checked_even_when_signed() {
        // A restricted AK never signs such bytes; a compromised or unrestricted key could.
        let k = key(1);
        let mut bytes = good_attest().to_bytes().unwrap();
        bytes[0] = 0;
        assert_eq!(
            verify_quote(&signed(&k, bytes), &ak(&k), &NONCE, &golden()),
            Err(QuoteError::Magic { found: 0x0054_4347 })
        );
        let mut bytes = good_attest().to_bytes().unwrap();
        bytes[5] = 0x17;
        assert_eq!(
            verify_quote(&signed(&k, bytes), &ak(&k), &NONCE, &golden()),
            Err(QuoteError::NotAQuote { found: 0x8017 })
        );
        let mut bytes = good_attest().to_bytes().unwrap();
        bytes.push(0);
        assert!(matches!(
            verify_quote(&signed(&k, bytes), &ak(&k), &NONCE, &golden()),
            Err(QuoteError::Malformed(_))
        ));
    }

    #[test]
    fn tampering_or_another_key_breaks_the_signature() {
        let k = key(1);
        let quote = signed(&k, good_attest().to_bytes().unwrap());
        assert!(verify_quote(&quote, &ak(&k), &NONCE, &golden()).is_ok());

        let mut tampered = quote.clone();
        let last = tampered.attest.len() - 1;
        tampered.attest[last] ^= 1; // the PCR digest's last byte
        assert_eq!(
            verify_quote(&tampered, &ak(&k), &NONCE, &golden()),
            Err(QuoteError::Signature)
        );
        assert_eq!(
            verify_quote(&quote, &ak(&key(2)), &NONCE, &golden()),
            Err(QuoteError::Signature)
        );
        let mut zero = quote;
        zero.signature = [0; 64];
        assert_eq!(
            verify_quote(&zero, &ak(&k), &NONCE, &golden()),
            Err(QuoteError::Signature)
        );
    }

    #[test]
    fn ak_public_is_strict_sec1() {
        let k = key(3);
        let sec1 = ak(&k).to_sec1();
        assert_eq!(sec1.len(), 65);
        assert_eq!(sec1[0], 0x04);
        assert_eq!(AkPublic::from_sec1(&sec1).unwrap(), ak(&k));
        assert_eq!(AkPublic::from_sec1(&sec1[..64]), Err(QuoteError::AkKey));
        let compressed = k.verifying_key().to_encoded_point(true);
        assert_eq!(
            AkPublic::from_sec1(compressed.as_bytes()),
            Err(QuoteError::AkKey)
        );
        let mut off_curve = sec1.clone();
        off_curve[64] ^= 1;
        assert_eq!(AkPublic::from_sec1(&off_curve), Err(QuoteError::AkKey));
        // coordinates without their leading zero bytes, as a TPM may send them
        let (x, y) = sec1[1..].split_at(32);
        assert_eq!(AkPublic::from_coordinates(x, y).unwrap(), ak(&k));
        assert_eq!(
            AkPublic::from_coordinates(&[1; 33], y),
            Err(QuoteError::AkKey)
        );
    }

    #[test]
    fn left_pad_right_aligns() {
        let mut out = [9u8; 4];
        left_pad(&mut out, &[0, 0, 1, 2]).unwrap();
        assert_eq!(out, [9, 9, 1, 2]); // only the tail is written; callers pass zeros
        let mut out = [0u8; 2];
        assert!(left_pad(&mut out, &[1, 2, 3]).is_none());
    }
}
