//! keyshard's credential service: the HTTPS [`server`] (the CMS's `/v1/` JSON API over TLS), the
//! shard host [`registry`], [`credential`] put and maps, and the attestation repository's
//! [`store`].
pub mod credential;
pub mod registry;
pub mod server;
pub mod store;
