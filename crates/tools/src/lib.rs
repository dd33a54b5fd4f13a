//! Offline image tools behind the `qblk` command line: `create`, `info`,
//! `check`, `compare`, `convert`, `map`, `measure`, `bitmap`, `snapshot`,
//! `amend`, `ctl`, `rebase`, `commit` and `resize`.
//!
//! These run before or beside the daemon, never on its data path, so they
//! use plain blocking file I/O. Everything they know about the format comes
//! from `qblk-qcow2`; this crate adds files, paths and qemu-img's syntax.

pub mod amend;
pub mod bitmap;
mod chain;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod ctl;
pub mod image;
pub mod info;
pub mod map;
pub mod measure;
pub mod options;
pub mod rebase;
pub mod resize;
pub mod snapshot;
mod source;

use std::io;
use std::path::PathBuf;

/// An error of an offline tool. Messages are short; the `#[source]` chain
/// carries the detail and the CLI prints the whole chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: cannot {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid qcow2 image", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: qblk_qcow2::FormatError,
    },
    #[error("{}: cannot create image", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: qblk_qcow2::create::CreateError,
    },
    #[error("{}: cannot check", path.display())]
    Engine {
        path: PathBuf,
        #[source]
        source: Box<qblk_engine::image::Error>,
    },
    /// An engine operation on an image failed; `op` says which (and
    /// where).
    #[error("{}: {op}", path.display())]
    EngineOp {
        path: PathBuf,
        op: String,
        #[source]
        source: Box<qblk_engine::image::Error>,
    },
    /// The engine failed on an image (open, read, write…); its error
    /// names the file.
    #[error(transparent)]
    Image(Box<qblk_engine::image::Error>),
    /// Another program holds the image (QEMU's image locks).
    #[error("{}: {conflict}", path.display())]
    Locked {
        path: PathBuf,
        conflict: qblk_engine::lock::Conflict,
    },
    #[error("{}: cannot make the LUKS header", path.display())]
    Crypto {
        path: PathBuf,
        #[source]
        source: qblk_engine::crypto::CryptoError,
    },
    /// `check -r leaks` on damage only `-r all` repairs; `messages` are
    /// the check's findings.
    #[error("{}: check failed: need to rebuild refcount structures (use -r all)", path.display())]
    RepairRefused {
        path: PathBuf,
        messages: Vec<String>,
    },
    /// Bad command-line input; the message says what and why.
    #[error("{0}")]
    Usage(String),
    /// The image is valid but uses something this tool cannot handle.
    #[error("{}: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Locks `file` (QEMU's image locks; see `qblk_engine::lock`) for `access`,
/// sharing everything with `force_share` (`-U`). The locks last as long as
/// `file` is open.
pub(crate) fn lock_file(
    file: &impl std::os::fd::AsRawFd,
    path: &std::path::Path,
    access: qblk_engine::lock::Access,
    force_share: bool,
) -> Result<()> {
    use qblk_engine::lock::{LockError, lock};
    lock(file, access.force_share(force_share)).map_err(|e| match e {
        LockError::Conflict(conflict) => Error::Locked {
            path: path.to_owned(),
            conflict,
        },
        LockError::Io { source, .. } => Error::io(path, "lock", source),
    })
}
