//! Refcount table entries and refcount blocks of every width
//! (refcount_order 0..=6: 1, 2, 4, 8, 16, 32 and 64 bits per entry).

use crate::error::{Problem, Result, check_aligned, err};
use crate::types::{ClusterCount, Geometry, HostCluster, HostOffset, MAX_REFCOUNT_TABLE_BYTES};

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

/// Where new refcount structures go: the answer of [`refcount_layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefcountLayout {
    /// Clusters of the new refcount table (zero when the table stays).
    pub table_clusters: ClusterCount,
    /// Refcount table indexes that get a new block, ascending; the k-th
    /// block lies k clusters after the new table (or after the run, when
    /// the table stays).
    pub new_blocks: Vec<u64>,
}

impl RefcountLayout {
    /// Clusters the new structures take: the table and the blocks.
    pub fn clusters(&self) -> ClusterCount {
        ClusterCount(self.table_clusters.0 + self.new_blocks.len() as u64)
    }
}

/// Lays out refcount structures for `count` clusters starting at `start`
/// that are about to be used: an optional new refcount table of at least
/// `new_table_entries` entries right after them, then a new refcount block
/// for every table index the run (table and blocks included) reaches that
/// `has_block` says has none. Blocks count every cluster, themselves and
/// the table among them, so this is a fixed point: more blocks may reach
/// further and need more blocks (and a bigger table).
///
/// Used by image creation (`start` 0: everything new), by the refcount
/// rebuild of check and of a dirty image, and by the allocator (runs of
/// new clusters, refcount table growth). Returns `None` if the table would
/// exceed QEMU's 8 MiB limit. With no new table, a block index past the
/// caller's table means the table must grow first.
pub fn refcount_layout(
    geometry: &Geometry,
    start: HostCluster,
    count: ClusterCount,
    new_table_entries: Option<u64>,
    has_block: impl Fn(u64) -> bool,
) -> Option<RefcountLayout> {
    let per_block = geometry.refcount_block_entries();
    let table_max_clusters = (MAX_REFCOUNT_TABLE_BYTES / geometry.cluster_size()).max(1);
    let missing = |total: u64| -> Option<Vec<u64>> {
        let last = start.0.checked_add(total)?.checked_sub(1)?;
        Some(
            (start.0 / per_block..=last / per_block)
                .filter(|&i| !has_block(i))
                .collect(),
        )
    };
    let mut table = u64::from(new_table_entries.is_some());
    let mut blocks: Vec<u64> = Vec::new();
    loop {
        // A new table is followed by at least one block's worth of reach,
        // so the cluster after the structures is covered as well.
        let reach = match new_table_entries {
            Some(_) => (blocks.len() as u64).max(1),
            None => blocks.len() as u64,
        };
        let total = count.0.checked_add(table)?.checked_add(reach)?;
        let need = if total == 0 {
            Vec::new()
        } else {
            missing(total)?
        };
        let need_table = match new_table_entries {
            Some(min) => {
                let entries = need.last().map_or(0, |&i| i + 1).max(min);
                geometry.clusters_for(entries.checked_mul(8)?).max(table)
            }
            None => 0,
        };
        if need_table > table_max_clusters {
            return None;
        }
        if need_table == table && need.len() == blocks.len() {
            return Some(RefcountLayout {
                table_clusters: ClusterCount(table),
                new_blocks: need,
            });
        }
        table = need_table;
        if need.len() >= blocks.len() {
            blocks = need;
        }
    }
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
    fn a_new_image_counts_its_own_table_and_blocks() {
        // 64 KiB clusters, 16-bit refcounts: 32768 entries per block.
        let g = Geometry::new(16, false, 4).unwrap();
        let l = refcount_layout(&g, HostCluster(0), ClusterCount(3), Some(0), |_| false).unwrap();
        assert_eq!(l.table_clusters, ClusterCount(1));
        assert_eq!(l.new_blocks, vec![0]);
        // 32766 used clusters + table + block = 32768: one block still.
        let l =
            refcount_layout(&g, HostCluster(0), ClusterCount(32766), Some(0), |_| false).unwrap();
        assert_eq!(l.new_blocks, vec![0]);
        // One more and the block must count a second block.
        let l =
            refcount_layout(&g, HostCluster(0), ClusterCount(32767), Some(0), |_| false).unwrap();
        assert_eq!(l.new_blocks, vec![0, 1]);
    }

    #[test]
    fn the_fixed_point_covers_every_new_cluster() {
        for (bits, order) in [(9, 0), (9, 4), (12, 6), (16, 4), (16, 0)] {
            let g = Geometry::new(bits, false, order).unwrap();
            let per_block = g.refcount_block_entries();
            for start in [0u64, 1, per_block - 1, 5 * per_block + 3] {
                for count in [0u64, 1, 7, per_block, 3 * per_block + 1] {
                    // Blocks exist for every index below start's block.
                    let has = |i: u64| i < start / per_block;
                    for table in [None, Some(0), Some(200)] {
                        let Some(l) = refcount_layout(
                            &g,
                            HostCluster(start),
                            ClusterCount(count),
                            table,
                            has,
                        ) else {
                            continue;
                        };
                        let end = start + count + l.clusters().0;
                        let covered =
                            |c: u64| has(c / per_block) || l.new_blocks.contains(&(c / per_block));
                        assert!(
                            (start..end).all(covered),
                            "bits {bits} order {order} start {start} count {count} {table:?}: {l:?}"
                        );
                        if let Some(min) = table {
                            let entries = l.table_clusters.0 * g.cluster_size() / 8;
                            assert!(entries >= min);
                            assert!(l.new_blocks.iter().all(|&i| i < entries));
                        } else {
                            assert_eq!(l.table_clusters, ClusterCount(0));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_table_past_8_mib_is_refused() {
        let g = Geometry::new(9, false, 6).unwrap();
        assert!(
            refcount_layout(&g, HostCluster(0), ClusterCount(1), Some(1 << 21), |_| {
                false
            })
            .is_none()
        );
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
