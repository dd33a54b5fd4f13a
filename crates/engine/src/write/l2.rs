//! L2 updates: publishing an entry (copying a table shared with a
//! snapshot first), write-zeroes, discard and compressed writes.
//!
//! Entries change in memory, under the allocator lock; the tables reach the
//! disk with the next writeback. A reference an entry drops is released
//! only once the table without it is durable (see `writeback.rs`).

use std::sync::Arc;

use qblk_qcow2::header::CryptMethod;
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry, SubclusterBitmap};
use qblk_qcow2::{GuestOffset, HostOffset};

use super::data::clusters_of;
use super::{Alloc, Miss, Staged, Step};
use crate::buf::AlignedBuf;
use crate::error::{Corruption, Error, Result};
use crate::guest::In;
use crate::image::Image;

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
    /// The L2 table at `offset` if it is in memory (dirty, cached, or just
    /// read for this step); otherwise the step asks for it.
    fn cached_l2(&self, offset: HostOffset, staged: Option<&Staged>) -> Step<Arc<AlignedBuf>> {
        let mut t = self.lock_tables();
        if let Some(table) = t.l2_dirty.get(&offset.0) {
            return Ok(table.clone());
        }
        if let Some(table) = t.l2_clean.get(&offset.0) {
            return Ok(table.clone());
        }
        match staged {
            // Read for this step, and no table has been written since.
            Some(s) if s.offset == offset && s.epoch == t.l2_epoch => Ok(s.table.clone()),
            _ => Err(Miss::L2Table(offset)),
        }
    }

    /// The descriptor and raw entry of the guest cluster at `pos`, from
    /// tables in memory.
    pub(super) fn lookup(
        &self,
        pos: u64,
        staged: Option<&Staged>,
    ) -> Step<(ClusterDescriptor, L2Entry)> {
        let g = self.geometry();
        let cluster = g.guest_cluster(GuestOffset(pos));
        let l1_entry = self
            .lock_tables()
            .l1
            .get(g.l1_index(cluster) as usize)
            .copied();
        let Some(l2_offset) = l1_entry.and_then(|e| e.l2_offset()) else {
            return Ok((ClusterDescriptor::Unallocated, L2Entry::UNALLOCATED));
        };
        let table = self.cached_l2(l2_offset, staged)?;
        let index = g.l2_index(cluster);
        let entry = L2Entry::read(&table, &g, index).expect("index within table");
        let h = self.header();
        let d = entry
            .decode(
                &g,
                h.is_v3(),
                h.has_external_data_file(),
                l2_offset.0 + index as u64 * g.l2_entry_size(),
            )
            .map_err(Error::format(self.path()))?;
        Ok((d, entry))
    }

    /// Points the L2 entry of the cluster at `guest` to `entry`, allocating
    /// or copying its L2 table first if the image does not own it alone.
    /// Everything it needs is checked before anything changes, so a step
    /// that misses a table can run again.
    pub(super) fn set_l2_entry(
        &self,
        a: &mut Alloc,
        staged: Option<&Staged>,
        guest: u64,
        entry: L2Entry,
    ) -> Step<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let cluster = g.guest_cluster(GuestOffset(guest));
        let l1_index = g.l1_index(cluster) as usize;
        let l1_entry = self
            .lock_tables()
            .l1
            .get(l1_index)
            .copied()
            .ok_or_else(|| {
                Error::corrupt(
                    self.path(),
                    Corruption::PastL1 {
                        guest: GuestOffset(guest),
                    },
                )
            })?;
        let (table_offset, current) = match l1_entry.l2_offset() {
            Some(off) if l1_entry.copied() => (off.0, self.cached_l2(off, staged)?),
            old => {
                // A table shared with a snapshot is copied; none: a new one.
                let src = old.map(|off| self.cached_l2(off, staged)).transpose()?;
                let t = a.rc.alloc_cluster(&mut a.header)?.0 * cs;
                let mut table = AlignedBuf::zeroed(cs as usize);
                if let (Some(src), Some(off)) = (src, old) {
                    table.copy_from_slice(&src);
                    // Released after the writeback that makes the copy
                    // durable: the journal's copy record reads it until then.
                    a.rc.release(g.host_cluster(off), qblk_qcow2::ClusterCount(1));
                    a.note_l2_copy(t, off.0);
                } else {
                    a.note_l2_new(t, cs);
                }
                let table = Arc::new(table);
                let l1 = L1Entry::new(HostOffset(t), true);
                a.note_l1(l1_index as u64, l1.0);
                let mut tables = self.lock_tables();
                tables.put_dirty_l2(t, table.clone());
                tables.l1[l1_index] = l1;
                tables.l1_dirty = true;
                (t, table)
            }
        };
        let mut tables = self.lock_tables();
        let table = match tables.l2_dirty.remove(&table_offset) {
            Some(t) => t,
            None => {
                tables.l2_clean.pop(&table_offset);
                current
            }
        };
        let mut table = Arc::unwrap_or_clone(table);
        let index = g.l2_index(cluster);
        entry.write(&mut table, &g, index);
        let at = index * g.l2_entry_size() as usize;
        let words: Vec<u64> =
            qblk_qcow2::decode_table(&table[at..at + g.l2_entry_size() as usize]).collect();
        tables.put_dirty_l2(table_offset, Arc::new(table));
        drop(tables);
        for (k, word) in words.into_iter().enumerate() {
            a.note_l2_word(table_offset + (at + 8 * k) as u64, word);
        }
        Ok(())
    }

    pub(super) async fn write_zeroes_inner(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<()> {
        let w = self.check_writable(offset, len)?;
        let g = self.geometry();
        let cs = g.cluster_size();
        let h = self.header();
        let metadata_only = h.is_v3() && !h.data_file_is_raw();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_cluster = g.offset_in_cluster(pos);
            let n = (cs - in_cluster).min(end - pos);
            let whole = in_cluster == 0 && (n == cs || pos + n == self.size());
            if whole && metadata_only {
                let _cluster = w.lock_guest_cluster(pos).await;
                w.with_alloc(self, |a, staged| {
                    self.zero_cluster(a, staged, pos, may_unmap)
                })
                .await?;
                w.bump_write_gen();
                w.settle(self).await?;
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
            self.write_inner(pos + done, In::Heap(&zeros[..n])).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// One whole cluster to zeros through its L2 entry.
    fn zero_cluster(
        &self,
        a: &mut Alloc,
        staged: Option<&Staged>,
        pos: u64,
        may_unmap: bool,
    ) -> Step<()> {
        let (desc, _) = self.lookup(pos, staged)?;
        let g = self.geometry();
        let external = self.header().has_external_data_file();
        // What keeps its host cluster, and what reference is dropped.
        let (keep, drop): (Option<HostOffset>, Option<(HostOffset, u64)>) = match desc {
            ClusterDescriptor::Standard { host, copied, .. }
            | ClusterDescriptor::Zero {
                preallocated: Some(host),
                copied,
            } => {
                if external || (copied && !may_unmap) {
                    (Some(host), None)
                } else {
                    (None, Some((host, g.cluster_size())))
                }
            }
            ClusterDescriptor::Compressed { host, len } => (None, Some((host, len))),
            ClusterDescriptor::Unallocated
            | ClusterDescriptor::Zero {
                preallocated: None, ..
            }
            | ClusterDescriptor::UnallocatedSubclusters { .. } => (None, None),
        };
        let new_entry = match (g.extended_l2(), keep) {
            (false, host) => L2Entry::zero(host, host.is_some()),
            (true, Some(host)) => L2Entry::standard(host, true, SubclusterBitmap::ALL_ZERO),
            (true, None) => L2Entry {
                word: 0,
                bitmap: SubclusterBitmap::ALL_ZERO.0,
            },
        };
        self.remap(a, staged, pos, new_entry, drop)
    }

    /// Sets a cluster's L2 entry and drops the old host reference, if any.
    fn remap(
        &self,
        a: &mut Alloc,
        staged: Option<&Staged>,
        pos: u64,
        entry: L2Entry,
        drop: Option<(HostOffset, u64)>,
    ) -> Step<()> {
        let cluster_start = pos - self.geometry().offset_in_cluster(pos);
        self.set_l2_entry(a, staged, cluster_start, entry)?;
        if let Some((off, len)) = drop {
            let (first, n) = clusters_of(self, off, len);
            a.rc.release(first, n);
        }
        Ok(())
    }

    /// Discard; `full` makes the clusters unallocated even where a
    /// backing file then shows through (QEMU's full discard).
    pub(super) async fn discard_inner(&self, offset: u64, len: u64, full: bool) -> Result<()> {
        let w = self.check_writable(offset, len)?;
        let h = self.header();
        if full && h.has_external_data_file() {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: "deallocating clusters of an image with an external data file".into(),
            });
        }
        if h.has_external_data_file() || (!full && !h.is_v3() && self.backing_exists()) {
            return Ok(());
        }
        let g = self.geometry();
        let cs = g.cluster_size();
        let mut pos = offset.next_multiple_of(cs);
        let end = offset + len;
        while pos < end && (pos + cs <= end || end == self.size()) {
            let _cluster = w.lock_guest_cluster(pos).await;
            let changed = w
                .with_alloc(self, |a, staged| {
                    let (desc, current) = self.lookup(pos, staged)?;
                    let drop = match desc {
                        ClusterDescriptor::Standard { host, .. }
                        | ClusterDescriptor::Zero {
                            preallocated: Some(host),
                            ..
                        } => Some((host, cs)),
                        ClusterDescriptor::Compressed { host, len } => Some((host, len)),
                        ClusterDescriptor::Unallocated
                        | ClusterDescriptor::Zero {
                            preallocated: None, ..
                        }
                        | ClusterDescriptor::UnallocatedSubclusters { .. } => None,
                    };
                    let new_entry = if full || !self.backing_exists() {
                        L2Entry::UNALLOCATED
                    } else if g.extended_l2() {
                        L2Entry {
                            word: 0,
                            bitmap: SubclusterBitmap::ALL_ZERO.0,
                        }
                    } else {
                        L2Entry::zero(None, false)
                    };
                    if drop.is_none()
                        && (new_entry == current || !full && new_entry == L2Entry::UNALLOCATED)
                    {
                        return Ok(false);
                    }
                    self.remap(a, staged, pos, new_entry, drop)?;
                    Ok(true)
                })
                .await?;
            if changed {
                w.bump_write_gen();
                w.settle(self).await?;
            }
            pos += cs;
        }
        Ok(())
    }

    pub(super) async fn write_compressed_inner(&self, offset: u64, data: &[u8]) -> Result<()> {
        let w = self.check_writable(offset, data.len() as u64)?;
        let g = self.geometry();
        let cs = g.cluster_size();
        let h = self.header();
        if h.has_external_data_file() || h.crypt_method != CryptMethod::None {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what:
                    "compressed clusters are not possible with an external data file or encryption"
                        .into(),
            });
        }
        if !g.is_cluster_aligned(offset)
            || (data.len() as u64 != cs && offset + data.len() as u64 != self.size())
        {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: "compressed writes cover exactly one whole cluster".into(),
            });
        }
        let mut cluster = vec![0u8; cs as usize];
        cluster[..data.len()].copy_from_slice(data);
        let compressed = compress(h.compression_type, &cluster);
        let Some(compressed) = compressed.filter(|c| (c.len() as u64) < cs) else {
            return self.write_inner(offset, In::Heap(data)).await;
        };
        let len = compressed.len() as u64;
        let _cluster = w.lock_guest_cluster(offset).await;
        // Phase 1: the cluster is still unallocated; pack into the current
        // compressed cluster if it has room (each compressed cluster placed
        // in a host cluster holds a reference), or take a new one.
        let host = w
            .with_alloc(self, |a, staged| {
                let (desc, _) = self.lookup(offset, staged)?;
                if !matches!(
                    desc,
                    ClusterDescriptor::Unallocated
                        | ClusterDescriptor::Zero {
                            preallocated: None,
                            ..
                        }
                ) {
                    return Err(Error::Unsupported {
                        path: self.path().to_owned(),
                        what: format!(
                            "compressed write to an allocated cluster at guest offset {offset:#x}"
                        ),
                    }
                    .into());
                }
                let Alloc {
                    rc,
                    header,
                    compressed_tail,
                    ..
                } = a;
                let tail = compressed_tail
                    .filter(|&(_, used)| cs - used >= len)
                    .map(|(c, used)| (c, used, g.host_cluster(c)));
                if let Some((c, used, hc)) = tail {
                    if rc.get(hc)? < g.refcount_max() {
                        rc.adjust(hc, 1)?;
                        *compressed_tail = Some((c, used + len));
                        return Ok(HostOffset(c.0 + used));
                    }
                }
                let c = HostOffset(rc.alloc_cluster(header)?.0 * cs);
                *compressed_tail = Some((c, len));
                Ok(c)
            })
            .await?;
        // Phase 2: the compressed bytes, no lock held.
        let hc = g.host_cluster(host);
        self.extend_file_to(w, (hc.0 + 1) * cs).await;
        if let Err(e) = self
            .file()
            .write(host.0, &compressed)
            .await
            .map_err(Error::io(self.path(), "write compressed cluster", host.0))
        {
            w.with_alloc(self, |a, _| a.rc.adjust(hc, -1)).await?;
            return Err(e);
        }
        // Phase 3: publish.
        let entry = L2Entry::compressed(&g, host, len)
            .ok_or_else(|| Error::corrupt(self.path(), Corruption::CompressedOffset { host }))?;
        w.with_alloc(self, |a, staged| {
            self.set_l2_entry(a, staged, offset, entry)
        })
        .await?;
        w.bump_write_gen();
        w.settle(self).await
    }
}
