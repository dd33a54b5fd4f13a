//! The async qcow2 engine.
//!
//! All host-file I/O goes through io_uring ([`uring`]), one ring per
//! thread, on a single-threaded executor ([`runtime`]). [`mod@file`] wraps a host
//! file (O_DIRECT by default, with aligned bounce buffers), and [`image`]
//! serves guest reads from a qcow2 image and its backing chain.

pub mod amend;
pub mod bitmaps;
pub mod buf;
pub mod check;
mod commit;
pub mod crypto;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod file;
pub mod guest;
pub mod image;
pub mod journal;
mod layout;
pub mod lock;
pub mod map;
pub mod runtime;
pub mod shm;
pub mod stats;
pub mod uring;
pub mod view;
mod write;

pub use error::{Corruption, Error, Result};
pub use image::{Image, OpenOptions};
pub use write::Preallocation;
