//! Opening image files: format probing and reading qcow2 metadata with
//! bounded reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qblk_qcow2::Header;
use qblk_qcow2::header::QCOW2_MAGIC;

use crate::{Error, Result};

/// Image formats the tools handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(Self::Qcow2),
            "raw" => Ok(Self::Raw),
            other => Err(Error::Usage(format!(
                "unknown format '{other}': qblk handles qcow2 and raw"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// Reads up to `len` bytes at `offset`; fewer only at the end of the file.
pub fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "read", e)),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Probes the format from the first bytes: the qcow2 magic, else raw.
pub fn probe(file: &File, path: &Path) -> Result<ImageFormat> {
    let head = read_at(file, path, 0, 4)?;
    Ok(if head.as_slice() == QCOW2_MAGIC.to_be_bytes() {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Opens a file read-only, naming it in the error.
pub fn open_read(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(path, "open", e))
}

/// Reads and validates the qcow2 header of an open image.
pub fn read_header(file: &File, path: &Path) -> Result<Header> {
    // The header cluster is at most 2 MiB; read the common 64 KiB first and
    // the rest only if cluster_bits says so.
    let mut buf = read_at(file, path, 0, 64 << 10)?;
    if buf.len() >= 24 {
        let cluster_bits = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]);
        if (17..=qblk_qcow2::types::MAX_CLUSTER_BITS).contains(&cluster_bits)
            && buf.len() == 64 << 10
        {
            buf = read_at(file, path, 0, 1 << cluster_bits)?;
        }
    }
    Header::parse(&buf).map_err(|source| Error::Format {
        path: path.to_owned(),
        source,
    })
}

/// Resolves a file name stored in an image (backing file, data file)
/// relative to the image's directory, as QEMU does.
pub fn resolve_relative(image: &Path, stored: &str) -> PathBuf {
    let p = Path::new(stored);
    if p.is_absolute() {
        return p.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_owned(),
    }
}

/// QEMU's `path_combine` on the name as the user gave it: the stored name
/// if absolute, else the image name's directory part (up to and including
/// its last '/') followed by the stored name. This is what qemu-img prints
/// as full-backing-filename.
pub fn combine_like_qemu(image_name: &str, stored: &str) -> String {
    if stored.starts_with('/') {
        return stored.to_owned();
    }
    match image_name.rfind('/') {
        Some(i) => format!("{}{}", &image_name[..=i], stored),
        None => stored.to_owned(),
    }
}
