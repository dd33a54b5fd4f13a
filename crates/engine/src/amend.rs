//! qemu-img amend: changing an image's format options in place.
//!
//! The image is first opened for writing and closed (a crash journal is
//! replayed, refcounts a crash left behind are rebuilt, everything is
//! durable), then, under the image's write lock, each change is a header
//! write or a rebuilt refcount structure that the header switches to in
//! one write:
//!
//! - `lazy_refcounts`, `data_file`, `data_file_raw`: header fields only;
//! - `refcount_bits`: a new refcount structure of the new width past the
//!   end of the file (`check::rebuild_with_order`);
//! - `compat=1.1` (upgrade): a version 3 header;
//! - `compat=0.10` (downgrade): version 2 has no zero clusters, so with the
//!   dirty bit set (durable) every zero cluster of every L1 table becomes
//!   data: preallocated ones get zeros written into them, others become
//!   unallocated (or, over a backing file, a new cluster of zeros); the
//!   refcounts are rebuilt (clearing the dirty bit), then the version 2
//!   header is written. A crash anywhere leaves an image that reads the
//!   same.
//! - `size`: grows the disk through the engine.

use std::collections::BTreeSet;
use std::path::Path;

use qblk_qcow2::header::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, HeaderExtension, IncompatibleFeatures,
    ext_type,
};
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry, SubclusterBitmap};
use qblk_qcow2::{Header, HostOffset};

use crate::buf::AlignedBuf;
use crate::commit::{Commit, Edge, End, Files, header_buf};
use crate::error::{Error, Result};
use crate::file::{CacheMode, HostFile};
use crate::image::{BackingPolicy, Image, OpenOptions, read_header};
use crate::lock::Access;

/// What to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default)]
pub struct Amend {
    /// `Some(true)`: compat=1.1; `Some(false)`: compat=0.10.
    pub v3: Option<bool>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    pub data_file: Option<String>,
    pub data_file_raw: Option<bool>,
    pub size: Option<u64>,
}

fn refuse(path: &Path, what: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// Checks `a` against the header `h` with qemu-img's refusals, before
/// anything is written.
fn validate(path: &Path, h: &Header, a: &Amend) -> Result<()> {
    let v3 = a.v3.unwrap_or(h.is_v3());
    if let Some(bits) = a.refcount_bits {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(refuse(
                path,
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if !v3 && bits != 16 {
            return Err(refuse(
                path,
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
    }
    if !v3 && a.lazy_refcounts == Some(true) {
        return Err(refuse(
            path,
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ));
    }
    if a.data_file.is_some() && !h.has_external_data_file() {
        return Err(refuse(
            path,
            "data-file can only be set for images that use an external data file",
        ));
    }
    // Raw can be kept or dropped, never gained: the data file may hold
    // nothing valid as a raw image.
    if a.data_file_raw == Some(true) && !h.data_file_is_raw() {
        return Err(refuse(
            path,
            "data-file-raw cannot be set on existing images",
        ));
    }
    if h.is_v3() && !v3 {
        if h.has_external_data_file() {
            return Err(refuse(path, "Cannot downgrade an image with a data file"));
        }
        let order_after = a
            .refcount_bits
            .map_or(h.refcount_order, |b| b.trailing_zeros());
        if order_after != 4 {
            return Err(refuse(path, "compat=0.10 requires refcount_bits=16"));
        }
        // zstd without compressed clusters just becomes zlib (checked with
        // the image locked, below).
        let kept = IncompatibleFeatures::DIRTY | IncompatibleFeatures::COMPRESSION_TYPE;
        let bad = h.incompatible_features.bits() & !kept.bits();
        if bad != 0 {
            return Err(refuse(
                path,
                format!("Cannot downgrade an image with incompatible features {bad:#x} set"),
            ));
        }
        if h.bitmaps_extension().is_some() {
            // qemu-img downgrades and leaves the bitmaps in a version 2
            // image, where nothing can keep them: every later open warns
            // and their clusters leak. Refused instead.
            return Err(refuse(
                path,
                "Cannot downgrade an image with persistent bitmaps (a version 2 image cannot keep them); remove them first (qblk bitmap --remove)",
            ));
        }
    }
    Ok(())
}

/// Amends the image at `path` (qemu-img amend -o ...).
pub async fn amend(path: &Path, a: &Amend) -> Result<()> {
    let opts = OpenOptions {
        writable: true,
        cache: CacheMode::None,
        backing: BackingPolicy {
            allow_any_dir: true,
            ..BackingPolicy::default()
        },
        ..OpenOptions::default()
    };
    let img = Image::open(path, &opts).await?;
    let checked = validate(path, img.header(), a);
    let sized = match (checked, a.size) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(size)) if size < img.size() => Err(refuse(
            path,
            "shrinking is not supported by amend; use qblk resize --shrink",
        )),
        (Ok(()), Some(size)) if size > img.size() => img.resize(size).await,
        (Ok(()), _) => Ok(()),
    };
    let closed = img.close().await;
    drop(img);
    sized?;
    closed?;

    let file =
        HostFile::open(path, true, CacheMode::None).map_err(Error::io(path, "open", None))?;
    crate::lock::lock_image(&file, path, Access::WRITER)?;
    let (mut h, _) = read_header(&file, path).await?;
    validate(path, &h, a)?;

    // Header fields.
    let before = h.clone();
    if let Some(name) = &a.data_file {
        h.set_extension(
            ext_type::EXTERNAL_DATA_FILE,
            Some(HeaderExtension::ExternalDataFile(name.clone())),
        );
    }
    if let Some(raw) = a.data_file_raw.filter(|_| h.has_external_data_file()) {
        h.autoclear_features
            .set(AutoclearFeatures::RAW_EXTERNAL_DATA, raw);
    }
    if let Some(lazy) = a.lazy_refcounts.filter(|_| h.is_v3()) {
        h.compatible_features
            .set(CompatibleFeatures::LAZY_REFCOUNTS, lazy);
    }
    if h != before {
        write_header(&file, path, &h).await?;
    }

    // The refcount width.
    if let Some(bits) = a.refcount_bits {
        let order = bits.trailing_zeros();
        if order != h.refcount_order {
            crate::check::rebuild_with_order(&file, path, Some(order)).await?;
            h = read_header(&file, path).await?.0;
        }
    }

    match a.v3 {
        Some(true) if !h.is_v3() => {
            h.version = 3;
            h.refcount_order = 4;
            h.incompatible_features = IncompatibleFeatures::empty();
            h.compatible_features = CompatibleFeatures::empty();
            h.autoclear_features = AutoclearFeatures::empty();
            h.compression_type = CompressionType::Zlib;
            h.additional_fields_tail.clear();
            if !h
                .extensions
                .iter()
                .any(|e| e.kind() == ext_type::FEATURE_NAME_TABLE)
            {
                h.extensions.push(HeaderExtension::FeatureNameTable(
                    qblk_qcow2::header::standard_feature_names(),
                ));
            }
            if let Some(lazy) = a.lazy_refcounts {
                h.compatible_features
                    .set(CompatibleFeatures::LAZY_REFCOUNTS, lazy);
            }
            write_header(&file, path, &h).await?;
        }
        Some(false) if h.is_v3() => {
            let tables = l2_tables(&file, path, &h).await?;
            if h.compression_type != CompressionType::Zlib
                && any_compressed(&file, path, &h, &tables).await?
            {
                return Err(refuse(
                    path,
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                ));
            }
            expand_zero_clusters(&file, path, &h, tables).await?;
            // Refcounts for the clusters just allocated (the dirty bit
            // covered them), COPIED flags, dirty bit off.
            crate::check::rebuild_with_order(&file, path, None).await?;
            let (mut h, _) = read_header(&file, path).await?;
            h.version = 2;
            h.compression_type = CompressionType::Zlib;
            h.incompatible_features = IncompatibleFeatures::empty();
            h.compatible_features = CompatibleFeatures::empty();
            h.autoclear_features = AutoclearFeatures::empty();
            h.extensions
                .retain(|e| e.kind() != ext_type::FEATURE_NAME_TABLE);
            write_header(&file, path, &h).await?;
        }
        _ => {}
    }
    Ok(())
}

/// Writes `h` over the header, durably.
async fn write_header(file: &HostFile, path: &Path, h: &Header) -> Result<()> {
    let mut c = Commit::new(End::Durable);
    let _ = c.write("write header", 0, header_buf(path, h)?);
    c.run(Files {
        image: file,
        data: None,
        counters: None,
    })
    .await
    .map(|_| ())
}

/// The L2 tables every L1 table (the active one and the snapshots')
/// names, each once.
async fn l2_tables(file: &HostFile, path: &Path, h: &Header) -> Result<BTreeSet<u64>> {
    let g = h.geometry();
    let cs = g.cluster_size();
    let file_len = file.file_len().map_err(Error::io(path, "stat", None))?;
    let mut l1_tables = vec![(h.l1_table_offset, h.l1_size)];
    if let Some((snaps, _)) = crate::layout::read_snapshot_table(file, h, cs, file_len).await? {
        l1_tables.extend(snaps.iter().map(|s| (s.l1_table_offset, s.l1_size)));
    }
    let mut l2_tables = BTreeSet::new();
    for (off, n) in l1_tables {
        let bytes =
            file.read(off, n as usize * 8)
                .await
                .map_err(Error::io(path, "read L1 table", off))?;
        for (i, raw) in qblk_qcow2::decode_table(&bytes).enumerate() {
            let e = L1Entry(raw);
            e.validate(&g, off + i as u64 * 8)
                .map_err(Error::format(path))?;
            if let Some(l2) = e.l2_offset() {
                l2_tables.insert(l2.0);
            }
        }
    }
    Ok(l2_tables)
}

/// Whether any of `tables` names a compressed cluster.
async fn any_compressed(
    file: &HostFile,
    path: &Path,
    h: &Header,
    tables: &BTreeSet<u64>,
) -> Result<bool> {
    let g = h.geometry();
    for &l2 in tables {
        let table = file
            .read(l2, g.cluster_size() as usize)
            .await
            .map_err(Error::io(path, "read L2 table", l2))?;
        for k in 0..g.l2_entries() as usize {
            if L2Entry::read(&table, &g, k).is_some_and(|e| e.is_compressed()) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Turns every zero cluster of `l2_tables` into data a version 2 reader
/// sees as zeros, with the dirty bit set first.
async fn expand_zero_clusters(
    file: &HostFile,
    path: &Path,
    h: &Header,
    l2_tables: BTreeSet<u64>,
) -> Result<()> {
    let g = h.geometry();
    let cs = g.cluster_size();
    let files = Files {
        image: file,
        data: None,
        counters: None,
    };
    let file_len = file.file_len().map_err(Error::io(path, "stat", None))?;
    let mut dirty = h.clone();
    dirty.incompatible_features |= IncompatibleFeatures::DIRTY;
    let mut c = Commit::new(End::Durable);
    let head = c.write("write header", 0, header_buf(path, &dirty)?);
    let mut next = file_len.next_multiple_of(cs);
    let mut data_ids = Vec::new();
    let mut tables = Vec::new();
    for l2 in l2_tables {
        let mut table =
            file.read(l2, cs as usize)
                .await
                .map_err(Error::io(path, "read L2 table", l2))?;
        let mut changed = false;
        for k in 0..g.l2_entries() as usize {
            let entry = L2Entry::read(&table, &g, k).expect("index within table");
            let at = l2 + k as u64 * g.l2_entry_size();
            let d = entry
                .decode(&g, true, false, at)
                .map_err(Error::format(path))?;
            let ClusterDescriptor::Zero {
                preallocated,
                copied,
            } = d
            else {
                continue;
            };
            // A preallocated cluster shared with a snapshot (no COPIED
            // flag) is the snapshot's data: it is not overwritten.
            let new = match preallocated.filter(|_| copied) {
                Some(host) => {
                    let id = c.write("write zeros", host.0, AlignedBuf::zeroed(cs as usize));
                    c.after(id, head, Edge::Durable);
                    data_ids.push(id);
                    L2Entry::standard(host, copied, SubclusterBitmap(0))
                }
                None if h.backing_file.is_some() => {
                    // Zeros over a backing file need a cluster of zeros.
                    let host = HostOffset(next);
                    next += cs;
                    let id = c.write("write zeros", host.0, AlignedBuf::zeroed(cs as usize));
                    c.after(id, head, Edge::Durable);
                    data_ids.push(id);
                    L2Entry::standard(host, true, SubclusterBitmap(0))
                }
                None => L2Entry::UNALLOCATED,
            };
            new.write(&mut table, &g, k);
            changed = true;
        }
        if changed {
            tables.push((l2, table));
        }
    }
    for (l2, table) in tables {
        let id = c.write("write L2 table", l2, table);
        c.after(id, head, Edge::Durable);
        c.after_all(id, &data_ids, Edge::Durable);
    }
    c.run(files).await?;
    Ok(())
}
