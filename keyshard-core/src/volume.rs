//! The fragment volume: the bytes a fragment device serves, holding one or more fragments.
//!
//! Layout (integers little-endian), padded with zeros to a multiple of 512 bytes:
//!
//! | offset | size | field                                                      |
//! |--------|------|------------------------------------------------------------|
//! | 0      | 4    | magic `KSHV`                                               |
//! | 4      | 1    | version, 1                                                 |
//! | 5      | 1    | fragment count, 1..=[`MAX_FRAGMENTS_PER_VOLUME`]           |
//! | 6      | 2    | reserved, 0                                                |
//! | 8      | ...  | per fragment: length (2 bytes, 1..=MAX_FRAGMENT_LEN), bytes |
//! | ...    | ...  | zeros up to the capacity                                   |
//!
//! The volume only frames fragments; each fragment is verified on its own by its signature, so
//! a device that serves a bad volume costs its own fragments and nothing else.

use crate::fragment::MAX_FRAGMENT_LEN;

pub const VOLUME_MAGIC: [u8; 4] = *b"KSHV";
pub const VOLUME_VERSION: u8 = 1;
pub const SECTOR_SIZE: usize = 512;
/// Enough for several keys and a rotation in progress on one device.
pub const MAX_FRAGMENTS_PER_VOLUME: usize = 32;
const HEADER_LEN: usize = 8;
/// The largest valid volume, rounded up to whole sectors: a reader never needs to read more.
pub const MAX_VOLUME_LEN: usize = (HEADER_LEN + MAX_FRAGMENTS_PER_VOLUME * (2 + MAX_FRAGMENT_LEN))
    .div_ceil(SECTOR_SIZE)
    * SECTOR_SIZE;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("a fragment volume holds 1 to {MAX_FRAGMENTS_PER_VOLUME} fragments, not {count}")]
    FragmentCount { count: usize },
    #[error("fragment {index} is {len} bytes; fragments are 1 to {MAX_FRAGMENT_LEN} bytes")]
    FragmentLength { index: usize, len: usize },
    #[error("volume is {len} bytes, larger than any valid volume ({MAX_VOLUME_LEN})")]
    TooLarge { len: usize },
    #[error("not a keyshard fragment volume (bad magic)")]
    BadMagic,
    #[error("unsupported fragment volume version {version}")]
    UnsupportedVersion { version: u8 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("volume is truncated inside fragment {index}")]
    Truncated { index: usize },
    #[error("non-zero bytes after the last fragment")]
    TrailingData,
}

pub type Result<T> = std::result::Result<T, VolumeError>;

/// Lays out `fragments` as a volume, zero-padded to whole sectors.
pub fn encode<B: AsRef<[u8]>>(fragments: &[B]) -> Result<Vec<u8>> {
    let count = fragments.len();
    if count == 0 || count > MAX_FRAGMENTS_PER_VOLUME {
        return Err(VolumeError::FragmentCount { count });
    }
    let mut out = Vec::with_capacity(MAX_VOLUME_LEN);
    out.extend_from_slice(&VOLUME_MAGIC);
    out.push(VOLUME_VERSION);
    out.push(count as u8); // bounded by MAX_FRAGMENTS_PER_VOLUME above
    out.extend_from_slice(&[0, 0]);
    for (index, fragment) in fragments.iter().enumerate() {
        let bytes = fragment.as_ref();
        let len = u16::try_from(bytes.len())
            .ok()
            .filter(|len| (1..=MAX_FRAGMENT_LEN).contains(&usize::from(*len)))
            .ok_or(VolumeError::FragmentLength {
                index,
                len: bytes.len(),
            })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out.resize(out.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE, 0);
    Ok(out)
}

/// Splits a volume read from a device into its fragments' bytes (not yet parsed or verified).
pub fn decode(volume: &[u8]) -> Result<Vec<&[u8]>> {
    if volume.len() > MAX_VOLUME_LEN {
        return Err(VolumeError::TooLarge { len: volume.len() });
    }
    let header = volume.get(..HEADER_LEN).ok_or(VolumeError::BadMagic)?;
    if header.get(..4) != Some(&VOLUME_MAGIC[..]) {
        return Err(VolumeError::BadMagic);
    }
    let version = header.get(4).copied().unwrap_or_default();
    if version != VOLUME_VERSION {
        return Err(VolumeError::UnsupportedVersion { version });
    }
    let count = usize::from(header.get(5).copied().unwrap_or_default());
    if count == 0 || count > MAX_FRAGMENTS_PER_VOLUME {
        return Err(VolumeError::FragmentCount { count });
    }
    if header.get(6..8) != Some(&[0, 0][..]) {
        return Err(VolumeError::Reserved);
    }
    let mut rest = volume.get(HEADER_LEN..).unwrap_or_default();
    let mut fragments = Vec::with_capacity(count);
    for index in 0..count {
        let (len_bytes, tail) = rest
            .split_first_chunk::<2>()
            .ok_or(VolumeError::Truncated { index })?;
        let len = usize::from(u16::from_le_bytes(*len_bytes));
        if len == 0 || len > MAX_FRAGMENT_LEN {
            return Err(VolumeError::FragmentLength { index, len });
        }
        let (fragment, tail) = tail
            .split_at_checked(len)
            .ok_or(VolumeError::Truncated { index })?;
        fragments.push(fragment);
        rest = tail;
    }
    if rest.iter().any(|b| *b != 0) {
        return Err(VolumeError::TrailingData);
    }
    Ok(fragments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_to_whole_sectors() {
        let a = vec![1u8; 100];
        let b = vec![2u8; MAX_FRAGMENT_LEN];
        let volume = encode(&[&a, &b]).unwrap();
        assert_eq!(volume.len() % SECTOR_SIZE, 0);
        assert_eq!(
            volume.len(),
            (8 + 2 + 100 + 2 + MAX_FRAGMENT_LEN).div_ceil(512) * 512
        );
        assert_eq!(&volume[..8], b"KSHV\x01\x02\x00\x00");
        assert_eq!(decode(&volume).unwrap(), vec![&a[..], &b[..]]);
    }

    #[test]
    fn the_fullest_volume_fits_the_maximum() {
        let fragments = vec![vec![7u8; MAX_FRAGMENT_LEN]; MAX_FRAGMENTS_PER_VOLUME];
        let volume = encode(&fragments).unwrap();
        assert_eq!(volume.len(), MAX_VOLUME_LEN);
        assert_eq!(decode(&volume).unwrap().len(), MAX_FRAGMENTS_PER_VOLUME);
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        assert_eq!(
            encode::<&[u8]>(&[]),
            Err(VolumeError::FragmentCount { count: 0 })
        );
        let too_many = vec![vec![1u8]; MAX_FRAGMENTS_PER_VOLUME + 1];
        assert_eq!(
            encode(&too_many),
            Err(VolumeError::FragmentCount { count: 33 })
        );
        assert_eq!(
            encode(&[vec![0u8; 0]]),
            Err(VolumeError::FragmentLength { index: 0, len: 0 })
        );
        assert_eq!(
            encode(&[vec![0u8; MAX_FRAGMENT_LEN + 1]]),
            Err(VolumeError::FragmentLength {
                index: 0,
                len: MAX_FRAGMENT_LEN + 1
            })
        );
    }

    #[test]
    fn decode_refuses_each_malformation() {
        let good = encode(&[vec![5u8; 40]]).unwrap();
        let with = |pos: usize, byte: u8| {
            let mut v = good.clone();
            v[pos] = byte;
            decode(&v).unwrap_err()
        };
        assert_eq!(decode(&[]).unwrap_err(), VolumeError::BadMagic);
        assert_eq!(with(0, b'X'), VolumeError::BadMagic);
        assert_eq!(with(4, 2), VolumeError::UnsupportedVersion { version: 2 });
        assert_eq!(with(5, 0), VolumeError::FragmentCount { count: 0 });
        assert_eq!(with(5, 2), VolumeError::FragmentLength { index: 1, len: 0 });
        assert_eq!(with(7, 1), VolumeError::Reserved);
        assert_eq!(with(60, 1), VolumeError::TrailingData);
        assert_eq!(
            with(9, 0xff),
            VolumeError::FragmentLength {
                index: 0,
                len: 0xff28
            }
        );
        assert_eq!(
            decode(&good[..30]).unwrap_err(),
            VolumeError::Truncated { index: 0 }
        );
        assert_eq!(
            decode(&vec![0u8; MAX_VOLUME_LEN + 512]).unwrap_err(),
            VolumeError::TooLarge {
                len: MAX_VOLUME_LEN + 512
            }
        );
    }
}
