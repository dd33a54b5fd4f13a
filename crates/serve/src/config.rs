//! What the device tells the driver: virtio feature bits and the
//! virtio-blk configuration space (virtio 1.2, 5.2.4).

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The logical block size the guest sees; sector numbers in requests are
/// always in these units.
pub const SECTOR_SIZE: u64 = 512;

/// Largest data segment a request may carry (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;

/// Most data segments in one request (config `seg_max`).
pub const SEG_MAX: u32 = 254;

/// Most data bytes one read or write request may move. Linux keeps to
/// `seg_max * size_max`; a request asking for more is refused.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Largest discard / write-zeroes request, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// The largest virtqueue a frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Bytes of the configuration space that carry fields (up to and including
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// Offset of the `writeback` byte, the one field the driver may write.
pub const CONFIG_WRITEBACK: usize = 32;

/// The device as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`] is reported; a tail
    /// shorter than a sector is not addressable).
    pub size: u64,
    pub readonly: bool,
    pub num_queues: u16,
    /// Smallest I/O the host file takes without read-modify-write.
    pub physical_block: u64,
    /// The image's cluster size: the optimal I/O size and the discard
    /// granularity.
    pub cluster_size: u64,
}

impl DeviceConfig {
    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging for live migration (vhost/log.rs).
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// The configuration space, with `writeback` as given.
    pub fn space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        let sectors = |bytes: u64| (bytes / SECTOR_SIZE).max(1);
        put(0, &self.capacity().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        // Topology: physical_block_exp, alignment_offset, min_io_size and
        // opt_io_size (the last two in logical blocks).
        let phys = sectors(self.physical_block);
        put(24, &[phys.trailing_zeros() as u8, 0]);
        put(26, &(phys.min(u64::from(u16::MAX)) as u16).to_le_bytes());
        let opt = sectors(self.cluster_size).min(u64::from(u32::MAX)) as u32;
        put(28, &opt.to_le_bytes());
        put(CONFIG_WRITEBACK, &[u8::from(writeback), 0]);
        put(34, &self.num_queues.to_le_bytes());
        if !self.readonly {
            let align = sectors(self.cluster_size).min(u64::from(u32::MAX)) as u32;
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &1u32.to_le_bytes());
            put(44, &align.to_le_bytes());
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &1u32.to_le_bytes());
            put(56, &[1]);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(readonly: bool) -> DeviceConfig {
        DeviceConfig {
            size: 10 << 30,
            readonly,
            num_queues: 2,
            physical_block: 4096,
            cluster_size: 65536,
        }
    }

    fn le32(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_virtio_blk_config() {
        let c = cfg(false).space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 20 << 20);
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), SEG_MAX);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(c[24], 3, "4 KiB physical blocks are 2^3 sectors");
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 8);
        assert_eq!(le32(&c, 28), 128, "opt_io_size is the cluster in sectors");
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), 1);
        assert_eq!(le32(&c, 44), 128);
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 52), 1);
        assert_eq!(c[56], 1);
        assert_eq!(cfg(false).space(false)[32], 0);
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let f = cfg(true).features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(le32(&cfg(true).space(true), 36), 0);
        let f = cfg(false).features();
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_ne!(f & 1 << VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
    }
}
