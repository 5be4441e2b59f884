//! Tests of shard ECIES: known answers from Python, bindings, the wire format, TPM-shaped points.

use p256::elliptic_curve::sec1::ToEncodedPoint;

use super::*;

fn binding(host: &str, index: u8, epoch: u64) -> ShardBinding {
    ShardBinding {
        credential: KeyId::new("db-password").unwrap(),
        epoch,
        index,
        host: HostId::new(host).unwrap(),
    }
}

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(serde::Deserialize)]
struct Vector {
    name: String,
    host_scalar: String,
    host_public: String,
    ephemeral_scalar: String,
    ephemeral_public: String,
    credential: String,
    epoch: u64,
    index: u8,
    host_id: String,
    shard: String,
    z: String,
    binding: String,
    sealed: String,
}

fn unhex<const N: usize>(text: &str) -> [u8; N] {
    hex::decode(text).unwrap().try_into().unwrap()
}

fn vectors() -> Vec<Vector> {
    let text = include_str!("../../tests/kat/ecies_p256.json");
    serde_json::from_str::<Vectors>(text).unwrap().vectors
}

/// Issue 9 item 3: the construction matches an independent implementation (Python's
/// `cryptography`, tests/kat/ecies_p256.py) byte for byte, every intermediate value included.
#[test]
fn item3_known_answers_match_an_independent_implementation() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 4);
    for v in vectors {
        let name = &v.name;
        let host = SoftwareHostKey::from_scalar(&unhex(&v.host_scalar)).unwrap();
        assert_eq!(
            hex::encode(host.public_key().to_uncompressed()),
            v.host_public,
            "{name}"
        );
        let b = ShardBinding {
            credential: KeyId::new(v.credential.clone()).unwrap(),
            epoch: v.epoch,
            index: v.index,
            host: HostId::new(v.host_id.clone()).unwrap(),
        };
        assert_eq!(hex::encode(b.to_bytes()), v.binding, "{name}");
        let shard = hex::decode(&v.shard).unwrap();

        let sealed =
            seal_with_ephemeral_scalar(&host.public_key(), &unhex(&v.ephemeral_scalar), &b, &shard)
                .unwrap();
        assert_eq!(
            hex::encode(sealed.ephemeral().to_uncompressed()),
            v.ephemeral_public,
            "{name}"
        );
        let z = host.z_gen(sealed.ephemeral()).unwrap();
        assert_eq!(hex::encode(*z.x), v.z, "{name}");
        assert_eq!(hex::encode(sealed.to_bytes()), v.sealed, "{name}");

        let parsed = SealedShard::from_bytes(&hex::decode(&v.sealed).unwrap()).unwrap();
        assert_eq!(
            open(&host, &b, &parsed).unwrap().as_slice(),
            shard,
            "{name}"
        );
    }
}

/// Issue 9 item 3: a shard sealed for (credential, epoch, index, host A) opens only there: not
/// with host B's key (a ciphertext copied to another host), not as host B, not as another
/// index, epoch or credential.
#[test]
fn item3_a_sealed_shard_opens_only_for_its_host_and_binding() {
    let host_a = SoftwareHostKey::generate().unwrap();
    let host_b = SoftwareHostKey::generate().unwrap();
    let bound = binding("host-a", 2, 5);
    let sealed = seal(&host_a.public_key(), &bound, b"fragment bytes").unwrap();
    assert_eq!(
        open(&host_a, &bound, &sealed).unwrap().as_slice(),
        b"fragment bytes"
    );

    let refused = |host: &SoftwareHostKey, b: &ShardBinding| {
        matches!(open(host, b, &sealed), Err(EciesError::Open))
    };
    assert!(refused(&host_b, &bound), "copied to host B");
    assert!(
        refused(&host_b, &binding("host-b", 2, 5)),
        "host B as itself"
    );
    assert!(
        refused(&host_a, &binding("host-b", 2, 5)),
        "host A's key, host B's name"
    );
    assert!(refused(&host_a, &binding("host-a", 3, 5)), "another index");
    assert!(refused(&host_a, &binding("host-a", 2, 6)), "another epoch");
    let other_credential = ShardBinding {
        credential: KeyId::new("db-password2").unwrap(),
        ..bound.clone()
    };
    assert!(refused(&host_a, &other_credential), "another credential");
}

#[test]
fn each_seal_uses_a_fresh_ephemeral_key() {
    let host = SoftwareHostKey::generate().unwrap();
    let b = binding("host-a", 1, 1);
    let one = seal(&host.public_key(), &b, b"same").unwrap();
    let two = seal(&host.public_key(), &b, b"same").unwrap();
    assert_ne!(one.ephemeral(), two.ephemeral());
    assert_ne!(one.ciphertext(), two.ciphertext());
    assert_eq!(one.ciphertext().len(), 4 + TAG_LEN);
}

#[test]
fn tampering_with_any_byte_is_refused() {
    let host = SoftwareHostKey::generate().unwrap();
    let b = binding("host-a", 1, 1);
    let bytes = seal(&host.public_key(), &b, &[7; 20]).unwrap().to_bytes();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        let outcome = SealedShard::from_bytes(&bad).and_then(|s| open(&host, &b, &s));
        assert!(outcome.is_err(), "byte {i} flipped still opens");
    }
}

#[test]
fn decoding_refuses_truncation_version_magic_and_size() {
    let host = SoftwareHostKey::generate().unwrap();
    let bytes = seal(&host.public_key(), &binding("host-a", 1, 1), b"x")
        .unwrap()
        .to_bytes();
    assert_eq!(bytes.len(), 4 + 1 + POINT_LEN + 1 + TAG_LEN);
    for len in 0..bytes.len() {
        assert!(
            matches!(
                SealedShard::from_bytes(&bytes[..len]),
                Err(EciesError::Malformed(_))
            ),
            "truncated to {len}"
        );
    }
    let mut bad = bytes.clone();
    bad[4] = 2;
    assert!(matches!(
        SealedShard::from_bytes(&bad),
        Err(EciesError::Version(2))
    ));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(matches!(
        SealedShard::from_bytes(&bad),
        Err(EciesError::Malformed(_))
    ));
    let mut long = bytes.clone();
    long.resize(MAX_SEALED_LEN + 1, 0);
    assert!(matches!(
        SealedShard::from_bytes(&long),
        Err(EciesError::Malformed(_))
    ));
    assert_eq!(SealedShard::from_bytes(&bytes).unwrap().to_bytes(), bytes);
}

#[test]
fn decoding_refuses_points_off_the_curve_compressed_and_the_identity() {
    let host = SoftwareHostKey::generate().unwrap();
    let bytes = seal(&host.public_key(), &binding("host-a", 1, 1), b"x")
        .unwrap()
        .to_bytes();
    // y + 1 (in the last byte): off the curve.
    let mut off = bytes.clone();
    off[5 + POINT_LEN - 1] ^= 0x01;
    assert!(matches!(
        SealedShard::from_bytes(&off),
        Err(EciesError::Point(_))
    ));
    // The identity has no affine coordinates; (0, 0) stands in for it in some encodings.
    let mut zero = bytes.clone();
    zero[6..5 + POINT_LEN].fill(0);
    assert!(matches!(
        SealedShard::from_bytes(&zero),
        Err(EciesError::Point(_))
    ));
    // SEC1's identity encoding (a single 0x00) and the compressed form are not the wire form.
    assert!(P256Point::from_uncompressed(&[0]).is_err());
    let mut compressed = vec![0x02];
    compressed.extend_from_slice(&host.public_key().x());
    assert!(P256Point::from_uncompressed(&compressed).is_err());
    assert!(P256Point::from_coordinates(&[0; 32], &[0; 32]).is_err());
    assert!(P256Point::from_coordinates(&[1; 33], &[0; 32]).is_err());
}

#[test]
fn sealing_refuses_empty_and_oversized_shards() {
    let host = SoftwareHostKey::generate().unwrap();
    let b = binding("host-a", 1, 1);
    assert!(matches!(
        seal(&host.public_key(), &b, &[]),
        Err(EciesError::ShardLength { len: 0, .. })
    ));
    let largest = vec![1; MAX_SHARD_LEN];
    let sealed = seal(&host.public_key(), &b, &largest).unwrap();
    assert_eq!(sealed.to_bytes().len(), MAX_SEALED_LEN);
    assert_eq!(open(&host, &b, &sealed).unwrap().as_slice(), largest);
    assert!(matches!(
        seal(&host.public_key(), &b, &vec![1; MAX_SHARD_LEN + 1]),
        Err(EciesError::ShardLength { .. })
    ));
}

/// A source shaped like a TPM that drops leading zero bytes from the coordinates it returns.
struct TrimmingSource(p256::SecretKey);

impl SharedPointSource for TrimmingSource {
    type Error = EciesError;

    fn public_key(&self) -> P256Point {
        P256Point(self.0.public_key())
    }

    fn z_gen(&self, ephemeral: &P256Point) -> Result<SharedPoint> {
        let product =
            (ephemeral.as_public_key().to_projective() * *self.0.to_nonzero_scalar()).to_affine();
        let encoded = product.to_encoded_point(false);
        let (x, y) = (encoded.x().unwrap(), encoded.y().unwrap());
        let start = x.iter().position(|b| *b != 0).unwrap_or(x.len());
        assert!(start > 0, "the vector's Z has a leading zero to drop");
        SharedPoint::from_coordinates(&x[start..], y)
    }
}

/// The KDF takes Z as the full 32-byte coordinate: a TPM that returns x without its leading
/// zero byte still opens the known-answer shard whose Z starts with 0x00.
#[test]
fn item3_a_tpm_coordinate_without_leading_zeros_is_padded_back() {
    let v = vectors()
        .into_iter()
        .find(|v| v.name == "z_with_leading_zero")
        .unwrap();
    assert!(v.z.starts_with("00"));
    let scalar: [u8; 32] = unhex(&v.host_scalar);
    let source = TrimmingSource(p256::SecretKey::from_bytes(&scalar.into()).unwrap());
    let b = ShardBinding {
        credential: KeyId::new(v.credential.clone()).unwrap(),
        epoch: v.epoch,
        index: v.index,
        host: HostId::new(v.host_id.clone()).unwrap(),
    };
    let sealed = SealedShard::from_bytes(&hex::decode(&v.sealed).unwrap()).unwrap();
    assert_eq!(
        open(&source, &b, &sealed).unwrap().as_slice(),
        hex::decode(&v.shard).unwrap()
    );
}

/// A failing or lying point source: its error is passed on, and a point off the curve is
/// refused before any key is derived from it.
#[test]
fn a_failing_or_lying_point_source_is_refused() {
    #[derive(Debug, thiserror::Error)]
    #[error("TPM_RC_ECC_POINT")]
    struct TpmRefused;

    struct Refusing(P256Point);
    impl SharedPointSource for Refusing {
        type Error = TpmRefused;
        fn public_key(&self) -> P256Point {
            self.0
        }
        fn z_gen(&self, _: &P256Point) -> std::result::Result<SharedPoint, TpmRefused> {
            Err(TpmRefused)
        }
    }

    let host = SoftwareHostKey::generate().unwrap();
    let b = binding("host-a", 1, 1);
    let sealed = seal(&host.public_key(), &b, b"x").unwrap();
    let err = open(&Refusing(host.public_key()), &b, &sealed).unwrap_err();
    assert!(matches!(err, EciesError::ZGen(_)));
    assert_eq!(
        err.to_string(),
        "the host could not compute the shared point: TPM_RC_ECC_POINT"
    );
    assert!(SharedPoint::from_coordinates(&[5; 32], &[6; 32]).is_err());
}

#[test]
fn coordinates_round_trip_and_debug_hides_the_shared_point() {
    let host = SoftwareHostKey::generate().unwrap();
    let public = host.public_key();
    assert_eq!(
        P256Point::from_coordinates(&public.x(), &public.y()).unwrap(),
        public
    );
    let shared = host.z_gen(&public).unwrap();
    assert_eq!(format!("{shared:?}"), "SharedPoint(..)");
}
