//! Hostile images through the engine: thousands of mutations of real
//! images (the fuzz corpus seeds) are opened, read end to end, mapped,
//! checked and written to. Every one must either be refused with an error or
//! served, without a panic, a hang or an allocation the file does not
//! justify: each case runs on a worker thread under a deadline
//! ([`CASE_TIMEOUT`]), and a counting global allocator bounds the heap it
//! may use at its peak ([`PEAK_BOUND`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qblk_engine::check::check;
use qblk_engine::file::CacheMode;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

mod common;
use common::*;

/// How long one mutated image may take from open to check. The slowest
/// case takes some 20 ms in a debug build (the engine is optimised even
/// there); the margin covers a loaded 2-core CI machine and a slower
/// disk, and a case beyond it is looping, not slow.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most heap one case may hold at its peak, above what was live when it
/// started. The seeds are at most 64 KiB, so every table a mutated header
/// can make the engine load from the file (L1, refcount table, snapshot
/// table, bitmap directory) is at most that; the largest single structure
/// the engine holds is one cluster, at most 2 MiB (an L2 table, a refcount
/// block, a compressed cluster's buffer), and 8 MiB of reads touch only a
/// few of them, far from the caches' budgets. With this test's own
/// buffers (100 kB of reads, 5000 bytes of writes, 1 MiB write-zeroes),
/// eight 2 MiB clusters and the buffers fit in 16 MiB; the largest peak
/// seen is under 3 MiB (512-byte clusters, writable). What this catches is a
/// buffer sized from a header field alone: an L1 table of millions of
/// entries, a refcount array for a size the file does not have.
const PEAK_BOUND: usize = 16 << 20;

/// The system allocator, counting the bytes live now and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every method hands the request to `System` unchanged and only
// adds bookkeeping on the side, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which we forward.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with
        // this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s
        // contract for `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/header");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz corpus")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .filter(|(n, _)| n.starts_with("seed-"))
        .collect();
    out.sort();
    out
}

/// One mutated image: opened (read-only or writable), read, mapped,
/// written and checked. True if the engine opened it.
fn exercise(path: &Path, writable: bool) -> bool {
    block_on(async {
        let opts = OpenOptions {
            writable,
            cache: CacheMode::Writeback,
            ..OpenOptions::default()
        };
        let img = match Image::open(path, &opts).await {
            Ok(img) => img,
            Err(_) => return false,
        };
        let size = img.size();
        // Read up to 8 MiB of it, in odd-sized pieces.
        let mut pos = 0;
        let mut buf = vec![0u8; 100_000];
        while pos < size.min(8 << 20) {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let _ = img.read(pos, &mut buf[..n]).await;
            pos += n as u64;
        }
        if size <= 1 << 40 {
            let _ = img.map().await;
        }
        if writable && size > 0 {
            let _ = img
                .write(rng_offset(size), &vec![0x5a; 5000.min(size as usize)])
                .await;
            let _ = img.write_zeroes(0, size.min(1 << 20), true).await;
            let _ = img.discard(0, size.min(1 << 20)).await;
            let _ = img.flush().await;
            let _ = img.close().await;
        }
        let _ = check(path, CacheMode::Writeback, false).await;
        true
    })
}

/// A case for the worker: the image, whether to open it writable, and
/// whether it is the first (where the `QBLK_BREAK` switches act).
struct Case {
    path: PathBuf,
    writable: bool,
    first: bool,
}

#[test]
fn mutated_images_never_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = Lcg(0x0bad_5eed);
    let mut opened = 0;
    let mut refused = 0;
    // One worker runs the cases; this thread holds the deadline. A case
    // that overruns it fails the test at once (the worker is left behind,
    // stuck, and goes with the test process).
    let (to_worker, cases) = mpsc::channel::<Case>();
    let (to_main, outcomes) = mpsc::channel::<bool>();
    let hang = broken("hostile-hang");
    let hog = broken("hostile-alloc");
    let worker = std::thread::spawn(move || {
        for case in cases {
            if case.first && hang {
                std::thread::sleep(CASE_TIMEOUT + Duration::from_secs(1));
            }
            if case.first && hog {
                std::hint::black_box(vec![1u8; PEAK_BOUND + 1]);
            }
            let outcome = exercise(&case.path, case.writable);
            if to_main.send(outcome).is_err() {
                return;
            }
        }
    });
    let mut worst_peak = (0, String::new());
    let mut slowest = (Duration::ZERO, String::new());
    for (name, seed) in seeds() {
        for round in 0..150 {
            let mut bytes = seed.clone();
            // A few byte changes, mostly in the header and first tables.
            for _ in 0..1 + rng.next(6) {
                let limit = if rng.next(3) == 0 {
                    bytes.len() as u64
                } else {
                    1024.min(bytes.len() as u64)
                };
                let at = rng.next(limit) as usize;
                bytes[at] = match rng.next(4) {
                    0 => 0,
                    1 => 0xff,
                    2 => bytes[at] ^ (1 << rng.next(8)),
                    _ => rng.next(256) as u8,
                };
            }
            let case_name = format!("{name}-{round}");
            let path = tmp.path().join(format!("{case_name}.qcow2"));
            std::fs::write(&path, &bytes).expect("write image");
            drop(bytes);
            let writable = rng.next(2) == 0;
            // The peak is measured from what is live now, so only this
            // case's allocations count.
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let started = Instant::now();
            to_worker
                .send(Case {
                    path,
                    writable,
                    first: opened + refused == 0,
                })
                .expect("the worker takes cases");
            let outcome = match outcomes.recv_timeout(CASE_TIMEOUT) {
                Ok(outcome) => outcome,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{case_name} (writable: {writable}) did not finish within \
                     {CASE_TIMEOUT:?}: the engine hangs on it"
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The worker panicked: report its panic, not ours.
                    drop(to_worker);
                    match worker.join() {
                        Err(panic) => std::panic::resume_unwind(panic),
                        Ok(()) => panic!("{case_name}: the worker quit"),
                    }
                }
            };
            let took = started.elapsed();
            let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
            assert!(
                peak <= PEAK_BOUND,
                "{case_name} (writable: {writable}) allocated a peak of {peak} bytes, \
                 more than the {PEAK_BOUND} a {}-byte image justifies",
                seed.len()
            );
            if peak > worst_peak.0 {
                worst_peak = (peak, case_name.clone());
            }
            if took > slowest.0 {
                slowest = (took, case_name);
            }
            if outcome {
                opened += 1;
            } else {
                refused += 1;
            }
        }
    }
    drop(to_worker);
    worker.join().expect("worker");
    eprintln!(
        "largest peak heap of a case: {} bytes ({}); slowest case: {:?} ({})",
        worst_peak.0, worst_peak.1, slowest.0, slowest.1
    );
    // The mutations must exercise both paths.
    assert!(
        opened > 50 && refused > 50,
        "opened {opened}, refused {refused}"
    );
}

fn rng_offset(size: u64) -> u64 {
    (size / 3).saturating_sub(5000) / 512 * 512
}
