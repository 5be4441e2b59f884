//! The fragment volume medium: fragment files laid out in memory (see
//! `keyshard_core::volume`), served read-only with the serial `ksf-<holder-id>`.

use std::io;
use std::path::{Path, PathBuf};

use keyshard_core::fragment::{Fragment, FragmentError, MAX_FRAGMENT_LEN};
use keyshard_core::volume::{self, VolumeError};
use keyshard_core::{HolderId, holder::NameError};

use crate::device::media::{self, BlockMedia, MediaError};
use keyshard_core::virtio_blk::SERIAL_LEN;

/// Serial prefix of fragment devices; the guest looks for it.
pub const SERIAL_PREFIX: &str = "ksf-";

#[derive(Debug, thiserror::Error)]
pub enum FragmentVolumeError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a fragment: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: FragmentError,
    },
    #[error(transparent)]
    Layout(#[from] VolumeError),
    #[error("holder id: {0}")]
    HolderId(#[from] NameError),
}

pub struct FragmentVolume {
    bytes: Vec<u8>,
    holder_id: HolderId,
    serial: [u8; SERIAL_LEN],
}

impl FragmentVolume {
    /// Reads and checks the fragment files. The holder id defaults to the first fragment's.
    /// Signatures are not checked here: the daemon holds no dealer key, and the guest checks them.
    pub fn load(
        paths: &[PathBuf],
        holder_id: Option<HolderId>,
    ) -> Result<Self, FragmentVolumeError> {
        let mut fragments = Vec::with_capacity(paths.len());
        let mut first_holder = None;
        for path in paths {
            let bytes = read_fragment(path)?;
            let parsed = Fragment::parse(&bytes).map_err(|source| FragmentVolumeError::Parse {
                path: path.clone(),
                source,
            })?;
            first_holder.get_or_insert_with(|| parsed.header().holder_id.clone());
            fragments.push(bytes);
        }
        let holder_id = match (holder_id, first_holder) {
            (Some(id), _) | (None, Some(id)) => id,
            // No files at all: the layout check below reports it.
            (None, None) => HolderId::new("none")?,
        };
        Self::from_fragments(&fragments, holder_id)
    }

    pub fn from_fragments<B: AsRef<[u8]>>(
        fragments: &[B],
        holder_id: HolderId,
    ) -> Result<Self, FragmentVolumeError> {
        let bytes = volume::encode(fragments)?;
        let serial = media::serial_from(&format!("{SERIAL_PREFIX}{holder_id}"));
        Ok(Self {
            bytes,
            holder_id,
            serial,
        })
    }

    pub fn holder_id(&self) -> &HolderId {
        &self.holder_id
    }
}

fn read_fragment(path: &Path) -> Result<Vec<u8>, FragmentVolumeError> {
    let read_error = |source| FragmentVolumeError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_FRAGMENT_LEN as u64 {
        return Err(FragmentVolumeError::Parse {
            path: path.to_owned(),
            source: FragmentError::TooLarge {
                len: usize::try_from(len).unwrap_or(usize::MAX),
                max: MAX_FRAGMENT_LEN,
            },
        });
    }
    std::fs::read(path).map_err(read_error)
}

impl BlockMedia for FragmentVolume {
    fn capacity_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn serial(&self) -> [u8; SERIAL_LEN] {
        self.serial
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_into(&self, offset: u64, len: usize, out: &mut dyn io::Write) -> media::Result<()> {
        let out_of_range = MediaError::OutOfRange {
            offset,
            len,
            capacity: self.capacity_bytes(),
        };
        let start = usize::try_from(offset).map_err(|_| out_of_range)?;
        let bytes = start
            .checked_add(len)
            .and_then(|end| self.bytes.get(start..end))
            .ok_or(MediaError::OutOfRange {
                offset,
                len,
                capacity: self.bytes.len() as u64,
            })?;
        out.write_all(bytes).map_err(MediaError::Guest)
    }
}
