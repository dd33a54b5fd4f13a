//! `qblk compare` and `qblk measure` against qemu-img 7.2 as the oracle:
//! the same stdout, byte for byte, and the same exit code, over the image
//! kinds of the create matrix (cluster sizes, refcount widths, compat
//! levels, lazy refcounts, extended L2, zstd, every preallocation mode,
//! external data files, qcow2 and raw backing files shorter and longer
//! than the overlay), each holding data, zero clusters and discarded
//! ranges, compared with copies, raw conversions, compressed copies,
//! copies that differ in one byte, and larger copies; and on damaged
//! images.

use std::path::Path;

use qblk_integration::{broken, qblk, run, sh};

/// One kind of image: qemu-img create options, size and what lies below.
struct Kind {
    name: &'static str,
    opts: &'static str,
    size: &'static str,
    /// A backing file (format, size) made first and named `NAME.base`.
    backing: Option<(&'static str, &'static str)>,
}

const fn kind(name: &'static str, opts: &'static str, size: &'static str) -> Kind {
    Kind {
        name,
        opts,
        size,
        backing: None,
    }
}

const KINDS: &[Kind] = &[
    kind("c512-rb1", "cluster_size=512,refcount_bits=1", "8M"),
    kind("c4k-rb64", "cluster_size=4k,refcount_bits=64", "8M"),
    kind("c64k", "cluster_size=64k", "8M"),
    kind("c2M-rb8", "cluster_size=2M,refcount_bits=8", "8M"),
    kind("v2", "compat=0.10", "8M"),
    kind("lazy", "lazy_refcounts=on", "8M"),
    kind("ext", "extended_l2=on", "8M"),
    kind("ext16k", "extended_l2=on,cluster_size=16k", "8M"),
    kind("zstd", "compression_type=zstd", "8M"),
    kind("meta", "preallocation=metadata", "8M"),
    kind("falloc", "preallocation=falloc", "8M"),
    kind("full", "preallocation=full", "8M"),
    kind("data", "data_file=data.data", "8M"),
    kind("dataraw", "data_file=dataraw.data,data_file_raw=on", "8M"),
    kind("unaligned", "cluster_size=4k", "8193k"),
    Kind {
        name: "short-base",
        opts: "cluster_size=64k",
        size: "8M",
        backing: Some(("qcow2", "4M")),
    },
    Kind {
        name: "long-base",
        opts: "extended_l2=on",
        size: "8M",
        backing: Some(("raw", "12M")),
    },
];

/// stdout and exit code of one run.
fn outcome(out: std::process::Output) -> (String, Option<i32>) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

/// Runs `qemu-img SUB ARGS` and `qblk SUB ARGS`; a difference in stdout or
/// exit code is a failure.
fn both(d: &Path, sub: &str, args: &[&str], failures: &mut Vec<String>) -> Option<i32> {
    let mut full = vec![sub];
    full.extend_from_slice(args);
    let theirs = outcome(run("qemu-img", &full, d));
    let ours = outcome(qblk(&full, d));
    // `QBLK_BREAK=compare-offset` moves qblk's mismatch offsets by a
    // sector, which the comparison must catch.
    let ours = if broken("compare-offset") && ours.0.contains("mismatch at offset") {
        (ours.0.replace("offset ", "offset 512"), ours.1)
    } else {
        ours
    };
    if theirs != ours {
        failures.push(format!(
            "{}\n    qemu-img: {:?} exit {:?}\n    qblk:     {:?} exit {:?}",
            full.join(" "),
            theirs.0,
            theirs.1,
            ours.0,
            ours.1
        ));
    }
    theirs.1
}

/// Makes the image of one kind and its variants; returns the names of the
/// images to compare it with.
fn make(d: &Path, k: &Kind) -> Vec<String> {
    let n = k.name;
    let img = format!("{n}.qcow2");
    let mut opts = k.opts.to_owned();
    if let Some((fmt, size)) = k.backing {
        let base = format!("{n}.base");
        sh(d, &["qemu-img", "create", "-q", "-f", fmt, &base, size]);
        sh(
            d,
            &[
                "qemu-io",
                "-f",
                fmt,
                "-c",
                "write -P 5 0 512k",
                "-c",
                "write -P 6 3M 1M",
                &base,
            ],
        );
        opts = format!("{opts},backing_file={base},backing_fmt={fmt}");
    }
    sh(
        d,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, &img, k.size,
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 64k 1M",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 2 3M 4k",
            "-c",
            "write -P 0 5M 64k",
            "-c",
            "discard 512k 64k",
            "-c",
            "write -z -u 6M 64k",
            &img,
        ],
    );
    let mut others = Vec::new();
    let mut derive = |name: String, args: &[&str]| {
        let mut cmd = vec!["qemu-img"];
        cmd.extend_from_slice(args);
        sh(d, &cmd);
        others.push(name);
    };
    let copy = format!("{n}.copy.qcow2");
    derive(copy.clone(), &["convert", "-O", "qcow2", &img, &copy]);
    let raw = format!("{n}.raw");
    derive(raw.clone(), &["convert", "-O", "raw", &img, &raw]);
    let z = format!("{n}.z.qcow2");
    derive(z.clone(), &["convert", "-c", "-O", "qcow2", &img, &z]);
    // One byte different, inside data, and in a range that reads as zeros.
    for (tag, at) in [("diff", "3000000"), ("diffz", "7340033")] {
        let v = format!("{n}.{tag}.qcow2");
        derive(v.clone(), &["convert", "-O", "qcow2", &img, &v]);
        sh(d, &["qemu-io", "-c", &format!("write -P 9 {at} 1"), &v]);
    }
    // Larger: zeros beyond the smaller image's end, then not.
    let big = format!("{n}.big.qcow2");
    derive(big.clone(), &["convert", "-O", "qcow2", &img, &big]);
    sh(d, &["qemu-img", "resize", "-q", &big, "+1M"]);
    let dirty = format!("{n}.bigdirty.qcow2");
    derive(dirty.clone(), &["convert", "-O", "qcow2", &big, &dirty]);
    sh(d, &["qemu-io", "-c", "write -P 7 8704k 512", &dirty]);
    others
}

#[test]
fn compare_matches_qemu_img() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let mut failures = Vec::new();
    let mut codes = std::collections::BTreeSet::new();
    for k in KINDS {
        let img = format!("{}.qcow2", k.name);
        let others = make(d, k);
        for other in std::iter::once(&img).chain(&others) {
            for strict in [false, true] {
                for (a, b) in [(&img, other), (other, &img)] {
                    let mut args = vec![];
                    if strict {
                        args.push("-s");
                    }
                    args.extend([a.as_str(), b.as_str()]);
                    codes.insert(both(d, "compare", &args, &mut failures));
                }
            }
        }
        // -q prints nothing, -f/-F name the formats.
        let raw = format!("{}.raw", k.name);
        both(d, "compare", &["-q", &img, &raw], &mut failures);
        both(
            d,
            "compare",
            &["-f", "qcow2", "-F", "raw", &img, &raw],
            &mut failures,
        );
    }
    // The verdicts really vary.
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(1)),
        "{codes:?}"
    );
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Damaged and missing images: the same exit code (2 cannot open, 3 block
/// status failed, 4 read failed) and a clear message, never a panic.
#[test]
fn compare_refuses_damage_as_qemu_img_does() {
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
            "good.qcow2",
            "8M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 1 0 1M", "good.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "good.qcow2",
            "z.qcow2",
        ],
    );
    let bytes = std::fs::read(d.join("good.qcow2")).expect("read");
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let patched = |name: &str, b: &[u8], at: usize, v: u64| {
        let mut b = b.to_vec();
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(d.join(name), b).expect("write");
    };
    // An L2 entry whose host offset is not cluster aligned: block status
    // fails (3).
    patched(
        "unaligned.qcow2",
        &bytes,
        l2 + 24,
        be64(&bytes, l2 + 24) + 512,
    );
    // A compressed cluster that does not decompress: the read fails (4).
    let mut z = std::fs::read(d.join("z.qcow2")).expect("read");
    let zl1 = be64(&z, 40) as usize;
    let zl2 = (be64(&z, zl1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&z, zl2) & ((1 << 54) - 1)) as usize;
    z[data..data + 64].fill(0xff);
    std::fs::write(d.join("zbad.qcow2"), z).expect("write");
    // A header cut short, and no file at all: cannot open (2).
    std::fs::write(d.join("short.qcow2"), &bytes[..100]).expect("write");

    let mut failures = Vec::new();
    for (image, code) in [
        ("unaligned.qcow2", 3),
        ("zbad.qcow2", 4),
        ("short.qcow2", 2),
        ("missing.qcow2", 2),
    ] {
        let theirs = both(
            d,
            "compare",
            &["-F", "qcow2", "good.qcow2", image],
            &mut failures,
        );
        assert_eq!(theirs, Some(code), "qemu-img compare -F qcow2 {image}");
        let theirs = both(d, "compare", &["good.qcow2", image], &mut failures);
        assert_eq!(theirs, Some(code), "qemu-img compare {image}");
        let out = qblk(&["compare", "good.qcow2", image], d);
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains(image), "{image}: the error names it: {msg}");
    }
    // A format qblk does not read: an image it cannot open.
    let theirs = both(
        d,
        "compare",
        &["-f", "vmdk", "good.qcow2", "good.qcow2"],
        &mut failures,
    );
    assert_eq!(theirs, Some(2));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn measure_matches_qemu_img() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let mut failures = Vec::new();
    let targets: &[&[&str]] = &[
        &[],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
        &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=64"],
        &["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=8"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
        &["-O", "qcow2", "-o", "preallocation=metadata"],
        &["-O", "qcow2", "-o", "preallocation=falloc"],
        &["-O", "qcow2", "-o", "preallocation=full"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "backing_file=elsewhere.qcow2"],
        &["-O", "raw"],
    ];
    for k in KINDS {
        let img = format!("{}.qcow2", k.name);
        let others = make(d, k);
        for source in std::iter::once(&img).chain(&others) {
            for t in targets {
                let mut args = t.to_vec();
                args.push("--output=json");
                args.push(source);
                both(d, "measure", &args, &mut failures);
            }
        }
        // Human output.
        both(d, "measure", &["-O", "qcow2", &img], &mut failures);
    }
    // Persistent bitmaps: counted for qcow2 version 3 targets.
    sh(
        d,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "bm.qcow2", "100M",
        ],
    );
    sh(d, &["qemu-img", "bitmap", "--add", "bm.qcow2", "b0"]);
    let long_name = "a-rather-long-bitmap-name-to-cross-an-entry";
    sh(
        d,
        &[
            "qemu-img", "bitmap", "--add", "-g", "512", "bm.qcow2", long_name,
        ],
    );
    for t in [
        &["-O", "qcow2"][..],
        &["-O", "qcow2", "-o", "cluster_size=4k"],
    ] {
        for output in ["--output=json", "--output=human"] {
            let mut args = t.to_vec();
            args.extend([output, "bm.qcow2"]);
            both(d, "measure", &args, &mut failures);
        }
    }
    // An encrypted source: qemu-img needs its key to open it, qblk
    // measures the allocation without one; the figures are the same.
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
    let opts = "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s";
    sh(
        d,
        &[
            "qemu-io",
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            "-c",
            "write -P 1 0 1M",
            opts,
        ],
    );
    let theirs = sh(
        d,
        &[
            "qemu-img",
            "measure",
            "--object",
            "secret,id=s,data=pw",
            "-O",
            "qcow2",
            "--output=json",
            "--image-opts",
            opts,
        ],
    );
    let ours = qblk(
        &["measure", "-O", "qcow2", "--output=json", "luks.qcow2"],
        d,
    );
    assert_eq!(String::from_utf8_lossy(&ours.stdout), theirs, "luks.qcow2");
    // Sizes alone, up to and past what an L1 table can map.
    for size in ["0", "1000", "1G", "1T", "100T", "3P", "1E"] {
        for opts in [
            "cluster_size=512,refcount_bits=1",
            "cluster_size=4k,refcount_bits=64",
            "cluster_size=64k",
            "cluster_size=2M,refcount_bits=2",
            "extended_l2=on",
            "extended_l2=on,cluster_size=2M,preallocation=full",
        ] {
            both(
                d,
                "measure",
                &["--size", size, "-O", "qcow2", "-o", opts, "--output=json"],
                &mut failures,
            );
        }
        both(d, "measure", &["--size", size], &mut failures);
    }
    // Refusals: both or neither of --size and a source, bad options.
    for args in [
        &["--size", "1G", "c64k.qcow2"][..],
        &["-O", "qcow2"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3k"],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
        &["--size", "1G", "-O", "qcow2", "-o", "frobnicate=1"],
        &["-O", "qcow2", "missing.qcow2"],
    ] {
        let code = both(d, "measure", args, &mut failures);
        assert_eq!(code, Some(1), "qemu-img measure {args:?}");
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Hostile metadata: every word of the header, L1 and L2 tables, refcount
/// table and block of a small image set to values a damaged or crafted
/// image may hold. Compare and measure finish in time, never panic, exit
/// with one of qemu-img's codes, and name the image when they fail; how
/// often they decide as qemu-img does is printed (qblk refuses some
/// damage at open that QEMU only meets later, see the README).
#[test]
fn hostile_metadata_is_refused_clearly() {
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
            "good.qcow2",
            "4M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -z 1M 64k",
            "good.qcow2",
        ],
    );
    let good = std::fs::read(d.join("good.qcow2")).expect("read");
    let be64 = |at: usize| u64::from_be_bytes(good[at..at + 8].try_into().expect("8 bytes"));
    let (l1, rt) = (be64(40) as usize, be64(48) as usize);
    let l2 = (be64(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be64(rt) as usize;
    let mut words: Vec<usize> = (0..104).step_by(8).collect();
    words.extend([l1, l1 + 8, rt, rt + 8, rb, rb + 8]);
    words.extend((0..20).map(|i| l2 + 8 * i));
    let values = [
        0,
        u64::MAX,
        1 << 63 | 1 << 40,
        1 << 62 | 0x1234_5678,
        be64(l2) + 512,
    ];
    let bin = qblk_integration::qblk_bin().to_str().expect("utf-8 path");
    let (mut same, mut total) = (0, 0);
    let mut differing = Vec::new();
    for &at in &words {
        for v in values {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            std::fs::write(d.join("bad.qcow2"), &b).expect("write");
            for args in [
                &["compare", "good.qcow2", "bad.qcow2"][..],
                &["compare", "-s", "bad.qcow2", "good.qcow2"],
                &["measure", "-O", "qcow2", "bad.qcow2"],
            ] {
                let mut cmd = vec!["20", bin];
                cmd.extend_from_slice(args);
                let ours = run("timeout", &cmd, d);
                let msg = String::from_utf8_lossy(&ours.stderr);
                let what = format!("word {at:#x} = {v:#x}: qblk {args:?}");
                let code = ours.status.code();
                assert_ne!(code, Some(124), "{what}: did not finish in 20 s");
                assert!(!msg.contains("panicked"), "{what}: {msg}");
                let codes: &[i32] = if args[0] == "compare" {
                    &[0, 1, 2, 3, 4]
                } else {
                    &[0, 1]
                };
                assert!(
                    code.is_some_and(|c| codes.contains(&c)),
                    "{what}: exit {code:?}: {msg}"
                );
                let failed = if args[0] == "compare" {
                    code.is_some_and(|c| c >= 2)
                } else {
                    code != Some(0)
                };
                if failed {
                    assert!(
                        msg.starts_with("qblk: ") && msg.contains("qcow2"),
                        "{what}: unclear: {msg}"
                    );
                }
                let theirs = run("qemu-img", args, d);
                total += 1;
                same += usize::from(theirs.status.code() == code);
                if theirs.status.code() != code && differing.len() < 12 {
                    differing.push(format!(
                        "{what}: qemu-img exit {:?}, qblk exit {code:?}: {}",
                        theirs.status.code(),
                        msg.trim()
                    ));
                }
            }
        }
    }
    eprintln!(
        "hostile metadata: qblk's exit code is qemu-img's in {same} of {total} runs; \
         the first that differ:\n{}",
        differing.join("\n")
    );
    // 508 of 585 when written; the rest is damage qblk refuses earlier.
    assert!(same * 10 >= total * 8, "{same} of {total}");
}

#[test]
fn measure_of_an_encrypted_target_matches_qemu_img() {
    // qemu-img takes the passphrase as a secret object (and benchmarks
    // PBKDF2 for the key slot, which on QEMU 7.2 now and then gives up:
    // "Unable to get accurate CPU usage"); qblk needs none to measure.
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    std::fs::write(d.join("key"), b"passphrase").expect("key");
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "src.qcow2",
            "100M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write 0 3M",
            "-c",
            "write 50M 64k",
            "src.qcow2",
        ],
    );
    // The key material's size depends on the key length (and the area is
    // rounded to clusters): 128 and 256-bit keys, two cluster sizes.
    for luks in [
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.cipher-alg=aes-128",
        "encrypt.format=luks,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        "encrypt.format=luks,cluster_size=2M",
    ] {
        for source in [&["--size", "1G"][..], &["src.qcow2"]] {
            let theirs_opts = format!("{luks},encrypt.key-secret=s0");
            let mut theirs_args = vec![
                "measure",
                "--object",
                "secret,id=s0,file=key",
                "-O",
                "qcow2",
                "-o",
                &theirs_opts,
            ];
            theirs_args.extend(source);
            let mut theirs = run("qemu-img", &theirs_args, d);
            for _ in 0..20 {
                if theirs.status.success()
                    || !qblk_integration::stderr(&theirs)
                        .contains("Unable to get accurate CPU usage")
                {
                    break;
                }
                theirs = run("qemu-img", &theirs_args, d);
            }
            let mut ours_args = vec!["measure", "-O", "qcow2", "-o", luks];
            ours_args.extend(source);
            let ours = qblk(&ours_args, d);
            assert_eq!(
                outcome(theirs),
                outcome(ours),
                "measure -o {luks} {source:?}"
            );
        }
    }
}
