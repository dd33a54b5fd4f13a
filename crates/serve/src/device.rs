//! The virtio-blk device: the state the queue workers share, its config
//! space and feature handling, and the checks on the frontend's memory.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{CONFIG_LEN, CONFIG_WRITEBACK, DeviceConfig};
use crate::disk::{Disk, DiskError};
use crate::request::Mem;

/// The end of the largest virtio-blk configuration layout (96 bytes in
/// virtio 1.3, with the secure-erase and zoned fields), rounded up.
const MAX_CONFIG_READ: u64 = 256;

/// Checks that a region of a frontend's memory table lies inside its file.
/// `mmap` accepts a mapping longer than the file, and touching its tail
/// would kill the daemon with SIGBUS; a frontend that shrinks the file
/// *after* sharing it can still do that (as with every vhost-user backend
/// that maps guest memory), but a table that is wrong from the start is
/// refused here.
pub(crate) fn check_region(region: &GuestRegionMmap) -> io::Result<()> {
    let Some(file) = region.file_offset() else {
        return Ok(());
    };
    let meta = file.file().metadata()?;
    if !meta.file_type().is_file() {
        // Not a regular file (a device): no length to check against.
        return Ok(());
    }
    let end = file.start().checked_add(region.len());
    if end.is_none_or(|end| end > meta.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "region at guest address {:#x} maps {:#x} bytes from offset {:#x} of a {:#x}-byte file",
                region.start_addr().0,
                region.len(),
                file.start(),
                meta.len()
            ),
        ));
    }
    Ok(())
}

/// [`check_region`] for every region of a table.
pub(crate) fn check_memory(mem: &Mem) -> io::Result<()> {
    mem.iter().try_for_each(check_region)
}

/// What every queue worker shares: the disk and the device's settings.
#[derive(Debug)]
pub struct Device {
    pub disk: Disk,
    pub config: DeviceConfig,
    /// GET_ID answer (at most 20 bytes).
    pub serial: Vec<u8>,
    /// The guest-visible cache mode: write-back (flushes come from the
    /// guest) or write-through (every write is flushed before completing).
    writeback: AtomicBool,
    io_errors: AtomicU64,
    /// Register guest memory with each worker's io_uring (`--pin-guest-memory`).
    pub pin_memory: bool,
    /// Each queue's request counters.
    pub queue_stats: Vec<crate::stats::QueueStats>,
}

impl Device {
    pub fn new(disk: Disk, config: DeviceConfig, serial: Vec<u8>) -> Self {
        Self {
            disk,
            config,
            serial,
            writeback: AtomicBool::new(true),
            io_errors: AtomicU64::new(0),
            pin_memory: false,
            queue_stats: (0..config.num_queues)
                .map(|_| crate::stats::QueueStats::default())
                .collect(),
        }
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    pub(crate) fn log_io_error(&self, e: &DiskError) {
        let n = self.io_errors.fetch_add(1, Ordering::Relaxed);
        if n < 16 || n % 1000 == 0 {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            warn!(count = n + 1, "request failed: {msg}");
        }
    }

    /// Back to the state a new frontend expects.
    pub(crate) fn reset(&self) {
        self.writeback.store(true, Ordering::Release);
    }

    /// The driver's features are known.
    pub(crate) fn set_acked_features(&self, features: u64) {
        // Without FLUSH the driver cannot ask for durability: write through.
        // With CONFIG_WCE it may choose later through the config space.
        let flush = features & 1 << VIRTIO_BLK_F_FLUSH != 0;
        self.writeback.store(flush, Ordering::Release);
        debug!(
            features = format_args!("{features:#x}"),
            wce = features & 1 << VIRTIO_BLK_F_CONFIG_WCE != 0,
            "features acknowledged"
        );
    }

    /// GET_CONFIG: `size` bytes at `offset`, or None to refuse.
    pub(crate) fn config_read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        // Bytes past the fields this device has read as zero, as they do on
        // a device that does not offer the features behind them — up to
        // the end of the largest layout any virtio version defines. A read
        // beyond that is refused.
        if u64::from(offset) + u64::from(size) > MAX_CONFIG_READ {
            warn!(offset, size, "refused a config read past the config space");
            return None;
        }
        let space = self.config.space(self.writeback());
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&space[start..end]);
        Some(out)
    }

    /// SET_CONFIG: only `writeback` is writable (CONFIG_WCE).
    pub(crate) fn config_write(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset as usize == CONFIG_WRITEBACK && buf.len() == 1 {
            let wb = buf[0] != 0;
            debug!(writeback = wb, "guest set the cache mode");
            self.writeback.store(wb, Ordering::Release);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "config write of {} bytes at {offset} is not to the writeback field",
                buf.len()
            ),
        ))
    }
}
