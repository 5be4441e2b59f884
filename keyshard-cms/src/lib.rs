//! keyshard's credential service: the HTTPS [`server`] (the CMS's `/v1/` JSON API over TLS), the
//! shard host [`registry`], [`credential`] put and maps, a shard host's release
//! ([`shard_host`]), and the attestation repository's [`store`].
pub mod credential;
pub mod registry;
pub mod server;
pub mod shard_host;
pub mod store;
