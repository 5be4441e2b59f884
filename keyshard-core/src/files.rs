//! Files the host and guest tools read and write. Secrets and private keys go through here so
//! that they are written whole (temporary file, fsync, rename), mode 0600, and never over an
//! existing file unless the caller asked for it; reads are bounded.

use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: already exists (pass --force to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: larger than {max} bytes", path.display())]
    TooLarge { path: PathBuf, max: usize },
    #[error("refusing to write the secret to a terminal: redirect stdout or pass --out FILE")]
    Terminal,
    #[error("could not write the secret to stdout: {0}")]
    Stdout(io::Error),
}

pub type Result<T> = std::result::Result<T, FileError>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether existing files may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    Refuse,
    Replace,
}

/// Fails if `path` exists and `overwrite` refuses: check every output before writing any.
pub fn check_writable(path: &Path, overwrite: Overwrite) -> Result<()> {
    if overwrite == Overwrite::Refuse && path.symlink_metadata().is_ok() {
        return Err(FileError::Exists {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically with `mode`: readers see the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, overwrite: Overwrite) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // NamedTempFile is created 0600, so secret bytes are never readable by others on the way.
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io_error(dir))?;
    temp.write_all(bytes).map_err(io_error(path))?;
    temp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error(path))?;
    temp.as_file().sync_all().map_err(io_error(path))?;
    let persisted = match overwrite {
        Overwrite::Replace => temp.persist(path),
        Overwrite::Refuse => temp.persist_noclobber(path),
    };
    persisted.map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            FileError::Exists {
                path: path.to_owned(),
            }
        } else {
            io_error(path)(e.error)
        }
    })?;
    // Make the rename itself durable.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Writes secret or private bytes: mode 0600.
pub fn write_private(path: &Path, bytes: &[u8], overwrite: Overwrite) -> Result<()> {
    write_atomic(path, bytes, 0o600, overwrite)
}

/// Creates `dir` (and parents) with mode 0700 if it is missing.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// Reads at most `max` bytes from `path`, or from stdin when `path` is `-`, into one buffer of
/// `max + 1` bytes allocated up front: a secret is never copied by a growing `Vec`, which would
/// leave unzeroized copies behind in freed memory.
pub fn read_limited(path: &Path, max: usize) -> Result<Zeroizing<Vec<u8>>> {
    let read = if path == Path::new("-") {
        read_bounded(&mut io::stdin().lock(), max)
    } else {
        fs::File::open(path).and_then(|mut f| read_bounded(&mut f, max))
    };
    read.map_err(io_error(path))?
        .ok_or_else(|| FileError::TooLarge {
            path: path.to_owned(),
            max,
        })
}

/// Reads `reader` to its end into a pre-sized `Zeroizing` buffer; `None` when it holds more
/// than `max` bytes.
fn read_bounded(reader: &mut impl Read, max: usize) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    let capacity = max.saturating_add(1);
    let mut buffer = Zeroizing::new(vec![0u8; capacity]);
    let mut filled = 0;
    while filled < capacity {
        let Some(free) = buffer.get_mut(filled..) else {
            break;
        };
        match reader.read(free) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if filled > max {
        return Ok(None);
    }
    // Shrinking the length keeps the allocation; Zeroizing clears all of it on drop.
    buffer.truncate(filled);
    Ok(Some(buffer))
}

/// Reads a small text file (a PEM key, a policy).
pub fn read_text(path: &Path, max: usize) -> Result<Zeroizing<String>> {
    let bytes = read_limited(path, max)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| FileError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// Where a rebuilt secret goes: a file (mode 0600) or stdout, which must not be a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSink {
    File { path: PathBuf, overwrite: Overwrite },
    Stdout,
}

impl SecretSink {
    pub fn new(out: Option<PathBuf>, overwrite: Overwrite) -> Self {
        match out {
            Some(path) => Self::File { path, overwrite },
            None => Self::Stdout,
        }
    }

    /// Fails early, before any work, if the secret could not be delivered.
    pub fn check(&self) -> Result<()> {
        match self {
            Self::File { path, overwrite } => check_writable(path, *overwrite),
            Self::Stdout if io::stdout().is_terminal() => Err(FileError::Terminal),
            Self::Stdout => Ok(()),
        }
    }

    pub fn deliver(&self, secret: &[u8]) -> Result<()> {
        match self {
            Self::File { path, overwrite } => write_private(path, secret, *overwrite),
            Self::Stdout => {
                let mut stdout = io::stdout().lock();
                stdout
                    .write_all(secret)
                    .and_then(|()| stdout.flush())
                    .map_err(FileError::Stdout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_not_overwritten_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_private(&path, b"one", Overwrite::Refuse).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_private(&path, b"two", Overwrite::Refuse),
            Err(FileError::Exists { .. })
        ));
        assert!(matches!(
            check_writable(&path, Overwrite::Refuse),
            Err(FileError::Exists { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_private(&path, b"two", Overwrite::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, [0u8; 11]).unwrap();
        assert!(matches!(
            read_limited(&path, 10),
            Err(FileError::TooLarge { max: 10, .. })
        ));
        assert_eq!(read_limited(&path, 11).unwrap().len(), 11);
        assert_eq!(&read_text(&path, 11).unwrap()[..], "\0".repeat(11));
        assert!(matches!(
            read_limited(&dir.path().join("missing"), 10),
            Err(FileError::Io { .. })
        ));
    }

    /// Gives one byte per read, as a pipe may.
    struct Trickle(Vec<u8>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.is_empty(), buf.first_mut()) {
                (false, Some(slot)) => {
                    *slot = self.0.remove(0);
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    /// Issue 7 item 11: `read_to_end` grew the buffer by reallocating, leaving copies of the
    /// secret in freed memory. The secret is now read into one allocation of `max + 1` bytes.
    #[test]
    fn item11_secrets_are_read_into_one_presized_buffer() {
        let secret: Vec<u8> = (0..100).collect();
        let read = read_bounded(&mut Trickle(secret.clone()), 1024)
            .unwrap()
            .unwrap();
        assert_eq!(read.as_slice(), secret.as_slice());
        assert_eq!(read.capacity(), 1025, "the buffer was reallocated");
        assert!(
            read_bounded(&mut Trickle(vec![1; 11]), 10)
                .unwrap()
                .is_none()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, &secret).unwrap();
        let read = read_limited(&path, 1024).unwrap();
        assert_eq!(
            (read.as_slice(), read.capacity()),
            (secret.as_slice(), 1025)
        );
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;

    #[test]
    fn a_file_sink_checks_before_and_writes_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let sink = SecretSink::new(Some(path.clone()), Overwrite::Refuse);
        sink.check().unwrap();
        sink.deliver(b"k").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(sink.check(), Err(FileError::Exists { .. })));
    }
}
