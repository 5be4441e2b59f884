//! Test fixtures: a dealt secret with its manifest, and fragment volumes holding its fragments.

use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::manifest::Manifest;
use keyshard_core::{HolderClass, KeyCheckValue, KeyId, keys, volume};

/// A secret split 2 of n over holders `vhd-1` ... `vhd-n`, and what a guest would hold.
#[derive(Debug, Clone)]
pub struct Dealt {
    pub secret: Vec<u8>,
    pub manifest: Manifest,
    /// Encoded fragment i is holder `vhd-<i + 1>`'s.
    pub fragments: Vec<Vec<u8>>,
}

pub fn dealt_fragments(n: u8) -> Dealt {
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let dealer_key = keys::generate().unwrap();
    let key_id = KeyId::new("root").unwrap();
    let holders: Vec<_> = HolderSlot::numbered(HolderClass::Vhd, n).collect();
    let plan = DealPlan {
        key_id: key_id.clone(),
        epoch: 1,
        k: 2,
        holders: holders.clone(),
    };
    let fragments = dealer::deal(&secret, &plan, &dealer_key)
        .unwrap()
        .iter()
        .map(|f| f.encoded().to_vec())
        .collect();
    let manifest = Manifest {
        key_check_value: KeyCheckValue::compute(&secret, &key_id),
        key_id,
        threshold: 2,
        dealer: dealer_key.verifying_key(),
        holders,
    };
    Dealt {
        secret,
        manifest,
        fragments,
    }
}

/// The fragment volume of holder `vhd-<index + 1>`.
pub fn vhd_volume(dealt: &Dealt, index: usize) -> Vec<u8> {
    volume::encode(&[&dealt.fragments[index]]).unwrap()
}
