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

mod fixed;

pub use fixed::SharedMemory;
use fixed::{Fixed, iovecs};

/// Submission queue entries per ring.
pub const RING_ENTRIES: u32 = 256;

/// Most entries one `io_uring_enter` submits. The kernel hands a batch's
/// block I/O to the device only when the whole batch has been issued, so
/// submitting 32 reads at once leaves the device idle while the first 31
/// are prepared; in batches of 8 the device starts early. Measured with
/// `qblk bench` 4k random reads at QD32: 65k IOPS unbounded, 80k at 8
/// (4 and 16 were slower).
const SUBMIT_BATCH: u32 = 8;

/// Counters of one ring, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Operations submitted.
    pub ops: u64,
    /// `io_uring_enter` calls made to submit them.
    pub submit_calls: u64,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its entry is in the submission queue; the kernel has not taken it.
    Queued,
    /// The kernel took its entry and may be using its memory.
    InKernel,
    /// Its completion arrived (or it never reached the queue).
    Done(i32),
}

struct Slot {
    state: State,
    /// Part of the entry's user_data: a completion for an older operation
    /// that used this slot never matches.
    generation: u32,
    waker: Option<Waker>,
    /// Set when the future was dropped before completion: the buffers the
    /// entry points at, kept alive until the completion arrives.
    orphan: Option<Box<dyn Any>>,
    orphaned: bool,
}

/// An entry's user_data: slot key and generation.
fn user_data(key: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | key as u64
}

/// A submit error worth retrying soon: the kernel is short of room for
/// completions or requests.
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
}

/// Tests: what the next `io_uring_enter` should do instead of the usual.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Inject {
    /// Fail with this errno, taking nothing.
    Fail(i32),
    /// Take only this many entries.
    Partial(u32),
}

struct Inner {
    ring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    /// Keys of the entries in the submission queue the kernel has not
    /// taken yet, in the order they were pushed (the kernel takes them in
    /// that order).
    queued: RefCell<std::collections::VecDeque<usize>>,
    next_generation: Cell<u32>,
    submit_wanted: Rc<Notify>,
    stats: Cell<RingStats>,
    fixed: RefCell<Option<Fixed>>,
    /// The kernel takes `IORING_OP_FTRUNCATE` (Linux 6.9 and later).
    ftruncate: bool,
    #[cfg(test)]
    inject: RefCell<std::collections::VecDeque<Inject>>,
}

impl Inner {
    /// One `io_uring_enter` for everything queued: how many entries the
    /// kernel took.
    fn enter(&self) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(i) = self.inject.borrow_mut().pop_front() {
            return match i {
                Inject::Fail(errno) => Err(io::Error::from_raw_os_error(errno)),
                Inject::Partial(n) => {
                    let ring = self.ring.borrow();
                    // SAFETY: a plain submit of `n` queued entries, no
                    // argument pointer.
                    unsafe { ring.submitter().enter::<libc::sigset_t>(n, 0, 0, None) }
                }
            };
        }
        self.ring.borrow().submit()
    }

    /// Hands everything queued to the kernel. On an error the entries it
    /// did not take stay queued (their memory stays owned), to be retried.
    fn submit(&self) -> io::Result<()> {
        while !self.queued.borrow().is_empty() {
            let taken = match self.enter() {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            };
            let mut s = self.stats.get();
            s.submit_calls += 1;
            self.stats.set(s);
            if taken == 0 {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            let mut queued = self.queued.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            let n = taken.min(queued.len());
            for key in queued.drain(..n) {
                if let Some(slot) = slots.get_mut(key) {
                    if slot.state == State::Queued {
                        slot.state = State::InKernel;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records every available completion and wakes its waiter. A
    /// completion whose slot was reused since (another generation) or is
    /// gone is dropped.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            let key = (cqe.user_data() & u64::from(u32::MAX)) as usize;
            let generation = (cqe.user_data() >> 32) as u32;
            let Some(slot) = slots.get_mut(key) else {
                continue;
            };
            if slot.generation != generation || !matches!(slot.state, State::InKernel) {
                continue;
            }
            if slot.orphaned {
                slots.remove(key);
                continue;
            }
            slot.state = State::Done(cqe.result());
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
        drop(slots);
        drop(ring);
        if !self.queued.borrow().is_empty() {
            // A submission held back for want of room may go now.
            self.submit_wanted.notify_one();
        }
    }

    /// Pushes the entry of slot `key`, handing queued entries to the
    /// kernel first if the queue is full. `Err` means the entry is not in
    /// the queue (and never will be).
    ///
    /// # Safety
    /// Everything `entry` points at must stay valid until its completion
    /// has been reaped.
    unsafe fn push(&self, key: usize, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            let pushed = {
                let mut ring = self.ring.borrow_mut();
                // SAFETY: the caller guarantees the entry's memory outlives
                // the operation.
                unsafe { ring.submission().push(entry).is_ok() }
            };
            if pushed {
                let n = {
                    let mut q = self.queued.borrow_mut();
                    q.push_back(key);
                    q.len()
                };
                if n >= SUBMIT_BATCH as usize {
                    // Enough for the device to start on: the kernel issues
                    // a batch's I/O only at the end of the enter call, so
                    // a large batch keeps the device idle meanwhile. On an
                    // error the entries stay queued for the submitter.
                    let _ = self.submit();
                }
                return Ok(());
            }
            // The queue is full: make room, or give up on this one entry.
            if let Err(e) = self.submit() {
                if !transient(&e) {
                    return Err(e);
                }
                self.reap();
                self.submit()?;
            }
        }
    }

    #[cfg(test)]
    fn count(&self, f: impl Fn(&State) -> bool) -> usize {
        self.slots
            .borrow()
            .iter()
            .filter(|(_, s)| f(&s.state))
            .count()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every future is gone (each held an Rc), so every slot left is an
        // orphan whose buffer the kernel may still use: wait for all that
        // reached the kernel before the slab frees those buffers. Entries
        // it never took are never used once the ring is closed.
        let _ = self.submit();
        loop {
            let in_kernel = self
                .slots
                .borrow()
                .iter()
                .any(|(_, s)| s.state == State::InKernel);
            if !in_kernel {
                break;
            }
            // Wait for a completion without submitting anything more (an
            // entry submitted here would not be tracked as in the kernel).
            // SAFETY: no argument pointer; 1 is IORING_ENTER_GETEVENTS.
            let waited = unsafe {
                self.ring
                    .borrow()
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, 1, None)
            };
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break,
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
            queued: RefCell::new(std::collections::VecDeque::with_capacity(
                RING_ENTRIES as usize,
            )),
            next_generation: Cell::new(0),
            submit_wanted: Rc::new(Notify::new()),
            stats: Cell::new(RingStats::default()),
            fixed: RefCell::new(None),
            ftruncate,
            #[cfg(test)]
            inject: RefCell::new(std::collections::VecDeque::new()),
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
            let mut warned = false;
            loop {
                wanted.notified().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                match inner.submit() {
                    Ok(()) => warned = false,
                    // Out of room: the reaper asks again once completions
                    // have made some.
                    Err(e) if transient(&e) => inner.reap(),
                    Err(e) => {
                        // Nothing queued may be failed: its entry is still
                        // in the submission queue and the kernel may take
                        // it on the next enter. Retry after a pause.
                        if !warned {
                            tracing::warn!("io_uring submit failed, retrying: {e}");
                            warned = true;
                        }
                        drop(inner);
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        wanted.notify_one();
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
        let generation = self.inner.next_generation.get();
        self.inner.next_generation.set(generation.wrapping_add(1));
        let key = self.inner.slots.borrow_mut().insert(Slot {
            state: State::Queued,
            generation,
            waker: None,
            orphan: None,
            orphaned: false,
        });
        let entry = entry.user_data(user_data(key, generation));
        // SAFETY: forwarded from this function's contract.
        let pushed = unsafe { self.inner.push(key, &entry) };
        match pushed {
            Err(e) => {
                // Never queued: nothing refers to the memory.
                let mut slots = self.inner.slots.borrow_mut();
                slots[key].state = State::Done(-e.raw_os_error().unwrap_or(libc::EIO));
            }
            Ok(()) => {
                let mut s = self.inner.stats.get();
                s.ops += 1;
                self.inner.stats.set(s);
                self.inner.submit_wanted.notify_one();
            }
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
        match slot.state {
            State::Done(res) => {
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
            State::Queued | State::InKernel => {
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
        if matches!(slot.state, State::Done(_)) {
            slots.remove(self.key);
        } else {
            slot.orphaned = true;
            slot.waker = None;
            slot.orphan = self.keep.take().map(|b| Box::new(b) as Box<dyn Any>);
        }
    }
}

#[cfg(test)]
mod tests;
