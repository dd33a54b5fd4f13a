//! Hostile images through the engine: thousands of mutations of real
//! images (the fuzz corpus seeds) are opened, read end to end, mapped,
//! checked and written to. Every one must either be refused with an error or
//! served, without a panic, a hang or an allocation the file does not
//! justify.

use std::path::PathBuf;

use qblk_engine::check::check;
use qblk_engine::file::CacheMode;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

mod common;
use common::*;

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/header");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz corpus")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .filter(|(n, _)| n.starts_with("seed-"))
        .collect();
    out.sort();
    out
}

#[test]
fn mutated_images_never_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = Lcg(0x0bad_5eed);
    let mut opened = 0;
    let mut refused = 0;
    for (name, seed) in seeds() {
        for round in 0..150 {
            let mut bytes = seed.clone();
            // A few byte changes, mostly in the header and first tables.
            for _ in 0..1 + rng.next(6) {
                let limit = if rng.next(3) == 0 {
                    bytes.len() as u64
                } else {
                    1024.min(bytes.len() as u64)
                };
                let at = rng.next(limit) as usize;
                bytes[at] = match rng.next(4) {
                    0 => 0,
                    1 => 0xff,
                    2 => bytes[at] ^ (1 << rng.next(8)),
                    _ => rng.next(256) as u8,
                };
            }
            let path = tmp.path().join(format!("{name}-{round}.qcow2"));
            std::fs::write(&path, &bytes).expect("write image");
            let writable = rng.next(2) == 0;
            let outcome = block_on(async {
                let opts = OpenOptions {
                    writable,
                    cache: CacheMode::Writeback,
                    ..OpenOptions::default()
                };
                let img = match Image::open(&path, &opts).await {
                    Ok(img) => img,
                    Err(_) => return false,
                };
                let size = img.size();
                // Read up to 8 MiB of it, in odd-sized pieces.
                let mut pos = 0;
                let mut buf = vec![0u8; 100_000];
                while pos < size.min(8 << 20) {
                    let n = (size - pos).min(buf.len() as u64) as usize;
                    let _ = img.read(pos, &mut buf[..n]).await;
                    pos += n as u64;
                }
                if size <= 1 << 40 {
                    let _ = img.map().await;
                }
                if writable && size > 0 {
                    let _ = img
                        .write(rng_offset(size), &vec![0x5a; 5000.min(size as usize)])
                        .await;
                    let _ = img.write_zeroes(0, size.min(1 << 20), true).await;
                    let _ = img.discard(0, size.min(1 << 20)).await;
                    let _ = img.flush().await;
                    let _ = img.close().await;
                }
                let _ = check(&path, CacheMode::Writeback).await;
                true
            });
            if outcome {
                opened += 1;
            } else {
                refused += 1;
            }
        }
    }
    // The mutations must exercise both paths.
    assert!(
        opened > 50 && refused > 50,
        "opened {opened}, refused {refused}"
    );
}

fn rng_offset(size: u64) -> u64 {
    (size / 3).saturating_sub(5000) / 512 * 512
}
