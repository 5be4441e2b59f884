//! Tests of instance evidence and released shards, with quotes signed in software by a P-256
//! key the way a TPM signs them (the swtpm tests are in keyshard-cms/tests/shard_host.rs).

use keyshard_attest::tpm::attest::{ClockInfo, QuoteAttest, QuotedBank};
use keyshard_core::KeyId;
use keyshard_core::policy::PcrBank;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use proptest::prelude::*;

use super::answer::AnswerError;
use super::*;
use crate::ecies::ShardBinding;
use crate::names::HostId;

const NONCE: Nonce = [0x4e; 32];

fn ak_key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).unwrap()
}

fn ak(key: &SigningKey) -> AkPublic {
    AkPublic::from_sec1(key.verifying_key().to_encoded_point(false).as_bytes()).unwrap()
}

fn pcrs(pcr7: u8) -> PcrValues {
    PcrValues::new(
        PcrBank::Sha256,
        vec![(0, vec![0; 32]), (7, vec![pcr7; 32]), (8, vec![8; 32])],
    )
    .unwrap()
}

fn policy() -> InstancePolicy {
    InstancePolicy::new(ak(&ak_key(1)), pcrs(7))
}

/// What the instance's TPM signs for `qualifying` over `actual` PCR values.
fn quote_by(key: &SigningKey, qualifying: &[u8], actual: &PcrValues) -> Quote {
    let attest = QuoteAttest {
        signer_name: [vec![0, 0x0b], vec![0xaa; 32]].concat(),
        extra_data: qualifying.to_vec(),
        clock: ClockInfo {
            clock: 5000,
            reset_count: 3,
            restart_count: 0,
            safe: true,
        },
        firmware_version: 42,
        banks: vec![QuotedBank {
            alg: 0x000b,
            bitmap: actual.selection().bitmap().to_vec(),
        }],
        pcr_digest: actual.composite_digest().to_vec(),
    }
    .to_bytes()
    .unwrap();
    let signature: Signature = key.sign(&attest);
    Quote {
        attest,
        signature: signature.to_bytes().into(),
    }
}

/// Evidence as an honest instance makes it: quoted by AK 1 over `actual`, bound to `nonce` and
/// `key`, reporting `actual`.
fn evidence(nonce: Nonce, key: &FetchKey, actual: &PcrValues) -> InstanceEvidence {
    let quote = quote_by(
        &ak_key(1),
        &qualifying_data(&nonce, &key.public_key()),
        actual,
    );
    InstanceEvidence::new(nonce, key.public_key(), quote, actual.clone())
}

fn binding(index: u8, host: &str) -> ShardBinding {
    ShardBinding {
        credential: KeyId::new("db-password").unwrap(),
        epoch: 4,
        index,
        host: HostId::new(host).unwrap(),
    }
}

#[test]
fn item6_qualifying_data_is_the_documented_hash() {
    let key = FetchPublicKey::from_bytes([0x33; 32]);
    let mut input = vec![26u8];
    input.extend_from_slice(b"keyshard/instance-quote/v1");
    input.extend_from_slice(&NONCE);
    input.extend_from_slice(&[0x33; 32]);
    let expected: [u8; 32] = Sha256::digest(&input).into();
    assert_eq!(qualifying_data(&NONCE, &key), expected);
    assert_ne!(
        qualifying_data(&NONCE, &FetchPublicKey::from_bytes([0x34; 32])),
        expected
    );
    assert_ne!(qualifying_data(&[0x4f; 32], &key), expected);
}

#[test]
fn item6_good_evidence_verifies_and_binds_its_key() {
    let key = FetchKey::generate().unwrap();
    let verified = verify(&evidence(NONCE, &key, &pcrs(7)), &policy(), &NONCE).unwrap();
    assert_eq!(verified.ephemeral(), &key.public_key());
    assert_eq!(verified.quote_info().reset_count, 3);
    assert_eq!(verified.quote_info().clock, 5000);
}

#[test]
fn item6_each_refusal_has_its_own_error() {
    let key = FetchKey::generate().unwrap();
    let good = evidence(NONCE, &key, &pcrs(7));

    // Evidence for another nonce than the one this verifier issued.
    assert_eq!(
        verify(&good, &policy(), &[0x4f; 32]),
        Err(VerifyError::Nonce)
    );
    // Quoted by another TPM's AK.
    let foreign = InstanceEvidence::new(
        NONCE,
        key.public_key(),
        quote_by(
            &ak_key(2),
            &qualifying_data(&NONCE, &key.public_key()),
            &pcrs(7),
        ),
        pcrs(7),
    );
    assert_eq!(
        verify(&foreign, &policy(), &NONCE),
        Err(VerifyError::AttestationKey)
    );
    // An attacker re-uses the honest quote with its own key.
    let attacker = FetchKey::generate().unwrap();
    let rebound =
        InstanceEvidence::new(NONCE, attacker.public_key(), good.quote().clone(), pcrs(7));
    assert_eq!(
        verify(&rebound, &policy(), &NONCE),
        Err(VerifyError::NotBound)
    );
    // An old quote (for another nonce) presented with this verifier's nonce.
    let old = evidence([0x01; 32], &key, &pcrs(7));
    let replayed = InstanceEvidence::new(NONCE, key.public_key(), old.quote().clone(), pcrs(7));
    assert_eq!(
        verify(&replayed, &policy(), &NONCE),
        Err(VerifyError::NotBound)
    );
    // A quote over other PCRs than the policy's.
    let fewer = PcrValues::new(PcrBank::Sha256, vec![(0, vec![0; 32])]).unwrap();
    assert_eq!(
        verify(&evidence(NONCE, &key, &fewer), &policy(), &NONCE),
        Err(VerifyError::Selection {
            expected: "sha256:0,7,8".into(),
            found: "sha256:0".into()
        })
    );
}

#[test]
fn item6_changed_pcrs_are_named_when_the_reported_values_are_the_quoted_ones() {
    let key = FetchKey::generate().unwrap();
    let changed = pcrs(0x99);
    assert_eq!(
        verify(&evidence(NONCE, &key, &changed), &policy(), &NONCE),
        Err(VerifyError::PcrsChanged {
            changed: "sha256:7".into()
        })
    );
    // The instance reports the golden values while its TPM quoted others: the reported values
    // are not believed, and no PCR is named.
    let lying = InstanceEvidence::new(
        NONCE,
        key.public_key(),
        quote_by(
            &ak_key(1),
            &qualifying_data(&NONCE, &key.public_key()),
            &changed,
        ),
        pcrs(7),
    );
    assert_eq!(
        verify(&lying, &policy(), &NONCE),
        Err(VerifyError::PcrDigest {
            selection: "sha256:0,7,8".into()
        })
    );
}

#[test]
fn item6_evidence_and_policy_round_trip_in_their_documented_layout() {
    let key = FetchKey::generate().unwrap();
    let good = evidence(NONCE, &key, &pcrs(7));
    let bytes = good.to_bytes();
    assert_eq!(&bytes[..5], b"KSIE\x01");
    assert_eq!(&bytes[5..37], &NONCE);
    assert_eq!(&bytes[37..69], key.public_key().as_bytes());
    let attest_len = usize::from(u16::from_le_bytes([bytes[69], bytes[70]]));
    assert_eq!(&bytes[71..71 + attest_len], good.quote().attest.as_slice());
    assert_eq!(
        &bytes[71 + attest_len..135 + attest_len],
        &good.quote().signature
    );
    assert_eq!(&bytes[137 + attest_len..], pcrs(7).to_bytes().as_slice());
    let parsed = InstanceEvidence::from_bytes(&bytes).unwrap();
    assert_eq!(parsed, good);
    assert!(verify(&parsed, &policy(), &NONCE).is_ok());

    let policy_bytes = policy().to_bytes();
    assert_eq!(&policy_bytes[..5], b"KSIP\x01");
    assert_eq!(&policy_bytes[5..70], ak(&ak_key(1)).to_sec1().as_slice());
    assert_eq!(InstancePolicy::from_bytes(&policy_bytes).unwrap(), policy());
}

#[test]
fn item6_parsers_refuse_truncation_trailing_bytes_and_other_versions() {
    let key = FetchKey::generate().unwrap();
    let bytes = evidence(NONCE, &key, &pcrs(7)).to_bytes();
    for cut in 0..bytes.len() {
        assert!(
            InstanceEvidence::from_bytes(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        InstanceEvidence::from_bytes(&long),
        Err(FormatError::Trailing {
            what: "instance evidence",
            extra: 1
        })
    );
    let mut bad = bytes.clone();
    bad[4] = 2;
    assert!(matches!(
        InstanceEvidence::from_bytes(&bad),
        Err(FormatError::Version { version: 2, .. })
    ));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(matches!(
        InstanceEvidence::from_bytes(&bad),
        Err(FormatError::Magic { .. })
    ));
    // A certification, not a quote, in the quote's place: magic, then type at offset 71 + 4.
    let mut bad = bytes.clone();
    bad[71 + 5] = 0x17;
    assert!(matches!(
        InstanceEvidence::from_bytes(&bad),
        Err(FormatError::Attest(_))
    ));
    // A zero-length quote.
    let mut bad = bytes[..69].to_vec();
    bad.extend_from_slice(&[0, 0]);
    assert!(matches!(
        InstanceEvidence::from_bytes(&bad),
        Err(FormatError::FieldLength { len: 0, .. })
    ));
    assert!(matches!(
        InstanceEvidence::from_bytes(&vec![0; wire::MAX_EVIDENCE_LEN + 1]),
        Err(FormatError::TooLong { .. })
    ));

    let bytes = policy().to_bytes();
    for cut in 0..bytes.len() {
        assert!(
            InstancePolicy::from_bytes(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut bad = bytes.clone();
    bad[69] ^= 1; // the AK's last byte: off the curve
    assert_eq!(InstancePolicy::from_bytes(&bad), Err(FormatError::AkKey));
    let mut long = bytes;
    long.push(0);
    assert!(matches!(
        InstancePolicy::from_bytes(&long),
        Err(FormatError::Trailing { extra: 1, .. })
    ));
}

#[test]
fn item6_a_released_shard_opens_only_with_the_fetch_key_and_its_binding() {
    let key = FetchKey::generate().unwrap();
    let verified = verify(&evidence(NONCE, &key, &pcrs(7)), &policy(), &NONCE).unwrap();
    let shard = b"a signed fragment of index 2".to_vec();
    let released = ReleasedShard::seal(&verified, &binding(2, "host-a"), &shard).unwrap();
    let parsed = ReleasedShard::from_bytes(&released.to_bytes()).unwrap();
    assert_eq!(parsed, released);
    assert_eq!(
        key.open(&parsed, &binding(2, "host-a")).unwrap().as_slice(),
        shard.as_slice()
    );

    // Another host, index, epoch or credential: no.
    assert_eq!(
        key.open(&parsed, &binding(2, "host-b")),
        Err(AnswerError::Open)
    );
    assert_eq!(
        key.open(&parsed, &binding(3, "host-a")),
        Err(AnswerError::Open)
    );
    let other_epoch = ShardBinding {
        epoch: 5,
        ..binding(2, "host-a")
    };
    assert_eq!(key.open(&parsed, &other_epoch), Err(AnswerError::Open));
    let other_credential = ShardBinding {
        credential: KeyId::new("db-passwore").unwrap(),
        ..binding(2, "host-a")
    };
    assert_eq!(key.open(&parsed, &other_credential), Err(AnswerError::Open));
    // Another fetch's key: no.
    let other = FetchKey::generate().unwrap();
    assert_eq!(
        other.open(&parsed, &binding(2, "host-a")),
        Err(AnswerError::Open)
    );
    // Tampering anywhere: no.
    let bytes = released.to_bytes();
    for i in 5..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        let bad = ReleasedShard::from_bytes(&bad).unwrap();
        assert!(key.open(&bad, &binding(2, "host-a")).is_err(), "byte {i}");
    }
}

#[test]
fn item6_released_shard_parser_is_strict() {
    let key = FetchKey::generate().unwrap();
    let verified = verify(&evidence(NONCE, &key, &pcrs(7)), &policy(), &NONCE).unwrap();
    let bytes = ReleasedShard::seal(&verified, &binding(1, "h"), &[7; 40])
        .unwrap()
        .to_bytes();
    assert_eq!(&bytes[..5], b"KSRS\x01");
    assert_eq!(bytes.len(), 5 + 32 + 40 + 16);
    for cut in 0..=5 + 32 + 16 {
        assert!(ReleasedShard::from_bytes(&bytes[..cut]).is_err(), "{cut}");
    }
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert_eq!(
        ReleasedShard::from_bytes(&bad),
        Err(AnswerError::Version(9))
    );
    assert!(ReleasedShard::from_bytes(&vec![0; MAX_RELEASED_LEN + 1]).is_err());
    assert!(matches!(
        ReleasedShard::seal(&verified, &binding(1, "h"), &[]),
        Err(AnswerError::ShardLength { len: 0, .. })
    ));
    assert!(matches!(
        ReleasedShard::seal(&verified, &binding(1, "h"), &vec![1; MAX_SHARD_LEN + 1]),
        Err(AnswerError::ShardLength { .. })
    ));
}

#[test]
fn a_fetch_key_prints_only_its_public_half() {
    let key = FetchKey::generate().unwrap();
    assert_eq!(
        format!("{key:?}"),
        format!(
            "FetchKey(public {})",
            hex::encode(key.public_key().as_bytes())
        )
    );
}

use super::answer::MAX_RELEASED_LEN;
use crate::ecies::MAX_SHARD_LEN;

proptest! {
    #[test]
    fn parsers_never_panic_and_what_parses_is_canonical(
        bytes in proptest::collection::vec(any::<u8>(), 0..1600)
    ) {
        if let Ok(e) = InstanceEvidence::from_bytes(&bytes) {
            prop_assert_eq!(e.to_bytes(), bytes.clone());
        }
        if let Ok(p) = InstancePolicy::from_bytes(&bytes) {
            prop_assert_eq!(p.to_bytes(), bytes.clone());
        }
        if let Ok(r) = ReleasedShard::from_bytes(&bytes) {
            prop_assert_eq!(r.to_bytes(), bytes);
        }
    }

    #[test]
    fn mutated_evidence_never_panics_and_never_verifies_changed(
        at in 0usize..600, xor in 1u8..=255
    ) {
        let key = FetchKey::generate().unwrap();
        let bytes = evidence(NONCE, &key, &pcrs(7)).to_bytes();
        let mut bad = bytes.clone();
        let i = at % bad.len();
        bad[i] ^= xor;
        if let Ok(e) = InstanceEvidence::from_bytes(&bad) {
            // Only a change to the unsigned, reported PCR values may still verify (they are
            // never believed): everything else the signature or binding covers.
            let pcr_record_start = bytes.len() - pcrs(7).to_bytes().len();
            if verify(&e, &policy(), &NONCE).is_ok() {
                prop_assert!(i >= pcr_record_start, "byte {} changed and still verifies", i);
            }
        }
    }
}
