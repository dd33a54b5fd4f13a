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
    assert!(desc.contains("No TLS credentials with id 't'"), "{desc}");
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

// TLS: QEMU's `tls-creds-x509` directories made with openssl.

/// `openssl` in `d`, which must succeed.
fn openssl(d: &Path, args: &[&str]) {
    sh(d, &[&["openssl"], args].concat());
}

/// A self-signed CA `NAME-cert.pem`/`NAME-key.pem` in `d`.
fn make_ca(d: &Path, name: &str) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `NAME-cert.pem`/`NAME-key.pem` signed by CA `ca`, for
/// `usage` (serverAuth, clientAuth) with extra extension lines `ext`.
fn make_cert(d: &Path, name: &str, ca: &str, usage: &str, ext: &str) {
    std::fs::write(
        d.join(format!("{name}.ext")),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n{ext}"
        ),
    )
    .expect("extensions file");
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-days",
            "3650",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}-cert.pem"),
        ],
    );
}

/// Copies `files` (from, to) into a new directory `dir` of `d`.
fn creds_dir(d: &Path, dir: &str, files: &[(&str, &str)]) {
    std::fs::create_dir(d.join(dir)).expect("creds dir");
    for (from, to) in files {
        std::fs::copy(d.join(from), d.join(dir).join(to)).expect("copy a PEM file");
    }
}

/// Credentials in `d`: `srv` (the server's), `cli` (a client the CA
/// signed), `rogue` (a client another CA signed, which trusts our CA).
fn make_creds(d: &Path) {
    make_ca(d, "ca");
    make_ca(d, "other");
    make_cert(
        d,
        "server",
        "ca",
        "serverAuth",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    );
    make_cert(d, "client", "ca", "clientAuth", "");
    make_cert(d, "intruder", "other", "clientAuth", "");
    creds_dir(
        d,
        "srv",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ],
    );
    creds_dir(
        d,
        "cli",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("client-cert.pem", "client-cert.pem"),
            ("client-key.pem", "client-key.pem"),
        ],
    );
    // QEMU checks its own certificate against its CA file at start:
    // this client's holds both CAs.
    let both = [
        std::fs::read_to_string(d.join("ca-cert.pem")).expect("CA"),
        std::fs::read_to_string(d.join("other-cert.pem")).expect("CA"),
    ]
    .concat();
    std::fs::write(d.join("both-cert.pem"), both).expect("CA bundle");
    creds_dir(
        d,
        "rogue",
        &[
            ("both-cert.pem", "ca-cert.pem"),
            ("intruder-cert.pem", "client-cert.pem"),
            ("intruder-key.pem", "client-key.pem"),
        ],
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `qemu-img ARGS...` reading export `name` at 127.0.0.1:`port` over TLS
/// with client credentials directory `creds` (None: no TLS).
fn qemu_img_tls(
    d: &Path,
    port: u16,
    name: &str,
    creds: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut v: Vec<String> = vec!["60".into(), "qemu-img".into(), args[0].into()];
    let mut opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={name}"
    );
    if let Some(dir) = creds {
        v.push("--object".into());
        v.push(format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}"));
        opts.push_str(",tls-creds=tls0");
    }
    v.push("--image-opts".into());
    v.push(opts);
    v.extend(args[1..].iter().map(|s| s.to_string()));
    let v: Vec<&str> = v.iter().map(String::as_str).collect();
    run("timeout", &v, d)
}

/// An option request with `data`.
fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// An option reply's option, type and data.
fn option_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("option reply data");
    (opt, kind, body)
}

/// Connected over TCP, greeting read, client flags sent.
fn greeted_tcp(port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    s
}

fn hung_up_tcp(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

const REP_ACK: u32 = 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// NBD_OPT_STARTTLS by hand, then the TLS handshake with rustls as the
/// client, which presents the certificate of credentials directory
/// `creds`.
fn starttls(d: &Path, port: u16, creds: &str) -> TlsStream {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut s = greeted_tcp(port);
    s.write_all(&option(5, &[])).expect("NBD_OPT_STARTTLS");
    assert_eq!(option_reply(&mut s), (5, REP_ACK, vec![]));
    let dir = d.join(creds);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("a CA");
    }
    let chain = CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
        .expect("client certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("client certificate PEM");
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).expect("client key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client certificate and key");
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    rustls::StreamOwned::new(conn, s)
}

/// NBD_OPT_GO of export `name`; then a simple read of `len` bytes at 0.
fn go_and_read(t: &mut TlsStream, name: &str, len: u32) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    t.write_all(&option(7, &data)).expect("NBD_OPT_GO");
    loop {
        let (_, kind, body) = option_reply(t);
        assert_eq!(kind & (1 << 31), 0, "NBD_OPT_GO refused: {body:?}");
        if kind == REP_ACK {
            break;
        }
    }
    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 0]);
    h.extend_from_slice(&9u64.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    t.write_all(&h).expect("NBD_CMD_READ");
    let mut r = [0u8; 16];
    t.read_exact(&mut r).expect("simple reply");
    assert_eq!(r[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(r[4..8], [0; 4], "the read failed");
    assert_eq!(r[8..], 9u64.to_be_bytes());
    let mut b = vec![0u8; len as usize];
    t.read_exact(&mut b).expect("read data");
    b
}

#[test]
fn tls_exports_are_read_over_tls_and_plain_or_foreign_clients_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    make_creds(d);
    create_qcow2(d, "a.qcow2", "32M");
    let port = free_port();
    let mut daemon = Daemon::qblk(
        d,
        "a.sock",
        &[
            "--control",
            "qmp.sock",
            "--object",
            "tls-creds-x509,id=tls0,dir=srv,endpoint=server",
            "--object",
            "tls-creds-x509,id=loose,dir=srv,verify-peer=off",
            "--nbd",
            &format!("127.0.0.1:{port}"),
            "--nbd-tls-creds",
            "tls0",
            "a.qcow2",
        ],
    );
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    let shadow: Shadow = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    for b in 0..64 {
        write(&mut c, &shadow, b * 5 % BLOCKS, b as u8 + 1);
    }
    export_add(&mut q, "e", "exp", &[]);
    let expected = shadow.lock().expect("shadow").clone();
    drop(c);

    let read_tls = |creds: &str| -> Vec<u8> {
        let out = d.join("tls.raw");
        let _ = std::fs::remove_file(&out);
        let o = qemu_img_tls(
            d,
            port,
            "exp",
            Some(creds),
            &["convert", "-O", "raw", out.to_str().expect("utf-8")],
        );
        ok(o, "qemu-img convert over TLS");
        std::fs::read(&out).expect("converted image")
    };
    // A client with a certificate the CA signed reads the export over TLS.
    assert_eq!(first_difference(&read_tls("cli"), &expected), None);
    // By hand: inside TLS a second STARTTLS is invalid, and the haggling
    // and transmission go on inside TLS.
    let mut t = starttls(d, port, "cli");
    t.write_all(&option(5, &[]))
        .expect("a second NBD_OPT_STARTTLS");
    assert_eq!(option_reply(&mut t).1, REP_ERR_INVALID);
    assert_eq!(go_and_read(&mut t, "exp", 1 << 20), expected[..1 << 20]);
    drop(t);

    // A plain client is told TLS is required.
    let o = qemu_img_tls(d, port, "exp", None, &["info"]);
    assert!(!o.status.success(), "a plain client read a TLS-only export");
    assert!(
        stderr(&o).contains("TLS negotiation required"),
        "{}",
        stderr(&o)
    );
    // Raw: options before STARTTLS get NBD_REP_ERR_TLS_REQD; the old
    // NBD_OPT_EXPORT_NAME, which cannot be refused, a hang-up.
    let mut s = greeted_tcp(port);
    s.write_all(&option(3, &[])).expect("NBD_OPT_LIST");
    assert_eq!(option_reply(&mut s).1, REP_ERR_TLS_REQD);
    s.write_all(&option(7, &[0xff; 3]))
        .expect("a malformed NBD_OPT_GO");
    assert_eq!(option_reply(&mut s).1, REP_ERR_TLS_REQD);
    s.write_all(&option(1, b"exp"))
        .expect("NBD_OPT_EXPORT_NAME");
    assert!(
        hung_up_tcp(&mut s),
        "NBD_OPT_EXPORT_NAME before TLS was not hung up"
    );
    // Garbage instead of a TLS ClientHello: hung up.
    let mut s = greeted_tcp(port);
    s.write_all(&option(5, &[])).expect("NBD_OPT_STARTTLS");
    assert_eq!(option_reply(&mut s), (5, REP_ACK, vec![]));
    s.write_all(&[0x5a; 600]).expect("garbage");
    assert!(
        hung_up_tcp(&mut s),
        "garbage in the TLS handshake was not hung up"
    );
    // A client whose certificate another CA signed: refused.
    let o = qemu_img_tls(d, port, "exp", Some("rogue"), &["info"]);
    assert!(
        !o.status.success(),
        "a client with a foreign certificate read the export"
    );
    // The server refused it (gnutls sends no certificate the server's
    // CA list does not name; rustls refuses one it would not verify),
    // logged just after the alert is sent.
    let refused = |log: &str| {
        log.contains("TLS handshake failed: peer sent no certificates")
            || log.contains("TLS handshake failed: invalid peer certificate")
    };
    for _ in 0..100 {
        if refused(&daemon.log()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        refused(&daemon.log()),
        "the server did not refuse the foreign certificate itself:\n{}\n{}",
        stderr(&o),
        daemon.log()
    );
    // The daemon and the good client go on.
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.log());
    assert_eq!(first_difference(&read_tls("cli"), &expected), None);

    // Over QMP: tls-authz refused, unknown IDs refused; verify-peer=off
    // admits the foreign client, which still needs TLS.
    let addr = json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}});
    q.ok("nbd-server-stop", json!({}));
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": addr, "tls-creds": "tls0", "tls-authz": "a"}),
    );
    assert!(desc.contains("tls-authz"), "{desc}");
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": addr, "tls-creds": "nope"}),
    );
    assert!(desc.contains("No TLS credentials with id 'nope'"), "{desc}");
    q.ok(
        "nbd-server-start",
        json!({"addr": addr, "tls-creds": "loose"}),
    );
    export_add(&mut q, "e", "exp", &[]);
    assert_eq!(first_difference(&read_tls("rogue"), &expected), None);
    let o = qemu_img_tls(d, port, "exp", None, &["info"]);
    assert!(!o.status.success(), "a plain client read a TLS-only export");
    // On a unix socket QEMU's client checks the certificate against
    // tls-hostname.
    q.ok("nbd-server-stop", json!({}));
    let sock = d.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": sock}, "tls-creds": "tls0"}),
    );
    export_add(&mut q, "e", "exp", &[]);
    let o = run(
        "timeout",
        &[
            "60",
            "qemu-img",
            "info",
            "--output=json",
            "--object",
            "tls-creds-x509,id=tls0,endpoint=client,dir=cli",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=exp,tls-creds=tls0,tls-hostname=localhost",
                sock.display()
            ),
        ],
        d,
    );
    let info: Value =
        serde_json::from_str(&ok(o, "qemu-img info over TLS on a unix socket")).expect("info JSON");
    assert_eq!(info["virtual-size"], SIZE);
    // A server without credentials answers STARTTLS with NBD_REP_ERR_POLICY.
    q.ok("nbd-server-stop", json!({}));
    q.ok("nbd-server-start", json!({"addr": addr}));
    let mut s = greeted_tcp(port);
    s.write_all(&option(5, &[])).expect("NBD_OPT_STARTTLS");
    assert_eq!(option_reply(&mut s).1, REP_ERR_POLICY);
    s.write_all(&option(3, &[])).expect("NBD_OPT_LIST");
    // The haggling goes on in the clear (no exports left: a bare ACK).
    assert_eq!(
        option_reply(&mut s),
        (3, REP_ACK, vec![]),
        "after a refused STARTTLS"
    );
    drop(s);
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
}

#[test]
fn bad_tls_credentials_stop_the_daemon_at_start_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "32M");
    std::fs::create_dir(d.join("empty")).expect("dir");
    std::fs::create_dir(d.join("junk")).expect("dir");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::write(
            d.join("junk").join(f),
            "-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n",
        )
        .expect("junk");
    }
    for (object, want) in [
        ("tls-creds-x509,id=t,dir=empty", "server-cert.pem"),
        ("tls-creds-x509,id=t,dir=junk", "server-cert.pem"),
        (
            "tls-creds-x509,id=t,dir=empty,endpoint=client",
            "endpoint=client",
        ),
        ("tls-creds-psk,id=t,dir=empty", "tls-creds-x509"),
    ] {
        let o = qblk(
            &[
                "serve",
                "--socket",
                "a.sock",
                "--object",
                object,
                "--nbd",
                "unix:n.sock",
                "--nbd-tls-creds",
                "t",
                "a.qcow2",
            ],
            d,
        );
        assert!(!o.status.success(), "{object} was taken");
        assert!(stderr(&o).contains(want), "{object}: {}", stderr(&o));
    }
    let o = qblk(
        &[
            "serve",
            "--socket",
            "a.sock",
            "--nbd",
            "unix:n.sock",
            "--nbd-tls-creds",
            "t",
            "a.qcow2",
        ],
        d,
    );
    assert!(
        !o.status.success() && stderr(&o).contains("no --object"),
        "{}",
        stderr(&o)
    );
}
