//! Differential test of the write path: random writes, many in flight,
//! through the engine and into an in-memory model of the disk, on every
//! image kind; then `qemu-img check` must find nothing wrong and
//! `qemu-img compare` must find the image equal to the model.

use std::path::Path;
use std::process::Command;

use qblk_engine::file::CacheMode;
use qblk_engine::image::BackingPolicy;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

mod common;
use common::*;

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<u8>),
    Zeroes { unmap: bool, len: u64 },
    Discard { len: u64 },
}

impl Op {
    fn len(&self) -> u64 {
        match self {
            Op::Write(d) => d.len() as u64,
            Op::Zeroes { len, .. } | Op::Discard { len } => *len,
        }
    }
}

/// One batch of operations with disjoint byte ranges (so the model's result
/// does not depend on completion order); several may share a cluster.
fn batch(rng: &mut Lcg, size: u64, cluster: u64) -> Vec<(u64, Op)> {
    let mut out: Vec<(u64, Op)> = Vec::new();
    for _ in 0..16 {
        let len = match rng.next(4) {
            0 => 1 + rng.next(4096),
            1 => 512 * (1 + rng.next(16)),
            2 => cluster * (1 + rng.next(3)),
            _ => 1 + rng.next(3 * cluster),
        }
        .min(size);
        // Cluster-local offsets make same-cluster neighbours likely.
        let off = if rng.next(2) == 0 {
            rng.next(size - len + 1)
        } else {
            let c = rng.next(size / cluster.max(1) + 1) * cluster;
            (c + rng.next(cluster)).min(size - len)
        };
        if out
            .iter()
            .any(|(o, op)| off < o + op.len() && *o < off + len)
        {
            continue;
        }
        let op = match rng.next(10) {
            0 => Op::Zeroes {
                unmap: rng.next(2) == 0,
                len,
            },
            1 => Op::Discard { len },
            _ => {
                let fill = (rng.next(255) + 1) as u8;
                Op::Write(
                    (0..len)
                        .map(|i| fill.wrapping_add((i / 512) as u8))
                        .collect(),
                )
            }
        };
        out.push((off, op));
    }
    out
}

/// Applies an operation to the model disk. A discard zeroes the whole
/// clusters inside its range, unless the image ignores discards.
fn apply(model: &mut [u8], off: u64, op: &Op, cluster: u64, discards: bool) {
    let size = model.len() as u64;
    match op {
        Op::Write(d) => model[off as usize..off as usize + d.len()].copy_from_slice(d),
        Op::Zeroes { len, .. } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { len } => {
            if !discards {
                return;
            }
            let start = off.next_multiple_of(cluster);
            let end = off + len;
            let mut c = start;
            while c < end && (c + cluster <= end || end == size) {
                let e = (c + cluster).min(size);
                model[c as usize..e as usize].fill(0);
                c += cluster;
            }
        }
    }
}

fn exercise(dir: &Path, image: &str, seed: u64, rounds: usize, discards: bool) {
    exercise_with(dir, image, seed, rounds, &[], discards);
}

/// Like [`exercise`], first writing `prefill` (offset, length, byte).
fn exercise_with(
    dir: &Path,
    image: &str,
    seed: u64,
    rounds: usize,
    prefill: &[(u64, usize, u8)],
    discards: bool,
) {
    let model_path = dir.join(format!("{image}.model"));
    sh(
        dir,
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            image,
            model_path.to_str().expect("utf-8"),
        ],
    );
    let mut model = std::fs::read(&model_path).expect("model");
    let path = dir.join(image);
    let info = sh(dir, &["qemu-img", "info", "--output=json", image]);
    let cluster: u64 = info
        .split("\"cluster-size\": ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("cluster size");
    let size = model.len() as u64;
    let model_ref = &mut model;
    block_on(async move {
        let opts = OpenOptions {
            writable: true,
            cache: CacheMode::None,
            backing: BackingPolicy {
                allow_any_dir: true,
                ..BackingPolicy::default()
            },
            // Small cache: evictions and reloads of clean tables.
            l2_cache_bytes: 2 * cluster,
            // And a tiny refcount cache: blocks are evicted and reloaded.
            refcount_cache_bytes: cluster,
            key: None,
            force_share: false,
            crash_journal: false,
            shared_layers: Vec::new(),
        };
        let img = std::rc::Rc::new(
            Image::open(&path, &opts)
                .await
                .unwrap_or_else(|e| panic!("{image}: {e:?}")),
        );
        for &(off, len, byte) in prefill {
            let data = vec![byte; len];
            img.write(off, &data)
                .await
                .unwrap_or_else(|e| panic!("{image}: prefill: {e:?}"));
            model_ref[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let mut rng = Lcg(seed);
        for round in 0..rounds {
            let ops = batch(&mut rng, size, cluster);
            let mut tasks = Vec::new();
            // Writebacks run beside the batch's allocations (the allocator
            // lock is not held across their I/O): flushes mixed in.
            let flush_at: Vec<usize> = (0..rng.next(3))
                .map(|_| rng.next(ops.len() as u64 + 1) as usize)
                .collect();
            for (i, (off, op)) in ops.clone().into_iter().enumerate() {
                for _ in flush_at.iter().filter(|&&at| at == i) {
                    let img = img.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        img.flush()
                            .await
                            .map_err(|e| format!("concurrent flush: {e:?}"))
                    }));
                }
                let img = img.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let r = match &op {
                        Op::Write(data) => img.write(off, data).await,
                        Op::Zeroes { unmap, len } => img.write_zeroes(off, *len, *unmap).await,
                        Op::Discard { len } => img.discard(off, *len).await,
                    };
                    r.map_err(|e| format!("{op:?} at {off:#x}: {e:?}"))
                }));
            }
            for t in tasks {
                t.await
                    .expect("task")
                    .unwrap_or_else(|e| panic!("{image} round {round}: {e}"));
            }
            for (off, op) in &ops {
                apply(model_ref, *off, op, cluster, discards);
            }
            if rng.next(4) == 0 {
                img.flush()
                    .await
                    .unwrap_or_else(|e| panic!("{image}: flush: {e:?}"));
            }
            // Spot-check reads against the model while writes accumulate.
            for _ in 0..4 {
                let off = rng.next(size);
                let len = 1 + rng.next((size - off).min(200_000));
                let mut buf = vec![0u8; len as usize];
                img.read(off, &mut buf)
                    .await
                    .unwrap_or_else(|e| panic!("{image}: read: {e:?}"));
                assert!(
                    buf == model_ref[off as usize..(off + len) as usize],
                    "{image} round {round}: read [{off:#x}, +{len:#x}) differs"
                );
            }
        }
        img.close()
            .await
            .unwrap_or_else(|e| panic!("{image}: close: {e:?}"));
    });
    std::fs::write(&model_path, &model).expect("write model");
    let report = sh(dir, &["qemu-img", "check", "--output=json", image]);
    assert!(
        !report.contains("\"corruptions\"") && !report.contains("\"leaks\""),
        "{image}: qemu-img check: {report}"
    );
    // qblk's own check agrees.
    let ours = block_on(qblk_engine::check::check(
        &dir.join(image),
        CacheMode::None,
        false,
    ))
    .expect("qblk check");
    assert_eq!(
        (ours.corruptions, ours.leaks),
        (0, 0),
        "{image}: qblk check: {:?}",
        ours.messages
    );
    sh(
        dir,
        &[
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image,
            model_path.to_str().expect("utf-8"),
        ],
    );
}

#[test]
fn random_writes_match_the_model_on_every_image_kind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let mut images: Vec<(&str, usize)> = Vec::new();
    for (name, opts, size) in [
        ("default.qcow2", "cluster_size=64k", "24M"),
        ("v2.qcow2", "compat=0.10,cluster_size=4k", "8M"),
        ("c512.qcow2", "cluster_size=512,refcount_bits=64", "4M"),
        ("rb1.qcow2", "refcount_bits=1,cluster_size=16k", "8M"),
        ("c2m.qcow2", "cluster_size=2M", "20M"),
        ("ext.qcow2", "extended_l2=on,cluster_size=32k", "8M"),
        (
            "prealloc.qcow2",
            "preallocation=metadata,cluster_size=16k",
            "8M",
        ),
        ("data.qcow2", "data_file=data.raw,cluster_size=16k", "8M"),
        (
            "dataraw.qcow2",
            "data_file=dataraw.raw,data_file_raw=on",
            "8M",
        ),
        ("odd.qcow2", "cluster_size=64k", "8388609"),
        ("lazy.qcow2", "lazy_refcounts=on,cluster_size=16k", "8M"),
        ("rb2.qcow2", "refcount_bits=2,cluster_size=8k", "4M"),
        ("rb4.qcow2", "refcount_bits=4,cluster_size=4k", "4M"),
        ("rb8.qcow2", "refcount_bits=8", "8M"),
        ("rb32.qcow2", "refcount_bits=32,cluster_size=1k", "2M"),
    ] {
        sh(
            d,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, name, size,
            ],
        );
        images.push((name, 12));
    }
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 7 0 2M",
            "-c",
            "write -z 2M 1M",
            "prealloc.qcow2",
        ],
    );

    // Backing chain with an extended-L2 top: COW from the backing file.
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "base.raw", "8M"],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 8M",
            "base.raw",
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
            "base.raw",
            "-F",
            "raw",
            "-o",
            "extended_l2=on",
            "top-ext.qcow2",
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
            "base.raw",
            "-F",
            "raw",
            "-o",
            "compat=0.10",
            "top-v2.qcow2",
        ],
    );
    images.extend([("top-ext.qcow2", 12), ("top-v2.qcow2", 12)]);

    // Clusters and L2 tables shared with internal snapshots.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "snap.qcow2",
            "8M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 0x31 0 8M", "snap.qcow2"]);
    sh(d, &["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"]);
    images.push(("snap.qcow2", 12));

    // Overwriting compressed clusters (zlib and zstd).
    sh(d, &["qemu-io", "-c", "write -P 0x42 0 4M", "default.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "default.qcow2",
            "zlib.qcow2",
        ],
    );
    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "default.qcow2",
            "zstd.qcow2",
        ],
    );
    images.extend([("zlib.qcow2", 12), ("zstd.qcow2", 12)]);

    for (i, (image, rounds)) in images.into_iter().enumerate() {
        // Discards are advisory where a zero flag cannot express them.
        let discards = !image.starts_with("data") && image != "top-v2.qcow2";
        exercise(d, image, 0x5eed + i as u64, rounds, discards);
    }
}

/// 512-byte clusters with 64-bit refcounts: one refcount table cluster
/// covers only 2 MiB of host file, so filling the disk grows the table
/// (several times) while writes are in flight.
#[test]
fn refcount_table_grows_under_load() {
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
            "cluster_size=512,refcount_bits=64",
            "grow.qcow2",
            "12M",
        ],
    );
    let before = std::fs::read(d.join("grow.qcow2")).expect("read");
    exercise_with(
        d,
        "grow.qcow2",
        7,
        20,
        &[(0, 5 << 20, 0x77), (7 << 20, 3 << 20, 0x88)],
        true,
    );
    let after = std::fs::read(d.join("grow.qcow2")).expect("read");
    let field = |b: &[u8], at: usize| {
        u64::from(u32::from_be_bytes(
            b[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    // refcount_table_clusters (header offset 56) must have grown.
    assert!(
        field(&after, 56) > field(&before, 56),
        "refcount table did not grow"
    );
}

/// Invariant 6: a request that finds metadata inconsistent fails, the
/// corrupt bit is set, no further write is accepted, and reads of intact
/// clusters still work.
#[test]
fn inconsistent_metadata_marks_the_image_corrupt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
    );
    sh(d, &["qemu-io", "-c", "write -P 9 0 256k", "c.qcow2"]);
    // Set a reserved bit in the L2 entry of guest cluster 1.
    let bytes = std::fs::read(d.join("c.qcow2")).expect("read");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8"));
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().expect("8"))
        & 0x00ff_ffff_ffff_fe00;
    let mut b = bytes.clone();
    b[l2 as usize + 8 + 7] |= 0x02;
    std::fs::write(d.join("c.qcow2"), b).expect("write");
    let path = d.join("c.qcow2");
    block_on(async move {
        let opts = writable();
        let img = Image::open(&path, &opts).await.expect("open");
        let e = img
            .write(65536 + 10, b"xyz")
            .await
            .expect_err("corrupt entry");
        assert!(
            matches!(e, qblk_engine::image::Error::Corrupt { .. }),
            "{e:?}"
        );
        let e = img
            .write(0, b"abc")
            .await
            .expect_err("writes refused after corruption");
        assert!(
            matches!(e, qblk_engine::image::Error::MarkedCorrupt { .. }),
            "{e:?}"
        );
        let mut buf = vec![0u8; 4096];
        img.read(0, &mut buf).await.expect("intact cluster reads");
        assert!(buf.iter().all(|&x| x == 9));
        assert!(img.stats().l2_misses > 0);
    });
    let info = sh(d, &["qemu-img", "info", "--output=json", "c.qcow2"]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
    // A corrupt image is read-only from then on.
    let path = d.join("c.qcow2");
    block_on(async move {
        let opts = writable();
        let e = Image::open(&path, &opts)
            .await
            .expect_err("writable open of a corrupt image");
        assert!(format!("{e}").contains("corrupt"), "{e}");
        let img = Image::open(&path, &OpenOptions::default())
            .await
            .expect("read-only open");
        let mut buf = vec![0u8; 4096];
        img.read(0, &mut buf).await.expect("read");
    });
}

/// Invariant 5: a dirty image (lazy refcounts, crashed) gets its refcounts
/// rebuilt when opened for writing, and is consistent afterwards.
#[test]
fn dirty_image_is_repaired_before_writing() {
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
            "lazy_refcounts=on",
            "dirty.qcow2",
            "8M",
        ],
    );
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x21 0 3M",
            "-c",
            "flush",
            "-c",
            "write -P 0x22 4M 1M",
            "-c",
            "abort",
            "dirty.qcow2",
        ])
        .current_dir(d)
        .output();
    let info = sh(d, &["qemu-img", "info", "--output=json", "dirty.qcow2"]);
    assert!(
        info.contains("\"dirty-flag\": true"),
        "the test needs a dirty image: {info}"
    );
    exercise(d, "dirty.qcow2", 99, 8, true);
    let info = sh(d, &["qemu-img", "info", "--output=json", "dirty.qcow2"]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
}

/// Growing the disk: with 512-byte clusters one L1 cluster maps only
/// 2 MiB, so growing from 1 MiB to 10 MiB moves the L1 table; the new space
/// reads as zeros (or the shorter backing file's end), takes writes, and
/// the image stays consistent. A raw data file grows with the disk.
#[test]
fn resize_grows_the_disk() {
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
            "cluster_size=512",
            "small.qcow2",
            "1M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 0x61 0 1M", "small.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=grow.raw,data_file_raw=on",
            "raw.qcow2",
            "1M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 0x62 0 1M", "raw.qcow2"]);
    for image in ["small.qcow2", "raw.qcow2"] {
        let path = d.join(image);
        block_on(async move {
            let opts = writable();
            let img = Image::open(&path, &opts).await.expect("open");
            assert!(img.resize(1000).await.is_err(), "not a multiple of 512");
            assert!(img.resize(512 << 10).await.is_err(), "shrinking");
            img.resize(10 << 20).await.expect("grow");
            assert_eq!(img.size(), 10 << 20);
            let mut buf = vec![0u8; 64 << 10];
            img.read((1 << 20) - 4096, &mut buf)
                .await
                .expect("read across the old end");
            assert!(buf[..4096].iter().all(|&b| b != 0) && buf[4096..].iter().all(|&b| b == 0));
            img.write(9 << 20, &[0x63; 100_000])
                .await
                .expect("write in the new space");
            img.flush().await.expect("flush");
        });
        let info = sh(d, &["qemu-img", "info", "--output=json", image]);
        assert!(info.contains("\"virtual-size\": 10485760"), "{info}");
        sh(d, &["qemu-img", "check", image]);
        let text = sh(
            d,
            &[
                "qemu-io",
                "-c",
                "read -P 0x63 9M 100000",
                "-c",
                "read -P 0 1M 8M",
                image,
            ],
        );
        assert!(
            !text.contains("Pattern verification failed"),
            "{image}: {text}"
        );
    }
    assert_eq!(
        std::fs::metadata(d.join("grow.raw")).expect("stat").len(),
        10 << 20
    );
}

/// Lazy refcounts: flushes leave refcount blocks in memory behind a durable
/// dirty bit; close writes them and clears it; an image dropped without
/// close is rebuilt on the next writable open, and nothing written before a
/// completed flush is lost.
#[test]
fn lazy_refcounts_defer_until_close() {
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
            "lazy_refcounts=on",
            "lazy.qcow2",
            "16M",
        ],
    );
    let path = d.join("lazy.qcow2");
    let p2 = path.clone();
    let lazy_writes = block_on(async move {
        let opts = writable();
        let img = Image::open(&p2, &opts).await.expect("open");
        for i in 0..40u64 {
            img.write(i * 300_000, &[i as u8 + 1; 5000])
                .await
                .expect("write");
            img.flush().await.expect("flush");
        }
        let stats = img.stats();
        // Dropped without close, as a crash would leave it.
        stats.metadata_writes
    });
    let info = sh(d, &["qemu-img", "info", "--output=json", "lazy.qcow2"]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    // The same workload without lazy refcounts writes more metadata.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "eager.qcow2",
            "16M",
        ],
    );
    let p3 = d.join("eager.qcow2");
    let eager_writes = block_on(async move {
        let opts = writable();
        let img = Image::open(&p3, &opts).await.expect("open");
        for i in 0..40u64 {
            img.write(i * 300_000, &[i as u8 + 1; 5000])
                .await
                .expect("write");
            img.flush().await.expect("flush");
        }
        img.close().await.expect("close");
        img.stats().metadata_writes
    });
    assert!(
        lazy_writes < eager_writes,
        "lazy {lazy_writes} vs eager {eager_writes}"
    );
    // Reopen: refcounts rebuilt; every flushed write is there.
    block_on(async move {
        let opts = writable();
        let img = Image::open(&path, &opts).await.expect("reopen dirty image");
        for i in 0..40u64 {
            let mut buf = vec![0u8; 5000];
            img.read(i * 300_000, &mut buf).await.expect("read");
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "write {i} lost");
        }
        img.close().await.expect("close");
    });
    let info = sh(d, &["qemu-img", "info", "--output=json", "lazy.qcow2"]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    sh(d, &["qemu-img", "check", "lazy.qcow2"]);
}

/// LUKS-encrypted images (what `qemu-img create -o encrypt.format=luks`
/// makes): unlocked with the key they read back exactly what qemu-io wrote,
/// take writes (partial sectors included) that QEMU then reads back, stay
/// consistent; a wrong key is refused, and without a key only the metadata
/// is readable.
#[test]
fn luks_images_read_and_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let secret = "secret,id=s,data=pw";
    let opts = |image: &str| format!("driver=qcow2,file.filename={image},encrypt.key-secret=s");
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "luks.qcow2",
            "8M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "--object",
            secret,
            "--image-opts",
            &opts("luks.qcow2"),
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 1536k 4k",
            "-c",
            "write -z 3M 64k",
        ],
    );
    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "--object",
            secret,
            "--image-opts",
            &opts("luks.qcow2"),
            "-O",
            "raw",
            "model.raw",
        ],
    );
    let mut model = std::fs::read(d.join("model.raw")).expect("model");
    let path = d.join("luks.qcow2");
    let model_ref = &mut model;
    block_on(async move {
        let wrong = OpenOptions {
            writable: true,
            key: Some(qblk_engine::image::Secret(b"nope".to_vec())),
            ..OpenOptions::default()
        };
        let e = Image::open(&path, &wrong).await.expect_err("wrong key");
        assert!(format!("{e}").contains("key"), "{e}");
        let keyless = Image::open(&path, &OpenOptions::default())
            .await
            .expect("metadata without a key");
        let mut buf = vec![0u8; 512];
        assert!(keyless.read(0, &mut buf).await.is_err());
        assert!(!keyless.map().await.expect("map without a key").is_empty());
        drop(keyless);

        let opts = OpenOptions {
            writable: true,
            key: Some(qblk_engine::image::Secret(b"pw".to_vec())),
            ..OpenOptions::default()
        };
        let img = std::rc::Rc::new(Image::open(&path, &opts).await.expect("open with key"));
        let mut all = vec![0u8; model_ref.len()];
        img.read(0, &mut all).await.expect("read");
        assert!(all == *model_ref, "decrypted contents differ from qemu's");
        let mut rng = Lcg(42);
        for _ in 0..8 {
            let ops = batch(&mut rng, model_ref.len() as u64, 65536);
            let mut tasks = Vec::new();
            for (off, op) in ops.clone() {
                let img = img.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    match &op {
                        Op::Write(data) => img.write(off, data).await,
                        Op::Zeroes { unmap, len } => img.write_zeroes(off, *len, *unmap).await,
                        Op::Discard { len } => img.discard(off, *len).await,
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task").expect("op");
            }
            for (off, op) in &ops {
                apply(model_ref, *off, op, 65536, true);
            }
        }
        let mut all = vec![0u8; model_ref.len()];
        img.read(0, &mut all).await.expect("read");
        assert!(
            all == *model_ref,
            "read-back after writes differs from the model"
        );
        img.close().await.expect("close");
    });
    std::fs::write(d.join("model.raw"), &model).expect("write model");
    sh(
        d,
        &[
            "qemu-img",
            "compare",
            "--object",
            secret,
            "--image-opts",
            &opts("luks.qcow2"),
            "driver=raw,file.filename=model.raw",
        ],
    );
    sh(
        d,
        &[
            "qemu-img",
            "check",
            "--object",
            secret,
            "--image-opts",
            &opts("luks.qcow2"),
        ],
    );
}

/// An L2 entry that points guest data at the image's own L1 table (or
/// header, or refcount table) is corruption: the write is refused, the
/// image marked corrupt, and the L1 table survives.
#[test]
fn guest_data_never_overwrites_metadata() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "m.qcow2", "4M"],
    );
    sh(d, &["qemu-io", "-c", "write -P 7 0 128k", "m.qcow2"]);
    let bytes = std::fs::read(d.join("m.qcow2")).expect("read");
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
    let l1 = be(40);
    let l2 = be(l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let mut b = bytes.clone();
    // Guest cluster 1 -> the L1 table's cluster, COPIED.
    b[l2 as usize + 8..l2 as usize + 16].copy_from_slice(&((1u64 << 63) | l1).to_be_bytes());
    std::fs::write(d.join("m.qcow2"), &b).expect("write");
    let path = d.join("m.qcow2");
    block_on(async move {
        let opts = writable();
        let img = Image::open(&path, &opts).await.expect("open");
        let e = img
            .write(65536, &[1u8; 4096])
            .await
            .expect_err("write onto the L1 table");
        assert!(format!("{e}").contains("L1 table"), "{e}");
    });
    let after = std::fs::read(d.join("m.qcow2")).expect("read");
    assert_eq!(
        &after[l1 as usize..l1 as usize + 8],
        &b[l1 as usize..l1 as usize + 8],
        "L1 table overwritten"
    );
    let info = sh(d, &["qemu-img", "info", "--output=json", "m.qcow2"]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

type Model = std::collections::HashMap<u64, u8>;

const SLICE_CS: u64 = 65536;
const TABLE_SPAN: u64 = 512 << 20;

/// Reads 4 KiB at `at` and compares with the model.
async fn check_at(img: &Image, model: &Model, at: u64) {
    let want = model.get(&at).copied().unwrap_or(0);
    let mut buf = vec![0u8; 4096];
    img.read(at, &mut buf).await.expect("read");
    assert!(
        buf.iter().all(|&b| b == want),
        "at {at:#x}: read {:#x}, wrote {want:#x}",
        buf[0]
    );
}

/// Writes to the last table and flushes: that table takes the one place
/// for whole tables.
async fn evict(img: &Image, n: u8) {
    let at = 7 * TABLE_SPAN + u64::from(n) * SLICE_CS;
    img.write(at, &[n; 4096]).await.expect("write elsewhere");
    img.flush().await.expect("flush");
}

/// Writes a new fill at `at`, flushes, and notes it in the model.
async fn step(img: &Image, model: &mut Model, n: &mut u8, at: u64) {
    *n = n.wrapping_add(1).max(1);
    model.insert(at, *n);
    img.write(at, &[*n; 4096]).await.expect("write");
    img.flush().await.expect("flush");
}

/// Guest reads that miss load 4 KiB slices of L2 tables into a cache of
/// their own. A slice must never outlive a change of its table: with room
/// for one whole table only, a table that leaves the table cache and is
/// read again comes from slices — which must show what the last writeback
/// wrote, not what the table held when the slice was read. Allocations,
/// discards, a snapshot's copy-on-write and tables freed and taken again
/// all change tables whose slices were cached; every read must agree with
/// the model, and qemu-img must find the image clean.
#[test]
fn l2_slices_never_outlive_their_tables() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    // 64 KiB clusters: one L2 table maps 512 MiB; eight of them.
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4G"],
    );
    let image = d.join("s.qcow2");
    let cs = SLICE_CS;
    block_on(async move {
        let opts = OpenOptions {
            // One whole table, and slices.
            l2_cache_bytes: 4 * cs,
            ..writable()
        };
        let img = Image::open(&image, &opts).await.expect("open");
        let mut model = Model::new();
        let mut n = 1u8;
        for round in 0..3u64 {
            for t in 0..4u64 {
                let base = t * TABLE_SPAN + round * 8 * cs;
                // The table exists; a slice of it is read while it is out
                // of the table cache ...
                step(&img, &mut model, &mut n, base).await;
                evict(&img, (t * 3 + round) as u8).await;
                check_at(&img, &model, base + cs).await;
                // ... then the table changes (an allocation in the same
                // slice), is written back and leaves the cache again.
                step(&img, &mut model, &mut n, base + cs).await;
                evict(&img, (t * 3 + round + 100) as u8).await;
                check_at(&img, &model, base + cs).await;
                check_at(&img, &model, base).await;
                // A discard changes it too.
                img.discard(base, cs).await.expect("discard");
                img.flush().await.expect("flush");
                model.remove(&base);
                evict(&img, (t * 3 + round + 50) as u8).await;
                check_at(&img, &model, base).await;
            }
            // Every table is shared with a snapshot: the next write to
            // each copies it elsewhere.
            img.snapshot_create(&format!("s{round}"))
                .await
                .expect("snapshot");
            for t in 0..4u64 {
                let at = t * TABLE_SPAN + round * 8 * cs + 2 * cs;
                check_at(&img, &model, at).await;
                step(&img, &mut model, &mut n, at).await;
                evict(&img, (t + 200) as u8).await;
                check_at(&img, &model, at).await;
                check_at(&img, &model, t * TABLE_SPAN + round * 8 * cs + cs).await;
            }
        }
        // Deleting the snapshots frees the tables they alone held; new
        // tables may take their clusters.
        for round in 0..3u64 {
            img.snapshot_delete(&format!("s{round}"))
                .await
                .expect("delete");
        }
        for t in 4..7u64 {
            step(&img, &mut model, &mut n, t * TABLE_SPAN).await;
            evict(&img, (t + 220) as u8).await;
        }
        for &at in model.clone().keys() {
            check_at(&img, &model, at).await;
        }
        img.close().await.expect("close");
    });
    sh(d, &["qemu-img", "check", "s.qcow2"]);
}
