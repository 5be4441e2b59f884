//! virtio-blk as only the device sees it (virtio 1.2, section 5.2): the feature bits it offers
//! and its little-endian config space. Sizes, request types and status codes are shared with
//! the guest's frontend in `keyshard_core::virtio_blk`.

use keyshard_core::virtio_blk::SECTOR_SIZE;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Device feature bits offered, before the vhost-user PROTOCOL_FEATURES bit.
///
/// ACCESS_PLATFORM (bit 33, once IOMMU_PLATFORM) is offered because an SEV or SEV-SNP guest's
/// kernel refuses a virtio device without it: only with it does the driver use the DMA API,
/// which bounces I/O through shared (unencrypted) buffers. Without a vIOMMU, which is how
/// keyshard's VMs run, the addresses on the rings stay guest-physical, so nothing else changes
/// here (no IOTLB). A VMM that puts a vIOMMU in front of the device would send IOTLB messages,
/// which this device does not serve.
pub fn device_features(read_only: bool, multi_queue: bool) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_F_ACCESS_PLATFORM)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_FLUSH);
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    if multi_queue {
        features |= 1 << VIRTIO_BLK_F_MQ;
    }
    features
}

/// `struct virtio_blk_config` up to `num_queues`, every field little-endian. The frontend may
/// ask for any window of it; bytes past its end read as zero.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed)]
pub struct BlkConfig {
    /// In 512-byte sectors, whatever `blk_size` says.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
}

// SAFETY: BlkConfig is repr(C, packed) with only integer fields, so it has no padding and every
// bit pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

impl BlkConfig {
    pub fn new(capacity_bytes: u64, seg_max: u32, num_queues: u16) -> Self {
        Self {
            capacity: (capacity_bytes / SECTOR_SIZE).to_le(),
            seg_max: seg_max.to_le(),
            blk_size: (SECTOR_SIZE as u32).to_le(),
            num_queues: num_queues.to_le(),
            ..Self::default()
        }
    }

    /// Exactly `size` bytes from `offset`, zero past the end: vhost-user answers nothing at all
    /// (and the frontend fails) unless the reply has the requested size.
    pub fn window(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        (0..usize::try_from(size).unwrap_or(0))
            .map(|i| {
                start
                    .checked_add(i)
                    .and_then(|at| bytes.get(at))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use keyshard_core::virtio_blk::{
        OUTHDR_LEN, S_IOERR, S_OK, S_UNSUPP, SERIAL_LEN, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    };
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };

    use super::*;

    /// The shared spec module holds plain numbers; here they meet the kernel's own headers
    /// (virtio-bindings), so a wrong one fails on the engine's side and the frontend's at once.
    #[test]
    fn the_shared_virtio_blk_numbers_match_virtio_bindings() {
        assert_eq!(SERIAL_LEN, VIRTIO_BLK_ID_BYTES as usize);
        assert_eq!(OUTHDR_LEN, 16);
        assert_eq!(
            [T_IN, T_OUT, T_FLUSH, T_GET_ID],
            [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID
            ]
        );
        assert_eq!(
            [u32::from(S_OK), u32::from(S_IOERR), u32::from(S_UNSUPP)],
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]
        );
    }

    #[test]
    fn config_layout_matches_the_spec_offsets() {
        let config = BlkConfig::new(4096, 254, 4);
        let bytes = config.as_slice();
        assert_eq!(bytes.len(), 36);
        assert_eq!(&bytes[0..8], &8u64.to_le_bytes()); // capacity in sectors
        assert_eq!(&bytes[12..16], &254u32.to_le_bytes()); // seg_max
        assert_eq!(&bytes[20..24], &512u32.to_le_bytes()); // blk_size
        assert_eq!(&bytes[34..36], &4u16.to_le_bytes()); // num_queues
    }

    #[test]
    fn windows_have_the_requested_size_and_zero_fill() {
        let config = BlkConfig::new(1024, 2, 1);
        assert_eq!(config.window(0, 8), 2u64.to_le_bytes());
        assert_eq!(config.window(0, 60).len(), 60);
        assert_eq!(config.window(34, 4), vec![1, 0, 0, 0]);
        assert_eq!(config.window(u32::MAX, 3), vec![0, 0, 0]);
    }

    #[test]
    fn features_follow_the_device() {
        let ro = device_features(true, false);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(ro & (1 << VIRTIO_F_VERSION_1), 0);
        let rw_mq = device_features(false, true);
        assert_eq!(rw_mq & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw_mq & (1 << VIRTIO_BLK_F_MQ), 0);
    }

    /// Item 9 of issue 7: SEV guests require VIRTIO_F_ACCESS_PLATFORM of every virtio device.
    #[test]
    fn access_platform_is_offered_for_sev_guests() {
        assert_eq!(VIRTIO_F_ACCESS_PLATFORM, 33);
        for (read_only, multi_queue) in [(true, false), (true, true), (false, false)] {
            let features = device_features(read_only, multi_queue);
            assert_ne!(features & (1 << 33), 0, "ro {read_only}, mq {multi_queue}");
        }
    }
}
