//! `cargo xtask bench`: qblk against qemu-storage-daemon and raw io_uring,
//! workload by workload, in one run.
//!
//! Every daemon serves an image made by the same recipe in the same place.
//! qblk runs with its default O_DIRECT cache (and again with
//! `--pin-guest-memory`), qemu-storage-daemon with
//! `aio=io_uring,cache.direct=on`; all are driven by `qblk bench` (blkio's
//! vhost-user-blk client), and raw is fio with io_uring and O_DIRECT on a
//! raw file of the same size. Runs alternate between the four, round after
//! round; each figure is the median of its rounds. CPU time is the daemon
//! process's user + system time over the run.
//!
//! With `--baseline QBLK`, another qblk binary (say, one built from an
//! older commit) serves each workload too, with the same options as the
//! current one and next to it in every round, and the table gains its
//! figures, the ratio current/baseline and the spread of both over the
//! rounds: a difference inside the spread is noise.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, cargo, root, sh};

const IMAGE_SIZE: &str = "8G";
/// Sequential writes on an empty image get room not to wrap around
/// within a run (2 GB/s for 8 s).
const BIG_IMAGE_SIZE: &str = "32G";

impl Workload {
    fn sequential_allocating(&self) -> bool {
        self.allocating && !self.rw.starts_with("rand")
    }

    /// The size of the image (and raw file) it runs on.
    fn image_size(&self) -> &'static str {
        if self.sequential_allocating() {
            BIG_IMAGE_SIZE
        } else {
            IMAGE_SIZE
        }
    }
}
/// The span of "allocated data" workloads, written before they run.
const DATA_SPAN: u64 = 1 << 30;

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    queues: u32,
    /// On a fresh empty image, each write to a new cluster.
    allocating: bool,
    /// The image has an enabled persistent dirty bitmap, which every
    /// write marks.
    bitmap: bool,
    /// The commit pattern (`qblk bench --fsync-every N`): batches of this
    /// many writes, each followed by a flush; 0: no flushes.
    fsync_every: u32,
    /// How the allocated data is stored.
    layout: Layout,
}

/// How a workload's allocated data (DATA_SPAN) is stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// Written in place by qemu-io.
    Plain,
    /// `qemu-img convert -c` with this `compression_type`.
    Compressed(&'static str),
    /// Three images: a base holding all of it, and two overlays each
    /// holding a third, the top one served.
    Chain,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k randwrite, empty image (allocating), QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: true,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, allocated, QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, allocated, QD32, dirty bitmap",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: false,
        bitmap: true,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randread, allocated, QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randread, allocated, QD1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "1M write, allocated, QD8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "1M read, allocated, QD8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, empty image (allocating), QD32, 2 queues",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        queues: 2,
        allocating: true,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, allocated, QD32, 2 queues",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        queues: 2,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randread, allocated, QD32, 2 queues",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        queues: 2,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite + flush, QD1, empty image (allocating)",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        queues: 1,
        allocating: true,
        bitmap: false,
        fsync_every: 1,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, batches of 16 + flush, empty image (allocating)",
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        queues: 1,
        allocating: true,
        bitmap: false,
        fsync_every: 16,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite + flush, QD1, allocated",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 1,
        layout: Layout::Plain,
    },
    Workload {
        name: "4k randwrite, batches of 16 + flush, allocated",
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 16,
        layout: Layout::Plain,
    },
    Workload {
        name: "1M write, empty image (allocating), QD8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        queues: 1,
        allocating: true,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    },
    Workload {
        name: "1M read, zstd-compressed, QD8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Compressed("zstd"),
    },
    Workload {
        name: "1M read, zlib-compressed, QD8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Compressed("zlib"),
    },
    Workload {
        name: "4k randread, 3-deep backing chain, QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Chain,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Qblk,
    /// qblk with `--pin-guest-memory`.
    QblkPinned,
    /// The `--baseline` binary, served as `Qblk` is.
    Baseline,
    Qsd,
    Raw,
}

/// One measured run.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    iops: f64,
    /// Daemon CPU seconds per million I/Os (0 for raw).
    cpu_per_mio: f64,
    /// qblk only: metadata writes per allocating write.
    meta_per_alloc: f64,
    /// The daemon's anonymous memory at the end of the run, MiB (RssAnon).
    rss_anon_mib: f64,
    /// The commit pattern: flush latency p50 and p99, ms.
    flush_p50_ms: f64,
    flush_p99_ms: f64,
}

/// Options: `--runtime SECONDS`, `--rounds N`, `--only SUBSTRING`,
/// `--baseline QBLK`.
pub struct Options {
    pub runtime: u32,
    pub rounds: u32,
    pub only: Option<String>,
    /// Another qblk binary to serve each workload beside the current one
    /// (absolute: the daemons run in the bench directory).
    pub baseline: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            runtime: 8,
            rounds: 2,
            only: None,
            baseline: None,
        };
        let mut rounds = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--runtime" => o.runtime = val()?.parse().map_err(|e| format!("--runtime: {e}"))?,
                "--rounds" => {
                    rounds = Some(val()?.parse().map_err(|e| format!("--rounds: {e}"))?);
                }
                "--only" => o.only = Some(val()?),
                "--baseline" => {
                    let path = val()?;
                    let abs = std::fs::canonicalize(&path)
                        .map_err(|e| format!("--baseline {path}: {e}"))?;
                    o.baseline = Some(abs);
                }
                other => return Err(format!("unknown bench option {other}")),
            }
        }
        // Against a baseline the spread over the rounds is what tells a
        // difference from noise, and two rounds are a thin spread.
        o.rounds = rounds.unwrap_or(if o.baseline.is_some() { 3 } else { 2 });
        if o.rounds == 0 || o.runtime == 0 {
            return Err("--runtime and --rounds must be positive".into());
        }
        Ok(o)
    }
}

fn run_out(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `"key":` in a flat JSON object.
pub(crate) fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A tracing field `name=123` in a log.
fn log_number(log: &str, name: &str) -> Option<f64> {
    let at = log.rfind(&format!("{name}="))? + name.len() + 1;
    let rest = &log[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 (1-based), in clock ticks of 1/100 s on Linux.
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// A process's anonymous resident memory (`RssAnon` in
/// `/proc/PID/status`), KiB: its own memory, where VmHWM and VmRSS also
/// count the guest memory it mapped and touched.
fn rss_anon_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(
        program: &str,
        args: &[String],
        dir: &Path,
        socket: &Path,
        log: PathBuf,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log: {e}"))?;
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Ok(Some(s)) = d.child.try_wait() {
                return Err(format!(
                    "{program} exited ({s}) before listening: {}",
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                d.stop();
                return Err(format!("{program} did not listen within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(d)
    }

    /// SIGTERM and wait; returns the log.
    fn stop(&mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

struct Bench {
    dir: PathBuf,
    qblk: String,
    /// The `--baseline` binary, if any.
    baseline: Option<String>,
    runtime: u32,
}

impl Bench {
    fn qemu_img(&self, args: &[&str]) -> Result {
        run_out("qemu-img", args, &self.dir).map(|_| ())
    }

    /// A fresh image named `name`: empty, or with DATA_SPAN written.
    fn make_image(&self, name: &str, filled: bool, raw: bool) -> Result {
        self.make_image_sized(name, filled, raw, IMAGE_SIZE)
    }

    fn make_image_sized(&self, name: &str, filled: bool, raw: bool, size: &str) -> Result {
        let _ = std::fs::remove_file(self.dir.join(name));
        let fmt = if raw { "raw" } else { "qcow2" };
        self.qemu_img(&["create", "-q", "-f", fmt, name, size])?;
        if filled {
            let cmd = format!("write -P 0x5a 0 {DATA_SPAN}");
            run_out("qemu-io", &["-f", fmt, "-c", &cmd, name], &self.dir)?;
        }
        Ok(())
    }

    /// `data.qcow2` for a workload on allocated data, stored as its layout
    /// says (the served image; a chain's lower images beside it).
    fn make_data_image(&self, w: &Workload) -> Result {
        match w.layout {
            Layout::Plain => {
                self.make_image("data.qcow2", true, false)?;
            }
            Layout::Compressed(kind) => {
                self.make_image("plain.qcow2", true, false)?;
                let _ = std::fs::remove_file(self.dir.join("data.qcow2"));
                let opts = format!("compression_type={kind}");
                self.qemu_img(&[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &opts,
                    "plain.qcow2",
                    "data.qcow2",
                ])?;
                let _ = std::fs::remove_file(self.dir.join("plain.qcow2"));
            }
            Layout::Chain => {
                self.make_image("base.qcow2", true, false)?;
                let third = DATA_SPAN / 3 / 65536 * 65536;
                for (name, backing, at, fill) in [
                    ("mid.qcow2", "base.qcow2", 0, 0x6b),
                    ("data.qcow2", "mid.qcow2", third, 0x7c),
                ] {
                    let _ = std::fs::remove_file(self.dir.join(name));
                    self.qemu_img(&[
                        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
                    ])?;
                    let cmd = format!("write -P {fill:#x} {at} {third}");
                    run_out("qemu-io", &["-f", "qcow2", "-c", &cmd, name], &self.dir)?;
                }
            }
        }
        if w.bitmap {
            self.qemu_img(&["bitmap", "--add", "data.qcow2", "backup"])?;
        }
        Ok(())
    }

    fn bench_args(&self, w: &Workload, socket: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "bench",
            "--json",
            "--socket",
            &socket.display().to_string(),
            "--rw",
            w.rw,
            "--bs",
            w.bs,
            "--iodepth",
            &w.iodepth.to_string(),
            "--queues",
            &w.queues.to_string(),
            "--runtime",
            &format!("{}s", self.runtime),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if w.sequential_allocating() {
            // Each request to clusters never written (the image is big
            // enough not to wrap around).
        } else if w.allocating {
            a.extend(["--stride".into(), "64k".into()]);
        } else {
            a.extend(["--span".into(), DATA_SPAN.to_string()]);
        }
        if w.fsync_every > 0 {
            a.extend(["--fsync-every".into(), w.fsync_every.to_string()]);
        }
        a
    }

    /// Runs the workload against a daemon serving `image`.
    fn daemon_run(&self, w: &Workload, target: Target, image: &str) -> Result<Sample> {
        let socket = self.dir.join(format!("{target:?}.sock").to_lowercase());
        let log = self.dir.join(format!("{target:?}.log").to_lowercase());
        let queues = w.queues.to_string();
        let (program, args): (&str, Vec<String>) = match target {
            Target::Qblk | Target::QblkPinned | Target::Baseline => (
                if target == Target::Baseline {
                    self.baseline
                        .as_deref()
                        .ok_or("a baseline run without --baseline")?
                } else {
                    self.qblk.as_str()
                },
                {
                    let mut a: Vec<String> = vec![
                        "serve".into(),
                        "--socket".into(),
                        socket.display().to_string(),
                        "--queues".into(),
                        queues,
                    ];
                    if target == Target::QblkPinned {
                        a.push("--pin-guest-memory".into());
                    }
                    a.push(image.into());
                    a
                },
            ),
            Target::Qsd => (
                "qemu-storage-daemon",
                vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=file0,filename={image},aio=io_uring,cache.direct=on"
                    ),
                    "--blockdev".into(),
                    "driver=qcow2,node-name=disk0,file=file0".into(),
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        socket.display()
                    ),
                ],
            ),
            Target::Raw => unreachable!("raw runs fio"),
        };
        let mut d = Daemon::start(program, &args, &self.dir, &socket, log)?;
        let pid = d.child.id();
        let cpu0 = cpu_seconds(pid);
        let out = run_out(
            &self.qblk,
            &self
                .bench_args(w, &socket)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            &self.dir,
        );
        let cpu = cpu_seconds(pid) - cpu0;
        let rss_anon_mib = rss_anon_kib(pid) / 1024.0;
        let log = d.stop();
        let out = out?;
        let iops = json_number(&out, "iops").ok_or(format!("no iops in {out}"))?;
        let ops = json_number(&out, "ops").unwrap_or(0.0);
        let flush = out
            .find("\"flush_lat_us\"")
            .map(|at| &out[at..])
            .unwrap_or("");
        let mut s = Sample {
            iops,
            cpu_per_mio: if ops > 0.0 { cpu / ops * 1e6 } else { 0.0 },
            meta_per_alloc: 0.0,
            rss_anon_mib,
            flush_p50_ms: json_number(flush, "p50").unwrap_or(0.0) / 1000.0,
            flush_p99_ms: json_number(flush, "p99").unwrap_or(0.0) / 1000.0,
        };
        if target != Target::Qsd {
            let allocs = log_number(&log, "allocating_writes").unwrap_or(0.0);
            let meta = log_number(&log, "metadata_writes").unwrap_or(0.0);
            if allocs > 0.0 {
                s.meta_per_alloc = meta / allocs;
            }
        }
        Ok(s)
    }

    /// fio with io_uring and O_DIRECT on the raw file.
    fn raw_run(&self, w: &Workload) -> Result<Sample> {
        let size = if w.allocating {
            w.image_size().to_string()
        } else {
            DATA_SPAN.to_string()
        };
        let args: Vec<String> = vec![
            "--name=raw".into(),
            "--filename=raw.img".into(),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--rw={}", w.rw),
            format!("--bs={}", w.bs),
            format!("--iodepth={}", w.iodepth),
            format!("--numjobs={}", w.queues),
            format!("--size={size}"),
            "--offset_increment=0".into(),
            "--group_reporting".into(),
            "--time_based".into(),
            format!("--runtime={}", self.runtime),
            "--output-format=terse".into(),
            "--terse-version=3".into(),
        ];
        let mut args = args;
        if w.fsync_every > 0 {
            args.push(format!("--fdatasync={}", w.fsync_every));
        }
        let out = run_out(
            "fio",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &self.dir,
        )?;
        let f: Vec<&str> = out.trim().split(';').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // terse v3: field 8 is read IOPS, field 49 write IOPS (1-based).
        Ok(Sample {
            iops: num(7) + num(48),
            ..Sample::default()
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The least and the greatest of `v` (0..0 if empty).
fn spread(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

struct Row {
    name: &'static str,
    qblk: Vec<Sample>,
    pinned: Vec<Sample>,
    /// Empty without `--baseline`.
    baseline: Vec<Sample>,
    qsd: Vec<Sample>,
    raw: Vec<Sample>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let qsd = run_out("qemu-storage-daemon", &["--version"], Path::new("."))
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    format!("{cores} cores ({cpu}), Linux {kernel}; {qsd}")
}

/// The ratios of one workload, for the chart.
struct Ratios {
    name: String,
    vs_qsd: f64,
    pinned_vs_qsd: f64,
    vs_raw: f64,
}

/// A bar chart of the ratios, as SVG.
fn svg(rows: &[Ratios]) -> String {
    let bar_h = 12.0;
    let row_h = 46.0;
    let left = 330.0;
    let scale = 160.0; // pixels per 1.0x
    let max_ratio = rows
        .iter()
        .flat_map(|r| [r.vs_qsd, r.pinned_vs_qsd, r.vs_raw])
        .fold(2.0f64, f64::max)
        .min(6.0);
    let width = left + scale * max_ratio + 80.0;
    let height = 60.0 + row_h * rows.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="20" font-size="14">qblk throughput relative to qemu-storage-daemon (blue; green: --pin-guest-memory) and to raw io_uring (grey)</text>"##
    );
    for k in 0..=(max_ratio.ceil() as u32) {
        let x = left + scale * f64::from(k);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="30" x2="{x}" y2="{}" stroke="#ccc"/><text x="{x}" y="{}" text-anchor="middle">{k}x</text>"##,
            height - 20.0,
            height - 5.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + row_h * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bar_h + 6.0,
            r.name.replace('&', "&amp;").replace('<', "&lt;")
        );
        let bars = [
            (r.vs_qsd, "#3672c4"),
            (r.pinned_vs_qsd, "#3a9a4a"),
            (r.vs_raw, "#999"),
        ];
        for (j, (v, color)) in bars.iter().enumerate() {
            let by = y + j as f64 * (bar_h + 1.0);
            let w = scale * v.min(max_ratio);
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{by}" width="{w:.1}" height="{bar_h}" fill="{color}"/><text x="{:.1}" y="{:.1}">{v:.2}</text>"#,
                left + w + 4.0,
                by + bar_h - 2.0
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

pub fn bench(opts: &Options) -> Result {
    crate::install_packages()?;
    sh(&cargo(), &["build", "--release", "--quiet", "-p", "qblk"])?;
    let dir = std::env::temp_dir().join(format!("qblk-bench-{}", std::process::id()));
    // Keep the images on the same file system as the target directory
    // would be if /tmp is a tmpfs without O_DIRECT: use target/bench.
    let dir = if is_tmpfs(&std::env::temp_dir()) {
        root().join("target/bench-work")
    } else {
        dir
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let b = Bench {
        dir: dir.clone(),
        qblk: root().join("target/release/qblk").display().to_string(),
        baseline: opts.baseline.as_ref().map(|p| p.display().to_string()),
        runtime: opts.runtime,
    };
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if let Some(only) = &opts.only {
            if !w.name.contains(only.as_str()) {
                continue;
            }
        }
        eprintln!("xtask bench: {}", w.name);
        let mut row = Row {
            name: w.name,
            qblk: Vec::new(),
            pinned: Vec::new(),
            baseline: Vec::new(),
            qsd: Vec::new(),
            raw: Vec::new(),
        };
        if !w.allocating {
            b.make_data_image(w)?;
        }
        b.make_image_sized("raw.img", !w.allocating, true, w.image_size())?;
        for round in 0..opts.rounds {
            // Alternate the order from round to round. The baseline runs
            // right after (or, in odd rounds, before) the current qblk, so
            // the two meet the same state of the machine.
            let mut order = vec![
                Target::Qblk,
                Target::Baseline,
                Target::Qsd,
                Target::QblkPinned,
                Target::Raw,
            ];
            if opts.baseline.is_none() {
                order.retain(|&t| t != Target::Baseline);
            }
            if round % 2 == 1 {
                order.reverse();
            }
            for t in order {
                let sample = match t {
                    Target::Raw => b.raw_run(w)?,
                    _ => {
                        let image = if w.allocating {
                            b.make_image_sized("empty.qcow2", false, false, w.image_size())?;
                            "empty.qcow2"
                        } else {
                            "data.qcow2"
                        };
                        if w.bitmap {
                            // A baseline without bitmap support drops it:
                            // put it back (an error says it is still there).
                            let _ = b.qemu_img(&["bitmap", "--add", image, "backup"]);
                        }
                        b.daemon_run(w, t, image)?
                    }
                };
                eprintln!("  round {round} {t:?}: {:.0} IOPS", sample.iops);
                match t {
                    Target::Qblk => row.qblk.push(sample),
                    Target::QblkPinned => row.pinned.push(sample),
                    Target::Baseline => row.baseline.push(sample),
                    Target::Qsd => row.qsd.push(sample),
                    Target::Raw => row.raw.push(sample),
                }
            }
        }
        rows.push(row);
    }
    let big = if opts.only.as_deref().is_none_or(|o| "big disks".contains(o)) {
        eprintln!("xtask bench: big disks");
        Some(big_disks(&b, opts.rounds)?)
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);

    let with_baseline = opts.baseline.is_some();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| workload | qblk IOPS | qblk pinned IOPS | qsd IOPS | raw IOPS | qblk/qsd | pinned/qsd | qblk/raw | pinned/raw | CPU s per M I/O: qblk | pinned | qsd | CPU qblk/qsd | CPU pinned/qsd | qblk metadata writes per allocating write | RssAnon MiB: qblk | qsd | flush p50/p99 ms: qblk | qsd |{}",
        if with_baseline {
            " baseline IOPS | qblk/baseline | qblk/baseline per round, min..max | qblk IOPS min..max | baseline IOPS min..max | qblk vs baseline, beyond the spread? | CPU s per M I/O: baseline | CPU qblk/baseline |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        table,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}",
        if with_baseline {
            "---:|---:|---:|---:|---:|---|---:|---:|"
        } else {
            ""
        }
    );
    let mut ratios = Vec::new();
    for r in &rows {
        let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let q = m(&r.qblk, |s| s.iops);
        let p = m(&r.pinned, |s| s.iops);
        let d = m(&r.qsd, |s| s.iops);
        let raw = m(&r.raw, |s| s.iops);
        let qc = m(&r.qblk, |s| s.cpu_per_mio);
        let pc = m(&r.pinned, |s| s.cpu_per_mio);
        let dc = m(&r.qsd, |s| s.cpu_per_mio);
        let meta = m(&r.qblk, |s| s.meta_per_alloc);
        let (qr, dr) = (
            m(&r.qblk, |s| s.rss_anon_mib),
            m(&r.qsd, |s| s.rss_anon_mib),
        );
        let flush = |v: &[Sample]| {
            let p50 = m(v, |s| s.flush_p50_ms);
            if p50 > 0.0 {
                format!("{p50:.2}/{:.2}", m(v, |s| s.flush_p99_ms))
            } else {
                "-".into()
            }
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let _ = write!(
            table,
            "| {} | {q:.0} | {p:.0} | {d:.0} | {raw:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {qc:.2} | {pc:.2} | {dc:.2} | {:.2} | {:.2} | {} | {qr:.1} | {dr:.1} | {} | {} |",
            r.name,
            ratio(q, d),
            ratio(p, d),
            ratio(q, raw),
            ratio(p, raw),
            ratio(qc, dc),
            ratio(pc, dc),
            if meta > 0.0 {
                format!("{meta:.4}")
            } else {
                "-".into()
            },
            flush(&r.qblk),
            flush(&r.qsd),
        );
        if with_baseline {
            table.push_str(&baseline_columns(r, opts.rounds));
        }
        table.push('\n');
        ratios.push(Ratios {
            name: r.name.to_string(),
            vs_qsd: ratio(q, d),
            pinned_vs_qsd: ratio(p, d),
            vs_raw: ratio(q, raw),
        });
    }
    let date = run_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"], Path::new("."))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Latest `cargo xtask bench --runtime {} --rounds {}{}{}`: {}",
        opts.runtime,
        opts.rounds,
        opts.only
            .as_ref()
            .map(|o| format!(" --only '{o}'"))
            .unwrap_or_default(),
        opts.baseline
            .as_ref()
            .map(|b| format!(" --baseline {}", b.display()))
            .unwrap_or_default(),
        date.trim()
    );
    let _ = writeln!(md, "on {}.\n", machine());
    let _ = writeln!(
        md,
        "Each figure is the median of {} alternating runs of {} s. qblk serves with its \
         default O_DIRECT cache, qemu-storage-daemon (qsd) with \
         `aio=io_uring,cache.direct=on`; both on the same qcow2 recipe (`qemu-img create -f qcow2 \
         IMG 8G`, 64 KiB clusters; for \"allocated\" workloads the first 1 GiB written by qemu-io \
         first), driven by `qblk bench` over vhost-user. raw is fio (io_uring, O_DIRECT) on a raw \
         file of the same size: this host's limit. Allocating runs start from a fresh empty image \
         and write each 64 KiB cluster once (`--stride 64k`). CPU is the daemon process's user + \
         system time over the run. \"qblk pinned\" is `qblk serve --pin-guest-memory` (guest \
         memory registered with io_uring: not the default, see the README). Rows with \
         \"+ flush\" are the commit pattern, `qblk bench --fsync-every N` (N writes at once, \
         then a flush once they completed; raw: fio `--fdatasync=N`), with the flushes' \
         latency. The compressed rows read the same 1 GiB converted by `qemu-img convert -c -o \
         compression_type=...`; the chain row serves the top of a base holding all of it and \
         two overlays holding a third each. RssAnon is the daemon's anonymous memory at the end \
         of the run (VmRSS and VmHWM also count the guest memory it maps).\n",
        opts.rounds, opts.runtime
    );
    if let Some(baseline) = &opts.baseline {
        let _ = writeln!(
            md,
            "\"baseline\" is `{}`, served as qblk is (default options) and run next to it in \
             every round, the order alternating; both are driven by the current `qblk bench`. \
             min..max is the range over the {} rounds, and \"per round\" pairs the runs of one \
             round. \"beyond the spread\" says higher or lower when the two ranges do not \
             overlap, and within when they do: a difference within the spread is noise.\n",
            baseline.display(),
            opts.rounds
        );
    }
    md.push_str(&table);
    if let Some(big) = &big {
        md.push_str(big);
        print!("{big}");
    }
    let _ = writeln!(md, "\n![ratios](ratios.svg)");
    print!("{table}");
    let out = root().join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("mkdir bench: {e}"))?;
    std::fs::write(out.join("RESULTS.md"), md).map_err(|e| format!("write RESULTS.md: {e}"))?;
    std::fs::write(out.join("ratios.svg"), svg(&ratios))
        .map_err(|e| format!("write ratios.svg: {e}"))?;
    eprintln!("xtask bench: wrote bench/RESULTS.md and bench/ratios.svg");
    Ok(())
}

/// A daemon serving `image` on `socket` with an L2 cache of `cache`
/// (default if `None`): started, timed until it listens.
fn start_big(
    b: &Bench,
    target: Target,
    image: &str,
    cache: Option<&str>,
) -> Result<(Daemon, Duration)> {
    let socket = b.dir.join("big.sock");
    let log = b.dir.join("big.log");
    let (program, args): (&str, Vec<String>) = match target {
        Target::Qblk => {
            let mut a: Vec<String> = vec![
                "serve".into(),
                "--socket".into(),
                socket.display().to_string(),
            ];
            if let Some(c) = cache {
                a.extend(["--cache-size".into(), c.into()]);
            }
            a.push(image.into());
            (b.qblk.as_str(), a)
        }
        _ => {
            let cache = cache
                .map(|c| format!(",l2-cache-size={c}"))
                .unwrap_or_default();
            (
                "qemu-storage-daemon",
                vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=file0,filename={image},aio=io_uring,cache.direct=on"
                    ),
                    "--blockdev".into(),
                    format!("driver=qcow2,node-name=disk0,file=file0{cache}"),
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                        socket.display()
                    ),
                ],
            )
        }
    };
    let began = Instant::now();
    let d = Daemon::start(program, &args, &b.dir, &socket, log)?;
    Ok((d, began.elapsed()))
}

/// Big disks: random 4 KiB reads at QD32 over all of a 1 TiB image with
/// preallocated metadata (128 MiB of L2 tables: cache misses dominate)
/// with each daemon's default L2 cache, with equal caches, and with caches
/// that hold the whole map; the daemons' anonymous memory; and the time
/// from start to listening for that image and for an empty 16 TiB one.
fn big_disks(b: &Bench, rounds: u32) -> Result<String> {
    b.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "big.qcow2",
        "1T",
    ])?;
    b.qemu_img(&["create", "-q", "-f", "qcow2", "huge.qcow2", "16T"])?;
    let reads = Workload {
        name: "big",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        queues: 1,
        allocating: false,
        bitmap: false,
        fsync_every: 0,
        layout: Layout::Plain,
    };
    let mut out = String::from(
        "\n## Big disks\n\nRandom 4 KiB reads at QD32 over all of a 1 TiB qcow2 image made with `preallocation=metadata` (64 KiB clusters: 128 MiB of L2 tables), and the time from starting the daemon to its socket listening. qblk's L2 cache is `--cache-size`, qsd's `l2-cache-size`.\n\n| | qblk IOPS | qsd IOPS | qblk/qsd | RssAnon MiB: qblk | qsd |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mut ready: Vec<(Target, &str, f64)> = Vec::new();
    for (label, qblk_cache, qsd_cache) in [
        (
            "default caches (qblk 32 MiB, qsd 32 MiB at most)",
            None,
            None,
        ),
        ("equal caches, 8 MiB", Some("8M"), Some("8388608")),
        (
            "caches holding the whole map, 128 MiB",
            Some("128M"),
            Some("134217728"),
        ),
    ] {
        let (mut q, mut d) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [Target::Qblk, Target::Qsd]
            } else {
                [Target::Qsd, Target::Qblk]
            };
            for t in order {
                let cache = if t == Target::Qblk {
                    qblk_cache
                } else {
                    qsd_cache
                };
                let (mut daemon, took) = start_big(b, t, "big.qcow2", cache)?;
                if qblk_cache.is_none() {
                    ready.push((t, "1 TiB, preallocated metadata", took.as_secs_f64()));
                }
                let pid = daemon.child.id();
                let socket = b.dir.join("big.sock");
                let mut args = b.bench_args(&reads, &socket);
                // All of the disk.
                if let Some(i) = args.iter().position(|a| a == "--span") {
                    args.drain(i..i + 2);
                }
                let r = run_out(
                    &b.qblk,
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                    &b.dir,
                );
                let rss = rss_anon_kib(pid) / 1024.0;
                daemon.stop();
                let r = r?;
                let iops = json_number(&r, "iops").ok_or(format!("no iops in {r}"))?;
                eprintln!("  {label}, round {round} {t:?}: {iops:.0} IOPS, RssAnon {rss:.1} MiB");
                if t == Target::Qblk {
                    q.push((iops, rss));
                } else {
                    d.push((iops, rss));
                }
            }
        }
        let m = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        let (qi, di) = (m(&q, |x| x.0), m(&d, |x| x.0));
        let _ = writeln!(
            out,
            "| {label} | {qi:.0} | {di:.0} | {:.2} | {:.1} | {:.1} |",
            if di > 0.0 { qi / di } else { 0.0 },
            m(&q, |x| x.1),
            m(&d, |x| x.1)
        );
    }
    for round in 0..rounds.max(3) {
        let order = if round % 2 == 0 {
            [Target::Qblk, Target::Qsd]
        } else {
            [Target::Qsd, Target::Qblk]
        };
        for t in order {
            let (mut daemon, took) = start_big(b, t, "huge.qcow2", None)?;
            daemon.stop();
            ready.push((t, "16 TiB, empty", took.as_secs_f64()));
        }
    }
    let _ = writeln!(
        out,
        "\n| start to listening | qblk ms | qsd ms | qblk/qsd |\n|---|---:|---:|---:|"
    );
    for image in ["1 TiB, preallocated metadata", "16 TiB, empty"] {
        let t = |target: Target| {
            median(
                ready
                    .iter()
                    .filter(|r| r.0 == target && r.1 == image)
                    .map(|r| r.2 * 1000.0)
                    .collect(),
            )
        };
        let (q, d) = (t(Target::Qblk), t(Target::Qsd));
        let _ = writeln!(
            out,
            "| {image} | {q:.0} | {d:.0} | {:.2} |",
            if d > 0.0 { q / d } else { 0.0 }
        );
    }
    let _ = std::fs::remove_file(b.dir.join("big.qcow2"));
    let _ = std::fs::remove_file(b.dir.join("huge.qcow2"));
    Ok(out)
}

/// The `--baseline` cells of a row: the baseline's median IOPS, the
/// ratio of the medians, the per-round ratios' range, both ranges, whether
/// they are apart, and the CPU figures.
fn baseline_columns(r: &Row, rounds: u32) -> String {
    let iops = |v: &[Sample]| v.iter().map(|s| s.iops).collect::<Vec<_>>();
    let (q, b) = (iops(&r.qblk), iops(&r.baseline));
    let (qm, bm) = (median(q.clone()), median(b.clone()));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    // Runs of the same round are neighbours in time: their ratio cancels
    // what drifted between rounds.
    let per_round: Vec<f64> = q.iter().zip(&b).map(|(&x, &y)| ratio(x, y)).collect();
    let (rlo, rhi) = spread(&per_round);
    let (qlo, qhi) = spread(&q);
    let (blo, bhi) = spread(&b);
    let verdict = if rounds < 2 {
        "- (one round: no spread)"
    } else if qlo > bhi {
        "higher"
    } else if qhi < blo {
        "lower"
    } else {
        "within"
    };
    let cpu = |v: &[Sample]| median(v.iter().map(|s| s.cpu_per_mio).collect());
    let (qc, bc) = (cpu(&r.qblk), cpu(&r.baseline));
    format!(
        " {bm:.0} | {:.2} | {rlo:.2}..{rhi:.2} | {qlo:.0}..{qhi:.0} | {blo:.0}..{bhi:.0} | {verdict} | {bc:.2} | {:.2} |",
        ratio(qm, bm),
        ratio(qc, bc)
    )
}

fn is_tmpfs(p: &Path) -> bool {
    run_out(
        "stat",
        &["-f", "-c", "%T", &p.display().to_string()],
        Path::new("."),
    )
    .map(|t| t.trim() == "tmpfs")
    .unwrap_or(false)
}
