//! The guest side of keyshard: finds fragment devices, reads their fragments and rebuilds the
//! secret with `keyshard-core`'s quorum. The device readers and the `keyshard-guest` binary
//! arrive with the fragment-device work; until then this crate only re-exports the quorum.

pub use keyshard_core::quorum;
