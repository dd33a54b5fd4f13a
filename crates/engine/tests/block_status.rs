//! `Image::block_status`: QEMU's answer for a run of a backing chain, on
//! the cases where it is not simply "what the map says": zeros beyond a
//! shorter backing file count as allocated there, the end of the image is
//! flagged, runs stop at an L2 table's end and where host clusters stop
//! being contiguous, and host holes count only in images that look
//! preallocated.

use std::path::Path;

use qblk_engine::image::BackingPolicy;
use qblk_engine::map::BlockStatus;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

mod common;
use common::*;

fn statuses(dir: &Path, image: &str) -> Vec<(u64, BlockStatus, u64)> {
    let path = dir.join(image);
    block_on(async move {
        let opts = OpenOptions {
            backing: BackingPolicy {
                allow_any_dir: true,
                ..BackingPolicy::default()
            },
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &opts).await.expect("open");
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < img.size() {
            let (s, len) = img
                .block_status(pos, img.size() - pos)
                .await
                .expect("status");
            assert!(len > 0, "no progress at {pos}");
            out.push((pos, s, len));
            pos += len;
        }
        out
    })
}

const ZERO: BlockStatus = BlockStatus {
    data: false,
    zero: true,
    offset_valid: false,
    allocated: false,
    eof: false,
};

#[test]
fn block_status_follows_qemu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();

    // A 4 MiB overlay over a 1 MiB base: zeros from nowhere (the base's
    // answer, which ends at the base's end: QEMU keeps that end flag), then
    // zeros the short base decides (allocated), up to the end.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "base.qcow2",
            "1M",
        ],
    );
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    assert_eq!(
        statuses(d, "top.qcow2"),
        vec![
            (0, BlockStatus { eof: true, ..ZERO }, 1 << 20),
            (
                1 << 20,
                BlockStatus {
                    allocated: true,
                    eof: true,
                    ..ZERO
                },
                3 << 20
            ),
        ]
    );

    // 512-byte clusters: an L2 table maps 32 KiB, so 64 KiB of contiguous
    // data is two runs; the second ends the image.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "small.qcow2",
            "64k",
        ],
    );
    qemu_io(d, "small.qcow2", &["write -P 1 0 64k"]);
    let data = BlockStatus {
        data: true,
        zero: false,
        offset_valid: true,
        allocated: true,
        eof: false,
    };
    assert_eq!(
        statuses(d, "small.qcow2"),
        vec![
            (0, data, 32 << 10),
            (32 << 10, BlockStatus { eof: true, ..data }, 32 << 10),
        ]
    );

    // Clusters written back to front lie in reverse on the host: one run
    // each.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "rev.qcow2",
            "192k",
        ],
    );
    qemu_io(
        d,
        "rev.qcow2",
        &[
            "write -P 1 128k 64k",
            "write -P 1 64k 64k",
            "write -P 1 0 64k",
        ],
    );
    let runs: Vec<u64> = statuses(d, "rev.qcow2").iter().map(|r| r.2).collect();
    assert_eq!(runs, vec![64 << 10; 3]);

    // A data cluster with a host hole in it: zeros only where QEMU asks the
    // host file (images that look preallocated: the small one, whose
    // metadata clusters are mostly holes too); data in the large one.
    // Which is which depends on the file system's allocation, so qemu-img
    // map says what to expect.
    for (name, size, data) in [
        ("holes-small.qcow2", "1M", "128k"),
        ("holes-big.qcow2", "8M", "6M"),
    ] {
        sh(d, &["qemu-img", "create", "-q", "-f", "qcow2", name, size]);
        qemu_io(d, name, &[&format!("write -P 1 0 {data}")]);
        let at = statuses(d, name)[0];
        let host = 5 << 16; // after header, refcount table and block, L1, L2
        sh(
            d,
            &[
                "fallocate",
                "-p",
                "-o",
                &(host + 4096).to_string(),
                "-l",
                "16384",
                name,
            ],
        );
        let map = sh(d, &["qemu-img", "map", "--output=json", name]);
        let qemu_zero = map
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("\"zero\": true, \"data\": true"));
        let after = statuses(d, name);
        assert!(at.1.data && !at.1.zero, "{name}: {at:?}");
        if qemu_zero {
            // The run stops at the hole, which reads as zeros.
            assert_eq!(
                (after[0].2, after[1].0, after[1].2),
                (4096, 4096, 16384),
                "{name}: {after:?}"
            );
            assert!(after[1].1.data && after[1].1.zero, "{name}: {after:?}");
        } else {
            assert_eq!(
                after[0], at,
                "{name}: the hole is data, as qemu-img map says:\n{map}"
            );
        }
    }
}
