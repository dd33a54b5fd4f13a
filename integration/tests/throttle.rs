//! I/O throttling (`qblk serve --throttle`, QMP `block_set_io_throttle`):
//! `qblk bench` against a throttled daemon measures each limit — reads,
//! writes, bytes — within 5 % of what QEMU's leaky buckets let through,
//! bursts included, and limits change while the disk is served.

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::Daemon;
use qblk_integration::*;
use serde_json::{Value, json};

/// `qblk bench` for `secs` seconds: (requests completed, seconds, bytes
/// a request).
fn bench(d: &std::path::Path, daemon: &Daemon, rw: &str, bs: &str, secs: u32) -> (f64, f64, f64) {
    let socket = daemon.socket.display().to_string();
    let runtime = format!("{secs}s");
    let out = ok(
        qblk(
            &[
                "bench",
                "--socket",
                &socket,
                "--rw",
                rw,
                "--bs",
                bs,
                "--runtime",
                &runtime,
                "--span",
                "32M",
                "--json",
            ],
            d,
        ),
        "qblk bench",
    );
    let v: Value = serde_json::from_str(&out).expect("bench JSON");
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    (f("ops"), f("seconds"), f("bs"))
}

/// What QEMU's bucket for `avg` a second lets through in `secs`: its
/// size (`avg / 10`) at once, one more (a request passes while the bucket
/// is not over full), then `avg` a second — in units of `unit`.
fn expected(avg: f64, unit: f64, secs: f64) -> f64 {
    (avg / 10.0 + unit + avg * secs) / unit
}

fn within_5_percent(what: &str, got: f64, want: f64) {
    println!("{what}: {got:.0} (the limit allows {want:.0})");
    assert!(
        (got - want).abs() <= want * 0.05,
        "{what}: {got:.0} where the limit allows {want:.0}"
    );
}

#[test]
fn limits_hold_within_5_percent_and_change_live() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "t.qcow2", "64M");
    sh(d, &["qemu-io", "-c", "write -P 1 0 32M", "t.qcow2"]);
    // Not a limit QEMU knows, or two it would refuse together: refused.
    for (bad, says) in [
        ("iops=5", "unknown limit"),
        (
            "bps-total=1M,bps-read=1M",
            "cannot be used at the same time",
        ),
        ("iops-read=100,iops-read-max=50", "cannot be lower"),
    ] {
        let out = qblk(
            &["serve", "--socket", "x.sock", "--throttle", bad, "t.qcow2"],
            d,
        );
        assert!(!out.status.success(), "{bad} accepted");
        assert!(stderr(&out).contains(says), "{bad}: {}", stderr(&out));
    }

    let mut daemon = Daemon::qblk(
        d,
        "t.sock",
        &[
            "--throttle",
            "iops-read=1000",
            "--control",
            "t.qmp",
            "t.qcow2",
        ],
    );
    // Reads are held to the limit; writes are not limited.
    let (ops, secs, _) = bench(d, &daemon, "randread", "4k", 3);
    within_5_percent(
        "reads/s at iops-read=1000",
        ops / secs,
        expected(1000.0, 1.0, secs) / secs,
    );
    let (ops, secs, _) = bench(d, &daemon, "randwrite", "4k", 2);
    assert!(
        ops / secs > 1500.0,
        "writes were throttled too: {:.0}/s",
        ops / secs
    );

    let (mut q, _) = Qmp::connect(&d.join("t.qmp"));
    q.ok("qmp_capabilities", json!({}));
    let node = q.ok("query-named-block-nodes", json!({}));
    assert_eq!(node[0]["iops_rd"], 1000);
    let none = json!({"id": "disk", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0});
    let with = |extra: Value| {
        let mut a = none.clone();
        a.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        a
    };
    // QEMU's refusals, and nothing changes.
    for (args, says) in [
        (
            with(json!({"iops": 10, "iops_rd": 10})),
            "cannot be used at the same time",
        ),
        (with(json!({"iops_max": 10})), "require corresponding"),
        (with(json!({"group": "g"})), "group"),
        (with(json!({"bogus": 1})), "bogus"),
        (with(json!({"id": "nope"})), "nope"),
        (json!({"id": "disk", "bps": 0}), "missing"),
    ] {
        let (_, desc) = q.err("block_set_io_throttle", args);
        assert!(desc.contains(says), "{desc}");
    }
    assert_eq!(
        q.ok("query-named-block-nodes", json!({}))[0]["iops_rd"],
        1000
    );

    // Writes now, live.
    q.ok("block_set_io_throttle", with(json!({"iops_wr": 800})));
    let (ops, secs, _) = bench(d, &daemon, "randwrite", "4k", 3);
    within_5_percent(
        "writes/s at iops_wr=800",
        ops / secs,
        expected(800.0, 1.0, secs) / secs,
    );
    let (ops, secs, _) = bench(d, &daemon, "randread", "4k", 1);
    assert!(
        ops / secs > 1500.0,
        "reads still throttled: {:.0}/s",
        ops / secs
    );

    // Bytes: 8 MiB/s of 64 KiB reads.
    let bps = 8.0 * 1048576.0;
    q.ok("block_set_io_throttle", with(json!({"bps": 8 << 20})));
    let (ops, secs, bs) = bench(d, &daemon, "randread", "64k", 3);
    within_5_percent(
        "bytes/s at bps=8M",
        ops * bs / secs,
        expected(bps, bs, secs) * bs / secs,
    );

    // A burst of 2000/s for 2 s above 500/s: 2000/s (and the burst
    // bucket's 200) for the first second; over six, the 4000 of the burst
    // and 500/s. Each setting starts with empty buckets, as in QEMU.
    let burst = with(json!({"iops": 500, "iops_max": 2000, "iops_max_length": 2}));
    q.ok("block_set_io_throttle", burst.clone());
    let (ops, secs, _) = bench(d, &daemon, "randread", "4k", 1);
    within_5_percent("burst reads/s", ops / secs, (201.0 + 2000.0 * secs) / secs);
    q.ok("block_set_io_throttle", burst);
    let (ops, secs, _) = bench(d, &daemon, "randread", "4k", 6);
    within_5_percent(
        "reads/s over a burst and after",
        ops / secs,
        (4001.0 + 500.0 * secs) / secs,
    );

    // Unset: no waiting.
    q.ok("block_set_io_throttle", none.clone());
    let (ops, secs, _) = bench(d, &daemon, "randread", "4k", 1);
    assert!(
        ops / secs > 2500.0,
        "unthrottled reads: {:.0}/s",
        ops / secs
    );
    drop(q);
    assert!(daemon.stop().success(), "{}", daemon.log());
}
