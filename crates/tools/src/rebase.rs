//! `qblk rebase`: changes the backing file an image names, like qemu-img
//! rebase.
//!
//! Unsafe mode (`-u`) only rewrites the header. Safe mode first copies
//! into the image every range it does not allocate itself whose contents
//! differ between the old backing chain and the new one (so what the
//! guest sees stays the same), makes that durable, and then switches the
//! header.

use std::path::PathBuf;

use qblk_engine::Image;

use crate::chain::{Layer, STEP, engine, open_qcow2};
use crate::image::{ImageFormat, open_read, probe, resolve_relative};
use crate::{Error, Result};

/// What `qblk rebase` was asked for.
#[derive(Debug, Clone)]
pub struct RebaseRequest {
    pub path: PathBuf,
    /// Probed when `None`.
    pub format: Option<ImageFormat>,
    /// The new backing file as it is to be recorded; empty: none.
    pub backing: String,
    /// `-F`: the new backing file's format.
    pub backing_format: Option<String>,
    /// `-u`: rewrite the header only.
    pub unsafe_mode: bool,
    /// `-U`: open the backing files whoever else holds them.
    pub force_share: bool,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// Rebases; `progress(done, total)` is called as safe mode goes.
pub fn rebase(req: &RebaseRequest, mut progress: impl FnMut(u64, u64)) -> Result<()> {
    let format = match req.format {
        Some(f) => f,
        None => probe(&open_read(&req.path)?, &req.path)?,
    };
    if format == ImageFormat::Raw {
        return Err(usage(format!(
            "Could not change the backing file to '{}': Operation not supported",
            req.backing
        )));
    }
    let new_name = (!req.backing.is_empty()).then_some(req.backing.as_str());
    let new_format = match (new_name, req.backing_format.as_deref()) {
        // qemu-img refuses this only after the copy; qblk before it.
        (Some(name), None) => {
            return Err(usage(format!(
                "Could not change the backing file to '{name}': backing format must be specified"
            )));
        }
        (Some(_), Some(f)) => {
            Some(ImageFormat::parse(f).map_err(|_| usage(format!("Invalid format name: '{f}'")))?)
        }
        (None, _) => None,
    };
    qblk_engine::runtime::block_on(async {
        let top = open_qcow2(&req.path, true, false, false).await?;
        if !req.unsafe_mode {
            copy_differences(&top, req, new_name, &mut progress).await?;
        }
        let e = |e| engine(&req.path, e);
        top.set_backing_file(new_name, new_format.map(ImageFormat::name))
            .await
            .map_err(e)?;
        top.close().await.map_err(e)
    })
}

/// Safe mode's copy: every range the image does not allocate whose
/// contents differ between the old and the new backing chain gets the old
/// contents, written whole (cluster or subcluster runs, as the image's map
/// gives them), so no copy-on-write from below is needed. Durable when it
/// returns.
async fn copy_differences(
    top: &Image,
    req: &RebaseRequest,
    new_name: Option<&str>,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    let header = top.header();
    let old = match &header.backing_file {
        Some(name) => Some(
            Layer::open(
                &resolve_relative(&req.path, name),
                header.backing_format(),
                false,
                req.force_share,
            )
            .await?,
        ),
        None => None,
    };
    let new = match new_name {
        Some(name) => {
            // Relative to the image's directory, as it will be read.
            let path = resolve_relative(&req.path, name);
            Some(
                Layer::open(&path, req.backing_format.as_deref(), false, req.force_share)
                    .await
                    .map_err(|e| open_new_failed(name, e))?,
            )
        }
        None => None,
    };
    let size = top.size();
    let cs = top.cluster_size();
    let map = top.map().await.map_err(|e| engine(&req.path, e))?;
    let mut old_buf = vec![0u8; STEP as usize];
    let mut new_buf = vec![0u8; STEP as usize];
    for entry in map.iter().filter(|e| !e.present) {
        let end = entry.start + entry.length;
        let mut pos = entry.start;
        while pos < end {
            let n = STEP.min(end - pos) as usize;
            read_or_zeros(old.as_ref(), pos, &mut old_buf[..n]).await?;
            read_or_zeros(new.as_ref(), pos, &mut new_buf[..n]).await?;
            // Piece by piece within one cluster each.
            let mut at = 0usize;
            while at < n {
                let p = pos + at as u64;
                let len = ((cs - p % cs) as usize).min(n - at);
                if old_buf[at..at + len] != new_buf[at..at + len] {
                    top.write(p, &old_buf[at..at + len])
                        .await
                        .map_err(|e| engine(&req.path, e))?;
                }
                at += len;
            }
            pos += n as u64;
            progress(pos, size);
        }
    }
    progress(size, size);
    top.flush().await.map_err(|e| engine(&req.path, e))
}

async fn read_or_zeros(layer: Option<&Layer>, pos: u64, buf: &mut [u8]) -> Result<()> {
    match layer {
        Some(l) => l.read(pos, buf).await,
        None => {
            buf.fill(0);
            Ok(())
        }
    }
}

fn open_new_failed(name: &str, e: Error) -> Error {
    let mut msg = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    Error::Usage(format!("Could not open new backing file '{name}': {msg}"))
}
