//! The coordinator's side of `host` shares (issue 9 item 8): it relays a guest's request to the
//! CMS and the shard host that holds the share, and hands back what the shard host released,
//! sealed to the guest's request key. The design is in `keyshard_core::host_class`.
//!
//! The coordinator handles ciphertext only: the shard host seals the released shard to the
//! guest's request key (HPKE, `KSRS`), which the coordinator never holds. What it does hold is
//! the VM's TPM (an swtpm this host runs), which it quotes for the guest, binding the guest's
//! request key: which is why `vm-tpm` evidence counts as host-reachable.
//!
//! The HTTPS side lives in the `keyshard` binary (`keyshard coordinator --vm-tcti`), behind
//! [`HostShareRelay`], so this crate carries no HTTP client.

use keyshard_core::envelope::PUBLIC_KEY_LEN;
use keyshard_core::{HolderId, KeyId};

use super::release::Refusal;

/// One guest's request for one `host` holder's share.
#[derive(Debug, Clone, Copy)]
pub struct HostShareRequest<'a> {
    pub vm_id: &'a str,
    pub holder: &'a HolderId,
    /// The holder's slot in the credential the shares are stored as, 1..=n: the j-th `host`
    /// holder of the state, in share order.
    pub slot: u8,
    /// The guest's X25519 key, bound in the VM TPM's quotes; the shard host seals to it.
    pub request_key: &'a [u8; PUBLIC_KEY_LEN],
}

/// What a shard host released, as the guest gets it: the binding it was sealed under and the
/// `KSRS` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedShard {
    pub credential: KeyId,
    pub epoch: u64,
    pub index: u8,
    pub host: String,
    pub released: Vec<u8>,
}

/// Fetches one `host` share for a guest: the CMS's grant for its slot, then the shard host's
/// release, within deadlines. A failure is a refusal naming the CMS or the host.
pub trait HostShareRelay: Send + Sync {
    fn relay(&self, request: &HostShareRequest<'_>) -> Result<RelayedShard, Refusal>;
}
