//! The ordered commit: the one way the engine writes metadata and syncs.
//!
//! Every metadata change reaches the disk as a [`Commit`]: a set of writes
//! (refcount blocks, tables, a header switch), each with the writes it must
//! follow and how strictly:
//!
//! - [`Edge::Completed`]: the earlier write has completed (the kernel holds
//!   it: it survives the daemon's death, not a power cut);
//! - [`Edge::Durable`]: the earlier write has completed and an fdatasync
//!   issued after that has completed (it survives a power cut).
//!
//! A write may also follow the guest data written before the commit began
//! ([`Commit::after_guest_data`]): invariant 2 of the design, data before
//! the L2 entry that maps it. The executor submits every write whose edges
//! are met at once, and issues an fdatasync only when nothing else can go
//! ahead without one, so a commit costs as many syncs as its longest chain
//! of durable edges and no more. Two writes whose bytes (rounded out to the
//! file's I/O alignment) overlap are ordered by a `Completed` edge, so a
//! later version of a structure never races an earlier one.
//!
//! Who builds commits: the writeback (`write/writeback.rs`) for everything
//! the allocator and the L2 updates leave dirty, including refcount table
//! growth, L1 table moves, the lazy-refcounts dirty bit and its clearing at
//! close; marking an image corrupt; and check's repairs. Nothing else in
//! the engine writes metadata or calls fdatasync.

use std::collections::HashSet;

use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::file::HostFile;
use crate::stats::Counters;

/// How strictly one write follows another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Edge {
    /// After the other write completed (in the kernel's hands).
    Completed,
    /// After the other write is durable (completed, then synced).
    Durable,
}

/// A write of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct WriteId(usize);

/// What a write waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dep {
    Write(usize),
    /// The guest data written before the commit began, in the image or
    /// the data file.
    GuestData,
}

#[derive(Debug)]
struct Planned {
    /// What is written, for errors ("write L2 table").
    op: &'static str,
    offset: u64,
    bytes: Option<AlignedBuf>,
    after: Vec<(Dep, Edge)>,
}

/// How a commit ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Every write completed: it survives the daemon's death, not a power
    /// cut (for the crash-survival work: acknowledged writes whose metadata
    /// must reach the kernel before the guest hears of them).
    #[allow(dead_code, reason = "used by tests now, by daemon-crash survival next")]
    Completed,
    /// Every write, and the guest data before the commit, durable.
    Durable,
}

/// A set of ordered metadata writes; see the module documentation.
#[derive(Debug)]
#[must_use = "a commit writes nothing until it is run"]
pub(crate) struct Commit {
    writes: Vec<Planned>,
    end: End,
}

/// The files a commit writes and syncs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Files<'a> {
    /// Where the metadata lives.
    pub(crate) image: &'a HostFile,
    /// An external data file: synced with the image where guest data must
    /// be durable.
    pub(crate) data: Option<&'a HostFile>,
    pub(crate) counters: Option<&'a Counters>,
}

/// What running a commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) writes: u64,
    pub(crate) syncs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Pending,
    Completed,
    Durable,
}

impl Commit {
    pub(crate) fn new(end: End) -> Self {
        Self {
            writes: Vec::new(),
            end,
        }
    }

    /// Plans a write of `bytes` at `offset`.
    pub(crate) fn write(&mut self, op: &'static str, offset: u64, bytes: AlignedBuf) -> WriteId {
        self.writes.push(Planned {
            op,
            offset,
            bytes: Some(bytes),
            after: Vec::new(),
        });
        WriteId(self.writes.len() - 1)
    }

    /// `w` follows `dep` (planned before it) as strictly as `edge` says.
    pub(crate) fn after(&mut self, w: WriteId, dep: WriteId, edge: Edge) {
        assert!(dep.0 < w.0, "a write can only follow one planned before it");
        self.writes[w.0].after.push((Dep::Write(dep.0), edge));
    }

    /// `w` follows every write in `deps`.
    pub(crate) fn after_all(&mut self, w: WriteId, deps: &[WriteId], edge: Edge) {
        for &d in deps {
            self.after(w, d, edge);
        }
    }

    /// `w` follows the guest data written before the commit began, durably.
    pub(crate) fn after_guest_data(&mut self, w: WriteId) {
        self.writes[w.0].after.push((Dep::GuestData, Edge::Durable));
    }

    /// Orders writes whose blocks overlap (at the file's I/O alignment, as
    /// a partial block is read, patched and written back).
    fn order_overlaps(&mut self, align: u64) {
        let span = |p: &Planned| {
            let len = p.bytes.as_ref().map_or(0, |b| b.len() as u64);
            let start = p.offset - p.offset % align;
            (start, (p.offset + len).next_multiple_of(align))
        };
        for j in 1..self.writes.len() {
            let (js, je) = span(&self.writes[j]);
            for i in 0..j {
                let (is, ie) = span(&self.writes[i]);
                if is < je && js < ie {
                    self.writes[j].after.push((Dep::Write(i), Edge::Completed));
                }
            }
        }
    }

    /// Runs the commit: every write once its edges are met, as many at a
    /// time as can go, an fdatasync only where one is needed. On an error
    /// the writes not yet submitted are dropped (the ones submitted with it
    /// finish first); nothing after a failed write is written.
    pub(crate) async fn run(self, files: Files<'_>) -> Result<Outcome> {
        self.run_tracked(files).await.map_err(|f| f.error)
    }

    /// [`Commit::run`], telling on failure which writes completed (a
    /// caller that keeps track of what is on disk needs to know).
    pub(crate) async fn run_tracked(
        mut self,
        files: Files<'_>,
    ) -> std::result::Result<Outcome, Failed> {
        self.order_overlaps(files.image.alignment());
        let n = self.writes.len();
        let mut state = vec![State::Pending; n];
        let mut data_durable = false;
        let mut unsynced = false;
        let mut out = Outcome::default();
        loop {
            let ready: Vec<usize> = (0..n)
                .filter(|&i| state[i] == State::Pending)
                .filter(|&i| {
                    self.writes[i].after.iter().all(|&(dep, edge)| match dep {
                        Dep::GuestData => data_durable,
                        Dep::Write(d) => match edge {
                            Edge::Completed => state[d] >= State::Completed,
                            Edge::Durable => state[d] == State::Durable,
                        },
                    })
                })
                .collect();
            if !ready.is_empty() {
                let mut submitted = Vec::with_capacity(ready.len());
                for &i in &ready {
                    let p = &mut self.writes[i];
                    let bytes = p.bytes.take().expect("each write is submitted once");
                    submitted.push(write_one(files, p.op, p.offset, bytes));
                }
                let results = futures_util::future::join_all(submitted).await;
                let mut failed = None;
                for (&i, r) in ready.iter().zip(results) {
                    match r {
                        Ok(()) => {
                            state[i] = State::Completed;
                            out.writes += 1;
                            unsynced = true;
                        }
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                if let Some(error) = failed {
                    return Err(Failed::new(error, &state));
                }
                continue;
            }
            if state.iter().all(|&s| s != State::Pending) {
                break;
            }
            // Everything left waits for durability.
            out.syncs += sync(files, !data_durable)
                .await
                .map_err(|e| Failed::new(e, &state))?;
            data_durable = true;
            unsynced = false;
            for s in &mut state {
                if *s == State::Completed {
                    *s = State::Durable;
                }
            }
        }
        if self.end == End::Durable && (unsynced || !data_durable) {
            out.syncs += sync(files, !data_durable)
                .await
                .map_err(|e| Failed::new(e, &state))?;
        }
        Ok(out)
    }
}

/// A commit that failed part way.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: Error,
    /// The writes that completed before it stopped (none of them is known
    /// to be durable).
    pub(crate) completed: HashSet<WriteId>,
}

impl Failed {
    fn new(error: Error, state: &[State]) -> Self {
        Self {
            error,
            completed: (0..state.len())
                .filter(|&i| state[i] != State::Pending)
                .map(WriteId)
                .collect(),
        }
    }
}

/// A header encoded as the bytes of a header write.
pub(crate) fn header_buf(
    path: &std::path::Path,
    header: &qblk_qcow2::Header,
) -> Result<AlignedBuf> {
    let bytes = header.encode().map_err(Error::format(path))?;
    let mut buf = AlignedBuf::zeroed(bytes.len());
    buf.copy_from_slice(&bytes);
    Ok(buf)
}

/// One planned write (and, in crash tests, the point where a test may
/// stall it).
async fn write_one(
    files: Files<'_>,
    op: &'static str,
    offset: u64,
    bytes: AlignedBuf,
) -> Result<()> {
    files.image.stall_point(op).await;
    if let Some(c) = files.counters {
        Counters::add(&c.metadata_writes, 1);
    }
    files
        .image
        .write_aligned(offset, bytes)
        .await
        .map_err(Error::io(files.image.path(), op, offset))
}

/// fdatasync of the image, and of the data file when guest data in it
/// must be durable. Returns the number of syncs.
async fn sync(files: Files<'_>, with_data: bool) -> Result<u64> {
    let data = files.data.filter(|_| with_data);
    let image = async {
        files
            .image
            .flush()
            .await
            .map_err(Error::io(files.image.path(), "flush", None))
    };
    let n = match data {
        Some(d) => {
            let data = async {
                d.flush()
                    .await
                    .map_err(Error::io(d.path(), "flush data file", None))
            };
            let (a, b) = futures_util::future::join(data, image).await;
            a?;
            b?;
            2
        }
        None => {
            image.await?;
            1
        }
    };
    if let Some(c) = files.counters {
        Counters::add(&c.fsyncs, n);
    }
    Ok(n)
}

/// The distinct writes a commit plans (for tests and assertions).
#[cfg(test)]
fn planned_offsets(c: &Commit) -> HashSet<u64> {
    c.writes.iter().map(|p| p.offset).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::CacheMode;
    use crate::runtime::block_on;

    fn buf(byte: u8, len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.fill(byte);
        b
    }

    /// Runs `c` on a recorded file; returns the outcome and the recorded
    /// events as (kind, offset) with kind 'w' submitted, 'd' done, 's' sync.
    fn run_recorded(c: Commit, end_len: usize) -> (Outcome, Vec<(char, u64)>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; end_len]).unwrap();
        let rec = crate::fault::Recorder::attach(&path).unwrap();
        let out = block_on(async {
            let f = HostFile::open(&path, true, CacheMode::None).unwrap();
            c.run(Files {
                image: &f,
                data: None,
                counters: None,
            })
            .await
            .unwrap()
        });
        crate::fault::Recorder::detach(&path);
        let mut offsets = std::collections::HashMap::new();
        let events = rec
            .events()
            .into_iter()
            .filter_map(|e| match e {
                crate::fault::Event::Write { id, offset, .. } => {
                    offsets.insert(id, offset);
                    Some(('w', offset))
                }
                crate::fault::Event::Done { id } => Some(('d', offsets[&id])),
                crate::fault::Event::Synced { .. } => Some(('s', 0)),
                crate::fault::Event::Marker { .. }
                | crate::fault::Event::JournalCreated { .. }
                | crate::fault::Event::JournalStore { .. } => None,
            })
            .collect();
        (out, events)
    }

    fn position(events: &[(char, u64)], kind: char, offset: u64) -> usize {
        events
            .iter()
            .position(|&e| e == (kind, offset))
            .unwrap_or_else(|| panic!("{kind} {offset:#x} in {events:?}"))
    }

    #[test]
    fn durable_edges_cost_one_sync_per_level_and_order_the_writes() {
        // blocks -> (durable) -> two tables -> (durable) -> header.
        let mut c = Commit::new(End::Durable);
        let b1 = c.write("write refcount block", 0x10000, buf(1, 4096));
        let b2 = c.write("write refcount block", 0x20000, buf(2, 4096));
        let t1 = c.write("write L2 table", 0x30000, buf(3, 4096));
        let t2 = c.write("write L2 table", 0x40000, buf(4, 4096));
        c.after_all(t1, &[b1, b2], Edge::Durable);
        c.after_all(t2, &[b1, b2], Edge::Durable);
        let h = c.write("write header", 0, buf(5, 4096));
        c.after_all(h, &[t1, t2], Edge::Durable);
        assert_eq!(planned_offsets(&c).len(), 5);
        let (out, ev) = run_recorded(c, 0x50000);
        assert_eq!(
            out,
            Outcome {
                writes: 5,
                syncs: 3
            }
        );
        let sync_at: Vec<usize> = ev
            .iter()
            .enumerate()
            .filter(|(_, e)| e.0 == 's')
            .map(|(i, _)| i)
            .collect();
        assert_eq!(sync_at.len(), 3, "{ev:?}");
        // Both blocks done before the first sync, tables submitted after it.
        for b in [0x10000, 0x20000] {
            assert!(position(&ev, 'd', b) < sync_at[0]);
        }
        for t in [0x30000, 0x40000] {
            assert!(position(&ev, 'w', t) > sync_at[0]);
            assert!(position(&ev, 'd', t) < sync_at[1]);
        }
        assert!(position(&ev, 'w', 0) > sync_at[1]);
        assert!(sync_at[2] > position(&ev, 'd', 0));
    }

    #[test]
    fn completed_edges_need_no_sync_and_a_completed_commit_ends_unsynced() {
        let mut c = Commit::new(End::Completed);
        let a = c.write("write refcount block", 0x10000, buf(1, 4096));
        let b = c.write("write L2 table", 0x20000, buf(2, 4096));
        c.after(b, a, Edge::Completed);
        let (out, ev) = run_recorded(c, 0x30000);
        assert_eq!(
            out,
            Outcome {
                writes: 2,
                syncs: 0
            }
        );
        assert!(position(&ev, 'd', 0x10000) < position(&ev, 'w', 0x20000));
        assert!(ev.iter().all(|e| e.0 != 's'));
    }

    #[test]
    fn overlapping_writes_are_ordered_and_the_last_one_wins() {
        // Same 4 KiB block (the file's O_DIRECT alignment): a partial block
        // is read, patched and written back, so the two must not race.
        let mut c = Commit::new(End::Durable);
        c.write("write header", 0, buf(1, 512));
        c.write("write header", 512, buf(2, 512));
        c.write("write header", 0, buf(3, 100));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        block_on(async {
            let f = HostFile::open(&path, true, CacheMode::None).unwrap();
            let out = c
                .run(Files {
                    image: &f,
                    data: None,
                    counters: None,
                })
                .await
                .unwrap();
            assert_eq!(
                out,
                Outcome {
                    writes: 3,
                    syncs: 1
                }
            );
        });
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..100].iter().all(|&b| b == 3));
        assert!(bytes[100..512].iter().all(|&b| b == 1));
        assert!(bytes[512..1024].iter().all(|&b| b == 2));
    }

    #[test]
    fn guest_data_edges_sync_the_data_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let (img, data) = (dir.path().join("img"), dir.path().join("data"));
        std::fs::write(&img, vec![0u8; 0x20000]).unwrap();
        std::fs::write(&data, vec![0u8; 0x10000]).unwrap();
        let counters = Counters::default();
        block_on(async {
            let fi = HostFile::open(&img, true, CacheMode::None).unwrap();
            let fd = HostFile::open(&data, true, CacheMode::None).unwrap();
            let mut c = Commit::new(End::Durable);
            let t = c.write("write L2 table", 0x10000, buf(7, 4096));
            c.after_guest_data(t);
            let out = c
                .run(Files {
                    image: &fi,
                    data: Some(&fd),
                    counters: Some(&counters),
                })
                .await
                .unwrap();
            // Data file and image before the table, the image after it.
            assert_eq!(
                out,
                Outcome {
                    writes: 1,
                    syncs: 3
                }
            );
            // Nothing planned: a durable commit still makes the data durable.
            let out = Commit::new(End::Durable)
                .run(Files {
                    image: &fi,
                    data: Some(&fd),
                    counters: Some(&counters),
                })
                .await
                .unwrap();
            assert_eq!(
                out,
                Outcome {
                    writes: 0,
                    syncs: 2
                }
            );
        });
        let s = counters.snapshot();
        assert_eq!((s.metadata_writes, s.fsyncs), (1, 5));
    }

    #[test]
    fn a_failed_write_stops_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        block_on(async {
            // Read-only: every write fails with EBADF.
            let f = HostFile::open(&path, false, CacheMode::None).unwrap();
            let mut c = Commit::new(End::Durable);
            let a = c.write("write refcount block", 0, buf(1, 4096));
            let b = c.write("write L2 table", 4096, buf(2, 4096));
            c.after(b, a, Edge::Durable);
            let e = c
                .run(Files {
                    image: &f,
                    data: None,
                    counters: None,
                })
                .await
                .unwrap_err();
            assert!(
                e.to_string().contains("write refcount block at offset 0x0"),
                "{e}"
            );
        });
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "a write can only follow one planned before it")]
    fn edges_point_backwards_only() {
        let mut c = Commit::new(End::Durable);
        let a = c.write("write header", 0, buf(1, 512));
        let b = c.write("write header", 4096, buf(1, 512));
        c.after(a, b, Edge::Durable);
    }
}
