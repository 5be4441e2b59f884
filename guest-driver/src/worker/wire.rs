//! What a worker process writes on its stdout for the agent: a stream of records, each a tag, a
//! length and a payload. The agent reads them as they come, so a worker can report one thing
//! (a serial) before it blocks on the next (the device's data).
//!
//! | field   | size   | meaning                                                  |
//! |---------|--------|----------------------------------------------------------|
//! | tag     | 1      | what the payload is (see [`Record`])                     |
//! | length  | 4      | payload length, little-endian, at most [`MAX_PAYLOAD`]   |
//! | payload | length | per tag: text (UTF-8) or bytes                           |
//!
//! Tags: `1` serial (text), `2` fragment volume (bytes), `3` failure (text), `4` a released share
//! (2-byte holder index, then the fragment's bytes), `5` a holder's refusal or failure (2-byte
//! holder index, then text). A worker's stdout is a pipe only the agent reads; the bytes are
//! still checked like any other input.

use zeroize::Zeroizing;

/// The largest payload: a whole fragment volume (39,424 bytes today) with room to spare.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The most a worker may write in all; past it the agent stops reading and ends the worker.
pub const MAX_OUTPUT: usize = 512 * 1024;
/// The bytes before a record's payload: tag and length.
pub const HEADER_LEN: usize = 5;

const TAG_SERIAL: u8 = 1;
const TAG_VOLUME: u8 = 2;
const TAG_FAILED: u8 = 3;
const TAG_SHARE: u8 = 4;
const TAG_SHARE_FAILED: u8 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    #[error("a record of {len} bytes is larger than any record ({MAX_PAYLOAD})")]
    TooLarge { len: usize },
    #[error("a {what} record is malformed")]
    Malformed { what: &'static str },
}

/// One thing a worker reports.
#[derive(Clone, PartialEq, Eq)]
pub enum Record {
    /// The device's serial, printable (possibly empty: the device has none).
    Serial(String),
    /// The first bytes of the device: its fragment volume.
    Volume(Zeroizing<Vec<u8>>),
    /// The worker could not do its job, and why.
    Failed(String),
    /// The coordinator released holder `index`'s fragment.
    Share {
        index: u16,
        fragment: Zeroizing<Vec<u8>>,
    },
    /// Holder `index` was refused or could not be asked, and why.
    ShareFailed { index: u16, reason: String },
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serial(serial) => f.debug_tuple("Serial").field(serial).finish(),
            Self::Volume(bytes) => write!(f, "Volume({} bytes)", bytes.len()),
            Self::Failed(why) => f.debug_tuple("Failed").field(why).finish(),
            Self::Share { index, fragment } => {
                write!(f, "Share {{ index: {index}, {} bytes }}", fragment.len())
            }
            Self::ShareFailed { index, reason } => f
                .debug_struct("ShareFailed")
                .field("index", index)
                .field("reason", reason)
                .finish(),
        }
    }
}

impl Record {
    /// The record's bytes, as a worker writes them.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let (tag, mut payload) = match self {
            Self::Serial(text) => (TAG_SERIAL, Zeroizing::new(text.as_bytes().to_vec())),
            Self::Volume(bytes) => (TAG_VOLUME, bytes.clone()),
            Self::Failed(text) => (TAG_FAILED, Zeroizing::new(text.as_bytes().to_vec())),
            Self::Share { index, fragment } => {
                let mut payload = Zeroizing::new(index.to_le_bytes().to_vec());
                payload.extend_from_slice(fragment);
                (TAG_SHARE, payload)
            }
            Self::ShareFailed { index, reason } => {
                let mut payload = Zeroizing::new(index.to_le_bytes().to_vec());
                payload.extend_from_slice(reason.as_bytes());
                (TAG_SHARE_FAILED, payload)
            }
        };
        // Text is cut, never a reason to write a record the reader refuses.
        payload.truncate(MAX_PAYLOAD);
        let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + payload.len()));
        out.push(tag);
        // At most MAX_PAYLOAD (64 KiB), so the length fits.
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Takes one whole record off the front of `buffer`, if one is there.
    pub fn take(buffer: &mut Vec<u8>) -> Result<Option<Self>, RecordError> {
        let Some(header) = buffer.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let (tag, len_bytes) = header.split_first().ok_or(RecordError::Malformed {
            what: "record header",
        })?;
        let tag = *tag;
        let len_bytes = <[u8; 4]>::try_from(len_bytes).map_err(|_| RecordError::Malformed {
            what: "record header",
        })?;
        let len = usize::try_from(u32::from_le_bytes(len_bytes)).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(RecordError::TooLarge { len });
        }
        let end = HEADER_LEN + len;
        let Some(payload) = buffer.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let record = Self::decode(tag, payload)?;
        // Shares pass through this buffer: wipe what is taken off it.
        let taken: Vec<u8> = buffer.drain(..end).collect();
        drop(Zeroizing::new(taken));
        Ok(Some(record))
    }

    fn decode(tag: u8, payload: &[u8]) -> Result<Self, RecordError> {
        let text = |what| {
            std::str::from_utf8(payload)
                .map(|s| crate::serial::printable(s.as_bytes()))
                .map_err(|_| RecordError::Malformed { what })
        };
        let indexed = |what| {
            let (index, rest) = payload
                .split_first_chunk::<2>()
                .ok_or(RecordError::Malformed { what })?;
            Ok::<_, RecordError>((u16::from_le_bytes(*index), rest))
        };
        match tag {
            TAG_SERIAL => Ok(Self::Serial(text("serial")?)),
            TAG_VOLUME => Ok(Self::Volume(Zeroizing::new(payload.to_vec()))),
            TAG_FAILED => Ok(Self::Failed(text("failure")?)),
            TAG_SHARE => {
                let (index, fragment) = indexed("share")?;
                Ok(Self::Share {
                    index,
                    fragment: Zeroizing::new(fragment.to_vec()),
                })
            }
            TAG_SHARE_FAILED => {
                let (index, reason) = indexed("share failure")?;
                let reason = std::str::from_utf8(reason)
                    .map(|s| crate::serial::printable(s.as_bytes()))
                    .map_err(|_| RecordError::Malformed {
                        what: "share failure",
                    })?;
                Ok(Self::ShareFailed { index, reason })
            }
            other => Err(RecordError::UnknownTag(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(record: Record) {
        let mut buffer = record.encode().to_vec();
        buffer.extend_from_slice(b"\x01\x00"); // the start of a next record
        assert_eq!(Record::take(&mut buffer).unwrap(), Some(record));
        assert_eq!(buffer, b"\x01\x00");
        assert_eq!(Record::take(&mut buffer).unwrap(), None);
    }

    #[test]
    fn every_record_round_trips_and_leaves_the_next_one() {
        round_trip(Record::Serial("ksf-vhd-1".into()));
        round_trip(Record::Serial(String::new()));
        round_trip(Record::Volume(Zeroizing::new(vec![7; 4096])));
        round_trip(Record::Failed("cannot open /dev/vdb".into()));
        round_trip(Record::Share {
            index: 3,
            fragment: Zeroizing::new(vec![1, 2, 3]),
        });
        round_trip(Record::ShareFailed {
            index: 1,
            reason: "refused by the coordinator: PCR 7".into(),
        });
    }

    #[test]
    fn a_record_cut_short_waits_for_the_rest() {
        let whole = Record::Volume(Zeroizing::new(vec![9; 100])).encode();
        for cut in 0..whole.len() {
            let mut buffer = whole[..cut].to_vec();
            assert_eq!(Record::take(&mut buffer).unwrap(), None, "cut at {cut}");
            assert_eq!(buffer.len(), cut);
        }
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        let mut unknown = vec![9, 0, 0, 0, 0];
        assert_eq!(Record::take(&mut unknown), Err(RecordError::UnknownTag(9)));
        let mut huge = vec![TAG_VOLUME, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Record::take(&mut huge),
            Err(RecordError::TooLarge { .. })
        ));
        let mut short_share = vec![TAG_SHARE, 1, 0, 0, 0, 7];
        assert_eq!(
            Record::take(&mut short_share),
            Err(RecordError::Malformed { what: "share" })
        );
        let mut bad_text = vec![TAG_SERIAL, 1, 0, 0, 0, 0xff];
        assert_eq!(
            Record::take(&mut bad_text),
            Err(RecordError::Malformed { what: "serial" })
        );
        // A serial cannot smuggle escape sequences to a terminal.
        let mut escape = Record::Serial("ksf-\u{1b}[31m".into()).encode().to_vec();
        assert_eq!(
            Record::take(&mut escape).unwrap(),
            Some(Record::Serial("ksf-?[31m".into()))
        );
    }

    /// Review of issue 7: a holder's failure is text from the host too, and is made printable
    /// like a serial.
    #[test]
    fn a_share_failure_cannot_write_escapes_or_lines() {
        let mut record = Record::ShareFailed {
            index: 2,
            reason: "refused\n\u{1b}[31mfake".into(),
        }
        .encode()
        .to_vec();
        assert_eq!(
            Record::take(&mut record).unwrap(),
            Some(Record::ShareFailed {
                index: 2,
                reason: "refused??[31mfake".into()
            })
        );
    }

    #[test]
    fn oversized_text_is_cut_to_fit() {
        let record = Record::Failed("x".repeat(MAX_PAYLOAD + 10)).encode();
        assert_eq!(record.len(), HEADER_LEN + MAX_PAYLOAD);
    }
}
