//! Per-queue I/O statistics (`query-blockstats` on the control socket).
//!
//! Each queue's worker counts its own requests in relaxed atomics that
//! only it writes (no cache line shared between workers); readers sum
//! them. A request is timed from when its worker starts it to when its
//! status is written.

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

const KINDS: usize = 5;

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
    /// Requests refused as malformed.
    invalid: AtomicU64,
    in_flight: AtomicU64,
}

impl QueueStats {
    /// A request was taken from the ring.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended (its status is written).
    pub fn finished(&self, kind: Option<Kind>, bytes: u64, ok: bool, took: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(kind) = kind else { return };
        let c = &self.by_kind[kind as usize];
        c.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        c.ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A malformed request was refused.
    pub fn invalid(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, k: Kind) -> [u64; 4] {
        let c = &self.by_kind[k as usize];
        [&c.ops, &c.bytes, &c.failed, &c.ns].map(|a| a.load(Ordering::Relaxed))
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
