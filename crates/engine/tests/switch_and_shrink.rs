//! Crash ordering of a backing file switch, a shrink and a preallocation.
//!
//! A backing file switch (`qblk rebase`'s last step):
//! data written before `Image::set_backing_file` is durable before the
//! header names the new backing file. Every prefix of the recorded history
//! is cut as a power cut would cut it (unsynced writes lost, whole or torn);
//! wherever the header already names the new backing file, the data must
//! read back.

mod common;

use std::path::Path;

use common::{Lcg, sh};
use qblk_engine::fault::Recorder;
use qblk_engine::image::BackingPolicy;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

const PATTERN: u8 = 0x5a;
/// Guest offset of the copied range: a cluster of its own, not allocated
/// before (so the copy allocates it and a new L2 table).
const AT: u64 = 3 << 20;
const LEN: usize = 128 << 10;

fn no_backing(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        backing: BackingPolicy {
            enabled: false,
            ..BackingPolicy::default()
        },
        ..OpenOptions::default()
    }
}

/// Whether guest bytes at `AT` of the image at `path` read as `PATTERN`.
fn reads_back(path: &Path) -> bool {
    block_on(async {
        let img = Image::open(path, &no_backing(false)).await.expect("open");
        let mut buf = vec![0u8; LEN];
        img.read(AT, &mut buf).await.expect("read");
        buf.iter().all(|&b| b == PATTERN)
    })
}

#[test]
fn data_is_durable_before_the_header_names_the_new_backing_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    for name in ["old.qcow2", "new.qcow2"] {
        sh(d, &["qemu-img", "create", "-q", "-f", "qcow2", name, "8M"]);
    }
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "old.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let path = d.join("top.qcow2");
    let rec = Recorder::attach(&path).expect("attach");
    let p = path.clone();
    block_on(async move {
        let img = Image::open(&p, &no_backing(true)).await.expect("open");
        // What a rebase copies: the old chain's contents, then the switch.
        img.write(AT, &[PATTERN; LEN]).await.expect("write");
        img.set_backing_file(Some("new.qcow2"), Some("qcow2"))
            .await
            .expect("switch");
        img.close().await.expect("close");
    });
    Recorder::detach(&path);
    let events = rec.events();
    let mut switched = 0;
    let mut rng = Lcg(0x2545_f491);
    for cut in 0..=events.len() {
        for _ in 0..8 {
            let bytes = rec.crash_image(cut, &mut |n| rng.next(n));
            let Ok(header) = qblk_qcow2::Header::parse(&bytes) else {
                continue;
            };
            if header.backing_file.as_deref() != Some("new.qcow2") {
                continue;
            }
            switched += 1;
            let crashed = d.join("crashed.qcow2");
            std::fs::write(&crashed, &bytes).expect("write crash image");
            assert!(
                reads_back(&crashed),
                "cut after event {cut} of {}: the header names the new backing file but the copied data is not there",
                events.len()
            );
            let out = sh(d, &["qemu-img", "check", "crashed.qcow2"]);
            assert!(!out.contains("ERROR"), "cut after event {cut}: {out}");
        }
    }
    assert!(switched > 0, "no crash image had the switch");
    let out = sh(d, &["qemu-img", "info", "top.qcow2"]);
    assert!(out.contains("backing file: new.qcow2"), "{out}");
    assert!(out.contains("backing file format: qcow2"), "{out}");
}

/// Crash ordering of a shrink: at every point of its history a power cut
/// leaves an image qemu-img check finds no corruption in (leaks allowed),
/// whose data below the new end reads back.
#[test]
fn a_shrink_cut_anywhere_leaves_a_consistent_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "s.qcow2",
            "24M",
        ],
    );
    common::qemu_io(d, "s.qcow2", &["write -P 90 0 24M", "write -P 91 20M 64k"]);
    let path = d.join("s.qcow2");
    let rec = Recorder::attach(&path).expect("attach");
    let p = path.clone();
    const NEW_SIZE: u64 = 3 << 20;
    block_on(async move {
        let img = Image::open(&p, &no_backing(true)).await.expect("open");
        img.shrink(NEW_SIZE).await.expect("shrink");
        img.close().await.expect("close");
    });
    Recorder::detach(&path);
    let events = rec.events();
    let mut rng = Lcg(0x9e37_79b9);
    for cut in 0..=events.len() {
        for _ in 0..3 {
            let bytes = rec.crash_image(cut, &mut |n| rng.next(n));
            std::fs::write(d.join("crashed.qcow2"), &bytes).expect("write crash image");
            let out = std::process::Command::new("qemu-img")
                .args(["check", "crashed.qcow2"])
                .current_dir(d)
                .output()
                .expect("run qemu-img check");
            let code = out.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "cut after event {cut} of {}: {}{}",
                events.len(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let ok = block_on(async {
                let img = Image::open(&d.join("crashed.qcow2"), &no_backing(false))
                    .await
                    .expect("open");
                let mut buf = vec![0u8; NEW_SIZE as usize];
                img.read(0, &mut buf).await.expect("read");
                buf.iter().all(|&b| b == 90)
            });
            assert!(ok, "cut after event {cut}: data below the new end lost");
        }
    }
    let out = sh(d, &["qemu-img", "check", "s.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// Crash ordering of a preallocation: wherever a power cut falls, the
/// image has no corruption and the preallocated space reads as zeros (the
/// file covers a cluster before an L2 entry maps it).
#[test]
fn a_preallocation_cut_anywhere_reads_zeros() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "p.qcow2",
            "4M",
        ],
    );
    common::qemu_io(d, "p.qcow2", &["write -P 7 0 4M"]);
    let path = d.join("p.qcow2");
    let rec = Recorder::attach(&path).expect("attach");
    let p = path.clone();
    block_on(async move {
        let img = Image::open(&p, &no_backing(true)).await.expect("open");
        img.resize(12 << 20).await.expect("grow");
        img.preallocate(4 << 20, 8 << 20, qblk_engine::Preallocation::Metadata)
            .await
            .expect("preallocate");
        img.close().await.expect("close");
    });
    Recorder::detach(&path);
    let events = rec.events();
    let mut rng = Lcg(0x1234_5678);
    for cut in 0..=events.len() {
        for _ in 0..3 {
            let bytes = rec.crash_image(cut, &mut |n| rng.next(n));
            std::fs::write(d.join("crashed.qcow2"), &bytes).expect("write crash image");
            let out = std::process::Command::new("qemu-img")
                .args(["check", "crashed.qcow2"])
                .current_dir(d)
                .output()
                .expect("run qemu-img check");
            let code = out.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "cut after event {cut} of {}: {}",
                events.len(),
                String::from_utf8_lossy(&out.stdout)
            );
            let (old, new) = block_on(async {
                let img = Image::open(&d.join("crashed.qcow2"), &no_backing(false))
                    .await
                    .expect("open");
                let mut buf = vec![0u8; img.size() as usize];
                img.read(0, &mut buf).await.expect("read");
                let (old, new) = buf.split_at(4 << 20);
                (old.iter().all(|&b| b == 7), new.iter().all(|&b| b == 0))
            });
            assert!(old, "cut after event {cut}: the old data changed");
            assert!(new, "cut after event {cut}: the new space is not zeros");
        }
    }
    let out = sh(d, &["qemu-img", "check", "p.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");
}
