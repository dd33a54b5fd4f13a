//! Embedding the engine in an async Rust program: create an image, open it
//! writable, write, read back, flush.
//!
//!     cargo run -p qblk-examples --example embed -- /tmp/demo.qcow2

use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};
use qblk_tools::create::{CreateRequest, create};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo.qcow2".into());
    let path = std::path::PathBuf::from(path);

    // A fresh 1 GiB image, as `qblk create` makes it.
    create(&CreateRequest {
        path: path.clone(),
        size: Some(1 << 30),
        ..CreateRequest::default()
    })?;

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
