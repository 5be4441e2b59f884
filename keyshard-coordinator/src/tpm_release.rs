//! Releasing `tpm` holders: the host attests itself before each release. A fresh nonce, a quote
//! over the policy's PCRs by the attestation key pinned at init, checked in software against the
//! golden values; then the stored fragment is decrypted with the holder's data key. The data keys
//! are unsealed by the TPM, under their own PolicyPCR check, once when the releaser is built (the
//! coordinator starts), and held in zeroizing memory: a release then costs the TPM one quote, not
//! a quote and an unseal. A quote whose PCRs differ from the golden values drops every held key
//! and refuses, naming the PCR; a key that could not be unsealed at start is unsealed again (under
//! PolicyPCR) by the first release whose quote verifies.
//!
//! One quote serves every release pending within a short window ([`BATCH_WINDOW`]: 20 ms, or
//! 100 ms while a boot storm goes on; across every
//! VM and holder served through the same TPM service): its qualifying data is the root of a
//! Merkle tree over those requests' nonces ([`keyshard_core::broker::merkle`]). A request that
//! carries the guest's own nonce ([`Evidence::TpmNonce`]) gets the quote and its nonce's
//! inclusion path in the answer, so the guest checks the host's state itself against the AK and
//! golden digest of its manifest.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use keyshard_core::HolderId;
use keyshard_core::broker::merkle::{self, PathStep};
use keyshard_core::broker::{Evidence, HostQuote, RefusalCode};
use log::warn;
use zeroize::Zeroizing;

use super::at_rest;
use super::release::{HolderReleaser, Refusal, ReleaseCheck};
use keyshard_attest::tpm::{
    AkPublic, NONCE_LEN, PcrSelection, PcrValues, Quote, QuoteError, differing_pcrs, verify_quote,
};
use keyshard_tpm::{BatchWindow, SealedBlob, TpmError, TpmService};

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
    /// Data keys unsealed so far, by holder. Emptied when a quote shows changed PCRs.
    held: Mutex<HashMap<HolderId, at_rest::DataKey>>,
    /// How long the first release of a batch waits for others to share its quote.
    batch_window: BatchWindow,
}

/// The default batch window: releases arriving within 20 ms share one quote, and within
/// 100 ms while a storm goes on ([`BatchWindow::DEFAULT`]).
pub const BATCH_WINDOW: BatchWindow = BatchWindow::DEFAULT;

impl TpmReleaser {
    /// Unseals every holder's data key now (each under its PolicyPCR). A key the TPM refuses
    /// (PCRs already changed, a TPM error) is logged and left sealed: its releases try again.
    pub fn new(tpm: TpmService, golden: PcrValues, ak: AkPublic, holders: Vec<TpmHolder>) -> Self {
        // Sized once: a map that grows moves its keys and leaves copies that are not zeroized.
        let mut held = HashMap::with_capacity(holders.len());
        for holder in &holders {
            match unseal_data_key(&tpm, holder) {
                Ok(key) => {
                    held.insert(holder.id.clone(), key);
                }
                Err(refusal) => warn!(
                    "{}: data key not unsealed at start: {}",
                    holder.id, refusal.reason
                ),
            }
        }
        Self {
            tpm,
            selection: golden.selection().clone(),
            golden,
            ak,
            holders,
            held: Mutex::new(held),
            batch_window: BATCH_WINDOW,
        }
    }

    /// Replaces the batch window ([`BATCH_WINDOW`] by default).
    pub fn with_batch_window(mut self, window: BatchWindow) -> Self {
        self.batch_window = window;
        self
    }

    /// How many data keys are held unsealed now.
    pub fn held_keys(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn drop_held_keys(&self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The holder's data key: the held one, or unsealed now (PolicyPCR) and then held.
    fn data_key(&self, holder: &TpmHolder) -> Result<at_rest::DataKey, Refusal> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = held.get(&holder.id) {
            return Ok(key.clone());
        }
        let key = unseal_data_key(&self.tpm, holder)?;
        held.insert(holder.id.clone(), key.clone());
        Ok(key)
    }

    /// The host's own attestation: a quote whose qualifying data is the Merkle root over the
    /// nonces of every release pending within the batch window (across every VM served with this
    /// TPM service), this one's being the guest's nonce or, when the guest sent none, a fresh
    /// one of ours; checked against the golden values. Returns the quote and the nonce's path.
    fn attest_host(
        &self,
        guest_nonce: Option<&[u8; NONCE_LEN]>,
    ) -> Result<(Quote, Vec<PathStep>), Refusal> {
        let nonce = match guest_nonce {
            Some(nonce) => *nonce,
            None => {
                let mut nonce = [0u8; NONCE_LEN];
                getrandom::fill(&mut nonce).map_err(|_| {
                    Refusal::new(RefusalCode::Internal, "no randomness for the quote nonce")
                })?;
                nonce
            }
        };
        let (quote, path) = self
            .tpm
            .quote_batched(&self.selection, &nonce, self.batch_window)
            .map_err(tpm_refusal)?;
        let qualifying = merkle::root_from_path(&nonce, &path);
        match verify_quote(&quote, &self.ak, &qualifying, &self.golden) {
            Ok(_) => Ok((quote, path)),
            Err(QuoteError::PcrDigest { selection }) => {
                self.drop_held_keys();
                Err(Refusal::new(
                    RefusalCode::HostAttestation,
                    self.changed_pcrs_reason(&selection),
                ))
            }
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

fn unseal_data_key(tpm: &TpmService, holder: &TpmHolder) -> Result<at_rest::DataKey, Refusal> {
    let key = tpm.unseal(&holder.sealed_key).map_err(tpm_refusal)?;
    <[u8; at_rest::DATA_KEY_LEN]>::try_from(key.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| {
            Refusal::new(
                RefusalCode::Internal,
                "unsealed data key has the wrong length",
            )
        })
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
        self.release_attested(check).map(|(fragment, _)| fragment)
    }

    fn release_attested(
        &self,
        check: &ReleaseCheck<'_>,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<HostQuote>), Refusal> {
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
        let guest_nonce = match check.evidence {
            Evidence::TpmNonce { nonce } => Some(nonce),
            Evidence::None => None,
            Evidence::Snp { .. } => {
                return Err(Refusal::new(
                    RefusalCode::Malformed,
                    "a tpm release carries no SEV-SNP evidence",
                ));
            }
            Evidence::VmTpm => {
                return Err(Refusal::new(
                    RefusalCode::Malformed,
                    "a tpm release carries no VM TPM evidence",
                ));
            }
        };
        let (quote, path) = self.attest_host(guest_nonce)?;
        let key = self.data_key(holder)?;
        let fragment =
            at_rest::decrypt(&key, &holder.id, &holder.encrypted_fragment).map_err(|e| {
                Refusal::new(
                    RefusalCode::Internal,
                    format!("stored fragment of {}: {e}", holder.id),
                )
            })?;
        let host_quote = guest_nonce.map(|_| HostQuote {
            attest: quote.attest,
            signature: quote.signature,
            path,
        });
        Ok((fragment, host_quote))
    }
}
