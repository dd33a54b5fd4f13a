//! Heap buffers aligned for O_DIRECT.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for O_DIRECT on any logical
/// block size Linux uses (512 or 4096).
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised, fixed-length heap buffer aligned to [`BUF_ALIGN`].
///
/// Its memory never moves while it lives, so an io_uring SQE may point at it
/// as long as the in-flight table owns the buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

/// Large buffers a thread keeps for reuse: a freshly mapped buffer costs a
/// page fault and a cleared page per 4 KiB (the offline tools read
/// gigabytes in 4 MiB pieces), a reused one a memset. Only sizes in
/// `POOL_MIN_BYTES..=POOL_MAX_BYTES`, at most `POOL_BUFS` per thread: a
/// thread keeps at most 16 MiB it does not use (a compare has four such
/// buffers in flight at times).
const POOL_MIN_BYTES: usize = 1 << 20;
const POOL_MAX_BYTES: usize = 4 << 20;
const POOL_BUFS: usize = 4;

/// A thread's idle buffers (pointer and layout), freed with the thread.
struct Pool(Vec<(NonNull<u8>, Layout)>);

impl Drop for Pool {
    fn drop(&mut self) {
        for (ptr, layout) in self.0.drain(..) {
            // SAFETY: allocated by AlignedBuf::zeroed with this layout and
            // owned by the pool alone.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = const { std::cell::RefCell::new(Pool(Vec::new())) };
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn zeroed(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(size, BUF_ALIGN).expect("buffer layout");
        if (POOL_MIN_BYTES..=POOL_MAX_BYTES).contains(&size) {
            let reused = POOL
                .try_with(|p| {
                    let mut p = p.borrow_mut();
                    let i = p.0.iter().position(|(_, l)| *l == layout)?;
                    Some(p.0.swap_remove(i).0)
                })
                .ok()
                .flatten();
            if let Some(ptr) = reused {
                // SAFETY: a pooled allocation of `layout`, owned by nobody
                // else now; `size` bytes are writable.
                unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, size) };
                return Self { ptr, len, layout };
            }
        }
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len, layout }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut b = Self::zeroed(self.len);
        b.copy_from_slice(self);
        b
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let (ptr, layout) = (self.ptr, self.layout);
        if (POOL_MIN_BYTES..=POOL_MAX_BYTES).contains(&layout.size()) {
            let kept = POOL
                .try_with(|p| {
                    let mut p = p.borrow_mut();
                    if p.0.len() < POOL_BUFS {
                        p.0.push((ptr, layout));
                        true
                    } else {
                        false
                    }
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        // SAFETY: allocated in zeroed() with this layout.
        unsafe { dealloc(ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_come_back_zeroed() {
        let len = POOL_MIN_BYTES + 5;
        let mut a = AlignedBuf::zeroed(len);
        a.fill(0xcd);
        let first = a.as_ptr();
        drop(a);
        let b = AlignedBuf::zeroed(len);
        assert_eq!(b.as_ptr(), first, "the pooled buffer is reused");
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), len);
        // Other sizes are not handed a pooled buffer of the wrong size.
        let c = AlignedBuf::zeroed(POOL_MAX_BYTES);
        assert_eq!(c.len(), POOL_MAX_BYTES);
        assert!(c.iter().all(|&x| x == 0));
    }

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 65536 + 3] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xab);
            assert!(b.iter().all(|&x| x == 0xab));
        }
    }
}
