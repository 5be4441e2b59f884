//! virtio-blk as the frontend speaks it: request types, status codes, sizes, and the request
//! header that lives in the queue memory shared with the device.

/// virtio-blk addresses the device in 512-byte sectors, whatever its block size.
pub const SECTOR_SIZE: u64 = 512;
/// VIRTIO_BLK_T_IN: read sectors.
pub const REQUEST_READ: u32 = 0;
/// VIRTIO_BLK_T_OUT: write sectors.
pub const REQUEST_WRITE: u32 = 1;
/// VIRTIO_BLK_T_GET_ID: the device's serial.
pub const REQUEST_GET_ID: u32 = 8;
/// The serial is at most 20 bytes, NUL-padded (not NUL-terminated when 20 long).
pub const SERIAL_LEN: usize = 20;
/// The length of `struct virtio_blk_outhdr`: type, reserved, sector.
pub const HEADER_LEN: usize = 16;

/// What the device writes into the status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoError,
    Unsupported,
    /// Anything else: the device does not follow the specification.
    Invalid(u8),
}

impl Status {
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Self::Ok,
            1 => Self::IoError,
            2 => Self::Unsupported,
            other => Self::Invalid(other),
        }
    }
}

/// A status byte no device writes: left in place until the device answers.
pub const STATUS_UNSET: u8 = 0xff;

/// One request's header and status byte. `virtio_driver::Virtqueue` keeps one per descriptor
/// chain in the shared queue memory, so the device reads the header and writes the status there.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkRequest {
    /// Little-endian request type.
    pub request_type: u32,
    pub reserved: u32,
    /// Little-endian first sector.
    pub sector: u64,
    pub status: u8,
}

impl BlkRequest {
    pub fn new(request_type: u32, sector: u64) -> Self {
        Self {
            request_type: request_type.to_le(),
            reserved: 0,
            sector: sector.to_le(),
            status: STATUS_UNSET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_16_byte_outhdr_followed_by_the_status() {
        assert_eq!(std::mem::offset_of!(BlkRequest, status), HEADER_LEN);
        let request = BlkRequest::new(REQUEST_GET_ID, 0x0102);
        assert_eq!(u32::from_le(request.request_type), 8);
        assert_eq!(u64::from_le(request.sector), 0x0102);
        assert_eq!(request.status, STATUS_UNSET);
    }

    #[test]
    fn status_bytes_map_to_their_meaning() {
        assert_eq!(Status::from_byte(0), Status::Ok);
        assert_eq!(Status::from_byte(1), Status::IoError);
        assert_eq!(Status::from_byte(2), Status::Unsupported);
        assert_eq!(Status::from_byte(0xff), Status::Invalid(0xff));
    }
}
