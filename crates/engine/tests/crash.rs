//! Crash safety: random workloads through the engine with every write and
//! fdatasync of the image file recorded (the `fault-injection` feature),
//! then simulated power cuts after every event of the history: each
//! unsynced write is lost, kept or torn at sector granularity. And process
//! crashes (kill -9): every completed write and the crash journal survive,
//! and every acknowledged operation, flushed or not, must read back; the
//! replayed image must not even leak.
//!
//! After each cut the image must open (a dirty lazy-refcounts image is
//! repaired on open), every write acknowledged before a completed flush
//! must read back, and the refcounts must hold no corruption (leaks are
//! allowed): checked with qblk's check after every cut and with
//! `qemu-img check` after a sample of them.

use std::path::Path;

use qblk_engine::fault::{Crash, Recorder};
use qblk_engine::file::CacheMode;
use qblk_engine::image::{BackingPolicy, Image, OpenOptions};
use qblk_engine::runtime::block_on;

mod common;
use common::*;

/// One guest operation of a batch.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64, bool),
    Discard(u64, u64),
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write(o, d) => (*o, d.len() as u64),
            Op::Zeroes(o, l, _) | Op::Discard(o, l) => (*o, *l),
        }
    }
}

/// A batch of operations on disjoint ranges (their order does not matter).
fn batch(rng: &mut Lcg, size: u64, cluster: u64, n: usize) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    for _ in 0..n {
        let len = match rng.next(3) {
            0 => 512 * (1 + rng.next(8)),
            1 => cluster.min(size),
            _ => (1 + rng.next(2 * cluster)).min(size),
        };
        let off = if rng.next(2) == 0 {
            rng.next(size - len + 1)
        } else {
            (rng.next(size / cluster) * cluster + rng.next(cluster)).min(size - len)
        };
        if out.iter().any(|op| {
            let (o, l) = op.range();
            off < o + l && o < off + len
        }) {
            continue;
        }
        let tag = rng.next(250) as u8 + 1;
        out.push(match rng.next(12) {
            0 => Op::Zeroes(off, len, rng.next(2) == 0),
            1 => Op::Discard(off, len),
            _ => Op::Write(
                off,
                (0..len)
                    .map(|i| tag.wrapping_add((i / 512) as u8))
                    .collect(),
            ),
        });
    }
    out
}

/// The guest's view after `op`; a discard zeroes the whole clusters it
/// covers where the image honours it (unallocated reads as zero here:
/// `backing_zero` says whether discarded clusters read as zero).
fn apply(model: &mut [u8], op: &Op, cluster: u64, discards: bool) {
    match op {
        Op::Write(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zeroes(o, l, _) => model[*o as usize..(*o + *l) as usize].fill(0),
        Op::Discard(o, l) => {
            if !discards {
                return;
            }
            let size = model.len() as u64;
            let end = o + l;
            let mut c = o.next_multiple_of(cluster);
            while c < end && (c + cluster <= end || end == size) {
                model[c as usize..(c + cluster).min(size) as usize].fill(0);
                c += cluster;
            }
        }
    }
}

fn open_opts(writable: bool, crash_journal: bool) -> OpenOptions {
    OpenOptions {
        writable,
        crash_journal,
        cache: CacheMode::Writeback,
        backing: BackingPolicy {
            allow_any_dir: true,
            ..BackingPolicy::default()
        },
        ..OpenOptions::default()
    }
}

/// What the guest had been promised at one flush.
struct Checkpoint {
    /// Event index of the flush's completion in the recorder's history.
    event: usize,
    model: Vec<u8>,
}

/// One operation the guest was told had completed.
struct Acked {
    /// Event index of its batch's start.
    start: usize,
    /// Event index of its completion.
    done: usize,
    op: Op,
}

struct Run {
    rec: std::sync::Arc<Recorder>,
    start: Vec<u8>,
    checkpoints: Vec<Checkpoint>,
    /// The byte ranges each batch touched (batch i follows checkpoint i-1).
    touched: Vec<Vec<(u64, u64)>>,
    acked: Vec<Acked>,
    cluster: u64,
    discards: bool,
}

/// Runs one random workload on `work` (a fresh copy of the image kind),
/// recording its history.
/// The workload keeps a crash journal, as the daemon does.
fn workload(dir: &Path, work: &str, seed: u64, batches: usize, discards: bool) -> Run {
    let path = dir.join(work);
    let start = block_on(async {
        let img = Image::open(&path, &open_opts(false, false))
            .await
            .expect("open");
        let mut buf = vec![0u8; img.size() as usize];
        img.read(0, &mut buf).await.expect("read");
        buf
    });
    let rec = Recorder::attach(&path).expect("attach recorder");
    let mut model = start.clone();
    let mut checkpoints = Vec::new();
    let mut touched = Vec::new();
    let mut acked = Vec::new();
    let mut cluster_size = 0;
    block_on(async {
        let img = std::rc::Rc::new(
            Image::open(&path, &open_opts(true, true))
                .await
                .expect("open rw"),
        );
        let size = img.size();
        let cluster = img.cluster_size();
        cluster_size = cluster;
        let mut rng = Lcg(seed);
        for _ in 0..batches {
            let ops = batch(&mut rng, size, cluster, 6);
            touched.push(ops.iter().map(Op::range).collect());
            let start = rec.mark(1);
            let mut tasks = Vec::new();
            for op in ops.clone() {
                let img = img.clone();
                let rec = rec.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    match &op {
                        Op::Write(o, d) => img.write(*o, d).await,
                        Op::Zeroes(o, l, unmap) => img.write_zeroes(*o, *l, *unmap).await,
                        Op::Discard(o, l) => img.discard(*o, *l).await,
                    }
                    .expect("guest operation");
                    // Acknowledged to the guest here.
                    Acked {
                        start,
                        done: rec.mark(2),
                        op,
                    }
                }));
            }
            for t in tasks {
                acked.push(t.await.expect("task"));
            }
            for op in &ops {
                apply(&mut model, op, cluster, discards);
            }
            img.flush().await.expect("flush");
            checkpoints.push(Checkpoint {
                event: rec.mark(0),
                model: model.clone(),
            });
        }
        // The session ends in a crash: no close.
    });
    Recorder::detach(&path);
    Run {
        rec,
        start,
        checkpoints,
        touched,
        acked,
        cluster: cluster_size,
        discards,
    }
}

/// Simulates a crash after event `cut` and checks the result.
fn verify(
    dir: &Path,
    run: &Run,
    crash_kind: Crash,
    cut: usize,
    rng: &mut Lcg,
    qemu: bool,
    what: &str,
) {
    let bytes = run.rec.image_after(crash_kind, cut, &mut |n| rng.next(n));
    let crash = dir.join("crash.qcow2");
    std::fs::write(&crash, &bytes).expect("write crash image");
    if let Ok(keep) = std::env::var("QBLK_CRASH_KEEP") {
        std::fs::write(keep, &bytes).expect("keep crash image");
    }
    // The journal survives a process crash (the page cache does); after a
    // power cut it is of another boot, as good as absent.
    let journal = qblk_engine::journal::sidecar(&crash);
    let _ = std::fs::remove_file(&journal);
    let journaled = match (crash_kind, run.rec.journal_after(cut)) {
        (Crash::Process, Some(j)) => {
            std::fs::write(&journal, j).expect("write crash journal");
            true
        }
        _ => false,
    };
    let (expected, exempt) = match crash_kind {
        // What must read back: the last flush that completed before the
        // cut, except what the batch after it touched.
        Crash::PowerCut => {
            let done = run.checkpoints.iter().filter(|c| c.event <= cut).count();
            let expected = match done {
                0 => run.start.clone(),
                n => run.checkpoints[n - 1].model.clone(),
            };
            (expected, run.touched.get(done).cloned().unwrap_or_default())
        }
        // Every acknowledged operation, flushed or not; only those in
        // progress at the crash may have landed or not.
        Crash::Process => {
            let mut model = run.start.clone();
            let cluster = run.cluster;
            let mut done: Vec<&Acked> = run.acked.iter().filter(|a| a.done <= cut).collect();
            done.sort_by_key(|a| a.done);
            for a in done {
                apply(&mut model, &a.op, cluster, run.discards);
            }
            let exempt = run
                .acked
                .iter()
                .filter(|a| a.start <= cut && cut < a.done)
                .map(|a| a.op.range())
                .collect();
            (model, exempt)
        }
    };
    let expected = &expected;
    let got = block_on(async {
        let img = Image::open(&crash, &open_opts(true, false))
            .await
            .unwrap_or_else(|e| panic!("{what} cut {cut}: reopen failed: {e}"));
        let mut buf = vec![0u8; img.size() as usize];
        img.read(0, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("{what} cut {cut}: read failed: {e}"));
        img.close()
            .await
            .unwrap_or_else(|e| panic!("{what} cut {cut}: close failed: {e}"));
        buf
    });
    assert_eq!(got.len(), expected.len());
    // Compare everything outside the exempt ranges, a run at a time.
    let mut exempt = exempt;
    exempt.sort_unstable();
    let mut runs = Vec::new();
    let mut at = 0u64;
    for &(o, l) in &exempt {
        if o > at {
            runs.push((at, o));
        }
        at = at.max(o + l);
    }
    runs.push((at, got.len() as u64));
    for (a, b) in runs {
        let (a, b) = (a as usize, (b as usize).min(got.len()));
        if a < b && got[a..b] != expected[a..b] {
            let i = a + (a..b).position(|i| got[i] != expected[i]).unwrap_or(0);
            panic!(
                "{what} {crash_kind:?} after event {cut}: acknowledged byte {i:#x} is {:#x}, not {:#x}",
                got[i], expected[i]
            );
        }
    }
    let report = block_on(qblk_engine::check::check(
        &crash,
        CacheMode::Writeback,
        false,
    ))
    .unwrap_or_else(|e| panic!("{what} cut {cut}: check failed: {e}"));
    assert_eq!(report.corruptions, 0, "{what} cut {cut}: {report:?}");
    if journaled {
        // A replayed journal rebuilds the refcounts: not even a leak.
        assert_eq!(report.leaks, 0, "{what} cut {cut}: {report:?}");
    }
    if qemu {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&crash)
            .output()
            .expect("qemu-img check");
        let json = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("{what} cut {cut}: qemu-img check said {json}: {e}"));
        let keys: &[&str] = if journaled {
            &["corruptions", "check-errors", "leaks"]
        } else {
            &["corruptions", "check-errors"]
        };
        for &key in keys {
            assert_eq!(
                v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0),
                0,
                "{what} cut {cut}: qemu-img check: {json}"
            );
        }
    }
}

/// Image kinds: (name, commands that make `name` in the directory,
/// whether discards zero whole clusters).
fn kinds() -> Vec<(&'static str, Vec<Vec<&'static str>>, bool)> {
    let create = |name: &'static str, opts: &'static str, size: &'static str| {
        vec![
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, name, size,
        ]
    };
    vec![
        (
            "default.qcow2",
            vec![create("default.qcow2", "cluster_size=64k", "4M")],
            true,
        ),
        (
            "lazy.qcow2",
            vec![create(
                "lazy.qcow2",
                "lazy_refcounts=on,cluster_size=16k",
                "2M",
            )],
            true,
        ),
        (
            "xl2.qcow2",
            vec![create("xl2.qcow2", "extended_l2=on,cluster_size=32k", "2M")],
            true,
        ),
        (
            "rb1.qcow2",
            vec![create("rb1.qcow2", "refcount_bits=1,cluster_size=4k", "1M")],
            true,
        ),
        (
            "c512.qcow2",
            vec![create("c512.qcow2", "cluster_size=512", "256k")],
            true,
        ),
        (
            "c2m.qcow2",
            vec![create("c2m.qcow2", "cluster_size=2M", "6M")],
            true,
        ),
        (
            "backed.qcow2",
            vec![
                vec!["qemu-img", "create", "-q", "-f", "raw", "base.raw", "2M"],
                vec![
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x5a 0 2M",
                    "base.raw",
                ],
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    "-o",
                    "cluster_size=16k",
                    "backed.qcow2",
                ],
            ],
            true,
        ),
        (
            "zip.qcow2",
            vec![
                create("zsrc.qcow2", "cluster_size=16k", "2M"),
                vec!["qemu-io", "-c", "write -P 0x33 0 2M", "zsrc.qcow2"],
                vec![
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=16k",
                    "zsrc.qcow2",
                    "zip.qcow2",
                ],
            ],
            true,
        ),
        (
            "snap.qcow2",
            vec![
                create("snap.qcow2", "cluster_size=16k", "2M"),
                vec!["qemu-io", "-c", "write -P 0x44 0 2M", "snap.qcow2"],
                vec!["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"],
            ],
            true,
        ),
    ]
}

/// Workloads per image kind: 224 power-cut and 8 process-crash ones in CI
/// (2016 and 72 over the nine kinds, each cut after every event that
/// changes what the crash leaves); `QBLK_CRASH_WORKLOADS` sets another
/// count for both.
const DEFAULT_WORKLOADS: u64 = 224;
const DEFAULT_PROCESS_WORKLOADS: u64 = 8;

/// Runs the workloads on one image kind and verifies every cut; returns how
/// many cuts were verified.
fn crashes(kind: &str, crash_kind: Crash) -> usize {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let workloads: u64 = std::env::var("QBLK_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(match crash_kind {
            Crash::PowerCut => DEFAULT_WORKLOADS,
            Crash::Process => DEFAULT_PROCESS_WORKLOADS,
        });
    let mut cuts_checked = 0usize;
    let (name, cmds, discards) = kinds()
        .into_iter()
        .find(|k| k.0 == kind)
        .expect("known image kind");
    for c in &cmds {
        sh(d, c);
    }
    let pristine = std::fs::read(d.join(name)).expect("read image");
    for w in 0..workloads {
        std::fs::write(d.join("work.qcow2"), &pristine).expect("copy image");
        let seed = 0x9e37_79b9 ^ (w << 8) ^ name.len() as u64;
        let run = workload(d, "work.qcow2", seed, 3, discards);
        let events = run.rec.events().len();
        if std::env::var("QBLK_CRASH_DUMP").is_ok_and(|v| v == w.to_string()) {
            for (i, e) in run.rec.events().iter().enumerate() {
                match e {
                    qblk_engine::fault::Event::Write { id, offset, data } => {
                        eprintln!("{i}: write #{id} at {offset:#x} len {:#x}", data.len())
                    }
                    other => eprintln!("{i}: {other:?}"),
                }
            }
        }
        let mut rng = Lcg(seed ^ 0x5555);
        // A cut after every completed write and every completed sync
        // (the boundaries at which the disk's state can change; writes
        // still in flight are in the model as possibly landed).
        let history = run.rec.events();
        // After a process crash every completed write and every journal
        // store counts, and every acknowledgement changes what must read
        // back.
        let cuts: Vec<usize> = (0..events)
            .filter(|&i| {
                matches!(
                    (crash_kind, &history[i]),
                    (_, qblk_engine::fault::Event::Done { .. })
                        | (Crash::PowerCut, qblk_engine::fault::Event::Synced { .. })
                        | (
                            Crash::Process,
                            qblk_engine::fault::Event::JournalStore { .. }
                                | qblk_engine::fault::Event::Marker { .. },
                        )
                )
            })
            .collect();
        for (n, &cut) in cuts.iter().enumerate() {
            let qemu = n % 50 == 0 || n + 1 == cuts.len();
            verify(
                d,
                &run,
                crash_kind,
                cut,
                &mut rng,
                qemu,
                &format!("{name} workload {w}"),
            );
            cuts_checked += 1;
        }
    }
    eprintln!(
        "crash test, {kind}, {crash_kind:?}: {workloads} workloads, {cuts_checked} cuts verified"
    );
    assert!(cuts_checked as u64 >= workloads * 10);
    cuts_checked
}

macro_rules! kind_tests {
    ($($test:ident, $process:ident => $kind:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                crashes($kind, Crash::PowerCut);
            }

            #[test]
            fn $process() {
                crashes($kind, Crash::Process);
            }
        )*
    };
}

kind_tests! {
    power_cuts_default, process_crashes_default => "default.qcow2",
    power_cuts_lazy_refcounts, process_crashes_lazy_refcounts => "lazy.qcow2",
    power_cuts_extended_l2, process_crashes_extended_l2 => "xl2.qcow2",
    power_cuts_refcount_bits_1, process_crashes_refcount_bits_1 => "rb1.qcow2",
    power_cuts_512_byte_clusters, process_crashes_512_byte_clusters => "c512.qcow2",
    power_cuts_2m_clusters, process_crashes_2m_clusters => "c2m.qcow2",
    power_cuts_raw_backing_file, process_crashes_raw_backing_file => "backed.qcow2",
    power_cuts_compressed_overwritten, process_crashes_compressed_overwritten => "zip.qcow2",
    power_cuts_internal_snapshot, process_crashes_internal_snapshot => "snap.qcow2",
}
