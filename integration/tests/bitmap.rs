//! `qblk bitmap` against `qemu-img bitmap`: the same command lines on two
//! copies of an image give the same exit codes and messages, and images
//! QEMU reads the same way — bitmap flags and granularities from `qemu-img
//! info`, every bitmap's dirty ranges from an NBD export of it by
//! qemu-storage-daemon (`qemu-img map` with `x-dirty-bitmap`) — and that
//! `qemu-img check` finds clean.

use qblk_integration::*;
use serde_json::Value;
use std::path::Path;

/// Bitmaps as `qemu-img info` lists them: name, granularity, flags.
fn bitmaps(dir: &Path, image: &str) -> Vec<(String, u64, Vec<String>)> {
    let v = qemu_info(image, dir);
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().expect("name").to_owned(),
                b["granularity"].as_u64().expect("granularity"),
                b["flags"]
                    .as_array()
                    .expect("flags")
                    .iter()
                    .map(|f| f.as_str().expect("flag").to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// Every bitmap's flags, granularity and dirty ranges, as QEMU reads them.
fn qemu_view(dir: &Path, image: &str) -> Vec<(String, u64, Vec<String>, Value)> {
    let list = bitmaps(dir, image);
    let names: Vec<String> = list.iter().map(|b| b.0.clone()).collect();
    // An inconsistent bitmap cannot be exported; flags say enough then.
    let exportable: Vec<String> = list
        .iter()
        .filter(|b| !b.2.iter().any(|f| f == "in-use"))
        .map(|b| b.0.clone())
        .collect();
    let export = (!exportable.is_empty()).then(|| BitmapExport::start(dir, image, &exportable));
    list.into_iter()
        .zip(names)
        .map(|((n, g, f), name)| {
            let map = match &export {
                Some(e) if exportable.contains(&name) => e.dirty_map(dir, &name),
                _ => Value::Null,
            };
            (n, g, f, map)
        })
        .collect()
}

/// The message of a failed run, without the program's name.
fn message(out: &std::process::Output) -> String {
    let s = stderr(out);
    let s = s.trim();
    s.strip_prefix("qemu-img: ")
        .or_else(|| s.strip_prefix("qblk: "))
        .unwrap_or(s)
        .to_owned()
}

/// Same outcome: both succeed, or both fail with the same exit code and a
/// message that agrees (qemu-img's names block nodes in the middle of
/// some; the operation and the final reason must be the same).
fn same_outcome(theirs: &std::process::Output, ours: &std::process::Output, what: &str) {
    assert_eq!(
        theirs.status.code(),
        ours.status.code(),
        "{what}: exit codes differ\nqemu-img: {}\nqblk: {}",
        stderr(theirs),
        stderr(ours)
    );
    if !theirs.status.success() {
        let (t, o) = (message(theirs), message(ours));
        let head = |s: &str| s.split(" failed: ").next().unwrap_or("").to_owned();
        let tail = |s: &str| s.rsplit(": ").next().unwrap_or("").to_owned();
        assert!(
            t == o || (head(&t) == head(&o) && tail(&t) == tail(&o)),
            "{what}: messages differ\nqemu-img: {t}\nqblk:     {o}"
        );
    }
}

/// Runs `args` as `qemu-img bitmap` on `a` and as `qblk bitmap` on `b`.
fn both(dir: &Path, args: &[&str], a: &str, b: &str) {
    let swap = |img: &str| -> Vec<String> {
        args.iter()
            .map(|x| {
                if *x == "IMG" {
                    img.to_owned()
                } else {
                    (*x).to_owned()
                }
            })
            .collect()
    };
    let qa = swap(a);
    let qb = swap(b);
    let mut qemu_args = vec!["bitmap"];
    qemu_args.extend(qa.iter().map(String::as_str));
    let mut qblk_args = vec!["bitmap"];
    qblk_args.extend(qb.iter().map(String::as_str));
    let theirs = run("qemu-img", &qemu_args, dir);
    let ours = qblk(&qblk_args, dir);
    same_outcome(&theirs, &ours, &args.join(" "));
}

fn assert_same_images(dir: &Path, a: &str, b: &str, what: &str) {
    let (t, o) = (qemu_view(dir, a), qemu_view(dir, b));
    assert_eq!(t, o, "{what}: QEMU reads the bitmaps differently");
    qemu_check_clean(b, dir);
}

#[test]
fn bitmap_operations_match_qemu_img() {
    for options in ["cluster_size=64k", "cluster_size=4k", "lazy_refcounts=on"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        create_qcow2_opts(dir, options, "a.qcow2", "64M");
        create_qcow2_opts(dir, options, "b.qcow2", "64M");
        create_qcow2_opts(dir, options, "src.qcow2", "64M");
        sh(
            dir,
            &["qemu-img", "bitmap", "--add", "-g", "512", "src.qcow2", "s"],
        );
        sh(
            dir,
            &[
                "qemu-io",
                "-c",
                "write 1M 3k",
                "-c",
                "write 9M 70k",
                "src.qcow2",
            ],
        );
        let steps: &[&[&str]] = &[
            &["--add", "IMG", "b0"],
            &["--add", "-g", "512", "IMG", "b1"],
            &["--add", "--disable", "-g", "128k", "IMG", "off"],
            &["--add", "IMG", "b0"],
            &["--remove", "IMG", "nope"],
            &["--add", "-g", "1000", "IMG", "g"],
            &["--add", "IMG", ""],
            &["--clear", "IMG", "nope"],
            &["IMG", "b0"],
            &["--remove", "-g", "64k", "IMG", "b0"],
            &["-F", "qcow2", "--add", "IMG", "x"],
            &["--disable", "IMG", "b0", "extra"],
        ];
        for step in steps {
            both(dir, step, "a.qcow2", "b.qcow2");
        }
        assert_same_images(dir, "a.qcow2", "b.qcow2", options);
        // Guest writes (QEMU's, on both), then operations on the bits.
        for img in ["a.qcow2", "b.qcow2"] {
            sh(
                dir,
                &[
                    "qemu-io",
                    "-c",
                    "write 0 4k",
                    "-c",
                    "write 5M 100k",
                    "-c",
                    "write -z 30M 1M",
                    "-c",
                    "discard 60M 64k",
                    img,
                ],
            );
        }
        let steps: &[&[&str]] = &[
            &["--merge", "b1", "IMG", "off"],
            &["--clear", "IMG", "b1"],
            &[
                "--merge",
                "s",
                "-b",
                "src.qcow2",
                "-F",
                "qcow2",
                "IMG",
                "b1",
            ],
            &["--merge=b0", "IMG", "b1"],
            &["--enable", "IMG", "off"],
            &["--disable", "IMG", "b0"],
            &["--merge", "nope", "IMG", "b0"],
            &["--merge", "s", "-b", "missing.qcow2", "IMG", "b0"],
        ];
        for step in steps {
            both(dir, step, "a.qcow2", "b.qcow2");
        }
        assert_same_images(dir, "a.qcow2", "b.qcow2", options);
        let view = qemu_view(dir, "b.qcow2");
        assert!(
            view.iter()
                .any(|b| b.3.as_array().is_some_and(|m| m.len() > 1)),
            "{options}: no bitmap has dirty ranges; the comparison proves nothing: {view:?}"
        );
        both(dir, &["--remove", "IMG", "b1"], "a.qcow2", "b.qcow2");
        both(dir, &["--remove", "IMG", "off"], "a.qcow2", "b.qcow2");
        both(dir, &["--remove", "IMG", "b0"], "a.qcow2", "b.qcow2");
        assert_same_images(dir, "a.qcow2", "b.qcow2", options);
        assert!(bitmaps(dir, "b.qcow2").is_empty());
    }
}

#[test]
fn bitmaps_are_refused_where_qemu_img_refuses_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for name in ["a.qcow2", "b.qcow2"] {
        create_qcow2_opts(dir, "compat=0.10", name, "64M");
    }
    both(dir, &["--add", "IMG", "x"], "a.qcow2", "b.qcow2");
    for name in ["a.raw", "b.raw"] {
        sh(dir, &["qemu-img", "create", "-q", "-f", "raw", name, "64M"]);
    }
    both(dir, &["--add", "-f", "raw", "IMG", "r"], "a.raw", "b.raw");
}
