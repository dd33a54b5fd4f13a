//! `qblk compare`: whether two images read the same, with qemu-img
//! compare's verdicts, messages and stages of failure.
//!
//! Both images are read through their backing chains. The walk goes by
//! block status (`Image::block_status`, QEMU's answer for the whole chain):
//! runs that read as zeros in both images are skipped unread, runs only
//! one image allocates must read as zeros there, and runs both allocate
//! are read in large pieces and compared. The first difference is reported
//! at the start of its 512-byte sector, as qemu-img reports it.

use std::path::{Path, PathBuf};

use qblk_engine::runtime::block_on;

use crate::Error;
use crate::image::ImageFormat;
use crate::source::Source;

/// Bytes read from each image per step.
const STEP: u64 = 4 << 20;
/// qemu-img reports differences per sector.
const SECTOR: u64 = 512;

/// What `qblk compare` was asked for.
#[derive(Debug, Clone)]
pub struct CompareRequest {
    pub first: PathBuf,
    /// Probed when `None` (`-f`).
    pub first_format: Option<ImageFormat>,
    pub second: PathBuf,
    /// Probed when `None` (`-F`).
    pub second_format: Option<ImageFormat>,
    /// `-s`: images whose allocation or size differs are different too.
    pub strict: bool,
    /// `-U`: read the images whoever else holds them.
    pub force_share: bool,
}

/// The verdict of a compare that ran to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Identical,
    Different,
}

/// Why a compare stopped; qemu-img's exit code depends on the stage.
#[derive(Debug)]
pub enum CompareFailure {
    /// An image could not be opened.
    Open(Error),
    /// Asking an image which ranges it allocates failed.
    Status(Error),
    /// Reading an image failed.
    Read(Error),
}

impl CompareFailure {
    pub fn error(&self) -> &Error {
        match self {
            Self::Open(e) | Self::Status(e) | Self::Read(e) => e,
        }
    }
}

/// A finished compare: what qemu-img prints on stdout (in order; `-q`
/// suppresses it), and the verdict or why there is none.
#[derive(Debug)]
pub struct Compared {
    pub messages: Vec<String>,
    pub outcome: std::result::Result<Verdict, CompareFailure>,
}

/// Compares; `progress(done, total)` is called as the walk goes on.
pub fn compare(req: &CompareRequest, progress: impl FnMut(u64, u64)) -> Compared {
    let mut messages = Vec::new();
    let outcome = block_on(run(req, &mut messages, progress));
    Compared { messages, outcome }
}

/// Opens one image; an encrypted one cannot be read without its key,
/// which compare does not take.
async fn open(
    path: &Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> std::result::Result<Source, CompareFailure> {
    let source = Source::open(path, format, force_share)
        .await
        .map_err(CompareFailure::Open)?;
    if source.is_encrypted() {
        return Err(CompareFailure::Open(Error::Unsupported {
            path: path.to_owned(),
            what: "the image is encrypted: compare cannot read it without its key".into(),
        }));
    }
    Ok(source)
}

async fn run(
    req: &CompareRequest,
    messages: &mut Vec<String>,
    mut report: impl FnMut(u64, u64),
) -> std::result::Result<Verdict, CompareFailure> {
    // Progress at most every hundredth of the way (a fragmented image has
    // millions of runs).
    let mut reported = 0u64;
    let mut progress = |pos: u64, total: u64| {
        if pos == total || pos - reported >= total / 100 {
            reported = pos;
            report(pos, total);
        }
    };
    let a = open(&req.first, req.first_format, req.force_share).await?;
    let b = open(&req.second, req.second_format, req.force_share).await?;
    let (size_a, size_b) = (a.size(), b.size());
    if req.strict && size_a != size_b {
        messages.push("Strict mode: Image size mismatch!".into());
        return Ok(Verdict::Different);
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut bufs = (vec![0u8; STEP as usize], vec![0u8; STEP as usize]);
    let mut pos = 0;
    while pos < common {
        let (status_a, len_a) = a.status(pos).await.map_err(CompareFailure::Status)?;
        let (status_b, len_b) = b.status(pos).await.map_err(CompareFailure::Status)?;
        let len = len_a.min(len_b).min(common - pos);
        if req.strict && status_a != status_b {
            messages.push(format!("Strict mode: Offset {pos} block status mismatch!"));
            return Ok(Verdict::Different);
        }
        let found = if status_a.zero && status_b.zero {
            None
        } else if status_a.allocated == status_b.allocated {
            if status_a.allocated {
                first_difference(&a, &b, pos, len, &mut bufs).await?
            } else {
                None
            }
        } else {
            let allocated = if status_a.allocated { &a } else { &b };
            first_nonzero(allocated, pos, len, &mut bufs.0).await?
        };
        if let Some(at) = found {
            messages.push(format!("Content mismatch at offset {at}!"));
            return Ok(Verdict::Different);
        }
        pos += len;
        progress(pos, total);
    }
    if size_a != size_b {
        messages.push("Warning: Image size mismatch!".into());
        // Beyond the smaller image, the larger must read as zeros.
        let over = if size_a > size_b { &a } else { &b };
        while pos < total {
            let (status, len) = over.status(pos).await.map_err(CompareFailure::Status)?;
            if status.allocated {
                if let Some(at) = first_nonzero(over, pos, len, &mut bufs.0).await? {
                    messages.push(format!("Content mismatch at offset {at}!"));
                    return Ok(Verdict::Different);
                }
            }
            pos += len;
            progress(pos, total);
        }
    }
    messages.push("Images are identical.".into());
    Ok(Verdict::Identical)
}

/// The sector-aligned offset of the first byte that differs between the
/// images in `[pos, pos + len)`.
async fn first_difference(
    a: &Source,
    b: &Source,
    pos: u64,
    len: u64,
    bufs: &mut (Vec<u8>, Vec<u8>),
) -> std::result::Result<Option<u64>, CompareFailure> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP) as usize;
        let at = pos + done;
        let (buf_a, buf_b) = (&mut bufs.0[..n], &mut bufs.1[..n]);
        let (read_a, read_b) =
            futures_util::future::join(a.read(at, buf_a), b.read(at, buf_b)).await;
        read_a.map_err(CompareFailure::Read)?;
        read_b.map_err(CompareFailure::Read)?;
        if let Some(i) = first_mismatch(&bufs.0[..n], &bufs.1[..n]) {
            return Ok(Some(sector_start(at + i as u64)));
        }
        done += n as u64;
    }
    Ok(None)
}

/// The sector-aligned offset of the first non-zero byte of `side` in
/// `[pos, pos + len)`.
async fn first_nonzero(
    side: &Source,
    pos: u64,
    len: u64,
    buf: &mut [u8],
) -> std::result::Result<Option<u64>, CompareFailure> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP) as usize;
        let at = pos + done;
        side.read(at, &mut buf[..n])
            .await
            .map_err(CompareFailure::Read)?;
        if let Some(i) = first_nonzero_byte(&buf[..n]) {
            return Ok(Some(sector_start(at + i as u64)));
        }
        done += n as u64;
    }
    Ok(None)
}

/// The index of the first non-zero byte of `buf`.
fn first_nonzero_byte(buf: &[u8]) -> Option<usize> {
    static ZEROS: [u8; 4096] = [0; 4096];
    let block = buf
        .chunks(ZEROS.len())
        .position(|c| c != &ZEROS[..c.len()])?;
    let start = block * ZEROS.len();
    buf[start..].iter().position(|&x| x != 0).map(|i| start + i)
}

/// The index of the first byte where `a` and `b` differ: whole blocks
/// compared at memcmp speed, then the differing block byte by byte.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let block = a
        .chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)?;
    let start = block * BLOCK;
    a[start..]
        .iter()
        .zip(&b[start..])
        .position(|(x, y)| x != y)
        .map(|i| start + i)
}

fn sector_start(offset: u64) -> u64 {
    offset - offset % SECTOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_and_non_zero_bytes_are_found_where_they_are() {
        let a = vec![0u8; 10_000];
        assert_eq!(first_mismatch(&a, &a), None);
        assert_eq!(first_nonzero_byte(&a), None);
        for at in [0, 1, 4095, 4096, 9_999] {
            let mut b = a.clone();
            b[at] = 1;
            assert_eq!(first_mismatch(&a, &b), Some(at));
            assert_eq!(first_nonzero_byte(&b), Some(at));
        }
        assert_eq!(first_nonzero_byte(&[]), None);
    }

    #[test]
    fn offsets_are_reported_per_sector() {
        assert_eq!(sector_start(0), 0);
        assert_eq!(sector_start(511), 0);
        assert_eq!(sector_start(3_000_000), 2_999_808);
    }
}
