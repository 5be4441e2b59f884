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
//!
//! # Optional; `keyshard init` writes it when the policy has `tpm` holders.
//! [host_attestation]
//! ak = "04<128 hex digits>"             # the host TPM's attestation key: P-256, SEC1 uncompressed
//! pcr_bank = "sha256"                   # sha1, sha256 or sha384
//! pcrs = [0, 7]                         # ascending, each 0..=23, at least one
//! pcr_digest = "<64 hex digits>"        # SHA-256 over the golden values of those PCRs, in order
//! ```
//!
//! The holder list lets the guest name each holder that is missing, not just count them. With
//! `[host_attestation]` the guest checks the host itself: it accepts a `tpm` share only with a
//! quote signed by `ak` whose PCR digest is `pcr_digest` over `pcrs` of `pcr_bank` and whose
//! qualifying data includes the guest's own nonce. Without it, `tpm` shares are refused by the
//! guest (fail closed). A malformed table is a parse error: the manifest is refused whole.

use std::collections::BTreeSet;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::dealer::HolderSlot;
use crate::holder::{HolderClass, HolderId, KeyId};
use crate::kcv::{KCV_LEN, KeyCheckValue};
use crate::policy::{MAX_PCR_INDEX, PcrBank};
use crate::quorum::QuorumRequest;

pub const MANIFEST_VERSION: u32 = 1;
/// Bytes of the attestation key's SEC1 uncompressed P-256 point.
pub const HOST_AK_LEN: usize = 65;

/// What the guest pins of the host's TPM: the AK that signs quotes and the golden PCR digest.
/// The AK is checked here for its form (65 bytes, 0x04 first); the guest's verifier refuses a
/// point that is not on the curve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAttestation {
    pub ak: [u8; HOST_AK_LEN],
    pub pcr_bank: PcrBank,
    pub pcrs: Vec<u8>,
    pub pcr_digest: [u8; 32],
}

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
    pub host_attestation: Option<HostAttestation>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_attestation: Option<HostAttestationEntry>,
}

impl HostAttestation {
    /// From the manifest's textual fields, with the manifest's checks (a worker's argument).
    pub fn from_fields(ak: &str, pcr_bank: &str, pcrs: Vec<u8>, pcr_digest: &str) -> Result<Self> {
        HostAttestationEntry {
            ak: ak.to_owned(),
            pcr_bank: pcr_bank.to_owned(),
            pcrs,
            pcr_digest: pcr_digest.to_owned(),
        }
        .parse()
    }
}

impl std::fmt::Display for HostAttestation {
    /// `AK:BANK:PCR,PCR...:DIGEST`, hex where binary; [`std::str::FromStr`] reads it back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pcrs: Vec<String> = self.pcrs.iter().map(u8::to_string).collect();
        write!(
            f,
            "{}:{}:{}:{}",
            hex::encode(self.ak),
            self.pcr_bank.as_str(),
            pcrs.join(","),
            hex::encode(self.pcr_digest)
        )
    }
}

impl std::str::FromStr for HostAttestation {
    type Err = ManifestError;

    fn from_str(text: &str) -> Result<Self> {
        let parts: Vec<&str> = text.split(':').collect();
        let [ak, bank, pcrs, digest] = parts.as_slice() else {
            return Err(field("host_attestation")(
                "expected AK:BANK:PCRS:DIGEST".into(),
            ));
        };
        let pcrs = pcrs
            .split(',')
            .map(|p| p.parse::<u8>())
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|e| field("host_attestation.pcrs")(e.to_string()))?;
        Self::from_fields(ak, bank, pcrs, digest)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostAttestationEntry {
    ak: String,
    pcr_bank: String,
    pcrs: Vec<u8>,
    pcr_digest: String,
}

impl HostAttestationEntry {
    fn parse(self) -> Result<HostAttestation> {
        let ak_bytes =
            hex::decode(&self.ak).map_err(|e| field("host_attestation.ak")(e.to_string()))?;
        let ak = <[u8; HOST_AK_LEN]>::try_from(ak_bytes.as_slice())
            .ok()
            .filter(|ak| ak.first() == Some(&0x04))
            .ok_or_else(|| {
                field("host_attestation.ak")(format!(
                    "{} bytes, expected a 65-byte uncompressed P-256 point (04...)",
                    ak_bytes.len()
                ))
            })?;
        let pcr_bank = [PcrBank::Sha1, PcrBank::Sha256, PcrBank::Sha384]
            .into_iter()
            .find(|bank| bank.as_str() == self.pcr_bank)
            .ok_or_else(|| {
                field("host_attestation.pcr_bank")(format!(
                    "{:?} is not sha1, sha256 or sha384",
                    self.pcr_bank
                ))
            })?;
        let ascending = self.pcrs.windows(2).all(|w| matches!(w, [a, b] if a < b));
        if self.pcrs.is_empty()
            || !ascending
            || self.pcrs.iter().any(|index| *index > MAX_PCR_INDEX)
        {
            return Err(field("host_attestation.pcrs")(format!(
                "{:?}: want at least one PCR, ascending, each 0..={MAX_PCR_INDEX}",
                self.pcrs
            )));
        }
        let pcr_digest = hex32(&self.pcr_digest).map_err(field("host_attestation.pcr_digest"))?;
        Ok(HostAttestation {
            ak,
            pcr_bank,
            pcrs: self.pcrs,
            pcr_digest,
        })
    }
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
        let host_attestation = file
            .host_attestation
            .map(HostAttestationEntry::parse)
            .transpose()?;
        let manifest = Self {
            key_id,
            threshold: file.threshold,
            key_check_value,
            dealer,
            holders,
            host_attestation,
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
            host_attestation: self
                .host_attestation
                .as_ref()
                .map(|host| HostAttestationEntry {
                    ak: hex::encode(host.ak),
                    pcr_bank: host.pcr_bank.as_str().to_owned(),
                    pcrs: host.pcrs.clone(),
                    pcr_digest: hex::encode(host.pcr_digest),
                }),
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
            host_attestation: None,
        }
    }

    fn attested() -> Manifest {
        let mut ak = [0x11; HOST_AK_LEN];
        ak[0] = 0x04;
        Manifest {
            host_attestation: Some(HostAttestation {
                ak,
                pcr_bank: PcrBank::Sha256,
                pcrs: vec![0, 7],
                pcr_digest: [0x22; 32],
            }),
            ..sample()
        }
    }

    /// Issue 8 item 4: the host attestation table round-trips, and a malformed one refuses the
    /// manifest, naming the field.
    #[test]
    fn item4_host_attestation_round_trips_and_fails_closed() {
        let manifest = attested();
        let text = manifest.to_toml();
        assert!(text.contains("[host_attestation]"), "{text}");
        assert_eq!(Manifest::parse(&text).unwrap(), manifest);
        let host = manifest.host_attestation.clone().unwrap();
        assert_eq!(host.to_string().parse::<HostAttestation>().unwrap(), host);
        assert!("04:sha256:0,7".parse::<HostAttestation>().is_err());
        let field_of = |from: &str, to: &str| match Manifest::parse(&text.replacen(from, to, 1)) {
            Err(ManifestError::Field { field, .. }) => field,
            other => panic!("{from} -> {to}: {other:?}"),
        };
        assert_eq!(field_of("ak = \"04", "ak = \"05"), "host_attestation.ak");
        assert_eq!(field_of("ak = \"04", "ak = \"0411"), "host_attestation.ak");
        assert_eq!(field_of("ak = \"04", "ak = \"zz"), "host_attestation.ak");
        assert_eq!(
            field_of("pcr_bank = \"sha256\"", "pcr_bank = \"md5\""),
            "host_attestation.pcr_bank"
        );
        for pcrs in ["[]", "[7, 0]", "[0, 0]", "[0, 24]"] {
            assert_eq!(
                field_of("pcrs = [0, 7]", &format!("pcrs = {pcrs}")),
                "host_attestation.pcrs"
            );
        }
        assert_eq!(
            field_of("pcr_digest = \"", "pcr_digest = \"00"),
            "host_attestation.pcr_digest"
        );
        assert!(matches!(
            Manifest::parse(&text.replacen("pcrs = [0, 7]", "pcrs = [0, 7]\nextra = 1", 1)),
            Err(ManifestError::Syntax(_))
        ));
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
