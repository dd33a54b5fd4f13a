//! Shared file mappings: memory whose stores land in the page cache of a
//! file, so they outlive the process that made them (a kill -9, a panic,
//! the OOM killer) though not a power cut. The crash journal and the
//! dirty bitmaps' sidecar live in such mappings.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;

/// A read-write `MAP_SHARED` mapping of a whole file.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is owned by the SharedMap (unmapped only in Drop).
// Shared access goes through atomics (`words`) or through `&mut self`
// (`store`), so moving or sharing it between threads is sound.
unsafe impl Send for SharedMap {}
// SAFETY: see above.
unsafe impl Sync for SharedMap {}

impl std::fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMap").field("len", &self.len).finish()
    }
}

/// Gives every byte of the first `len` of `file` a block: fallocate, or
/// zeros written where the file system has no fallocate.
fn allocate(file: &File, len: usize) -> io::Result<()> {
    let len_off =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate(2) on a descriptor we own, no pointers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0usize;
    while at < len {
        let n = (len - at).min(zeros.len());
        file.write_all_at(&zeros[..n], at as u64)?;
        at += n;
    }
    Ok(())
}

impl SharedMap {
    /// Creates (or empties) the file at `path` (mode 0600), sizes it to
    /// `len` bytes (reading as zeros), allocates its blocks and maps it.
    ///
    /// The blocks are allocated now because a store into a page of a
    /// sparse shared mapping that the file system cannot back (it is
    /// full: the very moment guest writes start failing with ENOSPC) is
    /// not an error but SIGBUS, which would kill the daemon. A file system
    /// that cannot preallocate gets the zeros written instead; one that
    /// has no room for them fails here, at open, where the caller can do
    /// without the mapping.
    pub fn create(path: &Path, len: usize) -> io::Result<SharedMap> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len as u64)?;
        if let Err(e) = allocate(&file, len) {
            // Nothing is left behind that a later open could take for a
            // journal or sidecar.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::map(file, len)
    }

    fn map(file: File, len: usize) -> io::Result<SharedMap> {
        if len == 0 || len % 8 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a shared mapping of {len} bytes"),
            ));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file sized to
        // at least `len`; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len,
            _file: file,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `bytes` at `offset`, in 8-byte words (volatile, so no store
    /// is elided or merged away). Panics when out of bounds or when
    /// `offset` is not 8-aligned: both are bugs of the caller.
    pub fn store(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset % 8 == 0 && offset + bytes.len() <= self.len,
            "shared mapping store at {offset} of {} bytes in bounds",
            bytes.len()
        );
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: in bounds (checked above) of the mapping.
            let at = unsafe { self.ptr.add(offset + 8 * i) };
            // SAFETY: `at` is in bounds and 8-aligned (an 8-aligned offset
            // in a page-aligned mapping); `&mut self` excludes other
            // accesses through this mapping.
            unsafe { std::ptr::write_volatile(at.cast::<u64>(), u64::from_ne_bytes(w)) };
        }
    }

    /// `count` words from byte `offset` on, as atomics (for stores from
    /// several threads at once). Panics when out of bounds or unaligned.
    pub fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        assert!(
            offset % 8 == 0 && offset + count * 8 <= self.len,
            "shared mapping words in bounds"
        );
        // SAFETY: in bounds (checked above) of the mapping.
        let start = unsafe { self.ptr.add(offset) };
        // SAFETY: `count` words from `start` are in bounds and 8-aligned
        // (checked above); AtomicU64 has the layout of u64, and every
        // access to these words goes through atomics for as long as the
        // returned borrow of `self` lives.
        unsafe { std::slice::from_raw_parts(start.cast::<AtomicU64>(), count) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `.<image file name>.<suffix>` beside the image: where a sidecar of it
/// lives (the crash journal's, the dirty bitmaps').
pub(crate) fn sidecar_path(image: &Path, suffix: &str) -> std::path::PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.{suffix}"))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): what survives a
/// process crash in the page cache does not survive a reboot, so a sidecar
/// from another boot is never trusted.
pub(crate) fn boot_id() -> io::Result<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let hex: Vec<u8> = s
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|c| (c as char).to_digit(16).unwrap_or(0) as u8)
        .collect();
    if hex.len() != 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected boot id {s:?}"),
        ));
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = hex[2 * i] << 4 | hex[2 * i + 1];
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn stores_and_atomic_words_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = SharedMap::create(&path, 4096).unwrap();
        m.store(8, b"abcdefgh");
        m.words(16, 2)[1].fetch_or(0x0102, Ordering::Relaxed);
        // Read through the file, not the mapping.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[8..16], b"abcdefgh");
        assert_eq!(bytes[24..32], 0x0102u64.to_ne_bytes());
        assert_eq!(bytes.len(), 4096);
    }
}
