//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap
//! directory and bitmap tables.

use bitflags::bitflags;

use crate::be::{PutBe, Reader, align8};
use crate::error::{Problem, Result, check_aligned, check_range, err};
use crate::header::check_table;
use crate::types::{HOST_OFFSET_MASK, HostOffset};

/// Size of the bitmaps extension data.
pub const BITMAPS_EXTENSION_BYTES: usize = 24;
/// QEMU's limit on bitmaps per image (QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name QEMU accepts.
pub const MAX_BITMAP_NAME_BYTES: u16 = 1023;
/// Fixed part of a bitmap directory entry.
pub const BITMAP_ENTRY_FIXED_BYTES: usize = 24;
/// Type code of a dirty tracking bitmap, the only type defined.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limit on one bitmap table (BME_MAX_TABLE_SIZE), in entries.
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 0x800_0000;

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapsExtension {
    /// Number of bitmaps, 1..=65535.
    pub nb_bitmaps: u32,
    /// Must be zero.
    pub reserved: u32,
    pub bitmap_directory_size: u64,
    /// Cluster aligned.
    pub bitmap_directory_offset: u64,
}

impl BitmapsExtension {
    /// Parses and validates the extension's data (the bytes after the
    /// extension's type and length).
    pub(crate) fn parse(r: &Reader<'_>, cluster_size: u64) -> Result<Self> {
        if r.len() != BITMAPS_EXTENSION_BYTES {
            return err(
                "header_extension.bitmaps.length",
                r.file_offset(0).saturating_sub(4),
                Problem::OutOfRange {
                    value: r.len() as u64,
                    min: BITMAPS_EXTENSION_BYTES as u64,
                    max: BITMAPS_EXTENSION_BYTES as u64,
                },
            );
        }
        let b = Self {
            nb_bitmaps: r.u32(0, "bitmaps.nb_bitmaps")?,
            reserved: r.u32(4, "bitmaps.reserved")?,
            bitmap_directory_size: r.u64(8, "bitmaps.bitmap_directory_size")?,
            bitmap_directory_offset: r.u64(16, "bitmaps.bitmap_directory_offset")?,
        };
        check_range(
            "bitmaps.nb_bitmaps",
            r.file_offset(0),
            b.nb_bitmaps.into(),
            1,
            MAX_BITMAPS.into(),
        )?;
        if b.reserved != 0 {
            return err(
                "bitmaps.reserved",
                r.file_offset(4),
                Problem::ReservedBits {
                    bits: b.reserved.into(),
                },
            );
        }
        let min_dir = u64::from(b.nb_bitmaps) * BITMAP_ENTRY_FIXED_BYTES as u64;
        check_range(
            "bitmaps.bitmap_directory_size",
            r.file_offset(8),
            b.bitmap_directory_size,
            min_dir,
            MAX_BITMAP_DIRECTORY_BYTES,
        )?;
        check_table(
            "bitmaps.bitmap_directory_offset",
            r.file_offset(16),
            b.bitmap_directory_offset,
            b.bitmap_directory_size,
            cluster_size,
        )?;
        Ok(b)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.nb_bitmaps);
        out.put_u32(self.reserved);
        out.put_u64(self.bitmap_directory_size);
        out.put_u64(self.bitmap_directory_offset);
    }
}

bitflags! {
    /// Flags of a bitmap directory entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BitmapFlags: u32 {
        /// Not saved correctly; may be inconsistent.
        const IN_USE = 1 << 0;
        /// Tracks every write (enabled).
        const AUTO = 1 << 1;
        /// Unknown extra data may be ignored.
        const EXTRA_DATA_COMPATIBLE = 1 << 2;
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BitmapDirectoryEntry {
    pub bitmap_table_offset: u64,
    /// Entries in the bitmap table.
    pub bitmap_table_size: u32,
    pub flags: BitmapFlags,
    /// 1: dirty tracking bitmap.
    pub bitmap_type: u8,
    /// granularity = 1 << granularity_bits.
    pub granularity_bits: u8,
    pub extra_data: Vec<u8>,
    pub name: Vec<u8>,
}

impl BitmapDirectoryEntry {
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Encoded size including padding.
    pub fn encoded_len(&self) -> usize {
        align8(BITMAP_ENTRY_FIXED_BYTES + self.extra_data.len() + self.name.len())
            .unwrap_or(usize::MAX)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.bitmap_table_offset);
        out.put_u32(self.bitmap_table_size);
        out.put_u32(self.flags.bits());
        out.put_u8(self.bitmap_type);
        out.put_u8(self.granularity_bits);
        out.put_u16(u16::try_from(self.name.len()).unwrap_or(u16::MAX));
        out.put_u32(u32::try_from(self.extra_data.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name);
        out.pad_to(8);
    }
}

/// Bytes of bitmap data for a disk of `disk_size` bytes.
pub fn bitmap_data_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(8)
}

/// Entries the bitmap table of such a bitmap must have.
pub fn bitmap_table_entries(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_data_bytes(disk_size, granularity_bits).div_ceil(cluster_size)
}

/// Parses and validates the bitmap directory.
///
/// `buf` holds exactly `bitmap_directory_size` bytes read from
/// `ext.bitmap_directory_offset`.
pub fn parse_bitmap_directory(
    buf: &[u8],
    ext: &BitmapsExtension,
    disk_size: u64,
    cluster_size: u64,
) -> Result<Vec<BitmapDirectoryEntry>> {
    let r = Reader::new(buf, ext.bitmap_directory_offset);
    let mut entries: Vec<BitmapDirectoryEntry> = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let table_offset = r.u64(pos, "bitmap_directory.bitmap_table_offset")?;
        let table_size = r.u32(pos + 8, "bitmap_directory.bitmap_table_size")?;
        let flags_raw = r.u32(pos + 12, "bitmap_directory.flags")?;
        let bitmap_type = r.u8(pos + 16, "bitmap_directory.type")?;
        let granularity_bits = r.u8(pos + 17, "bitmap_directory.granularity_bits")?;
        let name_size = r.u16(pos + 18, "bitmap_directory.name_size")?;
        let extra_size = r.u32(pos + 20, "bitmap_directory.extra_data_size")? as usize;

        let flags = BitmapFlags::from_bits_retain(flags_raw);
        let reserved = flags.bits() & !BitmapFlags::all().bits();
        if reserved != 0 {
            return err(
                "bitmap_directory.flags",
                r.file_offset(pos + 12),
                Problem::ReservedBits {
                    bits: reserved.into(),
                },
            );
        }
        if bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
            return err(
                "bitmap_directory.type",
                r.file_offset(pos + 16),
                Problem::OutOfRange {
                    value: bitmap_type.into(),
                    min: 1,
                    max: 1,
                },
            );
        }
        check_range(
            "bitmap_directory.granularity_bits",
            r.file_offset(pos + 17),
            granularity_bits.into(),
            0,
            63,
        )?;
        check_range(
            "bitmap_directory.name_size",
            r.file_offset(pos + 18),
            name_size.into(),
            1,
            MAX_BITMAP_NAME_BYTES.into(),
        )?;
        check_table(
            "bitmap_directory.bitmap_table_offset",
            r.file_offset(pos),
            table_offset,
            u64::from(table_size) * 8,
            cluster_size,
        )?;
        // A bitmap in use was sized for the disk as it was when its writer
        // stopped saving it (a resize may have followed); it is never read,
        // so only a consistent bitmap's table must cover the disk (QEMU's
        // rule: larger is allowed).
        let want = bitmap_table_entries(disk_size, granularity_bits, cluster_size);
        let short = !flags.contains(BitmapFlags::IN_USE) && u64::from(table_size) < want;
        if short || table_size > MAX_BITMAP_TABLE_ENTRIES {
            return err(
                "bitmap_directory.bitmap_table_size",
                r.file_offset(pos + 8),
                Problem::Inconsistent(
                    "bitmap table size does not match the disk size and granularity",
                ),
            );
        }
        let var = pos + BITMAP_ENTRY_FIXED_BYTES;
        let extra_data = r
            .bytes(var, extra_size, "bitmap_directory.extra_data")?
            .to_vec();
        let name = r
            .bytes(var + extra_size, name_size.into(), "bitmap_directory.name")?
            .to_vec();
        let end = var + extra_size + usize::from(name_size);
        let padded = align8(end).unwrap_or(usize::MAX);
        let padding = r.bytes(end, padded - end, "bitmap_directory.padding")?;
        if padding.iter().any(|&b| b != 0) {
            return err(
                "bitmap_directory.padding",
                r.file_offset(end),
                Problem::Inconsistent("padding must be zero"),
            );
        }
        if entries.iter().any(|e| e.name == name) {
            return err(
                "bitmap_directory.name",
                r.file_offset(var + extra_size),
                Problem::Duplicate,
            );
        }
        entries.push(BitmapDirectoryEntry {
            bitmap_table_offset: table_offset,
            bitmap_table_size: table_size,
            flags,
            bitmap_type,
            granularity_bits,
            extra_data,
            name,
        });
        pos = padded;
    }
    if pos as u64 != ext.bitmap_directory_size {
        return err(
            "bitmaps.bitmap_directory_size",
            ext.bitmap_directory_offset,
            Problem::Inconsistent("directory size does not match the sum of its entries"),
        );
    }
    Ok(entries)
}

/// A decoded bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapTableEntry {
    /// Unallocated; the cluster of bitmap data reads as zeros.
    Zeros,
    /// Unallocated; the cluster of bitmap data reads as ones.
    Ones,
    /// Bitmap data lives in this host cluster.
    Allocated(HostOffset),
}

impl BitmapTableEntry {
    /// Decodes an entry; `at` is its file offset, for errors.
    pub fn decode(raw: u64, cluster_size: u64, at: u64) -> Result<Self> {
        let reserved = raw & !(HOST_OFFSET_MASK | 1);
        if reserved != 0 {
            return err(
                "bitmap_table.entry",
                at,
                Problem::ReservedBits { bits: reserved },
            );
        }
        let offset = raw & HOST_OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & 1 == 1 {
                Self::Ones
            } else {
                Self::Zeros
            });
        }
        if raw & 1 != 0 {
            return err("bitmap_table.entry", at, Problem::ReservedBits { bits: 1 });
        }
        check_aligned("bitmap_table.entry", at, offset, cluster_size)?;
        Ok(Self::Allocated(HostOffset(offset)))
    }

    pub fn encode(self) -> u64 {
        match self {
            Self::Zeros => 0,
            Self::Ones => 1,
            Self::Allocated(o) => o.0 & HOST_OFFSET_MASK,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            bitmap_table_offset: 0x50000,
            bitmap_table_size: 1,
            flags: BitmapFlags::AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data: vec![],
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn directory_round_trip() {
        let entries = vec![entry("b0"), entry("a-longer-bitmap-name")];
        let mut buf = Vec::new();
        for e in &entries {
            e.encode(&mut buf);
        }
        let ext = BitmapsExtension {
            nb_bitmaps: 2,
            reserved: 0,
            bitmap_directory_size: buf.len() as u64,
            bitmap_directory_offset: 0x40000,
        };
        let parsed = parse_bitmap_directory(&buf, &ext, 64 << 20, 65536).unwrap();
        assert_eq!(parsed, entries);
    }

    #[test]
    fn directory_errors_name_fields() {
        let mut buf = Vec::new();
        entry("b0").encode(&mut buf);
        let ext = BitmapsExtension {
            nb_bitmaps: 1,
            reserved: 0,
            bitmap_directory_size: buf.len() as u64,
            bitmap_directory_offset: 0x40000,
        };
        let mut bad = buf.clone();
        bad[16] = 2;
        let e = parse_bitmap_directory(&bad, &ext, 64 << 20, 65536).unwrap_err();
        assert_eq!((e.field, e.offset), ("bitmap_directory.type", 0x40010));
        let e = parse_bitmap_directory(&buf, &ext, 1 << 40, 65536).unwrap_err();
        assert_eq!(e.field, "bitmap_directory.bitmap_table_size");
        let mut dup = buf.clone();
        entry("b0").encode(&mut dup);
        let ext2 = BitmapsExtension {
            nb_bitmaps: 2,
            bitmap_directory_size: dup.len() as u64,
            ..ext
        };
        let e = parse_bitmap_directory(&dup, &ext2, 64 << 20, 65536).unwrap_err();
        assert_eq!(e.problem, Problem::Duplicate);
    }

    #[test]
    fn bitmap_table_entries_decode() {
        assert_eq!(
            BitmapTableEntry::decode(0, 65536, 0),
            Ok(BitmapTableEntry::Zeros)
        );
        assert_eq!(
            BitmapTableEntry::decode(1, 65536, 0),
            Ok(BitmapTableEntry::Ones)
        );
        assert_eq!(
            BitmapTableEntry::decode(0x30000, 65536, 0),
            Ok(BitmapTableEntry::Allocated(HostOffset(0x30000)))
        );
        assert!(BitmapTableEntry::decode(0x30001, 65536, 0).is_err());
        assert!(BitmapTableEntry::decode(0x30200, 65536, 0).is_err());
        assert!(BitmapTableEntry::decode(1 << 60, 65536, 0).is_err());
        assert!(BitmapTableEntry::decode(2, 65536, 0).is_err());
    }

    #[test]
    fn table_size_figures() {
        // 64 MiB at 64 KiB granularity: 1024 bits = 128 bytes = 1 cluster.
        assert_eq!(bitmap_table_entries(64 << 20, 16, 65536), 1);
        // 1 TiB at 512-byte granularity: 2^31 bits = 256 MiB = 4096 clusters.
        assert_eq!(bitmap_table_entries(1 << 40, 9, 65536), 4096);
    }
}
