//! The recovery code: a recovery share as text a person can write down and type back, like
//! BitLocker's recovery password or systemd-cryptenroll's recovery key.
//!
//! It carries what the state directory's fragments do not: the share index, the share's y
//! values and the dealer's signature. Everything else in the fragment (key id, epoch, deal id,
//! k/n, key check value) is taken from a `vhd` fragment of the same deal when the code is read
//! back, and the dealer's signature must then verify over the whole, so a code only fits the
//! deal it came from.
//!
//! | bytes   | field                                                  |
//! |---------|--------------------------------------------------------|
//! | 1       | code version, `1`                                      |
//! | 1       | share index                                            |
//! | 1..1024 | share                                                  |
//! | 64      | the dealer's Ed25519 signature over the fragment       |
//! | 4       | checksum: the first 4 bytes of SHA-256 of what precedes|
//!
//! The bytes are written in base32 (RFC 4648, no padding), in groups of four characters joined
//! by `-`. Reading ignores case, `-` and white space; a mistyped character fails the checksum.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fragment::{self, FragmentError, FragmentHeader, SIGNATURE_LEN, VerifiedFragment};
use crate::holder::{HolderClass, HolderId};
use crate::sharing::MAX_SECRET_LEN;

const CODE_VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 4;
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Characters per group.
pub const GROUP_LEN: usize = 4;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecoveryCodeError {
    #[error("the recovery code holds {0:?}, which is not one of A-Z and 2-7")]
    BadCharacter(char),
    #[error("the recovery code is {0} characters long, too short or too long to be one")]
    Length(usize),
    #[error("the recovery code's checksum does not match: a character is mistyped or missing")]
    Checksum,
    #[error("unknown recovery code version {0}")]
    Version(u8),
    #[error("not a recovery fragment: class {0}")]
    NotRecovery(HolderClass),
    #[error("the recovery share cannot be rebuilt into a fragment: {0}")]
    Fragment(#[from] FragmentError),
}

pub type Result<T> = std::result::Result<T, RecoveryCodeError>;

/// The recovery code of a recovery fragment, grouped (`ABCD-EFGH-...`).
pub fn encode(fragment: &VerifiedFragment) -> Result<Zeroizing<String>> {
    let class = fragment.header().class;
    if class != HolderClass::Recovery {
        return Err(RecoveryCodeError::NotRecovery(class));
    }
    let share = fragment.share().value();
    let signature = fragment
        .signature()
        .ok_or(FragmentError::Truncated { field: "signature" })?;
    let mut payload = Zeroizing::new(Vec::with_capacity(
        2 + share.len() + SIGNATURE_LEN + CHECKSUM_LEN,
    ));
    payload.push(CODE_VERSION);
    payload.push(fragment.header().index);
    payload.extend_from_slice(share);
    payload.extend_from_slice(&signature);
    let checksum = Sha256::digest(payload.as_slice());
    payload.extend_from_slice(checksum.get(..CHECKSUM_LEN).unwrap_or_default());
    Ok(group(&base32_encode(&payload)))
}

/// Reads a recovery code back into the recovery fragment's bytes, taking the other header
/// fields from `template` (a fragment of the same deal). The caller verifies the signature.
pub fn decode(text: &str, template: &FragmentHeader) -> Result<Zeroizing<Vec<u8>>> {
    let bytes = base32_decode(text)?;
    let min = 2 + 1 + SIGNATURE_LEN + CHECKSUM_LEN;
    let max = 2 + MAX_SECRET_LEN + SIGNATURE_LEN + CHECKSUM_LEN;
    if bytes.len() < min || bytes.len() > max {
        return Err(RecoveryCodeError::Length(text.len()));
    }
    let (body, checksum) = bytes
        .split_at_checked(bytes.len() - CHECKSUM_LEN)
        .ok_or(RecoveryCodeError::Length(text.len()))?;
    if Sha256::digest(body).get(..CHECKSUM_LEN) != Some(checksum) {
        return Err(RecoveryCodeError::Checksum);
    }
    let (&version, rest) = body
        .split_first()
        .ok_or(RecoveryCodeError::Length(text.len()))?;
    if version != CODE_VERSION {
        return Err(RecoveryCodeError::Version(version));
    }
    let (&index, rest) = rest
        .split_first()
        .ok_or(RecoveryCodeError::Length(text.len()))?;
    let (share, signature) = rest
        .split_last_chunk::<SIGNATURE_LEN>()
        .ok_or(RecoveryCodeError::Length(text.len()))?;
    let header = FragmentHeader {
        index,
        class: HolderClass::Recovery,
        holder_id: HolderId::numbered(HolderClass::Recovery, 1),
        ..template.clone()
    };
    Ok(fragment::assemble(&header, share, signature)?)
}

/// `ABCDEFGH...` as `ABCD-EFGH-...`, in a buffer sized up front (no copies left behind).
fn group(plain: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(plain.len() + plain.len() / GROUP_LEN));
    for (i, c) in plain.chars().enumerate() {
        if i > 0 && i % GROUP_LEN == 0 {
            out.push('-');
        }
        out.push(c);
    }
    out
}

fn base32_encode(bytes: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(bytes.len() * 8 / 5 + 1));
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    let mut push = |value: u32| {
        let c = usize::try_from(value & 31)
            .ok()
            .and_then(|i| ALPHABET.get(i))
            .map_or('A', |b| char::from(*b));
        out.push(c);
    };
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            push(buffer >> bits);
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        push(buffer << (5 - bits));
    }
    out
}

fn base32_decode(text: &str) -> Result<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() * 5 / 8 + 1));
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for c in text.chars() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        let upper = c.to_ascii_uppercase();
        let value = ALPHABET
            .iter()
            .position(|a| char::from(*a) == upper)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or(RecoveryCodeError::BadCharacter(c))?;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    // Padding bits at the end must be zero, so every code has one spelling.
    if buffer != 0 {
        return Err(RecoveryCodeError::Checksum);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dealer::{self, DealPlan, HolderSlot};
    use crate::holder::KeyId;
    use crate::keys;

    fn dealt() -> (ed25519_dalek::SigningKey, Vec<VerifiedFragment>) {
        let key = keys::generate().unwrap();
        let plan = DealPlan {
            key_id: KeyId::new("root").unwrap(),
            epoch: 1,
            k: 2,
            holders: HolderSlot::numbered(HolderClass::Vhd, 2)
                .chain(HolderSlot::numbered(HolderClass::Recovery, 1))
                .collect(),
        };
        let fragments = dealer::deal(&[0x42; 32], &plan, &key).unwrap();
        (key, fragments)
    }

    #[test]
    fn base32_round_trips_every_length() {
        for len in 0..40usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base32_encode(&bytes);
            assert_eq!(base32_decode(&text).unwrap().as_slice(), bytes.as_slice());
        }
        assert_eq!(base32_encode(b"foobar").as_str(), "MZXW6YTBOI");
    }

    #[test]
    fn item8_a_recovery_code_reads_back_into_the_signed_fragment() {
        let (key, fragments) = dealt();
        let recovery = &fragments[2];
        let code = encode(recovery).unwrap();
        assert!(code.split('-').all(|g| (1..=GROUP_LEN).contains(&g.len())));
        assert!(
            code.chars()
                .all(|c| c == '-' || ALPHABET.contains(&(c as u8)))
        );
        // A 32-byte key: 2 + 32 + 64 + 4 = 102 bytes, 164 characters in 41 groups.
        assert_eq!(code.split('-').count(), 41);
        // Typed back in lower case, on several lines, from a vhd fragment's header.
        let typed = code.to_lowercase().replace('-', " ").replacen(' ', "\n", 3);
        let bytes = decode(&typed, fragments[0].header()).unwrap();
        assert_eq!(bytes.as_slice(), recovery.encoded());
        let parsed = crate::Fragment::parse(&bytes).unwrap();
        assert!(parsed.verify(&key.verifying_key()).is_ok());
    }

    #[test]
    fn item8_mistyped_codes_and_other_deals_are_refused() {
        let (_, fragments) = dealt();
        let code = encode(&fragments[2]).unwrap();
        let template = fragments[0].header();
        // One character changed: the checksum catches it.
        let first = code.chars().next().unwrap();
        let swapped = if first == 'A' { 'B' } else { 'A' };
        let typo = format!("{swapped}{}", &code[1..]);
        assert_eq!(
            decode(&typo, template).unwrap_err(),
            RecoveryCodeError::Checksum
        );
        assert_eq!(
            decode(&code.replacen('-', "-1", 1), template).unwrap_err(),
            RecoveryCodeError::BadCharacter('1')
        );
        assert!(matches!(
            decode("ABCD-EFGH", template).unwrap_err(),
            RecoveryCodeError::Length(_)
        ));
        // Another deal's header: the fragment assembles, but its signature cannot verify.
        let (other_key, other) = dealt();
        let bytes = decode(&code, other[0].header()).unwrap();
        let parsed = crate::Fragment::parse(&bytes).unwrap();
        assert!(parsed.verify(&other_key.verifying_key()).is_err());
        assert!(matches!(
            encode(&fragments[0]),
            Err(RecoveryCodeError::NotRecovery(HolderClass::Vhd))
        ));
    }
}
