//! Shared by the SNP tests here and the `sev` release tests of `keyshard-coordinator`, which
//! include this directory's files by path: test-signed SEV-SNP chains and reports.

#![allow(dead_code)]

pub mod snp_chain;
