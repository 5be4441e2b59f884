//! The broker mailbox medium: one per VM, served as a virtio-blk disk with serial `ksb-<vm-id>`
//! by the same engine as the fragment devices.
//!
//! Layout: bytes `0..16 KiB` are the request area, `16..32 KiB` the answer area. The guest writes
//! one whole request at offset 0; the write completes at once and the request is worked on by the
//! mailbox's own thread (a TPM quote or an SNP check takes milliseconds; the virtqueue never
//! waits for it). The answer area then holds `pending` for that request id until the final answer
//! replaces it. Reads have no side effects: they only copy the current answer.
//!
//! The work is bounded whatever the guest writes: the mailbox holds at most one request waiting
//! (a newer one replaces it, and a request that is no longer the one the answer area is about is
//! dropped before any work), and the handler rate-limits each VM. A guest looping writes of one
//! request gets at most one request worked on at a time, and refusals for rate after its burst.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use keyshard_core::broker::{AREA_LEN, Body, Message, MessageError, RefusalCode, SERIAL_PREFIX};
use log::{debug, error, warn};

use keyshard_core::virtio_blk::SERIAL_LEN;
use vhost_keyshard::device::media::{self, BlockMedia, MediaError};

/// Where the answer area starts.
pub const ANSWER_OFFSET: u64 = AREA_LEN as u64;
/// The whole mailbox: request area and answer area.
pub const CAPACITY: u64 = 2 * AREA_LEN as u64;

/// Decides what to answer a well-formed request. The coordinator implements it; it runs on the
/// mailbox's thread, never on the virtqueue's.
pub trait RequestHandler: Send + Sync {
    fn answer(&self, vm_id: &str, request: &Message) -> Body;
}

struct State {
    /// The encoded current answer, zero-padded to the answer area on read.
    answer: Vec<u8>,
    /// The request the answer area is about; a late answer for another one is dropped.
    current_request: Option<u64>,
}

/// The newest request not yet taken by the mailbox's thread: one slot, never a queue.
#[derive(Default)]
struct Slot {
    next: Option<Message>,
    closed: bool,
}

#[derive(Default)]
struct Work {
    slot: Mutex<Slot>,
    ready: Condvar,
}

impl Work {
    /// Puts `request` in the slot, replacing (and so skipping) one not yet taken.
    fn put(&self, request: Message) -> bool {
        let Ok(mut slot) = self.slot.lock() else {
            return false;
        };
        if let Some(skipped) = slot.next.replace(request) {
            debug!(
                "request {:#x} superseded before any work",
                skipped.request_id
            );
        }
        self.ready.notify_one();
        !slot.closed
    }

    /// The next request, or None once closed.
    fn take(&self) -> Option<Message> {
        let mut slot = self.slot.lock().ok()?;
        loop {
            if slot.closed {
                return None;
            }
            if let Some(request) = slot.next.take() {
                return Some(request);
            }
            slot = self.ready.wait(slot).ok()?;
        }
    }

    fn close(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            slot.closed = true;
        }
        self.ready.notify_all();
    }
}

pub struct BrokerMailbox {
    vm_id: String,
    serial: [u8; SERIAL_LEN],
    state: Arc<Mutex<State>>,
    work: Arc<Work>,
}

impl BrokerMailbox {
    /// A mailbox for `vm_id` whose requests `handler` answers on a thread of its own, which ends
    /// when the mailbox is dropped.
    pub fn new(vm_id: &str, handler: Arc<dyn RequestHandler>) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            answer: Vec::new(),
            current_request: None,
        }));
        let work = Arc::new(Work::default());
        let worker_work = work.clone();
        let worker_state = state.clone();
        let worker_vm = vm_id.to_owned();
        thread::Builder::new()
            .name(format!("{SERIAL_PREFIX}{vm_id}"))
            .spawn(move || {
                while let Some(request) = worker_work.take() {
                    if !is_current(&worker_state, request.request_id) {
                        debug!(
                            "request {:#x} superseded before any work",
                            request.request_id
                        );
                        continue;
                    }
                    let body = answer_or_refuse(handler.as_ref(), &worker_vm, &request);
                    publish(&worker_state, request.request_id, body, true);
                }
            })?;
        Ok(Self {
            serial: media::serial_from(&format!("{SERIAL_PREFIX}{vm_id}")),
            vm_id: vm_id.to_owned(),
            state,
            work,
        })
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Takes one request written by the guest: a malformed one is refused in the answer area
    /// at once, a well-formed one is answered `pending` and queued.
    fn accept(&self, bytes: &[u8]) {
        let message = match Message::parse(bytes) {
            Ok(message) => message,
            Err(error) => {
                debug!("{SERIAL_PREFIX}{}: malformed request: {error}", self.vm_id);
                let request_id = request_id_of(bytes);
                publish(&self.state, request_id, refusal_for(&error), false);
                return;
            }
        };
        if !message.body.is_request() {
            let body = Body::Refused {
                code: RefusalCode::UnknownKind,
                reason: "only nonce and release requests may be written".into(),
            };
            publish(&self.state, message.request_id, body, false);
            return;
        }
        publish(&self.state, message.request_id, Body::Pending, false);
        if !self.work.put(message) {
            warn!("{SERIAL_PREFIX}{}: the request thread is gone", self.vm_id);
        }
    }
}

impl Drop for BrokerMailbox {
    /// Ends the mailbox's thread once it has finished the request in hand.
    fn drop(&mut self) {
        self.work.close();
    }
}

/// The handler's answer; a panic in it (a bug, in this code or a library it calls) is this
/// request's refusal, not the end of the mailbox's thread, which would leave the guest waiting
/// on `pending` until its deadline for every request after it.
fn answer_or_refuse(handler: &dyn RequestHandler, vm_id: &str, request: &Message) -> Body {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handler.answer(vm_id, request)
    }))
    .unwrap_or_else(|_| {
        error!(
            "{SERIAL_PREFIX}{vm_id}: answering request {:#x} failed (a bug): refused",
            request.request_id
        );
        Body::Refused {
            code: RefusalCode::Internal,
            reason: "the coordinator failed while answering (a bug; see its log)".into(),
        }
    })
}

/// Whether the answer area is still about `request_id`: a request written over since is
/// skipped.
fn is_current(state: &Mutex<State>, request_id: u64) -> bool {
    state
        .lock()
        .is_ok_and(|state| state.current_request == Some(request_id))
}

/// The request id from a header that parsed that far, else 0: a refusal should still name
/// the request it answers when it can.
fn request_id_of(bytes: &[u8]) -> u64 {
    bytes
        .get(8..16)
        .and_then(|id| <[u8; 8]>::try_from(id).ok())
        .map_or(0, u64::from_le_bytes)
}

fn refusal_for(error: &MessageError) -> Body {
    let code = match error {
        MessageError::UnsupportedVersion(_) => RefusalCode::UnsupportedVersion,
        MessageError::TooLarge { .. } => RefusalCode::TooLarge,
        MessageError::UnknownKind(_) => RefusalCode::UnknownKind,
        _ => RefusalCode::Malformed,
    };
    Body::Refused {
        code,
        reason: error.to_string(),
    }
}

/// Replaces the answer. A late answer (`only_if_current`) for a superseded request is dropped.
fn publish(state: &Mutex<State>, request_id: u64, body: Body, only_if_current: bool) {
    let Ok(mut state) = state.lock() else {
        return;
    };
    if only_if_current && state.current_request != Some(request_id) {
        debug!("dropping the answer to superseded request {request_id:#x}");
        return;
    }
    let encoded = Message { request_id, body }.encode().unwrap_or_else(|e| {
        // Only an oversized field can fail to encode; say so rather than answer nothing.
        Message {
            request_id,
            body: Body::Refused {
                code: RefusalCode::Internal,
                reason: format!("answer could not be encoded: {e}"),
            },
        }
        .encode()
        .unwrap_or_default()
    });
    state.answer = encoded;
    state.current_request = Some(request_id);
}

impl BlockMedia for BrokerMailbox {
    fn capacity_bytes(&self) -> u64 {
        CAPACITY
    }

    fn serial(&self) -> [u8; SERIAL_LEN] {
        self.serial
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_into(&self, offset: u64, len: usize, out: &mut dyn io::Write) -> media::Result<()> {
        let out_of_range = || MediaError::OutOfRange {
            offset,
            len,
            capacity: CAPACITY,
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= CAPACITY)
            .ok_or_else(out_of_range)?;
        let answer = self
            .state
            .lock()
            .map(|state| state.answer.clone())
            .map_err(|_| MediaError::Guest(io::Error::other("mailbox lock poisoned")))?;
        // The request area reads as zeros; the answer area as the answer, zero-padded.
        let mut bytes = vec![0u8; len];
        for (i, slot) in (offset..end).zip(bytes.iter_mut()) {
            if let Some(answer_at) = i.checked_sub(ANSWER_OFFSET) {
                *slot = usize::try_from(answer_at)
                    .ok()
                    .and_then(|at| answer.get(at))
                    .copied()
                    .unwrap_or(0);
            }
        }
        out.write_all(&bytes).map_err(MediaError::Guest)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> media::Result<()> {
        // One whole request at offset 0, inside the request area; anything else is refused
        // with IOERR and changes nothing.
        if offset != 0 || data.len() > AREA_LEN {
            return Err(MediaError::OutOfRange {
                offset,
                len: data.len(),
                capacity: AREA_LEN as u64,
            });
        }
        self.accept(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
