//! The public area of a TPM ECC key (TPMT_PUBLIC, TPM 2.0 Part 2, 12.2.4), parsed strictly in
//! software, its TPM name, and the one shape a shard host's decrypt key must have. The CMS
//! checks a presented public area with this before it encrypts anything to the key; the TPM
//! side (`keyshard-tpm`) checks the keys it makes with the same function.
//!
//! ```text
//! type              u16   TPM_ALG_ECC 0x0023 (anything else is refused)
//! nameAlg           u16   TPM_ALG_ID
//! objectAttributes  u32   TPMA_OBJECT
//! authPolicy        TPM2B_DIGEST
//! parameters        TPMS_ECC_PARMS:
//!   symmetric       u16 alg; unless TPM_ALG_NULL: keyBits u16, mode u16
//!   scheme          u16 scheme; unless TPM_ALG_NULL: hashAlg u16 (ECDAA: then count u16)
//!   curveID         u16
//!   kdf             u16 scheme; unless TPM_ALG_NULL: hashAlg u16
//! unique            TPMS_ECC_POINT: x TPM2B, y TPM2B
//! ```
//!
//! The name of an object is nameAlg (u16, big-endian) || H_nameAlg(TPMT_PUBLIC); keyshard only
//! computes SHA-256 names.

use sha2::{Digest as _, Sha256};

use super::quote::AkPublic;
use super::spec::{
    TPM_ALG_ECC, TPM_ALG_ECDAA, TPM_ALG_ECDH, TPM_ALG_ECDSA, TPM_ALG_NULL, TPM_ALG_SHA256,
    TPM_ECC_NIST_P256, object_attr,
};
use super::wire::{Reader, WireError};

/// Bytes of a SHA-256 TPM name: the algorithm id (2) and the digest (32).
pub const NAME_LEN: usize = 34;
/// Bytes of an uncompressed SEC1 P-256 point: 0x04 || x || y.
pub const P256_POINT_LEN: usize = 65;

/// The attributes of a shard host's decrypt key, exactly: the private part is made in the
/// TPM and never leaves it (fixedTPM, fixedParent, sensitiveDataOrigin); it decrypts and
/// does not sign; it is not restricted, so TPM2_ECDH_ZGen accepts any point; its empty
/// password authorizes use (userWithAuth) and noDA keeps a wrong password from any caller
/// from locking the TPM's dictionary-attack counter against it.
pub const DECRYPT_KEY_ATTRIBUTES: u32 = object_attr::FIXED_TPM
    | object_attr::FIXED_PARENT
    | object_attr::SENSITIVE_DATA_ORIGIN
    | object_attr::USER_WITH_AUTH
    | object_attr::NO_DA
    | object_attr::DECRYPT;

/// The attributes of keyshard's attestation key, exactly: made in the TPM and bound to it,
/// restricted signing (it signs only what the TPM itself generated: quotes, certifications).
pub const ATTESTATION_KEY_ATTRIBUTES: u32 = object_attr::FIXED_TPM
    | object_attr::FIXED_PARENT
    | object_attr::SENSITIVE_DATA_ORIGIN
    | object_attr::USER_WITH_AUTH
    | object_attr::NO_DA
    | object_attr::RESTRICTED
    | object_attr::SIGN_ENCRYPT;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicError {
    #[error("public area: {0}")]
    Wire(#[from] WireError),
    #[error("public area of type {found:#06x}, not an ECC key (0x0023)")]
    NotEcc { found: u16 },
    #[error("the key's name algorithm is {found:#06x}, not SHA-256")]
    NameAlg { found: u16 },
    #[error("the key's curve is {found:#06x}, not NIST P-256")]
    Curve { found: u16 },
    #[error("the key's attribute {attribute} is {}, it must be {}", state(*present), state(!present))]
    Attribute {
        attribute: &'static str,
        present: bool,
    },
    #[error("the key has unnamed attribute bits {bits:#010x} set")]
    ReservedAttributes { bits: u32 },
    #[error("the key has an authorization policy; a decrypt key must have none")]
    AuthPolicy,
    #[error("the key's scheme is {scheme:#06x}/{hash:#06x}, not {expected} with SHA-256")]
    Scheme {
        expected: &'static str,
        scheme: u16,
        hash: u16,
    },
    #[error("the key has a symmetric algorithm {found:#06x}; a key that is not a parent has none")]
    Symmetric { found: u16 },
    #[error("the key has a KDF scheme {found:#06x}; keyshard's keys have none")]
    Kdf { found: u16 },
    #[error("the key's public point is not on P-256")]
    Point,
}

fn state(present: bool) -> &'static str {
    if present { "set" } else { "clear" }
}

pub type Result<T> = std::result::Result<T, PublicError>;

/// An algorithm with an optional hash, as the scheme and KDF fields carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgHash {
    pub alg: u16,
    /// TPM_ALG_NULL when `alg` is TPM_ALG_NULL.
    pub hash: u16,
}

/// A parsed ECC TPMT_PUBLIC, fields in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EccPublic {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    /// The symmetric algorithm (TPM_ALG_NULL for a key that is not a parent); key bits and
    /// mode when it is not null.
    pub symmetric: (u16, Option<(u16, u16)>),
    pub scheme: AlgHash,
    pub curve: u16,
    pub kdf: AlgHash,
    pub x: Vec<u8>,
    pub y: Vec<u8>,
}

impl EccPublic {
    /// Parses a whole TPMT_PUBLIC of an ECC key; trailing bytes are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let kind = r.u16("type")?;
        if kind != TPM_ALG_ECC {
            return Err(PublicError::NotEcc { found: kind });
        }
        let name_alg = r.u16("nameAlg")?;
        let attributes = r.u32("objectAttributes")?;
        let auth_policy = r.sized("authPolicy")?.to_vec();
        let sym_alg = r.u16("symmetric.algorithm")?;
        let symmetric = if sym_alg == TPM_ALG_NULL {
            (sym_alg, None)
        } else {
            let bits = r.u16("symmetric.keyBits")?;
            let mode = r.u16("symmetric.mode")?;
            (sym_alg, Some((bits, mode)))
        };
        let scheme = read_alg_hash(&mut r, "scheme")?;
        if scheme.alg == TPM_ALG_ECDAA {
            r.u16("scheme.count")?;
        }
        let curve = r.u16("curveID")?;
        let kdf = read_alg_hash(&mut r, "kdf")?;
        let x = r.sized("unique.x")?.to_vec();
        let y = r.sized("unique.y")?.to_vec();
        r.finish()?;
        Ok(Self {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            curve,
            kdf,
            x,
            y,
        })
    }

    /// The public point as uncompressed SEC1 (0x04 || x || y), if the curve is P-256 and
    /// the point is on it.
    pub fn p256_point(&self) -> Result<[u8; P256_POINT_LEN]> {
        if self.curve != TPM_ECC_NIST_P256 {
            return Err(PublicError::Curve { found: self.curve });
        }
        let mut sec1 = [0u8; P256_POINT_LEN];
        let (prefix, xy) = sec1.split_at_mut(1);
        prefix.copy_from_slice(&[0x04]);
        let (xs, ys) = xy.split_at_mut(32);
        super::quote::left_pad(xs, &self.x).ok_or(PublicError::Point)?;
        super::quote::left_pad(ys, &self.y).ok_or(PublicError::Point)?;
        p256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| PublicError::Point)?;
        Ok(sec1)
    }

    /// Checks that this is a shard host's decrypt key as `keyshard-tpm` makes them: SHA-256
    /// name, P-256 with the point on the curve, exactly [`DECRYPT_KEY_ATTRIBUTES`], no
    /// authorization policy, no symmetric algorithm, scheme ECDH with SHA-256, no KDF.
    /// Returns the public point (uncompressed SEC1).
    pub fn check_decrypt_key(&self) -> Result<[u8; P256_POINT_LEN]> {
        self.check_kind()?;
        check_attributes(self.attributes, DECRYPT_KEY_ATTRIBUTES)?;
        self.check_parameters(TPM_ALG_ECDH, "ECDH")
    }

    /// Checks that this is keyshard's attestation key as `keyshard-tpm` makes it: SHA-256
    /// name, P-256, exactly [`ATTESTATION_KEY_ATTRIBUTES`], no policy, no symmetric algorithm,
    /// ECDSA with SHA-256, no KDF. Returns the key, to check its signatures with.
    pub fn check_attestation_key(&self) -> Result<AkPublic> {
        self.check_kind()?;
        check_attributes(self.attributes, ATTESTATION_KEY_ATTRIBUTES)?;
        let point = self.check_parameters(TPM_ALG_ECDSA, "ECDSA")?;
        AkPublic::from_sec1(&point).map_err(|_| PublicError::Point)
    }

    /// Name algorithm and curve: a key of another kind says so before its attributes.
    fn check_kind(&self) -> Result<()> {
        if self.name_alg != TPM_ALG_SHA256 {
            return Err(PublicError::NameAlg {
                found: self.name_alg,
            });
        }
        if self.curve != TPM_ECC_NIST_P256 {
            return Err(PublicError::Curve { found: self.curve });
        }
        Ok(())
    }

    /// Policy, symmetric, scheme (`scheme` with SHA-256), KDF and point: what both key shapes
    /// check after the attributes.
    fn check_parameters(
        &self,
        scheme: u16,
        scheme_name: &'static str,
    ) -> Result<[u8; P256_POINT_LEN]> {
        if !self.auth_policy.is_empty() {
            return Err(PublicError::AuthPolicy);
        }
        if self.symmetric.0 != TPM_ALG_NULL {
            return Err(PublicError::Symmetric {
                found: self.symmetric.0,
            });
        }
        if self.scheme.alg != scheme || self.scheme.hash != TPM_ALG_SHA256 {
            return Err(PublicError::Scheme {
                expected: scheme_name,
                scheme: self.scheme.alg,
                hash: self.scheme.hash,
            });
        }
        if self.kdf.alg != TPM_ALG_NULL {
            return Err(PublicError::Kdf {
                found: self.kdf.alg,
            });
        }
        self.p256_point()
    }
}

/// An algorithm id, and its hash unless the id is TPM_ALG_NULL.
fn read_alg_hash(r: &mut Reader<'_>, field: &'static str) -> Result<AlgHash> {
    let alg = r.u16(field)?;
    let hash = if alg == TPM_ALG_NULL {
        TPM_ALG_NULL
    } else {
        r.u16(field)?
    };
    Ok(AlgHash { alg, hash })
}

/// `actual` must equal `expected`; the first differing named bit is reported.
fn check_attributes(actual: u32, expected: u32) -> Result<()> {
    let differ = actual ^ expected;
    if differ == 0 {
        return Ok(());
    }
    match object_attr::NAMED.iter().find(|(bit, _)| differ & bit != 0) {
        Some(&(bit, attribute)) => Err(PublicError::Attribute {
            attribute,
            present: actual & bit != 0,
        }),
        None => Err(PublicError::ReservedAttributes { bits: differ }),
    }
}

/// The TPM name of a public area whose name algorithm is SHA-256:
/// 0x000b || SHA-256(TPMT_PUBLIC). `public` must be the exact marshalled TPMT_PUBLIC.
pub fn sha256_name(public: &[u8]) -> [u8; NAME_LEN] {
    let mut name = [0u8; NAME_LEN];
    let (alg, digest) = name.split_at_mut(2);
    alg.copy_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    digest.copy_from_slice(&Sha256::digest(public));
    name
}

#[cfg(test)]
pub(crate) mod tests {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;

    use super::*;

    /// A decrypt key's public area as a TPM marshals it, with the point of the P-256 key
    /// whose secret scalar is all `seed` bytes.
    pub(crate) fn decrypt_key_public(seed: u8) -> Vec<u8> {
        encode(&sample(seed))
    }

    pub(crate) fn sample(seed: u8) -> EccPublic {
        let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
        let point = secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        EccPublic {
            name_alg: TPM_ALG_SHA256,
            attributes: DECRYPT_KEY_ATTRIBUTES,
            auth_policy: Vec::new(),
            symmetric: (TPM_ALG_NULL, None),
            scheme: AlgHash {
                alg: TPM_ALG_ECDH,
                hash: TPM_ALG_SHA256,
            },
            curve: TPM_ECC_NIST_P256,
            kdf: AlgHash {
                alg: TPM_ALG_NULL,
                hash: TPM_ALG_NULL,
            },
            x: point[1..33].to_vec(),
            y: point[33..].to_vec(),
        }
    }

    /// The inverse of [`EccPublic::parse`], for tests.
    pub(crate) fn encode(p: &EccPublic) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&TPM_ALG_ECC.to_be_bytes());
        out.extend_from_slice(&p.name_alg.to_be_bytes());
        out.extend_from_slice(&p.attributes.to_be_bytes());
        crate::tpm::wire::put_sized(&mut out, &p.auth_policy).unwrap();
        out.extend_from_slice(&p.symmetric.0.to_be_bytes());
        if let Some((bits, mode)) = p.symmetric.1 {
            out.extend_from_slice(&bits.to_be_bytes());
            out.extend_from_slice(&mode.to_be_bytes());
        }
        for (i, ah) in [p.scheme, p.kdf].iter().enumerate() {
            if i == 1 {
                out.extend_from_slice(&p.curve.to_be_bytes());
            }
            out.extend_from_slice(&ah.alg.to_be_bytes());
            if ah.alg != TPM_ALG_NULL {
                out.extend_from_slice(&ah.hash.to_be_bytes());
            }
        }
        crate::tpm::wire::put_sized(&mut out, &p.x).unwrap();
        crate::tpm::wire::put_sized(&mut out, &p.y).unwrap();
        out
    }

    #[test]
    fn a_decrypt_key_parses_and_passes_and_round_trips() {
        let bytes = decrypt_key_public(7);
        let parsed = EccPublic::parse(&bytes).unwrap();
        assert_eq!(parsed, sample(7));
        assert_eq!(encode(&parsed), bytes);
        let point = parsed.check_decrypt_key().unwrap();
        let expected = p256::SecretKey::from_slice(&[7; 32])
            .unwrap()
            .public_key()
            .to_encoded_point(false);
        let expected = expected.as_bytes();
        assert_eq!(&point[..], expected);
    }

    #[test]
    fn refuses_every_truncation_trailing_bytes_and_other_types() {
        let bytes = decrypt_key_public(7);
        for cut in 0..bytes.len() {
            assert!(EccPublic::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            EccPublic::parse(&long),
            Err(PublicError::Wire(WireError::Trailing { .. }))
        ));
        let mut rsa = bytes;
        rsa[1] = 0x01;
        assert_eq!(
            EccPublic::parse(&rsa),
            Err(PublicError::NotEcc { found: 0x0001 })
        );
    }

    #[test]
    fn each_deviation_from_the_decrypt_key_shape_is_named() {
        let check = |p: EccPublic| EccPublic::parse(&encode(&p)).unwrap().check_decrypt_key();
        let mut p = sample(1);
        p.attributes |= object_attr::SIGN_ENCRYPT;
        assert_eq!(
            check(p),
            Err(PublicError::Attribute {
                attribute: "sign",
                present: true
            })
        );
        let mut p = sample(1);
        p.attributes |= object_attr::RESTRICTED;
        assert_eq!(
            check(p),
            Err(PublicError::Attribute {
                attribute: "restricted",
                present: true
            })
        );
        let mut p = sample(1);
        p.attributes &= !object_attr::FIXED_TPM;
        let err = check(p).unwrap_err();
        assert_eq!(
            err,
            PublicError::Attribute {
                attribute: "fixedTPM",
                present: false
            }
        );
        assert_eq!(
            err.to_string(),
            "the key's attribute fixedTPM is clear, it must be set"
        );
        let mut p = sample(1);
        p.attributes &= !object_attr::SENSITIVE_DATA_ORIGIN;
        assert!(matches!(
            check(p),
            Err(PublicError::Attribute {
                attribute: "sensitiveDataOrigin",
                ..
            })
        ));
        let mut p = sample(1);
        p.attributes &= !object_attr::DECRYPT;
        assert!(matches!(
            check(p),
            Err(PublicError::Attribute {
                attribute: "decrypt",
                present: false
            })
        ));
        let mut p = sample(1);
        p.attributes |= 1 << 30;
        assert_eq!(
            check(p),
            Err(PublicError::ReservedAttributes { bits: 1 << 30 })
        );
        let mut p = sample(1);
        p.curve = 0x0004;
        assert_eq!(check(p), Err(PublicError::Curve { found: 0x0004 }));
        let mut p = sample(1);
        p.name_alg = 0x0004;
        assert_eq!(check(p), Err(PublicError::NameAlg { found: 0x0004 }));
        let mut p = sample(1);
        p.auth_policy = vec![0; 32];
        assert_eq!(check(p), Err(PublicError::AuthPolicy));
        let mut p = sample(1);
        p.symmetric = (0x0006, Some((128, 0x0043)));
        assert_eq!(check(p), Err(PublicError::Symmetric { found: 0x0006 }));
        let mut p = sample(1);
        p.scheme = AlgHash {
            alg: 0x0018,
            hash: TPM_ALG_SHA256,
        };
        assert!(matches!(check(p), Err(PublicError::Scheme { .. })));
        let mut p = sample(1);
        p.kdf = AlgHash {
            alg: 0x0020,
            hash: TPM_ALG_SHA256,
        };
        assert_eq!(check(p), Err(PublicError::Kdf { found: 0x0020 }));
        let mut p = sample(1);
        p.y[31] ^= 1;
        assert_eq!(check(p), Err(PublicError::Point));
    }

    #[test]
    fn an_attestation_key_passes_its_check_and_not_the_decrypt_key_check() {
        let mut p = sample(5);
        p.attributes = ATTESTATION_KEY_ATTRIBUTES;
        p.scheme = AlgHash {
            alg: TPM_ALG_ECDSA,
            hash: TPM_ALG_SHA256,
        };
        let ak = p.check_attestation_key().unwrap();
        assert_eq!(&ak.to_sec1()[1..33], &p.x[..]);
        assert!(matches!(
            p.check_decrypt_key(),
            Err(PublicError::Attribute {
                attribute: "restricted",
                present: true
            })
        ));
        assert!(matches!(
            sample(5).check_attestation_key(),
            Err(PublicError::Attribute {
                attribute: "restricted",
                present: false
            })
        ));
        p.scheme.alg = TPM_ALG_ECDH;
        assert!(matches!(
            p.check_attestation_key(),
            Err(PublicError::Scheme {
                expected: "ECDSA",
                ..
            })
        ));
    }

    #[test]
    fn the_name_is_the_algorithm_and_the_hash_of_the_exact_bytes() {
        let bytes = decrypt_key_public(3);
        let name = sha256_name(&bytes);
        assert_eq!(&name[..2], &[0x00, 0x0b]);
        assert_eq!(&name[2..], &Sha256::digest(&bytes)[..]);
        assert_ne!(sha256_name(&decrypt_key_public(4)), name);
    }
}
