//! A shard host's decrypt key in its TPM as a [`SharedPointSource`]: the ECDH shared point of a
//! sealed shard's ephemeral key comes from TPM2_ECDH_ZGen, so the private key never leaves the
//! TPM (keyshard-tpm's [`DecryptKey`], driven through a [`TpmService`]).

use keyshard_shards::ecies::{EciesError, P256Point, SharedPoint, SharedPointSource};
use keyshard_tpm::{DecryptKey, TpmError, TpmService};

/// The host's TPM-resident P-256 decrypt key and the TPM that holds it.
#[derive(Debug, Clone)]
pub struct TpmDecryptKey {
    tpm: TpmService,
    key: DecryptKey,
    public: P256Point,
}

impl TpmDecryptKey {
    /// `key` must have been made by the TPM behind `tpm` (`create_decrypt_key`); another TPM
    /// cannot load it, and every shared point then fails with [`TpmError::ForeignKey`].
    pub fn new(tpm: TpmService, key: DecryptKey) -> Result<Self, EciesError> {
        let public = P256Point::from_uncompressed(key.point())?;
        Ok(Self { tpm, key, public })
    }

    /// The stored key (its public area and TPM name are what the host's certification names).
    pub fn decrypt_key(&self) -> &DecryptKey {
        &self.key
    }
}

impl SharedPointSource for TpmDecryptKey {
    type Error = TpmError;

    fn public_key(&self) -> P256Point {
        self.public
    }

    fn z_gen(&self, ephemeral: &P256Point) -> Result<SharedPoint, TpmError> {
        let point = self
            .tpm
            .ecdh_z_gen(&self.key, &ephemeral.to_uncompressed())?;
        SharedPoint::from_coordinates(point.x(), point.y()).map_err(|_| {
            TpmError::UnexpectedResponse {
                command: "ECDH_ZGen",
                what: "a point that is not on P-256",
            }
        })
    }
}
