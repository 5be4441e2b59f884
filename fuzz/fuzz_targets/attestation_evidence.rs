//! Fuzzes the parsers of attestation evidence and of the TPM's stored formats: an SNP report and
//! a VCEK come from guests; sealed blobs, golden PCR values and quote bytes come from files and
//! the TPM. Nothing may panic, and the formats keyshard writes must round-trip what they accept.

#![no_main]

use keyshard_attest::snp::Report;
use keyshard_attest::snp::vcek::Vcek;
use keyshard_attest::tpm::{PcrValues, QuoteAttest};
use keyshard_tpm::SealedBlob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Report::from_file_contents(data);
    let _ = Vcek::from_der(data);
    if let Ok(attest) = QuoteAttest::parse(data) {
        if let Some(bytes) = attest.to_bytes() {
            assert_eq!(QuoteAttest::parse(&bytes).ok().and_then(|a| a.to_bytes()), Some(bytes));
        }
    }
    if let Ok(blob) = SealedBlob::parse(data) {
        assert_eq!(blob.to_bytes(), data, "a sealed blob re-encodes to the bytes it came from");
    }
    if let Ok(values) = PcrValues::parse(data) {
        assert_eq!(values.to_bytes(), data, "golden values re-encode to the bytes they came from");
    }
});
