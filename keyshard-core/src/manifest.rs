//! The guest manifest: everything the guest trusts, built into its initramfs.
//!
//! ```toml
//! version = 1
//! key_id = "root"
//! threshold = 3
//! key_check_value = "<64 hex digits>"   # see `kcv`: pins the one secret wanted
//! dealer_public_key = "<64 hex digits>" # Ed25519; only fragments it signed count
//!
//! [[holders]]
//! class = "vhd"
//! id = "vhd-1"
//! ```
//!
//! The holder list lets the guest name each holder that is missing, not just count them.

use std::collections::BTreeSet;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::dealer::HolderSlot;
use crate::holder::{HolderClass, HolderId, KeyId};
use crate::kcv::{KCV_LEN, KeyCheckValue};
use crate::quorum::QuorumRequest;

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("not a valid manifest: {0}")]
    Syntax(String),
    #[error("unsupported manifest version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
    #[error("invalid {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("threshold {k} must be at least 2 and at most the {n} holders listed")]
    Threshold { k: u8, n: usize },
    #[error("holder {0} is listed twice")]
    DuplicateHolder(HolderId),
}

pub type Result<T> = std::result::Result<T, ManifestError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub key_id: KeyId,
    pub threshold: u8,
    pub key_check_value: KeyCheckValue,
    pub dealer: VerifyingKey,
    pub holders: Vec<HolderSlot>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    version: u32,
    key_id: String,
    threshold: u8,
    key_check_value: String,
    dealer_public_key: String,
    holders: Vec<HolderEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HolderEntry {
    class: HolderClass,
    id: String,
}

fn field(field: &'static str) -> impl Fn(String) -> ManifestError {
    move |reason| ManifestError::Field { field, reason }
}

fn hex32(text: &str) -> std::result::Result<[u8; 32], String> {
    let bytes = hex::decode(text).map_err(|e| e.to_string())?;
    <[u8; KCV_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, expected 32", bytes.len()))
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self> {
        let file: ManifestFile =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.message().to_owned()))?;
        if file.version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(file.version));
        }
        let key_id = KeyId::new(file.key_id).map_err(|e| field("key_id")(e.to_string()))?;
        let key_check_value = KeyCheckValue::from_bytes(
            hex32(&file.key_check_value).map_err(field("key_check_value"))?,
        );
        let dealer_bytes = hex32(&file.dealer_public_key).map_err(field("dealer_public_key"))?;
        let dealer = VerifyingKey::from_bytes(&dealer_bytes)
            .map_err(|_| field("dealer_public_key")("not an Ed25519 public key".into()))?;
        if dealer.is_weak() {
            return Err(field("dealer_public_key")(
                "a weak (small-order) Ed25519 point, under which signatures can be forged".into(),
            ));
        }
        let holders = file
            .holders
            .into_iter()
            .map(|h| {
                let id = HolderId::new(h.id).map_err(|e| field("holders.id")(e.to_string()))?;
                Ok(HolderSlot { class: h.class, id })
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest = Self {
            key_id,
            threshold: file.threshold,
            key_check_value,
            dealer,
            holders,
        };
        manifest.check()?;
        Ok(manifest)
    }

    fn check(&self) -> Result<()> {
        let n = self.holders.len();
        if self.threshold < 2 || usize::from(self.threshold) > n {
            return Err(ManifestError::Threshold {
                k: self.threshold,
                n,
            });
        }
        let mut seen = BTreeSet::new();
        match self.holders.iter().find(|h| !seen.insert(&h.id)) {
            Some(dup) => Err(ManifestError::DuplicateHolder(dup.id.clone())),
            None => Ok(()),
        }
    }

    pub fn to_toml(&self) -> String {
        let file = ManifestFile {
            version: MANIFEST_VERSION,
            key_id: self.key_id.to_string(),
            threshold: self.threshold,
            key_check_value: self.key_check_value.to_hex(),
            dealer_public_key: hex::encode(self.dealer.as_bytes()),
            holders: self
                .holders
                .iter()
                .map(|h| HolderEntry {
                    class: h.class,
                    id: h.id.to_string(),
                })
                .collect(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        format!("# keyshard guest manifest: the guest trusts only what this file names.\n{body}")
    }

    /// What the quorum must insist on: this dealer, this key, this k, this secret.
    pub fn quorum_request(&self) -> QuorumRequest<'_> {
        QuorumRequest {
            dealer: &self.dealer,
            key_id: Some(&self.key_id),
            threshold: Some(self.threshold),
            key_check_value: Some(&self.key_check_value),
        }
    }

    /// The listed holders that no device or broker answered for.
    pub fn holders_missing<'a>(
        &'a self,
        seen: &'a BTreeSet<HolderId>,
    ) -> impl Iterator<Item = &'a HolderSlot> {
        self.holders.iter().filter(move |h| !seen.contains(&h.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn sample() -> Manifest {
        let key_id = KeyId::new("root").unwrap();
        Manifest {
            key_check_value: KeyCheckValue::compute(b"the secret", &key_id),
            key_id,
            threshold: 2,
            dealer: keys::generate().unwrap().verifying_key(),
            holders: HolderSlot::numbered(HolderClass::Vhd, 2)
                .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
                .collect(),
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let manifest = sample();
        let text = manifest.to_toml();
        assert!(
            text.contains("class = \"tpm\"") && text.contains("version = 1"),
            "{text}"
        );
        assert_eq!(Manifest::parse(&text).unwrap(), manifest);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let text = sample().to_toml();
        let edit = |from: &str, to: &str| Manifest::parse(&text.replacen(from, to, 1)).unwrap_err();
        assert_eq!(
            edit("version = 1", "version = 2"),
            ManifestError::UnsupportedVersion(2)
        );
        assert_eq!(
            edit("threshold = 2", "threshold = 4"),
            ManifestError::Threshold { k: 4, n: 3 }
        );
        assert_eq!(
            edit("threshold = 2", "threshold = 1"),
            ManifestError::Threshold { k: 1, n: 3 }
        );
        assert!(matches!(
            edit("key_check_value = \"", "key_check_value = \"00"),
            ManifestError::Field {
                field: "key_check_value",
                ..
            }
        ));
        assert!(matches!(
            edit("dealer_public_key = \"", "dealer_public_key = \"zz"),
            ManifestError::Field {
                field: "dealer_public_key",
                ..
            }
        ));
        assert_eq!(
            edit("id = \"vhd-2\"", "id = \"vhd-1\""),
            ManifestError::DuplicateHolder(HolderId::new("vhd-1").unwrap())
        );
        assert!(matches!(
            edit("class = \"tpm\"", "class = \"usb\""),
            ManifestError::Syntax(_)
        ));
        assert!(matches!(
            edit("version = 1", "version = 1\nextra = 1"),
            ManifestError::Syntax(_)
        ));
    }

    /// Issue 7 item 12: a manifest naming the identity point as its dealer is refused.
    #[test]
    fn item12_a_weak_dealer_key_in_a_manifest_is_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let manifest = Manifest {
            dealer: VerifyingKey::from_bytes(&identity).unwrap(),
            ..sample()
        };
        let err = Manifest::parse(&manifest.to_toml()).unwrap_err();
        assert!(
            matches!(
                &err,
                ManifestError::Field {
                    field: "dealer_public_key",
                    reason
                } if reason.contains("weak")
            ),
            "{err:?}"
        );
    }

    #[test]
    fn names_missing_holders() {
        let manifest = sample();
        let seen: BTreeSet<HolderId> = [HolderId::new("vhd-2").unwrap()].into();
        let missing: Vec<String> = manifest
            .holders_missing(&seen)
            .map(|h| h.id.to_string())
            .collect();
        assert_eq!(missing, ["vhd-1", "tpm-1"]);
    }
}
