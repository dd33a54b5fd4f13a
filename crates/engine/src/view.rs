//! A read-only view of one internal snapshot of an open image: the disk
//! as it was when the snapshot was taken, read while the active image
//! goes on being written (`qblk serve`'s NBD exports).
//!
//! Why this is safe against the writer: everything the snapshot's L1
//! table reaches — its L2 tables and their data clusters — has a
//! refcount above 1 while the snapshot exists, so the write path copies
//! a cluster before changing it and never writes one of them in place.
//! The snapshot's L2 tables are read from the file into the view's own
//! cache, never from the active image's (whose dirty tables are the
//! active image's, not the snapshot's): on disk they were complete when
//! the snapshot was made (its creation starts with a writeback) and stay
//! unchanged until the snapshot is deleted. Deleting the snapshot under
//! a live view is the caller's to prevent (the control socket refuses
//! it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use qblk_qcow2::mapping::L1Entry;

use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::map::BlockStatus;

/// L2 tables the view keeps in memory at most (a cluster each).
const CACHED_TABLES: usize = 64;

/// A snapshot's L1 table and a cache of its L2 tables.
#[derive(Debug)]
pub struct SnapshotView {
    name: String,
    pub(crate) l1: Vec<L1Entry>,
    size: u64,
    tables: Mutex<HashMap<u64, Arc<AlignedBuf>>>,
}

impl SnapshotView {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk size the snapshot recorded.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AlignedBuf>>> {
        // A panic while holding it is a bug; the cache stays usable.
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The snapshot's L2 table at `offset`, read from the file.
    pub(crate) async fn l2_table(&self, img: &Image, offset: u64) -> Result<Arc<AlignedBuf>> {
        if let Some(t) = self.cache().get(&offset) {
            return Ok(t.clone());
        }
        let cs = img.geometry().cluster_size() as usize;
        let t = Arc::new(img.file().read(offset, cs).await.map_err(Error::io(
            img.path(),
            "read snapshot L2 table",
            offset,
        ))?);
        let mut cache = self.cache();
        if cache.len() >= CACHED_TABLES {
            cache.clear();
        }
        cache.insert(offset, t.clone());
        Ok(t)
    }
}

impl Image {
    /// A view of internal snapshot `name` (the first of that name).
    pub async fn snapshot_view(&self, name: &str) -> Result<SnapshotView> {
        let list = self.snapshots().await?;
        let Some(sn) = list.iter().find(|s| s.name == name.as_bytes()) else {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: format!("no internal snapshot named '{name}'"),
            });
        };
        let l1 = self.read_snapshot_l1(sn).await?;
        Ok(SnapshotView {
            name: name.to_owned(),
            l1,
            size: sn.disk_size().unwrap_or(self.size()),
            tables: Mutex::default(),
        })
    }

    /// Reads bytes `[offset, offset + buf.len())` of the snapshot's disk.
    pub async fn view_read(&self, view: &SnapshotView, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_in(Some(view), offset, crate::guest::Out::Heap(buf))
            .await
    }

    /// The status of the run of the snapshot's disk from `pos` (at most
    /// `max` bytes), over the backing chain: as [`Image::block_status`]
    /// answers for the active disk. A length of 0 means `pos` is at or
    /// past the end.
    pub async fn view_block_status(
        &self,
        view: &SnapshotView,
        pos: u64,
        max: u64,
    ) -> Result<(BlockStatus, u64)> {
        self.block_status_in(Some(view), pos, max).await
    }
}
