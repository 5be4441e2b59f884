//! A vhost-user-blk frontend over `virtio-driver`: connect to a device socket, learn its capacity
//! and serial, and read and write sectors. Every wait is bounded by a deadline, and a device that
//! stops answering or misbehaves yields a typed error, never a hang or a panic.
//!
//! `virtio-driver` has no timeouts of its own and no disconnect notice: its control calls block,
//! and a dead device simply never completes a request. So the handshake and the liveness checks
//! (a `GET_CONFIG` round trip) run on helper threads that the caller stops waiting for at the
//! deadline, and a request waits on the completion eventfd with `poll(2)` and a timeout. A helper
//! thread left behind ends when the device answers or closes its socket.
//!
//! One request is in flight at a time; after any failure the connection refuses further requests
//! ([`FrontendError::Broken`]). Reconnecting means a new [`VhostUserBlk`].

pub mod spec;

mod shared_memory;

use std::io;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use keyshard_core::virtio_blk::{self, SECTOR_SIZE, SERIAL_LEN, Status};
use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioFeatureFlags,
    VirtioTransport, iovec,
};
use zeroize::Zeroizing;

use self::shared_memory::SharedMemory;
use self::spec::BlkRequest;

/// Descriptors in the one virtqueue; a request takes three and only one is in flight.
const QUEUE_SIZE: u16 = 8;
/// The registered data buffer: larger reads are split into requests of this size.
const BUFFER_LEN: usize = 64 * 1024;
/// How long a request may go without completing before the device is asked whether it is alive.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(500);

/// Why the frontend failed. The socket is not repeated in each variant: the caller names it.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("socket path is not UTF-8")]
    NonUtf8Path,
    #[error("cannot connect or complete the vhost-user handshake: {0}")]
    Connect(io::Error),
    #[error("no answer to the vhost-user handshake before the deadline")]
    HandshakeTimeout,
    #[error("vhost-user setup failed at {step}: {source}")]
    Setup {
        step: &'static str,
        source: io::Error,
    },
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    NotVersion1,
    #[error("{request} did not complete before the deadline (the device is still connected)")]
    Timeout { request: &'static str },
    #[error("{request} did not complete and the device does not answer a liveness check")]
    Unresponsive { request: &'static str },
    #[error("the device went away during {request}: {source}")]
    Disconnected {
        request: &'static str,
        source: io::Error,
    },
    #[error("the device answered {request} with an I/O error")]
    DeviceIo { request: &'static str },
    #[error("the device does not support {request}")]
    Unsupported { request: &'static str },
    #[error("the device broke the protocol: {0}")]
    Protocol(String),
    #[error("bytes {offset}..{end} are beyond the device's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        end: u64,
        capacity: u64,
    },
    #[error("a write of {len} bytes at byte {offset} is not in whole blocks of {block_size} bytes")]
    Unaligned {
        offset: u64,
        len: usize,
        block_size: u64,
    },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("the connection failed earlier and is no longer used; reconnect")]
    Broken,
    #[error("cannot start a helper thread: {0}")]
    Thread(io::Error),
}

pub type Result<T> = std::result::Result<T, FrontendError>;

type Transport = VhostUser<VirtioBlkConfig, BlkRequest>;

/// Features the frontend accepts when offered. Nothing else is acked: no event index, no packed
/// ring, no multiqueue, so the device's answers stay within what this code checks.
fn wanted_features() -> u64 {
    VirtioFeatureFlags::VERSION_1.bits()
        | (VirtioBlkFeatureFlags::RO | VirtioBlkFeatureFlags::BLK_SIZE).bits()
}

/// Which way a request's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataDirection {
    /// The device fills the buffer (reads, GET_ID).
    FromDevice,
    /// The device reads the buffer (writes).
    ToDevice,
}

/// One virtio-blk request, its data in the registered buffer.
#[derive(Debug, Clone, Copy)]
struct Request {
    request_type: u32,
    sector: u64,
    len: usize,
    data: DataDirection,
    /// How errors name it: "a read", "a write", "GET_ID".
    name: &'static str,
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// One connection to a vhost-user-blk device.
pub struct VhostUserBlk {
    // Fields drop in declaration order. The queue points into ring memory that the transport
    // maps and unmaps on drop, so the queue goes first. The data buffer goes after the socket
    // is closed, so the device never sees it disappear under an open connection.
    queue: Virtqueue<'static, BlkRequest>,
    kick: Box<dyn QueueNotifier>,
    completion: Arc<EventFd>,
    transport: Arc<Transport>,
    buffer: SharedMemory,
    socket: PathBuf,
    capacity_sectors: u64,
    /// The unit of I/O in bytes: 512, or the device's larger logical block size.
    block_size: u64,
    read_only: bool,
    broken: bool,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("socket", &self.socket)
            .field("capacity_sectors", &self.capacity_sectors)
            .field("block_size", &self.block_size)
            .field("read_only", &self.read_only)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl VhostUserBlk {
    /// Connects to the device at `socket` and sets up one queue, giving up at `deadline`.
    ///
    /// The handshake runs on a helper thread: a device that accepts the connection but never
    /// answers (qemu-storage-daemon serving another client does this) costs the caller no more
    /// than the deadline.
    pub fn connect(socket: &Path, deadline: Instant) -> Result<Self> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let path = socket.to_owned();
        std::thread::Builder::new()
            .name("vhost-user-connect".into())
            .spawn(move || {
                // If the caller gave up, the send fails and the connection is dropped here.
                let _ = sender.send(Self::establish(path));
            })
            .map_err(FrontendError::Thread)?;
        match receiver.recv_timeout(remaining(deadline)) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(FrontendError::HandshakeTimeout),
            Err(RecvTimeoutError::Disconnected) => Err(FrontendError::Setup {
                step: "handshake",
                source: io::Error::other("the handshake thread stopped without an answer"),
            }),
        }
    }

    /// Drops this connection and opens a new one to the same socket.
    pub fn reconnect(self, deadline: Instant) -> Result<Self> {
        let socket = self.socket.clone();
        drop(self);
        Self::connect(&socket, deadline)
    }

    fn establish(socket: PathBuf) -> Result<Self> {
        let path = socket.to_str().ok_or(FrontendError::NonUtf8Path)?;
        let setup = |step| move |source| FrontendError::Setup { step, source };
        let mut transport =
            Transport::new(path, wanted_features()).map_err(FrontendError::Connect)?;
        let features = transport.get_features();
        if features & VirtioFeatureFlags::VERSION_1.bits() == 0 {
            return Err(FrontendError::NotVersion1);
        }
        let config = transport.get_config().map_err(setup("GET_CONFIG"))?;
        let capacity_sectors = u64::from(config.capacity);
        if capacity_sectors.checked_mul(SECTOR_SIZE).is_none() {
            return Err(FrontendError::Protocol(format!(
                "capacity of {capacity_sectors} sectors overflows"
            )));
        }
        let blk_features = VirtioBlkFeatureFlags::from_bits_truncate(features);
        let block_size = if blk_features.contains(VirtioBlkFeatureFlags::BLK_SIZE) {
            let size = u64::from(u32::from(config.blk_size));
            if !size.is_power_of_two() || !(SECTOR_SIZE..=BUFFER_LEN as u64).contains(&size) {
                return Err(FrontendError::Protocol(format!(
                    "block size {size} is not a power of two from 512 to {BUFFER_LEN}"
                )));
            }
            size
        } else {
            SECTOR_SIZE
        };

        let flags = VirtioFeatureFlags::from_bits_truncate(features);
        let layout = VirtqueueLayout::new::<BlkRequest>(1, usize::from(QUEUE_SIZE), flags)
            .map_err(setup("queue layout"))?;
        let translator = transport.iova_translator();
        let ring = transport
            .alloc_queue_mem(&layout)
            .map_err(setup("queue memory"))?;
        let (ring_ptr, ring_len) = (ring.as_mut_ptr(), ring.len());
        // SAFETY: the ring memory is the transport's shared mapping, which stays at this address
        // until the transport is dropped (moving the transport does not move the mapping).
        // `VhostUserBlk` declares `queue` before `transport`, so the queue, the only user of this
        // slice, is always dropped first; in this function `queue` is declared after `transport`
        // and so is dropped first on every early return too.
        let ring: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ring_ptr, ring_len) };
        let mut queue = Virtqueue::<BlkRequest>::new(translator, ring, QUEUE_SIZE, flags)
            .map_err(setup("queue"))?;
        transport
            .setup_queues(std::slice::from_ref(&queue))
            .map_err(setup("SET_VRING_*"))?;
        // Ask the device to signal the call eventfd on completion: requests are waited for by
        // sleeping in poll(2).
        queue.set_used_notif_enabled(true);
        let kick = transport.get_submission_notifier(0);
        let completion = transport.get_completion_fd(0);
        // Every byte the device writes must be in registered memory, data buffers included.
        let buffer =
            SharedMemory::new(c"keyshard-blk-data", BUFFER_LEN).map_err(setup("data buffer"))?;
        let buffer_fd = buffer.fd();
        transport
            .map_mem_region(buffer.addr(), buffer.len(), buffer_fd, 0)
            .map_err(setup("ADD_MEM_REG"))?;
        log::debug!(
            "{}: connected, {capacity_sectors} sectors, block size {block_size}",
            socket.display()
        );
        Ok(Self {
            queue,
            kick,
            completion,
            transport: Arc::new(transport),
            buffer,
            socket,
            capacity_sectors,
            block_size,
            read_only: blk_features.contains(VirtioBlkFeatureFlags::RO),
            broken: false,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The capacity read from the device's configuration at connect time.
    pub fn capacity_bytes(&self) -> u64 {
        // Checked at connect time not to overflow.
        self.capacity_sectors.saturating_mul(SECTOR_SIZE)
    }

    /// The device's logical block size: every read is done in whole blocks of this size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The device serial (VIRTIO_BLK_T_GET_ID), cut at the first NUL and made printable;
    /// `None` if the device does not support GET_ID.
    pub fn serial(&mut self, deadline: Instant) -> Result<Option<String>> {
        const REQUEST: &str = "GET_ID";
        let request = Request {
            request_type: virtio_blk::T_GET_ID,
            sector: 0,
            len: SERIAL_LEN,
            data: DataDirection::FromDevice,
            name: REQUEST,
        };
        match self.submit_and_wait(request, deadline) {
            Ok(()) => {}
            Err(FrontendError::Unsupported { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        let raw = self.buffer.as_slice().get(..SERIAL_LEN).unwrap_or_default();
        Ok(Some(crate::serial::printable(raw)))
    }

    /// Reads `len` bytes at byte `offset`. The device is read in whole blocks (512 bytes, or its
    /// larger block size); the bytes asked for are cut out of them.
    pub fn read_at(
        &mut self,
        offset: u64,
        len: usize,
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>> {
        const REQUEST: &str = "a read";
        let capacity = self.capacity_bytes();
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= capacity)
            .ok_or(FrontendError::OutOfRange {
                offset,
                end: offset.saturating_add(len as u64),
                capacity,
            })?;
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        let first = offset - offset % self.block_size;
        let last = end
            .div_ceil(self.block_size)
            .saturating_mul(self.block_size)
            .min(capacity);
        let mut position = first;
        while position < last {
            // BUFFER_LEN is a multiple of the block size, so every chunk stays aligned.
            let chunk = (last - position).min(BUFFER_LEN as u64);
            let chunk_len = chunk as usize; // at most BUFFER_LEN
            // A device that claims success without writing must not hand back stale bytes.
            if let Some(area) = self.buffer.as_mut_slice().get_mut(..chunk_len) {
                area.fill(0);
            }
            let request = Request {
                request_type: virtio_blk::T_IN,
                sector: position / SECTOR_SIZE,
                len: chunk_len,
                data: DataDirection::FromDevice,
                name: REQUEST,
            };
            self.submit_and_wait(request, deadline)?;
            // The part of this chunk inside offset..end.
            let from = offset.max(position) - position;
            let to = end.min(position + chunk) - position;
            let bytes = self
                .buffer
                .as_slice()
                .get(from as usize..to as usize)
                .ok_or_else(|| FrontendError::Protocol("read chunk out of buffer".into()))?;
            out.extend_from_slice(bytes);
            position += chunk;
        }
        Ok(out)
    }

    /// Writes `data` at byte `offset`, both in whole blocks (512 bytes, or the device's larger
    /// block size), with VIRTIO_BLK_T_OUT requests of at most the buffer's size. Returns when the
    /// device has completed every request.
    pub fn write_at(&mut self, offset: u64, data: &[u8], deadline: Instant) -> Result<()> {
        const REQUEST: &str = "a write";
        if self.read_only {
            return Err(FrontendError::ReadOnly);
        }
        let len = data.len();
        if !offset.is_multiple_of(self.block_size) || !(len as u64).is_multiple_of(self.block_size)
        {
            return Err(FrontendError::Unaligned {
                offset,
                len,
                block_size: self.block_size,
            });
        }
        let capacity = self.capacity_bytes();
        offset
            .checked_add(len as u64)
            .filter(|end| *end <= capacity)
            .ok_or(FrontendError::OutOfRange {
                offset,
                end: offset.saturating_add(len as u64),
                capacity,
            })?;
        // BUFFER_LEN is a multiple of the block size, so every chunk stays aligned.
        let mut position = offset;
        for chunk in data.chunks(BUFFER_LEN) {
            let area = self
                .buffer
                .as_mut_slice()
                .get_mut(..chunk.len())
                .ok_or_else(|| FrontendError::Protocol("write chunk out of buffer".into()))?;
            area.copy_from_slice(chunk);
            let request = Request {
                request_type: virtio_blk::T_OUT,
                sector: position / SECTOR_SIZE,
                len: chunk.len(),
                data: DataDirection::ToDevice,
                name: REQUEST,
            };
            self.submit_and_wait(request, deadline)?;
            // Within the capacity, checked above.
            position += chunk.len() as u64;
        }
        Ok(())
    }

    /// Runs one request whose data is the first `request.len` bytes of the buffer, and waits
    /// for it until `deadline`.
    fn submit_and_wait(&mut self, request: Request, deadline: Instant) -> Result<()> {
        if self.broken {
            return Err(FrontendError::Broken);
        }
        let result = self.run_request(request, deadline);
        // Only a clean answer from the device leaves the queue in a known state.
        let clean_answer = matches!(
            result,
            Ok(()) | Err(FrontendError::DeviceIo { .. } | FrontendError::Unsupported { .. })
        );
        self.broken |= !clean_answer;
        result
    }

    fn run_request(&mut self, request: Request, deadline: Instant) -> Result<()> {
        let Request {
            request_type,
            sector,
            len,
            data: direction,
            name: request,
        } = request;
        let device_writes = direction == DataDirection::FromDevice;
        let data_len = u32::try_from(len)
            .ok()
            .filter(|_| len <= self.buffer.len())
            .ok_or_else(|| FrontendError::Protocol(format!("request of {len} bytes too large")))?;
        let data = self.buffer.as_mut_slice().as_mut_ptr();
        let submitted = self.guarded(|queue| {
            queue.add_request(|header, add_descriptor| {
                *header = BlkRequest::new(request_type, sector);
                let header_ptr: *mut BlkRequest = header;
                add_descriptor(
                    iovec {
                        iov_base: header_ptr.cast(),
                        iov_len: virtio_blk::OUTHDR_LEN,
                    },
                    false,
                )?;
                add_descriptor(
                    iovec {
                        iov_base: data.cast(),
                        iov_len: data_len as usize,
                    },
                    device_writes,
                )?;
                let status_ptr: *mut u8 = &mut header.status;
                add_descriptor(
                    iovec {
                        iov_base: status_ptr.cast(),
                        iov_len: 1,
                    },
                    true,
                )
            })
        })?;
        let chain = submitted.map_err(|e| FrontendError::Setup {
            step: "queueing a request",
            source: e,
        })?;
        if self.guarded(|queue| queue.avail_notif_needed())? {
            self.kick
                .notify()
                .map_err(|source| FrontendError::Disconnected { request, source })?;
        }
        let status = self.wait_for_completion(chain, deadline, request)?;
        match Status::from_byte(status) {
            Some(Status::Ok) => Ok(()),
            Some(Status::IoErr) => Err(FrontendError::DeviceIo { request }),
            Some(Status::Unsupported) => Err(FrontendError::Unsupported { request }),
            None => Err(FrontendError::Protocol(format!(
                "status byte {status:#04x} for {request}"
            ))),
        }
    }

    /// Waits for the completion of descriptor chain `chain` and returns its status byte.
    fn wait_for_completion(
        &mut self,
        chain: u16,
        deadline: Instant,
        request: &'static str,
    ) -> Result<u8> {
        let mut silent_since = Instant::now();
        loop {
            // Check before sleeping: the eventfd counter makes check-then-sleep race-free.
            let completed =
                self.guarded(|queue| queue.completions().next().map(|c| (c.id, c.req.status)))?;
            match completed {
                Some((id, status)) if id == chain => return Ok(status),
                Some((id, _)) => {
                    return Err(FrontendError::Protocol(format!(
                        "completion of descriptor chain {id}, which is not in flight"
                    )));
                }
                None => {}
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(FrontendError::Timeout { request });
            }
            let nap = left.min(LIVENESS_INTERVAL.saturating_sub(silent_since.elapsed()));
            if wait_readable(self.completion.as_raw_fd(), nap).map_err(|source| {
                FrontendError::Setup {
                    step: "poll(2) on the completion eventfd",
                    source,
                }
            })? {
                // Reset the counter; it is non-zero, so this read does not block.
                self.completion
                    .read()
                    .map_err(|source| FrontendError::Setup {
                        step: "reading the completion eventfd",
                        source,
                    })?;
            } else if silent_since.elapsed() >= LIVENESS_INTERVAL {
                self.check_alive(deadline, request)?;
                silent_since = Instant::now();
            }
        }
    }

    /// A control-plane round trip (GET_CONFIG): a dead device's socket fails it at once, while a
    /// dead device's virtqueue just stays silent. Bounded by `deadline` like everything else.
    fn check_alive(&self, deadline: Instant, request: &'static str) -> Result<()> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let transport = Arc::clone(&self.transport);
        std::thread::Builder::new()
            .name("vhost-user-liveness".into())
            .spawn(move || {
                let _ = sender.send(transport.get_config().map(|_| ()));
            })
            .map_err(FrontendError::Thread)?;
        match receiver.recv_timeout(remaining(deadline)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FrontendError::Disconnected { request, source }),
            Err(RecvTimeoutError::Timeout) => Err(FrontendError::Unresponsive { request }),
            Err(RecvTimeoutError::Disconnected) => Err(FrontendError::Disconnected {
                request,
                source: io::Error::other("the liveness check stopped without an answer"),
            }),
        }
    }

    /// Runs `f` on the queue. The queue's rings live in memory the device can write, and
    /// `virtio-driver` indexes its descriptor table with values read from there: a device that
    /// scribbles over them can make it panic. That panic is caught here and becomes an error, and
    /// the connection is not used again.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Virtqueue<'static, BlkRequest>) -> T,
    ) -> Result<T> {
        let queue = &mut self.queue;
        catch_unwind(AssertUnwindSafe(|| f(queue))).map_err(|_| {
            self.broken = true;
            FrontendError::Protocol("the device corrupted the virtqueue".into())
        })
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<bool> {
    let millis = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    let mut poll_fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll_fd` is one valid, initialised pollfd and the count passed is 1.
    let ready = unsafe { libc::poll(&mut poll_fd, 1, millis) };
    match ready {
        0 => Ok(false),
        n if n > 0 => Ok(poll_fd.revents & libc::POLLIN != 0),
        _ => {
            let error = io::Error::last_os_error();
            // A signal: report "not yet"; the caller loops and recomputes its timeout.
            if error.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_socket_fails_fast_with_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let error = VhostUserBlk::connect(
            &dir.path().join("absent.sock"),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(error, FrontendError::Connect(_)), "{error}");
        // Far below the 5 s deadline: a refused connection is not waited out.
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_listener_that_never_answers_costs_only_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mute.sock");
        // Accepts (through the backlog) but never speaks vhost-user.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let error =
            VhostUserBlk::connect(&path, Instant::now() + Duration::from_millis(300)).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(error, FrontendError::HandshakeTimeout), "{error}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(2300),
            "{took:?}"
        );
    }

    #[test]
    fn poll_times_out_on_a_silent_fd_and_sees_a_readable_one() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let start = Instant::now();
        assert!(!wait_readable(a.as_raw_fd(), Duration::from_millis(50)).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(45));
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert!(wait_readable(a.as_raw_fd(), Duration::from_secs(5)).unwrap());
    }
}
