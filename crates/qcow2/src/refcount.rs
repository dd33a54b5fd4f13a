//! Refcount table entries and refcount blocks of every width
//! (refcount_order 0..=6: 1, 2, 4, 8, 16, 32 and 64 bits per entry).

use crate::error::{Problem, Result, check_aligned, err};
use crate::types::{Geometry, HostOffset};

/// Reserved bits of a refcount table entry: 0-8.
const REFTABLE_RESERVED: u64 = 0x1ff;

/// An entry of the refcount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    pub const UNALLOCATED: Self = Self(0);

    pub fn new(block: HostOffset) -> Self {
        Self(block.0 & !REFTABLE_RESERVED)
    }

    /// Offset of the refcount block, or `None` when unallocated.
    pub fn block_offset(self) -> Option<HostOffset> {
        let off = self.0 & !REFTABLE_RESERVED;
        (off != 0).then_some(HostOffset(off))
    }

    /// Checks reserved bits and alignment; `at` is the entry's file offset.
    pub fn validate(self, geometry: &Geometry, at: u64) -> Result<()> {
        if self.0 & REFTABLE_RESERVED != 0 {
            return err(
                "refcount_table.entry",
                at,
                Problem::ReservedBits {
                    bits: self.0 & REFTABLE_RESERVED,
                },
            );
        }
        check_aligned("refcount_table.entry", at, self.0, geometry.cluster_size())
    }
}

/// Why a refcount could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("refcount {value} does not fit in {bits} bits")]
pub struct RefcountOverflow {
    pub value: u64,
    pub bits: u32,
}

/// Reads entry `index` of a refcount block.
///
/// Sub-byte widths pack entries from the least significant bit of each
/// byte; wider entries are big-endian.
///
/// # Panics
/// If `index` is outside the block (a caller bug: indexes come from
/// [`Geometry::refcount_block_index`]).
pub fn get_refcount(block: &[u8], refcount_order: u32, index: usize) -> u64 {
    match refcount_order {
        0..=2 => {
            let bits = 1usize << refcount_order;
            let bit = index * bits;
            let byte = block[bit / 8];
            let mask = (1u16 << bits) - 1;
            u64::from((u16::from(byte) >> (bit % 8)) & mask)
        }
        3 => block[index].into(),
        4 => u16::from_be_bytes([block[2 * index], block[2 * index + 1]]).into(),
        5 => {
            let b = &block[4 * index..4 * index + 4];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]).into()
        }
        6 => {
            let b = &block[8 * index..8 * index + 8];
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        }
        _ => unreachable!("refcount_order is validated to be at most 6"),
    }
}

/// Writes entry `index` of a refcount block.
pub fn set_refcount(
    block: &mut [u8],
    refcount_order: u32,
    index: usize,
    value: u64,
) -> std::result::Result<(), RefcountOverflow> {
    let bits = 1u32 << refcount_order;
    if bits < 64 && value >> bits != 0 {
        return Err(RefcountOverflow { value, bits });
    }
    match refcount_order {
        0..=2 => {
            let bits = bits as usize;
            let bit = index * bits;
            let shift = bit % 8;
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            let byte = &mut block[bit / 8];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        6 => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
        _ => unreachable!("refcount_order is validated to be at most 6"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sub_byte_layout_is_lsb_first() {
        let mut block = vec![0u8; 4];
        set_refcount(&mut block, 0, 0, 1).unwrap();
        set_refcount(&mut block, 0, 9, 1).unwrap();
        assert_eq!(block, [0b0000_0001, 0b0000_0010, 0, 0]);
        let mut block = vec![0u8; 4];
        set_refcount(&mut block, 1, 1, 3).unwrap();
        assert_eq!(block[0], 0b0000_1100);
        let mut block = vec![0u8; 4];
        set_refcount(&mut block, 2, 1, 0xa).unwrap();
        assert_eq!(block[0], 0xa0);
        let mut block = vec![0u8; 4];
        set_refcount(&mut block, 4, 1, 0x1234).unwrap();
        assert_eq!(block, [0, 0, 0x12, 0x34]);
    }

    #[test]
    fn overflow_is_refused() {
        let mut block = vec![0u8; 8];
        assert!(set_refcount(&mut block, 0, 0, 2).is_err());
        assert!(set_refcount(&mut block, 4, 0, 0x1_0000).is_err());
        assert!(set_refcount(&mut block, 6, 0, u64::MAX).is_ok());
        assert_eq!(get_refcount(&block, 6, 0), u64::MAX);
    }

    proptest! {
        #[test]
        fn set_then_get_every_order(order in 0u32..=6, ops in prop::collection::vec((0usize..64, any::<u64>()), 1..64)) {
            let bits = 1u32 << order;
            let mut block = vec![0u8; 64 * 8];
            let mut model = [0u64; 64];
            for (index, value) in ops {
                let value = if bits == 64 { value } else { value & ((1u64 << bits) - 1) };
                set_refcount(&mut block, order, index, value).unwrap();
                model[index] = value;
                for (i, m) in model.iter().enumerate() {
                    prop_assert_eq!(get_refcount(&block, order, i), *m);
                }
            }
        }
    }

    #[test]
    fn table_entries() {
        let geo = Geometry::new(16, false, 4).unwrap();
        assert!(RefcountTableEntry(0x20000).validate(&geo, 0).is_ok());
        assert!(RefcountTableEntry(0x20001).validate(&geo, 0).is_err());
        assert!(RefcountTableEntry(0x20200).validate(&geo, 0).is_err());
        assert_eq!(RefcountTableEntry(0).block_offset(), None);
    }
}
