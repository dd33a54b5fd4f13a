//! `qblk resize`: grows or (with `--shrink`) shrinks an image's virtual
//! disk, like qemu-img resize: the same checks in the same order, the same
//! messages.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qblk_engine::file::CacheMode;
use qblk_engine::image::BackingPolicy;
use qblk_engine::lock::Access;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

use crate::chain::engine;
use crate::image::{ImageFormat, open_read, probe, read_at, read_header};
use crate::{Error, Result};

/// qemu-img resize's `--preallocation` for the new space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    /// qemu-img's names; its message for others.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            other => Err(Error::Usage(format!(
                "Invalid preallocation mode '{other}'"
            ))),
        }
    }
}

/// The new size as given: absolute, or relative to the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

/// What `qblk resize` was asked for.
#[derive(Debug, Clone)]
pub struct ResizeRequest {
    pub path: PathBuf,
    /// Probed when `None`.
    pub format: Option<ImageFormat>,
    pub size: NewSize,
    /// `--shrink`: a smaller size is allowed.
    pub shrink: bool,
    /// `--preallocation`, when given.
    pub preallocation: Option<Preallocation>,
}

/// The message qemu-img prints (with a warning after it) when a smaller
/// size comes without `--shrink`.
pub const NEEDS_SHRINK: &str = "Use the --shrink option to perform a shrink operation.";
/// qemu-img's warning after [`NEEDS_SHRINK`].
pub const SHRINK_WARNING: &str = "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

/// Why a resize was refused before anything changed.
fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// The new size in bytes, with qemu-img's checks (in its order): positive,
/// preallocation only when growing, a shrink only with `--shrink`.
fn target_size(req: &ResizeRequest, current: u64) -> Result<u64> {
    let total = match req.size {
        NewSize::Absolute(n) => Some(n),
        NewSize::Grow(n) => current.checked_add(n),
        NewSize::Shrink(n) => current.checked_sub(n),
    };
    let total = match total {
        Some(t) if t > 0 && t <= i64::MAX as u64 => t,
        Some(_) | None => return Err(usage("New image size must be positive")),
    };
    let prealloc = req.preallocation.unwrap_or(Preallocation::Off);
    if total <= current && prealloc != Preallocation::Off {
        return Err(usage("Preallocation can only be used for growing images"));
    }
    if total < current && !req.shrink {
        return Err(usage(format!("{NEEDS_SHRINK}\n{SHRINK_WARNING}")));
    }
    Ok(total)
}

/// Resizes the image. The image is locked as a writer throughout.
pub fn resize(req: &ResizeRequest) -> Result<()> {
    let format = match req.format {
        Some(f) => f,
        None => probe(&open_read(&req.path)?, &req.path)?,
    };
    match format {
        ImageFormat::Qcow2 => resize_qcow2(req),
        ImageFormat::Raw => resize_raw(req),
    }
}

fn resize_qcow2(req: &ResizeRequest) -> Result<()> {
    let path = &req.path;
    block_on(async {
        let opts = OpenOptions {
            writable: true,
            cache: CacheMode::Writeback,
            backing: BackingPolicy {
                // Like qemu-img: the operator named this image.
                allow_any_dir: true,
                ..BackingPolicy::default()
            },
            ..OpenOptions::default()
        };
        let img = Image::open(path, &opts)
            .await
            .map_err(|e| engine(path, e))?;
        let current = img.size();
        let total = target_size(req, current)?;
        let h = img.header();
        if !h.is_v3() && h.nb_snapshots > 0 {
            return Err(usage("Can't resize a v2 image which has snapshots"));
        }
        if total % 512 != 0 {
            return Err(usage("The new size must be a multiple of 512"));
        }
        let e = |e| engine(path, e);
        if total > current {
            img.resize(total).await.map_err(e)?;
            match req.preallocation.unwrap_or(Preallocation::Off) {
                Preallocation::Full => {
                    write_zeros(&img, current, total).await.map_err(e)?;
                }
                m @ (Preallocation::Metadata | Preallocation::Falloc) => {
                    // The cluster the old end lies in gets zeros written
                    // (it may show a backing file below the old end); the
                    // clusters after it are mapped to zeros unwritten.
                    let aligned = current.next_multiple_of(img.cluster_size()).min(total);
                    if aligned > current {
                        write_zeros(&img, current, aligned).await.map_err(e)?;
                    }
                    if total > aligned {
                        let mode = if m == Preallocation::Metadata {
                            qblk_engine::Preallocation::Metadata
                        } else {
                            qblk_engine::Preallocation::Falloc
                        };
                        img.preallocate(aligned, total - aligned, mode)
                            .await
                            .map_err(e)?;
                    }
                }
                Preallocation::Off => {
                    // Like QEMU: a longer backing file must not show
                    // through the new space.
                    if img.backing_size().is_some_and(|b| b > current) {
                        img.write_zeroes(current, total - current, true)
                            .await
                            .map_err(e)?;
                    }
                }
            }
        } else if total < current {
            img.shrink(total).await.map_err(e)?;
        }
        img.close().await.map_err(e)?;
        if total < current {
            // Still holding the image's locks.
            truncate_to_used(path)?;
        }
        Ok(())
    })
}

/// Writes zeros over guest bytes `[from, to)` (allocating them).
async fn write_zeros(img: &Image, from: u64, to: u64) -> qblk_engine::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; STEP as usize];
    let mut pos = from;
    while pos < to {
        // Cluster-aligned steps after the first: no copy-on-write.
        let n = (STEP - pos % STEP).min(to - pos);
        img.write(pos, &zeros[..n as usize]).await?;
        pos += n;
    }
    img.flush().await
}

/// Cuts the image file after its last cluster in use (the last one with a
/// non-zero refcount), as qemu-img does after a shrink. The caller holds
/// the image's write lock and has closed it (everything is on disk).
pub(crate) fn truncate_to_used(path: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    let header = read_header(&file, path)?;
    let g = header.geometry();
    let cs = g.cluster_size();
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len();
    let table = read_at(
        &file,
        path,
        header.refcount_table_offset,
        (u64::from(header.refcount_table_clusters) * cs) as usize,
    )?;
    let entries_per_block = (cs * 8) >> header.refcount_order;
    let mut last_used: Option<u64> = None;
    let words: Vec<u64> = qblk_qcow2::decode_table(&table).collect();
    'blocks: for (i, &word) in words.iter().enumerate().rev() {
        let Some(block) = qblk_qcow2::refcount::RefcountTableEntry(word).block_offset() else {
            continue;
        };
        let first = i as u64 * entries_per_block;
        if first * cs >= file_len {
            // Describes clusters past the end of the file only.
            continue;
        }
        let bytes = read_at(&file, path, block.0, cs as usize)?;
        if bytes.len() as u64 != cs {
            // A block past the end of the file: leave the file alone.
            return Ok(());
        }
        for k in (0..entries_per_block as usize).rev() {
            if qblk_qcow2::refcount::get_refcount(&bytes, header.refcount_order, k) != 0 {
                last_used = Some(first + k as u64);
                break 'blocks;
            }
        }
    }
    let Some(last) = last_used else {
        return Ok(());
    };
    let end = (last + 1) * cs;
    if end < file_len {
        file.set_len(end)
            .map_err(|e| Error::io(path, "truncate", e))?;
    }
    Ok(())
}

fn resize_raw(req: &ResizeRequest) -> Result<()> {
    let path = &req.path;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    crate::lock_file(&file, path, Access::WRITER, false)?;
    let current = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len();
    let total = target_size(req, current)?;
    let prealloc = req.preallocation.unwrap_or(Preallocation::Off);
    if prealloc == Preallocation::Metadata {
        return Err(usage("Unsupported preallocation mode: metadata"));
    }
    file.set_len(total)
        .map_err(|e| Error::io(path, "resize", e))?;
    if total > current && prealloc != Preallocation::Off {
        // falloc and full both leave the new space written with zeros.
        let zeros = vec![0u8; 1 << 20];
        let mut pos = current;
        while pos < total {
            let n = (total - pos).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], pos)
                .map_err(|e| Error::io(path, "write", e))?;
            pos += n as u64;
        }
    }
    file.sync_all().map_err(|e| Error::io(path, "sync", e))?;
    Ok(())
}
