//! A shard host's release: the step between a compute instance's request and the shard it gets.
//!
//! The caller first spends the nonce the evidence answers, in this host's nonce book
//! ([`nonces::MemoryNonceBook::consume`] or [`nonces::take_from_store`]: issued here, not used,
//! not expired), before the evidence is looked at, so a refused request cannot be retried with
//! it; that gives the [`nonces::SpentNonce`] a release requires. (The HTTPS service checks the
//! request's CMS grant before it spends the nonce, so only granted requests fill the book.) Then, given the sealed shard (`KSSE`,
//! from the store) for (credential, epoch, index, this host), the instance's evidence and the
//! instance policy the CMS registered, [`ShardHost::release`]:
//!
//! 1. checks that the evidence answers the spent nonce;
//! 2. verifies the evidence ([`keyshard_shards::instance::verify`]: the registered AK signed a
//!    quote over the golden PCRs whose qualifying data binds that nonce and the instance's
//!    ephemeral key);
//! 3. opens the sealed shard with this host's TPM-held decrypt key (TPM2_ECDH_ZGen through
//!    [`tpm_key::TpmDecryptKey`]) under the binding (credential, epoch, index, this host): a
//!    shard sealed to another host, or for another index, epoch or credential, does not open;
//! 4. seals the shard with HPKE to the ephemeral key the verified quote binds, under the same
//!    binding ([`keyshard_shards::instance::answer`]), and zeroizes the plaintext.
//!
//! The plaintext shard is in this process's memory between steps 3 and 4 only (tens of
//! microseconds; [`Released::plaintext_held`] says how long). Root on the host can read it
//! there, and can ask the TPM for ZGen with the host's key: a shard host protects against
//! theft of its state and of the store, not against its own root. That is why a credential
//! needs k hosts in different failure domains.
//!
//! The HTTPS service in front of it, which a grant from the CMS (`keyshard_shards::grant`)
//! tells which instance policy and sealed shard a release is for, is [`server`].

pub mod nonces;
pub mod server;
pub mod tpm_key;

use std::time::{Duration, Instant};

use keyshard_core::KeyId;
use keyshard_shards::HostId;
use keyshard_shards::ecies::{self, EciesError, SealedShard, ShardBinding, SharedPointSource};
use keyshard_shards::instance::answer::AnswerError;
use keyshard_shards::instance::{
    InstanceEvidence, InstancePolicy, ReleasedShard, VerifyError, verify,
};

use nonces::SpentNonce;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("refused: the instance's evidence does not verify: {0}")]
    Evidence(#[from] VerifyError),
    #[error("this host cannot open the shard: {0}")]
    Shard(#[source] EciesError),
    #[error("the shard cannot be sealed to the instance: {0}")]
    Answer(#[from] AnswerError),
}

pub type Result<T> = std::result::Result<T, ReleaseError>;

/// What an instance asks a shard host for: one shard, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRequest {
    pub credential: KeyId,
    pub epoch: u64,
    /// The share index, 1..=n, as the shard map names it for this host.
    pub index: u8,
    pub evidence: InstanceEvidence,
}

/// A release: the shard sealed to the instance, and how long its plaintext was in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub shard: ReleasedShard,
    /// From the moment the shard was decrypted to the moment its plaintext was zeroized.
    pub plaintext_held: Duration,
}

/// A shard host: its id and its decrypt key (the TPM in production).
pub struct ShardHost<K> {
    id: HostId,
    key: K,
}

impl<K: SharedPointSource> ShardHost<K> {
    pub fn new(id: HostId, key: K) -> Self {
        Self { id, key }
    }

    pub fn id(&self) -> &HostId {
        &self.id
    }

    /// The decrypt key's holder (what the CMS sealed this host's shards to).
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Releases the shard `sealed` (this host's shard for the request's credential, epoch and
    /// index, as stored) to the instance that made `request.evidence`, if it answers `spent`
    /// and verifies against `policy`. The steps and what each refuses are in the module
    /// documentation. `policy` must be the one the CMS registered for an instance that the
    /// credential's instance policy admits: which instances may fetch what is the CMS's
    /// decision, not checked here.
    pub fn release(
        &self,
        request: &ShardRequest,
        sealed: &SealedShard,
        policy: &InstancePolicy,
        spent: SpentNonce,
    ) -> Result<Released> {
        let result = self.release_inner(request, sealed, policy, &spent);
        match &result {
            Ok(released) => log::info!(
                "released shard {} of {} epoch {} (plaintext held {:?})",
                request.index,
                request.credential,
                request.epoch,
                released.plaintext_held
            ),
            Err(e) => log::error!(
                "refused shard {} of {} epoch {}: {e}",
                request.index,
                request.credential,
                request.epoch
            ),
        }
        result
    }

    fn release_inner(
        &self,
        request: &ShardRequest,
        sealed: &SealedShard,
        policy: &InstancePolicy,
        spent: &SpentNonce,
    ) -> Result<Released> {
        let instance = verify(&request.evidence, policy, spent.nonce())?;
        let binding = ShardBinding {
            credential: request.credential.clone(),
            epoch: request.epoch,
            index: request.index,
            host: self.id.clone(),
        };
        let plaintext = ecies::open(&self.key, &binding, sealed).map_err(ReleaseError::Shard)?;
        let decrypted = Instant::now();
        let shard = ReleasedShard::seal(&instance, &binding, &plaintext);
        drop(plaintext);
        let plaintext_held = decrypted.elapsed();
        Ok(Released {
            shard: shard?,
            plaintext_held,
        })
    }
}

impl<K> std::fmt::Debug for ShardHost<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHost")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
