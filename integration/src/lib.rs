//! Helpers for the integration tests: run the `qblk` binary and QEMU's
//! tools, and compare what they say.
//!
//! QEMU's tools are the oracle and must be installed (`cargo xtask test`
//! installs them); a missing tool fails the test rather than skipping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod benchbin;
pub mod guest;
pub mod qmp;
pub mod rawq;
pub mod vhost;

/// Path of the `qblk` binary: `$QBLK_BIN`, or the workspace's debug build,
/// built on first use.
pub fn qblk_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("QBLK_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "qblk", "--bin", "qblk"])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the qblk binary");
        assert!(status.success(), "building qblk failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("qblk")
    })
}

/// Whether `QBLK_BREAK` (a comma-separated list) names `what`: a test-only
/// switch that breaks the property a test guards, so that `cargo xtask
/// test` can check the test then fails.
pub fn broken(what: &str) -> bool {
    std::env::var("QBLK_BREAK").is_ok_and(|v| v.split(',').any(|s| s == what))
}

/// Runs a program, panicking with a clear message if it cannot start.
///
/// QEMU 7.2 times its LUKS key-slot benchmark with thread CPU time, which
/// this kernel counts in ticks; nettle's SHA-NI code runs the first round
/// in under one tick, QEMU reads 0 ms and gives up ("Unable to get accurate
/// CPU usage") about half the time. `NETTLE_FAT_OVERRIDE=none` makes nettle
/// use its portable code, several ticks long: 0 failures in 105 creates,
/// against 32 in 60 without it.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .env("NETTLE_FAT_OVERRIDE", "none")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? `cargo xtask test` installs it): {e}")
        })
}

/// Runs `qblk` in `dir`.
pub fn qblk(args: &[&str], dir: &Path) -> Output {
    run(qblk_bin().to_str().expect("utf-8 path"), args, dir)
}

/// Runs a program and requires success, returning stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a program in `dir` that must succeed (`args[0]` is the program).
pub fn sh(dir: &Path, args: &[&str]) -> String {
    let mut out = run(args[0], &args[1..], dir);
    // QEMU 7.2's LUKS key-slot benchmark sometimes reads 0 ms of CPU time
    // and gives up (a known QEMU bug, fixed upstream in 10.0): try again.
    for _ in 0..10 {
        if out.status.success() || !stderr(&out).contains("Unable to get accurate CPU usage") {
            break;
        }
        out = run(args[0], &args[1..], dir);
    }
    ok(out, &args.join(" "))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `qemu-img create -f qcow2 NAME SIZE` in `dir`.
pub fn create_qcow2(dir: &Path, name: &str, size: &str) {
    sh(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", name, size],
    );
}

/// `qemu-img create -f qcow2 -o OPTS NAME SIZE` in `dir`.
pub fn create_qcow2_opts(dir: &Path, opts: &str, name: &str, size: &str) {
    sh(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, name, size,
        ],
    );
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 NAME` in `dir`: a qcow2
/// overlay of the backing file's size.
pub fn create_overlay(dir: &Path, backing: &str, name: &str) {
    sh(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
        ],
    );
}

/// What QEMU reads from `image`: `qemu-img convert -O raw`, as bytes.
pub fn qemu_raw(dir: &Path, image: &str) -> Vec<u8> {
    let raw = format!("{image}.as-raw");
    sh(dir, &["qemu-img", "convert", "-O", "raw", image, &raw]);
    let data = std::fs::read(dir.join(&raw)).expect("read converted image");
    let _ = std::fs::remove_file(dir.join(&raw));
    data
}

/// `qemu-img info --output=json`.
pub fn qemu_info(image: &str, dir: &Path) -> Value {
    let s = ok(
        run("qemu-img", &["info", "--output=json", image], dir),
        "qemu-img info",
    );
    serde_json::from_str(&s).expect("qemu-img info JSON")
}

/// `qblk info --output json`.
pub fn qblk_info(image: &str, dir: &Path) -> Value {
    let s = ok(qblk(&["info", "--output", "json", image], dir), "qblk info");
    serde_json::from_str(&s).expect("qblk info JSON")
}

/// Checks that every key qemu-img reports is reported by qblk with the same
/// value, recursively (qblk may report more). Returns the first mismatch.
pub fn covers(theirs: &Value, ours: &Value, path: &str) -> Result<(), String> {
    match (theirs, ours) {
        (Value::Object(t), Value::Object(o)) => {
            for (k, tv) in t {
                let p = format!("{path}.{k}");
                match o.get(k) {
                    Some(ov) => covers(tv, ov, &p)?,
                    None => return Err(format!("{p}: qemu-img has {tv}, qblk has nothing")),
                }
            }
            Ok(())
        }
        (Value::Array(t), Value::Array(o)) => {
            if t.len() != o.len() {
                return Err(format!(
                    "{path}: qemu-img has {} items, qblk {}",
                    t.len(),
                    o.len()
                ));
            }
            for (i, (tv, ov)) in t.iter().zip(o).enumerate() {
                covers(tv, ov, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (t, o) if t == o => Ok(()),
        (t, o) => Err(format!("{path}: qemu-img has {t}, qblk has {o}")),
    }
}

/// A qemu-storage-daemon exporting `image` read-only over NBD with the
/// named bitmaps.
#[derive(Debug)]
pub struct BitmapExport {
    child: Child,
    socket: std::path::PathBuf,
}

impl BitmapExport {
    pub fn start(dir: &Path, image: &str, names: &[String]) -> BitmapExport {
        let socket = dir.join(format!("{image}.nbd"));
        // A socket an earlier export left would read as started.
        let _ = std::fs::remove_file(&socket);
        let mut export = "type=nbd,id=e0,node-name=n0,name=exp".to_owned();
        for (i, n) in names.iter().enumerate() {
            export.push_str(&format!(",bitmaps.{i}={n}"));
        }
        let child = Command::new("qemu-storage-daemon")
            .current_dir(dir)
            .args([
                "--blockdev",
                &format!("driver=file,filename={image},node-name=f0,read-only=on"),
                "--blockdev",
                "driver=qcow2,file=f0,node-name=n0,read-only=on",
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", socket.display()),
                "--export",
                &export,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-storage-daemon (cargo xtask test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        BitmapExport { child, socket }
    }

    /// QEMU's reading of bitmap `name`: `qemu-img map` of the export
    /// through it (x-dirty-bitmap turns the map around: dirty ranges come
    /// out with `"data": false`).
    pub fn dirty_map(&self, dir: &Path, name: &str) -> Value {
        nbd_dirty_map(dir, &self.socket, "exp", name)
    }

    /// The dirty ranges of bitmap `name` as QEMU reads them: (start, length).
    pub fn dirty_ranges(&self, dir: &Path, name: &str) -> Vec<(u64, u64)> {
        map_ranges(&self.dirty_map(dir, name), false)
    }
}

/// QEMU's NBD client's reading of bitmap `bitmap` of export `export` on
/// the unix socket `nbd`: `qemu-img map` through `x-dirty-bitmap`, which
/// turns the map around (dirty ranges come out with `"data": false`).
pub fn nbd_dirty_map(dir: &Path, nbd: &Path, export: &str, bitmap: &str) -> Value {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        nbd.display()
    );
    let out = sh(
        dir,
        &["qemu-img", "map", "--output=json", "--image-opts", &opts],
    );
    serde_json::from_str(&out).expect("map JSON")
}

/// The entries of a `qemu-img map --output=json` answer whose `data` is
/// `data`: (start, length).
pub fn map_ranges(map: &Value, data: bool) -> Vec<(u64, u64)> {
    map.as_array()
        .expect("map entries")
        .iter()
        .filter(|e| e["data"] == data)
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect()
}

impl Drop for BitmapExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img check` must find no errors (leaks are errors here too: a new
/// image must be exact).
pub fn qemu_check_clean(image: &str, dir: &Path) {
    let out = run("qemu-img", &["check", "--output=json", image], dir);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img check {image} failed: {s}{}",
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&s).expect("check JSON");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(key).and_then(Value::as_u64).unwrap_or(0),
            0,
            "{image}: {key} in {s}"
        );
    }
}

/// A small (48 MiB) ext4 file system loop-mounted at `dir/mnt`, unmounted
/// on drop: an image in it meets ENOSPC once [`SmallFs::fill`] has taken
/// the space. Mounting needs root (CI runs these tests as root); without
/// it the test fails rather than skips.
#[derive(Debug)]
pub struct SmallFs {
    pub mnt: PathBuf,
}

impl SmallFs {
    pub fn new(dir: &Path) -> SmallFs {
        // SAFETY: getuid(2) has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert_eq!(
            uid, 0,
            "this test mounts a small file system to fill it up and needs root (CI runs it as root)"
        );
        sh(dir, &["truncate", "-s", "48M", "fs.img"]);
        // No blocks reserved for root: the daemon (root here) fills it.
        sh(dir, &["mkfs.ext4", "-q", "-m", "0", "fs.img"]);
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        sh(dir, &["mount", "-o", "loop", "fs.img", "mnt"]);
        SmallFs { mnt }
    }

    /// Fills the file system with `filler` until `left` bytes are free.
    pub fn fill(&self, left: u64) {
        let free = self.free();
        let n = free.saturating_sub(left);
        let path = self.mnt.join("filler");
        sh(
            &self.mnt,
            &[
                "fallocate",
                "-l",
                &n.to_string(),
                path.to_str().expect("utf-8"),
            ],
        );
    }

    pub fn unfill(&self) {
        std::fs::remove_file(self.mnt.join("filler")).expect("remove the filler");
    }

    pub fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.mnt.to_str().expect("utf-8")).expect("path");
        // SAFETY: an all-zero statvfs is a valid value to be overwritten.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid path and out pointer.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs");
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}
