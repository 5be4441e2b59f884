//! keyshard's guest-facing host code: the virtio-blk device engine ([`device`]), the fragment
//! volume it serves ([`fragment_volume`]) and the fragment device daemon `vhost-keyshard`
//! ([`daemon`]). No TPM, SNP or network code: the coordinator (`keyshard-coordinator`) serves
//! its broker mailbox on this engine.

pub mod daemon;
pub mod device;
pub mod fragment_volume;
