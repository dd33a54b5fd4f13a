//! Internal snapshots: create, delete, apply (qemu-img snapshot -c/-d/-a).
//!
//! A snapshot is a copy of the active L1 table plus an entry in the
//! snapshot table; the L2 tables and data clusters it reaches are shared
//! with the active image, so every one of them counts one more reference
//! (per L1 table that reaches it, as `qemu-img check` counts), and the
//! active tables lose their COPIED flags: a write to a shared cluster
//! copies it first. Each operation runs with the commit lock held, starting
//! from a writeback (so the tables on disk are the tables in memory), and
//! leaves its changes to the writeback's ordered commit:
//!
//! - create: the refcount increments and the active tables without COPIED
//!   flags, durable before the header names the new snapshot table (which
//!   names the L1 copy); a crash before that leaks at worst;
//! - delete: the header without the snapshot first; the references it held
//!   are released once that is durable (the writeback's deferred
//!   releases); then the active tables regain COPIED where a cluster is no
//!   longer shared;
//! - apply: the snapshot's references counted, the active L1 table
//!   replaced in place and the header's size set, then the old active
//!   references released, then COPIED flags recomputed.
//!
//! The caller keeps guest writes away meanwhile (the offline tool has
//! none; a daemon drains its queues first).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use qblk_qcow2::mapping::{COPIED, ClusterDescriptor, L1Entry, L2Entry};
use qblk_qcow2::snapshot::{MAX_SNAPSHOT_TABLE_BYTES, SnapshotEntry};
use qblk_qcow2::{ClusterCount, HostCluster, HostOffset};

use super::bitmap_store::ExtraWrite;
use super::{Synced, Writer};
use qblk_qcow2::header::IncompatibleFeatures;

use crate::buf::AlignedBuf;
use crate::commit::{Commit, End, header_buf};
use crate::error::{Error, Result};
use crate::image::Image;

impl Image {
    /// The image's internal snapshots, as its snapshot table holds them
    /// now.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let h = match self.writer() {
            Some(w) => w.lock_alloc().header.clone(),
            None => self.header().clone(),
        };
        let file_len = self
            .file()
            .file_len()
            .map_err(Error::io(self.path(), "stat", None))?;
        let cs = self.geometry().cluster_size();
        Ok(
            crate::layout::read_snapshot_table(self.file(), &h, cs, file_len)
                .await?
                .map(|(s, _)| s)
                .unwrap_or_default(),
        )
    }

    /// Creates internal snapshot `name` of the disk as it is now (no VM
    /// state), with the next free numeric ID.
    pub async fn snapshot_create(&self, name: &str) -> Result<()> {
        let r = self.snapshot_create_inner(name).await;
        self.on_error(r).await
    }

    /// Deletes the first internal snapshot named `name`.
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        let r = self.snapshot_delete_inner(name).await;
        self.on_error(r).await
    }

    /// Reverts the disk to internal snapshot `id_or_name` (an ID first,
    /// then a name).
    pub async fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let r = self.snapshot_apply_inner(id_or_name).await;
        self.on_error(r).await
    }

    fn refuse(&self, what: String) -> Error {
        Error::Unsupported {
            path: self.path().to_owned(),
            what,
        }
    }

    /// Every host cluster the L1 table `l1` reaches: its L2 tables and
    /// the data clusters they name (compressed data: each cluster it
    /// touches). Data in an external data file has no refcounts.
    async fn reached(&self, l1: &[L1Entry]) -> Result<Vec<HostCluster>> {
        let g = self.geometry();
        let h = self.header();
        let external = h.has_external_data_file();
        let mut out = Vec::new();
        for e in l1 {
            let Some(l2) = e.l2_offset() else { continue };
            out.push(g.host_cluster(l2));
            let table = self.l2_table(l2.0).await?;
            for i in 0..g.l2_entries() as usize {
                let entry = L2Entry::read(&table, &g, i).expect("index within table");
                let at = l2.0 + i as u64 * g.l2_entry_size();
                let d = entry
                    .decode(&g, h.is_v3(), external, at)
                    .map_err(Error::format(self.path()))?;
                match d {
                    ClusterDescriptor::Compressed { host, len } => {
                        let first = g.host_cluster(host);
                        let last = g.host_cluster(HostOffset(host.0 + len.max(1) - 1));
                        out.extend((first.0..=last.0).map(HostCluster));
                    }
                    d if !external => {
                        out.extend(d.host_cluster_offset().map(|o| g.host_cluster(o)))
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Adds one reference to each of `clusters` (a cluster listed twice
    /// gets two), after checking that none would overflow: nothing changes
    /// if one would.
    async fn count_references(
        &self,
        w: &Writer,
        clusters: &[HostCluster],
        what: &str,
    ) -> Result<()> {
        let mut per: HashMap<u64, u64> = HashMap::new();
        for c in clusters {
            *per.entry(c.0).or_default() += 1;
        }
        let per: Vec<(u64, u64)> = per.into_iter().collect();
        let bits = 1u32 << self.geometry().refcount_order();
        let max = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let mut checked = 0;
        w.with_alloc(self, |a, _| {
            while checked < per.len() {
                let (c, n) = per[checked];
                if a.rc.get(HostCluster(c))?.saturating_add(n) > max {
                    return Err(super::Miss::Fail(self.refuse(format!(
                        "{what}: a refcount would exceed its maximum of {max} (refcount_bits={bits})"
                    ))));
                }
                checked += 1;
            }
            Ok(())
        })
        .await?;
        let mut done = 0;
        w.with_alloc(self, |a, _| {
            while done < clusters.len() {
                a.rc.adjust(clusters[done], 1)?;
                done += 1;
            }
            Ok(())
        })
        .await
    }

    /// Sets the COPIED flag of each active L1 and L2 entry exactly where
    /// its cluster's refcount is 1, changing tables in memory.
    async fn fix_copied(&self, w: &Writer) -> Result<()> {
        let g = self.geometry();
        let h = self.header();
        let external = h.has_external_data_file();
        let l1 = self.lock_tables().l1.clone();
        for (i, e) in l1.iter().enumerate() {
            let Some(l2) = e.l2_offset() else { continue };
            let table = self.l2_table(l2.0).await?;
            let mut hosts = Vec::new();
            for k in 0..g.l2_entries() as usize {
                let entry = L2Entry::read(&table, &g, k).expect("index within table");
                let at = l2.0 + k as u64 * g.l2_entry_size();
                let d = entry
                    .decode(&g, h.is_v3(), external, at)
                    .map_err(Error::format(self.path()))?;
                let host = match d {
                    ClusterDescriptor::Standard { host, .. }
                    | ClusterDescriptor::Zero {
                        preallocated: Some(host),
                        ..
                    } => host,
                    _ => continue,
                };
                hosts.push((k, host));
            }
            let (table_single, singles) = w
                .with_alloc(self, |a, _| {
                    let t = a.rc.get(g.host_cluster(l2))? == 1;
                    let mut s = Vec::with_capacity(hosts.len());
                    for &(k, host) in &hosts {
                        // External data: no refcounts; the image owns it.
                        s.push((k, external || a.rc.get(g.host_cluster(host))? == 1));
                    }
                    Ok((t, s))
                })
                .await?;
            let mut changed = false;
            let mut new = AlignedBuf::zeroed(table.len());
            new.copy_from_slice(&table);
            for (k, single) in singles {
                let mut entry = L2Entry::read(&new, &g, k).expect("index within table");
                let word = if single {
                    entry.word | COPIED
                } else {
                    entry.word & !COPIED
                };
                if word != entry.word {
                    entry.word = word;
                    entry.write(&mut new, &g, k);
                    changed = true;
                }
            }
            let mut t = self.lock_tables();
            if changed {
                t.l2_clean.pop(&l2.0);
                t.put_dirty_l2(l2.0, std::sync::Arc::new(new));
            }
            let flagged = L1Entry::new(l2, table_single);
            if t.l1[i] != flagged {
                t.l1[i] = flagged;
                t.l1_dirty = true;
            }
        }
        Ok(())
    }

    /// Puts a new snapshot table (`entries`) in the allocator's header,
    /// its write among the writeback's extra writes, and the old table's
    /// clusters among the releases.
    async fn replace_snapshot_table(&self, w: &Writer, entries: &[SnapshotEntry]) -> Result<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let mut bytes = Vec::new();
        for e in entries {
            e.encode(&mut bytes);
        }
        if bytes.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(self.refuse("the snapshot table would exceed 64 MiB".into()));
        }
        let n = g.clusters_for(bytes.len() as u64);
        let at = if entries.is_empty() {
            None
        } else {
            Some(
                w.with_alloc(self, |a, _| a.rc.alloc_run(&mut a.header, ClusterCount(n)))
                    .await?,
            )
        };
        let mut a = w.lock_alloc();
        if let Some(at) = at {
            let mut buf = AlignedBuf::zeroed((n * cs) as usize);
            buf[..bytes.len()].copy_from_slice(&bytes);
            a.extra_writes.push(ExtraWrite {
                what: "write snapshot table",
                offset: at.0 * cs,
                buf,
            });
        }
        a.header.snapshots_offset = at.map_or(0, |c| c.0 * cs);
        a.header.nb_snapshots = entries.len() as u32;
        Ok(())
    }

    /// The snapshot table's clusters on disk now (freed when replaced).
    async fn snapshot_table_clusters(&self, w: &Writer) -> Result<Vec<HostCluster>> {
        let h = w.lock_alloc().header.clone();
        if h.nb_snapshots == 0 {
            return Ok(Vec::new());
        }
        let g = self.geometry();
        let file_len = self
            .file()
            .file_len()
            .map_err(Error::io(self.path(), "stat", None))?;
        let len = crate::layout::read_snapshot_table(self.file(), &h, g.cluster_size(), file_len)
            .await?
            .map_or(0, |(_, len)| len);
        let first = g.host_cluster(HostOffset(h.snapshots_offset));
        Ok((0..g.clusters_for(len))
            .map(|k| HostCluster(first.0 + k))
            .collect())
    }

    /// Drops cached L2 tables the active L1 table no longer names: a table
    /// a snapshot operation freed may be handed out again, for guest data
    /// among others, and a cached copy would still claim its cluster.
    fn evict_unreferenced_l2(&self) {
        let mut t = self.lock_tables();
        let named: std::collections::HashSet<u64> =
            t.l1.iter()
                .filter_map(|e| e.l2_offset())
                .map(|o| o.0)
                .collect();
        let stale: Vec<u64> = t
            .l2_clean
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !named.contains(k))
            .collect();
        for k in stale {
            t.l2_clean.pop(&k);
        }
        let table_bytes = t.l2_table_bytes;
        let stale_slices: Vec<u64> = t
            .l2_slices
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !named.contains(&(k / table_bytes * table_bytes)))
            .collect();
        for k in stale_slices {
            t.l2_slices.pop(&k);
        }
        debug_assert!(t.l2_dirty.keys().all(|k| named.contains(k)));
    }

    /// The writer, with nothing dirty left and the commit lock held.
    async fn quiesced(&self) -> Result<(&Writer, tokio::sync::MutexGuard<'_, Synced>)> {
        let w = self.check_writable(0, 0)?;
        if self.header().has_external_data_file() {
            return Err(self
                .refuse("internal snapshots are not supported with an external data file".into()));
        }
        let mut synced = w.commit.lock().await;
        w.writeback_locked(self, &mut synced, true).await?;
        if self.header().is_v3() {
            // Refcounts and COPIED flags cannot change together on disk:
            // under the dirty bit, a crash in between leaves an image whose
            // next writable open rebuilds both from the references, instead
            // of one `qemu-img check` calls corrupt (a window QEMU leaves
            // open). Cleared by the operation's last writeback.
            let mut header = w.lock_alloc().disk_header.clone();
            if !header.is_dirty() {
                header.incompatible_features |= IncompatibleFeatures::DIRTY;
                let mut c = Commit::new(End::Durable);
                let _ = c.write("write header", 0, header_buf(self.path(), &header)?);
                c.run(self.commit_files()).await?;
                let mut a = w.lock_alloc();
                a.disk_header = header;
                a.header.incompatible_features |= IncompatibleFeatures::DIRTY;
            }
        }
        Ok((w, synced))
    }

    /// The operation's last writeback: everything durable, then the
    /// header without the dirty bit (unless lazy refcounts keep it).
    async fn finish(&self, w: &Writer, synced: &mut Synced) -> Result<()> {
        {
            let mut a = w.lock_alloc();
            a.header
                .incompatible_features
                .remove(IncompatibleFeatures::DIRTY);
        }
        w.writeback_locked(self, synced, true).await
    }

    async fn snapshot_create_inner(&self, name: &str) -> Result<()> {
        let (w, mut synced) = self.quiesced().await?;
        let g = self.geometry();
        let cs = g.cluster_size();
        let mut entries = self.snapshots().await?;
        if entries.len() as u64 >= u64::from(qblk_qcow2::header::MAX_SNAPSHOTS) {
            return Err(self.refuse("the image holds the maximum number of snapshots".into()));
        }
        let old_table = self.snapshot_table_clusters(w).await?;
        let l1 = self.lock_tables().l1.clone();
        let reached = self.reached(&l1).await?;
        self.count_references(w, &reached, &format!("Could not create snapshot '{name}'"))
            .await?;
        // The active tables are shared now: no COPIED flags (set again
        // where a later write copies a cluster).
        self.fix_copied(w).await?;
        let l1_now = self.lock_tables().l1.clone();
        let n = g.clusters_for((l1_now.len() as u64 * 8).max(1));
        let copy_at = w
            .with_alloc(self, |a, _| a.rc.alloc_run(&mut a.header, ClusterCount(n)))
            .await?;
        let mut copy = AlignedBuf::zeroed((n * cs) as usize);
        qblk_qcow2::encode_table(l1_now.iter().map(|e| e.0 & !COPIED), &mut copy);
        let next_id = entries
            .iter()
            .filter_map(|e| e.id_lossy().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        entries.push(SnapshotEntry {
            l1_table_offset: copy_at.0 * cs,
            l1_size: u32::try_from(l1_now.len()).expect("bounded by the L1 limit"),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size_32: 0,
            extra_data: SnapshotEntry::standard_extra_data(0, self.size(), Some(0)),
            id: next_id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
        });
        w.lock_alloc().extra_writes.push(ExtraWrite {
            what: "write snapshot L1 table",
            offset: copy_at.0 * cs,
            buf: copy,
        });
        self.replace_snapshot_table(w, &entries).await?;
        w.lock_alloc().rc.deferred_releases.extend(old_table);
        w.writeback_locked(self, &mut synced, true).await?;
        self.finish(w, &mut synced).await
    }

    async fn snapshot_delete_inner(&self, name: &str) -> Result<()> {
        let (w, mut synced) = self.quiesced().await?;
        let g = self.geometry();
        let mut entries = self.snapshots().await?;
        let Some(pos) = entries.iter().position(|e| e.name == name.as_bytes()) else {
            return Err(self.refuse(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )));
        };
        let gone = entries.remove(pos);
        let old_table = self.snapshot_table_clusters(w).await?;
        let l1 = self.read_snapshot_l1(&gone).await?;
        let mut released = self.reached(&l1).await?;
        let first = g.host_cluster(HostOffset(gone.l1_table_offset));
        released.extend(
            (0..g.clusters_for((u64::from(gone.l1_size) * 8).max(1)))
                .map(|k| HostCluster(first.0 + k)),
        );
        self.replace_snapshot_table(w, &entries).await?;
        {
            let mut a = w.lock_alloc();
            a.rc.deferred_releases.extend(old_table);
            a.rc.deferred_releases.extend(released);
        }
        w.writeback_locked(self, &mut synced, true).await?;
        self.evict_unreferenced_l2();
        self.fix_copied(w).await?;
        self.finish(w, &mut synced).await
    }

    pub(crate) async fn read_snapshot_l1(&self, s: &SnapshotEntry) -> Result<Vec<L1Entry>> {
        let g = self.geometry();
        let bytes = self
            .file()
            .read(s.l1_table_offset, s.l1_size as usize * 8)
            .await
            .map_err(Error::io(
                self.path(),
                "read snapshot L1 table",
                s.l1_table_offset,
            ))?;
        let mut out = Vec::with_capacity(s.l1_size as usize);
        for (i, raw) in qblk_qcow2::decode_table(&bytes).enumerate() {
            let e = L1Entry(raw);
            e.validate(&g, s.l1_table_offset + i as u64 * 8)
                .map_err(Error::format(self.path()))?;
            out.push(e);
        }
        Ok(out)
    }

    async fn snapshot_apply_inner(&self, id_or_name: &str) -> Result<()> {
        let entries = self.snapshots().await?;
        let found = entries
            .iter()
            .find(|e| e.id == id_or_name.as_bytes())
            .or_else(|| entries.iter().find(|e| e.name == id_or_name.as_bytes()))
            .cloned();
        let Some(sn) = found else {
            return Err(self.refuse(format!(
                "Could not apply snapshot '{id_or_name}': Failed to load snapshot: No such file or directory"
            )));
        };
        let size = sn.disk_size().unwrap_or(self.size());
        if size < self.size() {
            return Err(self.refuse(format!(
                "Could not apply snapshot '{id_or_name}': the snapshot's disk ({size} bytes) is smaller than the disk now ({} bytes), and qblk does not shrink disks",
                self.size()
            )));
        }
        let l1_len = self.lock_tables().l1.len() as u64;
        if size > self.size() || u64::from(sn.l1_size) > l1_len {
            // A larger L1 table, in its own commit first.
            let grow_to = size.max(self.size());
            self.resize_inner(grow_to).await?;
        }
        let (w, mut synced) = self.quiesced().await?;
        let snap_l1 = self.read_snapshot_l1(&sn).await?;
        let reached = self.reached(&snap_l1).await?;
        let old_l1 = self.lock_tables().l1.clone();
        let old = self.reached(&old_l1).await?;
        if self.lock_tables().l1.len() < snap_l1.len() {
            return Err(self.refuse(format!(
                "Could not apply snapshot '{id_or_name}': its L1 table is larger than the disk's"
            )));
        }
        self.count_references(
            w,
            &reached,
            &format!("Could not apply snapshot '{id_or_name}'"),
        )
        .await?;
        {
            let mut t = self.lock_tables();
            for (i, e) in t.l1.iter_mut().enumerate() {
                *e = snap_l1
                    .get(i)
                    .map_or(L1Entry::UNALLOCATED, |s| L1Entry(s.0 & !COPIED));
            }
            t.l1_dirty = true;
        }
        {
            let mut a = w.lock_alloc();
            a.rc.deferred_releases.extend(old);
            a.header.size = size;
        }
        w.writeback_locked(self, &mut synced, true).await?;
        self.evict_unreferenced_l2();
        self.fix_copied(w).await?;
        self.finish(w, &mut synced).await?;
        w.bitmaps.resize(size);
        self.set_size(size);
        Ok(())
    }
}
