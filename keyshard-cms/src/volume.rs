//! The `host` shares of a VM's volume key (issue 9 item 8): dealt and signed by `keyshard init`
//! with the VM's dealer key, placed and sealed by the CMS like a credential's shards, and
//! fetched by the VM as an instance, through the credential endpoints.
//!
//! A credential's shards are dealt by the CMS from the credential. A volume key's `host`
//! shares cannot be: they are points of the same polynomial as the VM's `vhd` and `tpm` shares,
//! signed by the VM's dealer key, which the guest trusts (not the CMS key). So `init` deals all
//! of them and sends the CMS its `host` fragments; [`put_volume_shares`]:
//!
//! 1. parses each fragment and verifies its signature under the dealer key the request names,
//!    and refuses any that is not of class `host`, not of this key, or of another deal, epoch,
//!    threshold or key check value than the first, and a share index given twice;
//! 2. stores them as the credential named by the volume's key id: fragment j (in share index
//!    order) is slot j of that credential, placed, sealed to its host's certified TPM key and
//!    recorded exactly as a put does ([`crate::credential`]); the map's key check value is the
//!    fragments' (the volume key's), and the map is sealed to the client key the request names;
//! 3. the instances the request names may fetch them (`POST /v1/credentials/{key id}/fetch`),
//!    and each shard host releases its slot to the instance's evidence under a CMS grant, as for
//!    any credential. The released bytes are the dealer-signed fragment: the guest checks it
//!    against the dealer key in its manifest and combines it with its other shares.
//!
//! The placement spreads the m shares so that no region or operator holds min(k, m) of them
//! (the map's threshold), unless correlated placement is allowed: one domain should not hold
//! every share the host cannot reach. At least 2 `host` shares are needed (a map's threshold
//! is 2..=n).
//!
//! The CMS sees the `host` fragments in the clear, once, as it sees a credential at put (and
//! wipes them when the put returns); it never sees the VM's other shares.

use std::time::SystemTime;

use ed25519_dalek::{SigningKey, VerifyingKey};
use keyshard_core::fragment::{Fragment, FragmentError, FragmentHeader};
use keyshard_core::{HolderClass, KeyId, Threshold, VerifiedFragment};
use keyshard_shards::map::ClientPublicKey;
use keyshard_shards::placement::PlacementSeed;
use zeroize::Zeroizing;

use crate::credential::{AdmittedInstance, CredentialError, PutReceipt, Sharing, place_seal_store};
use crate::registry::HostRegistry;
use crate::store::Repository;

/// The fewest `host` shares a volume key can place.
pub const MIN_HOST_SHARES: usize = 2;

/// What can go wrong placing a volume key's `host` shares. No variant carries share bytes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume key {key_id}: fragment {position}: {source}")]
    Fragment {
        key_id: KeyId,
        position: usize,
        source: FragmentError,
    },
    #[error("volume key {key_id}: fragment {position} is a {class} share, not a host share")]
    NotHostClass {
        key_id: KeyId,
        position: usize,
        class: HolderClass,
    },
    #[error("volume key {key_id}: fragment {position} belongs to key {other}")]
    OtherKey {
        key_id: KeyId,
        position: usize,
        other: KeyId,
    },
    #[error("volume key {key_id}: fragment {position} has another {field} than the first")]
    Mixed {
        key_id: KeyId,
        position: usize,
        field: &'static str,
    },
    #[error("volume key {key_id}: share index {index} is given twice")]
    DuplicateIndex { key_id: KeyId, index: u8 },
    #[error(
        "volume key {key_id}: {count} host share(s); shard hosts hold at least {MIN_HOST_SHARES}"
    )]
    TooFew { key_id: KeyId, count: usize },
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// Result of volume share operations.
pub type Result<T> = std::result::Result<T, VolumeError>;

/// What to place. Its `Debug` shows the fragments' count only.
#[derive(Clone, Copy)]
pub struct VolumeSharesRequest<'a> {
    /// The volume key's id: the name the shares are stored and fetched under.
    pub key_id: &'a KeyId,
    /// The VM's dealer key, which signed the fragments.
    pub dealer: &'a VerifyingKey,
    /// The encoded `host` fragments, any order.
    pub fragments: &'a [Zeroizing<Vec<u8>>],
    /// Whom the shard map is sealed to.
    pub client: &'a ClientPublicKey,
    pub seed: PlacementSeed,
    /// Place even when a region or operator would hold min(k, m) shares.
    pub allow_correlated: bool,
    /// The instances (the VM) that may fetch the shares.
    pub instances: &'a [AdmittedInstance],
}

impl std::fmt::Debug for VolumeSharesRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSharesRequest")
            .field("key_id", self.key_id)
            .field(
                "fragments",
                &format_args!("({} fragments)", self.fragments.len()),
            )
            .field("client", self.client)
            .field("seed", &self.seed)
            .field("allow_correlated", &self.allow_correlated)
            .field("instances", &self.instances)
            .finish()
    }
}

/// Checks and places a volume key's `host` shares (module documentation), at `now`.
pub async fn put_volume_shares<R: Repository>(
    store: &R,
    registry: &HostRegistry,
    cms: &SigningKey,
    request: &VolumeSharesRequest<'_>,
    now: SystemTime,
) -> Result<PutReceipt> {
    let fragments = verify_fragments(request)?;
    let first = fragments
        .first()
        .map(VerifiedFragment::header)
        .ok_or_else(|| VolumeError::TooFew {
            key_id: request.key_id.clone(),
            count: 0,
        })?;
    let too_few = || VolumeError::TooFew {
        key_id: request.key_id.clone(),
        count: fragments.len(),
    };
    let m = u8::try_from(fragments.len()).map_err(|_| too_few())?;
    let k = first.threshold.k().min(m);
    let threshold = Threshold::new(k, m).map_err(|_| too_few())?;
    let sharing = Sharing {
        name: request.key_id,
        threshold,
        client: request.client,
        seed: request.seed,
        allow_correlated: request.allow_correlated,
        instances: request.instances,
    };
    sharing.check(store).await?;
    // Slot j holds the j-th fragment in share index order.
    let payloads: Vec<(u8, &[u8])> = (1..=u8::MAX)
        .zip(fragments.iter().map(VerifiedFragment::encoded))
        .collect();
    let receipt =
        place_seal_store(store, registry, cms, &sharing, &payloads, first.kcv, now).await?;
    Ok(receipt)
}

/// Step 1: the fragments verified, of one deal, in share index order.
fn verify_fragments(request: &VolumeSharesRequest<'_>) -> Result<Vec<VerifiedFragment>> {
    let key_id = request.key_id;
    let mut verified: Vec<VerifiedFragment> = Vec::with_capacity(request.fragments.len());
    for (position, bytes) in (1..).zip(request.fragments) {
        let fragment_error = |source| VolumeError::Fragment {
            key_id: key_id.clone(),
            position,
            source,
        };
        let fragment = Fragment::parse(bytes)
            .and_then(|f| f.verify(request.dealer))
            .map_err(fragment_error)?;
        let header = fragment.header();
        if header.class != HolderClass::Host {
            return Err(VolumeError::NotHostClass {
                key_id: key_id.clone(),
                position,
                class: header.class,
            });
        }
        if &header.key_id != key_id {
            return Err(VolumeError::OtherKey {
                key_id: key_id.clone(),
                position,
                other: header.key_id.clone(),
            });
        }
        if let Some(field) = verified
            .first()
            .and_then(|first| differs(first.header(), header))
        {
            return Err(VolumeError::Mixed {
                key_id: key_id.clone(),
                position,
                field,
            });
        }
        if verified.iter().any(|f| f.header().index == header.index) {
            return Err(VolumeError::DuplicateIndex {
                key_id: key_id.clone(),
                index: header.index,
            });
        }
        verified.push(fragment);
    }
    if verified.len() < MIN_HOST_SHARES {
        return Err(VolumeError::TooFew {
            key_id: key_id.clone(),
            count: verified.len(),
        });
    }
    verified.sort_by_key(|f| f.header().index);
    Ok(verified)
}

/// The first field in which two fragments of what should be one deal differ.
fn differs(first: &FragmentHeader, other: &FragmentHeader) -> Option<&'static str> {
    if first.epoch != other.epoch {
        Some("epoch")
    } else if first.deal != other.deal {
        Some("deal")
    } else if first.threshold != other.threshold {
        Some("threshold")
    } else if first.kcv != other.kcv {
        Some("key check value")
    } else {
        None
    }
}
