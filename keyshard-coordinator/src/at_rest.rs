//! Fragments of attested holders (`tpm`, `sev`) as the coordinator stores them: encrypted under a
//! 32-byte data key that is itself sealed to the TPM (a sealed object holds at most 128 bytes, a
//! fragment up to 1,237). Without the TPM releasing the data key, the file is noise.
//!
//! Layout: magic `KSSE` (4), version 1 (1), AES-256-GCM nonce (12), ciphertext with its tag.
//! The associated data is the holder id, so one holder's file cannot stand in for another's.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use keyshard_core::HolderId;
use keyshard_core::fragment::MAX_FRAGMENT_LEN;
use zeroize::Zeroizing;

const MAGIC: [u8; 4] = *b"KSSE";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
pub const DATA_KEY_LEN: usize = 32;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AtRestError {
    #[error("not an encrypted fragment (bad magic or version)")]
    Format,
    #[error("encrypted fragment is {0} bytes, outside the possible sizes")]
    Length(usize),
    #[error("the data key does not open it (another key, another holder, or tampered)")]
    Open,
    #[error("no randomness from the operating system")]
    Random,
}

pub type DataKey = Zeroizing<[u8; DATA_KEY_LEN]>;

pub fn new_data_key() -> Result<DataKey, AtRestError> {
    let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
    getrandom::fill(key.as_mut_slice()).map_err(|_| AtRestError::Random)?;
    Ok(key)
}

fn cipher(key: &DataKey) -> Result<Aes256Gcm, AtRestError> {
    Aes256Gcm::new_from_slice(key.as_slice()).map_err(|_| AtRestError::Open)
}

pub fn encrypt(key: &DataKey, holder: &HolderId, fragment: &[u8]) -> Result<Vec<u8>, AtRestError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| AtRestError::Random)?;
    let payload = Payload {
        msg: fragment,
        aad: holder.as_str().as_bytes(),
    };
    let ciphertext = cipher(key)?
        .encrypt(&nonce.into(), payload)
        .map_err(|_| AtRestError::Open)?;
    let mut out = Vec::with_capacity(5 + NONCE_LEN + ciphertext.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

pub fn decrypt(
    key: &DataKey,
    holder: &HolderId,
    stored: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
    let max = 5 + NONCE_LEN + MAX_FRAGMENT_LEN + TAG_LEN;
    if stored.len() < 5 + NONCE_LEN + TAG_LEN + 1 || stored.len() > max {
        return Err(AtRestError::Length(stored.len()));
    }
    let (header, rest) = stored.split_at_checked(5).ok_or(AtRestError::Format)?;
    if header.get(..4) != Some(&MAGIC[..]) || header.get(4) != Some(&VERSION) {
        return Err(AtRestError::Format);
    }
    let (nonce, ciphertext) = rest
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(AtRestError::Format)?;
    let payload = Payload {
        msg: ciphertext,
        aad: holder.as_str().as_bytes(),
    };
    cipher(key)?
        .decrypt(&(*nonce).into(), payload)
        .map(Zeroizing::new)
        .map_err(|_| AtRestError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(id: &str) -> HolderId {
        HolderId::new(id).unwrap()
    }

    #[test]
    fn round_trips_only_with_the_same_key_and_holder() {
        let key = new_data_key().unwrap();
        let stored = encrypt(&key, &holder("tpm-1"), b"fragment bytes").unwrap();
        assert_eq!(&stored[..5], b"KSSE\x01");
        assert!(!stored.windows(8).any(|w| w == b"fragment"));
        assert_eq!(
            decrypt(&key, &holder("tpm-1"), &stored).unwrap().as_slice(),
            b"fragment bytes"
        );
        assert_eq!(
            decrypt(&key, &holder("tpm-2"), &stored),
            Err(AtRestError::Open)
        );
        assert_eq!(
            decrypt(&new_data_key().unwrap(), &holder("tpm-1"), &stored),
            Err(AtRestError::Open)
        );
    }

    #[test]
    fn tampered_truncated_and_foreign_files_are_refused() {
        let key = new_data_key().unwrap();
        let stored = encrypt(&key, &holder("sev-1"), &[7; 100]).unwrap();
        for i in 5..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 1;
            assert_eq!(
                decrypt(&key, &holder("sev-1"), &bad),
                Err(AtRestError::Open),
                "byte {i}"
            );
        }
        let mut bad = stored.clone();
        bad[0] = b'X';
        assert_eq!(
            decrypt(&key, &holder("sev-1"), &bad),
            Err(AtRestError::Format)
        );
        assert_eq!(
            decrypt(&key, &holder("sev-1"), &stored[..20]),
            Err(AtRestError::Length(20))
        );
        assert!(matches!(
            decrypt(&key, &holder("sev-1"), &vec![0; 2000]),
            Err(AtRestError::Length(2000))
        ));
    }
}
