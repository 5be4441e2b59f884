//! A host's enrolment as the verifier (the CMS, with no TPM) runs it, in one step per call:
//! [`challenge`] checks the EK certificate path and the attestation key's public area, and
//! makes a fresh random credential to that EK for that AK's name; the host answers with
//! TPM2_ActivateCredential (`keyshard_tpm::Tpm::activate_credential`), and
//! [`Challenge::answered_by`] compares the answer. A right answer proves that the AK (whose
//! quotes and certifications the CMS will then trust) is in the TPM the EK certificate names.

use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::credential::{CredentialError, MadeCredential, make_credential};
use super::ek_cert::{CaBundle, EkCertError, verify_ek_certificate};
use super::public::{EccPublic, NAME_LEN, PublicError, sha256_name};
use super::quote::AkPublic;

/// Bytes of the random credential a challenge carries.
pub const CREDENTIAL_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrolError {
    #[error("EK certificate: {0}")]
    EkCertificate(#[from] EkCertError),
    #[error("attestation key: {0}")]
    AttestationKey(PublicError),
    #[error("credential: {0}")]
    Credential(#[from] CredentialError),
    #[error("no randomness for the credential")]
    Random,
}

pub type Result<T> = std::result::Result<T, EnrolError>;

/// What the verifier keeps until the host answers; [`Challenge::made`] is what it sends.
pub struct Challenge {
    /// The attestation key, to pin once the challenge is answered.
    pub ak: AkPublic,
    /// The AK's TPM name, which the credential is bound to.
    pub ak_name: [u8; NAME_LEN],
    /// The subject of the CA root the EK certificate chains to.
    pub ek_root: String,
    /// SHA-256 of the EK's SubjectPublicKeyInfo (DER): names the TPM whatever AK it presents,
    /// so a verifier can refuse one TPM enrolling under several ids.
    pub ek_sha256: [u8; 32],
    /// The credential blob and encrypted seed, for the host's ActivateCredential.
    pub made: MadeCredential,
    credential: Zeroizing<[u8; CREDENTIAL_LEN]>,
}

/// Names no credential byte.
impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenge")
            .field("ek_root", &self.ek_root)
            .finish_non_exhaustive()
    }
}

impl Challenge {
    /// Whether `activated` (what the host's ActivateCredential returned) is the credential;
    /// compared in constant time.
    pub fn answered_by(&self, activated: &[u8]) -> bool {
        bool::from(self.credential.as_slice().ct_eq(activated))
    }

    /// SHA-256 of the credential: what a verifier that keeps the challenge in a store (shared
    /// by replicas, readable by an operator) keeps instead of the credential; check an answer
    /// against it with [`answers_digest`].
    pub fn credential_digest(&self) -> [u8; 32] {
        Sha256::digest(self.credential.as_slice()).into()
    }
}

/// Whether `activated` (what the host's ActivateCredential returned) hashes to `digest`
/// ([`Challenge::credential_digest`]); compared in constant time.
pub fn answers_digest(digest: &[u8; 32], activated: &[u8]) -> bool {
    let answered: [u8; 32] = Sha256::digest(activated).into();
    bool::from(answered.ct_eq(digest))
}

/// Verifies the host's EK certificate against `bundle` at `now`, checks that `ak_public_area`
/// (a marshalled TPMT_PUBLIC) is an attestation key as keyshard makes them (restricted
/// ECDSA P-256 signing, fixedTPM: see `EccPublic::check_attestation_key`), and makes a fresh
/// 32-byte credential to the EK for the AK's name.
pub fn challenge(
    ek_certificate: &[u8],
    bundle: &CaBundle,
    now: SystemTime,
    ak_public_area: &[u8],
) -> Result<Challenge> {
    let ek = verify_ek_certificate(ek_certificate, bundle, now)?;
    let ak = EccPublic::parse(ak_public_area)
        .and_then(|p| p.check_attestation_key())
        .map_err(EnrolError::AttestationKey)?;
    let ak_name = sha256_name(ak_public_area);
    let mut credential = Zeroizing::new([0u8; CREDENTIAL_LEN]);
    aws_lc_rs::rand::fill(&mut credential[..]).map_err(|_| EnrolError::Random)?;
    let made = make_credential(&ek.spki, &ak_name, &credential[..])?;
    Ok(Challenge {
        ak,
        ak_name,
        ek_sha256: Sha256::digest(&ek.spki).into(),
        ek_root: ek.root,
        made,
        credential,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::public::tests::{decrypt_key_public, sample};
    use super::super::public::{ATTESTATION_KEY_ATTRIBUTES, AlgHash};
    use super::super::spec::{TPM_ALG_ECDSA, TPM_ALG_SHA256};
    use super::*;

    const EK: &[u8] = include_bytes!("../../tests/data/ek/ek-rsa2048.der");
    const ROOT: &[u8] = include_bytes!("../../tests/data/ek/rootca.pem");
    const ISSUER: &[u8] = include_bytes!("../../tests/data/ek/issuer.pem");

    fn bundle() -> CaBundle {
        CaBundle::from_pem(&[ROOT, ISSUER].concat()).unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    fn ak_area() -> Vec<u8> {
        let mut p = sample(4);
        p.attributes = ATTESTATION_KEY_ATTRIBUTES;
        p.scheme = AlgHash {
            alg: TPM_ALG_ECDSA,
            hash: TPM_ALG_SHA256,
        };
        super::super::public::tests::encode(&p)
    }

    #[test]
    fn a_challenge_binds_the_ak_name_and_only_its_credential_answers() {
        let c = challenge(EK, &bundle(), now(), &ak_area()).unwrap();
        assert_eq!(c.ak_name, sha256_name(&ak_area()));
        assert_eq!(c.ek_root, "CN=swtpm-localca-rootca");
        assert_eq!(c.made.encrypted_secret.len(), 256);
        assert!(c.answered_by(&c.credential[..]));
        assert!(!c.answered_by(&[0; 32]));
        assert!(!c.answered_by(&c.credential[..31]));
        assert!(!format!("{c:?}").contains("credential"));
        let digest = c.credential_digest();
        assert!(answers_digest(&digest, &c.credential[..]));
        assert!(!answers_digest(&digest, &[0; 32]));
        assert!(!answers_digest(&digest, &c.credential[..31]));
        assert!(!answers_digest(&digest, &digest));
        let again = challenge(EK, &bundle(), now(), &ak_area()).unwrap();
        assert_ne!(
            &again.credential[..],
            &c.credential[..],
            "a fresh credential each time"
        );
    }

    #[test]
    fn a_decrypt_key_or_an_untrusted_ek_is_no_enrolment() {
        assert!(matches!(
            challenge(EK, &bundle(), now(), &decrypt_key_public(4)),
            Err(EnrolError::AttestationKey(PublicError::Attribute { .. }))
        ));
        let only_root = CaBundle::from_pem(ROOT).unwrap();
        assert!(matches!(
            challenge(EK, &only_root, now(), &ak_area()),
            Err(EnrolError::EkCertificate(EkCertError::Untrusted { .. }))
        ));
    }
}
