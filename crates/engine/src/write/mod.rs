//! The write path of a writable image.
//!
//! Who does what:
//!
//! - `alloc.rs`: the allocator — refcounts in memory, the free-cluster
//!   search, runs of new clusters, refcount table growth. Memory only.
//! - `data.rs`: guest data — in-place writes, allocating writes with
//!   copy-on-write (and the encryption read-modify-write), extending the
//!   file ahead of allocation.
//! - `l2.rs`: L2 updates — publishing an entry (copying a shared table
//!   first), write-zeroes, discard, compressed writes.
//! - `resize.rs`: growing and shrinking the virtual disk.
//! - `backing.rs`: switching the backing file the header names.
//! - `prealloc.rs`: preallocating unallocated space (resize --preallocation).
//! - `snapshot.rs`: internal snapshots (create, delete, apply).
//! - `bitmap_store.rs`: storing the persistent dirty bitmaps
//!   (`crate::bitmaps`), and the operations on them.
//! - `writeback.rs`: **the only code that writes metadata or syncs**: it
//!   turns what the others left dirty into one ordered [`Commit`] per
//!   writeback (`crate::commit`), and runs the flush, close, open-time and
//!   corrupt-bit commits.
//!
//! Locks: the allocator lock (`Writer::alloc`, a std mutex) covers
//! in-memory lookups and updates only; code under it is synchronous, so it
//! cannot wait for I/O (a step that needs a block or table read says so and
//! is run again after the read, see [`Writer::with_alloc`]). The commit
//! lock serialises commits and is held across their I/O, but no allocation
//! or guest write waits for it: allocating writes to other clusters go on
//! while a writeback's metadata writes are in flight. A guest cluster's own
//! lock orders the allocations, zeroing and discards of that cluster.
//!
//! [`Commit`]: crate::commit::Commit

mod alloc;
mod backing;
mod bitmap_store;
mod data;
mod l2;
mod prealloc;
mod resize;
mod snapshot;
mod writeback;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use qblk_qcow2::{Header, HostOffset};

use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::guest::{GuestSlice, In};
use crate::image::Image;
use crate::journal::Journal;

pub(crate) use alloc::{Miss, Refcounts, Step};
pub use prealloc::Preallocation;
pub(crate) use writeback::prepare_for_writing;

/// Dirty L2 tables allowed before an allocating write forces a writeback.
const MAX_DIRTY_L2_TABLES: usize = 256;

/// The state only a writable image has.
#[derive(Debug)]
pub(crate) struct Writer {
    /// The allocator. Held for in-memory work only, never across an await.
    alloc: std::sync::Mutex<Alloc>,
    /// Serialises commits; knows what the last writeback made durable.
    commit: tokio::sync::Mutex<Synced>,
    /// The file's length as extended ahead of allocation.
    extend: tokio::sync::Mutex<Extend>,
    /// Counts completed guest writes, so a flush can tell whether a
    /// writeback that already finished covered everything acknowledged
    /// before it.
    write_gen: AtomicU64,
    /// Set once metadata was found inconsistent: no more writes.
    corrupt: AtomicBool,
    /// Table changes are committed before the write that made them
    /// returns: a crash journal was asked for and cannot be kept.
    write_through: bool,
    /// Serialises partial-sector writes to encrypted images (each
    /// decrypts, patches and re-encrypts whole sectors).
    crypto_rmw: tokio::sync::Mutex<()>,
    /// Per-guest-cluster locks of allocations, zeroing and discards.
    cluster_locks: std::sync::Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// The persistent dirty bitmaps, marked by every write.
    pub(crate) bitmaps: crate::bitmaps::Bitmaps,
}

/// Allocator state, behind the allocator lock.
#[derive(Debug)]
pub(crate) struct Alloc {
    rc: Refcounts,
    /// The header as the next writeback leaves it on disk (a grown
    /// refcount table, a moved L1 table, a new size, the dirty bit).
    header: Header,
    /// The header as it is on disk now.
    disk_header: Header,
    /// The host cluster compressed data is being packed into, and how many
    /// bytes of it are used.
    compressed_tail: Option<(HostOffset, u64)>,
    /// Lazy refcounts: refcount updates are deferred behind the dirty bit.
    lazy: bool,
    /// The L1 table on disk (offset, clusters) when a resize moved the
    /// table in memory: the next writeback writes the new one and switches
    /// the header, after which these clusters are freed.
    l1_replaced: Option<(HostOffset, qblk_qcow2::ClusterCount)>,
    /// The refcount table's place as the tables (and so the guest-data
    /// overlap check) know it: offset and bytes.
    published_rt: (u64, u64),
    /// The crash journal, when the image keeps one (`crate::journal`).
    journal: Option<Journal>,
    /// Table changes made so far (with a journal: its last record).
    changes: u64,
    /// Writes of structures only the header names (a bitmap store's), for
    /// the next writeback to make durable before the header.
    extra_writes: Vec<bitmap_store::ExtraWrite>,
}

impl Alloc {
    /// The L2 table word at host offset `offset` now holds `value`.
    pub(super) fn note_l2_word(&mut self, offset: u64, value: u64) {
        self.changes += 1;
        if let Some(j) = &mut self.journal {
            j.l2_word(self.changes, offset, value);
        }
    }

    /// A new L2 table of `len` bytes at `offset`: zeros for now.
    pub(super) fn note_l2_new(&mut self, offset: u64, len: u64) {
        self.changes += 1;
        if let Some(j) = &mut self.journal {
            j.l2_new(self.changes, offset, len);
        }
    }

    /// A new L2 table at `offset`: a copy of the one at `source` (shared
    /// with a snapshot; the reference to it is released by the next
    /// writeback, so it stays as it is while this record counts).
    pub(super) fn note_l2_copy(&mut self, offset: u64, source: u64) {
        self.changes += 1;
        if let Some(j) = &mut self.journal {
            j.l2_copy(self.changes, offset, source);
        }
    }

    /// L1 entry `index` now holds `value`.
    pub(super) fn note_l1(&mut self, index: u64, value: u64) {
        self.changes += 1;
        if let Some(j) = &mut self.journal {
            j.l1(self.changes, index, value);
        }
    }
}

/// What the last completed writeback covered.
#[derive(Debug, Default)]
struct Synced {
    /// The write generation it made durable.
    durable_gen: u64,
    /// The table changes it committed (`Alloc::changes`).
    changes: u64,
}

/// The image file's length, extended ahead of allocation.
#[derive(Debug)]
struct Extend {
    /// The length as this session left it.
    file_len: u64,
    /// The length at open: trimmed back to no shorter than this.
    opened_len: u64,
    /// Extending ahead failed once (e.g. no fallocate here): don't retry.
    no_prealloc: bool,
}

/// A loaded L2 table handed to a step run again after its read.
#[derive(Debug)]
pub(crate) struct Staged {
    offset: HostOffset,
    table: Arc<AlignedBuf>,
    /// `Tables::l2_epoch` when it was read: stale if that moved on.
    epoch: u64,
}

impl Writer {
    fn new(
        alloc: Alloc,
        file_len: u64,
        write_through: bool,
        bitmaps: crate::bitmaps::Bitmaps,
    ) -> Self {
        Self {
            alloc: std::sync::Mutex::new(alloc),
            commit: tokio::sync::Mutex::new(Synced::default()),
            extend: tokio::sync::Mutex::new(Extend {
                file_len,
                opened_len: file_len,
                no_prealloc: false,
            }),
            write_gen: AtomicU64::new(0),
            corrupt: AtomicBool::new(false),
            write_through,
            crypto_rmw: tokio::sync::Mutex::new(()),
            cluster_locks: std::sync::Mutex::new(HashMap::new()),
            bitmaps,
        }
    }

    fn lock_alloc(&self) -> MutexGuard<'_, Alloc> {
        // A panic under this lock is a bug; the state stays usable.
        self.alloc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `step` under the allocator lock. A step that needs a refcount
    /// block or an L2 table read answers [`Miss`] before changing
    /// anything; the read happens with no lock held and the step runs
    /// again. Steps are synchronous, so the lock is never held across I/O.
    async fn with_alloc<T>(
        &self,
        img: &Image,
        mut step: impl FnMut(&mut Alloc, Option<&Staged>) -> Step<T>,
    ) -> Result<T> {
        let mut staged: Option<Staged> = None;
        loop {
            let r = {
                let mut a = self.lock_alloc();
                let r = step(&mut a, staged.as_ref());
                // A step may have grown (moved) the refcount table: guest
                // data is refused there from now on (check_data_target).
                let rt = (
                    a.header.refcount_table_offset,
                    u64::from(a.header.refcount_table_clusters) * img.geometry().cluster_size(),
                );
                if a.published_rt != rt {
                    img.lock_tables().refcount_table = rt;
                    a.published_rt = rt;
                }
                r
            };
            match r {
                Ok(t) => return Ok(t),
                Err(Miss::Fail(e)) => return Err(e),
                Err(Miss::RefcountBlock(off)) => {
                    let epoch = self.lock_alloc().rc.block_epoch;
                    let cs = img.geometry().cluster_size() as usize;
                    let block = img.file().read(off.0, cs).await.map_err(Error::io(
                        img.path(),
                        "read refcount block",
                        off.0,
                    ))?;
                    self.lock_alloc().rc.insert_loaded(off, block, epoch);
                }
                Err(Miss::L2Table(off)) => {
                    let epoch = img.lock_tables().l2_epoch;
                    let table = img.l2_table(off.0).await?;
                    staged = Some(Staged {
                        offset: off,
                        table,
                        epoch,
                    });
                }
            }
        }
    }

    /// Records that a write completed (flush coalescing compares with it).
    fn bump_write_gen(&self) {
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }

    fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    /// Whether dirty metadata has outgrown its bounds (or the journal
    /// half its ring).
    fn needs_writeback(&self, img: &Image) -> bool {
        let full = {
            let a = self.lock_alloc();
            a.rc.dirty_blocks.len() > a.rc.blocks_capacity
                || a.journal.as_ref().is_some_and(Journal::wants_writeback)
        };
        full || img.lock_tables().l2_dirty.len() > MAX_DIRTY_L2_TABLES
    }

    /// After a step that changed tables, before the write returns: what a
    /// crash of this process could lose is either journaled or committed
    /// now (write-through, or a journal out of room), and a writeback runs
    /// if dirty metadata has outgrown its bounds.
    async fn settle(&self, img: &Image) -> Result<()> {
        let (commit_now, upto) = {
            let a = self.lock_alloc();
            let overflowed = a.journal.as_ref().is_some_and(Journal::overflowed);
            (self.write_through || overflowed, a.changes)
        };
        if commit_now {
            let mut synced = self.commit.lock().await;
            // A writeback that began after the change covers it.
            if synced.changes < upto {
                self.writeback_locked(img, &mut synced, false).await?;
            }
            return Ok(());
        }
        if self.needs_writeback(img) {
            self.writeback(img).await?;
        }
        Ok(())
    }

    /// Takes the lock of one guest cluster (by its first byte).
    async fn lock_guest_cluster(&self, cluster_start: u64) -> ClusterGuard<'_> {
        let lock = {
            let mut locks = self
                .cluster_locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(cluster_start).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        ClusterGuard {
            writer: self,
            key: cluster_start,
            lock: Some(lock),
            guard: Some(guard),
        }
    }
}

impl Image {
    /// The writer of a writable image; an error on a read-only one.
    fn writer_or_err(&self) -> Result<&Writer> {
        self.writer().ok_or_else(|| Error::Unsupported {
            path: self.path().to_owned(),
            what: "image is open read-only".into(),
        })
    }

    /// Marks a range the guest changes in the enabled dirty bitmaps: before
    /// the request is even started, so before it completes (a failed one
    /// leaves a bit set, which only costs a backup a few clusters).
    fn mark_dirty(&self, offset: u64, len: u64) {
        if let Some(w) = self.writer() {
            w.bitmaps.mark(offset, len);
        }
    }

    /// The writer, refusing writes once the image was marked corrupt and
    /// requests beyond the disk.
    fn check_writable(&self, offset: u64, len: u64) -> Result<&Writer> {
        let w = self.writer_or_err()?;
        if w.is_corrupt() {
            return Err(Error::MarkedCorrupt {
                path: self.path().to_owned(),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(w)
    }

    /// Writes guest bytes at `offset`. The data is on its way to the disk
    /// when this returns; it is durable after the next [`Image::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.mark_dirty(offset, data.len() as u64);
        // Boxed: the write path's state is large, and a caller that spawns
        // a task per request would otherwise copy it into every task.
        let r = Box::pin(self.write_inner(offset, In::Heap(data))).await;
        self.on_error(r).await
    }

    /// Like [`Image::write`], from guest memory: the host file reads it
    /// directly (no bounce buffer, no copy) wherever the data goes to disk
    /// as it is — in-place writes and whole new clusters of unencrypted
    /// images, with offset, length and address aligned for O_DIRECT.
    pub async fn write_guest(&self, offset: u64, data: GuestSlice) -> Result<()> {
        self.mark_dirty(offset, data.len() as u64);
        let r = Box::pin(self.write_inner(offset, In::Guest(data.range()))).await;
        self.on_error(r).await
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become
    /// zero clusters (or all-zero subclusters); with `may_unmap` their host
    /// clusters are released, otherwise they stay preallocated. Partial
    /// clusters, version 2 images and raw external data files get zeros
    /// written.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.mark_dirty(offset, len);
        let r = self.write_zeroes_inner(offset, len, may_unmap).await;
        self.on_error(r).await
    }

    /// Releases whole clusters in `[offset, offset + len)`: they read as
    /// zeros afterwards where a backing file would otherwise show through,
    /// and are unallocated otherwise. Discard is advisory: partial
    /// clusters, version 2 images with a backing file and external data
    /// files are left as they are.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty(offset, len);
        let r = self.discard_inner(offset, len, false).await;
        self.on_error(r).await
    }

    /// Makes whole clusters in `[offset, offset + len)` unallocated, so
    /// that the backing file (or zeros) shows through, and releases their
    /// host clusters (QEMU's full discard: how qemu-img commit empties the
    /// top image). A partial cluster is left as it is, except one that ends
    /// at the end of the disk. Refused for images with an external data
    /// file.
    pub async fn deallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty(offset, len);
        let r = self.discard_inner(offset, len, true).await;
        self.on_error(r).await
    }

    /// Writes one whole guest cluster compressed (what `convert -c` does).
    /// The cluster must not be allocated yet. Data that does not shrink is
    /// written as a normal cluster, as QEMU does. `data` may be shorter
    /// than a cluster only for the last cluster of the disk.
    pub async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.mark_dirty(offset, data.len() as u64);
        let r = self.write_compressed_inner(offset, data).await;
        self.on_error(r).await
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512). New
    /// space reads as zeros (or as the backing file, where it is longer). A
    /// larger L1 table, when needed, is written past everything in use and
    /// made durable, with its refcounts, before the header points at it.
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        let r = self.resize_inner(new_size).await;
        self.on_error(r).await
    }

    /// Maps every unallocated cluster of `[offset, offset + len)` (`offset`
    /// at a cluster boundary; the range may end at the end of the disk) to
    /// a new host cluster past everything the file ever held, which reads
    /// as zeros without being written: `Metadata` makes the file long
    /// enough, `Falloc` allocates its blocks too (what qemu-img resize
    /// --preallocation does for new space). Not for images with an
    /// external data file or encryption.
    pub async fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        let r = self.preallocate_inner(offset, len, mode).await;
        self.on_error(r).await
    }

    /// Shrinks the virtual disk to `new_size` bytes (a multiple of 512):
    /// the clusters past the new end are deallocated, L2 tables no longer
    /// needed are freed and the L1 table is cut to the new size; the
    /// header with the new size and L1 length is written after the tables,
    /// and what it no longer names is freed once it is durable. The
    /// refcount structures stay as they are. Refused for images with an
    /// external data file.
    pub async fn shrink(&self, new_size: u64) -> Result<()> {
        let r = self.shrink_inner(new_size).await;
        self.on_error(r).await
    }

    /// Records `name` (and its `format`) as the image's backing file in the
    /// header, or with `None` removes both. Everything written before is
    /// made durable first, then the header is switched (durable). The
    /// backing chain this `Image` opened stays as it was: reopen the image
    /// to read through the new one. Nothing about the new backing file is
    /// checked here.
    pub async fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let r = self.set_backing_file_inner(name, format).await;
        self.on_error(r).await
    }

    /// Makes every acknowledged write and the metadata it depends on
    /// durable. On an image marked corrupt (which takes no more metadata
    /// writes) this fails if any write was acknowledged after the last
    /// completed writeback: those were never made durable.
    ///
    /// Once an fdatasync of the image (or its data file) has failed, in a
    /// flush or in the engine's own writeback, every later flush fails
    /// until the image is reopened ([`crate::file::SyncFailed`]): what the
    /// kernel dropped is never reported durable.
    pub async fn flush(&self) -> Result<()> {
        let Some(w) = self.writer() else {
            return Ok(());
        };
        // Checked first: a flush that has nothing new to sync (coalesced
        // with an earlier writeback) must not succeed either.
        self.check_sync_failed()?;
        let r = w.flush(self).await;
        self.on_error(r).await
    }

    /// Closes the image cleanly: everything durable, and with lazy
    /// refcounts the refcount blocks written and the dirty bit cleared.
    /// An image dropped without `close` (a crash) stays dirty and has its
    /// refcounts rebuilt the next time it is opened for writing. Fails like
    /// [`Image::flush`] on an image marked corrupt.
    pub async fn close(&self) -> Result<()> {
        let Some(w) = self.writer() else {
            return Ok(());
        };
        self.check_sync_failed()?;
        let r = w.close(self).await;
        self.on_error(r).await
    }

    /// The remembered failure of an fdatasync of the image or its data
    /// file, if there was one.
    fn check_sync_failed(&self) -> Result<()> {
        let files = std::iter::once(self.file()).chain(self.data_file());
        for f in files {
            if let Some(e) = f.sync_failed() {
                return Err(Error::io(f.path(), "flush", None)(e));
            }
        }
        Ok(())
    }

    /// Invariant 6: metadata found inconsistent (a format error in a table,
    /// a refcount that cannot be right) fails the request, sets the corrupt
    /// bit as best it can, and stops all further writes. Nothing is fixed
    /// silently.
    async fn on_error<T>(&self, r: Result<T>) -> Result<T> {
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let (Some(cause), Some(w)) = (e.corruption(), self.writer()) else {
            return Err(e);
        };
        if !w.corrupt.swap(true, Ordering::AcqRel) {
            // Best effort: the request fails with the cause either way.
            let _ = w.mark_corrupt(self).await;
        }
        Err(Error::corrupt(self.path(), cause))
    }
}

/// The lock of one guest cluster; the lock table entry goes away with its
/// last user.
pub(crate) struct ClusterGuard<'a> {
    writer: &'a Writer,
    key: u64,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.lock.take());
        let mut locks = self
            .writer
            .cluster_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}
