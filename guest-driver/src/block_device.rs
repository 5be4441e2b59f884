//! Reading and writing a block device or an image file (`--device PATH`, `--broker-device
//! PATH`): `O_DIRECT` through a 4096-aligned buffer, so a guest sees what the device serves now
//! rather than a cached copy, and its writes reach the device before they return; plain I/O where
//! the file system refuses `O_DIRECT` (sysfs, some tmpfs).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Alignment of offsets, lengths and the buffer for `O_DIRECT`: enough for 4K-sector disks.
pub const DIRECT_ALIGN: u64 = 4096;
/// Writes are made of whole sectors of this size.
pub const SECTOR_SIZE: u64 = 512;

/// Why a device could not be read. The path is not repeated in each variant: the caller names
/// the device.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("cannot open: {0}")]
    Open(io::Error),
    #[error("neither a block device nor a regular file")]
    NotADevice,
    #[error("cannot find the size: {0}")]
    Size(io::Error),
    #[error("read at byte {offset} failed: {source}")]
    Read { offset: u64, source: io::Error },
    #[error("bytes {offset}..{end} are beyond its {capacity} bytes")]
    OutOfRange {
        offset: u64,
        end: u64,
        capacity: u64,
    },
    #[error("ended at byte {got} while reading up to {wanted}")]
    ShortRead { got: u64, wanted: u64 },
    #[error("write at byte {offset} failed: {source}")]
    Write { offset: u64, source: io::Error },
    #[error("opened read-only; cannot write")]
    NotWritable,
    #[error("a write of {len} bytes at byte {offset} is not in whole 512-byte sectors")]
    Unaligned { offset: u64, len: usize },
}

pub type Result<T> = std::result::Result<T, BlockDeviceError>;

/// An open block device or image file.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    direct: bool,
    writable: bool,
    is_block_device: bool,
    capacity: u64,
}

impl BlockDevice {
    /// Opens `path` read-only, with `O_DIRECT` when the file system allows it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens `path` for reading and writing (a broker mailbox), with `O_DIRECT` when the file
    /// system allows it.
    pub fn open_read_write(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self> {
        let (file, direct) = match open_file(path, true, writable) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!(
                    "{}: the file system refuses O_DIRECT; going through the page cache",
                    path.display()
                );
                (
                    open_file(path, false, writable).map_err(BlockDeviceError::Open)?,
                    false,
                )
            }
            Err(e) => return Err(BlockDeviceError::Open(e)),
        };
        let file_type = file.metadata().map_err(BlockDeviceError::Open)?.file_type();
        let is_block_device = file_type.is_block_device();
        if !is_block_device && !file_type.is_file() {
            return Err(BlockDeviceError::NotADevice);
        }
        // A block device's metadata says 0 bytes; its end says how large it is.
        let capacity = (&file)
            .seek(SeekFrom::End(0))
            .map_err(BlockDeviceError::Size)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            direct,
            writable,
            is_block_device,
            capacity,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Whether reads and writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether this is a block device (not an image file).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The serial the kernel reports in `<sysfs_root>/block/<name>/serial` for a whole-disk
    /// block device; `None` for an image file, a partition, or a device without one.
    pub fn serial(&self, sysfs_root: &Path) -> Option<String> {
        if !self.is_block_device {
            return None;
        }
        let resolved = std::fs::canonicalize(&self.path).ok()?;
        let name = resolved.file_name()?;
        let raw = std::fs::read(sysfs_root.join("block").join(name).join("serial")).ok()?;
        Some(crate::serial::printable(&raw)).filter(|s| !s.is_empty())
    }

    /// The end of `len` bytes at `offset`, if they lie inside the device.
    fn end_of(&self, offset: u64, len: usize) -> Result<u64> {
        offset
            .checked_add(len as u64)
            .filter(|end| *end <= self.capacity)
            .ok_or(BlockDeviceError::OutOfRange {
                offset,
                end: offset.saturating_add(len as u64),
                capacity: self.capacity,
            })
    }

    /// Reads `len` bytes at byte `offset`.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let end = self.end_of(offset, len)?;
        if self.direct {
            match self.read_direct(offset, end) {
                Err(BlockDeviceError::Read { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    log::debug!(
                        "{}: O_DIRECT read refused; reading through the page cache",
                        self.path.display()
                    );
                    self.reopen_buffered()?;
                }
                other => return other,
            }
        }
        let mut out = Zeroizing::new(vec![0u8; len]);
        let got = self.fill(&mut out, offset)?;
        if got < len {
            return Err(self.short_read(offset + got as u64, end));
        }
        Ok(out)
    }

    /// Writes `data` at byte `offset`, both in whole 512-byte sectors; returns once the device
    /// has the bytes (`O_DIRECT`, or a buffered write and `fdatasync` on a block device).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(BlockDeviceError::NotWritable);
        }
        let len = data.len();
        if !offset.is_multiple_of(SECTOR_SIZE) || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(BlockDeviceError::Unaligned { offset, len });
        }
        self.end_of(offset, len)?;
        if self.direct {
            match self.write_direct(offset, data) {
                Err(BlockDeviceError::Write { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    log::debug!(
                        "{}: O_DIRECT write refused; writing through the page cache",
                        self.path.display()
                    );
                    self.reopen_buffered()?;
                }
                other => return other,
            }
        }
        self.write_all(data, offset)?;
        if self.is_block_device {
            self.file
                .sync_data()
                .map_err(|source| BlockDeviceError::Write { offset, source })?;
        }
        Ok(())
    }

    /// Writes `data` from a buffer aligned for `O_DIRECT`.
    fn write_direct(&self, offset: u64, data: &[u8]) -> Result<()> {
        let align = DIRECT_ALIGN as usize;
        let mut storage = Zeroizing::new(vec![0u8; data.len() + align]);
        let skip = storage.as_ptr().align_offset(align);
        let buffer =
            storage
                .get_mut(skip..skip + data.len())
                .ok_or(BlockDeviceError::Unaligned {
                    offset,
                    len: data.len(),
                })?;
        buffer.copy_from_slice(data);
        self.write_all(buffer, offset)
    }

    /// Writes all of `data` at `offset`.
    fn write_all(&self, data: &[u8], offset: u64) -> Result<()> {
        let mut written = 0;
        while let Some(rest) = data.get(written..).filter(|rest| !rest.is_empty()) {
            let at = offset + written as u64;
            match self.file.write_at(rest, at) {
                Ok(0) => {
                    return Err(BlockDeviceError::Write {
                        offset: at,
                        source: io::Error::from(io::ErrorKind::WriteZero),
                    });
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(BlockDeviceError::Write { offset: at, source }),
            }
        }
        Ok(())
    }

    /// Drops `O_DIRECT` after the file system refused it.
    fn reopen_buffered(&mut self) -> Result<()> {
        self.file = open_file(&self.path, false, self.writable).map_err(BlockDeviceError::Open)?;
        self.direct = false;
        Ok(())
    }

    /// Reads `offset..end` in whole aligned blocks through an aligned buffer.
    fn read_direct(&self, offset: u64, end: u64) -> Result<Zeroizing<Vec<u8>>> {
        let start = offset - offset % DIRECT_ALIGN;
        // Reading past the end is not allowed with O_DIRECT at an unaligned end, so stop at the
        // capacity (a device's capacity is a multiple of its own block size).
        let stop = end
            .div_ceil(DIRECT_ALIGN)
            .saturating_mul(DIRECT_ALIGN)
            .min(self.capacity);
        let span = usize::try_from(stop - start).map_err(|_| self.short_read(start, end))?;
        let align = DIRECT_ALIGN as usize;
        // Over-allocate and start at the first aligned byte: an aligned buffer without unsafe.
        let mut storage = Zeroizing::new(vec![0u8; span + align]);
        let skip = storage.as_ptr().align_offset(align);
        let buffer = storage
            .get_mut(skip..skip + span)
            .ok_or_else(|| self.short_read(start, end))?;
        let got = self.fill(buffer, start)?;
        let wanted_from = (offset - start) as usize;
        let wanted_to = (end - start) as usize;
        if got < wanted_to {
            return Err(self.short_read(start + got as u64, end));
        }
        let bytes = buffer
            .get(wanted_from..wanted_to)
            .ok_or_else(|| self.short_read(start, end))?;
        Ok(Zeroizing::new(bytes.to_vec()))
    }

    /// Reads into `buffer` from `offset` until it is full or the file ends; returns the count.
    fn fill(&self, buffer: &mut [u8], offset: u64) -> Result<usize> {
        let mut filled = 0;
        while let Some(rest) = buffer.get_mut(filled..).filter(|rest| !rest.is_empty()) {
            let at = offset + filled as u64;
            match self.file.read_at(rest, at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(BlockDeviceError::Read { offset: at, source });
                }
            }
        }
        Ok(filled)
    }

    fn short_read(&self, got: u64, wanted: u64) -> BlockDeviceError {
        BlockDeviceError::ShortRead { got, wanted }
    }
}

fn open_file(path: &Path, direct: bool, writable: bool) -> io::Result<File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("volume.img");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn patterned(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn reads_an_image_file_at_any_offset() {
        let dir = disk_dir();
        let content = patterned(3 * 4096 + 512);
        let mut device = BlockDevice::open(&image(dir.path(), &content)).unwrap();
        assert_eq!(device.capacity_bytes(), content.len() as u64);
        for (offset, len) in [
            (0, 512),
            (0, content.len()),
            (100, 5000),
            (8192, 4608),
            (12000, 800),
        ] {
            let got = device.read_at(offset as u64, len).unwrap();
            assert_eq!(&got[..], &content[offset..offset + len], "{offset}+{len}");
        }
    }

    #[test]
    fn an_image_file_has_no_serial() {
        let dir = disk_dir();
        let device = BlockDevice::open(&image(dir.path(), &patterned(512))).unwrap();
        assert_eq!(device.serial(dir.path()), None);
    }

    #[test]
    fn reads_beyond_the_end_are_refused() {
        let dir = disk_dir();
        let mut device = BlockDevice::open(&image(dir.path(), &patterned(1024))).unwrap();
        assert!(matches!(
            device.read_at(512, 513),
            Err(BlockDeviceError::OutOfRange {
                end: 1025,
                capacity: 1024,
                ..
            })
        ));
        assert!(matches!(
            device.read_at(u64::MAX, 1),
            Err(BlockDeviceError::OutOfRange { .. })
        ));
        assert_eq!(device.read_at(1024, 0).unwrap().len(), 0);
    }

    #[test]
    fn where_o_direct_is_refused_reads_go_through_the_page_cache() {
        // sysfs refuses O_DIRECT at open (tmpfs, on recent kernels, no longer does). Every Linux
        // with sysfs has this file, so the test runs everywhere instead of returning early.
        let path = Path::new("/sys/kernel/uevent_seqnum");
        assert!(
            path.exists(),
            "{} is missing: is sysfs mounted?",
            path.display()
        );
        let mut device = BlockDevice::open(path).unwrap();
        assert!(!device.is_direct());
        let first = device.read_at(0, 1).unwrap();
        assert!(first[0].is_ascii_digit(), "{first:?}");
    }

    #[test]
    fn writes_whole_sectors_and_reads_them_back() {
        let dir = disk_dir();
        let path = image(dir.path(), &vec![0u8; 32 * 1024]);
        let mut device = BlockDevice::open_read_write(&path).unwrap();
        let request = patterned(1024);
        device.write_at(0, &request).unwrap();
        device.write_at(16 * 1024, &request[..512]).unwrap();
        assert_eq!(&device.read_at(0, 1024).unwrap()[..], &request[..]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..1024], &request[..]);
        assert_eq!(&on_disk[16 * 1024..16 * 1024 + 512], &request[..512]);
        assert!(on_disk[1024..16 * 1024].iter().all(|b| *b == 0));
        // Another reader of the same file sees the bytes at once.
        let mut other = BlockDevice::open(&path).unwrap();
        assert_eq!(&other.read_at(0, 1024).unwrap()[..], &request[..]);
    }

    #[test]
    fn partial_sectors_writes_past_the_end_and_read_only_opens_are_refused() {
        let dir = disk_dir();
        let path = image(dir.path(), &vec![0u8; 4096]);
        let mut device = BlockDevice::open_read_write(&path).unwrap();
        assert!(matches!(
            device.write_at(0, &[1; 100]),
            Err(BlockDeviceError::Unaligned {
                offset: 0,
                len: 100
            })
        ));
        assert!(matches!(
            device.write_at(256, &[1; 512]),
            Err(BlockDeviceError::Unaligned { offset: 256, .. })
        ));
        assert!(matches!(
            device.write_at(3584, &[1; 1024]),
            Err(BlockDeviceError::OutOfRange { end: 4608, .. })
        ));
        assert!(matches!(
            device.write_at(u64::MAX - 511, &[1; 512]),
            Err(BlockDeviceError::OutOfRange { .. })
        ));
        let mut read_only = BlockDevice::open(&path).unwrap();
        assert!(matches!(
            read_only.write_at(0, &[1; 512]),
            Err(BlockDeviceError::NotWritable)
        ));
        // Nothing was written by any of them.
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
    }

    #[test]
    fn missing_files_and_directories_are_refused() {
        let dir = disk_dir();
        assert!(matches!(
            BlockDevice::open(&dir.path().join("absent")),
            Err(BlockDeviceError::Open(_))
        ));
        assert!(matches!(
            BlockDevice::open(dir.path()),
            Err(BlockDeviceError::Open(_) | BlockDeviceError::NotADevice)
        ));
    }
}
