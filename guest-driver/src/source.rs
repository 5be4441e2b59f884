//! Fragment sources: where a fragment volume is read from (a vhost-user socket, a block device or
//! an image file), and what one source yielded, turned into quorum candidates named after it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use keyshard_core::HolderId;
use keyshard_core::fragment::Fragment;
use keyshard_core::quorum::Candidate;
use keyshard_core::volume::{self, MAX_VOLUME_LEN, VolumeError};
use zeroize::Zeroizing;

use crate::block_device::{BlockDevice, BlockDeviceError};
use crate::serial;
use crate::vhost_user::{FrontendError, VhostUserBlk};
use crate::worker::WorkerLauncher;
use crate::worker::probe::{self, ProbeFailure, ProbeScope, ProbeTarget};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Device(#[from] BlockDeviceError),
    #[error("not a fragment volume: {0}")]
    Volume(#[from] VolumeError),
    #[error("{0}")]
    Worker(String),
    #[error("no answer by the deadline")]
    NoAnswer,
}

pub type Result<T> = std::result::Result<T, SourceError>;

/// The bytes at the start of a device, enough for any fragment volume, and its serial.
#[derive(Debug)]
pub struct VolumeRead {
    pub serial: Option<String>,
    pub volume: Zeroizing<Vec<u8>>,
}

/// Something a fragment volume can be read from.
pub trait VolumeSource: Send {
    /// Where it is, as a user names it: `/dev/vdb`, `socket /run/vhd-1.sock`.
    fn location(&self) -> String;

    /// The serial, when it is known without reading the device (from sysfs).
    fn known_serial(&self) -> Option<String> {
        None
    }

    /// Reads the volume, giving up at `deadline` where the medium allows it.
    fn read_volume(&self, deadline: Instant) -> Result<VolumeRead>;
}

/// A source named on the command line or found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A vhost-user-blk device socket, read with the userspace frontend.
    VhostUser(PathBuf),
    /// A block device or image file.
    Device(PathBuf),
}

impl SourceSpec {
    /// The reader for this source: a socket is read here (every wait has a deadline), a device
    /// in a worker running this program; `sysfs_root` is where a block device's serial is
    /// looked up.
    pub fn into_source(self, sysfs_root: &Path) -> Box<dyn VolumeSource> {
        match self {
            Self::VhostUser(socket) => Box::new(VhostUserSource { socket }),
            Self::Device(path) => Box::new(WorkerSource {
                launcher: WorkerLauncher::this_program(),
                path,
                sysfs_root: sysfs_root.to_owned(),
            }),
        }
    }
}

/// How much of a device holds its volume: no valid volume is longer than `MAX_VOLUME_LEN`.
fn volume_len(capacity: u64) -> usize {
    usize::try_from(capacity).map_or(MAX_VOLUME_LEN, |c| c.min(MAX_VOLUME_LEN))
}

/// A fragment device reached over its vhost-user socket.
#[derive(Debug, Clone)]
pub struct VhostUserSource {
    pub socket: PathBuf,
}

impl VolumeSource for VhostUserSource {
    fn location(&self) -> String {
        format!("socket {}", self.socket.display())
    }

    fn read_volume(&self, deadline: Instant) -> Result<VolumeRead> {
        let mut device = VhostUserBlk::connect(&self.socket, deadline)?;
        let serial = device.serial(deadline)?;
        let len = volume_len(device.capacity_bytes());
        let volume = device.read_at(0, len, deadline)?;
        Ok(VolumeRead { serial, volume })
    }
}

/// A fragment device seen as a block device, or an image file, read in this process: for image
/// files and tests. A block device that never answers would hold the reading thread, and the
/// process, for good: the command line reads devices with [`WorkerSource`] instead.
#[derive(Debug, Clone)]
pub struct DeviceSource {
    pub path: PathBuf,
    pub serial: Option<String>,
    pub sysfs_root: PathBuf,
}

impl VolumeSource for DeviceSource {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn known_serial(&self) -> Option<String> {
        self.serial.clone()
    }

    /// A block device read has no timeout of its own; the agent stops waiting at the deadline.
    fn read_volume(&self, _deadline: Instant) -> Result<VolumeRead> {
        let mut device = BlockDevice::open(&self.path)?;
        let serial = self
            .serial
            .clone()
            .or_else(|| device.serial(&self.sysfs_root));
        let len = volume_len(device.capacity_bytes());
        let volume = device.read_at(0, len)?;
        Ok(VolumeRead { serial, volume })
    }
}

/// A block device or image file read in a worker process (see [`crate::worker`]): a device that
/// never answers holds the worker, not the agent.
#[derive(Debug, Clone)]
pub struct WorkerSource {
    pub launcher: WorkerLauncher,
    pub path: PathBuf,
    pub sysfs_root: PathBuf,
}

impl VolumeSource for WorkerSource {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn read_volume(&self, deadline: Instant) -> Result<VolumeRead> {
        let target = ProbeTarget::Path {
            path: self.path.clone(),
            sysfs_root: self.sysfs_root.clone(),
        };
        let probed = probe::probe(
            &self.launcher,
            &target,
            ProbeScope::FragmentVolume,
            deadline,
        );
        let serial = probed.serial().map(str::to_owned);
        match (probed.serial, probed.volume) {
            (Err(ProbeFailure::NoAnswer), _) | (Ok(_), Some(Err(ProbeFailure::NoAnswer))) => {
                Err(SourceError::NoAnswer)
            }
            (Err(ProbeFailure::Failed(why)), _) | (Ok(_), Some(Err(ProbeFailure::Failed(why)))) => {
                Err(SourceError::Worker(why))
            }
            (Ok(_), Some(Ok(volume))) => Ok(VolumeRead { serial, volume }),
            (Ok(_), None) => Err(SourceError::Worker("the worker read no volume".into())),
        }
    }
}

/// What one source yielded: its fragments' bytes (parsed later, by the quorum), or why not.
#[derive(Debug, Clone)]
pub struct SourceReport {
    pub location: String,
    pub serial: Option<String>,
    pub fragments: std::result::Result<Vec<Zeroizing<Vec<u8>>>, String>,
}

impl SourceReport {
    /// Splits what was read into fragments; a read error or a bad volume is the reason the
    /// source is unavailable.
    pub fn from_read(
        location: String,
        known_serial: Option<String>,
        read: Result<VolumeRead>,
    ) -> Self {
        match read {
            Ok(read) => Self {
                location,
                serial: read.serial.or(known_serial),
                fragments: Self::from_volume(&read.volume),
            },
            Err(e) => Self::unavailable(location, known_serial, e.to_string()),
        }
    }

    /// The fragments of a volume's bytes, or why they are not a fragment volume.
    pub fn from_volume(volume: &[u8]) -> std::result::Result<Vec<Zeroizing<Vec<u8>>>, String> {
        volume::decode(volume)
            .map(|fragments| {
                fragments
                    .into_iter()
                    .map(|bytes| Zeroizing::new(bytes.to_vec()))
                    .collect()
            })
            .map_err(|e| SourceError::Volume(e).to_string())
    }

    pub fn unavailable(location: String, serial: Option<String>, reason: String) -> Self {
        Self {
            location,
            serial,
            fragments: Err(reason),
        }
    }

    /// How the source is named in the quorum's account: `ksf-vhd-1 (/dev/vdb)` when the serial
    /// is known, else the location.
    pub fn name(&self) -> String {
        match &self.serial {
            Some(serial) if !serial.is_empty() => format!("{serial} ({})", self.location),
            _ => self.location.clone(),
        }
    }

    /// One candidate per fragment, or one unavailable candidate with the reason.
    pub fn candidates(&self) -> Vec<Candidate> {
        let name = self.name();
        match &self.fragments {
            Err(reason) => vec![Candidate::unavailable(name, reason.clone())],
            Ok(fragments) if fragments.len() == 1 => fragments
                .iter()
                .map(|bytes| Candidate::new(name.clone(), bytes.to_vec()))
                .collect(),
            Ok(fragments) => fragments
                .iter()
                .enumerate()
                .map(|(i, bytes)| Candidate::new(format!("{name} #{}", i + 1), bytes.to_vec()))
                .collect(),
        }
    }

    /// The holders this source answered for: the one its serial names, and those named by the
    /// fragments that parse (signatures are the quorum's business).
    pub fn holder_ids(&self) -> Vec<HolderId> {
        let from_serial = self.serial.as_deref().and_then(serial::holder_id);
        let from_fragments = self
            .fragments
            .iter()
            .flatten()
            .filter_map(|bytes| Fragment::parse(bytes).ok())
            .map(|fragment| fragment.header().holder_id.clone());
        from_serial.into_iter().chain(from_fragments).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dealt_fragments, vhd_volume};

    #[test]
    fn names_say_which_device_by_serial_and_location() {
        let report = |serial: Option<&str>| SourceReport {
            location: "/dev/vdb".into(),
            serial: serial.map(str::to_owned),
            fragments: Err("gone".into()),
        };
        assert_eq!(report(Some("ksf-vhd-1")).name(), "ksf-vhd-1 (/dev/vdb)");
        assert_eq!(report(None).name(), "/dev/vdb");
        assert_eq!(report(Some("")).name(), "/dev/vdb");
    }

    #[test]
    fn a_volume_becomes_one_candidate_per_fragment() {
        let dealt = dealt_fragments(3);
        let volume = volume::encode(&[&dealt.fragments[0], &dealt.fragments[2]]).unwrap();
        let report = SourceReport::from_read(
            "socket /s".into(),
            None,
            Ok(VolumeRead {
                serial: Some("ksf-vhd-1".into()),
                volume: Zeroizing::new(volume),
            }),
        );
        let candidates = report.candidates();
        let names: Vec<_> = candidates.iter().map(|c| c.source.as_str()).collect();
        assert_eq!(
            names,
            ["ksf-vhd-1 (socket /s) #1", "ksf-vhd-1 (socket /s) #2"]
        );
        assert_eq!(
            candidates[1].content.as_ref().unwrap().as_slice(),
            dealt.fragments[2].as_slice()
        );
        let ids: Vec<_> = report.holder_ids().into_iter().map(String::from).collect();
        assert_eq!(ids, ["vhd-1", "vhd-1", "vhd-3"]);
    }

    #[test]
    fn a_bad_volume_or_a_failed_read_is_one_unavailable_candidate() {
        let garbage = SourceReport::from_read(
            "/dev/vdb".into(),
            Some("ksf-vhd-2".into()),
            Ok(VolumeRead {
                serial: None,
                volume: Zeroizing::new(vec![0u8; 512]),
            }),
        );
        let candidates = garbage.candidates();
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].source, "ksf-vhd-2 (/dev/vdb)");
        assert_eq!(
            candidates[0].content.as_ref().unwrap_err(),
            "not a fragment volume: not a keyshard fragment volume (bad magic)"
        );
        // The serial still says which holder it was.
        assert_eq!(garbage.holder_ids(), [HolderId::new("vhd-2").unwrap()]);

        let failed = SourceReport::from_read(
            "/dev/vdc".into(),
            None,
            Err(SourceError::Frontend(FrontendError::HandshakeTimeout)),
        );
        assert_eq!(
            failed.candidates()[0].content.as_ref().unwrap_err(),
            "no answer to the vhost-user handshake before the deadline"
        );
        assert!(failed.holder_ids().is_empty());
    }

    #[test]
    fn an_image_file_source_reads_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let dealt = dealt_fragments(2);
        let path = dir.path().join("vhd-1.img");
        let volume = vhd_volume(&dealt, 0);
        std::fs::write(&path, &volume).unwrap();
        let source = DeviceSource {
            path: path.clone(),
            serial: None,
            sysfs_root: dir.path().to_owned(),
        };
        assert_eq!(source.location(), path.display().to_string());
        let read = source.read_volume(Instant::now()).unwrap();
        assert_eq!(read.serial, None);
        assert_eq!(&read.volume[..], &volume[..]);
    }

    #[test]
    fn a_device_larger_than_any_volume_is_read_only_as_far_as_a_volume_goes() {
        assert_eq!(volume_len(512), 512);
        assert_eq!(volume_len(1 << 40), MAX_VOLUME_LEN);
    }
}
