//! `qblk convert`: copies an image's guest contents into a new raw or
//! qcow2 image, like qemu-img convert: sparse (zero runs of at least
//! `min_sparse` bytes are not written), optionally compressed.

use std::path::PathBuf;

use qblk_engine::file::{CacheMode, HostFile};
use qblk_engine::image::BackingPolicy;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

use crate::create::{CreateRequest, create};
use crate::image::{ImageFormat, open_read, probe};
use crate::{Error, Result};

/// What `qblk convert` was asked for.
#[derive(Debug, Clone)]
pub struct ConvertRequest {
    pub src: PathBuf,
    /// Probed when `None`.
    pub src_format: Option<ImageFormat>,
    pub dst: PathBuf,
    pub dst_format: ImageFormat,
    /// `-o` options for the new image.
    pub options: Vec<(String, String)>,
    /// `-c`: write compressed clusters (qcow2 only).
    pub compress: bool,
    /// Zero runs at least this long are left unwritten (`-S`, default 4k).
    pub min_sparse: u64,
    /// Passphrase of an encrypted (LUKS) source.
    pub src_key: Option<Vec<u8>>,
    /// `-U`: read the source whoever else holds it.
    pub src_force_share: bool,
    /// Passphrase of the target, when `-o encrypt.format=luks` makes it
    /// encrypted.
    pub dst_key: Option<Vec<u8>>,
}

/// Bytes read from the source per step (a multiple of every cluster size).
const STEP: u64 = 2 << 20;

enum Source {
    Qcow2(Box<Image>),
    Raw(HostFile, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Qcow2(i) => i.size(),
            Source::Raw(_, s) => *s,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Qcow2(i) => i.read(offset, buf).await.map_err(|e| engine(i.path(), e)),
            Source::Raw(f, _) => f
                .read_into(offset, buf)
                .await
                .map_err(|e| Error::io(f.path(), "read", e)),
        }
    }
}

fn engine(path: &std::path::Path, e: qblk_engine::image::Error) -> Error {
    Error::Engine {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

enum Target {
    Qcow2(Box<Image>),
    Raw(HostFile),
}

/// Converts; `progress(done, total)` is called after every step.
pub fn convert(req: &ConvertRequest, mut progress: impl FnMut(u64, u64)) -> Result<()> {
    if req.compress && req.dst_format != ImageFormat::Qcow2 {
        return Err(Error::Usage("compression (-c) needs -O qcow2".into()));
    }
    if req.min_sparse % 512 != 0 {
        return Err(Error::Usage("-S must be a multiple of 512".into()));
    }
    let src_format = match req.src_format {
        Some(f) => f,
        None => probe(&open_read(&req.src)?, &req.src)?,
    };
    block_on(async {
        let src = match src_format {
            ImageFormat::Qcow2 => {
                let opts = OpenOptions {
                    cache: CacheMode::Writeback,
                    backing: BackingPolicy {
                        // Like qemu-img: the operator named this image.
                        allow_any_dir: true,
                        ..BackingPolicy::default()
                    },
                    key: req.src_key.clone().map(qblk_engine::image::Secret),
                    force_share: req.src_force_share,
                    ..OpenOptions::default()
                };
                Source::Qcow2(Box::new(
                    Image::open(&req.src, &opts)
                        .await
                        .map_err(|e| engine(&req.src, e))?,
                ))
            }
            ImageFormat::Raw => {
                let f = HostFile::open(&req.src, false, CacheMode::Writeback)
                    .map_err(|e| Error::io(&req.src, "open", e))?;
                crate::lock_file(
                    &f,
                    &req.src,
                    qblk_engine::lock::Access::READER,
                    req.src_force_share,
                )?;
                let len = f.file_len().map_err(|e| Error::io(&req.src, "stat", e))?;
                Source::Raw(f, len)
            }
        };
        if let Source::Qcow2(img) = &src {
            if img.header().crypt_method != qblk_qcow2::header::CryptMethod::None
                && req.src_key.is_none()
            {
                return Err(Error::Usage(format!(
                    "{} is encrypted: give its passphrase with --key-file",
                    req.src.display()
                )));
            }
        }
        let size = src.size();
        create(&CreateRequest {
            path: req.dst.clone(),
            format: Some(req.dst_format),
            size: Some(size),
            options: req.options.clone(),
            key: req.dst_key.clone(),
            ..CreateRequest::default()
        })?;
        let dst = match req.dst_format {
            ImageFormat::Qcow2 => {
                let opts = OpenOptions {
                    writable: true,
                    cache: CacheMode::Writeback,
                    key: req.dst_key.clone().map(qblk_engine::image::Secret),
                    ..OpenOptions::default()
                };
                Target::Qcow2(Box::new(
                    Image::open(&req.dst, &opts)
                        .await
                        .map_err(|e| engine(&req.dst, e))?,
                ))
            }
            ImageFormat::Raw => Target::Raw(
                HostFile::open(&req.dst, true, CacheMode::Writeback)
                    .map_err(|e| Error::io(&req.dst, "open", e))?,
            ),
        };
        let cluster = match &dst {
            Target::Qcow2(i) => i.header().cluster_size(),
            Target::Raw(_) => 512,
        };
        let mut buf = vec![0u8; STEP as usize];
        let mut pos = 0u64;
        while pos < size {
            let n = STEP.min(size - pos) as usize;
            src.read(pos, &mut buf[..n]).await?;
            if req.compress {
                let Target::Qcow2(img) = &dst else {
                    unreachable!("checked above")
                };
                for (i, c) in buf[..n].chunks(cluster as usize).enumerate() {
                    if c.iter().any(|&b| b != 0) {
                        let at = pos + i as u64 * cluster;
                        img.write_compressed(at, c)
                            .await
                            .map_err(|e| engine(&req.dst, e))?;
                    }
                }
            } else {
                write_sparse(&dst, &req.dst, pos, &buf[..n], req.min_sparse).await?;
            }
            pos += n as u64;
            progress(pos, size);
        }
        match &dst {
            Target::Qcow2(i) => i.close().await.map_err(|e| engine(&req.dst, e)),
            Target::Raw(f) => f.flush().await.map_err(|e| Error::io(&req.dst, "flush", e)),
        }
    })
}

/// Writes `data` at `pos`, skipping zero runs of at least `min_sparse`
/// bytes (0: write everything).
async fn write_sparse(
    dst: &Target,
    path: &std::path::Path,
    pos: u64,
    data: &[u8],
    min_sparse: u64,
) -> Result<()> {
    if min_sparse == 0 {
        return write_to(dst, path, pos, data).await;
    }
    let block = 512usize;
    let mut i = 0usize;
    while i < data.len() {
        // Extent of data blocks, then of zero blocks.
        let start = i;
        while i < data.len() && data[i..(i + block).min(data.len())].iter().any(|&b| b != 0) {
            i += block;
        }
        let data_end = i.min(data.len());
        while i < data.len() && data[i..(i + block).min(data.len())].iter().all(|&b| b == 0) {
            i += block;
        }
        let zero_end = i.min(data.len());
        // A short zero run is written along with the data around it.
        let (write_end, next) =
            if ((zero_end - data_end) as u64) < min_sparse && zero_end < data.len() {
                (zero_end, zero_end)
            } else {
                (data_end, zero_end)
            };
        if write_end > start {
            write_to(dst, path, pos + start as u64, &data[start..write_end]).await?;
        }
        i = next;
    }
    Ok(())
}

async fn write_to(dst: &Target, path: &std::path::Path, off: u64, bytes: &[u8]) -> Result<()> {
    match dst {
        Target::Qcow2(i) => i.write(off, bytes).await.map_err(|e| engine(path, e)),
        Target::Raw(f) => f
            .write(off, bytes)
            .await
            .map_err(|e| Error::io(path, "write", e)),
    }
}
