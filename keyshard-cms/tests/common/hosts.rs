//! Shard hosts for the tests, each with its own swtpm: its AK and its TPM-resident decrypt key,
//! a registration as a shard host makes it (TPM2_Certify over the CMS's challenge), and the
//! opening of a sealed shard in its TPM (TPM2_ECDH_ZGen). Shared by keyshard-cms's
//! `credential_put` test and keyshard's CMS tests; the including crate declares the
//! workspace's swtpm launcher as its root module `swtpm`. Hosts that register over the CMS's
//! API enrol first: they start with EK certificates ([`ShardHost::start_with_ek_certificates`]).

use std::num::NonZeroU32;
use std::sync::Mutex;

use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::registry::HostRegistration;
use keyshard_core::policy::PcrBank;
use keyshard_shards::ecies::{self, EciesError, P256Point, SharedPoint, SharedPointSource};
use keyshard_shards::map::Endpoint;
use keyshard_shards::{DomainName, FailureDomain, HostId};
use keyshard_tpm::{DecryptKey, Tpm};
use zeroize::Zeroizing;

use crate::swtpm::Swtpm;

/// The lab's six hosts: (id, region, operator).
pub const HOSTS: [(&str, &str, &str); 6] = [
    ("host-1", "eu", "acme"),
    ("host-2", "eu", "globex"),
    ("host-3", "us", "acme"),
    ("host-4", "us", "globex"),
    ("host-5", "ap", "acme"),
    ("host-6", "ap", "globex"),
];

/// One shard host: its own TPM with its decrypt key.
pub struct ShardHost {
    pub id: HostId,
    pub tpm: Mutex<Tpm>,
    pub key: DecryptKey,
    // Dropped last: swtpm outlives the TPM context.
    _swtpm: Swtpm,
}

/// Held while one swtpm starts and is opened. The harness checks that a port pair is free,
/// then starts swtpm on it and waits for its control port to answer; two launches racing for
/// one pair can both see "ready" (the winner's port answers) while the loser exits, and then
/// two hosts share one TPM, which serves one connection at a time. The tests of this file
/// start up to 50 swtpms at once, so they take turns.
static SWTPM_START: Mutex<()> = Mutex::new(());

impl ShardHost {
    /// A host on a fresh swtpm without EK certificates: enough for the registry's library
    /// (which takes the AK it is handed); the CMS's API wants enrolled hosts, see
    /// [`ShardHost::start_with_ek_certificates`].
    pub fn start(id: &str) -> Self {
        let turn = SWTPM_START.lock().unwrap_or_else(|e| e.into_inner());
        let swtpm = Swtpm::start();
        Self::with_swtpm(id, swtpm, turn)
    }

    /// A host whose swtpm was manufactured by swtpm_setup with EK certificates from the local
    /// CA in `ca` (made by the first TPM of that directory): it can enrol with a CMS whose
    /// `--ek-ca` holds that CA's certificates.
    pub fn start_with_ek_certificates(id: &str, ca: &std::path::Path) -> Self {
        let turn = SWTPM_START.lock().unwrap_or_else(|e| e.into_inner());
        let swtpm = Swtpm::start_with_ek_certificates(ca);
        Self::with_swtpm(id, swtpm, turn)
    }

    fn with_swtpm(id: &str, swtpm: Swtpm, turn: std::sync::MutexGuard<'_, ()>) -> Self {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        drop(turn);
        let key = tpm.create_decrypt_key().unwrap();
        Self {
            id: HostId::new(id).unwrap(),
            tpm: Mutex::new(tpm),
            key,
            _swtpm: swtpm,
        }
    }

    /// A registration answering `nonce`, as a shard host makes it: TPM2_Certify of its decrypt
    /// key by its AK, and its current PCRs 0 and 7 as golden values.
    pub fn registration(
        &self,
        nonce: keyshard_cms::store::Nonce,
        region: &str,
        operator: &str,
    ) -> HostRegistration {
        let mut tpm = self.tpm.lock().unwrap();
        let certification = tpm
            .certify_decrypt_key(&self.key, nonce.as_bytes())
            .unwrap();
        let golden = tpm
            .read_pcrs(&PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap())
            .unwrap();
        HostRegistration {
            id: self.id.clone(),
            domain: FailureDomain {
                region: DomainName::new(region).unwrap(),
                operator: DomainName::new(operator).unwrap(),
            },
            endpoint: Endpoint::new(format!("https://{}.invalid:8443", self.id)).unwrap(),
            weight: NonZeroU32::new(1).unwrap(),
            ak: tpm.ak_public().clone(),
            golden_pcrs: golden,
            decrypt_key_public: self.key.public_area().to_vec(),
            certification,
            nonce,
        }
    }

    /// Opens a sealed shard in this host's TPM under `binding`.
    pub fn open(
        &self,
        binding: &ecies::ShardBinding,
        sealed: &ecies::SealedShard,
    ) -> Result<Zeroizing<Vec<u8>>, EciesError> {
        ecies::open(self, binding, sealed)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("TPM2_ECDH_ZGen: {0}")]
pub struct ZGenFailed(String);

/// The host's TPM as the shard-opening side of the ECIES: TPM2_ECDH_ZGen.
impl SharedPointSource for ShardHost {
    type Error = ZGenFailed;

    fn public_key(&self) -> P256Point {
        P256Point::from_uncompressed(self.key.point()).unwrap()
    }

    fn z_gen(&self, ephemeral: &P256Point) -> Result<SharedPoint, ZGenFailed> {
        let point = self
            .tpm
            .lock()
            .unwrap()
            .ecdh_z_gen(&self.key, &ephemeral.to_uncompressed())
            .map_err(|e| ZGenFailed(e.to_string()))?;
        SharedPoint::from_coordinates(point.x(), point.y()).map_err(|e| ZGenFailed(e.to_string()))
    }
}
