//! Property tests: any k fragments rebuild the secret, k - 1 never do, a flipped byte in any
//! fragment gets exactly that fragment rejected, and the outcome never depends on the order in
//! which fragments of several deals turn up.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use ed25519_dalek::SigningKey;
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::fragment::DealId;
use keyshard_core::quorum::{self, Candidate, QuorumError, QuorumOutcome, QuorumRequest};
use keyshard_core::sharing::MAX_SECRET_LEN;
use keyshard_core::{Fragment, HolderClass, KeyCheckValue, KeyId};
use proptest::prelude::*;
use proptest::sample::subsequence;

/// (k, n, secret, dealer seed) over the format's whole range: 2 <= k <= n - min_spare,
/// n <= 255, secrets of 1..=1024 bytes. Most cases are small (n <= 20, <= 64 bytes); one in
/// eight spans the full range, where a case costs up to seconds in a debug build.
fn setup(min_spare: u8) -> impl Strategy<Value = (u8, u8, Vec<u8>, [u8; 32])> {
    prop_oneof![
        7 => sized(min_spare, 20, 64),
        1 => sized(min_spare, 255, MAX_SECRET_LEN),
    ]
}

fn sized(
    min_spare: u8,
    max_n: u8,
    max_len: usize,
) -> impl Strategy<Value = (u8, u8, Vec<u8>, [u8; 32])> {
    (2 + min_spare..=max_n)
        .prop_flat_map(move |n| (2u8..=n - min_spare, Just(n)))
        .prop_flat_map(move |(k, n)| {
            (
                Just(k),
                Just(n),
                prop::collection::vec(any::<u8>(), 1..=max_len),
                any::<[u8; 32]>(),
            )
        })
}

fn deal(k: u8, n: u8, secret: &[u8], seed: &[u8; 32]) -> (SigningKey, Vec<Candidate>) {
    let key = SigningKey::from_bytes(seed);
    let plan = DealPlan {
        key_id: KeyId::new("prop").unwrap(),
        epoch: 1,
        k,
        holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
    };
    let candidates = dealer::deal(secret, &plan, &key)
        .unwrap()
        .iter()
        .map(|f| Candidate::new(format!("f{}", f.header().index), f.encoded().to_vec()))
        .collect();
    (key, candidates)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_k_fragments_rebuild_the_secret(
        ((k, n, secret, seed), picks) in setup(0).prop_flat_map(|s| {
            let n = usize::from(s.1);
            let k = usize::from(s.0);
            (Just(s), subsequence((0..n).collect::<Vec<_>>(), k).prop_shuffle())
        })
    ) {
        let (key, all) = deal(k, n, &secret, &seed);
        let chosen: Vec<Candidate> = picks.iter().map(|&i| all[i].clone()).collect();
        let vk = key.verifying_key();
        let out = quorum::rebuild(&QuorumRequest { dealer: &vk, key_id: None, threshold: None, key_check_value: None }, &chosen)
            .unwrap();
        prop_assert_eq!(out.secret.as_slice(), secret.as_slice());
        prop_assert_eq!(out.used.len(), usize::from(k));
    }

    #[test]
    fn k_minus_one_fragments_never_rebuild(
        ((k, n, secret, seed), picks) in setup(0).prop_flat_map(|s| {
            let n = usize::from(s.1);
            let k = usize::from(s.0);
            (Just(s), subsequence((0..n).collect::<Vec<_>>(), k - 1))
        })
    ) {
        let (key, all) = deal(k, n, &secret, &seed);
        let chosen: Vec<Candidate> = picks.iter().map(|&i| all[i].clone()).collect();
        let vk = key.verifying_key();
        let err = quorum::rebuild(&QuorumRequest { dealer: &vk, key_id: None, threshold: None, key_check_value: None }, &chosen)
            .unwrap_err();
        let is_not_met = matches!(err, QuorumError::NotMet { valid, needed: Some(needed), .. }
            if valid == usize::from(k) - 1 && needed == k);
        prop_assert!(is_not_met, "{:?}", err);
    }

    #[test]
    fn one_flipped_byte_rejects_only_that_fragment(
        ((k, n, secret, seed), victim, position, flip) in setup(1).prop_flat_map(|s| {
            let k = usize::from(s.0);
            (Just(s), 0..=k, any::<prop::sample::Index>(), 1u8..=255)
        })
    ) {
        let (key, all) = deal(k, n, &secret, &seed);
        let mut chosen: Vec<Candidate> = all[..=usize::from(k)].to_vec();
        let mut bytes = chosen[victim].content.clone().unwrap().to_vec();
        let at = position.index(bytes.len());
        bytes[at] ^= flip;
        chosen[victim] = Candidate::new(chosen[victim].source.clone(), bytes);
        let vk = key.verifying_key();
        let out = quorum::rebuild(&QuorumRequest { dealer: &vk, key_id: None, threshold: None, key_check_value: None }, &chosen)
            .unwrap();
        prop_assert_eq!(out.secret.as_slice(), secret.as_slice());
        prop_assert_eq!(out.rejected.len(), 1);
        prop_assert_eq!(&out.rejected[0].source, &chosen[victim].source);
        prop_assert!(out.used.iter().all(|u| u.source != chosen[victim].source));
    }

    /// Issue 7 item 14: random bytes fail the magic check, so a test that feeds random bytes
    /// cannot fail. Start from a valid fragment and replace part of its signed body, or its
    /// signature, with random bytes: the result must never verify.
    #[test]
    fn item14_a_valid_fragment_with_a_randomised_body_or_signature_is_never_accepted(
        (k, n, secret, seed) in sized(0, 20, 64),
        which in any::<prop::sample::Index>(),
        start in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 1..=64),
        in_signature in any::<bool>(),
    ) {
        let (key, all) = deal(k, n, &secret, &seed);
        let original = all[which.index(all.len())].content.clone().unwrap().to_vec();
        let signature_at = original.len() - 64;
        let mut bytes = original.clone();
        if in_signature {
            let mut signature = noise.clone();
            signature.resize(64, 0);
            bytes[signature_at..].copy_from_slice(&signature);
        } else {
            let at = start.index(signature_at);
            let end = (at + noise.len()).min(signature_at);
            bytes[at..end].copy_from_slice(&noise[..end - at]);
        }
        prop_assume!(bytes != original);
        let verdict = Fragment::parse(&bytes).and_then(|f| f.verify(&key.verifying_key()));
        prop_assert!(verdict.is_err(), "a changed fragment verified");
        // The unchanged fragment does verify: the check above is not vacuous.
        prop_assert!(Fragment::parse(&original).and_then(|f| f.verify(&key.verifying_key())).is_ok());
    }

    /// Issue 7 item 5: fragments of several deals by one dealer (the same key id, the same or an
    /// older epoch, the same or another secret, other k/n) in any order give the same outcome.
    #[test]
    fn item5_the_outcome_never_depends_on_candidate_order(
        wanted in prop::collection::vec(any::<u8>(), 1..=32),
        other in prop::collection::vec(any::<u8>(), 1..=32),
        deals in prop::collection::vec(
            (2u8..=6, 2u8..=6, any::<bool>(), 1u64..=2, prop::collection::vec(any::<bool>(), 6)),
            2..=4,
        ),
        with_kcv in any::<bool>(),
        seed in any::<[u8; 32]>(),
        shuffles in prop::collection::vec(any::<u64>(), 3),
    ) {
        let key = SigningKey::from_bytes(&seed);
        let mut candidates = Vec::new();
        for (i, (a, b, is_wanted, epoch, picks)) in deals.iter().enumerate() {
            let (k, n) = ((*a).min(*b), (*a).max(*b));
            let secret = if *is_wanted { &wanted } else { &other };
            let plan = DealPlan {
                key_id: KeyId::new("prop").unwrap(),
                epoch: *epoch,
                k,
                holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
            };
            let deal = DealId::from_bytes([u8::try_from(i).unwrap() + 1; 16]);
            for f in dealer::deal_as(secret, &plan, &key, deal).unwrap() {
                if picks[usize::from(f.header().index) - 1] {
                    let source = format!("d{i}-e{epoch}-f{}", f.header().index);
                    candidates.push(Candidate::new(source, f.encoded().to_vec()));
                }
            }
        }
        let id = KeyId::new("prop").unwrap();
        let kcv = KeyCheckValue::compute(&wanted, &id);
        let vk = key.verifying_key();
        let request = QuorumRequest {
            dealer: &vk,
            key_id: None,
            threshold: None,
            key_check_value: with_kcv.then_some(&kcv),
        };
        let first = summary(quorum::rebuild(&request, &candidates));
        if let Summary::Rebuilt { secret, .. } = &first {
            // Never a mix of deals: the secret is one of the two dealt.
            prop_assert!(secret == &wanted || (!with_kcv && secret == &other));
        }
        for shuffle in shuffles {
            let mut shuffled = candidates.clone();
            shuffle_with(&mut shuffled, shuffle);
            prop_assert_eq!(&summary(quorum::rebuild(&request, &shuffled)), &first);
        }
    }
}

/// What must not depend on candidate order: the secret or the error, the epoch and deal, the
/// fragments used, and every rejection (as a set).
#[derive(Debug, PartialEq)]
enum Summary {
    Rebuilt {
        secret: Vec<u8>,
        epoch: u64,
        deal: DealId,
        used: Vec<String>,
        rejected: Vec<String>,
    },
    NotMet {
        valid: usize,
        needed: Option<u8>,
        rejected: Vec<String>,
    },
    Other(String),
}

fn summary(result: Result<QuorumOutcome, QuorumError>) -> Summary {
    let sorted = |list: Vec<String>| {
        let mut list = list;
        list.sort();
        list
    };
    match result {
        Ok(out) => {
            assert!(
                out.used
                    .iter()
                    .all(|u| u.header.deal == out.deal && u.header.epoch == out.epoch)
            );
            Summary::Rebuilt {
                secret: out.secret.to_vec(),
                epoch: out.epoch,
                deal: out.deal,
                used: out.used.iter().map(|u| u.source.clone()).collect(),
                rejected: sorted(out.rejected.iter().map(ToString::to_string).collect()),
            }
        }
        Err(QuorumError::NotMet {
            valid,
            needed,
            rejected,
        }) => Summary::NotMet {
            valid,
            needed,
            rejected: sorted(rejected.iter().map(ToString::to_string).collect()),
        },
        Err(other) => Summary::Other(other.to_string()),
    }
}

/// Fisher-Yates driven by a xorshift generator seeded from `seed`.
fn shuffle_with<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = usize::try_from(state % (i as u64 + 1)).unwrap();
        items.swap(i, j);
    }
}

/// Issue 7 item 14: the largest sharing the format allows, rebuilt in full: k = n = 255, a
/// 1,024-byte secret, the longest key id. Every fragment is needed; 254 rebuild nothing.
#[test]
fn item14_the_largest_sizes_rebuild_fully() {
    let secret: Vec<u8> = (0..MAX_SECRET_LEN).map(|i| (i * 7 + 3) as u8).collect();
    let key = SigningKey::from_bytes(&[9; 32]);
    let plan = DealPlan {
        key_id: KeyId::new("k".repeat(64)).unwrap(),
        epoch: u64::MAX,
        k: 255,
        holders: HolderSlot::numbered(HolderClass::Vhd, 255).collect(),
    };
    let all: Vec<Candidate> = dealer::deal(&secret, &plan, &key)
        .unwrap()
        .iter()
        .map(|f| Candidate::new(format!("f{}", f.header().index), f.encoded().to_vec()))
        .collect();
    let vk = key.verifying_key();
    let request = QuorumRequest {
        dealer: &vk,
        key_id: None,
        threshold: None,
        key_check_value: None,
    };
    let out = quorum::rebuild(&request, &all).unwrap();
    assert_eq!(out.secret.as_slice(), secret.as_slice());
    assert_eq!((out.k, out.used.len(), out.epoch), (255, 255, u64::MAX));
    let err = quorum::rebuild(&request, &all[1..]).unwrap_err();
    assert!(
        matches!(
            err,
            QuorumError::NotMet {
                valid: 254,
                needed: Some(255),
                ..
            }
        ),
        "{err:?}"
    );
}
