//! A qcow2 image opened for guest reads: header, L1 table, a bounded L2
//! slice cache, the external data file and the backing chain.
//!
//! Every descriptor kind the format has is served: unallocated clusters
//! (backing file or zeros), zero clusters and zero subclusters, standard
//! clusters (in the image or the external data file), extended-L2
//! subclusters, and compressed clusters (deflate as QEMU writes it, zstd).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use qblk_qcow2::header::{CompressionType, CryptMethod, QCOW2_MAGIC};
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry, SubclusterState};
use qblk_qcow2::{FormatError, Geometry, Header};

use crate::buf::AlignedBuf;
use crate::file::{CacheMode, HostFile};
use crate::guest::{GuestSlice, Out};
use crate::lock::Access;
use crate::view::SnapshotView;

/// Deepest backing chain followed by default (QEMU-like bound; the image
/// itself is depth 0).
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 16;
/// Default L2 cache budget: enough to map 256 GiB of a 64 KiB-cluster image
/// (512 tables of 64 KiB).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Default clean refcount block budget: a quarter of the L2 cache, as in
/// QEMU (8 MiB of 16-bit refcounts covers 256 GiB of 64 KiB clusters).
pub const DEFAULT_REFCOUNT_CACHE_BYTES: u64 = DEFAULT_L2_CACHE_BYTES / 4;

pub use crate::error::{Error, Result};

/// Which backing files an image may open.
#[derive(Debug, Clone)]
pub struct BackingPolicy {
    /// Follow backing files at all.
    pub enabled: bool,
    /// Directories (besides the image's own) backing files may lie under.
    pub allowed_dirs: Vec<PathBuf>,
    /// Allow any path (the offline tools' default, like qemu-img).
    pub allow_any_dir: bool,
    /// Longest chain below the top image.
    pub max_depth: u32,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            allowed_dirs: Vec::new(),
            allow_any_dir: false,
            max_depth: DEFAULT_MAX_CHAIN_DEPTH,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the image (and its external data file) for writing. Backing
    /// files are always read-only.
    pub writable: bool,
    pub cache: CacheMode,
    pub backing: BackingPolicy,
    /// L2 cache budget in bytes (at least one table is always cached).
    pub l2_cache_bytes: u64,
    /// Budget for clean refcount blocks (writable images), in bytes.
    pub refcount_cache_bytes: u64,
    /// The key (passphrase) of a LUKS-encrypted image. Without it the
    /// metadata is readable but guest data is not.
    pub key: Option<Secret>,
    /// Share everything with other openers (qemu-img's `-U`): read-only
    /// opens only; the image may change underneath.
    pub force_share: bool,
    /// Writable opens: keep every acknowledged write across a crash of
    /// this process (`crate::journal`): table changes are journaled beside
    /// the image, or, where no journal can be kept (version 2 images, a
    /// directory this process cannot create files in), committed before
    /// the write returns. What a daemon serving a running guest wants; a
    /// tool that fails as a whole when it dies does not need it. A journal
    /// a crashed writer left is replayed by every writable open either way.
    pub crash_journal: bool,
    /// Images already open in this process that the backing chain uses
    /// where it names their file, instead of opening it again: a layer
    /// the daemon has open for writing (a live commit writes into its
    /// base while the guest reads through it). Such a layer is trusted (it
    /// passes no backing policy), is not locked again, and its locks are
    /// its opener's ([`Image::release_locks`] leaves them).
    pub shared_layers: Vec<Arc<Image>>,
}

/// Key material that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            writable: false,
            cache: CacheMode::None,
            backing: BackingPolicy::default(),
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            refcount_cache_bytes: DEFAULT_REFCOUNT_CACHE_BYTES,
            key: None,
            force_share: false,
            crash_journal: false,
            shared_layers: Vec::new(),
        }
    }
}

/// What lies below an image, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BackingRef<'a> {
    Qcow2(&'a Image),
    Raw { file: &'a HostFile, size: u64 },
}

/// What lies below an image.
#[derive(Debug)]
pub(crate) enum Backing {
    /// `shared`: one of [`OpenOptions::shared_layers`].
    Qcow2 {
        img: Arc<Image>,
        shared: bool,
    },
    Raw {
        file: HostFile,
        size: u64,
    },
}

/// A qcow2 image open for reading (and, if opened so, writing).
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    /// The header as opened; what the write path changes (the refcount
    /// table's and L1 table's location, the size, feature bits) is the
    /// writer's.
    header: Header,
    geometry: Geometry,
    file: HostFile,
    data_file: Option<HostFile>,
    backing: Option<Backing>,
    /// The virtual disk size (grows with `resize`).
    size: std::sync::atomic::AtomicU64,
    /// The mapping tables. Held only for in-memory lookups and updates,
    /// never across an await.
    tables: Mutex<Tables>,
    counters: crate::stats::Counters,
    refcount_cache_bytes: u64,
    /// The unlocked data cipher of a LUKS image opened with its key.
    crypto: Option<crate::crypto::Crypto>,
    /// What only a writable image has: the allocator, the commit lock,
    /// guest-cluster locks (`crate::write`).
    writer: Option<crate::write::Writer>,
    /// Whether the image looks preallocated (`crate::map`), found out on
    /// first need.
    metadata_preallocated: std::sync::OnceLock<bool>,
}

/// The unit the read path loads L2 tables in when it misses: 4 KiB (512
/// entries, 32 MiB of guest data with 64 KiB clusters), or the whole table
/// where clusters are smaller. A miss costs a 4 KiB read rather than one
/// of a whole table (64 KiB and up), and the cache holds the slices the
/// guest reads rather than the tables they happen to lie in.
pub(crate) const L2_SLICE_BYTES: u64 = 4096;

/// L1 table and L2 table cache. Dirty L2 tables are kept apart from the
/// bounded clean cache so they are never evicted before they are written.
/// Guest reads that miss load slices of clean tables ([`L2_SLICE_BYTES`])
/// into a cache of their own; a table's slices are dropped whenever the
/// table changes or is freed ([`Tables::forget_slices`]), so a slice is
/// only ever a copy of a table as the disk holds it.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) l1: Vec<L1Entry>,
    /// Where the active L1 table lives (moves when the disk grows).
    pub(crate) l1_offset: u64,
    /// Offset and length of the refcount table (moves when it grows).
    pub(crate) refcount_table: (u64, u64),
    /// L1 entries changed since the last metadata writeback.
    pub(crate) l1_dirty: bool,
    pub(crate) l2_clean: LruCache<u64, Arc<AlignedBuf>>,
    pub(crate) l2_dirty: std::collections::HashMap<u64, Arc<AlignedBuf>>,
    /// Slices of clean L2 tables, by their offset in the file: what the
    /// whole tables leave of the budget ([`Tables::trim_slices`]).
    pub(crate) l2_slices: LruCache<u64, Arc<[u8]>>,
    /// The L2 cache budget in bytes, whole tables and slices together.
    pub(crate) l2_budget: u64,
    /// The slice size: [`L2_SLICE_BYTES`], or the cluster size if smaller.
    pub(crate) l2_slice_bytes: u64,
    /// An L2 table's size (one cluster).
    pub(crate) l2_table_bytes: u64,
    /// Moves on whenever L2 tables were written back: a table read from
    /// disk before that may be older than what the disk holds now.
    pub(crate) l2_epoch: u64,
    /// L2 lookups of guest requests answered from the cache, and those
    /// that had to read the table. Counted here, under the lock the lookup
    /// takes anyway, rather than in shared atomics: no further cache line
    /// bounces between the workers.
    pub(crate) l2_hits: u64,
    pub(crate) l2_misses: u64,
    /// The metadata clusters found at open (writable images; empty
    /// otherwise): guest data never goes there.
    pub(crate) meta: Arc<crate::layout::MetaMap>,
}

impl Tables {
    /// Drops the cached slices of the L2 table at `table`: it is about to
    /// change, or it was freed (its cluster may come back as another
    /// table).
    pub(crate) fn forget_slices(&mut self, table: u64) {
        let mut at = table;
        while at < table + self.l2_table_bytes {
            self.l2_slices.pop(&at);
            at += self.l2_slice_bytes;
        }
    }

    /// Evicts the least recently used slices until whole clean tables and
    /// slices fit the budget together (at least 16 slices stay). Whole
    /// tables have a quarter of it at most (the LRU's capacity); slices
    /// take the rest, and all of it while no table is cached — a disk
    /// that is only read holds four times as much of its map.
    pub(crate) fn trim_slices(&mut self) {
        let tables = self.l2_clean.len() as u64 * self.l2_table_bytes;
        while self.l2_slices.len() > 16
            && tables + self.l2_slices.len() as u64 * self.l2_slice_bytes > self.l2_budget
        {
            self.l2_slices.pop_lru();
        }
    }

    /// Makes `table` the dirty L2 table at `offset` (its cached slices
    /// go: they show what it was).
    pub(crate) fn put_dirty_l2(&mut self, offset: u64, table: Arc<AlignedBuf>) {
        self.forget_slices(offset);
        self.l2_dirty.insert(offset, table);
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + use<> {
    Error::io(path, op, None)
}

impl Image {
    /// Opens a qcow2 image and its backing chain.
    pub async fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut img = Self::open_at_depth(path.to_owned(), opts.clone(), 0).await?;
        if opts.writable && !img.header.is_corrupt() && crate::journal::recover(&img).await? {
            // Replayed what a crashed writer acknowledged; the image is
            // dirty now, and its refcounts are rebuilt below.
            drop(img);
            img = Self::open_at_depth(path.to_owned(), opts.clone(), 0).await?;
        }
        if opts.writable && img.header.is_dirty() && !img.header.is_corrupt() {
            // Invariant 5: refcounts may lag behind the tables (lazy
            // refcounts, or a crash mid-update); rebuild them before use.
            drop(img);
            crate::check::rebuild_refcounts(path).await?;
            img = Self::open_at_depth(path.to_owned(), opts.clone(), 0).await?;
        }
        if opts.writable {
            img.writer = Some(crate::write::prepare_for_writing(&img, opts.crash_journal).await?);
        }
        Ok(img)
    }

    fn open_at_depth(
        path: PathBuf,
        opts: OpenOptions,
        depth: u32,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Image>>>> {
        Self::open_as(path.clone(), path, opts, depth)
    }

    /// Opens `open_path` and names it `path` (the name the parent image
    /// gives it, which relative names inside it resolve against).
    fn open_as(
        open_path: PathBuf,
        path: PathBuf,
        opts: OpenOptions,
        depth: u32,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Image>>>> {
        Box::pin(async move {
            let writable = opts.writable && depth == 0;
            if writable && opts.force_share {
                return Err(Error::Unsupported {
                    path,
                    what: "force-share can only be used with read-only images".into(),
                });
            }
            let file = HostFile::open(&open_path, writable, opts.cache)
                .map_err(io_err(&path, "open"))?
                .named(path.clone());
            // QEMU's image locks: a backing file is read-only like any
            // reader; what `-U` asks for goes down the chain.
            let access = if writable {
                Access::WRITER
            } else {
                Access::READER
            };
            crate::lock::lock_image(&file, &path, access.force_share(opts.force_share))?;
            let (header, file_len) = read_header(&file, &path).await?;
            let crypto = match header.crypt_method {
                CryptMethod::None => None,
                CryptMethod::Aes => {
                    return Err(Error::Unsupported {
                        path,
                        what: "legacy AES encryption is insecure and not supported (convert it with qemu-img)".into(),
                    });
                }
                // Without a key the metadata is still readable (check, map).
                CryptMethod::Luks => match opts.key.as_ref().filter(|_| depth == 0) {
                    None => None,
                    Some(key) => Some(unlock(&file, &header, &path, key).await?),
                },
            };
            let geometry = header.geometry();

            // The tables the header names lie inside the file: reading past
            // its end gives zeros, and writing through such a table would
            // put metadata out there.
            for (field, at, offset, len) in [
                (
                    "header.l1_table_offset",
                    40,
                    header.l1_table_offset,
                    u64::from(header.l1_size) * 8,
                ),
                (
                    "header.refcount_table_offset",
                    48,
                    header.refcount_table_offset,
                    u64::from(header.refcount_table_clusters) * geometry.cluster_size(),
                ),
            ] {
                if len > 0 && offset.saturating_add(len) > file_len {
                    return Err(Error::Format {
                        path: path.clone(),
                        source: FormatError::new(
                            field,
                            at,
                            qblk_qcow2::Problem::PastEndOfFile {
                                value: offset,
                                file_len,
                            },
                        ),
                    });
                }
            }

            // L1 table: validated once, at open.
            let l1_bytes = file
                .read(header.l1_table_offset, header.l1_size as usize * 8)
                .await
                .map_err(io_err(&path, "read L1 table"))?;
            let mut l1 = Vec::with_capacity(header.l1_size as usize);
            for (i, raw) in qblk_qcow2::decode_table(&l1_bytes).enumerate() {
                let entry = L1Entry(raw);
                let at = header.l1_table_offset + i as u64 * 8;
                entry
                    .validate(&geometry, at)
                    .map_err(|source| Error::Format {
                        path: path.clone(),
                        source,
                    })?;
                // An L2 table is written (and synced) before an L1 entry
                // names it, so one past the end of the file is damage: a
                // write through it would put metadata out there.
                if let Some(l2) = entry.l2_offset().filter(|l2| l2.0 >= file_len) {
                    return Err(Error::Format {
                        path: path.clone(),
                        source: FormatError::new(
                            "l1_table.entry",
                            at,
                            qblk_qcow2::Problem::PastEndOfFile {
                                value: l2.0,
                                file_len,
                            },
                        ),
                    });
                }
                l1.push(entry);
            }

            let data_file = if header.has_external_data_file() {
                let name = header
                    .external_data_file()
                    .ok_or_else(|| Error::Unsupported {
                        path: path.clone(),
                        what: "external data file bit set but no data file name in the header"
                            .into(),
                    })?;
                let dp = relative_to(&path, name);
                let f = HostFile::open(&dp, writable, opts.cache)
                    .map_err(io_err(&dp, "open data file"))?;
                let access = if writable {
                    Access::DATA_WRITER
                } else {
                    Access::DATA_READER
                };
                crate::lock::lock_image(&f, &dp, access.force_share(opts.force_share))?;
                Some(f)
            } else {
                None
            };

            let backing = match &header.backing_file {
                Some(name) if opts.backing.enabled => {
                    Some(open_backing(&path, name, header.backing_format(), &opts, depth).await?)
                }
                _ => None,
            };

            // Up to a quarter of the budget holds whole tables (what
            // writes update), the rest the slices reads load.
            let cs = geometry.cluster_size();
            let slice_bytes = L2_SLICE_BYTES.min(cs);
            let tables = (opts.l2_cache_bytes / 4 / cs).max(1) as usize;
            let (size, l1_offset) = (header.size, header.l1_table_offset);
            let refcount_table = (
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) * geometry.cluster_size(),
            );
            Ok(Image {
                path,
                header,
                geometry,
                file,
                data_file,
                backing,
                size: std::sync::atomic::AtomicU64::new(size),
                tables: Mutex::new(Tables {
                    l1_offset,
                    refcount_table,
                    l1,
                    l1_dirty: false,
                    l2_clean: LruCache::new(NonZeroUsize::new(tables).expect("at least one")),
                    l2_dirty: std::collections::HashMap::new(),
                    l2_slices: LruCache::unbounded(),
                    l2_budget: opts.l2_cache_bytes,
                    l2_slice_bytes: slice_bytes,
                    l2_table_bytes: cs,
                    l2_epoch: 0,
                    l2_hits: 0,
                    l2_misses: 0,
                    meta: Arc::default(),
                }),
                counters: crate::stats::Counters::default(),
                refcount_cache_bytes: opts.refcount_cache_bytes,
                crypto,
                writer: None,
                metadata_preallocated: std::sync::OnceLock::new(),
            })
        })
    }

    pub(crate) fn backing_exists(&self) -> bool {
        self.backing.is_some() || self.header.backing_file.is_some()
    }

    /// The engine's counters so far.
    pub fn stats(&self) -> crate::stats::Stats {
        let mut s = self.counters.snapshot();
        {
            let t = self.lock_tables();
            s.l2_hits = t.l2_hits;
            s.l2_misses = t.l2_misses;
        }
        for f in std::iter::once(&self.file).chain(self.data_file.as_ref()) {
            let (direct, bounced, fixed) = f.direct_counts();
            s.direct_ios += direct;
            s.bounced_ios += bounced;
            s.fixed_ios += fixed;
        }
        s
    }

    /// The virtual size of the backing file as opened (`None` without
    /// one, or when backing files were not opened).
    pub fn backing_size(&self) -> Option<u64> {
        match self.backing.as_ref()? {
            Backing::Qcow2 { img, .. } => Some(img.size()),
            Backing::Raw { size, .. } => Some(*size),
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    /// The alignment guest I/O needs to reach the host file without a
    /// bounce buffer (the larger of the image's and data file's).
    pub fn io_alignment(&self) -> u64 {
        let data = self.data_file.as_ref().map_or(1, HostFile::alignment);
        self.file.alignment().max(data)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    /// Lets go of this opener's locks on every file of the image — the
    /// image, its data file, its backing chain — now, not when the last
    /// reference to them goes. For a closed image being handed over to
    /// another process; the image must not be used afterwards.
    pub fn release_locks(&self) -> Result<()> {
        let files = std::iter::once(self.file()).chain(self.data_file());
        for f in files {
            crate::lock::unlock(f).map_err(Error::io(f.path(), "unlock", None))?;
        }
        match &self.backing {
            Some(Backing::Qcow2 { shared: true, .. }) | None => Ok(()),
            Some(Backing::Qcow2 { img, .. }) => img.release_locks(),
            Some(Backing::Raw { file, .. }) => {
                crate::lock::unlock(file).map_err(Error::io(file.path(), "unlock", None))
            }
        }
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The image file (all metadata lives here).
    pub(crate) fn file(&self) -> &HostFile {
        &self.file
    }

    /// The external data file, if the image has one.
    pub(crate) fn data_file(&self) -> Option<&HostFile> {
        self.data_file.as_ref()
    }

    pub(crate) fn backing(&self) -> Option<BackingRef<'_>> {
        self.backing.as_ref().map(|b| match b {
            Backing::Qcow2 { img, .. } => BackingRef::Qcow2(img),
            Backing::Raw { file, size } => BackingRef::Raw { file, size: *size },
        })
    }

    pub(crate) fn counters(&self) -> &crate::stats::Counters {
        &self.counters
    }

    pub(crate) fn refcount_cache_bytes(&self) -> u64 {
        self.refcount_cache_bytes
    }

    pub(crate) fn crypto(&self) -> Option<&crate::crypto::Crypto> {
        self.crypto.as_ref()
    }

    pub(crate) fn metadata_preallocated_cell(&self) -> &std::sync::OnceLock<bool> {
        &self.metadata_preallocated
    }

    pub(crate) fn writer(&self) -> Option<&crate::write::Writer> {
        self.writer.as_ref()
    }

    /// The virtual size after a resize is durable.
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn lock_tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding this lock is a bug; the tables stay usable.
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads (or finds in the cache) the L2 table at `offset`.
    pub(crate) async fn l2_table(&self, offset: u64) -> Result<Arc<AlignedBuf>> {
        loop {
            let epoch = {
                let mut t = self.lock_tables();
                if let Some(table) = t.l2_dirty.get(&offset) {
                    let table = table.clone();
                    t.l2_hits += 1;
                    return Ok(table);
                }
                if let Some(table) = t.l2_clean.get(&offset) {
                    let table = table.clone();
                    t.l2_hits += 1;
                    return Ok(table);
                }
                t.l2_misses += 1;
                t.l2_epoch
            };
            let cs = self.geometry.cluster_size() as usize;
            let loaded = Arc::new(self.file.read(offset, cs).await.map_err(Error::io(
                &self.path,
                "read L2 table",
                offset,
            ))?);
            let mut t = self.lock_tables();
            // Another task may have loaded (or changed) it meanwhile: theirs
            // wins.
            if let Some(table) = t.l2_dirty.get(&offset) {
                return Ok(table.clone());
            }
            if let Some(table) = t.l2_clean.get(&offset) {
                return Ok(table.clone());
            }
            if t.l2_epoch != epoch {
                // Tables were written back while this one was read: the
                // copy may predate one of them. Read again.
                continue;
            }
            t.l2_clean.put(offset, loaded.clone());
            t.trim_slices();
            return Ok(loaded);
        }
    }

    /// The raw entry `index` of the L2 table at `offset`, for a guest read:
    /// from the table if it is in memory, else from a cached slice, else
    /// read as one slice.
    async fn l2_entry(&self, offset: u64, index: usize) -> Result<L2Entry> {
        let g = &self.geometry;
        let at = index as u64 * g.l2_entry_size();
        loop {
            let (slice_offset, slice_bytes, epoch) = {
                let mut t = self.lock_tables();
                let table = match t.l2_dirty.get(&offset) {
                    Some(table) => Some(table.clone()),
                    None => t.l2_clean.get(&offset).cloned(),
                };
                if let Some(table) = table {
                    t.l2_hits += 1;
                    return Ok(L2Entry::read(&table, g, index).expect("index within table"));
                }
                let slice_offset = offset + at / t.l2_slice_bytes * t.l2_slice_bytes;
                if let Some(slice) = t.l2_slices.get(&slice_offset) {
                    let slice = slice.clone();
                    t.l2_hits += 1;
                    return self.entry_in_slice(&slice, slice_offset, offset + at);
                }
                t.l2_misses += 1;
                (slice_offset, t.l2_slice_bytes as usize, t.l2_epoch)
            };
            // Kept as a plain copy: an aligned buffer of 4 KiB takes 8.
            let slice: Arc<[u8]> = Arc::from(
                &self
                    .file
                    .read(slice_offset, slice_bytes)
                    .await
                    .map_err(Error::io(&self.path, "read L2 table", slice_offset))?[..],
            );
            let mut t = self.lock_tables();
            if t.l2_epoch != epoch
                || t.l2_dirty.contains_key(&offset)
                || t.l2_clean.contains(&offset)
            {
                // Tables were written back, or this one changed, while the
                // slice was read: it may be older than the disk. Look again.
                continue;
            }
            t.l2_slices.put(slice_offset, slice.clone());
            t.trim_slices();
            return self.entry_in_slice(&slice, slice_offset, offset + at);
        }
    }

    /// The L2 entry at file offset `entry_offset` in the slice read from
    /// `slice_offset`.
    fn entry_in_slice(
        &self,
        slice: &[u8],
        slice_offset: u64,
        entry_offset: u64,
    ) -> Result<L2Entry> {
        let g = &self.geometry;
        let index = ((entry_offset - slice_offset) / g.l2_entry_size()) as usize;
        L2Entry::read(slice, g, index).ok_or_else(|| {
            Error::io(&self.path, "read L2 table", slice_offset)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read of an L2 table slice",
            ))
        })
    }

    /// The descriptor of the guest cluster holding `guest_offset`.
    pub(crate) async fn descriptor(&self, guest_offset: u64) -> Result<ClusterDescriptor> {
        Ok(self.descriptor_and_entry(guest_offset).await?.0)
    }

    /// The descriptor and the raw L2 entry (unallocated if no L2 table).
    pub(crate) async fn descriptor_and_entry(
        &self,
        guest_offset: u64,
    ) -> Result<(ClusterDescriptor, L2Entry)> {
        self.descriptor_and_entry_in(None, guest_offset).await
    }

    /// The descriptor of the guest cluster holding `guest_offset` in the
    /// active disk, or in a snapshot's.
    pub(crate) async fn descriptor_in(
        &self,
        view: Option<&SnapshotView>,
        guest_offset: u64,
    ) -> Result<ClusterDescriptor> {
        Ok(self.descriptor_and_entry_in(view, guest_offset).await?.0)
    }

    async fn descriptor_and_entry_in(
        &self,
        view: Option<&SnapshotView>,
        guest_offset: u64,
    ) -> Result<(ClusterDescriptor, L2Entry)> {
        let g = &self.geometry;
        let cluster = g.guest_cluster(qblk_qcow2::GuestOffset(guest_offset));
        let l1_index = g.l1_index(cluster) as usize;
        let l1_entry = match view {
            Some(v) => v.l1.get(l1_index).copied(),
            None => self.lock_tables().l1.get(l1_index).copied(),
        };
        let Some(l2_offset) = l1_entry.and_then(|e| e.l2_offset()) else {
            return Ok((ClusterDescriptor::Unallocated, L2Entry::UNALLOCATED));
        };
        let index = g.l2_index(cluster);
        let entry = match view {
            Some(v) => {
                let table = v.l2_table(self, l2_offset.0).await?;
                L2Entry::read(&table, g, index).expect("index within table")
            }
            None => self.l2_entry(l2_offset.0, index).await?,
        };
        let d = entry
            .decode(
                g,
                self.header.is_v3(),
                self.header.has_external_data_file(),
                l2_offset.0 + index as u64 * g.l2_entry_size(),
            )
            .map_err(|source| Error::Format {
                path: self.path.clone(),
                source,
            })?;
        Ok((d, entry))
    }

    /// Reads guest bytes `[offset, offset + buf.len())`.
    pub fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
        Box::pin(async move { self.read_impl(offset, Out::Heap(buf)).await })
    }

    /// Reads guest bytes into guest memory: the host file writes straight
    /// into it (no bounce buffer, no copy) wherever data is stored as it is
    /// read — allocated clusters of unencrypted images and raw backing
    /// files, with offset, length and address aligned for O_DIRECT.
    pub async fn read_guest(&self, offset: u64, buf: GuestSlice) -> Result<()> {
        self.read_impl(offset, Out::Guest(buf.range())).await
    }

    /// The read path, into our buffer or guest memory.
    fn read_impl<'a>(
        &'a self,
        offset: u64,
        buf: Out<'a>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
        self.read_in(None, offset, buf)
    }

    /// The read path of the active disk, or of a snapshot's.
    pub(crate) fn read_in<'a>(
        &'a self,
        view: Option<&'a SnapshotView>,
        offset: u64,
        mut buf: Out<'a>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            let total = buf.len();
            let len = total as u64;
            let size = view.map_or(self.size(), SnapshotView::size);
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::OutOfRange { offset, len, size });
            }
            let g = self.geometry;
            let mut done = 0usize;
            while done < total {
                let pos = offset + done as u64;
                let in_cluster = g.offset_in_cluster(pos);
                let chunk = ((g.cluster_size() - in_cluster) as usize).min(total - done);
                let desc = self.descriptor_in(view, pos).await?;
                if let Some(host) = fully_allocated(&g, &desc) {
                    // Extend over following clusters that continue this
                    // one on the host: one read for the whole run.
                    let mut run = chunk;
                    while done + run < total {
                        let next = offset + (done + run) as u64;
                        let d = self.descriptor_in(view, next).await?;
                        if fully_allocated(&g, &d) != Some(host + in_cluster + run as u64) {
                            break;
                        }
                        run += (g.cluster_size() as usize).min(total - done - run);
                    }
                    self.read_data(host + in_cluster, &mut buf.sub(done, run))
                        .await?;
                    done += run;
                    continue;
                }
                let mut out = buf.sub(done, chunk);
                match desc {
                    ClusterDescriptor::Unallocated => self.read_below(pos, &mut out).await?,
                    ClusterDescriptor::Zero { .. } => out.fill(0),
                    ClusterDescriptor::Standard {
                        host, subclusters, ..
                    } => {
                        self.read_subclusters(pos, host.0, subclusters, &mut out)
                            .await?;
                    }
                    ClusterDescriptor::UnallocatedSubclusters { subclusters } => {
                        // No host cluster: every allocated bit is clear.
                        self.read_subclusters(pos, 0, subclusters, &mut out).await?;
                    }
                    ClusterDescriptor::Compressed { host, len } => {
                        let data = self.decompress(host.0, len).await?;
                        out.copy_from(&data[in_cluster as usize..in_cluster as usize + chunk]);
                    }
                }
                done += chunk;
            }
            Ok(())
        })
    }

    /// Reads part of one cluster subcluster by subcluster (extended L2).
    async fn read_subclusters(
        &self,
        pos: u64,
        host_cluster: u64,
        bitmap: qblk_qcow2::mapping::SubclusterBitmap,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let sc_size = g.subcluster_size();
        let total = out.len();
        let mut done = 0usize;
        while done < total {
            let p = pos + done as u64;
            let in_cluster = g.offset_in_cluster(p);
            let index = (in_cluster / sc_size) as u32;
            let state = bitmap.state(index);
            // Extend over following subclusters in the same state.
            let mut end_in_cluster = (u64::from(index) + 1) * sc_size;
            while end_in_cluster < g.cluster_size()
                && bitmap.state((end_in_cluster / sc_size) as u32) == state
            {
                end_in_cluster += sc_size;
            }
            let n = ((end_in_cluster - in_cluster) as usize).min(total - done);
            let mut part = out.sub(done, n);
            match state {
                SubclusterState::Allocated => {
                    self.read_data(host_cluster + in_cluster, &mut part).await?
                }
                SubclusterState::Zero => part.fill(0),
                SubclusterState::Unallocated => self.read_below(p, &mut part).await?,
            }
            done += n;
        }
        Ok(())
    }

    /// Reads stored guest data at `host_offset` (image or data file),
    /// decrypting it if the image is encrypted.
    pub(crate) async fn read_data(&self, host_offset: u64, out: &mut Out<'_>) -> Result<()> {
        let file = self.data_file.as_ref().unwrap_or(&self.file);
        let io = Error::io(file.path(), "read data", host_offset);
        if self.header.crypt_method == CryptMethod::None {
            return file.read_out(host_offset, out).await.map_err(io);
        }
        // Decrypt whole sectors, then copy out the part asked for.
        let crypto = self.crypto_or_err()?;
        let sector = crate::crypto::SECTOR;
        let start = host_offset - host_offset % sector;
        let end = (host_offset + out.len() as u64).next_multiple_of(sector);
        let mut buf = file.read(start, (end - start) as usize).await.map_err(io)?;
        crypto.decrypt(start / sector, &mut buf);
        let skip = (host_offset - start) as usize;
        out.copy_from(&buf[skip..skip + out.len()]);
        Ok(())
    }

    pub(crate) fn crypto_or_err(&self) -> Result<&crate::crypto::Crypto> {
        self.crypto.as_ref().ok_or_else(|| Error::Unsupported {
            path: self.path.clone(),
            what: "the image is encrypted: its key is needed to read or write data".into(),
        })
    }

    /// Reads what shows through an unallocated range: the backing file, or
    /// zeros (also beyond the end of a shorter backing file).
    pub(crate) async fn read_below(&self, pos: u64, out: &mut Out<'_>) -> Result<()> {
        let size = match &self.backing {
            None => {
                out.fill(0);
                return Ok(());
            }
            Some(Backing::Qcow2 { img, .. }) => img.size(),
            Some(Backing::Raw { size, .. }) => *size,
        };
        let total = out.len();
        let avail = size.saturating_sub(pos).min(total as u64) as usize;
        out.sub(avail, total - avail).fill(0);
        if avail == 0 {
            return Ok(());
        }
        match &self.backing {
            Some(Backing::Qcow2 { img, .. }) => img.read_impl(pos, out.sub(0, avail)).await,
            Some(Backing::Raw { file, .. }) => file
                .read_out(pos, &mut out.sub(0, avail))
                .await
                .map_err(Error::io(file.path(), "read backing file", pos)),
            None => Ok(()),
        }
    }

    /// Reads and decompresses the compressed cluster at `host`.
    async fn decompress(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.geometry.cluster_size() as usize;
        let input = self
            .file
            .read(host, len as usize)
            .await
            .map_err(io_err(&self.path, "read compressed cluster"))?;
        let bad = |reason: String| Error::Decompress {
            path: self.path.clone(),
            offset: host,
            reason,
        };
        let mut out = vec![0u8; cs];
        match self.header.compression_type {
            CompressionType::Zlib => {
                // QEMU writes raw deflate (no zlib header) and stops reading
                // once a whole cluster has come out.
                let mut d = flate2::Decompress::new(false);
                let status = d
                    .decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad(e.to_string()))?;
                if d.total_out() as usize != cs {
                    return Err(bad(format!(
                        "produced {} of {cs} bytes ({status:?})",
                        d.total_out()
                    )));
                }
            }
            CompressionType::Zstd => {
                use std::io::Read;
                let mut d = zstd::stream::read::Decoder::with_buffer(&input[..])
                    .map_err(|e| bad(e.to_string()))?
                    .single_frame();
                d.read_exact(&mut out).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(out)
    }
}

/// Reads and validates the header of an open image; also returns the
/// file's length.
pub(crate) async fn read_header(file: &HostFile, path: &Path) -> Result<(Header, u64)> {
    let file_len = file.file_len().map_err(io_err(path, "stat"))?;
    let head = file
        .read(0, file_len.min(Header::MAX_READ_BYTES as u64) as usize)
        .await
        .map_err(io_err(path, "read header"))?;
    let header = Header::parse(&head).map_err(|source| Error::Format {
        path: path.to_owned(),
        source,
    })?;
    Ok((header, file_len))
}

/// Reads the LUKS header area and unlocks the data key.
async fn unlock(
    file: &HostFile,
    header: &Header,
    path: &Path,
    key: &Secret,
) -> Result<crate::crypto::Crypto> {
    let p = header
        .encryption_header()
        .ok_or_else(|| Error::Unsupported {
            path: path.to_owned(),
            what: "LUKS image without an encryption header".into(),
        })?;
    // Header::parse checked offset and length; bound the read by 16 MiB
    // (key material for 8 slots at the largest sane stripe counts).
    let len = usize::try_from(p.length.min(16 << 20)).unwrap_or(16 << 20);
    let area = file
        .read(p.offset, len)
        .await
        .map_err(io_err(path, "read LUKS header"))?;
    let luks =
        qblk_qcow2::luks::LuksHeader::parse(&area, p.offset).map_err(|source| Error::Format {
            path: path.to_owned(),
            source,
        })?;
    crate::crypto::Crypto::unlock(&luks, &area, &key.0).map_err(|error| Error::Crypto {
        path: path.to_owned(),
        error,
    })
}

/// The host cluster of a standard cluster whose every subcluster is
/// allocated (every standard cluster without extended L2 entries).
fn fully_allocated(g: &Geometry, desc: &ClusterDescriptor) -> Option<u64> {
    match *desc {
        ClusterDescriptor::Standard {
            host, subclusters, ..
        } if !g.extended_l2() || subclusters.allocation() == u32::MAX => Some(host.0),
        _ => None,
    }
}

/// Resolves a name stored in an image relative to the image's directory.
fn relative_to(image: &Path, stored: &str) -> PathBuf {
    let p = Path::new(stored);
    if p.is_absolute() {
        return p.to_owned();
    }
    image.parent().map_or_else(|| p.to_owned(), |d| d.join(p))
}

/// Opens a backing file under the policy: depth bound, allowed directory,
/// recorded format or a format safely probed as qcow2.
async fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Backing> {
    let refuse = |reason: String| Error::Backing {
        path: image.to_owned(),
        reason,
    };
    if depth >= opts.backing.max_depth {
        return Err(refuse(format!(
            "backing chain deeper than {}",
            opts.backing.max_depth
        )));
    }
    let path = relative_to(image, name);
    let real = std::fs::canonicalize(&path).map_err(io_err(&path, "open backing file"))?;
    if let Some(img) = opts
        .shared_layers
        .iter()
        .find(|l| std::fs::canonicalize(l.path()).is_ok_and(|p| p == real))
    {
        return Ok(Backing::Qcow2 {
            img: img.clone(),
            shared: true,
        });
    }
    if !opts.backing.allow_any_dir {
        let image_dir = std::fs::canonicalize(image)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned));
        let allowed = image_dir
            .iter()
            .chain(opts.backing.allowed_dirs.iter())
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(&d));
        if !allowed {
            return Err(refuse(format!(
                "{} is outside the image's directory and the allowed backing directories",
                real.display()
            )));
        }
    }
    // Open what the policy checked; name it as the image does.
    let file = HostFile::open(&real, false, opts.cache)
        .map_err(io_err(&real, "open backing file"))?
        .named(path.clone());
    let magic = file
        .read(0, 4)
        .await
        .map_err(io_err(&real, "read backing file"))?;
    let is_qcow2 = magic[..] == QCOW2_MAGIC.to_be_bytes();
    let format = match format {
        Some(f) => f.to_owned(),
        None if is_qcow2 => "qcow2".to_owned(),
        None => {
            return Err(refuse(format!(
                "{name} has no recorded backing format and is not qcow2; refusing to guess raw"
            )));
        }
    };
    match format.as_str() {
        "qcow2" => {
            drop(file);
            Ok(Backing::Qcow2 {
                img: Arc::new(Image::open_as(real, path, opts.clone(), depth + 1).await?),
                shared: false,
            })
        }
        "raw" => {
            // A qcow2 backing file is locked by its own open; this one here.
            let access = Access::READER.force_share(opts.force_share);
            crate::lock::lock_image(&file, &path, access)?;
            let size = file
                .file_len()
                .map_err(io_err(&real, "stat backing file"))?;
            Ok(Backing::Raw { file, size })
        }
        other => Err(refuse(format!("backing format '{other}' is not supported"))),
    }
}
