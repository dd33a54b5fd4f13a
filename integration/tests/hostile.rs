//! Damaged images through `qblk serve`, in the spirit of QEMU's iotests 060,
//! 080, 108, 138 and 261: each is refused at open with a clear error, or
//! served with the damaged requests failing (IOERR) and the rest working;
//! the daemon never crashes or hangs, and `qblk check` flags every one.

use std::path::Path;

use qblk_integration::vhost::{Client, Daemon};
use qblk_integration::{create_qcow2, qblk, qemu_info, sh, stderr};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// How a case must come out.
#[derive(Debug, PartialEq)]
enum Expect {
    /// `qblk serve` exits non-zero before listening; stderr contains this.
    Refused(&'static str),
    /// Served; some reads or writes fail, the rest work.
    Contained,
    /// Served; the damage does not show in requests (as in QEMU), only to
    /// `qblk check`.
    Unseen,
}

/// A 4 MiB image with data in its first MiB (64 KiB clusters): header,
/// refcount table, refcount block, L1, L2, then data.
fn base(d: &Path, name: &str) -> Vec<u8> {
    create_qcow2(d, name, "4M");
    sh(d, &["qemu-io", "-c", "write -P 0x11 0 1M", name]);
    std::fs::read(d.join(name)).expect("read image")
}

#[test]
fn damaged_images_are_refused_or_contained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = base(d, "good.qcow2");
    let l1 = be64(&good, 40) as usize;
    let rt = be64(&good, 48) as usize;
    let l2 = (be64(&good, l1) & !COPIED & ((1 << 56) - 1)) as usize;
    let data0 = (be64(&good, l2) & !COPIED) as usize;

    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "good.qcow2",
            "zip.qcow2",
        ],
    );
    let zip = std::fs::read(d.join("zip.qcow2")).unwrap();
    let zl1 = be64(&zip, 40) as usize;
    let zl2 = (be64(&zip, zl1) & !COPIED) as usize;

    let rb = be64(&good, rt) as usize;
    // 16-bit refcounts: the entry of cluster `c` in the first block.
    let refcount_at = move |c: usize| rb + 2 * c;

    create_qcow2(d, "snap.qcow2", "4M");
    sh(d, &["qemu-io", "-c", "write -P 0x11 0 1M", "snap.qcow2"]);
    sh(d, &["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"]);
    let snap = std::fs::read(d.join("snap.qcow2")).unwrap();
    let snap_table = be64(&snap, 64) as usize;

    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Vec<u8>, Patch, Expect)> = vec![
        (
            "l1_overlaps_header",
            good.clone(),
            Box::new(|b| put64(b, 40, 0)),
            Expect::Refused("L1"),
        ),
        (
            "l1_size_huge",
            good.clone(),
            Box::new(|b| put32(b, 36, 0x7fff_ffff)),
            Expect::Refused("l1_size"),
        ),
        (
            "refcount_table_huge",
            good.clone(),
            Box::new(|b| put32(b, 56, 0x00ff_ffff)),
            Expect::Refused("refcount"),
        ),
        (
            "snapshots_huge",
            good.clone(),
            Box::new(|b| put32(b, 60, 0xffff_ffff)),
            Expect::Refused("snapshot"),
        ),
        (
            "header_length_bad",
            good.clone(),
            Box::new(|b| put32(b, 100, 50)),
            Expect::Refused("header_length"),
        ),
        (
            "unknown_incompatible_bit",
            good.clone(),
            Box::new(|b| put64(b, 72, 1 << 40)),
            Expect::Refused("incompatible"),
        ),
        (
            "refcount_table_misaligned",
            good.clone(),
            Box::new(move |b| put64(b, 48, rt as u64 + 0x200)),
            Expect::Refused("refcount"),
        ),
        (
            "random_bytes",
            good.clone(),
            Box::new(|b| {
                let mut x = 0x1234_5678_u64;
                for byte in b.iter_mut() {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *byte = (x >> 56) as u8;
                }
            }),
            Expect::Refused("qcow2"),
        ),
        (
            "truncated_header",
            good.clone(),
            Box::new(|b| b.truncate(40)),
            Expect::Refused(""),
        ),
        (
            "l2_misaligned",
            good.clone(),
            Box::new(move |b| put64(b, l1, (l2 as u64 + 0x200) | COPIED)),
            Expect::Refused("not a multiple"),
        ),
        (
            "l2_past_end_of_file",
            good.clone(),
            Box::new(move |b| put64(b, l1, (1 << 40) | COPIED)),
            Expect::Refused("past the end of the file"),
        ),
        (
            "refcount_block_is_the_l1_table",
            good.clone(),
            Box::new(move |b| put64(b, rt, l1 as u64)),
            Expect::Refused("points into the L1 table"),
        ),
        (
            "refcount_block_is_an_l2_table",
            good.clone(),
            Box::new(move |b| put64(b, rt, l2 as u64)),
            Expect::Refused("points into a refcount block"),
        ),
        (
            "l2_table_is_the_refcount_table",
            good.clone(),
            Box::new(move |b| put64(b, l1, rt as u64 | COPIED)),
            Expect::Refused("points into the refcount table"),
        ),
        (
            "l2_table_is_the_header",
            good.clone(),
            // Offset 0 means "unallocated"; one cluster on is the header's
            // own cluster only with 512-byte clusters, so aim at the L1.
            Box::new(move |b| put64(b, l1, l1 as u64 | COPIED)),
            Expect::Refused("points into the L1 table"),
        ),
        (
            "refcount_block_past_end_of_file",
            good.clone(),
            Box::new(move |b| put64(b, rt, 1 << 40)),
            Expect::Refused("past the end of the file"),
        ),
        (
            "refcount_block_misaligned",
            good.clone(),
            Box::new(move |b| put64(b, rt, rb as u64 + 0x200)),
            Expect::Refused("refcount"),
        ),
        (
            "cluster_bits_huge",
            good.clone(),
            Box::new(|b| put32(b, 20, 30)),
            Expect::Refused("cluster_bits"),
        ),
        (
            "backing_file_name_too_long",
            good.clone(),
            Box::new(|b| {
                put64(b, 8, 0x1000);
                put32(b, 16, 4096);
            }),
            Expect::Refused("backing"),
        ),
        (
            "l1_past_end_of_file",
            good.clone(),
            Box::new(|b| put64(b, 40, 1 << 40)),
            Expect::Refused("L1"),
        ),
        (
            "snapshot_table_past_end_of_file",
            snap.clone(),
            Box::new(|b| put64(b, 64, 1 << 40)),
            Expect::Refused("snapshot"),
        ),
        (
            "snapshot_l1_table_is_the_refcount_table",
            snap.clone(),
            Box::new(move |b| {
                let rt = be64(b, 48);
                put64(b, snap_table, rt);
            }),
            Expect::Refused("points into the refcount table"),
        ),
        (
            "snapshot_l1_size_huge",
            snap.clone(),
            Box::new(move |b| put32(b, snap_table + 8, 0x7fff_ffff)),
            Expect::Refused("l1_size"),
        ),
        (
            // iotests 138's kind: refcounts that lost a live structure.
            // The allocator must not hand the L2 table out for new data.
            "l2_table_refcount_zero",
            good.clone(),
            Box::new(move |b| b[refcount_at(l2 / 65536)..][..2].fill(0)),
            Expect::Unseen,
        ),
        (
            "l1_table_refcount_zero",
            good.clone(),
            Box::new(move |b| b[refcount_at(l1 / 65536)..][..2].fill(0)),
            Expect::Unseen,
        ),
        (
            "data_points_at_refcount_table",
            good.clone(),
            Box::new(move |b| put64(b, l2, rt as u64 | COPIED)),
            Expect::Contained,
        ),
        (
            "data_cluster_shared",
            good.clone(),
            Box::new(move |b| put64(b, l2 + 8, data0 as u64 | COPIED)),
            Expect::Unseen,
        ),
        (
            "compressed_past_end_of_file",
            zip.clone(),
            Box::new(move |b| {
                let e = be64(b, zl2);
                // Keep the length field, move the offset 1 TiB out.
                put64(b, zl2, (e & !((1 << 54) - 1)) | (1 << 40) | COMPRESSED);
            }),
            Expect::Contained,
        ),
        (
            "truncated_data",
            good.clone(),
            // Reads past the end of the file are zeros (as in QEMU).
            Box::new(move |b| b.truncate(data0 + 4096)),
            Expect::Unseen,
        ),
    ];

    let mut contained = 0;
    let mut wrong = Vec::new();
    for (name, mut bytes, patch, expect) in cases {
        patch(&mut bytes);
        let file = format!("{name}.qcow2");
        std::fs::write(d.join(&file), &bytes).unwrap();
        // qblk check flags every damaged image (before anything serves it).
        let out = qblk(&["check", &file], d);
        assert!(
            !out.status.success(),
            "{name}: qblk check found nothing: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        match (Daemon::try_qblk(d, "h.sock", &[&file]), &expect) {
            (Err((status, log)), Expect::Refused(needle)) => {
                assert!(!status.success(), "{name}: {status}");
                assert!(
                    log.starts_with("qblk: ")
                        && log.contains(&file)
                        && log.to_lowercase().contains(&needle.to_lowercase()),
                    "{name}: unclear refusal: {log}"
                );
                assert!(
                    std::fs::read(d.join(&file)).unwrap() == bytes,
                    "{name}: a refused image was written"
                );
            }
            (Ok(mut daemon), Expect::Contained | Expect::Unseen) => {
                let mut c = Client::connect(&daemon.socket, 1).unwrap();
                // Every 64 KiB of the disk, then writes over the damage and
                // beside it: each request completes, some fail.
                let mut failed = 0;
                let mut ok = 0;
                for at in (0..4u64 << 20).step_by(65536) {
                    if c.read(at, 0, 65536) == 0 {
                        ok += 1
                    } else {
                        failed += 1
                    }
                }
                c.buf()[..65536].fill(0x77);
                for at in [0u64, 65536, 3 << 20] {
                    if c.write(at, 0, 65536) == 0 {
                        ok += 1
                    } else {
                        failed += 1
                    }
                }
                let _ = c.flush();
                // Still serving: the healthy end of the disk reads.
                assert_eq!(
                    c.read((4 << 20) - 65536, 0, 65536),
                    0,
                    "{name}: {}",
                    daemon.log()
                );
                drop(c);
                match expect {
                    Expect::Contained => assert!(failed > 0, "{name}: nothing failed ({ok} ok)"),
                    _ => assert_eq!(failed, 0, "{name}: requests failed: {}", daemon.log()),
                }
                assert!(ok > 0, "{name}: nothing worked");
                assert!(daemon.alive(), "{name}: daemon died: {}", daemon.log());
                if name.ends_with("_refcount_zero") {
                    let log = daemon.log();
                    assert!(log.contains("not reusing it"), "{name}: {log}");
                }
                assert!(daemon.stop().success(), "{name}: {}", daemon.log());
                if name != "truncated_data" {
                    // Nothing written through the damage reached the data
                    // beside it (the writes were to 0, 64 KiB and 3 MiB).
                    let out = sh(
                        d,
                        &[
                            "qemu-io",
                            "-r",
                            "-f",
                            "qcow2",
                            "-c",
                            "read -P 0x11 128k 896k",
                            &file,
                        ],
                    );
                    assert!(
                        !out.contains("verification failed"),
                        "{name}: data lost: {out}\n{}",
                        daemon.log()
                    );
                }
                if name == "data_points_at_refcount_table" {
                    // A guest write aimed at metadata is refused and the
                    // image marked corrupt (later opens are read-only).
                    let info = qemu_info(&file, d);
                    assert_eq!(
                        info["format-specific"]["data"]["corrupt"],
                        serde_json::json!(true),
                        "{name}: {info}"
                    );
                }
                let after = std::fs::read(d.join(&file)).unwrap();
                // Nothing went where the damage pointed: the refcount table
                // a data entry named is byte-for-byte what it was, and no
                // write landed at the bogus offsets 1 TiB out.
                let own_rt = be64(&bytes, 48) as usize;
                let rt_len = 65536 * be32(&bytes, 56) as usize;
                assert_eq!(
                    after[own_rt..own_rt + rt_len],
                    bytes[own_rt..own_rt + rt_len],
                    "{name}: the refcount table changed"
                );
                assert!(
                    (after.len() as u64) < 1 << 30,
                    "{name}: the file grew to {} bytes",
                    after.len()
                );
                contained += 1;
            }
            (Ok(mut daemon), Expect::Refused(_)) => {
                let _ = daemon.stop();
                wrong.push(format!("{name}: served, but should have been refused"));
            }
            (Err((_, log)), Expect::Contained | Expect::Unseen) => {
                wrong.push(format!(
                    "{name}: refused, but should have been served: {log}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(contained, 6, "cases served");
}
