//! NBD exports of point-in-time snapshots (`qblk serve --nbd`, QMP
//! `block-export-add`), with QEMU 7.2's NBD client as the oracle: what
//! `qemu-img convert` reads is the disk at the export point while the
//! guest keeps overwriting it; `qemu-img map` through the
//! `qemu:dirty-bitmap:NAME` context lists exactly the ranges written since
//! the bitmap was added; an incremental backup made of those ranges
//! equals the disk at the second export; bad clients are dropped without
//! disturbing the guest or other clients; writes are refused; ending an
//! export deletes its snapshot.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::{Value, json};

const SIZE: u64 = 32 << 20;
const BLOCK: usize = 65536;
const BLOCKS: u64 = SIZE / BLOCK as u64;

/// A daemon serving a fresh 32 MiB image with a control socket and an
/// NBD server; the NBD socket's path.
fn start(d: &Path) -> (Daemon, Qmp, PathBuf) {
    create_qcow2(d, "a.qcow2", "32M");
    let nbd = d.join("nbd.sock");
    let daemon = Daemon::qblk(
        d,
        "a.sock",
        &[
            "--control",
            "qmp.sock",
            "--nbd",
            &format!("unix:{}", nbd.display()),
            "a.qcow2",
        ],
    );
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    (daemon, q, nbd)
}

/// The guest's disk as written so far.
type Shadow = Arc<Mutex<Vec<u8>>>;

fn write(c: &mut Client, shadow: &Shadow, block: u64, fill: u8) {
    let offset = block * BLOCK as u64;
    c.buf()[..BLOCK].fill(fill);
    assert_eq!(c.write(offset, 0, BLOCK), 0, "guest write at {offset}");
    let at = offset as usize;
    shadow.lock().expect("shadow")[at..at + BLOCK].fill(fill);
}

/// Merges touching (start, length) ranges.
fn merged(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in r {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

fn block_ranges(blocks: &[u64]) -> Vec<(u64, u64)> {
    merged(
        blocks
            .iter()
            .map(|b| (b * BLOCK as u64, BLOCK as u64))
            .collect(),
    )
}

fn export_add(q: &mut Qmp, id: &str, name: &str, bitmaps: &[&str]) {
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": "disk", "name": name, "writable": false, "bitmaps": bitmaps}),
    );
}

/// `qemu-img convert` of export `name` to a raw file; its bytes.
fn convert(d: &Path, nbd: &Path, name: &str) -> Vec<u8> {
    let out = d.join(format!("{name}.raw"));
    let _ = std::fs::remove_file(&out);
    sh(
        d,
        &[
            "timeout",
            "60",
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd+unix:///{name}?socket={}", nbd.display()),
            out.to_str().expect("utf-8 path"),
        ],
    );
    std::fs::read(&out).expect("converted image")
}

/// The dirty ranges of bitmap `bitmap` in export `name`, as QEMU's NBD
/// client reads them (x-dirty-bitmap turns `qemu-img map` around: dirty
/// ranges come out with `"data": false`).
fn dirty_ranges(d: &Path, nbd: &Path, name: &str, bitmap: &str) -> Vec<(u64, u64)> {
    merged(map_ranges(&nbd_dirty_map(d, nbd, name, bitmap), false))
}

/// The ranges `qemu-img map` of export `name` (`base:allocation`) reports
/// as data.
fn data_ranges(d: &Path, nbd: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = sh(
        d,
        &[
            "qemu-img",
            "map",
            "--output=json",
            "-f",
            "raw",
            &format!("nbd+unix:///{name}?socket={}", nbd.display()),
        ],
    );
    let v: Value = serde_json::from_str(&out).expect("map JSON");
    merged(map_ranges(&v, true))
}

/// Whether `program` is installed.
fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The dirty ranges of `bitmap` in export `name` as libnbd's `nbdinfo
/// --map` reads them (type bit 0: dirty).
fn nbdinfo_dirty(d: &Path, nbd: &Path, name: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let out = sh(
        d,
        &[
            "nbdinfo",
            "--json",
            &format!("--map=qemu:dirty-bitmap:{bitmap}"),
            &format!("nbd+unix:///{name}?socket={}", nbd.display()),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON {out}: {e}"));
    let ranges = v
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["type"].as_u64().is_some_and(|t| t & 1 == 1))
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect();
    merged(ranges)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn snapshots(d: &Path) -> String {
    sh(d, &["qemu-img", "snapshot", "-l", "-U", "a.qcow2"])
}

/// A guest writer overwriting random blocks until stopped; the number of
/// writes it made.
fn overwriter(socket: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).expect("client");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let block = (seed >> 33) % BLOCKS;
            c.buf()[..BLOCK].fill(0xe0 | (seed >> 60) as u8);
            assert_eq!(c.write(block * BLOCK as u64, 0, BLOCK), 0);
            n += 1;
        }
        n
    })
}

/// A minimal NBD client of our own: fixed newstyle, `NBD_OPT_GO`, simple
/// replies (no structured replies negotiated), and raw bytes for the
/// tests that misbehave.
struct RawNbd {
    s: UnixStream,
    size: u64,
    cookie: u64,
}

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;

impl RawNbd {
    /// Connected, greeting read, client flags sent.
    fn greeted(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().expect("8")),
            IHAVEOPT
        );
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        s
    }

    fn go(path: &Path, name: &str) -> RawNbd {
        let mut s = Self::greeted(path);
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&7u32.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        s.write_all(&m).expect("NBD_OPT_GO");
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).expect("option reply data");
            assert_eq!(kind & (1 << 31), 0, "NBD_OPT_GO refused: {body:?}");
            if kind == 3 && body[..2] == [0, 0] {
                size = Some(u64::from_be_bytes(body[2..10].try_into().expect("8")));
            }
            if kind == 1 {
                break;
            }
        }
        RawNbd {
            s,
            size: size.expect("NBD_INFO_EXPORT"),
            cookie: 0,
        }
    }

    fn header(&mut self, kind: u16, offset: u64, len: u32) -> Vec<u8> {
        self.cookie += 1;
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// A simple reply's error (0: success), after checking its cookie.
    fn reply(&mut self) -> u32 {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(r[..4].try_into().expect("4")),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u64::from_be_bytes(r[8..].try_into().expect("8")),
            self.cookie
        );
        u32::from_be_bytes(r[4..8].try_into().expect("4"))
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let h = self.header(0, offset, len);
        self.s.write_all(&h).expect("read request");
        match self.reply() {
            0 => {
                let mut b = vec![0u8; len as usize];
                self.s.read_exact(&mut b).expect("read data");
                Ok(b)
            }
            e => Err(e),
        }
    }

    /// A command without payload (trim, write-zeroes, block status...);
    /// its error.
    fn command(&mut self, kind: u16, offset: u64, len: u32) -> u32 {
        let h = self.header(kind, offset, len);
        self.s.write_all(&h).expect("request");
        self.reply()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let mut h = self.header(1, offset, data.len() as u32);
        h.extend_from_slice(data);
        self.s.write_all(&h).expect("write request");
        self.reply()
    }
}

/// Whether the server hangs up `s` within 10 s (reads EOF or an error).
fn hung_up(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn an_export_reads_the_disk_at_the_export_point_while_the_guest_overwrites_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let (mut daemon, mut q, nbd) = start(d);
    let shadow: Shadow = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    for b in 0..32 {
        write(&mut c, &shadow, b, b as u8 + 1);
    }
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b", "persistent": true}),
    );
    let since: Vec<u64> = vec![5, 6, 7, 100, 101, 102, 103, 200, 301, 302, 511];
    for (i, b) in since.iter().enumerate() {
        write(&mut c, &shadow, *b, 0x80 + i as u8);
    }
    export_add(&mut q, "e1", "exp", &["b"]);
    let expected = shadow.lock().expect("shadow").clone();
    drop(c);

    // The guest overwrites the disk while the backup reads it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = overwriter(daemon.socket.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let got = convert(d, &nbd, "exp");
    let dirty = dirty_ranges(d, &nbd, "exp", "b");
    let data = data_ranges(d, &nbd, "exp");
    stop.store(true, Ordering::SeqCst);
    let overwrites = writer.join().expect("writer");
    assert!(overwrites > 0, "the guest wrote nothing meanwhile");
    assert_eq!(
        first_difference(&got, &expected),
        None,
        "the export is not the disk at the export point ({overwrites} overwrites meanwhile)"
    );
    assert_eq!(
        dirty,
        block_ranges(&since),
        "the bitmap context lists other ranges than those written since the bitmap was added"
    );
    // base:allocation: data exactly where the disk had been written at
    // the export point (the guest's later writes elsewhere do not show).
    let mut written: Vec<u64> = (0..32).collect();
    written.extend(&since);
    assert_eq!(
        data,
        block_ranges(&written),
        "base:allocation does not describe the disk at the export point"
    );
    // The active disk did move on.
    let now = {
        export_add(&mut q, "e2", "now", &[]);
        let now = convert(d, &nbd, "now");
        q.ok("block-export-del", json!({"id": "e2"}));
        now
    };
    assert!(first_difference(&now, &expected).is_some());

    // Listed, and its snapshot is the export's to delete.
    let exports = q.ok("query-block-exports", json!({}));
    assert!(
        exports
            .as_array()
            .expect("list")
            .iter()
            .any(|e| e["id"] == "e1" && e["type"] == "nbd"),
        "{exports}"
    );
    assert!(snapshots(d).contains("qblk-export-e1"));
    let (_, desc) = q.err(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "disk", "name": "qblk-export-e1"}),
    );
    assert!(desc.contains("NBD export"), "{desc}");
    // Writable exports are refused; so are duplicates.
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "disk", "writable": true}),
    );
    assert!(desc.contains("cannot be written"), "{desc}");
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk", "name": "other"}),
    );
    assert!(desc.contains("already in use"), "{desc}");

    q.ok("block-export-del", json!({"id": "e1"}));
    assert!(
        !snapshots(d).contains("qblk-export"),
        "block-export-del left the snapshot:\n{}",
        snapshots(d)
    );
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports.as_array().expect("list").len(), 1, "{exports}");
    let gone = run(
        "qemu-img",
        &[
            "info",
            "-f",
            "raw",
            &format!("nbd+unix:///exp?socket={}", nbd.display()),
        ],
        d,
    );
    assert!(!gone.status.success(), "a deleted export still answers");
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
}

#[test]
fn an_incremental_backup_of_the_dirty_ranges_equals_the_disk_at_the_second_export() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let (mut daemon, mut q, nbd) = start(d);
    let shadow: Shadow = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    for b in (0..BLOCKS).step_by(3) {
        write(&mut c, &shadow, b, (b % 200) as u8 + 1);
    }
    // The bitmap first, then the full backup's export: the bitmap holds
    // every write after the export point (and perhaps a few before).
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b", "persistent": true}),
    );
    export_add(&mut q, "full", "full", &[]);
    let at_full = shadow.lock().expect("shadow").clone();
    let mut backup = convert(d, &nbd, "full");
    assert_eq!(first_difference(&backup, &at_full), None);
    q.ok("block-export-del", json!({"id": "full"}));

    // Overwrites, new data, and zeroes.
    let changed: Vec<u64> = vec![0, 3, 4, 50, 51, 52, 260, 261, 400, 509];
    for (i, b) in changed.iter().enumerate() {
        write(&mut c, &shadow, *b, 0xa0 + i as u8);
    }
    let zeroed = 9 * BLOCK as u64;
    assert_eq!(c.write_zeroes(zeroed, BLOCK as u64, false), 0);
    shadow.lock().expect("shadow")[zeroed as usize..zeroed as usize + BLOCK].fill(0);
    export_add(&mut q, "inc", "inc", &["b"]);
    let at_inc = shadow.lock().expect("shadow").clone();
    drop(c);
    // The guest goes on writing while the incremental backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = overwriter(daemon.socket.clone(), stop.clone());

    let dirty = dirty_ranges(d, &nbd, "inc", "b");
    let mut all = changed.clone();
    all.push(9);
    assert_eq!(dirty, block_ranges(&all));
    // libnbd's nbdinfo (libnbd-bin, which `cargo xtask test` installs)
    // reads the same bitmap context.
    if have("nbdinfo") {
        assert_eq!(nbdinfo_dirty(d, &nbd, "inc", "b"), dirty, "nbdinfo --map");
    } else {
        println!("nbdinfo is not installed: libnbd's view of the bitmap is not checked");
    }
    let copied: u64 = dirty.iter().map(|r| r.1).sum();
    assert!(copied < SIZE / 10, "{copied} bytes dirty");
    // Our own client copies the dirty ranges (simple replies).
    let mut n = RawNbd::go(&nbd, "inc");
    assert_eq!(n.size, SIZE);
    for (start, len) in dirty {
        if broken("nbd-skip-dirty") {
            continue;
        }
        let data = n.read(start, len as u32).expect("read a dirty range");
        backup[start as usize..(start + len) as usize].copy_from_slice(&data);
    }
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().expect("writer") > 0);
    assert_eq!(
        first_difference(&backup, &at_inc),
        None,
        "the full backup plus the dirty ranges is not the disk at the second export"
    );
    assert_ne!(backup, at_full);
    drop(n);
    q.ok("block-export-del", json!({"id": "inc"}));
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
}

#[test]
fn bad_clients_are_dropped_and_neither_the_guest_nor_other_clients_notice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let (mut daemon, mut q, nbd) = start(d);
    let shadow: Shadow = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    for b in 0..64 {
        write(&mut c, &shadow, b * 7 % BLOCKS, b as u8 + 1);
    }
    export_add(&mut q, "e", "exp", &[]);
    let expected = shadow.lock().expect("shadow").clone();
    drop(c);

    // Garbage instead of the client flags and options: hung up.
    let mut garbage = UnixStream::connect(&nbd).expect("connect");
    garbage.write_all(&[0xff; 300]).expect("garbage");
    assert!(
        hung_up(&mut garbage),
        "a client sending garbage stays connected"
    );
    let mut s = RawNbd::greeted(&nbd);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).expect("huge option");
    assert!(
        hung_up(&mut s),
        "a client announcing a 4 GiB option stays connected"
    );
    // Bad request magic after the handshake: hung up.
    let mut bad = RawNbd::go(&nbd, "exp");
    bad.s.write_all(&[0x5a; 28]).expect("bad request");
    assert!(hung_up(&mut bad.s));
    // Clients vanishing mid-request, mid-reply, mid-handshake.
    let mut half = RawNbd::go(&nbd, "exp");
    let h = half.header(0, 0, 4096);
    half.s.write_all(&h[..13]).expect("half a header");
    drop(half);
    let mut unread = RawNbd::go(&nbd, "exp");
    let h = unread.header(0, 0, 16 << 20);
    unread.s.write_all(&h).expect("a 16 MiB read");
    drop(unread);
    // And some that stay, stalled mid-handshake or idle.
    let stalled: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&nbd).expect("connect"))
        .collect();
    let idle = RawNbd::go(&nbd, "exp");

    // The guest writes on; the others read the export.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = overwriter(daemon.socket.clone(), stop.clone());
    let got = convert(d, &nbd, "exp");
    assert_eq!(first_difference(&got, &expected), None);
    let mut n = RawNbd::go(&nbd, "exp");
    // Writes, trims, write-zeroes: refused, and the connection goes on.
    assert_eq!(n.write(0, &[0x77; 4096]), EPERM);
    assert_eq!(n.command(4, 0, 4096), EPERM, "trim");
    assert_eq!(n.command(6, 0, 4096), EPERM, "write-zeroes");
    // Block status needs structured replies; reads past the end fail.
    assert_eq!(n.command(7, 0, 4096), EINVAL);
    assert_eq!(n.read(SIZE - 512, 4096), Err(EINVAL));
    assert_eq!(n.command(3, 0, 0), 0, "flush");
    let data = n.read(0, 1 << 20).expect("read");
    assert_eq!(data, expected[..1 << 20]);
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().expect("writer") > 0);
    // The disk itself was not written through the export.
    let mut after = Client::connect(&daemon.socket, 1).expect("client");
    assert!(after.read_vec(0, 4096).iter().all(|&b| b != 0x77));
    drop((stalled, idle, n, after));
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.log());
    q.ok("block-export-del", json!({"id": "e"}));
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
}

#[test]
fn the_nbd_server_starts_and_stops_over_qmp_and_exports_end_with_it_and_with_the_daemon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "32M");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    let nbd = d.join("nbd.sock");
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk"}),
    );
    assert!(desc.contains("not running"), "{desc}");
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}, "tls-creds": "t"}),
    );
    assert!(desc.contains("no TLS"), "{desc}");
    // QEMU's SocketAddressLegacy.
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    assert!(desc.contains("already running"), "{desc}");
    // The default name is the node's.
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "bm", "persistent": true}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "bitmaps": ["bm"]}),
    );
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "f", "node-name": "disk", "name": "f", "bitmaps": ["nope"]}),
    );
    assert!(desc.contains("not found"), "{desc}");
    // NBD_OPT_LIST, NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT, as
    // qemu-nbd --list asks them.
    let list = sh(
        d,
        &[
            "timeout",
            "20",
            "qemu-nbd",
            "--list",
            "-k",
            nbd.to_str().expect("utf-8"),
        ],
    );
    for want in [
        "exports available: 1",
        "export: 'disk'",
        "size:  33554432",
        "readonly",
        "base:allocation",
        "qemu:dirty-bitmap:bm",
    ] {
        assert!(
            list.contains(want),
            "qemu-nbd --list lacks {want:?}:\n{list}"
        );
    }
    let info = sh(
        d,
        &[
            "qemu-img",
            "info",
            "--output=json",
            "-f",
            "raw",
            &format!("nbd+unix:///disk?socket={}", nbd.display()),
        ],
    );
    let info: Value = serde_json::from_str(&info).expect("info JSON");
    assert_eq!(info["virtual-size"], SIZE);
    // Handing the disk over is refused while an export reads it.
    let (_, desc) = q.err(
        "blockdev-set-active",
        json!({"node-name": "disk", "active": false}),
    );
    assert!(desc.contains("NBD exports"), "{desc}");
    // Stopping the server ends its exports and deletes their snapshots.
    q.ok("nbd-server-stop", json!({}));
    let ended = q
        .event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
        .expect("BLOCK_EXPORT_DELETED");
    assert_eq!(ended["data"]["id"], "e", "{ended}");
    assert!(!snapshots(d).contains("qblk-export"), "{}", snapshots(d));
    assert!(!nbd.exists());
    let (_, desc) = q.err("nbd-server-stop", json!({}));
    assert!(desc.contains("not running"), "{desc}");
    // The flat SocketAddress, and an export left to the daemon's end.
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": nbd}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "left", "node-name": "disk", "name": "x"}),
    );
    assert!(snapshots(d).contains("qblk-export-left"));
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        !snapshots(d).contains("qblk-export"),
        "the daemon left an export's snapshot behind:\n{}",
        snapshots(d)
    );
    qemu_check_clean("a.qcow2", d);
}
