//! How large a qcow2 image gets: the figures `qemu-img measure` reports.
//!
//! The estimates are QEMU's (block/qcow2.c), not exact layouts: metadata
//! for a fully allocated image of the given size (header, L1 and L2 tables,
//! refcount table and blocks at their fixed point), the data clusters, and
//! the space persistent bitmaps would take. Arithmetic is checked: a size
//! too large to describe gives `None`, never a wrapped figure.

use crate::bitmap::BITMAP_ENTRY_FIXED_BYTES;

/// Bytes per L1 entry and per refcount table entry.
const TABLE_ENTRY_BYTES: u64 = 8;
/// QEMU refuses images whose L1 table would exceed 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// What a new image is measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureGeometry {
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub extended_l2: bool,
}

impl MeasureGeometry {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2 { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Whether an image of `virtual_size` bytes has an L1 table QEMU
    /// accepts.
    pub fn l1_fits(&self, virtual_size: u64) -> bool {
        let cs = self.cluster_size();
        let clusters = virtual_size.div_ceil(cs);
        let l2_tables = clusters.div_ceil(self.l2_entries());
        l2_tables
            .checked_mul(TABLE_ENTRY_BYTES)
            .is_some_and(|b| b <= MAX_L1_BYTES)
    }

    /// The size of a fully allocated image of `virtual_size` bytes:
    /// the data rounded up to whole clusters plus all the metadata it
    /// needs (QEMU's `qcow2_calc_prealloc_size`).
    pub fn fully_allocated(&self, virtual_size: u64) -> Option<u64> {
        let cs = self.cluster_size();
        let data = virtual_size.checked_next_multiple_of(cs)?;
        // The header cluster.
        let mut meta = cs;
        let l2_tables = (data / cs).div_ceil(self.l2_entries());
        meta = meta.checked_add(l2_tables.checked_mul(cs)?)?;
        let l1_clusters = l2_tables.checked_mul(TABLE_ENTRY_BYTES)?.div_ceil(cs);
        meta = meta.checked_add(l1_clusters.checked_mul(cs)?)?;
        let counted = meta.checked_add(data)? / cs;
        let refcounts = self.refcount_metadata_size(counted)?;
        meta.checked_add(refcounts)?.checked_add(data)
    }

    /// Bytes of refcount table and blocks that count `clusters` clusters
    /// and themselves: the fixed point of blocks covering clusters, table
    /// and blocks (QEMU's `qcow2_refcount_metadata_size`).
    fn refcount_metadata_size(&self, clusters: u64) -> Option<u64> {
        let cs = self.cluster_size();
        let blocks_per_table_cluster = cs / TABLE_ENTRY_BYTES;
        let refcounts_per_block = (cs * 8) >> self.refcount_order;
        let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            blocks = clusters
                .checked_add(table)?
                .checked_add(blocks)?
                .div_ceil(refcounts_per_block);
            table = blocks.div_ceil(blocks_per_table_cluster);
            n = clusters.checked_add(blocks)?.checked_add(table)?;
            if n == last {
                break;
            }
        }
        blocks.checked_add(table)?.checked_mul(cs)
    }

    /// The space QEMU reserves for one persistent bitmap of an image of
    /// `disk_size` bytes at `granularity`: every bitmap cluster allocated,
    /// and its bitmap table. `None` when the granularity is 0 or the
    /// figure overflows.
    pub fn bitmap_size(&self, disk_size: u64, granularity: u64) -> Option<u64> {
        if granularity == 0 {
            return None;
        }
        let cs = self.cluster_size();
        let bytes = disk_size.div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        let table = clusters
            .checked_mul(TABLE_ENTRY_BYTES)?
            .checked_next_multiple_of(cs)?;
        clusters.checked_mul(cs)?.checked_add(table)
    }

    /// The bitmap directory for bitmaps with names of these lengths,
    /// rounded up to whole clusters.
    pub fn bitmap_directory_size(&self, name_lengths: impl IntoIterator<Item = usize>) -> u64 {
        let dir: u64 = name_lengths
            .into_iter()
            .map(|n| (BITMAP_ENTRY_FIXED_BYTES as u64 + n as u64).next_multiple_of(8))
            .sum();
        dir.next_multiple_of(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, refcount_order: u32, extended_l2: bool) -> MeasureGeometry {
        MeasureGeometry {
            cluster_bits,
            refcount_order,
            extended_l2,
        }
    }

    /// Figures `qemu-img measure --size S -O qcow2 -o ...` (7.2) printed
    /// as "fully allocated size".
    #[test]
    fn fully_allocated_matches_qemu_img() {
        let cases = [
            // (size, cluster_bits, refcount_order, extended_l2, qemu-img)
            (1u64 << 30, 16, 4, false, 1_074_135_040u64),
            (8 << 20, 16, 4, false, 8_716_288),
        ];
        for (size, cb, ro, ext, want) in cases {
            assert_eq!(
                geo(cb, ro, ext).fully_allocated(size),
                Some(want),
                "{size} {cb} {ro} {ext}"
            );
        }
    }

    #[test]
    fn huge_sizes_do_not_wrap() {
        assert_eq!(geo(9, 6, false).fully_allocated(u64::MAX - 100), None);
        assert!(!geo(9, 4, false).l1_fits(1 << 50));
        assert!(geo(16, 4, false).l1_fits(1 << 40));
        assert_eq!(geo(16, 4, false).bitmap_size(1 << 20, 0), None);
    }

    #[test]
    fn bitmap_sizes() {
        // 8 MiB at 64 KiB granularity: 128 bits, one cluster of bitmap and
        // one of table; a 3-byte name takes one directory cluster.
        let g = geo(16, 4, false);
        assert_eq!(g.bitmap_size(8 << 20, 64 << 10), Some(2 << 16));
        assert_eq!(g.bitmap_directory_size([3]), 1 << 16);
        assert_eq!(g.bitmap_directory_size([]), 0);
    }
}
