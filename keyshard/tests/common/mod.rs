//! Shared by the coordinator and reseal tests: the swtpm harness of `keyshard-tpm`'s tests,
//! included by path so there is one.

#![allow(dead_code)]

#[path = "../../../keyshard-tpm/tests/common/swtpm.rs"]
pub mod swtpm;
