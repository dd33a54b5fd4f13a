//! Walks a qcow2 image's mapping with the I/O-free format crate: the
//! program reads bytes, `qblk-qcow2` says what they mean.
//!
//!     cargo run -p qblk-examples --example describe -- IMAGE

use std::fs::File;
use std::os::unix::fs::FileExt;

use qblk_qcow2::Header;
use qblk_qcow2::mapping::{ClusterDescriptor, L1Entry, L2Entry};

fn read(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: describe IMAGE")?;
    let file = File::open(&path)?;
    let len = file.metadata()?.len();
    let head = read(&file, 0, len.min(Header::MAX_READ_BYTES as u64))?;
    let header = Header::parse(&head)?;
    let geo = header.geometry();
    println!(
        "{path}: qcow2 v{}, {} bytes, {}-byte clusters, {}-bit refcounts, {} L2 entries per table",
        header.version,
        header.size,
        geo.cluster_size(),
        geo.refcount_bits(),
        geo.l2_entries()
    );

    let l1 = read(&file, header.l1_table_offset, u64::from(header.l1_size) * 8)?;
    let (mut standard, mut zero, mut compressed, mut unallocated) = (0u64, 0u64, 0u64, 0u64);
    for (i, raw) in l1.chunks_exact(8).enumerate() {
        let at = header.l1_table_offset + i as u64 * 8;
        let entry = L1Entry(u64::from_be_bytes(raw.try_into()?));
        entry.validate(&geo, at)?;
        let Some(l2_offset) = entry.l2_offset() else {
            unallocated += geo.l2_entries();
            continue;
        };
        let table = read(&file, l2_offset.0, geo.cluster_size())?;
        for j in 0..geo.l2_entries() as usize {
            let e = L2Entry::read(&table, &geo, j).ok_or("short L2 table")?;
            let entry_at = l2_offset.0 + j as u64 * geo.l2_entry_size();
            match e.decode(
                &geo,
                header.is_v3(),
                header.has_external_data_file(),
                entry_at,
            )? {
                ClusterDescriptor::Standard { .. } => standard += 1,
                ClusterDescriptor::Zero { .. } => zero += 1,
                ClusterDescriptor::Compressed { .. } => compressed += 1,
                ClusterDescriptor::Unallocated
                | ClusterDescriptor::UnallocatedSubclusters { .. } => unallocated += 1,
            }
        }
    }
    println!(
        "guest clusters: {standard} data, {zero} zero, {compressed} compressed, {unallocated} unallocated"
    );
    Ok(())
}
