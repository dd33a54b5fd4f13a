//! The backing chain changed while a client writes, through the control
//! socket: external snapshots (`blockdev-snapshot-sync`), a live stream
//! (`block-stream`) and a live commit (`block-commit`, `job-complete`),
//! a cancelled commit, and the refusals. Every write the client made is
//! in the final image, every image is clean under `qemu-img check`, and
//! each snapshot's frozen image holds exactly what was written before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::{Value, json};

const REGION: u64 = 24 << 20;
const BLOCK: usize = 16384;

/// A client writing random blocks of the region, with a copy of what the
/// region holds once each write has completed; it can be held still.
struct Writer {
    shadow: Arc<Mutex<Vec<u8>>>,
    hold: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(socket: &std::path::Path, initial: Vec<u8>) -> Writer {
        let shadow = Arc::new(Mutex::new(initial));
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = socket.to_owned();
        let thread = {
            let (shadow, hold, held, stop) =
                (shadow.clone(), hold.clone(), held.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket, 1).expect("client");
                let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    if hold.load(Ordering::SeqCst) {
                        held.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    held.store(false, Ordering::SeqCst);
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let offset = (seed >> 24) % (REGION / BLOCK as u64) * BLOCK as u64;
                    let fill = (seed >> 8) as u8 | 1;
                    c.buf()[..BLOCK].fill(fill);
                    assert_eq!(c.write(offset, 0, BLOCK), 0, "write at {offset}");
                    let at = offset as usize;
                    shadow.lock().expect("shadow")[at..at + BLOCK].fill(fill);
                    n += 1;
                }
                n
            })
        };
        Writer {
            shadow,
            hold,
            held,
            stop,
            thread: Some(thread),
        }
    }

    /// Holds the writer still; what the region holds now.
    fn quiesce(&self) -> Vec<u8> {
        self.hold.store(true, Ordering::SeqCst);
        while !self.held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shadow.lock().expect("shadow").clone()
    }

    fn resume(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.hold.store(false, Ordering::SeqCst);
    }

    /// Stops the writer: how many writes it made, and the region.
    fn finish(mut self) -> (u64, Vec<u8>) {
        self.stop.store(true, Ordering::SeqCst);
        let n = self.thread.take().expect("thread").join().expect("writer");
        (n, self.shadow.lock().expect("shadow").clone())
    }
}

/// The region of `image` as QEMU reads it, while the daemon holds it.
fn region_of(d: &std::path::Path, image: &str) -> Vec<u8> {
    let raw = format!("{image}.region.raw");
    sh(d, &["qemu-img", "convert", "-U", "-O", "raw", image, &raw]);
    let data = std::fs::read(d.join(&raw)).expect("read");
    std::fs::remove_file(d.join(&raw)).expect("remove");
    data[..REGION as usize].to_vec()
}

fn nodes(q: &mut Qmp) -> Vec<(String, String)> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap_or("").to_owned(),
                n["file"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn file_name(p: &str) -> String {
    std::path::Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The node names and file names of the chain, top down.
fn chain_files(q: &mut Qmp) -> Vec<(String, String)> {
    nodes(q)
        .into_iter()
        .map(|(n, f)| (n, file_name(&f)))
        .collect()
}

fn backing_of(d: &std::path::Path, image: &str) -> Option<String> {
    let info = sh(d, &["qemu-img", "info", "-U", "--output", "json", image]);
    let v: Value = serde_json::from_str(&info).expect("info json");
    v["backing-filename"].as_str().map(file_name)
}

/// Waits for a job's end event; panics with the log if none comes.
fn job_end(q: &mut Qmp, daemon: &Daemon, event: &str) -> Value {
    q.event(event, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no {event}; daemon log:\n{}", daemon.log()))
}

#[test]
fn external_snapshots_a_stream_and_a_commit_while_a_client_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    // golden <- base: the golden image has data the stream at the end
    // pulls up.
    create_qcow2(d, "golden.qcow2", "64M");
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -P 0xcd 20M 2M",
            "golden.qcow2",
        ],
    );
    create_overlay(d, "golden.qcow2", "base.qcow2");
    let mut initial = vec![0u8; REGION as usize];
    initial[..4 << 20].fill(0xab);
    initial[20 << 20..22 << 20].fill(0xcd);

    let mut daemon = Daemon::qblk(d, "b.sock", &["--control", "qmp.sock", "base.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    // Nothing to commit into that is not below; no overlay over an
    // existing file.
    std::fs::write(d.join("taken.qcow2"), b"x").expect("write");
    let (_, desc) = q.err(
        "blockdev-snapshot-sync",
        json!({"device": "disk", "snapshot-file": d.join("taken.qcow2")}),
    );
    assert!(desc.contains("already exists"), "{desc}");
    let (_, desc) = q.err(
        "block-commit",
        json!({"device": "disk", "base-node": "disk"}),
    );
    assert!(desc.contains("below the active image"), "{desc}");

    let w = Writer::start(&daemon.socket, initial);
    std::thread::sleep(Duration::from_millis(300));

    // 1. An external snapshot: base.qcow2 is frozen at this point.
    let at_s1 = w.quiesce();
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "disk", "snapshot-file": d.join("o1.qcow2"), "format": "qcow2"}),
    );
    w.resume();
    assert_eq!(
        chain_files(&mut q),
        [
            ("disk".into(), "o1.qcow2".into()),
            ("disk-backing1".into(), "base.qcow2".into()),
            ("disk-backing2".into(), "golden.qcow2".into())
        ],
        "after the first snapshot"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        region_of(d, "base.qcow2") == at_s1,
        "base.qcow2 is not the disk at the first snapshot"
    );

    // 2. Another: o2 <- o1 <- base <- golden.
    let at_s2 = w.quiesce();
    q.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "disk", "snapshot-file": d.join("o2.qcow2")}),
    );
    w.resume();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        region_of(d, "o1.qcow2") == at_s2,
        "o1.qcow2 is not the disk at the second snapshot"
    );

    // 3. Stream o1 into o2 while the client writes: o2 then names base.
    q.ok(
        "block-stream",
        json!({"job-id": "st", "device": "disk", "base-node": "disk-backing2"}),
    );
    let (_, desc) = q.err("block-commit", json!({"device": "disk"}));
    assert!(desc.contains("is running"), "a second job: {desc}");
    let (_, desc) = q.err("block_resize", json!({"device": "disk", "size": 128 << 20}));
    assert!(desc.contains("is running"), "resize during a job: {desc}");
    let done = job_end(&mut q, &daemon, "BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["device"], "st", "{done}");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(backing_of(d, "o2.qcow2").as_deref(), Some("base.qcow2"));
    assert_eq!(
        chain_files(&mut q),
        [
            ("disk".into(), "o2.qcow2".into()),
            ("disk-backing1".into(), "base.qcow2".into()),
            ("disk-backing2".into(), "golden.qcow2".into())
        ],
        "after the stream"
    );
    assert!(
        q.ok("query-jobs", json!({}))
            .as_array()
            .expect("jobs")
            .is_empty()
    );

    // 4. A commit into base.qcow2, cancelled once ready: o2 stays active.
    q.ok(
        "block-commit",
        json!({"job-id": "c1", "device": "disk", "base-node": "disk-backing1"}),
    );
    let ready = job_end(&mut q, &daemon, "BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], "c1", "{ready}");
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "ready", "{jobs}");
    std::thread::sleep(Duration::from_millis(200));
    q.ok("job-cancel", json!({"id": "c1"}));
    job_end(&mut q, &daemon, "BLOCK_JOB_CANCELLED");
    assert_eq!(
        chain_files(&mut q)[0].1,
        "o2.qcow2",
        "a cancelled commit switches nothing"
    );
    std::thread::sleep(Duration::from_millis(200));

    // 5. The commit again, completed: base.qcow2 becomes the active image.
    q.ok(
        "block-commit",
        json!({"job-id": "c2", "device": "disk", "base": d.join("base.qcow2"), "auto-dismiss": false}),
    );
    job_end(&mut q, &daemon, "BLOCK_JOB_READY");
    std::thread::sleep(Duration::from_millis(300));
    q.ok("job-complete", json!({"id": "c2"}));
    let done = job_end(&mut q, &daemon, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(
        jobs[0]["status"], "concluded",
        "auto-dismiss false keeps it: {jobs}"
    );
    q.ok("job-dismiss", json!({"id": "c2"}));
    assert!(
        q.ok("query-jobs", json!({}))
            .as_array()
            .expect("jobs")
            .is_empty()
    );
    assert_eq!(
        chain_files(&mut q),
        [
            ("disk".into(), "base.qcow2".into()),
            ("disk-backing1".into(), "golden.qcow2".into())
        ],
        "after the commit"
    );
    std::thread::sleep(Duration::from_millis(300));

    // 6. Stream everything into base.qcow2: no backing file left.
    q.ok("block-stream", json!({"device": "disk"}));
    job_end(&mut q, &daemon, "BLOCK_JOB_COMPLETED");
    assert_eq!(backing_of(d, "base.qcow2"), None);
    assert_eq!(chain_files(&mut q).len(), 1);
    std::thread::sleep(Duration::from_millis(200));

    let (writes, last) = w.finish();
    println!("{writes} writes during the chain changes");
    assert!(writes > 100, "the client wrote only {writes} times");
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
    for image in ["base.qcow2", "o1.qcow2", "o2.qcow2", "golden.qcow2"] {
        qemu_check_clean(image, d);
    }
    // golden.qcow2 is no longer needed: the disk reads the same without it.
    std::fs::rename(d.join("golden.qcow2"), d.join("gone.qcow2")).expect("rename");
    assert!(
        qemu_raw(d, "base.qcow2")[..REGION as usize] == last[..],
        "the final image does not hold every write"
    );
}

#[test]
fn a_daemon_stopped_during_a_commit_ends_it_and_leaves_every_image_clean() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "base.qcow2", "64M");
    create_overlay(d, "base.qcow2", "top.qcow2");
    let mut daemon = Daemon::qblk(d, "t.sock", &["--control", "qmp.sock", "top.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    let mut want = vec![0u8; 32 << 20];
    for (i, chunk) in want.chunks_mut(1 << 20).enumerate() {
        chunk.fill(i as u8 + 1);
        c.write_all((i as u64) << 20, chunk);
    }
    drop(c);
    // 1 MiB/s: the commit is still copying when the daemon is told to stop.
    q.ok(
        "block-commit",
        json!({"job-id": "slow", "device": "disk", "speed": 1 << 20}),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    let progress = jobs[0]["current-progress"].as_u64().expect("progress");
    assert!(progress < 32 << 20, "the speed limit did not hold: {jobs}");
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        daemon.log().contains("block job cancelled"),
        "{}",
        daemon.log()
    );
    for image in ["top.qcow2", "base.qcow2"] {
        qemu_check_clean(image, d);
        let journal = d.join(format!(".{image}.qblk-journal"));
        assert!(!journal.exists(), "{} was left behind", journal.display());
    }
    assert!(qemu_raw(d, "top.qcow2")[..32 << 20] == want[..]);
}
