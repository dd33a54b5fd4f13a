//! Dirty-page logging for live migration (vhost-user "Migration"):
//! while the frontend migrates guest RAM, every guest page the daemon
//! writes must be marked in a shared log, or the destination gets a stale
//! copy of it.
//!
//! The frontend hands over the log with `SET_LOG_BASE` (a shared memory
//! fd, `LOG_SHMFD`): one bit per 4 KiB guest page, by guest physical
//! address, bit `p % 8` of byte `p / 8` for page `p`. Logging is on while
//! the negotiated features carry `VHOST_F_LOG_ALL` (QEMU sets it when a
//! migration starts and clears it when it ends or is cancelled).
//!
//! What the daemon writes into guest memory, and so marks before a
//! request's completion is published: data read from the disk (io_uring
//! puts it straight into guest pages, so nothing in vm-memory sees it;
//! bounced copies and registered buffers alike), the serial of GET_ID,
//! status bytes, and the used ring (its elements, index and
//! `avail_event`). The used ring is marked whenever logging is on, whether
//! or not the ring's `VHOST_VRING_F_LOG` flag is set: marking a page too
//! many only costs a page resent.
//!
//! Off, the cost per request is one relaxed load.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tracing::info;

/// The page size the log counts in.
pub(crate) const LOG_PAGE: u64 = 4096;

/// A mapped log area.
#[derive(Debug)]
pub(crate) struct LogMap {
    base: *mut u8,
    /// Mapped bytes (from the page-aligned start).
    mapped: usize,
    /// Where the log starts within the mapping.
    start: usize,
    /// Bytes of log.
    len: usize,
}

// SAFETY: the mapping is shared memory written only through atomic byte
// operations; the pointer stays valid until drop.
unsafe impl Send for LogMap {}
// SAFETY: as above.
unsafe impl Sync for LogMap {}

impl LogMap {
    /// Maps `size` bytes of `file` from `offset`.
    pub(crate) fn map(file: &File, size: u64, offset: u64) -> io::Result<Self> {
        if size == 0 || size > 1 << 40 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a dirty log of {size} bytes"),
            ));
        }
        let page = 4096u64;
        let aligned = offset - offset % page;
        let start = (offset - aligned) as usize;
        let mapped = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(start))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "log too large"))?;
        let meta = file.metadata()?;
        if meta.file_type().is_file() && offset.saturating_add(size) > meta.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a dirty log of {size} bytes at {offset} in a file of {}",
                    meta.len()
                ),
            ));
        }
        // SAFETY: a fresh shared mapping of a file we hold; checked for
        // size above (a regular file) and unmapped in drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: base.cast(),
            mapped,
            start,
            len: size as usize,
        })
    }

    /// Marks every page of `[gpa, gpa + len)` dirty. Pages past the log's
    /// end are not marked (the frontend sized it for its memory).
    pub(crate) fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.len {
                break;
            }
            // SAFETY: `start + byte < start + len <= mapped`: inside the
            // mapping.
            let at = unsafe { self.base.add(self.start + byte) };
            // SAFETY: a valid, mapped byte for the mapping's life, only
            // ever accessed atomically by us (the frontend reads and clears
            // it with atomics too).
            let cell = unsafe { AtomicU8::from_ptr(at) };
            let bit = 1u8 << (page % 8);
            if cell.load(Ordering::Relaxed) & bit == 0 {
                cell.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for LogMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referenced.
        unsafe { libc::munmap(self.base.cast(), self.mapped) };
    }
}

/// One connection's log, shared by its handler and its queues' workers.
#[derive(Debug, Default)]
pub(crate) struct DirtyLog {
    on: AtomicBool,
    map: Mutex<Option<Arc<LogMap>>>,
}

impl DirtyLog {
    /// SET_LOG_BASE: the area to log into from now on.
    pub(crate) fn set_map(&self, map: LogMap) {
        info!(bytes = map.len, "dirty log installed");
        *crate::lock(&self.map) = Some(Arc::new(map));
    }

    /// The features now (do not) carry VHOST_F_LOG_ALL.
    pub(crate) fn set_enabled(&self, on: bool) {
        if self.on.swap(on, Ordering::AcqRel) != on {
            info!(on, "dirty-page logging");
        }
    }

    /// The log to mark, if logging is on.
    pub(crate) fn active(&self) -> Option<Arc<LogMap>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        crate::lock(&self.map).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_each_page_of_a_range_and_nothing_past_the_log() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        // 16 bytes of log at offset 100: pages 0..128.
        let m = LogMap::map(&f, 16, 100).unwrap();
        m.mark(4096 * 3 + 10, 1);
        m.mark(4096 * 8 - 1, 2); // pages 7 and 8
        m.mark(4096 * 200, 4096); // past the log
        m.mark(0, 0);
        drop(m);
        let mut bytes = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_at(&f, &mut bytes, 0).unwrap();
        assert_eq!(bytes[100], 0b1000_1000, "pages 3 and 7");
        assert_eq!(bytes[101], 0b0000_0001, "page 8");
        assert!(bytes[102..].iter().all(|&b| b == 0));
        assert!(bytes[..100].iter().all(|&b| b == 0));
        assert!(LogMap::map(&f, 16, 8190).is_err(), "past the file");
    }

    #[test]
    fn nothing_is_active_until_enabled_with_a_map() {
        let log = DirtyLog::default();
        log.set_enabled(true);
        assert!(log.active().is_none());
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        log.set_map(LogMap::map(&f, 64, 0).unwrap());
        assert!(log.active().is_some());
        log.set_enabled(false);
        assert!(log.active().is_none());
    }
}
