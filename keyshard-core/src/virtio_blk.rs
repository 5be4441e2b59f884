//! virtio-blk on the wire (virtio 1.2, section 5.2), as both ends of a keyshard device speak it:
//! sizes, request types and status codes. The device engine (`vhost-keyshard`) and the guest's
//! vhost-user frontend (`guest-driver`) both use this module, so the two cannot drift apart;
//! each keeps only its own side's structures (the device's feature bits and config space, the
//! frontend's request in queue memory). Plain numbers from the specification, with no virtio
//! crate behind them: the engine's tests check them against `virtio-bindings`.

/// virtio-blk addresses the device in 512-byte sectors, whatever its block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial answered to GET_ID (VIRTIO_BLK_ID_BYTES): at most 20 bytes,
/// NUL-padded, not NUL-terminated when 20 long.
pub const SERIAL_LEN: usize = 20;
/// `struct virtio_blk_outhdr`: le32 type, le32 reserved (ioprio), le64 sector.
pub const OUTHDR_LEN: usize = 16;

/// VIRTIO_BLK_T_IN: read sectors.
pub const T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write sectors.
pub const T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH: flush the device's write cache.
pub const T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: the device's serial.
pub const T_GET_ID: u32 = 8;

/// VIRTIO_BLK_S_OK.
pub const S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const S_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP.
pub const S_UNSUPP: u8 = 2;

/// What the driver asked for, from the header's type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    /// A type keyshard's devices do not serve (discard, write zeroes, ...), or none at all.
    Other(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            T_IN => Self::In,
            T_OUT => Self::Out,
            T_FLUSH => Self::Flush,
            T_GET_ID => Self::GetId,
            other => Self::Other(other),
        }
    }
}

/// The status byte the device writes last, after the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupported,
}

impl Status {
    /// The byte the device writes.
    pub fn byte(self) -> u8 {
        match self {
            Self::Ok => S_OK,
            Self::IoErr => S_IOERR,
            Self::Unsupported => S_UNSUPP,
        }
    }

    /// What a status byte means; None for a byte the specification does not define (a device
    /// that does not follow it).
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            S_OK => Some(Self::Ok),
            S_IOERR => Some(Self::IoErr),
            S_UNSUPP => Some(Self::Unsupported),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bytes_map_to_their_meaning() {
        for status in [Status::Ok, Status::IoErr, Status::Unsupported] {
            assert_eq!(Status::from_byte(status.byte()), Some(status));
        }
        assert_eq!(Status::from_byte(3), None);
        assert_eq!(Status::from_byte(0xff), None);
    }

    #[test]
    fn request_types_map_from_their_codes() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Other(11));
    }
}
