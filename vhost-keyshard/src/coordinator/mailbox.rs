//! The broker mailbox medium: one per VM, served as a virtio-blk disk with serial `ksb-<vm-id>`
//! by the same engine as the fragment devices.
//!
//! Layout: bytes `0..16 KiB` are the request area, `16..32 KiB` the answer area. The guest writes
//! one whole request at offset 0; the write completes at once and the request is worked on by the
//! mailbox's own thread (a TPM quote or an SNP check takes milliseconds; the virtqueue never
//! waits for it). The answer area then holds `pending` for that request id until the final answer
//! replaces it. Reads have no side effects: they only copy the current answer. A newer request
//! supersedes an older one still being worked on.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use keyshard_core::broker::{AREA_LEN, Body, Message, MessageError, RefusalCode, SERIAL_PREFIX};
use log::{debug, warn};

use crate::device::media::{self, BlockMedia, MediaError};
use crate::device::spec::SERIAL_LEN;

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

pub struct BrokerMailbox {
    vm_id: String,
    serial: [u8; SERIAL_LEN],
    state: Arc<Mutex<State>>,
    work: Mutex<Sender<Message>>,
}

impl BrokerMailbox {
    /// A mailbox for `vm_id` whose requests `handler` answers on a thread of its own, which ends
    /// when the mailbox is dropped.
    pub fn new(vm_id: &str, handler: Arc<dyn RequestHandler>) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            answer: Vec::new(),
            current_request: None,
        }));
        let (sender, receiver) = mpsc::channel::<Message>();
        let worker_state = state.clone();
        let worker_vm = vm_id.to_owned();
        thread::Builder::new()
            .name(format!("{SERIAL_PREFIX}{vm_id}"))
            .spawn(move || {
                for request in receiver {
                    let body = handler.answer(&worker_vm, &request);
                    publish(&worker_state, request.request_id, body, true);
                }
            })?;
        Ok(Self {
            serial: media::serial_from(&format!("{SERIAL_PREFIX}{vm_id}")),
            vm_id: vm_id.to_owned(),
            state,
            work: Mutex::new(sender),
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
        let queued = self
            .work
            .lock()
            .map(|sender| sender.send(message).is_ok())
            .unwrap_or(false);
        if !queued {
            warn!("{SERIAL_PREFIX}{}: the request thread is gone", self.vm_id);
        }
    }
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
