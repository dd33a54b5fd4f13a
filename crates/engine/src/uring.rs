//! One io_uring per thread, driven from that thread's tokio `LocalSet`.
//!
//! An operation is pushed to the submission queue when it is created and
//! the ring's submitter task is notified; the submitter runs after the other
//! tasks that are ready in the same scheduler tick, so everything they
//! queued goes to the kernel in one `io_uring_enter`. Completions arrive on
//! an eventfd registered with the ring, which a reaper task watches through
//! tokio's `AsyncFd`; it records each result and wakes the waiting future.
//!
//! Ownership rule: the memory an SQE points at belongs to the operation's
//! future until the CQE arrives. If the future is dropped first, the buffer
//! moves into the in-flight table and is freed by the reaper on completion.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Submission queue entries per ring.
pub const RING_ENTRIES: u32 = 256;

/// Most entries one `io_uring_enter` submits. The kernel hands a batch's
/// block I/O to the device only when the whole batch has been issued, so
/// submitting 32 reads at once leaves the device idle while the first 31
/// are prepared; in batches of 8 the device starts early. Measured with
/// `qblk bench` 4k random reads at QD32: 65k IOPS unbounded, 80k at 8
/// (4 and 16 were slower).
const SUBMIT_BATCH: u32 = 8;

/// Most bytes in one registered buffer (the kernel's limit).
const FIXED_BUF_MAX: usize = 1 << 30;

/// Consecutive registered buffers cut from one larger region overlap by
/// this much, so that any transfer up to this size lies wholly inside one
/// of them (a virtio-blk segment is at most 1 MiB).
const FIXED_BUF_OVERLAP: usize = 4 << 20;

/// Most registered buffers per ring (the kernel's limit).
const FIXED_BUF_COUNT_MAX: usize = 1 << 14;

/// Counters of one ring, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Operations submitted.
    pub ops: u64,
    /// `io_uring_enter` calls made to submit them.
    pub submit_calls: u64,
}

/// Memory registered with the ring as fixed buffers: reads and writes
/// that lie inside it skip the kernel's per-operation page pinning.
struct Fixed {
    /// `(start address, length)` of buffer `i`, sorted by start address.
    bufs: Vec<(usize, usize)>,
    /// Keeps the memory mapped while the ring refers to it.
    _keep: Box<dyn Any>,
}

impl Fixed {
    /// The buffer holding all of `[addr, addr + len)`, if one does.
    fn find(&self, addr: usize, len: usize) -> Option<u16> {
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
fn fixed_buffers(regions: &[(*mut u8, usize)]) -> io::Result<Vec<(usize, usize)>> {
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

fn iovecs(bufs: &[(usize, usize)]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|&(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect()
}

/// Memory registered once, with a ring of its own, for the rings of
/// several threads to share through [`Ring::adopt_memory`].
///
/// Registering pins every page (faulting it in) for as long as the
/// registration, or a ring's clone of it, lasts. Pinning needs
/// `RLIMIT_MEMLOCK` room or `CAP_IPC_LOCK`, and memory the kernel can pin
/// long-term (anonymous, shmem or hugetlbfs). A pinned page stays the one
/// I/O goes to even if its owner drops it from the mapping's file (a
/// balloon or virtio-mem punching holes in guest memory): such memory must
/// not be registered.
pub struct SharedMemory {
    ring: IoUring,
    /// `(start address, length)` of buffer `i`, sorted by start address.
    bufs: Vec<(usize, usize)>,
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
    /// [`Ring::adopt_memory`]).
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

struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
    /// Set when the future was dropped before completion: the buffers the
    /// SQE points at, kept alive until the CQE arrives.
    orphan: Option<Box<dyn Any>>,
    orphaned: bool,
}

struct Inner {
    ring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    /// Entries pushed but not yet submitted.
    unsubmitted: Cell<u32>,
    submit_wanted: Rc<Notify>,
    stats: Cell<RingStats>,
    fixed: RefCell<Option<Fixed>>,
    /// The kernel takes `IORING_OP_FTRUNCATE` (Linux 6.9 and later).
    ftruncate: bool,
}

impl Inner {
    /// Submits everything queued.
    fn submit(&self) -> io::Result<()> {
        if self.unsubmitted.get() == 0 {
            return Ok(());
        }
        let ring = self.ring.borrow();
        loop {
            match ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue backlog: reap, then retry.
                    drop(ring);
                    self.reap();
                    return self.submit();
                }
                Err(e) => return Err(e),
            }
        }
        self.unsubmitted.set(0);
        let mut s = self.stats.get();
        s.submit_calls += 1;
        self.stats.set(s);
        Ok(())
    }

    /// Records every available completion and wakes its waiter.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            let key = cqe.user_data() as usize;
            let Some(slot) = slots.get_mut(key) else {
                continue;
            };
            if slot.orphaned {
                slots.remove(key);
                continue;
            }
            slot.result = Some(cqe.result());
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// Pushes an entry, submitting first if the queue is full.
    ///
    /// # Safety
    /// Everything `entry` points at must stay valid until its completion
    /// has been reaped.
    unsafe fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            let pushed = {
                let mut ring = self.ring.borrow_mut();
                // SAFETY: the caller guarantees the entry's memory outlives
                // the operation.
                unsafe { ring.submission().push(entry).is_ok() }
            };
            if pushed {
                let n = self.unsubmitted.get() + 1;
                self.unsubmitted.set(n);
                if n >= SUBMIT_BATCH {
                    // Enough for the device to start on: the kernel issues
                    // a batch's I/O only at the end of the enter call, so
                    // a large batch keeps the device idle meanwhile.
                    self.submit()?;
                }
                return Ok(());
            }
            self.unsubmitted.set(self.unsubmitted.get().max(1));
            self.submit()?;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every future is gone (each held an Rc), so every slot left is an
        // orphan whose buffer the kernel may still write: wait for them all
        // before the slab frees those buffers.
        let _ = self.submit();
        while !self.slots.borrow().is_empty() {
            if self.ring.borrow().submit_and_wait(1).is_err() {
                break;
            }
            self.reap();
        }
    }
}

/// A handle to this thread's ring.
#[derive(Clone)]
pub struct Ring {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("stats", &self.inner.stats.get())
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Drops this thread's ring (waiting for its in-flight operations).
pub(crate) fn retire_current() {
    let ring = CURRENT.with(|c| c.borrow_mut().take());
    drop(ring);
}

impl Ring {
    /// This thread's ring, created (with its driver tasks) on first use.
    ///
    /// Must be called from within [`crate::runtime::block_on`], which runs
    /// the driver tasks and retires the ring when it returns.
    pub fn current() -> io::Result<Ring> {
        if let Some(r) = CURRENT.with(|c| c.borrow().clone()) {
            return Ok(r);
        }
        let ring = Self::new()?;
        CURRENT.with(|c| *c.borrow_mut() = Some(ring.clone()));
        Ok(ring)
    }

    fn new() -> io::Result<Ring> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let mut probe = io_uring::Probe::new();
        let ftruncate = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Ftruncate::CODE);
        let inner = Rc::new(Inner {
            ring: RefCell::new(ring),
            slots: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            unsubmitted: Cell::new(0),
            submit_wanted: Rc::new(Notify::new()),
            stats: Cell::new(RingStats::default()),
            fixed: RefCell::new(None),
            ftruncate,
        });
        // SAFETY: the AsyncFd owns efd, which stays open and unchanged
        // until the AsyncFd drops.
        let afd = unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let weak = Rc::downgrade(&inner);
        tokio::task::spawn_local(async move {
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    return;
                };
                // The eventfd's counter is never read: tokio watches it
                // edge-triggered, and every completion's write is an edge.
                // That saves a system call per batch of completions.
                guard.clear_ready();
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.reap();
            }
        });
        let weak = Rc::downgrade(&inner);
        let wanted = inner.submit_wanted.clone();
        tokio::task::spawn_local(async move {
            loop {
                wanted.notified().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = inner.submit() {
                    // Fail every queued operation rather than hang it.
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    let mut slots = inner.slots.borrow_mut();
                    for (_, slot) in slots.iter_mut() {
                        if slot.result.is_none() {
                            slot.result = Some(-errno);
                            if let Some(w) = slot.waker.take() {
                                w.wake();
                            }
                        }
                    }
                }
            }
        });
        Ok(Ring { inner })
    }

    pub fn stats(&self) -> RingStats {
        self.inner.stats.get()
    }

    /// Makes `shared`'s buffers this ring's registered buffers, replacing
    /// what was registered before; returns whether the registration was
    /// cloned (Linux 6.12 and later: the pages stay pinned once, however
    /// many rings share them) rather than registered again (older kernels:
    /// pinned again for this ring).
    ///
    /// I/O to or from the memory then skips the per-operation pinning:
    /// [`Ring::fixed_index`] finds the buffer for a transfer.
    ///
    /// # Safety
    /// The memory must stay mapped, at the addresses it was registered
    /// with, for as long as `keep` lives (the ring keeps `keep` while the
    /// buffers are registered).
    pub unsafe fn adopt_memory<B: 'static>(
        &self,
        shared: &SharedMemory,
        keep: B,
    ) -> io::Result<bool> {
        self.unregister_memory();
        if shared.bufs.is_empty() {
            return Ok(false);
        }
        let cloned = {
            let ring = self.inner.ring.borrow();
            let submitter = ring.submitter();
            match submitter.register_buffers_clone(shared.ring.as_raw_fd()) {
                Ok(()) => true,
                Err(_) => {
                    // SAFETY: the buffers lie in memory the caller keeps
                    // mapped while `keep` lives, and `keep` stays with the
                    // registration.
                    unsafe { submitter.register_buffers(&iovecs(&shared.bufs)) }?;
                    false
                }
            }
        };
        *self.inner.fixed.borrow_mut() = Some(Fixed {
            bufs: shared.bufs.clone(),
            _keep: Box::new(keep),
        });
        Ok(cloned)
    }

    /// Drops the registered buffers, if any. Operations already submitted
    /// on them finish on the pages they were given.
    pub fn unregister_memory(&self) {
        if self.inner.fixed.borrow_mut().take().is_some() {
            // Only fails if nothing is registered.
            let _ = self.inner.ring.borrow().submitter().unregister_buffers();
        }
    }

    /// The registered buffer that holds all of `[ptr, ptr + len)`.
    pub fn fixed_index(&self, ptr: *const u8, len: usize) -> Option<u16> {
        self.inner.fixed.borrow().as_ref()?.find(ptr as usize, len)
    }

    /// Queues `entry` and returns the future of its completion, which owns
    /// `keep` until then.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into memory owned by `keep`
    /// (heap memory that does not move when `keep` moves), or otherwise stay
    /// valid until the operation completes.
    pub unsafe fn submit<B: 'static>(&self, entry: squeue::Entry, keep: B) -> Op<B> {
        let key = self.inner.slots.borrow_mut().insert(Slot {
            result: None,
            waker: None,
            orphan: None,
            orphaned: false,
        });
        let entry = entry.user_data(key as u64);
        // SAFETY: forwarded from this function's contract.
        let pushed = unsafe { self.inner.push(&entry) };
        if let Err(e) = pushed {
            let mut slots = self.inner.slots.borrow_mut();
            slots[key].result = Some(-e.raw_os_error().unwrap_or(libc::EIO));
        } else {
            let mut s = self.inner.stats.get();
            s.ops += 1;
            self.inner.stats.set(s);
            self.inner.submit_wanted.notify_one();
        }
        Op {
            inner: self.inner.clone(),
            key,
            keep: Some(keep),
            done: false,
        }
    }

    /// Reads into `buf[..len]` from `fd` at `offset`.
    pub fn read<B: AsMut<[u8]> + 'static>(
        &self,
        fd: i32,
        offset: u64,
        mut buf: B,
        len: usize,
    ) -> Op<B> {
        let slice = buf.as_mut();
        assert!(len <= slice.len(), "read longer than its buffer");
        let entry = opcode::Read::new(types::Fd(fd), slice.as_mut_ptr(), len as u32)
            .offset(offset)
            .build();
        // SAFETY: the entry points into buf's heap memory, which the Op owns.
        unsafe { self.submit(entry, buf) }
    }

    /// Writes `buf[..len]` to `fd` at `offset`.
    pub fn write<B: AsRef<[u8]> + 'static>(
        &self,
        fd: i32,
        offset: u64,
        buf: B,
        len: usize,
    ) -> Op<B> {
        let slice = buf.as_ref();
        assert!(len <= slice.len(), "write longer than its buffer");
        let entry = opcode::Write::new(types::Fd(fd), slice.as_ptr(), len as u32)
            .offset(offset)
            .build();
        // SAFETY: the entry points into buf's heap memory, which the Op owns.
        unsafe { self.submit(entry, buf) }
    }

    /// fdatasync (`datasync`) or fsync of `fd`.
    pub fn fsync(&self, fd: i32, datasync: bool) -> Op<()> {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(flags).build();
        // SAFETY: the entry points at no memory.
        unsafe { self.submit(entry, ()) }
    }

    /// Whether [`Ring::ftruncate`] is available (probed at creation).
    pub fn supports_ftruncate(&self) -> bool {
        self.inner.ftruncate
    }

    /// ftruncate(`fd`, `len`); only where [`Ring::supports_ftruncate`].
    pub fn ftruncate(&self, fd: i32, len: u64) -> Op<()> {
        let entry = opcode::Ftruncate::new(types::Fd(fd), len).build();
        // SAFETY: the entry points at no memory.
        unsafe { self.submit(entry, ()) }
    }

    /// fallocate(`fd`, `mode`, `offset`, `len`).
    pub fn fallocate(&self, fd: i32, mode: i32, offset: u64, len: u64) -> Op<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: the entry points at no memory.
        unsafe { self.submit(entry, ()) }
    }
}

/// The completion of one operation: `(result, the buffers it owned)`.
#[must_use = "an io_uring operation does nothing useful unless awaited"]
pub struct Op<B: 'static> {
    inner: Rc<Inner>,
    key: usize,
    keep: Option<B>,
    done: bool,
}

impl<B: 'static> std::fmt::Debug for Op<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("key", &self.key)
            .field("done", &self.done)
            .finish()
    }
}

// Op never pins its buffer: the kernel sees the buffer's heap memory, not
// the Op, so moving an Op is fine.
impl<B: 'static> Unpin for Op<B> {}

impl<B: 'static> Future for Op<B> {
    type Output = (io::Result<u32>, B);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Op is Unpin: it holds no self-references.
        let this = self.get_mut();
        let mut slots = this.inner.slots.borrow_mut();
        let slot = &mut slots[this.key];
        match slot.result {
            Some(res) => {
                slots.remove(this.key);
                this.done = true;
                let keep = this.keep.take().expect("Op polled after completion");
                let r = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as u32)
                };
                Poll::Ready((r, keep))
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<B: 'static> Drop for Op<B> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut slots = self.inner.slots.borrow_mut();
        let Some(slot) = slots.get_mut(self.key) else {
            return;
        };
        if slot.result.is_some() {
            slots.remove(self.key);
        } else {
            slot.orphaned = true;
            slot.waker = None;
            slot.orphan = self.keep.take().map(|b| Box::new(b) as Box<dyn Any>);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::block_on;
    use std::io::Write;

    #[test]
    fn read_write_fsync_round_trip() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let fd = f.as_raw_fd();
        block_on(async move {
            let ring = Ring::current().unwrap();
            let (r, buf) = ring.read(fd, 4096, vec![0u8; 4096], 4096).await;
            assert_eq!(r.unwrap(), 4096);
            assert!(buf.iter().all(|&b| b == 7));
            let (r, _) = ring.write(fd, 100, vec![9u8; 10], 10).await;
            assert_eq!(r.unwrap(), 10);
            ring.fsync(fd, true).await.0.unwrap();
            let (r, buf) = ring.read(fd, 96, vec![0u8; 16], 16).await;
            assert_eq!(r.unwrap(), 16);
            assert_eq!(&buf[..], &[7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 7, 7]);
        });
        drop(f);
    }

    #[test]
    fn many_concurrent_ops_share_submissions() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i / 4096) as u8).collect();
        f.write_all(&data).unwrap();
        let fd = f.as_raw_fd();
        block_on(async move {
            let ring = Ring::current().unwrap();
            let before = ring.stats();
            let mut tasks = Vec::new();
            for i in 0..256u64 {
                let ring = ring.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let (r, buf) = ring.read(fd, i * 4096, vec![0u8; 4096], 4096).await;
                    assert_eq!(r.unwrap(), 4096);
                    assert!(buf.iter().all(|&b| b == i as u8));
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let after = ring.stats();
            assert_eq!(after.ops - before.ops, 256);
            // Batched: one enter call per SUBMIT_BATCH operations (and
            // one for a tail), far fewer than operations.
            let calls = after.submit_calls - before.submit_calls;
            assert!(
                calls <= u64::from(256 / SUBMIT_BATCH) + 1,
                "{before:?} {after:?}"
            );
        });
        drop(f);
    }

    #[test]
    fn dropped_ops_keep_their_buffers_until_completion() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 65536]).unwrap();
        let fd = f.as_raw_fd();
        block_on(async move {
            let ring = Ring::current().unwrap();
            for i in 0..64 {
                // Dropped right after submission.
                drop(ring.read(fd, i * 1024, vec![0u8; 1024], 1024));
            }
            let (r, _) = ring.read(fd, 0, vec![0u8; 16], 16).await;
            assert_eq!(r.unwrap(), 16);
        });
        drop(f);
    }

    #[test]
    fn errors_come_back_as_io_errors() {
        block_on(async {
            let ring = Ring::current().unwrap();
            let (r, _) = ring.read(-1, 0, vec![0u8; 16], 16).await;
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        });
    }

    #[test]
    fn big_regions_are_cut_into_overlapping_buffers() {
        let gib = 1usize << 30;
        let base = 0x7f00_0000_0000usize;
        let bufs = fixed_buffers(&[
            ((base + 4 * gib) as *mut u8, 4096),
            (base as *mut u8, 2 * gib + 8192),
        ])
        .unwrap();
        let step = FIXED_BUF_MAX - FIXED_BUF_OVERLAP;
        assert_eq!(
            bufs,
            vec![
                (base, gib),
                (base + step, gib),
                (base + 2 * step, 2 * gib + 8192 - 2 * step),
                (base + 4 * gib, 4096),
            ]
        );
        let fixed = Fixed {
            bufs,
            _keep: Box::new(()),
        };
        // Every 1 MiB transfer of the big region lies inside one buffer,
        // including those across a cut.
        for at in [
            0,
            step - 1,
            gib - (1 << 20),
            gib - 4096,
            2 * step + 1,
            2 * gib + 8192 - (1 << 20),
        ] {
            let i = fixed.find(base + at, 1 << 20).expect("covered") as usize;
            let (start, len) = fixed.bufs[i];
            assert!(
                start <= base + at && base + at + (1 << 20) <= start + len,
                "{at}"
            );
        }
        assert_eq!(fixed.find(base + 4 * gib, 4096), Some(3));
        assert_eq!(fixed.find(base + 4 * gib, 4097), None);
        assert_eq!(fixed.find(base + 2 * gib + 8192 - 1, 2), None);
        assert_eq!(fixed.find(base - 1, 1), None);
        assert_eq!(fixed.find(usize::MAX, 2), None);
    }
}
