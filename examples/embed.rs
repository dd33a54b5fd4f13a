//! Embedding the engine in an async Rust program: create an image, open it
//! writable, write, read back, flush.
//!
//!     cargo run -p qblk-examples --example embed -- /tmp/demo.qcow2

use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo.qcow2".into());
    let path = std::path::PathBuf::from(path);

    // Lay out a fresh 1 GiB image with the format crate and write it.
    let plan = qblk_qcow2::create::CreatePlan::new(&qblk_qcow2::create::CreateSpec {
        size: 1 << 30,
        ..Default::default()
    })?;
    let mut bytes = vec![0u8; plan.image_len() as usize];
    for (offset, cluster) in plan.metadata_clusters() {
        bytes[offset.0 as usize..offset.0 as usize + cluster.len()].copy_from_slice(&cluster);
    }
    std::fs::write(&path, bytes)?;

    block_on(async {
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &opts).await?;
        img.write(4096, b"hello from qblk").await?;
        img.write_zeroes(1 << 20, 1 << 20, true).await?;
        let mut buf = [0u8; 15];
        img.read(4096, &mut buf).await?;
        assert_eq!(&buf, b"hello from qblk");
        img.flush().await?;
        img.close().await?;
        println!(
            "{}: wrote and read back {:?}; {:?}",
            path.display(),
            String::from_utf8_lossy(&buf),
            img.stats()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
