//! A TPM2_Certify of a shard host's decrypt key by its attestation key, checked in software:
//! what the CMS verifies before it encrypts a shard to a host's key. The certification says
//! "the TPM that holds this AK also holds an object with this name"; the name binds the
//! presented public area, and the public area's attributes say the private part was made in
//! that TPM and cannot leave it.

use super::attest::{AttestError, CertifyAttest};
use super::public::{EccPublic, NAME_LEN, P256_POINT_LEN, PublicError, sha256_name};
use super::quote::{AkPublic, NONCE_LEN};
use super::spec::{TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY};
use super::wire::Reader;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertifyError {
    #[error("the certification's signature does not verify with the attestation key")]
    Signature,
    #[error("the certification's magic is {found:#010x}, not TPM_GENERATED_VALUE")]
    Magic { found: u32 },
    #[error("the attestation is of type {found:#06x}, not a certification (0x8017)")]
    NotACertification { found: u16 },
    #[error("the certification is malformed: {0}")]
    Malformed(AttestError),
    #[error("the certification answers another nonce (stale or replayed)")]
    Nonce,
    #[error("the presented public area is not a key's: {0}")]
    Public(PublicError),
    #[error("the certified name is not the name of the presented public area")]
    Name,
    #[error("the certified key is not a decrypt key keyshard accepts: {0}")]
    KeyShape(PublicError),
}

pub type Result<T> = std::result::Result<T, CertifyError>;

/// A TPM2_Certify as the TPM returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certification {
    /// The marshalled TPMS_ATTEST: exactly the bytes that were signed.
    pub attest: Vec<u8>,
    /// ECDSA P-256 signature over SHA-256(attest): r || s, 32 bytes each, big-endian.
    pub signature: [u8; 64],
}

/// What a verified certification vouches for: a decrypt key in the AK's TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    /// The key's TPM name (0x000b || SHA-256(TPMT_PUBLIC)).
    pub name: [u8; NAME_LEN],
    /// The key's public point, uncompressed SEC1: what an encrypter does ECDH with.
    pub point: [u8; P256_POINT_LEN],
    /// TPM resets so far when it certified, as the TPM counts them.
    pub reset_count: u32,
}

/// Verifies that `ak` certified the key whose TPMT_PUBLIC is `public`, for `nonce`, in this
/// order, each failure its own [`CertifyError`]:
/// 1. the signature over the attest bytes, with `ak` (nothing else counts before this);
/// 2. magic TPM_GENERATED_VALUE, then type TPM_ST_ATTEST_CERTIFY;
/// 3. the structure parses completely;
/// 4. extraData is `nonce` (freshness);
/// 5. `public` parses as an ECC public area, and the certified name is its SHA-256 name;
/// 6. the key is a decrypt key as [`EccPublic::check_decrypt_key`] says: P-256, exactly the
///    attributes fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA, decrypt (so
///    no sign, not restricted), no policy, ECDH scheme.
///
/// Not checked: qualifiedSigner (the AK's name; the pinned AK public key is what counts) and
/// the qualified name (which parent the key sits under: fixedParent keeps it there).
pub fn verify_certification(
    certification: &Certification,
    ak: &AkPublic,
    nonce: &[u8; NONCE_LEN],
    public: &[u8],
) -> Result<CertifiedKey> {
    if !ak.verifies(&certification.attest, &certification.signature) {
        return Err(CertifyError::Signature);
    }
    check_header(&certification.attest)?;
    let attest = CertifyAttest::parse(&certification.attest).map_err(CertifyError::Malformed)?;
    if attest.extra_data != nonce {
        return Err(CertifyError::Nonce);
    }
    let parsed = EccPublic::parse(public).map_err(CertifyError::Public)?;
    // Only a SHA-256 name can be computed here; another name algorithm is a shape error.
    if parsed.name_alg != super::spec::TPM_ALG_SHA256 {
        return Err(CertifyError::KeyShape(PublicError::NameAlg {
            found: parsed.name_alg,
        }));
    }
    let name = sha256_name(public);
    if attest.name != name {
        return Err(CertifyError::Name);
    }
    let point = parsed.check_decrypt_key().map_err(CertifyError::KeyShape)?;
    Ok(CertifiedKey {
        name,
        point,
        reset_count: attest.clock.reset_count,
    })
}

/// Magic and type, read from the raw bytes so that they get their own errors.
fn check_header(bytes: &[u8]) -> Result<()> {
    let mut r = Reader::new(bytes);
    let malformed = |e: super::wire::WireError| CertifyError::Malformed(e.into());
    let magic = r.u32("magic").map_err(malformed)?;
    if magic != TPM_GENERATED_VALUE {
        return Err(CertifyError::Magic { found: magic });
    }
    let kind = r.u16("type").map_err(malformed)?;
    if kind != TPM_ST_ATTEST_CERTIFY {
        return Err(CertifyError::NotACertification { found: kind });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;

    use super::super::attest::tests::{certify_sample, sample as quote_sample};
    use super::super::public::tests::{decrypt_key_public, encode, sample as public_sample};
    use super::super::spec::object_attr;
    use super::*;

    const NONCE: [u8; 32] = [0x5a; 32];

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn ak(key: &SigningKey) -> AkPublic {
        AkPublic::from_sec1(key.verifying_key().to_encoded_point(false).as_bytes()).unwrap()
    }

    fn signed(key: &SigningKey, attest: Vec<u8>) -> Certification {
        let sig: Signature = key.sign(&attest);
        Certification {
            attest,
            signature: sig.to_bytes().into(),
        }
    }

    /// A certification of `public` for NONCE, signed by AK 1.
    fn certification_of(public: &[u8]) -> Certification {
        let mut a = certify_sample();
        a.name = sha256_name(public).to_vec();
        signed(&key(1), a.to_bytes().unwrap())
    }

    #[test]
    fn a_certification_of_a_decrypt_key_verifies_and_gives_its_point() {
        let public = decrypt_key_public(9);
        let certified =
            verify_certification(&certification_of(&public), &ak(&key(1)), &NONCE, &public)
                .unwrap();
        assert_eq!(certified.name, sha256_name(&public));
        assert_eq!(certified.reset_count, 1);
        let expected = p256::SecretKey::from_slice(&[9; 32])
            .unwrap()
            .public_key()
            .to_encoded_point(false);
        assert_eq!(&certified.point[..], expected.as_bytes());
    }

    #[test]
    fn another_key_tampering_or_another_nonce_is_refused() {
        let public = decrypt_key_public(9);
        let c = certification_of(&public);
        assert_eq!(
            verify_certification(&c, &ak(&key(2)), &NONCE, &public),
            Err(CertifyError::Signature)
        );
        let mut tampered = c.clone();
        tampered.attest[10] ^= 1;
        assert_eq!(
            verify_certification(&tampered, &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::Signature)
        );
        assert_eq!(
            verify_certification(&c, &ak(&key(1)), &[0; 32], &public),
            Err(CertifyError::Nonce)
        );
    }

    #[test]
    fn a_public_area_other_than_the_certified_one_is_refused() {
        let public = decrypt_key_public(9);
        let c = certification_of(&public);
        // Another key of the right shape: its name differs.
        assert_eq!(
            verify_certification(&c, &ak(&key(1)), &NONCE, &decrypt_key_public(10)),
            Err(CertifyError::Name)
        );
        // The same key presented with trailing bytes, or truncated: refused before naming.
        let mut long = public.clone();
        long.push(0);
        assert!(matches!(
            verify_certification(&c, &ak(&key(1)), &NONCE, &long),
            Err(CertifyError::Public(_))
        ));
    }

    #[test]
    fn a_certified_key_of_the_wrong_shape_is_refused_and_named() {
        // The TPM certified a signing key: name and signature are right, the shape is not.
        let mut p = public_sample(9);
        p.attributes |= object_attr::SIGN_ENCRYPT;
        let public = encode(&p);
        let err = verify_certification(&certification_of(&public), &ak(&key(1)), &NONCE, &public)
            .unwrap_err();
        assert_eq!(
            err,
            CertifyError::KeyShape(PublicError::Attribute {
                attribute: "sign",
                present: true
            })
        );
        assert!(err.to_string().contains("attribute sign is set"), "{err}");

        let mut p = public_sample(9);
        p.attributes |= object_attr::RESTRICTED;
        let public = encode(&p);
        assert!(matches!(
            verify_certification(&certification_of(&public), &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::KeyShape(PublicError::Attribute {
                attribute: "restricted",
                ..
            }))
        ));
        let mut p = public_sample(9);
        p.name_alg = 0x000c;
        let public = encode(&p);
        assert!(matches!(
            verify_certification(&certification_of(&public), &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::KeyShape(PublicError::NameAlg {
                found: 0x000c
            }))
        ));
    }

    #[test]
    fn item2_every_bit_of_the_attest_and_the_public_area_counts() {
        let public = decrypt_key_public(9);
        let c = certification_of(&public);
        let ak = ak(&key(1));
        verify_certification(&c, &ak, &NONCE, &public).unwrap();
        for i in 0..c.attest.len() * 8 {
            let mut bad = c.clone();
            bad.attest[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                verify_certification(&bad, &ak, &NONCE, &public),
                Err(CertifyError::Signature),
                "attest bit {i}"
            );
        }
        for i in 0..public.len() * 8 {
            let mut bad = public.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                verify_certification(&c, &ak, &NONCE, &bad).is_err(),
                "public area bit {i}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_verify(
            attest in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            public in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let _ = CertifyAttest::parse(&attest);
            let _ = EccPublic::parse(&public);
            let c = Certification { attest, signature: [1; 64] };
            proptest::prop_assert!(
                verify_certification(&c, &ak(&key(1)), &NONCE, &public).is_err()
            );
        }

        #[test]
        fn truncated_or_extended_public_areas_are_refused(cut in 0usize..200, extra in 1usize..4) {
            let public = decrypt_key_public(9);
            let c = certification_of(&public);
            let cut = cut % public.len();
            proptest::prop_assert!(
                verify_certification(&c, &ak(&key(1)), &NONCE, &public[..cut]).is_err()
            );
            let mut long = public.clone();
            long.extend(std::iter::repeat_n(0u8, extra));
            proptest::prop_assert!(verify_certification(&c, &ak(&key(1)), &NONCE, &long).is_err());
        }
    }

    #[test]
    fn a_signed_quote_is_not_a_certification() {
        let public = decrypt_key_public(9);
        let quote = signed(&key(1), quote_sample().to_bytes().unwrap());
        assert_eq!(
            verify_certification(&quote, &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::NotACertification { found: 0x8018 })
        );
        let mut bytes = certify_sample().to_bytes().unwrap();
        bytes[0] = 0;
        assert_eq!(
            verify_certification(&signed(&key(1), bytes), &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::Magic { found: 0x0054_4347 })
        );
        let mut bytes = certify_sample().to_bytes().unwrap();
        bytes.push(0);
        assert!(matches!(
            verify_certification(&signed(&key(1), bytes), &ak(&key(1)), &NONCE, &public),
            Err(CertifyError::Malformed(_))
        ));
    }
}
