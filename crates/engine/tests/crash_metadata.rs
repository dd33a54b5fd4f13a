//! Crash safety of the metadata operations: internal snapshots (create,
//! delete, apply) and persistent dirty bitmaps (store, add, clear,
//! remove), between guest writes, with a simulated power cut after every
//! completed write and sync of the history (see `crash.rs` for the
//! recorder). After each cut the image opens, qblk's check finds no
//! corruption, what was flushed (every operation here ends durable) reads
//! back, and every snapshot present reads what the disk held when it was
//! taken; `qemu-img check` and QEMU's reading of the snapshots confirm a
//! sample of the cuts.

use std::path::Path;

use qblk_engine::fault::{Crash, Event, Recorder};
use qblk_engine::file::CacheMode;
use qblk_engine::image::{Image, OpenOptions};
use qblk_engine::runtime::block_on;

mod common;
use common::*;

const SIZE: usize = 8 << 20;

fn opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        cache: CacheMode::Writeback,
        ..OpenOptions::default()
    }
}

/// The steps of the session, and what the guest disk holds after each.
#[derive(Debug, Clone, Copy)]
enum Step {
    Writes(u8),
    SnapshotCreate(&'static str),
    SnapshotDelete(&'static str),
    SnapshotApply(&'static str),
    BitmapAdd(&'static str),
    BitmapClear(&'static str),
    BitmapRemove(&'static str),
}

const STEPS: &[Step] = &[
    Step::Writes(1),
    Step::SnapshotCreate("s1"),
    Step::Writes(2),
    Step::BitmapAdd("b1"),
    Step::SnapshotCreate("s2"),
    Step::Writes(3),
    Step::SnapshotDelete("s1"),
    Step::BitmapClear("b0"),
    Step::Writes(4),
    Step::SnapshotApply("s2"),
    Step::BitmapRemove("b1"),
    Step::Writes(5),
];

/// Writes of pass `tag`: a few ranges over the disk, some overwriting
/// clusters a snapshot shares.
fn writes(tag: u8) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Lcg(u64::from(tag) * 7919);
    (0..6)
        .map(|_| {
            let len = 512 * (1 + rng.next(300)) as usize;
            let off = 512 * rng.next(((SIZE - len) / 512) as u64);
            (
                off,
                (0..len)
                    .map(|i| tag.wrapping_mul(37).wrapping_add((i / 512) as u8))
                    .collect(),
            )
        })
        .collect()
}

struct Run {
    rec: std::sync::Arc<Recorder>,
    /// (event index at which step i completed, disk content after it).
    done: Vec<(usize, Vec<u8>)>,
    start: Vec<u8>,
}

fn session(path: &Path) -> Run {
    let start = vec![0u8; SIZE];
    let rec = Recorder::attach(path).expect("attach recorder");
    let mut model = start.clone();
    let mut snaps: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut done = Vec::new();
    block_on(async {
        let img = Image::open(path, &opts(true)).await.expect("open rw");
        for step in STEPS {
            match *step {
                Step::Writes(tag) => {
                    for (off, data) in writes(tag) {
                        img.write(off, &data).await.expect("write");
                        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                    }
                    img.flush().await.expect("flush");
                }
                Step::SnapshotCreate(n) => {
                    img.snapshot_create(n).await.expect("snapshot create");
                    snaps.push((n, model.clone()));
                }
                Step::SnapshotDelete(n) => img.snapshot_delete(n).await.expect("snapshot delete"),
                Step::SnapshotApply(n) => {
                    img.snapshot_apply(n).await.expect("snapshot apply");
                    model = snaps.iter().find(|s| s.0 == n).expect("taken").1.clone();
                }
                Step::BitmapAdd(n) => img.bitmap_add(n, 65536, true).await.expect("bitmap add"),
                Step::BitmapClear(n) => img.bitmap_clear(n).await.expect("bitmap clear"),
                Step::BitmapRemove(n) => img.bitmap_remove(n).await.expect("bitmap remove"),
            }
            done.push((rec.mark(0), model.clone()));
        }
        img.close().await.expect("close");
        done.push((rec.mark(0), model.clone()));
    });
    Recorder::detach(path);
    Run { rec, done, start }
}

/// What each snapshot read when it was taken: (name, content, event of
/// its creation's completion, event its deletion started at).
fn snapshot_models(run: &Run) -> Vec<(&'static str, &[u8], usize, usize)> {
    let mut out = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        if let Step::SnapshotCreate(n) = step {
            let before = if i == 0 {
                &run.start
            } else {
                &run.done[i - 1].1
            };
            let deleted = STEPS
                .iter()
                .position(|s| matches!(s, Step::SnapshotDelete(m) if m == n))
                .map_or(usize::MAX, |j| run.done[j - 1].0);
            out.push((*n, before.as_slice(), run.done[i].0, deleted));
        }
    }
    out
}

#[test]
fn snapshot_and_bitmap_operations_survive_power_cuts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "work.qcow2",
            "8M",
        ],
    );
    sh(d, &["qemu-img", "bitmap", "--add", "work.qcow2", "b0"]);
    let run = session(&d.join("work.qcow2"));
    let history = run.rec.events();
    let cuts: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i], Event::Done { .. } | Event::Synced { .. }))
        .collect();
    let snaps = snapshot_models(&run);
    let mut rng = Lcg(42);
    for (n, &cut) in cuts.iter().enumerate() {
        let bytes = run
            .rec
            .image_after(Crash::PowerCut, cut, &mut |k| rng.next(k));
        let crash = d.join("crash.qcow2");
        std::fs::write(&crash, &bytes).expect("write crash image");
        // What must read back: the disk after the last step that completed
        // before the cut (each ends with everything durable); the step in
        // progress may have landed or not, so its own result counts too.
        let completed = run.done.iter().filter(|(e, _)| *e <= cut).count();
        let before = match completed {
            0 => &run.start,
            k => &run.done[k - 1].1,
        };
        let after = run.done.get(completed).map(|(_, m)| m);
        let (got, present) = block_on(async {
            let img = Image::open(&crash, &opts(true))
                .await
                .unwrap_or_else(|e| panic!("cut {cut}: reopen failed: {e}"));
            let mut buf = vec![0u8; SIZE];
            img.read(0, &mut buf).await.expect("read");
            let present: Vec<String> = img
                .snapshots()
                .await
                .expect("snapshots")
                .iter()
                .map(|s| s.name_lossy())
                .collect();
            img.close()
                .await
                .unwrap_or_else(|e| panic!("cut {cut}: close failed: {e}"));
            (buf, present)
        });
        match STEPS.get(completed) {
            // Writes not yet flushed may have landed, or partly.
            Some(Step::Writes(tag)) => {
                let exempt = writes(*tag);
                for i in 0..SIZE {
                    let free = exempt
                        .iter()
                        .any(|(o, d)| i >= *o as usize && i < *o as usize + d.len());
                    assert!(
                        free || got[i] == before[i],
                        "cut {cut} (after {completed} steps): flushed byte {i:#x} lost"
                    );
                }
            }
            // The active L1 table is rewritten in place: a cut may tear it
            // between entries (each entry is old or new; no refcount is
            // wrong either way, which the check below covers).
            Some(Step::SnapshotApply(_)) => {}
            _ => assert!(
                got == *before || after.is_some_and(|a| got == *a),
                "cut {cut} (after {completed} steps): the disk reads neither the state before nor after the step in progress"
            ),
        }
        let report = block_on(qblk_engine::check::check(
            &crash,
            CacheMode::Writeback,
            false,
        ))
        .unwrap_or_else(|e| panic!("cut {cut}: check failed: {e}"));
        assert_eq!(report.corruptions, 0, "cut {cut}: {report:?}");
        for (name, _, created, deleted) in &snaps {
            if cut >= *created && cut < *deleted {
                assert!(
                    present.iter().any(|p| p == name),
                    "cut {cut}: snapshot {name} lost"
                );
            }
        }
        if n % 8 == 0 || n + 1 == cuts.len() {
            // Leaks (exit code 3) are allowed: a cut may orphan clusters.
            let out = std::process::Command::new("qemu-img")
                .args(["check", "--output=json", "crash.qcow2"])
                .current_dir(d)
                .output()
                .expect("qemu-img check");
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let v: serde_json::Value = serde_json::from_str(&out).expect("check JSON");
            assert_eq!(
                v["check-errors"].as_u64().unwrap_or(0),
                0,
                "cut {cut}: {out}"
            );
            assert_eq!(
                v["corruptions"].as_u64().unwrap_or(0),
                0,
                "cut {cut}: {out}"
            );
            for p in &present {
                let (_, model, _, _) = snaps
                    .iter()
                    .find(|s| s.0 == p)
                    .unwrap_or_else(|| panic!("cut {cut}: unknown snapshot {p}"));
                sh(
                    d,
                    &[
                        "qemu-img",
                        "convert",
                        "-l",
                        &format!("snapshot.name={p}"),
                        "-O",
                        "raw",
                        "crash.qcow2",
                        "snap.raw",
                    ],
                );
                let read = std::fs::read(d.join("snap.raw")).expect("read snapshot");
                assert!(
                    read == *model,
                    "cut {cut}: snapshot {p} reads differently from when it was taken"
                );
            }
        }
    }
    eprintln!("metadata crash test: {} cuts verified", cuts.len());
    assert!(cuts.len() > 50, "too short a history: {}", cuts.len());
}
