//! keyshard's credential service. Today it holds the attestation repository's [`store`].
pub mod credential;
pub mod registry;
pub mod store;
