//! keyshard's local lab: `keyshard lab up` starts on loopback a credential service (CMS), shard
//! hosts in three regions and two operators and a compute instance's TPM, each with its own
//! swtpm manufactured with EK certificates, enrols them, and records it all in `DIR/lab.json`;
//! `keyshard lab down` stops it. A development and test tool: it protects nothing.
//!
//! - [`swtpm`]: swtpm manufacturing (`swtpm_setup` with a local EK CA in a directory) and its
//!   command line, shared with the test harness (`keyshard-e2e`).
//! - [`pki`]: the lab's CA and TLS certificates (rcgen).
//! - [`process`]: detached processes (own session, output to a log), their identity (pid and
//!   start time), readiness, and stopping them.
//! - [`labfile`]: the lab file, `lab.json`.
//! - [`up`] and [`down`]: the two commands.

pub mod down;
pub mod error;
pub mod inherit;
pub mod labfile;
pub mod pki;
pub mod process;
pub mod swtpm;
pub mod up;

pub use error::{LabError, Result};
