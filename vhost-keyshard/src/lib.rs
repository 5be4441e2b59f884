//! keyshard's host side: the virtio-blk device engine ([`device`]) and the fragment device
//! daemon built on it ([`daemon`], [`fragment_volume`]), and the dealer and admin CLI
//! `keyshard` ([`cli`]).

pub mod cli;
pub mod coordinator;
pub mod daemon;
pub mod device;
pub mod fragment_volume;
pub mod snp;
pub mod tpm;
