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
