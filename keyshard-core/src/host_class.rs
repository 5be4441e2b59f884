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
//! **Relay** (built for `vm-tpm`). The guest has no network path to the CMS, so the
//! coordinator relays, and sees ciphertext only:
//! - request: the release request (kind `0x02`) with class `host`, the holder id, the guest's
//!   fresh X25519 request key, and evidence tag 3 (VM TPM, no bytes) ([`crate::broker`]);
//! - the coordinator (`keyshard coordinator --vm-tcti`, `keyshard/src/cli/host_relay.rs`)
//!   asks the CMS for a challenge and the VM's grants (`POST /v1/instances/{id}/challenge`,
//!   `POST /v1/credentials/{key id}/fetch`, the instance id and the CMS from `state.toml`'s
//!   `[cms]`, trusting only the state's `cms/ca.pem`), picks the grant of the holder's slot (the
//!   j-th `host` holder is slot j), and asks that shard host for a nonce and its release
//!   (`/v1/nonces`, `/v1/release`); the CMS part has one deadline and the host part another,
//!   and any failure is a refusal (code 13, `HostShare`) naming the CMS or the host, so a dead
//!   or hung one costs the boot that deadline, never a hang;
//! - answer: kind `0x84` carrying the shard host's `KSRS` bytes (HPKE-sealed by the shard host
//!   to the request key) and the binding it sealed under (credential, epoch, index, host); the
//!   guest opens it ([`crate::shard_release`]) and checks it as a dealer-signed fragment of that
//!   holder. The binding comes from the coordinator: a wrong one only keeps it from opening.
//! - evidence, the choice made: the coordinator quotes the VM's TPM (its swtpm) itself, over
//!   each nonce with the guest's request key bound in the qualifying data
//!   (`keyshard_shards::instance::qualifying_data`). The guest quoting through /dev/tpmrm0 with
//!   raw TPM2 commands would not change who can forge the quote here (root on the host runs the
//!   swtpm and quotes anything with its AK, why `vm-tpm` counts as host-reachable), and it would
//!   need TPM2_Quote, the AK's reloading and the TPM's sharing between QEMU and the coordinator
//!   written without tss-esapi. So what the quote proves is that the holder of the VM's TPM,
//!   with the golden PCRs in it, asked for this key: it keeps `host` shares from a stolen disk
//!   image or state directory and from a TPM whose PCRs changed, and keeps them out of the
//!   coordinator's memory and logs; not from root on the host. The swtpm is opened by the
//!   coordinator, so in a VM it is not the TPM the guest's firmware measures into (QEMU holds
//!   that one's socket): its PCRs are the ones enrolled, which is another reason it counts as
//!   host-reachable. `sev-snp` (REPORT_DATA binding the shard host's nonce and the request key,
//!   which the guest's report source makes) is not relayed yet: shard hosts do not verify SNP
//!   reports.

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
