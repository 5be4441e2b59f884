//! Sharing policy (TOML): how many shares each holder class gets, the threshold k, and the PCRs
//! a `tpm` share is sealed to. [`Policy::parse`] reads and checks; a policy that parses is valid.
//!
//! ```toml
//! threshold = 3
//!
//! [holders]
//! vhd = 2
//! tpm = 1
//!
//! [tpm]
//! pcr_bank = "sha256"
//! pcrs = [0, 7]
//! ```
//!
//! A policy with `host` shares (held by remote shard hosts) names what the guest presents for
//! them, which decides whether they count as off-host (see [`crate::host_class`]):
//!
//! ```toml
//! [host]
//! evidence = "sev-snp"   # or "vm-tpm"
//! ```

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::adversary::{self, Adversary, Exposure};
use crate::dealer::HolderSlot;
use crate::holder::HolderClass;
use crate::host_class::HostEvidence;

/// PCR indices a PC client TPM has.
pub const MAX_PCR_INDEX: u8 = 23;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("not a valid policy file: {0}")]
    Syntax(String),
    #[error("the policy gives out no shares")]
    NoShares,
    #[error("the policy gives out {n} shares, at most 255 are possible")]
    TooManyShares { n: u32 },
    #[error("threshold = {k} is below 2: a single holder would hold the secret")]
    ThresholdTooLow { k: u8 },
    #[error("threshold = {k} exceeds the {n} shares the policy gives out")]
    ThresholdAboveShares { k: u8, n: u32 },
    #[error(
        "the host-reachable shares ({reachable}) reach threshold {k}: root on this host could \
         rebuild the secret without the guest; add shares held off the host, or set \
         allow_host_reachable_quorum = true to accept that"
    )]
    HostReachableQuorum { reachable: String, k: u8 },
    #[error(
        "allow_host_visible_quorum was renamed allow_host_reachable_quorum and its meaning \
         widened: it now also accepts tpm and on-host sev shares reaching k, as root on this host \
         obtains them too"
    )]
    RenamedOverride,
    #[error(
        "the policy gives {count} host share(s) but no [host] section saying what the guest \
         presents for them: add [host] evidence = \"sev-snp\" (off this host) or \"vm-tpm\" \
         (a TPM this host runs: host-reachable)"
    )]
    MissingHostSection { count: u8 },
    #[error("the policy gives {count} recovery shares, at most 1 is possible")]
    TooManyRecoveryShares { count: u8 },
    #[error(
        "threshold = {k} needs the recovery share at every boot: the {boot} shares asked for at \
         boot must reach k on their own"
    )]
    RecoveryNeededAtBoot { k: u8, boot: u32 },
    #[error(
        "threshold = {k}, but the recovery share and the {vhd} vhd share(s) are only {} shares: \
         `keyshard reseal` rebuilds the key from these alone once the PCRs change, so it could \
         never reseal; give more vhd shares or lower k", u32::from(*vhd) + 1
    )]
    RecoveryCannotReseal { k: u8, vhd: u8 },
    #[error(
        "the policy gives {class} shares, whose data keys are sealed to the TPM, but has no [tpm] \
         section with the PCRs to seal to"
    )]
    MissingTpmSection { class: HolderClass },
    #[error("[tpm] pcrs is empty: a tpm share must be sealed to at least one PCR")]
    NoPcrs,
    #[error("[tpm] PCR {index} does not exist (0..={MAX_PCR_INDEX})")]
    PcrOutOfRange { index: u8 },
    #[error("[tpm] PCR {index} is listed twice")]
    DuplicatePcr { index: u8 },
}

pub type Result<T> = std::result::Result<T, PolicyError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PcrBank {
    Sha1,
    Sha256,
    Sha384,
}

impl PcrBank {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
        }
    }
}

/// Shares per holder class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderCounts {
    #[serde(default)]
    pub vhd: u8,
    #[serde(default)]
    pub tpm: u8,
    #[serde(default)]
    pub sev: u8,
    #[serde(default)]
    pub host: u8,
    /// At most 1: the recovery share `keyshard init` writes to a file or prints once.
    #[serde(default)]
    pub recovery: u8,
}

impl HolderCounts {
    pub fn get(&self, class: HolderClass) -> u8 {
        match class {
            HolderClass::Vhd => self.vhd,
            HolderClass::Tpm => self.tpm,
            HolderClass::Sev => self.sev,
            HolderClass::Host => self.host,
            HolderClass::Recovery => self.recovery,
        }
    }

    /// n: all shares together (a u32, so that an oversized sum is reported, not wrapped).
    pub fn total(&self) -> u32 {
        HolderClass::ALL
            .into_iter()
            .map(|c| u32::from(self.get(c)))
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmPolicy {
    pub pcr_bank: PcrBank,
    pub pcrs: Vec<u8>,
}

/// The `[host]` section: what the guest presents to the shard hosts holding its `host` shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPolicy {
    pub evidence: HostEvidence,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub threshold: u8,
    pub holders: HolderCounts,
    /// Accept a policy whose host-reachable shares reach k (see [`crate::adversary`]).
    #[serde(default)]
    pub allow_host_reachable_quorum: bool,
    #[serde(default)]
    pub tpm: Option<TpmPolicy>,
    /// Required when the policy gives `host` shares.
    #[serde(default)]
    pub host: Option<HostPolicy>,
}

impl Policy {
    /// Parses and checks a policy; the first problem found is the error.
    pub fn parse(text: &str) -> Result<Self> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            if names_the_old_override(text) {
                PolicyError::RenamedOverride
            } else {
                PolicyError::Syntax(one_line(&e))
            }
        })?;
        policy.check()?;
        Ok(policy)
    }

    fn check(&self) -> Result<()> {
        let n = self.holders.total();
        let k = self.threshold;
        if n == 0 {
            return Err(PolicyError::NoShares);
        }
        if n > 255 {
            return Err(PolicyError::TooManyShares { n });
        }
        if k < 2 {
            return Err(PolicyError::ThresholdTooLow { k });
        }
        if u32::from(k) > n {
            return Err(PolicyError::ThresholdAboveShares { k, n });
        }
        if self.holders.host > 0 && self.host.is_none() {
            return Err(PolicyError::MissingHostSection {
                count: self.holders.host,
            });
        }
        if self.holders.recovery > 1 {
            return Err(PolicyError::TooManyRecoveryShares {
                count: self.holders.recovery,
            });
        }
        let boot = n - u32::from(self.holders.recovery);
        if u32::from(k) > boot {
            return Err(PolicyError::RecoveryNeededAtBoot { k, boot });
        }
        let sealed = [HolderClass::Tpm, HolderClass::Sev]
            .into_iter()
            .find(|class| self.holders.get(*class) > 0);
        // After a firmware update the TPM no longer unseals tpm and sev shares: reseal has only
        // the vhd fragments and the recovery share to rebuild the key from.
        let reseal_shares = u32::from(self.holders.vhd) + u32::from(self.holders.recovery);
        if self.holders.recovery > 0 && sealed.is_some() && reseal_shares < u32::from(k) {
            return Err(PolicyError::RecoveryCannotReseal {
                k,
                vhd: self.holders.vhd,
            });
        }
        if let Some(class) = sealed {
            let tpm = self
                .tpm
                .as_ref()
                .ok_or(PolicyError::MissingTpmSection { class })?;
            if tpm.pcrs.is_empty() {
                return Err(PolicyError::NoPcrs);
            }
            let mut seen = BTreeSet::new();
            for &index in &tpm.pcrs {
                if index > MAX_PCR_INDEX {
                    return Err(PolicyError::PcrOutOfRange { index });
                }
                if !seen.insert(index) {
                    return Err(PolicyError::DuplicatePcr { index });
                }
            }
        }
        if self.host_reachable_quorum() && !self.allow_host_reachable_quorum {
            return Err(PolicyError::HostReachableQuorum {
                reachable: self.exposure(Adversary::HostRoot).obtained_summary(),
                k,
            });
        }
        Ok(())
    }

    /// n, the number of shares; at most 255 once the policy parsed.
    pub fn shares(&self) -> u8 {
        u8::try_from(self.holders.total()).unwrap_or(u8::MAX)
    }

    /// What `adversary` obtains of this policy's shares, against k.
    pub fn exposure(&self, adversary: Adversary) -> Exposure {
        Exposure::of(
            adversary,
            &self.holders,
            self.threshold,
            self.host_evidence(),
        )
    }

    /// What the guest presents for its `host` shares, when the policy gives any.
    pub fn host_evidence(&self) -> Option<HostEvidence> {
        self.host.map(|host| host.evidence)
    }

    /// Every adversary's exposure, in [`Adversary::ALL`] order.
    pub fn exposures(&self) -> Vec<Exposure> {
        adversary::assess(&self.holders, self.threshold, self.host_evidence())
    }

    /// Shares that root on this host can obtain: `vhd`, `tpm`, on-host `sev`, and `host` shares
    /// released to a TPM this host runs (`evidence = "vm-tpm"`).
    pub fn host_reachable_shares(&self) -> u32 {
        self.exposure(Adversary::HostRoot).shares()
    }

    /// Whether host-reachable shares alone rebuild the secret (allowed only by the override).
    pub fn host_reachable_quorum(&self) -> bool {
        !self.exposure(Adversary::HostRoot).resists()
    }

    /// The holders in share-index order: all `vhd`, then `tpm`, `sev`, `host`, `recovery`.
    pub fn holder_slots(&self) -> Vec<HolderSlot> {
        HolderClass::ALL
            .into_iter()
            .flat_map(|class| HolderSlot::numbered(class, self.holders.get(class)))
            .collect()
    }
}

/// Whether `text` sets the override under its old name, which `deny_unknown_fields` refuses.
fn names_the_old_override(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("allow_host_visible_quorum"))
}

/// toml's errors span several lines with a caret diagram; a CLI wants one line.
fn one_line(error: &toml::de::Error) -> String {
    let message = error.message().trim().to_owned();
    match error.span() {
        Some(span) => format!("{message} (at byte {})", span.start),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_VHD_ONLY: &str = include_str!("../../examples/vhd-only.toml");
    const EXAMPLE_VHD_TPM: &str = include_str!("../../examples/vhd-tpm.toml");

    fn parse_err(text: &str) -> PolicyError {
        Policy::parse(text).unwrap_err()
    }

    #[test]
    fn shipped_examples_are_valid_and_say_that_root_on_the_host_rebuilds() {
        let vhd_only = Policy::parse(EXAMPLE_VHD_ONLY).unwrap();
        assert_eq!((vhd_only.threshold, vhd_only.shares()), (3, 3));
        assert!(vhd_only.host_reachable_quorum() && vhd_only.allow_host_reachable_quorum);

        let vhd_tpm = Policy::parse(EXAMPLE_VHD_TPM).unwrap();
        assert_eq!((vhd_tpm.threshold, vhd_tpm.shares()), (3, 4));
        assert_eq!(vhd_tpm.holders.recovery, 1);
        assert!(vhd_tpm.host_reachable_quorum() && vhd_tpm.allow_host_reachable_quorum);
        let tpm = vhd_tpm.tpm.as_ref().unwrap();
        assert_eq!(
            (tpm.pcr_bank, tpm.pcrs.as_slice()),
            (PcrBank::Sha256, &[0, 7][..])
        );
        let ids: Vec<String> = vhd_tpm
            .holder_slots()
            .iter()
            .map(|h| h.id.to_string())
            .collect();
        assert_eq!(ids, ["vhd-1", "vhd-2", "tpm-1", "recovery-1"]);
    }

    /// Issue 7 item 2: root on an unchanged host unseals the tpm share, so vhd = 2 + tpm = 1
    /// reaches k = 3 with host-reachable shares alone. This policy passed before the fix.
    #[test]
    fn item2_vhd2_tpm1_k3_needs_the_host_reachable_override() {
        let text = "threshold = 3\n[holders]\nvhd = 2\ntpm = 1\n\
                    [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";
        let err = parse_err(text);
        assert_eq!(
            err,
            PolicyError::HostReachableQuorum {
                reachable: "vhd 2, tpm 1".into(),
                k: 3
            }
        );
        assert!(!err.to_string().contains('\n'), "{err}");
        let allowed = format!("allow_host_reachable_quorum = true\n{text}");
        assert!(Policy::parse(&allowed).is_ok());
    }

    #[test]
    fn item2_sev_shares_count_as_host_reachable() {
        let text = "threshold = 2\n[holders]\nvhd = 1\nsev = 1\n\
                    [tpm]\npcr_bank = \"sha256\"\npcrs = [7]\n";
        assert_eq!(
            parse_err(text),
            PolicyError::HostReachableQuorum {
                reachable: "vhd 1, sev 1".into(),
                k: 2
            }
        );
        // More host-reachable shares than k is just as reachable.
        let text = "threshold = 3\n[holders]\nvhd = 4\n";
        assert!(matches!(
            parse_err(text),
            PolicyError::HostReachableQuorum { k: 3, .. }
        ));
        let allowed = format!("allow_host_reachable_quorum = true\n{text}");
        assert!(Policy::parse(&allowed).is_ok());
    }

    #[test]
    fn item2_the_old_override_name_is_refused_as_renamed() {
        let text = "allow_host_visible_quorum = true\nthreshold = 3\n[holders]\nvhd = 3\n";
        let err = parse_err(text);
        assert_eq!(err, PolicyError::RenamedOverride);
        let line = err.to_string();
        assert!(
            line.contains("renamed allow_host_reachable_quorum"),
            "{line}"
        );
        assert!(line.contains("widened"), "{line}");
        assert!(!line.contains('\n'));
    }

    /// Issue 9 item 8: `host` shares were refused as having no holder (`NoHolderYet`); a policy
    /// that puts shares off the host had to be turned down or overridden.
    #[test]
    fn item8_vhd_tpm_host_below_k_on_the_host_passes_without_the_override() {
        let text = "threshold = 3\n[holders]\nvhd = 1\ntpm = 1\nhost = 2\n\
                    [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n\
                    [host]\nevidence = \"sev-snp\"\n";
        let policy = Policy::parse(text).unwrap();
        assert!(!policy.allow_host_reachable_quorum);
        assert_eq!((policy.threshold, policy.shares()), (3, 4));
        assert_eq!(policy.host_reachable_shares(), 2);
        assert!(!policy.host_reachable_quorum());
        assert_eq!(policy.host_evidence(), Some(HostEvidence::SevSnp));
        let ids: Vec<String> = policy
            .holder_slots()
            .iter()
            .map(|h| h.id.to_string())
            .collect();
        assert_eq!(ids, ["vhd-1", "tpm-1", "host-1", "host-2"]);
        // Off the host, every adversary here is held below k.
        assert!(policy.exposures().iter().all(Exposure::resists));
    }

    #[test]
    fn item8_host_shares_released_to_a_vm_tpm_count_as_host_reachable() {
        let text = "threshold = 3\n[holders]\nvhd = 1\ntpm = 1\nhost = 2\n\
                    [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n\
                    [host]\nevidence = \"vm-tpm\"\n";
        assert_eq!(
            parse_err(text),
            PolicyError::HostReachableQuorum {
                reachable: "vhd 1, tpm 1, host 2".into(),
                k: 3
            }
        );
        let allowed = format!("allow_host_reachable_quorum = true\n{text}");
        let policy = Policy::parse(&allowed).unwrap();
        assert_eq!(policy.host_reachable_shares(), 4);
        // host = 3 with k = 3 and no other share: still all reachable through the VM's TPM.
        let only_host = "threshold = 2\n[holders]\nhost = 3\n[host]\nevidence = \"vm-tpm\"\n";
        assert!(matches!(
            parse_err(only_host),
            PolicyError::HostReachableQuorum { k: 2, .. }
        ));
    }

    #[test]
    fn item8_host_shares_need_a_host_section_naming_the_evidence() {
        let text = "threshold = 2\n[holders]\nvhd = 1\nhost = 1\n";
        let err = parse_err(text);
        assert_eq!(err, PolicyError::MissingHostSection { count: 1 });
        assert!(!err.to_string().contains('\n'), "{err}");
        for bad in [
            "evidence = \"snp\"\n",
            "",
            "evidence = \"sev-snp\"\nextra = 1\n",
        ] {
            let err = parse_err(&format!("{text}[host]\n{bad}"));
            assert!(matches!(err, PolicyError::Syntax(_)), "{bad:?}: {err:?}");
        }
        assert!(Policy::parse(&format!("{text}[host]\nevidence = \"sev-snp\"\n")).is_ok());
    }

    #[test]
    fn item8_one_recovery_share_that_boot_does_not_need() {
        let tpm = "[tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";
        let ok = format!(
            "allow_host_reachable_quorum = true\nthreshold = 3\n\
             [holders]\nvhd = 2\ntpm = 1\nrecovery = 1\n{tpm}"
        );
        let policy = Policy::parse(&ok).unwrap();
        assert_eq!(policy.shares(), 4);
        let slots: Vec<String> = policy
            .holder_slots()
            .iter()
            .map(|h| h.id.to_string())
            .collect();
        assert_eq!(slots, ["vhd-1", "vhd-2", "tpm-1", "recovery-1"]);
        // Root on the host still reaches k without it: the recovery share is not counted.
        assert_eq!(policy.host_reachable_shares(), 3);
        assert_eq!(
            parse_err(&ok.replace("recovery = 1", "recovery = 2")),
            PolicyError::TooManyRecoveryShares { count: 2 }
        );
        assert_eq!(
            parse_err(&ok.replace("threshold = 3", "threshold = 4")),
            PolicyError::RecoveryNeededAtBoot { k: 4, boot: 3 }
        );
    }

    /// Item 8 (review): vhd = 1, tpm = 2, recovery = 1, k = 3 passed `policy check` and `init`
    /// wrote a recovery share, but once the PCRs change `reseal` has the vhd share and the
    /// recovery share only, 2 of 3: the promised recovery could never work.
    #[test]
    fn item8_a_recovery_share_that_cannot_reseal_is_refused() {
        let text = "allow_host_reachable_quorum = true\nthreshold = 3\n\
                    [holders]\nvhd = 1\ntpm = 2\nrecovery = 1\n\
                    [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";
        let err = parse_err(text);
        assert_eq!(err, PolicyError::RecoveryCannotReseal { k: 3, vhd: 1 });
        assert!(err.to_string().contains("only 2 shares"), "{err}");
        // One more vhd share, or k = 2, and reseal has k shares.
        assert!(Policy::parse(&text.replace("vhd = 1", "vhd = 2")).is_ok());
        assert!(Policy::parse(&text.replace("threshold = 3", "threshold = 2")).is_ok());
        // Without tpm or sev shares nothing is ever resealed: the recovery share is a spare.
        let unsealed = "allow_host_reachable_quorum = true\nthreshold = 3\n\
                        [holders]\nvhd = 3\nrecovery = 1\n";
        assert!(Policy::parse(unsealed).is_ok());
    }

    #[test]
    fn thresholds_and_counts_are_checked() {
        assert_eq!(
            parse_err("threshold = 4\n[holders]\nvhd = 1\nsev = 2\n"),
            PolicyError::ThresholdAboveShares { k: 4, n: 3 }
        );
        assert_eq!(
            parse_err("threshold = 1\n[holders]\nsev = 2\n"),
            PolicyError::ThresholdTooLow { k: 1 }
        );
        assert_eq!(
            parse_err("threshold = 2\n[holders]\n"),
            PolicyError::NoShares
        );
        assert_eq!(
            parse_err("threshold = 2\n[holders]\nsev = 200\nhost = 100\n"),
            PolicyError::TooManyShares { n: 300 }
        );
    }

    #[test]
    fn tpm_shares_need_valid_pcrs() {
        let base =
            "allow_host_reachable_quorum = true\nthreshold = 2\n[holders]\nvhd = 1\ntpm = 1\n";
        assert_eq!(
            parse_err(base),
            PolicyError::MissingTpmSection {
                class: HolderClass::Tpm
            }
        );
        let with = |pcrs: &str| format!("{base}[tpm]\npcr_bank = \"sha256\"\npcrs = {pcrs}\n");
        assert_eq!(parse_err(&with("[]")), PolicyError::NoPcrs);
        assert_eq!(
            parse_err(&with("[0, 24]")),
            PolicyError::PcrOutOfRange { index: 24 }
        );
        assert_eq!(
            parse_err(&with("[7, 7]")),
            PolicyError::DuplicatePcr { index: 7 }
        );
        assert!(Policy::parse(&with("[0, 7, 14]")).is_ok());
        // sev data keys are sealed to the same PCRs.
        assert_eq!(
            parse_err("threshold = 2\n[holders]\nvhd = 1\nsev = 1\n"),
            PolicyError::MissingTpmSection {
                class: HolderClass::Sev
            }
        );
    }

    #[test]
    fn unknown_fields_classes_and_banks_are_refused() {
        for text in [
            "threshold = 2\nthreshhold = 3\n[holders]\nsev = 2\n",
            "threshold = 2\n[holders]\nsev = 2\nusb = 1\n",
            "threshold = 2\n[holders]\nsev = 1\ntpm = 1\n[tpm]\npcr_bank = \"md5\"\npcrs = [0]\n",
            "threshold = 300\n[holders]\nsev = 2\n",
            "not toml at all",
        ] {
            let err = parse_err(text);
            assert!(
                matches!(err, PolicyError::Syntax(_)),
                "{text:?} gave {err:?}"
            );
            assert!(!err.to_string().contains('\n'), "multi-line error: {err}");
        }
    }
}
