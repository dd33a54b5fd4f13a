//! End-to-end: Linux guests under QEMU TCG on `qblk serve` disks.
//!
//! These boot VMs, so they are `#[ignore]`d in the plain test run and run
//! one at a time by `cargo xtask e2e` (part of `cargo xtask test`), which
//! first installs qemu-system-x86, the kernel, busybox and fio.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use qblk_integration::guest::{
    Console, Disk, Vm, migrate, migration_reaches, qemu_md5, run_state, start_migration,
    wait_for_path, wait_state,
};
use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::{Daemon, log_counter};
use qblk_integration::{SmallFs, create_overlay, create_qcow2, qemu_check_clean, sh};
use serde_json::json;

fn disk(daemon: &Daemon, queues: u16) -> Disk {
    Disk {
        socket: daemon.socket.clone(),
        queues,
        reconnect: false,
    }
}

/// Stops the daemon (exit 0 expected), then checks the image with
/// qemu-img and compares QEMU's reading of it with the guest's md5.
/// Returns the daemon's log.
fn stop_and_compare(
    dir: &Path,
    mut daemon: Daemon,
    image: &str,
    guest_md5: Option<&String>,
) -> String {
    let status = daemon.stop();
    assert!(
        status.success(),
        "qblk serve exited {status}:\n{}",
        daemon.log()
    );
    check_and_compare(dir, image, guest_md5);
    daemon.log()
}

/// [`stop_and_compare`] once the daemon has stopped.
fn check_and_compare(dir: &Path, image: &str, guest_md5: Option<&String>) {
    qemu_check_clean(image, dir);
    let guest = guest_md5.unwrap_or_else(|| panic!("the guest printed no md5 for {image}"));
    assert_eq!(
        &qemu_md5(dir, image),
        guest,
        "{image}: QEMU reads something else than the guest saw"
    );
}

/// The guest's write phase (of [`MIG_SCRIPT`] or the kill scenario) still
/// runs: what the test did meanwhile (`what`) happened while it wrote.
fn assert_still_writing(vm: &Vm, what: &str) {
    assert!(
        !vm.console().contains("WRITES-DONE"),
        "the write phase ended before {what}: make it longer\n{}",
        vm.console()
    );
}

/// The guest passed and fio verified every write; `logs` (the daemons')
/// go into the message otherwise.
fn assert_fio_verified(console: &Console, logs: &str) {
    assert!(
        console.passed() && console.0.contains("fio verify passed"),
        "guest failed:\n{}\n{logs}",
        console.0
    );
}

/// Lets a migration use 1 GiB/s (QEMU's default limit would make it
/// outlast the write phase).
fn fast_migration(q: &mut Qmp) {
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30}),
    );
}

/// Random 4 KiB writes over 64 MiB, pass after pass, each pass with a
/// seed and a verify pattern of its own (fio writes every block once per
/// pass), until the host grows the disk (its signal, sent right after the
/// commit switched to the base): the last pass runs across that switch, so
/// a write the commit did not copy again leaves a block of an earlier pass
/// and fails the final check. The guest's kernel log must show no block
/// error.
const CHAIN_SCRIPT: &str = r#"
dev=/dev/vda
job="--name=ch --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=16 --size=64M --verify=pattern --output-format=terse"
pattern() { printf '0x5eed%04x' "$1"; }
fio $job --randseed=1 --verify_pattern=$(pattern 1) --do_verify=0 >/tmp/fio-w
size0=$(cat /sys/block/vda/size)
echo CHAIN-READY
seed=1
while [ "$(cat /sys/block/vda/size)" = "$size0" ]; do
    seed=$((seed + 1))
    echo "PASS $seed"
    fio $job --randseed=$seed --verify_pattern=$(pattern $seed) --do_verify=0 >/tmp/fio-w
done
echo "WRITES-DONE after $seed passes"
fio $job --randseed=$seed --verify_pattern=$(pattern $seed) --verify_only --verify_fatal=1 >/tmp/fio-v
echo "fio verify passed"
if dmesg | grep -i -E "i/o error|blk_update_request|critical|blocked for more than|virtio.*(error|broken)"; then
    echo "the guest kernel logged block errors"
    exit 1
fi
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

/// Waits for a job event of `name` from `job` on the control socket.
fn job_event(q: &mut Qmp, name: &str, job: &str, daemon: &Daemon) {
    let e = q
        .event(name, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("no {name} for {job}:\n{}", daemon.log()));
    assert_eq!(e["data"]["device"], job, "{e}");
    assert!(e["data"].get("error").is_none(), "{e}\n{}", daemon.log());
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn external_snapshots_a_stream_and_a_commit_while_the_guest_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // golden <- base: 8 MiB the guest never writes come from golden and
    // must survive the stream that ends the test.
    create_qcow2(d, "golden.qcow2", "128M");
    sh(
        d,
        &["qemu-io", "-c", "write -P 0x5a 100M 8M", "golden.qcow2"],
    );
    create_overlay(d, "golden.qcow2", "base.qcow2");
    let daemon = Daemon::qblk(d, "ch.sock", &["--control", "ch.qmp", "base.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("ch.qmp"));
    q.ok("qmp_capabilities", json!({}));
    let mut vm = Vm::start(d, "chain", CHAIN_SCRIPT, &[disk(&daemon, 1)], false);
    assert!(vm.wait_for("CHAIN-READY"), "{}", vm.console());
    std::thread::sleep(Duration::from_secs(2));
    for overlay in ["o1.qcow2", "o2.qcow2"] {
        q.ok(
            "blockdev-snapshot-sync",
            json!({"device": "disk", "snapshot-file": d.join(overlay)}),
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    // o2 <- o1 <- base <- golden: o1 streamed into o2.
    q.ok(
        "block-stream",
        json!({"job-id": "st", "device": "disk", "base-node": "disk-backing2"}),
    );
    job_event(&mut q, "BLOCK_JOB_COMPLETED", "st", &daemon);
    // o2 <- base <- golden: o2 committed into base, which becomes active.
    q.ok(
        "block-commit",
        json!({"job-id": "cm", "device": "disk", "base-node": "disk-backing1"}),
    );
    job_event(&mut q, "BLOCK_JOB_READY", "cm", &daemon);
    // Switch in the middle of a pass that began after the commit was
    // ready: its first writes reach the base only as copies of what the
    // guest wrote to the overlay.
    let last = vm
        .console()
        .lines()
        .filter_map(|l| l.strip_prefix("PASS ")?.trim().parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        vm.wait_for(&format!("PASS {}", last + 1)),
        "{}",
        vm.console()
    );
    let writes =
        |q: &mut Qmp| q.ok("query-blockstats", json!({}))[0]["stats"]["wr_operations"].as_u64();
    let before = writes(&mut q);
    std::thread::sleep(Duration::from_millis(1500));
    let during = writes(&mut q);
    assert!(
        during > before,
        "the guest wrote nothing while the commit was ready"
    );
    q.ok("job-complete", json!({"id": "cm"}));
    job_event(&mut q, "BLOCK_JOB_COMPLETED", "cm", &daemon);
    assert_still_writing(&vm, "the snapshots, stream and commit");
    // The guest's signal to end its writes after the pass under way.
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 129 << 20}),
    );
    // base <- golden: golden streamed into base.
    q.ok("block-stream", json!({"job-id": "st2", "device": "disk"}));
    job_event(&mut q, "BLOCK_JOB_COMPLETED", "st2", &daemon);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert!(
        nodes[0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("base.qcow2")),
        "{nodes}"
    );
    drop(q);
    let console = vm.finish();
    assert_fio_verified(&console, &format!("daemon:\n{}", daemon.log()));
    std::fs::rename(d.join("golden.qcow2"), d.join("gone.qcow2")).expect("rename");
    stop_and_compare(d, daemon, "base.qcow2", console.md5s().get("vda"));
    for image in ["o1.qcow2", "o2.qcow2", "gone.qcow2"] {
        qemu_check_clean(image, d);
    }
}

const FIO_SCRIPT: &str = r#"
dev=/dev/vda
[ "$(cat /sys/block/vda/queue/write_cache)" = "write back" ]
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ]
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ]
[ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" -gt 0 ]
[ "$(cat /sys/block/vda/serial)" = "e2e-fio" ]
[ "$(cat /sys/block/vda/size)" = $((128 * 2048)) ]
fio --name=rand --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 \
    --output-format=terse >/tmp/fio1
fio --name=seq --filename=$dev --ioengine=libaio --direct=1 --rw=write \
    --bs=256k --iodepth=4 --offset=32M --size=32M --verify=md5 --verify_fatal=1 \
    --output-format=terse >/tmp/fio2
echo fio verify passed
# Discard a written range: it reads back as zeros.
blkdiscard -o $((32 << 20)) -l $((8 << 20)) $dev
zero=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
got=$(dd if=$dev bs=1M skip=32 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$zero" = "$got" ]
echo discard passed
sync
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn fio_verify_discard_and_two_queues() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "disk.qcow2", "128M");
    // Both queues served by one worker thread (and so one io_uring).
    let daemon = Daemon::qblk(
        d,
        "fio.sock",
        &[
            "--queues",
            "2",
            "--threads",
            "1",
            "--serial",
            "e2e-fio",
            "disk.qcow2",
        ],
    );
    let vm = Vm::start(d, "fio", FIO_SCRIPT, &[disk(&daemon, 2)], false);
    let console = vm.finish();
    assert!(
        console.passed(),
        "guest failed:\n{}\n{}",
        console.0,
        daemon.log()
    );
    stop_and_compare(d, daemon, "disk.qcow2", console.md5s().get("vda"));
}

/// Phase 1 (first boot): make a filesystem, fill it, trim, reboot.
/// Phase 2 (after the reboot): check it, add to it, power off.
/// Phase 3 (a second VM on the same daemon): check it again.
const FS_SCRIPT: &str = r#"
dev=/dev/vda
if ! mount -t ext2 $dev /mnt 2>/dev/null; then
    echo "phase 1: new filesystem"
    mke2fs -q -b 4096 $dev
    mount -t ext2 $dev /mnt
    dd if=/dev/urandom of=/mnt/big bs=1M count=12 2>/dev/null
    dd if=/dev/urandom of=/mnt/gone bs=1M count=8 2>/dev/null
    for i in $(seq 50); do echo "file $i" > /mnt/small$i; done
    (cd /mnt && md5sum big small* > sums)
    sync
    rm /mnt/gone
    fstrim -v /mnt
    echo 1 > /mnt/phase
    umount /mnt
    echo "phase 1 done, rebooting"
    reboot -f
fi
cd /mnt
md5sum -c sums >/dev/null
phase=$(cat phase)
if [ "$phase" = 1 ]; then
    echo "phase 2: after reboot"
    dd if=/dev/urandom of=more bs=1M count=4 2>/dev/null
    md5sum more >> sums
    echo 2 > phase
else
    echo "phase 3: second VM"
    [ "$phase" = 2 ]
    md5sum -c sums >/dev/null
fi
cd /
umount /mnt
echo "phase $phase checked"
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn filesystem_survives_reboot_and_a_second_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "fs.qcow2", "64M");
    // With guest memory pinned: registered when the first VM's memory
    // table arrives, kept across the reboot, let go when the VM goes and
    // registered again for the second.
    let daemon = Daemon::qblk(d, "fs.sock", &["--pin-guest-memory", "fs.qcow2"]);
    // First VM: phases 1 and 2 across a guest reboot (a device reset on
    // the same vhost-user connection).
    let vm = Vm::start(d, "fs1", FS_SCRIPT, &[disk(&daemon, 1)], true);
    let first = vm.finish();
    assert!(
        first.passed() && first.0.contains("phase 1 done") && first.0.contains("phase 1 checked"),
        "first VM:\n{}\n{}",
        first.0,
        daemon.log()
    );
    // Second VM on the same daemon: a new frontend connection.
    let vm = Vm::start(d, "fs2", FS_SCRIPT, &[disk(&daemon, 1)], false);
    let second = vm.finish();
    assert!(
        second.passed() && second.0.contains("phase 2 checked"),
        "second VM:\n{}\n{}",
        second.0,
        daemon.log()
    );
    let log = stop_and_compare(d, daemon, "fs.qcow2", second.md5s().get("vda"));
    assert!(
        log.matches("guest memory pinned").count() >= 2,
        "both VMs' memory pinned:\n{log}"
    );
    let fixed = log_counter(&log, "fixed_ios");
    assert!(
        fixed > 1000,
        "guest I/O went through registered buffers:\n{log}"
    );
}

const READONLY_SCRIPT: &str = r#"
[ "$(cat /sys/block/vda/ro)" = 1 ]
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo "write to a read-only disk succeeded"
    exit 1
fi
echo "write refused"
echo "MD5 vda $(md5sum /dev/vda | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn readonly_export_refuses_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "ro.qcow2", "16M");
    sh(d, &["qemu-io", "-c", "write -P 0x42 0 1M", "ro.qcow2"]);
    let before = std::fs::read(d.join("ro.qcow2")).unwrap();
    let daemon = Daemon::qblk(d, "ro.sock", &["--readonly", "ro.qcow2"]);
    let vm = Vm::start(d, "ro", READONLY_SCRIPT, &[disk(&daemon, 1)], false);
    let console = vm.finish();
    assert!(
        console.passed() && console.0.contains("write refused"),
        "{}\n{}",
        console.0,
        daemon.log()
    );
    stop_and_compare(d, daemon, "ro.qcow2", console.md5s().get("vda"));
    assert!(
        std::fs::read(d.join("ro.qcow2")).unwrap() == before,
        "image changed"
    );
}

/// Images made by qemu-img in every layout the guest should read back.
/// Each is (file, commands run in the directory to make it).
fn qemu_made_images() -> Vec<(&'static str, Vec<Vec<&'static str>>)> {
    let io = |cmd: &'static str, img: &'static str| vec!["qemu-io", "-c", cmd, img];
    vec![
        (
            "zlib.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "src.qcow2",
                    "16M",
                ],
                io("write -P 0x11 0 3M", "src.qcow2"),
                io("write -P 0x12 5M 1M", "src.qcow2"),
                vec![
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "src.qcow2",
                    "zlib.qcow2",
                ],
            ],
        ),
        (
            "zstd.qcow2",
            vec![vec![
                "qemu-img",
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "src.qcow2",
                "zstd.qcow2",
            ]],
        ),
        (
            "xl2.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "extended_l2=on,cluster_size=128k",
                    "xl2.qcow2",
                    "16M",
                ],
                io("write -P 0x21 4k 4k", "xl2.qcow2"),
                io("write -P 0x22 132k 60k", "xl2.qcow2"),
                io("write -z 1M 8k", "xl2.qcow2"),
            ],
        ),
        (
            "top.qcow2",
            vec![
                vec!["qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M"],
                io("write -P 0x31 0 4M", "base.raw"),
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    "mid.qcow2",
                ],
                io("write -P 0x32 1M 1M", "mid.qcow2"),
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "mid.qcow2",
                    "-F",
                    "qcow2",
                    "top.qcow2",
                ],
                io("write -P 0x33 1536k 64k", "top.qcow2"),
                io("write -z 3M 64k", "top.qcow2"),
            ],
        ),
        (
            "snap.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "snap.qcow2",
                    "16M",
                ],
                io("write -P 0x41 0 2M", "snap.qcow2"),
                vec!["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"],
                io("write -P 0x42 1M 64k", "snap.qcow2"),
            ],
        ),
        (
            "v2.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "compat=0.10",
                    "v2.qcow2",
                    "16M",
                ],
                io("write -P 0x51 64k 1M", "v2.qcow2"),
            ],
        ),
        (
            "small.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=512",
                    "small.qcow2",
                    "16M",
                ],
                io("write -P 0x61 1000 100k", "small.qcow2"),
            ],
        ),
        (
            "ext.qcow2",
            vec![
                vec![
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "data_file=ext.data",
                    "ext.qcow2",
                    "16M",
                ],
                io("write -P 0x71 2M 1M", "ext.qcow2"),
            ],
        ),
    ]
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn guest_reads_images_qemu_made() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = qemu_made_images();
    for (_, cmds) in &images {
        for c in cmds {
            sh(d, c);
        }
    }
    let mut daemons = Vec::new();
    let mut disks = Vec::new();
    let mut script = String::new();
    for (i, (image, _)) in images.iter().enumerate() {
        let serial = format!("img{i}");
        let daemon = Daemon::qblk(d, &format!("{serial}.sock"), &["--serial", &serial, image]);
        disks.push(disk(&daemon, 1));
        daemons.push((image, serial, daemon));
    }
    script.push_str(
        "for b in /sys/block/vd*; do\n\
         \x20   echo \"MD5 $(cat $b/serial) $(md5sum /dev/${b##*/} | cut -d' ' -f1)\"\n\
         done\n",
    );
    let vm = Vm::start(d, "images", &script, &disks, false);
    let console = vm.finish();
    assert!(console.passed(), "{}", console.0);
    let sums = console.md5s();
    assert_eq!(sums.len(), images.len(), "{}", console.0);
    for (image, serial, daemon) in daemons {
        stop_and_compare(d, daemon, image, sums.get(&serial));
    }
}

const RECONNECT_SCRIPT: &str = r#"
dev=/dev/vda
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
dd if=/tmp/a of=$dev bs=1M oflag=direct conv=fsync 2>/dev/null
want=$(md5sum < /tmp/a)
echo RECONNECT-READY
# Keep reading while the host restarts the daemon underneath.
i=0
while [ $i -lt 40 ]; do
    got=$(dd if=$dev bs=1M count=4 iflag=direct 2>/dev/null | md5sum)
    [ "$got" = "$want" ]
    dd if=/tmp/a of=$dev bs=1M seek=8 count=1 oflag=direct 2>/dev/null
    i=$((i + 1))
    sleep 0.25
done
echo "reads and writes went on"
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn qemu_reconnects_to_a_restarted_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create_qcow2(d, "rc.qcow2", "32M");
    let mut first = Daemon::qblk(d, "rc.sock", &["rc.qcow2"]);
    let mut vm = Vm::start(
        d,
        "reconnect",
        RECONNECT_SCRIPT,
        &[Disk {
            reconnect: true,
            ..disk(&first, 1)
        }],
        false,
    );
    assert!(vm.wait_for("RECONNECT-READY"), "{}", vm.console());
    std::thread::sleep(std::time::Duration::from_secs(1));
    // A clean stop under load, then a new daemon on the same socket.
    let status = first.stop();
    assert!(status.success(), "{}", first.log());
    let second = Daemon::qblk(d, "rc.sock", &["rc.qcow2"]);
    let console = vm.finish();
    assert!(
        console.passed(),
        "{}\nfirst daemon:\n{}\nsecond daemon:\n{}",
        console.0,
        first.log(),
        second.log()
    );
    assert!(
        second.log().contains("frontend connected"),
        "{}",
        second.log()
    );
    stop_and_compare(d, second, "rc.qcow2", console.md5s().get("vda"));
}

/// Random 4 KiB writes at queue depth 32 with crc32c verify headers (the
/// write phase, during which the host kills the daemon), then the same
/// job verifying only. No virtio error may reach the guest's kernel log.
const KILL_SCRIPT: &str = r#"
dev=/dev/vda
job="--name=kill --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --size=384M --verify=crc32c --randseed=4242 \
    --output-format=terse"
echo KILL-READY
# Reads of every size beside the writes: requests complete out of order,
# so the used ring's index alone cannot tell which ones are still open.
(set +x; while [ ! -e /tmp/stop ]; do
    dd if=$dev of=/dev/null bs=4k count=$((1 + RANDOM % 64)) \
        skip=$((RANDOM * 3)) iflag=direct 2>/dev/null
done) &
fio $job --do_verify=0 >/tmp/fio-w
touch /tmp/stop
wait
echo WRITES-DONE
fio $job --verify_only --verify_fatal=1 >/tmp/fio-v
echo "fio verify passed"
if dmesg | grep -i -E "not a head|i/o error|blk_update_request|critical|blocked for more than|virtio.*(error|broken)"; then
    echo "the guest kernel logged block errors"
    exit 1
fi
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

/// The daemon is killed (SIGKILL) and restarted five times while a guest
/// writes at queue depth 32: with inflight tracking every request the
/// guest submitted completes exactly once, with the crash journal every
/// acknowledged write reads back, and the image is clean afterwards.
fn survive_kills(image_opts: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    qblk_integration::create_qcow2_opts(d, image_opts, "k.qcow2", "512M");
    let mut daemon = Daemon::qblk(d, "k.sock", &["k.qcow2"]);
    let mut vm = Vm::start(
        d,
        "kill",
        KILL_SCRIPT,
        &[Disk {
            reconnect: true,
            ..disk(&daemon, 1)
        }],
        false,
    );
    assert!(vm.wait_for("KILL-READY"), "{}", vm.console());
    let mut logs = String::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ image_opts.len() as u64;
    for kill in 1..=5 {
        // A random moment, 0.2 to 0.8 s into this daemon's service (the
        // write phase must outlast five of them on a fast host too).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_millis(200 + seed % 600));
        assert_still_writing(&vm, &format!("kill {kill}"));
        let status = daemon.stop_with(libc::SIGKILL);
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", daemon.log());
        logs.push_str(&format!("--- daemon {kill} ---\n{}", daemon.log()));
        daemon = Daemon::qblk(d, "k.sock", &["k.qcow2"]);
        // QEMU reconnects within a second (reconnect=1).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !daemon.log().contains("frontend connected") {
            assert!(
                std::time::Instant::now() < deadline,
                "QEMU did not reconnect after kill {kill}:\n{}\n{}",
                daemon.log(),
                vm.console()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let console = vm.finish();
    assert!(
        console.passed(),
        "guest failed:\n{}\n{logs}--- last daemon ---\n{}",
        console.0,
        daemon.log()
    );
    stop_and_compare(d, daemon, "k.qcow2", console.md5s().get("vda"));
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn guest_survives_five_daemon_kills() {
    survive_kills("cluster_size=64k");
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn guest_survives_five_daemon_kills_lazy_refcounts() {
    survive_kills("lazy_refcounts=on");
}

/// Waits (quietly, at most 60 s) until the disk's size in sectors is no
/// longer `$1`.
const WAIT_RESIZE: &str = r#"
wait_resize() {
    (set +x; i=0; while [ "$(cat /sys/block/vda/size)" = "$1" ]; do
        sleep 0.1; i=$((i + 1)); [ $i -lt 600 ] || { echo "no resize seen"; exit 1; }
    done)
}
"#;

/// An ext4 file system on the whole disk, grown online once the host's
/// `block_resize` reaches the guest.
const RESIZE_SCRIPT: &str = r#"
[ "$(cat /sys/block/vda/size)" = $((64 * 2048)) ]
/bin/mke2fs -t ext4 -q /dev/vda
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/a bs=1M count=4 2>/dev/null
sum=$(md5sum /mnt/a | cut -d' ' -f1)
sync
echo RESIZE-READY
wait_resize $((64 * 2048))
[ "$(cat /sys/block/vda/size)" = $((192 * 2048)) ]
echo "guest sees the new size"
/bin/resize2fs /dev/vda
[ "$(df -k /mnt | tail -1 | awk '{print $2}')" -gt $((150 * 1024)) ]
# More than the old disk held.
dd if=/dev/zero of=/mnt/big bs=1M count=100 2>/dev/null
sync
[ "$(md5sum /mnt/a | cut -d' ' -f1)" = "$sum" ]
umount /mnt
echo "MD5 vda $(md5sum /dev/vda | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn a_live_block_resize_reaches_the_guest_and_its_file_system_grows() {
    use qblk_integration::qmp::Qmp;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, "rs.qcow2", "64M");
    let daemon = Daemon::qblk(d, "rs.sock", &["--control", "rs.qmp", "rs.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("rs.qmp"));
    q.ok("qmp_capabilities", serde_json::json!({}));
    let script = format!("{WAIT_RESIZE}{RESIZE_SCRIPT}");
    let mut vm = Vm::start(d, "resize", &script, &[disk(&daemon, 1)], false);
    assert!(vm.wait_for("RESIZE-READY"), "{}", vm.console());
    q.ok(
        "block_resize",
        serde_json::json!({"node-name": "disk", "size": 192 << 20}),
    );
    let console = vm.finish();
    assert!(
        console.passed() && console.0.contains("guest sees the new size"),
        "{}\n{}",
        console.0,
        daemon.log()
    );
    drop(q);
    stop_and_compare(d, daemon, "rs.qcow2", console.md5s().get("vda"));
    assert_eq!(
        qblk_integration::qemu_info("rs.qcow2", d)["virtual-size"],
        192 << 20
    );
}

/// 16 MiB of a random pattern written with O_DIRECT from the start of
/// the disk (the host's file system fills up on the way and the daemon
/// holds the writes until `cont`); then read back and compared, and the
/// kernel must have logged no I/O error.
const ENOSPC_SCRIPT: &str = r#"
dev=/dev/vda
dd if=/dev/urandom of=/tmp/p bs=1M count=16 2>/dev/null
sum=$(md5sum /tmp/p | cut -d' ' -f1)
echo "MD5 pattern $sum"
echo WRITING
dd if=/tmp/p of=$dev bs=1M oflag=direct conv=fsync 2>/dev/null
echo WRITES-DONE
[ "$(dd if=$dev bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$sum" ]
echo "guest reads back every write"
if dmesg | grep -iE "I/O error|blk_update_request|print_req_error"; then
    echo "the guest's kernel logged an I/O error"; exit 1
fi
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

/// ENOSPC as a guest meets it: its writes into a thin image on a small
/// full file system (loop-mounted, so root) are held, `BLOCK_IO_ERROR`
/// (`nospace`) and `STOP` arrive on the control socket, the operator frees
/// space and says `cont`, and every write lands: the guest reads its
/// pattern back, its kernel logs no I/O error, and QEMU reads the same
/// disk from a clean image.
#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn a_guest_writing_into_a_full_file_system_is_held_until_cont_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fs = SmallFs::new(d);
    create_qcow2(d, "mnt/full.qcow2", "64M");
    // The default --werror (enospc).
    let daemon = Daemon::qblk(d, "full.sock", &["--control", "full.ctl", "mnt/full.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("full.ctl"));
    q.ok("qmp_capabilities", json!({}));
    // Less room than the guest's 16 MiB (the 40 MiB file system also
    // holds the 8 MiB crash journal).
    fs.fill(6 << 20);
    let mut vm = Vm::start(d, "full", ENOSPC_SCRIPT, &[disk(&daemon, 1)], false);
    assert!(vm.wait_for("WRITING"), "{}", vm.console());
    let e = q
        .event("BLOCK_IO_ERROR", Duration::from_secs(300))
        .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR\n{}\n{}", vm.console(), daemon.log()));
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["nospace"], true, "{e}");
    assert_eq!(e["data"]["operation"], "write", "{e}");
    assert!(
        q.event("STOP", Duration::from_secs(10)).is_some(),
        "no STOP\n{}",
        daemon.log()
    );
    assert_eq!(q.ok("query-status", json!({}))["status"], "io-error");
    // The guest's writes are held, not failed: its dd waits.
    std::thread::sleep(Duration::from_secs(3));
    assert!(vm.alive(), "{}", vm.console());
    assert!(
        !vm.console().contains("WRITES-DONE"),
        "the guest's writes finished while the device stood:\n{}",
        vm.console()
    );

    fs.unfill();
    q.ok("cont", json!({}));
    assert!(
        q.event("RESUME", Duration::from_secs(10)).is_some(),
        "no RESUME"
    );
    assert!(vm.wait_for("WRITES-DONE"), "{}", vm.console());
    // Once space is free, no write meets ENOSPC again.
    if let Some(e) = q.event("BLOCK_IO_ERROR", Duration::from_millis(100)) {
        panic!("a second BLOCK_IO_ERROR after cont: {e}\n{}", daemon.log());
    }
    let console = vm.finish();
    assert!(
        console.passed() && console.0.contains("guest reads back every write"),
        "guest failed:\n{}\n{}",
        console.0,
        daemon.log()
    );
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    drop(q);
    let md5s = console.md5s();
    let mut daemon = daemon;
    assert!(daemon.stop().success(), "{}", daemon.log());
    // Out of the small file system: QEMU's raw copies would not fit there.
    sh(d, &["cp", "mnt/full.qcow2", "full.qcow2"]);
    drop(fs);
    check_and_compare(d, "full.qcow2", md5s.get("vda"));
    // The host reads the pattern where the guest wrote it.
    let raw = qblk_integration::qemu_raw(d, "full.qcow2");
    std::fs::write(d.join("pattern.raw"), &raw[..16 << 20]).expect("write the pattern");
    assert_eq!(
        Some(&qblk_integration::guest::md5_file(&d.join("pattern.raw"))),
        md5s.get("pattern"),
        "QEMU does not read the guest's pattern back"
    );
}

/// Region A (4 MiB at 8 MiB) written and left alone, region B (32..48 MiB)
/// written all along by a background writer; the writer pauses while the
/// host takes an internal snapshot (the guest records the whole disk's
/// md5 then, `MD5 snap`) and writes on after it; then, with the writer
/// stopped and a bitmap added by the host, known writes only. Each step
/// waits for the host's signal: a 1 MiB `block_resize`.
const LIVE_SCRIPT: &str = r#"
dev=/dev/vda
dd if=/dev/urandom of=/tmp/a1 bs=1M count=4 2>/dev/null
dd if=/tmp/a1 of=$dev bs=1M seek=8 oflag=direct 2>/dev/null
echo "MD5 a1 $(md5sum /tmp/a1 | cut -d' ' -f1)"
(set +x; while [ ! -e /tmp/stop ]; do
    if [ -e /tmp/pause ]; then
        touch /tmp/paused
        while [ -e /tmp/pause ]; do sleep 0.05; done
        rm /tmp/paused
    fi
    dd if=/dev/urandom of=$dev bs=64k count=1 seek=$((512 + RANDOM % 256)) oflag=direct 2>/dev/null
done) &
noise=$!
size0=$(cat /sys/block/vda/size)
echo SNAP-READY
wait_resize $size0
touch /tmp/pause
(set +x; while [ ! -e /tmp/paused ]; do sleep 0.05; done)
size1=$(cat /sys/block/vda/size)
echo "MD5 snap $(dd if=$dev bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo PAUSED
wait_resize $size1
rm /tmp/pause
# The writer changes region B after the snapshot.
sleep 2
touch /tmp/stop
wait $noise
size2=$(cat /sys/block/vda/size)
echo BITMAP-READY
wait_resize $size2
dd if=/dev/urandom of=/tmp/a2 bs=1M count=4 2>/dev/null
dd if=/tmp/a2 of=$dev bs=1M seek=8 oflag=direct 2>/dev/null
dd if=/dev/urandom of=$dev bs=4k count=1 seek=$((50 * 256)) oflag=direct 2>/dev/null
echo "MD5 a2 $(md5sum /tmp/a2 | cut -d' ' -f1)"
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn a_snapshot_while_the_guest_writes_and_a_bitmap_of_its_writes() {
    use qblk_integration::qmp::Qmp;
    use serde_json::json;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, "lv.qcow2", "64M");
    let daemon = Daemon::qblk(d, "lv.sock", &["--control", "lv.qmp", "lv.qcow2"]);
    let (mut q, _) = Qmp::connect(&d.join("lv.qmp"));
    q.ok("qmp_capabilities", json!({}));
    let script = format!("{WAIT_RESIZE}{LIVE_SCRIPT}");
    let mut vm = Vm::start(d, "live", &script, &[disk(&daemon, 1)], false);
    assert!(vm.wait_for("SNAP-READY"), "{}", vm.console());
    // The background writer is at work; it pauses.
    std::thread::sleep(std::time::Duration::from_secs(2));
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 65 << 20}),
    );
    assert!(vm.wait_for("PAUSED"), "{}", vm.console());
    q.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "disk", "name": "s1"}),
    );
    // The writer goes on.
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 66 << 20}),
    );
    assert!(vm.wait_for("BITMAP-READY"), "{}", vm.console());
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true}),
    );
    q.ok(
        "block_resize",
        json!({"node-name": "disk", "size": 67 << 20}),
    );
    let console = vm.finish();
    assert!(console.passed(), "{}\n{}", console.0, daemon.log());
    drop(q);
    let md5s = console.md5s();
    stop_and_compare(d, daemon, "lv.qcow2", md5s.get("vda"));

    // The bitmap has exactly the guest's writes after it was added, in
    // 64 KiB granules, as QEMU reads it.
    let export = qblk_integration::BitmapExport::start(d, "lv.qcow2", &["b1".to_owned()]);
    let dirty = export.dirty_ranges(d, "b1");
    drop(export);
    assert_eq!(dirty, vec![(8 << 20, 4 << 20), (50 << 20, 64 << 10)]);

    // The snapshot holds the whole disk as the guest read it at the
    // snapshot point (region A as first written, region B as the
    // paused writer left it).
    // (QEMU applies no snapshot to an image with active bitmaps.)
    sh(d, &["cp", "lv.qcow2", "s1.qcow2"]);
    sh(d, &["qemu-img", "bitmap", "--remove", "s1.qcow2", "b1"]);
    sh(d, &["qemu-img", "snapshot", "-a", "s1", "s1.qcow2"]);
    let disk = qblk_integration::qemu_raw(d, "s1.qcow2");
    assert_eq!(disk.len(), 65 << 20, "the snapshot's disk size");
    std::fs::write(d.join("a1.raw"), &disk[8 << 20..12 << 20]).expect("write region A");
    assert_eq!(
        Some(&qblk_integration::guest::md5_file(&d.join("a1.raw"))),
        md5s.get("a1"),
        "the snapshot does not hold region A as it was"
    );
    assert_eq!(
        Some(&qemu_md5(d, "s1.qcow2")),
        md5s.get("snap"),
        "the snapshot does not hold the disk as the guest read it at the snapshot point"
    );
    qemu_check_clean("s1.qcow2", d);
}

/// Random 4 KiB writes with crc32c verify headers over 64 MiB, pass after
/// pass (each the same: one seed) for `WRITE_SECS` of guest time while
/// the host migrates the VM; then the same job verifying only, on
/// whichever machine the guest ended on. Beside the writes: reads of
/// every size, and reads verified as they come of a region written
/// before (fio's buffers live on, so a page the daemon filled but did not
/// log as dirty would reach the destination stale and fail its check).
/// The script starts with `QUEUES=N` and `WRITE_SECS=S` lines.
const MIG_SCRIPT: &str = r#"
dev=/dev/vda
[ "$(ls /sys/block/vda/mq | wc -l)" = "$QUEUES" ]
job="--name=mig --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=16 --size=64M --verify=crc32c --randseed=4242 \
    --output-format=terse"
rjob="--name=rd --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=16k --iodepth=8 --offset=64M --size=32M --verify=crc32c --randseed=77 \
    --output-format=terse"
fio $rjob --do_verify=0 >/tmp/fio-r0
echo MIG-READY
(set +x; while [ ! -e /tmp/stop ]; do
    dd if=$dev of=/dev/null bs=4k count=$((1 + RANDOM % 64)) \
        skip=$((RANDOM % 32000)) iflag=direct 2>/dev/null
done) &
(set +x; n=0; while [ ! -e /tmp/stop ]; do
    if ! fio $rjob --verify_only --verify_fatal=1 >/tmp/fio-r 2>&1; then
        echo "READ-VERIFY-FAILED"; cat /tmp/fio-r; touch /tmp/bad
    fi
    n=$((n + 1))
done; echo "read verify passes $n") &
start=$(date +%s)
passes=0
while :; do
    fio $job --do_verify=0 >/tmp/fio-w
    passes=$((passes + 1))
    [ $(($(date +%s) - start)) -lt "$WRITE_SECS" ] || break
done
touch /tmp/stop
wait
echo "WRITES-DONE after $passes passes"
[ ! -e /tmp/bad ]
fio $job --verify_only --verify_fatal=1 >/tmp/fio-v
echo "fio verify passed"
if dmesg | grep -i -E "not a head|i/o error|blk_update_request|critical|blocked for more than|virtio.*(error|broken)"; then
    echo "the guest kernel logged block errors"
    exit 1
fi
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

/// The guest script: [`MIG_SCRIPT`] with its parameters.
fn mig_script(queues: u16, write_secs: u32) -> String {
    format!("QUEUES={queues}\nWRITE_SECS={write_secs}\n{MIG_SCRIPT}")
}

/// How long one migration may take (TCG, both cores shared).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// One qblk daemon serving a qcow2 image; the guest writes on it while
/// it is live-migrated `hops` times on this host (each time to a new
/// incoming QEMU on the same qblk socket, the source quitting once it is
/// done), then verifies its writes on the last machine. The image is
/// clean and reads as the guest read it. Returns the downtimes (ms).
fn live_migrations(name: &str, queues: u16, hops: u32) -> Vec<u64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = format!("{name}.qcow2");
    create_qcow2(d, &image, "128M");
    let socket = format!("{name}.sock");
    let q = queues.to_string();
    let daemon = Daemon::qblk(d, &socket, &["--queues", &q, &image]);
    let script = mig_script(queues, 12 + 8 * hops);
    let mut vm = Vm::start(
        d,
        &format!("{name}-0"),
        &script,
        &[disk(&daemon, queues)],
        false,
    );
    assert!(vm.wait_for("MIG-READY"), "{}", vm.console());
    // The writes and reads are under way.
    std::thread::sleep(Duration::from_secs(2));
    let mut q = vm.qmp();
    let mut downtimes = Vec::new();
    for hop in 1..=hops {
        let sock = d.join(format!("{name}-{hop}.mig"));
        let uri = format!("unix:{}", sock.display());
        let mut dst = vm.incoming(d, &format!("{name}-{hop}"), &uri);
        wait_for_path(&sock);
        let mut dq = dst.qmp();
        assert_eq!(run_state(&mut dq), "inmigrate");
        fast_migration(&mut q);
        let m = migrate(&mut q, &uri, MIGRATION_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "migration {hop} of {name}: {e}\nconsole:\n{}\ndaemon:\n{}",
                vm.console(),
                daemon.log()
            )
        });
        assert_still_writing(&vm, &format!("migration {hop} did"));
        assert_eq!(run_state(&mut q), "postmigrate", "{}", m.info);
        let resumed = wait_state(&mut dq, "running", Duration::from_secs(60));
        let status = vm.quit(q);
        assert!(status.success(), "the source QEMU exited {status}");
        println!(
            "qblk live migration {name} #{hop}: downtime {} ms (query-migrate), \
             total {} ms, destination running {} ms after the source completed",
            m.downtime_ms(),
            m.total_ms(),
            resumed.saturating_duration_since(m.at).as_millis()
        );
        downtimes.push(m.downtime_ms());
        vm = dst;
        q = dq;
    }
    drop(q);
    let console = vm.finish();
    assert_fio_verified(&console, &format!("daemon:\n{}", daemon.log()));
    let log = stop_and_compare(d, daemon, &image, console.md5s().get("vda"));
    assert!(
        log.matches("frontend connected").count() > hops as usize,
        "every QEMU connected:\n{log}"
    );
    downtimes
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn live_migration_on_one_host_keeps_the_disk_intact() {
    let downtimes = live_migrations("mig", 1, 1);
    println!("qblk live migration, one queue: downtime {downtimes:?} ms");
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn live_migration_with_two_queues_keeps_the_disk_intact() {
    let downtimes = live_migrations("mig2q", 2, 1);
    println!("qblk live migration, two queues: downtime {downtimes:?} ms");
}

/// A to B and back again (to a third QEMU process on the same socket).
#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn live_migration_there_and_back_again_keeps_the_disk_intact() {
    let downtimes = live_migrations("migback", 1, 2);
    println!("qblk live migration, there and back: downtimes {downtimes:?} ms");
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn a_cancelled_migration_leaves_the_source_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, "cx.qcow2", "128M");
    let daemon = Daemon::qblk(d, "cx.sock", &["cx.qcow2"]);
    let mut vm = Vm::start(d, "cx-a", &mig_script(1, 20), &[disk(&daemon, 1)], false);
    assert!(vm.wait_for("MIG-READY"), "{}", vm.console());
    std::thread::sleep(Duration::from_secs(1));
    let mut q = vm.qmp();
    let sock = d.join("cx.mig");
    let uri = format!("unix:{}", sock.display());
    let mut dst = vm.incoming(d, "cx-b", &uri);
    wait_for_path(&sock);
    // 1 MiB/s: 512 MiB of guest RAM cannot be through within a second.
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 20}),
    );
    let r = q.cmd("migrate", json!({ "uri": uri }));
    assert!(
        r.get("return").is_some(),
        "migrate refused: {}\ndaemon:\n{}",
        r["error"],
        daemon.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let info = q.ok("query-migrate", json!({}));
    assert!(
        matches!(info["status"].as_str(), Some("setup" | "active")),
        "the migration should still be under way: {info}"
    );
    q.ok("migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = q.ok("query-migrate", json!({}));
        if info["status"] == "cancelled" {
            break;
        }
        assert!(
            Instant::now() < deadline && info["status"] == "cancelling",
            "the migration did not end cancelled: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run_state(&mut q), "running");
    assert_still_writing(&vm, "the cancel");
    dst.kill();
    drop(q);
    let console = vm.finish();
    assert_fio_verified(&console, &format!("daemon:\n{}", daemon.log()));
    stop_and_compare(d, daemon, "cx.qcow2", console.md5s().get("vda"));
}

/// The disk changes hands between two daemons: `from` commits and lets
/// go of the image, `to` takes it.
fn hand_over(from: &mut Qmp, to: &mut Qmp) {
    from.ok("blockdev-set-active", json!({"active": false}));
    to.ok("blockdev-set-active", json!({"active": true}));
}

/// A migration across hosts on shared storage, played on one host: each
/// QEMU has a qblk daemon of its own on the one image, the incoming one
/// started `--inactive`. With `pause-before-switchover` the orchestrator
/// (this test, as the README's recipe says) hands the disk over while both
/// machines are paused, then lets the migration complete. First a
/// migration that fails after the hand-over (cancelled): the disk goes
/// back and the source runs on. Then A to B and back to A while the guest
/// writes; its writes verify on the last machine, the kernel logs no
/// block error, and the image is clean and reads as the guest read it.
#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn migration_between_two_daemons_on_shared_storage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = "sh.qcow2";
    create_qcow2(d, image, "128M");
    let a = Daemon::qblk(d, "sh-a.sock", &["--control", "sh-a.qmp", image]);
    let mut b = Daemon::qblk(
        d,
        "sh-b.sock",
        &["--inactive", "--control", "sh-b.qmp", image],
    );
    let control = |name: &str| {
        let (mut c, _) = Qmp::connect(&d.join(name));
        c.ok("qmp_capabilities", json!({}));
        c
    };
    let mut ctl = [control("sh-a.qmp"), control("sh-b.qmp")];
    let sockets = [a.socket.clone(), b.socket.clone()];
    let caps = json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]});

    let mut vm = Vm::start(d, "sh-0", &mig_script(1, 40), &[disk(&a, 1)], false);
    assert!(vm.wait_for("MIG-READY"), "{}", vm.console());
    std::thread::sleep(Duration::from_secs(2));
    let mut q = vm.qmp();
    q.ok("migrate-set-capabilities", caps.clone());
    fast_migration(&mut q);
    let fail = |what: &str, e: &str, vm: &Vm, b: &Daemon| -> ! {
        panic!(
            "{what}: {e}\nconsole:\n{}\ndaemon A:\n{}\ndaemon B:\n{}",
            vm.console(),
            a.log(),
            b.log()
        )
    };

    // Fails after the hand-over: the disk goes back before the source
    // resumes.
    let sock = d.join("sh-x.mig");
    let uri = format!("unix:{}", sock.display());
    let mut dst = vm.incoming_on(d, "sh-x", &uri, &[(&sockets[0], &sockets[1])]);
    wait_for_path(&sock);
    start_migration(&mut q, &uri).unwrap_or_else(|e| fail("migrate", &e, &vm, &b));
    migration_reaches(&mut q, "pre-switchover", MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| fail("to pre-switchover", &e, &vm, &b));
    let [ca, cb] = &mut ctl;
    hand_over(ca, cb);
    hand_over(cb, ca);
    q.ok("migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.ok("query-migrate", json!({}))["status"] != "cancelled" {
        assert!(Instant::now() < deadline, "the migration was not cancelled");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_state(&mut q, "running", Duration::from_secs(60));
    dst.kill();

    // A to B, then B to A.
    for (hop, (from, to)) in [(0usize, 1usize), (1, 0)].into_iter().enumerate() {
        let name = format!("sh-{}", hop + 1);
        let sock = d.join(format!("{name}.mig"));
        let uri = format!("unix:{}", sock.display());
        let mut dst = vm.incoming_on(d, &name, &uri, &[(&sockets[from], &sockets[to])]);
        wait_for_path(&sock);
        let mut dq = dst.qmp();
        assert_eq!(run_state(&mut dq), "inmigrate");
        dq.ok("migrate-set-capabilities", caps.clone());
        fast_migration(&mut dq);
        start_migration(&mut q, &uri).unwrap_or_else(|e| fail("migrate", &e, &vm, &b));
        migration_reaches(&mut q, "pre-switchover", MIGRATION_TIMEOUT)
            .unwrap_or_else(|e| fail("to pre-switchover", &e, &vm, &b));
        let [ca, cb] = &mut ctl;
        if from == 0 {
            hand_over(ca, cb);
        } else {
            hand_over(cb, ca);
        }
        q.ok("migrate-continue", json!({"state": "pre-switchover"}));
        let info = migration_reaches(&mut q, "completed", MIGRATION_TIMEOUT)
            .unwrap_or_else(|e| fail("to completion", &e, &vm, &b));
        assert_still_writing(&vm, &format!("migration {} did", hop + 1));
        wait_state(&mut dq, "running", Duration::from_secs(60));
        let status = vm.quit(q);
        assert!(status.success(), "the source QEMU exited {status}");
        println!(
            "qblk migration between two daemons #{}: downtime {} ms (query-migrate)",
            hop + 1,
            info["downtime"]
        );
        vm = dst;
        q = dq;
    }
    drop(q);
    let console = vm.finish();
    assert_fio_verified(
        &console,
        &format!("daemon A:\n{}\ndaemon B:\n{}", a.log(), b.log()),
    );
    drop(ctl);
    let status = b.stop();
    assert!(status.success(), "daemon B exited {status}:\n{}", b.log());
    stop_and_compare(d, a, image, console.md5s().get("vda"));
}

/// `qemu-storage-daemon` exporting `image` on `socket` (vhost-user-blk,
/// writable).
fn qsd(dir: &Path, socket: &str, image: &str) -> Daemon {
    Daemon::spawn(
        Path::new("qemu-storage-daemon"),
        &[
            "--blockdev",
            &format!("driver=file,node-name=file,filename={image}"),
            "--blockdev",
            "driver=qcow2,node-name=fmt,file=file",
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp,node-name=fmt,addr.type=unix,addr.path={socket},writable=on"
            ),
        ],
        dir,
        socket,
    )
}

/// The guest writes while it is migrated through a file: `migrate` to
/// `exec:cat > FILE`, the source quits, then a new QEMU comes in from
/// the file. With `qsd` the disk is qemu-storage-daemon's, restarted
/// between the two (its export serves one client and takes no second
/// one while it does); otherwise qblk's, left running. Returns the
/// downtime (ms, query-migrate's) and how long the guest was paused (ms,
/// from the source's completion until the destination ran).
fn file_migration(name: &str, use_qsd: bool) -> (u64, u128) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = format!("{name}.qcow2");
    create_qcow2(d, &image, "128M");
    let socket = format!("{name}.sock");
    let start = |d: &Path| {
        if use_qsd {
            qsd(d, &socket, &image)
        } else {
            Daemon::qblk(d, &socket, &[&image])
        }
    };
    let mut daemon = start(d);
    let mut vm = Vm::start(
        d,
        &format!("{name}-a"),
        &mig_script(1, 20),
        &[disk(&daemon, 1)],
        false,
    );
    assert!(vm.wait_for("MIG-READY"), "{}", vm.console());
    std::thread::sleep(Duration::from_secs(2));
    let mut q = vm.qmp();
    if use_qsd {
        // A second QEMU on the export's socket, as a live migration on
        // one host would need: what becomes of it.
        let mut second = vm.incoming(d, &format!("{name}-live"), "defer");
        let deadline = Instant::now() + Duration::from_secs(10);
        while second.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log =
            std::fs::read_to_string(d.join(format!("{name}-live.qemu.log"))).unwrap_or_default();
        println!(
            "qemu-storage-daemon, a second QEMU on its socket while the first runs \
             (socket file there: {}): {}",
            daemon.socket.exists(),
            if second.alive() {
                "still not up after 10 s (no one answers it)".to_owned()
            } else {
                format!("exited: {}", log.trim())
            }
        );
        second.kill();
    }
    let state = d.join(format!("{name}.state"));
    fast_migration(&mut q);
    let m = migrate(
        &mut q,
        &format!("exec:cat > {}", state.display()),
        MIGRATION_TIMEOUT,
    )
    .unwrap_or_else(|e| {
        panic!(
            "migration of {name} to a file: {e}\nconsole:\n{}\ndaemon:\n{}",
            vm.console(),
            daemon.log()
        )
    });
    assert_still_writing(&vm, "the migration did");
    assert_eq!(run_state(&mut q), "postmigrate", "{}", m.info);
    let status = vm.quit(q);
    assert!(status.success(), "the source QEMU exited {status}");
    if use_qsd {
        let status = daemon.stop();
        assert!(status.success(), "qsd exited {status}:\n{}", daemon.log());
        daemon = start(d);
    }
    let mut dst = vm.incoming(
        d,
        &format!("{name}-b"),
        &format!("exec:cat {}", state.display()),
    );
    let mut dq = dst.qmp();
    let resumed = wait_state(&mut dq, "running", Duration::from_secs(120));
    let paused = resumed.saturating_duration_since(m.at).as_millis();
    drop(dq);
    let console = dst.finish();
    assert_fio_verified(&console, &format!("daemon:\n{}", daemon.log()));
    stop_and_compare(d, daemon, &image, console.md5s().get("vda"));
    (m.downtime_ms(), paused)
}

/// qemu-storage-daemon's vhost-user-blk export cannot serve the incoming
/// QEMU of a live migration on one host; through a file it works, with
/// the daemon restarted in between. Prints its downtime, for comparison
/// with qblk's live ones.
#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn qemu_storage_daemon_migrates_through_a_file_only() {
    let (downtime, paused) = file_migration("qsd", true);
    println!(
        "qemu-storage-daemon, migrated through a file: downtime {downtime} ms (query-migrate), \
         guest paused {paused} ms (source completed until destination running)"
    );
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn qblk_migrates_through_a_file() {
    let (downtime, paused) = file_migration("qfile", false);
    println!(
        "qblk, migrated through a file: downtime {downtime} ms (query-migrate), \
         guest paused {paused} ms (source completed until destination running)"
    );
}

/// The guest's side of the NBD backup test: 48 MiB of random data, then
/// at each of the host's signals (a `block_resize`) the next step — a
/// background writer over the first 64 MiB while the host reads an
/// export, the md5 of the first 64 MiB whenever it is quiet.
const NBD_SCRIPT: &str = r#"
dev=/dev/vda
md5_64() { dd if=$dev bs=1M count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
writer() { (set +x; while [ ! -e /tmp/stop$1 ]; do
    dd if=/dev/urandom of=$dev bs=64k count=1 seek=$((RANDOM % 1024)) oflag=direct 2>/dev/null
done) & }
step() { s=$(cat /sys/block/vda/size); echo "$1"; wait_resize $s; }
dd if=/dev/urandom of=$dev bs=1M count=48 oflag=direct 2>/dev/null
echo "MD5 e1 $(md5_64)"
step EXPORT1-READY
writer 1
step WRITING1
touch /tmp/stop1; wait
echo "MD5 e2 $(md5_64)"
step EXPORT2-READY
writer 2
step WRITING2
touch /tmp/stop2; wait
echo "MD5 vda $(md5sum $dev | cut -d' ' -f1)"
"#;

/// `qemu-img convert` of NBD export `name` on `nbd` to raw; its bytes.
fn nbd_convert(d: &Path, nbd: &Path, name: &str) -> Vec<u8> {
    let out = d.join(format!("{name}.raw"));
    let uri = format!("nbd+unix:///{name}?socket={}", nbd.display());
    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().expect("utf-8"),
        ],
    );
    std::fs::read(&out).expect("converted")
}

fn md5_of(d: &Path, bytes: &[u8]) -> String {
    let p = d.join("md5.tmp");
    std::fs::write(&p, bytes).expect("write");
    qblk_integration::guest::md5_file(&p)
}

#[test]
#[ignore = "boots a VM: run by cargo xtask e2e"]
fn an_nbd_backup_of_a_writing_guest_full_then_incremental_equals_the_disk_at_each_export() {
    const MIB64: usize = 64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, "nb.qcow2", "64M");
    let nbd = d.join("nb.nbd");
    let nbd_arg = format!("unix:{}", nbd.display());
    let daemon = Daemon::qblk(
        d,
        "nb.sock",
        &["--control", "nb.qmp", "--nbd", &nbd_arg, "nb.qcow2"],
    );
    let (mut q, _) = Qmp::connect(&d.join("nb.qmp"));
    q.ok("qmp_capabilities", json!({}));
    let script = format!("{WAIT_RESIZE}{NBD_SCRIPT}");
    let mut vm = Vm::start(d, "nbd", &script, &[disk(&daemon, 1)], false);
    let mut size = 64u64 << 20;
    let mut signal = |q: &mut Qmp| {
        size += 1 << 20;
        q.ok("block_resize", json!({"node-name": "disk", "size": size}));
    };
    let md5 = |vm: &Vm, name: &str| {
        let marker = format!("MD5 {name} ");
        vm.console()
            .lines()
            .find_map(|l| l.strip_prefix(&marker).map(|m| m.trim().to_owned()))
            .unwrap_or_else(|| panic!("no md5 {name}:\n{}", vm.console()))
    };

    // Round 1 (full): a bitmap, then the export; the guest writes while
    // QEMU's client reads it.
    assert!(vm.wait_for("EXPORT1-READY"), "{}", vm.console());
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "r1", "node-name": "disk", "name": "r1"}),
    );
    signal(&mut q);
    assert!(vm.wait_for("WRITING1"), "{}", vm.console());
    std::thread::sleep(Duration::from_millis(500));
    let mut backup = nbd_convert(d, &nbd, "r1");
    assert_eq!(backup.len(), MIB64);
    assert_eq!(
        md5_of(d, &backup),
        md5(&vm, "e1"),
        "the full backup is not the disk at the first export"
    );
    q.ok("block-export-del", json!({"id": "r1"}));
    signal(&mut q);

    // Round 2 (incremental): a new bitmap, the export with the old one;
    // only the ranges it marks are copied over the full backup.
    assert!(vm.wait_for("EXPORT2-READY"), "{}", vm.console());
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b2", "persistent": true}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "r2", "node-name": "disk", "name": "r2", "bitmaps": ["b1"]}),
    );
    signal(&mut q);
    assert!(vm.wait_for("WRITING2"), "{}", vm.console());
    std::thread::sleep(Duration::from_millis(500));
    let dirty =
        qblk_integration::map_ranges(&qblk_integration::nbd_dirty_map(d, &nbd, "r2", "b1"), false);
    let copied: u64 = dirty.iter().map(|r| r.1).sum();
    assert!(copied > 0 && copied < MIB64 as u64, "{copied} bytes dirty");
    let now = nbd_convert(d, &nbd, "r2");
    for (start, len) in dirty {
        let (s, e) = (start as usize, (start + len) as usize);
        if s < MIB64 {
            backup[s..e.min(MIB64)].copy_from_slice(&now[s..e.min(MIB64)]);
        }
    }
    assert_eq!(
        md5_of(d, &backup),
        md5(&vm, "e2"),
        "the full backup plus the dirty ranges is not the disk at the second export"
    );
    q.ok("block-export-del", json!({"id": "r2"}));
    signal(&mut q);
    drop(q);
    let console = vm.finish();
    assert!(console.passed(), "{}\n{}", console.0, daemon.log());
    stop_and_compare(d, daemon, "nb.qcow2", console.md5s().get("vda"));
}
