//! `qblk map` output is qemu-img map's, byte for byte, in both formats, on
//! images of every kind: backing chains of qcow2 and raw (shorter and
//! longer than the top), compressed clusters, zero clusters with and
//! without preallocation, extended L2 subclusters, external data files,
//! snapshots, sparse raw files, and images qblk itself wrote.

use qblk_integration::{ok, qblk, run, sh};

#[test]
fn map_matches_qemu_img() {
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
            "plain.qcow2",
            "8M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 2 3M 4k",
            "-c",
            "write -z -u 1M 64k",
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
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "prealloc.qcow2",
            "2M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "write -z -u 128k 64k",
            "prealloc.qcow2",
        ],
    );
    sh(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "base.raw", "6M"],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 2 0 1M",
            "-c",
            "write -P 3 4M 8k",
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
            "ext.qcow2",
            "8M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 3 8k 2k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "write -P 4 300k 20k",
            "ext.qcow2",
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
            "cbase.qcow2",
            "4M",
        ],
    );
    sh(
        d,
        &[
            "qemu-io",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z 128k 64k",
            "cbase.qcow2",
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
            "cbase.qcow2",
            "-F",
            "qcow2",
            "cmid.qcow2",
            "6M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 2 64k 64k", "cmid.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "cmid.qcow2",
            "-F",
            "qcow2",
            "ctop.qcow2",
            "8M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 3 192k 64k", "ctop.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "data.qcow2",
            "1M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 1 0 64k", "data.qcow2"]);
    sh(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "snap.qcow2",
            "4M",
        ],
    );
    sh(d, &["qemu-io", "-c", "write -P 1 0 1M", "snap.qcow2"]);
    sh(d, &["qemu-img", "snapshot", "-c", "s", "snap.qcow2"]);
    sh(d, &["qemu-io", "-c", "write -P 2 64k 64k", "snap.qcow2"]);
    ok(
        qblk(
            &[
                "convert",
                "-q",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "ext.qcow2",
                "ours.qcow2",
            ],
            d,
        ),
        "qblk convert",
    );
    ok(
        qblk(
            &[
                "convert",
                "-q",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
                "plain.qcow2",
                "ourz.qcow2",
            ],
            d,
        ),
        "qblk convert -c",
    );

    // A hole punched into a data cluster on the host: QEMU asks the host
    // file about it only in images that look preallocated (more refcounted
    // clusters than the file stores: the small one, whose metadata
    // clusters are mostly holes too), elsewhere the cluster is data.
    for (name, size, data) in [
        ("holes-small.qcow2", "1M", "128k"),
        ("holes-big.qcow2", "8M", "6M"),
    ] {
        sh(d, &["qemu-img", "create", "-q", "-f", "qcow2", name, size]);
        sh(d, &["qemu-io", "-c", &format!("write -P 1 0 {data}"), name]);
        let map: serde_json::Value =
            serde_json::from_str(&sh(d, &["qemu-img", "map", "--output=json", name]))
                .expect("map JSON");
        let host = map[0]["offset"].as_u64().expect("data has an offset");
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
    }

    let images = [
        "holes-small.qcow2",
        "holes-big.qcow2",
        "plain.qcow2",
        "zlib.qcow2",
        "prealloc.qcow2",
        "base.raw",
        "ext.qcow2",
        "ctop.qcow2",
        "cmid.qcow2",
        "data.qcow2",
        "snap.qcow2",
        "ours.qcow2",
        "ourz.qcow2",
    ];
    let mut failures = Vec::new();
    for image in images {
        for (ours, theirs) in [
            (
                vec!["map", "--output", "json", image],
                vec!["map", "--output=json", image],
            ),
            (vec!["map", image], vec!["map", image]),
        ] {
            let a = qblk(&ours, d);
            let b = run("qemu-img", &theirs, d);
            let (mut sa, sb) = (
                String::from_utf8_lossy(&a.stdout).into_owned(),
                String::from_utf8_lossy(&b.stdout),
            );
            // qemu-img before 8.1 has no "compressed" field in map output.
            if ours[1] == "--output" && !sb.contains("\"compressed\"") {
                sa = sa
                    .replace(", \"compressed\": false", "")
                    .replace(", \"compressed\": true", "");
            }
            if sa.trim_end() != sb.trim_end() || a.status.code() != b.status.code() {
                failures.push(format!(
                    "{image} ({}):\nqblk ({:?}):\n{sa}{}\nqemu-img ({:?}):\n{sb}{}",
                    ours[1],
                    a.status.code(),
                    String::from_utf8_lossy(&a.stderr),
                    b.status.code(),
                    String::from_utf8_lossy(&b.stderr)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
