//! One coordinator for a whole host: every VM directory under a state root (`ROOT/<vm id>/`, made
//! by `keyshard init --state-dir ROOT/<vm id>`) is served on its own broker socket,
//! `ROOT/<vm id>/broker.sock`, through one TPM service shared by all, so one quote serves the
//! releases of every VM pending in its batch window.
//!
//! The root is polled ([`POLL_INTERVAL`]). A VM directory counts once its state file exists
//! (`init` writes it last) and its files have not changed between two scans (a copy in progress
//! is not loaded half-way). Its socket is bound at once and its state loaded on a thread of its
//! own (see `loader`); requests wait for the load (see `handler`). A removed directory stops
//! being served; a changed one is loaded again and swapped in behind the same socket, so a
//! connected VM is not cut; a socket removed or replaced under us is bound again, without a
//! reload. A VM whose state cannot be loaded is refused with the reason: its mailbox answers
//! every request with it. Each VM has its own serving thread and stopper, so adding or removing
//! one never restarts another.

mod handler;
mod loader;
pub mod scan;

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use keyshard_core::broker::SERIAL_PREFIX;
use log::{error, warn};
use nix::fcntl::{Flock, FlockArg};

use super::mailbox::{BrokerMailbox, RequestHandler};
use super::release::Coordinator;
use super::state::{StateDir, check_vm_id};
use handler::{BrokenState, VmHandler};
use loader::{LoadRequest, Loaded, Loader};
use scan::{ScanError, VmDir};
use vhost_keyshard::device::serve::socket_file::{self, FileId};
use vhost_keyshard::device::serve::{BoundSocket, ServeError, SocketAccess, Stopper};

/// How often the root is listed. An added VM is served after two scans that agree (0.5 to
/// 0.75 s, plus its load); a removed one stops at the next scan.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long start-up waits for the VMs present at start to load before it says ready (their
/// sockets listen from the first scan; requests wait for the load).
pub const START_WAIT: Duration = Duration::from_secs(5);
/// How long a VM directory may stay unreadable (an I/O error, not a verdict on its contents)
/// before it is refused for that.
pub const UNREADABLE_LIMIT: Duration = Duration::from_secs(5);
/// How often a VM that could not be loaded or bound, unchanged, is tried again (a TPM that was
/// not reachable may be now).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StateRootError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{}: another coordinator serves this state root (it holds {LOCK_FILE})", root.display())]
    Busy { root: PathBuf },
    #[error("{}: a state directory, not a state root: serve it with --state-dir DIR --broker VMID=SOCKET, or give the directory that holds it", root.display())]
    StateDirNotRoot { root: PathBuf },
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
    Serving {
        vm: String,
        socket: PathBuf,
    },
    Reloaded {
        vm: String,
    },
    Refused {
        vm: String,
        reason: String,
    },
    Stopped {
        vm: String,
        why: String,
    },
    /// The root itself cannot be followed (replaced, made unsafe, unreadable): what is served
    /// stays, nothing is added or removed until it is fixed.
    Root {
        problem: String,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serving { vm, socket } => write!(f, "serving {vm} at {}", socket.display()),
            Self::Reloaded { vm } => write!(f, "reloaded {vm}: its state directory changed"),
            Self::Refused { vm, reason } => write!(f, "refused {vm}: {reason}"),
            Self::Stopped { vm, why } => write!(f, "stopped serving {vm}: {why}"),
            Self::Root { problem } => write!(f, "not following the root: {problem}"),
        }
    }
}

/// A VM socket's serving thread, and how it ended.
type ServingThread = JoinHandle<Result<(), ServeError>>;

/// A VM's socket being served on its own thread.
struct Served {
    path: PathBuf,
    file: FileId,
    stopper: Arc<Stopper>,
    thread: ServingThread,
}

impl Served {
    /// Asks the thread to stop, cutting a connected frontend; it is joined later, never waited
    /// for by the watch.
    fn stop(self, coordinator: Option<Arc<Coordinator>>) -> Retiring {
        self.stopper.stop();
        Retiring {
            thread: self.thread,
            stopper: self.stopper,
            coordinator,
        }
    }

    /// Stops accepting on a socket whose file was replaced, but lets a connected VM finish: its
    /// QEMU stays connected for the VM's life, and cutting it would cut the VM's mailbox.
    fn drain(self) -> Retiring {
        self.stopper.stop_accepting();
        Retiring {
            thread: self.thread,
            stopper: self.stopper,
            coordinator: None,
        }
    }

    /// Why this socket no longer serves, if it does not: its thread ended, or the file at its
    /// path was removed or replaced (the directory moved away, restored from a backup...).
    fn broken(&self) -> Option<String> {
        if self.thread.is_finished() {
            return Some("its socket stopped serving".into());
        }
        if !socket_file::is_ours(&self.path, self.file) {
            return Some(format!("{} was removed or replaced", self.path.display()));
        }
        None
    }
}

/// A serving thread asked to stop (or to drain), with the coordinator whose audit log to flush
/// once it is done.
struct Retiring {
    thread: ServingThread,
    stopper: Arc<Stopper>,
    coordinator: Option<Arc<Coordinator>>,
}

/// What a VM is, as the operator is told.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Its state is loading (nothing said yet).
    Pending,
    Serving,
    Refused(String),
}

/// One VM directory as the watch knows it.
struct Vm {
    /// What the last scan saw (None: not yet scanned, so a new VM waits for a second scan).
    seen: Option<VmDir>,
    /// The snapshot last loaded, or being loaded.
    loaded: Option<VmDir>,
    /// A load was asked for and has not come back.
    loading: bool,
    /// Answers the VM's mailbox; lives as long as the VM, across sockets and reloads.
    handler: Arc<VmHandler>,
    /// The loaded coordinator (none while loading or broken), for its audit log's flush.
    coordinator: Option<Arc<Coordinator>>,
    /// Why the state could not be loaded or used, if so.
    state_refusal: Option<String>,
    socket: Option<Served>,
    /// Why the socket could not be bound, and when (for the retry).
    bind_refusal: Option<(String, Instant)>,
    /// When the state was last refused (for the retry).
    refused_at: Option<Instant>,
    /// What the operator was last told.
    status: Status,
    /// Loaded again while served, not yet said.
    reloaded: bool,
    /// Since when its directory could not be read, and why.
    unreadable: Option<(Instant, String)>,
}

impl Vm {
    fn new(seen: Option<VmDir>) -> Self {
        Self {
            seen,
            loaded: None,
            loading: false,
            handler: Arc::new(VmHandler::default()),
            coordinator: None,
            state_refusal: None,
            socket: None,
            bind_refusal: None,
            refused_at: None,
            status: Status::Pending,
            reloaded: false,
            unreadable: None,
        }
    }

    fn status(&self) -> Status {
        if let Some(reason) = &self.state_refusal {
            return Status::Refused(reason.clone());
        }
        if let Some((reason, _)) = &self.bind_refusal {
            return Status::Refused(reason.clone());
        }
        if self.coordinator.is_some() && self.socket.is_some() {
            return Status::Serving;
        }
        Status::Pending
    }
}

/// Serves every VM directory under a state root. Call [`StateRootServer::watch_once`] every
/// [`POLL_INTERVAL`]; [`StateRootServer::stop`] ends everything.
pub struct StateRootServer {
    root: PathBuf,
    /// The root's identity at start: a root moved away and replaced is not followed.
    root_id: (u64, u64),
    access: SocketAccess,
    /// Loads states, each on a thread of its own, and holds the TPM service they share.
    loader: Loader,
    vms: BTreeMap<String, Vm>,
    /// Serving threads asked to stop, with the coordinators whose audit logs to flush.
    retiring: Vec<Retiring>,
    /// What is wrong with the root itself, as last said.
    root_problem: Option<String>,
    /// Held while serving: a second coordinator on the same root would fight over its sockets.
    _lock: Flock<std::fs::File>,
}

impl StateRootServer {
    /// Checks the root (a directory only root or this user may write), binds the socket of
    /// every complete VM directory in it now, without waiting for a second scan, and waits a
    /// little ([`START_WAIT`]) for their states to load.
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
        if StateDir::new(root).state_file().exists() {
            return Err(StateRootError::StateDirNotRoot {
                root: root.to_owned(),
            });
        }
        let lock = lock_root(root)?;
        let mut server = Self {
            root: root.to_owned(),
            root_id: (meta.dev(), meta.ino()),
            access,
            loader: Loader::new(root.to_owned(), tcti),
            vms: BTreeMap::new(),
            retiring: Vec::new(),
            root_problem: None,
            _lock: lock,
        };
        for (name, seen) in scan::scan(root)? {
            let mut vm = Vm::new(Some(seen));
            server.bring_up(&name, &mut vm, true);
            server.vms.insert(name, vm);
        }
        let deadline = Instant::now() + START_WAIT;
        while server.loader.pending() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(loaded) = server.loader.wait_one(left) else {
                warn!(
                    "loads still running after {START_WAIT:?} (a TPM that does not answer?): their sockets listen, and their requests wait"
                );
                break;
            };
            server.finish_load(loaded);
        }
        let events = server.report();
        Ok((server, events))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VMs served now with a loaded state.
    pub fn served(&self) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|(_, vm)| vm.status == Status::Serving)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// VM directories known now (served, loading or refused).
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// TPM operations so far (none if no TPM was opened).
    pub fn tpm_operations(&self) -> u64 {
        self.loader.tpm_operations()
    }

    /// Scans the root once and brings what is served in line with it.
    pub fn watch_once(&mut self) -> Vec<Event> {
        self.join_retired();
        for loaded in self.loader.collect() {
            self.finish_load(loaded);
        }
        let mut events = Vec::new();
        let seen = match self.scan() {
            Ok(seen) => {
                self.root_problem = None;
                seen
            }
            Err(e) => {
                // Keep serving what is loaded: a root that cannot be listed (or was replaced) is
                // not a reason to cut every VM. Said once per problem.
                let problem = e.to_string();
                if self.root_problem.as_ref() != Some(&problem) {
                    warn!("{problem}");
                    events.push(Event::Root {
                        problem: problem.clone(),
                    });
                    self.root_problem = Some(problem);
                }
                events.extend(self.report());
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
            if let Some(vm) = self.vms.remove(&name) {
                // Said only of a VM the operator was told about (served or refused).
                let said = vm.status != Status::Pending;
                self.retire(vm);
                if said {
                    events.push(Event::Stopped {
                        vm: name,
                        why: "its state directory (or state.toml) is gone".into(),
                    });
                }
            }
        }
        for (name, now) in seen {
            let mut vm = self.vms.remove(&name).unwrap_or_else(|| Vm::new(None));
            let now = match now {
                VmDir::Unreadable(reason) => {
                    // Not known this time (out of file descriptors...): nothing changes on that,
                    // unless it lasts; then it is refused for it.
                    let since = match &vm.unreadable {
                        Some((since, said)) if *said == reason => *since,
                        _ => {
                            warn!("{name}: {reason}");
                            vm.unreadable = Some((Instant::now(), reason.clone()));
                            Instant::now()
                        }
                    };
                    if since.elapsed() < UNREADABLE_LIMIT {
                        self.vms.insert(name, vm);
                        continue;
                    }
                    VmDir::Unusable(format!(
                        "{reason} (unreadable for {} s)",
                        UNREADABLE_LIMIT.as_secs()
                    ))
                }
                readable => {
                    vm.unreadable = None;
                    readable
                }
            };
            let settled = vm.seen.as_ref() == Some(&now);
            vm.seen = Some(now);
            if settled {
                self.bring_up(&name, &mut vm, false);
            }
            self.vms.insert(name, vm);
        }
        events.extend(self.report());
        events
    }

    /// Stops serving every VM, waits for their threads, flushes their audit logs.
    pub fn stop(mut self) {
        for (_, vm) in std::mem::take(&mut self.vms) {
            self.retire(vm);
        }
        for retiring in self.retiring.drain(..) {
            // Draining sockets too: their connections are cut now.
            retiring.stopper.stop();
            join_serving(retiring);
        }
    }

    /// The root's VM directories, once the root is checked to be the one we started on and
    /// still safe.
    fn scan(&self) -> Result<BTreeMap<String, VmDir>, ScanError> {
        let meta = std::fs::metadata(&self.root).map_err(|source| ScanError::Io {
            path: self.root.clone(),
            source,
        })?;
        if (meta.dev(), meta.ino()) != self.root_id {
            return Err(ScanError::Unsafe {
                path: self.root.clone(),
                reason: "no longer the directory the coordinator started on: nothing is added or removed until it is back".into(),
            });
        }
        scan::check_owner_and_mode(&self.root, &meta)?;
        scan::scan(&self.root)
    }

    /// Brings a settled VM in line with what the scan saw: an unusable directory loses its
    /// socket; a missing or broken socket is bound (again); a changed state is loaded.
    fn bring_up(&mut self, name: &str, vm: &mut Vm, at_start: bool) {
        let retry_due = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() >= RETRY_INTERVAL);
        if let Some(VmDir::Unusable(reason)) = &vm.seen {
            vm.state_refusal = Some(reason.clone());
            vm.loaded = vm.seen.clone();
            if let Some(served) = vm.socket.take() {
                self.retiring.push(served.stop(None));
            }
            // Nothing answers from the old state while the directory is unusable.
            vm.handler.set(Arc::new(BrokenState(reason.clone())));
            if let Some(old) = vm.coordinator.take() {
                old.flush_audit();
            }
            return;
        }
        if let Some(why) = vm.socket.as_ref().and_then(Served::broken) {
            warn!("{name}: {why}: binding it again");
            if let Some(served) = vm.socket.take() {
                self.retiring.push(served.drain());
            }
        }
        if vm.socket.is_none()
            && (vm.bind_refusal.is_none() || retry_due(vm.bind_refusal.as_ref().map(|b| b.1)))
        {
            match self.serve(name, vm.handler.clone()) {
                Ok(served) => {
                    vm.socket = Some(served);
                    vm.bind_refusal = None;
                }
                Err(reason) => vm.bind_refusal = Some((reason, Instant::now())),
            }
        }
        let changed = vm.loaded != vm.seen;
        let retry = vm.state_refusal.is_some() && retry_due(vm.refused_at);
        if (changed || retry || at_start)
            && !vm.loading
            && let Some(seen @ VmDir::Complete(_)) = &vm.seen
        {
            vm.loading = true;
            vm.loaded = Some(seen.clone());
            self.loader.request(LoadRequest {
                name: name.to_owned(),
                seen: seen.clone(),
            });
        }
    }

    /// Puts a finished load behind the VM's mailbox: the coordinator, or a handler that answers
    /// with the reason the state could not be loaded. A VM removed while it loaded is left
    /// alone; one changed meanwhile is loaded again at the next settled scan.
    fn finish_load(&mut self, loaded: Loaded) {
        let Some(vm) = self.vms.get_mut(&loaded.name) else {
            return;
        };
        if vm.loaded.as_ref() != Some(&loaded.seen) {
            return; // removed and added again while it loaded: the new one loads on its own
        }
        vm.loading = false;
        match loaded.coordinator {
            Ok(coordinator) => {
                vm.reloaded = vm.status == Status::Serving;
                vm.handler.set(coordinator.clone());
                if let Some(old) = vm.coordinator.replace(coordinator) {
                    old.flush_audit();
                }
                vm.state_refusal = None;
                vm.refused_at = None;
            }
            Err(reason) => {
                vm.handler.set(Arc::new(BrokenState(reason.clone())));
                if let Some(old) = vm.coordinator.take() {
                    old.flush_audit();
                }
                vm.state_refusal = Some(reason);
                vm.refused_at = Some(Instant::now());
            }
        }
    }

    /// Stops a VM's socket (joined later) and forgets it.
    fn retire(&mut self, mut vm: Vm) {
        match vm.socket.take() {
            Some(served) => self.retiring.push(served.stop(vm.coordinator.take())),
            None => {
                if let Some(coordinator) = vm.coordinator.take() {
                    coordinator.flush_audit();
                }
            }
        }
    }

    /// Joins the serving threads that have ended since they were asked to stop.
    fn join_retired(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|retiring| retiring.thread.is_finished());
        self.retiring = running;
        for retiring in done {
            join_serving(retiring);
        }
    }

    /// What changed since the last report, one event per VM whose status changed (or that
    /// was reloaded while served). A refusal is said again only when its reason changes.
    fn report(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for (name, vm) in &mut self.vms {
            let now = vm.status();
            let event = match (&vm.status, &now) {
                (_, Status::Pending) => None,
                (Status::Serving, Status::Serving) => {
                    vm.reloaded.then(|| Event::Reloaded { vm: name.clone() })
                }
                (_, Status::Serving) => Some(Event::Serving {
                    vm: name.clone(),
                    socket: self.root.join(name).join(scan::BROKER_SOCKET),
                }),
                (Status::Refused(before), Status::Refused(reason)) if before == reason => None,
                (_, Status::Refused(reason)) => {
                    error!("{name}: refused: {reason}");
                    Some(Event::Refused {
                        vm: name.clone(),
                        reason: reason.clone(),
                    })
                }
            };
            events.extend(event);
            vm.reloaded = false;
            if now != Status::Pending {
                vm.status = now;
            }
        }
        events
    }

    /// Binds `ROOT/<name>/broker.sock` and serves the VM's mailbox on a thread of its own.
    fn serve(&self, name: &str, handler: Arc<VmHandler>) -> Result<Served, String> {
        check_vm_id(name).map_err(|e| format!("the directory's name is not a VM id: {e}"))?;
        let path = self.root.join(name).join(scan::BROKER_SOCKET);
        let mailbox = BrokerMailbox::new(name, handler as Arc<dyn RequestHandler>)
            .map_err(|e| format!("cannot start the mailbox thread: {e}"))?;
        let socket = BoundSocket::bind(&path, self.access).map_err(|e| e.to_string())?;
        let file = socket.file_id();
        let stopper = Stopper::new().map_err(|e| format!("cannot make a stop event: {e}"))?;
        let serial = format!("{SERIAL_PREFIX}{name}");
        let thread_stopper = stopper.clone();
        let thread = thread::Builder::new()
            .name(serial.clone())
            .spawn(move || socket.serve(&serial, Arc::new(mailbox), &thread_stopper))
            .map_err(|e| format!("cannot start the serving thread: {e}"))?;
        Ok(Served {
            path,
            file,
            stopper,
            thread,
        })
    }
}

fn join_serving(retiring: Retiring) {
    if let Some(coordinator) = &retiring.coordinator {
        coordinator.flush_audit();
    }
    match retiring.thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("{e}"),
        Err(_) => error!("a VM's serving thread panicked"),
    }
}

#[cfg(test)]
mod tests;
