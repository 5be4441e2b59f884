//! `keyshard reseal`: after a firmware or boot-chain change, re-seal a state directory's `tpm`
//! and `sev` shares to the host's *current* PCR values, given k shares that include the
//! offline recovery share.
//!
//! 1. The key is rebuilt under the guest manifest's rules (dealer key, key id, k, key check
//!    value) from the `vhd` fragments in `DIR/fragments/` and the recovery share.
//! 2. The `tpm` and `sev` fragments are made again: Shamir's shares are points of one polynomial
//!    per byte, so k shares give the share at any other index; Ed25519 signatures are
//!    deterministic, so re-signing with the dealer key gives the same fragment bytes as `init`.
//! 3. Before anything is written, the re-made fragments and the `vhd` fragments (without the
//!    recovery share) must rebuild the same key.
//! 4. Each fragment gets a new data key sealed to the current PCRs; the golden PCR values and the
//!    attestation key are recorded again. Every file is written atomically; a reseal that stops
//!    half-way can be run again, as the recovery share and the `vhd` fragments are unchanged.

use keyshard_core::dealer::HolderSlot;
use keyshard_core::files::{self, FileError, Overwrite};
use keyshard_core::fragment::{Fragment, MAX_FRAGMENT_LEN, VerifiedFragment};
use keyshard_core::holder::HolderClass;
use keyshard_core::keys::DealerSigningKey;
use keyshard_core::manifest::{HOST_AK_LEN, HostAttestation, Manifest, ManifestError};
use keyshard_core::quorum::{self, Candidate, QuorumError};
use keyshard_core::recovery::{self, RecoveryCodeError};
use keyshard_core::sharing::{self, Share, SharingError};
use zeroize::Zeroizing;

use super::at_rest::{self, AtRestError};
use super::state::{State, StateDir, StateError};
use keyshard_attest::tpm::{PcrError, PcrSelection, PcrValues, differing_pcrs};
use keyshard_tpm::{Tpm, TpmError};

/// State files are small; anything larger is not one.
const MAX_STATE_FILE_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{}: {source}", path.display())]
    Manifest {
        path: std::path::PathBuf,
        source: ManifestError,
    },
    #[error("the state has no tpm or sev holders: there is nothing to reseal")]
    NothingSealed,
    #[error("the state gives no recovery share: reseal needs one (policy [holders] recovery = 1)")]
    NoRecoveryHolder,
    #[error(
        "the signing key is not the dealer key of this state directory (its manifest names another)"
    )]
    WrongDealerKey,
    #[error("no valid vhd fragment in the state directory to read the recovery code against")]
    NoTemplate,
    #[error("recovery code: {0}")]
    RecoveryCode(#[from] RecoveryCodeError),
    #[error("the recovery share was not used: {0}")]
    RecoveryRejected(String),
    #[error("the key could not be rebuilt: {0}")]
    Quorum(#[from] QuorumError),
    #[error("{holder}: the state lists it as share {index}, but its fragment says {found}")]
    IndexMismatch {
        holder: String,
        index: usize,
        found: u8,
    },
    #[error("re-making a share: {0}")]
    Sharing(#[from] SharingError),
    #[error("re-signing a fragment: {0}")]
    Sign(String),
    #[error("the re-made fragments do not rebuild the key; nothing was written")]
    Check,
    #[error("TPM: {0}")]
    Tpm(#[from] TpmError),
    #[error("PCR selection: {0}")]
    Pcrs(#[from] PcrError),
    #[error("encrypting a fragment: {0}")]
    AtRest(#[from] AtRestError),
}

/// The recovery share as the operator kept it.
pub enum RecoveryInput {
    /// The bytes of `init --recovery-file`.
    File(Zeroizing<Vec<u8>>),
    /// The recovery code `init` printed.
    Code(Zeroizing<String>),
}

/// What `reseal` did, for its report.
#[derive(Debug)]
pub struct ResealReport {
    pub resealed: Vec<String>,
    pub selection: String,
    /// PCRs whose value differs from the previous golden values (empty when they were unreadable).
    pub changed: Vec<u8>,
}

/// Re-seals `dir`'s `tpm` and `sev` shares to the current PCRs of `tpm`.
pub fn reseal(
    dir: &StateDir,
    recovery_input: &RecoveryInput,
    dealer_key: &DealerSigningKey,
    tpm: &mut Tpm,
) -> Result<ResealReport, ResealError> {
    let state_path = dir.state_file();
    let state = State::parse(
        &state_path,
        &files::read_text(&state_path, MAX_STATE_FILE_LEN)?,
    )?;
    let manifest_path = dir.manifest();
    let manifest = Manifest::parse(&files::read_text(&manifest_path, MAX_STATE_FILE_LEN)?)
        .map_err(|source| ResealError::Manifest {
            path: manifest_path,
            source,
        })?;
    if dealer_key.verifying_key() != manifest.dealer {
        return Err(ResealError::WrongDealerKey);
    }
    let tpm_policy = state.tpm.as_ref().ok_or(ResealError::NothingSealed)?;
    let attested: Vec<(usize, &HolderSlot)> = indexed(&state)
        .filter(|(_, h)| matches!(h.class, HolderClass::Tpm | HolderClass::Sev))
        .collect();
    if attested.is_empty() {
        return Err(ResealError::NothingSealed);
    }
    if !state
        .holders
        .iter()
        .any(|h| h.class == HolderClass::Recovery)
    {
        return Err(ResealError::NoRecoveryHolder);
    }

    // 1. The key, from the vhd fragments and the recovery share.
    let vhd = vhd_candidates(dir, &state);
    let template = vhd
        .iter()
        .filter_map(|c| c.content.as_ref().ok())
        .filter_map(|bytes| Fragment::parse(bytes).ok()?.verify(&manifest.dealer).ok())
        .map(|f| f.header().clone())
        .next();
    let recovery_bytes = match recovery_input {
        RecoveryInput::File(bytes) => bytes.clone(),
        RecoveryInput::Code(text) => {
            recovery::decode(text, template.as_ref().ok_or(ResealError::NoTemplate)?)?
        }
    };
    let mut candidates = vhd.clone();
    candidates.push(Candidate {
        source: RECOVERY_SOURCE.to_owned(),
        content: Ok(recovery_bytes),
    });
    let request = manifest.quorum_request();
    let outcome =
        quorum::rebuild(&request, &candidates).map_err(|e| match recovery_rejection(&e) {
            Some(reason) => ResealError::RecoveryRejected(reason),
            None => ResealError::Quorum(e),
        })?;
    if let Some(rejected) = outcome
        .rejected
        .iter()
        .find(|r| r.source == RECOVERY_SOURCE)
    {
        return Err(ResealError::RecoveryRejected(rejected.reason.to_string()));
    }
    let used = used_fragments(&outcome.used, &candidates, &manifest)?;
    let shares: Vec<Share> = used.iter().map(|f| f.share().clone()).collect();
    let header = used
        .first()
        .map(|f| f.header().clone())
        .ok_or(ResealError::NoTemplate)?;
    // The state lists holders in the order `init` dealt them: position = share index.
    for f in &used {
        let found = f.header().index;
        let listed = indexed(&state).find(|(_, h)| h.id == f.header().holder_id);
        if let Some((index, slot)) = listed.filter(|(index, _)| usize::from(found) != *index) {
            return Err(ResealError::IndexMismatch {
                holder: slot.id.to_string(),
                index,
                found,
            });
        }
    }

    // 2. The attested fragments, made again.
    let mut remade = Vec::new();
    for (position, slot) in &attested {
        let index = u8::try_from(*position).map_err(|_| ResealError::Check)?;
        let share = sharing::evaluate_at(&shares, outcome.k, index)?;
        let fragment_header = keyshard_core::FragmentHeader {
            index,
            class: slot.class,
            holder_id: slot.id.clone(),
            ..header.clone()
        };
        let fragment = VerifiedFragment::sign(fragment_header, &share, dealer_key)
            .map_err(|e| ResealError::Sign(e.to_string()))?;
        remade.push(fragment);
    }

    // 3. Before writing: the re-made fragments and the vhd fragments rebuild the same key.
    let mut check: Vec<Candidate> = vhd;
    check.extend(
        remade
            .iter()
            .map(|f| Candidate::new(f.header().holder_id.to_string(), f.encoded().to_vec())),
    );
    let checked = quorum::rebuild(&request, &check).map_err(|_| ResealError::Check)?;
    let remade_used = checked
        .used
        .iter()
        .chain(&checked.spare)
        .filter(|a| matches!(a.header.class, HolderClass::Tpm | HolderClass::Sev))
        .count();
    if checked.secret != outcome.secret || remade_used != remade.len() {
        return Err(ResealError::Check);
    }

    // 4. Seal to the current PCRs and write.
    let selection = PcrSelection::try_from(tpm_policy)?;
    let current = tpm.read_pcrs(&selection)?;
    let changed = previous_golden(dir)
        .and_then(|old| differing_pcrs(&old, &current).ok())
        .unwrap_or_default();
    let mut sealed = Vec::new();
    for fragment in &remade {
        let holder = &fragment.header().holder_id;
        let data_key = at_rest::new_data_key()?;
        let blob = tpm.seal(&current, data_key.as_slice())?;
        let encrypted = at_rest::encrypt(&data_key, holder, fragment.encoded())?;
        sealed.push((holder.clone(), blob.to_bytes(), encrypted));
    }
    for (holder, blob, encrypted) in &sealed {
        files::write_private(&dir.sealed_fragment(holder), encrypted, Overwrite::Replace)?;
        files::write_private(&dir.sealed_key(holder), blob, Overwrite::Replace)?;
    }
    files::write_atomic(
        &dir.ak_public(),
        &tpm.ak_public().to_sec1(),
        0o644,
        Overwrite::Replace,
    )?;
    // Last: the golden values say what the sealed keys now expect.
    files::write_atomic(
        &dir.golden_pcrs(),
        &current.to_bytes(),
        0o644,
        Overwrite::Replace,
    )?;
    // The guest manifest's pins follow the new golden values (the guest's initramfs must be
    // rebuilt with it: until then the guest refuses the host's new quotes).
    if manifest.host_attestation.is_some() {
        let ak = <[u8; HOST_AK_LEN]>::try_from(tpm.ak_public().to_sec1().as_slice())
            .map_err(|_| ResealError::Check)?;
        let updated = Manifest {
            host_attestation: Some(HostAttestation {
                ak,
                pcr_bank: selection.bank(),
                pcrs: selection.indices().to_vec(),
                pcr_digest: current.composite_digest(),
            }),
            ..manifest.clone()
        };
        files::write_atomic(
            &dir.manifest(),
            updated.to_toml().as_bytes(),
            0o644,
            Overwrite::Replace,
        )?;
    }
    Ok(ResealReport {
        resealed: sealed.iter().map(|(h, _, _)| h.to_string()).collect(),
        selection: selection.to_string(),
        changed,
    })
}

const RECOVERY_SOURCE: &str = "the recovery share";

/// The state's holders with their share indices (1-based, in the order `init` dealt them).
fn indexed(state: &State) -> impl Iterator<Item = (usize, &HolderSlot)> {
    state.holders.iter().enumerate().map(|(i, h)| (i + 1, h))
}

fn vhd_candidates(dir: &StateDir, state: &State) -> Vec<Candidate> {
    state
        .holders
        .iter()
        .filter(|h| h.class == HolderClass::Vhd)
        .map(|h| {
            let path = dir.fragment(&h.id);
            match files::read_limited(&path, MAX_FRAGMENT_LEN + 1) {
                Ok(bytes) => Candidate {
                    source: h.id.to_string(),
                    content: Ok(bytes),
                },
                Err(e) => Candidate::unavailable(h.id.to_string(), e.to_string()),
            }
        })
        .collect()
}

/// Why the recovery share was rejected, when the quorum failed because of it.
fn recovery_rejection(error: &QuorumError) -> Option<String> {
    let QuorumError::NotMet { rejected, .. } = error else {
        return None;
    };
    rejected
        .iter()
        .find(|r| r.source == RECOVERY_SOURCE)
        .map(|r| r.reason.to_string())
}

/// The fragments the quorum combined, parsed and verified again for their shares.
fn used_fragments(
    used: &[quorum::Accepted],
    candidates: &[Candidate],
    manifest: &Manifest,
) -> Result<Vec<VerifiedFragment>, ResealError> {
    used.iter()
        .map(|a| {
            candidates
                .iter()
                .find(|c| c.source == a.source)
                .and_then(|c| c.content.as_ref().ok())
                .and_then(|bytes| Fragment::parse(bytes).ok())
                .and_then(|f| f.verify(&manifest.dealer).ok())
                .ok_or(ResealError::Check)
        })
        .collect()
}

fn previous_golden(dir: &StateDir) -> Option<PcrValues> {
    let bytes = files::read_limited(&dir.golden_pcrs(), MAX_STATE_FILE_LEN).ok()?;
    PcrValues::parse(&bytes).ok()
}
