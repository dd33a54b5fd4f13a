//! `--pin-guest-memory`: registering the frontend's memory with a queue
//! worker's io_uring, so reads and writes of guest buffers skip the
//! kernel's per-request page pinning.
//!
//! Registering pins every page, faulting in those the guest has not
//! touched yet, which for fresh memory takes about a second per GiB. So a
//! helper thread faults the memory in first while the queue goes on
//! serving without registered buffers; when it is done it kicks the
//! worker, whose registration then takes about a millisecond per 64 MiB.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use tracing::{info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use qblk_engine::file::KeepAlive;

use crate::request::Mem;

/// Where registering guest memory with a worker's ring stands.
#[derive(Default)]
pub(crate) struct Pinning {
    /// The memory table registered with the ring (or found empty).
    registered: Option<Arc<Mem>>,
    /// Memory being faulted in, to be registered next.
    faulting: Option<Faulting>,
    /// Registering failed: not tried again until every queue is detached.
    failed: bool,
    /// Queues attached on this thread (all of one connection).
    users: usize,
}

/// A helper thread faulting in guest memory before it is registered.
struct Faulting {
    mem: Arc<Mem>,
    done: Arc<AtomicBool>,
    /// Asks the thread to stop early (the memory changed or went away).
    cancel: Arc<AtomicBool>,
}

/// Whether the kernel can pin `region` long-term: memory in shmem (a
/// memfd) or hugetlbfs, or anonymous memory. (It refuses other file
/// mappings: their pages may be written back and replaced.)
fn pinnable(region: &GuestRegionMmap) -> bool {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;
    let Some(file) = region.file_offset() else {
        return true;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills `st` for an open descriptor, or fails.
    if unsafe { libc::fstatfs(file.file().as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so `st` is initialised.
    // (`f_type`'s width differs between architectures; the magics fit in
    // 32 bits.)
    let kind = unsafe { st.assume_init() }.f_type as u32;
    kind == TMPFS_MAGIC || kind == HUGETLBFS_MAGIC
}

impl Faulting {
    /// Bytes faulted in per `madvise` call, between checks for `cancel`.
    const CHUNK: usize = 64 << 20;

    fn start(queue: usize, mem: Arc<Mem>, kick: Arc<Notify>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let job = (mem.clone(), done.clone(), cancel.clone(), kick.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("qblk-pin{queue}"))
            .spawn(move || {
                let (mem, done, cancel, kick) = job;
                'regions: for r in mem.iter() {
                    if !pinnable(r) {
                        // Registration will refuse it without faulting
                        // anything in; populating a file on disk would
                        // write it.
                        continue;
                    }
                    let (base, len) = (r.as_ptr(), r.len() as usize);
                    let mut off = 0;
                    while off < len {
                        if cancel.load(Ordering::Acquire) {
                            break 'regions;
                        }
                        let n = (len - off).min(Self::CHUNK);
                        // SAFETY: [base + off, + n) lies in a mapping of
                        // `mem`, which this thread keeps alive; populating
                        // only faults pages in, it changes no contents.
                        // Failure (a kernel before 5.14) just leaves the
                        // faulting to the registration.
                        unsafe {
                            libc::madvise(
                                base.wrapping_add(off).cast(),
                                n,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        off += n;
                    }
                }
                done.store(true, Ordering::Release);
                kick.notify_one();
            });
        if spawned.is_err() {
            // No helper: the registration faults the memory in itself.
            done.store(true, Ordering::Release);
            kick.notify_one();
        }
        Self { mem, done, cancel }
    }
}

impl Pinning {
    /// Registers `mem` with this thread's ring unless it already is (the
    /// frontend may have changed its memory table since), or starts
    /// faulting it in; `kick` wakes the worker when that is done.
    pub(crate) fn update(&mut self, queue: usize, mem: &Arc<Mem>, kick: &Arc<Notify>) {
        if self.failed
            || self
                .registered
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, mem))
        {
            return;
        }
        if mem.num_regions() == 0 {
            // No memory (a refused table was replaced by an empty one):
            // nothing to register, and nothing to fail on.
            self.release();
            self.registered = Some(mem.clone());
            return;
        }
        match &self.faulting {
            Some(f) if Arc::ptr_eq(&f.mem, mem) => {
                if !f.done.load(Ordering::Acquire) {
                    return;
                }
                self.faulting = None;
            }
            _ => {
                if let Some(f) = self.faulting.take() {
                    f.cancel.store(true, Ordering::Release);
                }
                self.faulting = Some(Faulting::start(queue, mem.clone(), kick.clone()));
                return;
            }
        }
        // Regions the kernel cannot pin are left out (their requests go
        // unpinned) rather than failing the whole table.
        let regions: Vec<(*mut u8, usize)> = mem
            .iter()
            .filter(|r| pinnable(r))
            .map(|r| (r.as_ptr(), r.len() as usize))
            .collect();
        let keep: KeepAlive = mem.clone();
        let started = std::time::Instant::now();
        let registered = if regions.is_empty() {
            Err(std::io::Error::other(
                "none of its regions is in shmem or hugetlbfs",
            ))
        } else {
            qblk_engine::uring::Ring::current().and_then(|ring| {
                // SAFETY: the regions are mappings of `mem`, which stay
                // mapped while `keep` (a clone of it) lives, and the ring
                // holds `keep` while they are registered.
                unsafe { ring.register_memory(&regions, keep) }
            })
        };
        match registered {
            Ok(bytes) => {
                info!(
                    queue,
                    mib = bytes >> 20,
                    ms = started.elapsed().as_millis() as u64,
                    "guest memory pinned for fixed-buffer I/O"
                );
                self.registered = Some(mem.clone());
            }
            Err(e) => {
                // Serve without registered buffers rather than refuse the
                // guest; and let go of any earlier table's.
                self.failed = true;
                self.release();
                warn!(
                    queue,
                    "cannot pin guest memory ({e}); serving without registered buffers \
                     (pinning needs CAP_IPC_LOCK or `ulimit -l` above guest RAM, and guest \
                     memory in shmem, hugetlbfs or anonymous memory)"
                );
            }
        }
    }

    /// A queue of this thread was attached.
    pub(crate) fn attach(&mut self) {
        self.users += 1;
    }

    /// A queue of this thread was detached: when it was the last, the
    /// registration goes (the connection is over, or the device reset).
    pub(crate) fn detach(&mut self) {
        self.users = self.users.saturating_sub(1);
        if self.users == 0 {
            self.release();
            self.failed = false;
        }
    }

    /// Lets go of the registered guest memory (and stops faulting in).
    fn release(&mut self) {
        if let Some(f) = self.faulting.take() {
            f.cancel.store(true, Ordering::Release);
        }
        if self.registered.take().is_some() {
            if let Ok(ring) = qblk_engine::uring::Ring::current() {
                ring.unregister_memory();
            }
        }
    }
}
