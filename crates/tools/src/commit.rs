//! `qblk commit`: copies an image's data into its backing file (or into a
//! base further down the chain), like qemu-img commit.
//!
//! Every range some layer above the base decides — allocated data, zero
//! clusters, and what lies past a shorter intermediate image's end (zeros)
//! — is written into the base, which grows to the top image's size first if
//! it is smaller. The base is made durable; then, unless `-d` (which `-b`
//! implies, as with qemu-img), the top image is emptied: its clusters are
//! deallocated so the base shows through, and the file is cut after its
//! last cluster in use.

use std::path::{Path, PathBuf};

use qblk_engine::Image;
use qblk_engine::map::MapEntry;

use crate::chain::{Layer, STEP, engine, open_qcow2};
use crate::image::{ImageFormat, open_read, probe, read_header, resolve_relative};
use crate::{Error, Result};

/// Longest chain walked looking for the base.
const MAX_CHAIN_DEPTH: usize = qblk_engine::image::DEFAULT_MAX_CHAIN_DEPTH as usize;

/// What `qblk commit` was asked for.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    pub path: PathBuf,
    /// Probed when `None`.
    pub format: Option<ImageFormat>,
    /// `-b`: the image to commit into (part of the chain); the immediate
    /// backing file when `None`.
    pub base: Option<PathBuf>,
    /// `-d`: leave the top image as it is.
    pub keep_top: bool,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// One image of the chain below the top, as the image above names it.
#[derive(Debug)]
struct ChainEntry {
    path: PathBuf,
    format: Option<String>,
}

/// The chain below `top` (nearest first), from the headers, as far as
/// qcow2 images lead.
fn chain_below(top: &Path) -> Result<Vec<ChainEntry>> {
    let mut out: Vec<ChainEntry> = Vec::new();
    let mut cur = top.to_owned();
    loop {
        let file = open_read(&cur)?;
        if probe(&file, &cur)? != ImageFormat::Qcow2 {
            return Ok(out);
        }
        let header = read_header(&file, &cur)?;
        let Some(name) = &header.backing_file else {
            return Ok(out);
        };
        if out.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::Unsupported {
                path: top.to_owned(),
                what: format!("backing chain deeper than {MAX_CHAIN_DEPTH}"),
            });
        }
        let path = resolve_relative(&cur, name);
        let format = header.backing_format().map(str::to_owned);
        let raw = format.as_deref() == Some("raw");
        out.push(ChainEntry {
            path: path.clone(),
            format,
        });
        if raw {
            return Ok(out);
        }
        cur = path;
    }
}

/// Whether `a` and `b` name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Commits; `progress(done, total)` is called as it goes.
pub fn commit(req: &CommitRequest, mut progress: impl FnMut(u64, u64)) -> Result<()> {
    let format = match req.format {
        Some(f) => f,
        None => probe(&open_read(&req.path)?, &req.path)?,
    };
    let chain = match format {
        ImageFormat::Qcow2 => chain_below(&req.path)?,
        ImageFormat::Raw => Vec::new(),
    };
    if chain.is_empty() {
        return Err(usage("Image does not have a backing file"));
    }
    let base_index = match &req.base {
        None => 0,
        Some(base) => {
            // As given (relative to the working directory), or relative to
            // the top image's directory as a stored name would be.
            let beside = resolve_relative(&req.path, &base.to_string_lossy());
            chain
                .iter()
                .position(|c| same_file(&c.path, base) || same_file(&c.path, &beside))
                .ok_or_else(|| {
                    usage(format!(
                        "Did not find '{}' in the backing chain of '{}'",
                        base.display(),
                        req.path.display()
                    ))
                })?
        }
    };
    // -b implies -d: the images between would no longer match the top.
    let empty_top = !req.keep_top && req.base.is_none();
    qblk_engine::runtime::block_on(async {
        let top = open_qcow2(&req.path, true, false, false).await?;
        if empty_top && top.header().has_external_data_file() {
            return Err(Error::Unsupported {
                path: req.path.clone(),
                what: "emptying an image with an external data file is not supported (use -d)"
                    .into(),
            });
        }
        // The images between top and base, each without what lies below.
        let mut above: Vec<Image> = vec![top];
        for c in &chain[..base_index] {
            if c.format.as_deref().is_some_and(|f| f != "qcow2") {
                return Err(Error::Unsupported {
                    path: c.path.clone(),
                    what: "an image between the top and the base must be qcow2".into(),
                });
            }
            above.push(open_qcow2(&c.path, false, false, false).await?);
        }
        let base_entry = &chain[base_index];
        let mut base =
            Layer::open(&base_entry.path, base_entry.format.as_deref(), true, false).await?;
        let size = above[0].size();
        if base.size() < size {
            base.grow(size).await?;
        }
        let mut maps: Vec<Vec<MapEntry>> = Vec::with_capacity(above.len());
        for img in &above {
            maps.push(img.map().await.map_err(|e| engine(img.path(), e))?);
        }
        copy_down(&above, &maps, &base, size, &mut progress).await?;
        base.close().await?;
        let top = &above[0];
        if empty_top {
            top.deallocate(0, size)
                .await
                .map_err(|e| engine(&req.path, e))?;
        }
        top.close().await.map_err(|e| engine(&req.path, e))?;
        if empty_top {
            // Still holding the top image's locks.
            crate::resize::truncate_to_used(&req.path)?;
        }
        Ok(())
    })
}

/// What decides a run of guest bytes above the base.
enum Decided<'a> {
    /// The base shows through.
    Base,
    Zeros,
    Data(&'a Image),
}

/// The entry of `map` holding `pos`.
fn entry_at(map: &[MapEntry], pos: u64) -> Option<&MapEntry> {
    let i = map.partition_point(|e| e.start + e.length <= pos);
    map.get(i).filter(|e| e.start <= pos)
}

/// Which layer decides the bytes at `pos`, and for how many bytes (at
/// most `max`).
fn decide<'a>(
    above: &'a [Image],
    maps: &[Vec<MapEntry>],
    pos: u64,
    max: u64,
) -> (Decided<'a>, u64) {
    let mut len = max;
    for (img, map) in above.iter().zip(maps) {
        if pos >= img.size() {
            // Past a shorter image's end: zeros, whatever lies below.
            return (Decided::Zeros, len);
        }
        let Some(e) = entry_at(map, pos) else {
            return (Decided::Zeros, len);
        };
        len = len.min(e.start + e.length - pos);
        if e.present {
            let what = if e.zero {
                Decided::Zeros
            } else {
                Decided::Data(img)
            };
            return (what, len);
        }
    }
    (Decided::Base, len)
}

async fn copy_down(
    above: &[Image],
    maps: &[Vec<MapEntry>],
    base: &Layer,
    size: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = 0;
    while pos < size {
        let (what, n) = decide(above, maps, pos, STEP.min(size - pos));
        match what {
            Decided::Base => {}
            Decided::Zeros => base.write_zeroes(pos, n).await?,
            Decided::Data(img) => {
                let b = &mut buf[..n as usize];
                img.read(pos, b).await.map_err(|e| engine(img.path(), e))?;
                base.write(pos, b).await?;
            }
        }
        pos += n;
        progress(pos, size);
    }
    Ok(())
}
