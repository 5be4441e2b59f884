//! One virtio-blk request: check the descriptor chain, parse the header, run it against the
//! medium, write the status. Every chain comes from the guest and is untrusted; whatever is wrong
//! with it ends in a used-ring entry (with a status when one can be written, length 0 otherwise),
//! never a panic.

use std::io::{Read, Write};
use std::ops::Deref;

use log::debug;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::media::{BlockMedia, MediaError};
use keyshard_core::virtio_blk::{OUTHDR_LEN, RequestType, SECTOR_SIZE, SERIAL_LEN, Status};

/// A chain that cannot carry a status byte back: completed with used length 0.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("empty descriptor chain (head index beyond the queue?)")]
    Empty,
    #[error(
        "descriptor chain ends early: a loop, a next index beyond the queue, or an unreadable descriptor"
    )]
    Truncated,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("descriptor buffers outside guest memory: {0}")]
    GuestMemory(String),
}

/// A well-framed request the device refuses: answered with IOERR or UNSUPP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request header is {0} bytes, 16 expected")]
    ShortHeader(usize),
    #[error("read of {0} bytes is not a whole number of sectors")]
    PartialSector(usize),
    #[error("sector {0} overflows a byte offset")]
    SectorOverflow(u64),
    #[error("{len} bytes at sector {sector} are beyond the capacity")]
    OutOfRange { sector: u64, len: usize },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("GET_ID buffer of {0} bytes, 20 needed")]
    ShortIdBuffer(usize),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory copy failed: {0}")]
    Copy(String),
}

impl RequestError {
    pub fn status(&self) -> Status {
        match self {
            Self::Unsupported(_) => Status::Unsupported,
            _ => Status::IoErr,
        }
    }
}

/// What to report in the used ring for one chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
    pub status: Option<Status>,
}

/// Handles one chain end to end and says what the used ring gets.
pub fn handle<G>(
    media: &dyn BlockMedia,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<G>,
) -> Completion
where
    G: Deref<Target = GuestMemoryMmap> + Clone,
{
    let head = chain.head_index();
    match frame(media, mem, chain) {
        Ok(completion) => completion,
        Err(e) => {
            debug!("descriptor chain at head {head} dropped: {e}");
            Completion {
                used_len: 0,
                status: None,
            }
        }
    }
}

fn frame<G>(
    media: &dyn BlockMedia,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<G>,
) -> Result<Completion, ChainError>
where
    G: Deref<Target = GuestMemoryMmap> + Clone,
{
    check_shape(chain.clone())?;
    let memory_error = |e: virtio_queue::Error| ChainError::GuestMemory(e.to_string());
    let mut reader = Reader::new(mem, chain.clone()).map_err(memory_error)?;
    let mut writer = Writer::new(mem, chain).map_err(memory_error)?;
    // The spec lets the driver frame buffers as it likes; the status is the last writable byte.
    let data_len = writer
        .available_bytes()
        .checked_sub(1)
        .ok_or(ChainError::NoStatus)?;
    let mut status_writer = writer.split_at(data_len).map_err(memory_error)?;
    let status = match execute(media, &mut reader, &mut writer, data_len) {
        Ok(()) => Status::Ok,
        Err(e) => {
            debug!("request refused: {e}");
            e.status()
        }
    };
    status_writer
        .write_all(&[status.byte()])
        .map_err(|e| ChainError::GuestMemory(e.to_string()))?;
    let written = writer.bytes_written().saturating_add(1);
    Ok(Completion {
        used_len: u32::try_from(written).unwrap_or(u32::MAX),
        status: Some(status),
    })
}

/// Walks the chain once: non-empty, readable before writable, and not cut short. The iterator
/// stops silently on loops and bad indices, so a last descriptor that still says NEXT means the
/// chain was cut.
fn check_shape<G>(chain: DescriptorChain<G>) -> Result<(), ChainError>
where
    G: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut count = 0usize;
    let mut seen_writable = false;
    let mut last_has_next = false;
    for descriptor in chain {
        count += 1;
        if descriptor.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        last_has_next = descriptor.has_next();
    }
    match (count, last_has_next) {
        (0, _) => Err(ChainError::Empty),
        (_, true) => Err(ChainError::Truncated),
        _ => Ok(()),
    }
}

fn execute(
    media: &dyn BlockMedia,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    data_len: usize,
) -> Result<(), RequestError> {
    let mut header = [0u8; OUTHDR_LEN];
    let available = reader.available_bytes();
    if available < OUTHDR_LEN {
        return Err(RequestError::ShortHeader(available));
    }
    reader
        .read_exact(&mut header)
        .map_err(|e| RequestError::Copy(e.to_string()))?;
    let (kind, sector) = match (header.first_chunk::<4>(), header.last_chunk::<8>()) {
        (Some(kind), Some(sector)) => (u32::from_le_bytes(*kind), u64::from_le_bytes(*sector)),
        _ => return Err(RequestError::ShortHeader(available)),
    };
    match RequestType::from(kind) {
        RequestType::In => {
            if data_len == 0 || !data_len.is_multiple_of(SECTOR_SIZE as usize) {
                return Err(RequestError::PartialSector(data_len));
            }
            let offset = byte_range(media, sector, data_len)?;
            media
                .read_into(offset, data_len, writer)
                .map_err(|e| media_error(e, sector, data_len))
        }
        RequestType::Out => {
            if media.read_only() {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            if len == 0 || !len.is_multiple_of(SECTOR_SIZE as usize) {
                return Err(RequestError::PartialSector(len));
            }
            let offset = byte_range(media, sector, len)?;
            let mut data = vec![0u8; len];
            reader
                .read_exact(&mut data)
                .map_err(|e| RequestError::Copy(e.to_string()))?;
            media
                .write_at(offset, &data)
                .map_err(|e| media_error(e, sector, len))
        }
        // Nothing is cached: every byte served is already where it will stay.
        RequestType::Flush => Ok(()),
        RequestType::GetId => {
            if data_len < SERIAL_LEN {
                return Err(RequestError::ShortIdBuffer(data_len));
            }
            writer
                .write_all(&media.serial())
                .map_err(|e| RequestError::Copy(e.to_string()))
        }
        RequestType::Other(kind) => Err(RequestError::Unsupported(kind)),
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie inside the medium.
fn byte_range(media: &dyn BlockMedia, sector: u64, len: usize) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow(sector))?;
    let end = u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .ok_or(RequestError::SectorOverflow(sector))?;
    if end > media.capacity_bytes() {
        return Err(RequestError::OutOfRange { sector, len });
    }
    Ok(offset)
}

fn media_error(error: MediaError, sector: u64, len: usize) -> RequestError {
    match error {
        MediaError::OutOfRange { .. } => RequestError::OutOfRange { sector, len },
        MediaError::ReadOnly => RequestError::ReadOnly,
        MediaError::Guest(e) => RequestError::Copy(e.to_string()),
    }
}
