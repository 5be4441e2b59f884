//! What a state root holds right now: one entry per VM directory that has a state file, each with
//! a fingerprint of its files, so the watcher can tell a directory still being written (its
//! fingerprint moves between two scans) from one that is complete, and a changed one from an
//! unchanged one.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::super::state::StateDir;

/// A VM directory holds a few dozen files; past this it is not a state directory.
const MAX_FILES: usize = 4096;
/// state.toml, fragments/, sealed/, tpm/, snp/vcek/: nothing sits deeper.
const MAX_DEPTH: usize = 3;

/// The broker socket the coordinator binds in each VM directory.
pub const BROKER_SOCKET: &str = "broker.sock";

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: String },
}

/// A file's identity and last change, as far as the watcher needs to know.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileStamp {
    path: PathBuf,
    inode: u64,
    len: u64,
    modified_ns: i128,
    changed_ns: i128,
}

/// A VM directory as one scan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDir {
    /// Its files; equal fingerprints mean nothing was written in between.
    Complete(Fingerprint),
    /// It cannot be served, and why (a symlink, owned by another user, too many files...).
    Unusable(String),
    /// It could not be read this time (out of file descriptors, an I/O error): not a verdict on
    /// the directory, so the watch changes nothing on it.
    Unreadable(String),
}

/// The stamps of every file of a VM directory, except what the coordinator writes itself (the
/// audit log, the broker socket) and sockets' staging directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>);

/// Lists `root`: VM id (the directory's name) to what it holds. Names starting with `.` and
/// directories without a state file (not yet complete: `keyshard init` writes it last) are left
/// out.
pub fn scan(root: &Path) -> Result<BTreeMap<String, VmDir>, ScanError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ScanError::Io { path, source }
    };
    let mut vms = BTreeMap::new();
    for entry in fs::read_dir(root).map_err(io_error(root))? {
        let entry = entry.map_err(io_error(root))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue; // gone since the listing
        };
        if meta.file_type().is_symlink() {
            if path.join("state.toml").exists() {
                let reason = "a symbolic link: a VM directory must be a directory of the root";
                vms.insert(name, VmDir::Unusable(reason.to_owned()));
            }
            continue;
        }
        if !meta.is_dir() || !StateDir::new(&path).state_file().exists() {
            continue;
        }
        let dir = match check_owner_and_mode(&path, &meta).and_then(|()| fingerprint(&path)) {
            Ok(print) => VmDir::Complete(print),
            Err(e @ ScanError::Unsafe { .. }) => VmDir::Unusable(e.to_string()),
            Err(e @ ScanError::Io { .. }) => VmDir::Unreadable(e.to_string()),
        };
        vms.insert(name, dir);
    }
    Ok(vms)
}

/// Refuses a directory another local user could write: whoever can add or replace a VM's files
/// chooses what the coordinator serves to that VM's broker, and could remove other VMs. Owner
/// root or this process's user, and no write permission for group or others.
pub fn check_owner_and_mode(path: &Path, meta: &fs::Metadata) -> Result<(), ScanError> {
    let ours = nix::unistd::geteuid().as_raw();
    let unsafe_dir = |reason: String| ScanError::Unsafe {
        path: path.to_owned(),
        reason,
    };
    if meta.uid() != 0 && meta.uid() != ours {
        return Err(unsafe_dir(format!(
            "owned by uid {}, neither root nor this process's uid {ours}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "writable by group or others (mode {:o}): chmod go-w",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

fn fingerprint(dir: &Path) -> Result<Fingerprint, ScanError> {
    let mut stamps = Vec::new();
    walk(dir, Path::new(""), 0, &mut stamps)?;
    stamps.sort();
    Ok(Fingerprint(stamps))
}

fn walk(
    dir: &Path,
    relative: &Path,
    depth: usize,
    stamps: &mut Vec<FileStamp>,
) -> Result<(), ScanError> {
    let here = dir.join(relative);
    let entries = match fs::read_dir(&here) {
        Ok(entries) => entries,
        // Removed while we looked: the next scan sees the directory as it is then.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ScanError::Io { path: here, source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| ScanError::Io {
            path: here.clone(),
            source,
        })?;
        let name = entry.file_name();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(ScanError::Unsafe {
                path: here.join(&name),
                reason: "a symbolic link: a state directory holds regular files only".into(),
            });
        }
        let name_text = name.to_string_lossy();
        // `.ks*`: a socket's private staging directory (vhost-keyshard's socket_file).
        if kind.is_socket() || name_text.starts_with(".ks") {
            continue;
        }
        let path = relative.join(&name);
        // A file or directory inside that another user may write is as good as the directory;
        // a FIFO or device would hang or mislead a read; a hard link is a file shared with
        // some other place (the audit log is appended to: it must not be).
        let unsafe_entry = |reason: &str| ScanError::Unsafe {
            path: dir.join(&path),
            reason: reason.to_owned(),
        };
        check_owner_and_mode(&dir.join(&path), &meta)?;
        if !kind.is_dir() && !kind.is_file() {
            return Err(unsafe_entry(
                "neither a regular file nor a directory (a FIFO or a device?)",
            ));
        }
        if kind.is_file() && meta.nlink() > 1 {
            return Err(unsafe_entry(
                "has other hard links: a state file must be this directory's own",
            ));
        }
        // What the coordinator writes itself (the audit log, and its rotated copies) does not
        // make the state change.
        if depth == 0 && name_text.starts_with("audit.log") {
            continue;
        }
        if kind.is_dir() {
            if depth + 1 < MAX_DEPTH {
                walk(dir, &path, depth + 1, stamps)?;
            }
            continue;
        }
        if stamps.len() >= MAX_FILES {
            return Err(ScanError::Unsafe {
                path: dir.to_owned(),
                reason: format!("more than {MAX_FILES} files: not a state directory"),
            });
        }
        stamps.push(FileStamp {
            path,
            inode: meta.ino(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            changed_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn vm(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(dir.join("sealed")).unwrap();
        fs::write(dir.join("state.toml"), "version = 1\n").unwrap();
        fs::write(dir.join("sealed/tpm-1.key"), b"k").unwrap();
        dir
    }

    #[test]
    fn a_directory_without_a_state_file_or_named_with_a_dot_is_left_out() {
        let root = tempfile::tempdir().unwrap();
        vm(root.path(), "vm1");
        vm(root.path(), ".vm2");
        fs::create_dir(root.path().join("vm3")).unwrap();
        fs::write(root.path().join("vm4"), b"a file").unwrap();
        let seen = scan(root.path()).unwrap();
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["vm1"]);
        assert!(matches!(seen["vm1"], VmDir::Complete(_)));
    }

    #[test]
    fn the_fingerprint_moves_with_a_share_file_but_not_with_what_the_coordinator_writes() {
        let root = tempfile::tempdir().unwrap();
        let dir = vm(root.path(), "vm1");
        let before = scan(root.path()).unwrap();
        fs::write(dir.join("audit.log"), b"{}\n").unwrap();
        std::os::unix::net::UnixListener::bind(dir.join(BROKER_SOCKET)).unwrap();
        fs::create_dir(dir.join(".ksabc")).unwrap();
        assert_eq!(scan(root.path()).unwrap(), before);
        fs::write(dir.join("sealed/tpm-1.key"), b"another key").unwrap();
        assert_ne!(scan(root.path()).unwrap(), before);
    }

    #[test]
    fn a_vm_directory_others_may_write_is_unusable_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let dir = vm(root.path(), "vm1");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let seen = scan(root.path()).unwrap();
        let VmDir::Unusable(reason) = &seen["vm1"] else {
            panic!("{seen:?}");
        };
        assert!(reason.contains("writable by group or others"), "{reason}");
    }

    #[test]
    fn a_share_file_others_may_write_or_a_symlink_makes_the_vm_unusable() {
        let root = tempfile::tempdir().unwrap();
        let dir = vm(root.path(), "vm1");
        let key = dir.join("sealed/tpm-1.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o666)).unwrap();
        let seen = scan(root.path()).unwrap();
        assert!(
            matches!(&seen["vm1"], VmDir::Unusable(r) if r.contains("tpm-1.key") && r.contains("writable")),
            "{seen:?}"
        );
        fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &key).unwrap();
        let seen = scan(root.path()).unwrap();
        assert!(
            matches!(&seen["vm1"], VmDir::Unusable(r) if r.contains("symbolic link")),
            "{seen:?}"
        );
    }

    /// Review L3: a FIFO hung the load for good; a hard link made the audit log append to
    /// another file.
    #[test]
    fn a_fifo_or_a_hard_link_makes_the_vm_unusable_and_rotated_audit_logs_do_not_count() {
        let root = tempfile::tempdir().unwrap();
        let dir = vm(root.path(), "vm1");
        let before = scan(root.path()).unwrap();
        fs::write(dir.join("audit.log.1"), b"{}\n").unwrap();
        assert_eq!(scan(root.path()).unwrap(), before);

        let elsewhere = root.path().join("victim.txt");
        fs::write(&elsewhere, b"not the coordinator's").unwrap();
        fs::hard_link(&elsewhere, dir.join("audit.log")).unwrap();
        let seen = scan(root.path()).unwrap();
        assert!(
            matches!(&seen["vm1"], VmDir::Unusable(r) if r.contains("hard links")),
            "{seen:?}"
        );
        fs::remove_file(dir.join("audit.log")).unwrap();

        nix::unistd::mkfifo(&dir.join("manifest.toml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let seen = scan(root.path()).unwrap();
        assert!(
            matches!(&seen["vm1"], VmDir::Unusable(r) if r.contains("FIFO")),
            "{seen:?}"
        );
    }

    #[test]
    fn a_symlinked_vm_directory_is_unusable() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        vm(elsewhere.path(), "real");
        std::os::unix::fs::symlink(elsewhere.path().join("real"), root.path().join("vm1")).unwrap();
        let seen = scan(root.path()).unwrap();
        assert!(
            matches!(&seen["vm1"], VmDir::Unusable(r) if r.contains("symbolic link")),
            "{seen:?}"
        );
    }
}
