//! Malformed vhost-user messages from a hostile frontend: bad sizes, memory
//! tables, queue indexes and file descriptors. Each gets an error reply or
//! a disconnect — never a crash, a hang or a leaked descriptor — and the
//! socket then serves the next frontend.
//!
//! Messages are written byte by byte here (vhost-user.rst, "Message
//! specification"), since a real frontend library refuses to send them.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::{broken, create_qcow2};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

/// Header flags: protocol version 1, and "reply with an ack".
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD, CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = 1 | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 15);

const MEM: u64 = 1 << 20;

/// What the daemon did with a message.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Closed the connection.
    Disconnected,
    /// Replied with this u64 (0 is success for an ack).
    Reply(u64),
    /// Said nothing within the timeout although a reply was asked for.
    Silent,
}

struct Conn {
    s: UnixStream,
}

impl Conn {
    fn open(socket: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("read timeout");
                    return Self { s };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect: {e}"),
            }
        }
    }

    fn raw(&self, bytes: &[u8], fds: &[RawFd]) -> bool {
        self.s.send_with_fds(&[bytes], fds).is_ok()
    }

    fn send_sized(&self, req: u32, flags: u32, size: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        let mut m = Vec::with_capacity(12 + payload.len());
        m.extend_from_slice(&req.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(payload);
        self.raw(&m, fds)
    }

    fn send(&self, req: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        self.send_sized(req, VERSION, payload.len() as u32, payload, fds)
    }

    /// Sends a message asking for a reply and returns what came back.
    fn ask(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> Outcome {
        if !self.send_sized(
            req,
            VERSION | NEED_REPLY,
            payload.len() as u32,
            payload,
            fds,
        ) {
            return Outcome::Disconnected;
        }
        self.reply()
    }

    fn reply(&mut self) -> Outcome {
        let mut hdr = [0u8; 12];
        match self.s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::Silent;
            }
            Err(_) => return Outcome::Disconnected,
        }
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
        assert!(size <= 4096, "reply of {size} bytes");
        let mut body = vec![0u8; size];
        if self.s.read_exact(&mut body).is_err() {
            return Outcome::Disconnected;
        }
        let mut v = [0u8; 8];
        let n = size.min(8);
        v[..n].copy_from_slice(&body[..n]);
        Outcome::Reply(u64::from_le_bytes(v))
    }

    /// SET_OWNER and feature negotiation, as every frontend starts.
    fn handshake(&mut self) {
        assert!(self.send(SET_OWNER, &[], &[]));
        assert!(self.send(GET_FEATURES, &[], &[]));
        let Outcome::Reply(features) = self.reply() else {
            panic!("no GET_FEATURES reply")
        };
        assert!(features & F_PROTOCOL_FEATURES != 0);
        assert!(self.send(SET_FEATURES, &features.to_le_bytes(), &[]));
        assert!(self.send(GET_PROTOCOL_FEATURES, &[], &[]));
        let Outcome::Reply(proto) = self.reply() else {
            panic!("no GET_PROTOCOL_FEATURES reply")
        };
        assert!(self.send(
            SET_PROTOCOL_FEATURES,
            &(proto & PROTOCOL).to_le_bytes(),
            &[]
        ));
    }
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A `VhostUserMemory` payload: count, padding, then (gpa, size, uaddr,
/// mmap offset) per region.
fn mem_table(count: u32, regions: &[[u64; 4]]) -> Vec<u8> {
    let mut p = u32s(&[count, 0]);
    for r in regions {
        p.extend(u64s(r));
    }
    p
}

/// A `VhostUserInflight` payload: mmap size and offset, queue count and
/// size (and the struct's padding).
fn inflight(mmap_size: u64, mmap_offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = u64s(&[mmap_size, mmap_offset]);
    p.extend(num_queues.to_le_bytes());
    p.extend(queue_size.to_le_bytes());
    p.extend([0; 4]);
    p
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("size memfd");
    f
}

/// What the process has open, by target (`anon_inode:[eventfd]`, …).
/// Not being able to list them fails the test: an empty list would pass
/// any leak check, and a live daemon always has descriptors open (its
/// socket, the image, its io_uring).
fn open_fds(pid: u32) -> Vec<String> {
    // `QBLK_BREAK=fd-proc-unreadable` looks in a /proc that does not exist.
    let proc = if broken("fd-proc-unreadable") {
        "/nonexistent-proc"
    } else {
        "/proc"
    };
    let dir = format!("{proc}/{pid}/fd");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {dir}: {e}"));
    let mut v = Vec::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
            .path();
        match std::fs::read_link(&path) {
            Ok(target) => v.push(target.display().to_string()),
            // Closed between the listing and the look: not open any more.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        }
    }
    assert!(!v.is_empty(), "{dir} lists no descriptors of a live daemon");
    v.sort();
    v
}

type Case = Box<dyn Fn(&mut Conn, RawFd) -> Outcome>;

#[test]
fn malformed_messages_get_an_error_or_a_disconnect() {
    malformed_messages(&[]);
}

/// The same with guest memory pinned: every memory table a frontend sends
/// (good, refused, replaced) goes through registration too.
#[test]
fn malformed_messages_with_pinned_memory() {
    malformed_messages(&["--pin-guest-memory"]);
}

fn malformed_messages(extra: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "16M");
    let mut args = vec!["--queues", "2"];
    args.extend_from_slice(extra);
    args.push("disk.qcow2");
    let mut daemon = Daemon::qblk(d, "v.sock", &args);
    let mem = memfd(MEM);
    let good_region = [0, MEM, 0x7f00_0000_0000, 0];

    // Warm up once with a real client, so descriptors opened on first use
    // (the image, io_uring instances, worker eventfds) are counted.
    let mut c = Client::connect(&daemon.socket, 2).expect("warm-up client");
    c.buf()[..4096].fill(0x42);
    assert_eq!(c.write(0, 0, 4096), 0);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = open_fds(daemon.pid());

    let cases: Vec<(&str, Case)> = vec![
        (
            "header claiming a 1 MiB payload",
            Box::new(|c, _| {
                if !c.send_sized(SET_FEATURES, VERSION | NEED_REPLY, 1 << 20, &[0; 8], &[]) {
                    return Outcome::Disconnected;
                }
                c.reply()
            }),
        ),
        (
            "payload shorter than the request's",
            Box::new(|c, _| c.ask(SET_FEATURES, &[1, 2, 3, 4], &[])),
        ),
        (
            "payload longer than the request's",
            Box::new(|c, _| c.ask(SET_VRING_NUM, &[0; 24], &[])),
        ),
        (
            "unknown request",
            Box::new(|c, _| c.ask(9999, &[0; 8], &[])),
        ),
        (
            "wrong protocol version",
            Box::new(|c, _| {
                if !c.send_sized(GET_FEATURES, 0x2, 0, &[], &[]) {
                    return Outcome::Disconnected;
                }
                c.reply()
            }),
        ),
        (
            "reply flag on a request",
            Box::new(|c, _| {
                if !c.send_sized(GET_FEATURES, VERSION | 0x4, 0, &[], &[]) {
                    return Outcome::Disconnected;
                }
                c.reply()
            }),
        ),
        (
            "features never offered",
            Box::new(|c, _| c.ask(SET_FEATURES, &u64s(&[u64::MAX]), &[])),
        ),
        (
            "SET_VRING_NUM on queue 99",
            Box::new(|c, _| c.ask(SET_VRING_NUM, &u32s(&[99, 256]), &[])),
        ),
        (
            "SET_VRING_NUM of 0",
            Box::new(|c, _| c.ask(SET_VRING_NUM, &u32s(&[0, 0]), &[])),
        ),
        (
            // A split ring's size is a power of two (virtio 1.2, 2.7).
            "SET_VRING_NUM of 3 (not a power of two)",
            Box::new(|c, _| c.ask(SET_VRING_NUM, &u32s(&[0, 3]), &[])),
        ),
        (
            "SET_VRING_NUM beyond the maximum",
            Box::new(|c, _| c.ask(SET_VRING_NUM, &u32s(&[0, 1 << 16]), &[])),
        ),
        (
            "SET_VRING_BASE on queue 99",
            Box::new(|c, _| c.ask(SET_VRING_BASE, &u32s(&[99, 0]), &[])),
        ),
        (
            "GET_VRING_BASE on queue 99",
            Box::new(|c, _| {
                if !c.send(GET_VRING_BASE, &u32s(&[99, 0]), &[]) {
                    return Outcome::Disconnected;
                }
                match c.reply() {
                    // A reply to GET_VRING_BASE is a vring state, not an
                    // ack: only a disconnect refuses it.
                    Outcome::Reply(_) => Outcome::Reply(0),
                    o => o,
                }
            }),
        ),
        (
            "SET_VRING_ADDR on queue 99",
            Box::new(|c, _| {
                let mut p = u32s(&[99, 0]);
                p.extend(u64s(&[0x1000, 0x2000, 0x3000, 0]));
                c.ask(SET_VRING_ADDR, &p, &[])
            }),
        ),
        (
            "SET_VRING_ADDR without a memory table",
            Box::new(|c, _| {
                let mut p = u32s(&[0, 0]);
                p.extend(u64s(&[0x1000, 0x2000, 0x3000, 0]));
                c.ask(SET_VRING_ADDR, &p, &[])
            }),
        ),
        (
            "SET_VRING_ADDR outside the memory table",
            Box::new(move |c, fd| {
                let t = mem_table(1, &[good_region]);
                assert_eq!(c.ask(SET_MEM_TABLE, &t, &[fd]), Outcome::Reply(0));
                let mut p = u32s(&[0, 0]);
                p.extend(u64s(&[
                    0x7f10_0000_0000,
                    0x7f10_0001_0000,
                    0x7f10_0002_0000,
                    0,
                ]));
                c.ask(SET_VRING_ADDR, &p, &[])
            }),
        ),
        (
            "SET_VRING_KICK on queue 99",
            Box::new(|c, fd| c.ask(SET_VRING_KICK, &u64s(&[99]), &[fd])),
        ),
        (
            "SET_VRING_KICK without its descriptor",
            Box::new(|c, _| c.ask(SET_VRING_KICK, &u64s(&[0]), &[])),
        ),
        (
            "SET_VRING_CALL with three descriptors",
            Box::new(|c, fd| c.ask(SET_VRING_CALL, &u64s(&[0]), &[fd, fd, fd])),
        ),
        (
            "SET_VRING_ENABLE on queue 99",
            Box::new(|c, _| c.ask(SET_VRING_ENABLE, &u32s(&[99, 1]), &[])),
        ),
        (
            "SET_MEM_TABLE with no region",
            Box::new(|c, _| c.ask(SET_MEM_TABLE, &mem_table(0, &[]), &[])),
        ),
        (
            "SET_MEM_TABLE claiming two regions, carrying one",
            Box::new(move |c, fd| c.ask(SET_MEM_TABLE, &mem_table(2, &[good_region]), &[fd])),
        ),
        (
            "SET_MEM_TABLE with fewer descriptors than regions",
            Box::new(move |c, fd| {
                let second = [MEM, MEM, 0x7f00_1000_0000, 0];
                c.ask(SET_MEM_TABLE, &mem_table(2, &[good_region, second]), &[fd])
            }),
        ),
        (
            "SET_MEM_TABLE with 9 regions",
            Box::new(move |c, fd| {
                let regions: Vec<[u64; 4]> = (0..9)
                    .map(|i| [i * MEM, MEM, 0x7f00_0000_0000 + i * MEM, 0])
                    .collect();
                c.ask(SET_MEM_TABLE, &mem_table(9, &regions), &[fd; 8])
            }),
        ),
        (
            "SET_MEM_TABLE with an empty region",
            Box::new(|c, fd| {
                c.ask(
                    SET_MEM_TABLE,
                    &mem_table(1, &[[0, 0, 0x7f00_0000_0000, 0]]),
                    &[fd],
                )
            }),
        ),
        (
            "SET_MEM_TABLE mapping past the end of its file",
            Box::new(|c, fd| {
                c.ask(
                    SET_MEM_TABLE,
                    &mem_table(1, &[[0, 1 << 40, 0x7f00_0000_0000, 0]]),
                    &[fd],
                )
            }),
        ),
        (
            "SET_MEM_TABLE with overlapping regions",
            Box::new(move |c, fd| {
                let second = [MEM / 2, MEM, 0x7f00_1000_0000, 0];
                c.ask(
                    SET_MEM_TABLE,
                    &mem_table(2, &[good_region, second]),
                    &[fd, fd],
                )
            }),
        ),
        (
            "SET_MEM_TABLE region wrapping the address space",
            Box::new(|c, fd| {
                c.ask(
                    SET_MEM_TABLE,
                    &mem_table(1, &[[u64::MAX - 4095, MEM, 0x7f00_0000_0000, 0]]),
                    &[fd],
                )
            }),
        ),
        (
            "SET_MEM_TABLE with a pipe for memory",
            Box::new(|c, _| {
                let mut p = [0; 2];
                // SAFETY: pipe2 fills the two-element array.
                assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                let r = c.ask(
                    SET_MEM_TABLE,
                    &mem_table(1, &[[0, MEM, 0x7f00_0000_0000, 0]]),
                    &[p[0]],
                );
                for fd in p {
                    // SAFETY: closing the pipe ends we made.
                    unsafe { libc::close(fd) };
                }
                r
            }),
        ),
        (
            "ADD_MEM_REG without its descriptor",
            Box::new(|c, _| {
                let mut p = u64s(&[0]);
                p.extend(u64s(&[0, MEM, 0x7f00_0000_0000, 0]));
                c.ask(ADD_MEM_REG, &p, &[])
            }),
        ),
        (
            "ADD_MEM_REG of an empty region",
            Box::new(|c, fd| {
                let mut p = u64s(&[0]);
                p.extend(u64s(&[0, 0, 0x7f00_0000_0000, 0]));
                c.ask(ADD_MEM_REG, &p, &[fd])
            }),
        ),
        (
            "REM_MEM_REG of a region never added",
            Box::new(|c, _| {
                let mut p = u64s(&[0]);
                p.extend(u64s(&[0x4000_0000, MEM, 0x7f00_0000_0000, 0]));
                c.ask(REM_MEM_REG, &p, &[])
            }),
        ),
        (
            "GET_INFLIGHT_FD for 99 queues",
            Box::new(|c, _| c.ask(GET_INFLIGHT_FD, &inflight(0, 0, 99, 128), &[])),
        ),
        (
            "GET_INFLIGHT_FD for queues of 4096",
            Box::new(|c, _| c.ask(GET_INFLIGHT_FD, &inflight(0, 0, 1, 4096), &[])),
        ),
        (
            "SET_INFLIGHT_FD smaller than its queues need",
            Box::new(|c, fd| c.ask(SET_INFLIGHT_FD, &inflight(64, 0, 2, 128), &[fd])),
        ),
        (
            "SET_INFLIGHT_FD past the end of its file",
            Box::new(|c, fd| c.ask(SET_INFLIGHT_FD, &inflight(1 << 20, MEM, 1, 128), &[fd])),
        ),
        (
            "SET_INFLIGHT_FD at an unaligned offset",
            Box::new(|c, fd| c.ask(SET_INFLIGHT_FD, &inflight(1 << 16, 8, 1, 128), &[fd])),
        ),
        (
            "SET_INFLIGHT_FD without its descriptor",
            Box::new(|c, _| c.ask(SET_INFLIGHT_FD, &inflight(1 << 16, 0, 1, 128), &[])),
        ),
        (
            "SET_INFLIGHT_FD with a pipe",
            Box::new(|c, _| {
                let mut p = [0; 2];
                // SAFETY: pipe2 fills the two-element array.
                assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                let r = c.ask(SET_INFLIGHT_FD, &inflight(1 << 16, 0, 1, 128), &[p[0]]);
                for fd in p {
                    // SAFETY: closing the pipe ends we made.
                    unsafe { libc::close(fd) };
                }
                r
            }),
        ),
        (
            "GET_CONFIG past the config space",
            Box::new(|c, _| {
                let mut p = u32s(&[1000, 60, 0]);
                p.extend([0; 60]);
                if !c.send(GET_CONFIG, &p, &[]) {
                    return Outcome::Disconnected;
                }
                // A refused GET_CONFIG replies with an empty payload.
                c.reply_config()
            }),
        ),
        (
            "GET_CONFIG size not matching its payload",
            Box::new(|c, _| {
                let p = u32s(&[0, 4000, 0]);
                if !c.send(GET_CONFIG, &p, &[]) {
                    return Outcome::Disconnected;
                }
                c.reply_config()
            }),
        ),
        (
            "SET_CONFIG over the read-only capacity",
            Box::new(|c, _| {
                let mut p = u32s(&[0, 8, 0]);
                p.extend(u64s(&[1 << 40]));
                c.ask(SET_CONFIG, &p, &[])
            }),
        ),
        (
            "descriptors attached to GET_FEATURES",
            Box::new(|c, fd| {
                if !c.send(GET_FEATURES, &[], &[fd, fd, fd, fd]) {
                    return Outcome::Disconnected;
                }
                match c.reply() {
                    // The features: the descriptors are dropped.
                    Outcome::Reply(_) => Outcome::Reply(1),
                    o => o,
                }
            }),
        ),
        (
            "message cut off mid-header",
            Box::new(|c, _| {
                c.raw(&[1, 0, 0, 0, 1, 0], &[]);
                let _ = c.s.shutdown(std::net::Shutdown::Write);
                c.reply()
            }),
        ),
        (
            "message cut off mid-payload",
            Box::new(|c, _| {
                c.raw(&[2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 2], &[]);
                let _ = c.s.shutdown(std::net::Shutdown::Write);
                c.reply()
            }),
        ),
    ];

    let mut wrong = Vec::new();
    for (name, case) in &cases {
        let mut c = Conn::open(&daemon.socket);
        c.handshake();
        let outcome = case(&mut c, mem.as_raw_fd());
        let closed = outcome == Outcome::Disconnected;
        match outcome {
            Outcome::Disconnected => {}
            Outcome::Reply(v) if v != 0 => {}
            o => wrong.push(format!("{name}: {o:?}")),
        }
        if !closed {
            // After an error reply the connection still answers (or the
            // daemon has closed it): it is never left hanging.
            let after = if c.send(GET_FEATURES, &[], &[]) {
                c.reply()
            } else {
                Outcome::Disconnected
            };
            assert_ne!(after, Outcome::Silent, "{name}: silent after the reply");
        }
        drop(c);
        assert!(daemon.alive(), "{name}: daemon died: {}", daemon.log());
    }
    assert!(
        wrong.is_empty(),
        "accepted or unanswered:\n{}",
        wrong.join("\n")
    );

    // The next frontend is served, and the data is intact.
    let mut c = Client::connect(&daemon.socket, 2).expect("client after the malformed messages");
    assert_eq!(c.read_vec(0, 4096), vec![0x42; 4096]);
    drop(c);
    // Every descriptor the messages carried was closed, and nothing of a
    // finished connection (eventfds, the guest memory file) is kept.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fds_after = open_fds(daemon.pid());
    while fds_after.len() > fds_before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        fds_after = open_fds(daemon.pid());
    }
    assert!(
        fds_after.len() <= fds_before.len(),
        "descriptors leaked: {} before, {} after:\n{fds_before:?}\n{fds_after:?}",
        fds_before.len(),
        fds_after.len()
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
    if extra.contains(&"--pin-guest-memory") {
        let log = daemon.log();
        assert!(log.contains("guest memory pinned"), "{log}");
        assert!(!log.contains("cannot pin"), "{log}");
    }
}

impl Conn {
    /// Reads a GET_CONFIG reply: a refusal has a config payload of size 0
    /// (or the connection closes).
    fn reply_config(&mut self) -> Outcome {
        let mut hdr = [0u8; 12];
        if self.s.read_exact(&mut hdr).is_err() {
            return Outcome::Disconnected;
        }
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; size.min(4096)];
        if self.s.read_exact(&mut body).is_err() {
            return Outcome::Disconnected;
        }
        let config_size = body
            .get(4..8)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        Outcome::Reply(u64::from(config_size == 0))
    }
}
