//! The allocator: refcount blocks and table in memory, the free-cluster
//! search, runs of new clusters and refcount table growth.
//!
//! Everything here is synchronous and works on memory only: it runs under
//! the allocator lock, which is never held across I/O. A step that needs a
//! refcount block (or an L2 table) that is not cached answers
//! [`Miss::RefcountBlock`] (or [`Miss::L2Table`]) before it changes
//! anything; the caller drops the lock, reads it, and runs the step again
//! (`Writer::with_alloc`). Nothing here writes: what changed is left dirty
//! for the writeback, which alone writes metadata (see `writeback.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use qblk_qcow2::refcount::{RefcountTableEntry, get_refcount, refcount_layout, set_refcount};
use qblk_qcow2::{ClusterCount, Geometry, Header, HostCluster, HostOffset};
use tracing::warn;

use crate::buf::AlignedBuf;
use crate::error::{Corruption, Error, Result};
use crate::layout::MetaMap;

/// Why a step under the allocator lock could not finish in memory.
#[derive(Debug)]
pub(crate) enum Miss {
    /// The refcount block at this offset must be read first.
    RefcountBlock(HostOffset),
    /// The L2 table at this offset must be read first.
    L2Table(HostOffset),
    /// The step failed.
    Fail(Error),
}

impl From<Error> for Miss {
    fn from(e: Error) -> Self {
        Miss::Fail(e)
    }
}

/// The outcome of a step under the allocator lock.
pub(crate) type Step<T> = std::result::Result<T, Miss>;

/// The refcount structures of a writable image, in memory.
#[derive(Debug)]
pub(crate) struct Refcounts {
    geometry: Geometry,
    path: PathBuf,
    /// Refcount table entries (the table the in-memory header names).
    pub(super) table: Vec<u64>,
    /// The table changed since the last writeback.
    pub(super) table_dirty: bool,
    /// The table on disk (offset, clusters) when a grown table replaced it
    /// in memory: the next writeback writes the new one and switches the
    /// header, after which these clusters are freed.
    pub(super) table_replaced: Option<(HostOffset, ClusterCount)>,
    /// Refcount blocks by offset: a bounded LRU of clean blocks plus every
    /// dirty or in-flight one (never evicted before it is written).
    blocks: lru::LruCache<u64, AlignedBuf>,
    /// How many clean blocks `blocks` keeps.
    pub(super) blocks_capacity: usize,
    pub(super) dirty_blocks: BTreeSet<u64>,
    /// Blocks a running commit is writing: a copy read back from disk
    /// meanwhile could predate the write, so they stay cached.
    in_flight: HashSet<u64>,
    /// Moves on whenever blocks were written: a block read from disk
    /// before that may be older than the disk (and than a copy evicted
    /// meanwhile), so it is read again.
    pub(super) block_epoch: u64,
    /// No free cluster lies below this one.
    cursor: HostCluster,
    /// Clusters whose last reference was dropped, with the epoch they were
    /// freed in: not reusable until a writeback sealed after that epoch has
    /// made the drop durable (invariant 3).
    pending_free: HashMap<u64, u64>,
    free_epoch: u64,
    /// References dropped from tables in memory whose refcount decrement
    /// waits until the tables without them are durable: on disk a refcount
    /// must never fall below the references to its cluster, even for a
    /// moment.
    pub(super) deferred_releases: Vec<HostCluster>,
    /// Decrements being applied after a writeback made their tables
    /// durable (popped as applied, so a step run again does each once).
    pub(super) releasing: Vec<HostCluster>,
    /// Clusters at or past this one are neither in the file nor allocated.
    pub(super) end: HostCluster,
    /// Metadata found at open: never allocated, whatever its refcount.
    meta: Arc<MetaMap>,
    /// Whether a metadata cluster with refcount 0 was reported.
    warned_meta_free: bool,
}

impl Refcounts {
    pub(crate) fn new(
        geometry: Geometry,
        path: PathBuf,
        table: Vec<u64>,
        blocks_capacity: usize,
        end: HostCluster,
        meta: Arc<MetaMap>,
    ) -> Self {
        Self {
            geometry,
            path,
            table,
            table_dirty: false,
            table_replaced: None,
            blocks: lru::LruCache::unbounded(),
            blocks_capacity: blocks_capacity.max(4),
            dirty_blocks: BTreeSet::new(),
            in_flight: HashSet::new(),
            block_epoch: 0,
            cursor: HostCluster(0),
            pending_free: HashMap::new(),
            free_epoch: 0,
            deferred_releases: Vec::new(),
            releasing: Vec::new(),
            end,
            meta,
            warned_meta_free: false,
        }
    }

    fn corrupt(&self, cause: Corruption) -> Error {
        Error::corrupt(&self.path, cause)
    }

    fn offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.geometry.cluster_bits())
    }

    /// The offset of the refcount block holding `cluster`'s entry, which
    /// is then cached; `None` if the table has no block for it.
    fn block(&mut self, cluster: HostCluster) -> Step<Option<u64>> {
        let index = self.geometry.refcount_table_index(cluster) as usize;
        let Some(&entry) = self.table.get(index) else {
            return Ok(None);
        };
        let Some(off) = RefcountTableEntry(entry).block_offset() else {
            return Ok(None);
        };
        if self.blocks.get(&off.0).is_none() {
            return Err(Miss::RefcountBlock(off));
        }
        Ok(Some(off.0))
    }

    /// Caches a block read from disk, unless a newer copy is cached or
    /// blocks were written since the read began (at `epoch`): then the
    /// step asks for it again.
    pub(crate) fn insert_loaded(&mut self, offset: HostOffset, block: AlignedBuf, epoch: u64) {
        if self.blocks.peek(&offset.0).is_none() && epoch == self.block_epoch {
            self.insert_block(offset.0, block);
        }
    }

    /// Caches a block as most recently used, evicting the least recently
    /// used clean blocks beyond the cache's capacity.
    fn insert_block(&mut self, offset: u64, block: AlignedBuf) {
        self.blocks.put(offset, block);
        let pinned = self.dirty_blocks.len() + self.in_flight.len();
        while self.blocks.len() > self.blocks_capacity + pinned {
            let victim = self.blocks.iter().rev().map(|(k, _)| *k).find(|k| {
                !self.dirty_blocks.contains(k) && !self.in_flight.contains(k) && *k != offset
            });
            match victim {
                Some(k) => {
                    self.blocks.pop(&k);
                }
                None => break,
            }
        }
    }

    /// The refcount of `cluster` (0 where no block covers it).
    pub(super) fn get(&mut self, cluster: HostCluster) -> Step<u64> {
        Ok(match self.block(cluster)? {
            None => 0,
            Some(b) => get_refcount(
                self.blocks.peek(&b).expect("block() cached it"),
                self.geometry.refcount_order(),
                self.geometry.refcount_block_index(cluster),
            ),
        })
    }

    /// Sets a refcount in a cached block.
    fn set_in(&mut self, block: u64, cluster: HostCluster, value: u64) -> Result<()> {
        let g = self.geometry;
        let buf = self.blocks.peek_mut(&block).expect("block() cached it");
        if let Err(source) = set_refcount(
            buf,
            g.refcount_order(),
            g.refcount_block_index(cluster),
            value,
        ) {
            return Err(self.corrupt(Corruption::RefcountOverflow { cluster, source }));
        }
        self.dirty_blocks.insert(block);
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to a cluster's refcount. A cluster whose
    /// count drops to zero waits for the next writeback before reuse.
    pub(super) fn adjust(&mut self, cluster: HostCluster, delta: i64) -> Step<()> {
        let Some(block) = self.block(cluster)? else {
            return Err(self.corrupt(Corruption::NoRefcountBlock { cluster }).into());
        };
        let cur = self.get(cluster)?;
        let Some(new) = cur.checked_add_signed(delta) else {
            return Err(self
                .corrupt(Corruption::RefcountUnderflow { cluster })
                .into());
        };
        self.set_in(block, cluster, new)?;
        if new == 0 {
            self.pending_free.insert(cluster.0, self.free_epoch);
        }
        Ok(())
    }

    /// Drops the block at table `index` if it counts nothing but perhaps
    /// itself (QEMU's refcount table shrink after an image shrink), in
    /// memory: the table entry goes (the writeback writes the table after
    /// the blocks), and a block counted by another block has that
    /// reference released once the table without it is durable. Returns
    /// whether it was dropped.
    pub(super) fn drop_block_if_unused(&mut self, index: usize) -> Step<bool> {
        let g = self.geometry;
        let Some(off) = self
            .table
            .get(index)
            .and_then(|&e| RefcountTableEntry(e).block_offset())
        else {
            return Ok(false);
        };
        if self.in_flight.contains(&off.0) {
            return Ok(false);
        }
        if self.blocks.get(&off.0).is_none() {
            return Err(Miss::RefcountBlock(off));
        }
        let own = g.host_cluster(off);
        let counts_itself = g.refcount_table_index(own) as usize == index;
        let own_index = counts_itself.then(|| g.refcount_block_index(own));
        let buf = self.blocks.peek(&off.0).expect("cached above");
        let unused = (0..g.refcount_block_entries() as usize)
            .all(|k| Some(k) == own_index || get_refcount(buf, g.refcount_order(), k) == 0);
        if !unused {
            return Ok(false);
        }
        self.table[index] = 0;
        self.table_dirty = true;
        self.dirty_blocks.remove(&off.0);
        self.blocks.pop(&off.0);
        if !counts_itself {
            self.release(own, ClusterCount(1));
        }
        Ok(true)
    }

    /// How many entries the refcount table has.
    pub(super) fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Drops one reference to each cluster of `count` from `first` once
    /// the tables that no longer hold them are durable.
    pub(super) fn release(&mut self, first: HostCluster, count: ClusterCount) {
        self.deferred_releases
            .extend((first.0..first.0 + count.0).map(HostCluster));
    }

    /// The free-epoch the next writeback seals: clusters freed up to it
    /// become reusable once that writeback is durable.
    pub(super) fn seal_free_epoch(&mut self) -> u64 {
        let sealed = self.free_epoch;
        self.free_epoch += 1;
        sealed
    }

    /// Clusters freed in epochs up to `sealed` may be handed out again.
    pub(super) fn reuse_freed(&mut self, sealed: u64) {
        let mut lowest = self.cursor.0;
        self.pending_free.retain(|&c, &mut epoch| {
            let keep = epoch > sealed;
            if !keep {
                lowest = lowest.min(c);
            }
            keep
        });
        self.cursor = HostCluster(lowest);
    }

    /// Copies of the dirty blocks, which count as in flight until
    /// [`Refcounts::written`]; they are clean unless changed meanwhile.
    pub(super) fn take_dirty_blocks(&mut self) -> Vec<(HostOffset, AlignedBuf)> {
        let dirty = std::mem::take(&mut self.dirty_blocks);
        dirty
            .into_iter()
            .map(|off| {
                let buf = self.blocks.peek(&off).expect("dirty blocks stay cached");
                let mut copy = AlignedBuf::zeroed(buf.len());
                copy.copy_from_slice(buf);
                self.in_flight.insert(off);
                (HostOffset(off), copy)
            })
            .collect()
    }

    /// The writes of blocks taken by [`Refcounts::take_dirty_blocks`] ended.
    pub(super) fn written(&mut self, blocks: &[HostOffset]) {
        for b in blocks {
            self.in_flight.remove(&b.0);
        }
        if !blocks.is_empty() {
            self.block_epoch += 1;
        }
    }

    /// Puts blocks whose write failed back among the dirty ones.
    pub(super) fn not_written(&mut self, blocks: &[HostOffset]) {
        for b in blocks {
            self.in_flight.remove(&b.0);
            self.dirty_blocks.insert(b.0);
        }
        // Some may have reached the disk.
        self.block_epoch += 1;
    }

    /// The refcount table as bytes, padded to `clusters` clusters.
    pub(super) fn table_bytes(&self, clusters: ClusterCount) -> AlignedBuf {
        let mut bytes = AlignedBuf::zeroed((clusters.0 * self.geometry.cluster_size()) as usize);
        qblk_qcow2::encode_table(self.table.iter().copied(), &mut bytes);
        bytes
    }

    /// Allocates one free cluster (refcount 1).
    pub(super) fn alloc_cluster(&mut self, header: &mut Header) -> Step<HostCluster> {
        let g = self.geometry;
        loop {
            let c = self.cursor;
            let index = g.refcount_table_index(c) as usize;
            if index >= self.table.len() {
                self.grow_table(header, index)?;
                continue;
            }
            if self.table[index] == 0 {
                // No block covers c: every cluster it would count is free.
                // The new block lives at c and counts itself.
                let mut buf = AlignedBuf::zeroed(g.cluster_size() as usize);
                set_refcount(&mut buf, g.refcount_order(), g.refcount_block_index(c), 1)
                    .expect("1 fits any refcount width");
                let at = self.offset(c).0;
                self.dirty_blocks.insert(at);
                self.insert_block(at, buf);
                self.table[index] = at;
                self.table_dirty = true;
                self.cursor = c.next();
                self.end = self.end.max(c.next());
                continue;
            }
            if c.0 == 0 || self.pending_free.contains_key(&c.0) {
                self.cursor = c.next();
                continue;
            }
            // May need the block read: the cursor stays, so the step is
            // taken again from here.
            if self.get(c)? != 0 {
                self.cursor = c.next();
                continue;
            }
            self.cursor = c.next();
            if let Some(kind) = self.meta.kind(c.0) {
                // Metadata with a refcount of 0: damaged refcounts, or a
                // structure freed since open. Never hand it out.
                if !self.warned_meta_free {
                    warn!(
                        image = %self.path.display(),
                        "cluster at {} holds {} but its refcount is 0; not reusing it (run qblk check)",
                        self.offset(c),
                        kind.name()
                    );
                    self.warned_meta_free = true;
                }
                continue;
            }
            let block = self.block(c)?.expect("get() found the block");
            self.set_in(block, c, 1)?;
            self.end = self.end.max(c.next());
            return Ok(c);
        }
    }

    /// Allocates `n` contiguous clusters past everything in use, with any
    /// refcount blocks they need placed right after them; returns the
    /// first. The blocks and table entries are left dirty.
    pub(super) fn alloc_run(&mut self, header: &mut Header, n: ClusterCount) -> Step<HostCluster> {
        let g = self.geometry;
        loop {
            let start = self.end.max(self.cursor);
            let table = &self.table;
            let has = |i: u64| table.get(i as usize).copied().unwrap_or(0) != 0;
            let layout =
                refcount_layout(&g, start, n, None, has).ok_or_else(|| Error::Unsupported {
                    path: self.path.clone(),
                    what: "the image is full: the refcount table would exceed 8 MiB".into(),
                })?;
            let top = layout.new_blocks.last().copied();
            if let Some(top) = top.filter(|&t| t as usize >= self.table.len()) {
                // Grow the table first; it moves past everything, so retry.
                self.grow_table(header, top as usize)?;
                continue;
            }
            let used = ClusterCount(n.0 + layout.new_blocks.len() as u64);
            // Every block the run needs besides the new ones is checked
            // before anything changes: a miss after the new blocks were
            // placed would run the step again with them in the table, and
            // the blocks would no longer count themselves.
            for c in start.0..start.0 + used.0 {
                let index = g.refcount_table_index(HostCluster(c));
                if !layout.new_blocks.contains(&index) {
                    self.block(HostCluster(c))?;
                }
            }
            self.place_blocks(start.0 + n.0, &layout.new_blocks);
            self.set_run(start, used)?;
            return Ok(start);
        }
    }

    /// New zeroed blocks for table `indexes`, at consecutive clusters
    /// from `first`.
    fn place_blocks(&mut self, first: u64, indexes: &[u64]) {
        let cs = self.geometry.cluster_size();
        for (k, &bi) in indexes.iter().enumerate() {
            let at = (first + k as u64) * cs;
            self.table[bi as usize] = at;
            self.table_dirty = true;
            self.dirty_blocks.insert(at);
            self.insert_block(at, AlignedBuf::zeroed(cs as usize));
        }
    }

    /// Refcount 1 for a run of clusters past everything in use (their
    /// blocks are cached: new, or covering clusters already allocated).
    fn set_run(&mut self, start: HostCluster, n: ClusterCount) -> Step<()> {
        for c in start.0..start.0 + n.0 {
            let c = HostCluster(c);
            let block = self
                .block(c)?
                .ok_or_else(|| self.corrupt(Corruption::NoRefcountBlock { cluster: c }))?;
            self.set_in(block, c, 1)?;
        }
        self.end = self.end.max(HostCluster(start.0 + n.0));
        self.cursor = self.cursor.max(self.end);
        Ok(())
    }

    /// Replaces the refcount table, in memory, with a larger one that has
    /// an entry at `min_index`, past everything in use, with the blocks
    /// that count its own clusters. The writeback writes it and switches
    /// the header to it once it and its blocks are durable; the table the
    /// disk knows is freed after that.
    pub(super) fn grow_table(&mut self, header: &mut Header, min_index: usize) -> Step<()> {
        let g = self.geometry;
        let start = self.end.max(self.cursor);
        let entries = (min_index as u64 + 1).max(self.table.len() as u64 * 2);
        let table = &self.table;
        let has = |i: u64| table.get(i as usize).copied().unwrap_or(0) != 0;
        let layout =
            refcount_layout(&g, start, ClusterCount(0), Some(entries), has).ok_or_else(|| {
                Error::Unsupported {
                    path: self.path.clone(),
                    what: "the image is full: the refcount table would exceed 8 MiB".into(),
                }
            })?;
        // Every block the new clusters need is checked before anything
        // changes (a block of an earlier cluster may have to be read).
        for c in start.0..start.0 + layout.clusters().0 {
            let index = g.refcount_table_index(HostCluster(c));
            if !layout.new_blocks.contains(&index) {
                self.block(HostCluster(c))?;
            }
        }
        let table_clusters = layout.table_clusters;
        let entries_total = (table_clusters.0 * g.cluster_size() / 8) as usize;
        self.table.resize(entries_total, 0);
        self.place_blocks(start.0 + table_clusters.0, &layout.new_blocks);
        self.set_run(start, layout.clusters())?;
        let old = (
            HostOffset(header.refcount_table_offset),
            ClusterCount(u64::from(header.refcount_table_clusters)),
        );
        match self.table_replaced {
            // The table being replaced was never on disk: free it with the
            // next writeback (no header names it).
            Some(_) => self.release(g.host_cluster(old.0), old.1),
            None => self.table_replaced = Some(old),
        }
        header.refcount_table_offset = self.offset(start).0;
        header.refcount_table_clusters =
            u32::try_from(table_clusters.0).expect("bounded by the 8 MiB limit");
        self.table_dirty = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 KiB-cluster, 16-bit-refcount image of `used` clusters, all
    /// counted by one cached block at cluster 1 (the table at cluster 2,
    /// an L1 at 3), as a fresh image looks.
    fn fresh(used: u64) -> (Refcounts, Header) {
        let g = Geometry::new(16, false, 4).unwrap();
        let cs = g.cluster_size();
        let mut block = AlignedBuf::zeroed(cs as usize);
        for c in 0..used {
            set_refcount(&mut block, 4, c as usize, 1).unwrap();
        }
        let mut rc = Refcounts::new(
            g,
            PathBuf::from("/test.qcow2"),
            vec![cs, 0],
            4,
            HostCluster(used),
            Arc::default(),
        );
        rc.insert_loaded(HostOffset(cs), block, 0);
        let spec = qblk_qcow2::create::CreateSpec {
            size: 1 << 30,
            ..Default::default()
        };
        let plan = qblk_qcow2::create::CreatePlan::new(&spec).unwrap();
        let mut header = plan.header().clone();
        header.refcount_table_offset = 2 * cs;
        header.refcount_table_clusters = 1;
        (rc, header)
    }

    fn count(rc: &mut Refcounts, c: u64) -> u64 {
        rc.get(HostCluster(c)).unwrap()
    }

    #[test]
    fn allocation_takes_the_lowest_free_cluster_and_counts_it() {
        let (mut rc, mut h) = fresh(4);
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), HostCluster(4));
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), HostCluster(5));
        assert_eq!(count(&mut rc, 4), 1);
        assert_eq!(rc.end, HostCluster(6));
        assert!(rc.dirty_blocks.contains(&0x10000));
    }

    #[test]
    fn a_freed_cluster_waits_for_the_writeback_that_seals_it() {
        let (mut rc, mut h) = fresh(4);
        let c = rc.alloc_cluster(&mut h).unwrap();
        rc.adjust(c, -1).unwrap();
        // Freed in the open epoch: not handed out again yet.
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), HostCluster(5));
        let sealed = rc.seal_free_epoch();
        // Freed after the seal: stays pending past that writeback.
        let d = rc.alloc_cluster(&mut h).unwrap();
        rc.adjust(d, -1).unwrap();
        rc.reuse_freed(sealed);
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), c);
        assert_ne!(rc.alloc_cluster(&mut h).unwrap(), d);
        let sealed = rc.seal_free_epoch();
        rc.reuse_freed(sealed);
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), d);
    }

    #[test]
    fn an_uncached_block_is_asked_for_before_anything_changes() {
        let (mut rc, mut h) = fresh(4);
        let block = rc.blocks.pop(&0x10000).unwrap();
        let before = (rc.end, rc.dirty_blocks.clone(), rc.table.clone());
        match rc.alloc_cluster(&mut h) {
            Err(Miss::RefcountBlock(HostOffset(0x10000))) => {}
            other => panic!("{other:?}"),
        }
        // Only the search position moved (past clusters it had decided).
        assert_eq!((rc.end, rc.dirty_blocks.clone(), rc.table.clone()), before);
        // Run again after the read: the same answer as without the miss.
        rc.insert_loaded(HostOffset(0x10000), block, rc.block_epoch);
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), HostCluster(4));
    }

    #[test]
    fn refcount_errors_are_typed_corruption() {
        let (mut rc, _) = fresh(4);
        match rc.adjust(HostCluster(9), -1) {
            Err(Miss::Fail(Error::Corrupt {
                cause: Corruption::RefcountUnderflow { cluster },
                ..
            })) => assert_eq!(cluster, HostCluster(9)),
            other => panic!("{other:?}"),
        }
        // Cluster 32768 onwards has no block.
        match rc.adjust(HostCluster(40000), 1) {
            Err(Miss::Fail(Error::Corrupt {
                cause: Corruption::NoRefcountBlock { .. },
                ..
            })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metadata_with_refcount_zero_is_never_handed_out() {
        let (mut rc, mut h) = fresh(4);
        let mut meta = MetaMap::default();
        meta.insert_for_test(4, crate::layout::Kind::L2);
        rc.meta = Arc::new(meta);
        assert_eq!(rc.alloc_cluster(&mut h).unwrap(), HostCluster(5));
    }

    #[test]
    fn a_new_block_is_placed_where_no_block_covers_and_counts_itself() {
        let (mut rc, mut h) = fresh(4);
        // Everything the first block covers is in use.
        rc.cursor = HostCluster(32768);
        rc.end = HostCluster(32768);
        let c = rc.alloc_cluster(&mut h).unwrap();
        // The block went to 32768 (counting itself), the data after it.
        assert_eq!(c, HostCluster(32769));
        assert_eq!(rc.table[1], 32768 * 0x10000);
        assert_eq!(count(&mut rc, 32768), 1);
        assert_eq!(count(&mut rc, 32769), 1);
        assert!(rc.table_dirty);
    }

    #[test]
    fn growing_the_table_moves_it_past_everything_and_remembers_the_old_one() {
        let (mut rc, mut h) = fresh(4);
        // The 2-entry table covers 65536 clusters; ask for index 5.
        rc.grow_table(&mut h, 5).unwrap();
        assert_eq!(h.refcount_table_offset, 4 * 0x10000);
        assert_eq!(h.refcount_table_clusters, 1);
        assert_eq!(rc.table.len(), 8192);
        assert_eq!(
            rc.table_replaced,
            Some((HostOffset(2 * 0x10000), ClusterCount(1)))
        );
        assert_eq!(count(&mut rc, 4), 1, "the new table is counted");
        assert_eq!(rc.end, HostCluster(5));
        // A second growth before any writeback frees the unwritten table
        // (deferred), and keeps the on-disk one as the one replaced.
        rc.grow_table(&mut h, 9000).unwrap();
        assert_eq!(
            rc.table_replaced,
            Some((HostOffset(2 * 0x10000), ClusterCount(1)))
        );
        assert_eq!(rc.deferred_releases, vec![HostCluster(4)]);
        assert!(rc.table.len() > 9000);
    }

    #[test]
    fn runs_go_past_everything_with_the_blocks_they_need() {
        let (mut rc, mut h) = fresh(4);
        rc.end = HostCluster(32760);
        let start = rc.alloc_run(&mut h, ClusterCount(20)).unwrap();
        assert_eq!(start, HostCluster(32760));
        // Clusters 32768.. need the second block, placed after the run.
        assert_eq!(rc.table[1], 32780 * 0x10000);
        for c in 32760..32781 {
            assert_eq!(count(&mut rc, c), 1, "cluster {c}");
        }
        assert_eq!(rc.end, HostCluster(32781));
    }

    /// Regression: a run crossing into a new block's range while the block
    /// of its first clusters was not cached asked for that block after
    /// placing the new one; run again, the new block no longer counted
    /// itself (qemu-img check: "refcount=0 reference=1", found by growing
    /// a 512-byte-cluster image whose L1 table moved).
    #[test]
    fn a_run_that_misses_a_block_changes_nothing_and_counts_its_new_block() {
        let (mut rc, mut h) = fresh(4);
        rc.end = HostCluster(32760);
        let block = rc.blocks.pop(&0x10000).unwrap();
        let before = (rc.end, rc.dirty_blocks.clone(), rc.table.clone());
        match rc.alloc_run(&mut h, ClusterCount(20)) {
            Err(Miss::RefcountBlock(HostOffset(0x10000))) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!((rc.end, rc.dirty_blocks.clone(), rc.table.clone()), before);
        rc.insert_loaded(HostOffset(0x10000), block, rc.block_epoch);
        let start = rc.alloc_run(&mut h, ClusterCount(20)).unwrap();
        assert_eq!(start, HostCluster(32760));
        assert_eq!(rc.table[1], 32780 * 0x10000);
        assert_eq!(count(&mut rc, 32780), 1, "the new block counts itself");
    }

    #[test]
    fn dirty_and_in_flight_blocks_are_never_evicted() {
        let (mut rc, mut h) = fresh(4);
        rc.alloc_cluster(&mut h).unwrap();
        let taken = rc.take_dirty_blocks();
        assert_eq!(taken.len(), 1);
        for i in 0..16u64 {
            rc.insert_loaded(
                HostOffset((100 + i) * 0x10000),
                AlignedBuf::zeroed(0x10000),
                rc.block_epoch,
            );
        }
        assert!(rc.blocks.peek(&0x10000).is_some(), "in flight stays cached");
        rc.written(&[taken[0].0]);
        for i in 0..16u64 {
            rc.insert_loaded(
                HostOffset((200 + i) * 0x10000),
                AlignedBuf::zeroed(0x10000),
                rc.block_epoch,
            );
        }
        assert!(rc.blocks.peek(&0x10000).is_none(), "clean again: evictable");
    }
}
