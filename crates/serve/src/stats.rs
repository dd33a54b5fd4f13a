//! Per-queue I/O statistics (`query-blockstats` on the control socket,
//! the Prometheus metrics of `metrics.rs`).
//!
//! Each queue's worker counts its own requests in relaxed atomics that
//! only it writes (no cache line shared between workers); readers sum
//! them. One writer means a count can be a plain load and store, with no
//! locked read-modify-write: queue i is served by worker thread i mod
//! `--threads` for the daemon's whole life, and only that thread calls
//! [`QueueStats::started`], [`QueueStats::finished`] and
//! [`QueueStats::invalid`]. A request is timed from when its worker starts it to when its
//! status is written; reads, writes and flushes also land in a latency
//! histogram of fixed buckets ([`LATENCY_BUCKETS_NS`]), one relaxed
//! increment each, so a scrape never takes a lock the workers take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// The kinds of request QEMU's block accounting tells apart (write-zeroes
/// kept apart too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Kind {
    pub const ALL: [Kind; KINDS] = [
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::Discard,
        Kind::WriteZeroes,
    ];

    /// The kind's name in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
        }
    }

    /// The index of the kind's latency histogram, for the kinds that have
    /// one.
    fn timed(self) -> Option<usize> {
        match self {
            Kind::Read => Some(0),
            Kind::Write => Some(1),
            Kind::Flush => Some(2),
            Kind::Discard | Kind::WriteZeroes => None,
        }
    }
}

const KINDS: usize = 5;

/// Adds to a counter only the calling thread writes (see the module's
/// doc): a load and a store, not a locked read-modify-write.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// [`add`]'s opposite.
fn sub(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_sub(n),
        Ordering::Relaxed,
    );
}

/// The kinds with a latency histogram, in their index order.
pub const TIMED_KINDS: [Kind; TIMED] = [Kind::Read, Kind::Write, Kind::Flush];
const TIMED: usize = 3;

/// Upper bounds (inclusive, nanoseconds) of the latency buckets: 1-2-5
/// steps from 10 µs to 10 s; slower requests count in the last, unbounded
/// bucket only.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];
const BUCKETS: usize = LATENCY_BUCKETS_NS.len() + 1;

/// Requests per latency bucket (not cumulative), the last one unbounded.
#[derive(Debug, Default)]
struct Histogram([AtomicU64; BUCKETS]);

impl Histogram {
    fn observe(&self, ns: u64) {
        let i = LATENCY_BUCKETS_NS.partition_point(|&b| b < ns);
        add(&self.0[i], 1);
    }
}

/// What a latency histogram holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Requests per bucket of [`LATENCY_BUCKETS_NS`] (not cumulative),
    /// then the slower ones.
    pub buckets: [u64; BUCKETS],
    /// Their total time in nanoseconds.
    pub sum_ns: u64,
}

/// One kind's counters of a queue at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Requests completed, failed ones included.
    pub ops: u64,
    /// Bytes of the requests that succeeded.
    pub bytes: u64,
    pub failed: u64,
    pub total_ns: u64,
}

#[derive(Debug, Default)]
struct Counter {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    ns: AtomicU64,
}

/// One queue's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    by_kind: [Counter; KINDS],
    latency: [Histogram; TIMED],
    /// Requests refused as malformed.
    invalid: AtomicU64,
    in_flight: AtomicU64,
}

/// Whether requests are counted: always, but in a build made to measure
/// what counting costs (feature `bench-no-request-stats`).
const COUNTING: bool = !cfg!(feature = "bench-no-request-stats");

/// When a request began, for its latency; `None` where nothing is counted.
pub fn clock() -> Option<std::time::Instant> {
    COUNTING.then(std::time::Instant::now)
}

impl QueueStats {
    /// A request was taken from the ring.
    pub fn started(&self) {
        if COUNTING {
            add(&self.in_flight, 1);
        }
    }

    /// A request that began at `began` ([`clock`]) ended (its status is
    /// written).
    pub fn ended(
        &self,
        kind: Option<Kind>,
        bytes: u64,
        ok: bool,
        began: Option<std::time::Instant>,
    ) {
        if let Some(began) = began {
            self.finished(kind, bytes, ok, began.elapsed());
        }
    }

    /// A request ended after `took`.
    pub fn finished(&self, kind: Option<Kind>, bytes: u64, ok: bool, took: Duration) {
        sub(&self.in_flight, 1);
        let Some(kind) = kind else { return };
        let c = &self.by_kind[kind as usize];
        add(&c.ops, 1);
        if ok {
            add(&c.bytes, bytes);
        } else {
            add(&c.failed, 1);
        }
        let ns = took.as_nanos() as u64;
        add(&c.ns, ns);
        if let Some(h) = kind.timed() {
            self.latency[h].observe(ns);
        }
    }

    /// A malformed request was refused.
    pub fn invalid(&self) {
        if !COUNTING {
            return;
        }
        sub(&self.in_flight, 1);
        add(&self.invalid, 1);
    }

    fn get(&self, k: Kind) -> [u64; 4] {
        let c = &self.by_kind[k as usize];
        [&c.ops, &c.bytes, &c.failed, &c.ns].map(|a| a.load(Ordering::Relaxed))
    }

    /// The counters of requests of kind `k`.
    pub fn kind(&self, k: Kind) -> KindSnapshot {
        let [ops, bytes, failed, total_ns] = self.get(k);
        KindSnapshot {
            ops,
            bytes,
            failed,
            total_ns,
        }
    }

    /// The latency histogram of `k`, if it has one (reads, writes,
    /// flushes).
    pub fn latency(&self, k: Kind) -> Option<LatencySnapshot> {
        let h = &self.latency[k.timed()?];
        Some(LatencySnapshot {
            buckets: std::array::from_fn(|i| h.0[i].load(Ordering::Relaxed)),
            sum_ns: self.by_kind[k as usize].ns.load(Ordering::Relaxed),
        })
    }

    /// Requests refused as malformed.
    pub fn invalid_count(&self) -> u64 {
        self.invalid.load(Ordering::Relaxed)
    }

    /// Requests taken from the ring and not finished yet.
    pub fn in_flight_count(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The counters of `queues` summed, in QEMU's `BlockDeviceStats` names,
/// with qblk's write-zeroes and in-flight figures beside them.
pub fn to_json(queues: &[&QueueStats]) -> Value {
    let sum = |k: Kind| {
        queues.iter().fold([0u64; 4], |mut acc, q| {
            for (a, v) in acc.iter_mut().zip(q.get(k)) {
                *a += v;
            }
            acc
        })
    };
    let [rd, rd_b, rd_f, rd_ns] = sum(Kind::Read);
    let [wr, wr_b, wr_f, wr_ns] = sum(Kind::Write);
    let [fl, _, fl_f, fl_ns] = sum(Kind::Flush);
    let [un, un_b, un_f, un_ns] = sum(Kind::Discard);
    let [wz, wz_b, wz_f, wz_ns] = sum(Kind::WriteZeroes);
    let load = |f: fn(&QueueStats) -> &AtomicU64| {
        queues
            .iter()
            .map(|q| f(q).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    json!({
        "rd_operations": rd, "rd_bytes": rd_b, "failed_rd_operations": rd_f, "rd_total_time_ns": rd_ns,
        "wr_operations": wr, "wr_bytes": wr_b, "failed_wr_operations": wr_f, "wr_total_time_ns": wr_ns,
        "flush_operations": fl, "failed_flush_operations": fl_f, "flush_total_time_ns": fl_ns,
        "unmap_operations": un, "unmap_bytes": un_b, "failed_unmap_operations": un_f, "unmap_total_time_ns": un_ns,
        "zone_append_operations": 0, "zone_append_bytes": 0,
        "x-write-zeroes-operations": wz, "x-write-zeroes-bytes": wz_b,
        "x-failed-write-zeroes-operations": wz_f, "x-write-zeroes-total-time-ns": wz_ns,
        "x-invalid-operations": load(|q| &q.invalid),
        "x-in-flight": load(|q| &q.in_flight),
        "account_invalid": true, "account_failed": true,
        "timed_stats": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_bucket_of_their_bound() {
        let q = QueueStats::default();
        let ms = Duration::from_millis;
        for (kind, took) in [
            (Kind::Read, Duration::from_nanos(1)),
            (Kind::Read, Duration::from_micros(10)),
            (Kind::Read, Duration::from_nanos(10_001)),
            (Kind::Read, ms(3)),
            (Kind::Read, Duration::from_secs(11)),
            (Kind::Write, ms(1)),
            (Kind::Discard, ms(1)),
        ] {
            q.started();
            q.finished(Some(kind), 4096, true, took);
        }
        let r = q.latency(Kind::Read).expect("reads are timed");
        let mut want = [0u64; BUCKETS];
        want[0] = 2; // 1 ns and exactly 10 µs
        want[1] = 1; // just over 10 µs
        want[8] = 1; // 3 ms: (2 ms, 5 ms]
        want[BUCKETS - 1] = 1; // beyond 10 s
        assert_eq!(r.buckets, want);
        assert_eq!(r.sum_ns, 1 + 10_000 + 10_001 + 3_000_000 + 11_000_000_000);
        let w = q.latency(Kind::Write).expect("writes are timed");
        assert_eq!(w.buckets[6], 1, "1 ms is the (500 µs, 1 ms] bucket");
        assert!(q.latency(Kind::Discard).is_none());
        assert_eq!(q.kind(Kind::Read).ops, 5);
        assert_eq!(q.kind(Kind::Read).bytes, 5 * 4096);
        assert_eq!(q.in_flight_count(), 0);
    }
}

/// What counting one request costs, in isolation from everything a
/// benchmark run adds to its noise.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore = "a measurement: cargo test --release -p qblk-serve --lib counting_cost -- --ignored --nocapture"]
    fn counting_cost() {
        let q = QueueStats::default();
        let n = 20_000_000u64;
        let took = |i: u64| Duration::from_nanos(5_000 + (i * 7919) % 2_000_000);
        let t = std::time::Instant::now();
        for i in 0..n {
            q.started();
            q.finished(Some(Kind::Read), 4096, true, std::hint::black_box(took(i)));
        }
        let per_request = t.elapsed().as_nanos() as f64 / n as f64;
        let h = Histogram::default();
        let t = std::time::Instant::now();
        for i in 0..n {
            h.observe(std::hint::black_box(took(i)).as_nanos() as u64);
        }
        let per_observation = t.elapsed().as_nanos() as f64 / n as f64;
        let t = std::time::Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            sum = sum.wrapping_add(std::hint::black_box(took(i)).as_nanos() as u64);
        }
        let per_duration = t.elapsed().as_nanos() as f64 / n as f64;
        std::hint::black_box(sum);
        println!(
            "started + finished: {per_request:.2} ns per request, of which the histogram {per_observation:.2} ns (making the durations: {per_duration:.2} ns)"
        );
    }
}
