//! Offset spaces and the geometry that relates them.
//!
//! A guest offset (a byte in the virtual disk) and a host offset (a byte in
//! the image file) are different types, so mixing them does not compile.
//! Every conversion between them goes through [`Geometry`], whose derived
//! quantities come from validated header fields and whose arithmetic is
//! checked.

use std::fmt;

/// Smallest cluster size the specification allows (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU opens (2 MiB); larger is refused as QEMU does.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
pub const MIN_CLUSTER_BITS_EXTENDED_L2: u32 = 14;
/// refcount_bits = 1 << refcount_order; the order may not exceed 6.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's implementation limit on the L1 table (QCOW_MAX_L1_SIZE).
pub const MAX_L1_TABLE_BYTES: u64 = 32 << 20;
/// QEMU's implementation limit on the refcount table (QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the specification allows.
pub const MAX_BACKING_FILE_NAME_BYTES: u32 = 1023;
/// Bits 9-55 of L1, L2 and bitmap-table entries hold a host cluster offset.
pub const HOST_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_EXTENDED_CLUSTER: u32 = 32;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// `self + delta`, or `None` on overflow.
            pub fn checked_add(self, delta: u64) -> Option<Self> {
                self.0.checked_add(delta).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

offset_type!(
    /// Byte offset in the virtual disk the guest sees.
    GuestOffset
);
offset_type!(
    /// Byte offset in the image file (or the external data file).
    HostOffset
);
offset_type!(
    /// Index of a guest cluster: guest offset >> cluster_bits.
    GuestCluster
);
offset_type!(
    /// Index of a host cluster: host offset >> cluster_bits.
    HostCluster
);
offset_type!(
    /// A number of clusters (a length, never an index or an offset).
    ClusterCount
);

impl HostCluster {
    /// The cluster `n` clusters after this one, or `None` on overflow.
    pub fn checked_add_count(self, n: ClusterCount) -> Option<HostCluster> {
        self.0.checked_add(n.0).map(HostCluster)
    }

    /// The cluster right after this one.
    pub fn next(self) -> HostCluster {
        HostCluster(self.0 + 1)
    }

    /// Clusters from `self` up to (not including) `end`; zero if `end`
    /// is not after `self`.
    pub fn count_to(self, end: HostCluster) -> ClusterCount {
        ClusterCount(end.0.saturating_sub(self.0))
    }
}

/// Everything derived from cluster_bits, extended_l2 and refcount_order.
///
/// Construction checks the three inputs, after which every method is total:
/// no shift can exceed the width of its operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
    refcount_order: u32,
}

/// Why a [`Geometry`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("cluster_bits {0} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}")]
    ClusterBits(u32),
    #[error("extended L2 entries need cluster_bits >= {MIN_CLUSTER_BITS_EXTENDED_L2}, got {0}")]
    ExtendedL2ClusterBits(u32),
    #[error("refcount_order {0} exceeds {MAX_REFCOUNT_ORDER}")]
    RefcountOrder(u32),
}

impl Geometry {
    pub fn new(
        cluster_bits: u32,
        extended_l2: bool,
        refcount_order: u32,
    ) -> Result<Self, GeometryError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(GeometryError::ClusterBits(cluster_bits));
        }
        if extended_l2 && cluster_bits < MIN_CLUSTER_BITS_EXTENDED_L2 {
            return Err(GeometryError::ExtendedL2ClusterBits(cluster_bits));
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(GeometryError::RefcountOrder(refcount_order));
        }
        Ok(Self {
            cluster_bits,
            extended_l2,
            refcount_order,
        })
    }

    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }

    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }

    /// Width of one refcount entry in bits (1, 2, 4, ... 64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Largest refcount an entry can hold.
    pub fn refcount_max(&self) -> u64 {
        u64::MAX >> (64 - self.refcount_bits())
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Bytes of guest disk one L2 table maps.
    pub fn l2_coverage_bytes(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    pub fn subclusters_per_cluster(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS_PER_EXTENDED_CLUSTER
        } else {
            1
        }
    }

    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters_per_cluster())
    }

    /// Entries in one refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.refcount_order)
    }

    /// Entries of one refcount table cluster (8-byte entries).
    pub fn refcount_table_entries_per_cluster(&self) -> u64 {
        1 << (self.cluster_bits - 3)
    }

    /// The `x` of the compressed cluster descriptor: bits 0..x-1 hold the
    /// host offset, bits x..61 the number of additional 512-byte sectors.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    pub fn guest_cluster(&self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits)
    }

    pub fn host_cluster(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    /// First byte of a guest cluster, or `None` if it is not addressable.
    pub fn guest_cluster_offset(&self, cluster: GuestCluster) -> Option<GuestOffset> {
        cluster
            .0
            .checked_shl(self.cluster_bits)
            .filter(|v| v >> self.cluster_bits == cluster.0)
            .map(GuestOffset)
    }

    /// First byte of a host cluster, or `None` if it is not addressable.
    pub fn host_cluster_offset(&self, cluster: HostCluster) -> Option<HostOffset> {
        cluster
            .0
            .checked_shl(self.cluster_bits)
            .filter(|v| v >> self.cluster_bits == cluster.0)
            .map(HostOffset)
    }

    /// Byte offset within its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    pub fn is_cluster_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// Index into the L1 table of the L2 table mapping `cluster`.
    pub fn l1_index(&self, cluster: GuestCluster) -> u64 {
        cluster.0 >> self.l2_bits()
    }

    /// Index into its L2 table of the entry mapping `cluster`.
    pub fn l2_index(&self, cluster: GuestCluster) -> usize {
        // l2_bits <= 18, so the masked value fits any usize we build for.
        (cluster.0 & (self.l2_entries() - 1)) as usize
    }

    /// Index of the subcluster holding `offset` within its cluster.
    pub fn subcluster_index(&self, offset: GuestOffset) -> u32 {
        // < 32 by construction
        (self.offset_in_cluster(offset.0) / self.subcluster_size()) as u32
    }

    /// Index into the refcount table of the block counting `cluster`.
    pub fn refcount_table_index(&self, cluster: HostCluster) -> u64 {
        cluster.0 >> (self.cluster_bits + 3 - self.refcount_order)
    }

    /// Index into its refcount block of `cluster`'s entry.
    pub fn refcount_block_index(&self, cluster: HostCluster) -> usize {
        (cluster.0 & (self.refcount_block_entries() - 1)) as usize
    }

    /// L1 entries needed to map a virtual disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage_bytes())
    }

    /// Clusters needed for `bytes` bytes.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_spec_figures() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage_bytes(), 512 << 20);
        assert_eq!(g.refcount_block_entries(), 32768);
        assert_eq!(g.refcount_max(), 0xffff);
        assert_eq!(g.compressed_offset_bits(), 54);
        let gc = g.guest_cluster(GuestOffset(0x1234_5678));
        assert_eq!(gc, GuestCluster(0x1234));
        assert_eq!(g.l1_index(gc), 0);
        assert_eq!(g.l2_index(gc), 0x1234);
    }

    #[test]
    fn extended_l2_geometry() {
        let g = Geometry::new(16, true, 4).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(GuestOffset(65536 + 4096)), 2);
        assert_eq!(
            Geometry::new(13, true, 4),
            Err(GeometryError::ExtendedL2ClusterBits(13))
        );
    }

    #[test]
    fn every_refcount_order_and_cluster_size() {
        for bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            for order in 0..=MAX_REFCOUNT_ORDER {
                let g = Geometry::new(bits, false, order).unwrap();
                assert_eq!(
                    g.refcount_block_entries() * u64::from(g.refcount_bits()),
                    g.cluster_size() * 8
                );
                let max = g.refcount_max();
                assert_eq!(max.count_ones(), g.refcount_bits());
            }
        }
        assert!(Geometry::new(8, false, 4).is_err());
        assert!(Geometry::new(22, false, 4).is_err());
        assert!(Geometry::new(16, false, 7).is_err());
    }

    #[test]
    fn cluster_offsets_do_not_overflow() {
        let g = Geometry::new(21, false, 4).unwrap();
        assert_eq!(g.host_cluster_offset(HostCluster(u64::MAX >> 10)), None);
        assert_eq!(
            g.host_cluster_offset(HostCluster(3)),
            Some(HostOffset(3 << 21))
        );
    }
}
