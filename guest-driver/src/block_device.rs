//! Reading a block device or an image file (`--device PATH`): `O_DIRECT` through a 4096-aligned
//! buffer, so a guest reads what the device serves now rather than a cached copy, with a plain
//! read where the file system refuses `O_DIRECT` (tmpfs, for instance).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Alignment of offsets, lengths and the buffer for `O_DIRECT`: enough for 4K-sector disks.
pub const DIRECT_ALIGN: u64 = 4096;

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
}

pub type Result<T> = std::result::Result<T, BlockDeviceError>;

/// An open block device or image file.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    direct: bool,
    is_block_device: bool,
    capacity: u64,
}

impl BlockDevice {
    /// Opens `path` read-only, with `O_DIRECT` when the file system allows it.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, direct) = match open_read_only(path, true) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!(
                    "{}: the file system refuses O_DIRECT; reading through the page cache",
                    path.display()
                );
                (
                    open_read_only(path, false).map_err(BlockDeviceError::Open)?,
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

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
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

    /// Reads `len` bytes at byte `offset`.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= self.capacity)
            .ok_or(BlockDeviceError::OutOfRange {
                offset,
                end: offset.saturating_add(len as u64),
                capacity: self.capacity,
            })?;
        if self.direct {
            match self.read_direct(offset, end) {
                Err(BlockDeviceError::Read { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    log::debug!(
                        "{}: O_DIRECT read refused; reading through the page cache",
                        self.path.display()
                    );
                    self.file =
                        open_read_only(&self.path, false).map_err(BlockDeviceError::Open)?;
                    self.direct = false;
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

fn open_read_only(path: &Path, direct: bool) -> io::Result<File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new()
        .read(true)
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
        // sysfs refuses O_DIRECT at open (tmpfs, on recent kernels, no longer does).
        let path = Path::new("/sys/kernel/uevent_seqnum");
        if !path.exists() {
            return;
        }
        let mut device = BlockDevice::open(path).unwrap();
        assert!(!device.is_direct());
        let first = device.read_at(0, 1).unwrap();
        assert!(first[0].is_ascii_digit(), "{first:?}");
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
