//! Device tests: a split virtqueue in guest memory (virtio-queue's MockSplitQueue layout), a
//! `VringRwLock` pointed at it, and `handle_event` called as the worker thread would. Every case
//! checks the used ring and the status, then that the queue still serves a valid read.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use keyshard_core::HolderId;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::backend::BlockBackend;
use super::media::BlockMedia;
use super::request::{ChainError, RequestError};
use crate::fragment_volume::FragmentVolume;
use keyshard_core::virtio_blk::Status;

const QSIZE: u16 = 16;
const HEADER: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;
/// Our own used ring: MockSplitQueue's used ring overlaps its avail ring in virtio-queue 0.18.
const USED_RING: u64 = 0x800;
const MEMORY_SIZE: u64 = 0x10_0000;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;
const N: u32 = VRING_DESC_F_NEXT;

struct Harness {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    media: Arc<FragmentVolume>,
    backend: BlockBackend,
    vring: VringRwLock,
    interrupts: EventFd,
    desc_table: u64,
    avail_ring: u64,
    completed: u16,
}

/// Eight fragments of 1000 distinct bytes each: a 16-sector volume.
fn volume() -> Arc<FragmentVolume> {
    let fragments: Vec<Vec<u8>> = (0..8u8)
        .map(|f| {
            (0..1000u32)
                .map(|i| (i as u8) ^ f.wrapping_mul(37))
                .collect()
        })
        .collect();
    Arc::new(FragmentVolume::from_fragments(&fragments, HolderId::new("vhd-7").unwrap()).unwrap())
}

impl Harness {
    fn new() -> Self {
        let memory = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap(),
        );
        let media = volume();
        let backend = BlockBackend::new(media.clone(), memory.clone()).unwrap();
        let vring = VringRwLock::new(memory.clone(), QSIZE).unwrap();
        let interrupts = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: into_raw_fd hands over a freshly duplicated eventfd that nothing else owns.
        let call = unsafe { File::from_raw_fd(interrupts.try_clone().unwrap().into_raw_fd()) };
        vring.set_call(Some(call));
        // The mock lays out (and zeroes) the rings once; later submissions write them directly.
        let (desc_table, avail_ring) = {
            let mem = memory.memory();
            let queue = MockSplitQueue::new(&*mem, QSIZE);
            (queue.desc_table_addr().0, queue.avail_addr().0)
        };
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(desc_table, avail_ring, USED_RING)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Self {
            memory,
            media,
            backend,
            vring,
            interrupts,
            desc_table,
            avail_ring,
            completed: 0,
        }
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.memory
            .memory()
            .write_slice(bytes, GuestAddress(at))
            .unwrap();
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.memory
            .memory()
            .read_slice(&mut out, GuestAddress(at))
            .unwrap();
        out
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(HEADER, &header);
    }

    /// Stores `chain` at descriptor slots 0.., publishes `head`, and kicks the device. Returns
    /// the used-ring length, or None when nothing was completed.
    fn submit_at(&mut self, chain: &[(u64, u32, u32, u16)], head: u16) -> Option<u32> {
        let mem = self.memory.memory();
        for (slot, &(addr, len, flags, next)) in chain.iter().enumerate() {
            let descriptor = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next));
            mem.write_obj(descriptor, GuestAddress(self.desc_table + 16 * slot as u64))
                .unwrap();
        }
        let avail_idx_at = GuestAddress(self.avail_ring + 2);
        let idx: u16 = mem.read_obj(avail_idx_at).unwrap();
        let slot = GuestAddress(self.avail_ring + 4 + 2 * u64::from(idx % QSIZE));
        mem.write_obj(head, slot).unwrap();
        mem.write_obj(idx.wrapping_add(1), avail_idx_at).unwrap();
        self.write(STATUS, &[0xee]);
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if used_idx == self.completed {
            return None;
        }
        assert_eq!(
            used_idx,
            self.completed.wrapping_add(1),
            "one chain, one completion"
        );
        let element = GuestAddress(USED_RING + 4 + 8 * u64::from(self.completed % QSIZE));
        let id: u32 = mem.read_obj(element).unwrap();
        let len: u32 = mem.read_obj(element.unchecked_add(4)).unwrap();
        assert_eq!(
            id,
            u32::from(head),
            "the used element names the chain's head"
        );
        self.completed = used_idx;
        Some(len)
    }

    fn submit(&mut self, chain: &[(u64, u32, u32, u16)]) -> Option<u32> {
        self.submit_at(chain, 0)
    }

    fn status(&self) -> u8 {
        self.read(STATUS, 1)[0]
    }

    fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.media.read_into(offset, len, &mut out).unwrap();
        out
    }

    /// A valid two-sector read at sector 3 completes with the right bytes.
    fn assert_still_serves(&mut self) {
        self.header(VIRTIO_BLK_T_IN, 3);
        self.write(DATA, &[0u8; 1024]);
        let used = self.submit(&[
            (HEADER, 16, R | N, 1),
            (DATA, 1024, W | N, 2),
            (STATUS, 1, W, 0),
        ]);
        assert_eq!(used, Some(1025));
        assert_eq!(self.status(), Status::Ok.byte());
        assert_eq!(self.read(DATA, 1024), self.expected(3 * 512, 1024));
    }
}

#[test]
fn valid_read_returns_the_volume_bytes_and_interrupts() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 4096, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!(used, Some(4097));
    assert_eq!(h.status(), Status::Ok.byte());
    let data = h.read(DATA, 4096);
    assert_eq!(&data[..4], b"KSHV");
    assert_eq!(data, h.expected(0, 4096));
    assert_eq!(h.interrupts.read().unwrap(), 1, "the driver is notified");
    h.assert_still_serves();
}

#[test]
fn header_data_and_status_in_one_buffer_pair_are_accepted() {
    // Framing is the driver's choice (virtio 1.2, 2.6.4): data and status may share a buffer.
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 1);
    let used = h.submit(&[(HEADER, 16, R | N, 1), (DATA, 513, W, 0)]);
    assert_eq!(used, Some(513));
    assert_eq!(h.read(DATA, 512), h.expected(512, 512));
    assert_eq!(h.read(DATA + 512, 1)[0], Status::Ok.byte());
}

#[test]
fn read_past_capacity_is_ioerr() {
    let mut h = Harness::new();
    let capacity_sectors = h.media.capacity_bytes() / 512;
    h.header(VIRTIO_BLK_T_IN, capacity_sectors - 1);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 1024, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    h.assert_still_serves();
}

#[test]
fn sector_arithmetic_overflow_is_ioerr() {
    let mut h = Harness::new();
    for sector in [u64::MAX, u64::MAX / 512 + 1, u64::MAX / 512] {
        h.header(VIRTIO_BLK_T_IN, sector);
        let used = h.submit(&[
            (HEADER, 16, R | N, 1),
            (DATA, 512, W | N, 2),
            (STATUS, 1, W, 0),
        ]);
        assert_eq!(
            (used, h.status()),
            (Some(1), Status::IoErr.byte()),
            "sector {sector}"
        );
    }
    h.assert_still_serves();
}

#[test]
fn head_only_chain_completes_with_length_zero() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.submit(&[(HEADER, 16, R, 0)]), Some(0));
    assert_eq!(h.status(), 0xee, "no status byte was written");
    h.assert_still_serves();
}

#[test]
fn chain_without_a_status_descriptor_gets_ioerr_in_its_last_byte() {
    // Header plus one 512-byte writable buffer: its last byte is the status, leaving 511 data
    // bytes, which is not a whole sector.
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.submit(&[(HEADER, 16, R | N, 1), (DATA, 512, W, 0)]),
        Some(1)
    );
    assert_eq!(h.read(DATA + 511, 1)[0], Status::IoErr.byte());
    // Only readable descriptors: nowhere to put a status at all.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.submit(&[(HEADER, 16, R | N, 1), (DATA, 512, R, 0)]),
        Some(0)
    );
    h.assert_still_serves();
}

#[test]
fn read_only_status_descriptor_completes_with_length_zero() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 512, W | N, 2),
        (STATUS, 1, R, 0),
    ]);
    assert_eq!(used, Some(0));
    assert_eq!(h.status(), 0xee);
    h.assert_still_serves();
}

#[test]
fn data_buffer_of_the_wrong_direction_is_ioerr_and_untouched() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    h.write(DATA, &[0x55; 512]);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 512, R | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    assert_eq!(
        h.read(DATA, 512),
        vec![0x55; 512],
        "a readable buffer is never written"
    );
    h.assert_still_serves();
}

#[test]
fn get_id_answers_the_serial_and_refuses_short_buffers() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 20, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(21), Status::Ok.byte()));
    assert_eq!(&h.read(DATA, 20), b"ksf-vhd-7\0\0\0\0\0\0\0\0\0\0\0");

    h.write(DATA, &[0x77; 20]);
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 19, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    assert_eq!(
        h.read(DATA, 19),
        vec![0x77; 19],
        "nothing written into a short buffer"
    );
    h.assert_still_serves();
}

#[test]
fn write_to_the_read_only_device_is_ioerr_and_changes_nothing() {
    let mut h = Harness::new();
    let before = h.expected(0, h.media.capacity_bytes() as usize);
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.write(DATA, &[0xAA; 512]);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 512, R | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    assert_eq!(h.expected(0, before.len()), before);
    h.assert_still_serves();
}

#[test]
fn unknown_type_is_unsupported_and_flush_is_ok() {
    let mut h = Harness::new();
    h.header(0x4242, 0);
    let used = h.submit(&[(HEADER, 16, R | N, 1), (STATUS, 1, W, 0)]);
    assert_eq!((used, h.status()), (Some(1), Status::Unsupported.byte()));
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let used = h.submit(&[(HEADER, 16, R | N, 1), (STATUS, 1, W, 0)]);
    assert_eq!((used, h.status()), (Some(1), Status::Ok.byte()));
    h.assert_still_serves();
}

#[test]
fn zero_length_data_is_ioerr() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (DATA, 0, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    // A short header is refused the same way.
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[
        (HEADER, 8, R | N, 1),
        (DATA, 512, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!((used, h.status()), (Some(1), Status::IoErr.byte()));
    h.assert_still_serves();
}

#[test]
fn descriptor_loop_completes_with_length_zero() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[(HEADER, 16, R | N, 1), (DATA, 512, W | N, 0)]);
    assert_eq!(used, Some(0));
    assert_eq!(h.status(), 0xee);
    h.assert_still_serves();
}

#[test]
fn next_beyond_the_queue_size_completes_with_length_zero() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[(HEADER, 16, R | N, QSIZE + 3)]);
    assert_eq!(used, Some(0));
    h.assert_still_serves();
}

#[test]
fn head_index_beyond_the_queue_is_consumed_without_stalling() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    // Nothing can name that head in the used ring; the queue must move on regardless.
    assert_eq!(h.submit_at(&[(HEADER, 16, R, 0)], QSIZE + 1), None);
    h.assert_still_serves();
}

#[test]
fn buffers_outside_guest_memory_complete_with_length_zero() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = h.submit(&[
        (HEADER, 16, R | N, 1),
        (MEMORY_SIZE - 256, 512, W | N, 2),
        (STATUS, 1, W, 0),
    ]);
    assert_eq!(used, Some(0));
    h.assert_still_serves();
}

#[test]
fn request_errors_map_to_the_spec_status() {
    assert_eq!(RequestError::Unsupported(9).status(), Status::Unsupported);
    assert_eq!(RequestError::ReadOnly.status(), Status::IoErr);
    assert_eq!(RequestError::ShortIdBuffer(3).status(), Status::IoErr);
    assert!(ChainError::Truncated.to_string().contains("loop"));
}

#[test]
fn config_space_reports_capacity_in_sectors() {
    let h = Harness::new();
    let config = h.backend.get_config(0, 8);
    let capacity = u64::from_le_bytes(config.try_into().unwrap());
    assert_eq!(capacity * 512, h.media.capacity_bytes());
    assert_eq!(h.backend.get_config(0, 60).len(), 60);
}
