//! Building a [`Coordinator`] from a state directory: which holders it serves, with what.
//! Everything is read and checked once at start; a part that cannot be loaded makes its holders
//! refuse with the reason (fail closed) rather than stop the other holders.

use std::sync::Arc;

use keyshard_core::broker::RefusalCode;
use keyshard_core::files::{self, FileError};
use keyshard_core::holder::HolderClass;
use log::{error, warn};
use zeroize::Zeroizing;

use super::at_rest::{self, DataKey};
use super::audit::AuditLog;
use super::nonces::SystemClock;
use super::release::{Coordinator, HolderReleaser, Refusal, ReleaseCheck};
use super::sev_release::{SevHolder, SevReleaser};
use super::state::{State, StateDir, StateError};
use super::tpm_release::{TpmHolder, TpmReleaser};
use keyshard_attest::snp::{SnpPolicy, SnpVerifier, VcekStore};
use keyshard_attest::tpm::{AkPublic, PcrValues};
use keyshard_tpm::{SealedBlob, TpmService};

/// State files are small; anything larger is not one.
const MAX_STATE_FILE_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("the state has tpm or sev holders but no TPM was opened")]
    NoTpm,
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Refuses every release with the reason its holder could not be loaded.
struct Unavailable(String);

impl HolderReleaser for Unavailable {
    fn release(&self, _check: &ReleaseCheck<'_>) -> Result<Zeroizing<Vec<u8>>, Refusal> {
        Err(Refusal::new(RefusalCode::Internal, self.0.clone()))
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, SetupError> {
    Ok(files::read_limited(path, MAX_STATE_FILE_LEN)?.to_vec())
}

fn invalid(what: &std::path::Path, reason: impl ToString) -> SetupError {
    SetupError::Invalid {
        what: what.display().to_string(),
        reason: reason.to_string(),
    }
}

pub fn load_state(dir: &StateDir) -> Result<State, SetupError> {
    let path = dir.state_file();
    let text = files::read_text(&path, MAX_STATE_FILE_LEN)?;
    Ok(State::parse(&path, &text)?)
}

/// The coordinator for `dir`. `tpm` must be given when the state has `tpm` or `sev` holders.
pub fn coordinator(
    dir: &StateDir,
    state: &State,
    tpm: Option<TpmService>,
) -> Result<Coordinator, SetupError> {
    let audit_path = dir.audit_log();
    let audit = AuditLog::open(&audit_path).map_err(|source| SetupError::Audit {
        path: audit_path,
        source,
    })?;
    let mut coordinator = Coordinator::new(Arc::new(SystemClock), audit, state.vm_ids.clone());
    for (holder, slot) in state.host_slots() {
        coordinator.add_host_holder(holder.clone(), slot);
    }
    if state.attested_holders().next().is_none() {
        return Ok(coordinator);
    }
    let tpm = tpm.ok_or(SetupError::NoTpm)?;
    let golden =
        PcrValues::parse(&read(&dir.golden_pcrs())?).map_err(|e| invalid(&dir.golden_pcrs(), e))?;
    let ak =
        AkPublic::from_sec1(&read(&dir.ak_public())?).map_err(|e| invalid(&dir.ak_public(), e))?;
    if tpm.ak_public() != &ak {
        warn!(
            "the TPM's attestation key is not the one pinned at init: tpm releases will be refused"
        );
    }

    let mut tpm_holders = Vec::new();
    let mut sev_holders = Vec::new();
    for holder in state.attested_holders() {
        let blob = SealedBlob::parse(&read(&dir.sealed_key(&holder.id))?)
            .map_err(|e| invalid(&dir.sealed_key(&holder.id), e))?;
        let encrypted_fragment = read(&dir.sealed_fragment(&holder.id))?;
        match holder.class {
            HolderClass::Tpm => tpm_holders.push(TpmHolder {
                id: holder.id.clone(),
                sealed_key: blob,
                encrypted_fragment,
            }),
            // sev data keys are unsealed once now: a release then costs no TPM round trip.
            _ => match unseal_data_key(&tpm, &blob) {
                Ok(key) => sev_holders.push(SevHolder {
                    id: holder.id.clone(),
                    key,
                    encrypted_fragment,
                }),
                Err(reason) => {
                    error!("{}: {reason}", holder.id);
                    coordinator.add_holder(
                        holder.id.clone(),
                        holder.class,
                        Arc::new(Unavailable(reason)),
                    );
                }
            },
        }
    }

    let tpm_ids: Vec<_> = tpm_holders.iter().map(|h| h.id.clone()).collect();
    let tpm_releaser: Arc<dyn HolderReleaser> =
        Arc::new(TpmReleaser::new(tpm, golden, ak, tpm_holders));
    for id in tpm_ids {
        coordinator.add_holder(id, HolderClass::Tpm, tpm_releaser.clone());
    }
    if !sev_holders.is_empty() {
        let sev_ids: Vec<_> = sev_holders.iter().map(|h| h.id.clone()).collect();
        let releaser = sev_releaser(dir, sev_holders)?;
        for id in sev_ids {
            coordinator.add_holder(id, HolderClass::Sev, releaser.clone());
        }
    }
    Ok(coordinator)
}

fn unseal_data_key(tpm: &TpmService, blob: &SealedBlob) -> Result<DataKey, String> {
    let key = tpm
        .unseal(blob)
        .map_err(|e| format!("sev data key could not be unsealed at start: {e}"))?;
    <[u8; at_rest::DATA_KEY_LEN]>::try_from(key.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| "sev data key has the wrong length".to_owned())
}

fn sev_releaser(
    dir: &StateDir,
    holders: Vec<SevHolder>,
) -> Result<Arc<dyn HolderReleaser>, SetupError> {
    let policy_path = dir.snp_policy();
    let policy = if policy_path.exists() {
        let text = files::read_text(&policy_path, MAX_STATE_FILE_LEN)?;
        Some(SnpPolicy::parse(&text).map_err(|e| invalid(&policy_path, e))?)
    } else {
        warn!(
            "{}: missing: sev releases will be refused",
            policy_path.display()
        );
        None
    };
    let vceks = VcekStore::open(&dir.vcek_dir()).map_err(|e| invalid(&dir.vcek_dir(), e))?;
    let verifier =
        SnpVerifier::with_amd_roots().map_err(|e| invalid(std::path::Path::new("AMD roots"), e))?;
    Ok(Arc::new(SevReleaser::new(
        Arc::new(verifier),
        policy,
        vceks,
        holders,
    )))
}
