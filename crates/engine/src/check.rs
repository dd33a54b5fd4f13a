//! `qblk check`: the consistency check qemu-img check performs.
//!
//! Every structure that references host clusters is walked (header, active
//! and snapshot L1/L2 tables, the snapshot table, the refcount table and
//! blocks, persistent bitmaps, the LUKS header); the references are tallied
//! and compared with the stored refcounts. A stored refcount below the tally
//! is corruption (the cluster could be handed out while in use), one above
//! is a leak. The COPIED flags of the active tables are checked against the
//! stored refcounts. Findings are worded as qemu-img words them.

use std::collections::HashMap;
use std::path::Path;

use qblk_qcow2::bitmap::{BitmapTableEntry, parse_bitmap_directory};
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry};
use qblk_qcow2::refcount::{RefcountTableEntry, get_refcount};
use qblk_qcow2::tally::{RefcountMismatch, RefcountTally, compare};
use qblk_qcow2::{Geometry, Header};

use crate::commit::{Commit, Edge, End, Files, header_buf};
use crate::file::{CacheMode, HostFile};
use crate::image::{Error, Result, read_header};
use crate::lock::Access;

/// References this many clusters past the end of the file are still
/// tallied individually; further ones are reported in bulk.
const TALLY_SLACK_CLUSTERS: u64 = 1 << 16;

/// What the check found, with qemu-img check's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    /// One line per finding, as qemu-img prints them.
    pub messages: Vec<String>,
    /// (cluster, referenced) of every leaked cluster, for repair.
    pub leaked: Vec<(u64, u64)>,
    /// Only a rebuild of the refcount structure can repair what was found
    /// (a cluster in use with refcount 0, a misaligned refcount block):
    /// qemu-img check -r leaks then fails rather than repair part of it.
    pub needs_rebuild: bool,
}

impl CheckReport {
    fn corruption(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(msg);
    }
}

struct Checker<'a> {
    file: &'a HostFile,
    header: &'a Header,
    geometry: Geometry,
    file_len: u64,
    tally: RefcountTally,
    report: CheckReport,
    /// (l1 index, raw L1 entry) of allocated active L1 entries.
    active_l1: Vec<(usize, u64)>,
    /// (host offset, L2 entry word) of allocated active data clusters.
    active_data: Vec<(u64, u64)>,
    /// Whether the refcount table and blocks count as references (not when
    /// tallying for a rebuild that replaces them).
    count_refcounts: bool,
}

impl Checker<'_> {
    /// Counts a reference to `[offset, offset + len)`, unless it reaches a
    /// cluster or more past the end of the file, which is corruption
    /// (qemu-img check's rule and message; such a reference is not counted).
    fn reference(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if end > self.file_len && end - self.file_len >= self.geometry.cluster_size() {
            self.report.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}"
            ));
            return;
        }
        self.tally.reference(offset, len);
    }
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + use<> {
    Error::io(path, op, None)
}

/// Checks the image at `path`. An `Err` means the image could not be
/// checked at all (qemu-img's exit code 1).
///
/// The image is locked as a reader (qemu-img check's locks): an image a
/// writer holds is refused unless `force_share` (`-U`).
pub async fn check(path: &Path, cache: CacheMode, force_share: bool) -> Result<CheckReport> {
    let file = HostFile::open(path, false, cache).map_err(io(path, "open"))?;
    crate::lock::lock_image(&file, path, Access::READER.force_share(force_share))?;
    let (header, file_len) = read_header(&file, path).await?;
    let geometry = header.geometry();
    let mut c = Checker {
        file: &file,
        header: &header,
        geometry,
        file_len,
        tally: RefcountTally::new(&geometry, file_len, TALLY_SLACK_CLUSTERS),
        report: CheckReport {
            total_clusters: geometry.clusters_for(header.size),
            ..CheckReport::default()
        },
        active_l1: Vec::new(),
        active_data: Vec::new(),
        count_refcounts: true,
    };
    let blocks = c.tally_all().await?;
    c.compare(blocks).await?;
    Ok(c.report)
}

impl Checker<'_> {
    async fn read(
        &self,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<crate::buf::AlignedBuf> {
        self.file
            .read(offset, len as usize)
            .await
            .map_err(io(self.file.path(), what))
    }

    /// Tallies every reference; returns the refcount table's block offsets
    /// (empty when refcount structures are not counted).
    async fn tally_all(&mut self) -> Result<Vec<Option<u64>>> {
        let h = self.header;
        let cs = self.geometry.cluster_size();
        self.reference(0, cs);

        // Active L1 table and everything below it.
        self.reference(h.l1_table_offset, u64::from(h.l1_size) * 8);
        self.walk_l1(h.l1_table_offset, h.l1_size, true).await?;

        // Internal snapshots.
        if let Some((snaps, len)) =
            crate::layout::read_snapshot_table(self.file, h, cs, self.file_len).await?
        {
            self.reference(h.snapshots_offset, len);
            for s in &snaps {
                self.reference(s.l1_table_offset, u64::from(s.l1_size) * 8);
                self.walk_l1(s.l1_table_offset, s.l1_size, false).await?;
            }
        }

        // Refcount table and blocks.
        let mut blocks: Vec<Option<u64>> = Vec::new();
        if self.count_refcounts {
            blocks = self.tally_refcount_structures().await?;
        }
        self.tally_bitmaps_and_luks().await?;
        Ok(blocks)
    }

    async fn tally_refcount_structures(&mut self) -> Result<Vec<Option<u64>>> {
        let h = self.header;
        let cs = self.geometry.cluster_size();
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        self.reference(h.refcount_table_offset, rt_len);
        let rt = self
            .read(h.refcount_table_offset, rt_len, "read refcount table")
            .await?;
        let mut blocks: Vec<Option<u64>> = Vec::with_capacity(rt.len() / 8);
        for (i, raw) in qblk_qcow2::decode_table(&rt).enumerate() {
            let e = RefcountTableEntry(raw);
            let at = h.refcount_table_offset + i as u64 * 8;
            let Some(off) = e.block_offset() else {
                blocks.push(None);
                continue;
            };
            if e.validate(&self.geometry, at).is_err() {
                self.report
                    .corruption(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                self.report.needs_rebuild = true;
                blocks.push(None);
                continue;
            }
            if off.0 >= self.file_len {
                self.report
                    .corruption(format!("ERROR refcount block {i} is outside image"));
                blocks.push(None);
                continue;
            }
            self.reference(off.0, cs);
            blocks.push(Some(off.0));
        }
        Ok(blocks)
    }

    async fn tally_bitmaps_and_luks(&mut self) -> Result<()> {
        let h = self.header;
        let cs = self.geometry.cluster_size();
        // Persistent bitmaps (only while the autoclear bit vouches for them).
        if let Some(ext) = h.bitmaps_extension() {
            self.reference(ext.bitmap_directory_offset, ext.bitmap_directory_size);
            let dir = self
                .read(
                    ext.bitmap_directory_offset,
                    ext.bitmap_directory_size,
                    "read bitmap directory",
                )
                .await?;
            match parse_bitmap_directory(&dir, ext, h.size, cs) {
                Ok(entries) => {
                    for e in entries {
                        let len = u64::from(e.bitmap_table_size) * 8;
                        self.reference(e.bitmap_table_offset, len);
                        if e.bitmap_table_offset.saturating_add(len) > self.file_len {
                            // Never allocate for a table the file cannot hold.
                            self.report.corruption(format!(
                                "ERROR bitmap table at {:#x} ({len} bytes) lies beyond the end of the image",
                                e.bitmap_table_offset
                            ));
                            continue;
                        }
                        let table = self
                            .read(e.bitmap_table_offset, len, "read bitmap table")
                            .await?;
                        for (i, raw) in qblk_qcow2::decode_table(&table).enumerate() {
                            match BitmapTableEntry::decode(
                                raw,
                                cs,
                                e.bitmap_table_offset + i as u64 * 8,
                            ) {
                                Ok(BitmapTableEntry::Allocated(o)) => self.reference(o.0, cs),
                                Ok(_) => {}
                                Err(err) => self.report.corruption(format!("ERROR {err}")),
                            }
                        }
                    }
                }
                Err(err) => self.report.corruption(format!("ERROR {err}")),
            }
        }

        // LUKS header.
        if let Some(p) = h.encryption_header() {
            self.reference(p.offset, p.length);
        }
        Ok(())
    }

    /// Compares the tally with the stored refcounts, then checks COPIED.
    ///
    /// Refcount blocks are read one at a time and each distinct block once,
    /// so memory stays bounded by one block plus the references, and work
    /// by the size of the file, whatever the refcount table claims.
    async fn compare(&mut self, blocks: Vec<Option<u64>>) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let order = g.refcount_order();
        let per_block = g.refcount_block_entries();
        let file_clusters = g.clusters_for(self.file_len);
        let end = file_clusters.max(self.tally.end());
        let external = self.header.has_external_data_file();

        // The stored refcounts the COPIED checks need, noted as blocks pass.
        let mut wanted: HashMap<u64, u64> = HashMap::new();
        for &(_, raw) in &self.active_l1 {
            wanted.insert(L1Entry(raw).l2_offset().map_or(0, |o| o.0) / cs, 0);
        }
        if !external {
            for &(host, _) in &self.active_data {
                wanted.insert(host / cs, 0);
            }
        }

        let mut highest: Option<u64> = None;
        let mut seen = std::collections::HashSet::new();
        for bi in 0..end.div_ceil(per_block) {
            let first = bi * per_block;
            let last = (first + per_block).min(end);
            let refs: Vec<(u64, u64)> = self.tally.range(first..last).collect();
            // A block listed twice is read once; the second listing counts
            // as no block (its clusters then show as corrupt).
            let block = blocks
                .get(bi as usize)
                .copied()
                .flatten()
                .filter(|b| seen.insert(*b));
            match block {
                Some(off) => {
                    let buf = self.read(off, cs, "read refcount block").await?;
                    let mut refs = refs.into_iter().peekable();
                    for c in first..last {
                        let stored = get_refcount(&buf, order, (c - first) as usize);
                        let referenced = match refs.peek() {
                            Some(&(rc, n)) if rc == c => {
                                refs.next();
                                n
                            }
                            _ => 0,
                        };
                        if let Some(w) = wanted.get_mut(&c) {
                            *w = stored;
                        }
                        self.record(c, stored, referenced, file_clusters, &mut highest);
                    }
                }
                None => {
                    for (c, referenced) in refs {
                        self.record(c, 0, referenced, file_clusters, &mut highest);
                    }
                }
            }
        }
        // Clusters past everything compared above (references past the end
        // of the file, which are not counted): their stored refcounts, for
        // the COPIED checks only, as qemu-img reads them.
        let mut beyond: Vec<u64> = wanted.keys().copied().filter(|&c| c >= end).collect();
        beyond.sort_unstable();
        let mut cached: Option<(u64, crate::buf::AlignedBuf)> = None;
        for c in beyond {
            let bi = c / per_block;
            let Some(off) = blocks.get(bi as usize).copied().flatten() else {
                continue;
            };
            if cached.as_ref().is_none_or(|(o, _)| *o != off) {
                cached = Some((off, self.read(off, cs, "read refcount block").await?));
            }
            if let (Some((_, buf)), Some(w)) = (cached.as_ref(), wanted.get_mut(&c)) {
                *w = get_refcount(buf, order, (c - bi * per_block) as usize);
            }
        }
        if !self.tally.out_of_range.is_empty() {
            self.report.corruption(format!(
                "ERROR {} references to clusters far beyond the end of the image (first: cluster {})",
                self.tally.out_of_range.len(),
                self.tally.out_of_range[0]
            ));
        }
        self.report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);

        // COPIED flags of the active tables against the stored refcounts.
        let refcount = |off: u64| wanted.get(&(off / cs)).copied().unwrap_or(0);
        for &(index, raw) in &self.active_l1 {
            let l2 = L1Entry(raw).l2_offset().map_or(0, |o| o.0);
            let rc = refcount(l2);
            if (rc == 1) != L1Entry(raw).copied() {
                self.report.corruption(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={raw:x} refcount={rc}"
                ));
            }
        }
        for &(host, word) in &self.active_data {
            let rc = if external { 1 } else { refcount(host) };
            if (rc == 1) != (word & qblk_qcow2::mapping::COPIED != 0) {
                self.report.corruption(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={word:x} refcount={rc}"
                ));
            }
        }
        Ok(())
    }

    /// Records how one cluster's stored refcount compares with its tally.
    fn record(
        &mut self,
        cluster: u64,
        stored: u64,
        referenced: u64,
        file_clusters: u64,
        highest: &mut Option<u64>,
    ) {
        if stored > 0 || referenced > 0 {
            *highest = Some(cluster);
        }
        match compare(cluster, stored, referenced) {
            None => {}
            Some(RefcountMismatch::Corruption { .. }) => {
                self.report.needs_rebuild |= stored == 0;
                self.report.corruption(format!(
                    "ERROR cluster {cluster} refcount={stored} reference={referenced}"
                ))
            }
            // Leaks only count within the file, as in qemu-img.
            Some(RefcountMismatch::Leak { .. }) if cluster < file_clusters => {
                self.report.leaks += 1;
                self.report.leaked.push((cluster, referenced));
                self.report.messages.push(format!(
                    "Leaked cluster {cluster} refcount={stored} reference={referenced}"
                ));
            }
            Some(RefcountMismatch::Leak { .. }) => {}
        }
    }

    async fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        if l1_offset.saturating_add(u64::from(l1_size) * 8) > self.file_len.next_multiple_of(cs) {
            self.report.corruption(format!(
                "ERROR L1 table at {l1_offset:#x} ({l1_size} entries) lies beyond the end of the image"
            ));
            return Ok(());
        }
        let l1 = self
            .read(l1_offset, u64::from(l1_size) * 8, "read L1 table")
            .await?;
        for (i, raw) in qblk_qcow2::decode_table(&l1).enumerate() {
            let entry = L1Entry(raw);
            let Some(l2_offset) = entry.l2_offset() else {
                continue;
            };
            if let Err(e) = entry.validate(&g, l1_offset + i as u64 * 8) {
                self.report.corruption(format!(
                    "ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted ({e})",
                    l2_offset.0
                ));
                continue;
            }
            self.reference(l2_offset.0, cs);
            if active {
                self.active_l1.push((i, raw));
            }
            if l2_offset.0 >= self.file_len {
                continue; // shows up as a refcount corruption
            }
            let table = self.read(l2_offset.0, cs, "read L2 table").await?;
            let mut next_contiguous = 0u64;
            for j in 0..g.l2_entries() as usize {
                let e = L2Entry::read(&table, &g, j).expect("index within table");
                let at = l2_offset.0 + j as u64 * g.l2_entry_size();
                let d = match e.decode(
                    &g,
                    self.header.is_v3(),
                    self.header.has_external_data_file(),
                    at,
                ) {
                    Ok(d) => d,
                    Err(err) => {
                        self.report.corruption(format!("ERROR {err}"));
                        continue;
                    }
                };
                match d {
                    ClusterDescriptor::Compressed { host, len } => {
                        self.reference(host.0, len);
                        if active {
                            self.report.allocated_clusters += 1;
                            self.report.compressed_clusters += 1;
                            // Compressed clusters are fragmented by nature.
                            self.report.fragmented_clusters += 1;
                        }
                    }
                    ClusterDescriptor::Standard { host, .. }
                    | ClusterDescriptor::Zero {
                        preallocated: Some(host),
                        ..
                    } => {
                        if active {
                            self.report.allocated_clusters += 1;
                            if next_contiguous != 0 && host.0 != next_contiguous {
                                self.report.fragmented_clusters += 1;
                            }
                            next_contiguous = host.0 + cs;
                            self.active_data.push((host.0, e.word));
                        }
                        if !self.header.has_external_data_file() {
                            self.reference(host.0, cs);
                        }
                    }
                    ClusterDescriptor::Zero {
                        preallocated: None, ..
                    }
                    | ClusterDescriptor::Unallocated
                    | ClusterDescriptor::UnallocatedSubclusters { .. } => {}
                }
            }
        }
        Ok(())
    }
}

/// What `repair` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Lower the refcounts of leaked clusters to their references.
    Leaks,
    /// Rebuild the whole refcount structure from the references, and make
    /// the active tables' COPIED flags agree with it.
    All,
}

/// The check before and after a repair.
#[derive(Debug, Clone)]
pub struct RepairOutcome {
    pub before: CheckReport,
    pub after: CheckReport,
}

/// Repairs the image at `path` (qemu-img check -r). Corruption that is not
/// about refcounts (a malformed table entry) is reported, never "fixed".
///
/// The image is locked as a writer for the whole repair (qemu-img check -r
/// does the same): the checks before and after share with that lock only.
pub async fn repair(path: &Path, mode: RepairMode) -> Result<RepairOutcome> {
    if crate::journal::pending(path) {
        // A writer died with its crash journal live: what it acknowledged
        // goes in first (a writable open replays it, or drops a journal
        // that may not be replayed), so the repair works on the image the
        // guest saw, and no later replay meets an image repaired without
        // it.
        let opts = crate::image::OpenOptions {
            writable: true,
            backing: crate::image::BackingPolicy {
                allow_any_dir: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let img = crate::image::Image::open(path, &opts).await?;
        img.close().await?;
    }
    let guard = HostFile::open(path, true, CacheMode::None).map_err(io(path, "open"))?;
    crate::lock::lock_image(&guard, path, Access::WRITER)?;
    let before = check(path, CacheMode::None, true).await?;
    let needs = match mode {
        // Leaks are not lowered beside damage only a rebuild repairs
        // (qemu-img check -r leaks fails then).
        RepairMode::Leaks => before.leaks > 0 && !before.needs_rebuild,
        RepairMode::All => before.leaks > 0 || before.corruptions > 0,
    };
    if needs {
        match mode {
            RepairMode::Leaks => fix_leaks(&guard, path, &before).await?,
            // Leaks alone are fixed in place; anything else rebuilds.
            RepairMode::All if before.corruptions == 0 => fix_leaks(&guard, path, &before).await?,
            RepairMode::All => rebuild_with(&guard, path).await?,
        }
    }
    let after = check(path, CacheMode::None, true).await?;
    if after.corruptions == 0 && after.check_errors == 0 {
        // As qemu-img check -r: an image found consistent after the
        // repair is no longer corrupt (nor dirty), and writable again.
        mark_consistent(&guard, path).await?;
    }
    Ok(RepairOutcome { before, after })
}

/// Clears the corrupt and dirty bits of an image found consistent, durably.
async fn mark_consistent(file: &HostFile, path: &Path) -> Result<()> {
    use qblk_qcow2::header::IncompatibleFeatures;
    let (mut header, _) = read_header(file, path).await?;
    let bits = IncompatibleFeatures::CORRUPT | IncompatibleFeatures::DIRTY;
    if !header.incompatible_features.intersects(bits) {
        return Ok(());
    }
    header.incompatible_features.remove(bits);
    let mut commit = Commit::new(End::Durable);
    let _ = commit.write("write header", 0, header_buf(path, &header)?);
    commit.run(repair_files(file)).await?;
    Ok(())
}

async fn fix_leaks(file: &HostFile, path: &Path, report: &CheckReport) -> Result<()> {
    let (header, _) = read_header(file, path).await?;
    let g = header.geometry();
    let cs = g.cluster_size();
    let rt = file
        .read(
            header.refcount_table_offset,
            (u64::from(header.refcount_table_clusters) * cs) as usize,
        )
        .await
        .map_err(io(path, "read refcount table"))?;
    let mut blocks: HashMap<u64, crate::buf::AlignedBuf> = HashMap::new();
    for &(cluster, referenced) in &report.leaked {
        let index = g.refcount_table_index(qblk_qcow2::HostCluster(cluster)) as usize;
        let Some(raw) = rt.get(index * 8..index * 8 + 8) else {
            continue;
        };
        let raw = qblk_qcow2::decode_table(raw).next().unwrap_or(0);
        let Some(block) = RefcountTableEntry(raw).block_offset() else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(v) = blocks.entry(block.0) {
            v.insert(
                file.read(block.0, cs as usize)
                    .await
                    .map_err(io(path, "read refcount block"))?,
            );
        }
        let b = blocks.get_mut(&block.0).expect("inserted");
        qblk_qcow2::refcount::set_refcount(
            b,
            g.refcount_order(),
            g.refcount_block_index(qblk_qcow2::HostCluster(cluster)),
            referenced,
        )
        .expect("lowering a refcount always fits");
    }
    // The lowered refcounts, all at once, durable before this returns.
    let mut c = Commit::new(End::Durable);
    for (off, b) in blocks {
        let _ = c.write("write refcount block", off, b);
    }
    c.run(repair_files(file)).await?;
    Ok(())
}

/// The files a repair commits to: the image alone (its guest data is not
/// touched).
fn repair_files(file: &HostFile) -> Files<'_> {
    Files {
        image: file,
        data: None,
        counters: None,
    }
}

/// Writes a new refcount table and blocks past everything in use, from the
/// references alone, switches the header to them (clearing the dirty bit),
/// then fixes the active tables' COPIED flags. Each step is durable before
/// the next, so a crash leaves either the old structure or the new one.
pub(crate) async fn rebuild_refcounts(path: &Path) -> Result<()> {
    let file = HostFile::open(path, true, CacheMode::None).map_err(io(path, "open"))?;
    crate::lock::lock_image(&file, path, Access::WRITER)?;
    rebuild_with(&file, path).await
}

/// [`rebuild_refcounts`] on an image open (and locked) for writing.
async fn rebuild_with(file: &HostFile, path: &Path) -> Result<()> {
    rebuild_with_order(file, path, None).await
}

/// [`rebuild_with`], writing refcounts `1 << order` bits wide when
/// `order` is given (qemu-img amend -o refcount_bits); the header names the
/// new width with the new structure, in one write.
pub(crate) async fn rebuild_with_order(
    file: &HostFile,
    path: &Path,
    order: Option<u32>,
) -> Result<()> {
    let (mut header, file_len) = read_header(file, path).await?;
    let g = header.geometry();
    let cs = g.cluster_size();
    let mut c = Checker {
        file,
        header: &header,
        geometry: g,
        file_len,
        tally: RefcountTally::new(&g, file_len, TALLY_SLACK_CLUSTERS),
        report: CheckReport::default(),
        active_l1: Vec::new(),
        active_data: Vec::new(),
        count_refcounts: false,
    };
    c.tally_all().await?;
    if !c.tally.out_of_range.is_empty() {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            what: "references far beyond the end of the image: refusing to rebuild refcounts"
                .into(),
        });
    }
    let Checker {
        tally,
        active_l1,
        active_data,
        ..
    } = c;
    // The new structure's geometry (its refcount width may change).
    if let Some(order) = order {
        header.refcount_order = order;
    }
    let g = header.geometry();

    // Layout: [end, end + rt) table, then nb blocks; blocks cover
    // everything from cluster 0 through themselves.
    let end = tally.end().max(g.clusters_for(file_len));
    let per_block = g.refcount_block_entries();
    let layout = qblk_qcow2::refcount::refcount_layout(
        &g,
        qblk_qcow2::HostCluster(0),
        qblk_qcow2::ClusterCount(end),
        Some(0),
        |_| false,
    )
    .ok_or_else(|| Error::Unsupported {
        path: path.to_owned(),
        what: "rebuilt refcount table would exceed 8 MiB".into(),
    })?;
    let (rt, nb) = (layout.table_clusters.0, layout.new_blocks.len() as u64);
    let total = end + rt + nb;
    let first_block = end + rt;
    let max = g.refcount_max();
    let mut commit = Commit::new(End::Durable);
    let mut block_ids = Vec::new();
    for b in 0..nb {
        let mut buf = crate::buf::AlignedBuf::zeroed(cs as usize);
        for i in 0..per_block {
            let cluster = b * per_block + i;
            if cluster >= total {
                break;
            }
            let value = if cluster >= end {
                1
            } else {
                tally.get(cluster)
            };
            if value > max {
                let what = match order {
                    // qemu-img amend's words.
                    Some(o) => format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {value}",
                        1u32 << o,
                        cluster * cs
                    ),
                    None => format!(
                        "cluster {cluster} has {value} references, more than refcount_bits allow"
                    ),
                };
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    what,
                });
            }
            qblk_qcow2::refcount::set_refcount(&mut buf, g.refcount_order(), i as usize, value)
                .expect("checked against max");
        }
        block_ids.push(commit.write("write refcount block", (first_block + b) * cs, buf));
    }
    let mut table = crate::buf::AlignedBuf::zeroed((rt * cs) as usize);
    qblk_qcow2::encode_table(
        (0..nb).map(|b| RefcountTableEntry::new(qblk_qcow2::HostOffset((first_block + b) * cs)).0),
        &mut table,
    );
    block_ids.push(commit.write("write refcount table", end * cs, table));

    // The header switches to them once they are durable, and its dirty bit
    // goes with the old refcounts.
    header.refcount_table_offset = end * cs;
    header.refcount_table_clusters = u32::try_from(rt).expect("bounded by 8 MiB");
    header
        .incompatible_features
        .remove(qblk_qcow2::header::IncompatibleFeatures::DIRTY);
    let h = commit.write("write header", 0, header_buf(path, &header)?);
    commit.after_all(h, &block_ids, Edge::Durable);
    commit.run(repair_files(file)).await?;

    // COPIED flags of the active tables, from the new refcounts: one more
    // commit, after the switch (a crash before it leaves flags that only
    // cost copy-on-write, which check reports and the next rebuild fixes).
    let mut fixes_commit = Commit::new(End::Durable);
    let external = header.has_external_data_file();
    for (index, raw) in active_l1 {
        let entry = L1Entry(raw);
        let l2 = entry.l2_offset().map_or(0, |o| o.0);
        let want = tally.get(l2 / cs) == 1;
        if want != entry.copied() {
            let fixed = L1Entry::new(qblk_qcow2::HostOffset(l2), want);
            let mut entry = crate::buf::AlignedBuf::zeroed(8);
            qblk_qcow2::encode_table([fixed.0], &mut entry);
            let _ = fixes_commit.write(
                "write L1 entry",
                header.l1_table_offset + index as u64 * 8,
                entry,
            );
        }
    }
    let copied_bit = qblk_qcow2::mapping::COPIED;
    let mut fixes: HashMap<u64, bool> = HashMap::new();
    for (host, word) in active_data {
        let want = external || tally.get(host / cs) == 1;
        if want != (word & copied_bit != 0) {
            fixes.insert(host, want);
        }
    }
    if !fixes.is_empty() {
        // Find the entries again: walk the active tables and patch words.
        let l1 = file
            .read(header.l1_table_offset, header.l1_size as usize * 8)
            .await
            .map_err(io(path, "read L1 table"))?;
        for raw in qblk_qcow2::decode_table(&l1) {
            let Some(l2) = L1Entry(raw).l2_offset() else {
                continue;
            };
            let mut table = file
                .read(l2.0, cs as usize)
                .await
                .map_err(io(path, "read L2 table"))?;
            let mut changed = false;
            for j in 0..g.l2_entries() as usize {
                let mut e = L2Entry::read(&table, &g, j).expect("index within table");
                if e.is_compressed() {
                    continue;
                }
                let host = e.word & qblk_qcow2::types::HOST_OFFSET_MASK;
                if let Some(&want) = fixes.get(&host) {
                    if host == 0 && !external {
                        continue;
                    }
                    e.word = if want {
                        e.word | copied_bit
                    } else {
                        e.word & !copied_bit
                    };
                    e.write(&mut table, &g, j);
                    changed = true;
                }
            }
            if changed {
                let _ = fixes_commit.write("write L2 table", l2.0, table);
            }
        }
    }
    fixes_commit.run(repair_files(file)).await?;
    Ok(())
}
