//! `qblk serve` driven by a VM-less vhost-user-blk client (blkio).

use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::{qemu_check_clean, sh};

#[test]
fn smoke_read_write_flush() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, &["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "64M"]);
    let mut daemon = Daemon::qblk(d, "s.sock", &["disk.qcow2"]);
    {
        let mut c = Client::connect(&daemon.socket, 1).unwrap();
        assert_eq!(c.capacity(), 64 << 20);
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        c.write_all(4096, &data);
        assert_eq!(c.flush(), 0);
        assert_eq!(c.read_vec(4096, 65536), data);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    qemu_check_clean("disk.qcow2", d);
}
