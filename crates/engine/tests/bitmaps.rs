//! Persistent dirty bitmaps (`qblk_engine::bitmaps`): a writer keeps them
//! exactly as QEMU would (same bits for the same writes, zeroes and
//! discards), QEMU reads what it stores, a daemon crash leaves them
//! consistent, and damaged bitmap structures are refused before anything
//! is written.

use std::path::{Path, PathBuf};

use qblk_engine::image::{Image, OpenOptions};
use qblk_engine::runtime::block_on;

mod common;
use common::*;

const SIZE: u64 = 64 << 20;

/// The guest operations both writers perform: (kind, offset, length).
const OPS: [(&str, u64, u64); 6] = [
    ("write", 0, 4096),
    ("write", (5 << 20) + 1536, 7 * 1024),
    ("zero", 20 << 20, 1 << 20),
    ("discard", 40 << 20, 256 << 10),
    ("write", (33 << 20) - 512, 1024),
    ("write", SIZE - 4096, 4096),
];

fn opts(journal: bool) -> OpenOptions {
    OpenOptions {
        crash_journal: journal,
        ..writable()
    }
}

/// An image of `options` with three bitmaps: `b0` (64 KiB granules),
/// `b1` (512 bytes), `off` (disabled).
fn image_with_bitmaps(dir: &Path, name: &str, options: &str) -> PathBuf {
    sh(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", options, name, "64M",
        ],
    );
    sh(dir, &["qemu-img", "bitmap", "--add", name, "b0"]);
    sh(
        dir,
        &["qemu-img", "bitmap", "--add", "-g", "512", name, "b1"],
    );
    sh(
        dir,
        &["qemu-img", "bitmap", "--add", "--disable", name, "off"],
    );
    dir.join(name)
}

/// The operations through qblk's engine.
async fn qblk_ops(img: &Image) {
    for (kind, off, len) in OPS {
        match kind {
            "write" => img.write(off, &vec![0x5a; len as usize]).await,
            "zero" => img.write_zeroes(off, len, true).await,
            _ => img.discard(off, len).await,
        }
        .expect(kind);
    }
}

/// The same operations through QEMU.
fn qemu_ops(dir: &Path, name: &str) {
    let cmds: Vec<String> = OPS
        .iter()
        .map(|(kind, off, len)| match *kind {
            "write" => format!("write -P 0x5a {off} {len}"),
            "zero" => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        })
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, name, &cmds);
}

/// Each bitmap's granularity and bits, as stored in the image (read by
/// opening it for writing and closing it again).
fn stored_bits(path: &Path) -> Vec<(String, u64, Vec<u8>)> {
    block_on(async {
        let img = Image::open(path, &writable()).await.expect("open");
        let mut out = Vec::new();
        for b in img.bitmaps() {
            assert!(
                !b.inconsistent,
                "{}: bitmap {} inconsistent",
                path.display(),
                b.name
            );
            let (g, bits) = img.bitmap_data(&b.name).expect("bits");
            out.push((b.name, g, bits));
        }
        img.close().await.expect("close");
        out
    })
}

/// `qemu-img info`'s flags of each bitmap.
fn qemu_flags(dir: &Path, name: &str) -> Vec<(String, Vec<String>)> {
    let out = sh(dir, &["qemu-img", "info", "--output=json", name]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .expect("flags")
                        .iter()
                        .map(|f| f.as_str().expect("flag").to_owned())
                        .collect();
                    (b["name"].as_str().expect("name").to_owned(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn writes_zeroes_and_discards_set_the_bits_qemu_sets() {
    for options in [
        "cluster_size=64k",
        "cluster_size=4k",
        "cluster_size=128k,extended_l2=on",
        "lazy_refcounts=on",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = image_with_bitmaps(dir.path(), "qblk.qcow2", options);
        image_with_bitmaps(dir.path(), "qemu.qcow2", options);
        block_on(async {
            let img = Image::open(&ours, &opts(true)).await.expect("open");
            // In use on disk before the first write.
            let flags = qemu_flags_shared(dir.path(), "qblk.qcow2");
            assert!(
                flags.iter().all(|(_, f)| f.iter().any(|f| f == "in-use")),
                "{options}: not in use while open: {flags:?}"
            );
            qblk_ops(&img).await;
            img.close().await.expect("close");
        });
        qemu_ops(dir.path(), "qemu.qcow2");
        // Clean, with the bitmaps kept (autoclear bit) and not in use.
        sh(dir.path(), &["qemu-img", "check", "-q", "qblk.qcow2"]);
        assert_eq!(
            qemu_flags(dir.path(), "qblk.qcow2"),
            [
                ("b0".to_owned(), vec!["auto".to_owned()]),
                ("b1".to_owned(), vec!["auto".to_owned()]),
                ("off".to_owned(), vec![]),
            ],
            "{options}"
        );
        let want = stored_bits(&dir.path().join("qemu.qcow2"));
        assert!(
            want[0].2.iter().any(|&b| b != 0) && want[2].2.iter().all(|&b| b == 0),
            "{options}: QEMU's reference bitmaps are not what the test expects"
        );
        assert_eq!(
            stored_bits(&ours),
            want,
            "{options}: bits differ from QEMU's"
        );
        // QEMU reads what qblk stored: its copy of our bitmaps is the same.
        sh(
            dir.path(),
            &[
                "qemu-img",
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "qblk.qcow2",
                "copy.qcow2",
            ],
        );
        assert_eq!(
            stored_bits(&dir.path().join("copy.qcow2")),
            want,
            "{options}: QEMU read qblk's bitmaps differently"
        );
        sh(dir.path(), &["qemu-img", "check", "-q", "qblk.qcow2"]);
    }
}

/// `qemu-img info -U` (the image is open for writing meanwhile).
fn qemu_flags_shared(dir: &Path, name: &str) -> Vec<(String, Vec<String>)> {
    let out = sh(dir, &["qemu-img", "info", "-U", "--output=json", name]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps")
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| f.as_str().expect("flag").to_owned())
                .collect();
            (b["name"].as_str().expect("name").to_owned(), flags)
        })
        .collect()
}

/// Writes through a journaled writer that then crashes (dropped without
/// close), with `between` run before the next writable open.
fn crash_then_reopen(
    between: impl FnOnce(&Path),
) -> (tempfile::TempDir, Vec<qblk_engine::bitmaps::BitmapInfo>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image_with_bitmaps(dir.path(), "qblk.qcow2", "cluster_size=64k");
    image_with_bitmaps(dir.path(), "qemu.qcow2", "cluster_size=64k");
    qemu_ops(dir.path(), "qemu.qcow2");
    block_on(async {
        let img = Image::open(&path, &opts(true)).await.expect("open");
        qblk_ops(&img).await;
        drop(img);
    });
    between(&path);
    let info = block_on(async {
        let img = Image::open(&path, &opts(true)).await.expect("reopen");
        let info = img.bitmaps();
        img.close().await.expect("close");
        info
    });
    (dir, info)
}

#[test]
fn a_daemon_crash_leaves_the_bitmaps_consistent() {
    let (dir, info) = crash_then_reopen(|path| {
        assert!(
            qblk_engine::bitmaps::sidecar(path).exists(),
            "no bitmaps sidecar while the writer ran"
        );
    });
    assert!(info.iter().all(|b| !b.inconsistent), "{info:?}");
    sh(dir.path(), &["qemu-img", "check", "-q", "qblk.qcow2"]);
    assert_eq!(
        stored_bits(&dir.path().join("qblk.qcow2")),
        stored_bits(&dir.path().join("qemu.qcow2")),
        "the bits recovered after the crash differ from QEMU's"
    );
    assert!(
        !qblk_engine::bitmaps::sidecar(&dir.path().join("qblk.qcow2")).exists(),
        "the sidecar outlived a clean close"
    );
}

#[test]
fn without_the_sidecar_a_crash_leaves_them_inconsistent_as_in_qemu() {
    let (dir, info) = crash_then_reopen(|path| {
        std::fs::remove_file(qblk_engine::bitmaps::sidecar(path)).expect("remove sidecar");
    });
    assert!(
        info.iter()
            .filter(|b| b.name != "off")
            .all(|b| b.inconsistent),
        "{info:?}"
    );
    // Kept as found: still in use for QEMU, never trusted.
    let flags = qemu_flags(dir.path(), "qblk.qcow2");
    assert!(
        flags.iter().all(|(_, f)| f.iter().any(|f| f == "in-use")),
        "{flags:?}"
    );
    sh(dir.path(), &["qemu-img", "check", "-q", "qblk.qcow2"]);
}

#[test]
fn bitmaps_a_program_without_bitmap_support_touched_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image_with_bitmaps(dir.path(), "a.qcow2", "cluster_size=64k");
    // Clear the bitmaps autoclear bit, as such a program would.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[95] &= !1;
    std::fs::write(&path, &bytes).expect("write");
    block_on(async {
        let img = Image::open(&path, &writable()).await.expect("open");
        assert!(img.bitmaps().is_empty());
        img.write(0, &[1; 512]).await.expect("write");
        img.close().await.expect("close");
    });
    assert!(qemu_flags(dir.path(), "a.qcow2").is_empty());
}

/// Byte offset of the bitmaps header extension's data.
fn bitmaps_extension(bytes: &[u8]) -> usize {
    let at = bytes
        .windows(4)
        .position(|w| w == 0x2385_2875u32.to_be_bytes())
        .expect("bitmaps extension");
    at + 8
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn damaged_bitmap_structures_are_refused_and_nothing_is_written() {
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "directory on the L1 table",
            |b| {
                let ext = bitmaps_extension(b);
                let l1 = be64(b, 40);
                b[ext + 16..ext + 24].copy_from_slice(&l1.to_be_bytes());
            },
            "bitmaps.bitmap_directory_offset",
        ),
        (
            "table entry past the file",
            |b| {
                let ext = bitmaps_extension(b);
                let dir = be64(b, ext + 16) as usize;
                let table = be64(b, dir) as usize;
                let past = (b.len() as u64).next_multiple_of(65536) + (1 << 20);
                b[table..table + 8].copy_from_slice(&past.to_be_bytes());
            },
            "bitmap_table.entry",
        ),
        (
            "table on the refcount table",
            |b| {
                let ext = bitmaps_extension(b);
                let dir = be64(b, ext + 16) as usize;
                let rt = be64(b, 48);
                b[dir..dir + 8].copy_from_slice(&rt.to_be_bytes());
            },
            "bitmap_directory.bitmap_table_offset",
        ),
    ];
    for (what, damage, field) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_with_bitmaps(dir.path(), "a.qcow2", "cluster_size=64k");
        let mut bytes = std::fs::read(&path).expect("read");
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let err = block_on(Image::open(&path, &writable())).expect_err(what);
        let chain = format!("{err} {:?}", err);
        assert!(chain.contains(field), "{what}: {chain}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "{what}: written"
        );
        // Read-only opens do not use bitmaps and still work.
        block_on(Image::open(&path, &OpenOptions::default())).expect("read-only open");
    }
}
