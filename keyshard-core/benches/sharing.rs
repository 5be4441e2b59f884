//! Benchmarks: split and combine of a 32-byte key (3 of 5, 10 of 20), fragment verification,
//! and a whole quorum rebuild. `make bench` runs them.

// Benchmark setup: a panic here is a broken benchmark, not a user-facing failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::quorum::{self, Candidate, QuorumRequest};
use keyshard_core::sharing::{self, Threshold};
use keyshard_core::{Fragment, HolderClass, KeyId};

const KEY: [u8; 32] = [0x5a; 32];

fn sharing(c: &mut Criterion) {
    for (k, n) in [(3u8, 5u8), (10, 20)] {
        let threshold = Threshold::new(k, n).unwrap();
        c.bench_function(&format!("split 32-byte key {k}-of-{n}"), |b| {
            b.iter(|| sharing::split(black_box(&KEY), threshold).unwrap())
        });
        let shares = sharing::split(&KEY, threshold).unwrap();
        let needed = &shares[..usize::from(k)];
        c.bench_function(&format!("combine 32-byte key {k}-of-{n}"), |b| {
            b.iter(|| sharing::combine(black_box(needed), k).unwrap())
        });
    }
}

fn fragments(c: &mut Criterion) {
    let dealer_key = SigningKey::from_bytes(&[7; 32]);
    let plan = DealPlan {
        key_id: KeyId::new("bench").unwrap(),
        epoch: 1,
        k: 3,
        holders: HolderSlot::numbered(HolderClass::Vhd, 5).collect(),
    };
    let signed = dealer::deal(&KEY, &plan, &dealer_key).unwrap();
    let bytes = signed[0].encoded().to_vec();
    let verifying_key = dealer_key.verifying_key();

    c.bench_function("fragment parse + verify", |b| {
        b.iter(|| {
            Fragment::parse(black_box(&bytes))
                .unwrap()
                .verify(&verifying_key)
                .unwrap()
        })
    });
    c.bench_function("deal 32-byte key 3-of-5 (split + sign)", |b| {
        b.iter(|| dealer::deal(black_box(&KEY), &plan, &dealer_key).unwrap())
    });
    let candidates: Vec<Candidate> = signed
        .iter()
        .take(3)
        .map(|f| Candidate::new("bench", f.encoded().to_vec()))
        .collect();
    let request = QuorumRequest {
        dealer: &verifying_key,
        key_id: None,
        threshold: None,
        key_check_value: None,
    };
    c.bench_function(
        "quorum rebuild 3-of-5 (verify 3 + combine + key check)",
        |b| b.iter(|| quorum::rebuild(&request, black_box(&candidates)).unwrap()),
    );
}

criterion_group!(benches, sharing, fragments);
criterion_main!(benches);
