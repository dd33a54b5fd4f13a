//! L1 and L2 table entries: the guest-to-host cluster mapping.
//!
//! [`L2Entry::decode`] turns the raw entry (and, with extended L2 entries,
//! its subcluster bitmap) into a [`ClusterDescriptor`] after checking every
//! reserved bit and alignment rule of the specification. The engine acts on
//! descriptors only; it never interprets raw bits.

use crate::error::{Problem, Result, check_aligned, err};
use crate::types::{Geometry, HOST_OFFSET_MASK, HostOffset};

/// Bit 63 of L1 and standard L2 entries: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard cluster descriptor: reads as zeros.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry: 0-8 and 56-62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry: 1-8 and 56-61.
const L2_STANDARD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// An entry of an L1 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub const UNALLOCATED: Self = Self(0);

    pub fn new(l2_offset: HostOffset, copied: bool) -> Self {
        Self((l2_offset.0 & HOST_OFFSET_MASK) | if copied { COPIED } else { 0 })
    }

    /// Offset of the L2 table, or `None` when unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        let off = self.0 & HOST_OFFSET_MASK;
        (off != 0).then_some(HostOffset(off))
    }

    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// Checks reserved bits and alignment; `at` is the entry's file offset.
    pub fn validate(self, geometry: &Geometry, at: u64) -> Result<()> {
        let reserved = self.0 & L1_RESERVED;
        if reserved != 0 {
            return err(
                "l1_table.entry",
                at,
                Problem::ReservedBits { bits: reserved },
            );
        }
        if let Some(off) = self.l2_offset() {
            check_aligned("l1_table.entry", at, off.0, geometry.cluster_size())?;
        }
        Ok(())
    }
}

/// State of one subcluster of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubclusterState {
    /// Reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Reads from the host cluster.
    Allocated,
}

/// The subcluster allocation bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: Self = Self(0xffff_ffff);
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: Self = Self(0xffff_ffff << 32);

    pub fn allocation(self) -> u32 {
        (self.0 & 0xffff_ffff) as u32
    }

    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub fn from_parts(allocation: u32, zero: u32) -> Self {
        Self(u64::from(allocation) | (u64::from(zero) << 32))
    }

    pub fn state(self, index: u32) -> SubclusterState {
        debug_assert!(index < 32);
        if self.allocation() & (1 << index) != 0 {
            SubclusterState::Allocated
        } else if self.zero() & (1 << index) != 0 {
            SubclusterState::Zero
        } else {
            SubclusterState::Unallocated
        }
    }
}

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterDescriptor {
    /// No host cluster: backing file or zeros.
    Unallocated,
    /// Reads as zeros (standard descriptor with bit 0). `preallocated` is the
    /// host cluster kept for it, if any.
    Zero {
        preallocated: Option<HostOffset>,
        copied: bool,
    },
    /// Data in a host cluster. `subclusters` is all-allocated without
    /// extended L2 entries.
    Standard {
        host: HostOffset,
        copied: bool,
        subclusters: SubclusterBitmap,
    },
    /// Extended L2 entry with no host cluster: every subcluster is
    /// unallocated or zero.
    UnallocatedSubclusters { subclusters: SubclusterBitmap },
    /// Compressed data starting at `host` (not aligned), spanning `len` bytes
    /// at most (the end of its last 512-byte sector).
    Compressed { host: HostOffset, len: u64 },
}

impl ClusterDescriptor {
    /// The host offset this descriptor points at, if any (compressed data
    /// starts unaligned and may run into the next host cluster).
    pub fn host_cluster_offset(&self) -> Option<HostOffset> {
        match *self {
            Self::Standard { host, .. } => Some(host),
            Self::Zero { preallocated, .. } => preallocated,
            Self::Compressed { host, .. } => Some(host),
            Self::Unallocated | Self::UnallocatedSubclusters { .. } => None,
        }
    }
}

/// An L2 table entry as stored: the 64-bit word and, with extended L2
/// entries, the 64-bit subcluster bitmap (zero otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

impl L2Entry {
    pub const UNALLOCATED: Self = Self { word: 0, bitmap: 0 };

    /// A standard cluster at `host`. With extended L2 entries pass the
    /// subcluster bitmap; otherwise pass `SubclusterBitmap(0)`.
    pub fn standard(host: HostOffset, copied: bool, subclusters: SubclusterBitmap) -> Self {
        Self {
            word: (host.0 & HOST_OFFSET_MASK) | if copied { COPIED } else { 0 },
            bitmap: subclusters.0,
        }
    }

    /// A zero cluster in an image without extended L2 entries (version 3).
    pub fn zero(preallocated: Option<HostOffset>, copied: bool) -> Self {
        let host = preallocated.map_or(0, |h| h.0 & HOST_OFFSET_MASK);
        Self {
            word: host | ZERO | if copied && host != 0 { COPIED } else { 0 },
            bitmap: 0,
        }
    }

    /// A compressed cluster whose data starts at `host` and is `len` bytes
    /// long (`len` >= 1).
    pub fn compressed(geometry: &Geometry, host: HostOffset, len: u64) -> Option<Self> {
        let x = geometry.compressed_offset_bits();
        if len == 0 || host.0 >> x != 0 || host.0 >> 56 != 0 {
            return None;
        }
        let end = host.0.checked_add(len)?;
        let first_sector = host.0 >> 9;
        let last_sector = (end - 1) >> 9;
        let additional = last_sector - first_sector;
        let mask = (1u64 << (62 - x)) - 1;
        if additional > mask {
            return None;
        }
        Some(Self {
            word: COMPRESSED | (additional << x) | host.0,
            bitmap: 0,
        })
    }

    pub fn copied(&self) -> bool {
        self.word & COPIED != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.word & COMPRESSED != 0
    }

    /// Decodes and validates the entry. `at` is the entry's file offset and
    /// `external_data_file` says whether standard clusters live in an
    /// external data file (where offset 0 is a valid cluster).
    pub fn decode(
        &self,
        geometry: &Geometry,
        version3: bool,
        external_data_file: bool,
        at: u64,
    ) -> Result<ClusterDescriptor> {
        let word = self.word;
        let extended = geometry.extended_l2();
        if word & COMPRESSED != 0 {
            if external_data_file {
                return err(
                    "l2_table.entry",
                    at,
                    Problem::Inconsistent(
                        "compressed cluster in an image with an external data file",
                    ),
                );
            }
            if extended && self.bitmap != 0 {
                return err(
                    "l2_table.subcluster_bitmap",
                    at + 8,
                    Problem::ReservedBits { bits: self.bitmap },
                );
            }
            if word & COPIED != 0 {
                return err("l2_table.entry", at, Problem::ReservedBits { bits: COPIED });
            }
            let x = geometry.compressed_offset_bits();
            let offset_mask = (1u64 << x) - 1;
            let host = word & offset_mask;
            if host >> 56 != 0 {
                return err(
                    "l2_table.entry",
                    at,
                    Problem::ReservedBits {
                        bits: host & !((1 << 56) - 1),
                    },
                );
            }
            let sectors_mask = (1u64 << (62 - x)) - 1;
            let nb_sectors = ((word >> x) & sectors_mask) + 1;
            let len = nb_sectors * 512 - (host & 511);
            if host == 0 {
                return err(
                    "l2_table.entry",
                    at,
                    Problem::Inconsistent("compressed cluster at offset 0"),
                );
            }
            return Ok(ClusterDescriptor::Compressed {
                host: HostOffset(host),
                len,
            });
        }

        let reserved = word & L2_STANDARD_RESERVED;
        if reserved != 0 {
            return err(
                "l2_table.entry",
                at,
                Problem::ReservedBits { bits: reserved },
            );
        }
        let host = word & HOST_OFFSET_MASK;
        let copied = word & COPIED != 0;
        check_aligned("l2_table.entry", at, host, geometry.cluster_size())?;
        let has_host = host != 0 || (external_data_file && copied);

        if extended {
            if word & ZERO != 0 {
                return err("l2_table.entry", at, Problem::ReservedBits { bits: ZERO });
            }
            let bm = SubclusterBitmap(self.bitmap);
            if bm.allocation() & bm.zero() != 0 {
                return err(
                    "l2_table.subcluster_bitmap",
                    at + 8,
                    Problem::Inconsistent("subcluster both allocated and zero"),
                );
            }
            if !has_host {
                if bm.allocation() != 0 {
                    return err(
                        "l2_table.subcluster_bitmap",
                        at + 8,
                        Problem::Inconsistent("allocated subclusters without a host cluster"),
                    );
                }
                return Ok(if bm.0 == 0 {
                    ClusterDescriptor::Unallocated
                } else {
                    ClusterDescriptor::UnallocatedSubclusters { subclusters: bm }
                });
            }
            return Ok(ClusterDescriptor::Standard {
                host: HostOffset(host),
                copied,
                subclusters: bm,
            });
        }

        if word & ZERO != 0 {
            if !version3 {
                return err(
                    "l2_table.entry",
                    at,
                    Problem::Inconsistent("zero flag in a version 2 image"),
                );
            }
            return Ok(ClusterDescriptor::Zero {
                preallocated: has_host.then_some(HostOffset(host)),
                copied,
            });
        }
        if !has_host {
            if copied {
                return err(
                    "l2_table.entry",
                    at,
                    Problem::Inconsistent("COPIED set on an unallocated cluster"),
                );
            }
            return Ok(ClusterDescriptor::Unallocated);
        }
        Ok(ClusterDescriptor::Standard {
            host: HostOffset(host),
            copied,
            subclusters: SubclusterBitmap::ALL_ALLOCATED,
        })
    }

    /// Reads entry `index` of an L2 table held in `table`.
    pub fn read(table: &[u8], geometry: &Geometry, index: usize) -> Option<Self> {
        let size = geometry.l2_entry_size() as usize;
        let b = table.get(index * size..(index + 1) * size)?;
        let word = u64::from_be_bytes(b[0..8].try_into().ok()?);
        let bitmap = if size == 16 {
            u64::from_be_bytes(b[8..16].try_into().ok()?)
        } else {
            0
        };
        Some(Self { word, bitmap })
    }

    /// Writes this entry as entry `index` of `table`.
    pub fn write(&self, table: &mut [u8], geometry: &Geometry, index: usize) {
        let size = geometry.l2_entry_size() as usize;
        let b = &mut table[index * size..(index + 1) * size];
        b[0..8].copy_from_slice(&self.word.to_be_bytes());
        if size == 16 {
            b[8..16].copy_from_slice(&self.bitmap.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32, ext: bool) -> Geometry {
        Geometry::new(bits, ext, 4).unwrap()
    }

    #[test]
    fn standard_and_unallocated() {
        let geo = g(16, false);
        assert_eq!(
            L2Entry::UNALLOCATED.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::Unallocated)
        );
        let e = L2Entry::standard(HostOffset(0x50000), true, SubclusterBitmap(0));
        assert_eq!(e.word, 0x8000_0000_0005_0000);
        assert_eq!(
            e.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::Standard {
                host: HostOffset(0x50000),
                copied: true,
                subclusters: SubclusterBitmap::ALL_ALLOCATED
            })
        );
        // Misaligned host offset.
        let bad = L2Entry {
            word: 0x8000_0000_0005_0200,
            bitmap: 0,
        };
        assert!(bad.decode(&geo, true, false, 0x40000).is_err());
        // Reserved bits 56-61.
        let bad = L2Entry {
            word: 0x0100_0000_0005_0000,
            bitmap: 0,
        };
        let e = bad.decode(&geo, true, false, 0x40008).unwrap_err();
        assert_eq!(e.offset, 0x40008);
    }

    #[test]
    fn zero_flag_rules() {
        let geo = g(16, false);
        let z = L2Entry::zero(None, false);
        assert_eq!(
            z.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::Zero {
                preallocated: None,
                copied: false
            })
        );
        assert!(
            z.decode(&geo, false, false, 0).is_err(),
            "v2 has no zero flag"
        );
        let z = L2Entry::zero(Some(HostOffset(0x60000)), true);
        assert_eq!(
            z.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::Zero {
                preallocated: Some(HostOffset(0x60000)),
                copied: true
            })
        );
    }

    #[test]
    fn external_data_file_offset_zero() {
        let geo = g(16, false);
        let e = L2Entry {
            word: COPIED,
            bitmap: 0,
        };
        assert!(matches!(
            e.decode(&geo, true, true, 0),
            Ok(ClusterDescriptor::Standard {
                host: HostOffset(0),
                ..
            })
        ));
        assert!(e.decode(&geo, true, false, 0).is_err());
    }

    #[test]
    fn compressed_bit_split_depends_on_cluster_bits() {
        for bits in 9..=21 {
            let geo = g(bits, false);
            let host = HostOffset(0x12_3456 + 3);
            let len = 1000.min(geo.cluster_size());
            let e = L2Entry::compressed(&geo, host, len).unwrap();
            match e.decode(&geo, true, false, 0).unwrap() {
                ClusterDescriptor::Compressed { host: h, len: l } => {
                    assert_eq!(h, host);
                    assert!(l >= len && l < len + 512, "bits {bits}: {l}");
                }
                other => panic!("{other:?}"),
            }
        }
        // QEMU's example: 64 KiB clusters give x = 54.
        let geo = g(16, false);
        let e = L2Entry {
            word: COMPRESSED | (3 << 54) | 0x1_0200,
            bitmap: 0,
        };
        assert_eq!(
            e.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::Compressed {
                host: HostOffset(0x1_0200),
                len: 4 * 512
            })
        );
    }

    #[test]
    fn extended_entries() {
        let geo = g(16, true);
        let e = L2Entry::standard(
            HostOffset(0x50000),
            true,
            SubclusterBitmap::from_parts(0b101, 0b010),
        );
        match e.decode(&geo, true, false, 0).unwrap() {
            ClusterDescriptor::Standard { subclusters, .. } => {
                assert_eq!(subclusters.state(0), SubclusterState::Allocated);
                assert_eq!(subclusters.state(1), SubclusterState::Zero);
                assert_eq!(subclusters.state(3), SubclusterState::Unallocated);
            }
            other => panic!("{other:?}"),
        }
        let both = L2Entry::standard(
            HostOffset(0x50000),
            true,
            SubclusterBitmap::from_parts(1, 1),
        );
        assert!(both.decode(&geo, true, false, 0).is_err());
        let alloc_without_host = L2Entry { word: 0, bitmap: 1 };
        assert!(alloc_without_host.decode(&geo, true, false, 0).is_err());
        let zeros = L2Entry {
            word: 0,
            bitmap: SubclusterBitmap::ALL_ZERO.0,
        };
        assert!(matches!(
            zeros.decode(&geo, true, false, 0),
            Ok(ClusterDescriptor::UnallocatedSubclusters { .. })
        ));
        let zero_flag = L2Entry {
            word: ZERO,
            bitmap: 0,
        };
        assert!(zero_flag.decode(&geo, true, false, 0).is_err());
    }

    #[test]
    fn l1_entries() {
        let geo = g(16, false);
        let e = L1Entry::new(HostOffset(0x40000), true);
        assert_eq!(e.0, 0x8000_0000_0004_0000);
        assert!(e.validate(&geo, 0).is_ok());
        assert_eq!(e.l2_offset(), Some(HostOffset(0x40000)));
        assert!(L1Entry(0x0000_0000_0004_0200).validate(&geo, 0).is_err());
        assert!(L1Entry(0x4000_0000_0004_0000).validate(&geo, 0).is_err());
        assert!(L1Entry(0x0000_0000_0004_0001).validate(&geo, 0).is_err());
    }

    #[test]
    fn read_write_table() {
        for ext in [false, true] {
            let geo = g(16, ext);
            let mut table = vec![0u8; 65536];
            let e = L2Entry::standard(
                HostOffset(0x70000),
                false,
                SubclusterBitmap(if ext { 7 } else { 0 }),
            );
            e.write(&mut table, &geo, 5);
            assert_eq!(L2Entry::read(&table, &geo, 5), Some(e));
            assert_eq!(L2Entry::read(&table, &geo, geo.l2_entries() as usize), None);
        }
    }
}
