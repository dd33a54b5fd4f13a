//! Image locks, both ways: QEMU's tools refuse an image `qblk serve` holds,
//! exactly as they refuse one qemu-storage-daemon holds, and qblk refuses
//! an image they hold, naming the lock; `-U` reads anyway.

use std::path::Path;

use qblk_integration::vhost::Daemon;
use qblk_integration::{create_qcow2, create_qcow2_opts, qblk, qemu_check_clean, run, sh, stderr};

/// Runs a command that must fail with `needle` in its error output.
fn refused(out: std::process::Output, needle: &str, what: &str) {
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "{what} succeeded on a locked image:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(needle),
        "{what}: expected {needle:?} in:\n{err}"
    );
}

fn succeeds(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
}

/// qemu-storage-daemon holding `image` (a read-write node unless
/// `read_only`), exported over vhost-user so that it has a socket to wait
/// for.
fn qsd(dir: &Path, image: &str, read_only: bool) -> Daemon {
    let ro = if read_only { "on" } else { "off" };
    let file = format!("driver=file,node-name=file,filename={image},read-only={ro}");
    let fmt = format!("driver=qcow2,node-name=fmt,file=file,read-only={ro}");
    let writable = if read_only { "off" } else { "on" };
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=qsd.sock,writable={writable}"
    );
    Daemon::spawn(
        Path::new("qemu-storage-daemon"),
        &["--blockdev", &file, "--blockdev", &fmt, "--export", &export],
        dir,
        "qsd.sock",
    )
}

#[test]
fn qemu_tools_refuse_an_image_qblk_serves_and_minus_u_reads_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    sh(d, &["qemu-io", "-c", "write -P 7 0 64k", "a.qcow2"]);
    let mut daemon = Daemon::qblk(d, "a.sock", &["a.qcow2"]);

    // Writers: "write" lock (qblk holds write and does not share it).
    let qemu_io = run("qemu-io", &["-c", "write -P 9 0 4k", "a.qcow2"], d);
    refused(qemu_io, "Failed to get \"write\" lock", "qemu-io write");
    let snap = run("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"], d);
    refused(snap, "Failed to get \"write\" lock", "qemu-img snapshot -c");
    // Readers: QEMU refuses to read an image someone writes.
    let info = run("qemu-img", &["info", "a.qcow2"], d);
    refused(info, "Failed to get shared \"write\" lock", "qemu-img info");
    let check = run("qemu-img", &["check", "a.qcow2"], d);
    refused(
        check,
        "Failed to get shared \"write\" lock",
        "qemu-img check",
    );
    // -U shares everything.
    succeeds(
        run("qemu-img", &["info", "-U", "a.qcow2"], d),
        "qemu-img info -U",
    );
    let read = run(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 7 0 64k", "a.qcow2"],
        d,
    );
    succeeds(read, "qemu-io -r -U");

    // qblk's own tools and a second daemon see it the same way.
    let second = Daemon::try_qblk(d, "b.sock", &["a.qcow2"]).err();
    let (status, log) = second.expect("a second writable daemon on the image");
    assert!(!status.success());
    assert!(log.contains("Failed to get \"write\" lock"), "{log}");
    let ro = Daemon::try_qblk(d, "c.sock", &["--readonly", "a.qcow2"]).err();
    let (_, log) = ro.expect("a read-only daemon beside a writer");
    assert!(log.contains("Failed to get shared \"write\" lock"), "{log}");
    refused(
        qblk(&["info", "a.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk info",
    );
    refused(
        qblk(&["check", "a.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk check",
    );
    refused(
        qblk(&["map", "a.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk map",
    );
    refused(
        qblk(&["convert", "-O", "raw", "a.qcow2", "a.raw"], d),
        "Failed to get shared \"write\" lock",
        "qblk convert",
    );
    refused(
        qblk(&["create", "-f", "qcow2", "a.qcow2", "1G"], d),
        "lock",
        "qblk create over a served image",
    );
    refused(
        qblk(&["check", "-U", "-r", "leaks", "a.qcow2"], d),
        "read-only",
        "qblk check -U -r",
    );
    for (args, what) in [
        (&["snapshot", "-c", "s", "a.qcow2"][..], "qblk snapshot -c"),
        (&["snapshot", "-d", "s", "a.qcow2"], "qblk snapshot -d"),
        (&["snapshot", "-a", "s", "a.qcow2"], "qblk snapshot -a"),
        (&["bitmap", "--add", "a.qcow2", "b"], "qblk bitmap --add"),
        (
            &["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
            "qblk amend",
        ),
    ] {
        refused(qblk(args, d), "Failed to get \"write\" lock", what);
    }
    refused(
        qblk(&["snapshot", "-l", "a.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk snapshot -l",
    );
    refused(
        qblk(&["snapshot", "-U", "-c", "s", "a.qcow2"], d),
        "only supported with --list",
        "qblk snapshot -U -c",
    );
    succeeds(
        qblk(&["snapshot", "-l", "-U", "a.qcow2"], d),
        "qblk snapshot -l -U",
    );
    // compare and measure read their images as qemu-img does: refused
    // with its exit codes (2 and 1), read with -U.
    for (args, code) in [
        (&["compare", "a.qcow2", "a.qcow2"][..], 2),
        (&["measure", "-O", "qcow2", "a.qcow2"], 1),
        (&["info", "--backing-chain", "a.qcow2"], 1),
    ] {
        let theirs = run("qemu-img", args, d);
        assert_eq!(theirs.status.code(), Some(code), "qemu-img {args:?}");
        let ours = qblk(args, d);
        assert_eq!(ours.status.code(), Some(code), "qblk {args:?}");
        refused(
            ours,
            "Failed to get shared \"write\" lock",
            &format!("qblk {args:?}"),
        );
        let mut shared = args.to_vec();
        shared.insert(1, "-U");
        let theirs = run("qemu-img", &shared, d);
        let ours = qblk(&shared, d);
        assert_eq!(theirs.status.code(), Some(0), "qemu-img {shared:?}");
        assert_eq!(
            ours.status.code(),
            Some(0),
            "qblk {shared:?}: {}",
            stderr(&ours)
        );
        if args[0] != "info" {
            assert_eq!(ours.stdout, theirs.stdout, "qblk {shared:?}");
        }
    }
    succeeds(qblk(&["info", "-U", "a.qcow2"], d), "qblk info -U");
    succeeds(qblk(&["check", "-U", "a.qcow2"], d), "qblk check -U");
    succeeds(qblk(&["map", "-U", "a.qcow2"], d), "qblk map -U");
    succeeds(
        qblk(&["convert", "-U", "-O", "raw", "a.qcow2", "a.raw"], d),
        "qblk convert -U",
    );

    // Gone with the daemon: everyone gets the image again.
    assert!(daemon.stop().success(), "{}", daemon.log());
    sh(d, &["qemu-io", "-c", "write -P 9 0 4k", "a.qcow2"]);
    qemu_check_clean("a.qcow2", d);
    succeeds(
        qblk(&["check", "a.qcow2"], d),
        "qblk check after the daemon",
    );
}

#[test]
fn qblk_refuses_an_image_qemu_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "q.qcow2", "64M");
    let mut holder = qsd(d, "q.qcow2", false);
    let served = Daemon::try_qblk(d, "q.sock", &["q.qcow2"]).err();
    let (status, log) = served.expect("qblk serve on an image qemu-storage-daemon writes");
    assert!(!status.success());
    assert!(log.contains("Failed to get \"write\" lock"), "{log}");
    let ro = Daemon::try_qblk(d, "r.sock", &["--readonly", "q.qcow2"]).err();
    let (_, log) = ro.expect("qblk serve --readonly beside a writer");
    assert!(log.contains("Failed to get shared \"write\" lock"), "{log}");
    refused(
        qblk(&["check", "q.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk check",
    );
    refused(
        qblk(&["info", "q.qcow2"], d),
        "Failed to get shared \"write\" lock",
        "qblk info",
    );
    succeeds(qblk(&["info", "-U", "q.qcow2"], d), "qblk info -U");
    holder.stop();

    // A read-only holder: readers share, writers do not.
    let mut holder = qsd(d, "q.qcow2", true);
    let mut reader = Daemon::qblk(d, "r.sock", &["--readonly", "q.qcow2"]);
    succeeds(qblk(&["check", "q.qcow2"], d), "qblk check beside readers");
    let served = Daemon::try_qblk(d, "q.sock", &["q.qcow2"]).err();
    let (_, log) = served.expect("a writer beside readers");
    assert!(log.contains("Failed to get \"write\" lock"), "{log}");
    reader.stop();
    holder.stop();
    let mut served = Daemon::qblk(d, "q.sock", &["q.qcow2"]);
    assert!(served.stop().success(), "{}", served.log());
}

#[test]
fn a_served_overlay_locks_its_backing_file_for_reading() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "base.qcow2", "64M");
    create_qcow2_opts(
        d,
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "top.qcow2",
        "64M",
    );
    let mut daemon = Daemon::qblk(d, "t.sock", &["top.qcow2"]);
    // The backing file is read by qblk: no writer may change it.
    let write = run("qemu-io", &["-c", "write 0 4k", "base.qcow2"], d);
    refused(
        write,
        "Failed to get \"write\" lock",
        "qemu-io write to the backing file",
    );
    // Readers are welcome.
    succeeds(
        run("qemu-img", &["check", "base.qcow2"], d),
        "qemu-img check base",
    );
    succeeds(
        run("qemu-img", &["info", "base.qcow2"], d),
        "qemu-img info base",
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
    sh(d, &["qemu-io", "-c", "write 0 4k", "base.qcow2"]);
}
