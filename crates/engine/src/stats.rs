//! Counters the benchmarks read: how much metadata work the engine did.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one image (relaxed atomics: figures, not sync points).
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) metadata_writes: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) allocating_writes: AtomicU64,
    pub(crate) in_place_writes: AtomicU64,
    pub(crate) cow_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Writes of refcount blocks, refcount tables, L2 and L1 tables, headers.
    pub metadata_writes: u64,
    /// fdatasync calls on the image and data file.
    pub fsyncs: u64,
    /// L2 table lookups of guest reads and writes answered from the
    /// metadata cache, and those that read the table from the image.
    pub l2_hits: u64,
    pub l2_misses: u64,
    /// Guest write chunks (up to a cluster each) that needed allocation.
    pub allocating_writes: u64,
    /// Guest write chunks that went straight to an owned cluster.
    pub in_place_writes: u64,
    /// Bytes read and rewritten around guest data by copy-on-write.
    pub cow_bytes: u64,
    /// Direct (caller-memory) reads and writes of guest data, and those of
    /// them that had to go through a bounce buffer instead (misaligned for
    /// O_DIRECT).
    pub direct_ios: u64,
    pub bounced_ios: u64,
    /// Transfers of direct reads and writes that used guest memory
    /// registered with the ring (no per-operation page pinning).
    pub fixed_ios: u64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            metadata_writes: g(&self.metadata_writes),
            fsyncs: g(&self.fsyncs),
            // Counted under the tables' lock (`Image::stats`).
            l2_hits: 0,
            l2_misses: 0,
            allocating_writes: g(&self.allocating_writes),
            in_place_writes: g(&self.in_place_writes),
            cow_bytes: g(&self.cow_bytes),
            direct_ios: 0,
            bounced_ios: 0,
            fixed_ios: 0,
        }
    }
}
