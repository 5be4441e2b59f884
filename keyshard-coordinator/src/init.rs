//! `keyshard init`: deal a secret by a policy into a coordinator state directory. `vhd` fragments
//! are written for the fragment devices; each `tpm` and `sev` fragment is encrypted under its own
//! data key, which is sealed to the TPM under the policy's PCRs (below the persistent storage
//! root key); the golden PCR values and the attestation key are recorded; and the guest
//! manifest is written, with the AK and the golden PCR digest when there are `tpm` holders, so
//! that the guest checks the host's quotes itself. A `recovery` fragment is returned to the caller, never written here.

use std::path::Path;

use keyshard_core::dealer::{self, DealError, DealPlan, HolderSlot};
use keyshard_core::files::{self, FileError, Overwrite};
use keyshard_core::fragment::{VerifiedFragment, is_fragment_file};
use keyshard_core::holder::{HolderClass, HolderId, KeyId};
use keyshard_core::kcv::KeyCheckValue;
use keyshard_core::keys::DealerSigningKey;
use keyshard_core::manifest::{HOST_AK_LEN, HostAttestation, Manifest};
use keyshard_core::policy::Policy;

use super::at_rest::{self, AtRestError};
use super::state::{CmsLink, State, StateDir, StateError, check_vm_id};
use keyshard_attest::tpm::{PcrError, PcrSelection};
use keyshard_tpm::{Tpm, TpmError};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{}: already holds a coordinator state (pass --force to replace it)", .0.display())]
    Exists(std::path::PathBuf),
    #[error(
        "the policy gives {class} shares, which are sealed to the TPM: it needs a [tpm] section with the PCRs"
    )]
    NoPcrs { class: HolderClass },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Deal(#[from] DealError),
    #[error("TPM: {0}")]
    Tpm(#[from] TpmError),
    #[error("PCR selection: {0}")]
    Pcrs(#[from] PcrError),
    #[error("encrypting a fragment: {0}")]
    AtRest(#[from] AtRestError),
    #[error("no randomness from the operating system")]
    Random,
    #[error("no VM id to bind the shares to")]
    NoVmId,
    #[error(transparent)]
    VmId(#[from] StateError),
    #[error("the TPM's attestation key is not a 65-byte uncompressed P-256 point")]
    AkForm,
    #[error(
        "the policy gives {count} host share(s), and no CMS to place them on shard hosts was \
         given (--cms, --ca, --client-pub, --instance-policy)"
    )]
    HostSharesNotPlaced { count: u8 },
    #[error("placing the host shares on shard hosts: {0}")]
    HostPlacement(String),
}

/// Refuses a policy whose shares [`init`] has nowhere to put: `host` shares, which only
/// [`init_placing`] places. Call it before anything is written.
pub fn check_placeable(policy: &Policy) -> Result<(), InitError> {
    match policy.holders.get(HolderClass::Host) {
        0 => Ok(()),
        count => Err(InitError::HostSharesNotPlaced { count }),
    }
}

/// Places a key's `host` fragments on shard hosts (through the CMS) and names the hosts, or
/// says in one line why it could not.
pub type HostPlacer<'a> = dyn FnMut(&[&VerifiedFragment]) -> Result<HostPlacement, String> + 'a;

/// Where the `host` shares went, and what the coordinator needs to relay them.
#[derive(Debug, Clone)]
pub struct HostPlacement {
    /// The shard hosts, in share order.
    pub hosts: Vec<String>,
    /// The CMS and the VM's instance id, recorded in state.toml.
    pub cms: CmsLink,
    /// The CA certificates (PEM) of the CMS and the shard hosts, written to `cms/ca.pem`.
    pub ca_pem: Vec<u8>,
}

/// What `init` made, for its report.
#[derive(Debug)]
pub struct InitReport {
    pub key_id: KeyId,
    pub vhd: usize,
    pub sealed: usize,
    pub selection: Option<String>,
    /// The recovery fragment, when the policy has one: never written to the state directory;
    /// the caller hands it to the operator (a file or a printed code).
    pub recovery: Option<VerifiedFragment>,
    /// Share files of an earlier init's holders that this state does not list, removed.
    pub removed: usize,
    /// The shard hosts the `host` shares were placed on (none without `host` shares).
    pub host_placed: Vec<String>,
}

/// Deals `secret` by `policy` into `dir`. `tpm` is needed when the policy has `tpm` or `sev`
/// holders. The attested shares are bound to `vm_ids`: the coordinator releases them to those
/// VMs' brokers only. A policy with `host` shares is refused ([`check_placeable`]); see
/// [`init_placing`].
pub fn init(
    dir: &StateDir,
    policy: &Policy,
    secret: &[u8],
    dealer_key: &DealerSigningKey,
    tpm: Option<&mut Tpm>,
    overwrite: Overwrite,
    vm_ids: &[String],
) -> Result<InitReport, InitError> {
    check_placeable(policy)?;
    let mut nowhere = |_: &[&VerifiedFragment]| -> Result<HostPlacement, String> {
        Err("no CMS to place them".to_owned())
    };
    init_placing(
        dir,
        policy,
        secret,
        dealer_key,
        tpm,
        overwrite,
        vm_ids,
        &mut nowhere,
    )
}

/// [`init`], with the `host` fragments handed to `place` once dealt and before anything is
/// written: when placing fails, nothing is written. They are never written to `dir`.
#[allow(clippy::too_many_arguments)]
pub fn init_placing(
    dir: &StateDir,
    policy: &Policy,
    secret: &[u8],
    dealer_key: &DealerSigningKey,
    tpm: Option<&mut Tpm>,
    overwrite: Overwrite,
    vm_ids: &[String],
    place: &mut HostPlacer<'_>,
) -> Result<InitReport, InitError> {
    if vm_ids.is_empty() {
        return Err(InitError::NoVmId);
    }
    for vm in vm_ids {
        check_vm_id(vm)?;
    }
    if overwrite == Overwrite::Refuse && dir.state_file().exists() {
        return Err(InitError::Exists(dir.root().to_owned()));
    }
    let key_id = KeyId::random().map_err(|_| InitError::Random)?;
    let holders = policy.holder_slots();
    let plan = DealPlan {
        key_id: key_id.clone(),
        epoch: 1,
        k: policy.threshold,
        holders: holders.clone(),
    };
    let mut fragments = dealer::deal(secret, &plan, dealer_key)?;
    let recovery = fragments
        .iter()
        .position(|f| f.header().class == HolderClass::Recovery)
        .map(|at| fragments.remove(at));
    let host_fragments: Vec<_> = fragments
        .iter()
        .filter(|f| f.header().class == HolderClass::Host)
        .collect();
    let placement = if host_fragments.is_empty() {
        None
    } else {
        Some(place(&host_fragments).map_err(InitError::HostPlacement)?)
    };
    let host_placed = placement
        .as_ref()
        .map(|p| p.hosts.clone())
        .unwrap_or_default();

    let attested: Vec<_> = fragments
        .iter()
        .filter(|f| matches!(f.header().class, HolderClass::Tpm | HolderClass::Sev))
        .collect();
    let mut selection_text = None;
    let mut host_attestation = None;
    let mut sealed = Vec::new();
    if let Some(first) = attested.first() {
        let class = first.header().class;
        let tpm_policy = policy.tpm.as_ref().ok_or(InitError::NoPcrs { class })?;
        let tpm = tpm.ok_or(InitError::Tpm(TpmError::Unreachable {
            tcti: String::new(),
            detail: "no TPM was opened".into(),
        }))?;
        let selection = PcrSelection::try_from(tpm_policy)?;
        let golden = tpm.read_pcrs(&selection)?;
        for fragment in &attested {
            let holder = &fragment.header().holder_id;
            let data_key = at_rest::new_data_key()?;
            let blob = tpm.seal(&golden, data_key.as_slice())?;
            let encrypted = at_rest::encrypt(&data_key, holder, fragment.encoded())?;
            sealed.push((
                dir.sealed_key(holder),
                blob.to_bytes(),
                dir.sealed_fragment(holder),
                encrypted,
            ));
        }
        create_dirs(dir, &["sealed", "tpm"])?;
        files::write_atomic(
            &dir.golden_pcrs(),
            &golden.to_bytes(),
            0o644,
            Overwrite::Replace,
        )?;
        files::write_atomic(
            &dir.ak_public(),
            &tpm.ak_public().to_sec1(),
            0o644,
            Overwrite::Replace,
        )?;
        selection_text = Some(selection.to_string());
        // The guest checks the host's quotes for `tpm` shares against these (issue 8 item 4).
        if attested
            .iter()
            .any(|f| f.header().class == HolderClass::Tpm)
        {
            let ak = <[u8; HOST_AK_LEN]>::try_from(tpm.ak_public().to_sec1().as_slice())
                .map_err(|_| InitError::AkForm)?;
            host_attestation = Some(HostAttestation {
                ak,
                pcr_bank: selection.bank(),
                pcrs: selection.indices().to_vec(),
                pcr_digest: golden.composite_digest(),
            });
        }
    }
    create_dirs(dir, &["fragments", "snp", "snp/vcek"])?;
    let mut vhd = 0;
    for fragment in fragments
        .iter()
        .filter(|f| f.header().class == HolderClass::Vhd)
    {
        files::write_private(
            &dir.fragment(&fragment.header().holder_id),
            fragment.encoded(),
            Overwrite::Replace,
        )?;
        vhd += 1;
    }
    for (key_path, blob, fragment_path, encrypted) in &sealed {
        files::write_private(key_path, blob, Overwrite::Replace)?;
        files::write_private(fragment_path, encrypted, Overwrite::Replace)?;
    }
    let manifest = Manifest {
        key_id: key_id.clone(),
        threshold: policy.threshold,
        key_check_value: KeyCheckValue::compute(secret, &key_id),
        dealer: dealer_key.verifying_key(),
        // The guest never asks for the recovery share, so it is not listed as missing at boot.
        holders: holders
            .iter()
            .filter(|h| h.class != HolderClass::Recovery)
            .cloned()
            .collect(),
        host_attestation,
    };
    files::write_atomic(
        &dir.manifest(),
        manifest.to_toml().as_bytes(),
        0o644,
        Overwrite::Replace,
    )?;
    let state = State {
        key_id: key_id.clone(),
        threshold: policy.threshold,
        tpm: if sealed.is_empty() {
            None
        } else {
            policy.tpm.clone()
        },
        holders,
        vm_ids: vm_ids.to_vec(),
        cms: placement.as_ref().map(|p| p.cms.clone()),
    };
    if let Some(placement) = &placement {
        create_dirs(dir, &["cms"])?;
        files::write_atomic(&dir.cms_ca(), &placement.ca_pem, 0o644, Overwrite::Replace)?;
    }
    // Last: a state file means the directory is complete.
    files::write_atomic(
        &dir.state_file(),
        state.to_toml().as_bytes(),
        0o644,
        Overwrite::Replace,
    )?;
    let removed = match overwrite {
        Overwrite::Replace => remove_stale_shares(dir, &state.holders)?,
        Overwrite::Refuse => 0,
    };
    Ok(InitReport {
        key_id,
        vhd,
        sealed: sealed.len(),
        selection: selection_text,
        recovery,
        removed,
        host_placed,
    })
}

/// After `init --force`: removes the shares of holders the new state does not list, left by an
/// earlier init with more holders, so the key that was replaced cannot be rebuilt from the
/// directory. Only regular files named for a holder are touched: `fragments/<id>.ksf` when it is
/// a keyshard fragment, `sealed/<id>.ksf.enc` and `sealed/<id>.key`. Returns how many went.
fn remove_stale_shares(dir: &StateDir, holders: &[HolderSlot]) -> Result<usize, FileError> {
    let mut removed = 0;
    for (folder, suffixes) in [
        ("fragments", &[".ksf"][..]),
        ("sealed", &[".ksf.enc", ".key"][..]),
    ] {
        let Ok(entries) = std::fs::read_dir(dir.root().join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let file_name = entry.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|name| suffixes.iter().find_map(|s| name.strip_suffix(s)))
                .and_then(|stem| HolderId::new(stem).ok())
            else {
                continue;
            };
            let is_file = path.symlink_metadata().is_ok_and(|meta| meta.is_file());
            if !is_file || holders.iter().any(|h| h.id == id) {
                continue;
            }
            if folder == "fragments" && !is_fragment_file(&path) {
                log::warn!(
                    "left {}: not a keyshard fragment, so not removed as stale",
                    path.display()
                );
                continue;
            }
            std::fs::remove_file(&path).map_err(|source| FileError::Io {
                path: path.clone(),
                source,
            })?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn create_dirs(dir: &StateDir, names: &[&str]) -> Result<(), FileError> {
    files::create_private_dir(dir.root())?;
    for name in names {
        files::create_private_dir(&dir.root().join(name))?;
    }
    Ok(())
}

/// Whether `path` looks like a state directory already.
pub fn is_initialised(path: &Path) -> bool {
    StateDir::new(path).state_file().exists()
}
