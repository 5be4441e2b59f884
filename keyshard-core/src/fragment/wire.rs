//! The byte layout of fragment format v2, and its strict parser.
//!
//! All integers are little-endian. Offsets after the key id depend on its length.
//!
//! | field         | size       | meaning                                                      |
//! |---------------|------------|--------------------------------------------------------------|
//! | magic         | 4          | `KSHF`                                                       |
//! | version       | 1          | 2 (1, from before deal ids, is refused with its own error)   |
//! | holder class  | 1          | 1 `vhd`, 2 `tpm`, 3 `sev`, 4 `host`, 5 `recovery`            |
//! | k             | 1          | threshold, 2..=n                                             |
//! | n             | 1          | number of shares in this epoch                               |
//! | share index   | 1          | the share's x coordinate, 1..=n                              |
//! | epoch         | 8          | sharing epoch; rotation makes a new one                      |
//! | deal id       | 16         | random, drawn once per split; fragments of one deal share it |
//! | key id length | 1          | 1..=64                                                       |
//! | key id        | 1..=64     | ASCII `A-Z a-z 0-9 . _ -`                                    |
//! | holder length | 1          | 1..=16                                                       |
//! | holder id     | 1..=16     | ASCII `a-z 0-9 . _ -`                                        |
//! | share length  | 2          | 1..=1024, the secret's length                                |
//! | share         | share len  | the share's y values, one per secret byte                    |
//! | key check     | 32         | HMAC-SHA-256 key check value of the secret (see `kcv`)       |
//! | signature     | 64         | Ed25519 signature by the dealer over every byte before it    |
//!
//! Nothing may follow the signature.

use zeroize::Zeroizing;

use super::{DealId, FragmentError, FragmentHeader, Result};
use crate::bytes::Reader;
use crate::holder::{HolderClass, HolderId, KeyId, MAX_HOLDER_ID_LEN, MAX_KEY_ID_LEN};
use crate::kcv::{KCV_LEN, KeyCheckValue};
use crate::sharing::{MAX_SECRET_LEN, Threshold};

pub const MAGIC: [u8; 4] = *b"KSHF";
pub const VERSION: u8 = 2;
/// The format version before deal ids; refused with [`FragmentError::VersionWithoutDealId`].
const VERSION_WITHOUT_DEAL_ID: u8 = 1;
pub const DEAL_ID_LEN: usize = 16;
pub const SIGNATURE_LEN: usize = 64;
/// The largest valid fragment: every variable field at its maximum.
pub const MAX_FRAGMENT_LEN: usize = 4
    + 1
    + 1
    + 1
    + 1
    + 1
    + 8
    + DEAL_ID_LEN
    + 1
    + MAX_KEY_ID_LEN
    + 1
    + MAX_HOLDER_ID_LEN
    + 2
    + MAX_SECRET_LEN
    + KCV_LEN
    + SIGNATURE_LEN;

/// What a successful parse yields: the header, the share bytes, and where the signed part ends.
pub(super) struct Parsed {
    pub header: FragmentHeader,
    pub share: Zeroizing<Vec<u8>>,
    pub signed_len: usize,
    pub signature: [u8; SIGNATURE_LEN],
}

pub(super) fn parse(bytes: &[u8]) -> Result<Parsed> {
    if bytes.len() > MAX_FRAGMENT_LEN {
        return Err(FragmentError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAGMENT_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    if r.array::<4>("magic")? != MAGIC {
        return Err(FragmentError::BadMagic);
    }
    let version = r.u8("version")?;
    if version == VERSION_WITHOUT_DEAL_ID {
        return Err(FragmentError::VersionWithoutDealId);
    }
    if version != VERSION {
        return Err(FragmentError::UnsupportedVersion { version });
    }
    let code = r.u8("holder class")?;
    let class = HolderClass::from_code(code).ok_or(FragmentError::UnknownHolderClass { code })?;
    let k = r.u8("k")?;
    let n = r.u8("n")?;
    let threshold = Threshold::new(k, n).map_err(FragmentError::BadThreshold)?;
    let index = r.u8("share index")?;
    if index == 0 || index > n {
        return Err(FragmentError::BadShareIndex { index, n });
    }
    let epoch = r.u64("epoch")?;
    let deal = DealId::from_bytes(r.array("deal id")?);
    let key_id = KeyId::new(r.short_str("key id")?).map_err(FragmentError::BadKeyId)?;
    let holder_id = HolderId::new(r.short_str("holder id")?).map_err(FragmentError::BadHolderId)?;
    let share_len = usize::from(r.u16("share length")?);
    if share_len == 0 || share_len > MAX_SECRET_LEN {
        return Err(FragmentError::BadShareLength { len: share_len });
    }
    let share = Zeroizing::new(r.take(share_len, "share")?.to_vec());
    let kcv = KeyCheckValue::from_bytes(r.array("key check value")?);
    let signed_len = r.position();
    let signature = r.array("signature")?;
    let extra = r.remaining();
    if extra != 0 {
        return Err(FragmentError::TrailingBytes { extra });
    }
    Ok(Parsed {
        header: FragmentHeader {
            key_id,
            epoch,
            deal,
            index,
            threshold,
            class,
            holder_id,
            kcv,
        },
        share,
        signed_len,
        signature,
    })
}

/// The signed part of a fragment: every field but the signature.
pub(super) fn encode_signed_part(
    header: &FragmentHeader,
    share: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let share_len = u16::try_from(share.len())
        .ok()
        .filter(|len| (1..=MAX_SECRET_LEN).contains(&usize::from(*len)))
        .ok_or(FragmentError::BadShareLength { len: share.len() })?;
    let key_id = header.key_id.as_str().as_bytes();
    let holder_id = header.holder_id.as_str().as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(MAX_FRAGMENT_LEN));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.class.code());
    out.push(header.threshold.k());
    out.push(header.threshold.n());
    out.push(header.index);
    out.extend_from_slice(&header.epoch.to_le_bytes());
    out.extend_from_slice(header.deal.as_bytes());
    // The id constructors bound both lengths far below 256, so `as u8` cannot truncate.
    out.push(key_id.len() as u8);
    out.extend_from_slice(key_id);
    out.push(holder_id.len() as u8);
    out.extend_from_slice(holder_id);
    out.extend_from_slice(&share_len.to_le_bytes());
    out.extend_from_slice(share);
    out.extend_from_slice(header.kcv.as_bytes());
    Ok(out)
}
