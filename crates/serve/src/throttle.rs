//! I/O throttling: per-disk limits on reads and writes across all queues,
//! QEMU's (`block_set_io_throttle`, `-drive throttling.*`, the
//! `throttle-group` object's `limits.*`) with QEMU's semantics
//! (`util/throttle.c`), so the numbers operators already use mean the
//! same here.
//!
//! Six leaky buckets: bytes and operations, each for all requests, reads
//! and writes. A bucket with a rate `avg` leaks `avg` units a second and
//! holds `avg / 10` before a request has to wait — or, with a burst rate
//! `max`, `max * max_length`, drained at no more than `max` a second
//! (a second bucket of `max / 10` leaking `max` a second). A request
//! adds its bytes to the byte buckets and one operation (or `bytes /
//! iops_size` of them, when `iops_size` is set and smaller) to the
//! operation buckets of its direction and of the totals.
//!
//! Unlike QEMU, which checks the buckets again after each wait and keeps
//! throttled requests in a queue, a request here takes its share at once
//! and learns how long to wait: the waits of requests that arrive together
//! add up, so they leave in arrival order at the limited rate, without a
//! queue or a timer of the throttle's own. With no limit set, a request
//! pays one relaxed load ([`Throttle::admit`]). Discards and flushes are
//! not throttled (as in QEMU); write-zeroes count as writes of their
//! length.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::lock;

/// QEMU's THROTTLE_VALUE_MAX: the largest rate or length accepted.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One bucket's limit: a rate, an optional burst rate, and how many
/// seconds a burst may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Units a second; 0: unlimited.
    pub avg: u64,
    /// Burst rate, units a second; 0: no burst beyond `avg / 10`.
    pub max: u64,
    /// Seconds a burst at `max` may last (at least 1).
    pub max_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Self {
            avg: 0,
            max: 0,
            max_length: 1,
        }
    }
}

/// The buckets, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BpsTotal,
    BpsRead,
    BpsWrite,
    IopsTotal,
    IopsRead,
    IopsWrite,
}

const KINDS: [Kind; 6] = [
    Kind::BpsTotal,
    Kind::BpsRead,
    Kind::BpsWrite,
    Kind::IopsTotal,
    Kind::IopsRead,
    Kind::IopsWrite,
];

impl Kind {
    /// QMP's name (`block_set_io_throttle`): `bps`, `iops_rd`, ...
    fn qmp(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps",
            Kind::BpsRead => "bps_rd",
            Kind::BpsWrite => "bps_wr",
            Kind::IopsTotal => "iops",
            Kind::IopsRead => "iops_rd",
            Kind::IopsWrite => "iops_wr",
        }
    }

    /// The throttle-group and `-drive throttling.` name: `bps-total`, ...
    fn option(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps-total",
            Kind::BpsRead => "bps-read",
            Kind::BpsWrite => "bps-write",
            Kind::IopsTotal => "iops-total",
            Kind::IopsRead => "iops-read",
            Kind::IopsWrite => "iops-write",
        }
    }

    fn counts_bytes(self) -> bool {
        matches!(self, Kind::BpsTotal | Kind::BpsRead | Kind::BpsWrite)
    }

    /// Whether a request in this direction fills the bucket.
    fn applies(self, write: bool) -> bool {
        match self {
            Kind::BpsTotal | Kind::IopsTotal => true,
            Kind::BpsRead | Kind::IopsRead => !write,
            Kind::BpsWrite | Kind::IopsWrite => write,
        }
    }
}

/// Every limit of a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    limits: [Limit; 6],
    /// Requests larger than this count as several operations; 0: off.
    pub iops_size: u64,
}

impl Config {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.limits.iter().all(|l| l.avg == 0)
    }

    fn limit(&self, k: Kind) -> &Limit {
        &self.limits[k as usize]
    }

    /// QEMU's checks (`throttle_is_valid`), with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let l = |k: Kind| self.limit(k);
        let both = |t: Kind, r: Kind, w: Kind, f: fn(&Limit) -> u64| {
            f(l(t)) != 0 && (f(l(r)) != 0 || f(l(w)) != 0)
        };
        if both(Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite, |x| x.avg)
            || both(Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite, |x| x.avg)
            || both(Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite, |x| x.max)
            || both(Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite, |x| x.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.iops_size != 0
            && [Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite]
                .iter()
                .all(|&k| l(k).avg == 0)
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for k in KINDS {
            let x = l(k);
            if x.avg > VALUE_MAX || x.max > VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                ));
            }
            if x.max_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if x.max_length > VALUE_MAX {
                return Err(format!("burst length must be within [1, {VALUE_MAX}]"));
            }
            if x.max_length > 1 && x.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if x.max != 0 && x.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if x.max != 0 && x.max < x.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }

    /// From `block_set_io_throttle`'s arguments (without `device`/`id`/
    /// `group`): the six rates are required, as in QEMU.
    pub fn from_qmp(args: &Map<String, Value>) -> Result<Self, String> {
        let num = |key: &str, required: bool| -> Result<Option<u64>, String> {
            match args.get(key) {
                None if required => Err(format!("Parameter '{key}' is missing")),
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    format!("Invalid parameter type for '{key}', expected: integer (not negative)")
                }),
            }
        };
        let mut c = Config::default();
        for k in KINDS {
            let name = k.qmp();
            let x = &mut c.limits[k as usize];
            x.avg = num(name, true)?.unwrap_or(0);
            x.max = num(&format!("{name}_max"), false)?.unwrap_or(0);
            x.max_length = num(&format!("{name}_max_length"), false)?.unwrap_or(1);
        }
        c.iops_size = num("iops_size", false)?.unwrap_or(0);
        c.validate()?;
        Ok(c)
    }

    /// The names `from_qmp` takes.
    pub fn qmp_keys() -> Vec<String> {
        let mut keys = Vec::new();
        for k in KINDS {
            keys.push(k.qmp().to_owned());
            keys.push(format!("{}_max", k.qmp()));
            keys.push(format!("{}_max_length", k.qmp()));
        }
        keys.push("iops_size".into());
        keys
    }

    /// From `qblk serve --throttle`: QEMU's throttle-group limit names,
    /// comma-separated (`iops-total=500,iops-total-max=2000,
    /// iops-total-max-length=2,bps-read=10M,iops-size=4096`); byte rates
    /// take K, M, G suffixes (powers of 1024).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut c = Config::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("'{item}' is not KEY=VALUE"));
            };
            let n = parse_number(value).ok_or_else(|| format!("{key}: '{value}' is no number"))?;
            if key == "iops-size" {
                c.iops_size = n;
                continue;
            }
            let (kind, field) = KINDS
                .iter()
                .find_map(|&k| {
                    let base = k.option();
                    if key == base {
                        Some((k, 0))
                    } else if key.strip_prefix(base) == Some("-max") {
                        Some((k, 1))
                    } else if key.strip_prefix(base) == Some("-max-length") {
                        Some((k, 2))
                    } else {
                        None
                    }
                })
                .ok_or_else(|| {
                    format!(
                        "unknown limit '{key}' (bps-total, bps-read, bps-write, iops-total, iops-read, iops-write, each also with -max and -max-length; iops-size)"
                    )
                })?;
            let x = &mut c.limits[kind as usize];
            match field {
                0 => x.avg = n,
                1 => x.max = n,
                _ => x.max_length = n,
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The limits in `BlockDeviceInfo`'s fields (`query-named-block-nodes`).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for k in KINDS {
            let x = self.limit(k);
            m.insert(k.qmp().into(), json!(x.avg));
            m.insert(format!("{}_max", k.qmp()), json!(x.max));
            m.insert(format!("{}_max_length", k.qmp()), json!(x.max_length));
        }
        m.insert("iops_size".into(), json!(self.iops_size));
        m
    }
}

/// A number with an optional K/M/G/T suffix (powers of 1024).
fn parse_number(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst: f64,
}

#[derive(Debug)]
struct State {
    config: Config,
    levels: [Level; 6],
    leaked_at: Instant,
}

impl State {
    fn leak(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.leaked_at).as_secs_f64();
        self.leaked_at = now;
        for k in KINDS {
            let x = *self.config.limit(k);
            let l = &mut self.levels[k as usize];
            l.level = (l.level - x.avg as f64 * dt).max(0.0);
            if x.max_length > 1 {
                l.burst = (l.burst - x.max as f64 * dt).max(0.0);
            }
        }
    }

    /// How long a request must wait before bucket `k` lets it through,
    /// in seconds (`throttle_compute_wait`).
    fn wait(&self, k: Kind) -> f64 {
        let x = self.config.limit(k);
        if x.avg == 0 {
            return 0.0;
        }
        let l = &self.levels[k as usize];
        let (size, burst_size) = if x.max == 0 {
            (x.avg as f64 / 10.0, 0.0)
        } else {
            (x.max as f64 * x.max_length as f64, x.max as f64 / 10.0)
        };
        let extra = l.level - size;
        if extra > 0.0 {
            return extra / x.avg as f64;
        }
        if x.max_length > 1 {
            let extra = l.burst - burst_size;
            if extra > 0.0 {
                return extra / x.max as f64;
            }
        }
        0.0
    }
}

/// A disk's throttle, shared by all its queues.
#[derive(Debug)]
pub struct Throttle {
    /// Whether any limit is set: all a request looks at otherwise.
    on: AtomicBool,
    state: Mutex<State>,
    /// Requests that had to wait, and for how long in all (ns).
    throttled: AtomicU64,
    waited_ns: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            state: Mutex::new(State {
                config: Config::default(),
                levels: [Level::default(); 6],
                leaked_at: Instant::now(),
            }),
            throttled: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// Sets the limits (validated), with empty buckets, as QEMU does.
    pub fn set(&self, config: Config) {
        let mut s = lock(&self.state);
        self.on.store(!config.is_unlimited(), Ordering::Release);
        s.config = config;
        s.levels = [Level::default(); 6];
        s.leaked_at = Instant::now();
    }

    pub fn config(&self) -> Config {
        lock(&self.state).config.clone()
    }

    /// A read or write of `bytes` takes its share of the buckets; how
    /// long it must wait first, if at all.
    pub fn admit(&self, write: bool, bytes: u64) -> Option<Duration> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut s = lock(&self.state);
        s.leak(Instant::now());
        let wait = KINDS
            .iter()
            .filter(|k| k.applies(write))
            .map(|&k| s.wait(k))
            .fold(0.0, f64::max);
        let size = s.config.iops_size;
        let ops = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        for k in KINDS.into_iter().filter(|k| k.applies(write)) {
            let units = if k.counts_bytes() { bytes as f64 } else { ops };
            let bursty = s.config.limit(k).max_length > 1;
            let l = &mut s.levels[k as usize];
            l.level += units;
            if bursty {
                l.burst += units;
            }
        }
        drop(s);
        if wait <= 0.0 {
            return None;
        }
        let wait = Duration::from_secs_f64(wait);
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.waited_ns
            .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        Some(wait)
    }

    /// Requests that waited, and their waits' sum in seconds.
    pub fn counters(&self) -> (u64, f64) {
        (
            self.throttled.load(Ordering::Relaxed),
            self.waited_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operations a bucket lets through in `secs`, requests arriving
    /// back to back as the waits allow (simulated time).
    fn passed(config: Config, secs: f64) -> u64 {
        let t = Throttle::default();
        t.set(config);
        let start = Instant::now();
        let mut s = lock(&t.state);
        s.leaked_at = start;
        let mut now = 0.0f64;
        let mut n = 0;
        loop {
            s.leak(start + Duration::from_secs_f64(now));
            let wait = KINDS
                .iter()
                .filter(|k| k.applies(false))
                .map(|&k| s.wait(k))
                .fold(0.0, f64::max);
            now += wait;
            if now > secs {
                return n;
            }
            s.leak(start + Duration::from_secs_f64(now));
            for k in KINDS.into_iter().filter(|k| k.applies(false)) {
                let units = if k.counts_bytes() { 4096.0 } else { 1.0 };
                let bursty = s.config.limit(k).max_length > 1;
                let l = &mut s.levels[k as usize];
                l.level += units;
                if bursty {
                    l.burst += units;
                }
            }
            n += 1;
        }
    }

    #[test]
    fn rates_and_bursts_are_qemus() {
        // 500/s: the bucket holds 50, then one every 2 ms.
        let c = Config::parse("iops-read=500").unwrap();
        let n = passed(c, 10.0);
        assert!((5040..=5060).contains(&n), "{n}");
        // A burst of 2000/s for 2 s: 4000 more in the main bucket, drained
        // at 2000/s (plus the 200 of the burst bucket) before 500/s.
        let c =
            Config::parse("iops-total=500,iops-total-max=2000,iops-total-max-length=2").unwrap();
        let one = passed(c.clone(), 1.0);
        assert!((2190..=2210).contains(&one), "{one}");
        let six = passed(c, 6.0);
        assert!((6990..=7010).contains(&six), "{six}");
        // Bytes: 40 KiB/s of 4 KiB reads is 10 a second.
        let c = Config::parse("bps-read=40K").unwrap();
        let n = passed(c, 10.0);
        assert!((100..=102).contains(&n), "{n}");
    }

    #[test]
    fn qemus_refusals() {
        for (s, want) in [
            ("bps-total=1,bps-read=1", "cannot be used at the same time"),
            ("iops-total-max=10", "require corresponding"),
            ("iops-total=10,iops-total-max=5", "cannot be lower"),
            (
                "iops-total=10,iops-total-max-length=2",
                "without burst rate",
            ),
            (
                "iops-total=10,iops-total-max=20,iops-total-max-length=0",
                "cannot be 0",
            ),
            ("iops-size=4096", "requires an iops value"),
            ("bps-total=2000000000000000", "must be within"),
            ("iops=5", "unknown limit"),
            ("iops-total", "KEY=VALUE"),
            ("iops-total=x", "no number"),
        ] {
            let e = Config::parse(s).expect_err(s);
            assert!(e.contains(want), "{s}: {e}");
        }
        let c = Config::parse("bps-write=10M,iops-read=100,iops-size=4096").unwrap();
        assert_eq!(c.limit(Kind::BpsWrite).avg, 10 << 20);
        assert!(!c.is_unlimited());
        assert!(Config::parse("").unwrap().is_unlimited());
    }

    #[test]
    fn unset_costs_a_load_and_waits_nothing() {
        let t = Throttle::default();
        for _ in 0..10_000 {
            assert_eq!(t.admit(true, 1 << 20), None);
        }
        assert_eq!(t.counters().0, 0);
    }
}
