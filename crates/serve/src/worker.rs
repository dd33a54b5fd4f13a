//! Queue workers: one thread per virtqueue (or per group of them, with
//! `--threads`), each with its own current-thread tokio runtime, `LocalSet`
//! and io_uring (the engine's per-thread ring), which the queues of a
//! thread share.
//!
//! A worker pops every available descriptor chain, walks and parses it,
//! and runs each request as a local task; the task's engine I/O goes out
//! through this thread's ring in the same scheduler tick as its
//! neighbours'. Completions are batched the same way: finished requests
//! queue their used entries and one completer task publishes them all and
//! notifies the guest once (event_idx decides whether it needs to hear at
//! all).
//!
//! The protocol thread talks to a worker only through its
//! [`QueueHandle`]: starting a ring hands over its layout, base, inflight
//! area, call eventfd and a duplicate of its kick eventfd, which the
//! worker then watches itself (edge-triggered, through tokio's `AsyncFd`);
//! stopping drains the ring and hands its base back. No request crosses
//! threads.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, info, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic};

use qblk_engine::guest::GuestSlice;

use crate::device::Device;
use crate::errors::{Action, Arrival, Cause};
use crate::pin::{Pinning, SharedPins};
use crate::request::{self, IoSeg, Limits, Mem, Op, Parsed, Request};
use crate::vhost::Call;
use crate::vhost::chain;
use crate::vhost::inflight::InflightQueue;
use crate::vhost::log::{DirtyLog, LogMap};
use crate::vhost::vring::{RingError, RingLayout, SplitRing};

/// How long stopping a ring waits for in-flight requests before giving up
/// on them (they still complete, but into a ring the frontend has taken
/// back).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Messages about the first bad requests are logged; after that only every
/// this-many-th, so a hostile guest cannot flood the log.
const BAD_REQUEST_LOG_EVERY: u64 = 1000;

/// Everything a worker needs to serve a ring.
#[derive(Debug)]
pub(crate) struct RingStart {
    pub(crate) layout: RingLayout,
    pub(crate) event_idx: bool,
    /// The avail entry to start at (unless the inflight area says
    /// otherwise).
    pub(crate) base: u16,
    pub(crate) inflight: Option<InflightQueue>,
    /// The worker's own duplicate of the kick eventfd.
    pub(crate) kick: File,
    pub(crate) call: Arc<Call>,
    pub(crate) mem: GuestMemoryAtomic<Mem>,
    /// The connection's pinning jobs, shared with its other queues.
    pub(crate) pins: Arc<SharedPins>,
    /// The connection's dirty-page log (live migration).
    pub(crate) log: Arc<DirtyLog>,
}

#[derive(Debug)]
enum Cmd {
    Start(Box<RingStart>),
    /// Stop serving the ring; answers with the base it stopped at.
    Stop(std::sync::mpsc::Sender<Option<u16>>),
    Exit,
}

/// What [`QueueHandle::start`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Started {
    Yes,
    /// The daemon is stopping.
    Closed,
}

/// The protocol side's handle on one queue worker.
#[derive(Debug)]
pub(crate) struct QueueHandle {
    index: usize,
    kick: Arc<Notify>,
    cmds: mpsc::UnboundedSender<Cmd>,
    attached: Arc<AtomicBool>,
    /// Set when the daemon stops: no ring starts any more.
    closed: AtomicBool,
    /// The connection whose ring this queue serves.
    owner: Mutex<Option<u64>>,
    /// The worker thread, shared with the other queues it serves.
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl QueueHandle {
    /// Starts one worker thread serving the queues `indices` together
    /// (one runtime, one io_uring); returns their handles in that order.
    pub(crate) fn spawn_thread(
        indices: &[usize],
        device: &Arc<Device>,
    ) -> std::io::Result<Vec<Self>> {
        let mut handles = Vec::with_capacity(indices.len());
        let mut workers = Vec::with_capacity(indices.len());
        for &index in indices {
            let kick = Arc::new(Notify::new());
            let (tx, rx) = mpsc::unbounded_channel();
            let attached = Arc::new(AtomicBool::new(false));
            let worker = Worker {
                index,
                device: device.clone(),
                kick: kick.clone(),
                attached: attached.clone(),
            };
            workers.push((worker, rx));
            handles.push((index, kick, tx, attached));
        }
        let name = match indices {
            [one] => format!("qblk-queue{one}"),
            [first, ..] => format!("qblk-queues{first}+"),
            [] => return Ok(Vec::new()),
        };
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            qblk_engine::runtime::block_on(async move {
                // The thread's ring lives as long as the thread: made now,
                // not at the first I/O or pinning of whichever frontend
                // comes first, so what the daemon holds does not depend on
                // what its frontends did. (Failing here fails each request.)
                if let Err(e) = qblk_engine::uring::Ring::current() {
                    tracing::error!("cannot create the queue thread's io_uring: {e}");
                }
                // The queues of a thread share its ring, and so what is
                // registered with it.
                let pinning = Rc::new(RefCell::new(Pinning::default()));
                let runs = workers
                    .into_iter()
                    .map(|(w, rx)| w.run(rx, pinning.clone()));
                futures_util::future::join_all(runs).await;
            })
        })?;
        let thread = Arc::new(Mutex::new(Some(thread)));
        Ok(handles
            .into_iter()
            .map(|(index, kick, cmds, attached)| Self {
                index,
                kick,
                cmds,
                attached,
                closed: AtomicBool::new(false),
                owner: Mutex::new(None),
                thread: thread.clone(),
            })
            .collect())
    }

    /// Starts serving connection `owner`'s ring, unless the daemon is
    /// stopping; while the queue serves another connection's ring, the
    /// ring is handed back with that connection's number.
    pub(crate) fn start(&self, ring: RingStart, owner: u64) -> Result<Started, (RingStart, u64)> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(Started::Closed);
        }
        {
            let mut o = crate::lock(&self.owner);
            match *o {
                Some(other) if other != owner => return Err((ring, other)),
                _ => *o = Some(owner),
            }
        }
        self.attached.store(true, Ordering::Release);
        if self.cmds.send(Cmd::Start(Box::new(ring))).is_ok() {
            Ok(Started::Yes)
        } else {
            Ok(Started::Closed)
        }
    }

    /// Connection `owner` no longer has a ring on this queue (stopped with
    /// [`QueueHandle::stop`] first).
    pub(crate) fn release(&self, owner: u64) {
        let mut o = crate::lock(&self.owner);
        if *o == Some(owner) {
            *o = None;
        }
    }

    /// The connection whose ring the queue serves, if any.
    pub(crate) fn owner(&self) -> Option<u64> {
        *crate::lock(&self.owner)
    }

    /// The frontend changed its memory table: a serving worker looks at
    /// it now (to register it with `--pin-guest-memory`) instead of at the
    /// next kick.
    pub(crate) fn memory_changed(&self) {
        if self.attached.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire) {
            self.kick.notify_one();
        }
    }

    /// Stops taking requests from the ring, waits for the ones in flight
    /// and publishes their completions; returns the base the ring stopped
    /// at (the last one's, if it was stopped already). Blocks the calling
    /// thread.
    pub(crate) fn stop(&self) -> Option<u16> {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.cmds.send(Cmd::Stop(tx)).is_err() {
            return None;
        }
        match rx.recv_timeout(DRAIN_TIMEOUT) {
            Ok(base) => base,
            Err(_) => {
                error!(
                    queue = self.index,
                    "requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway"
                );
                None
            }
        }
    }

    /// Starts no ring ever again, and drains the one it serves: the first
    /// step of stopping the daemon, taken while the frontend is still
    /// connected so it sees every request it handed over complete.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop();
    }

    /// Ends the queue's worker (after stopping its ring). Its thread ends
    /// once every queue it serves has been told to exit: see
    /// [`QueueHandle::join`].
    pub(crate) fn exit(&self) {
        self.stop();
        let _ = self.cmds.send(Cmd::Exit);
    }

    /// Waits for the worker thread to end (after [`QueueHandle::exit`] of
    /// every queue it serves).
    pub(crate) fn join(&self) {
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

struct Worker {
    index: usize,
    device: Arc<Device>,
    kick: Arc<Notify>,
    attached: Arc<AtomicBool>,
}

impl Worker {
    async fn run(self, mut cmds: mpsc::UnboundedReceiver<Cmd>, pinning: Rc<RefCell<Pinning>>) {
        let mut queue: Option<Rc<Queue>> = None;
        // The base of the ring last stopped, for a stop asked twice (the
        // daemon's close, then the frontend's GET_VRING_BASE).
        let mut last_base: Option<u16> = None;
        loop {
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Start(start)) => {
                        if let Some(q) = queue.take() {
                            q.drain().await;
                        }
                        queue = self.start(*start, &pinning);
                        last_base = None;
                    }
                    Some(Cmd::Stop(ack)) => {
                        if let Some(q) = queue.take() {
                            q.drain().await;
                            last_base = Some(q.ring.borrow().next_avail());
                            debug!(queue = self.index, "ring stopped");
                        }
                        self.attached.store(false, Ordering::Release);
                        let _ = ack.send(last_base);
                    }
                    Some(Cmd::Exit) | None => break,
                },
                () = self.kick.notified() => {
                    if let Some(q) = &queue {
                        q.process();
                    }
                }
            }
        }
    }

    fn start(&self, s: RingStart, pinning: &Rc<RefCell<Pinning>>) -> Option<Rc<Queue>> {
        let RingStart {
            layout,
            event_idx,
            base,
            inflight,
            kick,
            call,
            mem,
            pins,
            log,
        } = s;
        let snapshot = mem.memory().into_inner();
        let (ring, recovery) = match SplitRing::start(layout, event_idx, base, inflight, &snapshot)
        {
            Ok(r) => r,
            Err(e) => {
                warn!(queue = self.index, "ring not started: {e}");
                return None;
            }
        };
        let q = Rc::new(Queue::new(
            self.index,
            ring,
            mem,
            call,
            self.device.clone(),
            self.kick.clone(),
            pinning.clone(),
            pins,
            log,
        ));
        tokio::task::spawn_local(q.clone().completer());
        // SAFETY: the AsyncFd owns `kick` (our own duplicate of the kick
        // eventfd), which stays open and unchanged until the AsyncFd drops.
        let watched = unsafe { AsyncFd::register_with_interest(kick, Interest::READABLE) }
            .map_err(std::io::Error::from);
        match watched {
            Ok(afd) => {
                tokio::task::spawn_local(q.clone().watch_kicks(afd));
            }
            Err(e) => warn!(queue = self.index, "cannot watch the kick fd: {e}"),
        }
        debug!(queue = self.index, base, "ring started");
        if let Some(r) = recovery.filter(|r| r.resumed) {
            info!(
                queue = self.index,
                resubmitted = r.resubmit.len(),
                used_head_cleared = r.cleared_last,
                "ring resumed from the inflight region"
            );
            let limits = q.limits();
            for head in r.resubmit {
                q.start_chain(head, &snapshot, &limits);
            }
            // In case the old backend died between publishing a used
            // entry and notifying the guest.
            q.call.signal();
        }
        // Kicks sent before the ring started found nobody watching.
        q.process();
        Some(q)
    }
}

/// A ring being served.
struct Queue {
    index: usize,
    ring: RefCell<SplitRing>,
    mem: GuestMemoryAtomic<Mem>,
    call: Arc<Call>,
    device: Arc<Device>,
    kick: Arc<Notify>,
    inflight: Cell<usize>,
    /// Popping paused because `inflight` reached the queue size.
    throttled: Cell<bool>,
    /// Set by `drain`: pop nothing more.
    stopped: Cell<bool>,
    /// The ring contradicted itself or left guest memory: take nothing
    /// more from it until it is started again.
    broken: Cell<bool>,
    idle: Notify,
    done: RefCell<Vec<(u16, u32)>>,
    done_wanted: Notify,
    /// Wakes the kick watcher when the ring stops.
    detached: Notify,
    /// Wakes requests waiting (held, or at a stopped device's gate) when
    /// the ring stops: they do not hold up its drain.
    released: Notify,
    bad_requests: Cell<u64>,
    /// Requests started on this queue (the order held requests are
    /// retried in).
    arrivals: Cell<u64>,
    /// Guest memory registered with this thread's ring (`--pin-guest-memory`),
    /// shared with the thread's other queues.
    pinning: Rc<RefCell<Pinning>>,
    /// The connection's pinning jobs, shared with its other queues.
    pins: Arc<SharedPins>,
    /// The connection's dirty-page log.
    log: Arc<DirtyLog>,
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: usize,
        ring: SplitRing,
        mem: GuestMemoryAtomic<Mem>,
        call: Arc<Call>,
        device: Arc<Device>,
        kick: Arc<Notify>,
        pinning: Rc<RefCell<Pinning>>,
        pins: Arc<SharedPins>,
        log: Arc<DirtyLog>,
    ) -> Self {
        pinning.borrow_mut().attach();
        Self {
            index,
            ring: RefCell::new(ring),
            mem,
            call,
            device,
            kick,
            inflight: Cell::new(0),
            throttled: Cell::new(false),
            stopped: Cell::new(false),
            broken: Cell::new(false),
            idle: Notify::new(),
            done: RefCell::new(Vec::new()),
            done_wanted: Notify::new(),
            detached: Notify::new(),
            released: Notify::new(),
            bad_requests: Cell::new(0),
            arrivals: Cell::new(0),
            pinning,
            pins,
            log,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            size: self.device.size(),
            readonly: self.device.config.readonly,
        }
    }

    /// The ring cannot be served any more (until it is started again).
    fn fail(&self, e: &RingError) {
        if !self.broken.replace(true) {
            error!(
                queue = self.index,
                "ring broken, not served until restarted: {e}"
            );
        }
    }

    /// Pops and starts every available request.
    fn process(self: &Rc<Self>) {
        if self.stopped.get() || self.broken.get() {
            return;
        }
        let queue_size = usize::from(self.ring.borrow().size());
        let limits = self.limits();
        if self.device.pin_memory {
            let mem = self.mem.memory().into_inner();
            self.pinning
                .borrow_mut()
                .update(&self.pins, self.index, &mem, &self.kick);
        }
        loop {
            let mem = self.mem.memory().into_inner();
            let disabled = self.ring.borrow_mut().disable_notification(&mem);
            if let Err(e) = disabled {
                self.fail(&e);
                return;
            }
            loop {
                if self.inflight.get() >= queue_size {
                    // Every head the guest can have outstanding is ours:
                    // continue once some complete.
                    self.throttled.set(true);
                    return;
                }
                // A fresh view of guest memory for every chain: the
                // frontend may add a region (and use it) while this loop
                // runs.
                let mem = self.mem.memory().into_inner();
                let popped = self.ring.borrow_mut().pop(&mem);
                match popped {
                    Ok(Some(head)) => self.start_chain(head, &mem, &limits),
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(&e);
                        return;
                    }
                }
            }
            let mem = self.mem.memory().into_inner();
            let enabled = self.ring.borrow_mut().enable_notification(&mem);
            match enabled {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.fail(&e);
                    return;
                }
            }
        }
    }

    /// Walks, parses and starts the chain at `head` (freshly popped, or
    /// resubmitted from the inflight area).
    fn start_chain(self: &Rc<Self>, head: u16, mem: &Arc<Mem>, limits: &Limits) {
        let (size, table) = {
            let ring = self.ring.borrow();
            (ring.size(), ring.layout().desc)
        };
        if head >= size {
            // No used entry can name it: the driver's bug stays its own.
            self.log_bad(&format!("head {head} outside the queue of {size}"));
            return;
        }
        let parsed = match chain::walk(mem, table, size, head) {
            Ok(descs) => request::parse(&descs, mem, limits),
            Err(e) => Parsed::Broken { why: e.to_string() },
        };
        self.start(head, parsed, mem);
    }

    fn log_bad(&self, why: &str) {
        let n = self.bad_requests.get();
        self.bad_requests.set(n + 1);
        if n < 16 || n % BAD_REQUEST_LOG_EVERY == 0 {
            warn!(
                queue = self.index,
                count = n + 1,
                "bad request from the guest: {why}"
            );
        }
    }

    fn start(self: &Rc<Self>, head: u16, parsed: Parsed, mem: &Mem) {
        self.inflight.set(self.inflight.get() + 1);
        let stats = &self.device.queue_stats[self.index];
        stats.started();
        match parsed {
            Parsed::Request(r) => {
                let q = self.clone();
                let arrival = (self.arrivals.replace(self.arrivals.get() + 1), self.index);
                tokio::task::spawn_local(async move {
                    let began = crate::stats::clock();
                    let Some((code, id_len)) = q.run_request(&r, arrival).await else {
                        // Left unfinished to the frontend's inflight
                        // region: whoever serves the ring next runs it.
                        q.device.queue_stats[q.index].ended(None, 0, false, began);
                        q.abandon();
                        return;
                    };
                    let (kind, bytes) = accounting(&r.op);
                    q.device.queue_stats[q.index].ended(
                        kind,
                        bytes,
                        code == VIRTIO_BLK_S_OK as u8,
                        began,
                    );
                    let len = if r.mem.write_obj(code, r.status).is_ok() {
                        r.used_len(id_len)
                    } else {
                        0
                    };
                    if let Some(log) = q.log.active() {
                        mark_written(&log, &r);
                    }
                    q.complete(head, len);
                });
            }
            Parsed::Reject { status, code, why } => {
                self.log_bad(&why);
                stats.invalid();
                let len = u32::from(mem.write_obj(code, status).is_ok());
                if let Some(log) = self.log.active() {
                    log.mark(status.0, 1);
                }
                self.complete(head, len);
            }
            Parsed::Broken { why } => {
                self.log_bad(&why);
                stats.invalid();
                self.complete(head, 0);
            }
        }
    }

    /// Runs `r` (which arrived as `arrival`) through the gate and the disk
    /// until it succeeds or fails for good: the status and, for GET_ID,
    /// the bytes written. A failure the policy says to stop on holds the
    /// request outside the gate until `cont` retries it (`errors.rs`).
    /// `None` when the ring stops while the request waits (held, or at a
    /// stopped device's gate) and it is left to the inflight region.
    async fn run_request(&self, r: &Request, arrival: Arrival) -> Option<(u8, usize)> {
        let device = &self.device;
        let write = !matches!(r.op, Op::Read { .. });
        self.throttle(r).await;
        let mut retry = false;
        loop {
            let pass = if retry {
                device.gate.enter_retry().await
            } else {
                match self.pass_gate().await {
                    Some(pass) => pass,
                    None => return self.give_up(false),
                }
            };
            let result = execute(device, r).await;
            drop(pass);
            let e = match result {
                Ok(id_len) => return Some((VIRTIO_BLK_S_OK as u8, id_len)),
                Err(Failed::Guest) => return Some((VIRTIO_BLK_S_IOERR as u8, 0)),
                Err(Failed::Disk(e)) => e,
            };
            if device.io_error(&e, write) == Action::Report {
                return Some((VIRTIO_BLK_S_IOERR as u8, 0));
            }
            let sync_failed = Cause::of(&e) == Cause::SyncFailed;
            let mut ticket = device.run.hold(arrival, &device.gate, &device.events);
            loop {
                let released = self.released.notified();
                if self.stopped.get() {
                    drop(ticket);
                    return self.give_up(sync_failed);
                }
                tokio::select! {
                    () = ticket.retry() => break,
                    () = released => {}
                }
            }
            retry = true;
        }
    }

    /// Waits as long as the disk's I/O limits say (`throttle.rs`): reads,
    /// writes and write-zeroes. A ring stop ends the wait at once, as a
    /// drain in QEMU lets throttled requests go.
    async fn throttle(&self, r: &Request) {
        let write = match &r.op {
            Op::Read { .. } => false,
            Op::Write { .. } | Op::WriteZeroes { .. } => true,
            _ => return,
        };
        let bytes = accounting(&r.op).1;
        let Some(wait) = self.device.throttle.admit(write, bytes) else {
            return;
        };
        let until = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            if self.stopped.get() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                () = released => {}
            }
        }
    }

    /// Waits at the gate; `None` if the ring stops while the device is
    /// stopped (the gate may stay closed for ever).
    async fn pass_gate(&self) -> Option<crate::gate::Pass<'_>> {
        loop {
            let released = self.released.notified();
            let device_stopped = self.device.run.stop_notified();
            if self.stopped.get() && self.device.run.is_stopped() {
                return None;
            }
            tokio::select! {
                biased;
                pass = self.device.gate.enter() => return Some(pass),
                () = released => {}
                () = device_stopped => {}
            }
        }
    }

    /// What becomes of a request the ring stopped under while it waited
    /// (see `errors.rs`): left unfinished (`None`) where the frontend
    /// keeps an inflight region, to be run by whoever serves the ring
    /// next; failed where it keeps none (it would never complete), or
    /// when the request was held after a failed fdatasync (a retry on a
    /// fresh open of the image would report durable what was lost).
    fn give_up(&self, sync_failed: bool) -> Option<(u8, usize)> {
        let tracked = self.ring.borrow().tracks_inflight();
        if tracked && !sync_failed {
            debug!(
                queue = self.index,
                "ring stopped: a waiting request is left to the inflight region"
            );
            return None;
        }
        warn!(
            queue = self.index,
            "ring stopped while a request was held: failed (I/O error)"
        );
        Some((VIRTIO_BLK_S_IOERR as u8, 0))
    }

    /// A request left unfinished: no used entry, no longer in flight here.
    fn abandon(&self) {
        self.inflight.set(self.inflight.get() - 1);
        if self.inflight.get() == 0 {
            self.idle.notify_waiters();
        }
        if self.throttled.replace(false) {
            self.kick.notify_one();
        }
    }

    fn complete(&self, head: u16, len: u32) {
        self.done.borrow_mut().push((head, len));
        self.inflight.set(self.inflight.get() - 1);
        self.done_wanted.notify_one();
    }

    /// Publishes every finished request and notifies the guest if it wants.
    fn publish(&self) {
        let done = std::mem::take(&mut *self.done.borrow_mut());
        if done.is_empty() {
            return;
        }
        let mem = self.mem.memory().into_inner();
        let notify = {
            let mut ring = self.ring.borrow_mut();
            let pushed = ring.push_used_batch(&mem, &done);
            if let Some(log) = self.log.active() {
                let (at, len) = ring.layout().used_area();
                log.mark(at.0, len);
            }
            match pushed {
                Ok(()) => ring.needs_notification(&mem).unwrap_or(true),
                Err(e) => {
                    drop(ring);
                    self.fail(&e);
                    false
                }
            }
        };
        if notify {
            self.call.signal();
        }
        if self.inflight.get() == 0 {
            self.idle.notify_waiters();
        }
        if self.throttled.replace(false) {
            self.kick.notify_one();
        }
    }

    /// Runs as a local task: publishes completions in batches, after the
    /// other tasks that were ready in the same tick have finished.
    async fn completer(self: Rc<Self>) {
        loop {
            self.done_wanted.notified().await;
            if self.stopped.get() && self.inflight.get() == 0 && self.done.borrow().is_empty() {
                return;
            }
            self.publish();
        }
    }

    /// Runs as a local task: processes the ring on every kick, until the
    /// ring stops.
    ///
    /// It must end when the ring stops even though no kick will come (the
    /// frontend is gone): it holds the queue, and with it the kick and
    /// call eventfds and the whole guest memory mapping. It never reads
    /// the eventfd's counter (a blocking eventfd would block the thread
    /// when it is zero): every write to an eventfd is a new edge.
    async fn watch_kicks(self: Rc<Self>, fd: AsyncFd<File>) {
        loop {
            if self.stopped.get() {
                return;
            }
            let mut ready = tokio::select! {
                r = fd.readable() => match r {
                    Ok(ready) => ready,
                    Err(_) => return,
                },
                () = self.detached.notified() => return,
            };
            // Cleared before processing: a kick that arrives meanwhile
            // makes the fd ready again.
            ready.clear_ready();
            if self.stopped.get() {
                return;
            }
            self.process();
        }
    }

    async fn drain(&self) {
        self.stopped.set(true);
        // The kick watcher is parked in its select (tasks on this thread
        // run one at a time) or has not run yet and will see `stopped`.
        self.detached.notify_waiters();
        // Requests held after an error, or at the gate of a stopped
        // device, would wait for a `cont` that may never come.
        self.released.notify_waiters();
        loop {
            let idle = self.idle.notified();
            if self.inflight.get() == 0 {
                break;
            }
            idle.await;
        }
        self.publish();
        // The frontend's memory is not to stay mapped (or pinned) after
        // it leaves.
        self.pinning.borrow_mut().detach();
        // Let the completer task end.
        self.done_wanted.notify_one();
    }
}

/// Guest memory runs as the engine takes them (one keep-alive clone each:
/// the count is shared by every queue thread).
fn guest_slices(r: &Request, bufs: &[IoSeg]) -> Vec<GuestSlice> {
    bufs.iter()
        .map(|b| {
            // SAFETY: the parser mapped each run inside guest memory, and
            // `r.mem` (so the clone given here) keeps that memory mapped.
            // Runs may overlap and the guest may touch them: GuestSlice
            // never forms a reference over them.
            unsafe { GuestSlice::new(b.ptr, b.len, r.mem.clone()) }
        })
        .collect()
}

/// What a request counts as in the statistics, and its bytes.
fn accounting(op: &Op) -> (Option<crate::stats::Kind>, u64) {
    use crate::stats::Kind;
    match op {
        Op::Read { bufs, .. } => (Some(Kind::Read), bufs.iter().map(|b| b.len as u64).sum()),
        Op::Write { bufs, .. } => (Some(Kind::Write), bufs.iter().map(|b| b.len as u64).sum()),
        Op::Flush => (Some(Kind::Flush), 0),
        Op::Discard { len, .. } => (Some(Kind::Discard), *len),
        Op::WriteZeroes { len, .. } => (Some(Kind::WriteZeroes), *len),
        Op::GetId { .. } => (None, 0),
    }
}

/// Why a request failed.
enum Failed {
    /// Guest memory could not take the answer (GET_ID).
    Guest,
    /// The disk failed it: the error policy decides (`errors.rs`).
    Disk(crate::disk::DiskError),
}

/// Runs one request against the disk once; for GET_ID, returns the bytes
/// written.
async fn execute(device: &Device, r: &Request) -> Result<usize, Failed> {
    let disk = device.disk_for_request();
    // The gate holds requests while the daemon is inactive: none gets here
    // then, but an error is the answer if one did.
    let Some(disk) = disk.as_deref() else {
        return Err(Failed::Disk(crate::disk::DiskError::Inactive));
    };
    let result = match &r.op {
        Op::Read { offset, bufs } => {
            let mut out = guest_slices(r, bufs);
            if out.len() == 1 {
                disk.read_guest(*offset, out.remove(0)).await
            } else {
                let mut at = *offset;
                let reads = out.into_iter().map(|s| {
                    let o = at;
                    at += s.len() as u64;
                    disk.read_guest(o, s)
                });
                futures_util::future::join_all(reads)
                    .await
                    .into_iter()
                    .collect()
            }
        }
        Op::Write { offset, bufs } => {
            let mut data = guest_slices(r, bufs);
            if data.len() == 1 {
                disk.write_guest(*offset, data.remove(0)).await
            } else {
                // Scattered guest pages: gathered so the engine sees one
                // write (and allocates whole clusters without copy-on-write).
                let whole: Vec<u8> = data.iter().flat_map(GuestSlice::to_vec).collect();
                disk.write(*offset, &whole).await
            }
        }
        Op::Flush => {
            if device.config.readonly {
                Ok(())
            } else {
                Box::pin(disk.flush()).await
            }
        }
        Op::GetId { dst } => {
            let mut id = device.serial.as_slice();
            let mut written = 0;
            for &(addr, len) in dst {
                let mut chunk = vec![0u8; len];
                let n = id.len().min(len);
                chunk[..n].copy_from_slice(&id[..n]);
                id = &id[n..];
                if r.mem.write_slice(&chunk, addr).is_err() {
                    return Err(Failed::Guest);
                }
                written += len;
            }
            return Ok(written);
        }
        // Rare operations with large futures: boxed, so that every request
        // task does not carry their state.
        Op::Discard { offset, len } => Box::pin(disk.discard(*offset, *len)).await,
        Op::WriteZeroes { offset, len, unmap } => {
            Box::pin(disk.write_zeroes(*offset, *len, *unmap)).await
        }
    };
    // A commit copying the disk down copies what changed again (a failed
    // request too: part of it may have landed).
    match &r.op {
        Op::Write { offset, .. } => device.guest_changed(*offset, accounting(&r.op).1),
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            device.guest_changed(*offset, *len);
        }
        _ => {}
    }
    // A write-through cache (the guest's choice through CONFIG_WCE, or a
    // driver without FLUSH): data is durable before the request completes.
    let writes = matches!(r.op, Op::Write { .. } | Op::WriteZeroes { .. });
    let result = match result {
        Ok(()) if writes && !device.writeback() => Box::pin(disk.flush()).await,
        result => result,
    };
    result.map(|()| 0).map_err(Failed::Disk)
}

/// Marks in the dirty log every guest page request `r` may have written:
/// its status byte, and the data it read (a failed read too: part of it
/// may have landed) or the serial.
fn mark_written(log: &LogMap, r: &Request) {
    log.mark(r.status.0, 1);
    match &r.op {
        Op::Read { bufs, .. } => {
            for b in bufs {
                if let Some(gpa) = gpa_of_host(&r.mem, b.ptr, b.len) {
                    log.mark(gpa, b.len as u64);
                }
            }
        }
        Op::GetId { dst } => {
            for &(addr, len) in dst {
                log.mark(addr.0, len as u64);
            }
        }
        Op::Write { .. } | Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => {}
    }
}

/// The guest physical address of host pointer `ptr` (a request's buffer
/// of `len` bytes, mapped from one region).
fn gpa_of_host(mem: &Mem, ptr: *mut u8, len: usize) -> Option<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    let p = ptr as usize;
    mem.iter().find_map(|region| {
        let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
        let size = region.len() as usize;
        (p >= base && p + len <= base + size).then(|| region.start_addr().0 + (p - base) as u64)
    })
}
