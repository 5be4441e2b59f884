//! The vhost-user backend: negotiates features, answers config reads, and drains virtqueues
//! through [`request::handle`]. One instance serves one frontend connection; a reconnect gets
//! a fresh one (vhost-user-backend keeps per-connection state in it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::media::BlockMedia;
use super::request;
use super::spec::{self, BlkConfig};

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Queue size offered; a power of two, as vhost-user-backend requires.
pub const QUEUE_SIZE: u16 = 256;
/// Queues offered. QEMU's vhost-user-blk asks for one per vCPU unless told otherwise; extra
/// queues cost nothing until the frontend enables them.
pub const NUM_QUEUES: u16 = 16;

pub struct BlockBackend {
    media: Arc<dyn BlockMedia>,
    config: BlkConfig,
    memory: Mutex<GuestMemory>,
    /// Wakes the worker thread out of its epoll loop when the connection ends.
    exit: (EventConsumer, EventNotifier),
    /// The duplicate of `exit.0` handed to vhost-user-backend, which registers it in epoll but
    /// never closes it (one leaked fd per connection otherwise); closed in `release_exit_fd`.
    exit_fd_handed_out: Mutex<Option<RawFd>>,
}

impl BlockBackend {
    pub fn new(media: Arc<dyn BlockMedia>, memory: GuestMemory) -> io::Result<Self> {
        let seg_max = u32::from(QUEUE_SIZE - 2);
        Ok(Self {
            config: BlkConfig::new(media.capacity_bytes(), seg_max, NUM_QUEUES),
            media,
            memory: Mutex::new(memory),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            exit_fd_handed_out: Mutex::new(None),
        })
    }

    /// Ends the worker thread of the daemon built on this backend. After this the backend is
    /// spent: the exit event stays signalled.
    pub fn stop_worker(&self) {
        if let Err(e) = self.exit.1.notify() {
            warn!("could not stop the queue worker: {e}");
        }
    }

    /// Closes the exit-event duplicate once the daemon has registered it (call right after
    /// `VhostUserDaemon::new`, whether it succeeded or not: vhost-user-backend never closes the
    /// duplicate, also when it fails after taking it). The registration stays valid: `self.exit`
    /// still holds the same eventfd open.
    pub fn release_exit_fd(&self) {
        let handed_out = self
            .exit_fd_handed_out
            .lock()
            .ok()
            .and_then(|mut fd| fd.take());
        if let Some(fd) = handed_out {
            // SAFETY: `fd` is the duplicate created in `exit_event`; vhost-user-backend took it
            // with `into_raw_fd` and keeps only its epoll registration, so nothing else owns or
            // closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    fn guest_memory(&self) -> io::Result<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let memory = self
            .memory
            .lock()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        Ok(memory.memory())
    }

    /// Pops and completes every available chain; signals the driver once if it wants it.
    fn drain(&self, vring: &VringRwLock, mem: &GuestMemoryLoadGuard<GuestMemoryMmap>) {
        let mut state = vring.get_mut();
        let mut completed = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let completion = request::handle(self.media.as_ref(), mem, chain);
            // A head index beyond the queue is refused here; it is consumed all the same.
            match state
                .get_queue_mut()
                .add_used(&**mem, head, completion.used_len)
            {
                Ok(()) => completed = true,
                Err(e) => debug!("could not complete head {head}: {e}"),
            }
        }
        // needs_notification has side effects (EVENT_IDX bookkeeping): ask once per batch.
        let notify = completed
            && state
                .get_queue_mut()
                .needs_notification(&**mem)
                .unwrap_or(true);
        if notify && let Err(e) = state.signal_used_queue() {
            warn!("could not signal the used queue: {e}");
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(NUM_QUEUES)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        // Without PROTOCOL_FEATURES the frontend never asks for the config space.
        spec::device_features(self.media.read_only(), NUM_QUEUES > 1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: the config space (cloud-hypervisor and QEMU need it). MQ: GET_QUEUE_NUM.
        // CONFIGURE_MEM_SLOTS: memory regions one by one (libblkio's virtio-driver requires it).
        // BACKEND_REQ: QEMU refuses a device that offers ACCESS_PLATFORM (see
        // `spec::device_features`) without BACKEND_REQ and REPLY_ACK ("IOMMU support requires
        // reply-ack and backend-req protocol features"); the channel it opens stays unused, as
        // the device never asks the frontend for anything.
        // REPLY_ACK is added by the vhost crate.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.window(offset, size)
    }

    fn update_memory(&self, memory: GuestMemory) -> io::Result<()> {
        *self
            .memory
            .lock()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))? = memory;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Every queue on one worker: fragment reads are tiny, threads are not.
        vec![(1u64 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Both duplicates first: a consumer dropped here closes its own fd, and only a handed-out
        // one may be recorded for `release_exit_fd` (else it would close a reused number).
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        if let Ok(mut slot) = self.exit_fd_handed_out.lock() {
            *slot = Some(consumer.as_raw_fd());
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here ends the worker thread for good, so guest mistakes are logged, not returned.
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        // Drain with notifications off, then re-enable and re-check: a request that arrived in
        // between would otherwise wait for the next kick (works with and without EVENT_IDX).
        loop {
            if let Err(e) = vring.disable_notification() {
                debug!("disable_notification: {e}");
            }
            // A fresh view of guest memory on every pass: the frontend may have added a region
            // (and then used it) while this thread was still in the previous pass.
            let mem = self.guest_memory()?;
            self.drain(vring, &mem);
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    debug!("enable_notification: {e}");
                    break;
                }
            }
        }
        Ok(())
    }
}
