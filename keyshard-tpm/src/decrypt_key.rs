//! A shard host's decrypt key in its stored form: the TPM object (public and private area) of
//! an ECC P-256 key made under the storage root key, which only that TPM can load again. Plain
//! code, tested without a TPM; [`crate::Tpm::create_decrypt_key`] makes one,
//! [`crate::Tpm::ecdh_z_gen`] and [`crate::Tpm::certify_decrypt_key`] use it.
//!
//! Why a stored blob and not a persistent handle: loading the blob under the SRK re-creates
//! the same key (same name, so its certification stays valid) at the cost of one TPM2_Load,
//! and it uses none of the TPM's few persistent slots, so a host can hold one key per epoch or
//! rotate keys without NV space. The private area is encrypted to the SRK, and fixedTPM +
//! fixedParent keep the key from being duplicated: a copied blob is useless anywhere else.
//!
//! Format (integers big-endian), as written by [`DecryptKey::to_bytes`]:
//!
//! ```text
//! offset  size   field
//! 0       4      magic "KSDK"
//! 4       1      version = 1
//! 5       2+P    TPM2B_PUBLIC: u16 P, then the marshalled TPMT_PUBLIC
//! ...     2+R    TPM2B_PRIVATE: u16 R, then the private area (encrypted to the SRK)
//! ```
//! Nothing may follow. The public area must be a decrypt key as
//! `keyshard_attest::tpm::EccPublic::check_decrypt_key` accepts it, the very check the CMS
//! makes on a certified key.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use keyshard_attest::tpm::public::{EccPublic, NAME_LEN, P256_POINT_LEN, PublicError, sha256_name};
use keyshard_attest::tpm::wire::{self, Reader, WireError};

const MAGIC: [u8; 4] = *b"KSDK";
const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptKeyError {
    #[error("not a keyshard decrypt key (bad magic)")]
    Magic,
    #[error("decrypt key version {0} is not supported")]
    Version(u8),
    #[error("decrypt key: {0}")]
    Wire(#[from] WireError),
    #[error("decrypt key: the public area is not a TPMT_PUBLIC")]
    Public,
    #[error("decrypt key: {0}")]
    Shape(#[from] PublicError),
    #[error("decrypt key: the private area ({0} bytes) is empty or too large")]
    Private(usize),
}

pub type Result<T> = std::result::Result<T, DecryptKeyError>;

/// A TPM-resident ECC P-256 decrypt key, as stored: holds no secret in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptKey {
    public: Vec<u8>,
    private: Vec<u8>,
    name: [u8; NAME_LEN],
    point: [u8; P256_POINT_LEN],
}

impl DecryptKey {
    /// From a TPM's Create output; checks the shape.
    pub(crate) fn from_tpm(public: &Public, private: &Private) -> Result<Self> {
        let public = public.marshall().map_err(|_| DecryptKeyError::Public)?;
        Self::new(public, private.value().to_vec())
    }

    fn new(public: Vec<u8>, private: Vec<u8>) -> Result<Self> {
        let point = EccPublic::parse(&public)?.check_decrypt_key()?;
        let name = sha256_name(&public);
        let key = Self {
            public,
            private,
            name,
            point,
        };
        key.tpm_parts()?;
        Ok(key)
    }

    /// The marshalled TPMT_PUBLIC: what the host presents with its certification, and what
    /// `keyshard_attest::tpm::verify_certification` checks.
    pub fn public_area(&self) -> &[u8] {
        &self.public
    }

    /// The key's TPM name: 0x000b || SHA-256(TPMT_PUBLIC).
    pub fn name(&self) -> &[u8; NAME_LEN] {
        &self.name
    }

    /// The public point, uncompressed SEC1 (0x04 || x || y).
    pub fn point(&self) -> &[u8; P256_POINT_LEN] {
        &self.point
    }

    /// The format described at the top of this module.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.public.len() + self.private.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        // Both areas were checked against TPM size limits (far below 64 KiB) on the way in.
        let _ = wire::put_sized(&mut out, &self.public);
        let _ = wire::put_sized(&mut out, &self.private);
        out
    }

    /// Parses and checks a stored key: structure, and that the public area is a decrypt key.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != MAGIC {
            return Err(DecryptKeyError::Magic);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecryptKeyError::Version(version));
        }
        let public = r.sized("TPM2B_PUBLIC")?.to_vec();
        let private = r.sized("TPM2B_PRIVATE")?.to_vec();
        r.finish()?;
        Self::new(public, private)
    }

    /// The public and private areas as tss-esapi structures, checked.
    pub(crate) fn tpm_parts(&self) -> Result<(Public, Private)> {
        let public = Public::unmarshall(&self.public).map_err(|_| DecryptKeyError::Public)?;
        // Unmarshalling ignores bytes after the structure: require the canonical encoding.
        if public.marshall().ok().as_deref() != Some(self.public.as_slice()) {
            return Err(DecryptKeyError::Public);
        }
        if self.private.is_empty() {
            return Err(DecryptKeyError::Private(0));
        }
        let private = Private::try_from(self.private.clone())
            .map_err(|_| DecryptKeyError::Private(self.private.len()))?;
        Ok((public, private))
    }
}

/// The template of a decrypt key: ECC P-256, ECDH with SHA-256, not restricted, no symmetric
/// algorithm (it is no parent), SHA-256 name, and the attributes of
/// `keyshard_attest::tpm::DECRYPT_KEY_ATTRIBUTES`.
pub(crate) fn template() -> std::result::Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_decrypt(true)
        .build()?;
    let params = PublicEccParametersBuilder::new()
        .with_ecc_scheme(EccScheme::EcDh(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_is_signing_key(false)
        .with_is_decryption_key(true)
        .with_restricted(false)
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

#[cfg(test)]
mod tests {
    use tss_esapi::structures::EccParameter;

    use super::*;

    /// The template with a real P-256 point in it, as the TPM returns it after Create.
    fn public_with_point() -> Public {
        let Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            ..
        } = template().unwrap()
        else {
            panic!("not ECC");
        };
        // The P-256 generator: a point on the curve.
        let x = hex_bytes("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296");
        let y = hex_bytes("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5");
        Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique: EccPoint::new(
                EccParameter::try_from(x).unwrap(),
                EccParameter::try_from(y).unwrap(),
            ),
        }
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key() -> DecryptKey {
        DecryptKey::from_tpm(
            &public_with_point(),
            &Private::try_from(vec![0x33; 120]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_template_is_what_the_verifier_accepts() {
        let k = key();
        assert_eq!(k.point()[0], 0x04);
        assert_eq!(&k.name()[..2], &[0, 0x0b]);
        let parsed = EccPublic::parse(k.public_area()).unwrap();
        assert_eq!(
            parsed.attributes,
            keyshard_attest::tpm::DECRYPT_KEY_ATTRIBUTES
        );
    }

    #[test]
    fn round_trips_and_refuses_truncation_trailing_and_tampering() {
        let k = key();
        let bytes = k.to_bytes();
        assert_eq!(&bytes[..5], b"KSDK\x01");
        assert_eq!(DecryptKey::parse(&bytes).unwrap(), k);
        for cut in 0..bytes.len() {
            assert!(DecryptKey::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            DecryptKey::parse(&long),
            Err(DecryptKeyError::Wire(WireError::Trailing { .. }))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(DecryptKey::parse(&bad), Err(DecryptKeyError::Magic));
        let mut bad = bytes.clone();
        bad[4] = 2;
        assert_eq!(DecryptKey::parse(&bad), Err(DecryptKeyError::Version(2)));
        // objectAttributes' third byte (bit 18 is sign): a signing key is refused.
        let mut bad = bytes;
        bad[5 + 2 + 2 + 2 + 1] |= 0x04;
        assert!(matches!(
            DecryptKey::parse(&bad),
            Err(DecryptKeyError::Shape(PublicError::Attribute {
                attribute: "sign",
                present: true
            }))
        ));
    }

    #[test]
    fn an_empty_private_area_is_refused() {
        assert_eq!(
            DecryptKey::from_tpm(&public_with_point(), &Private::default()),
            Err(DecryptKeyError::Private(0))
        );
    }
}
