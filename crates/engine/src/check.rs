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
use qblk_qcow2::error::Problem;
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry};
use qblk_qcow2::refcount::{RefcountTableEntry, get_refcount};
use qblk_qcow2::snapshot::{MAX_SNAPSHOT_TABLE_BYTES, parse_snapshot_table};
use qblk_qcow2::tally::{RefcountMismatch, RefcountTally, compare};
use qblk_qcow2::{Geometry, Header};

use crate::file::{CacheMode, HostFile};
use crate::image::{Error, Result};

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
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Checks the image at `path`. An `Err` means the image could not be
/// checked at all (qemu-img's exit code 1).
pub async fn check(path: &Path, cache: CacheMode) -> Result<CheckReport> {
    let file = HostFile::open(path, false, cache).map_err(io(path, "open"))?;
    let file_len = file.file_len().map_err(io(path, "stat"))?;
    let head = file
        .read(0, file_len.min(Header::MAX_READ_BYTES as u64) as usize)
        .await
        .map_err(io(path, "read header"))?;
    let header = Header::parse(&head).map_err(|source| Error::Format {
        path: path.to_owned(),
        source,
    })?;
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
    };
    c.run(path).await?;
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

    async fn run(&mut self, path: &Path) -> Result<()> {
        let h = self.header;
        let cs = self.geometry.cluster_size();
        self.tally.reference(0, cs);

        // Active L1 table and everything below it.
        self.tally
            .reference(h.l1_table_offset, u64::from(h.l1_size) * 8);
        self.walk_l1(h.l1_table_offset, h.l1_size, true).await?;

        // Internal snapshots.
        if h.nb_snapshots > 0 {
            let mut want = 64u64 << 10;
            let (snaps, len) = loop {
                let buf = self
                    .read(h.snapshots_offset, want, "read snapshot table")
                    .await?;
                match parse_snapshot_table(&buf, h.snapshots_offset, h.nb_snapshots, cs) {
                    Ok(r) => break r,
                    Err(e)
                        if matches!(e.problem, Problem::Truncated { .. })
                            && want < MAX_SNAPSHOT_TABLE_BYTES
                            && h.snapshots_offset + want < self.file_len =>
                    {
                        want = (want * 4).min(MAX_SNAPSHOT_TABLE_BYTES);
                    }
                    Err(source) => {
                        return Err(Error::Format {
                            path: path.to_owned(),
                            source,
                        });
                    }
                }
            };
            self.tally.reference(h.snapshots_offset, len);
            for s in &snaps {
                self.tally
                    .reference(s.l1_table_offset, u64::from(s.l1_size) * 8);
                self.walk_l1(s.l1_table_offset, s.l1_size, false).await?;
            }
        }

        // Refcount table and blocks.
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        self.tally.reference(h.refcount_table_offset, rt_len);
        let rt = self
            .read(h.refcount_table_offset, rt_len, "read refcount table")
            .await?;
        let mut blocks: Vec<Option<u64>> = Vec::with_capacity(rt.len() / 8);
        for (i, raw) in rt.chunks_exact(8).enumerate() {
            let e = RefcountTableEntry(u64::from_be_bytes(raw.try_into().expect("8 bytes")));
            let at = h.refcount_table_offset + i as u64 * 8;
            let Some(off) = e.block_offset() else {
                blocks.push(None);
                continue;
            };
            if e.validate(&self.geometry, at).is_err() {
                self.report
                    .corruption(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                blocks.push(None);
                continue;
            }
            if off.0 >= self.file_len {
                self.report
                    .corruption(format!("ERROR refcount block {i} is outside image"));
                blocks.push(None);
                continue;
            }
            self.tally.reference(off.0, cs);
            blocks.push(Some(off.0));
        }

        // Persistent bitmaps (only while the autoclear bit vouches for them).
        if let Some(ext) = h.bitmaps_extension() {
            self.tally
                .reference(ext.bitmap_directory_offset, ext.bitmap_directory_size);
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
                        self.tally.reference(e.bitmap_table_offset, len);
                        let table = self
                            .read(e.bitmap_table_offset, len, "read bitmap table")
                            .await?;
                        for (i, raw) in table.chunks_exact(8).enumerate() {
                            let raw = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                            match BitmapTableEntry::decode(
                                raw,
                                cs,
                                e.bitmap_table_offset + i as u64 * 8,
                            ) {
                                Ok(BitmapTableEntry::Allocated(o)) => self.tally.reference(o.0, cs),
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
            self.tally.reference(p.offset, p.length);
        }

        // Compare with the stored refcounts.
        let order = self.geometry.refcount_order();
        let mut block_cache: HashMap<u64, crate::buf::AlignedBuf> = HashMap::new();
        let file_clusters = self.geometry.clusters_for(self.file_len);
        let end = file_clusters.max(self.tally.len());
        let mut highest: Option<u64> = None;
        // Only the blocks covering clusters that are compared: memory stays
        // proportional to the file, whatever the refcount table claims.
        let needed = end.div_ceil(self.geometry.refcount_block_entries()) as usize;
        for &block in blocks.iter().take(needed).flatten() {
            if let std::collections::hash_map::Entry::Vacant(v) = block_cache.entry(block) {
                v.insert(self.read(block, cs, "read refcount block").await?);
            }
        }
        let geometry = self.geometry;
        let stored_refcount = |cluster: u64| -> u64 {
            let c = qblk_qcow2::HostCluster(cluster);
            match blocks
                .get(geometry.refcount_table_index(c) as usize)
                .copied()
                .flatten()
            {
                Some(block) => block_cache.get(&block).map_or(0, |b| {
                    get_refcount(b, order, geometry.refcount_block_index(c))
                }),
                None => 0,
            }
        };
        for cluster in 0..end {
            let stored = stored_refcount(cluster);
            let referenced = self.tally.get(cluster);
            if stored > 0 || referenced > 0 {
                highest = Some(cluster);
            }
            match compare(cluster, stored, referenced) {
                None => {}
                Some(RefcountMismatch::Corruption { .. }) => self.report.corruption(format!(
                    "ERROR cluster {cluster} refcount={stored} reference={referenced}"
                )),
                // Leaks only count within the file, as in qemu-img.
                Some(RefcountMismatch::Leak { .. }) if cluster < file_clusters => {
                    self.report.leaks += 1;
                    self.report.messages.push(format!(
                        "Leaked cluster {cluster} refcount={stored} reference={referenced}"
                    ));
                }
                Some(RefcountMismatch::Leak { .. }) => {}
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
        let refcount = |off: u64| stored_refcount(off >> geometry.cluster_bits());
        for &(index, raw) in &self.active_l1 {
            let l2 = L1Entry(raw).l2_offset().map_or(0, |o| o.0);
            let rc = refcount(l2);
            if (rc == 1) != L1Entry(raw).copied() {
                self.report.corruption(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={raw:x} refcount={rc}"
                ));
            }
        }
        let data_file = h.has_external_data_file();
        for &(host, word) in &self.active_data {
            let rc = if data_file { 1 } else { refcount(host) };
            if (rc == 1) != (word & qblk_qcow2::mapping::COPIED != 0) {
                self.report.corruption(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={word:x} refcount={rc}"
                ));
            }
        }
        Ok(())
    }

    async fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let l1 = self
            .read(l1_offset, u64::from(l1_size) * 8, "read L1 table")
            .await?;
        for (i, raw) in l1.chunks_exact(8).enumerate() {
            let raw = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
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
            self.tally.reference(l2_offset.0, cs);
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
                        self.tally.reference(host.0, len);
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
                            self.tally.reference(host.0, cs);
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
