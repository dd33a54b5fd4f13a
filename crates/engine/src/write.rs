//! The write path: in-place writes, allocating writes with copy-on-write,
//! and the one place that orders metadata writes.
//!
//! A write to a cluster the image owns alone (COPIED, every touched
//! subcluster allocated) goes straight to the host file, without locks. Any
//! other write allocates under the allocator lock: it picks a host cluster,
//! writes the guest data and whatever copy-on-write the cluster needs, and
//! only then updates the L2 entry in memory. Refcount blocks, the refcount
//! table, L2 tables and the L1 table are write-back: they reach the disk in
//! [`Image::flush`], in the order that keeps the image consistent after a
//! crash at any point (DESIGN.md's metadata-ordering invariants):
//!
//! 1. dirty refcount blocks are written, then fdatasync — a new cluster's
//!    refcount (and, invariant 2, the guest data written before it) is
//!    durable before any table points at it;
//! 2. a changed refcount table is written, then fdatasync — a new refcount
//!    block is complete on disk before the table entry that finds it;
//! 3. dirty L2 tables are written; if L1 entries changed, fdatasync and then
//!    the L1 table — an L2 table is complete before an L1 entry points at it;
//! 4. fdatasync, after which clusters freed since the last writeback may be
//!    handed out again (invariant 3).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use qblk_qcow2::header::{AutoclearFeatures, Header};
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry, SubclusterBitmap, SubclusterState};
use qblk_qcow2::refcount::{RefcountTableEntry, get_refcount, set_refcount};
use qblk_qcow2::{GuestOffset, HostCluster};

use crate::buf::AlignedBuf;
use crate::image::{Error, Image, Result};
use crate::layout::MetaMap;
use crate::stats::Counters;
use tracing::warn;

/// Dirty L2 tables allowed before an allocating write forces a writeback.
const MAX_DIRTY_L2_TABLES: usize = 256;

/// Allocator state, behind the image's allocator lock.
#[derive(Debug, Default)]
pub(crate) struct Alloc {
    rc: Option<Refcounts>,
    /// The host cluster compressed data is being packed into, and how many
    /// bytes of it are used.
    compressed_tail: Option<(u64, u64)>,
    /// The write generation the last completed writeback made durable.
    synced_gen: u64,
    /// Lazy refcounts: refcount updates are deferred behind the dirty bit.
    lazy: bool,
    /// The dirty bit is set on disk (lazy refcounts in use this session).
    marked_dirty: bool,
    /// The header as it is on disk now.
    header: Option<Header>,
}

/// The refcount structures of a writable image.
#[derive(Debug)]
struct Refcounts {
    table: Vec<u64>,
    table_dirty: bool,
    /// Loaded refcount blocks by offset (all blocks the session touched).
    /// Refcount blocks by offset: a bounded LRU of clean blocks plus every
    /// dirty one (dirty blocks are never evicted before they are written).
    blocks: lru::LruCache<u64, AlignedBuf>,
    /// How many clean blocks `blocks` keeps.
    blocks_capacity: usize,
    dirty_blocks: BTreeSet<u64>,
    /// No free cluster lies below this one.
    cursor: u64,
    /// Clusters whose last reference was dropped since the last writeback:
    /// not reusable until that writeback is durable.
    pending_free: HashSet<u64>,
    /// References dropped from tables in memory whose refcount decrement
    /// waits until the tables without them are durable (applied at the end
    /// of a writeback, written by the next): on disk a refcount must never
    /// fall below the references to the cluster, even for a moment.
    deferred_releases: Vec<u64>,
    /// Clusters at or beyond this index are neither in the file nor
    /// allocated this session.
    end: u64,
    /// The file's length as this session left it: past the clusters in
    /// use, the file is extended ahead of allocation in large steps.
    file_len: u64,
    /// The file's length at open: trimmed back to no shorter than this.
    opened_len: u64,
    /// Extending ahead failed once (e.g. no fallocate here): don't retry.
    no_prealloc: bool,
    /// Metadata found at open: never allocated, whatever its refcount.
    meta: Arc<MetaMap>,
    /// Whether a metadata cluster with refcount 0 was reported.
    warned_meta_free: bool,
}

/// What the rest of a newly allocated cluster needs besides the guest's
/// bytes.
#[derive(Debug, Clone, Copy)]
struct Fill {
    /// A shared cluster moves: every subcluster it has is copied.
    moves_data: bool,
    /// It must read as zeros and already does (a hole): nothing.
    zeros_in_place: bool,
}

/// The smallest step by which the file is extended ahead of allocation.
const PREALLOC_MIN: u64 = 64 << 20;
/// The largest step (an eighth of the file in between).
const PREALLOC_MAX: u64 = 1 << 30;

fn io<'a>(img: &'a Image, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: img.path.clone(),
        op,
        source,
    }
}

fn corrupt(img: &Image, what: &str) -> Error {
    Error::Corrupt {
        path: img.path.clone(),
        what: what.to_owned(),
    }
}

/// Makes an image ready for writing: refuses what cannot be written
/// safely, clears autoclear bits whose meaning this engine does not keep up
/// (unknown ones, and bitmaps, which are not updated), and loads the
/// refcount table.
pub(crate) async fn prepare_for_writing(img: &Image) -> Result<()> {
    let h = &img.header;
    let refuse = |what: &str| {
        Err(Error::Unsupported {
            path: img.path.clone(),
            what: what.to_owned(),
        })
    };
    if h.is_corrupt() {
        return refuse(
            "the corrupt bit is set: the image may only be opened read-only (run qblk check)",
        );
    }
    if h.is_dirty() {
        return refuse(
            "the dirty bit is set and refcount rebuilding is not implemented yet: open read-only",
        );
    }
    let mut header = h.clone();
    let keep = AutoclearFeatures::RAW_EXTERNAL_DATA;
    let cleared = header.autoclear_features.bits() & !keep.bits();
    if cleared != 0 {
        header.autoclear_features =
            AutoclearFeatures::from_bits_retain(header.autoclear_features.bits() & keep.bits());
        write_header(img, &header).await?;
        img.sync_image("flush header").await?;
    }
    let g = img.geometry;
    let cs = g.cluster_size();
    let rt = img
        .file
        .read(
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * cs) as usize,
        )
        .await
        .map_err(io(img, "read refcount table"))?;
    let mut table = Vec::with_capacity(rt.len() / 8);
    for (i, raw) in rt.chunks_exact(8).enumerate() {
        let e = RefcountTableEntry(u64::from_be_bytes(raw.try_into().expect("8 bytes")));
        e.validate(&g, h.refcount_table_offset + i as u64 * 8)
            .map_err(|source| Error::Format {
                path: img.path.clone(),
                source,
            })?;
        table.push(e.0);
    }
    let file_len = img.file.file_len().map_err(io(img, "stat"))?;
    let l1 = img.lock_tables().l1.clone();
    let meta = Arc::new(MetaMap::build(&img.file, h, &g, &l1, &table, file_len).await?);
    img.lock_tables().meta = meta.clone();
    let mut a = img.alloc.lock().await;
    a.rc = Some(Refcounts {
        meta,
        table,
        table_dirty: false,
        blocks: lru::LruCache::unbounded(),
        blocks_capacity: (img.refcount_cache_bytes / g.cluster_size()).max(4) as usize,
        dirty_blocks: BTreeSet::new(),
        cursor: 0,
        pending_free: HashSet::new(),
        deferred_releases: Vec::new(),
        end: g.clusters_for(file_len),
        file_len,
        opened_len: file_len,
        no_prealloc: false,
        warned_meta_free: false,
    });
    a.lazy = header.is_v3() && header.lazy_refcounts();
    a.header = Some(header);
    Ok(())
}

async fn write_header(img: &Image, header: &Header) -> Result<()> {
    let bytes = header.encode().map_err(|source| Error::Format {
        path: img.path.clone(),
        source,
    })?;
    Counters::add(&img.counters.metadata_writes, 1);
    img.file
        .write(0, &bytes)
        .await
        .map_err(io(img, "write header"))
}

impl Refcounts {
    /// The refcount block holding `cluster`'s entry, loaded; `None` if the
    /// table has no block for it.
    async fn block(&mut self, img: &Image, cluster: u64) -> Result<Option<u64>> {
        let g = img.geometry;
        let index = g.refcount_table_index(HostCluster(cluster)) as usize;
        let Some(&entry) = self.table.get(index) else {
            return Ok(None);
        };
        let Some(off) = RefcountTableEntry(entry).block_offset() else {
            return Ok(None);
        };
        if self.blocks.get(&off.0).is_none() {
            let b = img
                .file
                .read(off.0, g.cluster_size() as usize)
                .await
                .map_err(io(img, "read refcount block"))?;
            self.insert_block(off.0, b);
        }
        Ok(Some(off.0))
    }

    /// Caches a block as most recently used, evicting the least recently
    /// used clean blocks beyond the cache's capacity.
    fn insert_block(&mut self, offset: u64, block: AlignedBuf) {
        self.blocks.put(offset, block);
        while self.blocks.len() > self.blocks_capacity + self.dirty_blocks.len() {
            let victim = self
                .blocks
                .iter()
                .rev()
                .map(|(k, _)| *k)
                .find(|k| !self.dirty_blocks.contains(k) && *k != offset);
            match victim {
                Some(k) => {
                    self.blocks.pop(&k);
                }
                None => break,
            }
        }
    }

    async fn get(&mut self, img: &Image, cluster: u64) -> Result<u64> {
        let g = img.geometry;
        Ok(match self.block(img, cluster).await? {
            None => 0,
            Some(b) => get_refcount(
                self.blocks.peek(&b).expect("block loaded"),
                g.refcount_order(),
                g.refcount_block_index(HostCluster(cluster)),
            ),
        })
    }

    /// Sets a refcount whose block exists.
    fn set_in(&mut self, img: &Image, block: u64, cluster: u64, value: u64) -> Result<()> {
        let g = img.geometry;
        let buf = self.blocks.peek_mut(&block).expect("block loaded");
        set_refcount(
            buf,
            g.refcount_order(),
            g.refcount_block_index(HostCluster(cluster)),
            value,
        )
        .map_err(|e| corrupt(img, &e.to_string()))?;
        self.dirty_blocks.insert(block);
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to a cluster's refcount. A cluster whose
    /// count drops to zero waits for the next writeback before reuse.
    async fn adjust(&mut self, img: &Image, cluster: u64, delta: i64) -> Result<()> {
        let Some(block) = self.block(img, cluster).await? else {
            return Err(corrupt(
                img,
                &format!("cluster {cluster} is referenced but has no refcount block"),
            ));
        };
        let cur = self.get(img, cluster).await?;
        let new = cur.checked_add_signed(delta).ok_or_else(|| {
            corrupt(
                img,
                &format!("refcount of cluster {cluster} would drop below zero"),
            )
        })?;
        self.set_in(img, block, cluster, new)?;
        if new == 0 {
            self.pending_free.insert(cluster);
        }
        Ok(())
    }

    /// Drops one reference to `cluster` once the tables that no longer
    /// hold it are durable (see `deferred_releases`).
    fn release(&mut self, cluster: u64) {
        self.deferred_releases.push(cluster);
    }

    /// Makes sure the file reaches `end` bytes, extending it ahead in
    /// large steps with fallocate (blocks reserved, reading as zeros).
    /// Guest writes into a new cluster then land inside the file: on
    /// Linux file systems a direct write that extends a file takes the
    /// inode lock exclusively and leaves io_uring's fast path; one inside
    /// it does not. Best effort: without fallocate, writes extend the file.
    async fn extend_file_to(&mut self, img: &Image, end: u64) {
        if end <= self.file_len || self.no_prealloc || img.data_file.is_some() {
            return;
        }
        let step = (self.file_len / 8).clamp(PREALLOC_MIN, PREALLOC_MAX);
        let target = (end + step).next_multiple_of(img.geometry.cluster_size());
        match img
            .file
            .fallocate(0, self.file_len, target - self.file_len)
            .await
        {
            Ok(()) => self.file_len = target,
            Err(_) => self.no_prealloc = true,
        }
    }

    /// Allocates one free cluster (refcount 1) and returns its offset.
    async fn alloc_cluster(&mut self, img: &Image, header: &mut Header) -> Result<u64> {
        let g = img.geometry;
        let cs = g.cluster_size();
        loop {
            let c = self.cursor;
            let index = g.refcount_table_index(HostCluster(c)) as usize;
            if index >= self.table.len() {
                self.grow_table(img, header, index).await?;
                continue;
            }
            if self.table[index] == 0 {
                // No block covers c: every cluster it would count is free.
                // The new block lives at c and counts itself.
                let mut buf = AlignedBuf::zeroed(cs as usize);
                set_refcount(
                    &mut buf,
                    g.refcount_order(),
                    g.refcount_block_index(HostCluster(c)),
                    1,
                )
                .expect("1 fits any refcount width");
                self.dirty_blocks.insert(c * cs);
                self.insert_block(c * cs, buf);
                self.table[index] = c * cs;
                self.table_dirty = true;
                self.cursor = c + 1;
                self.end = self.end.max(c + 1);
                continue;
            }
            self.cursor = c + 1;
            if c == 0 || self.pending_free.contains(&c) {
                continue;
            }
            if self.get(img, c).await? == 0 {
                if let Some(kind) = self.meta.kind(c) {
                    // Metadata with a refcount of 0: damaged refcounts, or
                    // a structure freed since open. Never hand it out.
                    if !self.warned_meta_free {
                        warn!(
                            image = %img.path.display(),
                            "cluster at {:#x} holds {} but its refcount is 0; not reusing it (run qblk check)",
                            c * cs,
                            kind.name()
                        );
                        self.warned_meta_free = true;
                    }
                    continue;
                }
                let block = self.block(img, c).await?.expect("block exists");
                self.set_in(img, block, c, 1)?;
                self.end = self.end.max(c + 1);
                // Every new cluster, data or table, lands inside the file.
                self.extend_file_to(img, (c + 1) * cs).await;
                return Ok(c * cs);
            }
        }
    }

    /// Allocates `n` contiguous clusters past everything in use, with any
    /// refcount blocks they need placed right after them; returns the first
    /// cluster. The blocks and table entries are left dirty.
    async fn alloc_run(&mut self, img: &Image, header: &mut Header, n: u64) -> Result<u64> {
        let g = img.geometry;
        let cs = g.cluster_size();
        let per_block = g.refcount_block_entries();
        loop {
            let start = self.end.max(self.cursor);
            let missing = |count: u64, table: &[u64]| -> Vec<u64> {
                (start / per_block..=(start + count - 1) / per_block)
                    .filter(|&i| table.get(i as usize).copied().unwrap_or(0) == 0)
                    .collect()
            };
            let mut blocks = 0u64;
            loop {
                let need = missing(n + blocks, &self.table).len() as u64;
                if need == blocks {
                    break;
                }
                blocks = need;
            }
            let indexes = missing(n + blocks, &self.table);
            let top = indexes.iter().copied().max().unwrap_or(0) as usize;
            if top >= self.table.len() {
                // Grow the table first; it moves past everything, so retry.
                self.grow_table(img, header, top).await?;
                continue;
            }
            for (k, &bi) in indexes.iter().enumerate() {
                let at = (start + n + k as u64) * cs;
                self.table[bi as usize] = at;
                self.table_dirty = true;
                self.dirty_blocks.insert(at);
                self.insert_block(at, AlignedBuf::zeroed(cs as usize));
            }
            for c in start..start + n + indexes.len() as u64 {
                let block = self.block(img, c).await?.expect("covered by a block");
                self.set_in(img, block, c, 1)?;
            }
            self.end = self.end.max(start + n + indexes.len() as u64);
            self.cursor = self.cursor.max(self.end);
            return Ok(start);
        }
    }

    /// Replaces the refcount table with a larger one that has an entry at
    /// `min_index`. The new table and any refcount blocks it needs for its
    /// own clusters go past everything in use; the header switches to it
    /// only once it is durable, and the old table is freed after that.
    async fn grow_table(
        &mut self,
        img: &Image,
        header: &mut Header,
        min_index: usize,
    ) -> Result<()> {
        let g = img.geometry;
        let cs = g.cluster_size();
        let entries = (min_index + 1).max(self.table.len() * 2);
        let table_clusters = g.clusters_for(entries as u64 * 8);
        let max_clusters = (qblk_qcow2::types::MAX_REFCOUNT_TABLE_BYTES / cs).max(1);
        if table_clusters > max_clusters {
            return Err(Error::Unsupported {
                path: img.path.clone(),
                what: "the image is full: the refcount table would exceed 8 MiB".into(),
            });
        }
        let start = self.end.max(self.cursor);
        // New blocks follow the table; find how many are needed to cover
        // the table and themselves (a fixed point: blocks count blocks).
        let per_block = g.refcount_block_entries();
        let mut new_blocks = 0u64;
        let missing = |first: u64, count: u64, table: &[u64]| -> Vec<u64> {
            let mut v: Vec<u64> = (first / per_block..=(first + count - 1) / per_block)
                .filter(|&i| table.get(i as usize).copied().unwrap_or(0) == 0)
                .collect();
            v.dedup();
            v
        };
        loop {
            let need = missing(start, table_clusters + new_blocks.max(1), &self.table).len() as u64;
            if need == new_blocks {
                break;
            }
            new_blocks = need;
        }
        let mut table = self.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        let block_indexes = missing(start, table_clusters + new_blocks.max(1), &self.table);
        let first_block = start + table_clusters;
        for (k, &bi) in block_indexes.iter().enumerate() {
            let at = (first_block + k as u64) * cs;
            table[bi as usize] = at;
            self.dirty_blocks.insert(at);
            self.insert_block(at, AlignedBuf::zeroed(cs as usize));
        }
        self.table = table;
        // Refcount 1 for the new table clusters and the new blocks.
        for c in start..first_block + block_indexes.len() as u64 {
            let block = self.block(img, c).await?.expect("covered by a block");
            self.set_in(img, block, c, 1)?;
        }
        self.end = self.end.max(first_block + block_indexes.len() as u64);
        self.cursor = self.cursor.max(self.end);

        // Blocks first, then the table, then the header that points at it.
        self.write_blocks(img).await?;
        let mut bytes = AlignedBuf::zeroed((table_clusters * cs) as usize);
        for (i, e) in self.table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        Counters::add(&img.counters.metadata_writes, 1);
        img.file
            .write_aligned(start * cs, bytes)
            .await
            .map_err(io(img, "write refcount table"))?;
        img.sync_image("flush").await?;
        let old_offset = header.refcount_table_offset;
        let old_clusters = u64::from(header.refcount_table_clusters);
        img.lock_tables().refcount_table = (start * cs, table_clusters * cs);
        header.refcount_table_offset = start * cs;
        header.refcount_table_clusters =
            u32::try_from(table_clusters).map_err(|_| corrupt(img, "refcount table size"))?;
        write_header(img, header).await?;
        img.sync_image("flush header").await?;
        self.table_dirty = false;
        for c in 0..old_clusters {
            self.adjust(img, old_offset / cs + c, -1).await?;
        }
        Ok(())
    }

    async fn write_blocks(&mut self, img: &Image) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty_blocks);
        for off in dirty {
            let buf = self.blocks.peek(&off).expect("dirty blocks stay cached");
            let mut copy = AlignedBuf::zeroed(buf.len());
            copy.copy_from_slice(buf);
            Counters::add(&img.counters.metadata_writes, 1);
            img.file
                .write_aligned(off, copy)
                .await
                .map_err(io(img, "write refcount block"))?;
        }
        Ok(())
    }
}

/// Compresses one cluster the way QEMU does: raw deflate with a 4 KiB
/// window (QEMU inflates with windowBits -12), or a zstd frame.
fn compress(kind: qblk_qcow2::header::CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    match kind {
        qblk_qcow2::header::CompressionType::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len());
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Some(out),
                _ => None,
            }
        }
        qblk_qcow2::header::CompressionType::Zstd => zstd::bulk::compress(data, 0).ok(),
    }
}

impl Image {
    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::MarkedCorrupt {
                path: self.path.clone(),
            });
        }
        if !self.writable {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "image is open read-only".into(),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(())
    }

    /// Writes guest bytes at `offset`. The data is on its way to the disk
    /// when this returns; it is durable after the next [`Image::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        // Boxed: the write path's state is large, and a caller that spawns
        // a task per request would otherwise copy it into every task.
        let r = Box::pin(self.write_inner(offset, data, None)).await;
        self.on_error(r).await
    }

    /// Like [`Image::write`], but the host file reads `data` directly
    /// (no bounce buffer, no copy) wherever the data goes to disk as it is:
    /// in-place writes and whole new clusters of unencrypted images, with
    /// offset, length and address aligned for O_DIRECT.
    ///
    /// # Safety
    /// `data` must lie in memory that stays valid (mapped, not freed or
    /// reused) for as long as `keep` or any clone of it lives.
    pub async unsafe fn write_direct(
        &self,
        offset: u64,
        data: &[u8],
        keep: &crate::file::KeepAlive,
    ) -> Result<()> {
        let r = Box::pin(self.write_inner(offset, data, Some(keep))).await;
        self.on_error(r).await
    }

    async fn write_inner(
        &self,
        offset: u64,
        data: &[u8],
        keep: Option<&crate::file::KeepAlive>,
    ) -> Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        let g = self.geometry;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_cluster = g.offset_in_cluster(pos);
            let mut chunk = ((g.cluster_size() - in_cluster) as usize).min(data.len() - done);
            let (desc, _) = self.descriptor_and_entry(pos).await?;
            match self.in_place_target(&desc, in_cluster, chunk as u64) {
                Some(host) => {
                    // Extend over following owned clusters that continue
                    // this one on the host: one write for the whole run.
                    while done + chunk < data.len() {
                        let next = offset + (done + chunk) as u64;
                        let n = (g.cluster_size() as usize).min(data.len() - done - chunk);
                        let (d, _) = self.descriptor_and_entry(next).await?;
                        if self.in_place_target(&d, 0, n as u64)
                            != Some(host + in_cluster + chunk as u64)
                        {
                            break;
                        }
                        chunk += n;
                    }
                    Counters::add(&self.counters.in_place_writes, 1);
                    self.write_data(host + in_cluster, &data[done..done + chunk], keep)
                        .await?
                }
                None => {
                    Counters::add(&self.counters.allocating_writes, 1);
                    self.allocating_write(pos, &data[done..done + chunk], keep)
                        .await?;
                }
            }
            self.bump_write_gen();
            done += chunk;
        }
        Ok(())
    }

    /// The host cluster a write may go to without touching metadata.
    fn in_place_target(&self, desc: &ClusterDescriptor, in_cluster: u64, len: u64) -> Option<u64> {
        let ClusterDescriptor::Standard {
            host,
            copied,
            subclusters,
        } = *desc
        else {
            return None;
        };
        if !copied && !self.header.has_external_data_file() {
            return None;
        }
        if self.geometry.extended_l2() {
            let scs = self.geometry.subcluster_size();
            let first = (in_cluster / scs) as u32;
            let last = ((in_cluster + len - 1) / scs) as u32;
            if !(first..=last).all(|i| subclusters.state(i) == SubclusterState::Allocated) {
                return None;
            }
        }
        Some(host.0)
    }

    /// Refuses guest data headed for the image's own header, L1 table,
    /// refcount table or a cached L2 table (an L2 entry pointing there is
    /// corruption; writing would destroy the image), like QEMU's "cached"
    /// metadata overlap check.
    fn check_data_target(&self, host: u64, len: u64) -> Result<()> {
        if self.data_file.is_some() {
            return Ok(());
        }
        let cs = self.geometry.cluster_size();
        let (l1_offset, l1_len, rt_offset, rt_len, onto_l2, onto_meta) = {
            let t = self.lock_tables();
            let first = host - host % cs;
            let onto_l2 = (first..host.saturating_add(len))
                .step_by(cs as usize)
                .any(|c| t.l2_dirty.contains_key(&c) || t.l2_clean.contains(&c));
            let onto_meta =
                (first / cs..host.saturating_add(len).div_ceil(cs)).find_map(|c| t.meta.kind(c));
            (
                t.l1_offset,
                t.l1.len() as u64 * 8,
                t.refcount_table.0,
                t.refcount_table.1,
                onto_l2,
                onto_meta,
            )
        };
        let overlaps = |start: u64, n: u64| {
            n > 0 && host < start.saturating_add(n) && start < host.saturating_add(len)
        };
        // The metadata map holds every structure found at open, the header
        // among them; the L1 and refcount tables are also checked where
        // they are now (they move when they grow), and cached L2 tables
        // cover the ones allocated since open.
        let what = if let Some(kind) = onto_meta {
            kind.name()
        } else if onto_l2 {
            "an L2 table"
        } else if overlaps(l1_offset, l1_len) {
            "the L1 table"
        } else if overlaps(rt_offset, rt_len) {
            "the refcount table"
        } else {
            return Ok(());
        };
        Err(corrupt(
            self,
            &format!("guest data at host offset {host:#x} would overwrite {what}"),
        ))
    }

    /// Writes guest data at `host_offset` (encrypting it if the image is).
    /// With `keep`, `data` must satisfy [`HostFile::write_direct`]'s
    /// contract (the callers' `unsafe` entry point promised it).
    async fn write_data(
        &self,
        host_offset: u64,
        data: &[u8],
        keep: Option<&crate::file::KeepAlive>,
    ) -> Result<()> {
        self.check_data_target(host_offset, data.len() as u64)?;
        let file = self.data_file.as_ref().unwrap_or(&self.file);
        if self.crypto.is_none()
            && self.header.crypt_method == qblk_qcow2::header::CryptMethod::None
        {
            let r = match keep {
                // SAFETY: forwarded from write_direct's contract.
                Some(keep) => unsafe { file.write_direct(host_offset, data, keep) }.await,
                None => file.write(host_offset, data).await,
            };
            return r.map_err(io(self, "write data"));
        }
        let crypto = self.crypto_or_err()?;
        let sector = crate::crypto::SECTOR;
        let start = host_offset - host_offset % sector;
        let end = (host_offset + data.len() as u64).next_multiple_of(sector);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let skip = (host_offset - start) as usize;
        let _guard = if skip != 0 || buf.len() != data.len() {
            // Partial sectors: decrypt what is there, patch, re-encrypt.
            let guard = self.crypto_rmw.lock().await;
            self.read_data(start, &mut buf, None).await?;
            Some(guard)
        } else {
            None
        };
        buf[skip..skip + data.len()].copy_from_slice(data);
        crypto.encrypt(start / sector, &mut buf);
        file.write_aligned(start, buf)
            .await
            .map_err(io(self, "write data"))
    }

    /// One cluster's worth (or less) of an allocating write, in three
    /// phases so that allocating writes to different clusters overlap:
    /// choose the host cluster under the allocator lock; write data and
    /// copy-on-write with no lock held; publish the L2 entry under the lock.
    /// The guest cluster's own lock, held throughout, orders every
    /// allocation, zeroing or discard of that cluster.
    async fn allocating_write(
        &self,
        pos: u64,
        data: &[u8],
        keep: Option<&crate::file::KeepAlive>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let in_cluster = g.offset_in_cluster(pos);
        let cluster_start = pos - in_cluster;
        let _cluster = self.lock_guest_cluster(cluster_start).await;
        // The mapping may have changed while this task waited.
        let (desc, _) = self.descriptor_and_entry(pos).await?;
        if let Some(host) = self.in_place_target(&desc, in_cluster, data.len() as u64) {
            return self.write_data(host + in_cluster, data, keep).await;
        }
        let external = self.header.has_external_data_file();

        // Phase 1: where the data goes, and which reference it replaces.
        // `hole`: the new cluster lies past everything the file ever held
        // (a hole that reads as zeros).
        let mut hole = false;
        let (host, old_ref, fresh) = {
            let mut a = self.alloc.lock().await;
            let Alloc { rc, header, .. } = &mut *a;
            let rc = rc.as_mut().expect("writable image has refcounts");
            let header = header.as_mut().expect("writable image has a header");
            match desc {
                _ if external => (cluster_start, None, false),
                ClusterDescriptor::Zero {
                    preallocated: Some(h),
                    copied: true,
                } => (h.0, None, false),
                ClusterDescriptor::Standard {
                    host, copied: true, ..
                } => (host.0, None, false),
                ClusterDescriptor::Standard {
                    host,
                    copied: false,
                    ..
                }
                | ClusterDescriptor::Zero {
                    preallocated: Some(host),
                    copied: false,
                } => (
                    rc.alloc_cluster(self, header).await?,
                    Some((host.0, cs)),
                    true,
                ),
                ClusterDescriptor::Compressed { host, len } => (
                    rc.alloc_cluster(self, header).await?,
                    Some((host.0, len)),
                    true,
                ),
                ClusterDescriptor::Unallocated
                | ClusterDescriptor::Zero {
                    preallocated: None, ..
                }
                | ClusterDescriptor::UnallocatedSubclusters { .. } => {
                    let end = rc.end;
                    let h = rc.alloc_cluster(self, header).await?;
                    hole = h / cs >= end;
                    (h, None, true)
                }
            }
        };
        // What the rest of the cluster must read as is zeros, and the hole
        // already reads so: only the guest's bytes need writing (no
        // copy-on-write of zeros). Not for encrypted images, whose zeros
        // are ciphertext.
        let zeros_in_place = hole
            && self.header.crypt_method == qblk_qcow2::header::CryptMethod::None
            && match desc {
                ClusterDescriptor::Zero { .. } => true,
                ClusterDescriptor::Unallocated => !self.backing_exists(),
                _ => false,
            };

        // Phase 2: guest data and copy-on-write, no lock held.
        let written = self
            .write_new_cluster_data(
                desc,
                pos,
                data,
                host,
                Fill {
                    moves_data: old_ref.is_some(),
                    zeros_in_place,
                },
                keep,
            )
            .await;

        // Phase 3: publish, or give the cluster back.
        let mut a = self.alloc.lock().await;
        let Alloc { rc, header, .. } = &mut *a;
        let rc = rc.as_mut().expect("writable image has refcounts");
        let header = header.as_mut().expect("writable image has a header");
        let new_entry = match written {
            Ok(e) => e,
            Err(e) => {
                if fresh {
                    rc.adjust(self, host / cs, -1).await?;
                }
                return Err(e);
            }
        };
        self.set_l2_entry(rc, header, cluster_start, new_entry)
            .await?;
        if let Some((off, len)) = old_ref {
            for c in off / cs..=(off + len - 1) / cs {
                rc.release(c);
            }
        }
        if self.needs_writeback(&a) {
            self.writeback(&mut a).await?;
        }
        Ok(())
    }

    /// Writes an allocating write's data (and copy-on-write) to `host`;
    /// returns the L2 entry that will map it.
    async fn write_new_cluster_data(
        &self,
        desc: ClusterDescriptor,
        pos: u64,
        data: &[u8],
        host: u64,
        fill: Fill,
        keep: Option<&crate::file::KeepAlive>,
    ) -> Result<L2Entry> {
        let Fill {
            moves_data,
            zeros_in_place,
        } = fill;
        let g = self.geometry;
        let in_cluster = g.offset_in_cluster(pos);
        let cluster_start = pos - in_cluster;
        if !g.extended_l2() {
            if zeros_in_place {
                self.write_data(host + in_cluster, data, keep).await?;
            } else {
                self.write_whole_cluster(cluster_start, in_cluster, data, host, keep)
                    .await?;
            }
            return Ok(L2Entry::standard(
                qblk_qcow2::HostOffset(host),
                true,
                SubclusterBitmap(0),
            ));
        }
        let scs = g.subcluster_size();
        let first = (in_cluster / scs) as u32;
        let last = ((in_cluster + data.len() as u64 - 1) / scs) as u32;
        let touched: u32 = ((u64::from(u32::MAX) >> (31 - (last - first))) as u32) << first;
        let old = match desc {
            ClusterDescriptor::Standard { subclusters, .. }
            | ClusterDescriptor::UnallocatedSubclusters { subclusters } => subclusters,
            // A compressed cluster has no subclusters: all of it is data.
            ClusterDescriptor::Compressed { .. } => SubclusterBitmap::ALL_ALLOCATED,
            ClusterDescriptor::Unallocated | ClusterDescriptor::Zero { .. } => SubclusterBitmap(0),
        };
        if moves_data {
            // A shared cluster moves: copy every subcluster it has.
            self.write_whole_cluster(cluster_start, in_cluster, data, host, keep)
                .await?;
        } else {
            // Only the touched subclusters are written (edges completed from
            // what shows through now); the others keep their state.
            let start = u64::from(first) * scs;
            let end = (u64::from(last) + 1) * scs;
            let mut buf = vec![0u8; (end - start) as usize];
            self.read(cluster_start + start, &mut buf).await?;
            let at = (in_cluster - start) as usize;
            Counters::add(&self.counters.cow_bytes, (buf.len() - data.len()) as u64);
            buf[at..at + data.len()].copy_from_slice(data);
            self.write_data(host + start, &buf, None).await?;
        }
        Ok(L2Entry::standard(
            qblk_qcow2::HostOffset(host),
            true,
            SubclusterBitmap::from_parts(old.allocation() | touched, old.zero() & !touched),
        ))
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
            image: self,
            key: cluster_start,
            lock: Some(lock),
            guard: Some(guard),
        }
    }

    /// Writes a whole new cluster: the guest data inside what the cluster
    /// reads as now (copy-on-write).
    async fn write_whole_cluster(
        &self,
        cluster_start: u64,
        in_cluster: u64,
        data: &[u8],
        host: u64,
        keep: Option<&crate::file::KeepAlive>,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        self.check_data_target(host, cs as u64)?;
        if data.len() == cs
            && keep.is_some()
            && self.header.crypt_method == qblk_qcow2::header::CryptMethod::None
        {
            // The guest data is the whole cluster: it goes to disk as it
            // is (a data file is exactly the virtual size: not past it).
            let n = match &self.data_file {
                Some(_) => (self.size() - cluster_start).min(cs as u64) as usize,
                None => cs,
            };
            return self.write_data(host, &data[..n], keep).await;
        }
        let mut buf = AlignedBuf::zeroed(cs);
        if data.len() != cs {
            Counters::add(&self.counters.cow_bytes, (cs - data.len()) as u64);
            let end = (cluster_start + cs as u64).min(self.size());
            let n = (end - cluster_start) as usize;
            self.read(cluster_start, &mut buf[..n]).await?;
        }
        buf[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        if self.header.crypt_method != qblk_qcow2::header::CryptMethod::None {
            self.crypto_or_err()?
                .encrypt(host / crate::crypto::SECTOR, &mut buf);
        }
        match &self.data_file {
            // The data file is exactly the virtual size: never write past it.
            Some(f) => {
                let n = (self.size() - cluster_start).min(cs as u64) as usize;
                f.write(host, &buf[..n])
                    .await
                    .map_err(io(self, "write data"))
            }
            None => self
                .file
                .write_aligned(host, buf)
                .await
                .map_err(io(self, "write data")),
        }
    }

    /// Points the L2 entry of the cluster at `guest` to `entry`, allocating
    /// or copying its L2 table first if the image does not own it alone.
    async fn set_l2_entry(
        &self,
        rc: &mut Refcounts,
        header: &mut Header,
        guest: u64,
        entry: L2Entry,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let cluster = g.guest_cluster(GuestOffset(guest));
        let l1_index = g.l1_index(cluster) as usize;
        let l1_entry = self
            .lock_tables()
            .l1
            .get(l1_index)
            .copied()
            .ok_or_else(|| corrupt(self, "L1 table too small"))?;
        let table_offset = match l1_entry.l2_offset() {
            Some(off) if l1_entry.copied() => off.0,
            old => {
                let t = rc.alloc_cluster(self, header).await?;
                let table = match old {
                    Some(off) => {
                        // Copy a table shared with a snapshot.
                        let src = self.l2_table(off.0).await?;
                        let mut copy = AlignedBuf::zeroed(cs as usize);
                        copy.copy_from_slice(&src);
                        rc.release(off.0 / cs);
                        copy
                    }
                    None => AlignedBuf::zeroed(cs as usize),
                };
                let mut tables = self.lock_tables();
                tables.l2_dirty.insert(t, Arc::new(table));
                tables.l1[l1_index] = L1Entry::new(qblk_qcow2::HostOffset(t), true);
                tables.l1_dirty = true;
                t
            }
        };
        // Make sure the table is loaded, then change it in the dirty set.
        let current = self.l2_table(table_offset).await?;
        let mut tables = self.lock_tables();
        let table = match tables.l2_dirty.remove(&table_offset) {
            Some(t) => t,
            None => {
                tables.l2_clean.pop(&table_offset);
                current
            }
        };
        let mut table = Arc::unwrap_or_clone(table);
        entry.write(&mut table, &g, g.l2_index(cluster));
        tables.l2_dirty.insert(table_offset, Arc::new(table));
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become
    /// zero clusters (or all-zero subclusters); with `may_unmap` their host
    /// clusters are released, otherwise they stay preallocated. Partial
    /// clusters, version 2 images and raw external data files get zeros
    /// written.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let r = self.write_zeroes_inner(offset, len, may_unmap).await;
        self.on_error(r).await
    }

    async fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let metadata_only = self.header.is_v3() && !self.header.data_file_is_raw();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_cluster = g.offset_in_cluster(pos);
            let n = (cs - in_cluster).min(end - pos);
            let whole = in_cluster == 0 && (n == cs || pos + n == self.size());
            if whole && metadata_only {
                let _cluster = self.lock_guest_cluster(pos).await;
                let mut a = self.alloc.lock().await;
                self.zero_cluster(&mut a, pos, may_unmap).await?;
            } else {
                self.write_zero_bytes(pos, n).await?;
            }
            pos += n;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, pos: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.write(pos + done, &zeros[..n]).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// One whole cluster to zeros through its L2 entry.
    async fn zero_cluster(&self, a: &mut Alloc, pos: u64, may_unmap: bool) -> Result<()> {
        let (desc, _) = self.descriptor_and_entry(pos).await?;
        let g = self.geometry;
        let external = self.header.has_external_data_file();
        // What keeps its host cluster, and what reference is dropped.
        let (keep, drop): (Option<u64>, Option<(u64, u64)>) = match desc {
            ClusterDescriptor::Standard { host, copied, .. }
            | ClusterDescriptor::Zero {
                preallocated: Some(host),
                copied,
            } => {
                if external || (copied && !may_unmap) {
                    (Some(host.0), None)
                } else {
                    (None, Some((host.0, g.cluster_size())))
                }
            }
            ClusterDescriptor::Compressed { host, len } => (None, Some((host.0, len))),
            ClusterDescriptor::Unallocated
            | ClusterDescriptor::Zero {
                preallocated: None, ..
            }
            | ClusterDescriptor::UnallocatedSubclusters { .. } => (None, None),
        };
        let new_entry = match (g.extended_l2(), keep) {
            (false, host) => L2Entry::zero(host.map(qblk_qcow2::HostOffset), host.is_some()),
            (true, Some(host)) => L2Entry::standard(
                qblk_qcow2::HostOffset(host),
                true,
                SubclusterBitmap::ALL_ZERO,
            ),
            (true, None) => L2Entry {
                word: 0,
                bitmap: SubclusterBitmap::ALL_ZERO.0,
            },
        };
        self.remap(a, pos, new_entry, drop).await
    }

    /// Releases whole clusters in `[offset, offset + len)`: they read as
    /// zeros afterwards where a backing file would otherwise show through,
    /// and are unallocated otherwise. Discard is advisory: partial clusters,
    /// version 2 images with a backing file and external data files are
    /// left as they are.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.discard_inner(offset, len).await;
        self.on_error(r).await
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        if self.header.has_external_data_file() || (!self.header.is_v3() && self.backing_exists()) {
            return Ok(());
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut pos = offset.next_multiple_of(cs);
        let end = offset + len;
        while pos < end && (pos + cs <= end || end == self.size()) {
            let _cluster = self.lock_guest_cluster(pos).await;
            let mut a = self.alloc.lock().await;
            let (desc, _) = self.descriptor_and_entry(pos).await?;
            let drop = match desc {
                ClusterDescriptor::Standard { host, .. }
                | ClusterDescriptor::Zero {
                    preallocated: Some(host),
                    ..
                } => Some((host.0, cs)),
                ClusterDescriptor::Compressed { host, len } => Some((host.0, len)),
                ClusterDescriptor::Unallocated
                | ClusterDescriptor::Zero {
                    preallocated: None, ..
                }
                | ClusterDescriptor::UnallocatedSubclusters { .. } => None,
            };
            let new_entry = if !self.backing_exists() {
                L2Entry::UNALLOCATED
            } else if g.extended_l2() {
                L2Entry {
                    word: 0,
                    bitmap: SubclusterBitmap::ALL_ZERO.0,
                }
            } else {
                L2Entry::zero(None, false)
            };
            if drop.is_some() || new_entry != L2Entry::UNALLOCATED {
                self.remap(&mut a, pos, new_entry, drop).await?;
            }
            pos += cs;
        }
        Ok(())
    }

    /// Whether deferred (lazy) refcount blocks have outgrown the cache.
    fn needs_refcount_writeback(&self, a: &Alloc) -> bool {
        a.rc.as_ref()
            .is_some_and(|rc| rc.dirty_blocks.len() > rc.blocks_capacity)
    }

    /// Closes the image cleanly: everything durable, and with lazy
    /// refcounts the refcount blocks written and the dirty bit cleared.
    /// An image dropped without `close` (a crash) stays dirty and has its
    /// refcounts rebuilt the next time it is opened for writing.
    pub async fn close(&self) -> Result<()> {
        if !self.writable || self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let r = self.close_inner().await;
        self.on_error(r).await
    }

    async fn close_inner(&self) -> Result<()> {
        let mut a = self.alloc.lock().await;
        self.writeback(&mut a).await?;
        // Give back what was reserved ahead and never used.
        if let Some(rc) = a.rc.as_mut() {
            let used = (rc.end * self.geometry.cluster_size()).max(rc.opened_len);
            if rc.file_len > used {
                self.file.set_len(used).map_err(io(self, "trim the file"))?;
                rc.file_len = used;
            }
        }
        if !a.marked_dirty {
            return Ok(());
        }
        let Alloc { rc, header, .. } = &mut *a;
        let rc = rc.as_mut().expect("writable image has refcounts");
        let header = header.as_mut().expect("writable image has a header");
        rc.write_blocks(self).await?;
        if rc.table_dirty {
            self.write_refcount_table(rc, header).await?;
        }
        self.sync_image("flush").await?;
        header
            .incompatible_features
            .remove(qblk_qcow2::header::IncompatibleFeatures::DIRTY);
        write_header(self, header).await?;
        self.sync_image("flush").await?;
        a.marked_dirty = false;
        Ok(())
    }

    /// Whether dirty metadata has outgrown its bounds.
    fn needs_writeback(&self, a: &Alloc) -> bool {
        let rc_full =
            a.rc.as_ref()
                .is_some_and(|rc| rc.dirty_blocks.len() > rc.blocks_capacity);
        rc_full || self.lock_tables().l2_dirty.len() > MAX_DIRTY_L2_TABLES
    }

    /// Records that a write completed (flush coalescing compares with it).
    fn bump_write_gen(&self) {
        self.write_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Sets a cluster's L2 entry and drops the old host reference, if any.
    async fn remap(
        &self,
        a: &mut Alloc,
        pos: u64,
        entry: L2Entry,
        drop: Option<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let Alloc { rc, header, .. } = a;
        let rc = rc.as_mut().expect("writable image has refcounts");
        let header = header.as_mut().expect("writable image has a header");
        let cluster_start = pos - self.geometry.offset_in_cluster(pos);
        self.set_l2_entry(rc, header, cluster_start, entry).await?;
        if let Some((off, len)) = drop {
            for c in off / cs..=(off + len - 1) / cs {
                rc.release(c);
            }
        }
        self.bump_write_gen();
        if self.needs_writeback(a) {
            self.writeback(a).await?;
        }
        Ok(())
    }

    /// Writes one whole guest cluster compressed (what `convert -c` does).
    /// The cluster must not be allocated yet. Data that does not shrink is
    /// written as a normal cluster, as QEMU does. `data` may be shorter
    /// than a cluster only for the last cluster of the disk.
    pub async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.write_compressed_inner(offset, data).await;
        self.on_error(r).await
    }

    async fn write_compressed_inner(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        if self.header.has_external_data_file()
            || self.header.crypt_method != qblk_qcow2::header::CryptMethod::None
        {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what:
                    "compressed clusters are not possible with an external data file or encryption"
                        .into(),
            });
        }
        if !g.is_cluster_aligned(offset)
            || (data.len() as u64 != cs && offset + data.len() as u64 != self.size())
        {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "compressed writes cover exactly one whole cluster".into(),
            });
        }
        let mut cluster = vec![0u8; cs as usize];
        cluster[..data.len()].copy_from_slice(data);
        let compressed = compress(self.header.compression_type, &cluster);
        let Some(compressed) = compressed.filter(|c| (c.len() as u64) < cs) else {
            return self.write(offset, data).await;
        };
        let len = compressed.len() as u64;
        let _cluster = self.lock_guest_cluster(offset).await;
        let mut a = self.alloc.lock().await;
        let (desc, _) = self.descriptor_and_entry(offset).await?;
        if !matches!(
            desc,
            ClusterDescriptor::Unallocated
                | ClusterDescriptor::Zero {
                    preallocated: None,
                    ..
                }
        ) {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "compressed write to an allocated cluster at guest offset {offset:#x}"
                ),
            });
        }
        let Alloc {
            rc,
            header,
            compressed_tail,
            ..
        } = &mut *a;
        let rc = rc.as_mut().expect("writable image has refcounts");
        let header = header.as_mut().expect("writable image has a header");
        // Pack into the current compressed cluster if it has room; each
        // compressed cluster placed in a host cluster holds a reference.
        let host = match *compressed_tail {
            Some((c, used))
                if cs - used >= len && rc.get(self, c / cs).await? < g.refcount_max() =>
            {
                rc.adjust(self, c / cs, 1).await?;
                *compressed_tail = Some((c, used + len));
                c + used
            }
            _ => {
                let c = rc.alloc_cluster(self, header).await?;
                *compressed_tail = Some((c, len));
                c
            }
        };
        self.file
            .write(host, &compressed)
            .await
            .map_err(io(self, "write compressed cluster"))?;
        let entry =
            L2Entry::compressed(&g, qblk_qcow2::HostOffset(host), len).ok_or_else(|| {
                corrupt(
                    self,
                    "compressed cluster offset does not fit its descriptor",
                )
            })?;
        self.set_l2_entry(rc, header, offset, entry).await?;
        self.bump_write_gen();
        Ok(())
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512). New
    /// space reads as zeros (or as the backing file, where it is longer). A
    /// larger L1 table, when needed, is written past everything in use and
    /// made durable, with its refcounts, before the header points at it.
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        let r = self.resize_inner(new_size).await;
        self.on_error(r).await
    }

    async fn resize_inner(&self, new_size: u64) -> Result<()> {
        let old_size = self.size();
        self.check_writable(0, 0)?;
        let refuse = |what: String| Error::Unsupported {
            path: self.path.clone(),
            what,
        };
        if new_size % 512 != 0 || new_size > i64::MAX as u64 {
            return Err(refuse(format!(
                "new size {new_size} is not a multiple of 512 bytes"
            )));
        }
        if new_size < old_size {
            return Err(refuse("shrinking an image is not supported".into()));
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let entries = g.l1_entries_for(new_size);
        if entries > qblk_qcow2::types::MAX_L1_TABLE_BYTES / 8 {
            return Err(refuse(format!(
                "{new_size} bytes need an L1 table larger than 32 MiB"
            )));
        }
        let mut a = self.alloc.lock().await;
        // Start from clean, durable metadata.
        self.writeback(&mut a).await?;
        let Alloc { rc, header, .. } = &mut *a;
        let rc = rc.as_mut().expect("writable image has refcounts");
        let header = header.as_mut().expect("writable image has a header");
        let (old_l1, old_offset) = {
            let t = self.lock_tables();
            (t.l1.clone(), t.l1_offset)
        };
        let mut new_offset = old_offset;
        if entries > old_l1.len() as u64 {
            let clusters = g.clusters_for(entries * 8);
            let start = rc.alloc_run(self, header, clusters).await?;
            new_offset = start * cs;
            let mut bytes = AlignedBuf::zeroed((clusters * cs) as usize);
            for (i, e) in old_l1.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.0.to_be_bytes());
            }
            Counters::add(&self.counters.metadata_writes, 1);
            self.file
                .write_aligned(new_offset, bytes)
                .await
                .map_err(io(self, "write L1 table"))?;
            // The new table and the refcounts that cover it are durable
            // before the header points at them.
            rc.write_blocks(self).await?;
            if rc.table_dirty {
                self.write_refcount_table(rc, header).await?;
            }
            self.sync_image("flush").await?;
        }
        if let Some(f) = &self.data_file {
            f.set_len(new_size).map_err(io(self, "resize data file"))?;
        }
        header.size = new_size;
        header.l1_table_offset = new_offset;
        header.l1_size = u32::try_from(entries.max(old_l1.len() as u64))
            .map_err(|_| refuse("L1 size".into()))?;
        write_header(self, header).await?;
        self.sync_all().await?;
        {
            let mut t = self.lock_tables();
            t.l1.resize(header.l1_size as usize, L1Entry::UNALLOCATED);
            t.l1_offset = new_offset;
        }
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        if new_offset != old_offset && !old_l1.is_empty() {
            let old_clusters = g.clusters_for(old_l1.len() as u64 * 8);
            // The header naming the new table is durable already.
            for c in 0..old_clusters {
                rc.adjust(self, old_offset / cs + c, -1).await?;
            }
        }
        Ok(())
    }

    async fn write_refcount_table(&self, rc: &mut Refcounts, header: &Header) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let mut bytes =
            AlignedBuf::zeroed((u64::from(header.refcount_table_clusters) * cs) as usize);
        for (i, e) in rc.table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        Counters::add(&self.counters.metadata_writes, 1);
        self.file
            .write_aligned(header.refcount_table_offset, bytes)
            .await
            .map_err(io(self, "write refcount table"))?;
        rc.table_dirty = false;
        Ok(())
    }

    /// Makes every acknowledged write and the metadata it depends on durable.
    pub async fn flush(&self) -> Result<()> {
        if !self.writable || self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        // Every write acknowledged before this call is at or below `wanted`.
        let wanted = self.write_gen.load(std::sync::atomic::Ordering::Acquire);
        let r = {
            let mut a = self.alloc.lock().await;
            if a.synced_gen >= wanted && wanted > 0 {
                // A writeback that started after those writes completed
                // has already made them durable: flushes coalesce.
                Ok(())
            } else {
                self.writeback(&mut a).await
            }
        };
        self.on_error(r).await
    }

    /// Invariant 6: metadata found inconsistent (a format error in a table,
    /// a refcount that cannot be right) fails the request, sets the corrupt
    /// bit as best it can, and stops all further writes. Nothing is fixed
    /// silently.
    async fn on_error(&self, r: Result<()>) -> Result<()> {
        let what = match &r {
            Err(Error::Corrupt { what, .. }) => what.clone(),
            Err(Error::Format { source, .. }) => source.to_string(),
            _ => return r,
        };
        if !self.corrupt.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let a = self.alloc.lock().await;
            let mut header = a.header.clone().unwrap_or_else(|| self.header.clone());
            header.incompatible_features |= qblk_qcow2::header::IncompatibleFeatures::CORRUPT;
            if write_header(self, &header).await.is_ok() {
                let _ = self.sync_image("flush corrupt bit").await;
            }
        }
        Err(Error::Corrupt {
            path: self.path.clone(),
            what,
        })
    }

    /// Writes dirty metadata in the order the module documentation gives.
    async fn writeback(&self, a: &mut Alloc) -> Result<()> {
        // Writes completed before this point are covered by this writeback.
        let covered = self.write_gen.load(std::sync::atomic::Ordering::Acquire);
        let (tables_dirty, refcounts_dirty) = {
            let rc = a.rc.as_ref().expect("writable image has refcounts");
            let t = self.lock_tables();
            (
                !t.l2_dirty.is_empty() || t.l1_dirty,
                !rc.dirty_blocks.is_empty() || rc.table_dirty,
            )
        };
        // With lazy refcounts, refcount blocks stay in memory (until close,
        // or until too many are dirty); the dirty bit, durable before the
        // first table that depends on them, tells a later open to rebuild.
        let defer_refcounts = a.lazy && !self.needs_refcount_writeback(a);
        if !tables_dirty && (!refcounts_dirty || defer_refcounts) {
            self.sync_all().await?;
            a.synced_gen = covered;
            return self.apply_releases(a).await;
        }
        if defer_refcounts {
            if !a.marked_dirty {
                let header = a.header.as_mut().expect("writable image has a header");
                header.incompatible_features |= qblk_qcow2::header::IncompatibleFeatures::DIRTY;
                write_header(self, header).await?;
                a.marked_dirty = true;
            }
        } else {
            let rc = a.rc.as_mut().expect("writable image has refcounts");
            rc.write_blocks(self).await?;
        }
        self.sync_all().await?;
        let rc = a.rc.as_mut().expect("writable image has refcounts");
        if rc.table_dirty && !defer_refcounts {
            let h = a.header.as_ref().expect("header");
            self.write_refcount_table(rc, h).await?;
            self.sync_image("flush").await?;
        }
        let (dirty, l1, l1_offset) = {
            let t = self.lock_tables();
            let dirty: Vec<(u64, Arc<AlignedBuf>)> =
                t.l2_dirty.iter().map(|(k, v)| (*k, v.clone())).collect();
            (dirty, t.l1_dirty.then(|| t.l1.clone()), t.l1_offset)
        };
        for (off, table) in &dirty {
            let mut copy = AlignedBuf::zeroed(table.len());
            copy.copy_from_slice(table);
            Counters::add(&self.counters.metadata_writes, 1);
            self.file
                .write_aligned(*off, copy)
                .await
                .map_err(io(self, "write L2 table"))?;
        }
        if let Some(l1) = l1 {
            self.sync_image("flush").await?;
            let mut bytes = vec![0u8; l1.len() * 8];
            for (i, e) in l1.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.0.to_be_bytes());
            }
            Counters::add(&self.counters.metadata_writes, 1);
            self.file
                .write(l1_offset, &bytes)
                .await
                .map_err(io(self, "write L1 table"))?;
        }
        self.sync_image("flush").await?;
        {
            // Nothing changed the tables meanwhile: they change only under
            // the allocator lock, which this task holds.
            let mut t = self.lock_tables();
            for (off, table) in dirty {
                t.l2_dirty.remove(&off);
                t.l2_clean.put(off, table);
            }
            t.l1_dirty = false;
        }
        a.synced_gen = covered;
        // Freed clusters become reusable now: stop packing compressed data
        // into a cluster that may be among them.
        a.compressed_tail = None;
        self.apply_releases(a).await?;
        let rc = a.rc.as_mut().expect("refcounts");
        if let Some(&lowest) = rc.pending_free.iter().min() {
            rc.cursor = rc.cursor.min(lowest);
        }
        rc.pending_free.clear();
        Ok(())
    }

    /// Applies the deferred refcount decrements (every table that dropped
    /// those references has just been made durable) and, unless refcounts
    /// are lazy, writes them, so a flushed image has no leaks either.
    async fn apply_releases(&self, a: &mut Alloc) -> Result<()> {
        let lazy = a.lazy;
        let rc = a.rc.as_mut().expect("writable image has refcounts");
        if rc.deferred_releases.is_empty() {
            return Ok(());
        }
        for c in std::mem::take(&mut rc.deferred_releases) {
            rc.adjust(self, c, -1).await?;
        }
        if !lazy {
            rc.write_blocks(self).await?;
            self.sync_image("flush").await?;
        }
        Ok(())
    }

    /// fdatasync of the image file, counted.
    async fn sync_image(&self, what: &'static str) -> Result<()> {
        Counters::add(&self.counters.fsyncs, 1);
        self.file.flush().await.map_err(io(self, what))
    }

    async fn sync_all(&self) -> Result<()> {
        if let Some(f) = &self.data_file {
            Counters::add(&self.counters.fsyncs, 1);
            f.flush().await.map_err(io(self, "flush data file"))?;
        }
        self.sync_image("flush").await
    }
}

/// The lock of one guest cluster; the lock table entry goes away with its
/// last user.
pub(crate) struct ClusterGuard<'a> {
    image: &'a Image,
    key: u64,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.lock.take());
        let mut locks = self
            .image
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
