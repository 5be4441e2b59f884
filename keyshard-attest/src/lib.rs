//! Attestation evidence verified in pure software: AMD SEV-SNP reports and their VCEK chains
//! ([`snp`]), and TPM 2.0 quotes against a pinned attestation key and golden PCR values
//! ([`tpm`]). No TPM access and no tss-esapi: the coordinator uses it today, and anything that
//! only checks evidence (a shard host, a validator) can use it without libtss2. Without the
//! default `snp` feature only [`tpm`] is built, on pure-Rust crates: the guest's host check.

#[cfg(feature = "snp")]
pub mod snp;
pub mod tpm;
