//! Project automation, run as `cargo xtask <command>`.
//!
//! - `test`: install what the tests need (Debian packages, a nightly
//!   toolchain and cargo-fuzz), then run formatting and lint checks, every
//!   test, the tests again with their properties broken (each must fail),
//!   and a short fuzz run. This is the README's test command and what
//!   `.ci/run` calls.
//! - `e2e`: install QEMU, a kernel, busybox and fio, then boot Linux guests
//!   under QEMU TCG against `qblk serve` (integration/tests/guest.rs).
//! - `must-fail`: the step of `test` that runs each guarded test with
//!   `QBLK_BREAK` set to break what it guards (and the fuzz step as if
//!   nightly could not be installed); each must fail, for that reason.
//! - `run [IMAGE] [SIZE]`: build qblk and serve IMAGE (default `disk.qcow2`)
//!   on `qblk.sock`, creating a default image of SIZE (default 10G) if none
//!   exists.
//! - `fuzz [TARGET] [SECONDS]`: run a cargo-fuzz target for a bounded time.
//! - `bench [--runtime S] [--rounds N] [--only TEXT] [--baseline QBLK]`:
//!   qblk against qemu-storage-daemon and raw io_uring (and another qblk
//!   binary); writes bench/RESULTS.md and bench/ratios.svg.
//!
//! Plain Rust and std only, so it builds before anything else.

mod bench;
mod snapshot_bench;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T = ()> = std::result::Result<T, String>;

/// Debian packages the tests need, keyed by a file each provides, in
/// installation order: Debian's qemu-system-x86 (7.2) removes a newer
/// preinstalled qemu-utils, so qemu-utils is checked (and reinstalled)
/// after it.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-storage-daemon", "qemu-system-common"),
    ("busybox", "busybox-static"),
    ("fio", "fio"),
    ("cpio", "cpio"),
    ("resize2fs", "e2fsprogs"),
    ("modprobe", "kmod"),
    ("/boot/vmlinuz-*", "linux-image-amd64"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    // integration/tests/werror.rs fills a small loop-mounted ext4.
    ("/usr/sbin/mkfs.ext4", "e2fsprogs"),
    // integration/tests/nbd.rs reads bitmaps with libnbd's client too.
    ("nbdinfo", "libnbd-bin"),
    // integration/tests/nbd.rs makes TLS certificates.
    ("openssl", "openssl"),
];

/// Fuzz targets and how long `xtask test` runs each.
const FUZZ_TARGETS: &[&str] = &["header", "image", "request", "nbd"];
const FUZZ_SMOKE_SECONDS: u32 = 20;

/// The environment switch with which a test breaks the property it guards
/// (test-only code in the test itself), so that we can check it then fails.
const BREAK_VAR: &str = "QBLK_BREAK";

/// A test that must fail when `QBLK_BREAK` is `switch`, with `needle` in
/// its output: the reason it was broken for, not a build error or another
/// failure.
struct Breakage {
    switch: &'static str,
    package: &'static str,
    /// The test target (file under `tests/`).
    target: &'static str,
    test: &'static str,
    needle: &'static str,
}

const BREAKAGES: &[Breakage] = &[
    // An incremental backup that skips the dirty ranges must not pass
    // for the disk at the second export.
    Breakage {
        switch: "nbd-skip-dirty",
        package: "qblk-integration",
        target: "nbd",
        test: "an_incremental_backup_of_the_dirty_ranges_equals_the_disk_at_the_second_export",
        needle: "is not the disk at the second export",
    },
    // A request the live daemon fails must not end the round quietly.
    Breakage {
        switch: "killtest-error",
        package: "qblk-integration",
        target: "serve",
        test: "kill_9_loses_no_acknowledged_write",
        needle: "failed before the kill",
    },
    // The "dirty lazy-refcounts" image must really be dirty.
    Breakage {
        switch: "lazy-not-dirty",
        package: "qblk-engine",
        target: "readback",
        test: "images_qemu_made_read_back_exactly",
        needle: "is not dirty after qemu-io's abort",
    },
    // Unparsable check output must not compare equal.
    Breakage {
        switch: "check-unparsable",
        package: "qblk-integration",
        target: "check",
        test: "check_matches_qemu_img",
        needle: "unparsable output",
    },
    // qemu-img compare of an encrypted image must see a one-bit change.
    Breakage {
        switch: "luks-compare-blind",
        package: "qblk-integration",
        target: "luks",
        test: "convert_into_an_encrypted_target",
        needle: "Content mismatch",
    },
    // An unreadable /proc must not read as "no descriptors leaked".
    Breakage {
        switch: "fd-proc-unreadable",
        package: "qblk-integration",
        target: "vhost_user",
        test: "malformed_messages_get_an_error_or_a_disconnect",
        needle: "cannot read /nonexistent-proc/",
    },
    // A compare mismatch reported at another offset must not pass.
    Breakage {
        switch: "compare-offset",
        package: "qblk-integration",
        target: "compare_measure",
        test: "compare_matches_qemu_img",
        needle: "differences:",
    },
    // A hostile image that hangs the engine, or makes it allocate more
    // than the image justifies.
    Breakage {
        switch: "hostile-hang",
        package: "qblk-engine",
        target: "hostile",
        test: "mutated_images_never_panic",
        needle: "did not finish within",
    },
    Breakage {
        switch: "hostile-alloc",
        package: "qblk-engine",
        target: "hostile",
        test: "mutated_images_never_panic",
        needle: "allocated a peak of",
    },
    // A rebase that copies nothing must not compare equal to the image
    // before it.
    Breakage {
        switch: "rebase-copies-nothing",
        package: "qblk-integration",
        target: "rebase_commit_resize",
        test: "rebase_matches_qemu",
        needle: "differ",
    },
];

/// What the fuzz step says when it cannot get a nightly toolchain; the
/// `fuzz-no-nightly` breakage looks for it.
const NO_NIGHTLY: &str = "the fuzz step needs a nightly toolchain";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("e2e") => e2e(),
        Some("must-fail") => must_fail(),
        Some("bench") => bench::Options::parse(&args[1..]).and_then(|o| bench::bench(&o)),
        Some("bench-snapshot") => snapshot_bench::run(&args[1..]),
        Some("bench-log") => bench_log(&args[1..]),
        Some("bench-guest") => bench_guest(&args[1..]),
        Some("run") => run_main_job(
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        ),
        Some("fuzz") => fuzz(
            args.get(1).map(String::as_str).unwrap_or("header"),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60),
        ),
        _ => Err(
            "usage: cargo xtask test | e2e | must-fail | bench [--runtime S] [--rounds N] [--only TEXT] [--baseline QBLK] | bench-snapshot [--runtime S] [--rounds N] | bench-log [--runtime S] [--rounds N] [--baseline QBLK] | bench-guest [--runtime S] [--rounds N] | run [IMAGE] [SIZE] | fuzz [TARGET] [SECONDS]".into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs a command in the workspace root, echoing it.
fn sh(program: &str, args: &[&str]) -> Result {
    sh_env(program, args, &[])
}

/// Like [`sh`], with extra environment variables.
fn sh_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}

/// Whether `what` is an installed program, or (if it is a path pattern)
/// an existing file.
fn have(what: &str) -> bool {
    let test = if what.starts_with('/') {
        format!("ls {what} >/dev/null 2>&1")
    } else {
        format!("command -v {what} >/dev/null 2>&1")
    };
    Command::new("sh")
        .args(["-c", &test])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs the Debian packages whose files are missing, one at a time in
/// [`APT_PACKAGES`] order.
fn install_packages() -> Result {
    let (program, prefix): (&str, Vec<&str>) = if is_root() {
        ("apt-get", vec![])
    } else {
        ("sudo", vec!["apt-get"])
    };
    let mut updated = false;
    for (file, package) in APT_PACKAGES {
        if have(file) {
            continue;
        }
        if !updated {
            let mut update = prefix.clone();
            update.push("update");
            sh(program, &update)?;
            updated = true;
        }
        let mut install = prefix.clone();
        install.extend(["install", "-y", "--no-install-recommends", package]);
        sh_env(program, &install, &[("DEBIAN_FRONTEND", "noninteractive")])?;
    }
    Ok(())
}

/// QEMU's Python QMP library (`qemu.qmp`, which brings `qmp-shell`) in a
/// virtual environment under target/, for the test that drives the
/// control socket with QEMU's own clients (integration/tests/control.rs).
fn install_qmp_python() -> Result {
    let venv = root().join("target/qmp-venv");
    if venv.join("bin/qmp-shell").exists() {
        return Ok(());
    }
    if !have("python3") {
        apt_install("python3")?;
    }
    let v = venv.display().to_string();
    if sh("python3", &["-m", "venv", &v]).is_err() {
        // Debian's python3 makes environments only with python3-venv.
        apt_install("python3-venv")?;
        sh("python3", &["-m", "venv", &v])?;
    }
    sh(
        &format!("{v}/bin/pip"),
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "qemu.qmp",
        ],
    )
}

fn apt_install(package: &str) -> Result {
    let (program, mut args): (&str, Vec<&str>) = if is_root() {
        ("apt-get", vec![])
    } else {
        ("sudo", vec!["apt-get"])
    };
    let mut update = args.clone();
    update.push("update");
    sh(program, &update)?;
    args.extend(["install", "-y", "--no-install-recommends", package]);
    sh_env(program, &args, &[("DEBIAN_FRONTEND", "noninteractive")])
}

/// Boots guests against `qblk serve`: the `#[ignore]`d tests in
/// integration/tests/guest.rs, one at a time (each VM takes both cores).
fn e2e() -> Result {
    install_packages()?;
    let cargo = cargo();
    sh(&cargo, &["build", "--quiet", "-p", "qblk"])?;
    sh(
        &cargo,
        &[
            "test",
            "--quiet",
            "-p",
            "qblk-integration",
            "--test",
            "guest",
            "--",
            "--ignored",
            "--test-threads=1",
        ],
    )
}

/// Whether the `QBLK_BREAK` switch names `what`.
fn broken(what: &str) -> bool {
    env::var(BREAK_VAR).is_ok_and(|v| v.split(',').any(|s| s == what))
}

fn test() -> Result {
    // The switch is ours to set, step by step: inherited, it would fail
    // the tests that must pass.
    if env::var_os(BREAK_VAR).is_some() {
        return Err(format!(
            "{BREAK_VAR} is set; unset it (the steps that need it set it themselves)"
        ));
    }
    install_packages()?;
    install_qmp_python()?;
    let cargo = cargo();
    sh(&cargo, &["fmt", "--all", "--", "--check"])?;
    sh(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    sh_env(
        &cargo,
        &["doc", "--workspace", "--no-deps", "--quiet"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    // Build the binary the integration tests drive, then run every test.
    sh(&cargo, &["build", "--quiet", "-p", "qblk"])?;
    if have("cargo-nextest") {
        sh(&cargo, &["nextest", "run", "--workspace", "--no-fail-fast"])?;
        sh(&cargo, &["test", "--workspace", "--doc", "--quiet"])?;
    } else {
        sh(&cargo, &["test", "--workspace", "--no-fail-fast"])?;
    }
    must_fail()?;
    e2e()?;
    for target in FUZZ_TARGETS {
        fuzz(target, FUZZ_SMOKE_SECONDS)?;
    }
    Ok(())
}

/// Every test of [`BREAKAGES`], and the fuzz step, with what it guards
/// broken: each must fail.
fn must_fail() -> Result {
    for b in BREAKAGES {
        expect_failure(b)?;
    }
    expect_fuzz_failure_without_nightly()
}

/// Runs one test with its property broken: it must fail, and for that
/// reason. Only that test runs (the binary is built already).
fn expect_failure(b: &Breakage) -> Result {
    let args = [
        "test", "--quiet", "-p", b.package, "--test", b.target, "--", "--exact", b.test,
    ];
    let what = format!("{BREAK_VAR}={} cargo {}", b.switch, args.join(" "));
    eprintln!("+ {what} (must fail)");
    let out = Command::new(cargo())
        .args(args)
        .env(BREAK_VAR, b.switch)
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    check_failed(&what, &out, b.needle)
}

/// `what` (whose output is `out`) must have failed with `needle` in its
/// output.
fn check_failed(what: &str, out: &std::process::Output, needle: &str) -> Result {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        return Err(format!(
            "{what} passed: the test no longer notices what it guards\n{text}"
        ));
    }
    if !text.contains(needle) {
        return Err(format!(
            "{what} failed ({}), but without {needle:?} in its output: \
             not for the reason it was broken for\n{text}",
            out.status
        ));
    }
    eprintln!("xtask: {what} failed as it must ({needle:?})");
    Ok(())
}

/// The fuzz step on a machine without nightly where installing it fails
/// must fail, not skip: this runs `xtask fuzz` so.
fn expect_fuzz_failure_without_nightly() -> Result {
    let exe = env::current_exe().map_err(|e| format!("cannot find xtask's executable: {e}"))?;
    let switch = "fuzz-no-nightly";
    let what = format!("{BREAK_VAR}={switch} xtask fuzz header 1");
    eprintln!("+ {what} (must fail)");
    let out = Command::new(exe)
        .args(["fuzz", "header", "1"])
        .env(BREAK_VAR, switch)
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run xtask: {e}"))?;
    check_failed(&what, &out, NO_NIGHTLY)
}

/// Whether a nightly toolchain is installed (cargo-fuzz needs one).
fn have_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs what cargo-fuzz needs: a nightly toolchain (minimal profile)
/// and cargo-fuzz itself. Not getting them is an error, never a skip: a
/// fuzz step that quietly does nothing would pass CI untested.
/// `QBLK_BREAK=fuzz-no-nightly` acts as a machine without nightly where
/// installing it fails.
fn install_fuzz_tools() -> Result {
    let no_nightly = broken("fuzz-no-nightly");
    if no_nightly || !have_nightly() {
        let rustup = if no_nightly {
            "/nonexistent/rustup"
        } else {
            "rustup"
        };
        sh(
            rustup,
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )
        .map_err(|e| format!("{NO_NIGHTLY} and cannot install one: {e}"))?;
        if !have_nightly() {
            return Err(format!(
                "{NO_NIGHTLY}, and `rustup run nightly` still fails after installing it"
            ));
        }
    }
    if !have("cargo-fuzz") {
        sh(&cargo(), &["install", "--locked", "--quiet", "cargo-fuzz"])?;
    }
    Ok(())
}

fn fuzz(target: &str, seconds: u32) -> Result {
    install_fuzz_tools()?;
    let corpus = format!("fuzz/corpus/{target}");
    let max_time = format!("-max_total_time={seconds}");
    // Run on a copy of the committed corpus so new inputs don't dirty the tree.
    let work = std::env::temp_dir().join(format!("qblk-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("mkdir {}: {e}", work.display()))?;
    let work_s = work.to_string_lossy().into_owned();
    let r = sh(
        "cargo",
        &[
            "+nightly",
            "fuzz",
            "run",
            target,
            &work_s,
            &corpus,
            "--",
            &max_time,
            "-max_len=65536",
        ],
    );
    let _ = std::fs::remove_dir_all(&work);
    r
}

/// `cargo xtask bench-log`: what dirty-page logging costs a request, off
/// and on (`integration/src/bin/logbench.rs`), against `--baseline`, a
/// qblk binary (e.g. built from before logging existed), when given.
fn bench_log(args: &[String]) -> Result {
    run_bench_bin("logbench", args)
}

/// `cargo xtask bench-guest`: fio inside a TCG guest against qblk and
/// qemu-storage-daemon in turn (`integration/src/bin/guestbench.rs`).
fn bench_guest(args: &[String]) -> Result {
    run_bench_bin("guestbench", args)
}

/// Builds qblk and the integration crate's benchmark binary `bin` (both
/// release) and runs it on that qblk with `args`.
fn run_bench_bin(bin: &str, args: &[String]) -> Result {
    install_packages()?;
    let cargo = cargo();
    sh(&cargo, &["build", "--release", "--quiet", "-p", "qblk"])?;
    sh(
        &cargo,
        &[
            "build",
            "--release",
            "--quiet",
            "-p",
            "qblk-integration",
            "--bin",
            bin,
        ],
    )?;
    let qblk = root().join("target/release/qblk").display().to_string();
    let bench = root()
        .join("target/release")
        .join(bin)
        .display()
        .to_string();
    let mut full = vec!["--qblk", qblk.as_str()];
    full.extend(args.iter().map(String::as_str));
    sh(&bench, &full)
}

fn run_main_job(image: Option<&str>, size: Option<&str>) -> Result {
    let image = image.unwrap_or("disk.qcow2");
    let size = size.unwrap_or("10G");
    sh(&cargo(), &["build", "--release", "--quiet", "-p", "qblk"])?;
    let qblk = root().join("target/release/qblk");
    let qblk = qblk.to_string_lossy();
    eprintln!(
        "xtask: serving {image} on qblk.sock (created with size {size} if missing); \
         attach with -chardev socket,id=qblk0,path=qblk.sock -device vhost-user-blk-pci,chardev=qblk0; \
         stop with Ctrl-C"
    );
    sh(
        &qblk,
        &["serve", "--socket", "qblk.sock", "--create", size, image],
    )
}
