//! Helpers shared by the engine's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::Command;

use qblk_engine::OpenOptions;

/// Runs a QEMU tool (or any program) in `dir`; it must succeed. Returns
/// its standard output.
pub fn sh(dir: &Path, args: &[&str]) -> String {
    let run = || {
        Command::new(args[0])
            // Nettle's portable code: see qblk_integration::run.
            .env("NETTLE_FAT_OVERRIDE", "none")
            .args(&args[1..])
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {} (cargo xtask test installs it): {e}", args[0])
            })
    };
    let mut out = run();
    // QEMU 7.2's LUKS key-slot benchmark sometimes reads 0 ms of CPU time
    // and gives up (a known QEMU bug, fixed upstream in 10.0): try again.
    for _ in 0..10 {
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage")
        {
            break;
        }
        out = run();
    }
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -c CMD ... IMAGE`.
pub fn qemu_io(dir: &Path, image: &str, cmds: &[&str]) {
    let mut args = vec!["qemu-io"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    sh(dir, &args);
}

/// Whether `QBLK_BREAK` (a comma-separated list) names `what`: a test-only
/// switch that breaks the property a test guards, so `cargo xtask test` can
/// check that the test then fails.
pub fn broken(what: &str) -> bool {
    std::env::var("QBLK_BREAK").is_ok_and(|v| v.split(',').any(|s| s == what))
}

/// A small deterministic generator (offsets, lengths, mutations).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound.max(1)
    }
}

/// Options for opening an image for writing, everything else default.
pub fn writable() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}
