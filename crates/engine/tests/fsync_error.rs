//! A failed fdatasync is remembered ("fsyncgate"): once one fails — in a
//! guest flush or in the engine's own writeback — every later flush of
//! that image fails too, until the image is reopened, so the engine never
//! reports durable what the kernel may have dropped. Writes go on being
//! accepted meanwhile; none of them is ever called durable.

use qblk_engine::fault::Recorder;
use qblk_engine::file::{CacheMode, HostFile, SyncFailed, sync_failure};
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

mod common;
use common::*;

fn failure(e: &qblk_engine::Error) -> SyncFailed {
    sync_failure(e).unwrap_or_else(|| panic!("not a failed sync: {e}"))
}

#[test]
fn a_failed_fsync_fails_every_later_flush_of_the_image_until_it_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "16M"],
    );
    let path = d.join("a.qcow2");
    let rec = Recorder::attach(&path).unwrap();
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    block_on(async {
        let img = Image::open(&path, &opts).await.unwrap();
        img.write(0, &[0x11; 65536]).await.unwrap();
        img.flush().await.expect("a healthy flush");

        // The disk fails one fdatasync (ENOSPC, as thin provisioning or
        // NFS report it): the flush fails, and says it is not the full
        // disk a retry could cure.
        img.write(65536, &[0x22; 65536]).await.unwrap();
        rec.fail_syncs(&[libc::ENOSPC]);
        let e = img.flush().await.expect_err("the sync failed");
        let f = failure(&e);
        assert_eq!(f.errno, libc::ENOSPC);
        assert!(!f.earlier);
        assert!(e.to_string().contains("flush"), "{e}");
        assert!(f.to_string().contains("may be lost"), "{f}");

        // Every later flush fails, although the disk would sync now —
        // with nothing new written, with new writes (which are accepted),
        // and at close.
        for round in 0..3 {
            if round == 1 {
                img.write(131072, &[0x33; 4096])
                    .await
                    .expect("writes go on");
            }
            let e = img.flush().await.expect_err("a later flush");
            let f = failure(&e);
            assert!(f.earlier && f.errno == libc::ENOSPC, "round {round}: {e:?}");
        }
        assert!(sync_failure(&img.close().await.expect_err("close")).is_some());
    });

    // Reopened: a fresh start, flushes succeed again.
    block_on(async {
        let img = Image::open(&path, &opts).await.unwrap();
        img.write(0, &[0x55; 4096]).await.unwrap();
        img.flush().await.expect("a flush after reopening");
        img.close().await.unwrap();
    });
    Recorder::detach(&path);
}

#[test]
fn the_engines_own_writeback_sync_failing_fails_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "16M"],
    );
    let path = d.join("b.qcow2");
    let rec = Recorder::attach(&path).unwrap();
    block_on(async {
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &opts).await.unwrap();
        // A resize commits and syncs on its own, with no guest flush.
        img.write(0, &[0x44; 4096]).await.unwrap();
        rec.fail_syncs(&[libc::EIO]);
        assert!(
            img.resize(32 << 20).await.is_err(),
            "the resize's sync failed"
        );
        let e = img.flush().await.expect_err("the guest's next flush");
        let f = failure(&e);
        assert_eq!((f.errno, f.earlier), (libc::EIO, true));
    });
    Recorder::detach(&path);
}

#[test]
fn a_raw_files_failed_fsync_is_remembered_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let rec = Recorder::attach(&path).unwrap();
    block_on(async {
        let f = HostFile::open(&path, true, CacheMode::None).unwrap();
        f.write(0, &[1; 4096]).await.unwrap();
        f.flush().await.unwrap();
        rec.fail_syncs(&[libc::EIO]);
        let e = f.flush().await.expect_err("the sync failed");
        assert_eq!(
            e.raw_os_error(),
            None,
            "not an errno a caller could retry on"
        );
        for _ in 0..2 {
            f.write(4096, &[2; 4096]).await.expect("writes go on");
            let e = f.flush().await.expect_err("later flushes");
            assert!(sync_failure(&e).is_some_and(|s| s.earlier), "{e}");
        }
        assert!(f.sync_failed().is_some());
        // Another open of the file starts afresh.
        let again = HostFile::open(&path, true, CacheMode::None).unwrap();
        again.flush().await.expect("a new open");
    });
    Recorder::detach(&path);
}
