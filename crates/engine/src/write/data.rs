//! Guest data: in-place writes, allocating writes with copy-on-write, the
//! encryption read-modify-write, and extending the file ahead of
//! allocation.
//!
//! A write to a cluster the image owns alone (COPIED, every touched
//! subcluster allocated) goes straight to the host file, without locks. Any
//! other write takes its guest cluster's lock and runs in three phases, so
//! that allocating writes to different clusters overlap: choose a host
//! cluster (allocator lock, memory only); write the guest data and the
//! copy-on-write around it (no lock); publish the L2 entry (allocator
//! lock). Only then is the write acknowledged; the entry reaches the disk
//! with the next writeback, after the data (invariant 2).

use qblk_qcow2::header::CryptMethod;
use qblk_qcow2::mapping::{ClusterDescriptor, L2Entry, SubclusterBitmap, SubclusterState};
use qblk_qcow2::{ClusterCount, HostCluster, HostOffset};

use super::{Alloc, Writer};
use crate::buf::AlignedBuf;
use crate::error::{Corruption, Error, Result};
use crate::guest::{In, Out};
use crate::image::Image;
use crate::stats::Counters;

/// The smallest step by which the file is extended ahead of allocation.
const PREALLOC_MIN: u64 = 64 << 20;
/// The largest step (an eighth of the file in between).
const PREALLOC_MAX: u64 = 1 << 30;

/// What the rest of a newly allocated cluster needs besides the guest's
/// bytes.
#[derive(Debug, Clone, Copy)]
struct Fill {
    /// A shared cluster moves: every subcluster it has is copied.
    moves_data: bool,
    /// It must read as zeros and already does (a hole): nothing.
    zeros_in_place: bool,
}

/// The host clusters `len` bytes at `off` touch.
pub(super) fn clusters_of(img: &Image, off: HostOffset, len: u64) -> (HostCluster, ClusterCount) {
    let g = img.geometry();
    let first = g.host_cluster(off);
    let last = g.host_cluster(HostOffset(off.0 + len.max(1) - 1));
    (first, ClusterCount(last.0 - first.0 + 1))
}

impl Image {
    /// Copies into this image what its backing chain shows in the parts of
    /// `[offset, offset + len)` this image does not allocate (a live
    /// `block-stream`'s copy, a copy-on-read); returns the bytes copied.
    /// Each cluster is looked at and filled under its guest cluster lock,
    /// which every write that allocates there takes too: a guest write
    /// into the same place either came first (the place is allocated and
    /// skipped) or comes after and overwrites the copy. Writes into
    /// subclusters the image already has do not take the lock, and this
    /// never touches those. The dirty bitmaps are not marked: what the
    /// guest reads does not change.
    pub async fn populate(&self, offset: u64, len: u64) -> Result<u64> {
        let r = self.populate_inner(offset, len).await;
        self.on_error(r).await
    }

    async fn populate_inner(&self, offset: u64, len: u64) -> Result<u64> {
        let w = self.check_writable(offset, len)?;
        let g = self.geometry();
        let cs = g.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        let mut copied = 0;
        while pos < end {
            let in_cluster = g.offset_in_cluster(pos);
            let cluster_start = pos - in_cluster;
            let n = (cs - in_cluster).min(end - pos);
            let _cluster = w.lock_guest_cluster(cluster_start).await;
            let (desc, _) = self.descriptor_and_entry(pos).await?;
            for (at, run) in unallocated_runs(&desc, g, in_cluster, n) {
                let mut buf = AlignedBuf::zeroed(run as usize);
                self.read_below(cluster_start + at, &mut Out::Heap(&mut buf))
                    .await?;
                self.allocating_write_locked(w, cluster_start + at, In::Heap(&buf))
                    .await?;
                w.bump_write_gen();
                copied += run;
            }
            pos += n;
        }
        Ok(copied)
    }

    pub(super) async fn write_inner(&self, offset: u64, data: In<'_>) -> Result<()> {
        let w = self.check_writable(offset, data.len() as u64)?;
        let g = self.geometry();
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
                    Counters::add(&self.counters().in_place_writes, 1);
                    self.write_data(w, host + in_cluster, &data.sub(done, chunk))
                        .await?
                }
                None => {
                    Counters::add(&self.counters().allocating_writes, 1);
                    self.allocating_write(w, pos, data.sub(done, chunk)).await?;
                }
            }
            w.bump_write_gen();
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
        if !copied && !self.header().has_external_data_file() {
            return None;
        }
        let g = self.geometry();
        if g.extended_l2() {
            let scs = g.subcluster_size();
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
    pub(super) fn check_data_target(&self, host: u64, len: u64) -> Result<()> {
        if self.data_file().is_some() {
            return Ok(());
        }
        let cs = self.geometry().cluster_size();
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
        Err(Error::corrupt(
            self.path(),
            Corruption::DataOverMetadata {
                host: HostOffset(host),
                what,
            },
        ))
    }

    /// Writes guest data at `host_offset` (encrypting it if the image is).
    /// Guest memory goes to the disk as it is where it can.
    pub(super) async fn write_data(
        &self,
        w: &Writer,
        host_offset: u64,
        data: &In<'_>,
    ) -> Result<()> {
        self.check_data_target(host_offset, data.len() as u64)?;
        let file = self.data_file().unwrap_or(self.file());
        let io = Error::io(file.path(), "write data", host_offset);
        if self.crypto().is_none() && self.header().crypt_method == CryptMethod::None {
            return file.write_in(host_offset, data).await.map_err(io);
        }
        let crypto = self.crypto_or_err()?;
        let sector = crate::crypto::SECTOR;
        let start = host_offset - host_offset % sector;
        let end = (host_offset + data.len() as u64).next_multiple_of(sector);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let skip = (host_offset - start) as usize;
        let _guard = if skip != 0 || buf.len() != data.len() {
            // Partial sectors: decrypt what is there, patch, re-encrypt.
            let guard = w.crypto_rmw.lock().await;
            self.read_data(start, &mut Out::Heap(&mut buf)).await?;
            Some(guard)
        } else {
            None
        };
        data.copy_to(&mut buf[skip..skip + data.len()]);
        crypto.encrypt(start / sector, &mut buf);
        file.write_aligned(start, buf).await.map_err(io)
    }

    /// Makes sure the file reaches `end` bytes, extending it ahead in large
    /// steps with fallocate (blocks reserved, reading as zeros). Guest
    /// writes into a new cluster then land inside the file: on Linux file
    /// systems a direct write that extends a file takes the inode lock
    /// exclusively and leaves io_uring's fast path; one inside it does not.
    /// Best effort: without fallocate, writes extend the file. The extend
    /// lock is held across the fallocate: whoever waits for it needs the
    /// same extension before its own write.
    pub(super) async fn extend_file_to(&self, w: &Writer, end: u64) {
        if self.data_file().is_some() {
            return;
        }
        let mut x = w.extend.lock().await;
        if end <= x.file_len || x.no_prealloc {
            return;
        }
        let step = (x.file_len / 8).clamp(PREALLOC_MIN, PREALLOC_MAX);
        let target = (end + step).next_multiple_of(self.geometry().cluster_size());
        match self
            .file()
            .fallocate(0, x.file_len, target - x.file_len)
            .await
        {
            Ok(()) => x.file_len = target,
            Err(_) => x.no_prealloc = true,
        }
    }

    /// One cluster's worth (or less) of an allocating write, in three
    /// phases (see the module documentation). The guest cluster's own
    /// lock, held throughout, orders every allocation, zeroing or discard
    /// of that cluster.
    async fn allocating_write(&self, w: &Writer, pos: u64, data: In<'_>) -> Result<()> {
        let cluster_start = pos - self.geometry().offset_in_cluster(pos);
        let _cluster = w.lock_guest_cluster(cluster_start).await;
        self.allocating_write_locked(w, pos, data).await
    }

    /// [`Image::allocating_write`] with the guest cluster's lock held by
    /// the caller.
    async fn allocating_write_locked(&self, w: &Writer, pos: u64, data: In<'_>) -> Result<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let in_cluster = g.offset_in_cluster(pos);
        let cluster_start = pos - in_cluster;
        // The mapping may have changed while this task waited.
        let (desc, _) = self.descriptor_and_entry(pos).await?;
        if let Some(host) = self.in_place_target(&desc, in_cluster, data.len() as u64) {
            return self.write_data(w, host + in_cluster, &data).await;
        }
        let external = self.header().has_external_data_file();

        // Phase 1: where the data goes, and which reference it replaces.
        // `hole`: the new cluster lies past everything the file ever held
        // (a hole that reads as zeros).
        let (host, old_ref, fresh, hole) = w
            .with_alloc(self, |a: &mut Alloc, _| {
                let Alloc { rc, header, .. } = a;
                let off = |c: HostCluster| c.0 * cs;
                Ok(match desc {
                    _ if external => (cluster_start, None, false, false),
                    ClusterDescriptor::Zero {
                        preallocated: Some(h),
                        copied: true,
                    } => (h.0, None, false, false),
                    ClusterDescriptor::Standard {
                        host, copied: true, ..
                    } => (host.0, None, false, false),
                    ClusterDescriptor::Standard {
                        host,
                        copied: false,
                        ..
                    }
                    | ClusterDescriptor::Zero {
                        preallocated: Some(host),
                        copied: false,
                    } => (
                        off(rc.alloc_cluster(header)?),
                        Some((host, cs)),
                        true,
                        false,
                    ),
                    ClusterDescriptor::Compressed { host, len } => (
                        off(rc.alloc_cluster(header)?),
                        Some((host, len)),
                        true,
                        false,
                    ),
                    ClusterDescriptor::Unallocated
                    | ClusterDescriptor::Zero {
                        preallocated: None, ..
                    }
                    | ClusterDescriptor::UnallocatedSubclusters { .. } => {
                        let end = rc.end;
                        let c = rc.alloc_cluster(header)?;
                        (off(c), None, true, c >= end)
                    }
                })
            })
            .await?;
        if fresh {
            // Every new cluster, data or table, lands inside the file.
            self.extend_file_to(w, host + cs).await;
        }
        // What the rest of the cluster must read as is zeros, and the hole
        // already reads so: only the guest's bytes need writing (no
        // copy-on-write of zeros). Not for encrypted images, whose zeros
        // are ciphertext.
        let zeros_in_place = hole
            && self.header().crypt_method == CryptMethod::None
            && match desc {
                ClusterDescriptor::Zero { .. } => true,
                ClusterDescriptor::Unallocated => !self.backing_exists(),
                _ => false,
            };

        // Phase 2: guest data and copy-on-write, no lock held.
        let fill = Fill {
            moves_data: old_ref.is_some(),
            zeros_in_place,
        };
        let written = self
            .write_new_cluster_data(w, desc, pos, &data, host, fill)
            .await;

        // Phase 3: publish, or give the cluster back.
        let new_entry = match written {
            Ok(e) => e,
            Err(e) => {
                if fresh {
                    let c = g.host_cluster(HostOffset(host));
                    w.with_alloc(self, |a, _| a.rc.adjust(c, -1)).await?;
                }
                return Err(e);
            }
        };
        w.with_alloc(self, |a, staged| {
            self.set_l2_entry(a, staged, cluster_start, new_entry)?;
            if let Some((off, len)) = old_ref {
                let (first, n) = clusters_of(self, off, len);
                a.rc.release(first, n);
            }
            Ok(())
        })
        .await?;
        w.settle(self).await
    }

    /// Writes an allocating write's data (and copy-on-write) to `host`;
    /// returns the L2 entry that will map it.
    async fn write_new_cluster_data(
        &self,
        w: &Writer,
        desc: ClusterDescriptor,
        pos: u64,
        data: &In<'_>,
        host: u64,
        fill: Fill,
    ) -> Result<L2Entry> {
        let Fill {
            moves_data,
            zeros_in_place,
        } = fill;
        let g = self.geometry();
        let in_cluster = g.offset_in_cluster(pos);
        let cluster_start = pos - in_cluster;
        if !g.extended_l2() {
            if zeros_in_place {
                self.write_data(w, host + in_cluster, data).await?;
            } else {
                self.write_whole_cluster(w, cluster_start, in_cluster, data, host)
                    .await?;
            }
            return Ok(L2Entry::standard(
                HostOffset(host),
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
            self.write_whole_cluster(w, cluster_start, in_cluster, data, host)
                .await?;
        } else {
            // Only the touched subclusters are written (edges completed from
            // what shows through now); the others keep their state.
            let start = u64::from(first) * scs;
            let end = (u64::from(last) + 1) * scs;
            let mut buf = vec![0u8; (end - start) as usize];
            self.read(cluster_start + start, &mut buf).await?;
            let at = (in_cluster - start) as usize;
            Counters::add(&self.counters().cow_bytes, (buf.len() - data.len()) as u64);
            data.copy_to(&mut buf[at..at + data.len()]);
            self.write_data(w, host + start, &In::Heap(&buf)).await?;
        }
        Ok(L2Entry::standard(
            HostOffset(host),
            true,
            SubclusterBitmap::from_parts(old.allocation() | touched, old.zero() & !touched),
        ))
    }

    /// Writes a whole new cluster: the guest data inside what the cluster
    /// reads as now (copy-on-write).
    async fn write_whole_cluster(
        &self,
        w: &Writer,
        cluster_start: u64,
        in_cluster: u64,
        data: &In<'_>,
        host: u64,
    ) -> Result<()> {
        let cs = self.geometry().cluster_size() as usize;
        self.check_data_target(host, cs as u64)?;
        // A data file is exactly the virtual size: never write past it.
        let n = match self.data_file() {
            Some(_) => (self.size() - cluster_start).min(cs as u64) as usize,
            None => cs,
        };
        if data.len() == cs && data.is_guest() && self.header().crypt_method == CryptMethod::None {
            // The guest data is the whole cluster: it goes to disk as it is.
            return self.write_data(w, host, &data.sub(0, n)).await;
        }
        let mut buf = AlignedBuf::zeroed(cs);
        if data.len() != cs {
            Counters::add(&self.counters().cow_bytes, (cs - data.len()) as u64);
            let end = (cluster_start + cs as u64).min(self.size());
            let len = (end - cluster_start) as usize;
            self.read(cluster_start, &mut buf[..len]).await?;
        }
        data.copy_to(&mut buf[in_cluster as usize..in_cluster as usize + data.len()]);
        if self.header().crypt_method != CryptMethod::None {
            self.crypto_or_err()?
                .encrypt(host / crate::crypto::SECTOR, &mut buf);
        }
        let io = Error::io(self.path(), "write data", host);
        match self.data_file() {
            Some(f) => f.write(host, &buf[..n]).await.map_err(io),
            None => self.file().write_aligned(host, buf).await.map_err(io),
        }
    }
}

/// The runs (offset in the cluster, length) of `[from, from + len)` that a
/// cluster described by `desc` leaves to the backing chain: all of it when
/// unallocated, its unallocated subclusters with extended L2 entries,
/// nothing when it holds data, zeros or compressed data.
fn unallocated_runs(
    desc: &ClusterDescriptor,
    g: qblk_qcow2::Geometry,
    from: u64,
    len: u64,
) -> Vec<(u64, u64)> {
    let bitmap = match *desc {
        ClusterDescriptor::Unallocated => return vec![(from, len)],
        ClusterDescriptor::UnallocatedSubclusters { subclusters }
        | ClusterDescriptor::Standard { subclusters, .. }
            if g.extended_l2() =>
        {
            subclusters
        }
        _ => return Vec::new(),
    };
    let scs = g.subcluster_size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = from;
    while at < from + len {
        let sc_end = ((at / scs) + 1) * scs;
        let n = sc_end.min(from + len) - at;
        if bitmap.state((at / scs) as u32) == SubclusterState::Unallocated {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        at += n;
    }
    runs
}
