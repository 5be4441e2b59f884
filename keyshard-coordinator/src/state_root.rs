//! One coordinator for a whole host: every VM directory under a state root (`ROOT/<vm id>/`, made
//! by `keyshard init --state-dir ROOT/<vm id>`) is served on its own broker socket,
//! `ROOT/<vm id>/broker.sock`, through one TPM service shared by all, so one quote serves the
//! releases of every VM pending in its batch window.
//!
//! The root is polled ([`POLL_INTERVAL`]): a VM directory is served once its state file exists
//! (`init` writes it last) and its files have not changed between two scans (a copy in progress
//! is not loaded half-way); a removed one stops being served; a changed one is loaded again and
//! swapped in behind the same socket, so a connected VM is not cut. A VM whose state cannot be
//! loaded is refused with the reason: its mailbox answers every request with that reason, and
//! the other VMs are not touched. Each VM has its own serving thread and stopper, so adding or
//! removing one never restarts another.

pub mod scan;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use keyshard_core::broker::{Body, Message, RefusalCode, SERIAL_PREFIX};
use log::{error, warn};
use nix::fcntl::{Flock, FlockArg};

use super::mailbox::{BrokerMailbox, RequestHandler};
use super::release::Coordinator;
use super::setup;
use super::state::{StateDir, check_vm_id};
use keyshard_tpm::{TpmConfig, TpmService};
use scan::{ScanError, VmDir};
use vhost_keyshard::device::serve::{BoundSocket, ServeError, SocketAccess, Stopper};

/// How often the root is listed. An added VM is served after two scans that agree (0.5 to
/// 0.75 s, plus its load); a removed one stops at the next scan.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often a VM whose state could not be loaded, unchanged, is tried again (a TPM that was
/// not reachable may be now).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StateRootError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{}: another coordinator serves this state root (it holds {LOCK_FILE})", root.display())]
    Busy { root: PathBuf },
}

/// The lock file in the root (its leading dot keeps it out of the VM list).
pub const LOCK_FILE: &str = ".coordinator.lock";

/// Takes the root's lock (flock), or says that another coordinator has it.
fn lock_root(root: &Path) -> Result<Flock<std::fs::File>, StateRootError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| ScanError::Io {
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            StateRootError::Busy {
                root: root.to_owned(),
            }
        } else {
            StateRootError::Scan(ScanError::Io {
                path,
                source: errno.into(),
            })
        }
    })
}

/// What changed, for the operator (the CLI prints one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Serving { vm: String, socket: PathBuf },
    Reloaded { vm: String },
    Refused { vm: String, reason: String },
    Stopped { vm: String, why: String },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serving { vm, socket } => write!(f, "serving {vm} at {}", socket.display()),
            Self::Reloaded { vm } => write!(f, "reloaded {vm}: its state directory changed"),
            Self::Refused { vm, reason } => write!(f, "refused {vm}: {reason}"),
            Self::Stopped { vm, why } => write!(f, "stopped serving {vm}: {why}"),
        }
    }
}

/// Answers every request of a VM whose state could not be loaded with the reason, so its guest
/// says why rather than wait out its timeout.
struct BrokenState(String);

impl RequestHandler for BrokenState {
    fn answer(&self, _vm_id: &str, _request: &Message) -> Body {
        Body::Refused {
            code: RefusalCode::Internal,
            reason: format!("this VM's state on the host cannot be used: {}", self.0),
        }
    }
}

/// The handler behind a VM's mailbox, replaced when its state directory changes.
struct Swappable(RwLock<Arc<dyn RequestHandler>>);

impl Swappable {
    fn set(&self, handler: Arc<dyn RequestHandler>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = handler;
    }
}

impl RequestHandler for Swappable {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        let current = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        current.answer(vm_id, request)
    }
}

/// A VM's socket being served on its own thread.
struct Served {
    handler: Arc<Swappable>,
    /// The loaded coordinator (none while the state is broken), for its audit log's flush.
    coordinator: Option<Arc<Coordinator>>,
    stopper: Arc<Stopper>,
    thread: JoinHandle<Result<(), ServeError>>,
}

impl Served {
    fn stop(self) -> Retiring {
        self.stopper.stop();
        Retiring {
            coordinator: self.coordinator,
            thread: self.thread,
        }
    }
}

/// A VM being stopped; joined once its thread is done, never waited for by the watch.
struct Retiring {
    coordinator: Option<Arc<Coordinator>>,
    thread: JoinHandle<Result<(), ServeError>>,
}

impl Retiring {
    fn join(self) {
        if let Some(coordinator) = &self.coordinator {
            coordinator.flush_audit();
        }
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("{e}"),
            Err(_) => error!("a VM's serving thread panicked"),
        }
    }
}

/// One VM directory as the watch knows it.
struct Vm {
    /// What the last scan saw (None: not yet scanned, so a new VM waits for a second scan).
    seen: Option<VmDir>,
    /// What is being served came from this (None: nothing loaded yet, or must load again).
    loaded: Option<VmDir>,
    served: Option<Served>,
    /// Why it is refused now, and since when (for the retry).
    refused: Option<(String, Instant)>,
}

/// Serves every VM directory under a state root. Call [`StateRootServer::watch_once`] every
/// [`POLL_INTERVAL`]; [`StateRootServer::stop`] ends everything.
pub struct StateRootServer {
    root: PathBuf,
    access: SocketAccess,
    tcti: String,
    /// Opened when the first VM with `tpm` or `sev` holders is loaded, then shared by all.
    tpm: Option<TpmService>,
    vms: BTreeMap<String, Vm>,
    retiring: Vec<Retiring>,
    /// Held while serving: a second coordinator on the same root would fight over its sockets.
    _lock: Flock<std::fs::File>,
}

impl StateRootServer {
    /// Checks the root (a directory only root or this user may write) and serves every complete
    /// VM directory in it now, without waiting for a second scan.
    pub fn start(
        root: &Path,
        access: SocketAccess,
        tcti: String,
    ) -> Result<(Self, Vec<Event>), StateRootError> {
        let meta = std::fs::metadata(root).map_err(|source| ScanError::Io {
            path: root.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StateRootError::Scan(ScanError::Unsafe {
                path: root.to_owned(),
                reason: "not a directory".into(),
            }));
        }
        scan::check_owner_and_mode(root, &meta)?;
        let lock = lock_root(root)?;
        let mut server = Self {
            root: root.to_owned(),
            access,
            tcti,
            tpm: None,
            vms: BTreeMap::new(),
            retiring: Vec::new(),
            _lock: lock,
        };
        let mut events = Vec::new();
        for (name, seen) in scan::scan(root)? {
            let mut vm = Vm {
                seen: Some(seen),
                loaded: None,
                served: None,
                refused: None,
            };
            server.load(&name, &mut vm, &mut events);
            server.vms.insert(name, vm);
        }
        Ok((server, events))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VMs served now with a loaded state (not those whose mailbox answers with a refusal).
    pub fn served(&self) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|(_, vm)| vm.served.is_some() && vm.refused.is_none())
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// TPM operations so far (none if no TPM was opened).
    pub fn tpm_operations(&self) -> u64 {
        self.tpm.as_ref().map_or(0, TpmService::calls)
    }

    /// Scans the root once and brings what is served in line with it.
    pub fn watch_once(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.retiring = std::mem::take(&mut self.retiring)
            .into_iter()
            .filter_map(|retiring| {
                if retiring.thread.is_finished() {
                    retiring.join();
                    None
                } else {
                    Some(retiring)
                }
            })
            .collect();
        let seen = match scan::scan(&self.root) {
            Ok(seen) => seen,
            Err(e) => {
                // Keep serving what is loaded: a root that cannot be listed for a moment is not
                // a reason to cut every VM.
                warn!("{e}");
                return events;
            }
        };
        let gone: Vec<String> = self
            .vms
            .keys()
            .filter(|name| !seen.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(vm) = self.vms.remove(&name)
                && let Some(served) = vm.served
            {
                self.retiring.push(served.stop());
                events.push(Event::Stopped {
                    vm: name,
                    why: "its state directory (or state.toml) is gone".into(),
                });
            }
        }
        for (name, now) in seen {
            let mut vm = self.vms.remove(&name).unwrap_or(Vm {
                seen: None,
                loaded: None,
                served: None,
                refused: None,
            });
            self.check_thread(&name, &mut vm, &mut events);
            let settled = vm.seen.as_ref() == Some(&now);
            let changed = vm.loaded.as_ref() != Some(&now);
            vm.seen = Some(now);
            let retry_due = vm
                .refused
                .as_ref()
                .is_some_and(|(_, since)| since.elapsed() >= RETRY_INTERVAL);
            if settled && (changed || retry_due) {
                self.load(&name, &mut vm, &mut events);
            }
            self.vms.insert(name, vm);
        }
        events
    }

    /// Stops serving every VM, waits for their threads, flushes their audit logs.
    pub fn stop(mut self) {
        let served: Vec<Served> = std::mem::take(&mut self.vms)
            .into_values()
            .filter_map(|vm| vm.served)
            .collect();
        let retiring: Vec<Retiring> = served.into_iter().map(Served::stop).collect();
        for retiring in retiring.into_iter().chain(self.retiring.drain(..)) {
            retiring.join();
        }
    }

    /// A serving thread that ended on its own (its socket failed) is reported, and the VM is
    /// served again after [`RETRY_INTERVAL`].
    fn check_thread(&mut self, name: &str, vm: &mut Vm, events: &mut Vec<Event>) {
        if !vm
            .served
            .as_ref()
            .is_some_and(|served| served.thread.is_finished())
        {
            return;
        }
        let Some(served) = vm.served.take() else {
            return;
        };
        let reason = match served.thread.join() {
            Ok(Err(e)) => format!("serving failed: {e}"),
            Ok(Ok(())) => "serving ended".to_owned(),
            Err(_) => "its serving thread panicked".to_owned(),
        };
        if let Some(coordinator) = &served.coordinator {
            coordinator.flush_audit();
        }
        self.refuse(name, vm, reason, events);
    }

    /// Loads (or reloads) a VM from its directory and serves it, or refuses it with the reason.
    /// A directory that is unusable as such (another user may write it...) gets no socket; a
    /// state that cannot be loaded gets a mailbox that answers with the reason.
    fn load(&mut self, name: &str, vm: &mut Vm, events: &mut Vec<Event>) {
        vm.loaded = vm.seen.clone();
        if let Some(VmDir::Unusable(reason)) = &vm.seen {
            let reason = reason.clone();
            if let Some(served) = vm.served.take() {
                self.retiring.push(served.stop());
            }
            self.refuse(name, vm, reason, events);
            return;
        }
        let loaded = self.coordinator_for(name);
        let handler: Arc<dyn RequestHandler> = match &loaded {
            Ok(coordinator) => coordinator.clone(),
            Err(reason) => Arc::new(BrokenState(reason.clone())),
        };
        let coordinator = loaded.as_ref().ok().cloned();
        let newly_served = match &mut vm.served {
            Some(served) => {
                // Same socket, new state: a connected VM keeps its connection.
                served.handler.set(handler);
                if let Some(old) = std::mem::replace(&mut served.coordinator, coordinator) {
                    old.flush_audit();
                }
                false
            }
            None => match self.serve(name, handler, coordinator) {
                Ok(served) => {
                    vm.served = Some(served);
                    true
                }
                Err(reason) => {
                    self.refuse(name, vm, reason, events);
                    return;
                }
            },
        };
        match loaded {
            Err(reason) => self.refuse(name, vm, reason, events),
            Ok(_) if newly_served || vm.refused.is_some() => {
                vm.refused = None;
                events.push(Event::Serving {
                    vm: name.to_owned(),
                    socket: self.socket_of(name),
                });
            }
            Ok(_) => events.push(Event::Reloaded {
                vm: name.to_owned(),
            }),
        }
    }

    /// Records a refusal; it is reported again only when the reason changes.
    fn refuse(&self, name: &str, vm: &mut Vm, reason: String, events: &mut Vec<Event>) {
        let repeated = vm.refused.as_ref().is_some_and(|(old, _)| *old == reason);
        if !repeated {
            error!("{name}: refused: {reason}");
            events.push(Event::Refused {
                vm: name.to_owned(),
                reason: reason.clone(),
            });
        }
        vm.refused = Some((reason, Instant::now()));
    }

    fn socket_of(&self, name: &str) -> PathBuf {
        self.root.join(name).join(scan::BROKER_SOCKET)
    }

    /// The coordinator for `ROOT/<name>`: its state loaded, bound to the VM the directory is
    /// named for, its attested holders on the shared TPM service.
    fn coordinator_for(&mut self, name: &str) -> Result<Arc<Coordinator>, String> {
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
    fn tpm(&mut self) -> Result<TpmService, String> {
        if let Some(tpm) = &self.tpm {
            return Ok(tpm.clone());
        }
        let service = TpmService::spawn(TpmConfig::new(self.tcti.clone()))
            .map_err(|e| format!("the TPM could not be opened: {e}"))?;
        if service.info().software {
            warn!("{} is a software TPM ({})", self.tcti, service.info());
        }
        self.tpm = Some(service.clone());
        Ok(service)
    }

    /// Binds `ROOT/<name>/broker.sock` and serves the VM's mailbox on a thread of its own.
    fn serve(
        &self,
        name: &str,
        handler: Arc<dyn RequestHandler>,
        coordinator: Option<Arc<Coordinator>>,
    ) -> Result<Served, String> {
        check_vm_id(name).map_err(|e| format!("the directory's name is not a VM id: {e}"))?;
        let handler = Arc::new(Swappable(RwLock::new(handler)));
        let mailbox = BrokerMailbox::new(name, handler.clone())
            .map_err(|e| format!("cannot start the mailbox thread: {e}"))?;
        let socket =
            BoundSocket::bind(&self.socket_of(name), self.access).map_err(|e| e.to_string())?;
        let stopper = Stopper::new().map_err(|e| format!("cannot make a stop event: {e}"))?;
        let serial = format!("{SERIAL_PREFIX}{name}");
        let thread_stopper = stopper.clone();
        let thread = thread::Builder::new()
            .name(serial.clone())
            .spawn(move || socket.serve(&serial, Arc::new(mailbox), &thread_stopper))
            .map_err(|e| format!("cannot start the serving thread: {e}"))?;
        Ok(Served {
            handler,
            coordinator,
            stopper,
            thread,
        })
    }
}

#[cfg(test)]
mod tests;
