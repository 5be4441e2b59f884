//! Releasing `tpm` holders: the host attests itself before each release. A fresh nonce, a quote
//! over the policy's PCRs by the attestation key pinned at init, checked in software against the
//! golden values; then the TPM unseals the holder's data key under its own PolicyPCR check, and
//! the stored fragment is decrypted with it. A changed PCR is named in the refusal.

use keyshard_core::HolderId;
use keyshard_core::broker::RefusalCode;
use zeroize::Zeroizing;

use super::at_rest;
use super::release::{HolderReleaser, Refusal, ReleaseCheck};
use keyshard_attest::tpm::{
    AkPublic, NONCE_LEN, PcrSelection, PcrValues, QuoteError, differing_pcrs, verify_quote,
};
use keyshard_tpm::{SealedBlob, TpmError, TpmService};

/// One `tpm` holder's stored material.
pub struct TpmHolder {
    pub id: HolderId,
    pub sealed_key: SealedBlob,
    pub encrypted_fragment: Vec<u8>,
}

pub struct TpmReleaser {
    tpm: TpmService,
    selection: PcrSelection,
    golden: PcrValues,
    ak: AkPublic,
    holders: Vec<TpmHolder>,
}

impl TpmReleaser {
    pub fn new(tpm: TpmService, golden: PcrValues, ak: AkPublic, holders: Vec<TpmHolder>) -> Self {
        Self {
            tpm,
            selection: golden.selection().clone(),
            golden,
            ak,
            holders,
        }
    }

    /// The host's own attestation: quote with a fresh nonce and check it against golden values.
    fn attest_host(&self) -> Result<(), Refusal> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| {
            Refusal::new(RefusalCode::Internal, "no randomness for the quote nonce")
        })?;
        let quote = self
            .tpm
            .quote(&self.selection, &nonce)
            .map_err(tpm_refusal)?;
        match verify_quote(&quote, &self.ak, &nonce, &self.golden) {
            Ok(_) => Ok(()),
            Err(QuoteError::PcrDigest { selection }) => Err(Refusal::new(
                RefusalCode::HostAttestation,
                self.changed_pcrs_reason(&selection),
            )),
            Err(e) => Err(Refusal::new(
                RefusalCode::HostAttestation,
                format!("host quote refused: {e}"),
            )),
        }
    }

    /// "PCR 7 (sha256) differs from its golden value", from a fresh PCR read.
    fn changed_pcrs_reason(&self, selection: &str) -> String {
        let changed = self
            .tpm
            .read_pcrs(&self.selection)
            .ok()
            .and_then(|current| differing_pcrs(&self.golden, &current).ok())
            .unwrap_or_default();
        let bank = self.selection.bank().as_str();
        match changed.as_slice() {
            [] => format!("host PCRs {selection} do not match their golden values"),
            [one] => format!("PCR {one} ({bank}) differs from its golden value"),
            many => {
                let list: Vec<String> = many.iter().map(u8::to_string).collect();
                format!(
                    "PCRs {} ({bank}) differ from their golden values",
                    list.join(", ")
                )
            }
        }
    }
}

fn tpm_refusal(error: TpmError) -> Refusal {
    let code = match error {
        TpmError::PolicyRefused { .. } => RefusalCode::HostAttestation,
        _ => RefusalCode::Internal,
    };
    Refusal::new(code, format!("TPM: {error}"))
}

impl HolderReleaser for TpmReleaser {
    fn release(&self, check: &ReleaseCheck<'_>) -> Result<Zeroizing<Vec<u8>>, Refusal> {
        let holder = self
            .holders
            .iter()
            .find(|h| &h.id == check.holder)
            .ok_or_else(|| {
                Refusal::new(
                    RefusalCode::UnknownHolder,
                    format!("no tpm holder {}", check.holder),
                )
            })?;
        self.attest_host()?;
        let key = self.tpm.unseal(&holder.sealed_key).map_err(tpm_refusal)?;
        let key: at_rest::DataKey = Zeroizing::new(
            <[u8; at_rest::DATA_KEY_LEN]>::try_from(key.as_slice()).map_err(|_| {
                Refusal::new(
                    RefusalCode::Internal,
                    "unsealed data key has the wrong length",
                )
            })?,
        );
        at_rest::decrypt(&key, &holder.id, &holder.encrypted_fragment).map_err(|e| {
            Refusal::new(
                RefusalCode::Internal,
                format!("stored fragment of {}: {e}", holder.id),
            )
        })
    }
}
