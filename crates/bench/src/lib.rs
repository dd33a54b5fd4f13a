//! `qblk bench`: a VM-less load generator for any vhost-user-blk socket.
//!
//! It connects with blkio's virtio-blk-vhost-user driver (so it measures
//! qblk and qemu-storage-daemon alike), runs one thread per queue that keeps
//! `iodepth` requests in flight, and records every request's latency in an
//! HDR histogram. A progress line on stderr shows the rate while it runs.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;
use serde::Serialize;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    /// Random, half reads and half writes.
    RandRw,
}

impl Rw {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            "read" => Self::Read,
            "write" => Self::Write,
            "randrw" => Self::RandRw,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::Read => "read",
            Self::Write => "write",
            Self::RandRw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub socket: PathBuf,
    pub rw: Rw,
    /// Request size in bytes (a multiple of 512).
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: usize,
    pub queues: usize,
    pub runtime: Duration,
    /// The part of the disk to use, from offset 0 (default: all of it).
    pub span: Option<u64>,
    /// Random offsets are multiples of this (default: `bs`). Like fio's
    /// random map, each is visited once before any repeats, so
    /// `--stride 64k` on an empty image makes every write allocate.
    pub stride: Option<u64>,
    /// The commit pattern: writes in batches of this many (at once), each
    /// batch followed, once it completed, by a flush that completes before
    /// the next batch (1: write, flush, write, flush). `iodepth` does not
    /// apply. `None`: no flushes.
    pub fsync_every: Option<usize>,
    /// Print the progress line on stderr.
    pub progress: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub rw: &'static str,
    pub bs: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub span: u64,
    pub seconds: f64,
    pub ops: u64,
    /// Of `ops`, the reads and the writes (each `bs` bytes).
    pub reads: u64,
    pub writes: u64,
    pub iops: f64,
    /// Megabytes (10^6 bytes) per second.
    pub mbps: f64,
    pub lat_us: Latency,
    /// With `fsync_every`: flushes completed (not counted in `ops`) and
    /// their latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flushes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_lat_us: Option<Latency>,
}

impl BenchResult {
    /// The human summary.
    pub fn human(&self) -> String {
        let flushes = match (self.flushes, &self.flush_lat_us) {
            (Some(n), Some(l)) => format!(
                "; {n} flushes, latency p50 {:.1} us, p99 {:.1} us",
                l.p50, l.p99
            ),
            _ => String::new(),
        };
        format!(
            "{} bs={} iodepth={} queues={}: {:.0} IOPS, {:.1} MB/s, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} I/Os in {:.1} s){flushes}",
            self.rw,
            self.bs,
            self.iodepth,
            self.queues,
            self.iops,
            self.mbps,
            self.lat_us.p50,
            self.lat_us.p99,
            self.lat_us.p999,
            self.ops,
            self.seconds
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Blkio {
        what: String,
        #[source]
        source: blkio::Error,
    },
    #[error("a request failed: {0}")]
    Io(String),
}

fn blkio_err(what: &str) -> impl FnOnce(blkio::Error) -> BenchError + '_ {
    move |source| BenchError::Blkio {
        what: what.to_owned(),
        source,
    }
}

/// xorshift64*: cheap, deterministic offsets and data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A random permutation of `0..n` (a full-period LCG over the next power
/// of two, skipping values past `n`): random order, no repeats per pass.
struct Permutation {
    n: u64,
    mask: u64,
    x: u64,
    mul: u64,
    add: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let m = n.max(1).next_power_of_two();
        Self {
            n: n.max(1),
            mask: m - 1,
            x: seed & (m - 1),
            // a ≡ 1 (mod 4) and c odd give the full period m.
            mul: (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) & !3) | 1 | 4,
            add: (seed >> 7) | 1,
        }
    }

    fn next(&mut self) -> u64 {
        loop {
            self.x = self.x.wrapping_mul(self.mul).wrapping_add(self.add) & self.mask;
            if self.x < self.n {
                return self.x;
            }
        }
    }
}

/// One queue's worker: keeps `iodepth` requests in flight until `stop`.
struct Worker {
    queue: Blkioq,
    base: usize,
    rw: Rw,
    bs: u64,
    iodepth: usize,
    /// This worker's part of the span: [start, start + len).
    start: u64,
    len: u64,
    stride: u64,
    perm: Permutation,
    rng: Rng,
    next_seq: u64,
}

struct WorkerOut {
    hist: Histogram<u64>,
    ops: u64,
    writes: u64,
    /// The commit pattern's flushes.
    flush_hist: Histogram<u64>,
    error: Option<String>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds are valid")
}

/// Waits for at least one completion into `completions` (at most 30 s).
fn wait_some(
    queue: &mut Blkioq,
    completions: &mut [MaybeUninit<Completion>],
) -> Result<usize, String> {
    let mut timeout = Duration::from_secs(30);
    match queue.do_io(completions, 1, Some(&mut timeout), None) {
        Ok(0) => Err("no completion within 30 s".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("do_io: {e}")),
    }
}

impl Worker {
    fn offset(&mut self) -> u64 {
        if self.rw.random() {
            self.start + self.perm.next() * self.stride
        } else {
            let slots = self.len / self.bs;
            let o = self.start + self.next_seq * self.bs;
            self.next_seq = (self.next_seq + 1) % slots;
            o
        }
    }

    /// Submits a request into `slot`; whether it is a write.
    fn submit(&mut self, slot: usize) -> bool {
        let offset = self.offset();
        let write = match self.rw {
            Rw::RandWrite | Rw::Write => true,
            Rw::RandRead | Rw::Read => false,
            Rw::RandRw => self.rng.next() & 1 == 1,
        };
        let buf = self.base + slot * self.bs as usize;
        if write {
            self.queue.write(
                offset,
                buf as *const u8,
                self.bs as usize,
                slot,
                ReqFlags::empty(),
            );
        } else {
            self.queue.read(
                offset,
                buf as *mut u8,
                self.bs as usize,
                slot,
                ReqFlags::empty(),
            );
        }
        write
    }

    /// The commit pattern: `batch` writes at once, then a flush once they
    /// completed, until `stop`. Write latency is a write's own; a flush's
    /// is from its submission.
    fn run_commits(mut self, batch: usize, stop: &AtomicBool, done_ops: &AtomicU64) -> WorkerOut {
        let mut hist = new_histogram();
        let mut flush_hist = new_histogram();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..batch).map(|_| MaybeUninit::uninit()).collect();
        let mut started = vec![Instant::now(); batch];
        let mut ops = 0u64;
        let mut error = None;
        'outer: while !stop.load(Ordering::Relaxed) {
            for (slot, at) in started.iter_mut().enumerate() {
                *at = Instant::now();
                self.submit(slot);
            }
            let mut left = batch;
            while left > 0 {
                let n = match wait_some(&mut self.queue, &mut completions) {
                    Ok(n) => n,
                    Err(e) => {
                        error = Some(e);
                        break 'outer;
                    }
                };
                let now = Instant::now();
                for c in &completions[..n] {
                    // SAFETY: do_io initialised the first `n` completions.
                    let c = unsafe { c.assume_init_ref() };
                    if c.ret != 0 && error.is_none() {
                        error = Some(format!("write failed with {}", c.ret));
                    }
                    let slot = c.user_data.min(batch - 1);
                    let ns = now.duration_since(started[slot]).as_nanos() as u64;
                    let _ = hist.record(ns.max(1));
                }
                left = left.saturating_sub(n);
                ops += n as u64;
                done_ops.fetch_add(n as u64, Ordering::Relaxed);
            }
            if error.is_some() {
                break;
            }
            let at = Instant::now();
            self.queue.flush(usize::MAX, ReqFlags::empty());
            match wait_some(&mut self.queue, &mut completions[..1]) {
                Ok(_) => {
                    // SAFETY: do_io initialised the first completion.
                    let c = unsafe { completions[0].assume_init_ref() };
                    if c.ret != 0 {
                        error = Some(format!("flush failed with {}", c.ret));
                        break;
                    }
                    let _ = flush_hist.record((at.elapsed().as_nanos() as u64).max(1));
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        WorkerOut {
            hist,
            ops,
            writes: ops,
            flush_hist,
            error,
        }
    }

    fn run(mut self, stop: &AtomicBool, done_ops: &AtomicU64) -> WorkerOut {
        let mut hist = new_histogram();
        let mut started = vec![Instant::now(); self.iodepth];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..self.iodepth).map(|_| MaybeUninit::uninit()).collect();
        let mut is_write = vec![false; self.iodepth];
        for (slot, at) in started.iter_mut().enumerate() {
            *at = Instant::now();
            is_write[slot] = self.submit(slot);
        }
        let mut inflight = self.iodepth;
        let mut ops = 0u64;
        let mut writes = 0u64;
        let mut error = None;
        while inflight > 0 {
            let mut timeout = Duration::from_secs(30);
            let n = match self
                .queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
            {
                Ok(0) => {
                    error = Some("no completion within 30 s".into());
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    error = Some(format!("do_io: {e}"));
                    break;
                }
            };
            let now = Instant::now();
            let stopping = stop.load(Ordering::Relaxed);
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                if c.ret != 0 && error.is_none() {
                    error = Some(format!("request failed with {}", c.ret));
                }
                let ns = now.duration_since(started[slot]).as_nanos() as u64;
                let _ = hist.record(ns.max(1));
                ops += 1;
                writes += u64::from(is_write[slot]);
                if stopping || error.is_some() {
                    inflight -= 1;
                } else {
                    started[slot] = Instant::now();
                    is_write[slot] = self.submit(slot);
                }
            }
            done_ops.fetch_add(n as u64, Ordering::Relaxed);
        }
        WorkerOut {
            hist,
            ops,
            writes,
            flush_hist: new_histogram(),
            error,
        }
    }
}

/// Connects to the socket and runs the workload.
pub fn run(opts: &BenchOptions) -> Result<BenchResult, BenchError> {
    if opts.bs == 0 || opts.bs % 512 != 0 {
        return Err(BenchError::Usage(format!(
            "--bs {} is not a positive multiple of 512",
            opts.bs
        )));
    }
    if opts.iodepth == 0 || opts.iodepth > 1024 {
        return Err(BenchError::Usage(format!(
            "--iodepth {} is outside 1..=1024",
            opts.iodepth
        )));
    }
    if let Some(n) = opts.fsync_every {
        if n == 0 || n > 1024 {
            return Err(BenchError::Usage(format!(
                "--fsync-every {n} is outside 1..=1024"
            )));
        }
        if !matches!(opts.rw, Rw::RandWrite | Rw::Write) {
            return Err(BenchError::Usage(
                "--fsync-every is the commit pattern: --rw randwrite or write".into(),
            ));
        }
    }
    // The commit pattern keeps a batch in flight, not --iodepth.
    let depth = opts.fsync_every.unwrap_or(opts.iodepth);
    if opts.queues == 0 || opts.queues > 64 {
        return Err(BenchError::Usage(format!(
            "--queues {} is outside 1..=64",
            opts.queues
        )));
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("blkio"))?;
    let path = opts
        .socket
        .to_str()
        .ok_or_else(|| BenchError::Usage("the socket path is not UTF-8".into()))?;
    b.set_str("path", path).map_err(blkio_err("path"))?;
    if matches!(opts.rw, Rw::RandRead | Rw::Read) {
        // Lets a read-only export be measured too.
        b.set_bool("read-only", true)
            .map_err(blkio_err("read-only"))?;
    }
    b.connect().map_err(blkio_err(&format!(
        "connecting to {}",
        opts.socket.display()
    )))?;
    b.set_i32("num-queues", opts.queues as i32)
        .map_err(blkio_err("num-queues"))?;
    let capacity = b.get_u64("capacity").map_err(blkio_err("capacity"))?;
    let span = opts.span.unwrap_or(capacity).min(capacity);
    let stride = opts.stride.unwrap_or(opts.bs);
    if stride < opts.bs || stride % 512 != 0 {
        return Err(BenchError::Usage(format!(
            "--stride {stride} must be a multiple of 512 and at least --bs"
        )));
    }
    let per_queue = span / opts.queues as u64 / stride * stride;
    if per_queue < stride {
        return Err(BenchError::Usage(format!(
            "span {span} is too small for {} queues of {}-byte requests",
            opts.queues, opts.bs
        )));
    }
    let started = b.start().map_err(blkio_err("start"))?;
    let region_len = opts.queues * depth * opts.bs as usize;
    let region = b
        .alloc_mem_region(region_len.next_multiple_of(2 << 20))
        .map_err(blkio_err("allocating buffers"))?;
    b.map_mem_region(&region)
        .map_err(blkio_err("mapping buffers"))?;
    // Incompressible, non-zero data for writes.
    {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // SAFETY: the region is region.len bytes of writable memory that
        // blkio allocated for us, page-aligned, and nothing else uses it yet.
        let words =
            unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u64, region.len / 8) };
        for w in words {
            *w = rng.next();
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done_ops = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let outs = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for (i, queue) in started.queues.into_iter().enumerate() {
        let w = Worker {
            queue,
            base: region.addr + i * depth * opts.bs as usize,
            rw: opts.rw,
            bs: opts.bs,
            iodepth: depth,
            start: i as u64 * per_queue,
            len: per_queue,
            stride,
            perm: Permutation::new(
                (per_queue - opts.bs) / stride + 1,
                0x5eed ^ (i as u64).wrapping_mul(0x1000_0001),
            ),
            rng: Rng(0x1234_5678_9abc_def1 ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9)),
            next_seq: 0,
        };
        let stop = stop.clone();
        let done = done_ops.clone();
        let outs = outs.clone();
        let fsync_every = opts.fsync_every;
        threads.push(std::thread::spawn(move || {
            let out = match fsync_every {
                Some(n) => w.run_commits(n, &stop, &done),
                None => w.run(&stop, &done),
            };
            if let Ok(mut o) = outs.lock() {
                o.push(out);
            }
        }));
    }
    // Progress, once a second, until the runtime is up.
    let mut last = 0u64;
    let mut last_t = begin;
    while begin.elapsed() < opts.runtime {
        let left = opts.runtime.saturating_sub(begin.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(1)));
        if opts.progress {
            let now = done_ops.load(Ordering::Relaxed);
            let t = Instant::now();
            let rate = (now - last) as f64 / t.duration_since(last_t).as_secs_f64().max(1e-9);
            eprint!(
                "\r[{:>4.0}s/{:.0}s] {:>9.0} IOPS {:>8.1} MB/s   ",
                begin.elapsed().as_secs_f64(),
                opts.runtime.as_secs_f64(),
                rate,
                rate * opts.bs as f64 / 1e6
            );
            last = now;
            last_t = t;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let seconds = begin.elapsed().as_secs_f64();
    if opts.progress {
        eprintln!();
    }
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);

    let outs = std::mem::take(
        &mut *outs
            .lock()
            .map_err(|_| BenchError::Io("worker panicked".into()))?,
    );
    if outs.len() != opts.queues {
        return Err(BenchError::Io("a worker thread panicked".into()));
    }
    let mut hist = new_histogram();
    let mut flush_hist = new_histogram();
    let mut ops = 0;
    let mut writes = 0;
    for o in outs {
        if let Some(e) = o.error {
            return Err(BenchError::Io(e));
        }
        ops += o.ops;
        writes += o.writes;
        hist.add(&o.hist)
            .map_err(|e| BenchError::Io(format!("merging histograms: {e}")))?;
        flush_hist
            .add(&o.flush_hist)
            .map_err(|e| BenchError::Io(format!("merging histograms: {e}")))?;
    }
    let latency = |h: &Histogram<u64>| {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
            max: h.max() as f64 / 1000.0,
        }
    };
    Ok(BenchResult {
        rw: opts.rw.name(),
        bs: opts.bs,
        iodepth: depth,
        queues: opts.queues,
        span,
        seconds,
        ops,
        reads: ops - writes,
        writes,
        iops: ops as f64 / seconds,
        mbps: ops as f64 * opts.bs as f64 / seconds / 1e6,
        lat_us: latency(&hist),
        flushes: opts.fsync_every.map(|_| flush_hist.len()),
        flush_lat_us: opts.fsync_every.map(|_| latency(&flush_hist)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_visits_each_slot_once_per_pass() {
        for n in [1u64, 2, 3, 7, 100, 1000, 4096, 5000] {
            for seed in [0u64, 1, 0x5eed, 12345] {
                let mut p = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for _ in 0..n {
                    let x = p.next() as usize;
                    assert!(!seen[x], "n={n} seed={seed}: {x} twice");
                    seen[x] = true;
                }
            }
        }
    }
}
