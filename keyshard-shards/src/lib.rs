//! keyshard-shards: shard encryption, placement and the shard map of the credential service.
//!
//! Pure software, used by the CMS, the shard hosts and the compute instances: [`ecies`] seals a
//! shard to one host's TPM-held P-256 key, [`placement`] chooses which hosts hold the shards of a
//! credential, [`map`] is the signed, encrypted record of where they are, [`instance`] is a
//! compute instance's evidence and the shard a host releases to it, and [`grant`] is the CMS's
//! signed permission for one host to release one shard to one instance. No I/O, no TPM: a
//! TPM enters only through [`ecies::SharedPointSource`].

pub mod ecies;
pub mod grant;
pub mod instance;
pub mod map;
pub mod names;
pub mod placement;

pub use names::{DomainName, FailureDomain, HostId, InstanceId};
