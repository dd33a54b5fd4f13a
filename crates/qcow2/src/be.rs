//! Big-endian field access over untrusted byte slices.
//!
//! Every read is bounds-checked and reports a [`Problem::Truncated`] naming
//! the field and its file offset instead of panicking.

use crate::error::{FormatError, Problem, Result};

/// A view of on-disk bytes that starts at file offset `base`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    base: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: u64) -> Self {
        Self { buf, base }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// File offset of byte `at` of this view.
    pub(crate) fn file_offset(&self, at: usize) -> u64 {
        self.base.saturating_add(at as u64)
    }

    pub(crate) fn bytes(&self, at: usize, len: usize, field: &'static str) -> Result<&'a [u8]> {
        let end = at.checked_add(len);
        match end {
            Some(end) if end <= self.buf.len() => Ok(&self.buf[at..end]),
            _ => Err(FormatError::new(
                field,
                self.file_offset(at),
                Problem::Truncated {
                    need: (at as u64).saturating_add(len as u64),
                    have: self.buf.len() as u64,
                },
            )),
        }
    }

    fn array<const N: usize>(&self, at: usize, field: &'static str) -> Result<[u8; N]> {
        let b = self.bytes(at, N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub(crate) fn u8(&self, at: usize, field: &'static str) -> Result<u8> {
        Ok(self.array::<1>(at, field)?[0])
    }

    pub(crate) fn u16(&self, at: usize, field: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(at, field)?))
    }

    pub(crate) fn u32(&self, at: usize, field: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(at, field)?))
    }

    pub(crate) fn u64(&self, at: usize, field: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(at, field)?))
    }
}

/// Appends big-endian values to an encoding buffer.
pub(crate) trait PutBe {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    /// Pads with zeros up to the next multiple of `align`.
    fn pad_to(&mut self, align: usize);
}

impl PutBe for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn pad_to(&mut self, align: usize) {
        let rem = self.len() % align;
        if rem != 0 {
            self.resize(self.len() + align - rem, 0);
        }
    }
}

/// Rounds `len` up to a multiple of 8, the padding unit of header
/// extensions, snapshot table entries and bitmap directory entries.
pub(crate) fn align8(len: usize) -> Option<usize> {
    len.checked_add(7).map(|v| v & !7)
}

/// Encodes a table of 64-bit entries (L1 table, refcount table) big-endian
/// into the start of `out`; the rest of `out` is left as it is (zeros, for
/// a fresh buffer: unallocated entries).
///
/// # Panics
/// If `out` is shorter than the entries: the caller sizes the buffer from
/// the table, so that is a bug of ours, not bad input.
pub fn encode_table(entries: impl IntoIterator<Item = u64>, out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(8);
    for e in entries {
        chunks
            .next()
            .expect("table buffer holds every entry")
            .copy_from_slice(&e.to_be_bytes());
    }
}

/// The 64-bit entries of a table (L1 table, refcount table, bitmap table)
/// read from `bytes`, big-endian; a trailing partial entry is ignored.
pub fn decode_table(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|raw| {
        let mut b = [0u8; 8];
        b.copy_from_slice(raw);
        u64::from_be_bytes(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_decode_what_they_encode() {
        let mut out = vec![0u8; 20];
        encode_table([7, u64::MAX], &mut out);
        assert_eq!(decode_table(&out).collect::<Vec<_>>(), vec![7, u64::MAX]);
    }

    #[test]
    fn tables_encode_big_endian_and_leave_the_tail() {
        let mut out = vec![0xeeu8; 24];
        encode_table([0x0102_0304_0506_0708, 0x10], &mut out);
        assert_eq!(&out[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&out[8..16], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&out[16..], &[0xee; 8]);
    }

    #[test]
    #[should_panic(expected = "table buffer holds every entry")]
    fn a_short_buffer_is_our_bug() {
        encode_table([1, 2], &mut [0u8; 8]);
    }
}
