//! Host enrolment against real TPMs (swtpm manufactured by swtpm_setup with EK certificates
//! from a local CA): the EK certificate chains to the CA bundle, a credential made in software
//! (`keyshard_attest::tpm::credential::make_credential`) to that EK for the AK's name comes
//! back from TPM2_ActivateCredential, and not for another name or in another TPM.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::Path;
use std::time::SystemTime;

use common::swtpm::Swtpm;
use keyshard_attest::tpm::credential::{EkKind, make_credential};
use keyshard_attest::tpm::ek_cert::{CaBundle, EkCertError, verify_ek_certificate};
use keyshard_attest::tpm::enrol;
use keyshard_attest::tpm::{EccPublic, sha256_name};
use keyshard_e2e::swtpm::ek_ca_certificates;
use keyshard_tpm::{Tpm, TpmError};

const SECRET: &[u8; 32] = b"enrolment challenge, 32 bytes!!!";

fn bundle(ca: &Path) -> CaBundle {
    let pem: Vec<u8> = ek_ca_certificates(ca)
        .iter()
        .flat_map(|path| std::fs::read(path).unwrap())
        .collect();
    CaBundle::from_pem(&pem).unwrap()
}

/// The CMS's side, up to the credential: EK certificate path, AK shape and name.
fn challenge(
    tpm: &mut Tpm,
    ca: &Path,
    name: Option<&[u8]>,
) -> keyshard_attest::tpm::credential::MadeCredential {
    challenge_to(tpm, EkKind::Rsa2048, ca, name)
}

/// The same, to the EK of `kind`.
fn challenge_to(
    tpm: &mut Tpm,
    kind: EkKind,
    ca: &Path,
    name: Option<&[u8]>,
) -> keyshard_attest::tpm::credential::MadeCredential {
    let ek = tpm.endorsement_key(kind).unwrap();
    let cert = ek
        .certificate
        .expect("swtpm_setup put an EK certificate in NV");
    let verified = verify_ek_certificate(&cert, &bundle(ca), SystemTime::now()).unwrap();
    let ak_area = tpm.ak_public_area().unwrap();
    let ak_name = sha256_name(&ak_area);
    make_credential(&verified.spki, name.unwrap_or(&ak_name), SECRET).unwrap()
}

#[test]
fn item2_enrolment_make_credential_in_software_is_activated_for_the_ak_only() {
    let ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();

    // The EK the TPM re-creates is the key its certificate names.
    let ek = tpm.endorsement_key(EkKind::Rsa2048).unwrap();
    let cert = ek.certificate.clone().unwrap();
    let verified = verify_ek_certificate(&cert, &bundle(ca.path()), SystemTime::now()).unwrap();
    assert_eq!(verified.path_len, 3);
    assert!(
        verified.spki.windows(ek.key.len()).any(|w| w == ek.key),
        "the certificate's key is not the TPM's EK"
    );

    // The AK's public area has the attestation key's shape and is the AK the TPM quotes with.
    let ak_area = tpm.ak_public_area().unwrap();
    let ak = EccPublic::parse(&ak_area)
        .unwrap()
        .check_attestation_key()
        .unwrap();
    assert_eq!(&ak, tpm.ak_public());

    let made = challenge(&mut tpm, ca.path(), None);
    let credential = tpm.activate_credential(&made).unwrap();
    assert_eq!(&credential[..], SECRET);
    // Activation can be repeated (nothing is used up), and the TPM keeps working.
    assert_eq!(&tpm.activate_credential(&made).unwrap()[..], SECRET);
}

#[test]
fn item2_enrolment_the_verifiers_challenge_is_answered_by_the_host_tpm_only() {
    let ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let cert = tpm
        .endorsement_key(EkKind::Rsa2048)
        .unwrap()
        .certificate
        .unwrap();
    let ak_area = tpm.ak_public_area().unwrap();
    let c = enrol::challenge(&cert, &bundle(ca.path()), SystemTime::now(), &ak_area).unwrap();
    assert_eq!(&c.ak, tpm.ak_public());
    let answer = tpm.activate_credential(&c.made).unwrap();
    assert!(c.answered_by(&answer));

    // A host that presents another TPM's AK with its own EK certificate cannot answer: its
    // TPM holds no object with that AK's name.
    let other_swtpm = Swtpm::start();
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let foreign_ak = other.ak_public_area().unwrap();
    assert_ne!(foreign_ak, ak_area, "two TPMs, two AKs");
    let c = enrol::challenge(&cert, &bundle(ca.path()), SystemTime::now(), &foreign_ak).unwrap();
    let err = tpm.activate_credential(&c.made).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
}

#[test]
fn item2_enrolment_make_credential_for_another_name_or_another_tpm_is_refused() {
    let ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();

    // Another key's name: the decrypt key's (a real object of this TPM, but not the AK).
    let key = tpm.create_decrypt_key().unwrap();
    let made = challenge(&mut tpm, ca.path(), Some(key.name()));
    let err = tpm.activate_credential(&made).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");

    // A credential altered on the way.
    let mut altered = challenge(&mut tpm, ca.path(), None);
    let last = altered.id_object.len() - 1;
    altered.id_object[last] ^= 1;
    let err = tpm.activate_credential(&altered).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");

    // Made for a second TPM of the same vendor CA: this TPM cannot open it, the other can.
    let other_swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let for_other = challenge(
        &mut other,
        ca.path(),
        Some(&sha256_name(&tpm.ak_public_area().unwrap())),
    );
    let err = tpm.activate_credential(&for_other).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
    // An altered seed ciphertext, likewise (libtpms answers both with TPM_RC_FAILURE).
    let mut altered = challenge(&mut tpm, ca.path(), None);
    altered.encrypted_secret[10] ^= 1;
    let err = tpm.activate_credential(&altered).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
    // ... and keeps working: the right credential still comes back.
    let made = challenge(&mut tpm, ca.path(), None);
    assert_eq!(&tpm.activate_credential(&made).unwrap()[..], SECRET);
    let for_other = challenge(&mut other, ca.path(), None);
    assert_eq!(&other.activate_credential(&for_other).unwrap()[..], SECRET);
}

#[test]
fn item2_enrolment_an_ek_certificate_of_another_ca_does_not_verify() {
    let ca = tempfile::tempdir().unwrap();
    let other_ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let _other = Swtpm::start_with_ek_certificates(other_ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let cert = tpm
        .endorsement_key(EkKind::Rsa2048)
        .unwrap()
        .certificate
        .unwrap();
    assert!(verify_ek_certificate(&cert, &bundle(ca.path()), SystemTime::now()).is_ok());
    let err =
        verify_ek_certificate(&cert, &bundle(other_ca.path()), SystemTime::now()).unwrap_err();
    assert!(matches!(err, EkCertError::Untrusted { .. }), "{err}");
}

#[test]
fn a_tpm_without_ek_certificates_says_so() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key(EkKind::Rsa2048).unwrap();
    assert_eq!(ek.certificate, None);
    assert_eq!(ek.key.len(), 256);
}

#[test]
fn item2_enrolment_to_the_ecc_p384_ek_works_like_the_rsa_one() {
    let ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key(EkKind::EccP384).unwrap();
    assert_eq!(ek.key.len(), 96);
    let cert = ek.certificate.clone().unwrap();
    let verified = verify_ek_certificate(&cert, &bundle(ca.path()), SystemTime::now()).unwrap();
    assert!(
        verified.spki.windows(ek.key.len()).any(|w| w == ek.key),
        "the certificate's key is not the TPM's P-384 EK"
    );
    let made = challenge_to(&mut tpm, EkKind::EccP384, ca.path(), None);
    assert_eq!(made.ek, EkKind::EccP384);
    assert_eq!(made.encrypted_secret.len(), 2 + 48 + 2 + 48);
    assert_eq!(&tpm.activate_credential(&made).unwrap()[..], SECRET);

    // Another name, an altered ephemeral point, another TPM's P-384 EK: refused.
    let key = tpm.create_decrypt_key().unwrap();
    let made = challenge_to(&mut tpm, EkKind::EccP384, ca.path(), Some(key.name()));
    let err = tpm.activate_credential(&made).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
    let mut altered = challenge_to(&mut tpm, EkKind::EccP384, ca.path(), None);
    altered.encrypted_secret[10] ^= 1;
    let err = tpm.activate_credential(&altered).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
    let other_swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let name = sha256_name(&tpm.ak_public_area().unwrap());
    let for_other = challenge_to(&mut other, EkKind::EccP384, ca.path(), Some(&name));
    let err = tpm.activate_credential(&for_other).unwrap_err();
    assert!(matches!(err, TpmError::CredentialRefused), "{err}");
    // The TPM still answers a right one, and the verifier's one step takes the P-384 EK too.
    let made = challenge_to(&mut tpm, EkKind::EccP384, ca.path(), None);
    assert_eq!(&tpm.activate_credential(&made).unwrap()[..], SECRET);
    let ak_area = tpm.ak_public_area().unwrap();
    let c = enrol::challenge(&cert, &bundle(ca.path()), SystemTime::now(), &ak_area).unwrap();
    assert_eq!(c.made.ek, EkKind::EccP384);
    assert!(c.answered_by(&tpm.activate_credential(&c.made).unwrap()));
}
