//! Fragment format tests: the documented layout, every parser error, and signature checks.

use ed25519_dalek::{Signer, SigningKey, Verifier};

use super::*;
use crate::keys;

/// Writes a fragment field by field from the layout table in `wire`, independently of the
/// encoder, so that these tests pin the documented format rather than echo the code.
#[derive(Clone)]
struct Raw {
    magic: Vec<u8>,
    version: u8,
    class: u8,
    k: u8,
    n: u8,
    index: u8,
    epoch: u64,
    deal: [u8; 16],
    key_id: Vec<u8>,
    holder_id: Vec<u8>,
    share_len: u16,
    share: Vec<u8>,
    kcv: [u8; 32],
}

impl Raw {
    fn valid() -> Self {
        Self {
            magic: b"KSHF".to_vec(),
            version: 2,
            class: 1,
            k: 2,
            n: 3,
            index: 3,
            epoch: 0x0102_0304_0506_0708,
            deal: *b"deal-id-16-bytes",
            key_id: b"root-volume".to_vec(),
            holder_id: b"vhd-3".to_vec(),
            share_len: 4,
            share: vec![0xde, 0xad, 0xbe, 0xef],
            kcv: [0x11; 32],
        }
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut out = self.magic.clone();
        out.extend([self.version, self.class, self.k, self.n, self.index]);
        out.extend(self.epoch.to_le_bytes());
        out.extend(self.deal);
        out.push(self.key_id.len() as u8);
        out.extend(&self.key_id);
        out.push(self.holder_id.len() as u8);
        out.extend(&self.holder_id);
        out.extend(self.share_len.to_le_bytes());
        out.extend(&self.share);
        out.extend(self.kcv);
        out
    }

    fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = self.signed_part();
        let signature = key.sign(&out);
        out.extend(signature.to_bytes());
        out
    }
}

fn dealer() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn parse_err(raw: &Raw) -> FragmentError {
    Fragment::parse(&raw.sign(&dealer())).unwrap_err()
}

#[test]
fn documented_layout_parses_and_verifies() {
    let bytes = Raw::valid().sign(&dealer());
    let fragment = Fragment::parse(&bytes).unwrap();
    let h = fragment.header();
    assert_eq!(h.key_id.as_str(), "root-volume");
    assert_eq!(h.epoch, 0x0102_0304_0506_0708);
    assert_eq!(h.deal.as_bytes(), b"deal-id-16-bytes");
    assert_eq!(h.deal.to_string(), hex::encode(b"deal-id-16-bytes"));
    assert_eq!((h.index, h.threshold.k(), h.threshold.n()), (3, 2, 3));
    assert_eq!((h.class, h.holder_id.as_str()), (HolderClass::Vhd, "vhd-3"));
    assert_eq!(h.kcv.as_bytes(), &[0x11; 32]);
    let verified = fragment.verify(&dealer().verifying_key()).unwrap();
    assert_eq!(verified.share().value(), &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(verified.share().index(), 3);
    assert_eq!(verified.encoded(), bytes.as_slice());
}

#[test]
fn signing_produces_the_documented_layout() {
    let raw = Raw::valid();
    let header = Fragment::parse(&raw.sign(&dealer()))
        .unwrap()
        .header()
        .clone();
    let share = Share::new(3, Zeroizing::new(raw.share.clone()));
    let signed = VerifiedFragment::sign(header, &share, &dealer()).unwrap();
    // Ed25519 is deterministic: same key, same message, same bytes.
    assert_eq!(signed.encoded(), raw.sign(&dealer()).as_slice());
}

#[test]
fn every_truncation_names_the_missing_field() {
    let bytes = Raw::valid().sign(&dealer());
    for len in 0..bytes.len() {
        match Fragment::parse(&bytes[..len]) {
            Err(FragmentError::Truncated { .. }) => {}
            other => panic!("prefix of {len} bytes gave {other:?}"),
        }
    }
    assert_eq!(
        Fragment::parse(&bytes[..bytes.len() - 1]).unwrap_err(),
        FragmentError::Truncated { field: "signature" }
    );
    assert_eq!(
        Fragment::parse(&bytes[..2]).unwrap_err(),
        FragmentError::Truncated { field: "magic" }
    );
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let bytes = vec![0u8; MAX_FRAGMENT_LEN + 1];
    assert_eq!(
        Fragment::parse(&bytes).unwrap_err(),
        FragmentError::TooLarge {
            len: MAX_FRAGMENT_LEN + 1,
            max: MAX_FRAGMENT_LEN
        }
    );
}

#[test]
fn largest_valid_fragment_is_exactly_the_maximum() {
    let raw = Raw {
        key_id: vec![b'k'; 64],
        holder_id: vec![b'h'; 16],
        share_len: 1024,
        share: vec![9; 1024],
        ..Raw::valid()
    };
    let bytes = raw.sign(&dealer());
    assert_eq!(bytes.len(), MAX_FRAGMENT_LEN);
    assert!(Fragment::parse(&bytes).is_ok());
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = Raw::valid().sign(&dealer());
    bytes.extend([0, 0]);
    assert_eq!(
        Fragment::parse(&bytes).unwrap_err(),
        FragmentError::TrailingBytes { extra: 2 }
    );
}

#[test]
fn bad_magic_version_and_class() {
    let raw = Raw::valid();
    assert_eq!(
        parse_err(&Raw {
            magic: b"KSHG".to_vec(),
            ..raw.clone()
        }),
        FragmentError::BadMagic
    );
    for version in [0, 3, 255] {
        assert_eq!(
            parse_err(&Raw {
                version,
                ..raw.clone()
            }),
            FragmentError::UnsupportedVersion { version }
        );
    }
    for class in [0, 6, 255] {
        assert_eq!(
            parse_err(&Raw {
                class,
                ..raw.clone()
            }),
            FragmentError::UnknownHolderClass { code: class }
        );
    }
}

/// Issue 7 item 5: version 1 fragments carry no deal id; they get their own error, not a
/// generic "unsupported version", so the user knows to re-deal.
#[test]
fn item5_version_1_fragments_are_refused_as_from_before_deal_ids() {
    // A version 1 fragment as it was written: no deal id after the epoch.
    let raw = Raw::valid();
    let mut v1 = raw.magic.clone();
    v1.extend([1, raw.class, raw.k, raw.n, raw.index]);
    v1.extend(raw.epoch.to_le_bytes());
    v1.push(raw.key_id.len() as u8);
    v1.extend(&raw.key_id);
    v1.push(raw.holder_id.len() as u8);
    v1.extend(&raw.holder_id);
    v1.extend(raw.share_len.to_le_bytes());
    v1.extend(&raw.share);
    v1.extend(raw.kcv);
    let signature = dealer().sign(&v1);
    v1.extend(signature.to_bytes());
    let err = Fragment::parse(&v1).unwrap_err();
    assert_eq!(err, FragmentError::VersionWithoutDealId);
    let line = err.to_string();
    assert!(
        line.contains("before deal ids") && line.contains("re-deal"),
        "{line}"
    );
}

#[test]
fn bad_threshold_and_index() {
    let raw = Raw::valid();
    assert_eq!(
        parse_err(&Raw {
            k: 1,
            ..raw.clone()
        }),
        FragmentError::BadThreshold(SharingError::ThresholdTooLow { k: 1 })
    );
    assert_eq!(
        parse_err(&Raw {
            k: 4,
            n: 3,
            ..raw.clone()
        }),
        FragmentError::BadThreshold(SharingError::ThresholdAboveShares { k: 4, n: 3 })
    );
    for index in [0, 4] {
        assert_eq!(
            parse_err(&Raw {
                index,
                ..raw.clone()
            }),
            FragmentError::BadShareIndex { index, n: 3 }
        );
    }
}

#[test]
fn bad_ids() {
    let raw = Raw::valid();
    for key_id in [&b""[..], b"has space", b"\xff\xfe"] {
        let err = parse_err(&Raw {
            key_id: key_id.to_vec(),
            ..raw.clone()
        });
        assert!(
            matches!(err, FragmentError::BadKeyId(_)),
            "{key_id:?}: {err:?}"
        );
    }
    for holder_id in [&b""[..], b"VHD-1", &[b'a'; 17]] {
        let err = parse_err(&Raw {
            holder_id: holder_id.to_vec(),
            ..raw.clone()
        });
        assert!(
            matches!(err, FragmentError::BadHolderId(_)),
            "{holder_id:?}: {err:?}"
        );
    }
}

#[test]
fn bad_share_length() {
    let raw = Raw::valid();
    assert_eq!(
        parse_err(&Raw {
            share_len: 0,
            share: vec![],
            ..raw.clone()
        }),
        FragmentError::BadShareLength { len: 0 }
    );
    assert_eq!(
        parse_err(&Raw {
            share_len: 1025,
            share: vec![1; 1025],
            ..raw.clone()
        }),
        FragmentError::BadShareLength { len: 1025 }
    );
    // A length that claims more bytes than follow is a truncation, not an overread.
    let mut bytes = Raw {
        share_len: 900,
        ..raw
    }
    .sign(&dealer());
    bytes.truncate(bytes.len() - 1);
    assert!(matches!(
        Fragment::parse(&bytes).unwrap_err(),
        FragmentError::Truncated { .. }
    ));
}

#[test]
fn any_flipped_byte_is_caught() {
    let bytes = Raw::valid().sign(&dealer());
    let key = dealer().verifying_key();
    for pos in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut tampered = bytes.clone();
            tampered[pos] ^= bit;
            let verdict = Fragment::parse(&tampered).and_then(|f| f.verify(&key));
            assert!(
                verdict.is_err(),
                "flip of bit {bit:#x} at byte {pos} went unnoticed"
            );
        }
    }
}

/// Issue 7 item 12: the identity-point forgery. With the dealer key and R both the identity
/// point and s = 0, plain `verify` accepts any message (s·B - h·A = O = R); `verify_strict`
/// refuses small-order keys and R. Replacing `verify_strict` by `verify` fails this test.
#[test]
fn item12_the_identity_point_forgery_is_refused() {
    let identity = crate::keys::tests::IDENTITY;
    let weak = VerifyingKey::from_bytes(&identity).unwrap();
    let mut forged = Raw::valid().signed_part();
    let mut signature = [0u8; 64];
    signature[..32].copy_from_slice(&identity);
    // The forgery is real: plain verification accepts it.
    assert!(
        weak.verify(&forged, &Signature::from_bytes(&signature))
            .is_ok()
    );
    forged.extend(signature);
    let fragment = Fragment::parse(&forged).unwrap();
    assert_eq!(
        fragment.verify(&weak).unwrap_err(),
        FragmentError::BadSignature
    );
}

#[test]
fn another_dealers_fragment_fails_the_signature_check() {
    let bytes = Raw::valid().sign(&keys::generate().unwrap());
    let fragment = Fragment::parse(&bytes).unwrap();
    assert_eq!(
        fragment.verify(&dealer().verifying_key()).unwrap_err(),
        FragmentError::BadSignature
    );
}

#[test]
fn signing_refuses_an_index_that_does_not_match_the_share() {
    let raw = Raw::valid();
    let header = Fragment::parse(&raw.sign(&dealer()))
        .unwrap()
        .header()
        .clone();
    let share = Share::new(2, Zeroizing::new(raw.share.clone()));
    assert_eq!(
        VerifiedFragment::sign(header, &share, &dealer()).unwrap_err(),
        FragmentError::BadShareIndex { index: 2, n: 3 }
    );
}

#[test]
fn debug_output_never_contains_share_bytes() {
    let bytes = Raw::valid().sign(&dealer());
    let fragment = Fragment::parse(&bytes).unwrap();
    let parsed_text = format!("{fragment:?}");
    let verified_text = format!("{:?}", fragment.verify(&dealer().verifying_key()).unwrap());
    for text in [parsed_text, verified_text] {
        assert!(!text.contains("222") && !text.contains("0xde"), "{text}");
        assert!(
            text.contains("share_len: 4") || text.contains("len: 4"),
            "{text}"
        );
    }
}

/// The fragment parser's fuzz seeds (`fuzz/seeds/fragment_parse/`), built from the layout table
/// with fixed fields, so they are the same bytes on every run.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let typical = Raw {
        k: 2,
        n: 3,
        index: 2,
        epoch: 1,
        key_id: b"root".to_vec(),
        holder_id: b"vhd-2".to_vec(),
        share_len: 32,
        share: (0..32).collect(),
        ..Raw::valid()
    };
    let smallest = Raw {
        k: 2,
        n: 2,
        index: 1,
        epoch: u64::MAX,
        key_id: b"k".to_vec(),
        holder_id: b"v".to_vec(),
        share_len: 1,
        share: vec![0x5a],
        ..Raw::valid()
    };
    let largest = Raw {
        class: 2,
        k: 255,
        n: 255,
        index: 255,
        key_id: vec![b'K'; 64],
        holder_id: vec![b'h'; 16],
        share_len: 1024,
        share: (0..1024u32).map(|i| (i % 251) as u8).collect(),
        ..Raw::valid()
    };
    vec![
        ("vhd-2of3-32b.ksf", typical.sign(&dealer())),
        ("min-1b-max-epoch.ksf", smallest.sign(&dealer())),
        ("max-1024b-64-char-id.ksf", largest.sign(&dealer())),
    ]
}

fn fuzz_seed_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/fragment_parse")
}

/// The committed seeds are valid fragments of the current format: a format change that forgets
/// them fails here. Regenerate with
/// `cargo test -p keyshard-core --lib write_fuzz_seeds -- --ignored`.
#[test]
fn fuzz_seeds_are_current_valid_fragments() {
    for (name, bytes) in fuzz_seeds() {
        let on_disk = std::fs::read(fuzz_seed_dir().join(name)).unwrap();
        assert_eq!(on_disk, bytes, "{name} is stale: regenerate the seeds");
        let fragment = Fragment::parse(&on_disk).unwrap();
        assert!(fragment.verify(&dealer().verifying_key()).is_ok(), "{name}");
    }
    let largest = fuzz_seeds().pop().unwrap().1;
    assert_eq!(largest.len(), MAX_FRAGMENT_LEN);
}

#[test]
#[ignore = "writes fuzz/seeds/fragment_parse; run by hand after a format change"]
fn write_fuzz_seeds() {
    let dir = fuzz_seed_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in fuzz_seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
