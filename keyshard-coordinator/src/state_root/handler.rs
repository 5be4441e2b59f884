//! What answers a VM's mailbox under a state root: one handler per VM for as long as its
//! socket lives, whose current answerer is swapped as the VM's state is loaded, reloaded or
//! found broken. While the state is still loading, a request waits (its guest reads `pending`)
//! rather than being refused: a guest that boots while the host's TPM is slow still unlocks.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keyshard_core::broker::{Body, Message, RefusalCode};

use super::super::mailbox::RequestHandler;

/// How long a request waits for its VM's state to load before it is refused for that.
pub const LOADING_WAIT: Duration = Duration::from_secs(30);

/// Answers every request of a VM whose state could not be loaded with the reason, so its guest
/// says why rather than wait out its timeout.
pub struct BrokenState(pub String);

impl RequestHandler for BrokenState {
    fn answer(&self, _vm_id: &str, _request: &Message) -> Body {
        Body::Refused {
            code: RefusalCode::Internal,
            reason: format!("this VM's state on the host cannot be used: {}", self.0),
        }
    }
}

/// The handler behind a VM's mailbox: nothing yet (loading), then the loaded coordinator or a
/// [`BrokenState`], replaced when the state directory changes.
#[derive(Default)]
pub struct VmHandler {
    current: Mutex<Option<Arc<dyn RequestHandler>>>,
    loaded: Condvar,
}

impl VmHandler {
    pub fn set(&self, handler: Arc<dyn RequestHandler>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(handler);
        self.loaded.notify_all();
    }

    /// The current answerer, waiting up to `limit` for the first one.
    fn wait_current(&self, limit: Duration) -> Option<Arc<dyn RequestHandler>> {
        let deadline = Instant::now() + limit;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(handler) = current.as_ref() {
                return Some(handler.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            current = self
                .loaded
                .wait_timeout(current, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl RequestHandler for VmHandler {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        match self.wait_current(LOADING_WAIT) {
            Some(handler) => handler.answer(vm_id, request),
            None => Body::Refused {
                code: RefusalCode::Internal,
                reason: format!(
                    "this VM's state is still loading on the host after {} s (is the host's TPM answering?)",
                    LOADING_WAIT.as_secs()
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    struct Fixed;

    impl RequestHandler for Fixed {
        fn answer(&self, _vm_id: &str, _request: &Message) -> Body {
            Body::Pending
        }
    }

    #[test]
    fn a_request_made_while_loading_waits_for_the_state() {
        let handler = Arc::new(VmHandler::default());
        assert!(handler.wait_current(Duration::from_millis(1)).is_none());
        let waiting = {
            let handler = handler.clone();
            std::thread::spawn(move || {
                let request = Message {
                    request_id: 1,
                    body: Body::NonceRequest,
                };
                handler.answer("vm1", &request)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        handler.set(Arc::new(Fixed));
        assert_eq!(waiting.join().unwrap(), Body::Pending);
    }
}
