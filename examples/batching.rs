//! Metadata writes per allocating write as queue depth rises.
//!
//! N writer tasks each loop "write 4 KiB to a random unallocated cluster,
//! then flush" (a database committing) on an empty image. Flushes that
//! arrive while a writeback is running wait for it and then write back
//! everything that became dirty meanwhile in one pass, so refcount blocks
//! and L2 tables shared by many writes are written once. Not a timed test:
//! it counts writes, and the ratios are what matter.
//!
//!     cargo run --release -p qblk-examples --example batching -- [WRITES]

use std::rc::Rc;

use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};
use qblk_tools::create::{CreateRequest, create};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let writes: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let dir = std::env::temp_dir().join(format!("qblk-batching-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "{:>4} {:>10} {:>16} {:>14} {:>14}",
        "QD", "alloc wr", "metadata writes", "meta/write", "fsync/write"
    );
    for qd in [1u64, 2, 4, 8, 16, 32, 64] {
        let path = dir.join(format!("qd{qd}.qcow2"));
        create(&CreateRequest {
            path: path.clone(),
            size: Some(8 << 30),
            ..CreateRequest::default()
        })?;
        let stats = block_on(async {
            let opts = OpenOptions {
                writable: true,
                ..OpenOptions::default()
            };
            let img = Rc::new(Image::open(&path, &opts).await?);
            let mut tasks = Vec::new();
            for t in 0..qd {
                let img = img.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let data = vec![0x5au8; 4096];
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    for _ in 0..writes / qd {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        // A random 64 KiB cluster of the 8 GiB disk.
                        let cluster = (x >> 33) % (8 << 30 >> 16);
                        img.write(cluster << 16, &data).await?;
                        img.flush().await?;
                    }
                    Ok::<_, qblk_engine::image::Error>(())
                }));
            }
            for t in tasks {
                t.await.expect("writer task")?;
            }
            Ok::<_, qblk_engine::image::Error>(img.stats())
        })?;
        println!(
            "{:>4} {:>10} {:>16} {:>14.2} {:>14.2}",
            qd,
            stats.allocating_writes,
            stats.metadata_writes,
            stats.metadata_writes as f64 / stats.allocating_writes as f64,
            stats.fsyncs as f64 / stats.allocating_writes as f64
        );
        std::fs::remove_file(&path)?;
    }
    std::fs::remove_dir(&dir)?;
    Ok(())
}
