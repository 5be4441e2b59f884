//! keyshard's credential service: the HTTPS [`server`] (the CMS's `/v1/` JSON API over TLS), the
//! shard host [`registry`], [`credential`] put and maps, a shard host's release
//! ([`shard_host`]), TPM [`enrolment`] (an AK proven to be in a genuine TPM, pinned to an id),
//! compute [`instances`] and their golden PCRs, the operator's list of admitted hosts
//! ([`admission`]), and the attestation repository's [`store`].
pub mod admission;
pub mod credential;
pub mod enrolment;
pub mod instances;
pub mod registry;
pub mod server;
pub mod shard_host;
pub mod store;
pub mod volume;
