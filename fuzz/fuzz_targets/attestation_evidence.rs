//! Fuzzes the parsers of attestation evidence and of the TPM's stored formats: an SNP report and
//! a VCEK come from guests; sealed blobs, golden PCR values and quote bytes come from files and
//! the TPM; a shard host's certification, decrypt key public area and EK certificate come
//! from the network. Nothing may panic, and the formats keyshard writes must round-trip what
//! they accept.

#![no_main]

use keyshard_attest::snp::Report;
use keyshard_attest::snp::vcek::Vcek;
use keyshard_attest::tpm::ek_cert::{CaBundle, verify_ek_certificate};
use keyshard_attest::tpm::{CertifyAttest, EccPublic, PcrValues, QuoteAttest};
use keyshard_tpm::{DecryptKey, SealedBlob};
use libfuzzer_sys::fuzz_target;

/// swtpm_localca's root and issuer: EK certificates are checked against a real bundle.
const EK_CA: &[u8] = concat!(
    include_str!("../../keyshard-attest/tests/data/ek/rootca.pem"),
    include_str!("../../keyshard-attest/tests/data/ek/issuer.pem")
)
.as_bytes();

fuzz_target!(|data: &[u8]| {
    let _ = Report::from_file_contents(data);
    let _ = Vcek::from_der(data);
    if let Ok(attest) = QuoteAttest::parse(data) {
        if let Some(bytes) = attest.to_bytes() {
            assert_eq!(QuoteAttest::parse(&bytes).ok().and_then(|a| a.to_bytes()), Some(bytes));
        }
    }
    if let Ok(attest) = CertifyAttest::parse(data) {
        if let Some(bytes) = attest.to_bytes() {
            assert_eq!(CertifyAttest::parse(&bytes).ok().and_then(|a| a.to_bytes()), Some(bytes));
        }
    }
    if let Ok(public) = EccPublic::parse(data) {
        let _ = public.check_decrypt_key();
        let _ = public.check_attestation_key();
    }
    if let Ok(key) = DecryptKey::parse(data) {
        assert_eq!(key.to_bytes(), data, "a decrypt key re-encodes to the bytes it came from");
    }
    let _ = CaBundle::from_pem(data);
    if let Ok(bundle) = CaBundle::from_pem(EK_CA) {
        let _ = verify_ek_certificate(data, &bundle, std::time::SystemTime::now());
    }
    if let Ok(blob) = SealedBlob::parse(data) {
        assert_eq!(blob.to_bytes(), data, "a sealed blob re-encodes to the bytes it came from");
    }
    if let Ok(values) = PcrValues::parse(data) {
        assert_eq!(values.to_bytes(), data, "golden values re-encode to the bytes they came from");
    }
});
