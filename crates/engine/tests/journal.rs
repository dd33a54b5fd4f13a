//! The crash journal (`qblk_engine::journal`): what a writer acknowledged
//! survives the writer's death without a flush, and a journal is replayed
//! only onto the image exactly as the crash left it.
//!
//! A "crash" here drops the image without `close`: nothing the writer had
//! only in memory reaches the file, as after kill -9.

use std::path::Path;

use qblk_engine::file::CacheMode;
use qblk_engine::image::{Image, OpenOptions};
use qblk_engine::runtime::block_on;

mod common;
use common::*;

fn opts(journal: bool) -> OpenOptions {
    OpenOptions {
        writable: true,
        cache: CacheMode::None,
        crash_journal: journal,
        ..OpenOptions::default()
    }
}

/// Patterns at offsets spread over several L2 tables (32 KiB clusters:
/// one table maps 128 MiB).
const WRITES: [(u64, u8); 6] = [
    (0, 0x11),
    (3 << 20, 0x22),
    (130 << 20, 0x33),
    (300 << 20, 0x44),
    (301 << 20, 0x55),
    ((1 << 30) - (64 << 10), 0x66),
];

/// Writes the patterns (all allocating), then crashes: no flush, no close.
fn write_and_crash(path: &Path, journal: bool) {
    block_on(async {
        let img = Image::open(path, &opts(journal)).await.expect("open");
        for (off, p) in WRITES {
            img.write(off, &vec![p; 64 << 10]).await.expect("write");
        }
        // A zeroed range of a written cluster and a discarded one: the
        // journal carries every kind of table change.
        img.write_zeroes(3 << 20, 32 << 10, true)
            .await
            .expect("zeroes");
        img.discard(301 << 20, 64 << 10).await.expect("discard");
        drop(img);
    });
}

fn expected(off: u64, p: u8) -> Vec<u8> {
    let mut v = vec![p; 64 << 10];
    if off == 3 << 20 {
        v[..32 << 10].fill(0);
    }
    if off == 301 << 20 {
        v.fill(0);
    }
    v
}

fn read_all(path: &Path) -> Vec<Vec<u8>> {
    block_on(async {
        let img = Image::open(path, &opts(true)).await.expect("reopen");
        let mut out = Vec::new();
        for (off, _) in WRITES {
            let mut buf = vec![0u8; 64 << 10];
            img.read(off, &mut buf).await.expect("read");
            out.push(buf);
        }
        img.close().await.expect("close");
        out
    })
}

fn image(dir: &Path) -> std::path::PathBuf {
    image_with(dir, "cluster_size=32k")
}

fn image_with(dir: &Path, opts: &str) -> std::path::PathBuf {
    sh(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "j.qcow2", "1G",
        ],
    );
    dir.join("j.qcow2")
}

/// Every pattern reads back (opening the image for writing, which
/// replays any journal).
fn assert_all_read_back(path: &Path) {
    let got = read_all(path);
    for (i, (off, p)) in WRITES.into_iter().enumerate() {
        assert!(got[i] == expected(off, p), "write at {off:#x} lost");
    }
}

/// The journal was not replayed: the unflushed writes are gone.
fn assert_not_replayed(path: &Path, why: &str) {
    let got = read_all(path);
    assert!(got[3] != expected(300 << 20, 0x44), "{why}");
}

fn qemu_check_clean(dir: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "j.qcow2"])
        .current_dir(dir)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check (exit {:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn acknowledged_writes_survive_a_crash_through_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, true);
    let journal = qblk_engine::journal::sidecar(&path);
    assert!(journal.exists(), "the crashed writer left its journal");
    // On disk, without the journal, the writes are not mapped: the test
    // would pass without a journal otherwise.
    let raw = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-c", "read -P 0x44 300M 64k", "j.qcow2"])
        .current_dir(d)
        .output()
        .expect("qemu-io");
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(raw.contains("Pattern verification failed"), "{raw}");
    assert_all_read_back(&path);
    assert!(!journal.exists(), "a clean close removes the journal");
    qemu_check_clean(d);
    // The clean image carries neither qblk's autoclear bit nor its
    // extension.
    let info = sh(d, &["qemu-img", "info", "--output=json", "j.qcow2"]);
    assert!(!info.contains("\"dirty-flag\": true"), "{info}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[88..96], &[0u8; 8], "autoclear features cleared");
}

#[test]
fn without_a_journal_the_same_crash_loses_the_writes() {
    // The property the journal adds: the same crash with it off loses
    // them (and so the test above can fail).
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, false);
    assert_not_replayed(&path, "the writes survived without a journal");
}

#[test]
fn a_journal_is_not_replayed_onto_an_image_changed_after_the_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, true);
    // Another program writes the image meanwhile (its locks are gone with
    // the crashed writer): QEMU clears the autoclear bit it does not know.
    sh(d, &["qemu-io", "-c", "write -P 0x77 500M 64k", "j.qcow2"]);
    assert_not_replayed(&path, "stale journal replayed");
    qemu_check_clean(d);
    let check = sh(d, &["qemu-io", "-c", "read -P 0x77 500M 64k", "j.qcow2"]);
    assert!(!check.contains("verification failed"), "{check}");
}

#[test]
fn a_journal_from_another_boot_is_not_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, true);
    let journal = qblk_engine::journal::sidecar(&path);
    let mut bytes = std::fs::read(&journal).unwrap();
    // The boot id follows the 8-byte magic.
    bytes[8] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();
    assert_not_replayed(&path, "journal of another boot replayed");
    qemu_check_clean(d);
}

#[test]
fn a_version_2_image_commits_before_acknowledging() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image_with(d, "compat=0.10,cluster_size=32k");
    write_and_crash(&path, true);
    assert!(!qblk_engine::journal::sidecar(&path).exists());
    assert_all_read_back(&path);
}

#[test]
fn a_repair_replays_the_journal_first() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, true);
    let out = block_on(qblk_engine::check::repair(
        &path,
        qblk_engine::check::RepairMode::All,
    ))
    .expect("repair");
    assert_eq!(out.after.corruptions + out.after.leaks, 0, "{out:?}");
    assert!(!qblk_engine::journal::sidecar(&path).exists());
    qemu_check_clean(d);
    assert_all_read_back(&path);
}

#[test]
fn qemu_img_writing_after_the_crash_voids_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    write_and_crash(&path, true);
    sh(d, &["qemu-img", "snapshot", "-c", "after-crash", "j.qcow2"]);
    assert_not_replayed(&path, "stale journal replayed");
    qemu_check_clean(d);
    let snaps = sh(d, &["qemu-img", "snapshot", "-l", "j.qcow2"]);
    assert!(snaps.contains("after-crash"), "{snaps}");
}

/// Another cluster of the same L2 table (32 KiB clusters: 128 MiB each).
fn beside(off: u64) -> u64 {
    if off >= 1 << 29 {
        off - (512 << 10)
    } else {
        off + (512 << 10)
    }
}

#[test]
fn writes_that_copy_tables_shared_with_a_snapshot_survive_a_crash() {
    // After a snapshot every L2 table is shared: a table's first write
    // copies it, and the journal records the copy as one record naming its
    // source. A crash then: the copies' content (all the old mappings) and
    // the new writes read back, the snapshot keeps the old data.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = image(d);
    block_on(async {
        let img = Image::open(&path, &opts(true)).await.expect("open");
        for (off, p) in WRITES {
            img.write(off, &vec![p; 64 << 10]).await.expect("write");
        }
        img.snapshot_create("before").await.expect("snapshot");
        // One write per table the old data lives in, into other clusters
        // of it: each copies its table.
        for (off, _) in WRITES {
            img.write(beside(off), &vec![0xee; 4096])
                .await
                .expect("write after the snapshot");
        }
        drop(img);
    });
    let journal = qblk_engine::journal::sidecar(&path);
    assert!(journal.exists(), "the crashed writer left its journal");
    block_on(async {
        let img = Image::open(&path, &opts(true)).await.expect("reopen");
        for (off, p) in WRITES {
            let mut buf = vec![0u8; 64 << 10];
            img.read(off, &mut buf).await.expect("read");
            assert!(buf == vec![p; 64 << 10], "old data at {off:#x} lost");
            let mut buf = vec![0u8; 4096];
            img.read(beside(off), &mut buf).await.expect("read");
            assert!(buf == vec![0xee; 4096], "write at {off:#x} + 1M lost");
        }
        img.close().await.expect("close");
    });
    qemu_check_clean(d);
    sh(d, &["qemu-img", "snapshot", "-a", "before", "j.qcow2"]);
    block_on(async {
        let img = Image::open(&path, &opts(true)).await.expect("reopen");
        for (off, p) in WRITES {
            let mut buf = vec![0u8; 4096];
            img.read(beside(off), &mut buf).await.expect("read");
            assert!(buf == vec![0; 4096], "the snapshot changed at {off:#x}");
            let mut buf = vec![0u8; 64 << 10];
            img.read(off, &mut buf).await.expect("read");
            assert!(buf == vec![p; 64 << 10], "the snapshot lost {off:#x}");
        }
        img.close().await.expect("close");
    });
}
