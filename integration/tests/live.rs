//! Operations on a disk while it is served, through the control socket:
//! `block_resize` (the frontend hears of the new capacity on its backend
//! channel, at once or when its device next starts) and internal snapshots
//! taken while a client writes (the guest's requests drained and held;
//! each snapshot restores exactly what was written before it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qblk_integration::qmp::Qmp;
use qblk_integration::rawq::{D, DATA, RawFrontend};
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::json;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

fn capacity(raw: &mut RawFrontend) -> u64 {
    u64::from_le_bytes(raw.config(8)[..8].try_into().expect("8 bytes"))
}

fn wait_count(count: &AtomicU64, want: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) < want {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Writes `fill` to the 4 KiB at `offset` and reads it back; the
/// statuses.
fn write_read(raw: &mut RawFrontend, offset: u64, fill: u8) -> (u8, u8, Vec<u8>) {
    let status = DATA + 64;
    raw.write(DATA + 8192, &[fill; 4096]);
    let h = raw.header(DATA, T_OUT, offset / 512);
    let (_, w) = raw.roundtrip(
        &[h, D(DATA + 8192, 4096, false), D(status, 1, true)],
        status,
    );
    let h = raw.header(DATA, T_IN, offset / 512);
    let (_, r) = raw.roundtrip(
        &[h, D(DATA + 16384, 4096, true), D(status, 1, true)],
        status,
    );
    (w, r, raw.read(DATA + 16384, 4096))
}

#[test]
fn block_resize_grows_the_disk_and_the_frontend_hears_of_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    let (mut raw, notices) = RawFrontend::connect_with_notices(&daemon.socket);
    assert_eq!(capacity(&mut raw), (64 << 20) / 512);
    // Past the end: refused.
    let (w, _, _) = write_read(&mut raw, 100 << 20, 0x11);
    assert_eq!(w, S_IOERR);

    // Bad requests change nothing.
    for (args, class, says) in [
        (
            json!({"node-name": "disk", "size": 32 << 20}),
            "GenericError",
            "shrinking",
        ),
        (
            json!({"node-name": "disk", "size": (128 << 20) + 100}),
            "GenericError",
            "multiple of 512",
        ),
        (
            json!({"node-name": "nope", "size": 128 << 20}),
            "DeviceNotFound",
            "nope",
        ),
        (
            json!({"device": "disk", "node-name": "disk", "size": 128 << 20}),
            "GenericError",
            "exactly one",
        ),
        (
            json!({"node-name": "disk", "size": "big"}),
            "GenericError",
            "integer",
        ),
        (
            json!({"node-name": "disk"}),
            "GenericError",
            "'size' is missing",
        ),
    ] {
        let (c, desc) = q.err("block_resize", args.clone());
        assert_eq!(c, class, "{args}: {desc}");
        assert!(desc.contains(says), "{args}: {desc}");
    }
    assert_eq!(notices.load(Ordering::SeqCst), 0);

    // Grown while the ring runs: the notice comes at once, and the new
    // space takes I/O.
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 128 << 20}),
    );
    assert!(
        wait_count(&notices, 1),
        "no config change notice\n{}",
        daemon.log()
    );
    assert_eq!(capacity(&mut raw), (128 << 20) / 512);
    let (w, r, back) = write_read(&mut raw, 100 << 20, 0x11);
    assert_eq!((w, r), (S_OK, S_OK));
    assert_eq!(back, vec![0x11; 4096]);

    // Grown while the ring is stopped (a rebooting guest): QEMU would drop
    // a notice now, so it comes when the ring starts again.
    raw.set_enabled(false);
    q.ok("block_resize", json!({"device": "disk", "size": 192 << 20}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(notices.load(Ordering::SeqCst), 1, "notice while stopped");
    raw.set_enabled(true);
    assert!(
        wait_count(&notices, 2),
        "no notice at restart\n{}",
        daemon.log()
    );
    assert_eq!(capacity(&mut raw), (192 << 20) / 512);
    // Nothing new to tell: a restart sends nothing more.
    raw.set_enabled(false);
    raw.set_enabled(true);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        notices.load(Ordering::SeqCst),
        2,
        "a notice with nothing changed"
    );
    let (w, _, _) = write_read(&mut raw, (192 << 20) - 4096, 0x22);
    assert_eq!(w, S_OK);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["image"]["virtual-size"], 192 << 20);

    drop(raw);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
    assert_eq!(qemu_info("a.qcow2", d)["virtual-size"], 192 << 20);
    let disk = qemu_raw(d, "a.qcow2");
    assert_eq!(&disk[100 << 20..(100 << 20) + 4096], &[0x11; 4096][..]);
    assert_eq!(&disk[(192 << 20) - 4096..], &[0x22; 4096][..]);
}

#[test]
fn block_resize_of_a_raw_disk_and_refusals_when_read_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    std::fs::File::create(d.join("r.img"))
        .and_then(|f| f.set_len(8 << 20))
        .expect("raw image");
    let mut daemon = Daemon::qblk(
        d,
        "r.sock",
        &["--control", "qmp.sock", "--format", "raw", "r.img"],
    );
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 16 << 20}),
    );
    assert_eq!(
        std::fs::metadata(d.join("r.img")).expect("stat").len(),
        16 << 20
    );
    let c = Client::connect(&daemon.socket, 1).expect("client");
    assert_eq!(c.capacity(), 16 << 20);
    drop(c);
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());

    create_qcow2(d, "ro.qcow2", "8M");
    let mut daemon = Daemon::qblk(
        d,
        "ro.sock",
        &["--control", "qmp2.sock", "--readonly", "ro.qcow2"],
    );
    let (mut q, _) = Qmp::connect(&d.join("qmp2.sock"));
    q.ok("qmp_capabilities", json!({}));
    let (_, desc) = q.err(
        "block_resize",
        json!({"node-name": "disk", "size": 16 << 20}),
    );
    assert!(desc.contains("read-only"), "{desc}");
    let (_, desc) = q.err(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s"}),
    );
    assert!(desc.contains("read only"), "{desc}");
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
}

/// What the writer thread knows: the content of the first region as it
/// wrote it, and every write to the second, in order.
struct Shadow {
    region: Vec<u8>,
    second: Vec<(usize, u8)>,
}

/// The second region after the first `k` writes of `log`.
fn replay(log: &[(usize, u8)], k: usize, len: usize, block: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    for &(at, fill) in &log[..k] {
        out[at..at + block].fill(fill);
    }
    out
}

#[test]
fn internal_snapshots_while_a_client_writes_restore_exactly_what_was_written_before_them() {
    const REGION: u64 = 8 << 20;
    const BLOCK: usize = 16384;
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "s.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--control", "qmp.sock", "s.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));

    // The writer: random blocks of the first region (known content), and
    // of the second, which keeps being written while the snapshots are
    // taken (requests drained and held by them).
    let shadow = Arc::new(Mutex::new(Shadow {
        region: vec![0; REGION as usize],
        second: Vec::new(),
    }));
    let quiet_first = Arc::new(AtomicBool::new(false));
    let quiet_acked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let max_us = Arc::new(AtomicU64::new(0));
    let socket = daemon.socket.clone();
    let writer = {
        let (shadow, quiet_first, quiet_acked, stop, max_us) = (
            shadow.clone(),
            quiet_first.clone(),
            quiet_acked.clone(),
            stop.clone(),
            max_us.clone(),
        );
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 1).expect("client");
            let mut seed = 0x1234_5678_u64;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let quiet = quiet_first.load(Ordering::SeqCst);
                quiet_acked.store(quiet, Ordering::SeqCst);
                let in_first = !quiet && seed >> 63 == 1;
                let block = (seed >> 20) % (REGION / BLOCK as u64);
                let offset = block * BLOCK as u64 + if in_first { 0 } else { REGION };
                let fill = (seed >> 8) as u8;
                c.buf()[..BLOCK].fill(fill);
                let began = Instant::now();
                assert_eq!(c.write(offset, 0, BLOCK), 0, "write at {offset}");
                max_us.fetch_max(began.elapsed().as_micros() as u64, Ordering::SeqCst);
                let mut sh = shadow.lock().expect("shadow");
                if in_first {
                    let at = offset as usize;
                    sh.region[at..at + BLOCK].fill(fill);
                } else {
                    sh.second.push(((offset - REGION) as usize, fill));
                }
                n += 1;
            }
            n
        })
    };
    let mut expected = Vec::new();
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        // Quiesce the writer's first region (the second keeps going).
        quiet_first.store(true, Ordering::SeqCst);
        while !quiet_acked.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let (content, before) = {
            let sh = shadow.lock().expect("shadow");
            (sh.region.clone(), sh.second.len())
        };
        let name = format!("s{i}");
        q.ok(
            "blockdev-snapshot-internal-sync",
            json!({"device": "disk", "name": name}),
        );
        // The writes to the second region completed before the command was
        // sent are in the snapshot, those started after its reply are not,
        // and the one in flight meanwhile is wholly in or wholly out.
        let after = shadow.lock().expect("shadow").second.len() + 1;
        quiet_first.store(false, Ordering::SeqCst);
        expected.push((name, content, before, after));
    }
    // Errors: a name in use, a missing one, neither id nor name.
    let (_, desc) = q.err(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s0"}),
    );
    assert!(desc.contains("already exists"), "{desc}");
    let (_, desc) = q.err(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "disk", "name": "nope"}),
    );
    assert!(desc.contains("does not exist"), "{desc}");
    let (_, desc) = q.err(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "disk"}),
    );
    assert!(desc.contains("Name or id"), "{desc}");
    // A fourth snapshot, deleted again while the writer runs.
    q.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "gone"}),
    );
    std::thread::sleep(Duration::from_millis(200));
    let info = q.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "disk", "name": "gone"}),
    );
    assert_eq!(info["name"], "gone", "{info}");
    assert!(info["date-sec"].as_u64().is_some_and(|s| s > 0), "{info}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().expect("writer");
    println!(
        "{writes} writes; the longest took {} us",
        max_us.load(Ordering::SeqCst)
    );
    let (last, log) = {
        let sh = shadow.lock().expect("shadow");
        (sh.region.clone(), sh.second.clone())
    };
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("s.qcow2", d);
    let list = sh(d, &["qemu-img", "snapshot", "-l", "s.qcow2"]);
    assert!(!list.contains("gone"), "{list}");
    assert_eq!(
        &qemu_raw(d, "s.qcow2")[..REGION as usize],
        &last[..],
        "the live disk"
    );
    for (name, content, before, after) in expected {
        sh(d, &["cp", "s.qcow2", "t.qcow2"]);
        sh(d, &["qemu-img", "snapshot", "-a", &name, "t.qcow2"]);
        let disk = qemu_raw(d, "t.qcow2");
        assert!(
            disk[..REGION as usize] == content[..],
            "snapshot {name} does not hold what was written before it"
        );
        let second = &disk[REGION as usize..2 * REGION as usize];
        let matches = (before..=after.min(log.len()))
            .any(|k| replay(&log, k, REGION as usize, BLOCK) == second);
        assert!(
            matches,
            "snapshot {name}'s second region is no state the writes passed through between {before} and {after}"
        );
    }
}
