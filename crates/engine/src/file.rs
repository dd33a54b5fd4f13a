//! A host file (image, backing or external data file) and its I/O through
//! this thread's io_uring.
//!
//! Files are opened with O_DIRECT by default, like QEMU's cache=none: the
//! host page cache neither doubles the guest's cache nor hides the disk.
//! O_DIRECT needs offset, length and memory aligned to the device's logical
//! block size; requests that are not go through an aligned bounce buffer.

use std::any::Any;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::buf::{AlignedBuf, BUF_ALIGN};
#[cfg(test)]
use crate::guest::GuestSlice;
use crate::guest::{GuestRange, In, Out};
use crate::uring::Ring;

/// Largest single read or write: the SQE length is 32 bits; this keeps
/// every split block-aligned.
const MAX_IO_BYTES: u32 = !(BUF_ALIGN as u32 - 1);

/// Keeps memory that I/O goes to or from directly alive: each operation on
/// that memory holds a clone until its completion arrives, even if the
/// future waiting for it is dropped or leaked. The daemon passes its
/// guest-memory mapping (see [`crate::guest::GuestSlice`]).
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// How host files are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT (QEMU's cache=none).
    #[default]
    None,
    /// Through the host page cache (QEMU's cache=writeback).
    Writeback,
}

/// An open host file.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    /// Alignment of offsets and lengths for I/O (1 when buffered). Buffers
    /// are always [`BUF_ALIGN`]-aligned, which covers any memory alignment.
    align: u64,
    /// Alignment of memory addresses for I/O (1 when buffered).
    mem_align: u64,
    writable: bool,
    /// Serialises read-modify-write of partial blocks: two of them on the
    /// same block must not both read the old block.
    rmw: tokio::sync::Mutex<()>,
    /// `read_guest`/`write_guest` calls, and those that bounced.
    direct_ios: AtomicU64,
    bounced_ios: AtomicU64,
    /// Direct transfers that went through a registered buffer.
    fixed_ios: AtomicU64,
    /// The errno of the first fdatasync that failed, 0 while none has:
    /// from then on every flush fails (see [`SyncFailed`]).
    sync_errno: AtomicI32,
    /// Crash simulation: the history of this file's writes and syncs.
    #[cfg(feature = "fault-injection")]
    rec: Option<Arc<crate::fault::Recorder>>,
}

/// The offset and memory alignments O_DIRECT needs on this file: what
/// statx reports (STATX_DIOALIGN), else the safe 4096.
fn direct_io_alignment(file: &File) -> (u64, u64) {
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, and a valid out pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let align = u64::from(stx.stx_dio_offset_align);
    let mem_align = u64::from(stx.stx_dio_mem_align);
    let usable = |a: u64| a.is_power_of_two() && a <= BUF_ALIGN as u64;
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && usable(align) && usable(mem_align) {
        (align, mem_align)
    } else {
        (BUF_ALIGN as u64, BUF_ALIGN as u64)
    }
}

impl HostFile {
    /// Opens `path` read-only or read-write with the given cache mode.
    pub fn open(path: &Path, writable: bool, cache: CacheMode) -> io::Result<Self> {
        let mut o = FsOpenOptions::new();
        o.read(true).write(writable);
        if cache == CacheMode::None {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path)?;
        let (align, mem_align) = match cache {
            CacheMode::None => direct_io_alignment(&file),
            CacheMode::Writeback => (1, 1),
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            align,
            mem_align,
            writable,
            rmw: tokio::sync::Mutex::new(()),
            direct_ios: AtomicU64::new(0),
            bounced_ios: AtomicU64::new(0),
            fixed_ios: AtomicU64::new(0),
            sync_errno: AtomicI32::new(0),
            #[cfg(feature = "fault-injection")]
            rec: if writable {
                crate::fault::Recorder::for_path(path)
            } else {
                None
            },
        })
    }

    /// The same file under another name (the one shown in messages).
    pub fn named(mut self, path: PathBuf) -> Self {
        self.path = path;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset and length alignment I/O needs to avoid a bounce buffer
    /// (1 with the page cache).
    pub fn alignment(&self) -> u64 {
        self.align
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Current length (a metadata call, made at open and resize time only).
    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Reads `len` bytes at `offset` into a new buffer. Bytes past the end
    /// of the file read as zeros.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let start = offset - offset % self.align;
        let end = (offset + len as u64).next_multiple_of(self.align);
        let span = usize::try_from(end - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ring = Ring::current()?;
        // Straight into the buffer that is returned; bytes past the end of
        // the file stay zero.
        let (r, mut buf) = ring
            .read(self.fd(), start, AlignedBuf::zeroed(span), span)
            .await;
        let mut done = r? as usize;
        let align = self.align as usize;
        // A short read that is not at the end of the file (rare): go on
        // into scratch buffers. A partial block means end of file.
        while done > 0 && done < span && done % align == 0 {
            let want = span - done;
            let (r, chunk) = ring
                .read(
                    self.fd(),
                    start + done as u64,
                    AlignedBuf::zeroed(want),
                    want,
                )
                .await;
            let n = r? as usize;
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&chunk[..n]);
            done += n;
        }
        let skip = (offset - start) as usize;
        if skip == 0 && span == len {
            return Ok(buf);
        }
        let mut out = AlignedBuf::zeroed(len);
        out.copy_from_slice(&buf[skip..skip + len]);
        Ok(out)
    }

    /// Reads exactly into `dst` from `offset` (zeros past the end of file).
    pub async fn read_into(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let buf = self.read(offset, dst.len()).await?;
        dst.copy_from_slice(&buf);
        Ok(())
    }

    /// Crash simulation: a write of `data` at `offset` is being submitted.
    #[cfg(feature = "fault-injection")]
    fn rec_submit(&self, offset: u64, data: &[u8]) -> Option<usize> {
        self.rec.as_ref().map(|r| r.write_submitted(offset, data))
    }

    #[cfg(not(feature = "fault-injection"))]
    fn rec_submit(&self, _offset: u64, _data: &[u8]) -> Option<usize> {
        None
    }

    /// Crash simulation: a write from guest memory is being submitted (the
    /// bytes as they are now; the guest does not change a buffer it has
    /// handed to the device).
    #[cfg(feature = "fault-injection")]
    fn rec_submit_guest(&self, offset: u64, data: &GuestRange<'_>) -> Option<usize> {
        self.rec
            .as_ref()
            .map(|r| r.write_submitted(offset, &data.to_vec()))
    }

    #[cfg(not(feature = "fault-injection"))]
    fn rec_submit_guest(&self, _offset: u64, _data: &GuestRange<'_>) -> Option<usize> {
        None
    }

    /// Crash simulation: that write completed (successfully or not).
    #[cfg(feature = "fault-injection")]
    fn rec_done(&self, id: Option<usize>) {
        if let (Some(r), Some(id)) = (self.rec.as_ref(), id) {
            r.write_done(id);
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn rec_done(&self, _id: Option<usize>) {}

    /// Crash tests: where a metadata write of kind `op` may be held back
    /// by a test (see `fault::Recorder::stall`). Nothing in the product.
    pub(crate) async fn stall_point(&self, op: &'static str) {
        #[cfg(feature = "fault-injection")]
        if let Some(r) = &self.rec {
            r.stall_point(op).await;
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = op;
    }

    /// Whether I/O of `len` bytes at `offset` to or from `addr` can go
    /// straight to caller memory (and counts the answer).
    fn direct(&self, offset: u64, addr: *const u8, len: usize) -> bool {
        let ok = len > 0
            && offset % self.align == 0
            && len as u64 % self.align == 0
            && (addr as usize as u64) % self.mem_align == 0;
        self.direct_ios.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.bounced_ios.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// `(direct, bounced, fixed)`: direct reads and writes asked for, how
    /// many of them went through a bounce buffer, and how many transfers
    /// used a registered buffer.
    pub fn direct_counts(&self) -> (u64, u64, u64) {
        (
            self.direct_ios.load(Ordering::Relaxed),
            self.bounced_ios.load(Ordering::Relaxed),
            self.fixed_ios.load(Ordering::Relaxed),
        )
    }

    /// The SQE of a direct read into, or write from, `len` bytes at `ptr`:
    /// through the ring's registered buffer when one holds them.
    fn transfer_entry(
        &self,
        ring: &Ring,
        write: bool,
        ptr: *mut u8,
        len: u32,
        offset: u64,
    ) -> io_uring::squeue::Entry {
        use io_uring::opcode::{Read, ReadFixed, Write, WriteFixed};
        let fd = io_uring::types::Fd(self.fd());
        let fixed = ring.fixed_index(ptr, len as usize);
        if fixed.is_some() {
            self.fixed_ios.fetch_add(1, Ordering::Relaxed);
        }
        match (write, fixed) {
            (false, Some(i)) => ReadFixed::new(fd, ptr, len, i).offset(offset).build(),
            (false, None) => Read::new(fd, ptr, len).offset(offset).build(),
            (true, Some(i)) => WriteFixed::new(fd, ptr, len, i).offset(offset).build(),
            (true, None) => Write::new(fd, ptr, len).offset(offset).build(),
        }
    }

    /// Reads into guest memory: the kernel writes straight into `dst` when
    /// offset, length and address allow (no bounce buffer, no copy), else
    /// through an aligned bounce buffer. Bytes past the end of the file
    /// read as zeros.
    pub async fn read_guest(&self, offset: u64, dst: GuestRange<'_>) -> io::Result<()> {
        if !self.direct(offset, dst.as_ptr(), dst.len()) {
            let buf = self.read(offset, dst.len()).await?;
            dst.copy_from(&buf);
            return Ok(());
        }
        let ring = Ring::current()?;
        let len = dst.len();
        let mut done = 0usize;
        while done < len {
            let want = u32::try_from(len - done).unwrap_or(MAX_IO_BYTES);
            let part = dst.sub(done, want as usize);
            let entry =
                self.transfer_entry(&ring, false, part.as_ptr(), want, offset + done as u64);
            // SAFETY: the entry points into guest memory that `keep` keeps
            // mapped (GuestSlice::new's contract); the operation holds a
            // clone of it until its completion, however its future ends.
            let (r, _) = unsafe { ring.submit(entry, part.keep().clone()) }.await;
            let n = r? as usize;
            done += n;
            // End of file: nothing more, or a partial block.
            if n == 0 || done % self.align as usize != 0 {
                dst.sub(done, len - done).fill(0);
                break;
            }
        }
        Ok(())
    }

    /// Writes from guest memory: the kernel reads straight from `src` when
    /// offset, length and address allow, else it is copied out first.
    pub async fn write_guest(&self, offset: u64, src: GuestRange<'_>) -> io::Result<()> {
        if !self.direct(offset, src.as_ptr(), src.len()) {
            return self.write(offset, &src.to_vec()).await;
        }
        let ring = Ring::current()?;
        let len = src.len();
        let mut done = 0usize;
        while done < len {
            let want = u32::try_from(len - done).unwrap_or(MAX_IO_BYTES);
            let part = src.sub(done, want as usize);
            let entry = self.transfer_entry(&ring, true, part.as_ptr(), want, offset + done as u64);
            let rec = self.rec_submit_guest(offset + done as u64, &part);
            // SAFETY: as in read_guest; the kernel only reads the memory.
            let (r, _) = unsafe { ring.submit(entry, part.keep().clone()) }.await;
            self.rec_done(rec);
            let n = r? as usize;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            done += n;
            if done < len && done % self.align as usize != 0 {
                // A short write that left us unaligned: the rest bounces.
                let rest = src.sub(done, len - done).to_vec();
                return self.write(offset + done as u64, &rest).await;
            }
        }
        Ok(())
    }

    /// Reads into our buffer or guest memory.
    pub(crate) async fn read_out(&self, offset: u64, out: &mut Out<'_>) -> io::Result<()> {
        match out {
            Out::Heap(b) => self.read_into(offset, b).await,
            Out::Guest(g) => self.read_guest(offset, *g).await,
        }
    }

    /// Writes from our buffer or guest memory.
    pub(crate) async fn write_in(&self, offset: u64, data: &In<'_>) -> io::Result<()> {
        match data {
            In::Heap(b) => self.write(offset, b).await,
            In::Guest(g) => self.write_guest(offset, *g).await,
        }
    }

    /// Read-modify-write of the blocks around `data` (caller holds `rmw`).
    async fn write_rmw(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset - offset % self.align;
        let end = (offset + data.len() as u64).next_multiple_of(self.align);
        let span = usize::try_from(end - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut buf = if start == offset && span == data.len() {
            AlignedBuf::zeroed(span)
        } else {
            self.read(start, span).await?
        };
        let skip = (offset - start) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.write_raw(start, buf).await
    }

    /// Writes `data` at `offset`, read-modify-writing partial blocks.
    pub async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = offset % self.align == 0 && data.len() as u64 % self.align == 0;
        if aligned {
            let mut buf = AlignedBuf::zeroed(data.len());
            buf.copy_from_slice(data);
            return self.write_aligned(offset, buf).await;
        }
        let _guard = self.rmw.lock().await;
        self.write_rmw(offset, data).await
    }

    /// Writes a whole buffer; an unaligned offset or length falls back to
    /// [`HostFile::write`].
    pub async fn write_aligned(&self, offset: u64, buf: AlignedBuf) -> io::Result<()> {
        if offset % self.align != 0 || buf.len() as u64 % self.align != 0 {
            let _guard = self.rmw.lock().await;
            return self.write_rmw(offset, &buf).await;
        }
        self.write_raw(offset, buf).await
    }

    /// Writes an aligned buffer at an aligned offset.
    async fn write_raw(&self, offset: u64, buf: AlignedBuf) -> io::Result<()> {
        let ring = Ring::current()?;
        let mut done = 0usize;
        let mut buf = buf;
        while done < buf.len() {
            let rest = buf.len() - done;
            let rec = self.rec_submit(offset + done as u64, &buf[done..]);
            let (r, b) = if done == 0 {
                ring.write(self.fd(), offset, buf, rest).await
            } else {
                let mut tail = AlignedBuf::zeroed(rest);
                tail.copy_from_slice(&buf[done..]);
                let (r, _) = ring
                    .write(self.fd(), offset + done as u64, tail, rest)
                    .await;
                (r, buf)
            };
            self.rec_done(rec);
            buf = b;
            let n = r? as usize;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            done += n;
        }
        Ok(())
    }

    /// Sets the file's length without blocking the thread: through the
    /// ring (`IORING_OP_FTRUNCATE`, Linux 6.9 and later), or on a helper
    /// thread where the kernel lacks it (Debian 12's 6.1).
    pub async fn set_len(&self, len: u64) -> io::Result<()> {
        let ring = Ring::current()?;
        if ring.supports_ftruncate() {
            return ring.ftruncate(self.fd(), len).await.0.map(|_| ());
        }
        self.set_len_on_helper(len).await
    }

    /// `ftruncate` on a short-lived helper thread, awaited here.
    async fn set_len_on_helper(&self, len: u64) -> io::Result<()> {
        let file = self.file.try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("qblk-truncate".into())
            .spawn(move || {
                // The receiver waits for this; if it went away, nobody asks.
                let _ = tx.send(file.set_len(len));
            })?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("truncate helper thread ended")))
    }

    /// fallocate(2) through the ring: `mode` is `FALLOC_FL_*`.
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        Ring::current()?
            .fallocate(self.fd(), mode, offset, len)
            .await
            .0
            .map(|_| ())
    }

    /// fdatasync. Once one has failed, every later call fails too (without
    /// syncing), with a [`SyncFailed`] error: after a failed fdatasync
    /// Linux may have marked the pages it could not write clean, so the
    /// next fdatasync would succeed without them (PostgreSQL's
    /// "fsyncgate"). Nothing written to this file since the last
    /// successful flush can be called durable again; only reopening the
    /// file (restarting whoever serves it, after checking the disk)
    /// starts afresh. QEMU's `file-posix` does the same
    /// (`page_cache_inconsistent`), though only without O_DIRECT: here
    /// it holds with O_DIRECT as well, because the file system's own
    /// metadata (the blocks of a growing image) goes through the page
    /// cache either way.
    pub async fn flush(&self) -> io::Result<()> {
        if let Some(e) = self.sync_failed() {
            return Err(e);
        }
        #[cfg(feature = "fault-injection")]
        let covered = self.rec.as_ref().map(|r| r.sync_issued());
        #[cfg(feature = "fault-injection")]
        let injected = self.rec.as_ref().and_then(|r| r.take_sync_failure());
        #[cfg(not(feature = "fault-injection"))]
        let injected: Option<i32> = None;
        let r = match injected {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ring::current()?.fsync(self.fd(), true).await.0.map(|_| ()),
        };
        #[cfg(feature = "fault-injection")]
        if let (Ok(()), Some(rec), Some(ids)) = (&r, self.rec.as_ref(), covered) {
            rec.sync_done(ids);
        }
        r.map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            // The first failure is the one remembered.
            let _ = self
                .sync_errno
                .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
            SyncFailed {
                errno,
                earlier: false,
            }
            .into()
        })
    }

    /// The error every flush of this file returns since an fdatasync of
    /// it failed, if one has.
    pub fn sync_failed(&self) -> Option<io::Error> {
        match self.sync_errno.load(Ordering::Acquire) {
            0 => None,
            errno => Some(
                SyncFailed {
                    errno,
                    earlier: true,
                }
                .into(),
            ),
        }
    }
}

/// A flush that failed because an fdatasync of the file failed, now or
/// earlier ([`HostFile::flush`]). Never worth retrying: the data the
/// failed fdatasync should have made durable may be gone from the page
/// cache. The errno is kept as a number, not as a source error, so that
/// nobody mistakes a failed sync for the condition it reported (an
/// ENOSPC here is not a full disk that freeing space would cure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncFailed {
    /// What the failed fdatasync returned.
    pub errno: i32,
    /// Whether it failed at an earlier flush (this one did not sync).
    pub earlier: bool,
}

impl std::fmt::Display for SyncFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = io::Error::from_raw_os_error(self.errno);
        if self.earlier {
            write!(
                f,
                "an earlier fdatasync failed ({what}): no flush succeeds until the image is reopened"
            )
        } else {
            write!(
                f,
                "fdatasync failed ({what}): writes since the last flush may be lost; no flush succeeds until the image is reopened"
            )
        }
    }
}

impl std::error::Error for SyncFailed {}

impl From<SyncFailed> for io::Error {
    fn from(e: SyncFailed) -> io::Error {
        io::Error::other(e)
    }
}

/// The [`SyncFailed`] somewhere in `e`'s chain of sources, if any.
pub fn sync_failure(e: &(dyn std::error::Error + 'static)) -> Option<SyncFailed> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<SyncFailed>() {
            return Some(*f);
        }
        if let Some(inner) = s
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<SyncFailed>())
        {
            return Some(*inner);
        }
        source = s.source();
    }
    None
}

impl AsRawFd for HostFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::block_on;

    #[test]
    fn unaligned_reads_and_writes_through_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, (0..20000u32).map(|i| i as u8).collect::<Vec<_>>()).unwrap();
        block_on(async {
            for cache in [CacheMode::None, CacheMode::Writeback] {
                let f = HostFile::open(&path, true, cache).unwrap();
                let b = f.read(4095, 10).await.unwrap();
                assert_eq!(
                    &b[..],
                    &(4095..4105u32).map(|i| i as u8).collect::<Vec<_>>()[..]
                );
                // Past the end of file reads zeros.
                let b = f.read(19990, 20).await.unwrap();
                assert_eq!(
                    &b[..10],
                    &(19990..20000u32).map(|i| i as u8).collect::<Vec<_>>()[..]
                );
                assert!(b[10..].iter().all(|&x| x == 0));
                f.write(5000, b"hello").await.unwrap();
                f.flush().await.unwrap();
                let b = f.read(4998, 9).await.unwrap();
                assert_eq!(&b[2..7], b"hello");
                assert_eq!(b[0], (4998u32 % 256) as u8);
            }
        });
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len(),
            20000,
            "writes inside the file do not extend it"
        );
    }

    #[test]
    fn set_len_through_the_ring_and_through_the_helper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 10000]).unwrap();
        block_on(async {
            let f = HostFile::open(&path, true, CacheMode::None).unwrap();
            f.set_len(8192).await.unwrap();
            assert_eq!(f.file_len().unwrap(), 8192);
            // The fallback of kernels without IORING_OP_FTRUNCATE.
            f.set_len_on_helper(4096).await.unwrap();
            assert_eq!(f.file_len().unwrap(), 4096);
            f.set_len(65536).await.unwrap();
            assert_eq!(f.file_len().unwrap(), 65536);
        });
    }

    /// `len` bytes of memory owned by a keep-alive, as guest memory.
    fn guest_mem(len: usize) -> (Arc<std::sync::Mutex<AlignedBuf>>, GuestSlice) {
        let mem = Arc::new(std::sync::Mutex::new(AlignedBuf::zeroed(len)));
        let ptr = mem.lock().unwrap().as_mut_ptr();
        let keep: KeepAlive = mem.clone();
        // SAFETY: `len` bytes of `mem`, which `keep` keeps alive.
        (mem, unsafe { GuestSlice::new(ptr, len, keep) })
    }

    #[test]
    fn guest_io_uses_guest_memory_and_survives_a_dropped_future() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        block_on(async {
            let f = HostFile::open(&path, true, CacheMode::None).unwrap();
            // Aligned guest memory: straight in and out.
            let (_mem, buf) = guest_mem(16384 + 1);
            let aligned = buf.sub(0, 16384);
            f.read_guest(4096, aligned.range()).await.unwrap();
            assert_eq!(aligned.to_vec(), &content[4096..20480]);
            aligned.fill(0xab);
            f.write_guest(8192, aligned.range()).await.unwrap();
            assert_eq!(f.direct_counts(), (2, 0, 0));
            // Misaligned memory bounces, with the same result.
            let odd = buf.sub(1, 4096);
            f.read_guest(8192, odd.range()).await.unwrap();
            assert!(odd.to_vec().iter().all(|&b| b == 0xab));
            assert_eq!(f.direct_counts(), (3, 1, 0));
            // Past the end of the file: zeros.
            let (_t, tail) = guest_mem(8192);
            tail.fill(1);
            f.read_guest(61440, tail.range()).await.unwrap();
            let v = tail.to_vec();
            assert_eq!(&v[..4096], &content[61440..]);
            assert!(v[4096..].iter().all(|&b| b == 0));

            // A future dropped while its read is in flight: the operation
            // keeps the memory until it completes.
            let (mem, dst) = guest_mem(65536);
            {
                let mut fut = Box::pin(f.read_guest(0, dst.range()));
                let waker = std::task::Waker::noop();
                let mut cx = std::task::Context::from_waker(waker);
                let _ = fut.as_mut().poll(&mut cx);
            }
            drop(dst);
            assert!(
                Arc::strong_count(&mem) >= 2,
                "in-flight op holds the memory"
            );
            // Other I/O lets the reaper see the orphan's completion.
            for _ in 0..100 {
                if Arc::strong_count(&mem) == 1 {
                    break;
                }
                let _ = f.read(0, 4096).await.unwrap();
                tokio::task::yield_now().await;
            }
            assert_eq!(Arc::strong_count(&mem), 1, "released after completion");
        });
    }

    #[test]
    fn guest_io_goes_through_registered_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..262144u32).map(|i| (i / 13) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        block_on(async {
            let f = HostFile::open(&path, true, CacheMode::None).unwrap();
            let ring = Ring::current().unwrap();
            // Two "regions" of guest memory; only they are registered.
            let mem = Arc::new(std::sync::Mutex::new((
                AlignedBuf::zeroed(65536),
                AlignedBuf::zeroed(131072),
            )));
            let keep: KeepAlive = mem.clone();
            let (a, b) = {
                let mut m = mem.lock().unwrap();
                (m.0.as_mut_ptr(), m.1.as_mut_ptr())
            };
            // SAFETY: both regions live in `mem`, which `keep` (held by the
            // ring while registered, and here until the end) keeps alive.
            let shared =
                unsafe { crate::uring::SharedMemory::register(&[(a, 65536), (b, 131072)]) }
                    .expect("registering 192 KiB needs no more than the default memlock limit");
            assert_eq!(shared.bytes(), 196608);
            // SAFETY: as just said.
            unsafe { ring.adopt_memory(&shared, keep.clone()) }.expect("adopt");
            drop(shared);
            assert_eq!(ring.fixed_index(a, 65536), ring.fixed_index(a, 1));
            assert!(ring.fixed_index(a, 65537).is_none(), "runs past the region");
            // SAFETY: the regions lie in `mem`, kept alive by `keep`.
            let ra = unsafe { GuestSlice::new(a, 65536, keep.clone()) };
            // SAFETY: as above.
            let rb = unsafe { GuestSlice::new(b, 131072, keep.clone()) };
            f.read_guest(4096, rb.range().sub(8192, 16384))
                .await
                .unwrap();
            assert_eq!(rb.sub(8192, 16384).to_vec(), &content[4096..20480]);
            assert_eq!(f.direct_counts(), (1, 0, 1));
            ra.fill(0x5a);
            f.write_guest(65536, ra.range()).await.unwrap();
            assert_eq!(f.direct_counts(), (2, 0, 2));
            // Memory outside the registration takes the ordinary path.
            let (_o, other) = guest_mem(65536);
            f.read_guest(65536, other.range()).await.unwrap();
            assert!(other.to_vec().iter().all(|&x| x == 0x5a));
            assert_eq!(f.direct_counts(), (3, 0, 2));
            // Unregistered: ordinary again, and the ring lets `keep` go.
            ring.unregister_memory();
            assert!(ring.fixed_index(a, 4096).is_none());
            f.read_guest(0, rb.range().sub(0, 4096)).await.unwrap();
            assert_eq!(rb.sub(0, 4096).to_vec(), &content[..4096]);
            assert_eq!(f.direct_counts(), (4, 0, 2));
            drop((keep, ra, rb));
            assert_eq!(Arc::strong_count(&mem), 1);
        });
    }
}
