//! The QMP control socket of `qblk serve --control`: QEMU's protocol
//! (greeting, capabilities negotiation, replies with the request's id),
//! the bitmap commands while a client writes through the vhost-user
//! socket, several clients at once, bad input answered without disturbing
//! the daemon, and `quit`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::*;
use serde_json::{Value, json};

fn bitmaps(q: &mut Qmp) -> Vec<Value> {
    let nodes = q.ok("query-named-block-nodes", json!({}));
    nodes[0]["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn count(q: &mut Qmp, name: &str) -> u64 {
    bitmaps(q)
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["count"].as_u64())
        .unwrap_or_else(|| panic!("no bitmap {name}"))
}

#[test]
fn qmp_bitmaps_and_queries_while_a_client_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "a.sock", &["--control", "qmp.sock", "a.qcow2"]);
    let ctl = d.join("qmp.sock");
    let mode = std::fs::metadata(&ctl)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let (mut q, greeting) = Qmp::connect(&ctl);
    assert!(greeting["QMP"]["version"]["qemu"].is_object(), "{greeting}");
    let (class, _) = q.err("query-version", json!({}));
    assert_eq!(class, "CommandNotFound");
    q.ok("qmp_capabilities", json!({}));
    let (class, _) = q.err("qmp_capabilities", json!({}));
    assert_eq!(class, "CommandNotFound");
    let v = q.ok("query-version", json!({}));
    assert!(
        v["package"].as_str().is_some_and(|p| p.starts_with("qblk")),
        "{v}"
    );
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["type"], "vhost-user-blk");
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["image"]["virtual-size"], 64 << 20);
    // What the image file holds on the host (a fresh image: its metadata).
    let actual = nodes[0]["image"]["actual-size"].as_u64().unwrap_or(0);
    assert!(actual > 0 && actual < 1 << 20, "{nodes}");

    // Bitmaps, with writes going on through the vhost-user socket.
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0", "persistent": true}),
    );
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true, "granularity": 4096, "disabled": true}),
    );
    assert_eq!(count(&mut q, "b0"), 0);
    let mut c = Client::connect(&daemon.socket, 1).expect("vhost-user client");
    c.buf()[..8192].fill(0x5a);
    assert_eq!(c.write(1 << 20, 0, 8192), 0);
    assert_eq!(c.write(9 << 20, 0, 4096), 0);
    assert_eq!(count(&mut q, "b0"), 2 * 65536);
    assert_eq!(count(&mut q, "b1"), 0, "a disabled bitmap recorded");
    q.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "disk", "target": "b1", "bitmaps": ["b0"]}),
    );
    assert_eq!(count(&mut q, "b1"), 2 * 65536);
    q.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "disk", "name": "b1"}),
    );
    q.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "disk", "name": "b1"}),
    );
    assert_eq!(c.write(20 << 20, 0, 4096), 0);
    assert_eq!(count(&mut q, "b1"), 4096);
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk", "name": "b0"}),
    );
    assert_eq!(c.write(30 << 20, 0, 4096), 0);
    assert_eq!(count(&mut q, "b0"), 3 * 65536);

    // Refusals, each answered; the daemon goes on.
    for (cmd, args) in [
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b0", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "t"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nope", "name": "x", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "disk", "name": "nope"}),
        ),
        ("block-dirty-bitmap-clear", json!({"node": "disk"})),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": 5}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "b0", "extra": 1}),
        ),
        ("no-such-command", json!({})),
    ] {
        q.err(cmd, args);
    }
    let r = q.raw(b"[1, 2]");
    assert!(r["error"].is_object(), "{r}");
    // A second client meanwhile; the first one sends garbage and is dropped.
    let (mut q2, _) = Qmp::connect(&ctl);
    q2.ok("qmp_capabilities", json!({}));
    let r = q.raw(b"}{");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(q.hung_up(), "not hung up");
    drop(q);
    // b1 (enabled again) has the writes at 20M and 30M.
    assert_eq!(count(&mut q2, "b1"), 2 * 4096);
    assert_eq!(c.read_vec(1 << 20, 8192), vec![0x5a; 8192]);

    // Statistics: what the client did, in QEMU's names, per queue too.
    assert_eq!(c.flush(), 0);
    let stats = q2.ok("query-blockstats", json!({}));
    let s = &stats[0]["stats"];
    assert_eq!(s["wr_operations"], 4, "{stats}");
    assert_eq!(s["wr_bytes"], 8192 + 3 * 4096, "{stats}");
    assert_eq!(s["rd_operations"], 1, "{stats}");
    assert_eq!(s["rd_bytes"], 8192, "{stats}");
    assert_eq!(s["flush_operations"], 1, "{stats}");
    assert_eq!(s["failed_wr_operations"], 0, "{stats}");
    assert_eq!(s["x-in-flight"], 0, "{stats}");
    assert!(
        s["wr_total_time_ns"].as_u64().is_some_and(|t| t > 0),
        "{stats}"
    );
    assert_eq!(
        stats[0]["x-queues"][0]["stats"]["wr_operations"], 4,
        "{stats}"
    );
    // A write past the end is refused and counted.
    assert_ne!(c.write(64 << 20, 0, 4096), 0);
    let stats = q2.ok("query-blockstats", json!({}));
    let refused = stats[0]["stats"]["failed_wr_operations"]
        .as_u64()
        .unwrap_or(0)
        + stats[0]["stats"]["x-invalid-operations"]
            .as_u64()
            .unwrap_or(0);
    assert_eq!(refused, 1, "{stats}");

    q2.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "b1"}),
    );
    assert_eq!(bitmaps(&mut q2).len(), 1);

    // qblk ctl, the operator's client.
    let out = ok(
        qblk(
            &[
                "ctl",
                "qmp.sock",
                "block-dirty-bitmap-add",
                "node=disk",
                "name=c",
                "persistent=true",
            ],
            d,
        ),
        "qblk ctl block-dirty-bitmap-add",
    );
    assert_eq!(out, "");
    let out = ok(
        qblk(&["ctl", "qmp.sock", "query-named-block-nodes"], d),
        "qblk ctl query-named-block-nodes",
    );
    let v: Value = serde_json::from_str(&out).expect("ctl prints JSON");
    assert_eq!(v[0]["dirty-bitmaps"][1]["name"], "c", "{out}");
    let refused = qblk(
        &[
            "ctl",
            "qmp.sock",
            "block-dirty-bitmap-remove",
            r#"{"node": "disk", "name": "nope"}"#,
        ],
        d,
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("GenericError: Dirty bitmap 'nope' not found"),
        "{}",
        stderr(&refused)
    );
    ok(
        qblk(
            &[
                "ctl",
                "qmp.sock",
                "block-dirty-bitmap-remove",
                "node=disk",
                "name=c",
            ],
            d,
        ),
        "qblk ctl block-dirty-bitmap-remove",
    );
    drop(c);
    // quit stops the daemon cleanly; the bitmap is stored, not in use.
    q2.ok("quit", json!({}));
    let status = daemon.wait();
    assert!(status.success(), "{}", daemon.log());
    let info = qemu_info("a.qcow2", d);
    let list = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(list[0]["name"], "b0", "{info}");
    assert_eq!(list[0]["flags"], json!([]), "{info}");
    qemu_check_clean("a.qcow2", d);
    assert!(!ctl.exists(), "the control socket outlived the daemon");
}

#[test]
fn a_service_manager_hears_ready_once_the_sockets_take_connections_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let notify = UnixDatagram::bind(d.join("notify")).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    /// Kills the daemon if the test fails before it stops.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(qblk_bin())
        .args([
            "serve",
            "--socket",
            "a.sock",
            "--control",
            "qmp.sock",
            "a.qcow2",
        ])
        .current_dir(d)
        .env("NOTIFY_SOCKET", d.join("notify"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Reap)
        .expect("start qblk serve");
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    // Ready means ready: both sockets take connections now.
    std::os::unix::net::UnixStream::connect(d.join("a.sock")).expect("vhost-user socket ready");
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    // STATUS= lines (the connection above came and went) may come first.
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1 from the daemon");
        if buf[..n].starts_with(b"STATUS=") {
            continue;
        }
        assert_eq!(&buf[..n], b"STOPPING=1");
        break;
    }
    assert!(child.0.wait().expect("wait").success());
}

#[test]
fn a_request_that_finds_the_image_inconsistent_raises_block_image_corrupted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "c.qcow2", "4M");
    sh(d, &["qemu-io", "-c", "write -P 9 0 256k", "c.qcow2"]);
    // A reserved bit in the L2 entry of guest cluster 1: found by the
    // first request that looks at it, not by the open.
    let mut bytes = std::fs::read(d.join("c.qcow2")).expect("read");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8")) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().expect("8")) & 0x00ff_ffff_ffff_fe00)
        as usize;
    bytes[l2 + 8 + 7] |= 0x02;
    std::fs::write(d.join("c.qcow2"), bytes).expect("write");
    let mut daemon = Daemon::qblk(d, "c.sock", &["--control", "qmp.sock", "c.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    let mut c = Client::connect(&daemon.socket, 1).expect("vhost-user client");
    c.buf()[..4096].fill(0x5a);
    assert_ne!(
        c.write(65536, 0, 4096),
        0,
        "a write through a corrupt entry"
    );
    let e = q
        .event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no BLOCK_IMAGE_CORRUPTED\n{}", daemon.log()));
    assert_eq!(e["data"]["node-name"], "disk", "{e}");
    assert_eq!(e["data"]["fatal"], true, "{e}");
    assert!(
        e["data"]["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{e}"
    );
    assert!(
        e["timestamp"]["seconds"].as_u64().is_some_and(|s| s > 0),
        "{e}"
    );
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR\n{}", daemon.log()));
    assert_eq!(e["data"]["operation"], "write", "{e}");
    assert_eq!(e["data"]["action"], "report", "{e}");
    assert_eq!(e["data"]["nospace"], false, "{e}");
    // The intact cluster still reads.
    assert_eq!(c.read_vec(0, 4096), vec![9; 4096]);
    drop(c);
    drop(q);
    daemon.stop();
    let info = sh(d, &["qemu-img", "info", "--output=json", "c.qcow2"]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// QEMU's own QMP clients work unchanged: the `qemu.qmp` Python library
/// (installed by `cargo xtask test` into target/qmp-venv) and its
/// `qmp-shell`.
#[test]
fn qemus_python_qmp_library_and_qmp_shell_drive_the_daemon() {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/qmp-venv/bin");
    assert!(
        venv.join("python").exists(),
        "{}: no qemu.qmp environment (cargo xtask test makes it)",
        venv.display()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "p.qcow2", "64M");
    let mut daemon = Daemon::qblk(d, "p.sock", &["--control", "qmp.sock", "p.qcow2"]);
    std::fs::write(
        d.join("t.py"),
        r#"
import asyncio, json
from qemu.qmp import QMPClient, ExecuteError
async def main():
    qmp = QMPClient('qblk-test')
    await qmp.connect('qmp.sock')
    v = await qmp.execute('query-version')
    assert v['package'].startswith('qblk'), v
    await qmp.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 'b', 'persistent': True})
    nodes = await qmp.execute('query-named-block-nodes')
    assert nodes[0]['dirty-bitmaps'][0]['name'] == 'b', nodes
    await qmp.execute('block_resize', {'node-name': 'disk', 'size': 128 << 20})
    try:
        await qmp.execute('no-such-command')
        raise SystemExit('no error for an unknown command')
    except ExecuteError as e:
        assert e.error_class == 'CommandNotFound', e
    await qmp.disconnect()
    print('QMP-LIBRARY-OK')
asyncio.run(main())
"#,
    )
    .expect("script");
    let out = std::process::Command::new(venv.join("python"))
        .arg("t.py")
        .current_dir(d)
        .output()
        .expect("run python");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("QMP-LIBRARY-OK"),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let mut shell = std::process::Command::new(venv.join("qmp-shell"))
        .arg("qmp.sock")
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qmp-shell");
    {
        use std::io::Write;
        let mut stdin = shell.stdin.take().expect("stdin");
        stdin
            .write_all(b"query-block-exports\nblock-dirty-bitmap-clear node=disk name=b\n")
            .expect("write to qmp-shell");
    }
    let out = shell.wait_with_output().expect("qmp-shell output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vhost-user-blk"), "{text}");
    assert!(text.contains("{\"return\": {}}"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    daemon.stop();
}
