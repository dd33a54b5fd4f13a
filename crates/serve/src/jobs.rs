//! Live block jobs: `block-commit` and `block-stream` while the guest
//! runs, and the job life cycle QEMU's QMP clients drive (`query-jobs`,
//! `job-complete`, `job-cancel`, `job-dismiss`, their `block-job-*`
//! forms, and the events).
//!
//! Each job copies on a thread of its own through the engine (its own
//! io_uring ring) while the queue workers serve the guest; the switches
//! between images happen with the guest's requests held at the gate
//! ([`Device::switch_disk`]).
//!
//! - **Commit** (the active image `top` into a layer `base` below it). At
//!   the start the device switches to `top` opened again over `base`
//!   opened for writing, shared by the chain (`OpenOptions::shared_layers`):
//!   the guest reads through the very image the job writes, so no cache
//!   of it goes stale. Every range some layer above `base` allocates is
//!   read as the guest sees it and written into `base`; the guest's writes
//!   meanwhile are recorded ([`Dirty`], marked once each write is done
//!   with the disk) and copied again. Once a pass leaves little (or after
//!   a few passes) the job is `ready` (`BLOCK_JOB_READY`); `job-complete`
//!   copies on until little is left, then holds the guest, copies the
//!   rest, makes `base` durable and switches the device to it. `top` is left as it was, consistent; a cancelled job
//!   switches back to `top` over a read-only chain, and `base` holds a
//!   partial copy of data `top` hides.
//! - **Stream** (the layers above `base` into the active image). Every
//!   range the image does not allocate and a layer above `base` does is
//!   copied up with [`Image::populate`], under the engine's cluster locks
//!   (a guest write to the same place wins). At the end, with the guest
//!   held, the header names `base` (or no backing file) and the device
//!   switches to the image opened over its new chain. A cancelled stream
//!   leaves copies that read as what they replaced.
//!
//! One job at a time; external snapshots, resizes, hand-overs and NBD
//! exports wait until it ends (they would change the chain under it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use qblk_engine::Image;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::device::{Device, OpenTarget, Opener};
use crate::disk::Disk;
use crate::lock;

/// The unit a job copies in.
const CHUNK: u64 = 1 << 20;

/// A commit is ready once a pass over what the guest wrote leaves no more
/// than this to copy: what `job-complete` copies with the guest held is
/// then this and what the guest writes until then.
const READY_BACKLOG: u64 = 4 << 20;

/// Passes over the guest's writes after which a commit that never gets
/// down to [`READY_BACKLOG`] is ready all the same.
const READY_PASSES: u32 = 3;

/// How long `job-complete` keeps copying with the guest running, to get
/// down to [`READY_BACKLOG`] before it holds the guest for the rest.
const CONVERGE: Duration = Duration::from_secs(5);

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Commit,
    Stream,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Stream => "stream",
        }
    }
}

/// QEMU's job states, those a qblk job passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Ready,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Ready => "ready",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }
}

/// One job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub kind: Kind,
    /// Bytes done and to do, as QEMU counts progress (the total grows
    /// when the guest writes what a commit had copied).
    done: AtomicU64,
    total: AtomicU64,
    /// Bytes per second, 0 for no limit.
    speed: AtomicU64,
    auto_dismiss: bool,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug)]
struct State {
    status: Status,
    /// `job-complete` was asked for.
    complete: bool,
    /// `job-cancel` was asked for.
    cancel: bool,
    error: Option<String>,
}

impl Job {
    fn new(id: String, kind: Kind, speed: u64, auto_dismiss: bool, total: u64) -> Self {
        Self {
            id,
            kind,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            speed: AtomicU64::new(speed),
            auto_dismiss,
            state: Mutex::new(State {
                status: Status::Created,
                complete: false,
                cancel: false,
                error: None,
            }),
            wake: Condvar::new(),
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    fn set_status(&self, device: &Device, status: Status) {
        lock(&self.state).status = status;
        self.wake.notify_all();
        device.events.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": status.as_str()}),
        );
    }

    fn cancelled(&self) -> bool {
        lock(&self.state).cancel
    }

    /// `query-jobs`' entry.
    pub fn to_json(&self) -> Value {
        let s = lock(&self.state);
        let mut v = json!({
            "id": self.id,
            "type": self.kind.as_str(),
            "status": s.status.as_str(),
            "current-progress": self.done.load(Ordering::Relaxed),
            "total-progress": self.total.load(Ordering::Relaxed),
        });
        if let Some(e) = &s.error {
            v["error"] = json!(e);
        }
        v
    }

    /// `query-block-jobs`' entry.
    pub fn to_block_json(&self) -> Value {
        let s = lock(&self.state);
        json!({
            "type": self.kind.as_str(),
            "device": self.id,
            "len": self.total.load(Ordering::Relaxed),
            "offset": self.done.load(Ordering::Relaxed),
            "busy": matches!(s.status, Status::Running),
            "paused": false,
            "speed": self.speed.load(Ordering::Relaxed),
            "io-status": "ok",
            "ready": s.status == Status::Ready,
            "status": s.status.as_str(),
            "auto-finalize": true,
            "auto-dismiss": self.auto_dismiss,
        })
    }

    /// The fields of the `BLOCK_JOB_*` events.
    fn event(&self) -> Value {
        json!({
            "type": self.kind.as_str(),
            "device": self.id,
            "len": self.total.load(Ordering::Relaxed),
            "offset": self.done.load(Ordering::Relaxed),
            "speed": self.speed.load(Ordering::Relaxed),
        })
    }

    /// Waits until `until` passes, or a completion or cancellation is
    /// asked for.
    fn nap(&self, until: Instant) {
        let mut s = lock(&self.state);
        while !s.cancel && !s.complete {
            let now = Instant::now();
            if now >= until {
                return;
            }
            s = self
                .wake
                .wait_timeout(s, until - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// The device's jobs.
#[derive(Debug, Default)]
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
}

impl Jobs {
    pub fn list(&self) -> Vec<Arc<Job>> {
        lock(&self.list).clone()
    }

    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.list).iter().find(|j| j.id == id).cloned()
    }

    /// Whether a job has not yet concluded: the chain is its.
    pub fn busy(&self) -> bool {
        lock(&self.list)
            .iter()
            .any(|j| !matches!(j.status(), Status::Concluded | Status::Null))
    }

    /// Refuses what would change the chain under a running job.
    pub fn refuse_if_busy(&self, what: &str) -> Result<(), String> {
        match lock(&self.list)
            .iter()
            .find(|j| !matches!(j.status(), Status::Concluded | Status::Null))
        {
            Some(j) => Err(format!(
                "block job '{}' is running: {what} once it has ended",
                j.id
            )),
            None => Ok(()),
        }
    }

    fn remove(&self, id: &str) {
        lock(&self.list).retain(|j| j.id != id);
    }

    /// `job-complete`: a ready commit switches to its base.
    pub fn complete(&self, id: &str) -> Result<(), String> {
        let job = self.find(id).ok_or_else(|| no_job(id))?;
        let mut s = lock(&job.state);
        if s.status != Status::Ready {
            return Err(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'complete'",
                s.status.as_str()
            ));
        }
        s.complete = true;
        drop(s);
        job.wake.notify_all();
        Ok(())
    }

    /// `job-cancel`.
    pub fn cancel(&self, id: &str) -> Result<(), String> {
        let job = self.find(id).ok_or_else(|| no_job(id))?;
        let mut s = lock(&job.state);
        if matches!(
            s.status,
            Status::Concluded | Status::Null | Status::Aborting | Status::Pending | Status::Waiting
        ) {
            return Err(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'cancel'",
                s.status.as_str()
            ));
        }
        s.cancel = true;
        drop(s);
        job.wake.notify_all();
        Ok(())
    }

    /// `job-dismiss`: forgets a concluded job.
    pub fn dismiss(&self, device: &Device, id: &str) -> Result<(), String> {
        let job = self.find(id).ok_or_else(|| no_job(id))?;
        if job.status() != Status::Concluded {
            return Err(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                job.status().as_str()
            ));
        }
        job.set_status(device, Status::Null);
        self.remove(id);
        Ok(())
    }

    /// Cancels every job and waits, at most `timeout`, until each has
    /// ended: a daemon that stops leaves no image a job opened behind
    /// unclosed.
    pub fn cancel_all(&self, timeout: Duration) {
        let jobs = self.list();
        for job in &jobs {
            lock(&job.state).cancel = true;
            job.wake.notify_all();
        }
        let deadline = Instant::now() + timeout;
        for job in jobs {
            let mut s = lock(&job.state);
            while !matches!(s.status, Status::Concluded | Status::Null) {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    warn!(id = job.id, "block job still running at the stop");
                    break;
                };
                s = job
                    .wake
                    .wait_timeout(s, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, id: &str, speed: u64) -> Result<(), String> {
        let job = self.find(id).ok_or_else(|| no_job(id))?;
        job.speed.store(speed, Ordering::Relaxed);
        job.wake.notify_all();
        Ok(())
    }
}

fn no_job(id: &str) -> String {
    format!("Job '{id}' not found")
}

/// The ranges the guest changed while a commit copies: one bit per
/// `granularity` bytes, set once a guest write, write-zeroes or discard is
/// done with the disk — so a range the job copied before the guest's
/// change landed is always copied again.
#[derive(Debug)]
pub struct Dirty {
    granularity: u64,
    bits: Vec<AtomicU64>,
}

impl Dirty {
    /// Tracks a disk of `size` bytes: 64 KiB per bit, or coarser so the
    /// map stays within 2 MiB.
    pub fn new(size: u64) -> Self {
        let granularity = (size >> 24).next_power_of_two().max(64 << 10);
        let chunks = size.div_ceil(granularity);
        Self {
            granularity,
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1) / self.granularity;
        for c in first..=last {
            if let Some(word) = self.bits.get((c / 64) as usize) {
                word.fetch_or(1 << (c % 64), Ordering::AcqRel);
            }
        }
    }

    /// Clears and returns the first run of marked granules at or after
    /// `from`, at most `max` bytes (offset and length, cut at `size`).
    fn take(&self, from: u64, size: u64, max: u64) -> Option<(u64, u64)> {
        let first = self.next_marked(from / self.granularity)?;
        let at = first * self.granularity;
        if at >= size {
            return None;
        }
        let mut c = first;
        let mut len = 0;
        while len < max && c * self.granularity < size && self.clear(c) {
            len += self.granularity.min(size - c * self.granularity);
            c += 1;
        }
        Some((at, len))
    }

    /// The first marked granule at or after `start`.
    fn next_marked(&self, start: u64) -> Option<u64> {
        let mut w = (start / 64) as usize;
        let mut mask = !0u64 << (start % 64);
        while let Some(word) = self.bits.get(w) {
            let v = word.load(Ordering::Acquire) & mask;
            if v != 0 {
                return Some(w as u64 * 64 + u64::from(v.trailing_zeros()));
            }
            w += 1;
            mask = !0;
        }
        None
    }

    /// Clears granule `c`; whether it was marked.
    fn clear(&self, c: u64) -> bool {
        let bit = 1u64 << (c % 64);
        self.bits
            .get((c / 64) as usize)
            .is_some_and(|w| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// How many bytes are marked.
    fn count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum::<u64>()
            * self.granularity
    }
}

/// What a new job is asked to do, checked.
#[derive(Debug)]
pub struct Plan {
    pub id: String,
    pub kind: Kind,
    /// Depth of the base in the active image's chain; `None` for a stream
    /// to the bottom (no backing file left).
    pub base: Option<u32>,
    /// The base's file and format (a commit switches to it).
    pub base_file: Option<(PathBuf, crate::Format)>,
    /// What the stream writes into the header as the new backing file.
    pub backing_name: Option<String>,
    pub speed: u64,
    pub auto_dismiss: bool,
}

/// Starts a job: for a commit, switches the device to the active image
/// over its base opened for writing first (with the guest held), so an
/// error there is the command's answer. The caller holds the device's
/// admin lock.
pub fn start(device: &Arc<Device>, open: &Opener, plan: Plan) -> Result<(), String> {
    device.jobs.refuse_if_busy("start another")?;
    if device.jobs.find(&plan.id).is_some() {
        return Err(format!("Job ID '{}' already in use", plan.id));
    }
    let disk = device
        .disk()
        .ok_or_else(|| "the daemon is inactive".to_string())?;
    let size = disk.size();
    drop(disk);
    let job = Arc::new(Job::new(
        plan.id.clone(),
        plan.kind,
        plan.speed,
        plan.auto_dismiss,
        size,
    ));
    let base = match plan.kind {
        Kind::Commit => Some(open_commit(device, open, &plan)?),
        Kind::Stream => None,
    };
    let undo = base.as_ref().map(|(b, _)| b.clone());
    lock(&device.jobs.list).push(job.clone());
    job.set_status(device, Status::Created);
    let id = plan.id.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("qblk-job-{id}"))
        .spawn({
            let (device, open, job) = (device.clone(), open.clone(), job.clone());
            move || run(&device, &open, &job, &plan, base)
        });
    if let Err(e) = spawned {
        device.jobs.remove(&id);
        if let Some(b) = undo {
            if let Err(e) = leave_commit(device, open, &b) {
                warn!("{e}");
            }
        }
        return Err(format!("cannot start the job's thread: {e}"));
    }
    Ok(())
}

/// Switches the device to the active image over its base opened for
/// writing; returns the base and the record of the guest's writes.
fn open_commit(
    device: &Device,
    open: &Opener,
    plan: &Plan,
) -> Result<(Arc<Image>, Arc<Dirty>), String> {
    let (base_path, base_format) = plan.base_file.clone().expect("a commit has a base");
    if base_format != crate::Format::Qcow2 {
        return Err("committing into a raw base is not supported: convert it to qcow2".into());
    }
    let top = device.open_target();
    let size = device.size();
    let held = device.hold_guest().map_err(|e| format!("{e}; no commit"))?;
    let dirty = Arc::new(Dirty::new(size));
    let mut opened: Option<Arc<Image>> = None;
    device.switch_disk(
        held,
        || {
            let base = open_image(
                open,
                OpenTarget {
                    path: base_path.clone(),
                    format: base_format,
                    trusted_dirs: top.trusted_dirs.clone(),
                    shared: Vec::new(),
                },
            )?;
            if base.size() < size {
                // The top grew past the base: the base grows with it, as
                // QEMU's commit does.
                qblk_engine::runtime::block_on(base.resize(size))
                    .map_err(|e| format!("cannot grow the base: {}", crate::error_chain(&e)))?;
            }
            let disk = open(&OpenTarget {
                path: top.path.clone(),
                format: top.format,
                trusted_dirs: top.trusted_dirs.clone(),
                shared: vec![base.clone()],
            });
            match disk {
                Ok(disk) => {
                    // From here on every guest write is recorded: the
                    // guest is still held.
                    device.start_mirror(dirty.clone());
                    opened = Some(base);
                    Ok(disk)
                }
                Err(e) => {
                    close_image(&base);
                    Err(e)
                }
            }
        },
        || open(&device.open_target()),
    )?;
    let base = opened.expect("opened when the switch succeeded");
    Ok((base, dirty))
}

/// Opens a qcow2 image for writing with the daemon's options.
fn open_image(open: &Opener, target: OpenTarget) -> Result<Arc<Image>, String> {
    match open(&target)? {
        Disk::Qcow2(img) => Ok(Arc::new(img)),
        Disk::Raw(_) => Err(format!("{} is not a qcow2 image", target.path.display())),
    }
}

/// Closes an image a job opened, and lets go of its locks.
fn close_image(img: &Image) {
    if let Err(e) = qblk_engine::runtime::block_on(img.close()) {
        warn!("{}: {}", img.path().display(), crate::error_chain(&e));
    }
    if let Err(e) = img.release_locks() {
        warn!("{}", crate::error_chain(&e));
    }
}

/// How a job ended.
enum End {
    Completed,
    Cancelled,
    Failed(String),
}

fn run(
    device: &Device,
    open: &Opener,
    job: &Job,
    plan: &Plan,
    base: Option<(Arc<Image>, Arc<Dirty>)>,
) {
    job.set_status(device, Status::Running);
    info!(id = job.id, kind = job.kind.as_str(), "block job running");
    let end = match base {
        Some((base, dirty)) => run_commit(device, open, job, plan, &base, &dirty),
        None => run_stream(device, open, job, plan),
    };
    conclude(device, job, end);
}

/// Ends a job: its final state first (and the job gone from the list
/// with `auto-dismiss`), then the events of every step in QEMU's order,
/// so a client that acts on an event finds the job as QEMU would show it
/// then (QEMU makes these steps in one go of its main loop).
fn conclude(device: &Device, job: &Job, end: End) {
    let status_event = |s: Status| {
        (
            "JOB_STATUS_CHANGE",
            json!({"id": job.id, "status": s.as_str()}),
        )
    };
    let mut events = Vec::new();
    let error = match end {
        End::Completed => {
            info!(id = job.id, "block job completed");
            events.push(status_event(Status::Waiting));
            events.push(status_event(Status::Pending));
            events.push(("BLOCK_JOB_COMPLETED", job.event()));
            None
        }
        End::Cancelled => {
            info!(id = job.id, "block job cancelled");
            events.push(status_event(Status::Aborting));
            events.push(("BLOCK_JOB_CANCELLED", job.event()));
            None
        }
        End::Failed(e) => {
            warn!(id = job.id, "block job failed: {e}");
            events.push(status_event(Status::Aborting));
            let mut ev = job.event();
            ev["error"] = json!(e);
            events.push(("BLOCK_JOB_COMPLETED", ev));
            Some(e)
        }
    };
    events.push(status_event(Status::Concluded));
    let last = if job.auto_dismiss {
        events.push(status_event(Status::Null));
        Status::Null
    } else {
        Status::Concluded
    };
    {
        let mut s = lock(&job.state);
        s.status = last;
        s.error = error;
    }
    if job.auto_dismiss {
        device.jobs.remove(&job.id);
    }
    job.wake.notify_all();
    for (name, data) in events {
        device.events.emit(name, data);
    }
}

/// Keeps a job at its speed: after `bytes` more, waits until the limit
/// allows them.
struct Pace {
    began: Instant,
    bytes: u64,
}

impl Pace {
    fn new() -> Self {
        Self {
            began: Instant::now(),
            bytes: 0,
        }
    }

    fn after(&mut self, job: &Job, bytes: u64) {
        self.bytes += bytes;
        let speed = job.speed.load(Ordering::Relaxed);
        if speed == 0 {
            return;
        }
        let due = self.began + Duration::from_secs_f64(self.bytes as f64 / speed as f64);
        job.nap(due);
    }
}

fn active_image(disk: &Disk) -> Result<&Image, String> {
    match disk {
        Disk::Qcow2(img) if img.is_writable() => Ok(img),
        _ => Err("the active image is no writable qcow2 image".into()),
    }
}

/// Copies what layers above `base` allocate in `[pos, pos + len)` from
/// what the guest sees of `top` into `base`; returns the bytes copied.
fn copy_down(top: &Image, base: &Image, depth: u32, pos: u64, len: u64) -> Result<u64, String> {
    let err = |e: qblk_engine::Error| crate::error_chain(&e);
    qblk_engine::runtime::block_on(async {
        let mut at = pos;
        let mut copied = 0;
        while at < pos + len {
            let (_, above, n) = top
                .allocation_above(Some(depth), at, pos + len - at)
                .await
                .map_err(err)?;
            if n == 0 {
                break;
            }
            if above {
                let mut buf = vec![0u8; n as usize];
                top.read(at, &mut buf).await.map_err(err)?;
                base.write(at, &buf).await.map_err(err)?;
                copied += n;
            }
            at += n;
        }
        Ok(copied)
    })
}

fn run_commit(
    device: &Device,
    open: &Opener,
    job: &Job,
    plan: &Plan,
    base: &Arc<Image>,
    dirty: &Dirty,
) -> End {
    let depth = plan.base.expect("a commit has a base");
    let Some(disk) = device.disk() else {
        return abandon_commit(device, open, base, "the daemon became inactive".into());
    };
    let size = disk.size();
    let top = match active_image(&disk) {
        Ok(t) => t,
        Err(e) => return abandon_commit(device, open, base, e),
    };
    let mut pace = Pace::new();
    // The first pass: everything above the base.
    let mut pos = 0;
    while pos < size {
        if job.cancelled() {
            drop(disk);
            return cancel_commit(device, open, base);
        }
        let n = CHUNK.min(size - pos);
        match copy_down(top, base, depth, pos, n) {
            Ok(copied) => pace.after(job, copied),
            Err(e) => {
                drop(disk);
                return abandon_commit(device, open, base, e);
            }
        }
        pos += n;
        job.done.fetch_add(n, Ordering::Relaxed);
    }
    // Then what the guest wrote meanwhile, until nothing is left; ready
    // from then on, copying what the guest writes until told to finish.
    let mut ready = false;
    let mut passes = 0;
    loop {
        let mut from = 0;
        while let Some((at, n)) = dirty.take(from, size, CHUNK) {
            job.total.fetch_add(n, Ordering::Relaxed);
            match copy_down(top, base, depth, at, n) {
                Ok(copied) => pace.after(job, copied),
                Err(e) => {
                    drop(disk);
                    return abandon_commit(device, open, base, e);
                }
            }
            job.done.fetch_add(n, Ordering::Relaxed);
            from = at + n;
            if job.cancelled() {
                break;
            }
        }
        if job.cancelled() {
            drop(disk);
            return cancel_commit(device, open, base);
        }
        passes += 1;
        // In sync once a pass leaves little; a guest that writes faster
        // than the copy keeps up never leaves little, and after a few
        // passes the job is ready anyway (`job-complete` then first copies
        // with the guest running until little is left, for a while).
        if !ready && (dirty.count() <= READY_BACKLOG || passes >= READY_PASSES) {
            ready = true;
            job.set_status(device, Status::Ready);
            device.events.emit("BLOCK_JOB_READY", job.event());
            info!(
                id = job.id,
                "commit ready: job-complete switches to the base"
            );
        }
        if ready && lock(&job.state).complete {
            let until = Instant::now() + CONVERGE;
            while dirty.count() > READY_BACKLOG && Instant::now() < until && !job.cancelled() {
                let Some((at, n)) = dirty.take(0, size, CHUNK) else {
                    break;
                };
                if let Err(e) = copy_down(top, base, depth, at, n) {
                    drop(disk);
                    return abandon_commit(device, open, base, e);
                }
            }
            drop(disk);
            return complete_commit(device, open, plan, base, dirty, depth);
        }
        job.nap(Instant::now() + Duration::from_millis(20));
    }
}

/// `job-complete` of a commit: the guest held, the rest copied, the base
/// made durable and served.
fn complete_commit(
    device: &Device,
    open: &Opener,
    plan: &Plan,
    base: &Arc<Image>,
    dirty: &Dirty,
    depth: u32,
) -> End {
    let _admin = device.admin();
    let held = match device.hold_guest() {
        Ok(h) => h,
        Err(e) => return abandon_commit_locked(device, open, base, format!("{e}; not switched")),
    };
    let Some(disk) = device.disk() else {
        return End::Failed("the daemon became inactive".into());
    };
    let size = disk.size();
    let copied = active_image(&disk).and_then(|top| {
        while let Some((at, n)) = dirty.take(0, size, CHUNK) {
            copy_down(top, base, depth, at, n)?;
        }
        qblk_engine::runtime::block_on(base.flush()).map_err(|e| crate::error_chain(&e))
    });
    drop(disk);
    if let Err(e) = copied {
        drop(held);
        return abandon_commit_locked(device, open, base, e);
    }
    device.stop_mirror();
    let (base_path, base_format) = plan.base_file.clone().expect("a commit has a base");
    let top = device.open_target();
    let switched = device.switch_disk(
        held,
        || {
            close_image(base);
            open(&OpenTarget {
                path: base_path.clone(),
                format: base_format,
                trusted_dirs: top.trusted_dirs.clone(),
                shared: Vec::new(),
            })
        },
        || open(&top),
    );
    match switched {
        Ok(()) => {
            device.set_image(&base_path, base_format);
            info!(base = %base_path.display(), "commit complete: the base is the active image");
            End::Completed
        }
        Err(e) => End::Failed(e),
    }
}

fn cancel_commit(device: &Device, open: &Opener, base: &Arc<Image>) -> End {
    let _admin = device.admin();
    match leave_commit(device, open, base) {
        Ok(()) => End::Cancelled,
        Err(e) => End::Failed(e),
    }
}

fn abandon_commit(device: &Device, open: &Opener, base: &Arc<Image>, why: String) -> End {
    let _admin = device.admin();
    abandon_commit_locked(device, open, base, why)
}

fn abandon_commit_locked(device: &Device, open: &Opener, base: &Arc<Image>, why: String) -> End {
    match leave_commit(device, open, base) {
        Ok(()) => End::Failed(why),
        Err(e) => End::Failed(format!("{why}; {e}")),
    }
}

/// Ends a commit without switching: the active image is opened again over
/// a read-only chain, the base closed.
fn leave_commit(device: &Device, open: &Opener, base: &Arc<Image>) -> Result<(), String> {
    device.stop_mirror();
    let held = device.hold_guest()?;
    let top = device.open_target();
    device.switch_disk(
        held,
        || {
            close_image(base);
            open(&top)
        },
        || open(&top),
    )
}

fn run_stream(device: &Device, open: &Opener, job: &Job, plan: &Plan) -> End {
    let Some(disk) = device.disk() else {
        return End::Failed("the daemon became inactive".into());
    };
    let size = disk.size();
    let top = match active_image(&disk) {
        Ok(t) => t,
        Err(e) => return End::Failed(e),
    };
    let mut pace = Pace::new();
    let mut pos = 0;
    while pos < size {
        if job.cancelled() {
            return End::Cancelled;
        }
        let n = CHUNK.min(size - pos);
        let copied = qblk_engine::runtime::block_on(async {
            let mut at = pos;
            let mut copied = 0;
            while at < pos + n {
                let (here, above, len) = top.allocation_above(plan.base, at, pos + n - at).await?;
                if len == 0 {
                    break;
                }
                if !here && above {
                    copied += top.populate(at, len).await?;
                }
                at += len;
            }
            Ok::<u64, qblk_engine::Error>(copied)
        });
        match copied {
            Ok(c) => pace.after(job, c),
            Err(e) => return End::Failed(crate::error_chain(&e)),
        }
        pos += n;
        job.done.fetch_add(n, Ordering::Relaxed);
    }
    drop(disk);
    // Everything above the base is in the image: it names the base now.
    let _admin = device.admin();
    let held = match device.hold_guest() {
        Ok(h) => h,
        Err(e) => return End::Failed(format!("{e}; the backing file is unchanged")),
    };
    let Some(disk) = device.disk() else {
        return End::Failed("the daemon became inactive".into());
    };
    let format = plan.base_file.as_ref().map(|(_, f)| f.as_str());
    let renamed = active_image(&disk).and_then(|top| {
        qblk_engine::runtime::block_on(top.set_backing_file(plan.backing_name.as_deref(), format))
            .map_err(|e| crate::error_chain(&e))
    });
    drop(disk);
    if let Err(e) = renamed {
        return End::Failed(e);
    }
    let target = device.open_target();
    match device.switch_disk(held, || open(&target), || open(&target)) {
        Ok(()) => {
            info!(
                backing = plan.backing_name.as_deref().unwrap_or("none"),
                "stream complete"
            );
            End::Completed
        }
        Err(e) => End::Failed(e),
    }
}

/// The name a header gives `base` as the backing file of `image`: its file
/// name when both lie in one directory, else its absolute path.
pub fn backing_name(image: &Path, base: &Path) -> String {
    let dir = |p: &Path| {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
    };
    let real = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned());
    match (dir(image), dir(base), real.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
        _ => real.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_chunks_come_back_once_each_in_order() {
        let g = 64 << 10;
        let d = Dirty::new(1 << 30);
        assert_eq!(d.take(0, 1 << 30, g), None);
        d.mark(100, 1);
        d.mark(g * 70 + 5, 200 << 10);
        assert_eq!(d.count(), 5 * g);
        assert_eq!(d.take(0, 1 << 30, 1 << 20), Some((0, g)));
        // A run of marked granules comes back as one, up to the limit.
        assert_eq!(d.take(0, 1 << 30, 2 * g), Some((70 * g, 2 * g)));
        assert_eq!(d.take(0, 1 << 30, 1 << 20), Some((72 * g, 2 * g)));
        assert_eq!(d.take(0, 1 << 30, 1 << 20), None);
        assert_eq!(d.count(), 0);
        // The last granule is cut at the disk's end.
        let small = Dirty::new(100 << 10);
        small.mark(90 << 10, 1);
        assert_eq!(small.take(0, 100 << 10, 1 << 20), Some((g, 36 << 10)));
    }
}
