//! Loading VMs' states off the watch's thread, each on a thread of its own. A load reads the
//! state and unseals the `sev` and `tpm` data keys, which on a hardware TPM takes tens to
//! hundreds of milliseconds a key, and forever on a TPM that hangs: done on the watch's thread,
//! it would hold up every other VM's add and removal, and done one after another, a VM that
//! needs no TPM would wait behind one that does. The TPM service all VMs share is opened by the
//! first load that needs it.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use log::warn;

use super::super::release::Coordinator;
use super::super::setup;
use super::super::state::{StateDir, check_vm_id};
use super::scan::VmDir;
use keyshard_tpm::{TpmConfig, TpmService};

/// A load asked for: the VM directory's name and what the scan saw when it was asked.
pub struct LoadRequest {
    pub name: String,
    pub seen: VmDir,
}

/// What a load gave.
pub struct Loaded {
    pub name: String,
    pub seen: VmDir,
    pub coordinator: Result<Arc<Coordinator>, String>,
}

/// Starts loads and collects what they gave.
pub struct Loader {
    worker: Arc<Worker>,
    done: Sender<Loaded>,
    results: Receiver<Loaded>,
    /// Loads started and not yet collected.
    pending: u64,
}

impl Loader {
    pub fn new(root: PathBuf, tcti: String) -> Self {
        let (done, results) = mpsc::channel();
        Self {
            worker: Arc::new(Worker {
                root,
                tcti,
                tpm: Mutex::new(None),
                opening: Mutex::new(()),
            }),
            done,
            results,
            pending: 0,
        }
    }

    /// Starts a load on a thread of its own; its result comes from [`Loader::collect`]. A
    /// thread that cannot be started is a load that failed, with the reason.
    pub fn request(&mut self, request: LoadRequest) {
        let worker = self.worker.clone();
        let done = self.done.clone();
        let name = request.name.clone();
        let seen = request.seen.clone();
        let spawned = thread::Builder::new()
            .name(format!("load-{}", request.name))
            .spawn(move || {
                let coordinator = worker.coordinator_for(&request.name);
                // The server may be gone (stopping): nobody needs the result then.
                let _ = done.send(Loaded {
                    name: request.name,
                    seen: request.seen,
                    coordinator,
                });
            });
        if let Err(e) = spawned {
            let _ = self.done.send(Loaded {
                name,
                seen,
                coordinator: Err(format!("cannot start a thread to load it: {e}")),
            });
        }
        self.pending += 1;
    }

    /// Loads finished so far, without waiting.
    pub fn collect(&mut self) -> Vec<Loaded> {
        let done: Vec<Loaded> = self.results.try_iter().collect();
        self.pending = self.pending.saturating_sub(done.len() as u64);
        done
    }

    /// Waits for one load, at most `limit`.
    pub fn wait_one(&mut self, limit: std::time::Duration) -> Option<Loaded> {
        let loaded = self.results.recv_timeout(limit).ok()?;
        self.pending = self.pending.saturating_sub(1);
        Some(loaded)
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// TPM operations of the shared service so far (none if no TPM was opened).
    pub fn tpm_operations(&self) -> u64 {
        self.worker
            .tpm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, TpmService::calls)
    }
}

struct Worker {
    root: PathBuf,
    tcti: String,
    /// Opened when the first VM with `tpm` or `sev` holders is loaded, then shared by all.
    tpm: Mutex<Option<TpmService>>,
    /// Held while the TPM is being opened, so that it is opened once.
    opening: Mutex<()>,
}

impl Worker {
    /// The coordinator for `ROOT/<name>`: its state loaded, bound to the VM the directory is
    /// named for, its attested holders on the shared TPM service.
    fn coordinator_for(&self, name: &str) -> Result<Arc<Coordinator>, String> {
        check_vm_id(name).map_err(|e| format!("the directory's name is not a VM id: {e}"))?;
        let dir = StateDir::new(self.root.join(name));
        let state = setup::load_state(&dir).map_err(|e| e.to_string())?;
        if !state.vm_ids.iter().any(|bound| bound == name) {
            return Err(format!(
                "the key's shares are bound to VM ids [{}], not to {name}, the directory's name",
                state.vm_ids.join(", ")
            ));
        }
        let tpm = if state.attested_holders().next().is_some() {
            Some(self.tpm()?)
        } else {
            None
        };
        let coordinator = setup::coordinator(&dir, &state, tpm).map_err(|e| e.to_string())?;
        Ok(Arc::new(coordinator))
    }

    /// The shared TPM service, opened on first use; an open that fails is tried again by the
    /// next VM that needs it.
    fn tpm(&self) -> Result<TpmService, String> {
        let opened = || {
            self.tpm
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        if let Some(tpm) = opened() {
            return Ok(tpm);
        }
        // One opener at a time; `tpm` itself is not held, so the count stays readable.
        let _opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tpm) = opened() {
            return Ok(tpm);
        }
        let service = TpmService::spawn(TpmConfig::new(self.tcti.clone()))
            .map_err(|e| format!("the TPM could not be opened: {e}"))?;
        if service.info().software {
            warn!("{} is a software TPM ({})", self.tcti, service.info());
        }
        *self.tpm.lock().unwrap_or_else(PoisonError::into_inner) = Some(service.clone());
        Ok(service)
    }
}
