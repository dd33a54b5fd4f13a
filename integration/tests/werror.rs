//! I/O errors the way operators expect (`--werror`, `--rerror`, QMP
//! `stop`/`cont`/`query-status`): a write that meets a full file system
//! is held and the device stops (`BLOCK_IO_ERROR` with `nospace`, `STOP`)
//! until the operator frees space and says `cont`, after which every held
//! write completes and lands; `--werror report` fails it instead.
//! `--rerror stop` holds a failing read, and a retry that fails again is
//! held again. Held requests never hold up a snapshot, a resize or a
//! ring's stop.
//!
//! A failed fdatasync is never forgotten: with a disk whose first flush
//! fails (qemu-storage-daemon's FUSE export over QEMU's blkdebug), every
//! later flush fails too, `cont` does not cure a held one, and its ring's
//! stop fails it rather than leave it for a fresh daemon to retry.
//!
//! The full file system is a loop-mounted ext4 image: the tests that use
//! it need root (CI runs them as root) and fail, not skip, without it;
//! the FUSE export needs /dev/fuse.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use qblk_integration::qmp::Qmp;
use qblk_integration::rawq::{D, DATA, RawFrontend};
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// Bytes of each test write.
const CHUNK: usize = MIB as usize;
/// Writes kept in flight.
const DEPTH: usize = 4;

/// The pattern of write `i`.
fn fill_byte(i: usize) -> u8 {
    (i % 250 + 1) as u8
}

/// Completions ready on queue 0 within `timeout` (none is fine).
fn poll(c: &mut Client, timeout: Duration) -> Vec<(usize, i32)> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..64).map(|_| MaybeUninit::uninit()).collect();
    loop {
        let got = c.queues[0]
            .do_io(&mut completions, 0, None, None)
            .expect("do_io");
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
        if !out.is_empty() || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Submits write `i` (1 MiB of its pattern at `i` MiB), staged in slot
/// `i % 32` of the client's memory.
fn submit_write(c: &mut Client, i: usize) {
    let at = (i % 32) * CHUNK;
    c.buf()[at..at + CHUNK].fill(fill_byte(i));
    let p = c.ptr(at);
    c.queues[0].write(i as u64 * MIB, p, CHUNK, i, ReqFlags::empty());
}

/// Keeps `DEPTH` writes in flight until none completes for `quiet`:
/// returns the writes that completed (with their results) and those
/// still in flight.
fn write_until_stuck(
    c: &mut Client,
    max: usize,
    quiet: Duration,
) -> (Vec<(usize, i32)>, Vec<usize>) {
    let mut done = Vec::new();
    let mut in_flight = Vec::new();
    let mut next = 0;
    loop {
        while in_flight.len() < DEPTH && next < max {
            submit_write(c, next);
            in_flight.push(next);
            next += 1;
        }
        if next >= max && in_flight.is_empty() {
            // Never stuck.
            return (done, in_flight);
        }
        let got = poll(c, quiet);
        if got.is_empty() {
            return (done, in_flight);
        }
        for (i, ret) in got {
            in_flight.retain(|&x| x != i);
            done.push((i, ret));
        }
    }
}

/// `qblk serve` of `mnt/a.qcow2` with `--werror werror`, or the default
/// policy (`enospc`) if `werror` is `None`.
fn serve(d: &Path, werror: Option<&str>) -> Daemon {
    let mut args = vec!["--control", "qmp.sock"];
    if let Some(policy) = werror {
        args.extend(["--werror", policy]);
    }
    args.push("mnt/a.qcow2");
    Daemon::qblk(d, "w.sock", &args)
}

fn qmp(d: &Path) -> Qmp {
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    q
}

fn status(q: &mut Qmp) -> Value {
    q.ok("query-status", json!({}))
}

/// Runs a control command that must answer (success or a clear refusal)
/// without waiting out a drain timeout.
fn prompt(q: &mut Qmp, execute: &str, args: Value) -> Value {
    let began = Instant::now();
    let r = q.cmd(execute, args);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{execute} took {:?}: {r}",
        began.elapsed()
    );
    if let Some(desc) = r["error"]["desc"].as_str() {
        assert!(!desc.contains("did not finish"), "{execute}: {r}");
    }
    r
}

#[test]
fn a_full_file_system_stops_the_device_and_cont_completes_every_held_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let fs = SmallFs::new(d);
    create_qcow2(d, "mnt/a.qcow2", "128M");
    // The default policy: `enospc`.
    let mut daemon = serve(d, None);
    let mut q = qmp(d);
    assert_eq!(
        status(&mut q),
        json!({"running": true, "singlestep": false, "status": "running"})
    );
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    fs.fill(6 * MIB);

    // Writes until they stop completing: none fails.
    let (done, held) = write_until_stuck(&mut c, 128, Duration::from_secs(3));
    assert!(
        done.iter().all(|&(_, ret)| ret == 0),
        "a write failed under the default --werror enospc: {done:?}\n{}",
        daemon.log()
    );
    assert!(!held.is_empty(), "writes never stopped completing");
    if !daemon.alive() {
        panic!("daemon died ({}):\n{}", daemon.wait(), daemon.log());
    }
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR\n{}", daemon.log()));
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["nospace"], true, "{e}");
    assert_eq!(e["data"]["operation"], "write", "{e}");
    assert!(
        q.event("STOP", Duration::from_secs(10)).is_some(),
        "no STOP"
    );
    assert_eq!(
        status(&mut q),
        json!({"running": false, "singlestep": false, "status": "io-error"})
    );
    // Held, not failed: nothing more completes while the device stands.
    assert!(poll(&mut c, Duration::from_millis(500)).is_empty());

    // Space again; the snapshot and the resize an operator may want
    // first do not wait for the held writes.
    fs.unfill();
    let r = prompt(
        &mut q,
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "while-held"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = prompt(
        &mut q,
        "block_resize",
        json!({"node-name": "disk", "size": 192 * MIB}),
    );
    assert!(r.get("return").is_some(), "{r}");
    assert!(poll(&mut c, Duration::from_millis(300)).is_empty());

    q.ok("cont", json!({}));
    assert!(
        q.event("RESUME", Duration::from_secs(10)).is_some(),
        "no RESUME"
    );
    let mut done = done;
    let mut waiting = held.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiting.is_empty() {
        assert!(
            Instant::now() < deadline,
            "held writes {waiting:?} did not complete after cont\n{}",
            daemon.log()
        );
        for (i, ret) in poll(&mut c, Duration::from_secs(1)) {
            assert_eq!(ret, 0, "held write {i} failed after cont\n{}", daemon.log());
            waiting.retain(|&x| x != i);
            done.push((i, ret));
        }
    }
    assert_eq!(status(&mut q)["status"], "running");
    // The device serves on.
    let next = done.iter().map(|&(i, _)| i).max().unwrap_or(0) + 1;
    c.buf()[..4096].fill(0xee);
    assert_eq!(c.write(next as u64 * MIB, 0, 4096), 0);
    assert_eq!(c.flush(), 0);
    drop(c);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());

    qemu_check_clean("mnt/a.qcow2", d);
    sh(
        d,
        &["qemu-img", "convert", "-O", "raw", "mnt/a.qcow2", "a.raw"],
    );
    let disk = std::fs::read(d.join("a.raw")).expect("converted image");
    for &(i, _) in &done {
        let at = i * CHUNK;
        assert!(
            disk[at..at + CHUNK].iter().all(|&b| b == fill_byte(i)),
            "write {i} does not read back"
        );
    }
    let at = next * CHUNK;
    assert!(disk[at..at + 4096].iter().all(|&b| b == 0xee));
    drop(fs);
}

#[test]
fn werror_report_fails_the_write_that_meets_a_full_file_system() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let fs = SmallFs::new(d);
    create_qcow2(d, "mnt/a.qcow2", "128M");
    let mut daemon = serve(d, Some("report"));
    let mut q = qmp(d);
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    fs.fill(6 * MIB);
    let mut failed = None;
    for i in 0..64 {
        c.buf()[..CHUNK].fill(fill_byte(i));
        let ret = c.write(i as u64 * MIB, 0, CHUNK);
        if ret != 0 {
            failed = Some(ret);
            break;
        }
    }
    assert_eq!(
        failed,
        Some(-libc::EIO),
        "no write failed with an I/O error\n{}",
        daemon.log()
    );
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "report", "{e}");
    assert_eq!(e["data"]["nospace"], true, "{e}");
    assert_eq!(status(&mut q)["status"], "running");
    // Space again: writes succeed again, with no cont.
    fs.unfill();
    c.buf()[..4096].fill(0x77);
    assert_eq!(c.write(100 * MIB, 0, 4096), 0);
    assert_eq!(c.flush(), 0);
    drop(c);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("mnt/a.qcow2", d);
    drop(fs);
}

/// Writes `fill` to the 4 KiB at `offset` through a raw frontend, without
/// waiting; `slot` keeps the chains of several writes apart.
fn raw_write(raw: &mut RawFrontend, slot: u16, offset: u64, fill: u8) {
    let base = DATA + u64::from(slot) * 16384;
    raw.write(base + 4096, &[fill; 4096]);
    raw.write(base + 64, &[0xee]);
    let h = raw.header(base, 1, offset / 512);
    raw.place(
        slot * 3,
        &[h, D(base + 4096, 4096, false), D(base + 64, 1, true)],
    );
    raw.publish(slot * 3);
}

fn raw_status(raw: &RawFrontend, slot: u16) -> u8 {
    raw.read(DATA + u64::from(slot) * 16384 + 64, 1)[0]
}

#[test]
fn stop_and_cont_hold_new_requests_and_a_ring_stop_does_not_wait_for_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let mut q = qmp(d);

    // Without inflight tracking: a request waiting at the stopped device
    // fails when the frontend stops the ring, at once.
    let mut raw = RawFrontend::connect(&daemon.socket);
    q.ok("stop", json!({}));
    assert!(q.event("STOP", Duration::from_secs(10)).is_some());
    assert_eq!(
        status(&mut q),
        json!({"running": false, "singlestep": false, "status": "paused"})
    );
    raw_write(&mut raw, 0, 0, 0x11);
    assert!(
        raw.wait_used(Duration::from_millis(500)).is_none(),
        "ran while stopped"
    );
    // A snapshot while it waits goes ahead at once.
    let r = prompt(
        &mut q,
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s1"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    raw.set_enabled(false);
    assert!(
        raw.wait_used(Duration::from_secs(10)).is_some(),
        "the ring's stop did not finish the request the stopped device holds within 10 s"
    );
    assert_eq!(raw_status(&raw, 0), 1, "not VIRTIO_BLK_S_IOERR");
    drop(raw);

    // With inflight tracking: the request stays in the frontend's
    // inflight region through a daemon stop (which does not wait for it),
    // and the next daemon runs it.
    let mut raw = RawFrontend::connect_tracked(&daemon.socket, 0);
    raw_write(&mut raw, 1, 8192, 0x22);
    assert!(
        raw.wait_used(Duration::from_millis(500)).is_none(),
        "ran while stopped"
    );
    drop(q);
    let began = Instant::now();
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the daemon's stop waited {:?} for a request the stopped device holds",
        began.elapsed()
    );
    assert_eq!(raw.inflight_desc(3).inflight, 1, "not left in flight");
    let mut second = Daemon::qblk(d, "s.sock", &["--control", "qmp2.sock", "a.qcow2"]);
    let mut raw = raw.reconnect(&second.socket);
    assert!(
        raw.wait_used(Duration::from_secs(10)).is_some(),
        "not resubmitted\n{}",
        second.log()
    );
    assert_eq!(raw_status(&raw, 1), 0);

    // stop/cont on a running device: new requests wait, then run.
    let (mut q, _) = Qmp::connect(&d.join("qmp2.sock"));
    q.ok("qmp_capabilities", json!({}));
    q.ok("stop", json!({}));
    raw_write(&mut raw, 2, 16384, 0x33);
    assert!(
        raw.wait_used(Duration::from_millis(500)).is_none(),
        "ran while stopped"
    );
    q.ok("cont", json!({}));
    assert!(q.event("RESUME", Duration::from_secs(10)).is_some());
    assert!(
        raw.wait_used(Duration::from_secs(10)).is_some(),
        "not run after cont"
    );
    assert_eq!(raw_status(&raw, 2), 0);
    assert_eq!(status(&mut q)["running"], true);
    // cont on a running device does nothing.
    q.ok("cont", json!({}));
    drop(raw);
    drop(q);
    assert!(second.stop().success(), "{}", second.log());
    qemu_check_clean("a.qcow2", d);
    let disk = qemu_raw(d, "a.qcow2");
    assert!(
        disk[..4096].iter().all(|&b| b == 0),
        "the failed write landed"
    );
    assert!(disk[8192..12288].iter().all(|&b| b == 0x22));
    assert!(disk[16384..20480].iter().all(|&b| b == 0x33));
}

#[test]
fn bad_error_policies_are_refused_by_the_command_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    for (args, says) in [
        (
            &["--werror", "ignore"][..],
            "--werror ignore is not supported",
        ),
        (
            &["--rerror", "ignore"][..],
            "--rerror ignore is not supported",
        ),
        (&["--rerror", "enospc"][..], "--rerror enospc"),
        (&["--werror", "halt"][..], "report, stop, enospc"),
    ] {
        let mut full = vec!["serve", "--socket", "x.sock"];
        full.extend_from_slice(args);
        full.push("a.qcow2");
        let out = qblk(&full, d);
        assert!(!out.status.success(), "{args:?} accepted");
        let err = stderr(&out);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// An image whose first cluster is compressed and no longer decompresses
/// (its compressed bytes overwritten): every read of it fails, and
/// nothing marks the image corrupt.
fn broken_compressed(d: &Path) {
    std::fs::write(d.join("src.raw"), vec![0x5a; 1 << 20]).expect("source");
    sh(
        d,
        &[
            "qemu-img", "convert", "-q", "-c", "-O", "qcow2", "src.raw", "c.qcow2",
        ],
    );
    // The first L2 entry's host offset (qcow2.txt: compressed cluster
    // descriptor, 64 KiB clusters: the offset is bits 0..54).
    let img = std::fs::read(d.join("c.qcow2")).expect("read image");
    let be = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().expect("8 bytes"));
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(l2);
    assert_ne!(entry & 1 << 62, 0, "cluster 0 is not compressed");
    let at = entry & ((1 << 54) - 1);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("c.qcow2"))
        .expect("open image");
    f.write_all_at(&[0xff; 64], at).expect("break the cluster");
}

#[test]
fn rerror_stop_holds_a_failing_read_and_a_retry_that_fails_again_is_held_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    broken_compressed(d);
    let mut daemon = Daemon::qblk(
        d,
        "r.sock",
        &["--control", "qmp.sock", "--rerror", "stop", "c.qcow2"],
    );
    let mut q = qmp(d);
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    let p = c.ptr(0);
    c.queues[0].read(0, p, 4096, 7, ReqFlags::empty());
    // Submitted by the first do_io; held, so nothing completes.
    assert!(
        poll(&mut c, Duration::from_millis(300)).is_empty(),
        "not held"
    );
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR\n{}", daemon.log()));
    assert_eq!(e["data"]["operation"], "read", "{e}");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["nospace"], false, "{e}");
    assert!(q.event("STOP", Duration::from_secs(10)).is_some());
    assert_eq!(status(&mut q)["status"], "io-error");
    // Nothing was cured: the retry fails and is held again.
    q.ok("cont", json!({}));
    assert!(q.event("RESUME", Duration::from_secs(10)).is_some());
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("a second BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert!(q.event("STOP", Duration::from_secs(10)).is_some());
    assert_eq!(status(&mut q)["status"], "io-error");
    assert!(
        poll(&mut c, Duration::from_millis(300)).is_empty(),
        "not held again"
    );
    drop(c);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());

    // The default, report: the read fails.
    let mut daemon = Daemon::qblk(d, "r.sock", &["--control", "qmp.sock", "c.qcow2"]);
    let mut q = qmp(d);
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    assert_eq!(c.read(0, 0, 4096), -libc::EIO);
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "report", "{e}");
    assert_eq!(status(&mut q)["status"], "running");
    drop(c);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
}

/// qemu-storage-daemon exporting `disk.raw` as the regular file `exp.img`
/// over FUSE, through QEMU's blkdebug driver set to fail the first flush
/// with EIO: the first fdatasync of `exp.img` fails, later ones succeed
/// (what Linux does after a failed writeback: the pages it could not
/// write are clean now).
fn failing_flush_export(d: &Path) -> Daemon {
    std::fs::File::create(d.join("disk.raw"))
        .and_then(|f| f.set_len(16 * MIB))
        .expect("disk");
    std::fs::File::create(d.join("exp.img")).expect("mount point");
    let dbg = json!({
        "driver": "blkdebug", "node-name": "dbg", "image": "f",
        "inject-error": [{"event": "flush_to_disk", "iotype": "flush", "errno": 5, "once": true}],
    })
    .to_string();
    Daemon::spawn(
        Path::new("qemu-storage-daemon"),
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=disk.raw",
            "--blockdev",
            &dbg,
            "--blockdev",
            "driver=raw,node-name=top,file=dbg",
            "--export",
            "type=fuse,id=e,node-name=top,mountpoint=exp.img,writable=on",
            // Last: the socket appears once the export is up.
            "--chardev",
            "socket,id=m,path=qsd.qmp,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        d,
        "qsd.qmp",
    )
}

#[test]
fn a_failed_fdatasync_fails_every_later_flush_even_when_the_disk_would_sync_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let _qsd = failing_flush_export(d);
    let args = [
        "--control",
        "qmp.sock",
        "--format",
        "raw",
        "--cache",
        "writeback",
        "exp.img",
    ];
    let mut daemon = Daemon::qblk(d, "f.sock", &args);
    let mut q = qmp(d);
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    c.buf()[..4096].fill(0x31);
    assert_eq!(c.write(0, 0, 4096), 0);
    assert_eq!(c.flush(), -libc::EIO, "the injected flush failure");
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR");
    // Not a full disk, whatever the errno: reported under enospc.
    assert_eq!(e["data"]["action"], "report", "{e}");
    assert_eq!(e["data"]["nospace"], false, "{e}");
    let reason = e["data"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("fdatasync failed"), "{e}");
    // Writes go on; no flush succeeds again, though the disk would sync.
    for fill in [0x32, 0x33] {
        c.buf()[..4096].fill(fill);
        assert_eq!(c.write(4096, 0, 4096), 0, "writes are still accepted");
        assert_eq!(
            c.flush(),
            -libc::EIO,
            "a flush after the failed fdatasync succeeded\n{}",
            daemon.log()
        );
        let e = q
            .event("BLOCK_IO_ERROR", Duration::from_secs(10))
            .expect("BLOCK_IO_ERROR");
        let reason = e["data"]["reason"].as_str().unwrap_or("");
        assert!(reason.contains("an earlier fdatasync failed"), "{e}");
    }
    drop(c);
    drop(q);
    assert!(
        !daemon.stop().success(),
        "a clean close after a failed fdatasync\n{}",
        daemon.log()
    );
}

#[test]
fn werror_stop_holds_a_flush_whose_fdatasync_failed_and_cont_does_not_cure_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let _qsd = failing_flush_export(d);
    let args = [
        "--control",
        "qmp.sock",
        "--werror",
        "stop",
        "--format",
        "raw",
        "--cache",
        "writeback",
        "exp.img",
    ];
    let mut daemon = Daemon::qblk(d, "f.sock", &args);
    let mut q = qmp(d);
    let mut raw = RawFrontend::connect_tracked(&daemon.socket, 0);
    raw_write(&mut raw, 0, 0, 0x41);
    assert!(raw.wait_used(Duration::from_secs(10)).is_some());
    assert_eq!(raw_status(&raw, 0), 0);
    // A flush (VIRTIO_BLK_T_FLUSH) in slot 1.
    let base = DATA + 16384;
    raw.write(base + 64, &[0xee]);
    let h = raw.header(base, 4, 0);
    raw.place(3, &[h, D(base + 64, 1, true)]);
    raw.publish(3);
    assert!(
        raw.wait_used(Duration::from_millis(300)).is_none(),
        "not held"
    );
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["nospace"], false, "{e}");
    assert_eq!(status(&mut q)["status"], "io-error");
    // The disk would sync now; the retry still fails, and says why.
    q.ok("cont", json!({}));
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("the retry's BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    let reason = e["data"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("an earlier fdatasync failed"), "{e}");
    assert!(
        raw.wait_used(Duration::from_millis(300)).is_none(),
        "not held again"
    );
    assert_eq!(status(&mut q)["status"], "io-error");
    // The ring stops: the held flush is failed, not left in the inflight
    // region for a daemon that would retry it on a fresh open.
    raw.set_enabled(false);
    assert!(
        raw.wait_used(Duration::from_secs(10)).is_some(),
        "the held flush did not complete when the ring stopped\n{}",
        daemon.log()
    );
    assert_eq!(raw_status(&raw, 1), 1, "not VIRTIO_BLK_S_IOERR");
    assert_eq!(raw.inflight_desc(3).inflight, 0, "left in flight");
    drop(raw);
    drop(q);
    assert!(!daemon.stop().success(), "{}", daemon.log());
}
