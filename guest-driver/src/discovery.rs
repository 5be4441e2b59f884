//! Finding keyshard devices in a guest: every `<sysfs>/block/<name>/serial` that starts with
//! `ksf-` names a fragment device at `/dev/<name>`, and one that starts with `ksb-` the broker
//! mailbox (one is expected). Devices with other serials, or none, are passed over.

use std::io;
use std::path::{Path, PathBuf};

use crate::serial::{self, BROKER_SERIAL_PREFIX};

/// Where sysfs is mounted in a running system.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list block devices in {}: {source}", dir.display())]
    ListBlockDevices { dir: PathBuf, source: io::Error },
    #[error(
        "several broker devices (serial {BROKER_SERIAL_PREFIX}...), one is expected: {}",
        names.join(", ")
    )]
    SeveralBrokers { names: Vec<String> },
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// A block device whose serial says it is a keyshard device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyshardDevice {
    /// The kernel's name, e.g. `vdb`.
    pub name: String,
    /// `/dev/<name>`.
    pub path: PathBuf,
    /// `ksf-<holder-id>` or `ksb-<vm-id>`.
    pub serial: String,
}

impl KeyshardDevice {
    /// `/dev/vdd (ksb-vm-7)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.path.display(), self.serial)
    }
}

/// The keyshard devices listed in sysfs, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub fragments: Vec<KeyshardDevice>,
    pub brokers: Vec<KeyshardDevice>,
}

impl Devices {
    /// The broker mailbox, if there is one; more than one is an error that names them all.
    pub fn broker(&self) -> Result<Option<&KeyshardDevice>> {
        match self.brokers.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            several => Err(DiscoveryError::SeveralBrokers {
                names: several.iter().map(KeyshardDevice::describe).collect(),
            }),
        }
    }
}

/// The fragment devices and broker mailboxes listed under `sysfs_root`.
pub fn devices(sysfs_root: &Path) -> Result<Devices> {
    let dir = sysfs_root.join("block");
    let entries = std::fs::read_dir(&dir).map_err(|source| DiscoveryError::ListBlockDevices {
        dir: dir.clone(),
        source,
    })?;
    let mut found = Devices::default();
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
        let list = if serial::is_fragment_serial(&serial) {
            &mut found.fragments
        } else if serial::is_broker_serial(&serial) {
            &mut found.brokers
        } else {
            log::debug!("{name}: serial {serial:?} is not a keyshard device's");
            continue;
        };
        list.push(KeyshardDevice {
            path: Path::new("/dev").join(&name),
            name,
            serial,
        });
    }
    found.fragments.sort_by(|a, b| a.name.cmp(&b.name));
    found.brokers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The fragment devices listed under `sysfs_root`, sorted by name.
pub fn fragment_devices(sysfs_root: &Path) -> Result<Vec<KeyshardDevice>> {
    Ok(devices(sysfs_root)?.fragments)
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
                KeyshardDevice {
                    name: "vdb".into(),
                    path: "/dev/vdb".into(),
                    serial: "ksf-vhd-1".into(),
                },
                KeyshardDevice {
                    name: "vdc".into(),
                    path: "/dev/vdc".into(),
                    serial: "ksf-vhd-2".into(),
                },
            ]
        );
    }

    #[test]
    fn the_ksb_device_is_the_broker_and_two_of_them_are_an_error() {
        let root = tempfile::tempdir().unwrap();
        block_device(root.path(), "vdb", Some(b"ksf-vhd-1\n"));
        block_device(root.path(), "vdd", Some(b"ksb-vm-7\0\0\0"));
        let found = devices(root.path()).unwrap();
        assert_eq!(found.fragments.len(), 1);
        let broker = found.broker().unwrap().unwrap();
        assert_eq!(broker.path, Path::new("/dev/vdd"));
        assert_eq!(broker.serial, "ksb-vm-7");

        block_device(root.path(), "vdc", Some(b"ksb-vm-8\n"));
        let found = devices(root.path()).unwrap();
        let error = found.broker().unwrap_err();
        assert_eq!(
            error.to_string(),
            "several broker devices (serial ksb-...), one is expected: \
             /dev/vdc (ksb-vm-8), /dev/vdd (ksb-vm-7)"
        );
        // The fragment devices are still listed.
        assert_eq!(fragment_devices(root.path()).unwrap().len(), 1);
    }

    #[test]
    fn without_a_ksb_device_there_is_no_broker() {
        let root = tempfile::tempdir().unwrap();
        block_device(root.path(), "vdb", Some(b"ksf-vhd-1\n"));
        assert_eq!(devices(root.path()).unwrap().broker().unwrap(), None);
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
