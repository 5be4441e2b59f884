//! AMD SEV-SNP attestation evidence, as the coordinator checks it before releasing a `sev`
//! share: the report ([`report`]), the VCEK and its chain to AMD's pinned roots ([`vcek`],
//! [`anchors`], [`chain`]), the report's signature over its raw bytes ([`signature`]), and the
//! coordinator's [`policy`]. [`SnpVerifier`] runs the checks in order and caches each VCEK's
//! verdict ([`cache`]); [`VcekStore`] finds VCEKs in a local directory. Reading a report from
//! `/dev/sev-guest` is the guest's business, not this module's.

pub mod anchors;
pub mod cache;
pub mod chain;
pub mod policy;
pub mod product;
pub mod report;
pub mod signature;
pub mod tcb;
pub mod vcek;
pub mod vcek_store;
pub mod verify;

#[cfg(test)]
mod fixtures;

pub use anchors::TrustAnchors;
pub use keyshard_core::broker::report_data_binding;
pub use policy::{AbiVersion, PlatformPolicy, SnpPolicy};
pub use product::Product;
pub use report::Report;
pub use tcb::Tcb;
pub use vcek_store::VcekStore;
pub use verify::{Evidence, SnpVerifier, Verdict, VerifyError};
