//! TPM2_MakeCredential in software (TPM 2.0 Part 1, 24 "Credential Protection"; Part 3,
//! MakeCredential): what the CMS, which has no TPM, sends a host at enrolment. The credential
//! comes back only if the TPM that holds the EK also holds a key with the given name: the
//! host's ActivateCredential proves that its attestation key and its EK live in one TPM.
//!
//! For an RSA EK with the TCG default template (nameAlg SHA-256, AES-128 CFB):
//!
//! ```text
//! seed        32 random bytes (the size of a SHA-256 digest)
//! secret      RSA-OAEP(EK, SHA-256, MGF1-SHA-256, label "IDENTITY\0", seed)
//! symKey      KDFa(SHA-256, seed, "STORAGE", name, "", 128)
//! encIdentity AES-128-CFB(symKey, IV = 0, u16 size || credential)   (a TPM2B_DIGEST)
//! hmacKey     KDFa(SHA-256, seed, "INTEGRITY", "", "", 256)
//! outerHMAC   HMAC-SHA-256(hmacKey, encIdentity || name)
//! idObject    u16 32 || outerHMAC || encIdentity                    (TPM2B_ID_OBJECT's body)
//! ```
//!
//! KDFa (Part 1, 11.4.10.2): for i = 1, 2, ...: HMAC(key, u32 i || label || 0x00 || contextU
//! || contextV || u32 bits), concatenated and cut to `bits`. RSA and AES come from aws-lc-rs
//! (the `rsa` crate of the workspace is on digest 0.10 and cannot take `sha2` 0.11), KDFa and
//! the HMAC from the RustCrypto `hmac` and `sha2` crates.

use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::public::NAME_LEN;
use super::spec::TPM_ALG_SHA256;

/// The OAEP label of a credential's seed: "IDENTITY" with its terminating NUL.
pub const IDENTITY_LABEL: &[u8] = b"IDENTITY\0";
/// Largest credential a TPM2B_DIGEST holds with a SHA-256 name algorithm... and the most
/// ActivateCredential returns: the size of the largest digest the TPM supports (64).
pub const MAX_CREDENTIAL_LEN: usize = 64;
/// Bytes of the seed: the size of a SHA-256 digest, the EK's name algorithm.
const SEED_LEN: usize = 32;
/// AES-128: the default EK template's symmetric algorithm.
const SYM_KEY_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the endorsement key is not an RSA public key (SubjectPublicKeyInfo) aws-lc-rs takes")]
    EkKey,
    #[error("the endorsement key is {bits} bits: only RSA 2048 EKs are supported")]
    EkSize { bits: usize },
    #[error("a credential of {len} bytes: 1 to 64 bytes")]
    CredentialLength { len: usize },
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
    /// The body of the TPM2B_ID_OBJECT: u16 32 || outerHMAC || encIdentity.
    pub id_object: Vec<u8>,
    /// The body of the TPM2B_ENCRYPTED_SECRET: the RSA-OAEP ciphertext of the seed.
    pub encrypted_secret: Vec<u8>,
}

/// MakeCredential to the RSA 2048 EK `ek_spki` (X.509 SubjectPublicKeyInfo DER, as in the EK
/// certificate) for the object named `name` (SHA-256 TPM name of the attestation key):
/// `credential` comes back from ActivateCredential only in the TPM that holds that EK and a
/// loaded object of that name.
pub fn make_credential(ek_spki: &[u8], name: &[u8], credential: &[u8]) -> Result<MadeCredential> {
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    aws_lc_rs::rand::fill(&mut seed[..]).map_err(|_| CredentialError::Random)?;
    let ek = rsa_ek(ek_spki)?;
    check_inputs(name, credential)?;
    let mut ciphertext = vec![0u8; ek.ciphertext_size()];
    let encrypted_secret = ek
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            &seed[..],
            &mut ciphertext,
            Some(IDENTITY_LABEL),
        )
        .map_err(|_| CredentialError::Crypto("RSA-OAEP"))?
        .to_vec();
    let id_object = protect(&seed, name, credential)?;
    Ok(MadeCredential {
        id_object,
        encrypted_secret,
    })
}

fn rsa_ek(ek_spki: &[u8]) -> Result<OaepPublicEncryptingKey> {
    let key = PublicEncryptingKey::from_der(ek_spki).map_err(|_| CredentialError::EkKey)?;
    let bits = key.key_size_bits();
    if bits != 2048 {
        return Err(CredentialError::EkSize { bits });
    }
    OaepPublicEncryptingKey::new(key).map_err(|_| CredentialError::EkKey)
}

fn check_inputs(name: &[u8], credential: &[u8]) -> Result<()> {
    if name.len() != NAME_LEN || name.get(..2) != Some(&TPM_ALG_SHA256.to_be_bytes()[..]) {
        return Err(CredentialError::Name);
    }
    if credential.is_empty() || credential.len() > MAX_CREDENTIAL_LEN {
        return Err(CredentialError::CredentialLength {
            len: credential.len(),
        });
    }
    Ok(())
}

/// The TPM2B_ID_OBJECT body for `seed`: the credential encrypted and integrity-protected
/// with keys derived from the seed and bound to `name`.
fn protect(seed: &[u8; SEED_LEN], name: &[u8], credential: &[u8]) -> Result<Vec<u8>> {
    check_inputs(name, credential)?;
    let sym_key = kdfa(seed, b"STORAGE", name, &[], SYM_KEY_LEN)?;
    let len = u16::try_from(credential.len()).map_err(|_| CredentialError::CredentialLength {
        len: credential.len(),
    })?;
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&len.to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let key = UnboundCipherKey::new(&AES_128, &sym_key[..])
        .and_then(EncryptingKey::cfb128)
        .map_err(|_| CredentialError::Crypto("AES-128-CFB"))?;
    key.less_safe_encrypt(
        &mut enc_identity,
        EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
    )
    .map_err(|_| CredentialError::Crypto("AES-128-CFB"))?;
    let hmac_key = kdfa(seed, b"INTEGRITY", &[], &[], 32)?;
    let mut mac = hmac_sha256(&hmac_key)?;
    mac.update(&enc_identity);
    mac.update(name);
    let outer = mac.finalize().into_bytes();
    let mut id_object = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    id_object.extend_from_slice(&32u16.to_be_bytes());
    id_object.extend_from_slice(&outer);
    id_object.extend_from_slice(&enc_identity);
    Ok(id_object)
}

fn hmac_sha256(key: &[u8]) -> Result<Hmac<Sha256>> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).map_err(|_| CredentialError::Crypto("HMAC"))
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
    let bits = len
        .checked_mul(8)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or(CredentialError::Crypto("KDFa"))?;
    let mut out = Zeroizing::new(Vec::with_capacity(len.saturating_add(32)));
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut mac = hmac_sha256(key)?;
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
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
        let mut mac = hmac_sha256(&hmac_key).unwrap();
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

    #[test]
    fn kdfa_counts_blocks_and_binds_every_input() {
        let a = kdfa(b"key", b"STORAGE", b"u", b"v", 16).unwrap();
        assert_eq!(a.len(), 16);
        // One HMAC block computed by hand: counter 1, label, NUL, contexts, 128 bits.
        let mut mac = hmac_sha256(b"key").unwrap();
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
            Err(CredentialError::CredentialLength { len: 0 })
        );
        assert_eq!(
            make_credential(&spki, &name(1), &[0; 65]),
            Err(CredentialError::CredentialLength { len: 65 })
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
