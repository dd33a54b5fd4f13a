//! Growing and shrinking the virtual disk.
//!
//! A resize changes memory only, under the allocator lock: a larger L1
//! table, when needed, gets a run of clusters past everything in use (its
//! refcounts with it), and the header the allocator wants names it and the
//! new size. The writeback that follows, with the commit lock held
//! throughout, writes the new table after the L2 tables it names and
//! switches the header once it is durable; the old table is freed after
//! that. Guest requests see the new size only when the switch is durable.
//!
//! A shrink first deallocates every whole cluster past the new end (their
//! references are dropped with the tables that named them, as for any
//! discard) and makes that durable; then, in memory, the L1 table loses
//! its entries past the new size, the L2 tables they named and the L1
//! table's own surplus clusters are released, and the header wants the
//! new size and L1 length. The writeback writes the shortened L1 table in
//! place and then the header; the released clusters are freed only once
//! that is durable (invariant 3). Entries past `l1_size` left in the old
//! table's clusters are never read again. Last, refcount blocks that
//! count nothing (but perhaps themselves) leave the refcount table, which
//! is written in place; a block counted elsewhere is freed after that.

use qblk_qcow2::mapping::L1Entry;
use qblk_qcow2::{ClusterCount, HostCluster, HostOffset};

use crate::error::{Error, Result};
use crate::image::Image;

impl Image {
    pub(super) async fn resize_inner(&self, new_size: u64) -> Result<()> {
        let old_size = self.size();
        let w = self.check_writable(0, 0)?;
        let refuse = |what: String| Error::Unsupported {
            path: self.path().to_owned(),
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
        let g = self.geometry();
        let entries = g.l1_entries_for(new_size);
        if entries > qblk_qcow2::types::MAX_L1_TABLE_BYTES / 8 {
            return Err(refuse(format!(
                "{new_size} bytes need an L1 table larger than 32 MiB"
            )));
        }
        // One resize (and its commit) at a time.
        let mut synced = w.commit.lock().await;
        if let Some(f) = self.data_file() {
            // A data file longer than the disk reads as zeros past it.
            f.set_len(new_size)
                .await
                .map_err(Error::io(f.path(), "resize data file", new_size))?;
        }
        w.with_alloc(self, |a, _| {
            let old_len = self.lock_tables().l1.len() as u64;
            if entries > old_len {
                let clusters = ClusterCount(g.clusters_for(entries * 8));
                let start = a.rc.alloc_run(&mut a.header, clusters)?;
                let new_offset = start.0 * g.cluster_size();
                let mut t = self.lock_tables();
                let old = (
                    HostOffset(t.l1_offset),
                    ClusterCount(g.clusters_for(old_len * 8)),
                );
                match a.l1_replaced {
                    // Moved before, not written yet: free that one with the
                    // next writeback; the one on disk is still the old one.
                    Some(_) => a.rc.release(g.host_cluster(old.0), old.1),
                    None => a.l1_replaced = Some(old),
                }
                t.l1.resize(entries as usize, L1Entry::UNALLOCATED);
                t.l1_offset = new_offset;
                t.l1_dirty = true;
                a.header.l1_table_offset = new_offset;
                a.header.l1_size = u32::try_from(entries).expect("bounded by the 32 MiB limit");
            }
            a.header.size = new_size;
            Ok(())
        })
        .await?;
        w.writeback_locked(self, &mut synced, false).await?;
        // The bitmaps cover the new granules before a write can reach them.
        w.bitmaps.resize(new_size);
        self.set_size(new_size);
        Ok(())
    }

    pub(super) async fn shrink_inner(&self, new_size: u64) -> Result<()> {
        let old_size = self.size();
        let w = self.check_writable(0, 0)?;
        let refuse = |what: String| Error::Unsupported {
            path: self.path().to_owned(),
            what,
        };
        if new_size % 512 != 0 {
            return Err(refuse(format!(
                "new size {new_size} is not a multiple of 512 bytes"
            )));
        }
        if new_size > old_size {
            return Err(refuse(format!(
                "{new_size} bytes is larger than the disk ({old_size} bytes): grow it instead"
            )));
        }
        if self.header().has_external_data_file() {
            return Err(refuse(
                "shrinking an image with an external data file is not supported".into(),
            ));
        }
        let g = self.geometry();
        let cs = g.cluster_size();
        let from = new_size.next_multiple_of(cs);
        if from < old_size {
            self.discard_inner(from, old_size - from, true).await?;
        }
        let mut synced = w.commit.lock().await;
        // Everything above durable, and no table moved in memory only.
        w.writeback_locked(self, &mut synced, false).await?;
        let entries = g.l1_entries_for(new_size);
        w.with_alloc(self, |a, _| {
            if a.l1_replaced.is_some() {
                return Err(crate::write::Miss::Fail(refuse(
                    "the L1 table moved and is not written yet".into(),
                )));
            }
            let mut t = self.lock_tables();
            let old_len = t.l1.len() as u64;
            if entries < old_len {
                let dropped: Vec<u64> =
                    t.l1.drain(entries as usize..)
                        .filter_map(|e| e.l2_offset())
                        .map(|o| o.0)
                        .collect();
                for off in dropped {
                    // Its entries past the new end were deallocated above;
                    // the table itself goes with the L1 entry.
                    t.l2_dirty.remove(&off);
                    t.l2_clean.pop(&off);
                    t.forget_slices(off);
                    a.rc.release(g.host_cluster(HostOffset(off)), ClusterCount(1));
                }
                let old_clusters = g.clusters_for(old_len * 8).max(1);
                let new_clusters = g.clusters_for(entries * 8).max(1);
                if old_clusters > new_clusters {
                    let first = g.host_cluster(HostOffset(t.l1_offset)).0 + new_clusters;
                    a.rc.release(
                        HostCluster(first),
                        ClusterCount(old_clusters - new_clusters),
                    );
                }
                t.l1_dirty = entries > 0;
                a.header.l1_size = u32::try_from(entries).expect("smaller than before");
            }
            a.header.size = new_size;
            Ok(())
        })
        .await?;
        w.writeback_locked(self, &mut synced, false).await?;
        // The bitmaps lose the granules past the new end.
        w.bitmaps.resize(new_size);
        self.set_size(new_size);
        // Refcount blocks that count nothing any more leave the table (the
        // file can then be cut before them). Blocks with decrements still
        // in memory (lazy refcounts) are judged by what memory says.
        let len = w.lock_alloc().rc.table_len();
        let mut dropped = false;
        for index in 0..len {
            dropped |= w
                .with_alloc(self, |a, _| a.rc.drop_block_if_unused(index))
                .await?;
        }
        if dropped {
            w.writeback_locked(self, &mut synced, false).await?;
        }
        Ok(())
    }
}
