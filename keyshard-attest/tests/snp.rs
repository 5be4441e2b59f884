//! SEV-SNP evidence verification: the real Milan report and VCEK against AMD's built-in roots,
//! test-signed chains for every policy refusal, and (ignored,
//! run in release) the timings.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::snp_chain::{
    ExtraExtension, HWID, MEASUREMENT, ReportSpec, TCB, TestCa, TestVcek, VcekSpec, build_report,
    der_int, sign_report,
};
use keyshard_attest::snp::chain::ChainError;
use keyshard_attest::snp::report::{GuestPolicy, PlatformInfo};
use keyshard_attest::snp::report::{OFF_SIG_ALGO, OFF_SIG_R, SIGNED_LEN};
use keyshard_attest::snp::signature::SignatureError;
use keyshard_attest::snp::vcek::{VcekError, oid};
use keyshard_attest::snp::verify::{self, TcbField, trust_vcek};
use keyshard_attest::snp::{
    AbiVersion, PlatformPolicy, Product, Report, SnpPolicy, SnpVerifier, Tcb, TrustAnchors,
    VcekStore, Verdict, VerifyError, report_data_binding,
};

// ---------------------------------------------------------------------------------------------
// Real Milan evidence

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/snp")
}

fn real_report_bytes() -> Vec<u8> {
    let text = std::fs::read_to_string(data_dir().join("report_milan.hex")).unwrap();
    let report = Report::from_hex(&text).unwrap();
    report.as_bytes().to_vec()
}

fn real_vcek() -> Vec<u8> {
    std::fs::read(data_dir().join("vcek_milan.der")).unwrap()
}

fn amd() -> SnpVerifier {
    SnpVerifier::with_amd_roots().unwrap()
}

/// A policy the real report meets.
fn real_policy() -> SnpPolicy {
    let report = Report::from_bytes(&real_report_bytes()).unwrap();
    SnpPolicy {
        measurements: vec![*report.measurement()],
        allow_debug: false,
        allow_migration_agent: false,
        vmpl: 0,
        min_report_version: 2,
        min_tcb: TCB,
        platform: PlatformPolicy::default(),
    }
}

/// The sev crate's own report signature check (its re-encoding of the parsed report).
fn sev_crate_accepts(raw: &[u8], vcek: &sev::certs::snp::Certificate) -> bool {
    use sev::certs::snp::Verifiable;
    use sev::firmware::guest::AttestationReport;
    use sev::parser::ByteParser;
    AttestationReport::from_bytes(raw)
        .and_then(|report| (vcek, &report).verify())
        .is_ok()
}

/// TCB_VERSION reserved bytes 2..5 of CURRENT_TCB, REPORTED_TCB, COMMITTED_TCB, LAUNCH_TCB.
const TCB_RESERVED: [std::ops::RangeInclusive<usize>; 4] =
    [0x3A..=0x3D, 0x182..=0x185, 0x1E2..=0x1E5, 0x1F2..=0x1F5];

#[test]
fn real_milan_evidence_verifies_against_the_builtin_milan_roots() {
    let verifier = amd();
    let report = Report::from_bytes(&real_report_bytes()).unwrap();
    let evidence = verifier.verify_evidence(&report, &real_vcek()).unwrap();
    assert_eq!(evidence.vcek.info.product, Product::Milan);
    assert_eq!(evidence.vcek.info.product_name, "Milan-B0");
    let verdict = verifier
        .verify(&report, &real_vcek(), &real_policy(), report.report_data())
        .unwrap();
    assert_eq!(verdict.reported_tcb, TCB);
    assert_eq!(verdict.report_version, 2);
}

/// Item 15 of issue 7: every one of the 672 x 8 = 5,376 signed bits, 0x80 included (it was
/// one bit per byte, 0x01, under a name that promised every bit).
#[test]
fn every_flipped_signed_report_bit_is_refused_including_tcb_reserved_bytes() {
    let verifier = amd();
    let good = real_report_bytes();
    let vcek = real_vcek();
    let mut flips = 0;
    for offset in 0..SIGNED_LEN {
        for bit in 0..8 {
            let mut bytes = good.clone();
            bytes[offset] ^= 1 << bit;
            let report = Report::from_bytes(&bytes).unwrap();
            let err = verifier.verify_evidence(&report, &vcek).unwrap_err();
            let expected = if (OFF_SIG_ALGO..OFF_SIG_ALGO + 4).contains(&offset) {
                VerifyError::SignatureAlgorithm(report.sig_algo())
            } else {
                VerifyError::ReportSignature(SignatureError::Invalid)
            };
            assert_eq!(err, expected, "offset {offset:#x}, bit {bit}");
            flips += 1;
        }
    }
    assert_eq!(flips, SIGNED_LEN * 8);
    // The signature itself.
    let mut bytes = good;
    bytes[OFF_SIG_R] ^= 0x01;
    let report = Report::from_bytes(&bytes).unwrap();
    assert_eq!(
        verifier.verify_evidence(&report, &vcek).unwrap_err(),
        VerifyError::ReportSignature(SignatureError::Invalid)
    );
}

#[test]
fn a_flipped_bit_in_every_vcek_byte_is_refused() {
    let anchors = TrustAnchors::amd().unwrap();
    let good = real_vcek();
    trust_vcek(&anchors, &good).unwrap();
    // 30 82 LL LL | 30 82 ll ll <TBSCertificate> | signatureAlgorithm | signature
    assert_eq!(&good[..2], &[0x30, 0x82]);
    assert_eq!(&good[4..6], &[0x30, 0x82]);
    let tbs_end = 8 + usize::from(u16::from_be_bytes([good[6], good[7]]));
    assert!(tbs_end < good.len());
    // The signed part, then the unsigned signatureAlgorithm and signature after it.
    // One bit in every byte after the outer length, the bit rotating with the offset so that
    // each of the 8 positions (0x80 included) is flipped in every field longer than 8 bytes.
    // (Every bit of every byte is 8 times the RSA checks: 17 s in a debug build.)
    let mut accepted = Vec::new();
    for offset in 4..good.len() {
        let bit = offset % 8;
        let mut der = good.clone();
        der[offset] ^= 1 << bit;
        match trust_vcek(&anchors, &der) {
            Ok(_) => accepted.push((offset, bit)),
            Err(err) => assert!(!err.is_policy(), "offset {offset}, bit {bit}: {err}"),
        }
    }
    assert!(accepted.is_empty(), "accepted flips at {accepted:?}");
}

/// Where the sev crate's report signature check and ours differ, on the real evidence: the sev
/// crate hashes its re-encoding of the parsed report, which drops the reserved bytes of the four
/// TCB fields, and it ignores the unsigned top 24 bytes of r and s. Everywhere else they agree.
#[test]
fn sev_crate_and_aws_lc_paths_agree_except_where_documented() {
    let verifier = amd();
    let vcek_der = real_vcek();
    let vcek = sev::certs::snp::Certificate::from_der(&vcek_der).unwrap();
    let good = real_report_bytes();
    let ours = |bytes: &[u8]| {
        let report = Report::from_bytes(bytes).unwrap();
        verifier.verify_evidence(&report, &vcek_der).is_ok()
    };
    assert!(sev_crate_accepts(&good, &vcek));
    assert!(ours(&good));

    let mut sev_missed = Vec::new();
    for offset in 0..SIGNED_LEN {
        let mut bytes = good.clone();
        bytes[offset] ^= 0x01;
        assert!(!ours(&bytes), "aws-lc path accepted a flip at {offset:#x}");
        if sev_crate_accepts(&bytes, &vcek) {
            sev_missed.push(offset);
        }
    }
    let documented: Vec<usize> = TCB_RESERVED.iter().cloned().flatten().collect();
    assert_eq!(sev_missed, documented);

    // Non-zero padding above the 48 bytes of r: the sev crate takes it, we refuse it.
    let mut bytes = good.clone();
    bytes[OFF_SIG_R + 60] = 1;
    assert!(sev_crate_accepts(&bytes, &vcek));
    assert!(!ours(&bytes));
    // The reserved tail after the signature is signed by nobody: both accept a change there.
    let mut bytes = good;
    bytes[0x400] ^= 0xFF;
    assert!(sev_crate_accepts(&bytes, &vcek));
    assert!(ours(&bytes));
}

#[test]
fn real_milan_vcek_is_refused_under_other_roots() {
    let amd_anchors = TrustAnchors::amd().unwrap();
    let genoa = amd_anchors.get(Product::Genoa).unwrap();
    // Genoa's roots pinned in Milan's place.
    let wrong = TrustAnchors::none()
        .with(
            Product::Milan,
            &genoa.ark.to_der().unwrap(),
            &genoa.ask.to_der().unwrap(),
        )
        .unwrap();
    assert!(matches!(
        trust_vcek(&wrong, &real_vcek()).unwrap_err(),
        VerifyError::Chain(ChainError::VcekSignature { .. })
    ));
    // Test roots in Milan's place.
    assert!(matches!(
        trust_vcek(&milan_ca().anchors(), &real_vcek()).unwrap_err(),
        VerifyError::Chain(ChainError::VcekSignature { .. })
    ));
    // No Milan roots at all.
    assert_eq!(
        trust_vcek(&TrustAnchors::none(), &real_vcek()).unwrap_err(),
        VerifyError::NoAnchors(Product::Milan)
    );
}

// ---------------------------------------------------------------------------------------------
// Test-signed chains

/// One test CA per test binary: 4096-bit RSA like AMD's (aws-lc-rs keygen, about a second).
fn milan_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new(4096, Product::Milan))
}

/// Turin, with 2048-bit keys: the chain code does not depend on the key size.
fn turin_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new(2048, Product::Turin))
}

fn test_policy() -> SnpPolicy {
    SnpPolicy {
        measurements: vec![[0x22; 48], MEASUREMENT],
        allow_debug: false,
        allow_migration_agent: false,
        vmpl: 0,
        min_report_version: 2,
        min_tcb: TCB,
        platform: PlatformPolicy::default(),
    }
}

const NONCE: [u8; 32] = [0x4E; 32];
const REQUEST_KEY: [u8; 32] = [0x6B; 32];

fn binding() -> [u8; 64] {
    report_data_binding(&NONCE, &REQUEST_KEY)
}

/// A report as a guest answering this request would send it.
fn bound_spec() -> ReportSpec {
    ReportSpec {
        report_data: binding(),
        ..ReportSpec::default()
    }
}

fn issue(spec: &VcekSpec) -> TestVcek {
    milan_ca().issue_vcek(spec)
}

/// The full check with the test CA pinned, the test policy and the request's binding.
fn verify_with(vcek: &TestVcek, spec: &ReportSpec) -> Result<Verdict, VerifyError> {
    let verifier = SnpVerifier::new(milan_ca().anchors());
    let report = Report::from_bytes(&build_report(spec, &vcek.key)).unwrap();
    verifier.verify(&report, &vcek.der, &test_policy(), &binding())
}

#[test]
fn test_signed_evidence_gets_a_valid_verdict() {
    let vcek = issue(&VcekSpec::default());
    let verdict = verify_with(&vcek, &bound_spec()).unwrap();
    assert_eq!(verdict.product, Product::Milan);
    assert_eq!(verdict.measurement, MEASUREMENT);
    assert_eq!(verdict.reported_tcb, TCB);
    assert_eq!(verdict.chip_id, HWID);
    // The version 2 layout as well.
    let v2 = ReportSpec {
        version: 2,
        ..bound_spec()
    };
    verify_with(&vcek, &v2).unwrap();
    // The sev crate accepts the same test chain and report: they are shaped like AMD's.
    let raw = build_report(&bound_spec(), &vcek.key);
    use sev::certs::snp::{Chain, Verifiable, ca};
    let chain = Chain {
        ca: ca::Chain {
            ark: milan_ca().ark.clone().into(),
            ask: milan_ca().ask.clone().into(),
        },
        vek: vcek.cert.clone().into(),
    };
    chain.verify().unwrap();
    assert!(sev_crate_accepts(&raw, &chain.vek));
}

#[test]
fn a_policy_file_drives_the_same_verdict() {
    let text = format!(
        "measurements = [\"{}\"]\nmin_report_version = 3\n[min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n",
        hex::encode(MEASUREMENT)
    );
    let policy = SnpPolicy::parse(&text).unwrap();
    let vcek = issue(&VcekSpec::default());
    let verifier = SnpVerifier::new(milan_ca().anchors());
    let report = Report::from_bytes(&build_report(&bound_spec(), &vcek.key)).unwrap();
    verifier
        .verify(&report, &vcek.der, &policy, &binding())
        .unwrap();
    let v2 = ReportSpec {
        version: 2,
        ..bound_spec()
    };
    let report = Report::from_bytes(&build_report(&v2, &vcek.key)).unwrap();
    assert_eq!(
        verifier
            .verify(&report, &vcek.der, &policy, &binding())
            .unwrap_err(),
        VerifyError::Version {
            found: 2,
            minimum: 3
        }
    );
}

#[test]
fn wrong_measurement_is_refused() {
    let vcek = issue(&VcekSpec::default());
    let spec = ReportSpec {
        measurement: [0x33; 48],
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &spec).unwrap_err(),
        VerifyError::Measurement {
            found: hex::encode([0x33; 48])
        }
    );
}

#[test]
fn debug_and_migration_agent_policies_are_refused() {
    let vcek = issue(&VcekSpec::default());
    let base = bound_spec();
    let debug = ReportSpec {
        policy: base.policy | 1 << 19,
        ..base.clone()
    };
    assert!(matches!(
        verify_with(&vcek, &debug).unwrap_err(),
        VerifyError::Debug(_)
    ));
    let migration = ReportSpec {
        policy: base.policy | 1 << 18,
        ..base.clone()
    };
    assert!(matches!(
        verify_with(&vcek, &migration).unwrap_err(),
        VerifyError::MigrationAgent(_)
    ));
    let reserved_clear = ReportSpec {
        policy: base.policy & !(1 << 17),
        ..base
    };
    assert!(matches!(
        verify_with(&vcek, &reserved_clear).unwrap_err(),
        VerifyError::PolicyReservedBit(_)
    ));
}

#[test]
fn vmpl_1_is_refused() {
    let vcek = issue(&VcekSpec::default());
    let spec = ReportSpec {
        vmpl: 1,
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &spec).unwrap_err(),
        VerifyError::Vmpl {
            found: 1,
            required: 0
        }
    );
}

#[test]
fn report_data_of_another_nonce_or_key_is_refused() {
    let vcek = issue(&VcekSpec::default());
    for report_data in [
        report_data_binding(&[0x4F; 32], &REQUEST_KEY),
        report_data_binding(&NONCE, &[0x6C; 32]),
        [0; 64],
    ] {
        let spec = ReportSpec {
            report_data,
            ..ReportSpec::default()
        };
        let err = verify_with(&vcek, &spec).unwrap_err();
        assert_eq!(err, VerifyError::ReportData);
        assert!(err.is_policy());
    }
}

#[test]
fn ark_and_ask_swapped_are_refused() {
    let vcek = issue(&VcekSpec::default());
    let ca = milan_ca();
    let swapped = TrustAnchors::none()
        .with(Product::Milan, &ca.ask_der(), &ca.ark_der())
        .unwrap();
    let verifier = SnpVerifier::new(swapped);
    let report = Report::from_bytes(&build_report(&bound_spec(), &vcek.key)).unwrap();
    let err = verifier
        .verify(&report, &vcek.der, &test_policy(), &binding())
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::Chain(ChainError::ArkSelfSignature { .. })),
        "{err}"
    );
    // The ARK in both places: ARK -> "ASK" holds, but the ARK did not sign the VCEK.
    let ark_twice = TrustAnchors::none()
        .with(Product::Milan, &ca.ark_der(), &ca.ark_der())
        .unwrap();
    assert!(matches!(
        trust_vcek(&ark_twice, &vcek.der).unwrap_err(),
        VerifyError::Chain(ChainError::VcekSignature { .. })
    ));
}

#[test]
fn test_vcek_is_refused_under_amd_roots() {
    let vcek = issue(&VcekSpec::default());
    let report = Report::from_bytes(&build_report(&bound_spec(), &vcek.key)).unwrap();
    let err = amd()
        .verify(&report, &vcek.der, &test_policy(), &binding())
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::Chain(ChainError::VcekSignature { .. })),
        "{err}"
    );
}

#[test]
fn missing_snp_spl_is_refused_though_the_sev_crate_accepts_the_chain() {
    let spec = VcekSpec {
        omit: vec![oid::SNP_SPL],
        ..VcekSpec::default()
    };
    let vcek = issue(&spec);
    use sev::certs::snp::Verifiable;
    let ask: sev::certs::snp::Certificate = milan_ca().ask.clone().into();
    (
        &ask,
        &sev::certs::snp::Certificate::from_der(&vcek.der).unwrap(),
    )
        .verify()
        .unwrap();
    assert_eq!(
        verify_with(&vcek, &bound_spec()).unwrap_err(),
        VerifyError::Vcek(VcekError::Missing("snpSPL"))
    );
}

#[test]
fn every_missing_or_malformed_amd_extension_is_refused() {
    let cases: Vec<(VcekSpec, VcekError)> = vec![
        (
            VcekSpec {
                omit: vec![oid::PRODUCT_NAME],
                ..VcekSpec::default()
            },
            VcekError::Missing("productName"),
        ),
        (
            VcekSpec {
                omit: vec![oid::BL_SPL],
                ..VcekSpec::default()
            },
            VcekError::Missing("blSPL"),
        ),
        (
            VcekSpec {
                omit: vec![oid::TEE_SPL],
                ..VcekSpec::default()
            },
            VcekError::Missing("teeSPL"),
        ),
        (
            VcekSpec {
                omit: vec![oid::UCODE_SPL],
                ..VcekSpec::default()
            },
            VcekError::Missing("ucodeSPL"),
        ),
        (
            VcekSpec {
                omit: vec![oid::HWID],
                ..VcekSpec::default()
            },
            VcekError::Missing("hwID"),
        ),
        (
            VcekSpec {
                snp_spl_value: Some(vec![0x04, 0x01, 0x08]),
                ..VcekSpec::default()
            },
            VcekError::Malformed("snpSPL"),
        ),
        (
            VcekSpec {
                snp_spl_value: Some(vec![0x02, 0x02, 0x01, 0x08]),
                ..VcekSpec::default()
            },
            VcekError::Malformed("snpSPL"),
        ),
        (
            VcekSpec {
                extra: vec![ExtraExtension::SnpSpl(der_int(9))],
                ..VcekSpec::default()
            },
            VcekError::Duplicate(oid::SNP_SPL.to_string()),
        ),
        (
            VcekSpec {
                hwid: vec![0xC5; 8],
                ..VcekSpec::default()
            },
            VcekError::HwIdLength {
                product: Product::Milan,
                len: 8,
                expected: 64,
            },
        ),
        (
            VcekSpec {
                extra: vec![ExtraExtension::CspId],
                ..VcekSpec::default()
            },
            VcekError::Vlek,
        ),
        (
            VcekSpec {
                extra: vec![ExtraExtension::UnknownCritical],
                ..VcekSpec::default()
            },
            VcekError::UnknownCritical("1.3.6.1.4.1.3704.1.99".to_owned()),
        ),
        (
            VcekSpec {
                product_name: "Naples-B0".to_owned(),
                ..VcekSpec::default()
            },
            VcekError::UnknownProduct("Naples-B0".to_owned()),
        ),
    ];
    let anchors = milan_ca().anchors();
    for (spec, expected) in cases {
        let vcek = issue(&spec);
        assert_eq!(
            trust_vcek(&anchors, &vcek.der).unwrap_err(),
            VerifyError::Vcek(expected.clone()),
            "{expected}"
        );
    }
}

#[test]
fn tcb_below_minimum_is_refused() {
    // A VCEK issued for the older microcode, and a report that names it: genuine, but too old.
    let old = Tcb {
        microcode: 100,
        ..TCB
    };
    let vcek = issue(&VcekSpec {
        tcb: old,
        ..VcekSpec::default()
    });
    let spec = ReportSpec {
        tcb: old,
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &spec).unwrap_err(),
        VerifyError::TcbBelowMinimum {
            field: TcbField::Reported,
            found: old,
            minimum: TCB
        }
    );
    // A higher microcode does not make up for a lower snp level.
    let mixed = Tcb {
        snp: 7,
        microcode: 200,
        ..TCB
    };
    let vcek = issue(&VcekSpec {
        tcb: mixed,
        ..VcekSpec::default()
    });
    let spec = ReportSpec {
        tcb: mixed,
        ..bound_spec()
    };
    assert!(matches!(
        verify_with(&vcek, &spec).unwrap_err(),
        VerifyError::TcbBelowMinimum { .. }
    ));
}

/// The full check with the test CA pinned, `policy` and the request's binding.
fn verify_under(
    policy: &SnpPolicy,
    vcek: &TestVcek,
    spec: &ReportSpec,
) -> Result<Verdict, VerifyError> {
    let verifier = SnpVerifier::new(milan_ca().anchors());
    let report = Report::from_bytes(&build_report(spec, &vcek.key)).unwrap();
    verifier.verify(&report, &vcek.der, policy, &binding())
}

fn with_platform(platform: PlatformPolicy) -> SnpPolicy {
    SnpPolicy {
        platform,
        ..test_policy()
    }
}

/// Item 10 of issue 7: LAUNCH_TCB and COMMITTED_TCB meet the minimum too, not only REPORTED_TCB.
#[test]
fn item10_launch_and_committed_tcb_below_minimum_are_refused() {
    let vcek = issue(&VcekSpec::default());
    let old = Tcb {
        microcode: 100,
        ..TCB
    };
    // Launched before a microcode update: REPORTED_TCB (and the VCEK) are current.
    let launched_old = ReportSpec {
        launch_tcb: Some(old),
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &launched_old).unwrap_err(),
        VerifyError::TcbBelowMinimum {
            field: TcbField::Launch,
            found: old,
            minimum: TCB
        }
    );
    // A committed TCB that still allows rolling back to the old microcode.
    let committed_old = ReportSpec {
        committed_tcb: Some(Tcb { snp: 7, ..TCB }),
        ..bound_spec()
    };
    let err = verify_with(&vcek, &committed_old).unwrap_err();
    assert_eq!(
        err,
        VerifyError::TcbBelowMinimum {
            field: TcbField::Committed,
            found: Tcb { snp: 7, ..TCB },
            minimum: TCB
        }
    );
    assert!(err.is_policy());
    assert!(err.to_string().contains("COMMITTED_TCB"), "{err}");
    // Above the minimum is fine for both.
    let newer = ReportSpec {
        launch_tcb: Some(Tcb { snp: 9, ..TCB }),
        committed_tcb: Some(Tcb {
            microcode: 200,
            ..TCB
        }),
        ..bound_spec()
    };
    verify_with(&vcek, &newer).unwrap();
}

/// Item 10: PLATFORM_INFO.SMT_EN and the guest policy's SMT bit, where the policy forbids SMT.
#[test]
fn item10_smt_is_refused_where_the_policy_forbids_it() {
    let vcek = issue(&VcekSpec::default());
    let no_smt = with_platform(PlatformPolicy {
        allow_smt: false,
        ..PlatformPolicy::default()
    });
    // The default report: SMT on at the host, and a guest policy allowing it.
    assert_eq!(
        verify_under(&no_smt, &vcek, &bound_spec()).unwrap_err(),
        VerifyError::SmtEnabled(PlatformInfo(1))
    );
    // SMT off at the host, but the guest would have run with it on.
    let smt_off = ReportSpec {
        platform_info: 0,
        ..bound_spec()
    };
    assert_eq!(
        verify_under(&no_smt, &vcek, &smt_off).unwrap_err(),
        VerifyError::GuestAllowsSmt(GuestPolicy(0x3_0000))
    );
    // Both off: accepted.
    let strict_guest = ReportSpec {
        policy: 0x2_0000,
        ..smt_off
    };
    verify_under(&no_smt, &vcek, &strict_guest).unwrap();
    // The default policy allows SMT.
    verify_with(&vcek, &bound_spec()).unwrap();
}

/// Item 10: PLATFORM_INFO.TSME_EN, where the policy requires it.
#[test]
fn item10_tsme_is_required_where_the_policy_asks() {
    let vcek = issue(&VcekSpec::default());
    let tsme = with_platform(PlatformPolicy {
        require_tsme: true,
        ..PlatformPolicy::default()
    });
    assert_eq!(
        verify_under(&tsme, &vcek, &bound_spec()).unwrap_err(),
        VerifyError::TsmeDisabled(PlatformInfo(1))
    );
    let with_tsme = ReportSpec {
        platform_info: 0b11,
        ..bound_spec()
    };
    verify_under(&tsme, &vcek, &with_tsme).unwrap();
}

/// Item 10: the guest policy's SINGLE_SOCKET bit, where the policy requires it.
#[test]
fn item10_single_socket_is_required_where_the_policy_asks() {
    let vcek = issue(&VcekSpec::default());
    let single = with_platform(PlatformPolicy {
        require_single_socket: true,
        ..PlatformPolicy::default()
    });
    assert_eq!(
        verify_under(&single, &vcek, &bound_spec()).unwrap_err(),
        VerifyError::NotSingleSocket(GuestPolicy(0x3_0000))
    );
    let pinned = ReportSpec {
        policy: 0x13_0000,
        ..bound_spec()
    };
    verify_under(&single, &vcek, &pinned).unwrap();
}

/// Item 10: the guest policy's ABI minimum, compared as MAJOR.MINOR.
#[test]
fn item10_guest_abi_minimum_below_the_policy_is_refused() {
    let vcek = issue(&VcekSpec::default());
    let minimum = AbiVersion {
        major: 1,
        minor: 51,
    };
    let policy = with_platform(PlatformPolicy {
        min_abi: minimum,
        ..PlatformPolicy::default()
    });
    let with_abi = |major: u64, minor: u64| ReportSpec {
        policy: 0x3_0000 | (major << 8) | minor,
        ..bound_spec()
    };
    for (major, minor, accepted) in [
        (0, 0, false),
        (1, 50, false),
        (0, 255, false),
        (1, 51, true),
        (1, 52, true),
        (2, 0, true),
    ] {
        let result = verify_under(&policy, &vcek, &with_abi(major, minor));
        if accepted {
            result.unwrap();
        } else {
            assert_eq!(
                result.unwrap_err(),
                VerifyError::AbiBelowMinimum {
                    found: AbiVersion {
                        major: major as u8,
                        minor: minor as u8
                    },
                    minimum
                },
                "{major}.{minor}"
            );
        }
    }
}

/// Item 10 on the real Milan report (SMT on, TSME off, guest policy 0x30000: ABI 0.0, any
/// socket): each new option refuses it, with its own reason, and the defaults accept it.
#[test]
fn item10_real_milan_report_under_the_platform_options() {
    let verifier = amd();
    let report = Report::from_bytes(&real_report_bytes()).unwrap();
    let check = |platform: PlatformPolicy| {
        let policy = SnpPolicy {
            platform,
            ..real_policy()
        };
        verifier.verify(&report, &real_vcek(), &policy, report.report_data())
    };
    check(PlatformPolicy::default()).unwrap();
    let cases = [
        (
            PlatformPolicy {
                allow_smt: false,
                ..PlatformPolicy::default()
            },
            VerifyError::SmtEnabled(PlatformInfo(1)),
        ),
        (
            PlatformPolicy {
                require_tsme: true,
                ..PlatformPolicy::default()
            },
            VerifyError::TsmeDisabled(PlatformInfo(1)),
        ),
        (
            PlatformPolicy {
                require_single_socket: true,
                ..PlatformPolicy::default()
            },
            VerifyError::NotSingleSocket(GuestPolicy(0x3_0000)),
        ),
        (
            PlatformPolicy {
                min_abi: AbiVersion { major: 1, minor: 0 },
                ..PlatformPolicy::default()
            },
            VerifyError::AbiBelowMinimum {
                found: AbiVersion::default(),
                minimum: AbiVersion { major: 1, minor: 0 },
            },
        ),
    ];
    for (platform, expected) in cases {
        assert_eq!(check(platform).unwrap_err(), expected);
    }
}

#[test]
fn reported_tcb_other_than_the_vceks_is_refused() {
    let vcek = issue(&VcekSpec::default());
    let newer = Tcb { snp: 9, ..TCB };
    let spec = ReportSpec {
        tcb: newer,
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &spec).unwrap_err(),
        VerifyError::TcbMismatch {
            reported: newer,
            vcek: TCB
        }
    );
}

#[test]
fn chip_id_mismatch_or_masked_is_refused() {
    let vcek = issue(&VcekSpec::default());
    let spec = ReportSpec {
        chip_id: [0xAB; 64],
        ..bound_spec()
    };
    assert_eq!(verify_with(&vcek, &spec).unwrap_err(), VerifyError::ChipId);
    let masked = ReportSpec {
        chip_id: [0; 64],
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &masked).unwrap_err(),
        VerifyError::ChipIdMasked
    );
}

#[test]
fn signature_algorithm_key_and_signer_are_checked() {
    let vcek = issue(&VcekSpec::default());
    let other = issue(&VcekSpec::default());
    // Signed by another chip's key.
    let verifier = SnpVerifier::new(milan_ca().anchors());
    let report = Report::from_bytes(&build_report(&bound_spec(), &other.key)).unwrap();
    assert_eq!(
        verifier
            .verify(&report, &vcek.der, &test_policy(), &binding())
            .unwrap_err(),
        VerifyError::ReportSignature(SignatureError::Invalid)
    );
    // Changed after signing, then signed again.
    let mut bytes = build_report(&bound_spec(), &vcek.key);
    bytes[0x50] ^= 1;
    let report = Report::from_bytes(&bytes).unwrap();
    assert_eq!(
        verifier.verify_evidence(&report, &vcek.der).unwrap_err(),
        VerifyError::ReportSignature(SignatureError::Invalid)
    );
    sign_report(&mut bytes, &vcek.key);
    let report = Report::from_bytes(&bytes).unwrap();
    verifier.verify_evidence(&report, &vcek.der).unwrap();
    let algo = ReportSpec {
        sig_algo: 2,
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &algo).unwrap_err(),
        VerifyError::SignatureAlgorithm(2)
    );
    let vlek = ReportSpec {
        key_info: 1 << 2,
        ..bound_spec()
    };
    assert_eq!(
        verify_with(&vcek, &vlek).unwrap_err(),
        VerifyError::SigningKey(1)
    );
    let future = ReportSpec {
        version: 6,
        ..bound_spec()
    };
    assert!(matches!(
        verify_with(&vcek, &future).unwrap_err(),
        VerifyError::Version { found: 6, .. }
    ));
}

#[test]
fn each_vcek_chain_is_verified_once() {
    let vcek = issue(&VcekSpec::default());
    let verifier = SnpVerifier::new(milan_ca().anchors());
    for _ in 0..3 {
        let report = Report::from_bytes(&build_report(&bound_spec(), &vcek.key)).unwrap();
        verifier
            .verify(&report, &vcek.der, &test_policy(), &binding())
            .unwrap();
    }
    assert_eq!(verifier.cached_vceks(), 1);
    // Refusals are cached too: the same bad VCEK costs one chain check.
    let bad = issue(&VcekSpec {
        omit: vec![oid::HWID],
        ..VcekSpec::default()
    });
    for _ in 0..2 {
        assert!(verifier.trusted_vcek(&bad.der).is_err());
    }
    assert_eq!(verifier.cached_vceks(), 2);
}

#[test]
fn turin_layout_with_2048_bit_roots() {
    let ca = turin_ca();
    let turin_tcb = Tcb {
        fmc: Some(1),
        ..TCB
    };
    let spec = VcekSpec {
        product_name: "Turin-B0".to_owned(),
        tcb: turin_tcb,
        hwid: vec![0x7D; 8],
        ..VcekSpec::default()
    };
    let vcek = ca.issue_vcek(&spec);
    let mut chip_id = [0u8; 64];
    chip_id[..8].copy_from_slice(&[0x7D; 8]);
    let report_spec = ReportSpec {
        product: Product::Turin,
        tcb: turin_tcb,
        chip_id,
        ..bound_spec()
    };
    let verifier = SnpVerifier::new(ca.anchors());
    let report = Report::from_bytes(&build_report(&report_spec, &vcek.key)).unwrap();
    let verdict = verifier
        .verify(&report, &vcek.der, &test_policy(), &binding())
        .unwrap();
    assert_eq!(verdict.product, Product::Turin);
    assert_eq!(verdict.reported_tcb, turin_tcb);
    // A policy that wants a newer FMC refuses it.
    let policy = SnpPolicy {
        min_tcb: Tcb {
            fmc: Some(2),
            ..TCB
        },
        ..test_policy()
    };
    assert!(matches!(
        verifier
            .verify(&report, &vcek.der, &policy, &binding())
            .unwrap_err(),
        VerifyError::TcbBelowMinimum { .. }
    ));
    // A Turin VCEK without fmcSPL is refused.
    let no_fmc = ca.issue_vcek(&VcekSpec {
        omit: vec![oid::FMC_SPL],
        ..spec
    });
    assert_eq!(
        trust_vcek(&ca.anchors(), &no_fmc.der).unwrap_err(),
        VerifyError::Vcek(VcekError::Missing("fmcSPL"))
    );
    // Turin roots do not vouch for a Milan-named VCEK.
    let milan_named = ca.issue_vcek(&VcekSpec::default());
    assert_eq!(
        trust_vcek(&ca.anchors(), &milan_named.der).unwrap_err(),
        VerifyError::NoAnchors(Product::Milan)
    );
}

#[test]
fn vcek_store_finds_the_vcek_by_chip_and_tcb() {
    let dir = tempfile::tempdir().unwrap();
    let current = issue(&VcekSpec::default());
    let older_tcb = Tcb {
        microcode: 100,
        ..TCB
    };
    let older = issue(&VcekSpec {
        tcb: older_tcb,
        ..VcekSpec::default()
    });
    let other_chip = issue(&VcekSpec {
        hwid: vec![0x01; 64],
        ..VcekSpec::default()
    });
    std::fs::write(dir.path().join("current.der"), &current.der).unwrap();
    std::fs::write(dir.path().join("older.der"), &older.der).unwrap();
    std::fs::write(dir.path().join("other.der"), &other_chip.der).unwrap();
    std::fs::write(dir.path().join("real.der"), real_vcek()).unwrap();
    let store = VcekStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 4);

    let report = Report::from_bytes(&build_report(&bound_spec(), &current.key)).unwrap();
    assert_eq!(store.lookup(&report), Some(current.der.as_slice()));
    let old_report = ReportSpec {
        tcb: older_tcb,
        ..bound_spec()
    };
    let report = Report::from_bytes(&build_report(&old_report, &older.key)).unwrap();
    assert_eq!(store.lookup(&report), Some(older.der.as_slice()));
    let real = Report::from_bytes(&real_report_bytes()).unwrap();
    assert_eq!(store.lookup(&real), Some(real_vcek().as_slice()));
    let unknown = ReportSpec {
        tcb: Tcb { snp: 9, ..TCB },
        ..bound_spec()
    };
    let report = Report::from_bytes(&build_report(&unknown, &current.key)).unwrap();
    assert_eq!(store.lookup(&report), None);
    // What the store finds is then verified like any other VCEK.
    let report = Report::from_bytes(&build_report(&bound_spec(), &current.key)).unwrap();
    let der = store.lookup(&report).unwrap();
    SnpVerifier::new(milan_ca().anchors())
        .verify(&report, der, &test_policy(), &binding())
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Timings: cargo test --release -p keyshard-attest --test snp -- --ignored --nocapture

fn median<F: FnMut()>(runs: usize, mut f: F) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

#[test]
#[ignore = "timings: run in release with --ignored --nocapture"]
fn snp_timings() {
    let anchors = TrustAnchors::amd().unwrap();
    let vcek_der = real_vcek();
    let raw = real_report_bytes();
    let report = Report::from_bytes(&raw).unwrap();
    let policy = real_policy();
    let verifier = SnpVerifier::new(anchors.clone());

    let uncached = median(50, || {
        trust_vcek(&anchors, &vcek_der).unwrap();
    });
    let cached = median(2000, || {
        verifier.trusted_vcek(&vcek_der).unwrap();
    });
    let vcek = verifier.trusted_vcek(&vcek_der).unwrap();
    let aws_lc = median(1000, || {
        verify::check_signature(&report, &vcek).unwrap();
    });
    let sev_vcek = sev::certs::snp::Certificate::from_der(&vcek_der).unwrap();
    let sev_path = median(200, || {
        assert!(sev_crate_accepts(&raw, &sev_vcek));
    });
    let full = median(1000, || {
        let report = Report::from_bytes(&raw).unwrap();
        verifier
            .verify(&report, &vcek_der, &policy, report.report_data())
            .unwrap();
    });
    let start = Instant::now();
    let mut count = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        let report = Report::from_bytes(&raw).unwrap();
        verifier
            .verify(&report, &vcek_der, &policy, report.report_data())
            .unwrap();
        count += 1;
    }
    let per_second = f64::from(count) / start.elapsed().as_secs_f64();

    println!("chain + extensions, uncached (3 x RSA-4096 PSS): {uncached:?}");
    println!("chain + extensions, cached (SHA-256 of the DER + lookup): {cached:?}");
    println!("report signature, aws-lc-rs over the raw bytes: {aws_lc:?}");
    println!("report signature, sev crate (parse + p384): {sev_path:?}");
    println!("full verification, chain cached (parse, signature, policy, REPORT_DATA): {full:?}");
    println!("full verifications per second on one core: {per_second:.0}");
    assert!(
        per_second >= 1000.0 || cfg!(debug_assertions),
        "{per_second:.0}/s is below the 1,000/s goal"
    );
}
