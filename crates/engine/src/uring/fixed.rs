//! Registered buffers: memory pinned once and handed to the kernel as
//! fixed buffers, so reads and writes into it skip per-operation pinning.

use std::any::Any;
use std::io;

use io_uring::IoUring;

/// Most bytes in one registered buffer (the kernel's limit).
pub(super) const FIXED_BUF_MAX: usize = 1 << 30;

/// Consecutive registered buffers cut from one larger region overlap by
/// this much, so that any transfer up to this size lies wholly inside one
/// of them (a virtio-blk segment is at most 1 MiB).
pub(super) const FIXED_BUF_OVERLAP: usize = 4 << 20;

/// Most registered buffers per ring (the kernel's limit).
pub(super) const FIXED_BUF_COUNT_MAX: usize = 1 << 14;

/// Memory registered with the ring as fixed buffers: reads and writes
/// that lie inside it skip the kernel's per-operation page pinning.
pub(super) struct Fixed {
    /// `(start address, length)` of buffer `i`, sorted by start address.
    pub(super) bufs: Vec<(usize, usize)>,
    /// Keeps the memory mapped while the ring refers to it.
    pub(super) _keep: Box<dyn Any>,
}

impl Fixed {
    /// The buffer holding all of `[addr, addr + len)`, if one does.
    pub(super) fn find(&self, addr: usize, len: usize) -> Option<u16> {
        let end = addr.checked_add(len)?;
        // Buffers starting at or before `addr`; with overlapping buffers
        // the last two are the only candidates.
        let after = self.bufs.partition_point(|&(start, _)| start <= addr);
        (after.saturating_sub(2)..after)
            .rev()
            .find(|&i| {
                let (start, n) = self.bufs[i];
                end <= start + n
            })
            .and_then(|i| u16::try_from(i).ok())
    }
}

/// Cuts `regions` into buffers the kernel accepts, sorted by address.
pub(super) fn fixed_buffers(regions: &[(*mut u8, usize)]) -> io::Result<Vec<(usize, usize)>> {
    let mut bufs = Vec::new();
    for &(ptr, len) in regions {
        let start = ptr as usize;
        let mut off = 0;
        while off < len {
            let n = (len - off).min(FIXED_BUF_MAX);
            bufs.push((start + off, n));
            if off + n == len {
                break;
            }
            off += FIXED_BUF_MAX - FIXED_BUF_OVERLAP;
        }
    }
    if bufs.len() > FIXED_BUF_COUNT_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} buffers needed, the kernel takes {FIXED_BUF_COUNT_MAX}",
                bufs.len()
            ),
        ));
    }
    bufs.sort_unstable();
    Ok(bufs)
}

pub(super) fn iovecs(bufs: &[(usize, usize)]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|&(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect()
}

/// Memory registered once, with a ring of its own, for the rings of
/// several threads to share through [`Ring::adopt_memory`](super::Ring::adopt_memory).
///
/// Registering pins every page (faulting it in) for as long as the
/// registration, or a ring's clone of it, lasts. Pinning needs
/// `RLIMIT_MEMLOCK` room or `CAP_IPC_LOCK`, and memory the kernel can pin
/// long-term (anonymous, shmem or hugetlbfs). A pinned page stays the one
/// I/O goes to even if its owner drops it from the mapping's file (a
/// balloon or virtio-mem punching holes in guest memory): such memory must
/// not be registered.
pub struct SharedMemory {
    pub(super) ring: IoUring,
    /// `(start address, length)` of buffer `i`, sorted by start address.
    pub(super) bufs: Vec<(usize, usize)>,
    bytes: u64,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory")
            .field("buffers", &self.bufs.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SharedMemory {
    /// Pins and registers `regions` (blocking: faulting memory in takes
    /// time).
    ///
    /// # Safety
    /// Each region must be mapped memory that stays mapped, at these
    /// addresses, for as long as any ring uses the registration (see
    /// [`Ring::adopt_memory`](super::Ring::adopt_memory)).
    pub unsafe fn register(regions: &[(*mut u8, usize)]) -> io::Result<Self> {
        let bufs = fixed_buffers(regions)?;
        let ring = IoUring::new(1)?;
        if !bufs.is_empty() {
            // SAFETY: every iovec lies in a region the caller keeps mapped.
            unsafe { ring.submitter().register_buffers(&iovecs(&bufs)) }?;
        }
        Ok(Self {
            ring,
            bufs,
            bytes: regions.iter().map(|&(_, len)| len as u64).sum(),
        })
    }

    /// Bytes registered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
