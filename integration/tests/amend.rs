//! `qblk amend` against `qemu-img amend`: the same options on two copies of
//! an image (with data, zero clusters and a snapshot) give the same exit
//! code and message, the same format options under `qemu-img info`, the
//! same content under `qemu-img compare` (the snapshot's too), and an image
//! `qemu-img check` finds clean.

use std::path::Path;

use qblk_integration::*;
use serde_json::Value;

fn message(out: &std::process::Output) -> String {
    let s = stderr(out);
    s.trim()
        .strip_prefix("qemu-img: ")
        .or_else(|| s.trim().strip_prefix("qblk: "))
        .unwrap_or(s.trim())
        .replace("\nTry 'qemu-img --help' for more information", "")
}

/// The format options qemu-img reports.
fn format_options(dir: &Path, image: &str) -> Value {
    let mut v = qemu_info(image, dir);
    let mut d = v["format-specific"]["data"].take();
    if let Some(o) = d.as_object_mut() {
        o.remove("bitmaps");
        // Each copy has its own data file, named after it.
        if let Some(f) = o.get_mut("data-file") {
            if f.as_str() == Some(&format!("{image}.raw")) {
                *f = Value::from("<own>.raw");
            }
        }
    }
    serde_json::json!({ "size": v["virtual-size"], "data": d })
}

/// Sets up `a.qcow2` and `b.qcow2` the same way.
fn images(dir: &Path, options: &str, snapshot: bool) {
    create_qcow2(dir, "base.qcow2", "64M");
    sh(dir, &["qemu-io", "-c", "write -P 9 0 64M", "base.qcow2"]);
    for img in ["a.qcow2", "b.qcow2"] {
        create_qcow2_opts(dir, options, img, "64M");
        let mut cmds = vec![
            "write -P 1 0 1M",
            "write -P 2 4M 256k",
            "write -z 4M 64k",
            "write -z -u 8M 128k",
            "write -z -u 12M 64k",
        ];
        if options.contains("compat=0.10") {
            cmds.retain(|c| !c.starts_with("write -z"));
        }
        let mut args = vec!["qemu-io"];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        sh(dir, &args);
        if snapshot {
            sh(dir, &["qemu-img", "snapshot", "-c", "s", img]);
            sh(
                dir,
                &[
                    "qemu-io",
                    "-c",
                    "write -z 0 64k",
                    "-c",
                    "write -P 3 20M 64k",
                    img,
                ],
            );
        }
    }
}

/// Snapshot `s` of `image` as raw bytes, if it has one.
fn snapshot_bytes(dir: &Path, image: &str) -> Option<Vec<u8>> {
    let snaps = qemu_info(image, dir)["snapshots"].clone();
    if snaps.as_array().is_none_or(|s| s.is_empty()) {
        return None;
    }
    let out = format!("{image}.snap.raw");
    sh(
        dir,
        &[
            "qemu-img",
            "convert",
            "-l",
            "snapshot.name=s",
            "-O",
            "raw",
            image,
            &out,
        ],
    );
    Some(std::fs::read(dir.join(&out)).expect("read"))
}

fn both(dir: &Path, options: &str, what: &str) {
    let snapshot_before = snapshot_bytes(dir, "b.qcow2");
    let theirs = run("qemu-img", &["amend", "-o", options, "a.qcow2"], dir);
    let ours = qblk(&["amend", "-o", options, "b.qcow2"], dir);
    assert_eq!(
        theirs.status.code(),
        ours.status.code(),
        "{what} / {options}: exit codes differ\nqemu-img: {}\nqblk: {}",
        stderr(&theirs),
        stderr(&ours)
    );
    if !theirs.status.success() {
        let (t, o) = (message(&theirs), message(&ours));
        // qemu-img names the cluster it met first; the reason must agree.
        let head = |s: &str| s.split(": Cluster at").next().unwrap_or("").to_owned();
        assert_eq!(head(&t), head(&o), "{what} / {options}: messages differ");
        return;
    }
    assert_eq!(
        format_options(dir, "a.qcow2"),
        format_options(dir, "b.qcow2"),
        "{what} / {options}: format options differ"
    );
    qemu_check_clean("b.qcow2", dir);
    sh(dir, &["qemu-img", "compare", "-q", "a.qcow2", "b.qcow2"]);
    // Against the snapshot as it was, not against qemu-img's result: QEMU
    // 7.2's downgrade writes zeros into a preallocated zero cluster that a
    // snapshot still reads as data (the "write -z 0 64k" after the
    // snapshot here), and so changes the snapshot.
    // (After a resize qemu-img reads the snapshot at the new size: the
    // part past the old one must read as zeros.)
    let after = snapshot_bytes(dir, "b.qcow2");
    let same = match (&after, &snapshot_before) {
        (Some(a), Some(b)) if a.len() >= b.len() => {
            a[..b.len()] == b[..] && a[b.len()..].iter().all(|&x| x == 0)
        }
        (a, b) => a == b,
    };
    assert!(
        same,
        "{what} / {options}: the snapshot reads differently after the amend"
    );
}

#[test]
fn amend_matches_qemu_img() {
    let cases: &[(&str, &str, bool, &[&str])] = &[
        (
            "version 3 with a snapshot",
            "cluster_size=64k",
            true,
            &[
                "compat=0.10",
                "refcount_bits=1",
                "refcount_bits=64",
                "refcount_bits=8,lazy_refcounts=on",
                "lazy_refcounts=on",
                "size=128M",
                "compat=0.10,refcount_bits=16",
                "refcount_bits=3",
            ],
        ),
        (
            "version 3, 4k clusters",
            "cluster_size=4k",
            false,
            &["compat=0.10", "refcount_bits=2"],
        ),
        (
            "over a backing file",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            true,
            &["compat=0.10"],
        ),
        (
            "version 2",
            "compat=0.10",
            true,
            &[
                "compat=1.1",
                "lazy_refcounts=on",
                "compat=1.1,lazy_refcounts=on",
                "refcount_bits=8",
            ],
        ),
        (
            "64-bit refcounts",
            "refcount_bits=64",
            false,
            &["compat=0.10", "compat=0.10,refcount_bits=16"],
        ),
        ("extended L2", "extended_l2=on", false, &["compat=0.10"]),
        ("zstd", "compression_type=zstd", false, &["compat=0.10"]),
        (
            "external data file",
            "data_file=data.raw",
            false,
            &[
                "data_file=other.raw",
                "data_file_raw=on",
                "data_file_raw=off",
                "compat=0.10",
            ],
        ),
        (
            "refusals",
            "cluster_size=64k",
            false,
            &[
                "data_file=x.raw",
                "data_file_raw=on",
                "cluster_size=4k",
                "backing_file=foo",
                "bogus=1",
                "compat=2",
                "preallocation=full",
            ],
        ),
    ];
    for (what, create, snapshot, amends) in cases {
        for options in *amends {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path();
            if create.contains("data_file") {
                for img in ["a.qcow2", "b.qcow2"] {
                    let o = create.replace("data.raw", &format!("{img}.raw"));
                    create_qcow2_opts(dir, &o, img, "64M");
                    sh(dir, &["qemu-io", "-c", "write -P 1 0 1M", img]);
                }
                if options.starts_with("data_file=") {
                    std::fs::copy(dir.join("a.qcow2.raw"), dir.join("other.raw")).expect("copy");
                }
            } else {
                images(dir, create, *snapshot);
            }
            both(dir, options, what);
        }
    }
}

#[test]
fn amend_without_options_is_refused_like_qemu_img() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    create_qcow2(dir, "a.qcow2", "64M");
    let theirs = run("qemu-img", &["amend", "a.qcow2"], dir);
    let ours = qblk(&["amend", "a.qcow2"], dir);
    assert_eq!(theirs.status.code(), ours.status.code());
    assert_eq!(message(&theirs), message(&ours));
}

#[test]
fn a_downgrade_of_an_image_with_bitmaps_is_refused_and_writes_nothing() {
    // qemu-img accepts it and leaves bitmaps no version 2 reader keeps
    // (every later open warns, their clusters leak); qblk refuses.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    create_qcow2(dir, "b.qcow2", "64M");
    sh(dir, &["qemu-img", "bitmap", "--add", "b.qcow2", "bm"]);
    let out = qblk(&["amend", "-o", "compat=0.10", "b.qcow2"], dir);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("persistent bitmaps"),
        "{}",
        stderr(&out)
    );
    // The open for amending wrote nothing that matters: still version 3
    // with its bitmap, clean.
    let v = qemu_info("b.qcow2", dir);
    assert_eq!(v["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(v["format-specific"]["data"]["bitmaps"][0]["name"], "bm");
    qemu_check_clean("b.qcow2", dir);
}
