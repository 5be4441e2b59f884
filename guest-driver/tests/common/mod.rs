//! What the integration tests share: a secret dealt 2 of 3 over holders vhd-1..vhd-3, its
//! manifest, one fragment volume image per holder, and a way to run `keyshard-guest`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    dead_code
)]

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::manifest::Manifest;
use keyshard_core::volume::{self, MAX_VOLUME_LEN};
use keyshard_core::{HolderClass, KeyCheckValue, KeyId, keys};

/// The image size: larger than any volume, so the reader must stop at `MAX_VOLUME_LEN`.
pub const IMAGE_LEN: usize = 1024 * 1024;
pub const SECRET: &[u8] = b"a LUKS2 volume key of 32 bytes!!";

/// A secret split 2 of 3 over vhd-1..vhd-3, the guest's manifest, and one volume image per
/// holder.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub manifest: Manifest,
    pub images: Vec<PathBuf>,
    /// The encoded fragments, in the manifest's holder order.
    pub fragments: Vec<Vec<u8>>,
}

impl Fixture {
    pub fn new() -> Self {
        Self::dealt(HolderSlot::numbered(HolderClass::Vhd, 3).collect(), 2)
    }

    /// [`SECRET`] split `k` of `holders.len()` over `holders`; image i and fragment i are
    /// `holders[i]`'s.
    pub fn dealt(holders: Vec<HolderSlot>, k: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dealer_key = keys::generate().unwrap();
        let key_id = KeyId::new("root").unwrap();
        let plan = DealPlan {
            key_id: key_id.clone(),
            epoch: 1,
            k,
            holders: holders.clone(),
        };
        let fragments: Vec<Vec<u8>> = dealer::deal(SECRET, &plan, &dealer_key)
            .unwrap()
            .iter()
            .map(|f| f.encoded().to_vec())
            .collect();
        let images = fragments
            .iter()
            .zip(&holders)
            .map(|(fragment, holder)| {
                let path = dir.path().join(format!("{}.img", holder.id));
                fs::write(&path, image_bytes(fragment)).unwrap();
                path
            })
            .collect();
        let manifest = Manifest {
            key_check_value: KeyCheckValue::compute(SECRET, &key_id),
            key_id,
            threshold: k,
            dealer: dealer_key.verifying_key(),
            holders,
            host_attestation: Some(host_attestation()),
        };
        fs::write(dir.path().join("manifest.toml"), manifest.to_toml()).unwrap();
        Self {
            dir,
            manifest,
            images,
            fragments,
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.path().join("manifest.toml")
    }
}

/// The volume, zeros up to `MAX_VOLUME_LEN` (as the format asks), then a pattern the reader
/// must never reach.
pub fn image_bytes(fragment: &[u8]) -> Vec<u8> {
    let mut image = volume::encode(&[fragment]).unwrap();
    image.resize(MAX_VOLUME_LEN, 0);
    image.extend((MAX_VOLUME_LEN..IMAGE_LEN).map(|i| (i / 512) as u8 ^ (i % 512) as u8 | 1));
    image
}

pub fn keyshard_guest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyshard-guest"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The host TPM double's attestation key, pinned in every fixture's manifest.
fn host_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
}

const GOLDEN_DIGEST: [u8; 32] = [0x77; 32];

/// What the fixture manifests pin of the host double: its AK, sha256 PCRs 0 and 7, a digest.
pub fn host_attestation() -> keyshard_core::manifest::HostAttestation {
    let point = host_key().verifying_key().to_encoded_point(false);
    keyshard_core::manifest::HostAttestation {
        ak: point.as_bytes().try_into().unwrap(),
        pcr_bank: keyshard_core::policy::PcrBank::Sha256,
        pcrs: vec![0, 7],
        pcr_digest: GOLDEN_DIGEST,
    }
}

/// The host double's quote for a lone request carrying `evidence` (None without a nonce).
pub fn host_quote(
    evidence: &keyshard_core::broker::Evidence,
) -> Option<keyshard_core::broker::HostQuote> {
    use keyshard_attest::tpm::{ClockInfo, QuoteAttest, QuotedBank};
    use p256::ecdsa::signature::Signer as _;
    let keyshard_core::broker::Evidence::TpmNonce { nonce } = evidence else {
        return None;
    };
    let attest = QuoteAttest {
        signer_name: vec![0, 0x0b, 1, 2, 3],
        extra_data: keyshard_core::broker::merkle::leaf(nonce).to_vec(),
        clock: ClockInfo {
            clock: 1,
            reset_count: 0,
            restart_count: 0,
            safe: true,
        },
        firmware_version: 1,
        banks: vec![QuotedBank {
            alg: 0x000b,
            bitmap: vec![0x81, 0, 0],
        }],
        pcr_digest: GOLDEN_DIGEST.to_vec(),
    }
    .to_bytes()
    .unwrap();
    let signature: p256::ecdsa::Signature = host_key().sign(&attest);
    Some(keyshard_core::broker::HostQuote {
        attest,
        signature: signature.to_bytes().into(),
        path: Vec::new(),
    })
}
