//! An image read through the engine by the read-only tools (compare,
//! measure): qcow2 with its backing chain, or a raw file.

use std::path::Path;

use qblk_engine::Image;
use qblk_engine::file::{CacheMode, HostFile};
use qblk_engine::lock::Access;
use qblk_engine::map::{BlockStatus, raw_layer_status};

use crate::image::{ImageFormat, open_read, probe};
use crate::{Error, Result};

/// QEMU's file layer counts whole sectors.
const SECTOR: u64 = 512;

/// An image open for reading.
#[derive(Debug)]
pub(crate) enum Source {
    Qcow2(Box<Image>),
    Raw { file: HostFile, size: u64 },
}

impl Source {
    /// Opens `path` (probing its format unless given) as qemu-img opens a
    /// read-only image: locked as a reader unless `force_share` (`-U`),
    /// backing files wherever the image names them.
    pub(crate) async fn open(
        path: &Path,
        format: Option<ImageFormat>,
        force_share: bool,
    ) -> Result<Source> {
        let format = match format {
            Some(f) => f,
            None => probe(&open_read(path)?, path)?,
        };
        match format {
            ImageFormat::Qcow2 => {
                let opts = crate::chain::tool_open_options(false, true, force_share);
                let img = Image::open(path, &opts)
                    .await
                    .map_err(|e| engine(path, "cannot open".into(), e))?;
                Ok(Source::Qcow2(Box::new(img)))
            }
            ImageFormat::Raw => {
                let file = HostFile::open(path, false, CacheMode::Writeback)
                    .map_err(|e| Error::io(path, "open", e))?;
                crate::lock_file(&file, path, Access::READER, force_share)?;
                let size = file
                    .file_len()
                    .map_err(|e| Error::io(path, "stat", e))?
                    .next_multiple_of(SECTOR);
                Ok(Source::Raw { file, size })
            }
        }
    }

    pub(crate) fn size(&self) -> u64 {
        match self {
            Source::Qcow2(img) => img.size(),
            Source::Raw { size, .. } => *size,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Source::Qcow2(img) => img.path(),
            Source::Raw { file, .. } => file.path(),
        }
    }

    /// Whether the image's guest data is encrypted.
    pub(crate) fn is_encrypted(&self) -> bool {
        match self {
            Source::Qcow2(img) => {
                img.header().crypt_method != qblk_qcow2::header::CryptMethod::None
            }
            Source::Raw { .. } => false,
        }
    }

    /// The block status of the run from `pos` (before the end of the
    /// image) over the whole chain; the run is never empty.
    pub(crate) async fn status(&self, pos: u64) -> Result<(BlockStatus, u64)> {
        let (status, len) = match self {
            Source::Qcow2(img) => img
                .block_status(pos, img.size().saturating_sub(pos))
                .await
                .map_err(|e| {
                    // qemu-img's words for it.
                    let op = format!("sector allocation test failed at offset {pos}");
                    engine(img.path(), op, e)
                })?,
            Source::Raw { file, size } => {
                raw_layer_status(file, *size, pos, size.saturating_sub(pos))
            }
        };
        if len == 0 {
            // Only past the end, which callers never ask about.
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: format!("block status made no progress at offset {pos}"),
            });
        }
        Ok((status, len))
    }

    /// Reads guest bytes at `pos`.
    pub(crate) async fn read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Qcow2(img) => img.read(pos, buf).await.map_err(|e| {
                let op = format!("error while reading offset {pos}");
                engine(img.path(), op, e)
            }),
            Source::Raw { file, .. } => file
                .read_into(pos, buf)
                .await
                .map_err(|e| Error::io(file.path(), "read", e)),
        }
    }
}

fn engine(path: &Path, op: String, e: qblk_engine::image::Error) -> Error {
    Error::EngineOp {
        path: path.to_owned(),
        op,
        source: Box::new(e),
    }
}
