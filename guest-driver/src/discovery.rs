//! Finding keyshard devices in a guest. Listing `<sysfs>/block` touches no device, so it is done
//! here; a device's serial (`ksf-<holder>` for a fragment device, `ksb-<vm>` for the broker
//! mailbox) is another matter: reading it sends a GET_ID request to the device, which a hung
//! device never answers. Serials and data are therefore read by a [`DeviceProber`], whose real
//! implementation ([`WorkerProber`]) does it in worker processes (see [`crate::worker`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::shares::ShareFetcher;
use crate::serial;
use crate::worker::WorkerLauncher;
use crate::worker::broker::WorkerBroker;
use crate::worker::probe::{self, ProbeScope, ProbeTarget, Probed};

/// Where sysfs is mounted in a running system.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";
/// Where the kernel's block devices appear.
pub const DEFAULT_DEV_ROOT: &str = "/dev";
/// How long discovery waits for the manifest's devices to appear, unless told otherwise.
pub const DEFAULT_DEVICE_WAIT: Duration = Duration::from_secs(2);
/// How often `<sysfs>/block` is listed again while devices are awaited.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list block devices in {}: {source}", dir.display())]
    ListBlockDevices { dir: PathBuf, source: io::Error },
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// What a device's serial says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Fragment,
    Broker,
    Other,
}

impl DeviceKind {
    pub fn of_serial(serial: &str) -> Self {
        if serial::is_fragment_serial(serial) {
            Self::Fragment
        } else if serial::is_broker_serial(serial) {
            Self::Broker
        } else {
            Self::Other
        }
    }
}

/// The names of the block devices the kernel lists under `sysfs_root`, sorted: no device is
/// touched.
pub fn block_devices(sysfs_root: &Path) -> Result<Vec<String>> {
    let dir = sysfs_root.join("block");
    let list_error = |source| DiscoveryError::ListBlockDevices {
        dir: dir.clone(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Reads what a listed device says about itself, and asks a broker device for shares.
pub trait DeviceProber: Send + Sync {
    /// Where the device `name` is: `/dev/vdb`.
    fn location(&self, name: &str) -> String;

    /// The device's serial and, within `scope`, its fragment volume, by `deadline`.
    fn probe(&self, name: &str, scope: ProbeScope, deadline: Instant) -> Probed;

    /// The broker mailbox device `name`, whose serial is `serial`.
    fn broker(&self, name: &str, serial: &str) -> Box<dyn ShareFetcher>;
}

/// The real prober: every device read in a worker process.
#[derive(Debug, Clone)]
pub struct WorkerProber {
    pub launcher: WorkerLauncher,
    pub sysfs_root: PathBuf,
    pub dev_root: PathBuf,
    /// Whether `sev` shares are asked for with SNP reports (an SEV-SNP guest).
    pub snp: bool,
}

impl WorkerProber {
    fn target(&self, name: &str) -> ProbeTarget {
        ProbeTarget::Listed {
            sysfs_root: self.sysfs_root.clone(),
            dev_root: self.dev_root.clone(),
            name: name.to_owned(),
        }
    }
}

impl DeviceProber for WorkerProber {
    fn location(&self, name: &str) -> String {
        self.target(name).location()
    }

    fn probe(&self, name: &str, scope: ProbeScope, deadline: Instant) -> Probed {
        probe::probe(&self.launcher, &self.target(name), scope, deadline)
    }

    fn broker(&self, name: &str, serial: &str) -> Box<dyn ShareFetcher> {
        Box::new(WorkerBroker {
            launcher: self.launcher.clone(),
            path: self.dev_root.join(name),
            serial: Some(serial.to_owned()),
            sysfs_root: self.sysfs_root.clone(),
            snp: self.snp,
        })
    }
}

/// How to find devices: where sysfs is, who reads the devices, and how long to wait for the
/// devices a manifest lists to appear.
#[derive(Clone)]
pub struct Discovery {
    pub sysfs_root: PathBuf,
    pub prober: Arc<dyn DeviceProber>,
    pub device_wait: Duration,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("sysfs_root", &self.sysfs_root)
            .field("device_wait", &self.device_wait)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_devices_are_listed_by_name_without_reading_them() {
        let root = tempfile::tempdir().unwrap();
        for name in ["vdc", "vda", "loop0"] {
            std::fs::create_dir_all(root.path().join("block").join(name)).unwrap();
        }
        // A serial that would block any reader: listing must not touch it.
        let fifo = root.path().join("block/vdc/serial");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo does not retain it.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert_eq!(block_devices(root.path()).unwrap(), ["loop0", "vda", "vdc"]);
    }

    #[test]
    fn no_block_directory_is_an_error_and_an_empty_one_is_not() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            block_devices(root.path()),
            Err(DiscoveryError::ListBlockDevices { .. })
        ));
        std::fs::create_dir(root.path().join("block")).unwrap();
        assert!(block_devices(root.path()).unwrap().is_empty());
    }

    #[test]
    fn serials_say_what_a_device_is() {
        assert_eq!(DeviceKind::of_serial("ksf-vhd-1"), DeviceKind::Fragment);
        assert_eq!(DeviceKind::of_serial("ksb-vm-7"), DeviceKind::Broker);
        assert_eq!(DeviceKind::of_serial("ks-volume"), DeviceKind::Other);
        assert_eq!(DeviceKind::of_serial(""), DeviceKind::Other);
    }
}
