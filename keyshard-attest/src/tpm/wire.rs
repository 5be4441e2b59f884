//! A strict big-endian reader for TPM structures and keyshard's own TPM records: every read is
//! bounds-checked, and [`Reader::finish`] refuses trailing bytes.

/// Why bytes did not parse; `field` names what was being read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated: {field} needs {needed} more bytes at offset {offset}, {left} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        left: usize,
    },
    #[error("{extra} unexpected bytes after the end at offset {offset}")]
    Trailing { offset: usize, extra: usize },
}

pub type Result<T> = std::result::Result<T, WireError>;

/// Reads a byte slice front to back.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, offset: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        let rest = self.buf.get(self.offset..).unwrap_or_default();
        let Some((head, _)) = rest.split_at_checked(n) else {
            return Err(WireError::Truncated {
                field,
                offset: self.offset,
                needed: n,
                left: rest.len(),
            });
        };
        self.offset = self.offset.saturating_add(n);
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A TPM2B: a u16 size, then that many bytes.
    pub fn sized(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let n = self.u16(field)?;
        self.bytes(usize::from(n), field)
    }

    /// Succeeds only when every byte has been read.
    pub fn finish(self) -> Result<()> {
        let extra = self.buf.len().saturating_sub(self.offset);
        if extra == 0 {
            Ok(())
        } else {
            Err(WireError::Trailing {
                offset: self.offset,
                extra,
            })
        }
    }
}

/// Appends a TPM2B (u16 size, then the bytes). None when `body` is longer than 65535 bytes.
pub fn put_sized(out: &mut Vec<u8>, body: &[u8]) -> Option<()> {
    let n = u16::try_from(body.len()).ok()?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(body);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_fields_and_sized_buffers() {
        let buf = [0x12, 0x34, 0, 2, 0xaa, 0xbb, 0xff];
        let mut r = Reader::new(&buf);
        assert_eq!(r.u16("a").unwrap(), 0x1234);
        assert_eq!(r.sized("b").unwrap(), &[0xaa, 0xbb]);
        assert_eq!(r.u8("c").unwrap(), 0xff);
        r.finish().unwrap();
    }

    #[test]
    fn refuses_short_input_and_trailing_bytes() {
        let mut r = Reader::new(&[0, 5, 1, 2]);
        assert_eq!(
            r.sized("body"),
            Err(WireError::Truncated {
                field: "body",
                offset: 2,
                needed: 5,
                left: 2
            })
        );
        let mut r = Reader::new(&[1, 2, 3]);
        r.u16("x").unwrap();
        assert_eq!(
            r.finish(),
            Err(WireError::Trailing {
                offset: 2,
                extra: 1
            })
        );
    }

    #[test]
    fn put_sized_refuses_oversized_bodies() {
        let mut out = Vec::new();
        assert!(put_sized(&mut out, &[0u8; 65_536]).is_none());
        put_sized(&mut out, &[7, 8]).unwrap();
        assert_eq!(out, [0, 2, 7, 8]);
    }
}
