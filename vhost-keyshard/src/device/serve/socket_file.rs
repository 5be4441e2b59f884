//! A device's socket file: bound in a private directory with its final mode and owner, then linked
//! onto its path, so no one can connect through wider permissions at any moment. An existing path
//! is replaced only when it is a stale socket (a socket that refuses connections); any other file
//! is refused and left alone. On the way out the file is removed only while it is still the one
//! we bound (same device and inode).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The mode of a socket file unless told otherwise: only its owner may connect.
pub const DEFAULT_MODE: u32 = 0o600;

/// Who may connect to a socket file: its mode and, when given, its owner and group. The mode is
/// what the kernel enforces on connect(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self {
            mode: DEFAULT_MODE,
            owner: None,
            group: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{}: another process is serving this socket", path.display())]
    InUse { path: PathBuf },
    #[error("{}: cannot tell whether this socket is stale: {source}", path.display())]
    Probe { path: PathBuf, source: io::Error },
    #[error("{}: changed while the socket was being bound; left alone", path.display())]
    Changed { path: PathBuf },
    #[error(
        "{}: too long for a UNIX socket ({len} bytes; at most {MAX_SOCKET_PATH_LEN}, and \
         {STAGING_OVERHEAD} fewer when the file name is shorter than the private name it is bound \
         under first)",
        path.display()
    )]
    TooLong { path: PathBuf, len: usize },
    #[error("{}: cannot {step}: {source}", path.display())]
    Io {
        path: PathBuf,
        step: &'static str,
        source: io::Error,
    },
}

/// The longest path a UNIX socket address holds (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// The private directory's name: `.ks` and six random characters.
const STAGING_PREFIX: &str = ".ks";
/// The staged path's name in the parent directory: `.ksXXXXXX/s`.
const STAGING_OVERHEAD: usize = STAGING_PREFIX.len() + 6 + 2;

/// Which file a path named when we looked: a file is ours only while this still matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What the path holds before binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Nothing,
    StaleSocket(FileId),
}

fn io_error(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> SocketFileError {
    let path = path.to_owned();
    move |source| SocketFileError::Io { path, step, source }
}

/// Looks at `path` without following a symbolic link: nothing, a stale socket, or a refusal.
fn inspect(path: &Path) -> Result<Existing, SocketFileError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(io_error(path, "inspect it")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketFileError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketFileError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Ok(Existing::StaleSocket(FileId::of(&meta)))
        }
        Err(source) => Err(SocketFileError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The identity of `path` when it is a socket, else None.
fn socket_id(path: &Path) -> Option<FileId> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|meta| meta.file_type().is_socket())
        .map(|meta| FileId::of(&meta))
}

/// Binds a listening socket at `path` with `access`, replacing only a stale socket. Returns the
/// listener and the identity of the file, for [`remove_if_ours`].
pub fn bind(path: &Path, access: SocketAccess) -> Result<(UnixListener, FileId), SocketFileError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // Both the staged path and the final one must fit a socket address; say so before
    // touching anything.
    let len = path.as_os_str().len();
    let staged_len = parent.as_os_str().len() + 1 + STAGING_OVERHEAD;
    if len.max(staged_len) > MAX_SOCKET_PATH_LEN {
        return Err(SocketFileError::TooLong {
            path: path.to_owned(),
            len,
        });
    }
    let existing = inspect(path)?;
    sweep_stale_staging(parent);
    // A directory only we can enter: the socket listens there, with its final mode and owner,
    // before any other user could reach it. Removed (with what is left in it) on return.
    let private = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .rand_bytes(6)
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io_error(path, "make a private directory next to it"))?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(io_error(
        path,
        "bind a socket in a private directory next to it",
    ))?;
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::lchown(&staged, access.owner, access.group)
            .map_err(io_error(path, "set the socket's owner"))?;
    }
    fs::set_permissions(&staged, fs::Permissions::from_mode(access.mode))
        .map_err(io_error(path, "set the socket's mode"))?;
    if let Existing::StaleSocket(stale) = existing {
        // Still the stale socket we probed? Then it goes; anything else stays.
        if socket_id(path) != Some(stale) {
            return Err(SocketFileError::Changed {
                path: path.to_owned(),
            });
        }
        fs::remove_file(path).map_err(io_error(path, "remove the stale socket"))?;
        log::info!("{}: replaced a stale socket", path.display());
    }
    // link(2) never replaces: a file that appeared meanwhile is left alone.
    fs::hard_link(&staged, path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => SocketFileError::Changed {
            path: path.to_owned(),
        },
        _ => io_error(path, "link the socket into place")(source),
    })?;
    let id = fs::symlink_metadata(&staged)
        .map(|meta| FileId::of(&meta))
        .map_err(io_error(path, "inspect the bound socket"))?;
    Ok((listener, id))
}

/// A staging directory this old is left from a bind that never finished (a crash, no file
/// descriptors left to remove it); a bind in progress takes microseconds.
const STALE_STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes staging directories (`.ksXXXXXX`) left in `parent` by binds that never finished:
/// only directories owned by this user, older than [`STALE_STAGING_AGE`], holding nothing but
/// the staged socket `s`. Anything else is left alone; failures are only logged.
fn sweep_stale_staging(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let ours = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(STAGING_PREFIX) || name.len() != STAGING_PREFIX.len() + 6 {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age >= STALE_STAGING_AGE);
        if !meta.is_dir() || meta.uid() != ours || !old {
            continue;
        }
        let staged = path.join("s");
        let only_a_socket = fs::read_dir(&path).is_ok_and(|inside| {
            inside
                .flatten()
                .all(|e| e.file_name() == "s" && e.file_type().is_ok_and(|t| t.is_socket()))
        });
        if !only_a_socket {
            continue;
        }
        let removed = match fs::remove_file(&staged) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        if removed && fs::remove_dir(&path).is_ok() {
            log::info!(
                "{}: removed a staging directory left by an unfinished bind",
                path.display()
            );
        }
    }
}

/// Whether `path` is still the socket file `id` (not removed, not replaced).
pub fn is_ours(path: &Path, id: FileId) -> bool {
    socket_id(path) == Some(id)
}

/// Removes `path` if it is still the socket file `id`; anything else there is left alone.
pub fn remove_if_ours(path: &Path, id: FileId) {
    if socket_id(path) != Some(id) {
        log::debug!("{}: no longer our socket file, left alone", path.display());
        return;
    }
    if let Err(e) = fs::remove_file(path) {
        log::warn!("{}: could not remove the socket: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_path_too_long_for_a_socket_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        // Fits as a socket address, and so does its staged name: binds.
        let room = MAX_SOCKET_PATH_LEN - dir.path().as_os_str().len() - 1;
        let fits = dir.path().join("x".repeat(room));
        assert!(bind(&fits, SocketAccess::default()).is_ok());
        // One byte more: refused, and nothing left in the directory but the first socket.
        let long = dir.path().join("y".repeat(room + 1));
        assert!(matches!(
            bind(&long, SocketAccess::default()),
            Err(SocketFileError::TooLong { .. })
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    use super::*;

    /// A staging directory left by a crash mid-bind (issue 7's known limit) is swept by the
    /// next bind in that directory once it is old; a fresh one (a bind in progress) and one
    /// holding anything else are left.
    #[test]
    fn a_staging_directory_left_by_a_crash_is_removed_once_old() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".ksAbC123");
        fs::create_dir(&stale).unwrap();
        drop(UnixListener::bind(stale.join("s")).unwrap());
        let fresh = dir.path().join(".ksXyZ789");
        fs::create_dir(&fresh).unwrap();
        let foreign = dir.path().join(".ksFoo000");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes"), b"keep").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * STALE_STAGING_AGE;
        for old in [&stale, &foreign] {
            fs::File::open(old).unwrap().set_modified(long_ago).unwrap();
        }
        bind(&dir.path().join("a.sock"), SocketAccess::default()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists() && foreign.join("notes").exists());
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_regular_file_or_a_symlink_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let notes = dir.path().join("notes.txt");
        fs::write(&notes, b"keep me").unwrap();
        let err = bind(&notes, SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketFileError::NotASocket { .. }), "{err:?}");
        assert_eq!(fs::read(&notes).unwrap(), b"keep me");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&notes, &link).unwrap();
        assert!(matches!(
            bind(&link, SocketAccess::default()),
            Err(SocketFileError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&notes).unwrap(), b"keep me");
        // Nothing is left next to them.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            bind(&path, SocketAccess::default()),
            Err(SocketFileError::InUse { .. })
        ));
        drop(live);
        let (listener, id) = bind(&path, SocketAccess::default()).unwrap();
        assert_eq!(socket_id(&path), Some(id));
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_socket_gets_its_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        for wanted in [DEFAULT_MODE, 0o660, 0o666] {
            let path = dir.path().join(format!("{wanted:o}.sock"));
            let access = SocketAccess {
                mode: wanted,
                owner: None,
                group: None,
            };
            let _bound = bind(&path, access).unwrap();
            assert_eq!(mode(&path), wanted);
        }
    }

    #[test]
    fn only_our_own_socket_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let (listener, id) = bind(&path, SocketAccess::default()).unwrap();
        drop(listener);
        // Someone put another file at the path: it stays.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"theirs").unwrap();
        remove_if_ours(&path, id);
        assert_eq!(fs::read(&path).unwrap(), b"theirs");
        fs::remove_file(&path).unwrap();
        let (_listener, id) = bind(&path, SocketAccess::default()).unwrap();
        remove_if_ours(&path, id);
        assert!(!path.exists());
    }
}
