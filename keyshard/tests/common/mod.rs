//! Shared by the keyshard CLI's integration tests: the swtpm harness of `keyshard-tpm`'s tests
//! (included by path so there is one) and devices served in-process.

#![allow(dead_code, clippy::unwrap_used)]

pub mod devices;
#[path = "../../../keyshard-tpm/tests/common/swtpm.rs"]
pub mod swtpm;
