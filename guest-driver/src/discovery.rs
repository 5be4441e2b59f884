//! Finding fragment devices in a guest: every `<sysfs>/block/<name>/serial` that starts with
//! `ksf-` names a fragment device at `/dev/<name>`. Devices with other serials, or none, are not
//! fragment devices and are passed over.

use std::io;
use std::path::{Path, PathBuf};

use crate::serial;

/// Where sysfs is mounted in a running system.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list block devices in {}: {source}", dir.display())]
    ListBlockDevices { dir: PathBuf, source: io::Error },
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// A block device whose serial says it is a fragment device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentDevice {
    /// The kernel's name, e.g. `vdb`.
    pub name: String,
    /// `/dev/<name>`.
    pub path: PathBuf,
    /// `ksf-<holder-id>`.
    pub serial: String,
}

/// The fragment devices listed under `sysfs_root`, sorted by name.
pub fn fragment_devices(sysfs_root: &Path) -> Result<Vec<FragmentDevice>> {
    let dir = sysfs_root.join("block");
    let entries = std::fs::read_dir(&dir).map_err(|source| DiscoveryError::ListBlockDevices {
        dir: dir.clone(),
        source,
    })?;
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DiscoveryError::ListBlockDevices {
            dir: dir.clone(),
            source,
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let serial_path = entry.path().join("serial");
        let raw = match std::fs::read(&serial_path) {
            Ok(raw) => raw,
            // Most block devices (loop, ram, disks without a serial) have no serial file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                log::warn!("{}: cannot read: {e}", serial_path.display());
                continue;
            }
        };
        let serial = serial::printable(&raw);
        if !serial::is_fragment_serial(&serial) {
            log::debug!("{name}: serial {serial:?} is not a fragment device's");
            continue;
        }
        devices.push(FragmentDevice {
            path: Path::new("/dev").join(&name),
            name,
            serial,
        });
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_device(root: &Path, name: &str, serial: Option<&[u8]>) {
        let dir = root.join("block").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(serial) = serial {
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
    }

    #[test]
    fn finds_ksf_devices_and_passes_over_the_rest() {
        let root = tempfile::tempdir().unwrap();
        block_device(root.path(), "vdc", Some(b"ksf-vhd-2\n"));
        block_device(root.path(), "vda", Some(b"root-disk\n"));
        block_device(root.path(), "vdb", Some(b"ksf-vhd-1\n"));
        block_device(root.path(), "vdd", Some(b"ksb-vm-7\n"));
        block_device(root.path(), "loop0", None);
        block_device(root.path(), "sda", Some(b""));
        let found = fragment_devices(root.path()).unwrap();
        assert_eq!(
            found,
            vec![
                FragmentDevice {
                    name: "vdb".into(),
                    path: "/dev/vdb".into(),
                    serial: "ksf-vhd-1".into(),
                },
                FragmentDevice {
                    name: "vdc".into(),
                    path: "/dev/vdc".into(),
                    serial: "ksf-vhd-2".into(),
                },
            ]
        );
    }

    #[test]
    fn an_unreadable_serial_is_passed_over() {
        let root = tempfile::tempdir().unwrap();
        block_device(root.path(), "vdb", Some(b"ksf-vhd-1\n"));
        // A directory where the serial file should be: reading it fails with EISDIR.
        std::fs::create_dir_all(root.path().join("block/vdc/serial")).unwrap();
        let names: Vec<_> = fragment_devices(root.path())
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["vdb"]);
    }

    #[test]
    fn no_block_directory_is_an_error_and_an_empty_one_is_not() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            fragment_devices(root.path()),
            Err(DiscoveryError::ListBlockDevices { .. })
        ));
        std::fs::create_dir(root.path().join("block")).unwrap();
        assert_eq!(fragment_devices(root.path()).unwrap(), vec![]);
    }
}
