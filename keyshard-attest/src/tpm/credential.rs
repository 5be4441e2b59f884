//! TPM2_MakeCredential in software (TPM 2.0 Part 1, 24 "Credential Protection"; Part 3,
//! MakeCredential): what the CMS, which has no TPM, sends a host at enrolment. The credential
//! comes back only if the TPM that holds the EK also holds a key with the given name: the
//! host's ActivateCredential proves that its attestation key and its EK live in one TPM.
//!
//! The EK's template (TCG EK Credential Profile) fixes its name algorithm H and symmetric
//! algorithm: RSA 2048 (template L-1) and ECC P-256 (L-2) use SHA-256 and AES-128 CFB, ECC
//! P-384 (H-3, what swtpm_setup makes) SHA-384 and AES-256 CFB.
//!
//! ```text
//! seed        RSA: |H| random bytes, secret = RSA-OAEP(EK, H, MGF1-H, label "IDENTITY\0")
//!             ECC: an ephemeral key e on the EK's curve, Z = x(e * EK),
//!                  seed = KDFe(H, Z, "IDENTITY", x(e*G), x(EK), |H| * 8),
//!                  secret = TPMS_ECC_POINT of e*G (TPM2B x, TPM2B y)
//! symKey      KDFa(H, seed, "STORAGE", name, "", AES key bits)
//! encIdentity AES-CFB(symKey, IV = 0, u16 size || credential)   (a TPM2B_DIGEST)
//! hmacKey     KDFa(H, seed, "INTEGRITY", "", "", |H| * 8)
//! outerHMAC   HMAC-H(hmacKey, encIdentity || name)
//! idObject    u16 |H| || outerHMAC || encIdentity              (TPM2B_ID_OBJECT's body)
//! ```
//!
//! KDFa (Part 1, 11.4.10.2): for i = 1, 2, ...: HMAC(key, u32 i || label || 0x00 || contextU
//! || contextV || u32 bits), concatenated and cut to `bits`. KDFe (11.4.10.3): for i = 1, 2,
//! ...: H(u32 i || Z || label || 0x00 || partyU || partyV). RSA, ECDH and AES come from
//! aws-lc-rs (the `rsa` crate of the workspace is on digest 0.10 and cannot take `sha2` 0.11),
//! KDFa, KDFe and the HMAC from the RustCrypto `hmac` and `sha2` crates.

use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{
    OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384, OaepPublicEncryptingKey, PublicEncryptingKey,
};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest as _, Sha256, Sha384};
use x509_cert::der::Decode as _;
use x509_cert::der::asn1::ObjectIdentifier as Oid;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use zeroize::Zeroizing;

use super::public::NAME_LEN;
use super::spec::TPM_ALG_SHA256;

const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
const P384: Oid = Oid::new_unwrap("1.3.132.0.34");

/// Which endorsement key a credential is made to: the kinds of the TCG default EK templates
/// keyshard supports. The host's TPM activates with the EK of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EkKind {
    /// RSA 2048, template L-1: SHA-256, AES-128 CFB; certificate at NV 0x01c00002.
    Rsa2048,
    /// ECC NIST P-256, template L-2: SHA-256, AES-128 CFB; certificate at NV 0x01c0000a.
    EccP256,
    /// ECC NIST P-384, template H-3: SHA-384, AES-256 CFB; certificate at NV 0x01c00016.
    EccP384,
}

/// The hash of an EK's name algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    fn len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }

    /// HMAC over the concatenation of `parts`.
    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
            let mut mac =
                <M as KeyInit>::new_from_slice(key).map_err(|_| CredentialError::Crypto("HMAC"))?;
            for part in parts {
                mac.update(part);
            }
            Ok(mac.finalize().into_bytes().to_vec())
        }
        match self {
            Self::Sha256 => run::<Hmac<Sha256>>(key, parts),
            Self::Sha384 => run::<Hmac<Sha384>>(key, parts),
        }
    }

    /// The hash of the concatenation of `parts`.
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Sha256 => parts
                .iter()
                .fold(Sha256::new(), |h, p| h.chain_update(p))
                .finalize()
                .to_vec(),
            Self::Sha384 => parts
                .iter()
                .fold(Sha384::new(), |h, p| h.chain_update(p))
                .finalize()
                .to_vec(),
        }
    }
}

impl EkKind {
    fn hash(self) -> Hash {
        match self {
            Self::Rsa2048 | Self::EccP256 => Hash::Sha256,
            Self::EccP384 => Hash::Sha384,
        }
    }

    fn aes(self) -> &'static aws_lc_rs::cipher::Algorithm {
        match self {
            Self::Rsa2048 | Self::EccP256 => &AES_128,
            Self::EccP384 => &AES_256,
        }
    }

    fn aes_key_len(self) -> usize {
        match self {
            Self::Rsa2048 | Self::EccP256 => 16,
            Self::EccP384 => 32,
        }
    }
}

/// The OAEP label of a credential's seed: "IDENTITY" with its terminating NUL.
pub const IDENTITY_LABEL: &[u8] = b"IDENTITY\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "the endorsement key is not an RSA 2048, ECC P-256 or ECC P-384 public key \
         (SubjectPublicKeyInfo)"
    )]
    EkKey,
    #[error("the endorsement key is {bits} bits: only RSA 2048 EKs are supported")]
    EkSize { bits: usize },
    #[error("a credential of {len} bytes: 1 to {max} bytes (the size of the EK's name hash)")]
    CredentialLength { len: usize, max: usize },
    #[error("the key name is not a SHA-256 TPM name (34 bytes, 0x000b first)")]
    Name,
    #[error("no randomness for the seed")]
    Random,
    #[error("{0} failed in aws-lc-rs")]
    Crypto(&'static str),
}

pub type Result<T> = std::result::Result<T, CredentialError>;

/// What TPM2_MakeCredential returns, ready for the host's TPM2_ActivateCredential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// The EK it was made to: the host activates with its EK of this kind.
    pub ek: EkKind,
    /// The body of the TPM2B_ID_OBJECT: u16 |H| || outerHMAC || encIdentity.
    pub id_object: Vec<u8>,
    /// The body of the TPM2B_ENCRYPTED_SECRET: the RSA-OAEP ciphertext of the seed, or the
    /// ephemeral ECC point (TPMS_ECC_POINT).
    pub encrypted_secret: Vec<u8>,
}

/// MakeCredential to the EK `ek_spki` (X.509 SubjectPublicKeyInfo DER, as in the EK
/// certificate: RSA 2048, ECC P-256 or ECC P-384) for the object named `name` (SHA-256 TPM name
/// of the attestation key): `credential` comes back from ActivateCredential only in the TPM
/// that holds that EK and a loaded object of that name.
pub fn make_credential(ek_spki: &[u8], name: &[u8], credential: &[u8]) -> Result<MadeCredential> {
    check_name(name)?;
    let spki = SubjectPublicKeyInfoOwned::from_der(ek_spki).map_err(|_| CredentialError::EkKey)?;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<Oid>().ok());
    let (ek, (seed, encrypted_secret)) = match (spki.algorithm.oid, curve) {
        (RSA_ENCRYPTION, _) => (EkKind::Rsa2048, rsa_seed(ek_spki)?),
        (EC_PUBLIC_KEY, Some(P256)) => {
            let point = spki.subject_public_key.raw_bytes();
            (EkKind::EccP256, ecc_seed(EkKind::EccP256, point)?)
        }
        (EC_PUBLIC_KEY, Some(P384)) => {
            let point = spki.subject_public_key.raw_bytes();
            (EkKind::EccP384, ecc_seed(EkKind::EccP384, point)?)
        }
        _ => return Err(CredentialError::EkKey),
    };
    let id_object = protect(ek, &seed, name, credential)?;
    Ok(MadeCredential {
        ek,
        id_object,
        encrypted_secret,
    })
}

/// A random seed of |SHA-256| bytes and its RSA-OAEP ciphertext (label "IDENTITY\0").
fn rsa_seed(ek_spki: &[u8]) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let hash = EkKind::Rsa2048.hash();
    let mut seed = Zeroizing::new(vec![0u8; hash.len()]);
    aws_lc_rs::rand::fill(&mut seed[..]).map_err(|_| CredentialError::Random)?;
    let ek = rsa_ek(ek_spki)?;
    let oaep = match hash {
        Hash::Sha256 => &OAEP_SHA256_MGF1SHA256,
        Hash::Sha384 => &OAEP_SHA384_MGF1SHA384,
    };
    let mut ciphertext = vec![0u8; ek.ciphertext_size()];
    let encrypted = ek
        .encrypt(oaep, &seed[..], &mut ciphertext, Some(IDENTITY_LABEL))
        .map_err(|_| CredentialError::Crypto("RSA-OAEP"))?
        .to_vec();
    Ok((seed, encrypted))
}

/// The seed from an ephemeral ECDH with the EK's point (uncompressed SEC1), and the
/// ephemeral public point as a TPMS_ECC_POINT.
fn ecc_seed(kind: EkKind, ek_point: &[u8]) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let (alg, coord) = match kind {
        EkKind::EccP256 => (&agreement::ECDH_P256, 32),
        EkKind::EccP384 => (&agreement::ECDH_P384, 48),
        EkKind::Rsa2048 => return Err(CredentialError::EkKey),
    };
    let ek_x = ek_point
        .get(1..1 + coord)
        .filter(|_| ek_point.len() == 1 + 2 * coord && ek_point.first() == Some(&0x04))
        .ok_or(CredentialError::EkKey)?;
    let ephemeral = EphemeralPrivateKey::generate(alg, &aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| CredentialError::Random)?;
    let public = ephemeral
        .compute_public_key()
        .map_err(|_| CredentialError::Crypto("ECDH"))?;
    let public = public.as_ref();
    let (eph_x, eph_y) = public
        .get(1..)
        .and_then(|xy| xy.split_at_checked(coord))
        .ok_or(CredentialError::Crypto("ECDH"))?;
    let hash = kind.hash();
    let seed = agreement::agree_ephemeral(
        ephemeral,
        UnparsedPublicKey::new(alg, ek_point),
        CredentialError::EkKey,
        |z| Ok(kdfe(hash, z, b"IDENTITY", eph_x, ek_x, hash.len())),
    )?;
    let mut point = Vec::with_capacity(4 + 2 * coord);
    for c in [eph_x, eph_y] {
        let len = u16::try_from(c.len()).map_err(|_| CredentialError::Crypto("ECDH"))?;
        point.extend_from_slice(&len.to_be_bytes());
        point.extend_from_slice(c);
    }
    Ok((seed, point))
}

/// KDFe (TPM 2.0 Part 1, 11.4.10.3): `len` bytes from the shared x-coordinate `z`.
fn kdfe(
    hash: Hash,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(len.saturating_add(hash.len())));
    let mut counter: u32 = 1;
    while out.len() < len {
        let block = hash.digest(&[&counter.to_be_bytes(), z, label, &[0], party_u, party_v]);
        out.extend_from_slice(&block);
        counter = counter.saturating_add(1);
    }
    out.truncate(len);
    out
}

fn rsa_ek(ek_spki: &[u8]) -> Result<OaepPublicEncryptingKey> {
    let key = PublicEncryptingKey::from_der(ek_spki).map_err(|_| CredentialError::EkKey)?;
    let bits = key.key_size_bits();
    if bits != 2048 {
        return Err(CredentialError::EkSize { bits });
    }
    OaepPublicEncryptingKey::new(key).map_err(|_| CredentialError::EkKey)
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() != NAME_LEN || name.get(..2) != Some(&TPM_ALG_SHA256.to_be_bytes()[..]) {
        return Err(CredentialError::Name);
    }
    Ok(())
}

/// The TPM2B_ID_OBJECT body for `seed`: the credential encrypted and integrity-protected
/// with keys derived from the seed (with the EK's hash and AES) and bound to `name`.
fn protect(ek: EkKind, seed: &[u8], name: &[u8], credential: &[u8]) -> Result<Vec<u8>> {
    check_name(name)?;
    let hash = ek.hash();
    // MakeCredential refuses a credential longer than the EK's name hash (TPM_RC_SIZE).
    if credential.is_empty() || credential.len() > hash.len() {
        return Err(CredentialError::CredentialLength {
            len: credential.len(),
            max: hash.len(),
        });
    }
    let sym_key = kdfa_with(hash, seed, b"STORAGE", name, &[], ek.aes_key_len())?;
    let len = u16::try_from(credential.len()).map_err(|_| CredentialError::Crypto("length"))?;
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&len.to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let key = UnboundCipherKey::new(ek.aes(), &sym_key[..])
        .and_then(EncryptingKey::cfb128)
        .map_err(|_| CredentialError::Crypto("AES-CFB"))?;
    key.less_safe_encrypt(
        &mut enc_identity,
        EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
    )
    .map_err(|_| CredentialError::Crypto("AES-CFB"))?;
    let hmac_key = kdfa_with(hash, seed, b"INTEGRITY", &[], &[], hash.len())?;
    let outer = hash.hmac(&hmac_key, &[&enc_identity, name])?;
    let outer_len = u16::try_from(outer.len()).map_err(|_| CredentialError::Crypto("HMAC"))?;
    let mut id_object = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    id_object.extend_from_slice(&outer_len.to_be_bytes());
    id_object.extend_from_slice(&outer);
    id_object.extend_from_slice(&enc_identity);
    Ok(id_object)
}

/// KDFa with SHA-256 (TPM 2.0 Part 1, 11.4.10.2): `len` bytes from `key`, `label` (without its
/// NUL, which is added), `context_u` and `context_v`.
pub fn kdfa(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>> {
    kdfa_with(Hash::Sha256, key, label, context_u, context_v, len)
}

fn kdfa_with(
    hash: Hash,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>> {
    let bits = len
        .checked_mul(8)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or(CredentialError::Crypto("KDFa"))?;
    let mut out = Zeroizing::new(Vec::with_capacity(len.saturating_add(hash.len())));
    let mut counter: u32 = 1;
    while out.len() < len {
        let block = hash.hmac(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        )?;
        out.extend_from_slice(&block);
        counter = counter
            .checked_add(1)
            .ok_or(CredentialError::Crypto("KDFa"))?;
    }
    out.truncate(len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::cipher::{DecryptingKey, DecryptionContext};
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};

    use super::*;

    fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap()
    }

    fn name(byte: u8) -> Vec<u8> {
        let mut n = vec![0x00, 0x0b];
        n.extend_from_slice(&[byte; 32]);
        n
    }

    /// ActivateCredential as the TPM does it, in software, with the EK's private key.
    fn activate(ek: &PrivateDecryptingKey, made: &MadeCredential, name: &[u8]) -> Option<Vec<u8>> {
        let oaep = OaepPrivateDecryptingKey::new(ek.clone()).unwrap();
        let mut buf = vec![0u8; oaep.min_output_size()];
        let seed = oaep
            .decrypt(
                &OAEP_SHA256_MGF1SHA256,
                &made.encrypted_secret,
                &mut buf,
                Some(IDENTITY_LABEL),
            )
            .ok()?
            .to_vec();
        let (size, rest) = made.id_object.split_at(2);
        assert_eq!(size, [0, 32]);
        let (outer, enc) = rest.split_at(32);
        let hmac_key = kdfa(&seed, b"INTEGRITY", &[], &[], 32).unwrap();
        let mut mac = hmac_sha256(&hmac_key);
        mac.update(enc);
        mac.update(name);
        mac.verify_slice(outer).ok()?;
        let sym = kdfa(&seed, b"STORAGE", name, &[], 16).unwrap();
        let key = DecryptingKey::cfb128(UnboundCipherKey::new(&AES_128, &sym).unwrap()).unwrap();
        let mut plain = enc.to_vec();
        key.decrypt(
            &mut plain,
            DecryptionContext::Iv128(FixedLength::from([0u8; 16])),
        )
        .unwrap();
        let len = usize::from(u16::from_be_bytes([plain[0], plain[1]]));
        Some(plain[2..2 + len].to_vec())
    }

    fn ek() -> (PrivateDecryptingKey, Vec<u8>) {
        let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let spki = private.public_key().as_der().unwrap().as_ref().to_vec();
        (private, spki)
    }

    #[test]
    fn a_credential_comes_back_for_the_right_name_only() {
        let (private, spki) = ek();
        let made = make_credential(&spki, &name(1), b"enrolment secret").unwrap();
        assert_eq!(made.encrypted_secret.len(), 256);
        assert_eq!(made.id_object.len(), 2 + 32 + 2 + 16);
        assert_eq!(
            activate(&private, &made, &name(1)).as_deref(),
            Some(&b"enrolment secret"[..])
        );
        assert_eq!(activate(&private, &made, &name(2)), None);
        // A fresh seed each time.
        let again = make_credential(&spki, &name(1), b"enrolment secret").unwrap();
        assert_ne!(again.id_object, made.id_object);
    }

    /// ActivateCredential for an ECC EK, in software.
    fn activate_ecc(
        kind: EkKind,
        ek: &agreement::PrivateKey,
        made: &MadeCredential,
        name: &[u8],
    ) -> Option<Vec<u8>> {
        let (alg, coord) = match kind {
            EkKind::EccP256 => (&agreement::ECDH_P256, 32),
            _ => (&agreement::ECDH_P384, 48),
        };
        let (hash, aes) = (kind.hash(), kind.aes());
        let size = u16::try_from(coord).unwrap().to_be_bytes();
        let (xl, rest) = made.encrypted_secret.split_at(2);
        assert_eq!(xl, size);
        let (x, rest) = rest.split_at(coord);
        let (yl, y) = rest.split_at(2);
        assert_eq!((yl, y.len()), (&size[..], coord));
        let point = [&[0x04][..], x, y].concat();
        let ek_public = ek.compute_public_key().unwrap();
        let ek_x = &ek_public.as_ref()[1..1 + coord];
        let seed = agreement::agree(ek, UnparsedPublicKey::new(alg, &point), (), |z| {
            Ok(kdfe(hash, z, b"IDENTITY", x, ek_x, hash.len()))
        })
        .unwrap();
        let (size, rest) = made.id_object.split_at(2);
        assert_eq!(
            usize::from(u16::from_be_bytes([size[0], size[1]])),
            hash.len()
        );
        let (outer, enc) = rest.split_at(hash.len());
        let hmac_key = kdfa_with(hash, &seed, b"INTEGRITY", &[], &[], hash.len()).unwrap();
        if hash.hmac(&hmac_key, &[enc, name]).unwrap() != outer {
            return None;
        }
        let sym = kdfa_with(hash, &seed, b"STORAGE", name, &[], kind.aes_key_len()).unwrap();
        let key = DecryptingKey::cfb128(UnboundCipherKey::new(aes, &sym).unwrap()).unwrap();
        let mut plain = enc.to_vec();
        key.decrypt(
            &mut plain,
            DecryptionContext::Iv128(FixedLength::from([0u8; 16])),
        )
        .unwrap();
        let len = usize::from(u16::from_be_bytes([plain[0], plain[1]]));
        Some(plain[2..2 + len].to_vec())
    }

    fn ec_spki(curve: Oid, point: &[u8]) -> Vec<u8> {
        use x509_cert::der::Encode as _;
        use x509_cert::der::asn1::{Any, BitString};
        use x509_cert::spki::AlgorithmIdentifierOwned;
        SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: EC_PUBLIC_KEY,
                parameters: Some(Any::from(&curve)),
            },
            subject_public_key: BitString::from_bytes(point).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    #[test]
    fn ecc_credentials_come_back_for_the_right_name_only() {
        for (kind, alg, curve) in [
            (EkKind::EccP256, &agreement::ECDH_P256, P256),
            (EkKind::EccP384, &agreement::ECDH_P384, P384),
        ] {
            let ek = agreement::PrivateKey::generate(alg).unwrap();
            let point = ek.compute_public_key().unwrap().as_ref().to_vec();
            let spki = ec_spki(curve, &point);
            let made = make_credential(&spki, &name(1), b"enrolment secret").unwrap();
            assert_eq!(made.ek, kind);
            assert_eq!(
                activate_ecc(kind, &ek, &made, &name(1)).as_deref(),
                Some(&b"enrolment secret"[..]),
                "{kind:?}"
            );
            assert_eq!(activate_ecc(kind, &ek, &made, &name(2)), None, "{kind:?}");
            // A point off the curve is no EK.
            let mut off = point.clone();
            *off.last_mut().unwrap() ^= 1;
            assert_eq!(
                make_credential(&ec_spki(curve, &off), &name(1), b"x"),
                Err(CredentialError::EkKey),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn kdfa_counts_blocks_and_binds_every_input() {
        let a = kdfa(b"key", b"STORAGE", b"u", b"v", 16).unwrap();
        assert_eq!(a.len(), 16);
        // One HMAC block computed by hand: counter 1, label, NUL, contexts, 128 bits.
        let mut mac = hmac_sha256(b"key");
        mac.update(&[0, 0, 0, 1]);
        mac.update(b"STORAGE\0uv");
        mac.update(&128u32.to_be_bytes());
        assert_eq!(&a[..], &mac.finalize().into_bytes()[..16]);
        let long = kdfa(b"key", b"STORAGE", b"u", b"v", 40).unwrap();
        assert_eq!(long.len(), 40);
        assert_ne!(&long[..16], &a[..], "the length is bound in");
        assert_ne!(kdfa(b"key", b"INTEGRITY", b"u", b"v", 16).unwrap(), a);
        assert_ne!(kdfa(b"key", b"STORAGE", b"x", b"v", 16).unwrap(), a);
        assert_ne!(kdfa(b"kez", b"STORAGE", b"u", b"v", 16).unwrap(), a);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (_, spki) = ek();
        assert_eq!(
            make_credential(&spki, &name(1)[..33], b"x"),
            Err(CredentialError::Name)
        );
        let mut sha1_name = name(1);
        sha1_name[1] = 0x04;
        assert_eq!(
            make_credential(&spki, &sha1_name, b"x"),
            Err(CredentialError::Name)
        );
        assert_eq!(
            make_credential(&spki, &name(1), &[]),
            Err(CredentialError::CredentialLength { len: 0, max: 32 })
        );
        assert_eq!(
            make_credential(&spki, &name(1), &[0; 33]),
            Err(CredentialError::CredentialLength { len: 33, max: 32 })
        );
        assert_eq!(
            make_credential(b"not a key", &name(1), b"x"),
            Err(CredentialError::EkKey)
        );
        let big = PrivateDecryptingKey::generate(KeySize::Rsa3072).unwrap();
        let spki = big.public_key().as_der().unwrap().as_ref().to_vec();
        assert_eq!(
            make_credential(&spki, &name(1), b"x"),
            Err(CredentialError::EkSize { bits: 3072 })
        );
    }
}
