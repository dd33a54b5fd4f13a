//! Inflight I/O tracking for split virtqueues (vhost-user.rst, "Inflight
//! I/O tracking"; VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The frontend keeps a shared memory region across backend restarts; the
//! backend records in it which descriptor heads it has taken from the
//! avail ring and not yet completed, so a new backend process can finish
//! them after the old one died. The region holds one area per queue:
//!
//! ```text
//! offset  field (little-endian on x86, the machine's byte order)
//!   0     u64 features           0
//!   8     u16 version            1; 0 means "never initialised"
//!  10     u16 desc_num           the queue size the region was made for
//!  12     u16 last_batch_head    the head last being completed
//!  14     u16 used_idx           the used ring's idx after that completion
//!  16     desc_num × DescStateSplit, 16 bytes each:
//!           +0 u8 inflight, +1 5 bytes padding, +6 u16 next, +8 u64 counter
//! ```
//!
//! Each queue's area is rounded up to 64 bytes, as libvhost-user does
//! (its `ALIGN_UP(16 * queue_size + 2, 64)` is the same number for every
//! queue size).
//!
//! Protocol, per descriptor head `h`:
//! - popped: `desc[h].counter = ++counter`, then `desc[h].inflight = 1`.
//! - completed, one entry at a time (see `vring.rs`): `last_batch_head =
//!   h`; the used element is written and the used ring's idx moved past
//!   it; then `desc[h].inflight = 0` and `used_idx` = the ring's idx.
//!   A crash leaves at most one entry between the ring's idx and the
//!   region: the one named by `last_batch_head`.
//! - ring start with a region in use (version 1): if `used_idx` differs
//!   from the used ring's idx, the crash fell inside the completion of
//!   `last_batch_head`, which the guest has seen: clear it. Every head
//!   still marked is resubmitted, oldest counter first, and the avail
//!   ring resumes at `used idx + resubmitted` (the frontend has reset the
//!   ring's base to its used idx).
//!
//! The region is shared with another process, which may write it at any
//! time: it is only ever accessed through atomics, never as a Rust
//! reference to plain data, and every index read from it is bounded.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};

/// Size of the per-queue header.
pub const HEADER_SIZE: u64 = 16;
/// Size of one `DescStateSplit`.
pub const DESC_STATE_SIZE: u64 = 16;
/// Each queue's area is a multiple of this.
pub const QUEUE_ALIGN: u64 = 64;
/// The region layout version this code writes and reads.
pub const VERSION: u16 = 1;

// Field offsets in a queue's area.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// Field offsets in a DescStateSplit.
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;

/// Bytes of one queue's area for a queue of `queue_size`.
pub fn queue_area_size(queue_size: u16) -> u64 {
    let bytes = HEADER_SIZE + DESC_STATE_SIZE * u64::from(queue_size);
    bytes.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes of the whole region.
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    queue_area_size(queue_size) * u64::from(num_queues)
}

/// Why an inflight region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(
        "{num_queues} queues of size {queue_size}: this device has 1..={max_queues} of at most {max_size}"
    )]
    Shape {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_size: u16,
    },
    #[error(
        "mmap_size {given} is smaller than the {needed} bytes {num_queues} queues of {queue_size} need"
    )]
    TooSmall {
        given: u64,
        needed: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("mmap_offset {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("the region ends at {end:#x}, past the end of its {len:#x}-byte file")]
    PastEnd { end: u64, len: u64 },
    #[error("the inflight descriptor is not a regular file")]
    NotAFile,
    #[error("cannot make the region")]
    Io(#[source] io::Error),
}

/// A mapped inflight region.
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the
// pointer is valid for `len` bytes until drop, wherever the owner lives.
unsafe impl Send for Region {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`, which
        // nothing references any more (queues hold the Arc of this).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Checks the shape a frontend asks for against the device.
fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues || queue_size == 0 || queue_size > max_size {
        return Err(InflightError::Shape {
            num_queues,
            queue_size,
            max_queues,
            max_size,
        });
    }
    Ok(())
}

/// A new zeroed region for GET_INFLIGHT_FD: a sealed memfd of
/// [`region_size`] bytes.
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(File, u64), InflightError> {
    check_shape(num_queues, queue_size, max_queues, max_size)?;
    let size = region_size(num_queues, queue_size);
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe {
        libc::memfd_create(
            c"qblk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Io(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    // A new memfd reads as zeros: the region starts uninitialised
    // (version 0) on every queue.
    file.set_len(size).map_err(InflightError::Io)?;
    // Neither side may resize it under the other's mapping (SIGBUS).
    // SAFETY: fcntl on our own descriptor with integer arguments.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if sealed != 0 {
        return Err(InflightError::Io(io::Error::last_os_error()));
    }
    Ok((file, size))
}

impl Region {
    /// Maps the region SET_INFLIGHT_FD hands over, after checking that it
    /// has room for `num_queues` queues of `queue_size` and lies inside
    /// its file (mmap would accept a mapping past the end, and touching
    /// it would kill the daemon with SIGBUS). Only the bytes the queues
    /// use are mapped.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size, max_queues, max_size)?;
        let needed = region_size(num_queues, queue_size);
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                given: mmap_size,
                needed,
                num_queues,
                queue_size,
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if mmap_offset % page != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        let meta = file.metadata().map_err(InflightError::Io)?;
        if !meta.file_type().is_file() {
            return Err(InflightError::NotAFile);
        }
        let end = mmap_offset.saturating_add(needed);
        if end > meta.len() {
            return Err(InflightError::PastEnd {
                end,
                len: meta.len(),
            });
        }
        // `needed` is at most 64 queues × 16 KiB, and the offset was
        // checked against the file's length: both fit the types below.
        let len = needed as usize;
        // SAFETY: a new shared mapping of a range checked to lie inside the
        // file; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                mmap_offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Io(io::Error::last_os_error()));
        }
        let region = Self {
            ptr: ptr.cast(),
            len,
            num_queues,
            queue_size,
        };
        // As libvhost-user does: each area says what size it tracks.
        for q in 0..num_queues {
            region
                .u16_at(q, OFF_DESC_NUM)
                .store(queue_size, Ordering::Relaxed);
        }
        Ok(region)
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Byte offset of `field` of queue `q`'s area.
    fn offset(&self, q: u16, field: usize) -> usize {
        let at = queue_area_size(self.queue_size) as usize * usize::from(q) + field;
        assert!(
            q < self.num_queues && at + 8 <= self.len,
            "inflight offset {at} of queue {q} outside the region"
        );
        at
    }

    fn u8_at(&self, q: u16, field: usize) -> &AtomicU8 {
        let at = self.offset(q, field);
        // SAFETY: `at` lies inside the mapping (checked by `offset`), which
        // lives as long as `self`; AtomicU8 has u8's layout and alignment
        // and the memory is only ever accessed atomically.
        unsafe { AtomicU8::from_ptr(self.ptr.wrapping_add(at)) }
    }

    fn u16_at(&self, q: u16, field: usize) -> &AtomicU16 {
        let at = self.offset(q, field);
        debug_assert_eq!(at % 2, 0);
        // SAFETY: as `u8_at`; every u16 field sits at an even offset of a
        // page-aligned mapping (64-byte areas, 16-byte entries).
        unsafe { AtomicU16::from_ptr(self.ptr.wrapping_add(at).cast()) }
    }

    fn u64_at(&self, q: u16, field: usize) -> &AtomicU64 {
        let at = self.offset(q, field);
        debug_assert_eq!(at % 8, 0);
        // SAFETY: as `u8_at`; the counter sits at offset 8 of a 16-byte
        // entry that starts at a multiple of 16 of a page-aligned mapping.
        unsafe { AtomicU64::from_ptr(self.ptr.wrapping_add(at).cast()) }
    }
}

/// One queue's area of a region, as the queue's worker uses it.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<Region>,
    queue: u16,
    /// The last counter given to a popped head.
    counter: u64,
}

/// What a ring start found in its area.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to run again, oldest first.
    pub resubmit: Vec<u16>,
    /// Whether the area held state from an earlier backend (version 1).
    pub resumed: bool,
    /// Whether `last_batch_head` was cleared by the used-idx rule.
    pub cleared_last: bool,
}

impl InflightQueue {
    /// Queue `queue`'s area, or None when the region has none for it.
    pub fn new(region: Arc<Region>, queue: u16) -> Option<Self> {
        (queue < region.num_queues).then_some(Self {
            region,
            queue,
            counter: 0,
        })
    }

    /// The queue size the area tracks: heads must be below it.
    pub fn desc_num(&self) -> u16 {
        self.region.queue_size
    }

    fn desc(&self, head: u16, field: usize) -> usize {
        HEADER_SIZE as usize + usize::from(head) * DESC_STATE_SIZE as usize + field
    }

    /// The ring starts: initialises a fresh area, or recovers what an
    /// earlier backend left (see the module docs). `used_idx` is the used
    /// ring's idx; `ring_size` bounds the heads that can be in flight.
    pub fn start(&mut self, used_idx: u16, ring_size: u16) -> Recovery {
        let r = &self.region;
        let q = self.queue;
        let version = r.u16_at(q, OFF_VERSION).load(Ordering::Acquire);
        if version != VERSION {
            // Never used (0), or a layout this code does not know: start
            // from nothing.
            for h in 0..r.queue_size {
                r.u8_at(q, self.desc(h, DESC_INFLIGHT))
                    .store(0, Ordering::Relaxed);
            }
            r.u16_at(q, OFF_USED_IDX).store(used_idx, Ordering::Relaxed);
            r.u16_at(q, OFF_VERSION).store(VERSION, Ordering::Release);
            self.counter = 0;
            return Recovery {
                resubmit: Vec::new(),
                resumed: false,
                cleared_last: false,
            };
        }
        let mut cleared_last = false;
        if r.u16_at(q, OFF_USED_IDX).load(Ordering::Acquire) != used_idx {
            // The crash came after the used ring's idx covered
            // last_batch_head and before the area said so: that head is
            // complete.
            let last = r.u16_at(q, OFF_LAST_BATCH_HEAD).load(Ordering::Acquire);
            if last < r.queue_size {
                r.u8_at(q, self.desc(last, DESC_INFLIGHT))
                    .store(0, Ordering::Release);
                cleared_last = true;
            }
            r.u16_at(q, OFF_USED_IDX).store(used_idx, Ordering::Release);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        let mut newest = 0u64;
        for h in 0..r.queue_size {
            if r.u8_at(q, self.desc(h, DESC_INFLIGHT))
                .load(Ordering::Acquire)
                == 0
            {
                continue;
            }
            let counter = r
                .u64_at(q, self.desc(h, DESC_COUNTER))
                .load(Ordering::Acquire);
            if h >= ring_size {
                // Not a head of this ring: nothing to run.
                r.u8_at(q, self.desc(h, DESC_INFLIGHT))
                    .store(0, Ordering::Release);
                continue;
            }
            newest = newest.max(counter);
            found.push((counter, h));
        }
        found.sort_unstable();
        self.counter = newest;
        Recovery {
            resubmit: found.into_iter().map(|(_, h)| h).collect(),
            resumed: true,
            cleared_last,
        }
    }

    /// `head` was taken from the avail ring.
    pub fn popped(&mut self, head: u16) {
        if head >= self.region.queue_size {
            return;
        }
        self.counter = self.counter.wrapping_add(1);
        let r = &self.region;
        r.u64_at(self.queue, self.desc(head, DESC_COUNTER))
            .store(self.counter, Ordering::Release);
        r.u8_at(self.queue, self.desc(head, DESC_INFLIGHT))
            .store(1, Ordering::Release);
    }

    /// Before `head`'s used element is published.
    pub fn completing(&self, head: u16) {
        self.region
            .u16_at(self.queue, OFF_LAST_BATCH_HEAD)
            .store(head, Ordering::Release);
    }

    /// After the used ring's idx moved to `used_idx` past `head`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        let r = &self.region;
        if head < r.queue_size {
            r.u8_at(self.queue, self.desc(head, DESC_INFLIGHT))
                .store(0, Ordering::Release);
        }
        r.u16_at(self.queue, OFF_USED_IDX)
            .store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(num_queues: u16, queue_size: u16) -> (File, Arc<Region>) {
        let (file, size) = create(num_queues, queue_size, 64, 1024).unwrap();
        assert_eq!(size, region_size(num_queues, queue_size));
        let r = Region::map(&file, size, 0, num_queues, queue_size, 64, 1024).unwrap();
        (file, Arc::new(r))
    }

    /// Reads the file as the frontend would see it.
    fn bytes(file: &File) -> Vec<u8> {
        use std::io::Read;
        let mut v = Vec::new();
        let mut f = file.try_clone().unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn layout_matches_the_spec_and_libvhost_user() {
        // libvhost-user: ALIGN_UP(sizeof(VuDescStateSplit) * queue_size +
        // sizeof(uint16_t), 64) per queue.
        for qs in [1u16, 2, 3, 4, 5, 127, 128, 256, 1000, 1024] {
            let lvu = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
            assert_eq!(queue_area_size(qs), lvu, "queue size {qs}");
            assert!(queue_area_size(qs) >= 16 + 16 * u64::from(qs));
        }
        assert_eq!(region_size(2, 128), 2 * 2112);

        let (file, r) = region(2, 128);
        let mut q1 = InflightQueue::new(r.clone(), 1).unwrap();
        assert!(InflightQueue::new(r.clone(), 2).is_none());
        q1.start(7, 128);
        q1.popped(5);
        q1.popped(9);
        q1.completing(5);
        q1.completed(5, 8);
        let b = bytes(&file);
        let area = 2112;
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        // Queue 0 untouched but for desc_num; queue 1's header.
        assert_eq!(le16(8), 0, "queue 0 version");
        assert_eq!(le16(10), 128, "queue 0 desc_num");
        assert_eq!(le64(area), 0, "features");
        assert_eq!(le16(area + 8), VERSION);
        assert_eq!(le16(area + 10), 128);
        assert_eq!(le16(area + 12), 5, "last_batch_head");
        assert_eq!(le16(area + 14), 8, "used_idx");
        // desc[5]: completed; desc[9]: in flight with counter 2.
        let desc = |h: usize| area + 16 + 16 * h;
        assert_eq!(b[desc(5)], 0);
        assert_eq!(le64(desc(5) + 8), 1);
        assert_eq!(b[desc(9)], 1);
        assert_eq!(b[desc(9) + 1..desc(9) + 6], [0; 5], "padding");
        assert_eq!(le64(desc(9) + 8), 2, "counter");
    }

    #[test]
    fn recovery_resubmits_in_counter_order() {
        let (_file, r) = region(1, 16);
        let mut q = InflightQueue::new(r.clone(), 0).unwrap();
        let fresh = q.start(0, 16);
        assert!(!fresh.resumed && fresh.resubmit.is_empty());
        for h in [3, 1, 7, 2] {
            q.popped(h);
        }
        // 1 completes normally (used idx 0 -> 1).
        q.completing(1);
        q.completed(1, 1);
        // A new backend: the area and the used ring agree.
        let mut again = InflightQueue::new(r.clone(), 0).unwrap();
        let rec = again.start(1, 16);
        assert_eq!(
            rec,
            Recovery {
                resubmit: vec![3, 7, 2],
                resumed: true,
                cleared_last: false
            }
        );
        // New heads count on from the newest.
        again.popped(4);
        let mut third = InflightQueue::new(r, 0).unwrap();
        assert_eq!(third.start(1, 16).resubmit, vec![3, 7, 2, 4]);
    }

    #[test]
    fn recovery_clears_the_head_the_used_ring_already_covers() {
        let (_file, r) = region(1, 16);
        let mut q = InflightQueue::new(r.clone(), 0).unwrap();
        q.start(10, 16);
        q.popped(3);
        q.popped(4);
        // Head 4 is being completed: the used ring's idx moved to 11, and
        // the daemon died before the area caught up.
        q.completing(4);
        let mut next = InflightQueue::new(r.clone(), 0).unwrap();
        let rec = next.start(11, 16);
        assert_eq!(rec.resubmit, vec![3], "head 4 is complete, 3 is not");
        assert!(rec.cleared_last);
        // Died before the used idx moved: 4 runs again.
        let (_file, r) = region(1, 16);
        let mut q = InflightQueue::new(r.clone(), 0).unwrap();
        q.start(10, 16);
        q.popped(3);
        q.popped(4);
        q.completing(4);
        let rec = InflightQueue::new(r, 0).unwrap().start(10, 16);
        assert_eq!(rec.resubmit, vec![3, 4]);
        assert!(!rec.cleared_last);
    }

    #[test]
    fn hostile_regions_are_bounded() {
        let (file, size) = create(1, 8, 64, 1024).unwrap();
        // Too small, past the end of the file, unaligned, wrong shapes.
        assert!(matches!(
            Region::map(&file, size - 1, 0, 1, 8, 64, 1024),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            Region::map(&file, size, 4096, 1, 8, 64, 1024),
            Err(InflightError::PastEnd { .. })
        ));
        assert!(matches!(
            Region::map(&file, size, 1, 1, 8, 64, 1024),
            Err(InflightError::Unaligned(1))
        ));
        assert!(matches!(
            Region::map(&file, size, 0, 1, 8, 64, 4),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            create(65, 8, 64, 1024),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            create(1, 0, 64, 1024),
            Err(InflightError::Shape { .. })
        ));
        // An area whose last_batch_head points outside it, and marks on
        // heads beyond the ring: ignored.
        let r = Arc::new(Region::map(&file, size, 0, 1, 8, 64, 1024).unwrap());
        let mut q = InflightQueue::new(r.clone(), 0).unwrap();
        q.start(0, 8);
        q.popped(6);
        q.completing(900);
        let rec = InflightQueue::new(r, 0).unwrap().start(5, 4);
        assert!(rec.resubmit.is_empty() && !rec.cleared_last);
    }
}
