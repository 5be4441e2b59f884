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
use keyshard_core::{Fragment, HolderClass, KeyCheckValue, KeyId};
use proptest::prelude::*;
use proptest::sample::subsequence;

/// (k, n, secret, dealer seed, a permutation seed) with 2 <= k <= n <= 20 and 1..=64 byte secrets.
fn setup(min_spare: u8) -> impl Strategy<Value = (u8, u8, Vec<u8>, [u8; 32])> {
    (2u8..=20)
        .prop_flat_map(move |n| (2u8..=n.saturating_sub(min_spare).max(2), Just(n)))
        .prop_filter("room for spares", move |(k, n)| k + min_spare <= *n)
        .prop_flat_map(|(k, n)| {
            (
                Just(k),
                Just(n),
                prop::collection::vec(any::<u8>(), 1..=64),
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
    #![proptest_config(ProptestConfig::with_cases(128))]

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

    #[test]
    fn random_bytes_are_never_accepted_as_a_dealer_signed_fragment(
        bytes in prop::collection::vec(any::<u8>(), 0..1400),
        seed in any::<[u8; 32]>(),
    ) {
        let key = SigningKey::from_bytes(&seed).verifying_key();
        prop_assert!(Fragment::parse(&bytes).and_then(|f| f.verify(&key)).is_err());
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
