//! Crash simulation for tests (feature `fault-injection`).
//!
//! A [`Recorder`] attached to a file (by path, before the engine opens it)
//! sees every write the engine submits to it, every completion, and every
//! fdatasync, in order. From that history [`Recorder::crash_image`] builds
//! what the disk could hold after a power cut at any point: everything a
//! completed fdatasync covered (writes that had completed when it was
//! issued), plus any subset of the other writes submitted by then, applied
//! in submission order and possibly torn at sector boundaries. Lost writes,
//! reordered writes and torn writes are all in the model; only what the
//! engine made durable is guaranteed. A process crash
//! ([`Recorder::image_after`] with [`Crash::Process`]) keeps every write
//! that completed, and the crash journal's stores
//! ([`Recorder::journal_after`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// What a crash takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Power cut or host crash: only what an fdatasync covered survives.
    PowerCut,
    /// The process dies, the kernel lives on: every completed write
    /// survives (and the page cache, so the crash journal); nothing in the
    /// process's memory does.
    Process,
}

/// The unit a write may be torn at.
pub const SECTOR: usize = 512;

/// One thing that happened to the file.
#[derive(Debug, Clone)]
pub enum Event {
    /// A write was submitted.
    Write {
        id: usize,
        offset: u64,
        data: Vec<u8>,
    },
    /// A write completed.
    Done { id: usize },
    /// An fdatasync completed; it made these writes durable.
    Synced { ids: Vec<usize> },
    /// A point the test marked (e.g. "guest flush returned").
    Marker { tag: u64 },
    /// The image's crash journal was created (empty, this long).
    JournalCreated { len: usize },
    /// A store into the crash journal's shared mapping: in the page cache
    /// at once, so it survives a process crash (never a power cut).
    JournalStore { offset: u64, data: Vec<u8> },
}

#[derive(Debug, Default)]
struct State {
    events: Vec<Event>,
    next_id: usize,
    done: HashSet<usize>,
    durable: HashSet<usize>,
}

/// The history of one file.
#[derive(Debug)]
pub struct Recorder {
    initial: Vec<u8>,
    state: Mutex<State>,
    /// Metadata writes held back by a test (see [`Recorder::stall`]).
    stalls: Mutex<Vec<Arc<Stall>>>,
    /// Errnos the next fdatasyncs fail with (see [`Recorder::fail_syncs`]).
    sync_failures: Mutex<std::collections::VecDeque<i32>>,
}

/// A gate that holds every metadata write of one kind until released.
#[derive(Debug)]
pub struct Stall {
    op: &'static str,
    released: std::sync::atomic::AtomicBool,
    /// How many writes reached the gate.
    hits: std::sync::atomic::AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Stall {
    /// Lets the held writes (and every later one) go.
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    /// How many writes have reached the gate so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn wait(&self) {
        self.hits.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        loop {
            // Created before the check: a release in between still wakes it.
            let notified = self.notify.notified();
            if self.released.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Recorder>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<Recorder>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

impl Recorder {
    /// Starts recording writes to `path` (as it is now) by files the engine
    /// opens from now on.
    pub fn attach(path: &Path) -> std::io::Result<Arc<Recorder>> {
        let r = Arc::new(Recorder {
            initial: std::fs::read(path)?,
            state: Mutex::new(State::default()),
            stalls: Mutex::new(Vec::new()),
            sync_failures: Mutex::new(std::collections::VecDeque::new()),
        });
        registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key(path), r.clone());
        Ok(r)
    }

    /// Stops recording `path`.
    pub fn detach(path: &Path) {
        registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key(path));
    }

    pub(crate) fn for_path(path: &Path) -> Option<Arc<Recorder>> {
        let reg = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reg.is_empty() {
            return None;
        }
        reg.get(&key(path)).cloned()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn write_submitted(&self, offset: u64, data: &[u8]) -> usize {
        let mut s = self.state();
        let id = s.next_id;
        s.next_id += 1;
        s.events.push(Event::Write {
            id,
            offset,
            data: data.to_vec(),
        });
        id
    }

    pub(crate) fn write_done(&self, id: usize) {
        let mut s = self.state();
        s.done.insert(id);
        s.events.push(Event::Done { id });
    }

    /// Called when an fdatasync is issued: the writes it will cover.
    pub(crate) fn sync_issued(&self) -> Vec<usize> {
        let s = self.state();
        s.done.difference(&s.durable).copied().collect()
    }

    pub(crate) fn sync_done(&self, ids: Vec<usize>) {
        let mut s = self.state();
        s.durable.extend(ids.iter().copied());
        s.events.push(Event::Synced { ids });
    }

    /// The next fdatasyncs of the file fail, one with each of `errnos`
    /// in turn, without syncing anything (what a failing disk or a lost
    /// network file system does).
    pub fn fail_syncs(&self, errnos: &[i32]) {
        self.sync_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(errnos.iter().copied());
    }

    /// The errno the fdatasync being issued fails with, if one is due.
    pub(crate) fn take_sync_failure(&self) -> Option<i32> {
        self.sync_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }

    /// Holds every metadata write of kind `op` ("write L2 table", "write
    /// refcount block", "write header"…) until the returned gate is
    /// released: a test can leave a commit stuck in its I/O and watch what
    /// else goes on meanwhile.
    pub fn stall(&self, op: &'static str) -> Arc<Stall> {
        let s = Arc::new(Stall {
            op,
            released: std::sync::atomic::AtomicBool::new(false),
            hits: std::sync::atomic::AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
        });
        self.stalls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s.clone());
        s
    }

    /// Waits at every unreleased gate for `op`.
    pub(crate) async fn stall_point(&self, op: &'static str) {
        let gates: Vec<Arc<Stall>> = self
            .stalls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.op == op)
            .cloned()
            .collect();
        for g in gates {
            g.wait().await;
        }
    }

    pub(crate) fn journal_created(&self, len: usize) {
        self.state().events.push(Event::JournalCreated { len });
    }

    pub(crate) fn journal_store(&self, offset: u64, data: &[u8]) {
        self.state().events.push(Event::JournalStore {
            offset,
            data: data.to_vec(),
        });
    }

    /// The crash journal's file after a crash just after event `cut`:
    /// `None` if none was created by then.
    pub fn journal_after(&self, cut: usize) -> Option<Vec<u8>> {
        let events = self.events();
        let mut file: Option<Vec<u8>> = None;
        for e in &events[..events.len().min(cut + 1)] {
            match e {
                Event::JournalCreated { len } => file = Some(vec![0; *len]),
                Event::JournalStore { offset, data } => {
                    if let Some(f) = file.as_mut() {
                        let o = *offset as usize;
                        f[o..o + data.len()].copy_from_slice(data);
                    }
                }
                _ => {}
            }
        }
        file
    }

    /// Marks a point in the history; returns its event index.
    pub fn mark(&self, tag: u64) -> usize {
        let mut s = self.state();
        s.events.push(Event::Marker { tag });
        s.events.len() - 1
    }

    /// The history so far.
    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    /// The file's contents after a power cut just after event `cut` (all
    /// events when `cut` is past the end). `pick(n)` chooses in `0..n`;
    /// it decides which unsynced writes land and how they tear.
    pub fn crash_image(&self, cut: usize, pick: &mut dyn FnMut(u64) -> u64) -> Vec<u8> {
        self.image_after(Crash::PowerCut, cut, pick)
    }

    /// The file's contents after a crash of the given kind just after
    /// event `cut`: a power cut keeps what was synced, a process crash
    /// what had completed (the kernel has it); writes still in flight
    /// land whole or not at all, and after a power cut also torn.
    pub fn image_after(
        &self,
        crash: Crash,
        cut: usize,
        pick: &mut dyn FnMut(u64) -> u64,
    ) -> Vec<u8> {
        let events = self.events();
        let upto = &events[..events.len().min(cut + 1)];
        let mut durable = HashSet::new();
        for e in upto {
            match (crash, e) {
                (Crash::PowerCut, Event::Synced { ids }) => durable.extend(ids.iter().copied()),
                (Crash::Process, Event::Done { id }) => {
                    durable.insert(*id);
                }
                _ => {}
            }
        }
        let mut img = self.initial.clone();
        let put = |img: &mut Vec<u8>, offset: usize, data: &[u8]| {
            if img.len() < offset + data.len() {
                img.resize(offset + data.len(), 0);
            }
            img[offset..offset + data.len()].copy_from_slice(data);
        };
        for e in upto {
            let Event::Write { id, offset, data } = e else {
                continue;
            };
            let offset = *offset as usize;
            if durable.contains(id) {
                put(&mut img, offset, data);
                continue;
            }
            // Not durable: lost (1 in 3), whole (1 in 3), or torn. After a
            // process crash the device still completes what it was given
            // (or the kernel cancels it first): lost or whole, never torn.
            let choices = match crash {
                Crash::PowerCut => 3,
                Crash::Process => 2,
            };
            match pick(choices) {
                0 => {}
                1 => put(&mut img, offset, data),
                _ => {
                    // Torn: each sector (aligned to the file) lands or not.
                    let mut at = 0usize;
                    while at < data.len() {
                        let end = ((offset + at) / SECTOR + 1) * SECTOR - offset;
                        let end = end.min(data.len());
                        if pick(2) == 1 {
                            put(&mut img, offset + at, &data[at..end]);
                        }
                        at = end;
                    }
                }
            }
        }
        img
    }
}
