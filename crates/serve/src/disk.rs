//! The disk behind the device: a qcow2 image through the engine, or — only
//! when the operator says `--format raw` — a raw file.

use std::io;
use std::path::Path;

use qblk_engine::file::{CacheMode, HostFile};
use qblk_engine::guest::GuestSlice;
use qblk_engine::image::{self, Image};

/// An error of a disk operation, as logged.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] image::Error),
    /// Handed over to another daemon (`blockdev-set-active`).
    #[error("the disk is inactive: another daemon serves it (blockdev-set-active)")]
    Inactive,
    #[error("{path}: {op}")]
    Raw {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A raw file served as it is.
#[derive(Debug)]
pub struct RawDisk {
    file: HostFile,
    size: std::sync::atomic::AtomicU64,
}

impl RawDisk {
    /// Opens and locks the file as a guest device of QEMU's would (a
    /// writer shares only reads: no second writer, no resize). Unlocked
    /// only to look at it (`locked: false`, read-only).
    pub fn open(path: &Path, writable: bool, cache: CacheMode, locked: bool) -> io::Result<Self> {
        use qblk_engine::lock::{Access, LockError, lock};
        let file = HostFile::open(path, writable, cache)?;
        if !locked {
            debug_assert!(!writable, "a writer always locks");
            let size = file.file_len()?.into();
            return Ok(Self { file, size });
        }
        let access = if writable {
            Access::WRITER
        } else {
            Access::READER
        };
        lock(&file, access).map_err(|e| match e {
            LockError::Conflict(c) => io::Error::new(io::ErrorKind::ResourceBusy, c),
            LockError::Io { source, .. } => source,
        })?;
        let size = file.file_len()?.into();
        Ok(Self { file, size })
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Raw {
            path: self.file.path().display().to_string(),
            op,
            source,
        }
    }
}

/// The disk a device serves.
#[derive(Debug)]
// One per daemon: boxing the image would only add an indirection to every
// request.
#[allow(clippy::large_enum_variant)]
pub enum Disk {
    Qcow2(Image),
    Raw(RawDisk),
}

pub type Result<T> = std::result::Result<T, DiskError>;

impl Disk {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.size(),
            Disk::Raw(r) => r.size.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// Grows the disk to `new_size` bytes: a qcow2 image's header and L1
    /// table (`Image::resize`), a raw file's length. Shrinking is refused.
    pub async fn grow(&self, new_size: u64) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.resize(new_size).await?),
            Disk::Raw(r) => {
                use std::sync::atomic::Ordering;
                let old = r.size.load(Ordering::Acquire);
                if new_size < old {
                    return Err(r.err("shrink")(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{new_size} bytes is smaller than the disk's {old}"),
                    )));
                }
                r.file.set_len(new_size).await.map_err(r.err("grow"))?;
                r.size.store(new_size, Ordering::Release);
                Ok(())
            }
        }
    }

    /// The image file (the qcow2 image, not its data file).
    pub fn path(&self) -> &Path {
        match self {
            Disk::Qcow2(i) => i.path(),
            Disk::Raw(r) => r.file.path(),
        }
    }

    /// The allocation unit: the optimal I/O size and discard granularity.
    pub fn cluster_size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.cluster_size(),
            Disk::Raw(r) => r.file.alignment().max(4096),
        }
    }

    /// Smallest I/O the host takes without read-modify-write.
    pub fn io_alignment(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.io_alignment(),
            Disk::Raw(r) => r.file.alignment(),
        }
    }

    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.read(offset, buf).await?),
            Disk::Raw(r) => r.file.read_into(offset, buf).await.map_err(r.err("read")),
        }
    }

    /// Reads into guest memory, without copies where the format allows.
    pub async fn read_guest(&self, offset: u64, buf: GuestSlice) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.read_guest(offset, buf).await?),
            Disk::Raw(r) => r
                .file
                .read_guest(offset, buf.range())
                .await
                .map_err(r.err("read")),
        }
    }

    /// Writes from guest memory, without copies where the format allows.
    pub async fn write_guest(&self, offset: u64, data: GuestSlice) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.write_guest(offset, data).await?),
            Disk::Raw(r) => r
                .file
                .write_guest(offset, data.range())
                .await
                .map_err(r.err("write")),
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.write(offset, data).await?),
            Disk::Raw(r) => r.file.write(offset, data).await.map_err(r.err("write")),
        }
    }

    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.flush().await?),
            Disk::Raw(r) => r.file.flush().await.map_err(r.err("flush")),
        }
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.discard(offset, len).await?),
            Disk::Raw(r) => r
                .file
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .await
                .map_err(r.err("discard")),
        }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.write_zeroes(offset, len, unmap).await?),
            Disk::Raw(r) => {
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                r.file
                    .fallocate(mode, offset, len)
                    .await
                    .map_err(r.err("write zeroes"))
            }
        }
    }

    /// Makes everything durable and, for qcow2, leaves the image clean.
    pub async fn close(&self) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.close().await?),
            Disk::Raw(r) => {
                if r.file.is_writable() {
                    r.file.flush().await.map_err(r.err("flush"))?;
                }
                Ok(())
            }
        }
    }

    /// Lets go of the locks on every file of the disk now (see
    /// `Image::release_locks`); for a closed disk handed over to another
    /// daemon.
    pub fn release_locks(&self) -> Result<()> {
        match self {
            Disk::Qcow2(i) => Ok(i.release_locks()?),
            Disk::Raw(r) => qblk_engine::lock::unlock(&r.file).map_err(r.err("unlock")),
        }
    }

    /// Engine counters, for the log at exit.
    pub fn stats(&self) -> Option<qblk_engine::stats::Stats> {
        match self {
            Disk::Qcow2(i) => Some(i.stats()),
            Disk::Raw(_) => None,
        }
    }
}
