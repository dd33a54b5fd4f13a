//! Arbitrary bytes as a whole image file, opened by the engine (read-only
//! and writable), read end to end, mapped, written and checked. The engine
//! must refuse or serve; it must never panic or hang.
#![no_main]

use qblk_engine::file::CacheMode;
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, image)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("qblk-fuzz-image-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("image.qcow2");
    if std::fs::write(&path, image).is_err() {
        return;
    }
    let writable = mode & 1 == 1;
    block_on(async {
        let opts = OpenOptions {
            writable,
            cache: CacheMode::Writeback,
            ..OpenOptions::default()
        };
        let Ok(img) = Image::open(&path, &opts).await else {
            return;
        };
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < size.min(4 << 20) {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let _ = img.read(pos, &mut buf[..n]).await;
            pos += n as u64;
        }
        if size <= 1 << 36 {
            let _ = img.map().await;
        }
        if writable && size >= 4096 {
            let _ = img
                .write(u64::from(mode) * 512 % (size - 4096), &[0xa5; 4096])
                .await;
            let _ = img.discard(0, size.min(1 << 20)).await;
            let _ = img.close().await;
        }
        drop(img);
        // A hostile L2 entry can send a write far past the end of the file,
        // leaving it sparse and huge; check's memory no longer follows the
        // file size, but its time does (it compares every cluster), so keep
        // fuzz iterations short.
        if std::fs::metadata(&path).is_ok_and(|m| m.len() <= 1 << 30) {
            let _ = qblk_engine::check::check(&path, CacheMode::Writeback, false).await;
        }
    });
});
