//! Conversions from keyshard's PCR types to tss-esapi's.

use keyshard_core::policy::PcrBank;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectSize, PcrSelectionList, PcrSelectionListBuilder, PcrSlot};

use crate::error::{Result, command};
use keyshard_attest::tpm::pcr::PcrSelection;

pub(crate) fn hashing_algorithm(bank: PcrBank) -> HashingAlgorithm {
    match bank {
        PcrBank::Sha1 => HashingAlgorithm::Sha1,
        PcrBank::Sha256 => HashingAlgorithm::Sha256,
        PcrBank::Sha384 => HashingAlgorithm::Sha384,
    }
}

/// The selection as a TPML_PCR_SELECTION with a 3-byte bitmap, the encoding
/// [`keyshard_attest::tpm::PcrValues::policy_digest`] hashes: PolicyPCR must be sent exactly this.
pub(crate) fn selection_list(selection: &PcrSelection) -> Result<PcrSelectionList> {
    selection_of(selection.bank(), selection.indices())
}

pub(crate) fn selection_of(bank: PcrBank, indices: &[u8]) -> Result<PcrSelectionList> {
    let slots = indices
        .iter()
        .map(|&i| PcrSlot::try_from(1u32 << u32::from(i.min(31))))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(command("PCR_Read"))?;
    PcrSelectionListBuilder::new()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(hashing_algorithm(bank), &slots)
        .build()
        .map_err(command("PCR_Read"))
}

/// The PCR index of a slot (Slot n is bit n).
pub(crate) fn slot_index(slot: PcrSlot) -> u8 {
    u8::try_from(u32::from(slot).trailing_zeros()).unwrap_or(u8::MAX)
}
