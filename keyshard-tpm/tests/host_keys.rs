//! A shard host's TPM keys against a real TPM 2.0 simulator (swtpm, started per test): the
//! ECC P-256 decrypt key (made under the SRK, reloaded from its stored blob, TPM2_ECDH_ZGen
//! checked against software ECDH) and its certification by the attestation key (TPM2_Certify,
//! checked by `keyshard_attest::tpm::verify_certification`).

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::time::SystemTime;

use common::swtpm::Swtpm;
use keyshard_attest::tpm::credential::{EkKind, make_credential};
use keyshard_attest::tpm::ek_cert::{CaBundle, verify_ek_certificate};
use keyshard_attest::tpm::sha256_name;
use keyshard_attest::tpm::{CertifyError, DECRYPT_KEY_ATTRIBUTES, EccPublic, verify_certification};
use keyshard_e2e::swtpm::ek_ca_certificates;
use keyshard_tpm::{DecryptKey, Tpm, TpmConfig, TpmError, TpmService};
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::{ProjectivePoint, PublicKey, SecretKey};

/// An encrypter's ephemeral key: a P-256 scalar from `seed`.
fn ephemeral(seed: u8) -> SecretKey {
    SecretKey::from_slice(&[seed; 32]).unwrap()
}

fn sec1(point: &PublicKey) -> Vec<u8> {
    point.to_encoded_point(false).as_bytes().to_vec()
}

/// What the encrypter computes in software: e * Q, uncompressed.
fn software_shared_point(e: &SecretKey, key: &DecryptKey) -> Vec<u8> {
    let q = PublicKey::from_sec1_bytes(key.point()).unwrap();
    let shared = (q.to_projective() * *e.to_nonzero_scalar()).to_affine();
    shared.to_encoded_point(false).as_bytes().to_vec()
}

#[test]
fn item2_decrypt_key_zgen_in_the_tpm_equals_software_ecdh() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.create_decrypt_key().unwrap();

    // The public area has exactly the decrypt-key attributes: no sign, not restricted.
    let public = EccPublic::parse(key.public_area()).unwrap();
    assert_eq!(public.attributes, DECRYPT_KEY_ATTRIBUTES);
    assert_eq!(public.curve, 0x0003);

    for seed in [1u8, 2, 0x7f] {
        let e = ephemeral(seed);
        let shared = tpm.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap();
        let expected = software_shared_point(&e, &key);
        assert_eq!(&expected[1..33], shared.x(), "x differs for seed {seed}");
        assert_eq!(&expected[33..], shared.y(), "y differs for seed {seed}");
    }
    // Two keys are two keys.
    let other = tpm.create_decrypt_key().unwrap();
    assert_ne!(other.point(), key.point());
    assert_ne!(other.name(), key.name());
    let e = ephemeral(1);
    let a = tpm.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap();
    let b = tpm.ecdh_z_gen(&other, &sec1(&e.public_key())).unwrap();
    assert_ne!(a.x(), b.x());
}

#[test]
fn decrypt_key_reloads_from_its_blob_after_a_restart_and_nowhere_else() {
    let mut swtpm = Swtpm::start();
    let e = ephemeral(9);
    let (stored, before) = {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let key = tpm.create_decrypt_key().unwrap();
        let before = *tpm.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap().x();
        (key.to_bytes(), before)
    };
    swtpm.restart();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = DecryptKey::parse(&stored).unwrap();
    let after = tpm.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap();
    assert_eq!(after.x(), &before, "the reloaded key is another key");

    // Another TPM cannot load it (fixedTPM; private area encrypted to the first TPM's SRK).
    let elsewhere = Swtpm::start();
    let mut other = Tpm::open(&elsewhere.tcti()).unwrap();
    let err = other.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap_err();
    assert!(matches!(err, TpmError::ForeignKey), "{err}");
}

#[test]
fn decrypt_key_refuses_points_off_the_curve_and_other_encodings() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.create_decrypt_key().unwrap();
    let mut off = sec1(&ephemeral(3).public_key());
    off[64] ^= 1;
    let err = tpm.ecdh_z_gen(&key, &off).unwrap_err();
    assert!(matches!(err, TpmError::PointNotOnCurve), "{err}");
    let compressed = ephemeral(3).public_key().to_encoded_point(true);
    let err = tpm.ecdh_z_gen(&key, compressed.as_bytes()).unwrap_err();
    assert!(matches!(err, TpmError::PointFormat { len: 33 }), "{err}");
    // The identity is no point either.
    let identity = ProjectivePoint::IDENTITY
        .to_affine()
        .to_encoded_point(false);
    assert!(tpm.ecdh_z_gen(&key, identity.as_bytes()).is_err());
    // The TPM still works after the refusals.
    assert!(
        tpm.ecdh_z_gen(&key, &sec1(&ephemeral(3).public_key()))
            .is_ok()
    );
}

#[test]
fn item2_certify_by_the_ak_verifies_in_software_and_binds_nonce_key_and_tpm() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.create_decrypt_key().unwrap();
    let nonce = [0x42; 32];
    let certification = tpm.certify_decrypt_key(&key, &nonce).unwrap();

    let certified =
        verify_certification(&certification, tpm.ak_public(), &nonce, key.public_area()).unwrap();
    assert_eq!(&certified.point, key.point());
    assert_eq!(&certified.name, key.name());

    // Another nonce: a replayed certification.
    assert_eq!(
        verify_certification(&certification, tpm.ak_public(), &[0; 32], key.public_area()),
        Err(CertifyError::Nonce)
    );
    // Another key's public area presented with this certification.
    let other = tpm.create_decrypt_key().unwrap();
    assert_eq!(
        verify_certification(&certification, tpm.ak_public(), &nonce, other.public_area()),
        Err(CertifyError::Name)
    );
    // The AK of another TPM.
    let elsewhere = Swtpm::start();
    let other_tpm = Tpm::open(&elsewhere.tcti()).unwrap();
    assert_eq!(
        verify_certification(
            &certification,
            other_tpm.ak_public(),
            &nonce,
            key.public_area()
        ),
        Err(CertifyError::Signature)
    );
    // A flipped sign bit in the presented public area: the name no longer matches.
    let mut public = key.public_area().to_vec();
    public[5] |= 0x04; // objectAttributes bit 18
    assert_eq!(
        verify_certification(&certification, tpm.ak_public(), &nonce, &public),
        Err(CertifyError::Name)
    );
}

/// What the decrypt key does not protect against, shown: anyone who can send commands to the
/// host's TPM (root) loads the stored blob under the SRK and asks for ECDH_ZGen with
/// tpm2-tools, without keyshard, and gets the shared secret.
#[test]
fn item2_decrypt_key_root_on_the_host_can_zgen_with_tpm2_tools() {
    let swtpm = Swtpm::start();
    let stored = {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        tpm.create_decrypt_key().unwrap().to_bytes()
    };
    let key = DecryptKey::parse(&stored).unwrap();
    // "KSDK", version, then TPM2B_PUBLIC and TPM2B_PRIVATE: tpm2-tools' .pub and .priv.
    let body = &stored[5..];
    let public_len = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    let (public, private) = body.split_at(public_len);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("key.pub"), public).unwrap();
    std::fs::write(path("key.priv"), private).unwrap();
    let e = ephemeral(11);
    let q = sec1(&e.public_key());
    // TPM2B_ECC_POINT: size, then TPMS_ECC_POINT (TPM2B x, TPM2B y).
    let mut point = vec![0, 68, 0, 32];
    point.extend_from_slice(&q[1..33]);
    point.extend_from_slice(&[0, 32]);
    point.extend_from_slice(&q[33..]);
    std::fs::write(path("q.bin"), &point).unwrap();
    let tool = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", swtpm.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |name: &str| path(name).display().to_string();
    tool(&[
        "tpm2_load",
        "-C",
        "0x81000001",
        "-u",
        &p("key.pub"),
        "-r",
        &p("key.priv"),
        "-c",
        &p("key.ctx"),
    ]);
    tool(&[
        "tpm2_ecdhzgen",
        "-c",
        &p("key.ctx"),
        "-u",
        &p("q.bin"),
        "-o",
        &p("z.bin"),
    ]);
    let z = std::fs::read(path("z.bin")).unwrap();
    let expected = software_shared_point(&e, &key);
    // TPM2B_ECC_POINT: u16 size, u16 32, x...
    assert_eq!(&z[4..36], &expected[1..33], "tpm2-tools got another Z");
}

#[test]
fn decrypt_key_serves_threads_through_the_tpm_service() {
    let swtpm = Swtpm::start();
    let service = TpmService::spawn(TpmConfig::new(swtpm.tcti())).unwrap();
    let key = service.create_decrypt_key().unwrap();
    let certification = service.certify_decrypt_key(&key, &[3; 32]).unwrap();
    verify_certification(
        &certification,
        service.ak_public(),
        &[3; 32],
        key.public_area(),
    )
    .unwrap();
    let threads: Vec<_> = (1u8..=4)
        .map(|seed| {
            let (service, key) = (service.clone(), key.clone());
            std::thread::spawn(move || {
                let e = ephemeral(seed);
                let shared = service.ecdh_z_gen(&key, &sec1(&e.public_key())).unwrap();
                assert_eq!(&software_shared_point(&e, &key)[1..33], shared.x());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
#[ignore = "a measurement, not a check"]
fn timings() {
    const RUNS: usize = 50;
    use common::timing::{report, time};

    let ca = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start_with_ek_certificates(ca.path());
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.create_decrypt_key().unwrap();
    let point = sec1(&ephemeral(5).public_key());
    let nonce = [7u8; 32];
    let certification = tpm.certify_decrypt_key(&key, &nonce).unwrap();
    let ak = tpm.ak_public().clone();
    let pem: Vec<u8> = ek_ca_certificates(ca.path())
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    let bundle = CaBundle::from_pem(&pem).unwrap();
    let cert = tpm
        .endorsement_key(EkKind::Rsa2048)
        .unwrap()
        .certificate
        .unwrap();
    let name = sha256_name(&tpm.ak_public_area().unwrap());
    let spki = verify_ek_certificate(&cert, &bundle, SystemTime::now())
        .unwrap()
        .spki;

    let (mut create, mut zgen, mut certify, mut verify) = (vec![], vec![], vec![], vec![]);
    let (mut ek, mut chain, mut make, mut activate) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        create.push(time(|| tpm.create_decrypt_key().unwrap()).0);
        zgen.push(time(|| tpm.ecdh_z_gen(&key, &point).unwrap()).0);
        certify.push(time(|| tpm.certify_decrypt_key(&key, &nonce).unwrap()).0);
        verify.push(
            time(|| verify_certification(&certification, &ak, &nonce, key.public_area()).unwrap())
                .0,
        );
        ek.push(time(|| tpm.endorsement_key(EkKind::Rsa2048).unwrap()).0);
        chain.push(time(|| verify_ek_certificate(&cert, &bundle, SystemTime::now()).unwrap()).0);
        let (t, made) = time(|| make_credential(&spki, &name, b"0123456789abcdef").unwrap());
        make.push(t);
        activate.push(time(|| tpm.activate_credential(&made).unwrap()).0);
    }
    println!("| operation | n | p50 ms | p90 ms | min ms |");
    println!("|---|---|---|---|---|");
    report("create decrypt key (Create under the SRK)", create);
    report("ECDH_ZGen (Load, salted session, ZGen, flush)", zgen);
    report("certify (Load, ReadPublic, Certify, flush)", certify);
    report("verify certification (software)", verify);
    report(
        "read EK (CreatePrimary RSA 2048, ReadPublic, NV_Read cert)",
        ek,
    );
    report("verify EK certificate path (software)", chain);
    report("MakeCredential (software)", make);
    report(
        "ActivateCredential (CreatePrimary EK, PolicySecret, Activate)",
        activate,
    );
}
