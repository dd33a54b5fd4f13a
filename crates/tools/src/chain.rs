//! What rebase and commit share: opening one layer of a backing chain (a
//! qcow2 image with or without what lies below it, or a raw file) and
//! reading it with zeros past its end.

use std::path::Path;

use qblk_engine::file::{CacheMode, HostFile};
use qblk_engine::image::BackingPolicy;
use qblk_engine::lock::Access;
use qblk_engine::{Image, OpenOptions};

use crate::image::{ImageFormat, open_read, probe};
use crate::{Error, Result};

/// Bytes read per step (a multiple of every cluster size).
pub(crate) const STEP: u64 = 2 << 20;

/// An engine error on the image at `path` (which the error names).
pub(crate) fn engine(_path: &Path, e: qblk_engine::image::Error) -> Error {
    Error::Image(Box::new(e))
}

/// Opens a qcow2 image: `writable`, with (`chain`) or without its backing
/// files, any directory allowed as with qemu-img (the operator named it).
pub(crate) async fn open_qcow2(
    path: &Path,
    writable: bool,
    chain: bool,
    force_share: bool,
) -> Result<Image> {
    let opts = tool_open_options(writable, chain, force_share);
    Image::open(path, &opts).await.map_err(|e| engine(path, e))
}

/// How the offline tools open a qcow2 image: through the page cache,
/// `writable` or not, with (`chain`) or without its backing files, which
/// may lie in any directory as with qemu-img (the operator named the
/// image), sharing everything with `force_share` (`-U`).
pub(crate) fn tool_open_options(writable: bool, chain: bool, force_share: bool) -> OpenOptions {
    OpenOptions {
        writable,
        cache: CacheMode::Writeback,
        backing: BackingPolicy {
            enabled: chain,
            allow_any_dir: true,
            ..BackingPolicy::default()
        },
        force_share,
        ..OpenOptions::default()
    }
}

/// One layer of a chain opened as a whole image.
#[derive(Debug)]
pub(crate) enum Layer {
    Qcow2(Box<Image>),
    Raw { file: HostFile, size: u64 },
}

impl Layer {
    /// Opens `path` as `format` (probed when `None`: the qcow2 magic, and
    /// raw only when recorded), qcow2 with its own backing chain.
    pub(crate) async fn open(
        path: &Path,
        format: Option<&str>,
        writable: bool,
        force_share: bool,
    ) -> Result<Layer> {
        let format = match format {
            Some(f) => ImageFormat::parse(f)?,
            None => match probe(&open_read(path)?, path)? {
                ImageFormat::Qcow2 => ImageFormat::Qcow2,
                ImageFormat::Raw => {
                    return Err(Error::Unsupported {
                        path: path.to_owned(),
                        what: "no backing format recorded and not qcow2; refusing to guess raw"
                            .into(),
                    });
                }
            },
        };
        match format {
            ImageFormat::Qcow2 => Ok(Layer::Qcow2(Box::new(
                open_qcow2(path, writable, true, force_share).await?,
            ))),
            ImageFormat::Raw => {
                let file = HostFile::open(path, writable, CacheMode::Writeback)
                    .map_err(|e| Error::io(path, "open", e))?;
                let access = if writable {
                    Access::WRITER
                } else {
                    Access::READER
                };
                crate::lock_file(&file, path, access, force_share)?;
                let size = file.file_len().map_err(|e| Error::io(path, "stat", e))?;
                Ok(Layer::Raw { file, size })
            }
        }
    }

    pub(crate) fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.size(),
            Layer::Raw { size, .. } => *size,
        }
    }

    /// Reads guest bytes at `offset`; what lies past the end reads as
    /// zeros.
    pub(crate) async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Layer::Qcow2(i) => i
                .read(offset, &mut buf[..avail])
                .await
                .map_err(|e| engine(i.path(), e)),
            Layer::Raw { file, .. } => file
                .read_into(offset, &mut buf[..avail])
                .await
                .map_err(|e| Error::io(file.path(), "read", e)),
        }
    }

    pub(crate) async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Layer::Qcow2(i) => i.write(offset, data).await.map_err(|e| engine(i.path(), e)),
            Layer::Raw { file, .. } => file
                .write(offset, data)
                .await
                .map_err(|e| Error::io(file.path(), "write", e)),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros.
    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Layer::Qcow2(i) => i
                .write_zeroes(offset, len, true)
                .await
                .map_err(|e| engine(i.path(), e)),
            Layer::Raw { .. } => {
                let zeros = vec![0u8; STEP.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(STEP) as usize;
                    self.write(offset + done, &zeros[..n]).await?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Grows the disk to `size` bytes; the new space reads as zeros (also
    /// where a longer backing file would show through, as with QEMU).
    pub(crate) async fn grow(&mut self, size: u64) -> Result<()> {
        let old = self.size();
        match self {
            Layer::Qcow2(i) => {
                let h = i.header();
                if !h.is_v3() && h.nb_snapshots > 0 {
                    // Version 2 snapshots record no disk size of their own.
                    return Err(Error::Usage(
                        "Can't resize a v2 image which has snapshots".into(),
                    ));
                }
                let e = |e| engine(i.path(), e);
                i.resize(size).await.map_err(e)?;
                if i.backing_size().is_some_and(|b| b > old) {
                    i.write_zeroes(old, size - old, true).await.map_err(e)?;
                }
                Ok(())
            }
            Layer::Raw { file, size: len } => {
                file.set_len(size)
                    .await
                    .map_err(|e| Error::io(file.path(), "resize", e))?;
                *len = size;
                Ok(())
            }
        }
    }

    /// Everything written durable, and a qcow2 image closed cleanly.
    pub(crate) async fn close(&self) -> Result<()> {
        match self {
            Layer::Qcow2(i) => i.close().await.map_err(|e| engine(i.path(), e)),
            Layer::Raw { file, .. } => file
                .flush()
                .await
                .map_err(|e| Error::io(file.path(), "flush", e)),
        }
    }
}
