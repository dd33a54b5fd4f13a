//! Entry points shared by the cargo-fuzz targets and the unit tests that
//! replay their corpus: each takes arbitrary bytes, must never panic, and
//! checks the round-trip invariants of what it managed to parse.

use crate::bitmap::{BitmapTableEntry, parse_bitmap_directory};
use crate::header::Header;
use crate::mapping::{L1Entry, L2Entry};
use crate::refcount::RefcountTableEntry;
use crate::snapshot::parse_snapshot_table;

/// Parses `data` as the start of an image file: the header and its
/// extensions, then whatever tables lie inside `data`. Panics only if an
/// invariant of this crate is broken (which is what the fuzzer looks for).
pub fn parse_image_prefix(data: &[u8]) {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    // Encoding a parsed header and parsing it again gives the same header,
    // and encoding is then a fixed point.
    if let Ok(bytes) = header.encode() {
        let mut padded = bytes.clone();
        padded.resize(header.cluster_size() as usize, 0);
        let again = Header::parse(&padded).expect("re-parse of an encoded valid header");
        assert_eq!(again.encode().expect("re-encode"), bytes);
        assert_eq!(again.extensions, header.extensions);
        assert_eq!(again.backing_file, header.backing_file);
        assert_eq!(again.size, header.size);
    }
    let geometry = header.geometry();
    let window = |offset: u64, len: u64| -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        data.get(start..end.min(data.len()))
    };

    if let Some(l1) = window(header.l1_table_offset, u64::from(header.l1_size) * 8) {
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let entry = L1Entry(u64::from_be_bytes(e.try_into().expect("8 bytes")));
            if entry
                .validate(&geometry, header.l1_table_offset + i as u64 * 8)
                .is_ok()
            {
                if let Some(l2) = entry
                    .l2_offset()
                    .and_then(|o| window(o.0, geometry.cluster_size()))
                {
                    for j in 0..geometry.l2_entries() as usize {
                        let Some(e) = L2Entry::read(l2, &geometry, j) else {
                            break;
                        };
                        let _ = e.decode(
                            &geometry,
                            header.is_v3(),
                            header.has_external_data_file(),
                            0,
                        );
                    }
                }
            }
        }
    }
    if let Some(rt) = window(
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * geometry.cluster_size(),
    ) {
        for e in rt.chunks_exact(8) {
            let _ = RefcountTableEntry(u64::from_be_bytes(e.try_into().expect("8 bytes")))
                .validate(&geometry, 0);
        }
    }
    if header.nb_snapshots > 0 {
        if let Some(buf) = window(header.snapshots_offset, u64::MAX >> 1) {
            if let Ok((snaps, len)) = parse_snapshot_table(
                buf,
                header.snapshots_offset,
                header.nb_snapshots,
                geometry.cluster_size(),
            ) {
                // Re-encoding gives the same entries and length (padding
                // bytes are not required to be zero, so compare entries).
                let mut enc = Vec::new();
                for s in &snaps {
                    s.encode(&mut enc);
                }
                assert_eq!(enc.len() as u64, len);
                let (again, len2) = parse_snapshot_table(
                    &enc,
                    header.snapshots_offset,
                    header.nb_snapshots,
                    geometry.cluster_size(),
                )
                .expect("re-parse of encoded snapshot table");
                assert_eq!(again, snaps);
                assert_eq!(len2, len);
            }
        }
    }
    if let Some(p) = header.encryption_header() {
        if let Some(buf) = window(p.offset, crate::luks::LUKS_HEADER_BYTES as u64) {
            if let Ok(luks) = crate::luks::LuksHeader::parse(buf, p.offset) {
                let _ = (luks.cipher_alg(), luks.ivgen(), luks.ivgen_hash());
                let _ = crate::luks::LuksSpec::from_header(&luks);
                // Whatever encodes parses back the same.
                if let Ok(bytes) = luks.encode() {
                    let again = crate::luks::LuksHeader::parse(&bytes, p.offset)
                        .expect("re-parse of an encoded LUKS header");
                    assert_eq!(again, luks);
                }
            }
        }
    }
    if let Some(ext) = header.bitmaps_extension() {
        if let Some(buf) = window(ext.bitmap_directory_offset, ext.bitmap_directory_size) {
            if let Ok(entries) =
                parse_bitmap_directory(buf, ext, header.size, geometry.cluster_size())
            {
                for e in entries {
                    if let Some(t) =
                        window(e.bitmap_table_offset, u64::from(e.bitmap_table_size) * 8)
                    {
                        for raw in t.chunks_exact(8) {
                            let raw = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                            if let Ok(d) = BitmapTableEntry::decode(raw, geometry.cluster_size(), 0)
                            {
                                assert_eq!(d.encode(), raw);
                            }
                        }
                    }
                }
            }
        }
    }
}
