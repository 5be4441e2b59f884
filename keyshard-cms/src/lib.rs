//! keyshard's credential service: the HTTPS [`server`] (the CMS's `/v1/` JSON API over TLS) and
//! the attestation repository's [`store`].
pub mod server;
pub mod store;
