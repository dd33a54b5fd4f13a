//! The virtio-blk device: what vhost-user-backend asks of a backend, and
//! the state the queue workers share.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::{CONFIG_LEN, CONFIG_WRITEBACK, DeviceConfig, MAX_QUEUE_SIZE};
use crate::disk::{Disk, DiskError};
use crate::pin::SharedPins;
use crate::request::Mem;
use crate::worker::{QueueHandle, Vring};

/// The end of the largest virtio-blk configuration layout (96 bytes in
/// virtio 1.3, with the secure-erase and zoned fields), rounded up.
const MAX_CONFIG_READ: u64 = 256;

/// Checks that every region of a frontend's memory table lies inside its
/// file. `mmap` accepts a mapping longer than the file, and touching its
/// tail would kill the daemon with SIGBUS; a frontend that shrinks the file
/// *after* sharing it can still do that (as with every vhost-user backend
/// that maps guest memory), but a table that is wrong from the start is
/// refused here.
fn check_memory(mem: &Mem) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file) = region.file_offset() else {
            continue;
        };
        let meta = file.file().metadata()?;
        if !meta.file_type().is_file() {
            // Not a regular file (a device): no length to check against.
            continue;
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
    }
    Ok(())
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
    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub(crate) event_idx: AtomicBool,
    io_errors: AtomicU64,
    /// Register guest memory with each worker's io_uring (`--pin-guest-memory`).
    pub pin_memory: bool,
}

impl Device {
    pub fn new(disk: Disk, config: DeviceConfig, serial: Vec<u8>) -> Self {
        Self {
            disk,
            config,
            serial,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            io_errors: AtomicU64::new(0),
            pin_memory: false,
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
        self.event_idx.store(false, Ordering::Release);
    }
}

/// The vhost-user backend of one frontend connection.
pub(crate) struct Backend {
    device: Arc<Device>,
    queues: Arc<Vec<QueueHandle>>,
    mem: GuestMemoryAtomic<Mem>,
    /// The epoll fd of each vring thread (by thread index), once known.
    epoll_fds: std::sync::Mutex<Vec<i32>>,
    /// Exit-event consumers given to the library (see
    /// [`Backend::close_exit_events`]).
    exit_consumers: std::sync::Mutex<Vec<RawFd>>,
    /// Pinning of this connection's memory tables (`--pin-guest-memory`).
    pins: Arc<SharedPins>,
}

impl Backend {
    pub(crate) fn new(
        device: Arc<Device>,
        queues: Arc<Vec<QueueHandle>>,
        mem: GuestMemoryAtomic<Mem>,
    ) -> Self {
        Self {
            device,
            queues,
            mem,
            epoll_fds: std::sync::Mutex::new(Vec::new()),
            exit_consumers: std::sync::Mutex::new(Vec::new()),
            pins: Arc::new(SharedPins::default()),
        }
    }

    /// Closes the exit-event descriptors handed to the connection's vring
    /// threads. vhost-user-backend 0.24 registers them in its epoll with
    /// `into_raw_fd` and never closes them: one descriptor per queue thread
    /// per connection, until the daemon runs out. Call only after the
    /// connection's `VhostUserDaemon` is dropped (its threads joined).
    pub(crate) fn close_exit_events(&self) {
        let fds = match self.exit_consumers.lock() {
            Ok(mut f) => std::mem::take(&mut *f),
            Err(_) => return,
        };
        for fd in fds {
            // SAFETY: `fd` is the consumer end made in `exit_event`, whose
            // ownership the library took with `into_raw_fd` and abandoned;
            // its thread has been joined, so nothing uses or closes it.
            // (vhost-user-backend is pinned to the version with this
            // behaviour: a release that closes it must drop this.)
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Records the epoll fds of the connection's vring threads.
    pub(crate) fn set_epoll_fds(&self, fds: Vec<i32>) {
        if let Ok(mut f) = self.epoll_fds.lock() {
            *f = fds;
        }
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.device.config.features()
    }

    fn acked_features(&self, features: u64) {
        // Without FLUSH the driver cannot ask for durability: write through.
        // With CONFIG_WCE it may choose later through the config space.
        let flush = features & 1 << VIRTIO_BLK_F_FLUSH != 0;
        self.device.writeback.store(flush, Ordering::Release);
        debug!(
            features = format_args!("{features:#x}"),
            wce = features & 1 << VIRTIO_BLK_F_CONFIG_WCE != 0,
            "features acknowledged"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        for q in self.queues.iter() {
            q.detach();
        }
        self.device.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.device.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past the fields this device has read as zero, as they do on
        // a device that does not offer the features behind them — up to
        // the end of the largest layout any virtio version defines. A read
        // beyond that is refused: an empty answer is the protocol's error.
        if u64::from(offset) + u64::from(size) > MAX_CONFIG_READ {
            warn!(offset, size, "refused a config read past the config space");
            return Vec::new();
        }
        let space = self.device.config.space(self.device.writeback());
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE).
        if offset as usize == CONFIG_WRITEBACK && buf.len() == 1 {
            let wb = buf[0] != 0;
            debug!(writeback = wb, "guest set the cache mode");
            self.device.writeback.store(wb, Ordering::Release);
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

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        // This is the same GuestMemoryAtomic the workers hold; they take a
        // fresh snapshot of it for every chain. The library has already
        // installed the new table, so a table that fails the check is
        // replaced by an empty one: the frontend gets an error, and no
        // request can touch the bad region.
        if let Err(e) = check_memory(&mem.memory()) {
            warn!("refused the frontend's memory table: {e}");
            let guard = mem
                .lock()
                .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
            guard.replace(Mem::new());
            return Err(e);
        }
        if self.device.pin_memory {
            // Start registering the new table now rather than at the
            // queues' next kicks.
            for q in self.queues.iter() {
                q.memory_changed();
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Needed so the epoll threads end when a connection's daemon is
        // dropped; without it the drop would wait for them forever.
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_consumers.lock().ok()?.push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            q.detach();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        // One queue per thread: the thread index is the queue index and
        // the event is that thread's only vring.
        match (
            self.queues.get(thread_id),
            vrings.get(usize::from(device_event)),
        ) {
            (Some(q), Some(vring)) => {
                let epoll_fd = self
                    .epoll_fds
                    .lock()
                    .ok()
                    .and_then(|f| f.get(thread_id).copied());
                q.kick(vring, &self.mem, &self.pins, epoll_fd);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("event {device_event} on thread {thread_id}: no such queue"),
            )),
        }
    }
}
