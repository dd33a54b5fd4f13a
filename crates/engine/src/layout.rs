//! Where an image's metadata lies, as found when it is opened for writing.
//!
//! A damaged image can point one structure at another: a refcount table
//! entry naming the L1 table, an L1 entry naming the refcount table, an L2
//! entry sending guest data onto an L2 table, or a refcount of 0 on a
//! cluster that holds metadata (which the allocator would then hand out).
//! Any write through such a pointer destroys the image. The engine maps
//! every metadata cluster once, at open, and
//!
//! - refuses to open the image for writing when two structures claim the
//!   same cluster, or a refcount block lies past the end of the file;
//! - never allocates a cluster of the map, whatever its refcount says;
//! - refuses guest data aimed at one (see `check_data_target`).
//!
//! Metadata the engine allocates later comes from the allocator, with its
//! refcount set, so the map does not need to follow it. Clusters of the map
//! freed while the image is open (an old refcount table after it grew) are
//! not reused until the next open: a few leaked clusters, never a write
//! over metadata. This is QEMU's metadata overlap check (qcow2.c,
//! "overlap-check"), done once for what the file holds instead of on every
//! metadata write.

use std::collections::HashMap;

use qblk_qcow2::error::{FormatError, Problem};
use qblk_qcow2::mapping::L1Entry;
use qblk_qcow2::snapshot::{
    SNAPSHOT_TABLE_FIRST_READ, SnapshotEntry, next_snapshot_table_read, parse_snapshot_table,
};
use qblk_qcow2::{Geometry, Header};

use crate::file::HostFile;
use crate::image::{Error, Result};

/// What a metadata cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Header,
    L1,
    RefcountTable,
    RefcountBlock,
    /// An L2 table (active, or a snapshot's; they may be shared).
    L2,
    SnapshotTable,
    SnapshotL1,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Header => "the image header",
            Kind::L1 => "the L1 table",
            Kind::RefcountTable => "the refcount table",
            Kind::RefcountBlock => "a refcount block",
            Kind::L2 => "an L2 table",
            Kind::SnapshotTable => "the snapshot table",
            Kind::SnapshotL1 => "a snapshot's L1 table",
        }
    }
}

/// The metadata clusters of an image at open, by cluster index.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    clusters: HashMap<u64, Kind>,
}

impl MetaMap {
    /// What cluster `cluster` (an index) held at open, if metadata.
    pub(crate) fn kind(&self, cluster: u64) -> Option<Kind> {
        self.clusters.get(&cluster).copied()
    }

    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, cluster: u64, kind: Kind) {
        self.clusters.insert(cluster, kind);
    }

    /// Marks `len` bytes from `offset` as `kind`; a cluster already
    /// claimed by another kind is an overlap, reported against `field` at
    /// file offset `at`. Returns the clusters claimed for the first time.
    fn claim(
        &mut self,
        g: &Geometry,
        offset: u64,
        len: u64,
        kind: Kind,
        field: &'static str,
        at: u64,
    ) -> std::result::Result<Vec<u64>, FormatError> {
        let mut fresh = Vec::new();
        if len == 0 {
            return Ok(fresh);
        }
        let cs = g.cluster_size();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| FormatError::new(field, at, Problem::Overflow))?;
        for c in offset / cs..end.div_ceil(cs) {
            match self.clusters.insert(c, kind) {
                Some(old) if old != kind => {
                    return Err(FormatError::new(
                        field,
                        at,
                        Problem::Overlaps {
                            offset: c * cs,
                            what: old.name(),
                        },
                    ));
                }
                Some(_) => {}
                None => fresh.push(c),
            }
        }
        Ok(fresh)
    }

    /// Maps the metadata of the image in `file`: header, L1 table, refcount
    /// table (whose entries are `refcount_table`) and blocks, L2 tables,
    /// snapshot table and the snapshots' L1 and L2 tables.
    pub(crate) async fn build(
        file: &HostFile,
        header: &Header,
        g: &Geometry,
        l1: &[L1Entry],
        refcount_table: &[u64],
        file_len: u64,
    ) -> Result<MetaMap> {
        let path = file.path().to_owned();
        let format = |source| Error::Format {
            path: path.clone(),
            source,
        };
        let cs = g.cluster_size();
        let mut m = MetaMap::default();
        m.claim(g, 0, cs, Kind::Header, "header", 0)
            .map_err(format)?;
        m.claim(
            g,
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            Kind::L1,
            "header.l1_table_offset",
            40,
        )
        .map_err(format)?;
        m.claim(
            g,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
            Kind::RefcountTable,
            "header.refcount_table_offset",
            48,
        )
        .map_err(format)?;
        let snapshots = read_snapshot_table(file, header, cs, file_len).await?;
        if let Some((_, len)) = &snapshots {
            m.claim(
                g,
                header.snapshots_offset,
                *len,
                Kind::SnapshotTable,
                "header.snapshots_offset",
                64,
            )
            .map_err(format)?;
        }
        for (i, &entry) in refcount_table.iter().enumerate() {
            if entry == 0 {
                continue;
            }
            let at = header.refcount_table_offset + i as u64 * 8;
            if entry >= file_len {
                return Err(format(FormatError::new(
                    "refcount_table.entry",
                    at,
                    Problem::PastEndOfFile {
                        value: entry,
                        file_len,
                    },
                )));
            }
            m.claim(
                g,
                entry,
                cs,
                Kind::RefcountBlock,
                "refcount_table.entry",
                at,
            )
            .map_err(format)?;
        }
        for (i, e) in l1.iter().enumerate() {
            if let Some(l2) = e.l2_offset() {
                let at = header.l1_table_offset + i as u64 * 8;
                m.claim(g, l2.0, cs, Kind::L2, "l1_table.entry", at)
                    .map_err(format)?;
            }
        }
        // Snapshot L1 tables may share clusters (a hostile table can name
        // one 32 MiB table 65536 times); each cluster is read once, so the
        // work is bounded by the file's size.
        for s in snapshots.iter().flat_map(|(s, _)| s) {
            let len = u64::from(s.l1_size) * 8;
            let table_end = s.l1_table_offset.saturating_add(len);
            let fresh = m
                .claim(
                    g,
                    s.l1_table_offset,
                    len,
                    Kind::SnapshotL1,
                    "snapshot.l1_table_offset",
                    header.snapshots_offset,
                )
                .map_err(format)?;
            for c in fresh {
                let start = (c * cs).max(s.l1_table_offset);
                let end = ((c + 1) * cs).min(table_end);
                if end > file_len {
                    continue; // qblk check reports it; nothing of it to map
                }
                let bytes = file
                    .read(start, (end - start) as usize)
                    .await
                    .map_err(Error::io(&path, "read snapshot L1 table", start))?;
                for (i, raw) in qblk_qcow2::decode_table(&bytes).enumerate() {
                    let e = L1Entry(raw);
                    if let Some(l2) = e.l2_offset() {
                        let at = start + i as u64 * 8;
                        m.claim(g, l2.0, cs, Kind::L2, "snapshot_l1_table.entry", at)
                            .map_err(format)?;
                    }
                }
            }
        }
        Ok(m)
    }
}

/// Reads and parses the snapshot table: the entries and the table's length
/// in bytes, or `None` when the image has no snapshots.
pub(crate) async fn read_snapshot_table(
    file: &HostFile,
    h: &Header,
    cluster_size: u64,
    file_len: u64,
) -> Result<Option<(Vec<SnapshotEntry>, u64)>> {
    if h.nb_snapshots == 0 {
        return Ok(None);
    }
    let mut want = SNAPSHOT_TABLE_FIRST_READ;
    loop {
        let buf = file
            .read(h.snapshots_offset, want as usize)
            .await
            .map_err(Error::io(
                file.path(),
                "read snapshot table",
                h.snapshots_offset,
            ))?;
        match parse_snapshot_table(&buf, h.snapshots_offset, h.nb_snapshots, cluster_size) {
            // Zeros read past the end would parse as empty snapshots. (The
            // table's last entry may end short of its 8-byte padding: QEMU
            // writes it unpadded at the end of the file.)
            Ok(_) if h.snapshots_offset >= file_len => {
                return Err(Error::Format {
                    path: file.path().to_owned(),
                    source: FormatError::new(
                        "header.snapshots_offset",
                        64,
                        Problem::PastEndOfFile {
                            value: h.snapshots_offset,
                            file_len,
                        },
                    ),
                });
            }
            Ok(r) => return Ok(Some(r)),
            Err(e) if matches!(e.problem, Problem::Truncated { .. }) => {
                match next_snapshot_table_read(want, file_len.saturating_sub(h.snapshots_offset)) {
                    Some(more) => want = more,
                    None => {
                        return Err(Error::Format {
                            path: file.path().to_owned(),
                            source: e,
                        });
                    }
                }
            }
            Err(source) => {
                return Err(Error::Format {
                    path: file.path().to_owned(),
                    source,
                });
            }
        }
    }
}
