//! Property tests: encode/decode round trips of every structure, and no
//! byte string (random, or a mutated real image) makes parsing panic.
//! The fuzz corpus in `fuzz/corpus/header` is replayed here, so every input
//! the fuzzer found interesting stays a regression test.

use std::path::PathBuf;

use proptest::prelude::*;
use qblk_qcow2::Header;
use qblk_qcow2::bitmap::{
    BitmapDirectoryEntry, BitmapFlags, BitmapsExtension, parse_bitmap_directory,
};
use qblk_qcow2::fuzz::parse_image_prefix;
use qblk_qcow2::header::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, CryptMethod, HeaderExtension,
    IncompatibleFeatures, standard_feature_names,
};
use qblk_qcow2::mapping::{ClusterDescriptor, L2Entry, SubclusterBitmap};
use qblk_qcow2::snapshot::{SnapshotEntry, parse_snapshot_table};
use qblk_qcow2::types::{Geometry, HostOffset};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/header");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("dir entry").path();
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read seed"),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "corpus has only {} files", out.len());
    out
}

#[test]
fn corpus_seeds_parse_and_round_trip() {
    for (name, bytes) in corpus() {
        parse_image_prefix(&bytes);
        if name.starts_with("seed-") {
            // Seeds are real images qemu-img made: they must be accepted.
            let h = Header::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(h.size > 0, "{name}");
        }
    }
}

/// Every single-byte change to the first 512 bytes of every seed, to three
/// values: each must parse or fail cleanly.
#[test]
fn every_header_byte_mutated() {
    for (_, seed) in corpus() {
        let mut b = seed.clone();
        for at in 0..512.min(b.len()) {
            let orig = b[at];
            for v in [0x00, 0xff, orig ^ 0x80] {
                b[at] = v;
                parse_image_prefix(&b);
            }
            b[at] = orig;
        }
    }
}

fn arb_name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9._/-]{{1,{max}}}")).expect("regex")
}

prop_compose! {
    fn arb_header()(
        v3 in any::<bool>(),
        cluster_bits in 9u32..=21,
        size in 0u64..(1 << 48),
        refcount_order in 0u32..=6,
        lazy in any::<bool>(),
        extended in any::<bool>(),
        zstd in any::<bool>(),
        data_file in proptest::option::of(arb_name(40)),
        raw in any::<bool>(),
        backing in proptest::option::of((arb_name(100), proptest::option::of(arb_name(15)))),
        unknown_ext in proptest::collection::vec((0x1000u32..0xffff_0000, proptest::collection::vec(any::<u8>(), 0..40)), 0..3),
        extra_fields in 0usize..3,
        fill in any::<u8>(),
        autoclear_unknown in any::<u64>(),
        compat_unknown in any::<u64>(),
        l1_extra in 0u32..16,
        feature_table in any::<bool>(),
    ) -> Header {
        let extended = extended && cluster_bits >= 14;
        let refcount_order = if v3 { refcount_order } else { 4 };
        let geometry = Geometry::new(cluster_bits, extended, refcount_order).expect("geometry");
        let size = size.min(geometry.l2_coverage_bytes() * (1 << 20));
        let l1_size = (geometry.l1_entries_for(size) as u32 + l1_extra).min(4 << 20);
        let cs = 1u64 << cluster_bits;
        let mut extensions = Vec::new();
        let mut incompatible = IncompatibleFeatures::empty();
        let mut autoclear = AutoclearFeatures::from_bits_retain(autoclear_unknown & !3);
        let mut backing_file = None;
        if let Some((name, fmt)) = backing {
            backing_file = Some(name);
            if let Some(f) = fmt {
                extensions.push(HeaderExtension::BackingFormat(f));
            }
        }
        if v3 {
            if let Some(df) = data_file {
                incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
                extensions.push(HeaderExtension::ExternalDataFile(df));
                if raw && backing_file.is_none() {
                    autoclear |= AutoclearFeatures::RAW_EXTERNAL_DATA;
                }
            }
            if zstd {
                incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
            }
            if extended {
                incompatible |= IncompatibleFeatures::EXTENDED_L2;
            }
            if feature_table {
                extensions.push(HeaderExtension::FeatureNameTable(standard_feature_names()));
            }
        }
        for (kind, data) in unknown_ext {
            // Skip codes that collide with known extensions.
            if ![0xe279_2aca, 0x6803_f857, 0x2385_2875, 0x0537_be77, 0x4441_5441].contains(&kind) {
                extensions.push(HeaderExtension::Unknown { kind, data });
            }
        }
        Header {
            version: if v3 { 3 } else { 2 },
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: CryptMethod::None,
            l1_size,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if v3 {
                CompatibleFeatures::from_bits_retain(compat_unknown & !1) | if lazy { CompatibleFeatures::LAZY_REFCOUNTS } else { CompatibleFeatures::empty() }
            } else {
                CompatibleFeatures::empty()
            },
            autoclear_features: if v3 { autoclear } else { AutoclearFeatures::empty() },
            refcount_order,
            header_length: 0,
            compression_type: if v3 && zstd { CompressionType::Zstd } else { CompressionType::Zlib },
            additional_fields_tail: if v3 {
                // Padding after compression_type, then additional fields
                // newer than this implementation, which must be preserved.
                let mut t = vec![0; 7];
                t.extend(std::iter::repeat_n(fill, 8 * extra_fields));
                t
            } else {
                vec![]
            },
            extensions,
            backing_file,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn header_round_trip(h in arb_header()) {
        let Ok(bytes) = h.encode() else {
            // Too big for the cluster: encode must say so, never truncate.
            prop_assert!(h.extensions.len() + h.backing_file.as_ref().map_or(0, |b| b.len()) > 0);
            return Ok(());
        };
        prop_assert!(bytes.len() as u64 <= h.cluster_size());
        let mut padded = bytes.clone();
        padded.resize(h.cluster_size() as usize, 0);
        let parsed = Header::parse(&padded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expect = h.clone();
        expect.backing_file_offset = parsed.backing_file_offset;
        expect.backing_file_size = parsed.backing_file_size;
        expect.header_length = parsed.header_length;
        prop_assert_eq!(&parsed, &expect);
        prop_assert_eq!(parsed.encode().expect("re-encode"), bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        parse_image_prefix(&bytes);
    }

    #[test]
    fn mutated_seeds_never_panic(seed_index in 0usize..10, edits in proptest::collection::vec((0usize..65536, any::<u8>()), 1..16), cut in 0usize..65536) {
        let corpus = corpus();
        let (_, seed) = &corpus[seed_index % corpus.len()];
        let mut b = seed.clone();
        for (at, v) in edits {
            let n = b.len();
            b[at % n] = v;
        }
        b.truncate(cut.max(1));
        parse_image_prefix(&b);
    }

    #[test]
    fn l2_entries_round_trip(cluster_bits in 9u32..=21, extended in any::<bool>(), host_cluster in 1u64..(1 << 30), alloc in any::<u32>(), zero in any::<u32>(), copied in any::<bool>()) {
        let extended = extended && cluster_bits >= 14;
        let geo = Geometry::new(cluster_bits, extended, 4).expect("geometry");
        let host = HostOffset(host_cluster << cluster_bits);
        if host.0 >> 56 != 0 {
            return Ok(());
        }
        let bitmap = if extended { SubclusterBitmap::from_parts(alloc & !zero, zero) } else { SubclusterBitmap(0) };
        let e = L2Entry::standard(host, copied, bitmap);
        let d = e.decode(&geo, true, false, 0).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want_bitmap = if extended { bitmap } else { SubclusterBitmap::ALL_ALLOCATED };
        prop_assert_eq!(d, ClusterDescriptor::Standard { host, copied, subclusters: want_bitmap });
        let mut table = vec![0u8; geo.cluster_size() as usize];
        e.write(&mut table, &geo, 3);
        prop_assert_eq!(L2Entry::read(&table, &geo, 3), Some(e));
    }

    #[test]
    fn compressed_descriptors_round_trip(cluster_bits in 9u32..=21, host in 1u64..(1 << 40), len_frac in 1u64..=1000) {
        let geo = Geometry::new(cluster_bits, false, 4).expect("geometry");
        let len = (geo.cluster_size() * len_frac / 1000).max(1);
        let Some(e) = L2Entry::compressed(&geo, HostOffset(host), len) else {
            // Only refused when the offset does not fit the descriptor.
            prop_assert!(host >> geo.compressed_offset_bits() != 0);
            return Ok(());
        };
        match e.decode(&geo, true, false, 0) {
            Ok(ClusterDescriptor::Compressed { host: h, len: l }) => {
                prop_assert_eq!(h.0, host);
                // The descriptor covers whole sectors from the start offset.
                prop_assert!(l >= len && l < len + 512);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn snapshot_tables_round_trip(entries in proptest::collection::vec((any::<u32>(), 0u32..1000, arb_name(20), arb_name(60), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)), 1..8)) {
        let snaps: Vec<SnapshotEntry> = entries.into_iter().map(|(date, l1, id, name, clock, extra)| SnapshotEntry {
            l1_table_offset: 0x10000 * u64::from(l1 + 1),
            l1_size: l1,
            date_sec: date,
            date_nsec: date % 1_000_000_000,
            vm_clock_nsec: clock,
            vm_state_size_32: 0,
            extra_data: extra,
            id: id.into_bytes(),
            name: name.into_bytes(),
        }).collect();
        let mut buf = Vec::new();
        for s in &snaps {
            s.encode(&mut buf);
        }
        let (parsed, len) = parse_snapshot_table(&buf, 0x50000, snaps.len() as u32, 65536).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, snaps);
        prop_assert_eq!(len as usize, buf.len());
    }

    #[test]
    fn bitmap_directories_round_trip(names in proptest::collection::btree_set(arb_name(30), 1..6), gran in 9u8..=31, auto in any::<bool>()) {
        let disk = 1u64 << 30;
        let entries: Vec<BitmapDirectoryEntry> = names.into_iter().enumerate().map(|(i, n)| BitmapDirectoryEntry {
            bitmap_table_offset: 0x10000 * (i as u64 + 4),
            bitmap_table_size: qblk_qcow2::bitmap::bitmap_table_entries(disk, gran, 65536) as u32,
            flags: if auto { BitmapFlags::AUTO } else { BitmapFlags::empty() },
            bitmap_type: 1,
            granularity_bits: gran,
            extra_data: vec![],
            name: n.into_bytes(),
        }).collect();
        let mut buf = Vec::new();
        for e in &entries {
            e.encode(&mut buf);
        }
        let ext = BitmapsExtension { nb_bitmaps: entries.len() as u32, reserved: 0, bitmap_directory_size: buf.len() as u64, bitmap_directory_offset: 0x30000 };
        let parsed = parse_bitmap_directory(&buf, &ext, disk, 65536).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, entries);
    }
}
