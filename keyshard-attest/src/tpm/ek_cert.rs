//! An endorsement key certificate checked against a CA bundle in software: what the CMS
//! checks before it makes a credential to a host's EK. The path goes from the EK certificate
//! through certificates of the bundle to a self-signed certificate of the bundle.
//!
//! Checked, for every certificate on the path: the signature (RSA PKCS#1 v1.5 with SHA-256,
//! -384 or -512, what swtpm_localca and most TPM vendors use, or ECDSA P-256/P-384 with SHA-256
//! or -384), signatureAlgorithm equal to the signed one, validity at the given time, and that
//! every issuer is a CA (basicConstraints cA = TRUE). The EK certificate's key must be RSA
//! 2048, ECC P-256 or ECC P-384 (what [`super::credential::make_credential`] takes).
//!
//! Not checked: revocation (no CRL or OCSP: no network), name constraints, certificate
//! policies, path length constraints, key usage and extended key usage (tcg-kp-EKCertificate),
//! and the TPM manufacturer and model in the subject alternative name. A bundle is a set of
//! trust anchors: anything it holds may issue EK certificates.

use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_cert::Certificate;
use x509_cert::der::asn1::ObjectIdentifier as Oid;
use x509_cert::der::{Decode, DecodePem, Encode};
use x509_cert::ext::pkix::BasicConstraints;

/// Certificates a path may hold, the EK certificate included: more is refused.
const MAX_PATH: usize = 5;
/// Largest EK certificate taken (NV indices hold at most a few KiB).
pub const MAX_EK_CERT_LEN: usize = 8192;

const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
const BASIC_CONSTRAINTS: Oid = Oid::new_unwrap("2.5.29.19");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertError {
    #[error("the EK certificate is {len} bytes, more than {MAX_EK_CERT_LEN}")]
    TooLong { len: usize },
    #[error("the EK certificate is not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("the CA bundle holds no certificate, or one that does not parse: {0}")]
    Bundle(String),
    #[error(
        "certificate {subject:?}: signatureAlgorithm differs from the signed one, or the signature has unused bits"
    )]
    UnsignedParts { subject: String },
    #[error(
        "certificate {subject:?} is not valid at this time (valid {not_before} to {not_after}, unix seconds)"
    )]
    Validity {
        subject: String,
        not_before: u64,
        not_after: u64,
    },
    #[error(
        "no certificate of the bundle issued {subject:?} (issuer {issuer:?}) with a signature that verifies"
    )]
    Untrusted { subject: String, issuer: String },
    #[error("certificate {subject:?} issues certificates but is not a CA (basicConstraints)")]
    NotACa { subject: String },
    #[error("the path from the EK certificate is longer than {MAX_PATH} certificates")]
    PathTooLong,
    #[error("the EK certificate's key is not an RSA 2048, ECC P-256 or ECC P-384 key")]
    EkKey,
}

pub type Result<T> = std::result::Result<T, EkCertError>;

/// Trust anchors for EK certificates: a TPM vendor's roots and intermediates, or in tests
/// swtpm_localca's root and issuer.
#[derive(Debug, Clone)]
pub struct CaBundle {
    certs: Vec<Certificate>,
}

impl CaBundle {
    /// From PEM text holding one or more certificates (text outside the BEGIN/END
    /// CERTIFICATE blocks is ignored). Not `Certificate::load_pem_chain`: in x509-cert 0.2.5
    /// it subtracts with overflow (a panic in debug builds) on empty input.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        const END: &[u8] = b"-----END CERTIFICATE-----";
        const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
        let mut certs = Vec::new();
        let mut rest = pem;
        while let Some(begin) = find(rest, BEGIN) {
            let block = rest.get(begin..).unwrap_or_default();
            let end = find(block, END)
                .map(|end| end.saturating_add(END.len()))
                .ok_or_else(|| EkCertError::Bundle("a certificate without its END line".into()))?;
            let (cert, after) = block.split_at_checked(end).unwrap_or((block, &[]));
            certs
                .push(Certificate::from_pem(cert).map_err(|e| EkCertError::Bundle(e.to_string()))?);
            rest = after;
        }
        if certs.is_empty() {
            return Err(EkCertError::Bundle("no certificate".to_owned()));
        }
        Ok(Self { certs })
    }

    /// How many certificates the bundle holds.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// A verified EK certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEk {
    /// The EK's SubjectPublicKeyInfo (DER): what MakeCredential encrypts the seed to.
    pub spki: Vec<u8>,
    /// Certificates on the path, the EK certificate and the root included.
    pub path_len: usize,
    /// The subject of the root the path ends at.
    pub root: String,
}

/// Verifies the DER EK certificate `ek_der` against `bundle` at time `now` (see the module
/// documentation for what is and is not checked); returns the EK's public key.
pub fn verify_ek_certificate(
    ek_der: &[u8],
    bundle: &CaBundle,
    now: SystemTime,
) -> Result<VerifiedEk> {
    if ek_der.len() > MAX_EK_CERT_LEN {
        return Err(EkCertError::TooLong { len: ek_der.len() });
    }
    let leaf = Certificate::from_der(ek_der).map_err(|e| EkCertError::Parse(e.to_string()))?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    check_alone(&leaf, now)?;
    let spki = ek_key(&leaf)?;
    let mut current = &leaf;
    for path_len in 2..=MAX_PATH {
        let issuer = find_issuer(current, bundle)?;
        check_alone(issuer, now)?;
        if !is_ca(issuer) {
            return Err(EkCertError::NotACa {
                subject: issuer.tbs_certificate.subject.to_string(),
            });
        }
        if self_signed(issuer) {
            return Ok(VerifiedEk {
                spki,
                path_len,
                root: issuer.tbs_certificate.subject.to_string(),
            });
        }
        current = issuer;
    }
    Err(EkCertError::PathTooLong)
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What a certificate must satisfy on its own: well-formed unsigned parts, valid now.
fn check_alone(cert: &Certificate, now: Duration) -> Result<()> {
    let subject = || cert.tbs_certificate.subject.to_string();
    if cert.signature_algorithm != cert.tbs_certificate.signature
        || cert.signature.as_bytes().is_none()
    {
        return Err(EkCertError::UnsignedParts { subject: subject() });
    }
    let validity = &cert.tbs_certificate.validity;
    let not_before = validity.not_before.to_unix_duration();
    let not_after = validity.not_after.to_unix_duration();
    if now < not_before || now > not_after {
        return Err(EkCertError::Validity {
            subject: subject(),
            not_before: not_before.as_secs(),
            not_after: not_after.as_secs(),
        });
    }
    Ok(())
}

/// The bundle certificate whose subject is `cert`'s issuer and whose key verifies its
/// signature.
fn find_issuer<'a>(cert: &Certificate, bundle: &'a CaBundle) -> Result<&'a Certificate> {
    bundle
        .certs
        .iter()
        .filter(|candidate| candidate.tbs_certificate.subject == cert.tbs_certificate.issuer)
        .find(|candidate| signed_by(cert, candidate))
        .ok_or_else(|| EkCertError::Untrusted {
            subject: cert.tbs_certificate.subject.to_string(),
            issuer: cert.tbs_certificate.issuer.to_string(),
        })
}

fn self_signed(cert: &Certificate) -> bool {
    cert.tbs_certificate.subject == cert.tbs_certificate.issuer && signed_by(cert, cert)
}

/// Whether `issuer`'s key verifies `cert`'s signature over its DER tbsCertificate.
fn signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    let spki = &issuer.tbs_certificate.subject_public_key_info;
    let Some(key) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    let Some(signature) = cert.signature.as_bytes() else {
        return false;
    };
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<Oid>().ok());
    let Some(algorithm) = algorithm(cert.signature_algorithm.oid, spki.algorithm.oid, curve) else {
        return false;
    };
    let Ok(tbs) = cert.tbs_certificate.to_der() else {
        return false;
    };
    UnparsedPublicKey::new(algorithm, key)
        .verify(&tbs, signature)
        .is_ok()
}

/// The aws-lc-rs algorithm for a signature OID and the signer's key type (and curve).
fn algorithm(
    signature: Oid,
    key: Oid,
    curve: Option<Oid>,
) -> Option<&'static dyn VerificationAlgorithm> {
    match (signature, key, curve) {
        (SHA256_WITH_RSA, RSA_ENCRYPTION, _) => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
        (SHA384_WITH_RSA, RSA_ENCRYPTION, _) => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
        (SHA512_WITH_RSA, RSA_ENCRYPTION, _) => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
        (ECDSA_WITH_SHA256, EC_PUBLIC_KEY, Some(P256)) => Some(&signature::ECDSA_P256_SHA256_ASN1),
        (ECDSA_WITH_SHA384, EC_PUBLIC_KEY, Some(P256)) => Some(&signature::ECDSA_P256_SHA384_ASN1),
        (ECDSA_WITH_SHA256, EC_PUBLIC_KEY, Some(P384)) => Some(&signature::ECDSA_P384_SHA256_ASN1),
        (ECDSA_WITH_SHA384, EC_PUBLIC_KEY, Some(P384)) => Some(&signature::ECDSA_P384_SHA384_ASN1),
        _ => None,
    }
}

/// basicConstraints present with cA = TRUE.
fn is_ca(cert: &Certificate) -> bool {
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|ext| ext.extn_id == BASIC_CONSTRAINTS)
        .any(|ext| BasicConstraints::from_der(ext.extn_value.as_bytes()).is_ok_and(|bc| bc.ca))
}

/// The EK certificate's key as SubjectPublicKeyInfo DER, if it is RSA 2048, ECC P-256 or
/// ECC P-384 (a point on the curve): the EK kinds MakeCredential supports.
fn ek_key(cert: &Certificate) -> Result<Vec<u8>> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let der = spki.to_der().map_err(|_| EkCertError::EkKey)?;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<Oid>().ok());
    let point = spki.subject_public_key.raw_bytes();
    let usable = match (spki.algorithm.oid, curve) {
        (RSA_ENCRYPTION, _) => aws_lc_rs::rsa::PublicEncryptingKey::from_der(&der)
            .is_ok_and(|key| key.key_size_bits() == 2048),
        (EC_PUBLIC_KEY, Some(P256)) => {
            point.len() == 65 && p256::PublicKey::from_sec1_bytes(point).is_ok()
        }
        (EC_PUBLIC_KEY, Some(P384)) => {
            point.len() == 97
                && aws_lc_rs::signature::ParsedPublicKey::new(
                    &signature::ECDSA_P384_SHA384_ASN1,
                    point,
                )
                .is_ok()
        }
        _ => false,
    };
    if !usable {
        return Err(EkCertError::EkKey);
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EK: &[u8] = include_bytes!("../../tests/data/ek/ek-rsa2048.der");
    const EK_P384: &[u8] = include_bytes!("../../tests/data/ek/ek-eccp384.der");
    const ROOT: &[u8] = include_bytes!("../../tests/data/ek/rootca.pem");
    const ISSUER: &[u8] = include_bytes!("../../tests/data/ek/issuer.pem");

    fn bundle() -> CaBundle {
        CaBundle::from_pem(&[ROOT, ISSUER].concat()).unwrap()
    }

    /// 2030-01-01: inside every fixture certificate's validity.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    #[test]
    fn swtpms_ek_certificate_chains_to_its_local_ca() {
        let verified = verify_ek_certificate(EK, &bundle(), now()).unwrap();
        assert_eq!(verified.path_len, 3);
        assert_eq!(verified.root, "CN=swtpm-localca-rootca");
        let key = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&verified.spki).unwrap();
        assert_eq!(key.key_size_bits(), 2048);
    }

    #[test]
    fn swtpms_p384_ek_certificate_chains_too() {
        let verified = verify_ek_certificate(EK_P384, &bundle(), now()).unwrap();
        assert_eq!(verified.path_len, 3);
        let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(&verified.spki).unwrap();
        assert_eq!(spki.algorithm.oid, EC_PUBLIC_KEY);
        assert_eq!(spki.subject_public_key.raw_bytes().len(), 97);
    }

    #[test]
    fn without_the_issuer_or_the_root_the_path_does_not_verify() {
        let only_root = CaBundle::from_pem(ROOT).unwrap();
        assert!(matches!(
            verify_ek_certificate(EK, &only_root, now()),
            Err(EkCertError::Untrusted { issuer, .. }) if issuer == "CN=swtpm-localca"
        ));
        // The issuer alone is not self-signed: the path must end at a root of the bundle.
        let only_issuer = CaBundle::from_pem(ISSUER).unwrap();
        assert!(matches!(
            verify_ek_certificate(EK, &only_issuer, now()),
            Err(EkCertError::Untrusted { issuer, .. }) if issuer == "CN=swtpm-localca-rootca"
        ));
    }

    #[test]
    fn a_tampered_certificate_or_signature_is_refused() {
        // The last byte is the signature's.
        let mut bad = EK.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            verify_ek_certificate(&bad, &bundle(), now()),
            Err(EkCertError::Untrusted { .. })
        ));
        // A byte of the modulus inside the signed part.
        let mut bad = EK.to_vec();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        assert!(verify_ek_certificate(&bad, &bundle(), now()).is_err());
        let mut long = EK.to_vec();
        long.push(0);
        assert!(matches!(
            verify_ek_certificate(&long, &bundle(), now()),
            Err(EkCertError::Parse(_))
        ));
        assert!(matches!(
            verify_ek_certificate(&[0; 9000], &bundle(), now()),
            Err(EkCertError::TooLong { len: 9000 })
        ));
    }

    #[test]
    fn validity_is_checked_at_the_given_time() {
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert!(matches!(
            verify_ek_certificate(EK, &bundle(), before),
            Err(EkCertError::Validity { subject, .. }) if subject == "CN=unknown"
        ));
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
        assert!(matches!(
            verify_ek_certificate(EK, &bundle(), after),
            Err(EkCertError::Validity { .. })
        ));
    }

    #[test]
    fn a_bundle_must_hold_certificates() {
        assert!(CaBundle::from_pem(b"").is_err());
        assert!(CaBundle::from_pem(b"\n").is_err());
        assert!(CaBundle::from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(
            CaBundle::from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        assert_eq!(bundle().len(), 2);
        // Text around the blocks, as in a CA bundle file with comments, is ignored.
        let commented = [b"# root\n".as_slice(), ROOT, b"# issuer\n", ISSUER, b"\n"].concat();
        assert_eq!(CaBundle::from_pem(&commented).unwrap().len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1200)) {
            proptest::prop_assert!(verify_ek_certificate(&bytes, &bundle(), now()).is_err());
            let _ = CaBundle::from_pem(&bytes);
            let mut pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
            pem.extend_from_slice(&bytes);
            let _ = CaBundle::from_pem(&pem);
        }
    }

    #[test]
    fn item2_no_flipped_bit_of_the_ek_certificate_verifies() {
        for bit in 0..EK.len() * 8 {
            let mut bad = EK.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                verify_ek_certificate(&bad, &bundle(), now()).is_err(),
                "bit {bit} flipped still verifies"
            );
        }
    }

    #[test]
    fn a_ca_certificate_is_not_an_ek_certificate() {
        // The issuer certificate is signed by the root, but its key is RSA 3072.
        let issuer = Certificate::from_pem(ISSUER).unwrap();
        let der = issuer.to_der().unwrap();
        assert_eq!(
            verify_ek_certificate(&der, &bundle(), now()),
            Err(EkCertError::EkKey)
        );
    }
}
