//! The qcow2 on-disk format, as QEMU's `docs/interop/qcow2.txt` defines it.
//!
//! This crate answers "what is where" and "what bytes must be written"; it
//! does no I/O and knows nothing of files, async runtimes or virtio. Every
//! structure has one way in (a `parse`/`decode` that validates untrusted bytes
//! and names the offending field and its file offset) and one way out (an
//! `encode`/`write`).
//!
//! - [`header`]: the header, feature bits and header extensions.
//! - [`types`]: guest/host offset newtypes and the [`types::Geometry`] that
//!   relates them.
//! - [`mapping`]: L1 and L2 entries, standard, zero, compressed and extended
//!   (subcluster) descriptors.
//! - [`refcount`]: refcount table entries and refcount blocks of every width.
//! - [`snapshot`]: the internal snapshot table.
//! - [`bitmap`]: the bitmaps extension, bitmap directory and bitmap tables.
//! - [`luks`]: the LUKS1 header of an encrypted image.
//! - [`tally`]: refcounts computed from references, for check and repair.
//! - [`create`]: the layout of a new image.
//! - [`measure`]: how large a new image gets (qemu-img measure's figures).

// qblk targets 64-bit Linux (io_uring, vhost-user): offsets and lengths
// that fit in u64 are converted to usize only after bounds checks against
// in-memory buffers, which this assertion makes sound.
const _: () = assert!(usize::BITS == 64, "qblk needs a 64-bit target");

mod be;
pub mod bitmap;
pub mod create;
pub mod error;
pub mod fuzz;
pub mod header;
pub mod luks;
pub mod mapping;
pub mod measure;
pub mod refcount;
pub mod snapshot;
pub mod tally;
pub mod types;

pub use be::{decode_table, encode_table};
pub use error::{FormatError, Problem};
pub use header::Header;
pub use types::{ClusterCount, Geometry, GuestCluster, GuestOffset, HostCluster, HostOffset};
