//! The broker mailbox as a device: write one request at offset 0 of the request area, read the
//! answer area back. Reached over its vhost-user socket on a host, or as a block device (or image
//! file) in a guest, always bypassing the page cache so every read sees the device's answer now.

use std::path::{Path, PathBuf};
use std::time::Instant;

use keyshard_core::broker::AREA_LEN;
use zeroize::Zeroizing;

use crate::block_device::{BlockDevice, BlockDeviceError, DIRECT_ALIGN};
use crate::serial;
use crate::vhost_user::{FrontendError, VhostUserBlk};

/// Where the answer area starts.
pub const ANSWER_OFFSET: u64 = AREA_LEN as u64;
/// The request area and the answer area.
pub const MAILBOX_LEN: u64 = 2 * AREA_LEN as u64;

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Device(#[from] BlockDeviceError),
    #[error("not a broker mailbox: its serial is {serial:?}")]
    NotABroker { serial: String },
    #[error("{capacity} bytes are too small for a broker mailbox ({MAILBOX_LEN} bytes)")]
    TooSmall { capacity: u64 },
    #[error("the device is read-only; a broker mailbox must take writes")]
    ReadOnly,
    #[error("a block device read through the page cache would never see a new answer")]
    PageCache,
    #[error("a request of {len} bytes does not fit the {AREA_LEN}-byte request area")]
    RequestTooLarge { len: usize },
}

pub type Result<T> = std::result::Result<T, MailboxError>;

/// A broker mailbox device.
pub trait Mailbox: Send {
    /// Where it is, as a user names it: `/dev/vdd`, `socket /run/ksb-vm-7.sock`.
    fn location(&self) -> String;

    /// Writes one encoded request at offset 0, zero-padded to whole sectors.
    fn write_request(&mut self, request: &[u8], deadline: Instant) -> Result<()>;

    /// Reads the first `len` bytes of the answer area (`len` at most [`AREA_LEN`]).
    fn read_answer(&mut self, len: usize, deadline: Instant) -> Result<Zeroizing<Vec<u8>>>;
}

/// A broker mailbox named on the command line or found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxSpec {
    /// A broker device's vhost-user-blk socket, used with the userspace frontend.
    VhostUser(PathBuf),
    /// A block device or image file; the serial, if discovery found it.
    Device {
        path: PathBuf,
        serial: Option<String>,
    },
}

impl MailboxSpec {
    /// The mailbox; nothing is opened until the first request.
    pub fn into_mailbox(self, sysfs_root: &Path) -> Box<dyn Mailbox> {
        match self {
            Self::VhostUser(socket) => Box::new(VhostUserMailbox::new(socket)),
            Self::Device { path, serial } => Box::new(DeviceMailbox {
                path,
                serial,
                sysfs_root: sysfs_root.to_owned(),
                device: None,
            }),
        }
    }

    pub fn location(&self) -> String {
        match self {
            Self::VhostUser(socket) => socket_location(socket),
            Self::Device { path, .. } => path.display().to_string(),
        }
    }
}

fn socket_location(socket: &Path) -> String {
    format!("socket {}", socket.display())
}

/// `request`, zero-padded to a multiple of `unit` bytes; it must fit the request area.
pub fn padded(request: &[u8], unit: u64) -> Result<Zeroizing<Vec<u8>>> {
    let unit = usize::try_from(unit.max(1)).unwrap_or(usize::MAX);
    let len = request
        .len()
        .div_ceil(unit)
        .max(1)
        .checked_mul(unit)
        .filter(|len| *len <= AREA_LEN)
        .ok_or(MailboxError::RequestTooLarge { len: request.len() })?;
    let mut out = Zeroizing::new(request.to_vec());
    out.resize(len, 0);
    Ok(out)
}

/// Checks what a device says about itself before it is used as a mailbox.
fn check_device(serial: Option<&str>, capacity: u64, read_only: bool) -> Result<()> {
    if let Some(serial) = serial.filter(|s| !s.is_empty() && !serial::is_broker_serial(s)) {
        return Err(MailboxError::NotABroker {
            serial: serial.to_owned(),
        });
    }
    if capacity < MAILBOX_LEN {
        return Err(MailboxError::TooSmall { capacity });
    }
    if read_only {
        return Err(MailboxError::ReadOnly);
    }
    Ok(())
}

/// A broker mailbox reached over its vhost-user socket. The connection is made at the first
/// request and made again after a failure.
#[derive(Debug)]
pub struct VhostUserMailbox {
    socket: PathBuf,
    device: Option<VhostUserBlk>,
}

impl VhostUserMailbox {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            device: None,
        }
    }

    fn connected(&mut self, deadline: Instant) -> Result<&mut VhostUserBlk> {
        let device = match self.device.take() {
            Some(device) => device,
            None => {
                let mut device = VhostUserBlk::connect(&self.socket, deadline)?;
                let serial = device.serial(deadline)?;
                check_device(
                    serial.as_deref(),
                    device.capacity_bytes(),
                    device.is_read_only(),
                )?;
                log::debug!(
                    "{}: broker mailbox {}",
                    self.location(),
                    serial.as_deref().unwrap_or("without a serial")
                );
                device
            }
        };
        Ok(self.device.insert(device))
    }

    /// Runs `f` on the connection; a failed connection is dropped, to be made again next time.
    fn with_device<T>(
        &mut self,
        deadline: Instant,
        f: impl FnOnce(&mut VhostUserBlk) -> std::result::Result<T, FrontendError>,
    ) -> Result<T> {
        let device = self.connected(deadline)?;
        let result = f(device);
        if result.is_err() {
            self.device = None;
        }
        Ok(result?)
    }
}

impl Mailbox for VhostUserMailbox {
    fn location(&self) -> String {
        socket_location(&self.socket)
    }

    fn write_request(&mut self, request: &[u8], deadline: Instant) -> Result<()> {
        let block_size = self.connected(deadline)?.block_size();
        let padded = padded(request, block_size)?;
        self.with_device(deadline, |device| device.write_at(0, &padded, deadline))
    }

    fn read_answer(&mut self, len: usize, deadline: Instant) -> Result<Zeroizing<Vec<u8>>> {
        let len = len.min(AREA_LEN);
        self.with_device(deadline, |device| {
            device.read_at(ANSWER_OFFSET, len, deadline)
        })
    }
}

/// A broker mailbox seen as a block device in a guest (or an image file in a test), opened
/// read-write with `O_DIRECT` at the first request.
///
/// Block device I/O has no timeout of its own: a request the device never completes holds this
/// thread, and the agent stops waiting for it at the deadline.
#[derive(Debug)]
pub struct DeviceMailbox {
    path: PathBuf,
    serial: Option<String>,
    sysfs_root: PathBuf,
    device: Option<BlockDevice>,
}

impl DeviceMailbox {
    fn opened(&mut self) -> Result<&mut BlockDevice> {
        let device = match self.device.take() {
            Some(device) => device,
            None => {
                let device = BlockDevice::open_read_write(&self.path)?;
                let serial = self
                    .serial
                    .clone()
                    .or_else(|| device.serial(&self.sysfs_root));
                check_device(serial.as_deref(), device.capacity_bytes(), false)?;
                device
            }
        };
        Ok(self.device.insert(device))
    }
}

impl Mailbox for DeviceMailbox {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn write_request(&mut self, request: &[u8], _deadline: Instant) -> Result<()> {
        // 4096: whole logical blocks for O_DIRECT on 512-byte and 4K-sector disks alike.
        let padded = padded(request, DIRECT_ALIGN)?;
        Ok(self.opened()?.write_at(0, &padded)?)
    }

    fn read_answer(&mut self, len: usize, _deadline: Instant) -> Result<Zeroizing<Vec<u8>>> {
        let device = self.opened()?;
        let answer = device.read_at(ANSWER_OFFSET, len.min(AREA_LEN))?;
        if device.is_block_device() && !device.is_direct() {
            return Err(MailboxError::PageCache);
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_padded_to_whole_units_within_the_request_area() {
        assert_eq!(padded(&[1; 20], 512).unwrap().len(), 512);
        assert_eq!(padded(&[1; 512], 512).unwrap().len(), 512);
        assert_eq!(padded(&[1; 513], 512).unwrap().len(), 1024);
        assert_eq!(padded(&[1; 20], 4096).unwrap().len(), 4096);
        assert_eq!(padded(&[], 512).unwrap().len(), 512);
        let request = padded(&[7; 600], 512).unwrap();
        assert!(request[..600].iter().all(|b| *b == 7));
        assert!(request[600..].iter().all(|b| *b == 0));
        assert_eq!(padded(&[1; AREA_LEN], 4096).unwrap().len(), AREA_LEN);
        assert!(matches!(
            padded(&[1; AREA_LEN + 1], 512),
            Err(MailboxError::RequestTooLarge { len }) if len == AREA_LEN + 1
        ));
    }

    #[test]
    fn only_a_writable_ksb_device_of_32_kib_is_a_mailbox() {
        assert!(check_device(Some("ksb-vm-7"), MAILBOX_LEN, false).is_ok());
        // Without GET_ID there is no serial to check; named explicitly, it is trusted.
        assert!(check_device(None, MAILBOX_LEN, false).is_ok());
        assert_eq!(
            check_device(Some("ksf-vhd-1"), MAILBOX_LEN, false)
                .unwrap_err()
                .to_string(),
            "not a broker mailbox: its serial is \"ksf-vhd-1\""
        );
        assert!(matches!(
            check_device(Some("ksb-vm-7"), 16 * 1024, false),
            Err(MailboxError::TooSmall { capacity: 16384 })
        ));
        assert!(matches!(
            check_device(Some("ksb-vm-7"), MAILBOX_LEN, true),
            Err(MailboxError::ReadOnly)
        ));
    }

    #[test]
    fn an_image_file_mailbox_takes_a_request_and_reads_its_answer_area() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ksb.img");
        std::fs::write(&path, vec![0u8; MAILBOX_LEN as usize]).unwrap();
        let mut mailbox = MailboxSpec::Device {
            path: path.clone(),
            serial: None,
        }
        .into_mailbox(dir.path());
        assert_eq!(mailbox.location(), path.display().to_string());
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        mailbox.write_request(b"KSBM request", deadline).unwrap();
        let mut answer = vec![0u8; 512];
        answer[..6].copy_from_slice(b"answer");
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            &answer,
            ANSWER_OFFSET,
        )
        .unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..12], b"KSBM request");
        assert!(on_disk[12..4096].iter().all(|b| *b == 0));
        assert_eq!(&mailbox.read_answer(100, deadline).unwrap()[..6], b"answer");
    }

    #[test]
    fn a_small_or_missing_device_is_refused_at_the_first_request() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.img");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut mailbox = MailboxSpec::Device {
            path: small,
            serial: None,
        }
        .into_mailbox(dir.path());
        assert!(matches!(
            mailbox.write_request(b"x", deadline),
            Err(MailboxError::TooSmall { capacity: 4096 })
        ));
        let mut absent =
            MailboxSpec::VhostUser(dir.path().join("absent.sock")).into_mailbox(dir.path());
        assert_eq!(
            absent.location(),
            format!("socket {}", dir.path().join("absent.sock").display())
        );
        assert!(matches!(
            absent.read_answer(512, deadline),
            Err(MailboxError::Frontend(FrontendError::Connect(_)))
        ));
    }
}
