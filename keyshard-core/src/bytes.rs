//! A bounded reader for the binary formats (fragments, broker messages): every read names its
//! field, so a short input says what is missing, and nothing reads past the end.

/// A field was missing or short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    pub field: &'static str,
}

pub type Result<T> = std::result::Result<T, Truncated>;

pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    pub fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(len).ok_or(Truncated { field })?;
        let slice = self.bytes.get(self.pos..end).ok_or(Truncated { field })?;
        self.pos = end;
        Ok(slice)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let slice = self.take(N, field)?;
        <[u8; N]>::try_from(slice).map_err(|_| Truncated { field })
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A length-prefixed (one byte) string; non-UTF-8 reads as U+FFFD for the caller to refuse.
    pub fn short_str(&mut self, field: &'static str) -> Result<&'a str> {
        let len = self.u8(field)?;
        let bytes = self.take(usize::from(len), field)?;
        Ok(std::str::from_utf8(bytes).unwrap_or("\u{fffd}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_fields_and_names_the_short_one() {
        let mut r = Reader::new(&[1, 2, 0, 3, 0, 0, 0, 2, b'h', b'i', 9]);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.short_str("d"), Ok("hi"));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.u16("e"), Err(Truncated { field: "e" }));
        assert_eq!(r.take(usize::MAX, "f"), Err(Truncated { field: "f" }));
        assert_eq!(r.position(), 10);
    }
}
