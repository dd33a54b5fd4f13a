//! The virtio-blk device: the state the queue workers share, its config
//! space and feature handling, and the checks on the frontend's memory.

use crate::lock;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{CONFIG_LEN, CONFIG_WRITEBACK, DeviceConfig};
use crate::disk::{Disk, DiskError};
use crate::errors::{Action, Cause, OnError, RunState};
use crate::events::Events;
use crate::gate::Gate;
use crate::request::Mem;
use crate::vhost::notice::ConfigNotice;

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

/// How long a live resize or snapshot waits for the guest's requests in
/// the disk to finish before giving up.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What every queue worker shares: the disk and the device's settings.
#[derive(Debug)]
pub struct Device {
    /// The disk; none while the daemon is inactive (`set_active`). Swapped
    /// only with the guest's requests held at the gate.
    disk: ArcSwapOption<Disk>,
    /// Held by control operations that change the disk under the guest
    /// (activation, resize, snapshots, bitmaps), one at a time.
    admin: Mutex<()>,
    /// The settings the device started with; the capacity may grow since
    /// (`size()`).
    pub config: DeviceConfig,
    /// The guest-visible size in bytes.
    size: AtomicU64,
    /// Every guest request passes it on its way into the disk.
    pub gate: Gate,
    /// QMP events (`events.rs`).
    pub events: Events,
    /// `--werror`/`--rerror` and whether the device runs (`errors.rs`).
    pub run: RunState,
    /// Connected frontends (two while a VM migrates).
    frontends: AtomicUsize,
    /// The connections' config-change notices.
    notices: Mutex<Vec<Weak<ConfigNotice>>>,
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
    /// I/O limits across all queues (`throttle.rs`).
    pub throttle: crate::throttle::Throttle,
    /// The NBD server and its exports of snapshots (`nbd/`).
    pub nbd: crate::nbd::Nbd,
    /// The active image's file: it changes with an external snapshot and
    /// a commit (`jobs.rs`).
    image: Mutex<ActiveImage>,
    /// Live block jobs (`jobs.rs`).
    pub jobs: crate::jobs::Jobs,
    /// While a commit copies the active image down: the guest writes it
    /// must copy again. `mirroring` says whether to look, so a guest write
    /// pays one relaxed load when no commit runs.
    mirror: ArcSwapOption<crate::jobs::Dirty>,
    mirroring: AtomicBool,
}

/// The file the device serves, and the directories of every image it has
/// served: the backing files an external snapshot or a commit leaves
/// behind lie there, and an image this daemon served is trusted as a
/// backing file.
#[derive(Debug, Clone)]
pub struct ActiveImage {
    pub path: PathBuf,
    pub format: crate::Format,
    pub trusted_dirs: Vec<PathBuf>,
}

/// What the daemon's opener opens: the active image (and the images
/// already open that its chain shares, `OpenOptions::shared_layers`).
#[derive(Debug)]
pub struct OpenTarget {
    pub path: PathBuf,
    pub format: crate::Format,
    /// Directories backing files may lie in besides the daemon's options.
    pub trusted_dirs: Vec<PathBuf>,
    pub shared: Vec<Arc<qblk_engine::Image>>,
}

/// Opens a disk as the daemon's options say; the error is the reply.
pub type Opener = Arc<dyn Fn(&OpenTarget) -> Result<Disk, String> + Send + Sync>;

impl Device {
    /// A device serving `disk`, or an inactive one (`None`) whose guest
    /// requests wait until a disk is handed to it (`set_active`).
    pub fn new(disk: Option<Disk>, config: DeviceConfig, serial: Vec<u8>) -> Self {
        let gate = if disk.is_some() {
            Gate::default()
        } else {
            Gate::closed()
        };
        Self {
            disk: ArcSwapOption::from(disk.map(Arc::new)),
            admin: Mutex::default(),
            config,
            size: AtomicU64::new(config.size),
            gate,
            events: Events::new(),
            run: RunState::new(OnError::WRITE_DEFAULT, OnError::READ_DEFAULT),
            frontends: AtomicUsize::new(0),
            notices: Mutex::default(),
            serial,
            writeback: AtomicBool::new(true),
            io_errors: AtomicU64::new(0),
            pin_memory: false,
            queue_stats: (0..config.num_queues)
                .map(|_| crate::stats::QueueStats::default())
                .collect(),
            throttle: crate::throttle::Throttle::default(),
            nbd: crate::nbd::Nbd::default(),
            image: Mutex::new(ActiveImage {
                path: PathBuf::new(),
                format: crate::Format::Qcow2,
                trusted_dirs: Vec::new(),
            }),
            jobs: crate::jobs::Jobs::default(),
            mirror: ArcSwapOption::empty(),
            mirroring: AtomicBool::new(false),
        }
    }

    /// The active image's file and format.
    pub fn image(&self) -> ActiveImage {
        lock(&self.image).clone()
    }

    /// Records `path` (in `format`) as the image the device serves.
    pub fn set_image(&self, path: &Path, format: crate::Format) {
        let mut i = lock(&self.image);
        i.path = path.to_owned();
        i.format = format;
        let dir = std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned));
        if let Some(dir) = dir {
            if !i.trusted_dirs.contains(&dir) {
                i.trusted_dirs.push(dir);
            }
        }
    }

    /// The target that opens the active image again.
    pub fn open_target(&self) -> OpenTarget {
        let i = self.image();
        OpenTarget {
            path: i.path,
            format: i.format,
            trusted_dirs: i.trusted_dirs,
            shared: Vec::new(),
        }
    }

    /// Starts recording the guest's writes for a commit (`jobs.rs`).
    pub(crate) fn start_mirror(&self, dirty: Arc<crate::jobs::Dirty>) {
        self.mirror.store(Some(dirty));
        self.mirroring.store(true, Ordering::Release);
    }

    pub(crate) fn stop_mirror(&self) {
        self.mirroring.store(false, Ordering::Release);
        self.mirror.store(None);
    }

    /// Notes a range a guest request changed (written, zeroed,
    /// discarded), once the request is done with the disk.
    pub(crate) fn guest_changed(&self, offset: u64, len: u64) {
        if self.mirroring.load(Ordering::Relaxed) {
            if let Some(d) = &*self.mirror.load() {
                d.mark(offset, len);
            }
        }
    }

    /// Closes the disk and serves another in its place, with the guest's
    /// requests held (`held`): an external snapshot's overlay, a commit's
    /// base, the image reopened over a new backing chain. The old disk
    /// commits everything and lets go of its locks before `open_new` runs.
    /// If that fails, `reopen_old` puts the old one back, and the error is
    /// the answer; if that fails too, the device is left inactive with the
    /// guest's requests held (`blockdev-set-active` tries again).
    pub fn switch_disk(
        &self,
        held: crate::gate::Paused<'_>,
        open_new: impl FnOnce() -> Result<Disk, String>,
        reopen_old: impl FnOnce() -> Result<Disk, String>,
    ) -> Result<(), String> {
        let old = self.disk().ok_or_else(|| DiskError::Inactive.to_string())?;
        qblk_engine::runtime::block_on(old.close())
            .map_err(|e| format!("{}; nothing changed", crate::error_chain(&e)))?;
        self.disk.store(None);
        if let Err(e) = old.release_locks() {
            warn!("{}", crate::error_chain(&e));
        }
        drop(old);
        let e = match open_new() {
            Ok(disk) => {
                self.disk.store(Some(Arc::new(disk)));
                drop(held);
                return Ok(());
            }
            Err(e) => e,
        };
        match reopen_old() {
            Ok(disk) => {
                self.disk.store(Some(Arc::new(disk)));
                drop(held);
                Err(format!("{e}; the disk is served as before"))
            }
            Err(e2) => {
                held.keep();
                tracing::error!(
                    "{e}; reopening the old image failed too ({e2}): inactive, guest requests wait for blockdev-set-active"
                );
                Err(format!(
                    "{e}; reopening the old image failed too ({e2}): the daemon is inactive, guest requests wait (blockdev-set-active)"
                ))
            }
        }
    }

    /// The disk, unless the daemon is inactive.
    pub fn disk(&self) -> Option<Arc<Disk>> {
        self.disk.load_full()
    }

    /// The disk for a guest request: no reference count is touched (the
    /// guard is thread-local), so the queue workers share no cache line.
    pub(crate) fn disk_for_request(&self) -> arc_swap::Guard<Option<Arc<Disk>>> {
        self.disk.load()
    }

    /// Whether the daemon serves the disk (not handed over to another).
    pub fn is_active(&self) -> bool {
        self.disk.load().is_some()
    }

    /// Serializes the control operations that change the disk under the
    /// guest; held across the operation.
    pub fn admin(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.admin)
    }

    /// `blockdev-set-active`: hands the disk over between two daemons
    /// sharing an image (a migration across hosts). Deactivating drains and
    /// holds the guest's requests, commits everything and leaves the image
    /// clean, lets go of its locks and forgets all metadata; the requests
    /// wait (still in flight for the guest) until the disk is activated
    /// again. Activating opens it with `open` — taking the locks, reading
    /// the metadata afresh, replaying a journal a crashed daemon left —
    /// and lets them in. A no-op when already so. The caller holds
    /// [`Device::admin`].
    pub fn set_active(
        &self,
        active: bool,
        open: impl FnOnce() -> Result<Disk, String>,
    ) -> Result<(), String> {
        if active == self.is_active() {
            return Ok(());
        }
        if active {
            let disk = open()?;
            let size = disk.size();
            self.disk.store(Some(Arc::new(disk)));
            let old = self.size.swap(size, Ordering::AcqRel);
            self.gate.reopen_kept();
            if size != old {
                warn!(
                    old,
                    new = size,
                    "the image changed size while this daemon was inactive; the guest hears of it"
                );
                self.notify_capacity();
            }
            tracing::info!("active: the disk is served");
            return Ok(());
        }
        let paused = self
            .hold_guest()
            .map_err(|e| format!("{e}; still active"))?;
        let Some(disk) = self.disk() else {
            return Ok(());
        };
        qblk_engine::runtime::block_on(disk.close())
            .map_err(|e| format!("{}; still active", crate::error_chain(&e)))?;
        self.disk.store(None);
        let released = disk.release_locks();
        paused.keep();
        drop(disk);
        if let Err(e) = released {
            // Closing the descriptor lets them go too, a little later.
            warn!("{}", crate::error_chain(&e));
        }
        tracing::info!(
            "inactive: image committed and unlocked; guest requests wait for blockdev-set-active"
        );
        Ok(())
    }

    /// The size the guest sees, in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.size() / crate::config::SECTOR_SIZE
    }

    /// A frontend connected; its connection's notices go to `notice`.
    pub(crate) fn frontend_connected(&self, notice: &Arc<ConfigNotice>) {
        self.frontends.fetch_add(1, Ordering::AcqRel);
        let mut n = lock(&self.notices);
        n.retain(|w| w.strong_count() > 0);
        n.push(Arc::downgrade(notice));
    }

    /// A frontend went away.
    pub(crate) fn frontend_disconnected(&self) {
        self.frontends.fetch_sub(1, Ordering::AcqRel);
    }

    /// Closes the gate and waits, at most [`DRAIN_TIMEOUT`], until no
    /// guest request is inside the disk; the guest's requests are held
    /// while the guard lives. The error says how many did not finish.
    pub fn hold_guest(&self) -> Result<crate::gate::Paused<'_>, String> {
        self.gate.pause(DRAIN_TIMEOUT).map_err(|n| {
            format!(
                "{n} guest requests did not finish within {} s",
                DRAIN_TIMEOUT.as_secs()
            )
        })
    }

    /// Grows the disk to `new_size` bytes while it is served: the guest's
    /// requests are drained and held while the image changes, then the
    /// frontends hear of the new capacity. Shrinking is refused (the guest
    /// may have data there), and so is a resize while a second frontend
    /// is connected (a migration: the other side has the old size).
    pub async fn grow(&self, new_size: u64) -> Result<(), String> {
        let old = self.size();
        if self.config.readonly {
            return Err("the disk is served read-only".into());
        }
        if new_size < old {
            return Err(format!(
                "shrinking a served disk is not supported ({new_size} bytes is less than its {old}): the guest may have data there"
            ));
        }
        if new_size % crate::config::SECTOR_SIZE != 0 {
            return Err(format!(
                "the new size {new_size} is not a multiple of {} bytes",
                crate::config::SECTOR_SIZE
            ));
        }
        if self.frontends.load(Ordering::Acquire) > 1 {
            return Err(
                "a second frontend is connected (a migration): resize once it has ended".into(),
            );
        }
        if new_size == old {
            return Ok(());
        }
        let disk = self.disk().ok_or_else(|| DiskError::Inactive.to_string())?;
        let paused = self.hold_guest().map_err(|e| format!("{e}; not resized"))?;
        let grown = disk.grow(new_size).await;
        if grown.is_ok() {
            self.size.store(new_size, Ordering::Release);
        }
        drop(paused);
        grown.map_err(|e| crate::error_chain(&e))?;
        tracing::info!(old, new = new_size, "disk grown");
        self.notify_capacity();
        Ok(())
    }

    /// Tells every frontend the capacity changed.
    fn notify_capacity(&self) {
        let capacity = self.capacity();
        let notices: Vec<Arc<ConfigNotice>> = lock(&self.notices)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for n in notices {
            n.capacity_changed(capacity);
        }
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// Sets what failed requests do (`--werror`, `--rerror`).
    pub fn set_error_policies(&mut self, werror: OnError, rerror: OnError) {
        self.run = RunState::new(werror, rerror);
    }

    /// A guest request failed with `e`: what the policy says to do with
    /// it, logged (the first ones, then every thousandth) and told to the
    /// control clients as QEMU tells them — `BLOCK_IMAGE_CORRUPTED` when
    /// the image was just found inconsistent, and `BLOCK_IO_ERROR` with
    /// the action taken (`write` covers flushes, discards and
    /// write-zeroes, as in QEMU). The caller holds the request (see
    /// `errors.rs`) when the action is [`Action::Stop`].
    pub(crate) fn io_error(&self, e: &DiskError, write: bool) -> Action {
        let cause = Cause::of(e);
        let action = self.run.action(cause, write);
        let n = self.io_errors.fetch_add(1, Ordering::Relaxed);
        let msg = crate::error_chain(e);
        if n < 16 || n % 1000 == 0 {
            warn!(
                count = n + 1,
                action = action.as_str(),
                "request failed: {msg}"
            );
        }
        if let DiskError::Image(qblk_engine::Error::Corrupt { cause, .. }) = e {
            self.events.emit(
                "BLOCK_IMAGE_CORRUPTED",
                serde_json::json!({
                    "device": "",
                    "node-name": crate::control::NODE_NAME,
                    "msg": cause.to_string(),
                    "fatal": true,
                }),
            );
        }
        self.events.emit(
            "BLOCK_IO_ERROR",
            serde_json::json!({
                "device": "",
                "node-name": crate::control::NODE_NAME,
                "operation": if write { "write" } else { "read" },
                "action": action.as_str(),
                "nospace": cause == Cause::NoSpace,
                "reason": msg,
            }),
        );
        action
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
        let config = DeviceConfig {
            size: self.size(),
            ..self.config
        };
        let space = config.space(self.writeback());
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
