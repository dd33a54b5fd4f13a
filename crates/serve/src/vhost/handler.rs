//! The vhost-user messages of one frontend connection, turned into device
//! state (vhost-user.rst, "Front-end message types").
//!
//! The vhost crate's `BackendReqHandler` reads each message on the
//! connection's protocol thread, checks its framing (sizes, version,
//! reply flags, attached descriptors, protocol-feature gates) and calls
//! the matching method here; a method's error becomes an error reply (with
//! REPLY_ACK) and ends the connection. What the frontend sends is
//! untrusted: queue indexes, ring sizes and addresses, memory tables and
//! the inflight region are all checked here before they reach a worker.
//!
//! A ring runs on its queue worker from when it is *startable* (memory
//! table, addresses and kick eventfd set; enabled, or always enabled when
//! VHOST_USER_F_PROTOCOL_FEATURES was not negotiated) until it is stopped:
//! GET_VRING_BASE, SET_VRING_ENABLE 0, a new kick eventfd, a reset, or the
//! end of the connection. Stopping drains the requests in flight, so the
//! base handed back is the next avail entry no request is pending for.
//!
//! The backend request channel (BACKEND_REQ, SET_BACKEND_REQ_FD) goes to
//! `notice`, which tells the frontend of a live resize
//! (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG). Dirty-page logging for live
//! migration (LOG_SHMFD, SET_LOG_BASE, on while the features carry
//! VHOST_F_LOG_ALL) goes to `log`: `vring::SplitRing::push_used` marks the
//! used ring's pages, the queue worker those of read data, serials and
//! status bytes.

use std::fs::File;
use std::io;
use std::sync::Arc;

use tracing::{debug, info, warn};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};

use super::Call;
use super::inflight::{self, InflightQueue, Region};
use super::vring::RingLayout;
use crate::config::MAX_QUEUE_SIZE;
use crate::device::{Device, check_memory, check_region};
use crate::pin::SharedPins;
use crate::request::Mem;
use crate::vhost::log::{DirtyLog, LogMap};
use crate::vhost::notice::ConfigNotice;
use crate::worker::{QueueHandle, RingStart, Started};

/// Most memory regions a frontend may add (the number kernel vhost
/// supports, as libvhost-user and vhost-user-backend answer).
const MAX_MEM_SLOTS: u64 = 509;

/// How long a ring start waits for another connection to stop its ring
/// on the same queue.
const RING_HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The protocol features offered.
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// A region of the memory table: where the frontend has it mapped.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    user_addr: u64,
    size: u64,
    gpa: u64,
}

/// One ring as the frontend has set it up so far.
#[derive(Debug)]
struct VringConf {
    size: u16,
    desc: Option<GuestAddress>,
    avail: Option<GuestAddress>,
    used: Option<GuestAddress>,
    /// The next avail entry to take when the ring starts; updated when it
    /// stops.
    base: u16,
    kick: Option<File>,
    call: Arc<Call>,
    enabled: bool,
    running: bool,
}

impl Default for VringConf {
    fn default() -> Self {
        Self {
            size: MAX_QUEUE_SIZE as u16,
            desc: None,
            avail: None,
            used: None,
            base: 0,
            kick: None,
            call: Arc::new(Call::default()),
            enabled: false,
            running: false,
        }
    }
}

/// The state of one frontend connection.
pub(crate) struct Handler {
    /// This connection's number (queue ownership).
    id: u64,
    device: Arc<Device>,
    queues: Arc<Vec<QueueHandle>>,
    /// Guest memory: the workers take a snapshot of it for every chain.
    mem: GuestMemoryAtomic<Mem>,
    mappings: Vec<Mapping>,
    pins: Arc<SharedPins>,
    owned: bool,
    /// SET_FEATURES was received.
    features_set: bool,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    vrings: Vec<VringConf>,
    inflight: Option<Arc<Region>>,
    /// Config-change notices to this frontend, on the backend request
    /// channel it sets up (SET_BACKEND_REQ_FD).
    notice: Arc<ConfigNotice>,
    /// Counted among the device's frontends (from accept to drop).
    counted: bool,
    /// The dirty-page log of a migration (SET_LOG_BASE, LOG_ALL).
    log: Arc<DirtyLog>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("owned", &self.owned)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("acked_protocol", &self.acked_protocol)
            .field("vrings", &self.vrings)
            .field("inflight", &self.inflight)
            .field("notice", &self.notice)
            .finish_non_exhaustive()
    }
}

/// An error reply, logged (the vhost crate does not say why).
fn refuse(msg: impl Into<String>) -> Error {
    let msg = msg.into();
    warn!("refused a frontend message: {msg}");
    Error::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl Handler {
    pub(crate) fn new(id: u64, device: Arc<Device>, queues: Arc<Vec<QueueHandle>>) -> Self {
        let vrings = queues.iter().map(|_| VringConf::default()).collect();
        let notice = ConfigNotice::new();
        Self {
            id,
            device,
            queues,
            mem: GuestMemoryAtomic::new(Mem::new()),
            mappings: Vec::new(),
            pins: Arc::new(SharedPins::default()),
            owned: false,
            features_set: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            vrings,
            inflight: None,
            notice,
            counted: false,
            log: Arc::default(),
        }
    }

    /// A frontend connected to this handler: the device counts it.
    pub(crate) fn connected(&mut self) {
        if !self.counted {
            self.counted = true;
            self.device.frontend_connected(&self.notice);
        }
    }

    fn vring(&mut self, index: u32) -> Result<&mut VringConf> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| refuse(format!("queue {index} of a device with {n}")))
    }

    /// Whether ring `index` is enabled: by SET_VRING_ENABLE, or from the
    /// start when the features (once set) lack
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    fn enabled(&self, index: usize) -> bool {
        let protocol = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        self.vrings[index].enabled || (self.features_set && !protocol)
    }

    /// Starts ring `index` on its worker if everything it needs is set.
    fn try_start(&mut self, index: usize) {
        if self.vrings[index].running || !self.enabled(index) {
            return;
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let v = &self.vrings[index];
        let inflight = match self.inflight.clone() {
            Some(r) if r.queue_size() < v.size => {
                warn!(
                    queue = index,
                    size = v.size,
                    tracked = r.queue_size(),
                    "ring larger than its inflight area: not tracked"
                );
                None
            }
            r => r.and_then(|r| InflightQueue::new(r, index as u16)),
        };
        let (Some(desc), Some(avail), Some(used), Some(kick)) = (v.desc, v.avail, v.used, &v.kick)
        else {
            return;
        };
        let layout = RingLayout {
            size: v.size,
            desc,
            avail,
            used,
        };
        if let Err(e) = layout.check(&self.mem.memory()) {
            warn!(queue = index, "ring not started: {e}");
            return;
        }
        let kick = match kick.try_clone() {
            Ok(k) => k,
            Err(e) => {
                warn!(
                    queue = index,
                    "ring not started: cannot duplicate its kick fd: {e}"
                );
                return;
            }
        };
        let start = RingStart {
            layout,
            event_idx,
            base: v.base,
            inflight,
            kick,
            call: v.call.clone(),
            mem: self.mem.clone(),
            pins: self.pins.clone(),
            log: self.log.clone(),
        };
        // Another connection's ring on this queue (a migration's outgoing
        // frontend) is stopped before the incoming one starts its device;
        // a frontend that starts early waits a moment for that.
        let mut start = Some(start);
        let deadline = std::time::Instant::now() + RING_HANDOVER_WAIT;
        loop {
            let Some(s) = start.take() else { return };
            match self.queues[index].start(s, self.id) {
                Ok(Started::Yes) => break,
                Ok(Started::Closed) => return,
                Err((s, other)) if std::time::Instant::now() < deadline => {
                    debug!(
                        queue = index,
                        other, "queue busy with another frontend's ring"
                    );
                    start = Some(s);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err((_, other)) => {
                    warn!(
                        queue = index,
                        other, "ring not started: the queue still serves another frontend's ring"
                    );
                    return;
                }
            }
        }
        if !self.vrings.iter().any(|v| v.running) {
            // The device-wide cache mode is this frontend's from now on.
            self.device.set_acked_features(self.acked_features);
        }
        self.vrings[index].running = true;
        debug!(queue = index, "ring started");
        if !self.device.is_active() {
            warn!(
                queue = index,
                "ring started while inactive: guest requests wait until blockdev-set-active activates this daemon"
            );
        }
        self.notice.set_started(true, self.device.capacity());
    }

    /// Stops ring `index` (draining its requests) and records its base.
    fn stop(&mut self, index: usize) {
        if !self.vrings[index].running {
            return;
        }
        if let Some(base) = self.queues[index].stop() {
            self.vrings[index].base = base;
        }
        self.queues[index].release(self.id);
        self.vrings[index].running = false;
        if self.vrings.iter().all(|v| !v.running) {
            self.notice.set_started(false, self.device.capacity());
        }
        debug!(
            queue = index,
            base = self.vrings[index].base,
            "ring stopped"
        );
    }

    /// Stops every ring: the connection is ending.
    pub(crate) fn end(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Back to the state of a new connection (but owned as before).
    fn reset(&mut self) {
        self.end();
        for v in &mut self.vrings {
            *v = VringConf::default();
        }
        self.features_set = false;
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        if !self.serving_elsewhere() {
            self.device.reset();
        }
    }

    /// Whether some queue serves another connection's ring.
    fn serving_elsewhere(&self) -> bool {
        self.queues
            .iter()
            .any(|q| q.owner().is_some_and(|o| o != self.id))
    }

    fn gpa_of(&self, user_addr: u64) -> Result<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| user_addr >= m.user_addr && user_addr - m.user_addr < m.size)
            .map(|m| GuestAddress(user_addr - m.user_addr + m.gpa))
            .ok_or_else(|| {
                refuse(format!(
                    "ring address {user_addr:#x} is in no memory region"
                ))
            })
    }

    fn install(&mut self, mem: Mem) -> Result<()> {
        self.mem
            .lock()
            .map_err(|_| refuse("guest memory lock poisoned"))?
            .replace(mem);
        if self.device.pin_memory {
            // Start registering the new table now rather than at the
            // queues' next kicks.
            for q in self.queues.iter() {
                q.memory_changed();
            }
        }
        Ok(())
    }

    fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap> {
        let mapped = region.mmap_region::<()>(file)?;
        GuestRegionMmap::new(mapped, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| refuse("memory region wraps the guest address space"))
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(refuse("SET_OWNER twice"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset();
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.config.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = self.device.config.features();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} were never offered",
                features & !offered
            )));
        }
        self.features_set = true;
        self.acked_features = features;
        self.log
            .set_enabled(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        // Device-wide; a frontend negotiating while another one's rings
        // run (a migration's incoming side) takes over at its first ring.
        if !self.serving_elsewhere() {
            self.device.set_acked_features(features);
        }
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        for i in 0..self.vrings.len() {
            self.try_start(i);
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            regions.push(Self::map_region(region, file)?);
            mappings.push(Mapping {
                user_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem =
            Mem::from_regions(regions).map_err(|e| refuse(format!("memory table refused: {e}")))?;
        // A table that fails the check is never installed: no request can
        // touch its regions, and the previous table stays.
        check_memory(&mem).map_err(|e| refuse(format!("memory table refused: {e}")))?;
        self.install(mem)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let v = self.vring(index)?;
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(refuse(format!(
                "queue size {num} (a power of two up to {MAX_QUEUE_SIZE} is needed)"
            )));
        }
        if v.running {
            return Err(refuse("SET_VRING_NUM on a running ring"));
        }
        // At most MAX_QUEUE_SIZE, checked above.
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        if self.mappings.is_empty() {
            return Err(refuse("SET_VRING_ADDR before a memory table"));
        }
        let desc = self.gpa_of(descriptor)?;
        let used = self.gpa_of(used)?;
        let avail = self.gpa_of(available)?;
        let v = self.vring(index)?;
        if v.running {
            // QEMU sends the same addresses again to switch the ring's
            // used-ring logging on or off at a migration's start and end;
            // the used ring is logged whenever logging is on anyway.
            if (v.desc, v.used, v.avail) == (Some(desc), Some(used), Some(avail)) {
                return Ok(());
            }
            return Err(refuse("SET_VRING_ADDR moving a running ring"));
        }
        v.desc = Some(desc);
        v.used = Some(used);
        v.avail = Some(avail);
        self.try_start(index as usize);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let v = self.vring(index)?;
        if v.running {
            return Err(refuse("SET_VRING_BASE on a running ring"));
        }
        v.base =
            u16::try_from(base).map_err(|_| refuse(format!("ring base {base} of a split ring")))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop(i);
        let v = &mut self.vrings[i];
        // The ring is stopped until a new kick eventfd starts it again.
        v.kick = None;
        v.call.set(None);
        v.call = Arc::new(Call::default());
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        let Some(fd) = fd else {
            return Err(refuse(
                "a ring without a kick eventfd (polling is not supported)",
            ));
        };
        let i = usize::from(index);
        // A running ring moves to the new eventfd.
        self.stop(i);
        self.vrings[i].kick = Some(fd);
        self.try_start(i);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.call.set(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // Nothing is reported through it; the descriptor is closed.
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        // REPLY_ACK is answered by the vhost crate whatever we offer.
        let offered = protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        let acked = VhostUserProtocolFeatures::from_bits(features)
            .filter(|f| offered.contains(*f))
            .ok_or_else(|| {
                refuse(format!(
                    "protocol features {:#x} were never offered",
                    features & !offered.bits()
                ))
            })?;
        self.acked_protocol = acked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(index as usize);
        } else {
            self.stop(index as usize);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        // An empty answer is the protocol's error reply.
        let space = self.device.config_read(offset, size).unwrap_or_default();
        if offset == 0 && space.len() >= 8 {
            let capacity = u64::from_le_bytes(space[..8].try_into().expect("8 bytes"));
            self.notice.config_read(capacity);
        }
        Ok(space)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        self.device
            .config_write(offset, buf)
            .map_err(|e| refuse(e.to_string()))
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            backend.set_reply_ack_flag(true);
        }
        self.notice.set_channel(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(refuse("GPU_SET_SOCKET on a block device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(refuse("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        let (file, size) = inflight::create(
            msg.num_queues,
            msg.queue_size,
            self.vrings.len() as u16,
            MAX_QUEUE_SIZE as u16,
        )
        .map_err(|e| refuse(format!("GET_INFLIGHT_FD: {e}")))?;
        info!(
            num_queues = msg.num_queues,
            queue_size = msg.queue_size,
            bytes = size,
            "inflight region made"
        );
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let region = Region::map(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
            self.vrings.len() as u16,
            MAX_QUEUE_SIZE as u16,
        )
        .map_err(|e| refuse(format!("SET_INFLIGHT_FD: {e}")))?;
        if self.vrings.iter().any(|v| v.running) {
            debug!("inflight region set while rings run: it applies when they restart");
        }
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse(format!("more than {MAX_MEM_SLOTS} memory regions")));
        }
        let as_table = VhostUserMemoryRegion::new(
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
        );
        let mapped = Self::map_region(&as_table, fd)?;
        check_region(&mapped).map_err(|e| refuse(format!("memory region refused: {e}")))?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(mapped))
            .map_err(|e| refuse(format!("memory region refused: {e}")))?;
        self.install(mem)?;
        self.mappings.push(Mapping {
            user_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| refuse(format!("REM_MEM_REG: {e}")))?;
        self.install(mem)?;
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(refuse("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(refuse("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(refuse("shared memory regions are not supported"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let map = LogMap::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| refuse(format!("SET_LOG_BASE: {e}")))?;
        self.log.set_map(map);
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.end();
        if self.counted {
            self.device.frontend_disconnected();
        }
    }
}
