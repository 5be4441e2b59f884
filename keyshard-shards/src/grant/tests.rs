//! Tests of grants: the known answer made independently (`tests/kat/grant.py`), each
//! verification step's refusal, and the parser on tampered bytes.

use keyshard_attest::tpm::{AkPublic, PcrValues};
use keyshard_core::policy::PcrBank;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use proptest::prelude::*;

use super::*;
use crate::ecies::{P256Point, ShardBinding};

/// The CMS signing key of the known answer.
const CMS_SEED: [u8; 32] = [0x42; 32];
/// 2026-11-29T12:00:00Z in ms.
const NOT_AFTER_MS: u64 = 1_795_953_600_000;

fn cms() -> SigningKey {
    SigningKey::from_bytes(&CMS_SEED)
}

fn policy() -> InstancePolicy {
    let ak = p256::SecretKey::from_bytes(&[0x0a; 32].into()).unwrap();
    let ak = AkPublic::from_sec1(ak.public_key().to_encoded_point(false).as_bytes()).unwrap();
    let golden = PcrValues::new(PcrBank::Sha256, vec![(0, vec![0; 32]), (7, vec![7; 32])]).unwrap();
    InstancePolicy::new(ak, golden)
}

/// A sealed shard for host-2's slot, sealed to a fixed key with a fixed ephemeral scalar, so
/// its bytes (and digest) are the known answer's.
fn sealed() -> SealedShard {
    let host = p256::SecretKey::from_bytes(&[0x07; 32].into()).unwrap();
    let host =
        P256Point::from_uncompressed(host.public_key().to_encoded_point(false).as_bytes()).unwrap();
    let binding = ShardBinding {
        credential: KeyId::new("db-password").unwrap(),
        epoch: 1,
        index: 2,
        host: HostId::new("host-2").unwrap(),
    };
    crate::ecies::seal_with_ephemeral_scalar(&host, &[0x0e; 32], &binding, b"a shard").unwrap()
}

fn statement() -> GrantStatement {
    GrantStatement {
        credential: KeyId::new("db-password").unwrap(),
        epoch: 1,
        index: 2,
        host: HostId::new("host-2").unwrap(),
        instance: InstanceId::new("vm-web-1").unwrap(),
        policy: policy(),
        shard_digest: shard_digest(&sealed()),
        not_after_ms: NOT_AFTER_MS,
    }
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Within the grant's life: 60 s before it ends.
fn now() -> SystemTime {
    at(NOT_AFTER_MS - 60_000)
}

fn host() -> HostId {
    HostId::new("host-2").unwrap()
}

#[derive(serde::Deserialize)]
struct Kat {
    cms_seed: String,
    policy: String,
    sealed: String,
    grant: String,
}

#[test]
#[ignore = "prints the known answer's inputs for tests/kat/grant.py"]
fn print_known_answer_inputs() {
    println!("policy {}", hex::encode(policy().to_bytes()));
    println!("sealed {}", hex::encode(sealed().to_bytes()));
    println!("grant {}", hex::encode(statement().sign(&cms()).to_bytes()));
}

#[test]
fn item2_the_grant_matches_the_independent_known_answer() {
    let kat: Kat = serde_json::from_str(include_str!("../../tests/kat/grant.json")).unwrap();
    assert_eq!(kat.cms_seed, hex::encode(CMS_SEED));
    assert_eq!(kat.policy, hex::encode(policy().to_bytes()));
    assert_eq!(kat.sealed, hex::encode(sealed().to_bytes()));
    let grant = statement().sign(&cms());
    assert_eq!(hex::encode(grant.to_bytes()), kat.grant);
    let parsed = Grant::from_bytes(&hex::decode(&kat.grant).unwrap()).unwrap();
    assert_eq!(parsed, grant);
    let verified = parsed
        .verify(&cms().verifying_key(), &host(), &sealed(), now())
        .unwrap();
    assert_eq!(verified.statement(), &statement());
    assert_eq!(verified.index(), 2);
    assert_eq!(verified.instance().as_str(), "vm-web-1");
    assert_eq!(verified.policy(), &policy());
}

#[test]
fn item2_a_grant_signed_by_another_key_is_refused() {
    let forged = statement().sign(&SigningKey::from_bytes(&[0x43; 32]));
    assert_eq!(
        forged.verify(&cms().verifying_key(), &host(), &sealed(), now()),
        Err(GrantError::Signature)
    );
}

#[test]
fn item2_a_grant_for_another_host_is_refused() {
    let grant = statement().sign(&cms());
    let other = HostId::new("host-3").unwrap();
    assert_eq!(
        grant.verify(&cms().verifying_key(), &other, &sealed(), now()),
        Err(GrantError::Host {
            granted: host(),
            this: other
        })
    );
}

#[test]
fn item2_a_sealed_shard_other_than_the_granted_one_is_refused() {
    let grant = statement().sign(&cms());
    let host_key = p256::SecretKey::from_bytes(&[0x07; 32].into()).unwrap();
    let host_key =
        P256Point::from_uncompressed(host_key.public_key().to_encoded_point(false).as_bytes())
            .unwrap();
    let binding = ShardBinding {
        credential: KeyId::new("db-password").unwrap(),
        epoch: 1,
        index: 2,
        host: host(),
    };
    // The same slot sealed again (another ephemeral key): another ciphertext.
    let other = crate::ecies::seal(&host_key, &binding, b"a shard").unwrap();
    assert_eq!(
        grant.verify(&cms().verifying_key(), &host(), &other, now()),
        Err(GrantError::ShardDigest)
    );
}

#[test]
fn item2_an_expired_grant_is_refused_and_one_at_its_last_millisecond_is_not() {
    let grant = statement().sign(&cms());
    let key = cms().verifying_key();
    assert!(
        grant
            .verify(&key, &host(), &sealed(), at(NOT_AFTER_MS))
            .is_ok()
    );
    assert_eq!(
        grant.verify(&key, &host(), &sealed(), at(NOT_AFTER_MS + 1)),
        Err(GrantError::Expired { ago_ms: 1 })
    );
}

#[test]
fn item2_a_grant_that_claims_a_longer_life_than_grants_have_is_refused() {
    let grant = statement().sign(&cms());
    let key = cms().verifying_key();
    let longest = millis(LIFETIME + MAX_CLOCK_SKEW);
    assert!(
        grant
            .verify(&key, &host(), &sealed(), at(NOT_AFTER_MS - longest))
            .is_ok()
    );
    assert_eq!(
        grant.verify(&key, &host(), &sealed(), at(NOT_AFTER_MS - longest - 1)),
        Err(GrantError::TooLong {
            ahead_ms: longest + 1,
            max_ms: longest
        })
    );
}

#[test]
fn item2_every_changed_field_breaks_the_signature() {
    let grant = statement().sign(&cms());
    let bytes = grant.to_bytes();
    let key = cms().verifying_key();
    let statement_len = bytes.len() - SIGNATURE_LEN;
    let mut refused = 0;
    for offset in 0..bytes.len() {
        let mut tampered = bytes.clone();
        tampered[offset] ^= 0x01;
        match Grant::from_bytes(&tampered) {
            // A change the parser lets through must fail the signature (or, for the host id,
            // the host check, which comes after the signature).
            Ok(parsed) => {
                let verdict = parsed.verify(&key, &host(), &sealed(), now());
                assert!(verdict.is_err(), "byte {offset} of {statement_len} changed");
                refused += 1;
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, bytes.len());
}

#[test]
fn item2_malformed_grants_are_refused_with_their_reason() {
    let bytes = statement().sign(&cms()).to_bytes();
    let with = |offset: usize, value: u8| {
        let mut b = bytes.clone();
        b[offset] = value;
        b
    };
    assert_eq!(Grant::from_bytes(&with(0, b'X')), Err(GrantError::BadMagic));
    assert_eq!(Grant::from_bytes(&with(4, 2)), Err(GrantError::Version(2)));
    // credential "db-password" (11 bytes) at 6..17, epoch 17..25, index at 25.
    assert_eq!(Grant::from_bytes(&with(25, 0)), Err(GrantError::Index));
    assert!(matches!(
        Grant::from_bytes(&with(7, b' ')),
        Err(GrantError::Name(_))
    ));
    assert_eq!(
        Grant::from_bytes(&bytes[..bytes.len() - 1]),
        Err(GrantError::Truncated("signature"))
    );
    assert_eq!(Grant::from_bytes(&[]), Err(GrantError::Truncated("magic")));
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(Grant::from_bytes(&long), Err(GrantError::TrailingBytes(1)));
    let huge = vec![0u8; MAX_GRANT_LEN + 1];
    assert!(matches!(
        Grant::from_bytes(&huge),
        Err(GrantError::TooLarge { .. })
    ));
}

#[test]
fn item2_a_weak_cms_key_is_refused() {
    let grant = statement().sign(&cms());
    // The identity point: a small-order key under which forged signatures verify.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = VerifyingKey::from_bytes(&identity).unwrap();
    assert_eq!(
        grant.verify(&weak, &host(), &sealed(), now()),
        Err(GrantError::WeakKey)
    );
}

proptest! {
    /// Any bytes, and any valid grant with bytes changed, cut or appended: a value or a typed
    /// refusal, never a panic; what parses re-encodes to the same bytes.
    #[test]
    fn item2_any_bytes_parse_to_the_canonical_grant_or_a_refusal(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
        tail in prop::collection::vec(any::<u8>(), 0..3),
        noise in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = statement().sign(&cms()).to_bytes();
        for (at, value) in edits {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        bytes.truncate(bytes.len() - cut % 8);
        bytes.extend_from_slice(&tail);
        for input in [&bytes, &noise] {
            if let Ok(grant) = Grant::from_bytes(input) {
                prop_assert_eq!(&grant.to_bytes(), input);
            }
        }
    }
}
