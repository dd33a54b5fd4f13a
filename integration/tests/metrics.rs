//! The Prometheus endpoint of `qblk serve --metrics` and the statistics
//! behind it: a scrape during a `qblk bench` run, and once it is over, agree
//! with the client's own counts and with `query-blockstats`; the endpoint
//! over a unix socket and loopback TCP, its refusals, and bad HTTP clients;
//! and bad input on the control socket while I/O runs.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::{Value, json};

/// Where a test scrapes.
enum Endpoint<'a> {
    Unix(&'a Path),
    Tcp(std::net::SocketAddr),
}

/// Sends `request` as it is and returns everything the server answers
/// before it closes the connection (a server that hangs up on garbage
/// before reading it all may cut the sending or the reading short).
fn exchange(at: &Endpoint, request: &[u8]) -> String {
    fn go<S: Read + Write>(mut s: S, request: &[u8]) -> String {
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
    let timeout = Some(Duration::from_secs(30));
    match at {
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p).expect("connect to the metrics socket");
            s.set_read_timeout(timeout).expect("timeout");
            go(s, request)
        }
        Endpoint::Tcp(a) => {
            let s = std::net::TcpStream::connect(a).expect("connect to the metrics port");
            s.set_read_timeout(timeout).expect("timeout");
            go(s, request)
        }
    }
}

/// `GET path`: the status code, the headers (lower-cased) and the body.
fn get(at: &Endpoint, method: &str, path: &str) -> (u16, String, String) {
    let r = exchange(
        at,
        format!("{method} {path} HTTP/1.1\r\nHost: qblk\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {r:?}"));
    (status, head.to_lowercase(), body.to_owned())
}

/// A sample's labels, `(name, value)`.
type Labels = Vec<(String, String)>;

/// A scrape's samples: name, labels and value.
struct Scrape(Vec<(String, Labels, f64)>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (n, labels)
                }
            };
            out.push((name.to_owned(), labels, value));
        }
        Scrape(out)
    }

    /// The sum of the samples of `name` whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let matching: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.2)
            .collect();
        assert!(!matching.is_empty(), "no sample {name} {with:?}");
        matching.iter().sum()
    }

    fn int(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        self.sum(name, with) as u64
    }
}

fn scrape(at: &Endpoint) -> Scrape {
    let (status, head, body) = get(at, "GET", "/metrics");
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Scrape::parse(&body)
}

/// Runs `qblk bench ARGS --json` in `dir` in the background.
fn start_bench(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(qblk_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qblk bench")
}

fn bench_result(child: std::process::Child) -> Value {
    let out = child.wait_with_output().expect("qblk bench");
    assert!(out.status.success(), "qblk bench: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("qblk bench --json")
}

#[test]
fn a_scrape_and_query_blockstats_agree_with_the_clients_counts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let mut daemon = Daemon::qblk(
        d,
        "a.sock",
        &[
            "--queues",
            "2",
            "--control",
            "qmp.sock",
            "--metrics",
            "m.sock",
            "a.qcow2",
        ],
    );
    let at = Endpoint::Unix(&d.join("m.sock"));
    let mode = std::fs::metadata(d.join("m.sock"))
        .expect("metrics socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "metrics socket mode {mode:o}");
    let before = scrape(&at);
    assert_eq!(before.int("qblk_requests_total", &[]), 0);
    assert_eq!(
        before.int("qblk_image_virtual_size_bytes", &[]),
        64 << 20,
        "virtual size"
    );

    let bench = start_bench(
        d,
        &[
            "--socket",
            "a.sock",
            "--rw",
            "randrw",
            "--queues",
            "2",
            "--iodepth",
            "16",
            "--runtime",
            "3s",
        ],
    );
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    // A scrape while the run goes on: it succeeds and shows some of it;
    // then query-blockstats and another scrape, each counting at least
    // what the one before it did.
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let s = scrape(&at);
        if s.int("qblk_requests_total", &[]) > 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "no request counted in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stats_during = q.ok("query-blockstats", json!({}))[0]["stats"].clone();
    let during2 = scrape(&at);
    let result = bench_result(bench);
    let reads = result["reads"].as_u64().expect("reads");
    let writes = result["writes"].as_u64().expect("writes");
    let bs = result["bs"].as_u64().expect("bs");
    assert_eq!(reads + writes, result["ops"].as_u64().expect("ops"));
    assert!(reads > 0 && writes > 0, "{result}");

    // The client has disconnected: everything it sent is complete.
    let after = scrape(&at);
    let read = [("type", "read")];
    let write = [("type", "write")];
    assert_eq!(after.int("qblk_requests_total", &read), reads);
    assert_eq!(after.int("qblk_requests_total", &write), writes);
    assert_eq!(after.int("qblk_request_bytes_total", &read), reads * bs);
    assert_eq!(after.int("qblk_request_bytes_total", &write), writes * bs);
    assert_eq!(after.int("qblk_requests_failed_total", &[]), 0);
    assert_eq!(after.int("qblk_requests_invalid_total", &[]), 0);
    assert_eq!(after.int("qblk_requests_in_flight", &[]), 0);
    // Both queues served their share.
    for q in ["0", "1"] {
        assert!(
            after.int("qblk_requests_total", &[("queue", q)]) > 0,
            "queue {q} idle"
        );
    }
    for (kind, n) in [(&read, reads), (&write, writes)] {
        let inf = [kind[0], ("le", "+Inf")];
        assert_eq!(after.int("qblk_request_duration_seconds_bucket", &inf), n);
        assert_eq!(after.int("qblk_request_duration_seconds_count", kind), n);
        assert!(after.sum("qblk_request_duration_seconds_sum", kind) > 0.0);
        // Cumulative buckets never fall.
        let mut last = 0.0;
        for (name, labels, v) in &after.0 {
            if name == "qblk_request_duration_seconds_bucket"
                && labels.iter().any(|(k, v)| k == "type" && v == kind[0].1)
                && labels.iter().any(|(k, v)| k == "queue" && v == "0")
            {
                assert!(*v >= last, "buckets fall: {labels:?} {v} < {last}");
                last = *v;
            }
        }
    }
    // The mid-run figures lay between what was counted before them and
    // the totals: scrape <= query-blockstats <= scrape <= totals.
    for (kind, n, field) in [
        (&read, reads, "rd_operations"),
        (&write, writes, "wr_operations"),
    ] {
        let first = during.int("qblk_requests_total", kind);
        let mid = stats_during[field].as_u64().expect(field);
        let second = during2.int("qblk_requests_total", kind);
        assert!(
            first <= mid && mid <= second && second <= n,
            "{kind:?}: scrape {first}, query-blockstats {mid}, scrape {second} mid-run, {n} in all"
        );
    }
    assert!(
        stats_during["x-in-flight"].as_u64().expect("x-in-flight") <= 2 * 16,
        "more in flight than 2 queues of depth 16: {stats_during}"
    );
    assert!(during2.int("qblk_requests_total", &[]) < reads + writes);
    // The engine's counters: every write went through it, and the L2
    // lookups of reads and writes were counted.
    let engine_writes = after.int("qblk_engine_allocating_writes_total", &[])
        + after.int("qblk_engine_in_place_writes_total", &[]);
    assert!(engine_writes >= writes, "{engine_writes} < {writes}");
    assert!(after.int("qblk_engine_allocating_writes_total", &[]) > 0);
    assert!(after.int("qblk_l2_cache_hits_total", &[]) > 0);
    // (present, if zero: the one L2 table was made in memory)
    after.int("qblk_l2_cache_misses_total", &[]);
    let allocated = after.int("qblk_image_allocated_size_bytes", &[]);
    assert!(allocated > 0, "allocated size 0");

    // query-blockstats says the same.
    let stats = q.ok("query-blockstats", json!({}));
    let s = &stats[0]["stats"];
    assert_eq!(s["rd_operations"], reads, "{stats}");
    assert_eq!(s["wr_operations"], writes, "{stats}");
    assert_eq!(s["rd_bytes"], reads * bs, "{stats}");
    assert_eq!(s["wr_bytes"], writes * bs, "{stats}");
    assert_eq!(s["x-in-flight"], 0, "{stats}");

    // After an internal snapshot every cluster is shared: 4 KiB rewrites
    // of them copy the rest of their 64 KiB cluster, and the writes come
    // in batches, each followed by a flush.
    q.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s1"}),
    );
    let bench = start_bench(
        d,
        &[
            "--socket",
            "a.sock",
            "--rw",
            "randwrite",
            "--fsync-every",
            "4",
            "--runtime",
            "1s",
        ],
    );
    let result2 = bench_result(bench);
    let writes2 = result2["writes"].as_u64().expect("writes");
    assert!(writes2 > 0, "{result2}");
    // A discard and a write-zeroes of known sizes.
    let mut c = Client::connect(&daemon.socket, 1).expect("client");
    assert_eq!(c.discard(0, 1 << 20), 0);
    assert_eq!(c.write_zeroes(4 << 20, 256 << 10, false), 0);
    drop(c);
    let later = scrape(&at);
    for name in [
        "qblk_engine_metadata_writes_total",
        "qblk_engine_fsyncs_total",
        "qblk_engine_cow_bytes_total",
    ] {
        assert!(
            later.int(name, &[]) > after.int(name, &[]),
            "{name} did not move: {} then {}",
            after.int(name, &[]),
            later.int(name, &[])
        );
    }
    let cow = later.int("qblk_engine_cow_bytes_total", &[])
        - after.int("qblk_engine_cow_bytes_total", &[]);
    assert!(
        cow >= 60 << 10,
        "one shared cluster's rewrite copies 60 KiB; {cow} copied"
    );
    let flush = [("type", "flush")];
    let flushes = later.int("qblk_requests_total", &flush);
    assert!(flushes > 0, "no flush counted");
    assert!(
        later.int("qblk_engine_fsyncs_total", &[]) >= flushes,
        "fewer fdatasyncs than flushes"
    );
    assert_eq!(
        later.int("qblk_request_duration_seconds_count", &flush),
        flushes,
        "the flush latency histogram"
    );
    assert_eq!(
        later.int(
            "qblk_request_duration_seconds_bucket",
            &[("type", "flush"), ("le", "+Inf")]
        ),
        flushes
    );
    assert!(later.sum("qblk_request_duration_seconds_sum", &flush) > 0.0);
    assert_eq!(later.int("qblk_requests_total", &[("type", "discard")]), 1);
    assert_eq!(
        later.int("qblk_requests_total", &[("type", "write_zeroes")]),
        1
    );
    let stats = q.ok("query-blockstats", json!({}));
    let s = &stats[0]["stats"];
    assert_eq!(s["wr_operations"], writes + writes2, "{stats}");
    assert_eq!(s["flush_operations"], flushes, "{stats}");
    assert_eq!(s["unmap_operations"], 1, "{stats}");
    assert_eq!(s["unmap_bytes"], 1 << 20, "{stats}");
    assert_eq!(s["x-write-zeroes-operations"], 1, "{stats}");
    assert_eq!(s["x-write-zeroes-bytes"], 256 << 10, "{stats}");
    assert_eq!(s["failed_unmap_operations"], 0, "{stats}");

    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        !d.join("m.sock").exists(),
        "the metrics socket outlived the daemon"
    );
    qemu_check_clean("a.qcow2", d);
}

/// The address `qblk serve` logged for `--metrics 127.0.0.1:0`.
fn logged_address(daemon: &Daemon) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = daemon.log();
        if let Some(at) = log.find("metrics=") {
            let addr = log[at + "metrics=".len()..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            return addr.parse().unwrap_or_else(|_| panic!("address {addr:?}"));
        }
        assert!(Instant::now() < deadline, "no metrics address in {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_endpoint_answers_on_loopback_refuses_other_addresses_and_bad_clients_disturb_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");

    // Anything but loopback is refused, before the daemon listens.
    for addr in [
        "0.0.0.0:9100",
        "[::]:9100",
        "192.0.2.1:9100",
        "localhost:9100",
    ] {
        match Daemon::try_qblk(d, "a.sock", &["--metrics", addr, "a.qcow2"]) {
            Ok(_) => panic!("--metrics {addr} was accepted"),
            Err((status, log)) => {
                assert!(!status.success());
                assert!(
                    log.contains(&format!("--metrics {addr}")) && !log.contains("panicked"),
                    "{log}"
                );
                assert!(
                    addr.starts_with("localhost") || log.contains("not a loopback address"),
                    "{log}"
                );
            }
        }
    }

    // A port taken: a clear error, and no control socket left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").to_string();
    match Daemon::try_qblk(
        d,
        "a.sock",
        &["--metrics", &port, "--control", "qmp.sock", "a.qcow2"],
    ) {
        Ok(_) => panic!("--metrics {port} was accepted while taken"),
        Err((status, log)) => {
            assert!(!status.success());
            assert!(log.contains("cannot listen"), "{log}");
        }
    }
    assert!(!d.join("qmp.sock").exists(), "control socket left behind");
    drop(taken);

    let mut daemon = Daemon::qblk(d, "a.sock", &["--metrics", "127.0.0.1:0", "a.qcow2"]);
    let addr = logged_address(&daemon);
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let at = Endpoint::Tcp(addr);
    assert_eq!(scrape(&at).int("qblk_requests_total", &[]), 0);

    // A client doing I/O throughout.
    let mut c = Client::connect(&daemon.socket, 1).expect("vhost-user client");
    c.write_all(0, &[0x11; 65536]);

    // Other paths and methods.
    for (method, path, want) in [
        ("GET", "/", 404),
        ("GET", "/metricsx", 404),
        ("GET", "/../metrics", 404),
        ("POST", "/metrics", 405),
        ("HEAD", "/metrics", 200),
        ("GET", "/metrics?x=1", 200),
    ] {
        let (status, head, _) = get(&at, method, path);
        assert_eq!(status, want, "{method} {path}: {head}");
    }
    // Garbage, half requests, silent clients and clients that vanish.
    let idle = std::net::TcpStream::connect(addr).expect("connect");
    let mut half = std::net::TcpStream::connect(addr).expect("connect");
    half.write_all(b"GET /metr").expect("send");
    for (garbage, want) in [
        (&b"\x00\xff\xfe garbage\r\n\r\n"[..], "400"),
        (b"GET\r\n\r\n", "400"),
        (b"GET /metrics HTTP/9.9\r\n\r\n", "400"),
        // A request head without end is cut off at its bound.
        (&[b'A'; 100_000][..], "431"),
    ] {
        let r = exchange(&at, garbage);
        assert!(
            r.starts_with(&format!("HTTP/1.1 {want} ")),
            "{garbage:?}: {r}"
        );
    }
    {
        let mut gone = std::net::TcpStream::connect(addr).expect("connect");
        gone.write_all(b"GET /metrics HTTP/1.1\r\nHo")
            .expect("send");
    }
    // The data path and the endpoint go on.
    c.write_all(65536, &[0x22; 65536]);
    assert_eq!(c.read_vec(0, 65536), vec![0x11; 65536]);
    assert_eq!(c.read_vec(65536, 65536), vec![0x22; 65536]);
    let s = scrape(&at);
    assert_eq!(s.int("qblk_requests_total", &[("type", "write")]), 2);
    assert_eq!(s.int("qblk_requests_total", &[("type", "read")]), 2);
    drop(c);
    // A client that never finishes its request is dropped in time.
    half.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let began = Instant::now();
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"),
        "{rest:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "a stalled client kept for {:?}",
        began.elapsed()
    );
    drop(idle);
    // A stop with a client still connected is clean.
    let idle = std::net::TcpStream::connect(addr).expect("connect");
    assert!(daemon.stop().success(), "{}", daemon.log());
    drop(idle);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the metrics port is still open after the daemon stopped"
    );

    // A unix socket named `unix:PATH`, a stale one replaced.
    std::fs::write(d.join("m.sock"), b"stale").expect("stale file");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--metrics", "unix:m.sock", "a.qcow2"]);
    let at = Endpoint::Unix(&d.join("m.sock"));
    assert_eq!(
        scrape(&at).int("qblk_image_virtual_size_bytes", &[]),
        64 << 20
    );
    assert_eq!(get(&at, "GET", "/nope").0, 404);
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(!d.join("m.sock").exists());
    qemu_check_clean("a.qcow2", d);
}

/// The control clients a daemon serves at once (control.rs's
/// `MAX_CLIENTS`).
const MAX_CONTROL_CLIENTS: usize = 32;

#[test]
fn bad_control_clients_disturb_neither_other_clients_nor_the_data_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let ctl = d.join("qmp.sock");

    // A well-behaved client, connected throughout.
    let (mut good, _) = Qmp::connect(&ctl);
    good.ok("qmp_capabilities", json!({}));

    // I/O throughout: each write read back.
    let stop = Arc::new(AtomicBool::new(false));
    let io = {
        let stop = stop.clone();
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 1).expect("vhost-user client");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 32 {
                let offset = (n % 512) * 65536;
                let pattern = (n % 251) as u8 + 1;
                c.write_all(offset, &vec![pattern; 65536]);
                assert_eq!(
                    c.read_vec(offset, 65536),
                    vec![pattern; 65536],
                    "read back at {offset}"
                );
                n += 1;
            }
            n
        })
    };

    // Bad input from clients of their own, each answered with QMP's class.
    let class = |r: &Value| r["error"]["class"].as_str().unwrap_or("").to_owned();
    {
        let (mut q, _) = Qmp::connect(&ctl);
        // Before negotiation.
        assert_eq!(q.err("query-version", json!({})).0, "CommandNotFound");
        q.ok("qmp_capabilities", json!({}));
        assert_eq!(q.err("no-such-command", json!({})).0, "CommandNotFound");
        assert_eq!(q.err("qmp_capabilities", json!({})).0, "CommandNotFound");
        for (cmd, args) in [
            ("query-version", json!({"extra": 1})),
            (
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": 5, "persistent": true}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": "b", "persistent": "yes"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": "b", "persistent": true, "granularity": "big"}),
            ),
            (
                "block-dirty-bitmap-remove",
                json!({"node": ["disk"], "name": "b"}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "disk", "target": "b", "bitmaps": "b"}),
            ),
            ("query-named-block-nodes", json!({"flat": "yes"})),
            ("query-blockstats", json!({"query-nodes": 1})),
        ] {
            assert_eq!(q.err(cmd, args.clone()).0, "GenericError", "{cmd} {args}");
        }
        for raw in [
            &br#"{"execute": 5}"#[..],
            br#"{"execute": "query-version", "arguments": [1]}"#,
            br#"{"arguments": {}}"#,
            br#"{"execute": "query-version", "bogus": 1}"#,
            br#""a string""#,
            b"[1, 2]",
            // (a bare word needs a delimiter after it, as in QEMU)
            b"null\r\n",
        ] {
            let r = q.raw(raw);
            assert_eq!(
                class(&r),
                "GenericError",
                "{}: {r}",
                String::from_utf8_lossy(raw)
            );
        }
        // The client is still served.
        q.ok("query-version", json!({}));
    }
    // Unparsable input: answered, then hung up.
    for raw in [
        &b"}{"[..],
        b"\xff\xfe\x00garbage",
        &"[".repeat(10_000).into_bytes()[..],
    ] {
        let (mut q, _) = Qmp::connect(&ctl);
        q.ok("qmp_capabilities", json!({}));
        let r = q.raw(raw);
        assert_eq!(class(&r), "GenericError", "{r}");
        assert!(q.hung_up(), "not hung up after unparsable input");
    }
    // Clients that vanish: before the greeting is read, mid-command before
    // and after negotiation.
    for sent in [
        &b""[..],
        br#"{"execute": "qmp_capab"#,
        br#"{"execute": "qmp_capabilities"}{"execute": "query-block"#,
    ] {
        let mut s = UnixStream::connect(&ctl).expect("connect");
        s.write_all(sent).expect("send");
        drop(s);
    }
    // A hundred clients at once: those beyond the cap (`MAX_CLIENTS` in
    // control.rs; `good` holds one place) get an error instead of the
    // greeting and are hung up, the others are served.
    std::thread::sleep(Duration::from_millis(200));
    let clients = 100;
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let ctl = ctl.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let (mut q, greeting) = Qmp::connect(&ctl);
                // Everyone is connected (served or refused) before anyone
                // goes on.
                barrier.wait();
                if greeting["QMP"].is_object() {
                    q.ok("qmp_capabilities", json!({}));
                    let v = q.ok("query-version", json!({}));
                    assert!(
                        v["package"].as_str().is_some_and(|p| p.starts_with("qblk")),
                        "{v}"
                    );
                    true
                } else {
                    assert_eq!(greeting["error"]["class"], "GenericError", "{greeting}");
                    assert!(
                        greeting["error"]["desc"]
                            .as_str()
                            .is_some_and(|d| d.contains("too many control clients")),
                        "{greeting}"
                    );
                    assert!(q.hung_up(), "a refused client is not hung up");
                    false
                }
            })
        })
        .collect();
    let served = threads
        .into_iter()
        .map(|t| t.join().expect("a control client failed"))
        .filter(|&served| served)
        .count();
    assert_eq!(
        served,
        MAX_CONTROL_CLIENTS - 1,
        "clients served of {clients} at once (the cap is {MAX_CONTROL_CLIENTS}, one held by another client)"
    );

    // The first client and the data path were never disturbed.
    good.ok("query-version", json!({}));
    stop.store(true, Ordering::Relaxed);
    let rounds = io.join().expect("the I/O client failed");
    assert!(rounds >= 32, "{rounds}");
    let stats = good.ok("query-blockstats", json!({}));
    let s = &stats[0]["stats"];
    assert_eq!(s["wr_operations"], rounds, "{stats}");
    assert_eq!(s["rd_operations"], rounds, "{stats}");
    assert_eq!(s["failed_wr_operations"], 0, "{stats}");
    assert_eq!(s["failed_rd_operations"], 0, "{stats}");
    // And a new client is served afterwards.
    let (mut after, _) = Qmp::connect(&ctl);
    after.ok("qmp_capabilities", json!({}));
    after.ok("query-version", json!({}));
    assert!(daemon.alive(), "{}", daemon.log());
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
}

/// A control client that hangs up while its long command runs (an
/// internal snapshot of an image with many allocated clusters) disturbs
/// nothing: the command completes, the other client is served meanwhile
/// and after, the daemon stops cleanly and the image is consistent.
#[test]
fn a_control_client_that_hangs_up_during_a_long_snapshot_disturbs_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    // Every cluster allocated: a snapshot raises 256 Ki refcounts.
    create_qcow2_opts(d, "preallocation=metadata", "a.qcow2", "16G");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let ctl = d.join("qmp.sock");
    let (mut good, _) = Qmp::connect(&ctl);
    good.ok("qmp_capabilities", json!({}));
    // How long one such snapshot takes.
    let began = Instant::now();
    good.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s0"}),
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(50),
        "the snapshot took {took:?}: too short to hang up during it"
    );

    // A client asks for another and hangs up at once.
    let mut s = UnixStream::connect(&ctl).expect("connect");
    s.write_all(
        br#"{"execute": "qmp_capabilities"}{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "disk", "name": "s1"}}"#,
    )
    .expect("send");
    std::thread::sleep(took / 4);
    drop(s);
    // The other client is served meanwhile, and the command completes.
    good.ok("query-version", json!({}));
    std::thread::sleep(took * 2);
    good.ok("query-status", json!({}));
    let mut v = Client::connect(&daemon.socket, 1).expect("vhost-user client");
    v.write_all(0, &[0x5a; 4096]);
    assert_eq!(v.read_vec(0, 4096), vec![0x5a; 4096]);
    drop(v);
    let (mut after, _) = Qmp::connect(&ctl);
    after.ok("qmp_capabilities", json!({}));
    // s1 exists: deleting it succeeds.
    after.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "disk", "name": "s1"}),
    );
    drop(after);
    drop(good);
    assert!(daemon.alive(), "{}", daemon.log());
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("a.qcow2", d);
    let list = sh(d, &["qemu-img", "snapshot", "-l", "a.qcow2"]);
    assert!(list.contains("s0") && !list.contains("s1"), "{list}");
}
