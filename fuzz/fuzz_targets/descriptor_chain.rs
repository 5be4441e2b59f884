//! Fuzzes the device's request path with guest memory the fuzzer writes: the descriptor table,
//! the avail ring and every buffer come from the input. Nothing may panic, every popped chain
//! gets a completion, and no completion claims more bytes than the chain let the device write.

#![no_main]

use std::sync::Arc;

use keyshard_core::HolderId;
use libfuzzer_sys::fuzz_target;
use vhost_keyshard::device::request;
use vhost_keyshard::fragment_volume::FragmentVolume;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 0x4000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    let input = &data[..data.len().min(MEMORY)];
    if mem.write_slice(input, GuestAddress(0)).is_err() {
        return;
    }
    let Ok(media) = FragmentVolume::from_fragments(&[vec![0x5a; 700], vec![0xa5; 700]], HolderId::new("fuzz").unwrap())
    else {
        return;
    };
    let media = Arc::new(media);
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    // The avail index is the fuzzer's; a queue never holds more than its size at once.
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let writable: u64 = chain.clone().writable().map(|d| u64::from(d.len())).sum();
        let completion = request::handle(media.as_ref(), &mem, chain);
        assert!(
            u64::from(completion.used_len) <= writable,
            "used length {} exceeds the {writable} writable bytes",
            completion.used_len
        );
        assert_eq!(completion.status.is_some(), completion.used_len > 0);
        let _ = queue.add_used(&mem, head, completion.used_len);
    }
});
