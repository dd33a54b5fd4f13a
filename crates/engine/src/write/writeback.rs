//! Writeback: the only code that writes metadata or syncs.
//!
//! Refcount blocks, the refcount table, L2 tables, the L1 table and the
//! header are write-back: the allocator and the L2 updates change them in
//! memory, and a writeback turns what is dirty into one ordered
//! [`Commit`], built under the allocator lock in one go (a snapshot, so
//! every table it writes is covered by the refcount blocks it writes) and
//! run with no allocator lock held. The edges (DESIGN.md's invariants):
//!
//! - refcount blocks, then (durable) the refcount table in place: a new
//!   block is complete before the table entry that finds it;
//! - a grown refcount table goes to its new place with its blocks, and
//!   (durable) the header switches to it;
//! - with lazy refcounts, the dirty bit, durable before the first table
//!   that depends on refcounts left in memory (invariant 5);
//! - L2 tables after all of the above and after the guest data written
//!   before the writeback is durable (invariants 1 and 2);
//! - the L1 table after the L2 tables it names; a moved (grown) L1 table
//!   likewise, and the header naming it after it (resize);
//! - a final header (new size, dirty bit cleared at close) after all.
//!
//! After the commit: the written tables are clean unless they changed
//! meanwhile; references dropped from tables that are now durable have
//! their refcounts decremented (invariant: a refcount never falls below
//! its references on disk) and, unless refcounts are lazy, written in a
//! second commit; and clusters freed before that are reusable only then
//! (invariant 3). Writebacks are serialised by the commit lock.

use std::sync::Arc;

use qblk_qcow2::header::{AutoclearFeatures, IncompatibleFeatures};
use qblk_qcow2::refcount::RefcountTableEntry;
use qblk_qcow2::{ClusterCount, Header, HostCluster, HostOffset};

use super::{Alloc, Refcounts, Synced, Writer};
use crate::buf::AlignedBuf;
use crate::commit::{Commit, Edge, End, Files, WriteId, header_buf};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::journal::Journal;
use crate::layout::MetaMap;
use tracing::warn;

/// What a writeback's commit covers, to settle afterwards.
#[derive(Debug)]
struct Snapshot {
    commit: Commit,
    /// The write generation every write completed before it covers.
    covered: u64,
    blocks: Vec<HostOffset>,
    /// The refcount table was written (it is dirty again on failure).
    table_written: bool,
    /// The refcount table replaced by a grown one, freed once the header
    /// switch is durable.
    table_replaced: Option<(HostOffset, ClusterCount)>,
    l2: Vec<(u64, Arc<AlignedBuf>)>,
    /// The L1 table was written (it is dirty again on failure).
    l1_written: bool,
    l1_replaced: Option<(HostOffset, ClusterCount)>,
    /// Every header this commit writes, in order, with its write.
    headers: Vec<(WriteId, Header)>,
    /// References dropped from the tables this commit writes.
    releases: Vec<HostCluster>,
    /// The table changes it holds (`Alloc::changes`).
    changes: u64,
    /// Copies of the extra writes it makes (put back if it fails).
    extra: Vec<super::bitmap_store::ExtraWrite>,
}

/// Makes an image ready for writing: refuses what cannot be written
/// safely, loads the refcount table, maps the metadata and loads the
/// persistent dirty bitmaps; then, with commits of its own before the first
/// write, clears the autoclear bits whose meaning this engine does not keep
/// up (unknown ones) and marks the bitmaps it keeps in use.
pub(crate) async fn prepare_for_writing(img: &Image, crash_journal: bool) -> Result<Writer> {
    let h = img.header();
    let refuse = |what: &str| {
        Err(Error::Unsupported {
            path: img.path().to_owned(),
            what: what.to_owned(),
        })
    };
    if h.is_corrupt() {
        return refuse(
            "the corrupt bit is set: the image may only be opened read-only (run qblk check)",
        );
    }
    if h.is_dirty() {
        // Image::open rebuilds the refcounts of a dirty image first.
        return refuse("the dirty bit is still set after rebuilding the refcounts");
    }
    let g = img.geometry();
    let cs = g.cluster_size();
    let rt = img
        .file()
        .read(
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * cs) as usize,
        )
        .await
        .map_err(Error::io(
            img.path(),
            "read refcount table",
            h.refcount_table_offset,
        ))?;
    let mut table = Vec::with_capacity(rt.len() / 8);
    for (i, raw) in qblk_qcow2::decode_table(&rt).enumerate() {
        let e = RefcountTableEntry(raw);
        e.validate(&g, h.refcount_table_offset + i as u64 * 8)
            .map_err(Error::format(img.path()))?;
        table.push(e.0);
    }
    let file_len = img
        .file()
        .file_len()
        .map_err(Error::io(img.path(), "stat", None))?;
    let l1 = img.lock_tables().l1.clone();
    let meta = Arc::new(MetaMap::build(img.file(), h, &g, &l1, &table, file_len).await?);
    img.lock_tables().meta = meta.clone();
    let bitmap_meta = meta.clone();
    let rc = Refcounts::new(
        g,
        img.path().to_owned(),
        table,
        (img.refcount_cache_bytes() / cs) as usize,
        HostCluster(g.clusters_for(file_len)),
        meta,
    );
    let loaded = crate::bitmaps::load(img, h, &bitmap_meta, file_len).await?;
    let mut header = h.clone();
    let mut keep = AutoclearFeatures::RAW_EXTERNAL_DATA;
    if loaded.drop_extension {
        header.set_extension(qblk_qcow2::header::ext_type::BITMAPS, None);
    } else if !loaded.is_empty() {
        keep |= AutoclearFeatures::BITMAPS;
    }
    header.autoclear_features =
        AutoclearFeatures::from_bits_retain(header.autoclear_features.bits() & keep.bits());
    // A journal left by a crashed writer was replayed by Image::open (or
    // could not be): either way a new one starts, or none.
    crate::journal::set_header_stamp(&mut header, None);
    let (journal, write_through) = if crash_journal {
        match start_journal(img, &mut header) {
            Ok(j) => (Some(j), false),
            Err(why) => {
                warn!(
                    image = %img.path().display(),
                    "no crash journal ({why}): every write that changes metadata commits it before it completes, which is slower"
                );
                (None, true)
            }
        }
    } else {
        (None, false)
    };
    let in_use = loaded.in_use_directory();
    let stamp = crate::journal::header_stamp(&header);
    let bitmaps = loaded.into_bitmaps(img.path(), h.size, stamp.filter(|_| journal.is_some()));
    if let Some((dir_offset, dir)) = in_use {
        // Bitmaps in use before the first write. The directory is patched
        // in place (only flags change) while the header disowns it, so a
        // torn write of it is never trusted: the bitmaps autoclear bit off
        // (durable), the directory (durable), the bit back on.
        let mut disowned = header.clone();
        disowned
            .autoclear_features
            .remove(AutoclearFeatures::BITMAPS);
        let mut c = Commit::new(End::Durable);
        let off = c.write("write header", 0, header_buf(img.path(), &disowned)?);
        let mut buf = AlignedBuf::zeroed(dir.len());
        buf.copy_from_slice(&dir);
        let d = c.write("write bitmap directory", dir_offset, buf);
        c.after(d, off, Edge::Durable);
        let on = c.write("write header", 0, header_buf(img.path(), &header)?);
        c.after(on, d, Edge::Durable);
        c.run(img.commit_files()).await?;
    } else if header_buf(img.path(), &header)?[..] != header_buf(img.path(), h)?[..] {
        let mut c = Commit::new(End::Durable);
        let _ = c.write("write header", 0, header_buf(img.path(), &header)?);
        c.run(img.commit_files()).await?;
    }
    if !bitmaps.has_sidecar() {
        // A sidecar a crashed writer left: taken in above, or not to be.
        let _ = std::fs::remove_file(crate::bitmaps::sidecar(img.path()));
    }
    if journal.is_none() {
        // A journal a crashed writer left (replayed, or not to be): the
        // header names it no more, and only the holder of the write lock
        // (this writer) could have a live one.
        let _ = std::fs::remove_file(crate::journal::sidecar(img.path()));
    }
    let alloc = Alloc {
        rc,
        lazy: header.is_v3() && header.lazy_refcounts(),
        disk_header: header.clone(),
        header,
        compressed_tail: None,
        l1_replaced: None,
        published_rt: (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        ),
        journal,
        changes: 0,
        extra_writes: Vec::new(),
    };
    Ok(Writer::new(alloc, file_len, write_through, bitmaps))
}

/// Creates the image's crash journal and names it in `header`, or says
/// why there can be none.
fn start_journal(img: &Image, header: &mut Header) -> std::result::Result<Journal, String> {
    if !header.is_v3() {
        return Err("a version 2 image has no autoclear bits to guard one".into());
    }
    let (journal, stamp) = Journal::create(img.path(), crate::journal::DEFAULT_CAPACITY)
        .map_err(|e| format!("{}: {e}", crate::journal::sidecar(img.path()).display()))?;
    crate::journal::set_header_stamp(header, Some(stamp));
    Ok(journal)
}

impl Image {
    /// The files a commit of this image writes and syncs.
    pub(crate) fn commit_files(&self) -> Files<'_> {
        Files {
            image: self.file(),
            data: self.data_file(),
            counters: Some(self.counters()),
        }
    }
}

impl Writer {
    /// A writeback (see the module documentation).
    pub(super) async fn writeback(&self, img: &Image) -> Result<()> {
        let mut synced = self.commit.lock().await;
        self.writeback_locked(img, &mut synced, false).await
    }

    /// Makes every write acknowledged before the call durable.
    pub(super) async fn flush(&self, img: &Image) -> Result<()> {
        if self.is_corrupt() {
            return self.refuse_if_unsynced(img).await;
        }
        // Every write acknowledged before this call is at or below `wanted`.
        let wanted = self.write_gen.load(std::sync::atomic::Ordering::Acquire);
        let mut synced = self.commit.lock().await;
        if synced.durable_gen >= wanted && wanted > 0 {
            // A writeback that started after those writes completed has
            // already made them durable: flushes coalesce.
            return Ok(());
        }
        self.writeback_locked(img, &mut synced, false).await
    }

    /// On an image marked corrupt nothing more is written: a flush or close
    /// succeeds only if every acknowledged write was covered already.
    async fn refuse_if_unsynced(&self, img: &Image) -> Result<()> {
        let synced = self.commit.lock().await;
        let written = self.write_gen.load(std::sync::atomic::Ordering::Acquire);
        if written > synced.durable_gen {
            return Err(Error::NotDurable {
                path: img.path().to_owned(),
                writes: written - synced.durable_gen,
            });
        }
        Ok(())
    }

    /// Everything durable, refcounts written and the dirty bit cleared,
    /// the file trimmed to what is used.
    pub(super) async fn close(&self, img: &Image) -> Result<()> {
        if self.is_corrupt() {
            return self.refuse_if_unsynced(img).await;
        }
        let mut synced = self.commit.lock().await;
        self.writeback_locked(img, &mut synced, true).await?;
        // The bitmaps, consistent on disk again (not in use).
        self.store_bitmaps(img, &mut synced, false).await?;
        let header_changes = {
            let mut a = self.lock_alloc();
            let dirty = a.disk_header.is_dirty();
            a.header
                .incompatible_features
                .remove(IncompatibleFeatures::DIRTY);
            // Everything is committed: no journal is needed any more.
            crate::journal::set_header_stamp(&mut a.header, None);
            dirty || a.journal.is_some()
        };
        if header_changes {
            // The refcounts the dirty bit stood for are durable now, and
            // so is every change the journal held.
            self.writeback_locked(img, &mut synced, true).await?;
        }
        if let Some(j) = self.lock_alloc().journal.take() {
            j.remove();
        }
        self.bitmaps.remove_sidecar();
        self.trim(img).await
    }

    /// Gives back what was reserved ahead of allocation and never used.
    async fn trim(&self, img: &Image) -> Result<()> {
        let end = self.lock_alloc().rc.end;
        let mut x = self.extend.lock().await;
        let used = (end.0 * img.geometry().cluster_size()).max(x.opened_len);
        if x.file_len > used {
            img.file()
                .set_len(used)
                .await
                .map_err(Error::io(img.path(), "trim the file", used))?;
            x.file_len = used;
        }
        Ok(())
    }

    /// Sets the corrupt bit on disk (best effort: the caller fails the
    /// request either way). Written over the header as it is on disk, not
    /// as the allocator wants it: nothing else is committed any more.
    pub(super) async fn mark_corrupt(&self, img: &Image) -> Result<()> {
        let _synced = self.commit.lock().await;
        let mut header = self.lock_alloc().disk_header.clone();
        header.incompatible_features |= IncompatibleFeatures::CORRUPT;
        let mut c = Commit::new(End::Durable);
        let _ = c.write("write header", 0, header_buf(img.path(), &header)?);
        c.run(img.commit_files()).await?;
        self.lock_alloc().disk_header = header;
        Ok(())
    }

    /// One writeback with the commit lock held. `force_refcounts` writes
    /// refcounts even when they are lazy (close).
    pub(super) async fn writeback_locked(
        &self,
        img: &Image,
        synced: &mut Synced,
        force_refcounts: bool,
    ) -> Result<()> {
        // Invariant 6: once metadata was found inconsistent nothing more is
        // written, also by a write that was under way when it was found.
        if self.is_corrupt() {
            return Err(Error::MarkedCorrupt {
                path: img.path().to_owned(),
            });
        }
        let snap = {
            let mut a = self.lock_alloc();
            let covered = self.write_gen.load(std::sync::atomic::Ordering::Acquire);
            self.snapshot(img, &mut a, covered, force_refcounts)?
        };
        let Snapshot {
            commit,
            covered,
            blocks,
            table_written,
            table_replaced,
            l2,
            l1_written,
            l1_replaced,
            headers,
            releases,
            changes,
            extra,
        } = snap;
        let (completed, error) = match commit.run_tracked(img.commit_files()).await {
            Ok(_) => (None, None),
            Err(f) => (Some(f.completed), Some(f.error)),
        };
        {
            let mut a = self.lock_alloc();
            a.rc.written(&blocks);
            // The headers that reached the file: the last one is what the
            // disk holds (a failed commit may have written some).
            let done = |id: &WriteId| completed.as_ref().is_none_or(|c| c.contains(id));
            if let Some((_, h)) = headers.iter().rev().find(|(id, _)| done(id)) {
                a.disk_header = h.clone();
            }
            if let Some(error) = error {
                // Written again by the next writeback; a structure whose
                // header switch reached the file is not freed (a leak at
                // worst, never a cluster reused while named).
                let failed: Vec<HostOffset> = blocks.clone();
                a.rc.not_written(&failed);
                if table_written {
                    a.rc.table_dirty = true;
                }
                let switched = |h: &Header, old: (HostOffset, ClusterCount), rt: bool| {
                    let now = if rt {
                        h.refcount_table_offset
                    } else {
                        h.l1_table_offset
                    };
                    now != old.0.0
                };
                let disk = a.disk_header.clone();
                if let Some(old) = table_replaced.filter(|&o| !switched(&disk, o, true)) {
                    a.rc.table_replaced = Some(old);
                }
                if let Some(old) = l1_replaced.filter(|&o| !switched(&disk, o, false)) {
                    a.l1_replaced = Some(old);
                }
                a.rc.deferred_releases.extend(releases);
                // The header naming them is still to be written, after them.
                let later = std::mem::take(&mut a.extra_writes);
                a.extra_writes = extra;
                a.extra_writes.extend(later);
                drop(a);
                let mut t = img.lock_tables();
                if l1_written {
                    t.l1_dirty = true;
                }
                return Err(error);
            }
            let mut t = img.lock_tables();
            for (off, table) in l2 {
                if t.l2_dirty.get(&off).is_some_and(|d| Arc::ptr_eq(d, &table)) {
                    t.l2_dirty.remove(&off);
                    t.l2_clean.put(off, table);
                }
            }
            t.trim_slices();
            t.l2_epoch += 1;
            drop(t);
            synced.durable_gen = covered;
            synced.changes = changes;
            if let Some(j) = &mut a.journal {
                // Those records are in the file now; their slots are free.
                j.checkpoint(changes);
            }
            // Freed clusters become reusable below: stop packing compressed
            // data into a cluster that may be among them.
            a.compressed_tail = None;
            let cs_bits = img.geometry().cluster_bits();
            let mut releasing = releases;
            for (off, n) in table_replaced.into_iter().chain(l1_replaced) {
                releasing.extend((0..n.0).map(|k| HostCluster((off.0 >> cs_bits) + k)));
            }
            a.rc.releasing.extend(releasing);
        }
        self.apply_releases(img, force_refcounts).await
    }

    /// Applies the refcount decrements whose tables are durable now and,
    /// unless refcounts are lazy, writes them; then the clusters freed
    /// before are reusable.
    async fn apply_releases(&self, img: &Image, force_refcounts: bool) -> Result<()> {
        self.with_alloc(img, |a, _| {
            while let Some(&c) = a.rc.releasing.last() {
                a.rc.adjust(c, -1)?;
                a.rc.releasing.pop();
            }
            Ok(())
        })
        .await?;
        let (sealed, blocks, lazy) = {
            let mut a = self.lock_alloc();
            let sealed = a.rc.seal_free_epoch();
            let lazy = a.lazy && !force_refcounts;
            let blocks = if lazy {
                Vec::new()
            } else {
                a.rc.take_dirty_blocks()
            };
            (sealed, blocks, lazy)
        };
        if !lazy && !blocks.is_empty() {
            let offsets: Vec<HostOffset> = blocks.iter().map(|(o, _)| *o).collect();
            let mut c = Commit::new(End::Durable);
            for (off, buf) in blocks {
                let _ = c.write("write refcount block", off.0, buf);
            }
            let r = c.run(img.commit_files()).await;
            let mut a = self.lock_alloc();
            match r {
                Ok(_) => a.rc.written(&offsets),
                Err(e) => {
                    a.rc.not_written(&offsets);
                    return Err(e);
                }
            }
        }
        self.lock_alloc().rc.reuse_freed(sealed);
        Ok(())
    }

    /// Builds the writeback's commit from what is dirty now (allocator
    /// lock held, tables lock taken inside it).
    fn snapshot(
        &self,
        img: &Image,
        a: &mut Alloc,
        covered: u64,
        force_refcounts: bool,
    ) -> Result<Snapshot> {
        let mut t = img.lock_tables();
        let extra = std::mem::take(&mut a.extra_writes);
        // Structures only the header names count as tables here: with
        // lazy refcounts they too wait for the dirty bit.
        let tables_dirty = !t.l2_dirty.is_empty() || t.l1_dirty || !extra.is_empty();
        // With lazy refcounts, refcount blocks stay in memory (until close,
        // or until too many are dirty).
        let commit_rc =
            !a.lazy || force_refcounts || a.rc.dirty_blocks.len() > a.rc.blocks_capacity;
        let mut c = Commit::new(End::Durable);
        let mut headers: Vec<(WriteId, Header)> = Vec::new();
        let mut on_disk = a.disk_header.clone();
        // What every table write follows durably.
        let mut before_tables: Vec<WriteId> = Vec::new();
        if !commit_rc && tables_dirty && !on_disk.is_dirty() {
            // The dirty bit, durable before the first table that depends
            // on refcounts left in memory.
            on_disk.incompatible_features |= IncompatibleFeatures::DIRTY;
            a.header.incompatible_features |= IncompatibleFeatures::DIRTY;
            let h = c.write("write header", 0, header_buf(img.path(), &on_disk)?);
            headers.push((h, on_disk.clone()));
            before_tables.push(h);
        }
        let mut blocks = Vec::new();
        let mut table_written = false;
        let mut table_replaced = None;
        if commit_rc {
            let mut block_ids = Vec::new();
            for (off, buf) in a.rc.take_dirty_blocks() {
                block_ids.push(c.write("write refcount block", off.0, buf));
                blocks.push(off);
            }
            before_tables.extend(&block_ids);
            if a.rc.table_dirty {
                let clusters = ClusterCount(u64::from(a.header.refcount_table_clusters));
                let id = c.write(
                    "write refcount table",
                    a.header.refcount_table_offset,
                    a.rc.table_bytes(clusters),
                );
                a.rc.table_dirty = false;
                table_written = true;
                before_tables.push(id);
                match a.rc.table_replaced.take() {
                    // In place: after the blocks it names.
                    None => c.after_all(id, &block_ids, Edge::Durable),
                    // Moved: the header switches to it once it and its
                    // blocks are durable.
                    Some(old) => {
                        table_replaced = Some(old);
                        on_disk.refcount_table_offset = a.header.refcount_table_offset;
                        on_disk.refcount_table_clusters = a.header.refcount_table_clusters;
                        let h = c.write("write header", 0, header_buf(img.path(), &on_disk)?);
                        c.after_all(h, &before_tables, Edge::Durable);
                        headers.push((h, on_disk.clone()));
                        before_tables.push(h);
                    }
                }
            }
        }
        // Before the header that names them (it follows everything below,
        // the refcounts that count their clusters included).
        for x in &extra {
            before_tables.push(c.write(x.what, x.offset, x.copy().buf));
        }
        let l2: Vec<(u64, Arc<AlignedBuf>)> =
            t.l2_dirty.iter().map(|(k, v)| (*k, v.clone())).collect();
        let mut table_ids = Vec::new();
        for (off, table) in &l2 {
            let mut copy = AlignedBuf::zeroed(table.len());
            copy.copy_from_slice(table);
            let id = c.write("write L2 table", *off, copy);
            c.after_all(id, &before_tables, Edge::Durable);
            c.after_guest_data(id);
            table_ids.push(id);
        }
        let mut l1_written = false;
        let mut l1_replaced = None;
        let mut all = before_tables.clone();
        all.extend(&table_ids);
        if t.l1_dirty {
            t.l1_dirty = false;
            let moved = a.l1_replaced.take();
            // A moved table is written whole (its clusters are new).
            let len = match moved {
                Some(_) => img
                    .geometry()
                    .clusters_for(t.l1.len() as u64 * 8)
                    .checked_mul(img.geometry().cluster_size())
                    .expect("bounded by the 32 MiB L1 limit"),
                None => t.l1.len() as u64 * 8,
            };
            let mut bytes = AlignedBuf::zeroed(len as usize);
            qblk_qcow2::encode_table(t.l1.iter().map(|e| e.0), &mut bytes);
            let id = c.write("write L1 table", t.l1_offset, bytes);
            c.after_all(id, &all, Edge::Durable);
            c.after_guest_data(id);
            l1_written = true;
            all.push(id);
            // The header below switches to a moved table.
            l1_replaced = moved;
        }
        // Everything else the header should say, after all of the above:
        // a moved L1 table and the new size (resize), the dirty bit
        // cleared at close. A grown refcount table not committed here
        // (lazy refcounts) stays as on disk.
        let mut last = a.header.clone();
        last.refcount_table_offset = on_disk.refcount_table_offset;
        last.refcount_table_clusters = on_disk.refcount_table_clusters;
        if !commit_rc && on_disk.is_dirty() {
            last.incompatible_features |= IncompatibleFeatures::DIRTY;
        }
        let last_bytes = header_buf(img.path(), &last)?;
        if last_bytes[..] != header_buf(img.path(), &on_disk)?[..] {
            let h = c.write("write header", 0, last_bytes);
            c.after_all(h, &all, Edge::Durable);
            headers.push((h, last));
        }
        // Every table that dropped a reference is in this commit.
        let releases = std::mem::take(&mut a.rc.deferred_releases);
        Ok(Snapshot {
            changes: a.changes,
            commit: c,
            covered,
            blocks,
            table_written,
            table_replaced,
            l2,
            l1_written,
            l1_replaced,
            headers,
            releases,
            extra,
        })
    }
}
