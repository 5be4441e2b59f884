//! A shard host key held in memory: the test double for a TPM-resident decrypt key.
//!
//! Built only for this crate's tests and with the `testing` feature; a shard host keeps its key
//! in its TPM and computes the shared point with TPM2_ECDH_ZGen.

use p256::elliptic_curve::sec1::ToEncodedPoint;
use zeroize::Zeroizing;

use super::{COORDINATE_LEN, EciesError, P256Point, SharedPoint, SharedPointSource};

/// A P-256 decrypt key in memory; computes `h·E` the way TPM2_ECDH_ZGen does.
pub struct SoftwareHostKey {
    secret: p256::SecretKey,
    public: P256Point,
}

impl SoftwareHostKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, EciesError> {
        // A uniform 256-bit string is a valid scalar (nonzero, below the group order) with
        // probability 1 - 2^-32; eight draws all failing is not a practical outcome.
        for _ in 0..8 {
            let mut bytes = Zeroizing::new([0u8; COORDINATE_LEN]);
            getrandom::fill(bytes.as_mut_slice()).map_err(|_| EciesError::Ephemeral)?;
            if let Ok(key) = Self::from_scalar(&bytes) {
                return Ok(key);
            }
        }
        Err(EciesError::Ephemeral)
    }

    /// From a private scalar, 32 bytes big-endian, in 1..order.
    pub fn from_scalar(scalar: &[u8; COORDINATE_LEN]) -> Result<Self, EciesError> {
        let secret = p256::SecretKey::from_bytes(&(*scalar).into())
            .map_err(|_| EciesError::Point("not a valid private scalar"))?;
        let public = P256Point(secret.public_key());
        Ok(Self { secret, public })
    }
}

impl SharedPointSource for SoftwareHostKey {
    type Error = EciesError;

    fn public_key(&self) -> P256Point {
        self.public
    }

    fn z_gen(&self, ephemeral: &P256Point) -> Result<SharedPoint, EciesError> {
        let product = (ephemeral.as_public_key().to_projective()
            * *self.secret.to_nonzero_scalar())
        .to_affine();
        let encoded = product.to_encoded_point(false);
        match (encoded.x(), encoded.y()) {
            (Some(x), Some(y)) => SharedPoint::from_coordinates(x, y),
            _ => Err(EciesError::Agreement),
        }
    }
}

impl std::fmt::Debug for SoftwareHostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SoftwareHostKey(public {:?})", self.public)
    }
}
