//! fio inside a Linux guest, against each daemon in turn: what users run
//! when they judge a disk backend. `cargo xtask bench-guest` runs this.
//!
//! The e2e guest kit (`qblk_integration::guest`: the host's kernel, busybox
//! and fio in an initramfs) boots one QEMU TCG guest per daemon and round,
//! with one vhost-user-blk disk on a fresh, empty 2 GiB qcow2 image served
//! by qblk (`qblk serve`, its defaults) or by qemu-storage-daemon
//! (`aio=io_uring,cache.direct=on`, as in `cargo xtask bench`). In the
//! guest, fio (libaio, O_DIRECT) runs in turn: 4 KiB random writes at QD32
//! (each to a fresh cluster: the image starts empty), 1 MiB sequential
//! writes and reads at QD8, 4 KiB random reads at QD32 over what was
//! written, and 4 KiB random writes with an fsync after each. Rounds
//! alternate the daemons' order; the figures are medians. TCG makes the
//! absolute figures low: the ratio between the daemons in one run is what
//! counts.

use std::path::Path;

use qblk_integration::benchbin::{BenchArgs, median};
use qblk_integration::guest::{Disk, Vm};
use qblk_integration::sh;
use qblk_integration::vhost::Daemon;

/// The fio jobs: (name, fio arguments).
const JOBS: &[(&str, &str)] = &[
    (
        "4k randwrite QD32, fresh clusters",
        "--rw=randwrite --bs=4k --iodepth=32 --size=1G --norandommap --randrepeat=0",
    ),
    ("1M write QD8", "--rw=write --bs=1M --iodepth=8 --size=1G"),
    ("1M read QD8", "--rw=read --bs=1M --iodepth=8 --size=1G"),
    (
        "4k randread QD32",
        "--rw=randread --bs=4k --iodepth=32 --size=1G",
    ),
    (
        "4k randwrite + fsync, QD1",
        "--rw=randwrite --bs=4k --iodepth=1 --size=1G --fsync=1",
    ),
];

/// The guest's script: each job, then `GB <index> <iops> <KiB/s>`.
fn script(runtime: u64) -> String {
    let mut s = String::from("dev=/dev/vda\n");
    for (i, (_, args)) in JOBS.iter().enumerate() {
        s.push_str(&format!(
            "fio --name=j{i} --filename=$dev --ioengine=libaio --direct=1 --time_based \
             --runtime={runtime} {args} --output-format=terse --terse-version=3 >/tmp/j{i}\n\
             echo \"GB {i} $(cut -d';' -f7,8,48,49 /tmp/j{i})\"\n"
        ));
    }
    s
}

/// `(IOPS, MB/s)` per job from the console's `GB` lines: terse v3 fields
/// 7 and 8 are read KiB/s and IOPS, 48 and 49 write KiB/s and IOPS.
fn results(console: &str) -> Result<Vec<(f64, f64)>, String> {
    let mut out = vec![None; JOBS.len()];
    for line in console.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("GB") {
            continue;
        }
        let (Some(i), Some(fields)) = (w.next().and_then(|i| i.parse::<usize>().ok()), w.next())
        else {
            continue;
        };
        let f: Vec<f64> = fields.split(';').filter_map(|v| v.parse().ok()).collect();
        if let (Some(slot), [rbw, riops, wbw, wiops]) = (out.get_mut(i), f.as_slice()) {
            *slot = Some((riops + wiops, (rbw + wbw) * 1024.0 / 1e6));
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or(format!("no result for job {i} in the console:\n{console}")))
        .collect()
}

fn qsd(dir: &Path) -> Daemon {
    Daemon::spawn(
        Path::new("qemu-storage-daemon"),
        &[
            "--blockdev",
            "driver=file,node-name=file,filename=g.qcow2,aio=io_uring,cache.direct=on",
            "--blockdev",
            "driver=qcow2,node-name=fmt,file=file",
            "--export",
            "type=vhost-user-blk,id=exp,node-name=fmt,addr.type=unix,addr.path=g.sock,writable=on",
        ],
        dir,
        "g.sock",
    )
}

fn main() {
    let o = BenchArgs::from_env("guestbench", 10, 2, false);
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let names = ["qblk", "qemu-storage-daemon"];
    // results[daemon][job] = (IOPS, MB/s) of each round
    let mut all = vec![vec![Vec::new(); JOBS.len()]; names.len()];
    for round in 0..o.rounds {
        for k in 0..names.len() {
            let which = (k + round) % names.len();
            let _ = std::fs::remove_file(d.join("g.qcow2"));
            sh(
                d,
                &["qemu-img", "create", "-q", "-f", "qcow2", "g.qcow2", "2G"],
            );
            let mut daemon = if which == 0 {
                Daemon::spawn(
                    &o.qblk,
                    &["serve", "--socket", "g.sock", "g.qcow2"],
                    d,
                    "g.sock",
                )
            } else {
                qsd(d)
            };
            let disk = Disk {
                socket: daemon.socket.clone(),
                queues: 1,
                reconnect: false,
            };
            let vm = Vm::start(
                d,
                &format!("gb-{round}-{which}"),
                &script(o.runtime),
                &[disk],
                false,
            );
            let console = vm.finish();
            let _ = daemon.stop();
            if !console.passed() {
                eprintln!(
                    "guestbench: the guest failed:\n{}\n{}",
                    console.0,
                    daemon.log()
                );
                std::process::exit(1);
            }
            let r = match results(&console.0) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("guestbench: {e}");
                    std::process::exit(1);
                }
            };
            for (j, x) in r.into_iter().enumerate() {
                eprintln!(
                    "round {} {}: {}: {:.0} IOPS, {:.1} MB/s",
                    round + 1,
                    names[which],
                    JOBS[j].0,
                    x.0,
                    x.1
                );
                all[which][j].push(x);
            }
        }
    }
    println!("| fio in the guest | qblk IOPS | qsd IOPS | qblk/qsd | qblk MB/s | qsd MB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (j, (name, _)) in JOBS.iter().enumerate() {
        let m = |w: usize, f: fn(&(f64, f64)) -> f64| median(all[w][j].iter().map(f).collect());
        let (qi, di) = (m(0, |x| x.0), m(1, |x| x.0));
        println!(
            "| {name} | {qi:.0} | {di:.0} | {:.2} | {:.1} | {:.1} |",
            if di > 0.0 { qi / di } else { 0.0 },
            m(0, |x| x.1),
            m(1, |x| x.1)
        );
    }
    println!(
        "\nfio {} s a job in a QEMU TCG guest (2 vCPUs, 512 MiB), one vhost-user-blk queue, a fresh empty 2 GiB qcow2 image each run; medians of {} rounds, the daemons' order alternating.",
        o.runtime, o.rounds
    );
}
