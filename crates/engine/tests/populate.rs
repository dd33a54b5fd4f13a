//! `Image::populate` (a live `block-stream`'s copy) racing guest writes
//! to the same clusters: a guest write always wins over the copy of what
//! the backing file had there, on plain and extended-L2 overlays; and a
//! chain whose backing layer is an image the caller has open for writing
//! (`OpenOptions::shared_layers`) reads what that image has now.

use std::sync::Arc;

use qblk_engine::image::{BackingPolicy, Image, OpenOptions};
use qblk_engine::runtime::block_on;

mod common;
use common::*;

const SIZE: u64 = 8 << 20;

/// What the backing file holds at `offset`: a byte per 512.
fn backing_byte(offset: u64) -> u8 {
    (offset / 512 % 251) as u8 | 1
}

fn race(extended: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let pattern: Vec<u8> = (0..SIZE).map(backing_byte).collect();
    std::fs::write(d.join("base.raw"), &pattern).expect("write base");
    let mut create = vec![
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw",
    ];
    if extended {
        create.extend(["-o", "extended_l2=on,cluster_size=64k"]);
    }
    create.push("top.qcow2");
    sh(d, &create);
    let mut model = pattern.clone();
    block_on(async {
        let img = Image::open(&d.join("top.qcow2"), &writable())
            .await
            .expect("open");
        let mut rng = Lcg(7);
        // Guest writes of 512 bytes to 8 KiB, each landing amid the copy
        // of its cluster.
        let mut writes = Vec::new();
        for i in 0..400u64 {
            let len = (1 + rng.next(16)) * 512;
            let at = rng.next((SIZE - len) / 512) * 512;
            let fill = (i % 200) as u8 + 2;
            writes.push((at, len, fill));
        }
        let guest = async {
            for &(at, len, fill) in &writes {
                img.write(at, &vec![fill; len as usize])
                    .await
                    .expect("write");
            }
        };
        let copy = async {
            let mut at = 0;
            let mut copied = 0;
            while at < SIZE {
                copied += img.populate(at, 256 << 10).await.expect("populate");
                at += 256 << 10;
            }
            copied
        };
        let ((), copied) = futures_util::future::join(guest, copy).await;
        assert!(copied > 0, "nothing copied");
        for &(at, len, fill) in &writes {
            model[at as usize..(at + len) as usize].fill(fill);
        }
        // Everything is in the image now: no range is left to the backing
        // file.
        let mut pos = 0;
        while pos < SIZE {
            let (here, _, n) = img
                .allocation_above(None, pos, SIZE - pos)
                .await
                .expect("status");
            assert!(here, "{pos:#x}+{n:#x} is still left to the backing file");
            pos += n;
        }
        img.close().await.expect("close");
    });
    sh(d, &["qemu-img", "rebase", "-u", "-b", "", "top.qcow2"]);
    let got = sh(d, &["qemu-img", "check", "top.qcow2"]);
    assert!(got.contains("No errors"), "{got}");
    sh(
        d,
        &["qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw"],
    );
    let disk = std::fs::read(d.join("top.raw")).expect("read");
    if let Some(i) = (0..SIZE as usize).find(|&i| disk[i] != model[i]) {
        panic!(
            "byte {i:#x} is {:#x}, the guest's last write or the backing file's {:#x} expected",
            disk[i], model[i]
        );
    }
}

#[test]
fn a_guest_write_wins_over_the_copy_of_the_backing_data() {
    race(false);
}

#[test]
fn a_guest_write_wins_over_the_copy_with_subclusters() {
    race(true);
}

#[test]
fn a_shared_writable_layer_is_read_as_it_is_now() {
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
            "base.qcow2",
            "8M",
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
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            "top.qcow2",
        ],
    );
    block_on(async {
        let base = Arc::new(
            Image::open(&d.join("base.qcow2"), &writable())
                .await
                .expect("open base"),
        );
        let opts = OpenOptions {
            writable: true,
            backing: BackingPolicy::default(),
            shared_layers: vec![base.clone()],
            ..OpenOptions::default()
        };
        // The shared layer is not opened (and locked) again: a second
        // writable open of base.qcow2 would be refused.
        let top = Image::open(&d.join("top.qcow2"), &opts)
            .await
            .expect("open top");
        let mut buf = vec![0u8; 4096];
        // Read once (tables cached), then change the base under it.
        top.read(1 << 20, &mut buf).await.expect("read");
        assert_eq!(buf, vec![0; 4096]);
        base.write(1 << 20, &[0x77; 4096])
            .await
            .expect("write base");
        top.read(1 << 20, &mut buf).await.expect("read");
        assert_eq!(
            buf,
            vec![0x77; 4096],
            "the chain read a stale copy of the base"
        );
        // Its locks are the base's opener's: releasing the top's leaves
        // them, so another writer is still refused.
        top.release_locks().expect("release");
        let again = Image::open(&d.join("base.qcow2"), &writable()).await;
        assert!(again.is_err(), "the base's write lock went with the top's");
        top.close().await.expect("close top");
        base.close().await.expect("close base");
    });
}
