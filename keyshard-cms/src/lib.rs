//! keyshard's credential service. Today it holds the attestation repository's [`store`].
pub mod shard_host;
pub mod store;
