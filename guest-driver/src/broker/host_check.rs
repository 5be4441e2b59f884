//! The guest checks the host before it accepts a `tpm` share. The release request carries a
//! nonce of the guest's own; the answer must carry a quote that verifies with the attestation
//! key pinned in the manifest, whose PCR digest over the pinned bank and PCRs equals the pinned
//! golden digest, and whose qualifying data is the Merkle root that the guest's nonce and the
//! answer's inclusion path lead to. A coordinator that lies about the host's state cannot get a
//! `tpm` share accepted without the host TPM's signature. What this does not cover: a host that
//! changes after the quote, or root on an unchanged host (it can ask the TPM for quotes too).

use keyshard_attest::tpm::{AkPublic, PcrSelection, Quote, QuoteError, verify_quote_digest};
use keyshard_core::broker::{HostQuote, NONCE_LEN, merkle};
use keyshard_core::manifest::HostAttestation;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostCheckError {
    #[error("the manifest pins no host attestation key: tpm shares are not accepted")]
    NotPinned,
    #[error("the coordinator's answer carries no host quote")]
    NoQuote,
    #[error("the manifest's attestation key is not a P-256 point")]
    AkKey,
    #[error("the manifest's PCR selection is not usable: {0}")]
    Selection(String),
    #[error("the host quote is not signed by the manifest's attestation key")]
    Signature,
    #[error("the host's PCR digest over {selection} differs from the manifest's golden digest")]
    PcrDigest { selection: String },
    #[error("the guest's nonce is not in the quoted Merkle root")]
    Nonce,
    #[error("the host quote does not verify: {0}")]
    Quote(QuoteError),
}

/// Checks `quote` against the manifest's pins and the guest's `nonce`.
pub fn check(
    host: &HostAttestation,
    nonce: &[u8; NONCE_LEN],
    quote: &HostQuote,
) -> Result<(), HostCheckError> {
    let ak = AkPublic::from_sec1(&host.ak).map_err(|_| HostCheckError::AkKey)?;
    let selection = PcrSelection::new(host.pcr_bank, &host.pcrs)
        .map_err(|e| HostCheckError::Selection(e.to_string()))?;
    let root = merkle::root_from_path(nonce, &quote.path);
    let signed = Quote {
        attest: quote.attest.clone(),
        signature: quote.signature,
    };
    match verify_quote_digest(&signed, &ak, &root, &selection, &host.pcr_digest) {
        Ok(_) => Ok(()),
        Err(QuoteError::Signature) => Err(HostCheckError::Signature),
        Err(QuoteError::PcrDigest { selection }) => Err(HostCheckError::PcrDigest { selection }),
        Err(QuoteError::Nonce) => Err(HostCheckError::Nonce),
        Err(other) => Err(HostCheckError::Quote(other)),
    }
}
