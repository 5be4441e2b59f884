//! Serving one device on one UNIX socket: accept a frontend, serve it until it goes away, then
//! listen again (VM reboots and QEMU restarts reconnect), until stopped. The socket file exists
//! exactly while the device can be reached.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
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

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}: another process is serving this socket", path.display())]
    SocketInUse { path: PathBuf },
    #[error("{}: cannot listen: {source}", path.display())]
    Listen {
        path: PathBuf,
        source: VhostUserError,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: vhost-user daemon: {message}", path.display())]
    Daemon { path: PathBuf, message: String },
}

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
/// every socket accepts connections.
pub struct BoundSocket {
    path: PathBuf,
    listener: Listener,
}

impl BoundSocket {
    /// Binds `path`, replacing a stale socket file but never one a live process still serves.
    pub fn bind(path: &Path) -> Result<Self, ServeError> {
        if path.exists() && UnixStream::connect(path).is_ok() {
            return Err(ServeError::SocketInUse {
                path: path.to_owned(),
            });
        }
        let listener = Listener::new(path, true).map_err(|source| ServeError::Listen {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        while wait_for_frontend(&self.listener, stopper).map_err(io_error)? {
            let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend =
                Arc::new(BlockBackend::new(media.clone(), memory.clone()).map_err(io_error)?);
            let daemon_error = |e: vhost_user_backend::Error| ServeError::Daemon {
                path: self.path.clone(),
                message: e.to_string(),
            };
            let mut daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), memory)
                .map_err(daemon_error)?;
            backend.release_exit_fd();
            if let Err(e) = daemon.start(&mut self.listener) {
                backend.stop_worker();
                return Err(daemon_error(e));
            }
            info!("{}: frontend connected", self.path.display());
            let tracked = daemon.shutdown_handle().map(|h| stopper.track(h));
            if stopper.is_stopped() {
                daemon.request_shutdown();
            }
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => info!("{}: frontend disconnected", self.path.display()),
                Err(e) => warn!("{}: connection ended: {e}", self.path.display()),
            }
            backend.stop_worker();
            if let Some(id) = tracked {
                stopper.forget(id);
            }
        }
        Ok(())
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
