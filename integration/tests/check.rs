//! `qblk check` against `qemu-img check`: the same figures, the same
//! findings count and the same exit code, on clean images of every kind and
//! on images with damage injected the way QEMU's iotests inject it.

use std::fs;
use std::path::Path;

use qblk_integration::{broken, ok, qblk, run, sh};
use serde_json::Value;

fn check_json(program: &str, image: &str, d: &Path) -> (Option<i32>, Value) {
    let out = if program == "qblk" {
        qblk(&["check", "--output", "json", image], d)
    } else if image.starts_with("luks") {
        // qemu-img opens encrypted images only with their key; qblk checks
        // the metadata without one.
        let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=s");
        run(
            "qemu-img",
            &[
                "check",
                "--output=json",
                "--object",
                "secret,id=s,data=pw",
                "--image-opts",
                &opts,
            ],
            d,
        )
    } else {
        run("qemu-img", &["check", "--output=json", image], d)
    };
    // `QBLK_BREAK=check-unparsable` feeds garbage in place of the output,
    // which must fail the test rather than compare equal to more garbage.
    let stdout = if broken("check-unparsable") {
        b"garbage, not JSON".to_vec()
    } else {
        out.stdout
    };
    // Both tools print a JSON report for every image here, damaged or not:
    // output that does not parse is a failure, never a value to compare.
    let mut v: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "{program} check {image}: unparsable output ({e}), exit {:?}:\n\
             stdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let Some(o) = v.as_object_mut() else {
        panic!("{program} check {image}: the JSON report is not an object: {v}");
    };
    o.remove("filename");
    (out.status.code(), v)
}

fn patch(d: &Path, image: &str, at: u64, bytes: &[u8]) {
    let mut b = fs::read(d.join(image)).expect("read");
    let at = at as usize;
    if b.len() < at + bytes.len() {
        b.resize(at + bytes.len(), 0);
    }
    b[at..at + bytes.len()].copy_from_slice(bytes);
    fs::write(d.join(image), b).expect("write");
}

fn be64(d: &Path, image: &str, at: u64) -> u64 {
    let b = fs::read(d.join(image)).expect("read");
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().expect("8 bytes"))
}

#[test]
fn check_matches_qemu_img() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let mut images = Vec::new();

    // Clean images of many kinds.
    for (name, opts) in [
        ("default.qcow2", "cluster_size=64k"),
        ("v2.qcow2", "compat=0.10"),
        ("c512.qcow2", "cluster_size=512,refcount_bits=1"),
        ("rb64.qcow2", "refcount_bits=64,cluster_size=4k"),
        ("ext.qcow2", "extended_l2=on"),
        ("prealloc.qcow2", "preallocation=metadata"),
        ("data.qcow2", "data_file=data.raw"),
    ] {
        sh(
            d,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, name, "8M",
            ],
        );
        sh(
            d,
            &[
                "qemu-io",
                "-c",
                "write -P 1 0 1M",
                "-c",
                "write -P 2 3M 100k",
                "-c",
                "write -z 5M 128k",
                "-c",
                "discard 64k 64k",
                name,
            ],
        );
        images.push(name.to_owned());
    }
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
    sh(d, &["qemu-img", "snapshot", "-c", "s1", "default.qcow2"]);
    sh(d, &["qemu-io", "-c", "write -P 3 0 256k", "default.qcow2"]);
    sh(d, &["qemu-img", "snapshot", "-c", "s2", "default.qcow2"]);
    sh(d, &["qemu-img", "bitmap", "--add", "default.qcow2", "b0"]);
    sh(d, &["qemu-io", "-c", "write -P 4 2M 64k", "default.qcow2"]);
    images.extend(["zlib.qcow2".to_owned(), "zstd.qcow2".to_owned()]);
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "luks.qcow2",
            "8M",
        ],
    );
    images.push("luks.qcow2".to_owned());
    ok(
        qblk(
            &[
                "create",
                "-q",
                "-o",
                "preallocation=full,cluster_size=4k",
                "ours.qcow2",
                "4M",
            ],
            d,
        ),
        "qblk create",
    );
    images.push("ours.qcow2".to_owned());

    // Damaged copies of default.qcow2 (64 KiB clusters, 16-bit refcounts).
    let base = fs::read(d.join("default.qcow2")).expect("read");
    let reftable = be64(d, "default.qcow2", 48);
    let refblock = be64(d, "default.qcow2", reftable);
    let l1 = be64(d, "default.qcow2", 40);
    let l2 = be64(d, "default.qcow2", l1) & 0x00ff_ffff_ffff_fe00;
    let len = base.len() as u64;
    type Damage = Box<dyn Fn(&Path, &str)>;
    let damage: Vec<(&str, Damage)> = vec![
        // A leaked cluster past the data, and one with refcount 2.
        (
            "leak",
            Box::new(move |d, n| {
                patch(d, n, len + 65536 * 2 - 1, &[0]);
                let c = len / 65536;
                patch(d, n, refblock + 2 * c, &1u16.to_be_bytes());
                patch(d, n, refblock + 2 * (c + 1), &2u16.to_be_bytes());
            }),
        ),
        // The L1 table's refcount zeroed (corruption + COPIED mismatch).
        (
            "l1-refcount",
            Box::new(move |d, n| patch(d, n, refblock + 2 * (l1 / 65536), &0u16.to_be_bytes())),
        ),
        // COPIED cleared on a data cluster of the active L2 table (2 MiB,
        // written after the last snapshot, so its refcount is 1).
        (
            "copied",
            Box::new(move |d, n| {
                let e = be64(d, n, l2 + 8 * 32);
                patch(d, n, l2 + 8 * 32, &(e & !(1 << 63)).to_be_bytes());
            }),
        ),
        // Two L2 entries pointing at the same data cluster.
        (
            "shared",
            Box::new(move |d, n| {
                let e = be64(d, n, l2 + 8 * 3);
                patch(d, n, l2 + 8 * 4, &e.to_be_bytes());
            }),
        ),
        // A refcount block beyond the end of the file.
        (
            "refblock-outside",
            Box::new(move |d, n| {
                patch(
                    d,
                    n,
                    reftable + 8,
                    &(len * 4).next_multiple_of(65536).to_be_bytes(),
                )
            }),
        ),
    ];
    for (name, f) in &damage {
        let n = format!("damaged-{name}.qcow2");
        fs::write(d.join(&n), &base).expect("copy");
        f(d, &n);
        images.push(n);
    }
    images.push("default.qcow2".to_owned());

    let mut failures = Vec::new();
    let mut codes = Vec::new();
    for image in &images {
        let (their_code, theirs) = check_json("qemu-img", image, d);
        let (our_code, ours) = check_json("qblk", image, d);
        codes.push(their_code);
        if their_code != our_code || theirs != ours {
            failures.push(format!(
                "{image}: qemu-img exit {their_code:?} {theirs}\n    qblk exit {our_code:?} {ours}"
            ));
        }
    }
    // The damage really is damage: qemu-img sees leaks and corruption.
    assert!(
        codes.contains(&Some(2)) && codes.contains(&Some(3)) && codes.contains(&Some(0)),
        "{codes:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Repair: every damaged image comes out clean under qemu-img check,
    // with -r all; the leaky one with -r leaks too.
    for (name, _) in &damage {
        for mode in ["leaks", "all"] {
            if mode == "leaks" && *name != "leak" {
                continue;
            }
            let n = format!("repair-{mode}-{name}.qcow2");
            fs::copy(d.join(format!("damaged-{name}.qcow2")), d.join(&n)).expect("copy");
            let out = qblk(&["check", "-r", mode, "--output", "json", &n], d);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            assert!(
                v["leaks-fixed"].as_u64().unwrap_or(0)
                    + v["corruptions-fixed"].as_u64().unwrap_or(0)
                    > 0,
                "{n}: {v}"
            );
            let (code, theirs) = check_json("qemu-img", &n, d);
            assert_eq!(code, Some(0), "{n} after repair: {theirs}");
        }
    }

    // Raw images have no check, as in qemu-img.
    sh(d, &["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"]);
    let out = qblk(&["check", "r.raw"], d);
    assert_eq!(out.status.code(), Some(63));
    // A header that does not parse: exit 1 with the field named.
    patch(d, "default.qcow2", 20, &[0, 0, 0, 40]);
    let out = qblk(&["check", "default.qcow2"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("header.cluster_bits"));
}

/// `check -r` clears the corrupt bit once the image is found consistent,
/// as qemu-img does (for `-r leaks` too), so the image is writable again;
/// an image still corrupt after the repair stays marked.
#[test]
fn repair_clears_the_corrupt_bit_as_qemu_img_does() {
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
    sh(d, &["qemu-io", "-c", "write -P 1 0 1M", "base.qcow2"]);
    let base = fs::read(d.join("base.qcow2")).expect("read");
    let len = base.len() as u64;
    let reftable = be64(d, "base.qcow2", 48);
    let refblock = be64(d, "base.qcow2", reftable);
    let l1 = be64(d, "base.qcow2", 40);
    type Damage = Box<dyn Fn(&Path, &str)>;
    let cases: [(&str, Damage); 3] = [
        ("marked", Box::new(|_, _| {})),
        (
            "leak",
            Box::new(move |d, n| {
                patch(d, n, len + 65536 - 1, &[0]);
                patch(d, n, refblock + 2 * (len / 65536), &1u16.to_be_bytes());
            }),
        ),
        (
            "corrupt",
            Box::new(move |d, n| patch(d, n, refblock + 2 * (l1 / 65536), &0u16.to_be_bytes())),
        ),
    ];
    let corrupt_flag = |name: &str| {
        let out = run("qemu-img", &["info", "--output=json", name], d);
        let v: Value = serde_json::from_slice(&out.stdout).expect("info JSON");
        v["format-specific"]["data"]["corrupt"].as_bool()
    };
    let mut cleared = 0;
    for (name, damage) in &cases {
        for mode in ["leaks", "all"] {
            let mut codes = Vec::new();
            let mut flags = Vec::new();
            for program in ["qemu-img", "qblk"] {
                let n = format!("{program}-{mode}-{name}.qcow2");
                fs::write(d.join(&n), &base).expect("copy");
                damage(d, &n);
                patch(d, &n, 79, &[2]); // incompatible bit 1: corrupt
                assert_eq!(corrupt_flag(&n), Some(true), "{n}");
                let args = ["check", "-r", mode, &n];
                let out = if program == "qblk" {
                    qblk(&args, d)
                } else {
                    run("qemu-img", &args, d)
                };
                codes.push(out.status.code());
                let flag = corrupt_flag(&n);
                flags.push(flag);
                // Writable again exactly when no longer marked corrupt.
                let write = run("qemu-io", &["-c", "write -P 5 0 4k", &n], d);
                assert_eq!(
                    write.status.success(),
                    flag == Some(false),
                    "{n}: qemu-io {}",
                    String::from_utf8_lossy(&write.stderr)
                );
                if program == "qblk" && flag == Some(false) {
                    cleared += 1;
                    let check = run("qemu-img", &["check", &n], d);
                    assert_eq!(check.status.code(), Some(0), "{n} after writing");
                }
            }
            assert_eq!(codes[0], codes[1], "{name} -r {mode}: exit codes");
            assert_eq!(flags[0], flags[1], "{name} -r {mode}: corrupt bit after");
        }
    }
    // The cases cover both outcomes.
    assert!((1..6).contains(&cleared), "{cleared} of 6 cleared");
}
