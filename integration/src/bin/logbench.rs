//! What dirty-page logging for live migration costs on the request path:
//! `cargo xtask bench-log` runs this.
//!
//! One qcow2 image, every cluster allocated and written (`preallocation=full`); a closed-loop client of
//! qblk's own (`RawFrontend::closed_loop`: 4 KiB requests at QD32 on one
//! queue, completions polled) measures each daemon — a baseline build
//! (`--baseline`, e.g. one from before logging existed) with logging off,
//! this build with logging off, and this build with logging on (a log
//! handed over with SET_LOG_BASE and `VHOST_F_LOG_ALL` set, as QEMU does
//! during a migration). The daemons take turns, in a rotated order each
//! round; the medians of the rounds and their ratios are printed as a
//! Markdown table. blkio, which `cargo xtask bench` uses, cannot switch
//! logging on, hence a client of our own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qblk_integration::benchbin::{BenchArgs, median};
use qblk_integration::rawq::{MEM_SIZE, RawFrontend};
use qblk_integration::sh;
use qblk_integration::vhost::Daemon;

const SPAN: u64 = 256 << 20;
const QD: u16 = 32;

/// CPU time a process used so far, in seconds (user + system, from
/// `/proc/PID/stat`, in clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The fields after the command name (which may hold spaces) in ")".
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f[i].parse::<f64>().expect("stat field");
    // utime and stime are fields 14 and 15, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// One measurement of `program` serving the image, logging on or off:
/// IOPS, and the daemon's CPU time per request in microseconds.
fn measure(dir: &Path, program: &Path, log: bool, write: bool, secs: u64) -> (f64, f64) {
    let daemon = Daemon::spawn(
        program,
        &["serve", "--socket", "lb.sock", "img.qcow2"],
        dir,
        "lb.sock",
    );
    let mut raw = RawFrontend::connect(&daemon.socket);
    let log_file = tempfile::tempfile().expect("log file");
    if log {
        let bytes = (MEM_SIZE as u64).div_ceil(4096 * 8);
        log_file.set_len(bytes).expect("size the log");
        raw.set_logging(Some((&log_file, bytes)), true);
    }
    raw.closed_loop(QD, SPAN, write, Duration::from_secs(1));
    let cpu = cpu_seconds(daemon.pid());
    let n = raw.closed_loop(QD, SPAN, write, Duration::from_secs(secs));
    let cpu = cpu_seconds(daemon.pid()) - cpu;
    drop(raw);
    let mut daemon = daemon;
    assert!(daemon.stop().success(), "{}", daemon.log());
    (n as f64 / secs as f64, cpu * 1e6 / n as f64)
}

fn main() {
    let o = BenchArgs::from_env("logbench", 5, 3, true);
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
            "-o",
            "preallocation=full",
            "img.qcow2",
            &SPAN.to_string(),
        ],
    );
    let mut configs: Vec<(String, PathBuf, bool)> = Vec::new();
    if let Some(b) = &o.baseline {
        configs.push(("baseline, logging off".into(), b.clone(), false));
    }
    configs.push(("qblk, logging off".into(), o.qblk.clone(), false));
    configs.push(("qblk, logging on".into(), o.qblk.clone(), true));
    let workloads = [
        ("4k random read, QD32", false),
        ("4k random write, QD32", true),
    ];
    // results[workload][config] = IOPS of each round
    let mut results: Vec<Vec<Vec<(f64, f64)>>> =
        vec![vec![Vec::new(); configs.len()]; workloads.len()];
    for round in 0..o.rounds {
        for (w, (wname, write)) in workloads.iter().enumerate() {
            for k in 0..configs.len() {
                let c = (k + round) % configs.len();
                let (cname, program, log) = &configs[c];
                let (iops, cpu) = measure(d, program, *log, *write, o.runtime);
                eprintln!(
                    "round {} {wname}: {cname}: {iops:.0} IOPS, {cpu:.2} us CPU a request",
                    round + 1
                );
                results[w][c].push((iops, cpu));
            }
        }
    }
    let header: Vec<&str> = configs.iter().map(|c| c.0.as_str()).collect();
    let off = configs.len() - 2;
    for (title, pick, unit) in [("IOPS", 0usize, "IOPS"), ("daemon CPU a request", 1, "us")] {
        println!("\n{title}:\n\n| workload | {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(configs.len()));
        for (w, (wname, _)) in workloads.iter().enumerate() {
            let medians: Vec<f64> = results[w]
                .iter()
                .map(|r| {
                    let v: Vec<f64> = r
                        .iter()
                        .map(|x| if pick == 0 { x.0 } else { x.1 })
                        .collect();
                    median(v)
                })
                .collect();
            let cells: Vec<String> = medians
                .iter()
                .enumerate()
                .map(|(c, m)| {
                    let v = if pick == 0 {
                        format!("{m:.0}")
                    } else {
                        format!("{m:.2} {unit}")
                    };
                    if c == off {
                        v
                    } else {
                        format!("{v} ({:.3})", m / medians[off])
                    }
                })
                .collect();
            println!("| {wname} | {} |", cells.join(" | "));
        }
    }
    println!(
        "\nMedians of {} rounds of {} s; in parentheses the ratio to this build with logging off.",
        o.rounds, o.runtime
    );
}
