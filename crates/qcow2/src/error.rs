//! Errors of the format crate.
//!
//! Every error found in on-disk data names the structure field (in the
//! specification's words) and the file offset at which that field lives, so an
//! operator can open the image in a hex editor and look.

use std::fmt;

/// What was wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("magic is {found:#010x}, expected {expected:#010x} (\"QFI\\xfb\")")]
    BadMagic { found: u32, expected: u32 },
    #[error("value {value} is outside {min}..={max}")]
    OutOfRange { value: u64, min: u64, max: u64 },
    #[error("value {value:#x} is not a multiple of {alignment:#x}")]
    Misaligned { value: u64, alignment: u64 },
    #[error("reserved bits {bits:#x} are set")]
    ReservedBits { bits: u64 },
    #[error("structure needs {need} bytes but only {have} are available")]
    Truncated { need: u64, have: u64 },
    #[error("unknown incompatible feature bits {bits:#x} ({names})")]
    UnknownIncompatible { bits: u64, names: String },
    #[error("{0}")]
    Inconsistent(&'static str),
    #[error("{value:#x} lies past the end of the file ({file_len} bytes)")]
    PastEndOfFile { value: u64, file_len: u64 },
    #[error("value overflows 64 bits")]
    Overflow,
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("appears more than once")]
    Duplicate,
    #[error("points into {what} (cluster at {offset:#x})")]
    Overlaps { offset: u64, what: &'static str },
}

/// An error in qcow2 on-disk data, naming the field and its file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// The field, in the specification's words (e.g. `header.cluster_bits`).
    pub field: &'static str,
    /// Byte offset in the image file where the field (or structure) lives.
    pub offset: u64,
    pub problem: Problem,
}

impl FormatError {
    pub fn new(field: &'static str, offset: u64, problem: Problem) -> Self {
        Self {
            field,
            offset,
            problem,
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {:#x}: {}",
            self.field, self.offset, self.problem
        )
    }
}

impl std::error::Error for FormatError {}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Shorthand used by the parsers: `err("header.size", 24, Problem::Overflow)`.
pub(crate) fn err<T>(field: &'static str, offset: u64, problem: Problem) -> Result<T> {
    Err(FormatError::new(field, offset, problem))
}

/// Checks `min <= value <= max`.
pub(crate) fn check_range(
    field: &'static str,
    offset: u64,
    value: u64,
    min: u64,
    max: u64,
) -> Result<()> {
    if value < min || value > max {
        return err(field, offset, Problem::OutOfRange { value, min, max });
    }
    Ok(())
}

/// Checks that `value` is a multiple of `alignment` (a power of two).
pub(crate) fn check_aligned(
    field: &'static str,
    offset: u64,
    value: u64,
    alignment: u64,
) -> Result<()> {
    debug_assert!(alignment.is_power_of_two());
    if value & (alignment - 1) != 0 {
        return err(field, offset, Problem::Misaligned { value, alignment });
    }
    Ok(())
}
