//! `qblk snapshot` against `qemu-img snapshot`: the same steps on two
//! copies of an image — guest writes by qemu-io on both, snapshot
//! operations by qemu-img on one and qblk on the other — give the same
//! exit codes, messages and listings, images `qemu-img check` finds clean
//! after every qblk step, and the same content under `qemu-img compare`,
//! for the active disk and for every snapshot.

use std::path::Path;

use qblk_integration::*;

/// The listing with each row's DATE column masked (taken seconds apart).
fn masked(list: &str) -> String {
    list.lines()
        .map(|l| {
            if l.len() >= 55 && !l.starts_with("ID") && !l.starts_with("Snapshot") {
                format!("{}<date>{}", &l[..35], &l[55..])
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn message(out: &std::process::Output) -> String {
    let s = stderr(out);
    let s = s.trim();
    s.strip_prefix("qemu-img: ")
        .or_else(|| s.strip_prefix("qblk: "))
        .unwrap_or(s)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// `qemu-img snapshot ARGS A` and `qblk snapshot ARGS B`: same exit code,
/// same listing (dates masked), messages that agree up to the reason
/// (qemu-img's reasons are errno strings).
fn both(dir: &Path, args: &[&str], a: &str, b: &str) {
    let mut qa = vec!["snapshot"];
    qa.extend(args);
    qa.push(a);
    let mut qb = vec!["snapshot"];
    qb.extend(args);
    qb.push(b);
    let theirs = run("qemu-img", &qa, dir);
    let ours = qblk(&qb, dir);
    let what = args.join(" ");
    assert_eq!(
        theirs.status.code(),
        ours.status.code(),
        "{what}: exit codes differ\nqemu-img: {}\nqblk: {}",
        stderr(&theirs),
        stderr(&ours)
    );
    if theirs.status.success() {
        assert_eq!(
            masked(&String::from_utf8_lossy(&theirs.stdout)),
            masked(&String::from_utf8_lossy(&ours.stdout)),
            "{what}: output differs"
        );
    } else {
        let (t, o) = (message(&theirs), message(&ours));
        let head = |s: &str| s.split("': ").next().unwrap_or("").to_owned();
        assert!(
            t == o || head(&t) == head(&o),
            "{what}: messages differ\nqemu-img: {t}\nqblk:     {o}"
        );
    }
}

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args = vec!["qemu-io"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    sh(dir, &args);
}

/// The active disks and every snapshot of A and B read the same.
fn same_content(dir: &Path, a: &str, b: &str, snaps: &[&str], what: &str) {
    sh(dir, &["qemu-img", "compare", "-q", a, b]);
    for s in snaps {
        for (img, out) in [(a, "a.snap.raw"), (b, "b.snap.raw")] {
            sh(
                dir,
                &[
                    "qemu-img",
                    "convert",
                    "-l",
                    &format!("snapshot.name={s}"),
                    "-O",
                    "raw",
                    img,
                    out,
                ],
            );
        }
        assert!(
            std::fs::read(dir.join("a.snap.raw")).expect("read")
                == std::fs::read(dir.join("b.snap.raw")).expect("read"),
            "{what}: snapshot {s} reads differently"
        );
    }
}

#[test]
fn snapshot_operations_match_qemu_img() {
    let kinds: &[(&str, &str)] = &[
        ("64k clusters", "cluster_size=64k"),
        ("4k clusters", "cluster_size=4k"),
        ("2M clusters, extended L2", "cluster_size=2M,extended_l2=on"),
        ("version 2", "compat=0.10"),
        ("lazy refcounts", "lazy_refcounts=on"),
        ("64-bit refcounts", "refcount_bits=64"),
        (
            "with a backing file",
            "backing_file=base.qcow2,backing_fmt=qcow2",
        ),
    ];
    for (what, options) in kinds {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        create_qcow2(dir, "base.qcow2", "64M");
        io(dir, "base.qcow2", &["write -P 7 0 64M"]);
        for img in ["a.qcow2", "b.qcow2"] {
            create_qcow2_opts(dir, options, img, "64M");
            io(
                dir,
                img,
                &[
                    "write -P 1 0 1M",
                    "write -P 2 10M 200k",
                    "write -c -P 3 20M 2M",
                ],
            );
        }
        both(dir, &["-l"], "a.qcow2", "b.qcow2");
        both(dir, &["-c", "s1"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        for img in ["a.qcow2", "b.qcow2"] {
            io(
                dir,
                img,
                &[
                    "write -P 4 0 64k",
                    "write -P 5 30M 1M",
                    "write -z 10M 64k",
                    "discard 20M 128k",
                ],
            );
        }
        both(dir, &["-c", "s2"], "a.qcow2", "b.qcow2");
        both(dir, &["-c", "s1"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        for img in ["a.qcow2", "b.qcow2"] {
            io(dir, img, &["write -P 6 512k 1M"]);
        }
        both(dir, &["-l"], "a.qcow2", "b.qcow2");
        same_content(dir, "a.qcow2", "b.qcow2", &["s2"], what);
        both(dir, &["-a", "s2"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        same_content(dir, "a.qcow2", "b.qcow2", &["s2"], what);
        for img in ["a.qcow2", "b.qcow2"] {
            io(dir, img, &["write -P 8 0 2M"]);
        }
        both(dir, &["-d", "s2"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        both(dir, &["-a", "1"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        sh(dir, &["qemu-img", "compare", "-q", "a.qcow2", "b.qcow2"]);
        both(dir, &["-d", "nope"], "a.qcow2", "b.qcow2");
        both(dir, &["-a", "nope"], "a.qcow2", "b.qcow2");
        both(dir, &["-d", "s1"], "a.qcow2", "b.qcow2");
        both(dir, &["-d", "s1"], "a.qcow2", "b.qcow2");
        qemu_check_clean("b.qcow2", dir);
        both(dir, &["-l"], "a.qcow2", "b.qcow2");
        both(dir, &[], "a.qcow2", "b.qcow2");
        sh(dir, &["qemu-img", "compare", "-q", "a.qcow2", "b.qcow2"]);
        // Every cluster a snapshot held is free again.
        let info = qemu_info("b.qcow2", dir);
        let theirs = qemu_info("a.qcow2", dir);
        assert_eq!(info["snapshots"], theirs["snapshots"], "{what}");
    }
}

#[test]
fn snapshot_refusals_match_qemu_img() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for img in ["a.qcow2", "b.qcow2"] {
        create_qcow2_opts(dir, "refcount_bits=1", img, "64M");
        io(dir, img, &["write 0 64k"]);
    }
    both(dir, &["-c", "s"], "a.qcow2", "b.qcow2");
    qemu_check_clean("b.qcow2", dir);
    both(dir, &["-l", "-c", "s"], "a.qcow2", "b.qcow2");
    both(dir, &["-c", "s", "-d", "t"], "a.qcow2", "b.qcow2");
}

#[test]
fn a_snapshot_table_that_lies_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    create_qcow2(dir, "a.qcow2", "64M");
    sh(dir, &["qemu-img", "snapshot", "-c", "s", "a.qcow2"]);
    let path = dir.join("a.qcow2");
    let mut bytes = std::fs::read(&path).expect("read");
    let table = u64::from_be_bytes(bytes[64..72].try_into().expect("8 bytes")) as usize;
    // The entry says it has 2000 bytes of extra data (QEMU's limit is
    // 1024, and the table would run past its end).
    bytes[table + 36..table + 40].copy_from_slice(&2000u32.to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");
    for args in [&["-c", "t"][..], &["-d", "s"], &["-a", "s"], &["-l"]] {
        let mut a = vec!["snapshot"];
        a.extend(args);
        a.push("a.qcow2");
        let out = qblk(&a, dir);
        assert!(
            !out.status.success(),
            "{args:?} accepted a lying snapshot table"
        );
        let msg = stderr(&out);
        assert!(
            msg.contains("snapshot") && msg.contains("0x"),
            "{args:?}: the message names no field and offset: {msg}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "{args:?}: written"
        );
    }
}
