//! A hand-driven vhost-user frontend with one split virtqueue, for sending
//! descriptor chains no real driver would: the hostile-guest tests.
//!
//! Guest memory is one shared memfd mapped at guest physical address 0:
//! descriptor table at [`DESC`], avail ring at [`AVAIL`], used ring at
//! [`USED`], and buffers from [`DATA`] on. Each test places one chain at a
//! time in descriptor slots 0.., publishes it, kicks, and waits for the
//! used entry. With inflight tracking ([`RawFrontend::connect_tracked`])
//! it asks the daemon for an inflight region (GET_INFLIGHT_FD) and hands
//! the same region and guest memory to the next daemon after a crash
//! ([`RawFrontend::reconnect`]), as QEMU does.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x4000;
pub const USED: u64 = 0x8000;
/// Start of the buffer area.
pub const DATA: u64 = 0x10000;
pub const QUEUE_SIZE: u16 = 256;

/// VHOST_F_LOG_ALL.
pub const F_LOG_ALL: u64 = 1 << 26;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Counts the config-change notices of the backend channel.
#[derive(Debug, Default)]
struct Notices(Arc<AtomicU64>);

impl VhostUserFrontendReqHandler for Notices {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// One descriptor to place: address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct D(pub u64, pub u32, pub bool);

pub struct RawFrontend {
    fe: Frontend,
    guest: Guest,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_idx: u16,
    /// The inflight region the daemon made, and its description.
    inflight: Option<(File, VhostUserInflight)>,
    /// Features left out of what the daemon offers.
    features_off: u64,
}

/// Guest memory: the memfd and our mapping of it.
struct Guest {
    mem: *mut u8,
    memfd: File,
}

/// `VIRTIO_RING_F_EVENT_IDX`.
const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_BLK_F_FLUSH`: without it the device writes through.
pub const F_FLUSH: u64 = 1 << 9;

/// One head's state in an inflight region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightDesc {
    pub inflight: u8,
    pub counter: u64,
}

/// The header of queue 0's area of an inflight region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightHeader {
    pub version: u16,
    pub desc_num: u16,
    pub last_batch_head: u16,
    pub used_idx: u16,
}

impl std::fmt::Debug for RawFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFrontend").finish()
    }
}

impl RawFrontend {
    /// Connects and sets up queue 0 (no event_idx: every used entry is
    /// signalled; no inflight tracking).
    pub fn connect(socket: &Path) -> Self {
        Self::connect_with_memory(socket, new_memfd())
    }

    /// Like [`RawFrontend::connect`], with guest memory in `memfd` (any
    /// file: a regular file on disk makes memory the kernel will not pin
    /// long-term).
    pub fn connect_with_memory(socket: &Path, memfd: File) -> Self {
        Self::setup(socket, Guest::new(memfd), None, false, F_EVENT_IDX, 0)
    }

    /// Like [`RawFrontend::connect`], with a backend request channel
    /// (BACKEND_REQ) set up after the ring: the returned counter is the
    /// number of config-change notices the daemon has sent on it (each
    /// acked, as QEMU acks them).
    pub fn connect_with_notices(socket: &Path) -> (Self, Arc<AtomicU64>) {
        let mut fe = Self::setup_with(
            socket,
            Guest::new(new_memfd()),
            None,
            false,
            F_EVENT_IDX,
            0,
            VhostUserProtocolFeatures::BACKEND_REQ,
        );
        let notices = Arc::new(Notices::default());
        let mut handler = FrontendReqHandler::new(notices.clone()).expect("backend channel");
        handler.set_reply_ack_flag(true);
        fe.fe
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .expect("SET_BACKEND_REQ_FD");
        std::thread::spawn(move || while handler.handle_request().is_ok() {});
        let count = notices.0.clone();
        (fe, count)
    }

    /// Reads the 4 KiB at `offset` (a T_IN request) and returns them.
    pub fn read_at(&mut self, offset: u64) -> Vec<u8> {
        let status = DATA + 64;
        let h = self.header(DATA, 0, offset / 512);
        let (_, st) = self.roundtrip(
            &[h, D(DATA + 16384, 4096, true), D(status, 1, true)],
            status,
        );
        assert_eq!(st, 0, "read at {offset}");
        self.read(DATA + 16384, 4096)
    }

    /// Hands the daemon a dirty-page log (SET_LOG_BASE with `log`, a
    /// shared memory file of `size` bytes) and switches logging on or off
    /// (VHOST_F_LOG_ALL in SET_FEATURES), as QEMU does around a migration.
    pub fn set_logging(&mut self, log: Option<(&File, u64)>, on: bool) {
        if let Some((file, size)) = log {
            self.fe
                .set_log_base(
                    0,
                    Some(vhost::VhostUserDirtyLogRegion {
                        mmap_size: size,
                        mmap_offset: 0,
                        mmap_handle: file.as_raw_fd(),
                    }),
                )
                .expect("SET_LOG_BASE");
        }
        let offered = self.fe.get_features().expect("GET_FEATURES");
        let mut f = offered & !self.features_off & !F_LOG_ALL;
        if on {
            f |= F_LOG_ALL;
        }
        self.fe.set_features(f).expect("SET_FEATURES");
        // SET_FEATURES has no reply: a request that has one makes sure the
        // daemon took it before the next kick (QEMU waits for an ack when
        // it turns logging on).
        self.fe.get_features().expect("GET_FEATURES");
    }

    /// Enables or disables the ring (SET_VRING_ENABLE): the daemon stops
    /// or starts serving it.
    pub fn set_enabled(&mut self, on: bool) {
        self.fe.set_vring_enable(0, on).expect("SET_VRING_ENABLE");
    }

    /// Connects with inflight tracking: negotiates INFLIGHT_SHMFD, asks
    /// the daemon for a region (GET_INFLIGHT_FD) and hands it back
    /// (SET_INFLIGHT_FD). `features_off` are virtio features left out
    /// (e.g. [`F_FLUSH`], for a write-through device).
    pub fn connect_tracked(socket: &Path, features_off: u64) -> Self {
        let guest = Guest::new(new_memfd());
        Self::setup(socket, guest, None, true, F_EVENT_IDX | features_off, 0)
    }

    /// Connects to the daemon now listening on `socket` (a new one, after
    /// the last died) with the same guest memory and inflight region, the
    /// ring's base set to its used idx: what QEMU does when a backend it
    /// was connected to crashes.
    pub fn reconnect(self, socket: &Path) -> Self {
        let base = self.used_ring_idx();
        let RawFrontend {
            fe,
            guest,
            kick,
            call,
            avail_idx,
            used_idx,
            inflight,
            features_off,
        } = self;
        drop((fe, kick, call));
        let tracked = inflight.is_some();
        let mut new = Self::setup(socket, guest, inflight, tracked, features_off, base);
        new.avail_idx = avail_idx;
        new.used_idx = used_idx;
        new
    }

    fn setup(
        socket: &Path,
        guest: Guest,
        inflight: Option<(File, VhostUserInflight)>,
        tracked: bool,
        features_off: u64,
        base: u16,
    ) -> Self {
        let none = VhostUserProtocolFeatures::empty();
        Self::setup_with(socket, guest, inflight, tracked, features_off, base, none)
    }

    fn setup_with(
        socket: &Path,
        guest: Guest,
        inflight: Option<(File, VhostUserInflight)>,
        tracked: bool,
        features_off: u64,
        base: u16,
        extra: VhostUserProtocolFeatures,
    ) -> Self {
        let mut fe = Frontend::connect(socket, 1).expect("connect to the daemon");
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        // Logging (LOG_ALL) only when a test asks, as QEMU does at a
        // migration's start.
        fe.set_features(offered & !features_off & !F_LOG_ALL)
            .expect("SET_FEATURES");
        let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | extra;
        assert!(proto.contains(extra), "the daemon does not offer {extra:?}");
        if tracked {
            assert!(
                proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
                "the daemon does not offer INFLIGHT_SHMFD: {proto:?}"
            );
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        fe.set_protocol_features(proto & want)
            .expect("SET_PROTOCOL_FEATURES");
        let inflight = if tracked {
            let (file, info) = match inflight {
                Some(known) => known,
                None => fe
                    .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE_SIZE))
                    .map(|(info, file)| (file, info))
                    .expect("GET_INFLIGHT_FD"),
            };
            fe.set_inflight_fd(&info, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
            Some((file, info))
        } else {
            None
        };
        let mem = guest.mem;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem as u64,
            mmap_offset: 0,
            mmap_handle: guest.memfd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: mem as u64 + DESC,
                used_ring_addr: mem as u64 + USED,
                avail_ring_addr: mem as u64 + AVAIL,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(0, base).expect("SET_VRING_BASE");
        fe.set_vring_call(0, &call).expect("SET_VRING_CALL");
        fe.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        Self {
            fe,
            guest,
            kick,
            call,
            avail_idx: 0,
            used_idx: 0,
            inflight,
            features_off,
        }
    }

    /// The used ring's idx as the daemon last published it.
    pub fn used_ring_idx(&self) -> u16 {
        u16::from_le_bytes(self.read(USED + 2, 2).try_into().expect("2 bytes"))
    }

    /// Used element `i` (slot `i % QUEUE_SIZE`): `(id, len)`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let e = self.read(USED + 4 + u64::from(i % QUEUE_SIZE) * 8, 8);
        (
            u32::from_le_bytes(e[0..4].try_into().expect("4 bytes")),
            u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
        )
    }

    fn inflight_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let (file, info) = self.inflight.as_ref().expect("no inflight region");
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, info.mmap_offset + at)
            .expect("read the inflight region");
        b
    }

    /// Queue 0's header in the inflight region.
    pub fn inflight_header(&self) -> InflightHeader {
        let b = self.inflight_bytes(8, 8);
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        InflightHeader {
            version: le16(0),
            desc_num: le16(2),
            last_batch_head: le16(4),
            used_idx: le16(6),
        }
    }

    /// Head `head`'s entry of queue 0 in the inflight region.
    pub fn inflight_desc(&self, head: u16) -> InflightDesc {
        let b = self.inflight_bytes(16 + 16 * u64::from(head), 16);
        InflightDesc {
            inflight: b[0],
            counter: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }

    /// Places `chain` in descriptor slots `first`.. without publishing it.
    pub fn place(&mut self, first: u16, chain: &[D]) {
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let slot = first + i as u16;
            let flags = if d.2 { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put_desc(DESC, slot, d.0, d.1, flags, slot + 1);
        }
    }

    /// Publishes `heads` in the avail ring in one go and kicks once.
    pub fn publish_heads(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
            self.write(slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Closed-loop load, for benchmarks: `qd` 4 KiB requests (reads, or
    /// writes with `write`) at random 4 KiB-aligned offsets below `span`
    /// bytes, each sent again as soon as its completion is seen — the used
    /// ring is polled, never slept on — for `time`. Every status must be
    /// OK. Returns the number of requests completed.
    pub fn closed_loop(&mut self, qd: u16, span: u64, write: bool, time: Duration) -> u64 {
        assert!(qd >= 1 && u32::from(qd) * 3 <= u32::from(QUEUE_SIZE));
        assert!(DATA + 0x2000 + u64::from(qd) * 4096 <= MEM_SIZE as u64);
        let header = |i: u16| DATA + u64::from(i) * 16;
        let status = |i: u16| DATA + 0x1000 + u64::from(i);
        let buf = |i: u16| DATA + 0x2000 + u64::from(i) * 4096;
        let blocks = (span / 4096).max(1);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut place = |me: &mut Self, i: u16| {
            // xorshift64*
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            let r = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let sector = (r % blocks) * 8;
            let h = me.header(header(i), u32::from(write), sector);
            me.write(status(i), &[0xee]);
            me.place(i * 3, &[h, D(buf(i), 4096, !write), D(status(i), 1, true)]);
            i * 3
        };
        if write {
            for i in 0..qd {
                self.write(buf(i), &[0x5a; 4096]);
            }
        }
        let heads: Vec<u16> = (0..qd).map(|i| place(self, i)).collect();
        self.publish_heads(&heads);
        let deadline = std::time::Instant::now() + time;
        let mut done = 0u64;
        let mut again = Vec::with_capacity(usize::from(qd));
        while std::time::Instant::now() < deadline {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let idx = self.used_ring_idx();
            while self.used_idx != idx {
                let (id, _) = self.used_elem(self.used_idx);
                self.used_idx = self.used_idx.wrapping_add(1);
                let i = (id / 3) as u16;
                assert_eq!(self.read(status(i), 1)[0], 0, "request failed");
                done += 1;
                again.push(place(self, i));
            }
            if !again.is_empty() {
                self.publish_heads(&again);
                again.clear();
                let _ = self.call.read();
            }
        }
        // Let the ones in flight finish, so the ring is idle afterwards.
        let mut left = qd;
        while left > 0 {
            if self.wait_used(Duration::from_secs(30)).is_none() {
                panic!("{left} requests did not complete");
            }
            left -= 1;
        }
        done
    }

    /// Reads the device's configuration space.
    pub fn config(&mut self, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .fe
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .expect("GET_CONFIG");
        data
    }

    /// Writes guest memory.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_SIZE);
        // SAFETY: gpa + len is within our mapping (checked above).
        let dst = unsafe { self.guest.mem.add(gpa as usize) };
        // SAFETY: dst has room for bytes.len() bytes; the ranges are
        // distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    }

    /// Reads guest memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_SIZE);
        let mut out = vec![0u8; len];
        // SAFETY: gpa + len is within our mapping (checked above).
        let src = unsafe { self.guest.mem.add(gpa as usize) };
        // SAFETY: src holds len readable bytes; out has room for them.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }

    /// A request header (`virtio_blk_outhdr`) at `gpa`.
    pub fn header(&mut self, gpa: u64, kind: u32, sector: u64) -> D {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(gpa, &h);
        D(gpa, 16, false)
    }

    /// A descriptor table entry at `table` (guest address) index `i`.
    pub fn put_desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(i) * 16, &e);
    }

    /// Places `chain` in descriptor slots 0.. and publishes head 0.
    pub fn submit(&mut self, chain: &[D]) {
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if d.2 { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put_desc(DESC, i as u16, d.0, d.1, flags, (i + 1) as u16);
        }
        self.publish(0);
    }

    /// Places `chain` in an indirect table at `table` and publishes one
    /// descriptor pointing to it.
    pub fn submit_indirect(&mut self, table: u64, chain: &[D]) {
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if d.2 { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put_desc(table, i as u16, d.0, d.1, flags, (i + 1) as u16);
        }
        self.put_desc(DESC, 0, table, (chain.len() * 16) as u32, F_INDIRECT, 0);
        self.publish(0);
    }

    /// Publishes descriptor `head` in the avail ring and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        self.write(slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Publishes descriptor `head` `n` times in a row and kicks once: the
    /// same chain in `n` avail slots.
    pub fn publish_many(&mut self, head: u16, n: u16) {
        for _ in 0..n {
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
            self.write(slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Moves the avail index `ahead` entries past the last published one
    /// without filling the slots (a driver claiming more requests than the
    /// queue holds when `ahead` exceeds the queue size) and kicks.
    pub fn jump_avail_idx(&mut self, ahead: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(ahead);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Waits for the next used entry: `(id, len)`, or None after `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let idx = u16::from_le_bytes(self.read(USED + 2, 2).try_into().ok()?);
            if idx != self.used_idx {
                let at = USED + 4 + u64::from(self.used_idx % QUEUE_SIZE) * 8;
                let e = self.read(at, 8);
                self.used_idx = self.used_idx.wrapping_add(1);
                let id = u32::from_le_bytes(e[0..4].try_into().ok()?);
                let len = u32::from_le_bytes(e[4..8].try_into().ok()?);
                return Some((id, len));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            let _ = self.call.read();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Submits `chain` and waits for it: `(used len, status byte at
    /// `status_gpa`)`.
    pub fn roundtrip(&mut self, chain: &[D], status_gpa: u64) -> (u32, u8) {
        self.write(status_gpa, &[0xee]);
        self.submit(chain);
        let (_, len) = self
            .wait_used(Duration::from_secs(30))
            .expect("no used entry within 30 s");
        (len, self.read(status_gpa, 1)[0])
    }
}

/// Maps all of guest memory shared.
/// A fresh memfd for guest memory.
fn new_memfd() -> File {
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"rawq".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor we own.
    unsafe { File::from_raw_fd(fd) }
}

impl Guest {
    /// Guest memory of [`MEM_SIZE`] in `memfd`, mapped here.
    fn new(memfd: File) -> Self {
        memfd.set_len(MEM_SIZE as u64).expect("size memfd");
        Guest {
            mem: map_memory(&memfd),
            memfd,
        }
    }
}

fn map_memory(memfd: &File) -> *mut u8 {
    // SAFETY: mapping the whole memfd shared; checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap memfd");
    mem.cast::<u8>()
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map_memory` mapped.
        unsafe { libc::munmap(self.mem.cast(), MEM_SIZE) };
    }
}
