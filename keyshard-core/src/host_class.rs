//! The `host` holder class for a VM's volume key: shares held by remote shard hosts, released
//! to the guest's own evidence, and which adversaries that evidence lets obtain them.
//!
//! # Design (issue 9 item 8)
//!
//! **What counts as off-host.** A `host` share resists root on the VM's host only if root there
//! cannot produce the evidence the shard hosts release to. So the policy says which evidence
//! that is (`[host] evidence = ...`, [`HostEvidence`]), and [`crate::adversary`] counts by it:
//! - `sev-snp`: an AMD SEV-SNP attestation report signed by the CPU's VCEK, whose REPORT_DATA
//!   binds the shard host's nonce and the guest's ephemeral key. Root on the host cannot sign
//!   one for a measurement it did not launch, nor read the guest's memory; `host` shares count
//!   as off-host for every adversary here. What is then trusted: AMD's chain and firmware, the
//!   shard hosts (fewer than k of them colluding with root on this host), and the CMS that
//!   places them.
//! - `vm-tpm`: a quote from a TPM attached to the VM. On these machines that TPM is an swtpm run
//!   by the VM's host, so root there drives it, quotes any PCR values with its AK and reads the
//!   key it would bind: `host` shares count as *host-reachable* (and a changed boot chain obtains
//!   them too, as the swtpm state is not sealed to the host's PCRs). It exists because it runs
//!   everywhere (tests, the lab); it protects against a guest whose measured boot changed and
//!   against theft of the state directory, not against the host.
//!
//! **Placement** (`keyshard init --cms ...`, built for `vm-tpm`). `init` deals every fragment
//! itself, as before: the VM's dealer key signs each, and the `host` shares are points of the
//! same polynomial as the others, so the CMS cannot deal them. It sends the `host` fragments to
//! the CMS (`keyshard-cms/src/volume.rs`), which verifies them under the dealer key, places
//! them with keyshard-shards' weighted rendezvous hashing over the fresh hosts, spread over
//! regions and operators, seals each to its host's certified TPM key and stores them as the
//! credential named by the key id, whose instance policy names the VM (enrolled as an instance
//! with its TPM's AK). So the existing fetch endpoint, grants and shard host release serve
//! them unchanged, and the released bytes are the dealer-signed fragment the guest checks. The
//! CMS sees the `host` fragments once in the clear, as it sees a credential at put; sealing
//! them in `init` instead would keep them from the CMS but needs the hosts' certified keys
//! checked by `init` (a later step). `sev-snp` evidence is refused by `init` until instance
//! records hold an SNP measurement policy and shard hosts verify SNP reports. The manifest lists
//! the `host` holders like the others, so the guest knows k.
//!
//! **Relay** (not built yet; until it is, a guest does not ask for its `host` shares at boot
//! and names each `host` holder as unavailable). The guest has no network path to the CMS, so
//! the coordinator relays, and must see ciphertext only:
//! - request: the existing release request (kind `0x02`) with class `host` and the holder id;
//!   its request key is the guest's X25519 key for the fetch (`keyshard_shards::instance`'s
//!   FetchKey), and its evidence the guest's: an SNP report whose REPORT_DATA binds the shard
//!   host's nonce and that key, or (`vm-tpm`) a quote whose qualifying data binds them;
//! - the coordinator, per `host` holder, asks the CMS for the VM's grants
//!   (`POST /v1/credentials/{key id}/fetch`) and the placed host for its release
//!   (`/v1/nonces`, `/v1/release`) over HTTPS, each with a deadline (a dead or hung host is
//!   that holder's named refusal, never a hung boot);
//! - answer: a new kind carrying the shard host's released shard (`KSRS`, HPKE-sealed by the
//!   shard host to the guest's key under the binding key id, epoch, slot, host) with the host
//!   id and slot, which the guest opens and then checks as a dealer-signed fragment;
//! - the one design choice left: a `vm-tpm` quote needs TPM2_Quote in the guest without
//!   tss-esapi (which `make check-deps` keeps out of guest-driver), or the coordinator quotes
//!   the VM's swtpm itself, which root on the host can do anyway (why `vm-tpm` counts as
//!   host-reachable) and which still binds the guest's PCRs and its key.

use std::fmt;

use serde::Deserialize;

use crate::adversary::Adversary;

/// What a guest presents to the shard hosts holding its `host` shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostEvidence {
    /// An SEV-SNP attestation report: signed by the CPU, out of reach of the VM's host.
    SevSnp,
    /// A quote from the VM's TPM, which its host runs (an swtpm): the host can forge it.
    VmTpm,
}

impl HostEvidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SevSnp => "sev-snp",
            Self::VmTpm => "vm-tpm",
        }
    }

    /// Whether `adversary` can produce this evidence, and so obtain the `host` shares released
    /// to it.
    pub fn forged_by(self, adversary: Adversary) -> bool {
        match (self, adversary) {
            // The CPU signs the report over the launch measurement; the host cannot.
            (Self::SevSnp, _) => false,
            // A disk image or a copied state directory holds no TPM and no running guest.
            (Self::VmTpm, Adversary::StolenDiskImage | Adversary::StolenStateDirectory) => false,
            // Root runs the VM's swtpm (its state is not sealed to the host's PCRs), so it
            // quotes any value with the VM's AK and binds a key of its own.
            (Self::VmTpm, Adversary::ChangedBootChain | Adversary::HostRoot) => true,
        }
    }

    /// One line on what `host` shares under this evidence resist, for `policy check`.
    pub fn explanation(self) -> &'static str {
        match self {
            Self::SevSnp => {
                "host shares are held off this host by shard hosts that release them only to the \
                 guest's SEV-SNP report: root on this host cannot sign one, so it obtains none of \
                 them unless shard hosts collude with it"
            }
            Self::VmTpm => {
                "host shares are released to quotes from the VM's TPM, which this host runs: root \
                 on this host drives it and obtains them, so they count as host-reachable; use \
                 evidence = \"sev-snp\" to hold them off this host"
            }
        }
    }
}

impl fmt::Display for HostEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_evidence_is_forged_by_no_adversary_here() {
        for adversary in Adversary::ALL {
            assert!(!HostEvidence::SevSnp.forged_by(adversary), "{adversary}");
        }
    }

    #[test]
    fn a_vm_tpm_is_forged_by_root_on_the_host_changed_boot_chain_or_not() {
        let forging: Vec<_> = Adversary::ALL
            .into_iter()
            .filter(|a| HostEvidence::VmTpm.forged_by(*a))
            .collect();
        assert_eq!(forging, [Adversary::ChangedBootChain, Adversary::HostRoot]);
    }

    #[test]
    fn evidence_names_parse_from_the_policy_spelling() {
        #[derive(Deserialize)]
        struct Section {
            evidence: HostEvidence,
        }
        for evidence in [HostEvidence::SevSnp, HostEvidence::VmTpm] {
            let text = format!("evidence = \"{evidence}\"");
            let parsed: Section = toml::from_str(&text).unwrap();
            assert_eq!(parsed.evidence, evidence);
        }
        assert!(toml::from_str::<Section>("evidence = \"snp\"").is_err());
    }
}
