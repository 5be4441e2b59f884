//! The coordinator's state directory, as `keyshard init` writes it and `keyshard coordinator`
//! reads it:
//!
//! ```text
//! state.toml                 key id, threshold, PCR selection, holders (class and id), the VM ids
//!                            its attested shares are bound to
//! manifest.toml              the guest manifest (goes into the initramfs)
//! fragments/<vhd-id>.ksf     vhd fragments, to be served by vhost-keyshard (0600)
//! sealed/<id>.key            tpm/sev holders: a 32-byte data key sealed to the TPM's PCRs
//! sealed/<id>.ksf.enc        tpm/sev holders: the fragment, AES-256-GCM under that data key
//! tpm/ak.pub                 the attestation key's public point (SEC1), pinned at init
//! tpm/golden-pcrs            the PCR values the host must still have (KSPV format)
//! snp/policy.toml            SEV-SNP policy (measurement allow-list, minimum TCB), by the operator
//! snp/vcek/                  VCEK certificates (DER), looked up by chip id and TCB
//! audit.log                  one JSON line per answer
//! ```

use std::path::{Path, PathBuf};

use keyshard_core::dealer::HolderSlot;
use keyshard_core::holder::{HolderClass, HolderId, KeyId};
use keyshard_core::policy::{PcrBank, TpmPolicy};
use serde::{Deserialize, Serialize};

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{}: not a valid state file: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: unsupported state version {version}", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("{0:?} is not a valid VM id: {1}")]
    VmId(String, String),
}

/// Checks a VM id: the broker's serial `ksb-<vm id>` must fit virtio-blk's 20 bytes, so the
/// rules are a holder id's.
pub fn check_vm_id(id: &str) -> Result<(), StateError> {
    HolderId::new(id)
        .map(|_| ())
        .map_err(|e| StateError::VmId(id.to_owned(), e.to_string()))
}

/// Where each file of a state directory lives.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.toml")
    }

    pub fn manifest(&self) -> PathBuf {
        self.root.join("manifest.toml")
    }

    pub fn fragment(&self, holder: &HolderId) -> PathBuf {
        self.root.join("fragments").join(format!("{holder}.ksf"))
    }

    pub fn sealed_key(&self, holder: &HolderId) -> PathBuf {
        self.root.join("sealed").join(format!("{holder}.key"))
    }

    pub fn sealed_fragment(&self, holder: &HolderId) -> PathBuf {
        self.root.join("sealed").join(format!("{holder}.ksf.enc"))
    }

    pub fn ak_public(&self) -> PathBuf {
        self.root.join("tpm").join("ak.pub")
    }

    pub fn golden_pcrs(&self) -> PathBuf {
        self.root.join("tpm").join("golden-pcrs")
    }

    pub fn snp_policy(&self) -> PathBuf {
        self.root.join("snp").join("policy.toml")
    }

    pub fn vcek_dir(&self) -> PathBuf {
        self.root.join("snp").join("vcek")
    }

    /// The CA certificates (PEM) the coordinator trusts for the CMS and the shard hosts.
    pub fn cms_ca(&self) -> PathBuf {
        self.root.join("cms").join("ca.pem")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join("audit.log")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    key_id: String,
    threshold: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr_bank: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pcrs: Vec<u8>,
    holders: Vec<StateHolder>,
    /// The VMs whose brokers may be given the attested shares; none in a file from before
    /// VM binding, which the coordinator then refuses to serve.
    #[serde(default)]
    vm_ids: Vec<String>,
    /// Where the `host` shares were placed; absent without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cms: Option<CmsLink>,
}

/// The CMS that placed a key's `host` shares, for the coordinator's relay: its URL, and the id
/// of the VM as an instance (its CA is [`StateDir::cms_ca`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmsLink {
    /// https://HOST:PORT.
    pub url: String,
    /// The instance the CMS lets fetch the shares (`keyshard instance enroll --instance-id`).
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateHolder {
    class: HolderClass,
    id: String,
}

/// What `keyshard init` set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub key_id: KeyId,
    pub threshold: u8,
    /// The PCRs `tpm` and `sev` data keys are sealed to, when there are such holders.
    pub tpm: Option<TpmPolicy>,
    pub holders: Vec<HolderSlot>,
    /// The VMs that may be given this key's attested shares (`keyshard init --vm-id`).
    pub vm_ids: Vec<String>,
    /// Where the `host` shares were placed (`keyshard init --cms`).
    pub cms: Option<CmsLink>,
}

impl State {
    pub fn to_toml(&self) -> String {
        let file = StateFile {
            version: STATE_VERSION,
            key_id: self.key_id.to_string(),
            threshold: self.threshold,
            pcr_bank: self.tpm.as_ref().map(|t| t.pcr_bank.as_str().to_owned()),
            pcrs: self
                .tpm
                .as_ref()
                .map(|t| t.pcrs.clone())
                .unwrap_or_default(),
            holders: self
                .holders
                .iter()
                .map(|h| StateHolder {
                    class: h.class,
                    id: h.id.to_string(),
                })
                .collect(),
            vm_ids: self.vm_ids.clone(),
            cms: self.cms.clone(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        format!("# keyshard coordinator state, written by `keyshard init`.\n{body}")
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, StateError> {
        let invalid = |reason: String| StateError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let file: StateFile = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        if file.version != STATE_VERSION {
            return Err(StateError::Version {
                path: path.to_owned(),
                version: file.version,
            });
        }
        let key_id = KeyId::new(file.key_id).map_err(|e| invalid(e.to_string()))?;
        let tpm = match file.pcr_bank.as_deref() {
            None => None,
            Some(bank) => Some(TpmPolicy {
                pcr_bank: match bank {
                    "sha1" => PcrBank::Sha1,
                    "sha256" => PcrBank::Sha256,
                    "sha384" => PcrBank::Sha384,
                    other => return Err(invalid(format!("unknown PCR bank {other}"))),
                },
                pcrs: file.pcrs,
            }),
        };
        let holders = file
            .holders
            .into_iter()
            .map(|h| {
                Ok(HolderSlot {
                    class: h.class,
                    id: HolderId::new(h.id).map_err(|e| invalid(e.to_string()))?,
                })
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        for vm in &file.vm_ids {
            check_vm_id(vm).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(Self {
            key_id,
            threshold: file.threshold,
            tpm,
            holders,
            vm_ids: file.vm_ids,
            cms: file.cms,
        })
    }

    /// The `host` holders and their slot in the credential their shares are stored as: the
    /// j-th `host` holder (in share order, as `init` lists them) is slot j.
    pub fn host_slots(&self) -> impl Iterator<Item = (&HolderId, u8)> {
        self.holders
            .iter()
            .filter(|h| h.class == HolderClass::Host)
            .zip(1..=u8::MAX)
            .map(|(h, slot)| (&h.id, slot))
    }

    /// Holders of the classes the coordinator releases (`tpm`, `sev`).
    pub fn attested_holders(&self) -> impl Iterator<Item = &HolderSlot> {
        self.holders
            .iter()
            .filter(|h| matches!(h.class, HolderClass::Tpm | HolderClass::Sev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            key_id: KeyId::new("root").unwrap(),
            threshold: 3,
            tpm: Some(TpmPolicy {
                pcr_bank: PcrBank::Sha256,
                pcrs: vec![0, 7],
            }),
            holders: HolderSlot::numbered(HolderClass::Vhd, 2)
                .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
                .collect(),
            vm_ids: vec!["vm1".into(), "vm-2".into()],
            cms: None,
        }
    }

    #[test]
    fn item8_the_cms_link_round_trips_and_host_holders_get_slots_in_order() {
        let mut state = sample();
        state
            .holders
            .extend(HolderSlot::numbered(HolderClass::Host, 2));
        state.cms = Some(CmsLink {
            url: "https://cms.example:8443".into(),
            instance_id: "vm1".into(),
        });
        let text = state.to_toml();
        assert!(text.contains("[cms]"), "{text}");
        let parsed = State::parse(Path::new("s"), &text).unwrap();
        assert_eq!(parsed, state);
        let slots: Vec<_> = parsed
            .host_slots()
            .map(|(id, slot)| (id.to_string(), slot))
            .collect();
        assert_eq!(slots, [("host-1".to_owned(), 1), ("host-2".to_owned(), 2)]);
        assert!(State::parse(Path::new("s"), &text.replace("instance_id", "instance")).is_err());
    }

    #[test]
    fn round_trips_and_lists_attested_holders() {
        let state = sample();
        let parsed = State::parse(Path::new("s"), &state.to_toml()).unwrap();
        assert_eq!(parsed, state);
        let attested: Vec<_> = parsed
            .attested_holders()
            .map(|h| h.id.to_string())
            .collect();
        assert_eq!(attested, ["tpm-1"]);
    }

    #[test]
    fn refuses_unknown_versions_fields_and_banks() {
        let text = sample().to_toml();
        let path = Path::new("s");
        assert!(matches!(
            State::parse(path, &text.replace("version = 1", "version = 2")),
            Err(StateError::Version { version: 2, .. })
        ));
        assert!(State::parse(path, &text.replace("sha256", "md5")).is_err());
        assert!(State::parse(path, &format!("{text}\nextra = 1\n")).is_err());
        assert!(matches!(
            State::parse(path, &text.replace("\"vm-2\"", "\"Bad VM\"")),
            Err(StateError::Invalid { .. })
        ));
    }

    #[test]
    fn a_state_file_from_before_vm_binding_binds_no_vm() {
        let text = sample().to_toml();
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with("vm_ids"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(old, text);
        assert!(
            State::parse(Path::new("s"), &old)
                .unwrap()
                .vm_ids
                .is_empty()
        );
    }

    #[test]
    fn paths_follow_the_documented_layout() {
        let dir = StateDir::new("/var/lib/ks");
        let tpm1 = HolderId::new("tpm-1").unwrap();
        assert_eq!(
            dir.sealed_key(&tpm1),
            Path::new("/var/lib/ks/sealed/tpm-1.key")
        );
        assert_eq!(
            dir.sealed_fragment(&tpm1),
            Path::new("/var/lib/ks/sealed/tpm-1.ksf.enc")
        );
        assert_eq!(
            dir.fragment(&HolderId::new("vhd-2").unwrap()),
            Path::new("/var/lib/ks/fragments/vhd-2.ksf")
        );
        assert_eq!(dir.golden_pcrs(), Path::new("/var/lib/ks/tpm/golden-pcrs"));
    }
}
