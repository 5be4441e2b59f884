//! Probing one block device in a worker: its serial (a GET_ID request, when read from sysfs) and,
//! for a fragment device, its fragment volume. The worker reports the serial first, so a device
//! that answers GET_ID but then hangs is still named.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use keyshard_core::volume::MAX_VOLUME_LEN;
use zeroize::Zeroizing;

use super::wire::Record;
use super::{RecordWriter, WorkerError, WorkerLauncher, option_arg};
use crate::block_device::BlockDevice;
use crate::serial;

/// Which device a probe reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// A block device the kernel lists as `<sysfs_root>/block/<name>`, at `<dev_root>/<name>`.
    Listed {
        sysfs_root: PathBuf,
        dev_root: PathBuf,
        name: String,
    },
    /// A block device or image file named on the command line; always read.
    Path { path: PathBuf, sysfs_root: PathBuf },
}

impl ProbeTarget {
    /// Where the device is, as a user names it: `/dev/vdb`.
    pub fn location(&self) -> String {
        match self {
            Self::Listed { dev_root, name, .. } => dev_root.join(name).display().to_string(),
            Self::Path { path, .. } => path.display().to_string(),
        }
    }

    /// The worker's arguments after `worker probe`.
    fn args(&self, scope: ProbeScope) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["probe".into()];
        match self {
            Self::Listed {
                sysfs_root,
                dev_root,
                name,
            } => {
                args.push(option_arg("sysfs-root", sysfs_root));
                args.push(option_arg("dev-root", dev_root));
                args.push(option_arg("name", name));
            }
            Self::Path { path, sysfs_root } => {
                args.push(option_arg("sysfs-root", sysfs_root));
                args.push(option_arg("path", path));
            }
        }
        if scope == ProbeScope::SerialOnly {
            args.push("--serial-only".into());
        }
        args
    }
}

/// How much a probe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeScope {
    /// The serial only.
    SerialOnly,
    /// The serial, then the fragment volume of a fragment device (`ksf-` serial) or of a device
    /// named by path.
    FragmentVolume,
}

/// Why a probe did not learn something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The device (or the worker) had not answered by the deadline.
    NoAnswer,
    /// It answered with an error, or the worker failed: why.
    Failed(String),
}

impl ProbeFailure {
    /// The reason as a user reads it; `timeout` is the wait the user gave.
    pub fn describe(&self, timeout: std::time::Duration) -> String {
        match self {
            Self::NoAnswer => format!(
                "no answer within {}",
                crate::agent::describe_timeout(timeout)
            ),
            Self::Failed(why) => why.clone(),
        }
    }
}

impl From<WorkerError> for ProbeFailure {
    fn from(error: WorkerError) -> Self {
        match error {
            WorkerError::Timeout(_) => Self::NoAnswer,
            other => Self::Failed(other.to_string()),
        }
    }
}

/// What a probe found out by its deadline.
#[derive(Debug)]
pub struct Probed {
    pub location: String,
    /// The device's serial (empty: it has none), or why it is not known.
    pub serial: Result<String, ProbeFailure>,
    /// The fragment volume when it was to be read: its bytes, or why not.
    pub volume: Option<Result<Zeroizing<Vec<u8>>, ProbeFailure>>,
}

impl Probed {
    /// The serial, when the device gave one.
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref().ok().filter(|s| !s.is_empty())
    }
}

/// Probes `target` in a worker, giving up at `deadline`.
pub fn probe(
    launcher: &WorkerLauncher,
    target: &ProbeTarget,
    scope: ProbeScope,
    deadline: Instant,
) -> Probed {
    let location = target.location();
    let mut worker = match launcher.spawn(&target.args(scope)) {
        Ok(worker) => worker,
        Err(e) => {
            return Probed {
                location,
                serial: Err(e.into()),
                volume: None,
            };
        }
    };
    let mut serial: Option<Result<String, ProbeFailure>> = None;
    let mut volume = None;
    let ended = loop {
        match worker.next_record(deadline) {
            Ok(Some(Record::Serial(text))) => serial = Some(Ok(text)),
            Ok(Some(Record::Volume(bytes))) => volume = Some(Ok(bytes)),
            // A failure after the serial is the volume's; before it, the serial's.
            Ok(Some(Record::Failed(why))) if serial.is_some() => {
                volume = Some(Err(ProbeFailure::Failed(why)));
            }
            Ok(Some(Record::Failed(why))) => serial = Some(Err(ProbeFailure::Failed(why))),
            Ok(Some(other)) => log::debug!("{location}: unexpected worker record {other:?}"),
            Ok(None) => break ProbeFailure::from(WorkerError::Ended),
            Err(e) => break ProbeFailure::from(e),
        }
    };
    let serial = serial.unwrap_or_else(|| Err(ended.clone()));
    // A volume that was due but never came is a failure, not an absence.
    let volume_due = serial.as_deref().is_ok_and(|serial| {
        scope == ProbeScope::FragmentVolume
            && (matches!(target, ProbeTarget::Path { .. }) || serial::is_fragment_serial(serial))
    });
    if volume_due && volume.is_none() {
        volume = Some(Err(ended));
    }
    Probed {
        location,
        serial,
        volume,
    }
}

/// The worker's side: reads the serial, reports it, then reads and reports the volume when it
/// is wanted. Failures are reported, never fatal: the agent decides.
pub fn run(target: &ProbeTarget, scope: ProbeScope, out: &mut RecordWriter<impl std::io::Write>) {
    let serial = match read_serial(target) {
        Ok(serial) => serial,
        Err(why) => {
            out.emit(&Record::Failed(why));
            return;
        }
    };
    if !out.emit(&Record::Serial(serial.clone())) {
        return;
    }
    let read_it = match target {
        ProbeTarget::Path { .. } => true,
        ProbeTarget::Listed { .. } => serial::is_fragment_serial(&serial),
    };
    if scope == ProbeScope::SerialOnly || !read_it {
        return;
    }
    let path = match target {
        ProbeTarget::Listed { dev_root, name, .. } => dev_root.join(name),
        ProbeTarget::Path { path, .. } => path.clone(),
    };
    let record = match read_volume(&path) {
        Ok(volume) => Record::Volume(volume),
        Err(why) => Record::Failed(why),
    };
    out.emit(&record);
}

fn read_serial(target: &ProbeTarget) -> Result<String, String> {
    match target {
        ProbeTarget::Listed {
            sysfs_root, name, ..
        } => {
            let path = sysfs_root.join("block").join(name).join("serial");
            match std::fs::read(&path) {
                Ok(raw) => Ok(serial::printable(&raw)),
                // Most block devices (loop, ram, disks without a serial) have no serial file.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
            }
        }
        ProbeTarget::Path { path, sysfs_root } => {
            let device = BlockDevice::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(device.serial(sysfs_root).unwrap_or_default())
        }
    }
}

fn read_volume(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut device = BlockDevice::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len =
        usize::try_from(device.capacity_bytes()).map_or(MAX_VOLUME_LEN, |c| c.min(MAX_VOLUME_LEN));
    device.read_at(0, len).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(root: &Path, name: &str) -> ProbeTarget {
        ProbeTarget::Listed {
            sysfs_root: root.join("sys"),
            dev_root: root.join("dev"),
            name: name.into(),
        }
    }

    fn run_here(target: &ProbeTarget, scope: ProbeScope) -> Vec<Record> {
        let mut out = Vec::new();
        run(target, scope, &mut RecordWriter::new(&mut out));
        let mut records = Vec::new();
        while let Some(record) = Record::take(&mut out).unwrap() {
            records.push(record);
        }
        records
    }

    fn device(root: &Path, name: &str, serial: Option<&str>, content: &[u8]) {
        let sys = root.join("sys/block").join(name);
        std::fs::create_dir_all(&sys).unwrap();
        if let Some(serial) = serial {
            std::fs::write(sys.join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("dev").join(name), content).unwrap();
    }

    #[test]
    fn a_fragment_device_reports_its_serial_then_its_volume() {
        let root = tempfile::tempdir().unwrap();
        device(root.path(), "vdb", Some("ksf-vhd-1\n"), &[5u8; 1024]);
        let records = run_here(&listed(root.path(), "vdb"), ProbeScope::FragmentVolume);
        assert_eq!(
            records,
            [
                Record::Serial("ksf-vhd-1".into()),
                Record::Volume(Zeroizing::new(vec![5u8; 1024]))
            ]
        );
        // Serial only: the volume is not read.
        let records = run_here(&listed(root.path(), "vdb"), ProbeScope::SerialOnly);
        assert_eq!(records, [Record::Serial("ksf-vhd-1".into())]);
    }

    #[test]
    fn other_devices_report_only_their_serial() {
        let root = tempfile::tempdir().unwrap();
        device(root.path(), "vda", Some("ks-volume"), &[0u8; 512]);
        device(root.path(), "vdc", None, &[0u8; 512]);
        device(root.path(), "vdd", Some("ksb-vm1"), &[0u8; 512]);
        for (name, serial) in [("vda", "ks-volume"), ("vdc", ""), ("vdd", "ksb-vm1")] {
            let records = run_here(&listed(root.path(), name), ProbeScope::FragmentVolume);
            assert_eq!(records, [Record::Serial(serial.into())], "{name}");
        }
    }

    #[test]
    fn a_fragment_device_that_cannot_be_read_is_a_failure_after_its_serial() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys/block/vde");
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("serial"), "ksf-vhd-5").unwrap();
        let records = run_here(&listed(root.path(), "vde"), ProbeScope::FragmentVolume);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0], Record::Serial("ksf-vhd-5".into()));
        assert!(
            matches!(&records[1], Record::Failed(why) if why.contains("vde")),
            "{records:?}"
        );
    }

    #[test]
    fn a_named_image_file_is_read_whatever_its_serial() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("vhd-1.img");
        std::fs::write(&path, [3u8; 512]).unwrap();
        let target = ProbeTarget::Path {
            path,
            sysfs_root: root.path().join("sys"),
        };
        assert_eq!(
            run_here(&target, ProbeScope::FragmentVolume),
            [
                Record::Serial(String::new()),
                Record::Volume(Zeroizing::new(vec![3u8; 512]))
            ]
        );
    }
}
