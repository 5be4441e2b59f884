//! Reading and extending PCRs, and quoting them with the attestation key.

use keyshard_core::policy::PcrBank;
use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Data, DigestValues, MaxBuffer, Signature, SignatureScheme};
use tss_esapi::traits::Marshall;

use crate::convert;
use crate::device::Tpm;
use crate::error::{Result, TpmError, command};
use keyshard_attest::tpm::pcr::{PcrSelection, PcrValues, differing_pcrs};
use keyshard_attest::tpm::quote::{NONCE_LEN, Quote, left_pad};
use keyshard_attest::tpm::spec::{self, PCR_READ_MAX};

/// Largest measurement [`Tpm::extend_pcr`] takes (TPM2B_MAX_BUFFER).
pub const MAX_EVENT_DATA: usize = 1024;

/// A PCR index and its value.
type IndexedValue = (u8, Vec<u8>);

/// How often a PCR read that spans several PCR_Read calls is retried when a PCR changes
/// between the calls.
const READ_ATTEMPTS: usize = 3;

impl Tpm {
    /// Reads the selected PCRs. More than 8 PCRs take several PCR_Read commands; their update
    /// counters must agree, or the read is retried, so the values are one consistent snapshot.
    pub fn read_pcrs(&mut self, selection: &PcrSelection) -> Result<PcrValues> {
        for _ in 0..READ_ATTEMPTS {
            let mut counter = None;
            let mut consistent = true;
            let mut values = Vec::with_capacity(selection.indices().len());
            for chunk in selection.indices().chunks(PCR_READ_MAX) {
                let (update_counter, chunk_values) = self.read_chunk(selection.bank(), chunk)?;
                consistent &= *counter.get_or_insert(update_counter) == update_counter;
                values.extend(chunk_values);
            }
            if consistent {
                return Ok(PcrValues::new(selection.bank(), values)?);
            }
        }
        Err(TpmError::PcrsChanging {
            selection: selection.to_string(),
        })
    }

    /// One PCR_Read of at most 8 PCRs: (pcrUpdateCounter, [(index, value)]).
    fn read_chunk(&mut self, bank: PcrBank, indices: &[u8]) -> Result<(u32, Vec<IndexedValue>)> {
        let list = convert::selection_of(bank, indices)?;
        let (counter, read, digests) = self
            .ctx
            .execute_without_session(|c| c.pcr_read(list))
            .map_err(command("PCR_Read"))?;
        let mut returned: Vec<u8> = read
            .get_selections()
            .iter()
            .filter(|s| s.hashing_algorithm() == convert::hashing_algorithm(bank))
            .flat_map(|s| s.selected())
            .map(convert::slot_index)
            .collect();
        returned.sort_unstable();
        if returned.is_empty() {
            return Err(TpmError::BankUnavailable {
                bank: bank.as_str(),
            });
        }
        if returned != indices || digests.value().len() != indices.len() {
            return Err(TpmError::UnexpectedResponse {
                command: "PCR_Read",
                what: "other PCRs than requested",
            });
        }
        let values = indices
            .iter()
            .zip(digests.value())
            .map(|(&index, digest)| (index, digest.value().to_vec()))
            .collect();
        Ok((counter, values))
    }

    /// Extends PCR `index` of `bank` with the bank's hash of `data` (at most 1024 bytes), the way
    /// a boot component records a measurement. For tests and demonstrations.
    pub fn extend_pcr(&mut self, bank: PcrBank, index: u8, data: &[u8]) -> Result<()> {
        PcrSelection::new(bank, &[index])?;
        if data.len() > MAX_EVENT_DATA {
            return Err(TpmError::EventTooLong { len: data.len() });
        }
        let alg = convert::hashing_algorithm(bank);
        let buffer = MaxBuffer::try_from(data.to_vec()).map_err(command("Hash"))?;
        let (digest, _ticket) = self
            .ctx
            .execute_without_session(|c| c.hash(buffer, alg, Hierarchy::Null))
            .map_err(command("Hash"))?;
        if digest.value().len() != spec::digest_len(bank) {
            return Err(TpmError::UnexpectedResponse {
                command: "Hash",
                what: "a digest of the wrong length",
            });
        }
        let mut digests = DigestValues::new();
        digests.set(alg, digest);
        let pcr = PcrHandle::try_from(u32::from(index)).map_err(command("PCR_Extend"))?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| c.pcr_extend(pcr, digests))
            .map_err(command("PCR_Extend"))
    }

    /// Which of the golden values' PCRs hold other values now, ascending: after a quote failed
    /// with [`keyshard_attest::tpm::QuoteError::PcrDigest`], this names the PCR ("PCR 7").
    pub fn changed_pcrs(&mut self, golden: &PcrValues) -> Result<Vec<u8>> {
        let current = self.read_pcrs(golden.selection())?;
        Ok(differing_pcrs(golden, &current)?)
    }

    /// TPM2_Quote over `selection` with `nonce` as qualifying data, signed by the attestation
    /// key. Verify it with [`keyshard_attest::tpm::verify_quote`].
    pub fn quote(&mut self, selection: &PcrSelection, nonce: &[u8; NONCE_LEN]) -> Result<Quote> {
        let list = convert::selection_list(selection)?;
        let data = Data::try_from(nonce.to_vec()).map_err(command("Quote"))?;
        let ak = self.ak;
        // Nothing secret goes in or out, and the result is signed: password auth suffices.
        let (attest, signature) = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(ak, data, SignatureScheme::Null, list)
            })
            .map_err(command("Quote"))?;
        // The canonical re-encoding is exactly the signed bytes.
        let attest = attest.marshall().map_err(command("Quote"))?;
        let signature = ecdsa_rs(signature, "Quote")?;
        Ok(Quote { attest, signature })
    }
}

/// An ECDSA P-256 signature from the TPM as r || s, 32 bytes each, big-endian.
pub(crate) fn ecdsa_rs(signature: Signature, command: &'static str) -> Result<[u8; 64]> {
    let Signature::EcDsa(ecdsa) = signature else {
        return Err(TpmError::UnexpectedResponse {
            command,
            what: "not an ECDSA signature",
        });
    };
    let mut rs = [0u8; 64];
    let (r, s) = rs.split_at_mut(32);
    left_pad(r, ecdsa.signature_r().value())
        .zip(left_pad(s, ecdsa.signature_s().value()))
        .ok_or(TpmError::UnexpectedResponse {
            command,
            what: "a signature longer than P-256's",
        })?;
    Ok(rs)
}
