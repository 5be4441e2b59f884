//! Quorum tests: each reason a fragment is set aside, epochs, and the not-met report.

use ed25519_dalek::SigningKey;

use super::*;
use crate::dealer::{self, DealPlan, HolderSlot};
use crate::fragment::DealId;
use crate::holder::HolderClass;
use crate::keys;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn key_id(name: &str) -> KeyId {
    KeyId::new(name).unwrap()
}

fn deal(secret: &[u8], id: &str, epoch: u64, k: u8, n: u8, key: &SigningKey) -> Vec<Candidate> {
    let plan = DealPlan {
        key_id: key_id(id),
        epoch,
        k,
        holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
    };
    dealer::deal(secret, &plan, key)
        .unwrap()
        .iter()
        .map(|f| {
            Candidate::new(
                format!("e{epoch}-f{}", f.header().index),
                f.encoded().to_vec(),
            )
        })
        .collect()
}

fn request(key: &VerifyingKey) -> QuorumRequest<'_> {
    QuorumRequest {
        dealer: key,
        key_id: None,
        threshold: None,
        key_check_value: None,
    }
}

fn sources(list: &[Accepted]) -> Vec<&str> {
    list.iter().map(|a| a.source.as_str()).collect()
}

fn reasons(rejected: &[Rejection]) -> Vec<(&str, RejectReason)> {
    rejected
        .iter()
        .map(|r| (r.source.as_str(), r.reason.clone()))
        .collect()
}

#[test]
fn k_of_n_rebuilds_and_reports_used_and_spare() {
    let key = keys::generate().unwrap();
    let fragments = deal(SECRET, "vol", 1, 3, 5, &key);
    let picked = [
        fragments[4].clone(),
        fragments[1].clone(),
        fragments[3].clone(),
        fragments[0].clone(),
    ];
    let out = rebuild(&request(&key.verifying_key()), &picked).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!((out.key_id.as_str(), out.epoch, out.k), ("vol", 1, 3));
    assert_eq!(sources(&out.used), ["e1-f1", "e1-f2", "e1-f4"]);
    assert_eq!(sources(&out.spare), ["e1-f5"]);
    assert!(out.rejected.is_empty());
}

#[test]
fn below_k_is_not_met_with_counts() {
    let key = keys::generate().unwrap();
    let fragments = deal(SECRET, "vol", 1, 3, 5, &key);
    let err = rebuild(&request(&key.verifying_key()), &fragments[..2]).unwrap_err();
    assert_eq!(
        err,
        QuorumError::NotMet {
            valid: 2,
            needed: Some(3),
            rejected: vec![
                Rejection {
                    source: "e1-f1".into(),
                    reason: RejectReason::IncompleteEpoch {
                        epoch: 1,
                        valid: 2,
                        k: 3
                    }
                },
                Rejection {
                    source: "e1-f2".into(),
                    reason: RejectReason::IncompleteEpoch {
                        epoch: 1,
                        valid: 2,
                        k: 3
                    }
                },
            ]
        }
    );
    assert_eq!(
        err.to_string(),
        "quorum not met: 2 valid fragment(s) of one epoch, 3 needed"
    );
}

#[test]
fn tampered_garbled_and_foreign_fragments_are_skipped_while_a_quorum_remains() {
    let key = keys::generate().unwrap();
    let mut fragments = deal(SECRET, "vol", 1, 2, 5, &key);
    let mut tampered = fragments[0].content.clone().unwrap().to_vec();
    let last = tampered.len() - 70;
    tampered[last] ^= 1;
    fragments[0] = Candidate::new("e1-f1", tampered);
    fragments[1] = Candidate::new("e1-f2", b"not a fragment".to_vec());
    fragments.push(Candidate::unavailable("vhd-9", "no such device"));
    let other_dealer = keys::generate().unwrap();
    let mut foreign_dealer = deal(SECRET, "vol", 1, 2, 5, &other_dealer);
    foreign_dealer[0].source = "forged".into();
    fragments.insert(0, foreign_dealer[0].clone());

    let out = rebuild(&request(&key.verifying_key()), &fragments).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(sources(&out.used), ["e1-f3", "e1-f4"]);
    let got = reasons(&out.rejected);
    assert_eq!(got[0], ("forged", RejectReason::BadSignature));
    assert_eq!(got[1], ("e1-f1", RejectReason::BadSignature));
    assert_eq!(
        got[2],
        ("e1-f2", RejectReason::Malformed(FragmentError::BadMagic))
    );
    assert_eq!(
        got[3],
        ("vhd-9", RejectReason::Unavailable("no such device".into()))
    );
}

#[test]
fn foreign_key_id_is_named_when_a_key_id_is_requested() {
    let key = keys::generate().unwrap();
    let mut fragments = deal(SECRET, "vol", 1, 2, 3, &key);
    let mut other = deal(b"another secret!!", "data", 1, 2, 3, &key);
    other[0].source = "data-f1".into();
    fragments.push(other[0].clone());
    let wanted = key_id("vol");
    let vk = key.verifying_key();
    let req = QuorumRequest {
        key_id: Some(&wanted),
        ..request(&vk)
    };
    let out = rebuild(&req, &fragments).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(
        reasons(&out.rejected),
        [(
            "data-f1",
            RejectReason::ForeignKeyId {
                found: key_id("data"),
                expected: wanted.clone()
            }
        )]
    );
    // Without a requested key id, mixed keys are ambiguous rather than silently chosen.
    let err = rebuild(&request(&vk), &fragments).unwrap_err();
    assert_eq!(
        err,
        QuorumError::AmbiguousKeyId {
            key_ids: vec![key_id("data"), key_id("vol")]
        }
    );
}

#[test]
fn threshold_expected_by_the_caller_is_enforced() {
    let key = keys::generate().unwrap();
    let fragments = deal(SECRET, "vol", 1, 2, 3, &key);
    let vk = key.verifying_key();
    let req = QuorumRequest {
        threshold: Some(3),
        ..request(&vk)
    };
    let err = rebuild(&req, &fragments).unwrap_err();
    let QuorumError::NotMet {
        valid,
        needed,
        rejected,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((valid, needed), (0, Some(3)));
    assert!(rejected.iter().all(|r| r.reason
        == RejectReason::ThresholdMismatch {
            found: 2,
            expected: 3
        }));
}

#[test]
fn newest_complete_epoch_wins_and_older_ones_are_stale() {
    let key = keys::generate().unwrap();
    let old = deal(SECRET, "vol", 1, 2, 3, &key);
    let new = deal(SECRET, "vol", 2, 2, 3, &key);
    let all = [
        old[0].clone(),
        new[2].clone(),
        old[1].clone(),
        new[0].clone(),
    ];
    let out = rebuild(&request(&key.verifying_key()), &all).unwrap();
    assert_eq!(out.epoch, 2);
    assert_eq!(sources(&out.used), ["e2-f1", "e2-f3"]);
    assert_eq!(
        reasons(&out.rejected),
        [
            (
                "e1-f1",
                RejectReason::Superseded {
                    epoch: 1,
                    used_epoch: 2
                }
            ),
            (
                "e1-f2",
                RejectReason::Superseded {
                    epoch: 1,
                    used_epoch: 2
                }
            ),
        ]
    );
}

#[test]
fn an_incomplete_new_epoch_falls_back_to_the_old_one() {
    // A rotation that has committed one share of epoch 2 so far.
    let key = keys::generate().unwrap();
    let old = deal(SECRET, "vol", 1, 2, 3, &key);
    let new = deal(SECRET, "vol", 2, 2, 3, &key);
    let all = [new[0].clone(), old[1].clone(), old[2].clone()];
    let out = rebuild(&request(&key.verifying_key()), &all).unwrap();
    assert_eq!((out.epoch, out.secret.as_slice()), (1, SECRET));
    assert_eq!(
        reasons(&out.rejected),
        [(
            "e2-f1",
            RejectReason::IncompleteEpoch {
                epoch: 2,
                valid: 1,
                k: 2
            }
        )]
    );
}

#[test]
fn shares_of_different_epochs_are_never_mixed() {
    let key = keys::generate().unwrap();
    let old = deal(SECRET, "vol", 1, 2, 3, &key);
    let new = deal(SECRET, "vol", 2, 2, 3, &key);
    let err = rebuild(
        &request(&key.verifying_key()),
        &[old[0].clone(), new[1].clone()],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            QuorumError::NotMet {
                valid: 1,
                needed: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
}

/// `deal_as` for the quorum tests: fixed deal id, vhd holders, sources `<name>-f<index>`.
fn deal_named(
    secret: &[u8],
    epoch: u64,
    k: u8,
    n: u8,
    deal: [u8; 16],
    name: &str,
    key: &SigningKey,
) -> Vec<Candidate> {
    let plan = DealPlan {
        key_id: key_id("vol"),
        epoch,
        k,
        holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
    };
    dealer::deal_as(secret, &plan, key, DealId::from_bytes(deal))
        .unwrap()
        .iter()
        .map(|f| {
            Candidate::new(
                format!("{name}-f{}", f.header().index),
                f.encoded().to_vec(),
            )
        })
        .collect()
}

#[test]
fn duplicate_index_and_inconsistent_deal_members_are_rejected() {
    let key = keys::generate().unwrap();
    let fragments = deal_named(SECRET, 1, 2, 3, [1; 16], "e1", &key);
    let mut copy = fragments[0].clone();
    copy.source = "copy".into();
    // The same deal id signed for another k/n or another secret: a dealer fault.
    let mut odd = deal_named(b"a different secret", 1, 3, 4, [1; 16], "odd", &key)[3].clone();
    odd.source = "odd-kn".into();
    let mut odd_kcv = deal_named(b"a different secret", 1, 2, 3, [1; 16], "odd", &key)[2].clone();
    odd_kcv.source = "odd-kcv".into();
    let all = [
        fragments[0].clone(),
        copy,
        odd,
        odd_kcv,
        fragments[1].clone(),
    ];
    let out = rebuild(&request(&key.verifying_key()), &all).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(
        reasons(&out.rejected),
        [
            (
                "e1-f1",
                RejectReason::DuplicateIndex {
                    epoch: 1,
                    index: 1,
                    first_source: "copy".into()
                }
            ),
            ("odd-kcv", RejectReason::InconsistentKeyCheck { epoch: 1 }),
            (
                "odd-kn",
                RejectReason::InconsistentThreshold {
                    epoch: 1,
                    k: 3,
                    n: 4,
                    epoch_k: 2,
                    epoch_n: 3
                }
            ),
        ]
    );
}

/// Issue 7 item 5: two splits of one secret, same key id and epoch. `combine A1 B2 A3` used to
/// exit 2 (B2 disagreed with A1's epoch, A1 + A3 were never tried together); the deal id keeps
/// A and B apart, and A1 + A3 rebuild the secret.
#[test]
fn item5_combine_a1_b2_a3_rebuilds_from_the_a_deal() {
    let key = keys::generate().unwrap();
    let a = deal_named(SECRET, 1, 2, 3, [0xa; 16], "a", &key);
    let b = deal_named(SECRET, 1, 2, 3, [0xb; 16], "b", &key);
    let out = rebuild(
        &request(&key.verifying_key()),
        &[a[0].clone(), b[1].clone(), a[2].clone()],
    )
    .unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(out.deal, DealId::from_bytes([0xa; 16]));
    assert_eq!(sources(&out.used), ["a-f1", "a-f3"]);
    assert_eq!(
        reasons(&out.rejected),
        [(
            "b-f2",
            RejectReason::OtherDeal {
                epoch: 1,
                deal: DealId::from_bytes([0xb; 16]),
                used_deal: DealId::from_bytes([0xa; 16])
            }
        )]
    );
}

/// Issue 7 item 5: a 2-of-4 fragment given first set the epoch's k/n, and the good 2-of-3 set
/// that followed was rejected as inconsistent.
#[test]
fn item5_a_2_of_4_fragment_first_no_longer_fails_a_good_2_of_3_set() {
    let key = keys::generate().unwrap();
    let stale = deal_named(
        b"an older secret of the same name",
        1,
        2,
        4,
        [4; 16],
        "s",
        &key,
    );
    let good = deal_named(SECRET, 1, 2, 3, [3; 16], "g", &key);
    let id = key_id("vol");
    let kcv = crate::KeyCheckValue::compute(SECRET, &id);
    let vk = key.verifying_key();
    let all = [stale[3].clone(), good[0].clone(), good[2].clone()];
    let out = rebuild(&request(&vk), &all).unwrap();
    assert_eq!((out.secret.as_slice(), out.k), (SECRET, 2));
    assert_eq!(sources(&out.used), ["g-f1", "g-f3"]);
    // With the manifest's key check value, the stale one is named as another secret.
    let req = QuorumRequest {
        key_check_value: Some(&kcv),
        ..request(&vk)
    };
    let out = rebuild(&req, &all).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(
        reasons(&out.rejected),
        [("s-f4", RejectReason::ForeignSecret)]
    );
}

/// Signs `share` into a fragment of `deal` as the dealer would, but with a share of the
/// dealer's choosing: a dealer-signed fragment whose share is wrong.
fn signed_with_share(like: &Candidate, share: &[u8], key: &SigningKey) -> Candidate {
    let parsed = Fragment::parse(like.content.as_ref().unwrap()).unwrap();
    let header = parsed.header().clone();
    let share = Share::new(header.index, Zeroizing::new(share.to_vec()));
    let f = VerifiedFragment::sign(header, &share, key).unwrap();
    Candidate::new(format!("{}-bad", like.source), f.encoded().to_vec())
}

#[test]
fn item5_a_failed_key_check_tries_other_subsets_of_the_deal() {
    let key = keys::generate().unwrap();
    let good = deal_named(SECRET, 1, 2, 3, [9; 16], "d", &key);
    let bad = signed_with_share(&good[0], &[0x55; 32], &key);
    // Index 1 is wrong: {1,2} and {1,3} fail the key check, {2,3} passes.
    let all = [good[2].clone(), bad, good[1].clone()];
    let out = rebuild(&request(&key.verifying_key()), &all).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert_eq!(sources(&out.used), ["d-f2", "d-f3"]);
    assert_eq!(sources(&out.spare), ["d-f1-bad"]);
}

#[test]
fn item5_the_subsets_tried_are_bounded() {
    let key = keys::generate().unwrap();
    // 2 of 12: the only good pair is {11, 12}, the 66th and last pair in order; the cap (32)
    // stops before it.
    let good = deal_named(SECRET, 1, 2, 12, [5; 16], "d", &key);
    let mut all: Vec<Candidate> = good[..10]
        .iter()
        .map(|c| signed_with_share(c, &[0x33; 32], &key))
        .collect();
    all.extend_from_slice(&good[10..]);
    let err = rebuild(&request(&key.verifying_key()), &all).unwrap_err();
    let QuorumError::NotMet { rejected, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(rejected.len(), 12);
    assert!(
        rejected
            .iter()
            .all(|r| r.reason == RejectReason::KeyCheckFailed { epoch: 1 })
    );
    // With the good pair within reach of the cap, it is found.
    let mut near: Vec<Candidate> = all[9..].to_vec();
    near.reverse();
    let out = rebuild(&request(&key.verifying_key()), &near).unwrap();
    assert_eq!(sources(&out.used), ["d-f11", "d-f12"]);
}

#[test]
fn combinations_run_in_lexicographic_order_and_stop_after_the_last() {
    let mut positions = vec![0, 1];
    let mut seen = vec![positions.clone()];
    while next_combination(&mut positions, 4) {
        seen.push(positions.clone());
    }
    assert_eq!(
        seen,
        [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]].map(|p| p.to_vec())
    );
    let mut all = vec![0, 1, 2];
    assert!(!next_combination(&mut all, 3));
}

#[test]
fn a_dealer_that_signed_a_wrong_key_check_value_is_caught() {
    let key = keys::generate().unwrap();
    let id = key_id("vol");
    let shares = sharing::split(SECRET, crate::Threshold::new(2, 2).unwrap()).unwrap();
    let candidates: Vec<Candidate> = shares
        .iter()
        .map(|share| {
            let header = FragmentHeader {
                key_id: id.clone(),
                epoch: 1,
                deal: DealId::from_bytes([1; 16]),
                index: share.index(),
                threshold: crate::Threshold::new(2, 2).unwrap(),
                class: HolderClass::Vhd,
                holder_id: crate::HolderId::numbered(HolderClass::Vhd, share.index()),
                kcv: crate::KeyCheckValue::compute(b"some other secret", &id),
            };
            let f = VerifiedFragment::sign(header, share, &key).unwrap();
            Candidate::new(format!("f{}", share.index()), f.encoded().to_vec())
        })
        .collect();
    let err = rebuild(&request(&key.verifying_key()), &candidates).unwrap_err();
    let QuorumError::NotMet { rejected, .. } = err else {
        panic!("{err:?}")
    };
    assert!(
        rejected
            .iter()
            .all(|r| r.reason == RejectReason::KeyCheckFailed { epoch: 1 })
    );
    assert_eq!(rejected.len(), 2);
}

#[test]
fn nothing_valid_reports_zero_and_unknown_k() {
    let key = keys::generate().unwrap();
    let err = rebuild(
        &request(&key.verifying_key()),
        &[Candidate::new("junk", vec![1, 2, 3])],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "quorum not met: 0 valid fragment(s) of one epoch, k (unknown) needed"
    );
}

#[test]
fn reasons_read_as_sentences() {
    let text = RejectReason::IncompleteEpoch {
        epoch: 4,
        valid: 1,
        k: 3,
    }
    .to_string();
    assert_eq!(text, "epoch 4 has only 1 valid of the 3 shares it needs");
    let text = RejectReason::Superseded {
        epoch: 1,
        used_epoch: 2,
    }
    .to_string();
    assert_eq!(text, "stale: epoch 1, newer epoch 2 was used");
}

#[test]
fn a_manifest_key_check_value_refuses_shares_of_another_secret() {
    // Same dealer, same key id, another secret: a replaced or stale deal.
    let key = keys::generate().unwrap();
    let wanted = deal(SECRET, "vol", 1, 2, 3, &key);
    let other = deal(b"another secret of the same name", "vol", 2, 2, 3, &key);
    let id = key_id("vol");
    let kcv = crate::KeyCheckValue::compute(SECRET, &id);
    let vk = key.verifying_key();
    let req = QuorumRequest {
        key_check_value: Some(&kcv),
        ..request(&vk)
    };
    let all = [
        other[0].clone(),
        other[1].clone(),
        wanted[0].clone(),
        wanted[2].clone(),
    ];
    let out = rebuild(&req, &all).unwrap();
    assert_eq!((out.epoch, out.secret.as_slice()), (1, SECRET));
    assert_eq!(
        reasons(&out.rejected),
        [
            ("e2-f1", RejectReason::ForeignSecret),
            ("e2-f2", RejectReason::ForeignSecret)
        ]
    );
}

#[test]
fn rejection_lines_say_missing_unused_or_rejected() {
    let line = |reason| {
        Rejection {
            source: "src".into(),
            reason,
        }
        .to_string()
    };
    assert_eq!(
        line(RejectReason::Unavailable("no device".into())),
        "missing src: no device"
    );
    assert!(
        line(RejectReason::IncompleteEpoch {
            epoch: 1,
            valid: 1,
            k: 2
        })
        .starts_with("unused src: ")
    );
    assert!(line(RejectReason::BadSignature).starts_with("rejected src: bad signature"));
}

/// Item 5 (review): an incomplete deal of the epoch that was rebuilt by another deal was named
/// "epoch 1 has only 2 valid of the 3 shares it needs", which reads as if epoch 1 failed. Its
/// fragments are another split of the epoch used, whichever deal sorts first.
#[test]
fn item5_an_incomplete_deal_of_the_used_epoch_is_named_another_split() {
    let key = keys::generate().unwrap();
    let vk = key.verifying_key();
    let good = deal_named(SECRET, 1, 2, 3, [3; 16], "g", &key);
    for stale_id in [[1; 16], [9; 16]] {
        let stale = deal_named(b"an older secret", 1, 3, 5, stale_id, "s", &key);
        let all = [
            stale[0].clone(),
            stale[1].clone(),
            good[0].clone(),
            good[1].clone(),
        ];
        let out = rebuild(&request(&vk), &all).unwrap();
        assert_eq!(out.secret.as_slice(), SECRET);
        let expected = RejectReason::OtherDeal {
            epoch: 1,
            deal: DealId::from_bytes(stale_id),
            used_deal: DealId::from_bytes([3; 16]),
        };
        assert_eq!(
            reasons(&out.rejected),
            [("s-f1", expected.clone()), ("s-f2", expected)],
            "stale deal {stale_id:?}"
        );
    }
}

#[test]
fn item5_one_bad_share_at_the_lowest_index_of_a_large_deal_is_got_round() {
    // 5 of 10 with share 1 bad: in lexicographic order, the first 126 subsets all hold it.
    let key = keys::generate().unwrap();
    let good = deal_named(SECRET, 1, 5, 10, [7; 16], "d", &key);
    let mut all = good.clone();
    all[0] = signed_with_share(&good[0], &[0x42; 32], &key);
    let out = rebuild(&request(&key.verifying_key()), &all).unwrap();
    assert_eq!(out.secret.as_slice(), SECRET);
    assert!(!sources(&out.used).contains(&"d-f1-bad"), "{:?}", out.used);
}
