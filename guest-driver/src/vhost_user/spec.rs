//! virtio-blk as only the frontend needs it: the request header and status byte it keeps in the
//! queue memory shared with the device. Sizes, request types and status codes are shared with
//! the device engine in `keyshard_core::virtio_blk`.

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
    use keyshard_core::virtio_blk::{OUTHDR_LEN, T_GET_ID};

    use super::*;

    #[test]
    fn the_header_is_the_16_byte_outhdr_followed_by_the_status() {
        assert_eq!(std::mem::offset_of!(BlkRequest, status), OUTHDR_LEN);
        let request = BlkRequest::new(T_GET_ID, 0x0102);
        assert_eq!(u32::from_le(request.request_type), 8);
        assert_eq!(u64::from_le(request.sector), 0x0102);
        assert_eq!(request.status, STATUS_UNSET);
    }
}
