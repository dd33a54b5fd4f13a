//! End-to-end: Linux guests under QEMU TCG on `qblk serve` disks.
//!
//! These boot VMs, so they are `#[ignore]`d in the plain test run and run
//! one at a time by `cargo xtask e2e` (part of `cargo xtask test`), which
//! first installs qemu-system-x86, the kernel, busybox and fio.

use std::path::Path;

use qblk_integration::guest::{Disk, Vm, qemu_md5};
use qblk_integration::vhost::Daemon;
use qblk_integration::{qemu_check_clean, sh};

fn disk(daemon: &Daemon, queues: u16) -> Disk {
    Disk {
        socket: daemon.socket.clone(),
        queues,
        reconnect: false,
    }
}

/// Stops the daemon (exit 0 expected), then checks the image with
/// qemu-img and compares QEMU's reading of it with the guest's md5.
fn stop_and_compare(dir: &Path, mut daemon: Daemon, image: &str, guest_md5: Option<&String>) {
    let status = daemon.stop();
    assert!(status.success(), "qblk serve exited {status}:\n{}", daemon.log());
    qemu_check_clean(image, dir);
    let guest = guest_md5.unwrap_or_else(|| panic!("the guest printed no md5 for {image}"));
    assert_eq!(
        &qemu_md5(dir, image),
        guest,
        "{image}: QEMU reads something else than the guest saw"
    );
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
    sh(d, &["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "128M"]);
    let daemon = Daemon::qblk(
        d,
        "fio.sock",
        &["--queues", "2", "--serial", "e2e-fio", "disk.qcow2"],
    );
    let vm = Vm::start(d, "fio", FIO_SCRIPT, &[disk(&daemon, 2)], false);
    let console = vm.finish();
    assert!(console.passed(), "guest failed:\n{}\n{}", console.0, daemon.log());
    stop_and_compare(d, daemon, "disk.qcow2", console.md5s().get("vda"));
}
