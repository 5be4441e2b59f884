//! Who is on the other end of a connection, and whether the device may serve them.
//!
//! vhost-user-backend 0.24 accepts the connection itself (`VhostUserDaemon::start` takes the
//! `Listener`) and keeps the accepted stream private; vhost 0.18 has no hook either, and feeding
//! an already-accepted stream back to it is not possible (its `BackendReqHandler::from_stream`
//! needs the daemon's private handler type). So the serving loop finds the accepted connection
//! among its own descriptors once `start` returns: a connected AF_UNIX socket whose local name is
//! the listener's (each listener serves one connection at a time, and a client socket has no
//! name), and asks the kernel for its SO_PEERCRED. Until that check has passed, the medium answers
//! nothing ([`GatedMedia`]): vhost-user negotiation and the config space (capacity, sizes) may run
//! in that window of microseconds, no fragment, serial or mailbox byte is read or written. A
//! refused peer's connection is cut. The socket file's mode and owner remain the gate the kernel
//! enforces on connect(2); this check is the second, logged line.

use std::fs;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::device::media::{self, BlockMedia, MediaError};
use keyshard_core::virtio_blk::SERIAL_LEN;

/// How long a request waits for the peer check before it is refused (the check takes
/// microseconds; this only bounds a stuck serving loop).
const ADMISSION_WAIT: Duration = Duration::from_secs(5);

/// The kernel's word on a connected peer, as of connect(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// Which users may be served: root, the daemon's own user, and the socket's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    allowed_uids: Vec<u32>,
}

impl PeerPolicy {
    pub fn new(socket_owner: Option<u32>) -> Self {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let own = unsafe { libc::geteuid() };
        let mut allowed_uids = vec![0, own];
        allowed_uids.extend(socket_owner);
        allowed_uids.sort_unstable();
        allowed_uids.dedup();
        Self { allowed_uids }
    }

    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        self.allowed_uids.contains(&peer.uid)
    }

    pub fn allowed_uids(&self) -> &[u32] {
        &self.allowed_uids
    }
}

/// The local name of a socket, as raw sockaddr bytes (empty for an unnamed one).
fn local_name(fd: RawFd) -> io::Result<Vec<u8>> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_un and `len` holds its size, as getsockname(2) requires;
    // the kernel writes at most `len` bytes. A stale `fd` only makes the call fail.
    let rc =
        unsafe { libc::getsockname(fd, (&raw mut addr).cast::<libc::sockaddr>(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let path_len = (len as usize).saturating_sub(mem::size_of::<libc::sa_family_t>());
    Ok(addr
        .sun_path
        .iter()
        .take(path_len)
        .map(|c| *c as u8)
        .take_while(|c| *c != 0)
        .collect())
}

/// An integer socket option.
fn int_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a live c_int and `len` its size; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// SO_PEERCRED of a connected AF_UNIX socket.
pub fn peer_credentials(fd: RawFd) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live ucred and `len` its size, as SO_PEERCRED requires; the kernel
    // writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The peers of every connection accepted on `listener` that this process still holds open
/// (vhost-user-backend keeps two descriptors of one connection). Found by the socket's local
/// name, which an accepted socket shares with its listener.
pub fn accepted_peers(listener: &UnixListener) -> io::Result<Vec<PeerCredentials>> {
    let own_fd = listener.as_raw_fd();
    let name = local_name(own_fd)?;
    if name.is_empty() {
        return Err(io::Error::other("the listener has no name"));
    }
    let mut peers = Vec::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd == own_fd {
            continue;
        }
        // Not a socket, closed meanwhile, or not AF_UNIX: these calls fail or differ; skip it.
        if int_option(fd, libc::SO_DOMAIN).ok() != Some(libc::AF_UNIX)
            || int_option(fd, libc::SO_ACCEPTCONN).ok() != Some(0)
            || local_name(fd).ok().as_ref() != Some(&name)
        {
            continue;
        }
        if let Ok(peer) = peer_credentials(fd) {
            peers.push(peer);
        }
    }
    peers.sort_unstable();
    peers.dedup();
    Ok(peers)
}

/// The one peer of the connection just accepted on `listener`, or why it cannot be named.
pub fn accepted_peer(listener: &UnixListener) -> Result<PeerCredentials, String> {
    let peers = accepted_peers(listener).map_err(|e| format!("peer credentials: {e}"))?;
    match peers.as_slice() {
        [peer] => Ok(*peer),
        [] => Err("the accepted connection was not found".into()),
        _ => Err(format!(
            "{} connections with different peers on one listener",
            peers.len()
        )),
    }
}

/// Whether the serving loop has checked the peer of a connection: undecided, then admitted or
/// refused for good.
#[derive(Default)]
pub struct Admission {
    decision: Mutex<Option<bool>>,
    decided: Condvar,
}

impl Admission {
    pub fn decide(&self, admitted: bool) {
        if let Ok(mut decision) = self.decision.lock() {
            *decision = Some(admitted);
        }
        self.decided.notify_all();
    }

    /// Waits for the decision (bounded); true only once the peer was admitted.
    fn admitted(&self) -> bool {
        let Ok(decision) = self.decision.lock() else {
            return false;
        };
        self.decided
            .wait_timeout_while(decision, ADMISSION_WAIT, |d| d.is_none())
            .map(|(decision, _)| *decision == Some(true))
            .unwrap_or(false)
    }
}

/// A medium that serves nothing until its connection's peer is admitted.
pub struct GatedMedia {
    pub media: Arc<dyn BlockMedia>,
    pub admission: Arc<Admission>,
}

fn not_admitted() -> MediaError {
    MediaError::Guest(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer was not admitted",
    ))
}

impl BlockMedia for GatedMedia {
    fn capacity_bytes(&self) -> u64 {
        self.media.capacity_bytes()
    }

    fn serial(&self) -> [u8; SERIAL_LEN] {
        if self.admission.admitted() {
            self.media.serial()
        } else {
            [0; SERIAL_LEN]
        }
    }

    fn read_only(&self) -> bool {
        self.media.read_only()
    }

    fn read_into(&self, offset: u64, len: usize, out: &mut dyn io::Write) -> media::Result<()> {
        if !self.admission.admitted() {
            return Err(not_admitted());
        }
        self.media.read_into(offset, len, out)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> media::Result<()> {
        if !self.admission.admitted() {
            return Err(not_admitted());
        }
        self.media.write_at(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_accepted_connection_is_found_and_its_peer_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = UnixListener::bind(dir.path().join("a.sock")).unwrap();
        let b = UnixListener::bind(dir.path().join("b.sock")).unwrap();
        // Nothing accepted yet; a client socket in this process does not count.
        let _client = UnixStream::connect(dir.path().join("a.sock")).unwrap();
        assert_eq!(accepted_peers(&a).unwrap(), vec![]);
        let (conn, _) = a.accept().unwrap();
        let _dup = conn.try_clone().unwrap();
        let peer = accepted_peer(&a).unwrap();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::geteuid() });
        // Another listener's connection is not this one's.
        assert!(accepted_peer(&b).is_err());
        drop(conn);
        drop(_dup);
        assert!(accepted_peer(&a).is_err());
    }

    #[test]
    fn policy_allows_root_ourselves_and_the_owner_only() {
        let policy = PeerPolicy::new(Some(4242));
        let peer = |uid| PeerCredentials {
            pid: 1,
            uid,
            gid: 0,
        };
        assert!(policy.allows(&peer(0)));
        assert!(policy.allows(&peer(4242)));
        // SAFETY: geteuid(2) has no preconditions.
        assert!(policy.allows(&peer(unsafe { libc::geteuid() })));
        assert!(!policy.allows(&peer(65534)));
    }

    struct Zeros;

    impl BlockMedia for Zeros {
        fn capacity_bytes(&self) -> u64 {
            512
        }
        fn serial(&self) -> [u8; SERIAL_LEN] {
            media::serial_from("ksf-x")
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_into(&self, _: u64, len: usize, out: &mut dyn io::Write) -> media::Result<()> {
            out.write_all(&vec![0; len]).map_err(MediaError::Guest)
        }
    }

    #[test]
    fn gated_media_serves_only_after_admission() {
        let refused = Arc::new(Admission::default());
        refused.decide(false);
        let gated = GatedMedia {
            media: Arc::new(Zeros),
            admission: refused,
        };
        assert_eq!(gated.capacity_bytes(), 512);
        assert_eq!(gated.serial(), [0; SERIAL_LEN]);
        assert!(gated.read_into(0, 512, &mut Vec::new()).is_err());
        let admitted = Arc::new(Admission::default());
        admitted.decide(true);
        let gated = GatedMedia {
            media: Arc::new(Zeros),
            admission: admitted,
        };
        assert_eq!(gated.serial(), media::serial_from("ksf-x"));
        let mut out = Vec::new();
        gated.read_into(0, 512, &mut out).unwrap();
        assert_eq!(out.len(), 512);
    }
}
