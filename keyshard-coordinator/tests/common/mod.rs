//! Shared by the `sev` release tests: the test-signed SEV-SNP chains of `keyshard-attest`'s
//! tests, included by path so there is one.

#![allow(dead_code)]

#[path = "../../../keyshard-attest/tests/common/snp_chain.rs"]
pub mod snp_chain;
