//! Who could rebuild a secret: for each adversary, which holder classes it obtains and why, and
//! whether a policy's threshold still stands against it.
//!
//! The model is deliberately blunt. An adversary either obtains every share of a class or none
//! of it; what it obtains is counted against k. A policy *resists* an adversary when the shares
//! that adversary obtains stay below k.

use std::fmt;

use crate::holder::HolderClass;
use crate::host_class::HostEvidence;
use crate::policy::HolderCounts;

/// An attacker (or an unlucky event) the policy is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Adversary {
    /// A copy of the VM's disk image: the LUKS2 volume, encrypted under the shared key.
    StolenDiskImage,
    /// A copy of the coordinator's state directory (or of `split`'s fragment files), without the
    /// TPM that sealed its data keys.
    StolenStateDirectory,
    /// Root on this host after its firmware or boot chain was changed (a patched firmware,
    /// bootloader or kernel booted to gain root).
    ChangedBootChain,
    /// Root on this host while its boot state is unchanged.
    HostRoot,
}

impl Adversary {
    pub const ALL: [Adversary; 4] = [
        Self::StolenDiskImage,
        Self::StolenStateDirectory,
        Self::ChangedBootChain,
        Self::HostRoot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StolenDiskImage => "stolen disk image",
            Self::StolenStateDirectory => "stolen state directory",
            Self::ChangedBootChain => "changed firmware or boot chain",
            Self::HostRoot => "root on this host",
        }
    }

    /// Whether this adversary obtains the shares of `class`; `host` shares by what the guest
    /// presents for them (`host`: the policy's `[host] evidence`; without it, none are
    /// obtained, as a policy with `host` shares must name it). For [`Self::ChangedBootChain`]
    /// this assumes the change is measured in the PCRs the `tpm` and `sev` data keys are sealed
    /// to; a change those PCRs do not measure is not detected, and is then [`Self::HostRoot`].
    pub fn obtains(self, class: HolderClass, host: Option<HostEvidence>) -> bool {
        match (self, class) {
            // Remote shard hosts release them to the guest's evidence: whoever forges it obtains
            // them.
            (_, HolderClass::Host) => host.is_some_and(|evidence| evidence.forged_by(self)),
            // The recovery share is kept offline.
            (_, HolderClass::Recovery) => false,
            // The image holds only the encrypted volume; no share is stored in it.
            (Self::StolenDiskImage, _) => false,
            // `DIR/fragments/*.ksf` are plain files; the tpm and sev fragments are encrypted
            // under data keys that only the host's TPM unseals.
            (Self::StolenStateDirectory, HolderClass::Vhd) => true,
            (Self::StolenStateDirectory, _) => false,
            // Root reads the fragment files, but the TPM refuses to unseal the data keys of tpm
            // and sev fragments while a sealed PCR differs from its golden value.
            (Self::ChangedBootChain, HolderClass::Vhd) => true,
            (Self::ChangedBootChain, _) => false,
            // Root reads the fragment files and every fragment device's memory, and satisfies
            // the PCR policy (the boot state is unchanged), so it unseals tpm shares and the
            // sev data keys, as the on-host coordinator does; sev shares also sit in the
            // coordinator's memory.
            (Self::HostRoot, HolderClass::Vhd | HolderClass::Tpm | HolderClass::Sev) => true,
        }
    }

    /// One line on how this adversary gets what it gets.
    pub fn explanation(self) -> &'static str {
        match self {
            Self::StolenDiskImage => "the image holds only the encrypted volume, no share",
            Self::StolenStateDirectory => {
                "vhd fragments are plain files; tpm and sev fragments are encrypted under data \
                 keys only this host's TPM unseals"
            }
            Self::ChangedBootChain => {
                "the TPM unseals tpm and sev data keys only while the sealed PCRs hold their \
                 golden values"
            }
            Self::HostRoot => {
                "root reads every fragment device and unseals tpm and sev data keys while the \
                 boot state is unchanged, as the coordinator does"
            }
        }
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one adversary obtains of a policy's shares, against k.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub adversary: Adversary,
    /// The classes it obtains that the policy gives shares, with their counts.
    pub obtained: Vec<(HolderClass, u8)>,
    pub threshold: u8,
}

impl Exposure {
    /// Judges `holders` with threshold `k` against `adversary`; `host` is what the guest
    /// presents for its `host` shares.
    pub fn of(
        adversary: Adversary,
        holders: &HolderCounts,
        k: u8,
        host: Option<HostEvidence>,
    ) -> Self {
        let obtained = HolderClass::ALL
            .into_iter()
            .filter(|class| adversary.obtains(*class, host))
            .map(|class| (class, holders.get(class)))
            .filter(|(_, count)| *count > 0)
            .collect();
        Self {
            adversary,
            obtained,
            threshold: k,
        }
    }

    /// Shares obtained (a u32: a policy that failed to parse may sum past 255).
    pub fn shares(&self) -> u32 {
        self.obtained.iter().map(|(_, n)| u32::from(*n)).sum()
    }

    /// Whether the shares obtained stay below k.
    pub fn resists(&self) -> bool {
        self.shares() < u32::from(self.threshold)
    }

    /// "vhd 2, tpm 1", or "no share".
    pub fn obtained_summary(&self) -> String {
        if self.obtained.is_empty() {
            return "no share".to_owned();
        }
        self.obtained
            .iter()
            .map(|(class, n)| format!("{class} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// "resists: obtains vhd 2 (2 of the 3 shares needed)".
impl fmt::Display for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.resists() {
            "resists"
        } else {
            "does not resist"
        };
        write!(
            f,
            "{verdict}: obtains {} ({} of the {} shares needed)",
            self.obtained_summary(),
            self.shares(),
            self.threshold
        )
    }
}

/// Every adversary's exposure, in [`Adversary::ALL`] order.
pub fn assess(holders: &HolderCounts, k: u8, host: Option<HostEvidence>) -> Vec<Exposure> {
    Adversary::ALL
        .into_iter()
        .map(|adversary| Exposure::of(adversary, holders, k, host))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vhd = 2, tpm = 1, k = 3: `examples/vhd-tpm.toml`.
    fn vhd_tpm() -> HolderCounts {
        HolderCounts {
            vhd: 2,
            tpm: 1,
            ..HolderCounts::default()
        }
    }

    fn verdict(adversary: Adversary, holders: HolderCounts, k: u8) -> (bool, u32) {
        let exposure = Exposure::of(adversary, &holders, k, Some(HostEvidence::SevSnp));
        (exposure.resists(), exposure.shares())
    }

    #[test]
    fn stolen_disk_image_obtains_no_share() {
        let all_vhd = HolderCounts {
            vhd: 3,
            ..HolderCounts::default()
        };
        assert_eq!(verdict(Adversary::StolenDiskImage, all_vhd, 3), (true, 0));
        assert_eq!(
            Exposure::of(Adversary::StolenDiskImage, &all_vhd, 3, None).to_string(),
            "resists: obtains no share (0 of the 3 shares needed)"
        );
    }

    #[test]
    fn stolen_state_directory_obtains_the_vhd_shares_only() {
        assert_eq!(
            verdict(Adversary::StolenStateDirectory, vhd_tpm(), 3),
            (true, 2)
        );
        let sev_heavy = HolderCounts {
            vhd: 1,
            tpm: 2,
            sev: 2,
            ..HolderCounts::default()
        };
        assert_eq!(
            verdict(Adversary::StolenStateDirectory, sev_heavy, 2),
            (true, 1)
        );
        let all_vhd = HolderCounts {
            vhd: 3,
            ..HolderCounts::default()
        };
        assert_eq!(
            verdict(Adversary::StolenStateDirectory, all_vhd, 3),
            (false, 3)
        );
    }

    #[test]
    fn changed_boot_chain_obtains_vhd_but_not_what_the_tpm_seals() {
        assert_eq!(
            verdict(Adversary::ChangedBootChain, vhd_tpm(), 3),
            (true, 2)
        );
        let exposure = Exposure::of(Adversary::ChangedBootChain, &vhd_tpm(), 3, None);
        assert_eq!(exposure.obtained, vec![(HolderClass::Vhd, 2)]);
        let with_sev = HolderCounts {
            vhd: 1,
            sev: 1,
            tpm: 1,
            ..HolderCounts::default()
        };
        assert_eq!(verdict(Adversary::ChangedBootChain, with_sev, 2), (true, 1));
    }

    #[test]
    fn host_root_obtains_vhd_tpm_and_sev_but_not_host() {
        assert_eq!(verdict(Adversary::HostRoot, vhd_tpm(), 3), (false, 3));
        assert_eq!(
            Exposure::of(Adversary::HostRoot, &vhd_tpm(), 3, None).to_string(),
            "does not resist: obtains vhd 2, tpm 1 (3 of the 3 shares needed)"
        );
        let mixed = HolderCounts {
            vhd: 1,
            tpm: 1,
            sev: 1,
            host: 2,
            recovery: 1,
        };
        assert_eq!(verdict(Adversary::HostRoot, mixed, 4), (true, 3));
        assert_eq!(verdict(Adversary::HostRoot, mixed, 3), (false, 3));
        assert_eq!(
            Exposure::of(Adversary::HostRoot, &mixed, 4, None).obtained_summary(),
            "vhd 1, tpm 1, sev 1"
        );
    }

    #[test]
    fn recovery_and_snp_released_host_shares_are_obtained_by_no_adversary_here() {
        for adversary in Adversary::ALL {
            let snp = Some(HostEvidence::SevSnp);
            assert!(!adversary.obtains(HolderClass::Host, snp), "{adversary}");
            assert!(
                !adversary.obtains(HolderClass::Recovery, snp),
                "{adversary}"
            );
        }
    }

    /// Issue 9 item 8: a quote from the VM's TPM is one root on the host makes itself.
    #[test]
    fn item8_host_shares_released_to_a_vm_tpm_are_host_reachable() {
        let holders = HolderCounts {
            vhd: 1,
            tpm: 1,
            host: 2,
            ..HolderCounts::default()
        };
        let vm_tpm = Some(HostEvidence::VmTpm);
        let root = Exposure::of(Adversary::HostRoot, &holders, 3, vm_tpm);
        assert!(!root.resists());
        assert_eq!(root.obtained_summary(), "vhd 1, tpm 1, host 2");
        let stolen = Exposure::of(Adversary::StolenStateDirectory, &holders, 3, vm_tpm);
        assert_eq!(stolen.obtained_summary(), "vhd 1");
        let snp = Exposure::of(Adversary::HostRoot, &holders, 3, Some(HostEvidence::SevSnp));
        assert!(snp.resists());
        assert_eq!(snp.obtained_summary(), "vhd 1, tpm 1");
    }

    #[test]
    fn assess_covers_every_adversary_in_order() {
        let all = assess(&vhd_tpm(), 3, None);
        let names: Vec<_> = all.iter().map(|e| e.adversary).collect();
        assert_eq!(names, Adversary::ALL);
        let resisted: Vec<_> = all.iter().map(Exposure::resists).collect();
        assert_eq!(resisted, [true, true, true, false]);
    }
}
