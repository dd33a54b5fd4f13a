//! The writer's locking and flush contracts, seen from outside:
//!
//! - a metadata write held back in the middle of a writeback does not hold
//!   up allocating writes to other clusters (the allocator lock covers
//!   in-memory work only, never a wait for I/O);
//! - `flush` and `close` on an image marked corrupt do not report success
//!   for writes that were never made durable.

mod common;

use std::rc::Rc;
use std::time::Duration;

use common::{sh, writable};
use qblk_engine::Image;
use qblk_engine::fault::Recorder;
use qblk_engine::runtime::block_on;

const MIB: u64 = 1 << 20;

#[test]
fn a_stalled_metadata_write_does_not_hold_up_allocating_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "1G"],
    );
    let path = d.join("s.qcow2");
    let rec = Recorder::attach(&path).expect("attach");
    let p = path.clone();
    block_on(async move {
        let img = Rc::new(Image::open(&p, &writable()).await.expect("open"));
        // Dirty metadata for the writeback to write: a new L2 table.
        img.write(0, &[1u8; 65536]).await.expect("first write");
        let gate = rec.stall("write L2 table");
        let flushing = {
            let img = img.clone();
            tokio::task::spawn_local(async move { img.flush().await })
        };
        // Wait until the writeback is stuck in its L2 table write.
        for _ in 0..1000 {
            if gate.hits() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(gate.hits(), 1, "the writeback reached its L2 table write");
        // Allocating writes to other clusters, in the table being written
        // and in a new one, complete meanwhile and read back.
        for (at, byte) in [(5 * 65536, 2u8), (600 * MIB, 3u8)] {
            tokio::time::timeout(Duration::from_secs(10), img.write(at, &[byte; 65536]))
                .await
                .expect("an allocating write waited for a stalled metadata write")
                .expect("write");
            let mut buf = vec![0u8; 65536];
            img.read(at, &mut buf).await.expect("read");
            assert!(buf.iter().all(|&b| b == byte));
        }
        assert!(!flushing.is_finished(), "the flush is still held back");
        gate.release();
        flushing.await.expect("join").expect("flush");
        // What was written meanwhile goes with the next writeback.
        img.flush().await.expect("second flush");
        img.close().await.expect("close");
    });
    Recorder::detach(&path);
    let out = sh(d, &["qemu-img", "check", "s.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
    for (at, byte) in [(0, 1u8), (5 * 65536, 2), (600 * MIB, 3)] {
        let cmd = format!("read -P {byte} {at} 64k");
        let out = sh(d, &["qemu-io", "-r", "-c", &cmd, "s.qcow2"]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

#[test]
fn flush_and_close_of_a_corrupt_image_do_not_claim_unsynced_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
    );
    sh(d, &["qemu-io", "-c", "write -P 9 0 256k", "c.qcow2"]);
    // Set a reserved bit in the L2 entry of guest cluster 1.
    let mut bytes = std::fs::read(d.join("c.qcow2")).expect("read");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8"));
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().expect("8"))
        & 0x00ff_ffff_ffff_fe00;
    bytes[l2 as usize + 8 + 7] |= 0x02;
    std::fs::write(d.join("c.qcow2"), &bytes).expect("write");
    std::fs::write(d.join("c2.qcow2"), &bytes).expect("write");
    let path = d.join("c.qcow2");
    block_on(async move {
        let img = Image::open(&path, &writable()).await.expect("open");
        // Flushed: a clean start. Then one write only memory knows the
        // mapping of (a new cluster), then the corruption.
        img.flush().await.expect("flush");
        img.write(2 * MIB, &[5u8; 4096])
            .await
            .expect("allocating write");
        img.write(65536 + 10, b"xyz")
            .await
            .expect_err("corrupt entry");
        let e = img.flush().await.expect_err("flush after corruption");
        assert!(
            matches!(e, qblk_engine::Error::NotDurable { writes: 1, .. }),
            "{e:?}"
        );
        let e = img.close().await.expect_err("close after corruption");
        assert!(matches!(e, qblk_engine::Error::NotDurable { .. }), "{e:?}");
    });
    // Nothing acknowledged since the last writeback: success is true.
    let path = d.join("c2.qcow2");
    block_on(async move {
        let img = Image::open(&path, &writable()).await.expect("open");
        img.write(2 * MIB, &[5u8; 4096])
            .await
            .expect("allocating write");
        img.flush().await.expect("flush");
        img.write(65536 + 10, b"xyz")
            .await
            .expect_err("corrupt entry");
        img.flush().await.expect("nothing unsynced");
        img.close().await.expect("nothing unsynced");
    });
}
