//! `cargo xtask bench-snapshot`: how long guest writes wait while an
//! internal snapshot is taken of a served image with 8 GiB allocated,
//! qblk against qemu-storage-daemon in one run.
//!
//! Each round and daemon: a fresh 8 GiB qcow2 image with every cluster
//! allocated (`preallocation=metadata`: 131,072 clusters to count and 128
//! L2 tables to rewrite, the work a snapshot does; the data reads as
//! zeros), served with a QMP socket; `qblk bench` writes 4 KiB at random
//! over all of it at queue depth 32 for the run time, and a third of the
//! way in `blockdev-snapshot-internal-sync` is sent. Reported: how long the
//! command took, the longest write of the run, and the longest write of
//! the same run without a snapshot (the machine's own noise).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, cargo, root, sh};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Qblk,
    Qsd,
}

/// One run's figures, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    command_ms: f64,
    max_ms: f64,
    p999_ms: f64,
}

fn qmp(socket: &Path, execute: &str, arguments: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{}: {e}", socket.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut out = s.try_clone().map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(s).lines();
    let mut reply = |cmd: String| -> Result<String> {
        out.write_all(cmd.as_bytes()).map_err(|e| e.to_string())?;
        for line in lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            if line.contains("\"return\"") {
                return Ok(line);
            }
            if line.contains("\"error\"") {
                return Err(format!("{execute}: {line}"));
            }
        }
        Err("QMP socket closed".into())
    };
    // The greeting comes first; the capabilities reply has "return".
    reply("{\"execute\": \"qmp_capabilities\"}\n".into())?;
    reply(format!(
        "{{\"execute\": \"{execute}\", \"arguments\": {arguments}}}\n"
    ))
}

/// Microseconds under `key` in `qblk bench --json`'s output, as ms.
fn json_ms(json: &str, key: &str) -> f64 {
    crate::bench::json_number(json, key).unwrap_or(0.0) / 1000.0
}

fn start(target: Target, qblk: &str, dir: &Path) -> Result<Child> {
    for s in ["vu.sock", "qmp.sock"] {
        let _ = std::fs::remove_file(dir.join(s));
    }
    let mut cmd = match target {
        Target::Qblk => {
            let mut c = Command::new(qblk);
            c.args([
                "serve",
                "--socket",
                "vu.sock",
                "--control",
                "qmp.sock",
                "snap.qcow2",
            ]);
            c
        }
        Target::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.args([
                "--blockdev",
                "driver=file,node-name=file0,filename=snap.qcow2,aio=io_uring,cache.direct=on",
                "--blockdev",
                "driver=qcow2,node-name=disk,file=file0",
                "--export",
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path=vu.sock,writable=on",
                "--chardev",
                "socket,id=m0,path=qmp.sock,server=on,wait=off",
                "--monitor",
                "chardev=m0",
            ]);
            c
        }
    };
    let child = cmd
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {target:?}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("vu.sock").exists() || !dir.join("qmp.sock").exists() {
        if Instant::now() > deadline {
            return Err(format!("{target:?} did not listen"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn one_run(target: Target, qblk: &str, dir: &Path, runtime: u32, snapshot: bool) -> Result<Run> {
    let _ = std::fs::remove_file(dir.join("snap.qcow2"));
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            &dir.join("snap.qcow2").display().to_string(),
            "8G",
        ],
    )?;
    let mut daemon = start(target, qblk, dir)?;
    let bench = Command::new(qblk)
        .args([
            "bench",
            "--json",
            "--socket",
            "vu.sock",
            "--rw",
            "randwrite",
            "--bs",
            "4k",
            "--iodepth",
            "32",
            "--runtime",
            &format!("{runtime}s"),
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qblk bench: {e}"))?;
    std::thread::sleep(Duration::from_millis(u64::from(runtime) * 1000 / 3));
    let mut run = Run::default();
    let qmp_sock = dir.join("qmp.sock");
    if snapshot {
        let began = Instant::now();
        let r = qmp(
            &qmp_sock,
            "blockdev-snapshot-internal-sync",
            r#"{"device": "disk", "name": "s1"}"#,
        );
        run.command_ms = began.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = r {
            let _ = daemon.kill();
            return Err(e);
        }
    }
    let out = bench.wait_with_output().map_err(|e| e.to_string())?;
    let _ = qmp(&qmp_sock, "quit", "{}");
    let _ = daemon.wait();
    let json = String::from_utf8_lossy(&out.stdout);
    run.max_ms = json_ms(&json, "max");
    run.p999_ms = json_ms(&json, "p999");
    if run.max_ms == 0.0 {
        return Err(format!("no latency in the bench output: {json}"));
    }
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `--runtime SECONDS` (default 6), `--rounds N` (default 3).
pub fn run(args: &[String]) -> Result {
    let mut runtime = 6u32;
    let mut rounds = 3u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--runtime" => runtime = v.parse().map_err(|e| format!("--runtime: {e}"))?,
            "--rounds" => rounds = v.parse().map_err(|e| format!("--rounds: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if runtime < 3 || rounds == 0 {
        return Err("--runtime must be at least 3 and --rounds positive".into());
    }
    crate::install_packages()?;
    sh(&cargo(), &["build", "--release", "--quiet", "-p", "qblk"])?;
    let qblk = root().join("target/release/qblk").display().to_string();
    let dir = root().join("target/bench-snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir: {e}"))?;
    let mut table = String::from(
        "| daemon | snapshot command, ms | longest write with a snapshot, ms | p99.9, ms | longest write without, ms | p99.9, ms |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for target in [Target::Qblk, Target::Qsd] {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate: with first in even rounds.
            for snapshot in if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            } {
                let r = one_run(target, &qblk, &dir, runtime, snapshot)?;
                eprintln!(
                    "  {target:?} round {round} snapshot={snapshot}: command {:.1} ms, max {:.1} ms",
                    r.command_ms, r.max_ms
                );
                if snapshot {
                    with.push(r)
                } else {
                    without.push(r)
                }
            }
        }
        let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
        table.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            match target {
                Target::Qblk => "qblk",
                Target::Qsd => "qemu-storage-daemon",
            },
            m(&with, |r| r.command_ms),
            m(&with, |r| r.max_ms),
            m(&with, |r| r.p999_ms),
            m(&without, |r| r.max_ms),
            m(&without, |r| r.p999_ms),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "Internal snapshot of an 8 GiB image with every cluster allocated, taken a third into a {runtime} s run of 4 KiB random writes at QD32 (medians of {rounds} rounds):\n\n{table}"
    );
    Ok(())
}
