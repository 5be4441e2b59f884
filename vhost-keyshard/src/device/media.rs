//! What a block device serves, behind a small trait: the device engine asks for capacity,
//! serial and bytes, and knows nothing of fragments or mailboxes.

use std::io;

use keyshard_core::virtio_blk::SERIAL_LEN;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{len} bytes at offset {offset} are outside the {capacity}-byte medium")]
    OutOfRange {
        offset: u64,
        len: usize,
        capacity: u64,
    },
    #[error("the medium is read-only")]
    ReadOnly,
    #[error("copy into guest memory failed: {0}")]
    Guest(io::Error),
}

pub type Result<T> = std::result::Result<T, MediaError>;

pub trait BlockMedia: Send + Sync {
    /// Size in bytes, a multiple of 512.
    fn capacity_bytes(&self) -> u64;

    /// The GET_ID answer, zero-padded.
    fn serial(&self) -> [u8; SERIAL_LEN];

    fn read_only(&self) -> bool;

    /// Copies `len` bytes from `offset` into `out` (guest memory).
    fn read_into(&self, offset: u64, len: usize, out: &mut dyn io::Write) -> Result<()>;

    /// Accepts `data` at `offset`; read-only media refuse.
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(MediaError::ReadOnly)
    }
}

/// A serial from text: the first 20 bytes, zero-padded.
pub fn serial_from(text: &str) -> [u8; SERIAL_LEN] {
    let mut serial = [0u8; SERIAL_LEN];
    for (slot, byte) in serial.iter_mut().zip(text.bytes()) {
        *slot = byte;
    }
    serial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_zero_padded_and_cut_at_20_bytes() {
        assert_eq!(&serial_from("ksf-vhd-1")[..10], b"ksf-vhd-1\0");
        assert_eq!(serial_from(&"x".repeat(30)), [b'x'; 20]);
    }
}
