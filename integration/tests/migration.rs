//! Live migration, daemon side: dirty-page logging (VHOST_F_LOG_ALL,
//! SET_LOG_BASE with LOG_SHMFD). While logging is on, every guest page
//! the daemon writes — data read from the disk, status bytes, the used
//! ring — is marked in the frontend's log before the completion is
//! published; off, nothing is. And the hand-over between two daemons on
//! shared storage (`--inactive`, `blockdev-set-active`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use qblk_integration::rawq::{D, DATA, MEM_SIZE, RawFrontend, USED};
use qblk_integration::vhost::Daemon;
use qblk_integration::*;

const T_IN: u32 = 0;
const LOG_BYTES: u64 = (MEM_SIZE as u64) / 4096 / 8;

fn marked(log: &File) -> Vec<u64> {
    let mut bytes = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut bytes, 0).expect("read the log");
    let mut pages = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn clear(log: &File) {
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0)
        .expect("clear the log");
}

/// Reads 8 KiB from sector 8 into guest memory at `buf` (unaligned:
/// three pages), status at DATA + 64.
fn read(raw: &mut RawFrontend, buf: u64) {
    let status = DATA + 64;
    let h = raw.header(DATA, T_IN, 8);
    let (len, st) = raw.roundtrip(&[h, D(buf, 8192, true), D(status, 1, true)], status);
    assert_eq!((len, st), (8193, 0));
}

#[test]
fn with_logging_on_every_page_the_daemon_writes_is_marked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "l.qcow2", "16M");
    let mut daemon = Daemon::qblk(d, "l.sock", &["l.qcow2"]);
    let mut raw = RawFrontend::connect(&daemon.socket);
    let log = tempfile::tempfile().expect("log file");
    log.set_len(LOG_BYTES).expect("size the log");

    // Logging on: the data pages, the status byte's page and the used
    // ring's page are marked; what the daemon only reads is not.
    raw.set_logging(Some((&log, LOG_BYTES)), true);
    let buf = DATA + 0x21800;
    read(&mut raw, buf);
    let got = marked(&log);
    let data_pages: Vec<u64> = (buf / 4096..=(buf + 8191) / 4096).collect();
    for p in data_pages.iter().chain([&(DATA / 4096), &(USED / 4096)]) {
        assert!(got.contains(p), "page {p:#x} not marked: {got:x?}");
    }
    let written: Vec<u64> = data_pages
        .iter()
        .copied()
        .chain([DATA / 4096, USED / 4096])
        .collect();
    let extra: Vec<u64> = got
        .iter()
        .copied()
        .filter(|p| !written.contains(p))
        .collect();
    assert!(
        extra.is_empty(),
        "pages marked the daemon never wrote: {extra:x?}"
    );

    // Off: nothing is marked.
    clear(&log);
    raw.set_logging(None, false);
    read(&mut raw, DATA + 0x40000);
    assert_eq!(marked(&log), Vec::<u64>::new(), "marked with logging off");

    // On again, with the log handed over before.
    raw.set_logging(None, true);
    read(&mut raw, DATA + 0x50000);
    let got = marked(&log);
    assert!(
        got.contains(&(0x50000 / 4096 + DATA / 4096)),
        "{got:x?}\n{}",
        daemon.log()
    );
    drop(raw);
    std::thread::sleep(Duration::from_millis(50));
    assert!(daemon.stop().success(), "{}", daemon.log());
}

const T_OUT: u32 = 1;
const STATUS: u64 = DATA + 64;
const WBUF: u64 = DATA + 8192;
const RBUF: u64 = DATA + 16384;

/// Submits a 4 KiB write of `fill` at `offset` (or a read, with `None`)
/// without waiting for it.
fn submit(raw: &mut RawFrontend, offset: u64, fill: Option<u8>) {
    raw.write(STATUS, &[0xee]);
    let h = match fill {
        Some(f) => {
            raw.write(WBUF, &[f; 4096]);
            raw.header(DATA, T_OUT, offset / 512)
        }
        None => raw.header(DATA, T_IN, offset / 512),
    };
    let data = match fill {
        Some(_) => D(WBUF, 4096, false),
        None => D(RBUF, 4096, true),
    };
    raw.submit(&[h, data, D(STATUS, 1, true)]);
}

/// Whether the request submitted last completes within `wait`; its
/// status must be OK.
fn completes(raw: &mut RawFrontend, wait: Duration) -> bool {
    let done = raw.wait_used(wait).is_some();
    if done {
        assert_eq!(raw.read(STATUS, 1)[0], 0, "request failed");
    }
    done
}

fn read_4k(raw: &mut RawFrontend, offset: u64) -> Vec<u8> {
    submit(raw, offset, None);
    assert!(completes(raw, Duration::from_secs(30)), "read at {offset}");
    raw.read(RBUF, 4096)
}

fn write_4k(raw: &mut RawFrontend, offset: u64, fill: u8) {
    submit(raw, offset, Some(fill));
    assert!(completes(raw, Duration::from_secs(30)), "write at {offset}");
}

const MIB: u64 = 1 << 20;

fn filled(data: &[u8], fill: u8) -> bool {
    data.iter().all(|&b| b == fill)
}
/// Long enough to tell a held request from a served one.
const HELD: Duration = Duration::from_millis(400);

/// Two daemons on one image, as on two hosts sharing storage: one serves,
/// the other starts `--inactive` (no locks, nothing cached) and answers
/// its frontend, whose requests wait. `blockdev-set-active` hands the
/// disk over — the active one commits and lets go of its locks, the
/// inactive one takes them and reads the metadata afresh — and back, and
/// a hand-over that fails half-way leaves the first daemon serving again.
/// Each side reads what the other wrote, the held requests complete once
/// their daemon is active, and the image is clean and holds every write.
#[test]
fn two_daemons_hand_a_disk_over_and_back() {
    use qblk_integration::qmp::Qmp;
    use serde_json::json;
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "s.qcow2", "64M");
    sh(d, &["qemu-io", "-c", "write -P 0x11 0 64k", "s.qcow2"]);

    let mut a = Daemon::qblk(d, "a.sock", &["--control", "a.qmp", "s.qcow2"]);
    let (mut qa, _) = Qmp::connect(&d.join("a.qmp"));
    qa.ok("qmp_capabilities", json!({}));
    let mut ra = RawFrontend::connect(&a.socket);
    write_4k(&mut ra, MIB, 0x22);

    // Not without the control socket that activates it.
    let out = qblk(&["serve", "--inactive", "--socket", "x.sock", "s.qcow2"], d);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--inactive needs --control"),
        "{}",
        stderr(&out)
    );

    // The inactive daemon starts beside the active one and answers its
    // frontend; its requests wait.
    let mut b = Daemon::qblk(
        d,
        "b.sock",
        &["--inactive", "--control", "b.qmp", "s.qcow2"],
    );
    let (mut qb, _) = Qmp::connect(&d.join("b.qmp"));
    qb.ok("qmp_capabilities", json!({}));
    assert_eq!(
        qb.ok("query-named-block-nodes", json!({}))[0]["active"],
        false
    );
    let mut rb = RawFrontend::connect(&b.socket);
    assert_eq!(
        u64::from_le_bytes(rb.config(8)[..8].try_into().expect("8 bytes")),
        64 * MIB / 512
    );
    // Written by A after B looked at the image: B must not know it yet.
    write_4k(&mut ra, 2 * MIB, 0x23);
    submit(&mut rb, 2 * MIB, None);
    assert!(
        !completes(&mut rb, HELD),
        "an inactive daemon served a read"
    );

    // Bad requests change nothing.
    for (args, says) in [
        (json!({}), "Parameter 'active' is missing"),
        (json!({"active": true, "node-name": "nope"}), "nope"),
        (json!({"active": "yes"}), "active"),
        (json!({"active": true, "bogus": 1}), "bogus"),
    ] {
        let (_, desc) = qb.err("blockdev-set-active", args);
        assert!(desc.contains(says), "{desc}");
    }
    // While A holds the image, B cannot take it.
    let (_, desc) = qb.err("blockdev-set-active", json!({"active": true}));
    assert!(desc.contains("lock"), "{desc}");
    assert_eq!(
        qb.ok("query-named-block-nodes", json!({}))[0]["active"],
        false
    );
    // Activating the active one is a no-op.
    qa.ok(
        "blockdev-set-active",
        json!({"active": true, "node-name": "disk"}),
    );

    // A lets go: the image is clean and unlocked (qemu-img check takes
    // its own locks), and A's next request waits.
    qa.ok("blockdev-set-active", json!({"active": false}));
    assert_eq!(
        qa.ok("query-named-block-nodes", json!({}))[0]["active"],
        false
    );
    qemu_check_clean("s.qcow2", d);
    submit(&mut ra, 3 * MIB, Some(0x55));
    assert!(
        !completes(&mut ra, HELD),
        "a deactivated daemon served a write"
    );

    // A hand-over that fails before B is activated: A takes the disk back,
    // its held write completes, and it lets go again.
    qa.ok("blockdev-set-active", json!({"active": true}));
    assert!(
        completes(&mut ra, Duration::from_secs(30)),
        "held write after reactivation"
    );
    qa.ok("blockdev-set-active", json!({"active": false}));

    // B takes over: its held read completes with what A wrote after B
    // started, and it writes where A never did (allocating) and over
    // what A wrote.
    qb.ok("blockdev-set-active", json!({"active": true}));
    assert!(
        completes(&mut rb, Duration::from_secs(30)),
        "held read after activation"
    );
    assert!(filled(&rb.read(RBUF, 4096), 0x23), "B read stale metadata");
    assert!(filled(&read_4k(&mut rb, MIB), 0x22), "read back");
    assert!(filled(&read_4k(&mut rb, 3 * MIB), 0x55), "read back");
    write_4k(&mut rb, 4 * MIB, 0x33);
    write_4k(&mut rb, MIB, 0x44);
    assert_eq!(
        qb.ok("query-named-block-nodes", json!({}))[0]["active"],
        true
    );

    // And back: A must have forgotten what it knew of the image.
    submit(&mut ra, 5 * MIB, Some(0x66));
    assert!(!completes(&mut ra, HELD));
    qb.ok("blockdev-set-active", json!({"active": false}));
    qa.ok("blockdev-set-active", json!({"active": true}));
    assert!(
        completes(&mut ra, Duration::from_secs(30)),
        "held write after hand-back"
    );
    assert!(
        filled(&read_4k(&mut ra, 4 * MIB), 0x33),
        "A read stale metadata"
    );
    assert!(filled(&read_4k(&mut ra, MIB), 0x44), "read back");
    write_4k(&mut ra, 6 * MIB, 0x77);

    drop((ra, rb, qa, qb));
    assert!(a.stop().success(), "{}", a.log());
    assert!(b.stop().success(), "{}", b.log());
    qemu_check_clean("s.qcow2", d);
    let disk = qemu_raw(d, "s.qcow2");
    for (at, fill) in [
        (0, 0x11u8),
        (MIB, 0x44),
        (2 * MIB, 0x23),
        (3 * MIB, 0x55),
        (4 * MIB, 0x33),
        (5 * MIB, 0x66),
        (6 * MIB, 0x77),
    ] {
        let at = at as usize;
        assert!(
            filled(&disk[at..at + 4096], fill),
            "at {at}: want {fill:#x}"
        );
    }
}
