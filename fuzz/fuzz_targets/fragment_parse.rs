//! Fuzzes the fragment parser with untrusted bytes: it must never panic, and whatever it
//! accepts must respect the format's bounds and still fail a signature check it cannot pass.

#![no_main]

use ed25519_dalek::SigningKey;
use keyshard_core::Fragment;
use keyshard_core::fragment::MAX_FRAGMENT_LEN;
use keyshard_core::sharing::MAX_SECRET_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(fragment) = Fragment::parse(data) else {
        return;
    };
    let header = fragment.header();
    assert!(data.len() <= MAX_FRAGMENT_LEN);
    assert!(header.index >= 1 && header.index <= header.threshold.n());
    assert!(header.threshold.k() >= 2 && header.threshold.k() <= header.threshold.n());
    assert!((1..=MAX_SECRET_LEN).contains(&fragment.share_len()));
    // No one signs with this key, so no input can carry a valid signature for it.
    let never_used = SigningKey::from_bytes(&[0x42; 32]).verifying_key();
    assert!(fragment.verify(&never_used).is_err());
});
