//! Tests of the shard map: canonical encoding, signature, sealing to the client, refusals.

use ed25519_dalek::SigningKey;

use super::*;

fn cms_key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32])
}

fn location(i: u8) -> ShardLocation {
    ShardLocation {
        host: HostId::new(format!("host-{i}")).unwrap(),
        endpoint: Endpoint::new(format!("https://127.0.0.1:{}", 8440 + u16::from(i))).unwrap(),
        key_name: KeyName::new([vec![0x00, 0x0b], vec![i; 32]].concat()).unwrap(),
    }
}

fn map(credential: &str, k: u8, n: u8) -> ShardMap {
    let credential = KeyId::new(credential).unwrap();
    let kcv = KeyCheckValue::compute(b"the credential", &credential);
    ShardMap::new(
        credential,
        7,
        Threshold::new(k, n).unwrap(),
        PlacementSeed::from_bytes([9; 32]),
        kcv,
        (1..=n).map(location).collect(),
    )
    .unwrap()
}

/// The encoding of `map("db", 2, 2)`, written out field by field from the table in `wire`.
fn expected_encoding() -> Vec<u8> {
    let mut out = b"KSSM\x01\x02db".to_vec();
    out.extend(7u64.to_le_bytes());
    out.extend([2, 2]);
    out.extend([9; 32]);
    out.extend(KeyCheckValue::compute(b"the credential", &KeyId::new("db").unwrap()).as_bytes());
    for i in 1..=2u8 {
        out.push(i);
        out.push(6);
        out.extend(format!("host-{i}").as_bytes());
        out.extend(22u16.to_le_bytes());
        out.extend(format!("https://127.0.0.1:844{i}").as_bytes());
        out.push(34);
        out.extend([0x00, 0x0b]);
        out.extend([i; 32]);
    }
    out
}

#[test]
fn the_encoding_is_the_documented_one_and_round_trips() {
    let m = map("db", 2, 2);
    assert_eq!(m.to_bytes(), expected_encoding());
    assert_eq!(ShardMap::from_bytes(&expected_encoding()).unwrap(), m);
    let big = map("db-password", 3, 5);
    assert_eq!(ShardMap::from_bytes(&big.to_bytes()).unwrap(), big);
    assert_eq!(big.shard(3).unwrap().host.as_str(), "host-3");
    assert!(big.shard(0).is_none() && big.shard(6).is_none());
}

#[test]
fn decoding_refuses_every_truncation_and_trailing_bytes() {
    let bytes = expected_encoding();
    for len in 0..bytes.len() {
        assert!(
            ShardMap::from_bytes(&bytes[..len]).is_err(),
            "truncated to {len}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(ShardMap::from_bytes(&long), Err(MapError::TrailingBytes(1)));
}

#[test]
fn decoding_refuses_non_canonical_and_invalid_fields() {
    let bytes = expected_encoding();
    let with = |at: usize, value: u8| {
        let mut b = bytes.clone();
        b[at] = value;
        ShardMap::from_bytes(&b)
    };
    assert_eq!(with(0, b'X'), Err(MapError::BadMagic));
    assert_eq!(with(4, 2), Err(MapError::Version(2)));
    // k = 1 and k > n.
    assert_eq!(with(16, 1), Err(MapError::Threshold { k: 1, n: 2 }));
    assert_eq!(with(16, 3), Err(MapError::Threshold { k: 3, n: 2 }));
    // The first entry claims index 2.
    let first_entry = 4 + 1 + 3 + 8 + 2 + 32 + 32;
    assert_eq!(
        with(first_entry, 2),
        Err(MapError::ShardIndex {
            expected: 1,
            found: 2
        })
    );
    // A host id with an upper-case letter.
    assert!(matches!(
        with(first_entry + 2, b'H'),
        Err(MapError::Name(_))
    ));
    // An endpoint with a space.
    assert!(matches!(
        with(first_entry + 2 + 6 + 2 + 5, b' '),
        Err(MapError::Endpoint(_))
    ));
    // The second host renamed to the first.
    let second_host = first_entry + 1 + 1 + 6 + 2 + 22 + 1 + 34 + 1 + 1 + 5;
    assert_eq!(
        with(second_host, b'1'),
        Err(MapError::DuplicateHost(HostId::new("host-1").unwrap()))
    );
    assert!(matches!(
        ShardMap::from_bytes(&vec![0; MAX_MAP_LEN + 1]),
        Err(MapError::TooLong { .. })
    ));
}

#[test]
fn a_map_needs_n_distinct_hosts() {
    let credential = KeyId::new("db").unwrap();
    let kcv = KeyCheckValue::compute(b"x", &credential);
    let threshold = Threshold::new(2, 3).unwrap();
    let seed = PlacementSeed::from_bytes([0; 32]);
    assert_eq!(
        ShardMap::new(
            credential.clone(),
            1,
            threshold,
            seed,
            kcv,
            vec![location(1), location(2)]
        ),
        Err(MapError::ShardCount {
            expected: 3,
            found: 2
        })
    );
    assert_eq!(
        ShardMap::new(
            credential,
            1,
            threshold,
            seed,
            kcv,
            vec![location(1), location(2), location(1)]
        ),
        Err(MapError::DuplicateHost(HostId::new("host-1").unwrap()))
    );
    assert!(Endpoint::new("").is_err());
    assert!(Endpoint::new("x".repeat(256)).is_err());
    assert!(KeyName::new(vec![]).is_err());
    assert!(KeyName::new(vec![0; MAX_KEY_NAME_LEN + 1]).is_err());
}

/// Issue 9 item 5: a map sealed to the client opens with the client's key and the CMS key,
/// and gives back the map that was sealed.
#[test]
fn item5_the_client_opens_its_sealed_map() {
    let client = ClientKey::generate().unwrap();
    let m = map("db-password", 3, 5);
    let sealed = m.seal(&cms_key(1), &client.public_key()).unwrap();
    let bytes = sealed.to_bytes();
    assert!(
        !bytes.windows(6).any(|w| w == b"host-1"),
        "the sealed map shows no host names"
    );
    let parsed = SealedShardMap::from_bytes(&bytes).unwrap();
    let opened = parsed
        .open(&client, &cms_key(1).verifying_key(), m.credential())
        .unwrap();
    assert_eq!(opened, m);

    // A key restored from its bytes opens it too.
    let restored = ClientKey::from_bytes(&client.to_bytes()).unwrap();
    assert_eq!(restored.public_key(), client.public_key());
    assert_eq!(
        parsed
            .open(&restored, &cms_key(1).verifying_key(), m.credential())
            .unwrap(),
        m
    );
}

/// Issue 9 item 5: the map does not open with another client's key, under another CMS key, or
/// as another credential.
#[test]
fn item5_the_map_opens_only_for_its_client_cms_and_credential() {
    let client = ClientKey::generate().unwrap();
    let other = ClientKey::generate().unwrap();
    let m = map("db-password", 3, 5);
    let sealed = m.seal(&cms_key(1), &client.public_key()).unwrap();
    let cms = cms_key(1).verifying_key();
    assert_eq!(
        sealed.open(&other, &cms, m.credential()),
        Err(MapError::Open)
    );
    assert_eq!(
        sealed.open(&client, &cms_key(2).verifying_key(), m.credential()),
        Err(MapError::Signature)
    );
    assert_eq!(
        sealed.open(&client, &cms, &KeyId::new("other").unwrap()),
        Err(MapError::Open)
    );
}

/// Issue 9 item 5: tampering anywhere in the sealed map fails, and a map signed by someone
/// other than the CMS (the client, who can seal to itself) is refused.
#[test]
fn item5_tampered_or_forged_maps_are_refused() {
    let client = ClientKey::generate().unwrap();
    let m = map("db", 2, 2);
    let cms = cms_key(1).verifying_key();
    let bytes = m
        .seal(&cms_key(1), &client.public_key())
        .unwrap()
        .to_bytes();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        let outcome =
            SealedShardMap::from_bytes(&bad).and_then(|s| s.open(&client, &cms, m.credential()));
        assert!(outcome.is_err(), "byte {i} flipped still opens");
    }

    // Anyone can seal to the client's public key; only the CMS can sign.
    let forged = m.seal(&cms_key(3), &client.public_key()).unwrap();
    assert_eq!(
        forged.open(&client, &cms, m.credential()),
        Err(MapError::Signature)
    );

    // A signed map with a flipped bit in its body.
    let signed = m.sign(&cms_key(1));
    let mut body = signed.as_bytes().to_vec();
    body[20] ^= 0x01;
    assert_eq!(
        SignedShardMap::from_bytes(body).verify(&cms),
        Err(MapError::Signature)
    );
    assert_eq!(signed.verify(&cms).unwrap(), m);
}

#[test]
fn a_weak_cms_key_and_a_map_for_another_credential_are_refused() {
    // The Ed25519 identity point: every signature with R = identity, s = 0 "verifies" under it.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
    let m = map("db", 2, 2);
    assert_eq!(m.sign(&cms_key(1)).verify(&weak), Err(MapError::WeakKey));

    // The CMS sealed the map of "db" with the associated data of "db-copy": the credential
    // check inside catches what the HPKE binding would not.
    let client = ClientKey::generate().unwrap();
    let signed = m.sign(&cms_key(1));
    let (encapped, ciphertext) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &<Kem as hpke::Kem>::PublicKey::from_bytes(client.public_key().as_bytes()).unwrap(),
        HPKE_INFO,
        signed.as_bytes(),
        &associated_data(&KeyId::new("db-copy").unwrap()),
        &mut rand::rng(),
    )
    .unwrap();
    let sealed = SealedShardMap {
        encapped_key: encapped.to_bytes().into(),
        ciphertext,
    };
    assert_eq!(
        sealed.open(
            &client,
            &cms_key(1).verifying_key(),
            &KeyId::new("db-copy").unwrap()
        ),
        Err(MapError::Credential {
            expected: KeyId::new("db-copy").unwrap(),
            found: KeyId::new("db").unwrap()
        })
    );
}

#[test]
fn sealed_map_parsing_refuses_truncation_version_and_size() {
    let client = ClientKey::generate().unwrap();
    let bytes = map("db", 2, 2)
        .seal(&cms_key(1), &client.public_key())
        .unwrap()
        .to_bytes();
    for len in 0..SEALED_HEADER_LEN + TAG_LEN + SIGNATURE_LEN + 1 {
        assert!(
            matches!(
                SealedShardMap::from_bytes(&bytes[..len]),
                Err(MapError::Sealed(_))
            ),
            "truncated to {len}"
        );
    }
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert_eq!(
        SealedShardMap::from_bytes(&bad),
        Err(MapError::SealedVersion(9))
    );
    assert!(matches!(
        SealedShardMap::from_bytes(&vec![0; MAX_SEALED_MAP_LEN + 1]),
        Err(MapError::Sealed(_))
    ));
    // Sealing to the all-zero X25519 point (small order) cannot give a secret key: refused.
    assert!(
        map("db", 2, 2)
            .seal(&cms_key(1), &ClientPublicKey::from_bytes([0; 32]))
            .is_err()
    );
}

/// Issue 9 item 5 with item 4: the map records the placement seed, so a client that knows the
/// candidate hosts recomputes the placement and checks the map follows it.
#[test]
fn item5_a_map_can_be_checked_against_its_recomputed_placement() {
    use crate::names::{DomainName, FailureDomain};
    use crate::placement::{Candidate, PlacementRequest, place};
    let candidates: Vec<Candidate> = (1..=6u8)
        .map(|i| Candidate {
            host: HostId::new(format!("host-{i}")).unwrap(),
            weight: std::num::NonZeroU32::new(1).unwrap(),
            domain: FailureDomain {
                region: DomainName::new(["eu", "us", "ap"][usize::from(i % 3)]).unwrap(),
                operator: DomainName::new(["acme", "globex"][usize::from(i % 2)]).unwrap(),
            },
        })
        .collect();
    let credential = KeyId::new("db").unwrap();
    let seed = PlacementSeed::from_bytes([4; 32]);
    let threshold = Threshold::new(3, 4).unwrap();
    let request = PlacementRequest {
        seed: &seed,
        credential: &credential,
        threshold,
        candidates: &candidates,
        allow_correlated: false,
    };
    let placement = place(&request).unwrap();
    let locations = placement
        .hosts()
        .iter()
        .map(|host| ShardLocation {
            host: host.clone(),
            endpoint: Endpoint::new(format!("https://{host}.invalid")).unwrap(),
            key_name: KeyName::new(vec![0, 0x0b, 1]).unwrap(),
        })
        .collect();
    let kcv = KeyCheckValue::compute(b"x", &credential);
    let m = ShardMap::new(credential.clone(), 1, threshold, seed, kcv, locations).unwrap();
    let again = place(&PlacementRequest {
        seed: m.seed(),
        ..request
    })
    .unwrap();
    assert!(m.follows(&again));
    let other_seed = PlacementSeed::from_bytes([5; 32]);
    let moved = (0..64u8)
        .map(|b| PlacementSeed::from_bytes([b; 32]))
        .chain([other_seed])
        .filter_map(|s| {
            place(&PlacementRequest {
                seed: &s,
                ..request
            })
            .ok()
        })
        .any(|p| !m.follows(&p));
    assert!(moved, "some other seed places differently");
}
