//! Serving one device on one UNIX socket: accept a frontend, serve it until it goes away, then
//! listen again (VM reboots and QEMU restarts reconnect), until stopped. The socket file exists
//! exactly while the device can be reached.

mod peer;
pub mod socket_file;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::backend::BlockBackend;
use super::media::BlockMedia;
use peer::{Admission, GatedMedia};
pub use peer::{PeerCredentials, PeerPolicy};
pub use socket_file::{DEFAULT_MODE, SocketAccess, SocketFileError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    SocketFile(#[from] SocketFileError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: vhost-user daemon: {message}", path.display())]
    Daemon { path: PathBuf, message: String },
}

/// Connections in a row that may fail to be set up before the device gives up.
const MAX_SETUP_FAILURES: u32 = 50;
/// The pause after such a failure: a listener that stays readable does not spin.
const SETUP_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Asks serving loops to stop, from any thread: wakes their poll and cuts live connections.
pub struct Stopper {
    stopped: AtomicBool,
    wake: (EventConsumer, EventNotifier),
    /// Live connections of every serving loop, by a per-stopper connection number.
    connections: Mutex<BTreeMap<u64, ShutdownHandle>>,
    next_connection: AtomicU64,
}

impl Stopper {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            stopped: AtomicBool::new(false),
            wake: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            connections: Mutex::new(BTreeMap::new()),
            next_connection: AtomicU64::new(0),
        }))
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.1.notify() {
            warn!("could not wake the listeners: {e}");
        }
        if let Ok(connections) = self.connections.lock() {
            connections.values().for_each(ShutdownHandle::shutdown);
        }
    }

    /// Stops accepting new frontends but leaves the live connections alone: the loops end once
    /// their frontends go away. For a socket replaced on disk while a VM is still connected to
    /// it; [`Stopper::stop`] later cuts what is left.
    pub fn stop_accepting(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.1.notify() {
            warn!("could not wake the listeners: {e}");
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn track(&self, handle: ShutdownHandle) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut connections) = self.connections.lock() {
            connections.insert(id, handle);
        }
        id
    }

    fn forget(&self, id: u64) {
        if let Ok(mut connections) = self.connections.lock() {
            connections.remove(&id);
        }
    }
}

/// A bound socket, ready for `serve`. Binding first lets a launcher be told "ready" only once
/// every socket accepts connections. Dropping it removes the socket file if it is still ours.
pub struct BoundSocket {
    path: PathBuf,
    /// The same listening socket as `listener`, kept to find accepted connections by name.
    socket: UnixListener,
    /// Built from a `UnixListener` with no path, so vhost never unlinks anything.
    listener: Listener,
    file: socket_file::FileId,
    peers: PeerPolicy,
}

impl BoundSocket {
    /// Binds `path` with `access`, replacing a stale socket but never a live one nor any other
    /// file. Connections are served to root, this process's user and `access.owner` only.
    pub fn bind(path: &Path, access: SocketAccess) -> Result<Self, ServeError> {
        let (socket, file) = socket_file::bind(path, access)?;
        let for_vhost = socket.try_clone().map_err(|source| ServeError::Io {
            path: path.to_owned(),
            source,
        });
        let for_vhost = match for_vhost {
            Ok(clone) => clone,
            Err(e) => {
                socket_file::remove_if_ours(path, file);
                return Err(e);
            }
        };
        Ok(Self {
            path: path.to_owned(),
            socket,
            listener: Listener::from(for_vhost),
            file,
            peers: PeerPolicy::new(access.owner),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket file's identity, for [`socket_file::is_ours`] once the socket is serving.
    pub fn file_id(&self) -> socket_file::FileId {
        self.file
    }

    /// Serves frontends one after another until `stopper` says stop; the socket file is removed
    /// on return.
    pub fn serve(
        mut self,
        name: &str,
        media: Arc<dyn BlockMedia>,
        stopper: &Stopper,
    ) -> Result<(), ServeError> {
        let io_error = |source| ServeError::Io {
            path: self.path.clone(),
            source,
        };
        let mut failures = 0;
        while wait_for_frontend(&self.listener, stopper).map_err(io_error)? {
            let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let admission = Arc::new(Admission::default());
            let gated: Arc<dyn BlockMedia> = Arc::new(GatedMedia {
                media: media.clone(),
                admission: admission.clone(),
            });
            let daemon_error = |e: vhost_user_backend::Error| ServeError::Daemon {
                path: self.path.clone(),
                message: e.to_string(),
            };
            // A connection that cannot be set up (out of file descriptors in a boot storm...)
            // is dropped and the next one served; only failures without end stop the device.
            let started = BlockBackend::new(gated, memory.clone())
                .map(Arc::new)
                .map_err(io_error)
                .and_then(|backend| {
                    let daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), memory);
                    backend.release_exit_fd();
                    let mut daemon = daemon.map_err(daemon_error)?;
                    match daemon.start(&mut self.listener) {
                        Ok(()) => Ok((backend, daemon)),
                        Err(e) => {
                            backend.stop_worker();
                            Err(daemon_error(e))
                        }
                    }
                });
            let (backend, mut daemon) = match started {
                Ok(started) => started,
                Err(e) => {
                    admission.decide(false);
                    failures += 1;
                    if failures >= MAX_SETUP_FAILURES {
                        return Err(e);
                    }
                    warn!(
                        "{}: a connection could not be served: {e}",
                        self.path.display()
                    );
                    std::thread::sleep(SETUP_RETRY_PAUSE);
                    continue;
                }
            };
            failures = 0;
            let tracked = daemon.shutdown_handle().map(|h| stopper.track(h));
            let admitted = self.admit();
            admission.decide(admitted);
            if !admitted || stopper.is_stopped() {
                daemon.request_shutdown();
            }
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => {
                    if admitted {
                        info!("{}: frontend disconnected", self.path.display());
                    }
                }
                Err(e) => warn!("{}: connection ended: {e}", self.path.display()),
            }
            backend.stop_worker();
            if let Some(id) = tracked {
                stopper.forget(id);
            }
        }
        Ok(())
    }

    /// Names the peer of the connection just accepted, logs it, and says whether it may be
    /// served (see `peer` for how the connection is found).
    fn admit(&self) -> bool {
        let path = self.path.display();
        match peer::accepted_peer(&self.socket) {
            Ok(peer) if self.peers.allows(&peer) => {
                info!("{path}: frontend connected: {peer}");
                true
            }
            Ok(peer) => {
                warn!(
                    "{path}: refused a connection from {peer}: only uids {:?} may connect",
                    self.peers.allowed_uids()
                );
                false
            }
            Err(reason) => {
                info!("{path}: connection dropped unserved: {reason}");
                false
            }
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        socket_file::remove_if_ours(&self.path, self.file);
    }
}

/// Waits for a connection or a stop request; true means a frontend is waiting.
fn wait_for_frontend(listener: &Listener, stopper: &Stopper) -> io::Result<bool> {
    loop {
        if stopper.is_stopped() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stopper.wake.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd structs for the whole call,
        // and its length is passed alongside.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if stopper.is_stopped() {
            return Ok(false);
        }
        if fds.first().is_some_and(|fd| fd.revents & libc::POLLIN != 0) {
            return Ok(true);
        }
    }
}
