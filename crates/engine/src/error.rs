//! The engine's errors.
//!
//! One enum for every public entry point. An I/O error names the file, the
//! operation and, where there is one, the file offset; an inconsistency
//! found in an image keeps its typed cause ([`Corruption`]), so a caller
//! can tell a malformed table entry from a refcount that cannot be right
//! without parsing a message.

use std::fmt;
use std::path::{Path, PathBuf};

use qblk_qcow2::refcount::RefcountOverflow;
use qblk_qcow2::{FormatError, GuestOffset, HostCluster, HostOffset};

/// An engine error. Messages are short; sources carry the detail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: {op}{}", path.display(), At(*offset))]
    Io {
        path: PathBuf,
        op: &'static str,
        /// The file offset the operation was at (none for whole-file
        /// operations: open, stat, sync).
        offset: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid qcow2 image", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("{}: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    /// The LUKS key could not be unlocked (wrong passphrase, a cipher qblk
    /// does not support, a malformed key slot) or a LUKS header not made.
    #[error("{}: {error}", path.display())]
    Crypto {
        path: PathBuf,
        error: crate::crypto::CryptoError,
    },
    #[error("{}: backing file refused: {reason}", path.display())]
    Backing { path: PathBuf, reason: String },
    #[error("{}: compressed cluster at host offset {offset:#x} does not decompress: {reason}", path.display())]
    Decompress {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Metadata found inconsistent while serving a request. The image has
    /// been marked corrupt (best effort) and takes no more writes.
    #[error("{}: inconsistent metadata: {cause}; image marked corrupt", path.display())]
    Corrupt { path: PathBuf, cause: Corruption },
    /// Another program holds the image in a way this open cannot share
    /// (QEMU's image locks).
    #[error("{}: {conflict}", path.display())]
    Locked {
        path: PathBuf,
        conflict: crate::lock::Conflict,
    },
    #[error("{}: image was marked corrupt: writes refused", path.display())]
    MarkedCorrupt { path: PathBuf },
    /// A flush or close of an image marked corrupt: writes acknowledged
    /// since its last completed writeback were never made durable.
    #[error("{}: image was marked corrupt: {writes} acknowledged writes were not made durable", path.display())]
    NotDurable { path: PathBuf, writes: u64 },
    #[error("request [{offset:#x}, +{len:#x}) is beyond the virtual disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// What was found inconsistent (invariant 6 of the design: the request
/// fails, the image is marked corrupt, nothing is fixed silently).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// A table entry failed validation (its field and offset named).
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("host cluster {cluster} is referenced but no refcount block covers it")]
    NoRefcountBlock { cluster: HostCluster },
    #[error("the refcount of host cluster {cluster} would drop below zero")]
    RefcountUnderflow { cluster: HostCluster },
    #[error("the refcount of host cluster {cluster} overflows: {source}")]
    RefcountOverflow {
        cluster: HostCluster,
        source: RefcountOverflow,
    },
    #[error("guest data at host offset {host} would overwrite {what}")]
    DataOverMetadata {
        host: HostOffset,
        what: &'static str,
    },
    #[error("guest offset {guest} lies past the L1 table")]
    PastL1 { guest: GuestOffset },
    #[error("compressed cluster at host offset {host} does not fit its descriptor")]
    CompressedOffset { host: HostOffset },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats an optional offset as " at offset 0x…".
struct At(Option<u64>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(o) => write!(f, " at offset {o:#x}"),
            None => Ok(()),
        }
    }
}

impl Error {
    /// Wraps an I/O error of operation `op` on `path` at `offset`.
    pub(crate) fn io<O: Into<Option<u64>>>(
        path: &Path,
        op: &'static str,
        offset: O,
    ) -> impl FnOnce(std::io::Error) -> Error + use<O> {
        let path = path.to_owned();
        let offset = offset.into();
        move |source| Error::Io {
            path,
            op,
            offset,
            source,
        }
    }

    /// A format error of the image at `path`.
    pub(crate) fn format(path: &Path) -> impl FnOnce(FormatError) -> Error + use<> {
        let path = path.to_owned();
        move |source| Error::Format { path, source }
    }

    /// An inconsistency found in the image at `path`.
    pub(crate) fn corrupt(path: &Path, cause: impl Into<Corruption>) -> Error {
        Error::Corrupt {
            path: path.to_owned(),
            cause: cause.into(),
        }
    }

    /// The inconsistency behind this error, if it is one: a corruption
    /// found by the writer, or a table entry that failed validation.
    pub(crate) fn corruption(&self) -> Option<Corruption> {
        match self {
            Error::Corrupt { cause, .. } => Some(cause.clone()),
            Error::Format { source, .. } => Some(Corruption::Format(source.clone())),
            Error::Io { .. }
            | Error::Unsupported { .. }
            | Error::Crypto { .. }
            | Error::Backing { .. }
            | Error::Locked { .. }
            | Error::Decompress { .. }
            | Error::MarkedCorrupt { .. }
            | Error::NotDurable { .. }
            | Error::OutOfRange { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_file_operation_and_offset() {
        let e = Error::io(Path::new("/img"), "write L2 table", 0x30000)(
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert_eq!(e.to_string(), "/img: write L2 table at offset 0x30000");
        let e = Error::io(Path::new("/img"), "flush", None)(std::io::Error::from_raw_os_error(
            libc::EIO,
        ));
        assert_eq!(e.to_string(), "/img: flush");
    }

    #[test]
    fn corruption_keeps_its_typed_cause() {
        let e = Error::corrupt(
            Path::new("/img"),
            Corruption::RefcountUnderflow {
                cluster: HostCluster(7),
            },
        );
        assert!(matches!(
            e.corruption(),
            Some(Corruption::RefcountUnderflow {
                cluster: HostCluster(7)
            })
        ));
        assert_eq!(
            e.to_string(),
            "/img: inconsistent metadata: the refcount of host cluster 0x7 would drop below zero; image marked corrupt"
        );
    }
}
