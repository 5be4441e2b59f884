//! The host coordinator: serves one broker mailbox per VM and releases attested shares
//! (`tpm` after the host's own quote verifies, `sev` to a guest whose SNP report verifies).

pub mod at_rest;
pub mod audit;
pub mod mailbox;
pub mod nonces;
pub mod release;
