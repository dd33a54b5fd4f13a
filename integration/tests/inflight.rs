//! Crash survival through inflight I/O tracking (vhost-user.rst, "Inflight
//! I/O tracking"): a daemon killed with requests in flight, and a new one
//! on the same image and socket that finishes exactly those.
//!
//! The frontend is the hand-driven one (`rawq.rs`): it negotiates
//! INFLIGHT_SHMFD, gets its region from the first daemon, and after the
//! kill hands the same region and guest memory to the second one with the
//! ring's base set to its used idx, as QEMU does when a backend dies. The
//! image is raw, so what is read back depends on the vhost-user layer
//! alone (allocating qcow2 writes are the engine's crash contract).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use qblk_integration::rawq::{D, DATA, F_FLUSH, QUEUE_SIZE, RawFrontend};
use qblk_integration::vhost::Daemon;

const T_OUT: u32 = 1;
const S_OK: u8 = 0;

/// Requests in the ring at once.
const N: u16 = 64;
/// Bytes each writes: enough, with write-through, to still be running
/// when the first completes.
const CHUNK: usize = 128 << 10;
/// Where each request's data lands on the disk (apart, so order does not
/// matter).
const STRIDE: u64 = 256 << 10;
const DISK: u64 = N as u64 * STRIDE;

fn header_at(i: u16) -> u64 {
    DATA + 16 * u64::from(i)
}

fn status_at(i: u16) -> u64 {
    DATA + 0x800 + u64::from(i)
}

fn buf_at(i: u16) -> u64 {
    DATA + 0x10000 + CHUNK as u64 * u64::from(i)
}

/// Request `i`'s data: every 512-byte sector names the request and itself.
fn pattern(i: u16) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    for (s, sector) in v.chunks_mut(512).enumerate() {
        for (k, b) in sector.iter_mut().enumerate() {
            *b = (usize::from(i) * 37 + s * 11 + k) as u8;
        }
        sector[..2].copy_from_slice(&i.to_le_bytes());
        sector[2..6].copy_from_slice(&(s as u32).to_le_bytes());
    }
    v
}

/// The head of request `i`'s chain (three descriptors each).
fn head(i: u16) -> u16 {
    3 * i
}

/// What the rings and the inflight region say at the moment of the kill.
#[derive(Debug)]
struct AtKill {
    used_idx: u16,
    /// Requests the guest saw complete.
    completed: BTreeSet<u16>,
    /// Requests the region says were taken and not completed (after the
    /// recovery rule: a used idx past the region's means its
    /// last_batch_head was completed).
    in_flight: BTreeSet<u16>,
}

fn state_at_kill(raw: &RawFrontend) -> AtKill {
    let used_idx = raw.used_ring_idx();
    let mut completed = BTreeSet::new();
    for k in 0..used_idx {
        let (id, len) = raw.used_elem(k);
        let h = u16::try_from(id).expect("used id fits a head");
        assert_eq!(h % 3, 0, "used entry {k} names {h}, not a chain's head");
        assert!(
            completed.insert(h / 3),
            "request {} completed twice before the kill",
            h / 3
        );
        assert_eq!(len, 1, "used length of request {}", h / 3);
        assert_eq!(raw.read(status_at(h / 3), 1)[0], S_OK);
    }
    let hdr = raw.inflight_header();
    assert_eq!(hdr.version, 1, "the region was initialised: {hdr:?}");
    assert_eq!(hdr.desc_num, QUEUE_SIZE);
    let mut in_flight = BTreeSet::new();
    for i in 0..N {
        let mut d = raw.inflight_desc(head(i));
        if hdr.used_idx != used_idx && hdr.last_batch_head == head(i) {
            d.inflight = 0;
        }
        if d.inflight == 1 {
            in_flight.insert(i);
        }
    }
    AtKill {
        used_idx,
        completed,
        in_flight,
    }
}

#[test]
fn sigkill_with_requests_in_flight_completes_exactly_the_unfinished() {
    for attempt in 0..10 {
        if run_once(attempt) {
            return;
        }
    }
    panic!("in 10 attempts no kill found a request in flight");
}

/// One kill and recovery; false if the kill came too late (nothing was
/// in flight any more).
fn run_once(attempt: u32) -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let image = d.join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK))
        .expect("create the raw image");
    let args = ["--format", "raw", "disk.raw"];
    let mut first = Daemon::qblk(d, "i.sock", &args);
    // Write-through (no FLUSH): every write waits for its fdatasync, so
    // requests stay in flight long enough to be caught by the kill.
    let mut raw = RawFrontend::connect_tracked(&first.socket, F_FLUSH);
    for i in 0..N {
        let data = pattern(i);
        raw.write(buf_at(i), &data);
        raw.write(status_at(i), &[0xee]);
        let h = raw.header(header_at(i), T_OUT, u64::from(i) * STRIDE / 512);
        raw.place(
            head(i),
            &[
                h,
                D(buf_at(i), CHUNK as u32, false),
                D(status_at(i), 1, true),
            ],
        );
    }
    let heads: Vec<u16> = (0..N).map(head).collect();
    raw.publish_heads(&heads);
    // Kill as soon as the first request has completed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while raw.used_ring_idx() == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing completed within 30 s:\n{}",
            first.log()
        );
        std::hint::spin_loop();
    }
    first.stop_with(libc::SIGKILL);
    let at_kill = state_at_kill(&raw);
    eprintln!(
        "attempt {attempt}: used idx {} at the kill, {} in flight",
        at_kill.used_idx,
        at_kill.in_flight.len()
    );
    assert!(
        at_kill.completed.is_disjoint(&at_kill.in_flight),
        "completed requests still marked in flight: {at_kill:?}"
    );
    if at_kill.in_flight.is_empty() {
        return false;
    }

    // A new daemon on the same image and socket; the frontend reconnects.
    let mut second = Daemon::qblk(d, "i.sock", &args);
    let raw = raw.reconnect(&second.socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    while raw.used_ring_idx() < N {
        assert!(
            Instant::now() < deadline,
            "used idx {} of {N} after 60 s (at the kill: {at_kill:?}):\n{}",
            raw.used_ring_idx(),
            second.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing more comes.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(raw.used_ring_idx(), N, "more used entries than requests");
    let unfinished: BTreeSet<u16> = (0..N).filter(|i| !at_kill.completed.contains(i)).collect();
    let mut after = BTreeSet::new();
    for k in at_kill.used_idx..N {
        let (id, len) = raw.used_elem(k);
        let h = u16::try_from(id).expect("used id fits a head");
        assert_eq!(h % 3, 0, "used entry {k} names {h}, not a chain's head");
        let i = h / 3;
        assert!(
            !at_kill.completed.contains(&i),
            "request {i} completed before the kill and again after"
        );
        assert!(
            after.insert(i),
            "request {i} completed twice after the kill"
        );
        assert_eq!(len, 1, "used length of request {i}");
        assert_eq!(raw.read(status_at(i), 1)[0], S_OK, "status of request {i}");
    }
    assert_eq!(after, unfinished, "completed after the restart");
    let log = second.log();
    assert!(
        log.contains("ring resumed from the inflight region"),
        "{log}"
    );
    drop(raw);
    assert!(second.stop().success(), "{}", second.log());

    let disk = std::fs::read(&image).expect("read the image");
    for i in 0..N {
        let at = (u64::from(i) * STRIDE) as usize;
        assert!(
            disk[at..at + CHUNK] == pattern(i),
            "request {i}'s data did not reach the disk (at the kill: {at_kill:?})"
        );
    }
    true
}
