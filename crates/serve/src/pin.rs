//! `--pin-guest-memory`: registering the frontend's memory with the queue
//! workers' io_uring instances, so reads and writes of guest buffers skip
//! the kernel's per-request page pinning.
//!
//! Registering pins every page, faulting in those the guest has not
//! touched yet, which for fresh memory takes about a second per GiB. So
//! for each memory table of a connection one helper thread faults the
//! memory in and registers it with a ring of its own ([`SharedMemory`]),
//! while the queues go on serving without registered buffers; then it
//! kicks the queue that asked, and each worker thread adopts the
//! registration into its ring at its next look (a clone of it on Linux
//! 6.12 and later, so the pages are pinned once however many threads
//! serve the queues).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tracing::{info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use qblk_engine::file::KeepAlive;
use qblk_engine::uring::{Ring, SharedMemory};

use crate::request::Mem;

/// Bytes faulted in per `madvise` call, between checks for cancellation.
const FAULT_CHUNK: usize = 64 << 20;

/// The pinning of one connection's memory tables, shared by its queues.
#[derive(Debug, Default)]
pub(crate) struct SharedPins {
    job: Mutex<Option<Arc<Job>>>,
}

/// Pinning one memory table: a helper thread's work and its outcome.
#[derive(Debug)]
struct Job {
    mem: Arc<Mem>,
    /// Asks the helper to stop early (the table changed).
    cancel: AtomicBool,
    result: OnceLock<Result<SharedMemory, String>>,
    /// The kicks of the queues waiting for the result.
    waiters: Mutex<Vec<Arc<Notify>>>,
}

impl SharedPins {
    /// The job pinning `mem`, started if this is the first ask (a job for
    /// an older table is cancelled). `kick` wakes the asking queue when
    /// the job is done, unless it is done already.
    fn job_for(&self, queue: usize, mem: &Arc<Mem>, kick: &Arc<Notify>) -> Arc<Job> {
        let mut slot = crate::lock(&self.job);
        let job = match slot.as_ref().filter(|j| Arc::ptr_eq(&j.mem, mem)) {
            Some(job) => job.clone(),
            None => {
                if let Some(old) = slot.take() {
                    old.cancel.store(true, Ordering::Release);
                }
                let job = Arc::new(Job {
                    mem: mem.clone(),
                    cancel: AtomicBool::new(false),
                    result: OnceLock::new(),
                    waiters: Mutex::new(Vec::new()),
                });
                let work = job.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("qblk-pin{queue}"))
                    .spawn(move || work.finish(work.run()));
                if let Err(e) = spawned {
                    job.finish(Err(format!("cannot start a thread to pin it: {e}")));
                }
                *slot = Some(job.clone());
                job
            }
        };
        // Registered before the caller looks at the result: a result set
        // after that look finds this kick.
        let mut waiters = crate::lock(&job.waiters);
        if !waiters.iter().any(|w| Arc::ptr_eq(w, kick)) {
            waiters.push(kick.clone());
        }
        drop(waiters);
        job
    }
}

impl Drop for SharedPins {
    /// The connection is over: a helper still at work stops.
    fn drop(&mut self) {
        if let Some(job) = self.job.get_mut().ok().and_then(Option::take) {
            job.cancel.store(true, Ordering::Release);
        }
    }
}

impl Job {
    /// Records the outcome and wakes the queues waiting for it.
    fn finish(&self, result: Result<SharedMemory, String>) {
        let _ = self.result.set(result);
        let waiters = std::mem::take(&mut *crate::lock(&self.waiters));
        for w in waiters {
            w.notify_one();
        }
    }

    /// Faults the pinnable regions in, then registers them.
    fn run(&self) -> Result<SharedMemory, String> {
        let regions: Vec<(*mut u8, usize)> = self
            .mem
            .iter()
            .filter(|r| pinnable(r))
            .map(|r| (r.as_ptr(), r.len() as usize))
            .collect();
        if regions.is_empty() {
            return Err("none of its regions is in shmem or hugetlbfs".into());
        }
        for &(base, len) in &regions {
            let mut off = 0;
            while off < len {
                if self.cancel.load(Ordering::Acquire) {
                    return Err("replaced by a newer memory table".into());
                }
                let n = (len - off).min(FAULT_CHUNK);
                // SAFETY: [base + off, + n) lies in a mapping of `mem`,
                // which the job keeps alive; populating only faults pages
                // in, it changes no contents. Failure (a kernel before
                // 5.14) leaves the faulting to the registration.
                unsafe {
                    libc::madvise(base.wrapping_add(off).cast(), n, libc::MADV_POPULATE_WRITE)
                };
                off += n;
            }
        }
        // SAFETY: the regions are mappings of `mem`; every ring that adopts
        // the registration keeps a clone of `mem` (see `Pinning::update`).
        unsafe { SharedMemory::register(&regions) }.map_err(|e| e.to_string())
    }
}

/// Whether the kernel can pin `region` long-term: memory in shmem (a
/// memfd) or hugetlbfs, or anonymous memory. (It refuses other file
/// mappings: their pages may be written back and replaced; and
/// populating a file on disk would write it.)
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

/// Where one worker thread's ring stands with guest memory.
#[derive(Debug, Default)]
pub(crate) struct Pinning {
    /// The memory table adopted by the ring (or found empty).
    adopted: Option<Arc<Mem>>,
    /// Pinning failed: not tried again until every queue is detached.
    failed: bool,
    /// Queues attached on this thread (all of one connection).
    users: usize,
}

impl Pinning {
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

    /// Brings this thread's ring up to date with `mem`, the memory table
    /// queue `queue` sees: adopts its registration if `pins` has finished
    /// it, or has it started (`kick` wakes the queue when it is done).
    pub(crate) fn update(
        &mut self,
        pins: &SharedPins,
        queue: usize,
        mem: &Arc<Mem>,
        kick: &Arc<Notify>,
    ) {
        if self.failed || self.adopted.as_ref().is_some_and(|a| Arc::ptr_eq(a, mem)) {
            return;
        }
        if mem.num_regions() == 0 {
            // No memory (a refused table was replaced by an empty one):
            // nothing to register, and nothing to fail on.
            self.release();
            self.adopted = Some(mem.clone());
            return;
        }
        let job = pins.job_for(queue, mem, kick);
        let Some(result) = job.result.get() else {
            return;
        };
        let adopted = result.as_ref().map_err(Clone::clone).and_then(|shared| {
            let ring = Ring::current().map_err(|e| e.to_string())?;
            let keep: KeepAlive = mem.clone();
            // SAFETY: the registration covers mappings of `mem`, which stay
            // mapped while `keep` (a clone of it) lives, and the ring holds
            // `keep` while the buffers are registered.
            let cloned = unsafe { ring.adopt_memory(shared, keep) }.map_err(|e| e.to_string())?;
            Ok((shared.bytes(), cloned))
        });
        match adopted {
            Ok((bytes, cloned)) => {
                info!(
                    queue,
                    mib = bytes >> 20,
                    cloned,
                    "guest memory pinned for fixed-buffer I/O"
                );
                self.adopted = Some(mem.clone());
            }
            Err(e) => {
                // Serve without registered buffers rather than refuse the
                // guest; and let go of any earlier table's.
                self.release();
                self.failed = true;
                warn!(
                    queue,
                    "cannot pin guest memory ({e}); serving without registered buffers \
                     (pinning needs CAP_IPC_LOCK or `ulimit -l` above guest RAM, and guest \
                     memory in shmem, hugetlbfs or anonymous memory)"
                );
            }
        }
    }

    /// Lets go of the ring's registration.
    fn release(&mut self) {
        if self.adopted.take().is_some() {
            if let Ok(ring) = Ring::current() {
                ring.unregister_memory();
            }
        }
    }
}
