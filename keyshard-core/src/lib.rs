//! keyshard-core: what the host dealer and the guest agent share.
//!
//! A secret is split with Shamir's scheme ([`sharing`]), each share is wrapped in a signed
//! [`fragment`], and a [`quorum`] of verified fragments of one epoch rebuilds it. The [`policy`]
//! says how many shares each holder class gets and how many rebuild the secret; [`adversary`]
//! says which attackers a policy resists.

pub mod adversary;
pub mod broker;
pub mod bytes;
pub mod dealer;
pub mod envelope;
pub mod files;
pub mod fragment;
pub mod holder;
pub mod host_class;
pub mod kcv;
pub mod keys;
pub mod manifest;
pub mod policy;
pub mod quorum;
pub mod recovery;
pub mod shard_release;
pub mod sharing;
pub mod usage;
pub mod virtio_blk;
pub mod volume;

pub use fragment::{Fragment, FragmentHeader, VerifiedFragment};
pub use holder::{HolderClass, HolderId, KeyId};
pub use kcv::KeyCheckValue;
pub use quorum::{QuorumOutcome, QuorumRequest};
pub use sharing::Threshold;
