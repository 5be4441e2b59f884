//! The guest side of keyshard: finds fragment devices, reads their fragment volumes (as block
//! devices in a guest, or over their vhost-user sockets on a host), asks the host coordinator for
//! the attested shares through the broker mailbox, and rebuilds the secret with `keyshard-core`'s
//! quorum. `keyshard-guest` is the command line over this library.

pub mod agent;
pub mod block_device;
pub mod broker;
pub mod cli;
pub mod discovery;
pub mod serial;
pub mod snp;
pub mod source;
pub mod vhost_user;
pub mod worker;

#[cfg(test)]
mod testing;

pub use keyshard_core::quorum;
