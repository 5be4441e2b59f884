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
            host_attestation: None,
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
