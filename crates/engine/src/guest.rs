//! Guest memory as the engine sees it.
//!
//! A [`GuestSlice`] is a run of memory someone else may touch at any time
//! (the guest, on another vCPU; another request whose buffer overlaps this
//! one — a guest may send that): a pointer, a length and the keep-alive
//! that keeps the mapping. It is never turned into a Rust reference, which
//! would promise that nobody else reads or writes those bytes meanwhile;
//! the engine hands it to the kernel as the target or source of an SQE, or
//! copies in and out with raw copies, as vm-memory's `VolatileSlice` does.
//!
//! Everything the daemon writes into guest memory through the engine passes
//! [`GuestRange::copy_from`], [`GuestRange::fill`] or
//! [`crate::file::HostFile::read_guest`]: those are where live migration's
//! dirty-page log marks the pages written.

use std::ptr::NonNull;

use crate::file::KeepAlive;

/// A run of guest memory (see the module documentation).
#[derive(Clone)]
pub struct GuestSlice {
    ptr: NonNull<u8>,
    len: usize,
    keep: KeepAlive,
}

impl std::fmt::Debug for GuestSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSlice")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl GuestSlice {
    /// # Safety
    /// `[ptr, ptr + len)` must be memory mapped readable and writable for as
    /// long as `keep`, or any clone of it, lives. Other parties may read and
    /// write it meanwhile; the engine never assumes otherwise.
    pub unsafe fn new(ptr: *mut u8, len: usize, keep: KeepAlive) -> Self {
        let ptr = NonNull::new(ptr).unwrap_or(NonNull::dangling());
        Self { ptr, len, keep }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address (for SQEs and alignment checks).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// What keeps the memory mapped: an SQE on it holds a clone until its
    /// completion arrives.
    pub fn keep(&self) -> &KeepAlive {
        &self.keep
    }

    /// The whole slice as a range (borrowed: no keep-alive clone).
    pub fn range(&self) -> GuestRange<'_> {
        GuestRange {
            slice: self,
            start: 0,
            len: self.len,
        }
    }

    /// `len` bytes from `start`, as a slice of its own.
    ///
    /// # Panics
    /// If the range is not inside the slice (a bug of the caller's
    /// arithmetic, never guest input).
    pub fn sub(&self, start: usize, len: usize) -> GuestSlice {
        let r = self.range().sub(start, len);
        GuestSlice {
            ptr: NonNull::new(r.as_ptr()).unwrap_or(NonNull::dangling()),
            len,
            keep: self.keep.clone(),
        }
    }

    /// Copies `src` (exactly as long as the slice) into guest memory.
    pub fn copy_from(&self, src: &[u8]) {
        self.range().copy_from(src);
    }

    /// Copies guest memory out into `dst` (exactly as long as the slice).
    pub fn copy_to(&self, dst: &mut [u8]) {
        self.range().copy_to(dst);
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        self.range().fill(byte);
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.range().to_vec()
    }
}

/// Part of a [`GuestSlice`], borrowed: what the engine passes around while
/// it splits a request by cluster and by host run, without touching the
/// keep-alive's reference count (shared by every queue thread, so an
/// atomic that bounces between cores) until an SQE needs its own clone.
#[derive(Debug, Clone, Copy)]
pub struct GuestRange<'a> {
    slice: &'a GuestSlice,
    start: usize,
    len: usize,
}

impl<'a> GuestRange<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: start lies within the slice (checked where the range was
        // made), so the pointer stays in (or one past) the same mapping.
        unsafe { self.slice.ptr.as_ptr().add(self.start) }
    }

    /// What keeps the memory mapped.
    pub fn keep(&self) -> &'a KeepAlive {
        &self.slice.keep
    }

    /// `len` bytes from `start` of this range.
    ///
    /// # Panics
    /// If the range is not inside this one (a bug of the caller's
    /// arithmetic, never guest input).
    pub fn sub(&self, start: usize, len: usize) -> GuestRange<'a> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "guest slice range {start}+{len} outside {}",
            self.len
        );
        GuestRange {
            slice: self.slice,
            start: self.start + start,
            len,
        }
    }

    /// Copies `src` (exactly as long as the range) into guest memory.
    pub fn copy_from(&self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len,
            "copy into a guest slice of another length"
        );
        // SAFETY: the range is mapped writable while the slice's keep-alive
        // lives (GuestSlice::new's contract); `src` is our own memory, so
        // the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr(), self.len) };
    }

    /// Copies guest memory out into `dst` (exactly as long as the range).
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "copy from a guest slice of another length"
        );
        // SAFETY: as in copy_from, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr(), dst.as_mut_ptr(), self.len) };
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the range is mapped writable while the keep-alive lives.
        unsafe { std::ptr::write_bytes(self.as_ptr(), byte, self.len) };
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }
}

/// Where a read puts its bytes: our own buffer, or guest memory.
#[derive(Debug)]
pub(crate) enum Out<'a> {
    Heap(&'a mut [u8]),
    Guest(GuestRange<'a>),
}

impl Out<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Out::Heap(b) => b.len(),
            Out::Guest(g) => g.len(),
        }
    }

    /// `len` bytes from `start`.
    pub(crate) fn sub(&mut self, start: usize, len: usize) -> Out<'_> {
        match self {
            Out::Heap(b) => Out::Heap(&mut b[start..start + len]),
            Out::Guest(g) => Out::Guest(g.sub(start, len)),
        }
    }

    pub(crate) fn fill(&mut self, byte: u8) {
        match self {
            Out::Heap(b) => b.fill(byte),
            Out::Guest(g) => g.fill(byte),
        }
    }

    pub(crate) fn copy_from(&mut self, src: &[u8]) {
        match self {
            Out::Heap(b) => b.copy_from_slice(src),
            Out::Guest(g) => g.copy_from(src),
        }
    }
}

/// Where a write takes its bytes from: our own buffer, or guest memory.
#[derive(Debug, Clone)]
pub(crate) enum In<'a> {
    Heap(&'a [u8]),
    Guest(GuestRange<'a>),
}

impl In<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            In::Heap(b) => b.len(),
            In::Guest(g) => g.len(),
        }
    }

    /// `len` bytes from `start`.
    pub(crate) fn sub(&self, start: usize, len: usize) -> In<'_> {
        match self {
            In::Heap(b) => In::Heap(&b[start..start + len]),
            In::Guest(g) => In::Guest(g.sub(start, len)),
        }
    }

    pub(crate) fn copy_to(&self, dst: &mut [u8]) {
        match self {
            In::Heap(b) => dst.copy_from_slice(b),
            In::Guest(g) => g.copy_to(dst),
        }
    }

    /// Whether the bytes are guest memory that may go to disk as it is.
    pub(crate) fn is_guest(&self) -> bool {
        matches!(self, In::Guest(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn copies_and_subslices_stay_inside_and_keep_the_memory() {
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 64]));
        let ptr = mem.lock().unwrap().as_mut_ptr();
        let keep: KeepAlive = mem.clone();
        // SAFETY: 64 bytes of `mem`, which `keep` keeps alive.
        let g = unsafe { GuestSlice::new(ptr, 64, keep) };
        g.sub(8, 8).copy_from(&[7; 8]);
        g.sub(60, 4).fill(9);
        let mut out = [0u8; 4];
        g.sub(10, 4).copy_to(&mut out);
        assert_eq!(out, [7; 4]);
        let v = g.to_vec();
        assert_eq!(&v[8..16], &[7; 8]);
        assert_eq!(&v[60..], &[9; 4]);
        assert!(v[..8].iter().all(|&b| b == 0));
        assert_eq!(Arc::strong_count(&mem), 2);
        drop(g);
        assert_eq!(Arc::strong_count(&mem), 1);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_subslice_past_the_end_is_our_bug() {
        let mem = Arc::new(vec![0u8; 8]);
        let ptr = mem.as_ptr().cast_mut();
        // SAFETY: 8 bytes of `mem`; nothing is written through it here.
        let g = unsafe { GuestSlice::new(ptr, 8, mem.clone()) };
        let _ = g.sub(4, 5);
    }

    #[test]
    fn overlapping_slices_are_fine() {
        // A guest may hand the same buffer twice: nothing here forms a
        // reference over it, so two views of one byte are allowed.
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 16]));
        let ptr = mem.lock().unwrap().as_mut_ptr();
        // SAFETY: 16 bytes of `mem`, kept alive by the clones.
        let a = unsafe { GuestSlice::new(ptr, 16, mem.clone()) };
        let b = a.sub(4, 8);
        a.fill(1);
        b.copy_from(&[2; 8]);
        let v = a.to_vec();
        assert_eq!(&v[4..12], &[2; 8]);
        assert_eq!(v[0], 1);
    }
}
