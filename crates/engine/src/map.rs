//! `qblk map`: where each guest range of an image (and its backing chain)
//! lives, as qemu-img map reports it.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use qblk_qcow2::mapping::{ClusterDescriptor, SubclusterState};

use crate::file::HostFile;
use crate::image::{BackingRef as Backing, Image, Result};
use crate::view::SnapshotView;

/// A layer of a backing chain ([`Image::chain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    pub depth: u32,
    pub path: PathBuf,
    pub format: &'static str,
}

/// One run of guest bytes with the same status (qemu-img map's entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// The layer of the backing chain that decided this range (0: the image).
    pub depth: u32,
    /// Allocated in some layer (else zeros come from nowhere).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data (possibly a hole in the host file).
    pub data: bool,
    pub compressed: bool,
    /// Host offset of the data, when it has one.
    pub offset: Option<u64>,
    /// The host file `offset` refers to.
    pub file: Option<PathBuf>,
}

impl MapEntry {
    /// Whether `next` continues this entry.
    fn continues(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Whether host bytes `[offset, offset + len)` of `file` start with data
/// or a hole, and how long that run is (SEEK_DATA / SEEK_HOLE).
fn data_or_hole(file: &HostFile, offset: u64, len: u64) -> (bool, u64) {
    let fd = file.as_raw_fd();
    let Ok(off) = libc::off_t::try_from(offset) else {
        return (true, len);
    };
    // SAFETY: lseek on an open descriptor has no memory effects.
    let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after offset (a hole up to and past EOF).
        return (false, len);
    }
    let data = data as u64;
    if data > offset {
        return (false, (data - offset).min(len));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
    if hole < 0 {
        return (true, len);
    }
    (true, (hole as u64 - offset).clamp(1, len))
}

/// The map of a raw file of `size` guest bytes: data and holes.
pub fn raw_map(file: &HostFile, size: u64) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (is_data, n) = data_or_hole(file, pos, size - pos);
        let e = MapEntry {
            start: pos,
            length: n,
            depth: 0,
            present: true,
            zero: !is_data,
            data: is_data,
            compressed: false,
            offset: Some(pos),
            file: Some(file.path().to_owned()),
        };
        pos += n;
        match out.last_mut() {
            Some(last) if last.continues(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

impl Image {
    /// The whole map of the image, merged as qemu-img merges it.
    pub async fn map(&self) -> Result<Vec<MapEntry>> {
        let mut out: Vec<MapEntry> = Vec::new();
        let mut pos = 0;
        while pos < self.size() {
            let e = self.status(pos, self.size() - pos, 0).await?;
            pos += e.length;
            match out.last_mut() {
                Some(last) if last.continues(&e) => last.length += e.length,
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// Status of the run starting at `pos` (at most `max` bytes, within one
    /// cluster or subcluster run) in this layer at depth `depth`.
    fn status<'a>(
        &'a self,
        pos: u64,
        max: u64,
        depth: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<MapEntry>> + 'a>> {
        Box::pin(async move {
            let g = self.geometry();
            let in_cluster = g.offset_in_cluster(pos);
            // A range with no L2 table is one run, however large.
            let l1_index = g.l1_index(g.guest_cluster(qblk_qcow2::GuestOffset(pos))) as usize;
            let no_table = self
                .lock_tables()
                .l1
                .get(l1_index)
                .is_none_or(|e| e.l2_offset().is_none());
            if no_table {
                let len = (g.l2_coverage_bytes() - pos % g.l2_coverage_bytes()).min(max);
                return self.status_below(pos, len, depth).await;
            }
            let mut len = (g.cluster_size() - in_cluster).min(max);
            let desc = self.descriptor(pos).await?;
            let host_file = self.data_file().unwrap_or(self.file());
            // Like QEMU, encrypted data has no usable host offset.
            let encrypted = self.header().crypt_method != qblk_qcow2::header::CryptMethod::None;
            let entry = |present, zero, data, compressed, offset: Option<u64>, len| MapEntry {
                start: pos,
                length: len,
                depth,
                present,
                zero,
                data,
                compressed,
                file: offset.map(|_| host_file.path().to_owned()),
                offset,
            };
            // The state of a subcluster run, or the whole cluster.
            let (state, host) = match desc {
                ClusterDescriptor::Compressed { .. } => {
                    return Ok(entry(true, false, true, true, None, len));
                }
                ClusterDescriptor::Zero { preallocated, .. } => {
                    return Ok(entry(
                        true,
                        true,
                        false,
                        false,
                        preallocated
                            .filter(|_| !encrypted)
                            .map(|h| h.0 + in_cluster),
                        len,
                    ));
                }
                ClusterDescriptor::Unallocated => (SubclusterState::Unallocated, None),
                ClusterDescriptor::Standard {
                    host, subclusters, ..
                } => {
                    let (s, n) = run_of(&g, subclusters, in_cluster, len);
                    len = n;
                    (s, Some(host.0))
                }
                ClusterDescriptor::UnallocatedSubclusters { subclusters } => {
                    let (s, n) = run_of(&g, subclusters, in_cluster, len);
                    len = n;
                    (s, None)
                }
            };
            match state {
                SubclusterState::Allocated if encrypted => {
                    Ok(entry(true, false, true, false, None, len))
                }
                SubclusterState::Allocated => {
                    let host =
                        host.expect("allocated subclusters have a host cluster") + in_cluster;
                    // Holes count only in images that look preallocated,
                    // as QEMU counts them (`metadata_preallocated`).
                    let (is_data, n) = if self.metadata_preallocated().await {
                        data_or_hole(host_file, host, len)
                    } else {
                        (true, len)
                    };
                    Ok(entry(true, !is_data, true, false, Some(host), n))
                }
                SubclusterState::Zero => Ok(entry(
                    true,
                    true,
                    false,
                    false,
                    host.filter(|_| !encrypted).map(|h| h + in_cluster),
                    len,
                )),
                SubclusterState::Unallocated => self.status_below(pos, len, depth).await,
            }
        })
    }

    /// Status of an unallocated run: from the backing file, or zeros.
    async fn status_below(&self, pos: u64, len: u64, depth: u32) -> Result<MapEntry> {
        let nothing = |len| MapEntry {
            start: pos,
            length: len,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
            file: None,
        };
        match self.backing() {
            None => Ok(nothing(len)),
            Some(Backing::Qcow2(img)) => {
                if pos >= img.size() {
                    return Ok(nothing(len));
                }
                img.status(pos, len.min(img.size() - pos), depth + 1).await
            }
            Some(Backing::Raw { file, size }) => {
                if pos >= size {
                    return Ok(nothing(len));
                }
                let len = len.min(size - pos);
                let (is_data, n) = data_or_hole(file, pos, len);
                Ok(MapEntry {
                    start: pos,
                    length: n,
                    depth: depth + 1,
                    present: true,
                    zero: !is_data,
                    data: is_data,
                    compressed: false,
                    offset: Some(pos),
                    file: Some(file.path().to_owned()),
                })
            }
        }
    }
}

/// The state of the subcluster holding `in_cluster` and how many bytes
/// (at most `max`) the run of subclusters in that state covers.
fn run_of(
    g: &qblk_qcow2::Geometry,
    bitmap: qblk_qcow2::mapping::SubclusterBitmap,
    in_cluster: u64,
    max: u64,
) -> (SubclusterState, u64) {
    if !g.extended_l2() {
        return (SubclusterState::Allocated, max);
    }
    let scs = g.subcluster_size();
    let first = (in_cluster / scs) as u32;
    let state = bitmap.state(first);
    let mut end = (u64::from(first) + 1) * scs;
    while end < g.cluster_size() && bitmap.state((end / scs) as u32) == state {
        end += scs;
    }
    (state, (end - in_cluster).min(max))
}

/// What QEMU's block layer answers for a run of guest bytes when asked
/// about a whole backing chain (`bdrv_block_status_above` with no base):
/// the flags `qemu-img compare` decides by, strict mode comparing all of
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStatus {
    /// Stored data (which may still read as zeros).
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// The run has a host offset.
    pub offset_valid: bool,
    /// Some layer of the chain decides the run (else it reads from
    /// nowhere: zeros).
    pub allocated: bool,
    /// The run ends at the end of the layer that answered.
    pub eof: bool,
}

/// QEMU's qcow2 subcluster types: what one stretch of an L2 table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubclusterType {
    Normal,
    ZeroPlain,
    ZeroAlloc,
    UnallocatedPlain,
    UnallocatedAlloc,
    Compressed,
}

impl SubclusterType {
    /// Whether a run of this type continues only over contiguous host
    /// clusters.
    fn has_host_offset(self) -> bool {
        matches!(
            self,
            Self::Normal | Self::ZeroAlloc | Self::UnallocatedAlloc
        )
    }
}

impl Image {
    /// The status of the run of guest bytes from `pos` (at most `max`
    /// bytes) over the whole backing chain, as QEMU's block layer reports
    /// it: the answer of the first layer that allocates the run, zeros
    /// beyond a shorter backing file counting as allocated there, and runs
    /// no longer than QEMU's (one L2 table of one layer at a time, host
    /// clusters contiguous, split where the host file has holes). A
    /// length of 0 means `pos` is at or past the end.
    pub async fn block_status(&self, pos: u64, max: u64) -> Result<(BlockStatus, u64)> {
        self.block_status_in(None, pos, max).await
    }

    /// [`Image::block_status`] of the active disk, or of a snapshot's.
    pub(crate) async fn block_status_in(
        &self,
        view: Option<&SnapshotView>,
        pos: u64,
        max: u64,
    ) -> Result<(BlockStatus, u64)> {
        let (mut status, mut len) = self.layer_status_in(view, pos, max).await?;
        if len == 0 || status.allocated {
            return Ok((status, len));
        }
        let eof = status.eof.then_some(pos + len);
        let mut below = self.backing();
        while let Some(layer) = below {
            let (s, n) = match layer {
                Backing::Qcow2(img) => img.layer_status(pos, len).await?,
                Backing::Raw { file, size } => raw_layer_status(file, size, pos, len),
            };
            if n == 0 {
                // Beyond the end of a shorter layer: zeros this layer
                // decides.
                status = BlockStatus {
                    zero: true,
                    allocated: true,
                    ..BlockStatus::default()
                };
                break;
            }
            (status, len) = (s, n);
            if s.allocated {
                status.eof = false;
                break;
            }
            below = match layer {
                Backing::Qcow2(img) => img.backing(),
                Backing::Raw { .. } => None,
            };
        }
        if eof == Some(pos + len) {
            status.eof = true;
        }
        Ok((status, len))
    }

    /// Where the run of guest bytes from `pos` (at most `max` bytes) is
    /// decided, for the live jobs that move data between layers: whether
    /// this image allocates it (data or zeros), and whether some layer
    /// above depth `base` does (this image is depth 0; `None` counts the
    /// whole chain). A `block-stream` copies what lies above its base but
    /// not in the image; a `block-commit` copies what lies above its base.
    /// Beyond the end of a shorter layer, that layer decides (zeros).
    pub async fn allocation_above(
        &self,
        base: Option<u32>,
        pos: u64,
        max: u64,
    ) -> Result<(bool, bool, u64)> {
        let (status, mut len) = self.layer_status(pos, max).await?;
        if len == 0 || status.allocated {
            return Ok((status.allocated, status.allocated, len));
        }
        let mut below = self.backing();
        let mut depth = 1;
        while let Some(layer) = below {
            if base == Some(depth) {
                break;
            }
            let (s, n) = match layer {
                Backing::Qcow2(img) => img.layer_status(pos, len).await?,
                Backing::Raw { file, size } => raw_layer_status(file, size, pos, len),
            };
            if n == 0 || s.allocated {
                return Ok((false, true, if n == 0 { len } else { n }));
            }
            len = n;
            below = match layer {
                Backing::Qcow2(img) => img.backing(),
                Backing::Raw { .. } => None,
            };
            depth += 1;
        }
        Ok((false, false, len))
    }

    /// The layers of the backing chain below this image, top down: depth
    /// (1 is the backing file), the file as the layer above names it, and
    /// its format.
    pub fn chain(&self) -> Vec<ChainLayer> {
        let mut out = Vec::new();
        let mut below = self.backing();
        while let Some(layer) = below {
            let (path, format) = match layer {
                Backing::Qcow2(img) => (img.path().to_owned(), "qcow2"),
                Backing::Raw { file, .. } => (file.path().to_owned(), "raw"),
            };
            out.push(ChainLayer {
                depth: out.len() as u32 + 1,
                path,
                format,
            });
            below = match layer {
                Backing::Qcow2(img) => img.backing(),
                Backing::Raw { .. } => None,
            };
        }
        out
    }

    /// The status of the run from `pos` in this layer alone.
    async fn layer_status(&self, pos: u64, max: u64) -> Result<(BlockStatus, u64)> {
        self.layer_status_in(None, pos, max).await
    }

    async fn layer_status_in(
        &self,
        view: Option<&SnapshotView>,
        pos: u64,
        max: u64,
    ) -> Result<(BlockStatus, u64)> {
        let size = view.map_or(self.size(), SnapshotView::size);
        if pos >= size {
            let eof = BlockStatus {
                eof: true,
                ..BlockStatus::default()
            };
            return Ok((eof, 0));
        }
        let g = self.geometry();
        let coverage = g.l2_coverage_bytes();
        let limit = max.min(size - pos).min(coverage - pos % coverage);
        let l1_index = g.l1_index(g.guest_cluster(qblk_qcow2::GuestOffset(pos))) as usize;
        let no_table = match view {
            Some(v) => v.l1.get(l1_index).copied(),
            None => self.lock_tables().l1.get(l1_index).copied(),
        }
        .is_none_or(|e| e.l2_offset().is_none());
        let (kind, host, mut len) = if no_table {
            (SubclusterType::UnallocatedPlain, None, limit)
        } else {
            let (kind, host, n, whole) = self.subcluster_run(view, pos, limit).await?;
            let mut len = n;
            let mut at_cluster_end = whole;
            // Whole clusters of the same type (and contiguous on the
            // host where they have a host cluster) continue the run;
            // compressed clusters go one by one.
            while at_cluster_end && len < limit && kind != SubclusterType::Compressed {
                let (k, h, n, whole) = self.subcluster_run(view, pos + len, limit - len).await?;
                let contiguous = match (host, h) {
                    (Some(a), Some(b)) => a + (pos % g.cluster_size()) + len == b,
                    _ => true,
                };
                if k != kind || (kind.has_host_offset() && !contiguous) {
                    break;
                }
                len += n;
                at_cluster_end = whole;
            }
            (kind, host, len)
        };
        let encrypted = self.header().crypt_method != qblk_qcow2::header::CryptMethod::None;
        let mut status = BlockStatus {
            offset_valid: kind.has_host_offset() && !encrypted,
            zero: matches!(kind, SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc),
            data: matches!(kind, SubclusterType::Normal | SubclusterType::Compressed),
            ..BlockStatus::default()
        };
        if status.data && status.offset_valid && self.metadata_preallocated().await {
            // The host file says where it has holes: those read as zeros.
            let host_file = self.data_file().unwrap_or(self.file());
            let host =
                host.expect("normal clusters have a host cluster") + g.offset_in_cluster(pos);
            let (is_data, n) = data_or_hole(host_file, host, len);
            len = n;
            status.zero = !is_data;
        }
        if status.data || status.zero {
            status.allocated = true;
        } else {
            match self.backing() {
                None => status.zero = true,
                Some(Backing::Qcow2(img)) => status.zero = pos >= img.size(),
                Some(Backing::Raw { size, .. }) => status.zero = pos >= size,
            }
        }
        status.eof = pos + len == size;
        Ok((status, len))
    }

    /// Whether the image looks created with preallocation=metadata, as
    /// QEMU guesses it: more clusters have a refcount than the host file
    /// stores, by a ninth or by two clusters. Only for such images does
    /// QEMU's block status ask the host file where data clusters have
    /// holes; elsewhere a data cluster is data, holes or not. An image
    /// whose refcounts cannot be read is taken as not preallocated, as
    /// QEMU takes it.
    pub(crate) async fn metadata_preallocated(&self) -> bool {
        if let Some(&known) = self.metadata_preallocated_cell().get() {
            return known;
        }
        let found = self.detect_metadata_preallocation().await.unwrap_or(false);
        *self.metadata_preallocated_cell().get_or_init(|| found)
    }

    async fn detect_metadata_preallocation(&self) -> Option<bool> {
        use std::os::unix::fs::MetadataExt;
        let g = self.geometry();
        let cs = g.cluster_size();
        let meta = std::fs::metadata(self.file().path()).ok()?;
        let stored_clusters = meta.blocks() * 512 / cs;
        let threshold = (stored_clusters * 10 / 9).max(stored_clusters + 2);
        let end_cluster = meta.len().div_ceil(cs);
        let (table_offset, table_len) = self.lock_tables().refcount_table;
        let per_block = g.refcount_block_entries();
        let blocks = end_cluster.div_ceil(per_block).min(table_len / 8);
        let table = self
            .file()
            .read(table_offset, usize::try_from(blocks * 8).ok()?)
            .await
            .ok()?;
        let mut counted = 0u64;
        for (i, raw) in qblk_qcow2::decode_table(&table).enumerate() {
            let Some(block) = qblk_qcow2::refcount::RefcountTableEntry(raw).block_offset() else {
                continue;
            };
            if block.0 % cs != 0 {
                return None;
            }
            let buf = self.file().read(block.0, cs as usize).await.ok()?;
            let first = i as u64 * per_block;
            let n = per_block.min(end_cluster.saturating_sub(first));
            for j in 0..n as usize {
                if qblk_qcow2::refcount::get_refcount(&buf, g.refcount_order(), j) != 0 {
                    counted += 1;
                    if counted >= threshold {
                        return Some(true);
                    }
                }
            }
        }
        Some(false)
    }

    /// The type of the subcluster holding `pos`, the host cluster of its
    /// cluster (types that have one), how many bytes (at most `max`) of
    /// this cluster from `pos` share the type, and whether they reach the
    /// end of the cluster.
    async fn subcluster_run(
        &self,
        view: Option<&SnapshotView>,
        pos: u64,
        max: u64,
    ) -> Result<(SubclusterType, Option<u64>, u64, bool)> {
        let g = self.geometry();
        let in_cluster = g.offset_in_cluster(pos);
        let to_end = g.cluster_size() - in_cluster;
        let (kind, host, n) = match self.descriptor_in(view, pos).await? {
            ClusterDescriptor::Unallocated => (SubclusterType::UnallocatedPlain, None, to_end),
            ClusterDescriptor::Zero {
                preallocated: Some(h),
                ..
            } => (SubclusterType::ZeroAlloc, Some(h.0), to_end),
            ClusterDescriptor::Zero {
                preallocated: None, ..
            } => (SubclusterType::ZeroPlain, None, to_end),
            ClusterDescriptor::Compressed { .. } => (SubclusterType::Compressed, None, to_end),
            ClusterDescriptor::Standard {
                host, subclusters, ..
            } => {
                let (state, n) = run_of(&g, subclusters, in_cluster, to_end);
                let kind = match state {
                    SubclusterState::Allocated => SubclusterType::Normal,
                    SubclusterState::Zero => SubclusterType::ZeroAlloc,
                    SubclusterState::Unallocated => SubclusterType::UnallocatedAlloc,
                };
                (kind, Some(host.0), n)
            }
            ClusterDescriptor::UnallocatedSubclusters { subclusters } => {
                let (state, n) = run_of(&g, subclusters, in_cluster, to_end);
                let kind = match state {
                    SubclusterState::Zero => SubclusterType::ZeroPlain,
                    // Without a host cluster no subcluster is allocated
                    // (decoding refuses the bit).
                    SubclusterState::Allocated | SubclusterState::Unallocated => {
                        SubclusterType::UnallocatedPlain
                    }
                };
                (kind, None, n)
            }
        };
        let len = n.min(max);
        Ok((kind, host, len, len == to_end))
    }
}

/// The status of the run from `pos` (at most `max` bytes) of a raw file
/// of `size` bytes: data or a hole, always allocated.
pub fn raw_layer_status(file: &HostFile, size: u64, pos: u64, max: u64) -> (BlockStatus, u64) {
    if pos >= size {
        let eof = BlockStatus {
            eof: true,
            ..BlockStatus::default()
        };
        return (eof, 0);
    }
    let (is_data, n) = data_or_hole(file, pos, max.min(size - pos));
    let status = BlockStatus {
        data: is_data,
        zero: !is_data,
        offset_valid: true,
        allocated: true,
        eof: pos + n == size,
    };
    (status, n)
}
