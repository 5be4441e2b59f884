//! The host coordinator: serves one broker mailbox per VM and releases attested shares
//! (`tpm` after the host's own quote verifies, `sev` to a guest whose SNP report verifies), and
//! relays `host` shares from shard hosts.

pub mod at_rest;
pub mod audit;
pub mod host_relay;
pub mod init;
pub mod mailbox;
pub mod nonces;
pub mod rate_limit;
pub mod release;
pub mod reseal;
pub mod setup;
pub mod sev_release;
pub mod state;
pub mod state_root;
pub mod tpm_release;
