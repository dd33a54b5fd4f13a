//! Project automation, run as `cargo xtask <command>`.
//!
//! - `test`: install what the tests need (Debian packages, cargo-fuzz), then
//!   run formatting and lint checks, every test, and a short fuzz run. This
//!   is the README's test command and what `.ci/run` calls.
//! - `e2e`: install QEMU, a kernel, busybox and fio, then boot Linux guests
//!   under QEMU TCG against `qblk serve` (integration/tests/guest.rs).
//! - `run [IMAGE] [SIZE]`: build qblk and serve IMAGE (default `disk.qcow2`)
//!   on `qblk.sock`, creating a default image of SIZE (default 10G) if none
//!   exists.
//! - `fuzz [TARGET] [SECONDS]`: run a cargo-fuzz target for a bounded time.
//! - `bench [--runtime S] [--rounds N] [--only TEXT]`: qblk against
//!   qemu-storage-daemon and raw io_uring; writes bench/RESULTS.md and
//!   bench/ratios.svg.
//!
//! Plain Rust and std only, so it builds before anything else.

mod bench;

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
    ("modprobe", "kmod"),
    ("/boot/vmlinuz-*", "linux-image-amd64"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
];

/// Fuzz targets and how long `xtask test` runs each.
const FUZZ_TARGETS: &[&str] = &["header", "image", "request"];
const FUZZ_SMOKE_SECONDS: u32 = 20;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("e2e") => e2e(),
        Some("bench") => bench::Options::parse(&args[1..]).and_then(|o| bench::bench(&o)),
        Some("run") => run_main_job(
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        ),
        Some("fuzz") => fuzz(
            args.get(1).map(String::as_str).unwrap_or("header"),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60),
        ),
        _ => Err(
            "usage: cargo xtask test | e2e | bench [--runtime S] [--rounds N] [--only TEXT] | run [IMAGE] [SIZE] | fuzz [TARGET] [SECONDS]".into(),
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

fn test() -> Result {
    install_packages()?;
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
    e2e()?;
    for target in FUZZ_TARGETS {
        fuzz(target, FUZZ_SMOKE_SECONDS)?;
    }
    Ok(())
}

/// Whether a nightly toolchain is installed (cargo-fuzz needs one).
fn have_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn fuzz(target: &str, seconds: u32) -> Result {
    if !have_nightly() {
        eprintln!(
            "xtask: fuzz run of {target} SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
        );
        return Ok(());
    }
    if !have("cargo-fuzz") {
        sh(&cargo(), &["install", "--locked", "--quiet", "cargo-fuzz"])?;
    }
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
