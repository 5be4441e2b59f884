//! [`TpmService`]: a [`Tpm`] shared by a server's threads. One thread owns the `Tpm`; callers
//! send it jobs over a channel and wait for the answer. The TPM runs one command at a time
//! anyway, and this keeps every ESAPI call, and the sessions and handles ESAPI tracks, on one
//! thread. Cloning a `TpmService` is cheap; the thread ends when the last clone is dropped.
//! From async code, call it from `spawn_blocking`; never hold a call across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::blob::SealedBlob;
use crate::decrypt_key::DecryptKey;
use crate::device::{Startup, Tpm, TpmConfig, TpmInfo};
use crate::ecdh::SharedPoint;
use crate::error::{self, Result, TpmError};
use keyshard_attest::tpm::certify::Certification;
use keyshard_attest::tpm::pcr::{PcrSelection, PcrValues};
use keyshard_attest::tpm::quote::{AkPublic, NONCE_LEN, Quote};
use keyshard_core::broker::merkle::{PathStep, Tree};

/// What a batch's leader publishes: the quote over the batch's Merkle root (or why not), and
/// the tree, for each member's path.
type Published = Arc<(std::result::Result<Quote, String>, Option<Tree>)>;

/// The answer slot every member of one batch waits on.
type Slot = Arc<(Mutex<Option<Published>>, Condvar)>;

/// How long a batch of quote requests stays open before its quote is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWindow {
    /// When no batch closed lately: what a lone release waits for company.
    pub quiet: Duration,
    /// When a batch closed less than [`BatchWindow::BUSY_MEMORY`] ago (a boot storm): requests
    /// keep coming, and a longer window means fewer quotes for them.
    pub busy: Duration,
}

impl BatchWindow {
    /// 20 ms alone, 100 ms in a storm: a storm of 100 releases spread over half a second costs
    /// a handful of quotes, and a lone boot waits 20 ms.
    pub const DEFAULT: Self = Self {
        quiet: Duration::from_millis(20),
        busy: Duration::from_millis(100),
    };
    /// How recent the last batch must be for the next to count as part of a storm.
    pub const BUSY_MEMORY: Duration = Duration::from_millis(300);

    /// The same window whatever the load.
    pub fn fixed(window: Duration) -> Self {
        Self {
            quiet: window,
            busy: window,
        }
    }
}

/// Requests waiting for the next quote of one PCR selection.
struct Batch {
    nonces: Vec<[u8; NONCE_LEN]>,
    slot: Slot,
}

type Job = Box<dyn FnOnce(&mut Tpm) + Send>;

/// A handle to the thread that owns the TPM.
#[derive(Clone)]
pub struct TpmService {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    info: TpmInfo,
    startup: Startup,
    ak_public: AkPublic,
    /// Jobs sent to the TPM thread so far: each is one TPM operation (quote, unseal, read).
    calls: AtomicU64,
    /// Open batches of [`TpmService::quote_batched`], by PCR selection (TPML bytes).
    batches: Mutex<HashMap<Vec<u8>, Batch>>,
    /// When the last batch closed, for [`BatchWindow::busy`].
    last_batch_closed: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for TpmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmService")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

/// Replaces `tpm` with a new context after the stack or the connection failed (a TPM or its
/// simulator restarted, a TCTI that lost its connection): the old context would refuse every
/// later command. The new one must have the same attestation key, or it is not the same TPM
/// and is not used. Returns whether `tpm` works again; if not, the next job tries again.
fn reopen(config: &TpmConfig, ak: &AkPublic, tpm: &mut Tpm) -> bool {
    match Tpm::open_with(config) {
        Ok(fresh) if fresh.ak_public() == ak => {
            log::warn!("{}: the TPM connection failed; reopened it", config.tcti);
            *tpm = fresh;
            true
        }
        Ok(_) => {
            log::error!(
                "{}: the TPM answering now has another attestation key: not used",
                config.tcti
            );
            false
        }
        Err(e) => {
            log::error!(
                "{}: the TPM connection failed and cannot be reopened: {e}",
                config.tcti
            );
            false
        }
    }
}

impl TpmService {
    /// Starts the owner thread and opens the TPM on it; returns once the TPM is open.
    pub fn spawn(config: TpmConfig) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, opened) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("tpm".to_owned())
            .spawn(move || {
                let mut tpm = match Tpm::open_with(&config) {
                    Ok(tpm) => tpm,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let facts = (tpm.info().clone(), *tpm.startup(), tpm.ak_public().clone());
                let ak = facts.2.clone();
                if ready.send(Ok(facts)).is_err() {
                    return;
                }
                // Ends when every TpmService (every Sender) is gone.
                let mut broken = false;
                for job in queue {
                    if broken {
                        broken = !reopen(&config, &ak, &mut tpm);
                    }
                    job(&mut tpm);
                    broken |= error::take_stack_failure();
                }
            })
            .map_err(|e| TpmError::Spawn(e.to_string()))?;
        let opened = opened.recv().map_err(|_| TpmError::ServiceStopped);
        let (info, startup, ak_public) = match opened {
            Ok(Ok(facts)) => facts,
            Ok(Err(e)) | Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                jobs: Some(jobs),
                thread: Some(thread),
                info,
                startup,
                ak_public,
                calls: AtomicU64::new(0),
                batches: Mutex::new(HashMap::new()),
                last_batch_closed: Mutex::new(None),
            }),
        })
    }

    /// Runs `job` on the TPM thread and returns its result. Jobs run one at a time, in the
    /// order they arrive. If a job panics the thread stops, and this and every later call
    /// returns [`TpmError::ServiceStopped`]. A job must not call or hold a `TpmService`: the
    /// thread would wait for itself.
    pub fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Tpm) -> R + Send + 'static,
    ) -> Result<R> {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = mpsc::sync_channel(1);
        let boxed: Job = Box::new(move |tpm| {
            let _ = reply.send(job(tpm));
        });
        self.inner
            .jobs
            .as_ref()
            .ok_or(TpmError::ServiceStopped)?
            .send(boxed)
            .map_err(|_| TpmError::ServiceStopped)?;
        answer.recv().map_err(|_| TpmError::ServiceStopped)
    }

    /// How many operations (jobs: a quote, an unseal, a PCR read...) this service has sent to
    /// the TPM since it started, across every clone. What a boot storm costs the TPM.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    pub fn info(&self) -> &TpmInfo {
        &self.inner.info
    }

    pub fn startup(&self) -> &Startup {
        &self.inner.startup
    }

    pub fn ak_public(&self) -> &AkPublic {
        &self.inner.ak_public
    }

    /// [`Tpm::quote`] on the TPM thread.
    pub fn quote(&self, selection: &PcrSelection, nonce: &[u8; NONCE_LEN]) -> Result<Quote> {
        let (selection, nonce) = (selection.clone(), *nonce);
        self.call(move |tpm| tpm.quote(&selection, &nonce))?
    }

    /// One quote for every caller that asks within the window of the first: the first caller
    /// waits the window (`window.busy` when another batch closed lately, else `window.quiet`),
    /// then quotes the root of a Merkle tree over all their nonces (see
    /// `keyshard_core::broker::merkle`); each caller gets that quote and its own nonce's
    /// inclusion path. A boot storm then costs the TPM one quote per window, not one per
    /// release. Batches are per PCR selection; every clone of this service shares them.
    pub fn quote_batched(
        &self,
        selection: &PcrSelection,
        nonce: &[u8; NONCE_LEN],
        window: BatchWindow,
    ) -> Result<(Quote, Vec<PathStep>)> {
        let key = selection.tpml_bytes();
        let (index, slot, leader) = {
            let mut batches = self
                .inner
                .batches
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match batches.get_mut(&key) {
                Some(batch) => {
                    batch.nonces.push(*nonce);
                    (batch.nonces.len() - 1, batch.slot.clone(), false)
                }
                None => {
                    let slot: Slot = Arc::new((Mutex::new(None), Condvar::new()));
                    batches.insert(
                        key.clone(),
                        Batch {
                            nonces: vec![*nonce],
                            slot: slot.clone(),
                        },
                    );
                    (0, slot, true)
                }
            }
        };
        let (lock, ready) = &*slot;
        if leader {
            let busy = self
                .inner
                .last_batch_closed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|closed| closed.elapsed() < BatchWindow::BUSY_MEMORY);
            std::thread::sleep(if busy { window.busy } else { window.quiet });
            *self
                .inner
                .last_batch_closed
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            let nonces = self
                .inner
                .batches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key)
                .map(|batch| batch.nonces)
                .unwrap_or_default();
            let tree = Tree::new(&nonces);
            let quote = match &tree {
                Some(tree) => self
                    .quote(selection, &tree.root())
                    .map_err(|e| e.to_string()),
                None => Err("an empty batch".to_owned()),
            };
            *lock.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new((quote, tree)));
            ready.notify_all();
        }
        let mut published = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let answer = loop {
            if let Some(answer) = published.as_ref() {
                break answer.clone();
            }
            published = ready
                .wait(published)
                .unwrap_or_else(PoisonError::into_inner);
        };
        drop(published);
        let (quote, tree) = &*answer;
        let quote = quote.clone().map_err(TpmError::Batched)?;
        let path = tree
            .as_ref()
            .and_then(|tree| tree.path(index))
            .ok_or_else(|| TpmError::Batched("no inclusion path for this nonce".to_owned()))?;
        Ok((quote, path))
    }

    /// [`Tpm::unseal`] on the TPM thread.
    pub fn unseal(&self, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>> {
        let blob = blob.clone();
        self.call(move |tpm| tpm.unseal(&blob))?
    }

    /// [`Tpm::read_pcrs`] on the TPM thread.
    pub fn read_pcrs(&self, selection: &PcrSelection) -> Result<PcrValues> {
        let selection = selection.clone();
        self.call(move |tpm| tpm.read_pcrs(&selection))?
    }

    /// [`Tpm::create_decrypt_key`] on the TPM thread.
    pub fn create_decrypt_key(&self) -> Result<DecryptKey> {
        self.call(Tpm::create_decrypt_key)?
    }

    /// [`Tpm::ecdh_z_gen`] on the TPM thread.
    pub fn ecdh_z_gen(&self, key: &DecryptKey, point: &[u8]) -> Result<SharedPoint> {
        let (key, point) = (key.clone(), point.to_vec());
        self.call(move |tpm| tpm.ecdh_z_gen(&key, &point))?
    }

    /// [`Tpm::certify_decrypt_key`] on the TPM thread.
    pub fn certify_decrypt_key(
        &self,
        key: &DecryptKey,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Certification> {
        let (key, nonce) = (key.clone(), *nonce);
        self.call(move |tpm| tpm.certify_decrypt_key(&key, &nonce))?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; then wait for it to close the TPM.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
