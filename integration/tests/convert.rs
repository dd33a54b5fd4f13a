//! `qblk convert` against QEMU: every source kind into raw and qcow2
//! targets (plain, compressed with zlib and zstd, extended L2, compat=0.10,
//! an external data file); `qemu-img compare` must find source and target
//! identical and `qemu-img check` the qcow2 targets clean.

use std::os::unix::fs::MetadataExt;

use qblk_integration::{ok, qblk, qemu_check_clean, run, sh};

#[test]
fn convert_matches_qemu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    // Sources.
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "plain.qcow2",
            "24M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x22 5M 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 0x33 23M 1M",
            "plain.qcow2",
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
            "plain.qcow2",
            "zlib.qcow2",
        ],
    );
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "base.raw", "24M"],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x44 0 24M",
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
            "-o",
            "extended_l2=on",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "ext.qcow2",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 0x55 4k 4k",
            "-c",
            "write -z 2M 64k",
            "ext.qcow2",
        ],
    );
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "sparse.raw", "24M"],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x66 7M 12k",
            "sparse.raw",
        ],
    );

    let targets: &[(&str, &[&str])] = &[
        ("raw", &["-O", "raw"]),
        ("qcow2", &["-O", "qcow2"]),
        ("zlib", &["-O", "qcow2", "-c"]),
        (
            "zstd",
            &[
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd,cluster_size=4k",
            ],
        ),
        (
            "ext",
            &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
        ),
        ("v2", &["-O", "qcow2", "-o", "compat=0.10,cluster_size=512"]),
        ("datafile", &["-O", "qcow2", "-o", "data_file=DATA"]),
    ];
    for src in ["plain.qcow2", "zlib.qcow2", "ext.qcow2", "sparse.raw"] {
        for (name, args) in targets {
            let dst = format!("{src}.{name}");
            let data = format!("{dst}.data");
            let mut cmd = vec!["convert", "-q"];
            let args: Vec<String> = args.iter().map(|a| a.replace("DATA", &data)).collect();
            cmd.extend(args.iter().map(String::as_str));
            cmd.extend([src, dst.as_str()]);
            ok(qblk(&cmd, d), &format!("qblk {cmd:?}"));
            let out = run("qemu-img", &["compare", src, &dst], d);
            assert!(
                out.status.success(),
                "{src} -> {name}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            if *name != "raw" {
                qemu_check_clean(&dst, d);
                ok(
                    qblk(&["check", "-q", &dst], d),
                    &format!("qblk check {dst}"),
                );
            }
        }
    }
    // Sparse: 12 KiB of data in 24 MiB stays small.
    let meta = std::fs::metadata(d.join("sparse.raw.raw")).expect("stat");
    assert_eq!(meta.len(), 24 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "raw target not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    let meta = std::fs::metadata(d.join("sparse.raw.qcow2")).expect("stat");
    assert!(
        meta.len() < 1 << 20,
        "qcow2 target not sparse: {} bytes",
        meta.len()
    );
    // Compression actually compressed.
    let plain = std::fs::metadata(d.join("plain.qcow2.qcow2"))
        .expect("stat")
        .len();
    let zlib = std::fs::metadata(d.join("plain.qcow2.zlib"))
        .expect("stat")
        .len();
    assert!(zlib * 4 < plain, "compressed {zlib} vs plain {plain}");

    // An encrypted source, with its key from a file.
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
            "4M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s",
            "-c",
            "write -P 0x77 100k 1M",
        ],
    );
    std::fs::write(d.join("key"), "pw").expect("key file");
    let out = qblk(
        &["convert", "-q", "-O", "qcow2", "luks.qcow2", "noluks.qcow2"],
        d,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "no key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(
        qblk(
            &[
                "convert",
                "-q",
                "--key-file",
                "key",
                "-O",
                "qcow2",
                "luks.qcow2",
                "plain-from-luks.qcow2",
            ],
            d,
        ),
        "convert luks",
    );
    let out = run(
        "qemu-img",
        &[
            "compare",
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s",
            "driver=qcow2,file.filename=plain-from-luks.qcow2",
        ],
        d,
    );
    assert!(
        out.status.success(),
        "luks -> qcow2: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Refusals: -c into raw; a missing source.
    let out = qblk(&["convert", "-c", "plain.qcow2", "x.raw"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(!d.join("x.raw").exists());
    let out = qblk(&["convert", "missing.qcow2", "x.raw"], d);
    assert_eq!(out.status.code(), Some(1));
}
