//! Storing the persistent dirty bitmaps (`crate::bitmaps`) and the
//! operations on them.
//!
//! A store allocates new clusters for what it writes (the bitmaps' data
//! and tables, the directory) and hands the writes to the writeback, which
//! makes them and their refcounts durable before the header that names
//! the new directory; the clusters of what that header no longer names are
//! released after it, like any replaced structure. A store that leaves the
//! bitmaps in use (the image stays open for writing) writes no data: an
//! in-use bitmap's bits on disk are never trusted, so only new bitmaps get
//! a table (of zeros) and the directory is rewritten.

use qblk_qcow2::bitmap::{BitmapFlags, BitmapsExtension, bitmap_table_entries};
use qblk_qcow2::header::{AutoclearFeatures, HeaderExtension, ext_type};
use qblk_qcow2::{ClusterCount, HostCluster};

use super::{Synced, Writer};
use crate::bitmaps::{BitmapInfo, data_bytes};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::image::Image;

/// A write a store hands to the writeback.
#[derive(Debug)]
pub(crate) struct ExtraWrite {
    pub(crate) what: &'static str,
    pub(crate) offset: u64,
    pub(crate) buf: AlignedBuf,
}

impl ExtraWrite {
    pub(crate) fn copy(&self) -> ExtraWrite {
        let mut buf = AlignedBuf::zeroed(self.buf.len());
        buf.copy_from_slice(&self.buf);
        ExtraWrite {
            what: self.what,
            offset: self.offset,
            buf,
        }
    }
}

/// What a store writes for one bitmap.
enum Plan {
    /// Kept as on disk (inconsistent, or in use with a table already).
    Keep,
    /// A new table: per entry, the data cluster's bytes (`None`: zeros).
    New { chunks: Vec<Option<Vec<u8>>> },
}

impl Writer {
    /// Stores the bitmaps (see the module documentation). `in_use` keeps
    /// the consistent ones marked in use; `released` are clusters of
    /// bitmaps removed since the last store.
    pub(super) async fn store_bitmaps(
        &self,
        img: &Image,
        synced: &mut Synced,
        in_use: bool,
    ) -> Result<()> {
        let g = img.geometry();
        let cs = g.cluster_size();
        let (size, snaps) = self.bitmaps.snapshot();
        let (mut entries, dir, removed) = {
            let mut s = self.bitmaps.write();
            let entries: Vec<_> = s
                .bitmaps
                .iter()
                .map(|b| (b.entry.clone(), b.clusters.clone()))
                .collect();
            (entries, s.dir, std::mem::take(&mut s.removed))
        };
        if entries.is_empty() && dir.is_none() && removed.is_empty() {
            return Ok(());
        }
        let mut plans: Vec<Plan> = entries.iter().map(|_| Plan::Keep).collect();
        for (i, words) in &snaps {
            let (e, clusters) = &entries[*i];
            let table_entries = bitmap_table_entries(size, e.granularity_bits, cs) as usize;
            if in_use {
                if !clusters.is_empty() {
                    continue;
                }
                plans[*i] = Plan::New {
                    chunks: vec![None; table_entries],
                };
                continue;
            }
            let bytes = data_bytes(words, size, e.granularity_bits);
            let chunks = bytes
                .chunks(cs as usize)
                .map(|c| c.iter().any(|&b| b != 0).then(|| c.to_vec()))
                .collect();
            plans[*i] = Plan::New { chunks };
        }
        // Allocate: data clusters one by one, each table and the directory
        // as runs. A step answered with a miss runs again; what it got so
        // far is kept.
        let data_needed: usize = plans
            .iter()
            .map(|p| match p {
                Plan::New { chunks } => chunks.iter().flatten().count(),
                Plan::Keep => 0,
            })
            .sum();
        let table_runs: Vec<u64> = plans
            .iter()
            .map(|p| match p {
                Plan::New { chunks } => g.clusters_for((chunks.len() as u64 * 8).max(1)),
                Plan::Keep => 0,
            })
            .collect();
        let mut data_clusters: Vec<HostCluster> = Vec::with_capacity(data_needed);
        let mut tables: Vec<Option<HostCluster>> = Vec::new();
        self.with_alloc(img, |a, _| {
            while data_clusters.len() < data_needed {
                let c = a.rc.alloc_cluster(&mut a.header)?;
                data_clusters.push(c);
            }
            while tables.len() < table_runs.len() {
                let n = table_runs[tables.len()];
                tables.push(match n {
                    0 => None,
                    n => Some(a.rc.alloc_run(&mut a.header, ClusterCount(n))?),
                });
            }
            Ok(())
        })
        .await?;
        // The writes, and each bitmap's entry and clusters as stored.
        let mut writes = Vec::new();
        let mut freed: Vec<u64> = removed;
        let mut data_iter = data_clusters.into_iter();
        for (i, plan) in plans.into_iter().enumerate() {
            let (e, clusters) = &mut entries[i];
            let consistent = snaps.iter().any(|(j, _)| *j == i);
            if consistent {
                e.flags.set(BitmapFlags::IN_USE, in_use);
            }
            let Plan::New { chunks } = plan else { continue };
            let table_at = tables[i].expect("allocated for a new table");
            let mut table = AlignedBuf::zeroed((table_runs[i] * cs) as usize);
            let mut used = vec![];
            for k in 0..table_runs[i] {
                used.push(table_at.0 + k);
            }
            for (k, chunk) in chunks.iter().enumerate() {
                let Some(chunk) = chunk else { continue };
                let c = data_iter.next().expect("one cluster per data chunk");
                let off = c.0 * cs;
                let mut buf = AlignedBuf::zeroed(cs as usize);
                buf[..chunk.len()].copy_from_slice(chunk);
                writes.push(ExtraWrite {
                    what: "write bitmap data",
                    offset: off,
                    buf,
                });
                table[k * 8..k * 8 + 8].copy_from_slice(&off.to_be_bytes());
                used.push(c.0);
            }
            writes.push(ExtraWrite {
                what: "write bitmap table",
                offset: table_at.0 * cs,
                buf: table,
            });
            e.bitmap_table_offset = table_at.0 * cs;
            e.bitmap_table_size = u32::try_from(chunks.len()).expect("bounded by the table limit");
            freed.append(clusters);
            *clusters = used;
        }
        // The directory, in a run of its own.
        let mut dir_bytes = Vec::new();
        for (e, _) in &entries {
            e.encode(&mut dir_bytes);
        }
        let dir_at = if entries.is_empty() {
            None
        } else {
            let n = g.clusters_for(dir_bytes.len() as u64);
            let at = self
                .with_alloc(img, |a, _| a.rc.alloc_run(&mut a.header, ClusterCount(n)))
                .await?;
            let mut buf = AlignedBuf::zeroed((n * cs) as usize);
            buf[..dir_bytes.len()].copy_from_slice(&dir_bytes);
            writes.push(ExtraWrite {
                what: "write bitmap directory",
                offset: at.0 * cs,
                buf,
            });
            Some(at.0 * cs)
        };
        if let Some((off, len)) = dir {
            freed.extend((0..g.clusters_for(len)).map(|k| off / cs + k));
        }
        {
            let mut a = self.lock_alloc();
            a.extra_writes.extend(writes);
            match dir_at {
                Some(at) => {
                    a.header.set_extension(
                        ext_type::BITMAPS,
                        Some(HeaderExtension::Bitmaps(BitmapsExtension {
                            nb_bitmaps: entries.len() as u32,
                            reserved: 0,
                            bitmap_directory_size: dir_bytes.len() as u64,
                            bitmap_directory_offset: at,
                        })),
                    );
                    a.header.autoclear_features |= AutoclearFeatures::BITMAPS;
                }
                None => {
                    a.header.set_extension(ext_type::BITMAPS, None);
                    a.header
                        .autoclear_features
                        .remove(AutoclearFeatures::BITMAPS);
                }
            }
            // Dropped once the header without them is durable.
            a.rc.deferred_releases
                .extend(freed.into_iter().map(HostCluster));
        }
        self.bitmaps
            .stored(entries, dir_at.map(|at| (at, dir_bytes.len() as u64)));
        self.writeback_locked(img, synced, true).await
    }
}

impl Image {
    /// The image's persistent dirty bitmaps (those of a writable image as
    /// kept in memory; none for a read-only one).
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.writer().map(|w| w.bitmaps.info()).unwrap_or_default()
    }

    /// The on-disk form of bitmap `name`'s bits (bit `i` is granule `i`,
    /// bit `i % 8` of byte `i / 8`) and its granularity.
    pub fn bitmap_data(&self, name: &str) -> Option<(u64, Vec<u8>)> {
        let (g, words) = self.writer()?.bitmaps.bits_of(name)?;
        Some((1 << g, data_bytes(&words, self.size(), g)))
    }

    /// Adds an empty persistent bitmap (qemu-img bitmap --add), stored at
    /// once.
    pub async fn bitmap_add(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        self.check_writable(0, 0)?;
        if !self.header().is_v3() {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            });
        }
        self.bitmap_op(|b| b.add(self.path(), name, granularity, enabled))
            .await
    }

    /// Removes bitmap `name` (its clusters are freed).
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_op(|b| b.remove(self.path(), name)).await
    }

    /// Clears every bit of bitmap `name`.
    pub async fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_op(|b| b.clear(self.path(), name)).await
    }

    /// Enables (tracks writes) or disables bitmap `name`.
    pub async fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_op(|b| b.set_enabled(self.path(), name, enabled))
            .await
    }

    /// ORs bitmap `src_name` of `src` (this image when `None`) into bitmap
    /// `name`. The source's bits are read as its writer keeps them, or
    /// from its disk for an image open read-only.
    pub async fn bitmap_merge(
        &self,
        name: &str,
        src: Option<&Image>,
        src_name: &str,
    ) -> Result<()> {
        let w = self.check_writable(0, 0)?;
        let (bits, words) = match src {
            None => w.bitmaps.bits_of(src_name),
            Some(img) => crate::bitmaps::read_bits(img, src_name).await?,
        }
        .ok_or_else(|| Error::Unsupported {
            path: src.map_or(self.path(), Image::path).to_owned(),
            what: format!("Dirty bitmap '{src_name}' not found"),
        })?;
        self.bitmap_op(|b| b.merge(self.path(), name, bits, &words))
            .await
    }

    /// Changes the bitmaps and stores them, still in use, both under the
    /// commit lock: the list never changes under a store in progress (two
    /// control-socket clients at once), whose directory entries it matches
    /// to the bitmaps by position.
    async fn bitmap_op(
        &self,
        change: impl FnOnce(&crate::bitmaps::Bitmaps) -> Result<()>,
    ) -> Result<()> {
        let w = self.check_writable(0, 0)?;
        let mut synced = w.commit.lock().await;
        change(&w.bitmaps)?;
        let r = w.store_bitmaps(self, &mut synced, true).await;
        drop(synced);
        self.on_error(r).await
    }
}
