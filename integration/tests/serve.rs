//! `qblk serve` driven without a VM: blkio's virtio-blk-vhost-user driver
//! for well-formed traffic, and a hand-driven virtqueue for chains no real
//! driver sends.

use std::time::Duration;

use qblk_integration::rawq::{D, DATA, QUEUE_SIZE, RawFrontend};
use qblk_integration::vhost::{Client, Daemon, log_counter};
use qblk_integration::{
    broken, create_qcow2, create_qcow2_opts, ok, qblk, qemu_check_clean, qemu_info, qemu_raw, run,
    sh, stderr,
};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// A deterministic pattern for `[offset, offset + len)` of generation `gen`.
fn pattern(offset: u64, len: usize, generation: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
            x as u8 ^ generation
        })
        .collect()
}

/// Kilobytes of the daemon's memory pinned (io_uring registered buffers).
fn pinned_kib(daemon: &Daemon) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPin in /proc/PID/status")
}

#[test]
fn pinned_guest_memory_serves_the_same_bytes_and_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const SIZE: usize = 32 << 20;
    create_qcow2(d, "disk.qcow2", "32M");
    let mut daemon = Daemon::qblk(
        d,
        "s.sock",
        &["--queues", "2", "--pin-guest-memory", "disk.qcow2"],
    );
    let mut model = vec![0u8; SIZE];
    let mut aligned = 0u64;
    for round in 0..2u8 {
        assert_eq!(pinned_kib(&daemon), 0, "nothing pinned between frontends");
        let mut c = Client::connect(&daemon.socket, 2).unwrap();
        // A helper thread faults the 64 MiB buffer region in and pins it,
        // then each queue's ring adopts it; until then requests are served
        // unpinned.
        wait_for_log(&daemon, "mib=64", 2 * (usize::from(round) + 1));
        assert_pinned_once(&daemon, 64 << 10, 2);
        // 1 MiB transfers, single pages, unaligned sectors (those bounce),
        // on both queues; the buffers lie in the region blkio added after
        // the memory table was first sent.
        let writes: &[(u64, usize, usize)] = &[
            (0, 1 << 20, 0),
            (5 << 20, 4096, 1),
            (7 << 20 | 512, 1536, 0),
            (9 << 20, 1 << 20, 1),
            (12 << 20, 65536 * 3, 0),
        ];
        for (i, &(off, len, q)) in writes.iter().enumerate() {
            let data = pattern(off, len, round * 16 + i as u8);
            let at = 2 << 20;
            c.buf()[at..at + len].copy_from_slice(&data);
            let p = c.ptr(at);
            c.queues[q].write(off, p, len, 0, blkio::ReqFlags::empty());
            assert_eq!(c.wait(q, 1)[0].1, 0);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if off % 4096 == 0 {
                aligned += 1;
            }
        }
        for &(off, len, q) in writes {
            let at = 4 << 20;
            let p = c.ptr(at);
            c.queues[q].read(off, p, len, 0, blkio::ReqFlags::empty());
            assert_eq!(c.wait(q, 1)[0].1, 0);
            assert!(c.buf()[at..at + len] == model[off as usize..off as usize + len]);
            if off % 4096 == 0 {
                aligned += 1;
            }
        }
        assert_eq!(c.flush(), 0);
        drop(c);
        // The frontend is gone: its memory is unpinned (and unmapped).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pinned_kib(&daemon) != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pinned_kib(&daemon), 0, "pinned after the frontend left");
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("guest memory pinned"), "{log}");
    // Every direct transfer that did not bounce (through the daemon's own
    // memory, for a misaligned one) went through a registered buffer.
    let fixed = log_counter(&log, "fixed_ios");
    assert!(fixed >= aligned, "{log}");
    assert!(
        fixed >= log_counter(&log, "direct_ios") - log_counter(&log, "bounced_ios"),
        "{log}"
    );
    qemu_check_clean("disk.qcow2", d);
    assert!(qemu_raw(d, "disk.qcow2") == model);
}

/// Names of the daemon's queue worker threads.
fn worker_threads(daemon: &Daemon) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .expect("daemon tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("qblk-queue"))
        .collect();
    names.sort();
    names
}

/// Puts `per_queue` writes of 64 KiB in flight on every queue of `c` at
/// once, to interleaved clusters (of n queues, queue q writes clusters q,
/// q + n, q + 2n, ...; cluster k gets `pattern(k << 16, 65536,
/// generation)`), and waits for them all to succeed.
fn write_interleaved(c: &mut Client, per_queue: usize, generation: u8) {
    let n = c.queues.len();
    for q in 0..n {
        for i in 0..per_queue {
            let cluster = (i * n + q) as u64;
            let at = (q * per_queue + i) * 65536;
            let data = pattern(cluster << 16, 65536, generation);
            c.buf()[at..at + 65536].copy_from_slice(&data);
            let p = c.ptr(at);
            c.queues[q].write(cluster << 16, p, 65536, i, blkio::ReqFlags::empty());
        }
    }
    for q in 0..n {
        for (_, ret) in c.wait(q, per_queue) {
            assert_eq!(ret, 0, "write on queue {q}");
        }
    }
}

/// Waits until `needle` appears `count` times in the daemon's log.
fn wait_for_log(daemon: &Daemon, needle: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemon.log().matches(needle).count() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{needle} not seen {count} times:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kib` of guest memory adopted by `rings` rings is pinned once when the
/// kernel clones registrations (Linux 6.12+), once per ring (plus the
/// shared registration) when it does not.
fn assert_pinned_once(daemon: &Daemon, kib: u64, rings: u64) {
    let pinned = pinned_kib(daemon);
    let log = daemon.log();
    if log.contains("cloned=true") {
        assert!(
            (kib..2 * kib).contains(&pinned),
            "{pinned} KiB pinned:\n{log}"
        );
    } else {
        assert!(pinned >= (rings + 1) * kib, "{pinned} KiB pinned:\n{log}");
    }
}

#[test]
fn queues_share_worker_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "64M");
    let mut daemon = Daemon::qblk(
        d,
        "s.sock",
        &[
            "--queues",
            "4",
            "--threads",
            "2",
            "--pin-guest-memory",
            "disk.qcow2",
        ],
    );
    // Queues 0 and 2 on one thread, 1 and 3 on the other.
    assert_eq!(worker_threads(&daemon), ["qblk-queues0+", "qblk-queues1+"]);
    {
        let mut c = Client::connect(&daemon.socket, 4).unwrap();
        assert_eq!(c.queues.len(), 4);
        // Adopted once per thread's ring, not per queue.
        wait_for_log(&daemon, "mib=64", 2);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            daemon.log().matches("mib=64").count(),
            2,
            "{}",
            daemon.log()
        );
        assert_pinned_once(&daemon, 64 << 10, 2);
        write_interleaved(&mut c, 16, 9);
        assert_eq!(c.flush(), 0);
        // Read back on the queue after the one that wrote.
        for cluster in 0..64u64 {
            let q = (cluster as usize + 1) % 4;
            let p = c.ptr(0);
            c.queues[q].read(cluster << 16, p, 65536, 0, blkio::ReqFlags::empty());
            assert_eq!(c.wait(q, 1)[0].1, 0);
            assert!(
                c.buf()[..65536] == pattern(cluster << 16, 65536, 9),
                "cluster {cluster}"
            );
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pinned_kib(&daemon) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pinned_kib(&daemon), 0, "pinned after the frontend left");
    // The next frontend uses two of the four queues.
    let mut c = Client::connect(&daemon.socket, 2).unwrap();
    assert!(c.read_vec(5 << 16, 65536) == pattern(5 << 16, 65536, 9));
    drop(c);
    assert!(daemon.stop().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log_counter(&log, "fixed_ios") >= 64, "{log}");
    qemu_check_clean("disk.qcow2", d);
}

#[test]
fn guest_memory_that_cannot_be_pinned_is_served_unpinned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "1M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--pin-guest-memory", "disk.qcow2"]);
    // Guest memory in a regular file on disk (not shmem or hugetlbfs):
    // the kernel refuses to pin it long-term.
    let mem_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mem_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(mem_dir.path().join("guest-ram"))
        .unwrap();
    let ram_path = mem_dir.path().join("guest-ram");
    let mut raw = RawFrontend::connect_with_memory(&daemon.socket, mem_file);
    // The attempt is made once the memory is faulted in; requests are
    // served before and after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains("cannot pin guest memory") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = DATA + 64;
    let data = pattern(4096, 4096, 7);
    raw.write(DATA + 8192, &data);
    let h = raw.header(DATA, T_OUT, 8);
    let w = raw.roundtrip(
        &[h, D(DATA + 8192, 4096, false), D(status, 1, true)],
        status,
    );
    assert_eq!(w, (1, S_OK));
    let h = raw.header(DATA, T_IN, 8);
    let r = raw.roundtrip(
        &[h, D(DATA + 16384, 4096, true), D(status, 1, true)],
        status,
    );
    assert_eq!(r, (4097, S_OK));
    assert_eq!(raw.read(DATA + 16384, 4096), data);
    drop(raw);
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert_eq!(
        log_counter(&daemon.log(), "fixed_ios"),
        0,
        "{}",
        daemon.log()
    );
    // Memory that cannot be pinned is not faulted in either: that would
    // have written all of a file on disk.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&ram_path).unwrap().blocks() * 512;
    assert!(
        allocated < 4 << 20,
        "{allocated} bytes of guest RAM file written"
    );
}

#[test]
fn every_request_type_through_blkio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const SIZE: usize = 16 << 20;
    create_qcow2(d, "disk.qcow2", "16M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["disk.qcow2"]);
    let mut model = vec![0u8; SIZE];
    {
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        assert_eq!(c.capacity(), SIZE as u64);
        // What the config space says, as the client understood it.
        assert_eq!(c.prop_i32("discard-alignment"), 65536);
        assert_eq!(c.prop_i32("optimal-io-size"), 65536);
        assert!(c.prop_u64("max-discard-len") >= 1 << 20);
        assert!(c.prop_u64("max-write-zeroes-len") >= 1 << 20);
        assert!(c.prop_bool("flush-needed"), "a write-back cache");

        // Writes of assorted sizes and alignments, read back.
        let writes: &[(u64, usize)] = &[
            (0, 512),
            (4096, 4096),
            (65536 - 1024, 3072),
            (1 << 20, 1 << 20),
            (3 << 20 | 512, 200 * 512),
            ((SIZE - 4096) as u64, 4096),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data = pattern(off, len, i as u8);
            c.write_all(off, &data);
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        for &(off, len) in writes {
            assert_eq!(
                c.read_vec(off, len),
                &model[off as usize..off as usize + len]
            );
        }
        assert_eq!(c.flush(), 0);

        // Write-zeroes with and without unmap, and discard of whole
        // clusters (no backing file: discarded clusters read as zeros).
        assert_eq!(c.write_zeroes(1 << 20, 65536, true), 0);
        model[1 << 20..(1 << 20) + 65536].fill(0);
        assert_eq!(c.write_zeroes((1 << 20) + 131072, 4096, false), 0);
        model[(1 << 20) + 131072..(1 << 20) + 135168].fill(0);
        assert_eq!(c.discard(1 << 20 | 262144, 131072), 0);
        model[(1 << 20) + 262144..(1 << 20) + 393216].fill(0);
        assert_eq!(c.read_vec(1 << 20, 1 << 20), &model[1 << 20..2 << 20]);

        // Past the end of the device.
        assert!(c.read(SIZE as u64, 0, 512) < 0);
        assert!(c.write((SIZE - 512) as u64, 0, 1024) < 0);
        assert_eq!(c.flush(), 0);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("disk.qcow2", d);
    assert!(qemu_raw(d, "disk.qcow2") == model);
}

#[test]
fn several_queues_serve_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--queues", "2", "disk.qcow2"]);
    {
        let mut c = Client::connect(&daemon.socket, 2).unwrap();
        assert_eq!(c.queues.len(), 2);
        write_interleaved(&mut c, 64, 1);
        assert_eq!(c.flush(), 0);
        let back = c.read_vec(0, 128 << 16);
        for cluster in 0..128u64 {
            let at = (cluster << 16) as usize;
            assert!(
                back[at..at + 65536] == pattern(cluster << 16, 65536, 1),
                "cluster {cluster}"
            );
        }
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    // Page-aligned buffers and cluster-aligned offsets: every data transfer
    // went between guest memory and the image file without a bounce.
    let log = daemon.log();
    assert!(log_counter(&log, "direct_ios") >= 129, "{log}");
    assert_eq!(log_counter(&log, "bounced_ios"), 0, "{log}");
    assert_eq!(log_counter(&log, "fixed_ios"), 0, "not asked to pin: {log}");
    qemu_check_clean("disk.qcow2", d);
}

#[test]
fn a_new_frontend_is_served_after_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "16M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--queues", "2", "disk.qcow2"]);
    for round in 0..4u8 {
        let mut c = Client::connect(&daemon.socket, 1 + i32::from(round % 2)).unwrap();
        if round > 0 {
            let prev = pattern(u64::from(round - 1) << 20, 8192, round - 1);
            assert_eq!(c.read_vec(u64::from(round - 1) << 20, 8192), prev);
        }
        c.write_all(
            u64::from(round) << 20,
            &pattern(u64::from(round) << 20, 8192, round),
        );
        // Half the rounds leave without a flush: the daemon flushes when a
        // frontend goes.
        if round % 2 == 0 {
            assert_eq!(c.flush(), 0);
        }
    }
    // A frontend that vanishes without stopping its queue.
    {
        let mut raw = RawFrontend::connect(&daemon.socket);
        let h = raw.header(DATA, T_IN, 0);
        let (len, status) = raw.roundtrip(
            &[h, D(DATA + 4096, 512, true), D(DATA + 64, 1, true)],
            DATA + 64,
        );
        assert_eq!((len, status), (513, S_OK));
    }
    let mut c = Client::connect(&daemon.socket, 1).unwrap();
    assert_eq!(c.read_vec(3 << 20, 8192), pattern(3 << 20, 8192, 3));
    drop(c);
    assert!(daemon.alive());
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("disk.qcow2", d);
}

/// Submits a chain and returns (used len, status byte at `status`).
fn send(raw: &mut RawFrontend, chain: &[D], status: u64) -> (u32, u8) {
    raw.roundtrip(chain, status)
}

#[test]
fn bad_guest_input_gets_an_error_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "1M");
    let mut daemon = Daemon::qblk(d, "s.sock", &["--serial", "qblk-serial-0001", "disk.qcow2"]);
    let mut raw = RawFrontend::connect(&daemon.socket);
    let hdr = DATA;
    let st = DATA + 0x100;
    let buf = DATA + 0x1000;
    let status = D(st, 1, true);

    // Sanity: a good write and read.
    raw.write(buf, &[0x5a; 512]);
    let h = raw.header(hdr, T_OUT, 1);
    assert_eq!(
        send(&mut raw, &[h, D(buf, 512, false), status], st),
        (1, S_OK)
    );
    let h = raw.header(hdr, T_IN, 1);
    raw.write(buf, &[0; 512]);
    assert_eq!(
        send(&mut raw, &[h, D(buf, 512, true), status], st),
        (513, S_OK)
    );
    assert_eq!(raw.read(buf, 512), vec![0x5a; 512]);

    // GET_ID answers the serial.
    let h = raw.header(hdr, T_GET_ID, 0);
    assert_eq!(
        send(&mut raw, &[h, D(buf, 20, true), status], st),
        (21, S_OK)
    );
    assert_eq!(&raw.read(buf, 20)[..16], b"qblk-serial-0001");
    assert_eq!(raw.read(buf + 16, 4), vec![0; 4]);

    // Every case has its own header and payload: they are all laid out
    // before the first is sent.
    let cases: Vec<(&str, Vec<D>, u8)> = vec![
        (
            "data outside guest memory",
            {
                let h = raw.header(hdr + 0x220, T_IN, 0);
                vec![h, D(1 << 40, 512, true), status]
            },
            S_IOERR,
        ),
        (
            "data running off the end of guest memory",
            {
                let h = raw.header(hdr + 0x240, T_IN, 0);
                vec![h, D((16 << 20) - 512, 1024, true), status]
            },
            S_IOERR,
        ),
        (
            "read into a device-readable buffer",
            {
                let h = raw.header(hdr + 0x260, T_IN, 0);
                vec![h, D(buf, 512, false), status]
            },
            S_IOERR,
        ),
        (
            "write from a device-writable buffer",
            {
                let h = raw.header(hdr + 0x280, T_OUT, 0);
                vec![h, D(buf, 512, true), status]
            },
            S_IOERR,
        ),
        (
            "readable descriptor after a writable one",
            {
                let h = raw.header(hdr + 0x2a0, T_IN, 0);
                vec![h, D(buf, 512, true), D(buf + 512, 512, false), status]
            },
            S_IOERR,
        ),
        ("header too short", vec![D(hdr, 8, false), status], S_IOERR),
        ("no header", vec![status], S_IOERR),
        (
            "sector past capacity",
            {
                let h = raw.header(hdr + 0x2c0, T_IN, 2048);
                vec![h, D(buf, 512, true), status]
            },
            S_IOERR,
        ),
        (
            "sector overflowing",
            {
                let h = raw.header(hdr + 0x2e0, T_OUT, u64::MAX - 1);
                vec![h, D(buf, 512, false), status]
            },
            S_IOERR,
        ),
        (
            "length not in sectors",
            {
                let h = raw.header(hdr + 0x300, T_IN, 0);
                vec![h, D(buf, 100, true), status]
            },
            S_IOERR,
        ),
        (
            "absurd length",
            {
                let h = raw.header(hdr + 0x320, T_IN, 0);
                vec![h, D(buf, 0xffff_fe00, true), status]
            },
            S_IOERR,
        ),
        (
            "unknown request type",
            {
                let h = raw.header(hdr + 0x340, 77, 0);
                vec![h, status]
            },
            S_UNSUPP,
        ),
        (
            "discard with two segments",
            {
                let h = raw.header(hdr + 0x360, T_DISCARD, 0);
                let mut seg = [0u8; 32];
                seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                seg[24..28].copy_from_slice(&8u32.to_le_bytes());
                raw.write(buf + 0x2040, &seg);
                vec![h, D(buf + 0x2040, 32, false), status]
            },
            S_UNSUPP,
        ),
        (
            "write-zeroes with reserved flags",
            {
                let h = raw.header(hdr + 0x380, T_WRITE_ZEROES, 0);
                let mut seg = [0u8; 16];
                seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                seg[12..16].copy_from_slice(&0x8000_0000u32.to_le_bytes());
                raw.write(buf + 0x2080, &seg);
                vec![h, D(buf + 0x2080, 16, false), status]
            },
            S_UNSUPP,
        ),
        (
            "discard with the unmap flag",
            {
                let h = raw.header(hdr + 0x3a0, T_DISCARD, 0);
                let mut seg = [0u8; 16];
                seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                seg[12..16].copy_from_slice(&1u32.to_le_bytes());
                raw.write(buf + 0x20c0, &seg);
                vec![h, D(buf + 0x20c0, 16, false), status]
            },
            S_UNSUPP,
        ),
        (
            "write-zeroes past capacity",
            {
                let h = raw.header(hdr + 0x3c0, T_WRITE_ZEROES, 0);
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&2000u64.to_le_bytes());
                seg[8..12].copy_from_slice(&100u32.to_le_bytes());
                raw.write(buf + 0x2100, &seg);
                vec![h, D(buf + 0x2100, 16, false), status]
            },
            S_IOERR,
        ),
        (
            "discard segment cut short",
            {
                let h = raw.header(hdr + 0x3e0, T_DISCARD, 0);
                vec![h, D(buf, 12, false), status]
            },
            S_IOERR,
        ),
        (
            "GET_ID without a buffer",
            {
                let h = raw.header(hdr + 0x400, T_GET_ID, 0);
                vec![h, status]
            },
            S_IOERR,
        ),
    ];
    for (what, chain, want) in cases {
        let (len, got) = send(&mut raw, &chain, st);
        assert_eq!(got, want, "{what}: status");
        assert_eq!(len, 1, "{what}: used length");
    }

    // No status byte to write: the chain completes with length 0 and the
    // guest memory the chain names is not touched.
    raw.write(st, &[0xee]);
    let h = raw.header(hdr, T_IN, 0);
    raw.submit(&[h, D(st, 1, false)]);
    let (_, len) = raw.wait_used(Duration::from_secs(30)).unwrap();
    assert_eq!(len, 0);
    assert_eq!(raw.read(st, 1), vec![0xee]);
    raw.submit(&[D(1 << 40, 1, true)]);
    assert_eq!(raw.wait_used(Duration::from_secs(30)).unwrap().1, 0);

    // A descriptor loop: the chain ends at the queue size, without a
    // status byte.
    let h = raw.header(hdr, T_FLUSH, 0);
    raw.put_desc(0, 0, h.0, 16, 1, 0);
    raw.publish(0);
    assert_eq!(raw.wait_used(Duration::from_secs(30)).unwrap().1, 0);

    // An indirect table (fine) and one pointing outside memory (no chain).
    let h = raw.header(hdr, T_IN, 1);
    raw.submit_indirect(DATA + 0x8000, &[h, D(buf, 512, true), status]);
    assert_eq!(raw.wait_used(Duration::from_secs(30)).unwrap().1, 513);
    assert_eq!(raw.read(st, 1), vec![S_OK]);

    // Still serving, on this connection and the next.
    let h = raw.header(hdr, T_IN, 1);
    assert_eq!(
        send(&mut raw, &[h, D(buf, 512, true), status], st),
        (513, S_OK)
    );

    // One chain in every avail slot at once: each is served.
    raw.publish_many(0, QUEUE_SIZE);
    for i in 0..QUEUE_SIZE {
        let used = raw.wait_used(Duration::from_secs(30));
        assert_eq!(used, Some((0, 513)), "repeated head, entry {i}");
    }
    // An avail index claiming more requests than the queue holds: the
    // queue is broken (nothing is popped, nothing completes), the daemon
    // lives, and the next frontend is served.
    raw.jump_avail_idx(QUEUE_SIZE + 100);
    assert_eq!(raw.wait_used(Duration::from_millis(500)), None);
    assert!(daemon.alive(), "{}", daemon.log());
    drop(raw);
    let mut c = Client::connect(&daemon.socket, 1).unwrap();
    assert_eq!(c.read_vec(512, 512), vec![0x5a; 512]);
    drop(c);
    let log = daemon.log();
    assert!(log.contains("bad request from the guest"), "{log}");
    assert!(daemon.stop().success(), "{log}");
    qemu_check_clean("disk.qcow2", d);
}

#[test]
fn readonly_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "1M");
    sh(d, &["qemu-io", "-c", "write -P 0x33 0 64k", "disk.qcow2"]);
    let before = std::fs::read(d.join("disk.qcow2")).unwrap();
    let mut daemon = Daemon::qblk(d, "s.sock", &["--readonly", "disk.qcow2"]);
    {
        // blkio refuses to start read-write on a read-only device.
        assert!(Client::connect_with(&daemon.socket, 1, false).is_err());
        let mut c = Client::connect_with(&daemon.socket, 1, true).unwrap();
        assert_eq!(c.read_vec(0, 4096), vec![0x33; 4096]);
        assert_eq!(c.flush(), 0);
    }
    {
        let mut raw = RawFrontend::connect(&daemon.socket);
        let st = DATA + 0x100;
        let h = raw.header(DATA, T_OUT, 0);
        let w = [h, D(DATA + 0x1000, 512, false), D(st, 1, true)];
        assert_eq!(send(&mut raw, &w, st), (1, S_IOERR));
        let h = raw.header(DATA, T_WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        raw.write(DATA + 0x1000, &seg);
        let w = [h, D(DATA + 0x1000, 16, false), D(st, 1, true)];
        assert_eq!(send(&mut raw, &w, st), (1, S_IOERR));
        // Config: the RO feature and no discard limits.
        let cfg = raw.config(60);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
        assert_eq!(&cfg[36..40], &[0, 0, 0, 0]);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        std::fs::read(d.join("disk.qcow2")).unwrap() == before,
        "image changed"
    );
}

#[test]
fn sigterm_and_sigint_leave_the_image_clean() {
    for (signal, lazy) in [(libc::SIGTERM, true), (libc::SIGINT, false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let opts = format!("lazy_refcounts={}", if lazy { "on" } else { "off" });
        create_qcow2_opts(d, &opts, "disk.qcow2", "64M");
        let mut daemon = Daemon::qblk(d, "s.sock", &["disk.qcow2"]);
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        // Writes still in flight when the signal arrives.
        for i in 0..32usize {
            let data = pattern((i as u64) << 20, 65536, 9);
            c.buf()[i * 65536..(i + 1) * 65536].copy_from_slice(&data);
            let p = c.ptr(i * 65536);
            c.queues[0].write((i as u64) << 20, p, 65536, i, blkio::ReqFlags::empty());
        }
        for (_, ret) in c.wait(0, 32) {
            assert_eq!(ret, 0);
        }
        if lazy {
            // The daemon holds the image: read its header with -U.
            let out = run(
                "qemu-img",
                &["info", "-U", "--output=json", "disk.qcow2"],
                d,
            );
            let info: serde_json::Value =
                serde_json::from_str(&ok(out, "qemu-img info -U")).expect("qemu-img info JSON");
            assert_eq!(
                info["format-specific"]["data"]["lazy-refcounts"],
                serde_json::json!(true)
            );
        }
        let status = daemon.stop_with(signal);
        assert!(status.success(), "exit {status}: {}", daemon.log());
        drop(c);
        let info = qemu_info("disk.qcow2", d);
        assert_eq!(info["dirty-flag"], serde_json::json!(false), "{info}");
        qemu_check_clean("disk.qcow2", d);
        let contents = qemu_raw(d, "disk.qcow2");
        for i in 0..32usize {
            assert!(
                contents[i << 20..(i << 20) + 65536] == pattern((i as u64) << 20, 65536, 9),
                "write {i} lost"
            );
        }
        assert!(!daemon.socket.exists(), "socket left behind");
    }
}

#[test]
fn formats_are_never_guessed_and_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "disk.raw", "1M"],
    );
    // A raw file served as qcow2 is refused with a clear message.
    let out = qblk(&["serve", "--socket", "s.sock", "disk.raw"], d);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("disk.raw") && err.contains("qcow2"), "{err}");

    // Served as raw only when asked. A qcow2 header written by the guest
    // stays data.
    let mut daemon = Daemon::qblk(d, "s.sock", &["--format", "raw", "disk.raw"]);
    {
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        c.write_all(0, &header);
        assert_eq!(c.write_zeroes(65536, 65536, true), 0);
        assert_eq!(c.discard(131072, 65536), 0);
        assert_eq!(c.flush(), 0);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    let mut daemon = Daemon::qblk(d, "s.sock", &["--format", "raw", "disk.raw"]);
    {
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        assert_eq!(c.capacity(), 1 << 20);
        assert_eq!(&c.read_vec(0, 512)[..4], b"QFI\xfb");
    }
    assert!(daemon.stop().success());

    // --create makes a missing image, and leaves an existing one alone.
    let mut daemon = Daemon::qblk(d, "s.sock", &["--create", "32M", "new.qcow2"]);
    {
        let c = Client::connect(&daemon.socket, 1).unwrap();
        assert_eq!(c.capacity(), 32 << 20);
    }
    assert!(daemon.stop().success());
    assert_eq!(qemu_info("new.qcow2", d)["virtual-size"], 32 << 20);
    let mut daemon = Daemon::qblk(d, "s.sock", &["--create", "64M", "new.qcow2"]);
    assert_eq!(
        Client::connect(&daemon.socket, 1).unwrap().capacity(),
        32 << 20
    );
    assert!(daemon.stop().success());

    // Bad options: a clear error, no socket.
    for args in [
        &["--queues", "0", "new.qcow2"][..],
        &["--threads", "0", "new.qcow2"],
        &["--queues", "2", "--threads", "3", "new.qcow2"],
        &["--serial", "123456789012345678901", "new.qcow2"],
        &["--cache-size", "lots", "new.qcow2"],
        &["--readonly", "--create", "1G", "other.qcow2"],
        &["missing.qcow2"],
    ] {
        let mut full = vec!["serve", "--socket", "bad.sock"];
        full.extend_from_slice(args);
        let out = run(qblk_integration::qblk_bin().to_str().unwrap(), &full, d);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            stderr(&out).starts_with("qblk: "),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!d.join("bad.sock").exists());
    }
}

/// `kill -9` of the daemon at random moments under write load with
/// flushes: after a restart every acknowledged write reads back, flushed
/// or not (the crash journal), and `qemu-img check` finds the image clean,
/// not even a leak (the replay rebuilds the refcounts). Until the kill
/// every request must succeed: a failed request, a broken connection or a
/// refused connect while the daemon lives fails the test. Only the
/// requests in flight at the kill may fail or never complete.
#[test]
fn kill_9_loses_no_acknowledged_write() {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // `QBLK_BREAK=killtest-error`: one write of the first batch goes past
    // the end of the disk, so the live daemon fails it; the first kill
    // waits 5 s longer, so that the failure is seen before it however
    // loaded the machine.
    let inject = broken("killtest-error");
    for opts in ["lazy_refcounts=off", "lazy_refcounts=on,cluster_size=16k"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        const SIZE: usize = 32 << 20;
        create_qcow2_opts(d, opts, "disk.qcow2", "32M");
        // A persistent dirty bitmap at the finest granularity: every write
        // the guest saw acknowledged must be in it after the kills.
        sh(
            d,
            &[
                "qemu-img",
                "bitmap",
                "--add",
                "-g",
                "512",
                "disk.qcow2",
                "b",
            ],
        );
        let mut acknowledged: Vec<(usize, usize)> = Vec::new();
        let mut submitted: Vec<(usize, usize)> = Vec::new();
        let mut model = vec![0u8; SIZE];
        let mut flushed_batches = 0;
        let mut cut_by_kill = 0;
        let mut seed = 0x1234_5678_u64;
        let mut next = move |bound: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % bound
        };
        for round in 0..6u64 {
            let mut daemon = Daemon::qblk(d, "k.sock", &["disk.qcow2"]);
            let pid = daemon.pid() as i32;
            let mut delay = 20 + next(300);
            if inject && round == 0 {
                delay += 5000;
            }
            // Raised just before kill(2), never after: whatever the client
            // sees while it is still clear, it saw from a live daemon.
            let killing = Arc::new(AtomicBool::new(false));
            let flag = killing.clone();
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                flag.store(true, Ordering::Release);
                // SAFETY: kill(2) on the daemon's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            // Writes in batches; a batch counts once its flush returned.
            let mut unflushed: Vec<(usize, usize)> = Vec::new();
            let client = Client::connect(&daemon.socket, 1);
            if let Err(e) = &client {
                assert!(
                    killing.load(Ordering::Acquire),
                    "{opts} round {round}: cannot connect to the live daemon: {e}"
                );
            }
            if let Ok(mut c) = client {
                'load: for batch in 0u64.. {
                    let mut pending = Vec::new();
                    for i in 0..16usize {
                        let len = 512 * (1 + next(128) as usize);
                        // One 2 MiB slot per write: a batch's writes never
                        // overlap, so their order does not matter.
                        let mut off =
                            i * (2 << 20) + 512 * next((((2 << 20) - len) / 512) as u64) as usize;
                        if inject && round == 0 && batch == 0 && i == 0 {
                            off = SIZE;
                        }
                        let at = i * (1 << 16);
                        let tag = (round * 31 + batch * 7 + i as u64) as u8 | 1;
                        for (k, b) in c.buf()[at..at + len].iter_mut().enumerate() {
                            *b = tag.wrapping_add((k / 512) as u8);
                        }
                        let p = c.ptr(at);
                        c.queues[0].write(off as u64, p, len, i, blkio::ReqFlags::empty());
                        pending.push((off, len, at));
                    }
                    let mut acked = Vec::new();
                    let flushed = match completes(&mut c, 16, &killing, &mut acked) {
                        Ok(true) => {
                            c.queues[0].flush(99, blkio::ReqFlags::empty());
                            completes(&mut c, 1, &killing, &mut Vec::new())
                        }
                        other => other,
                    };
                    // Acknowledged writes must read back, flushed or not;
                    // only the others may have landed or not.
                    for (i, &(off, len, at)) in pending.iter().enumerate() {
                        if off < SIZE {
                            submitted.push((off, len));
                        }
                        if acked.contains(&i) {
                            acknowledged.push((off, len));
                            let data = c.buf()[at..at + len].to_vec();
                            model[off..off + len].copy_from_slice(&data);
                        } else {
                            unflushed.push((off, len));
                        }
                    }
                    match flushed {
                        Ok(true) => {}
                        Ok(false) => {
                            cut_by_kill += 1;
                            break 'load;
                        }
                        Err(e) => panic!("{opts} round {round} batch {batch}: {e}"),
                    }
                    unflushed.clear();
                    flushed_batches += 1;
                }
            }
            killer.join().unwrap();
            // Our SIGKILL ended it, not a crash of its own before that.
            let status = daemon.stop_with(libc::SIGKILL);
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{opts} round {round}: the daemon ended ({status}) before the kill:\n{}",
                daemon.log()
            );
            drop(daemon);
            // Restart and read everything back.
            let mut daemon = Daemon::qblk(d, "k.sock", &["disk.qcow2"]);
            {
                let mut c = Client::connect(&daemon.socket, 1).unwrap();
                let mut got = Vec::with_capacity(SIZE);
                for chunk in 0..SIZE / (8 << 20) {
                    got.extend(c.read_vec((chunk * (8 << 20)) as u64, 8 << 20));
                }
                for (at, (g, m)) in got.iter().zip(&model).enumerate() {
                    let exempt = unflushed.iter().any(|&(o, l)| at >= o && at < o + l);
                    assert!(
                        exempt || g == m,
                        "{opts} round {round}: acknowledged byte {at:#x} is {g:#x}, not {m:#x}"
                    );
                }
                // What did land of the last batch is the guest's now.
                model.copy_from_slice(&got);
            }
            assert!(daemon.stop().success(), "{}", daemon.log());
            let out = run("qemu-img", &["check", "--output=json", "disk.qcow2"], d);
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("qemu-img check JSON");
            assert_eq!(
                v["corruptions"].as_u64().unwrap_or(0),
                0,
                "{opts} round {round}: {v}"
            );
            assert_eq!(
                v["check-errors"].as_u64().unwrap_or(0),
                0,
                "{opts} round {round}: {v}"
            );
            assert_eq!(
                v["leaks"].as_u64().unwrap_or(0),
                0,
                "{opts} round {round}: {v}"
            );
        }
        assert!(
            flushed_batches > 6,
            "{opts}: the daemon died before any real load"
        );
        // The bitmap, as QEMU reads it: consistent (QEMU exports no bitmap
        // in use), every acknowledged write marked, nothing never written.
        let export = qblk_integration::BitmapExport::start(d, "disk.qcow2", &["b".to_owned()]);
        let dirty = export.dirty_ranges(d, "b");
        drop(export);
        let marked = |o: usize, l: usize| {
            dirty
                .iter()
                .any(|&(s, n)| s as usize <= o && o + l <= (s + n) as usize)
        };
        for &(o, l) in &acknowledged {
            assert!(
                marked(o, l),
                "{opts}: acknowledged write {o:#x}+{l:#x} not in the bitmap"
            );
        }
        for &(s, n) in &dirty {
            let (s, n) = (s as usize, n as usize);
            let mut at = s;
            while at < s + n {
                assert!(
                    submitted.iter().any(|&(o, l)| at >= o && at < o + l),
                    "{opts}: byte {at:#x} is dirty but was never written"
                );
                at += 512;
            }
        }
        eprintln!(
            "{opts}: {flushed_batches} batches flushed; of 6 rounds the kill cut {cut_by_kill} \
             mid-batch and {} before the client connected",
            6 - cut_by_kill
        );
    }
}

/// Waits for `n` completions on queue 0. `Ok(true)`: all succeeded;
/// `Ok(false)`: the daemon is being killed, and a request in flight failed
/// or the wait gave up; `Err`: a request failed, or the connection broke,
/// while the daemon was alive.
/// Waits for `n` completions; the `user_data` of each successful one goes
/// to `done`.
fn completes(
    c: &mut Client,
    n: usize,
    killing: &std::sync::atomic::AtomicBool,
    done: &mut Vec<usize>,
) -> Result<bool, String> {
    let killed = || killing.load(std::sync::atomic::Ordering::Acquire);
    let mut completions: Vec<std::mem::MaybeUninit<blkio::Completion>> =
        (0..n).map(|_| std::mem::MaybeUninit::uninit()).collect();
    let mut got = 0;
    while got < n {
        let mut timeout = Duration::from_millis(100);
        match c.queues[0].do_io(&mut completions[got..], 1, Some(&mut timeout), None) {
            // Nothing yet: the daemon is busy, or dead.
            Ok(0) if killed() => return Ok(false),
            Ok(0) => {}
            Ok(k) => {
                for comp in &completions[got..got + k] {
                    // SAFETY: do_io initialised these completions.
                    let comp = unsafe { comp.assume_init_ref() };
                    if comp.ret == 0 {
                        done.push(comp.user_data);
                        continue;
                    }
                    return if killed() {
                        Ok(false)
                    } else {
                        // user_data is the write's slot, or 99 for the
                        // flush.
                        Err(format!(
                            "request {} failed before the kill: {}",
                            comp.user_data, comp.ret
                        ))
                    };
                }
                got += k;
            }
            Err(_) if killed() => return Ok(false),
            Err(e) => return Err(format!("the connection failed before the kill: {e}")),
        }
    }
    Ok(true)
}

#[test]
fn backing_files_only_from_allowed_directories() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("vm")).unwrap();
    create_qcow2(d, "images/base.qcow2", "4M");
    sh(
        d,
        &["qemu-io", "-c", "write -P 0x6b 0 64k", "images/base.qcow2"],
    );
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../images/base.qcow2",
            "-F",
            "qcow2",
            "vm/top.qcow2",
        ],
    );
    // Outside the image's directory: refused, naming the file and why.
    let out = qblk(&["serve", "--socket", "b.sock", "vm/top.qcow2"], d);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("backing file refused") && err.contains("--allow-backing-dir"),
        "{err}"
    );
    assert!(!d.join("b.sock").exists());
    // Allowed explicitly: served, and the guest sees the backing data.
    let mut daemon = Daemon::qblk(
        d,
        "b.sock",
        &["--allow-backing-dir", "images", "vm/top.qcow2"],
    );
    {
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        assert_eq!(c.read_vec(0, 4096), vec![0x6b; 4096]);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());

    // A backing file without a recorded format is probed as qcow2 only:
    // a raw one is refused rather than guessed.
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "vm/base.raw", "4M"],
    );
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "vm/nofmt.qcow2",
        ],
    );
    // Make the recorded backing format an unknown header extension.
    let mut bytes = std::fs::read(d.join("vm/nofmt.qcow2")).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(d.join("vm/nofmt.qcow2"), bytes).unwrap();
    let out = qblk(&["serve", "--socket", "b.sock", "vm/nofmt.qcow2"], d);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("backing"), "{}", stderr(&out));
}
