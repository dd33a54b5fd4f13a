//! The image header (cluster 0): fixed fields, additional fields, header
//! extensions and the backing file name.
//!
//! [`Header::parse`] reads and validates; [`Header::encode`] writes the
//! canonical layout QEMU writes (header, extensions in their stored order,
//! end marker, backing file name right after it). Unknown additional fields
//! and unknown extensions are carried through byte for byte.

use bitflags::bitflags;

use crate::be::{PutBe, Reader, align8};
use crate::bitmap::BitmapsExtension;
use crate::error::{FormatError, Problem, Result, check_aligned, check_range, err};
use crate::types::{
    Geometry, GeometryError, MAX_BACKING_FILE_NAME_BYTES, MAX_CLUSTER_BITS, MAX_L1_TABLE_BYTES,
    MAX_REFCOUNT_ORDER, MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, MIN_CLUSTER_BITS_EXTENDED_L2,
};

/// "QFI\xfb"
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header (and of the version 3 fields shared with it).
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimal version 3 header length (through header_length).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Version 3 header length with compression_type and padding, as QEMU writes it.
pub const V3_HEADER_LENGTH: u32 = 112;
/// Offset of the compression_type additional field.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// QEMU's limit on the number of internal snapshots (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing format name QEMU accepts (its buffer is 16 bytes).
pub const MAX_BACKING_FORMAT_BYTES: usize = 15;

/// Header extension type codes.
pub mod ext_type {
    pub const END: u32 = 0x0000_0000;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

bitflags! {
    /// incompatible_features: an unknown bit refuses the image.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IncompatibleFeatures: u64 {
        /// Refcounts may be inconsistent (lazy refcounts in use).
        const DIRTY = 1 << 0;
        /// Any structure may be corrupt: do not write.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// compression_type is non-zero (not zlib).
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries are 128 bits with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }

    /// compatible_features: unknown bits may be ignored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CompatibleFeatures: u64 {
        const LAZY_REFCOUNTS = 1 << 0;
    }

    /// autoclear_features: unknown bits must be cleared before writing.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AutoclearFeatures: u64 {
        /// The bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// The external data file is a consistent raw image.
        const RAW_EXTERNAL_DATA = 1 << 1;
        /// qblk's: a crash journal is live for this image as it is, and
        /// bits 32-62 hold its stamp. Not in QEMU's specification; autoclear
        /// bits, so any writer that does not know them (every QEMU) clears
        /// them, which is how qblk learns the image changed after a daemon
        /// crash. Taken from the top, away from the bits QEMU assigns from
        /// 0 up.
        const QBLK_JOURNAL = 1 << 63;
    }
}

impl IncompatibleFeatures {
    /// Bits this implementation does not know.
    pub fn unknown(self) -> u64 {
        self.bits() & !Self::all().bits()
    }
}

impl AutoclearFeatures {
    pub fn unknown(self) -> u64 {
        self.bits() & !Self::all().bits()
    }
}

impl CompatibleFeatures {
    pub fn unknown(self) -> u64 {
        self.bits() & !Self::all().bits()
    }
}

/// compression_type: how compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), QEMU's default.
    #[default]
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Zlib),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }

    /// The name qemu-img uses (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// crypt_method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CryptMethod {
    #[default]
    None,
    /// Legacy AES-CBC; QEMU's system emulators refuse it.
    Aes,
    /// LUKS; its header lives where the full disk encryption extension says.
    Luks,
}

impl CryptMethod {
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Aes),
            2 => Some(Self::Luks),
            _ => None,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Aes => 1,
            Self::Luks => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Aes => "aes",
            Self::Luks => "luks",
        }
    }
}

/// Which feature bitmap a feature name table entry names a bit of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
    /// A type this implementation does not know; kept as is.
    Other(u8),
}

impl FeatureKind {
    fn from_raw(v: u8) -> Self {
        match v {
            0 => Self::Incompatible,
            1 => Self::Compatible,
            2 => Self::Autoclear,
            other => Self::Other(other),
        }
    }

    fn raw(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
            Self::Other(v) => v,
        }
    }
}

/// Size of one feature name table entry.
pub const FEATURE_NAME_ENTRY_BYTES: usize = 48;
const FEATURE_NAME_BYTES: usize = 46;

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    pub kind: FeatureKind,
    /// Bit number within the selected bitmap (0-63 when valid).
    pub bit: u8,
    /// Up to 46 bytes; zero padding removed.
    pub name: Vec<u8>,
}

impl FeatureName {
    pub fn new(kind: FeatureKind, bit: u8, name: &str) -> Self {
        Self {
            kind,
            bit,
            name: name.as_bytes()[..name.len().min(FEATURE_NAME_BYTES)].to_vec(),
        }
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// The feature name table QEMU writes into every version 3 image.
pub fn standard_feature_names() -> Vec<FeatureName> {
    use FeatureKind::*;
    vec![
        FeatureName::new(Incompatible, 0, "dirty bit"),
        FeatureName::new(Incompatible, 1, "corrupt bit"),
        FeatureName::new(Incompatible, 2, "external data file"),
        FeatureName::new(Incompatible, 3, "compression type"),
        FeatureName::new(Incompatible, 4, "extended L2 entries"),
        FeatureName::new(Compatible, 0, "lazy refcounts"),
        FeatureName::new(Autoclear, 0, "bitmaps"),
        FeatureName::new(Autoclear, 1, "raw external data"),
    ]
}

/// The full disk encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncryptionHeaderPointer {
    /// Where the LUKS header starts; cluster aligned.
    pub offset: u64,
    /// Length of the written encryption header in bytes.
    pub length: u64,
}

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderExtension {
    BackingFormat(String),
    FeatureNameTable(Vec<FeatureName>),
    Bitmaps(BitmapsExtension),
    FullDiskEncryption(EncryptionHeaderPointer),
    ExternalDataFile(String),
    /// An extension this implementation does not know, preserved byte for byte.
    Unknown {
        kind: u32,
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    pub fn kind(&self) -> u32 {
        match self {
            Self::BackingFormat(_) => ext_type::BACKING_FORMAT,
            Self::FeatureNameTable(_) => ext_type::FEATURE_NAME_TABLE,
            Self::Bitmaps(_) => ext_type::BITMAPS,
            Self::FullDiskEncryption(_) => ext_type::FULL_DISK_ENCRYPTION,
            Self::ExternalDataFile(_) => ext_type::EXTERNAL_DATA_FILE,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    fn encode_data(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::BackingFormat(s) | Self::ExternalDataFile(s) => {
                out.extend_from_slice(s.as_bytes())
            }
            Self::FeatureNameTable(entries) => {
                for e in entries {
                    out.put_u8(e.kind.raw());
                    out.put_u8(e.bit);
                    let mut name = [0u8; FEATURE_NAME_BYTES];
                    let n = e.name.len().min(FEATURE_NAME_BYTES);
                    name[..n].copy_from_slice(&e.name[..n]);
                    out.extend_from_slice(&name);
                }
            }
            Self::Bitmaps(b) => b.encode(&mut out),
            Self::FullDiskEncryption(p) => {
                out.put_u64(p.offset);
                out.put_u64(p.length);
            }
            Self::Unknown { data, .. } => out.extend_from_slice(data),
        }
        out
    }
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// As read; [`Header::encode`] recomputes it.
    pub backing_file_offset: u64,
    /// As read; [`Header::encode`] recomputes it.
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: CryptMethod,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: IncompatibleFeatures,
    pub compatible_features: CompatibleFeatures,
    pub autoclear_features: AutoclearFeatures,
    /// refcount_bits = 1 << refcount_order; always 4 for version 2.
    pub refcount_order: u32,
    /// As read; [`Header::encode`] recomputes it.
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes from 105 up to header_length: padding and additional
    /// fields newer than this implementation, preserved when rewriting.
    pub additional_fields_tail: Vec<u8>,
    /// Header extensions in the order they are stored (end marker excluded).
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

/// Field offsets within the header, for error messages.
mod at {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

impl Header {
    /// Bytes to read from the start of the file so that [`Header::parse`]
    /// sees the whole header cluster of any image it accepts.
    pub const MAX_READ_BYTES: usize = 1 << MAX_CLUSTER_BITS;

    /// Parses and validates the header from the start of the image file.
    ///
    /// `buf` holds the first bytes of the file: the whole first cluster, or
    /// the whole file if it is shorter (then anything the header needs past
    /// the end of the file is reported as truncated).
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let r = Reader::new(buf, 0);
        let magic = r.u32(0, "header.magic")?;
        if magic != QCOW2_MAGIC {
            return err(
                "header.magic",
                at::MAGIC,
                Problem::BadMagic {
                    found: magic,
                    expected: QCOW2_MAGIC,
                },
            );
        }
        let version = r.u32(4, "header.version")?;
        check_range("header.version", at::VERSION, version.into(), 2, 3)?;

        let cluster_bits = r.u32(20, "header.cluster_bits")?;
        check_range(
            "header.cluster_bits",
            at::CLUSTER_BITS,
            cluster_bits.into(),
            MIN_CLUSTER_BITS.into(),
            MAX_CLUSTER_BITS.into(),
        )?;
        let cluster_size = 1usize << cluster_bits;

        let mut h = Header {
            version,
            backing_file_offset: r.u64(8, "header.backing_file_offset")?,
            backing_file_size: r.u32(16, "header.backing_file_size")?,
            cluster_bits,
            size: r.u64(24, "header.size")?,
            crypt_method: CryptMethod::None,
            l1_size: r.u32(36, "header.l1_size")?,
            l1_table_offset: r.u64(40, "header.l1_table_offset")?,
            refcount_table_offset: r.u64(48, "header.refcount_table_offset")?,
            refcount_table_clusters: r.u32(56, "header.refcount_table_clusters")?,
            nb_snapshots: r.u32(60, "header.nb_snapshots")?,
            snapshots_offset: r.u64(64, "header.snapshots_offset")?,
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            additional_fields_tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        let crypt = r.u32(32, "header.crypt_method")?;
        h.crypt_method = CryptMethod::from_raw(crypt).ok_or_else(|| {
            FormatError::new(
                "header.crypt_method",
                at::CRYPT_METHOD,
                Problem::OutOfRange {
                    value: crypt.into(),
                    min: 0,
                    max: 2,
                },
            )
        })?;

        if version >= 3 {
            h.incompatible_features =
                IncompatibleFeatures::from_bits_retain(r.u64(72, "header.incompatible_features")?);
            h.compatible_features =
                CompatibleFeatures::from_bits_retain(r.u64(80, "header.compatible_features")?);
            h.autoclear_features =
                AutoclearFeatures::from_bits_retain(r.u64(88, "header.autoclear_features")?);
            h.refcount_order = r.u32(96, "header.refcount_order")?;
            h.header_length = r.u32(100, "header.header_length")?;
            check_range(
                "header.header_length",
                at::HEADER_LENGTH,
                h.header_length.into(),
                V3_MIN_HEADER_LENGTH.into(),
                cluster_size as u64,
            )?;
            check_aligned(
                "header.header_length",
                at::HEADER_LENGTH,
                h.header_length.into(),
                8,
            )?;
            let header_length = h.header_length as usize;
            if header_length > COMPRESSION_TYPE_OFFSET {
                let raw = r.u8(COMPRESSION_TYPE_OFFSET, "header.compression_type")?;
                h.compression_type = CompressionType::from_raw(raw).ok_or_else(|| {
                    FormatError::new(
                        "header.compression_type",
                        at::COMPRESSION_TYPE,
                        Problem::OutOfRange {
                            value: raw.into(),
                            min: 0,
                            max: 1,
                        },
                    )
                })?;
                h.additional_fields_tail = r
                    .bytes(
                        COMPRESSION_TYPE_OFFSET + 1,
                        header_length - COMPRESSION_TYPE_OFFSET - 1,
                        "header.additional_fields",
                    )?
                    .to_vec();
            }
        }

        // Header extensions run from header_length to the backing file name
        // (or the end of the first cluster).
        let cluster_end = cluster_size.min(buf.len());
        let has_backing = h.backing_file_offset != 0;
        if has_backing {
            check_range(
                "header.backing_file_size",
                at::BACKING_FILE_SIZE,
                h.backing_file_size.into(),
                1,
                MAX_BACKING_FILE_NAME_BYTES.into(),
            )?;
            let end = h
                .backing_file_offset
                .checked_add(h.backing_file_size.into());
            match end {
                Some(end)
                    if h.backing_file_offset >= u64::from(h.header_length)
                        && end <= cluster_size as u64 => {}
                _ => {
                    return err(
                        "header.backing_file_offset",
                        at::BACKING_FILE_OFFSET,
                        Problem::Inconsistent(
                            "backing file name must lie in the first cluster, after the header",
                        ),
                    );
                }
            }
        }
        let ext_end = if has_backing {
            // Checked above to be within the cluster.
            (h.backing_file_offset as usize).min(cluster_end)
        } else {
            cluster_end
        };
        h.extensions = parse_extensions(&r, h.header_length as usize, ext_end, &h)?;

        if has_backing {
            let off = h.backing_file_offset as usize;
            let name = r.bytes(
                off,
                h.backing_file_size as usize,
                "header.backing_file_name",
            )?;
            let name = std::str::from_utf8(name).map_err(|_| {
                FormatError::new("header.backing_file_name", off as u64, Problem::NotUtf8)
            })?;
            h.backing_file = Some(name.to_owned());
        }

        h.validate()?;
        Ok(h)
    }

    /// Cross-field checks; [`Header::parse`] calls this, and creation calls
    /// it before anything is written.
    pub fn validate(&self) -> Result<()> {
        let v3 = self.version >= 3;
        if !v3 && self.refcount_order != 4 {
            return err(
                "header.refcount_order",
                at::REFCOUNT_ORDER,
                Problem::Inconsistent("version 2 images have refcount_order 4"),
            );
        }
        check_range(
            "header.refcount_order",
            at::REFCOUNT_ORDER,
            self.refcount_order.into(),
            0,
            MAX_REFCOUNT_ORDER.into(),
        )?;

        let unknown = self.incompatible_features.unknown();
        if unknown != 0 {
            return err(
                "header.incompatible_features",
                at::INCOMPATIBLE_FEATURES,
                Problem::UnknownIncompatible {
                    bits: unknown,
                    names: self.describe_bits(FeatureKind::Incompatible, unknown),
                },
            );
        }

        let geometry = self.geometry_checked()?;
        let cluster_size = geometry.cluster_size();

        // Virtual size: QEMU refuses anything above INT64_MAX.
        check_range("header.size", at::SIZE, self.size, 0, i64::MAX as u64)?;

        // L1 table: bounded, large enough for the virtual size, aligned.
        let l1_max_entries = MAX_L1_TABLE_BYTES / 8;
        check_range(
            "header.l1_size",
            at::L1_SIZE,
            self.l1_size.into(),
            0,
            l1_max_entries,
        )?;
        if u64::from(self.l1_size) < geometry.l1_entries_for(self.size) {
            return err(
                "header.l1_size",
                at::L1_SIZE,
                Problem::Inconsistent("L1 table is too small for the virtual size"),
            );
        }
        check_table(
            "header.l1_table_offset",
            at::L1_TABLE_OFFSET,
            self.l1_table_offset,
            u64::from(self.l1_size) * 8,
            cluster_size,
        )?;

        // Refcount table.
        let reftable_max_clusters = (MAX_REFCOUNT_TABLE_BYTES / cluster_size).max(1);
        check_range(
            "header.refcount_table_clusters",
            at::REFCOUNT_TABLE_CLUSTERS,
            self.refcount_table_clusters.into(),
            1,
            reftable_max_clusters,
        )?;
        check_table(
            "header.refcount_table_offset",
            at::REFCOUNT_TABLE_OFFSET,
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cluster_size,
            cluster_size,
        )?;
        if self.refcount_table_offset == 0 {
            return err(
                "header.refcount_table_offset",
                at::REFCOUNT_TABLE_OFFSET,
                Problem::Inconsistent("refcount table overlaps the header"),
            );
        }

        // Snapshot table.
        check_range(
            "header.nb_snapshots",
            at::NB_SNAPSHOTS,
            self.nb_snapshots.into(),
            0,
            MAX_SNAPSHOTS.into(),
        )?;
        // Checked without snapshots too, as QEMU checks it at open.
        check_table(
            "header.snapshots_offset",
            at::SNAPSHOTS_OFFSET,
            self.snapshots_offset,
            u64::from(self.nb_snapshots) * crate::snapshot::SNAPSHOT_ENTRY_MIN_BYTES,
            cluster_size,
        )?;

        // Feature combinations.
        let inc = self.incompatible_features;
        if inc.contains(IncompatibleFeatures::COMPRESSION_TYPE)
            != (self.compression_type != CompressionType::Zlib)
        {
            return err(
                "header.compression_type",
                at::COMPRESSION_TYPE,
                Problem::Inconsistent(
                    "compression_type must be non-zero exactly when the compression type bit is set",
                ),
            );
        }
        let auto = self.autoclear_features;
        if auto.contains(AutoclearFeatures::RAW_EXTERNAL_DATA) {
            if !inc.contains(IncompatibleFeatures::EXTERNAL_DATA_FILE) {
                return err(
                    "header.autoclear_features",
                    at::AUTOCLEAR_FEATURES,
                    Problem::Inconsistent(
                        "raw external data bit set without an external data file",
                    ),
                );
            }
            if self.backing_file.is_some() {
                return err(
                    "header.backing_file_offset",
                    at::BACKING_FILE_OFFSET,
                    Problem::Inconsistent("a raw external data file cannot have a backing file"),
                );
            }
        }

        // Encryption: the FDE pointer exists exactly for LUKS.
        let fde = self.extensions.iter().find_map(|e| match e {
            HeaderExtension::FullDiskEncryption(p) => Some(*p),
            _ => None,
        });
        match (self.crypt_method, fde) {
            (CryptMethod::Luks, None) => {
                return err(
                    "header.crypt_method",
                    at::CRYPT_METHOD,
                    Problem::Inconsistent(
                        "LUKS encryption without a full disk encryption header extension",
                    ),
                );
            }
            (CryptMethod::None | CryptMethod::Aes, Some(_)) => {
                return err(
                    "header.crypt_method",
                    at::CRYPT_METHOD,
                    Problem::Inconsistent(
                        "full disk encryption header extension without LUKS encryption",
                    ),
                );
            }
            (CryptMethod::Luks, Some(_)) | (CryptMethod::None | CryptMethod::Aes, None) => {}
        }
        Ok(())
    }

    fn geometry_checked(&self) -> Result<Geometry> {
        let extended = self
            .incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2);
        Geometry::new(self.cluster_bits, extended, self.refcount_order).map_err(|e| match e {
            GeometryError::ClusterBits(v) => FormatError::new(
                "header.cluster_bits",
                at::CLUSTER_BITS,
                Problem::OutOfRange {
                    value: v.into(),
                    min: MIN_CLUSTER_BITS.into(),
                    max: MAX_CLUSTER_BITS.into(),
                },
            ),
            GeometryError::ExtendedL2ClusterBits(v) => FormatError::new(
                "header.cluster_bits",
                at::CLUSTER_BITS,
                Problem::OutOfRange {
                    value: v.into(),
                    min: MIN_CLUSTER_BITS_EXTENDED_L2.into(),
                    max: MAX_CLUSTER_BITS.into(),
                },
            ),
            GeometryError::RefcountOrder(v) => FormatError::new(
                "header.refcount_order",
                at::REFCOUNT_ORDER,
                Problem::OutOfRange {
                    value: v.into(),
                    min: 0,
                    max: MAX_REFCOUNT_ORDER.into(),
                },
            ),
        })
    }

    /// The geometry of a validated header.
    pub fn geometry(&self) -> Geometry {
        // validate() has checked every input of Geometry::new.
        self.geometry_checked()
            .expect("geometry of a validated header")
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn is_v3(&self) -> bool {
        self.version >= 3
    }

    pub fn compat_name(&self) -> &'static str {
        if self.is_v3() { "1.1" } else { "0.10" }
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::DIRTY)
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
    }

    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    pub fn data_file_is_raw(&self) -> bool {
        self.autoclear_features
            .contains(AutoclearFeatures::RAW_EXTERNAL_DATA)
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn external_data_file(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::ExternalDataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn bitmaps_extension(&self) -> Option<&BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }

    pub fn encryption_header(&self) -> Option<EncryptionHeaderPointer> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::FullDiskEncryption(p) => Some(*p),
            _ => None,
        })
    }

    pub fn feature_names(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                HeaderExtension::FeatureNameTable(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// Names the bits of `bits` from the image's feature name table, e.g.
    /// `"bit 5 \"frobnication\", bit 9"`.
    pub fn describe_bits(&self, kind: FeatureKind, bits: u64) -> String {
        let table = self.feature_names();
        let mut out = Vec::new();
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            match table.iter().find(|f| f.kind == kind && f.bit == bit) {
                Some(f) => out.push(format!("bit {bit} \"{}\"", f.name_lossy())),
                None => out.push(format!("bit {bit}")),
            }
        }
        out.join(", ")
    }

    /// Replaces (or with `None` removes) the extension of `kind`, keeping
    /// the position of an existing one.
    pub fn set_extension(&mut self, kind: u32, ext: Option<HeaderExtension>) {
        match (self.extensions.iter().position(|e| e.kind() == kind), ext) {
            (Some(i), Some(e)) => self.extensions[i] = e,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(e)) => self.extensions.push(e),
            (None, None) => {}
        }
    }

    /// Encodes the header cluster: fixed fields, additional fields, the
    /// extensions in order, the end marker, then the backing file name.
    /// header_length, backing_file_offset and backing_file_size are computed.
    /// The result is at most one cluster long.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        out.put_u32(QCOW2_MAGIC);
        out.put_u32(self.version);
        let backing_len = self.backing_file.as_ref().map_or(0, |b| b.len());
        out.put_u64(0); // backing_file_offset, patched below
        out.put_u32(u32::try_from(backing_len).map_err(|_| {
            FormatError::new(
                "header.backing_file_size",
                at::BACKING_FILE_SIZE,
                Problem::Overflow,
            )
        })?);
        out.put_u32(self.cluster_bits);
        out.put_u64(self.size);
        out.put_u32(self.crypt_method.raw());
        out.put_u32(self.l1_size);
        out.put_u64(self.l1_table_offset);
        out.put_u64(self.refcount_table_offset);
        out.put_u32(self.refcount_table_clusters);
        out.put_u32(self.nb_snapshots);
        out.put_u64(self.snapshots_offset);
        if self.is_v3() {
            out.put_u64(self.incompatible_features.bits());
            out.put_u64(self.compatible_features.bits());
            out.put_u64(self.autoclear_features.bits());
            out.put_u32(self.refcount_order);
            let len = align8(COMPRESSION_TYPE_OFFSET + 1 + self.additional_fields_tail.len())
                .unwrap_or(usize::MAX);
            out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
            out.put_u8(self.compression_type.raw());
            out.extend_from_slice(&self.additional_fields_tail);
            out.pad_to(8);
        }
        for ext in &self.extensions {
            let data = ext.encode_data();
            out.put_u32(ext.kind());
            out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
            out.extend_from_slice(&data);
            out.pad_to(8);
        }
        out.put_u32(ext_type::END);
        out.put_u32(0);
        if let Some(name) = &self.backing_file {
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return err(
                "header",
                0,
                Problem::Inconsistent(
                    "header, extensions and backing file name do not fit in one cluster",
                ),
            );
        }
        Ok(out)
    }
}

/// Alignment, and end within 64 bits, of a table at `offset` of `len` bytes.
pub(crate) fn check_table(
    field: &'static str,
    field_offset: u64,
    offset: u64,
    len: u64,
    cluster_size: u64,
) -> Result<()> {
    check_aligned(field, field_offset, offset, cluster_size)?;
    if offset
        .checked_add(len)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return err(field, field_offset, Problem::Overflow);
    }
    Ok(())
}

fn parse_extensions(
    r: &Reader<'_>,
    start: usize,
    end: usize,
    h: &Header,
) -> Result<Vec<HeaderExtension>> {
    let mut exts: Vec<HeaderExtension> = Vec::new();
    let mut pos = start;
    while pos + 8 <= end {
        let kind = r.u32(pos, "header_extension.type")?;
        let len = r.u32(pos + 4, "header_extension.length")? as usize;
        if kind == ext_type::END {
            break;
        }
        let data_at = pos + 8;
        if len > end - data_at {
            return err(
                "header_extension.length",
                r.file_offset(pos + 4),
                Problem::Inconsistent("header extension runs past the header area"),
            );
        }
        let data = r.bytes(data_at, len, "header_extension.data")?;
        let data_off = r.file_offset(data_at);
        let ext = match kind {
            ext_type::BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT_BYTES {
                    return err(
                        "header_extension.backing_format",
                        data_off,
                        Problem::OutOfRange {
                            value: len as u64,
                            min: 0,
                            max: MAX_BACKING_FORMAT_BYTES as u64,
                        },
                    );
                }
                HeaderExtension::BackingFormat(utf8(
                    "header_extension.backing_format",
                    data_off,
                    data,
                )?)
            }
            ext_type::EXTERNAL_DATA_FILE => HeaderExtension::ExternalDataFile(utf8(
                "header_extension.external_data_file",
                data_off,
                data,
            )?),
            ext_type::FEATURE_NAME_TABLE => {
                let entries = data
                    .chunks_exact(FEATURE_NAME_ENTRY_BYTES)
                    .map(|c| {
                        let name = &c[2..];
                        let n = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        FeatureName {
                            kind: FeatureKind::from_raw(c[0]),
                            bit: c[1],
                            name: name[..n].to_vec(),
                        }
                    })
                    .collect();
                HeaderExtension::FeatureNameTable(entries)
            }
            ext_type::BITMAPS => {
                // Without the autoclear bit the extension is stale and QEMU
                // ignores it; keep it verbatim rather than refusing the image.
                if h.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
                    HeaderExtension::Bitmaps(BitmapsExtension::parse(
                        &Reader::new(data, data_off),
                        h.cluster_size(),
                    )?)
                } else {
                    HeaderExtension::Unknown {
                        kind,
                        data: data.to_vec(),
                    }
                }
            }
            ext_type::FULL_DISK_ENCRYPTION => {
                if len != 16 {
                    return err(
                        "header_extension.fde.length",
                        r.file_offset(pos + 4),
                        Problem::OutOfRange {
                            value: len as u64,
                            min: 16,
                            max: 16,
                        },
                    );
                }
                let d = Reader::new(data, data_off);
                let p = EncryptionHeaderPointer {
                    offset: d.u64(0, "header_extension.fde.offset")?,
                    length: d.u64(8, "header_extension.fde.length")?,
                };
                check_table(
                    "header_extension.fde.offset",
                    data_off,
                    p.offset,
                    p.length,
                    h.cluster_size(),
                )?;
                HeaderExtension::FullDiskEncryption(p)
            }
            _ => HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            },
        };
        let known = !matches!(ext, HeaderExtension::Unknown { .. });
        if known && exts.iter().any(|e| e.kind() == kind) {
            return err(
                "header_extension.type",
                r.file_offset(pos),
                Problem::Duplicate,
            );
        }
        exts.push(ext);
        pos = data_at + align8(len).unwrap_or(usize::MAX).min(end - data_at);
    }
    Ok(exts)
}

fn utf8(field: &'static str, offset: u64, data: &[u8]) -> Result<String> {
    std::str::from_utf8(data)
        .map(str::to_owned)
        .map_err(|_| FormatError::new(field, offset, Problem::NotUtf8))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 0x180 bytes QEMU 10 wrote for `qemu-img create -f qcow2 a 1M`
    /// (without the feature name table, which we add back in code).
    fn minimal_v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: CryptMethod::None,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            additional_fields_tail: vec![0; 7],
            extensions: vec![HeaderExtension::FeatureNameTable(standard_feature_names())],
            backing_file: None,
        }
    }

    #[test]
    fn round_trip_minimal() {
        let h = minimal_v3();
        let bytes = h.encode().unwrap();
        assert_eq!(&bytes[0..4], b"QFI\xfb");
        assert_eq!(u32::from_be_bytes(bytes[100..104].try_into().unwrap()), 112);
        let mut padded = bytes.clone();
        padded.resize(65536, 0);
        let parsed = Header::parse(&padded).unwrap();
        assert_eq!(parsed, h);
    }

    #[test]
    fn backing_file_and_unknown_extension_preserved() {
        let mut h = minimal_v3();
        h.backing_file = Some("base.qcow2".into());
        h.extensions
            .insert(0, HeaderExtension::BackingFormat("qcow2".into()));
        h.extensions.push(HeaderExtension::Unknown {
            kind: 0x1234_5678,
            data: vec![1, 2, 3],
        });
        let bytes = h.encode().unwrap();
        let mut padded = bytes.clone();
        padded.resize(65536, 0);
        let parsed = Header::parse(&padded).unwrap();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(parsed.backing_format(), Some("qcow2"));
        assert_eq!(parsed.backing_file_offset as usize, bytes.len() - 10);
        assert_eq!(parsed.encode().unwrap(), bytes);
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = minimal_v3();
        h.incompatible_features = IncompatibleFeatures::from_bits_retain(1 << 7);
        if let HeaderExtension::FeatureNameTable(t) = &mut h.extensions[0] {
            t.push(FeatureName::new(
                FeatureKind::Incompatible,
                7,
                "frobnication",
            ));
        }
        let mut bytes = h.encode().unwrap();
        bytes.resize(65536, 0);
        let e = Header::parse(&bytes).unwrap_err();
        assert_eq!(e.field, "header.incompatible_features");
        assert_eq!(e.offset, 72);
        assert!(e.to_string().contains("frobnication"), "{e}");
    }

    #[test]
    fn bad_fields_are_named_with_offsets() {
        let base = {
            let mut b = minimal_v3().encode().unwrap();
            b.resize(65536, 0);
            b
        };
        let cases: &[(usize, &[u8], &str, u64)] = &[
            (0, b"QFI\x00", "header.magic", 0),
            (4, &[0, 0, 0, 4], "header.version", 4),
            (20, &[0, 0, 0, 8], "header.cluster_bits", 20),
            (20, &[0, 0, 0, 40], "header.cluster_bits", 20),
            (32, &[0, 0, 0, 3], "header.crypt_method", 32),
            (36, &[0, 0, 0, 0], "header.l1_size", 36),
            (36, &[0xff, 0xff, 0xff, 0xff], "header.l1_size", 36),
            (
                40,
                &[0, 0, 0, 0, 0, 0, 0x10, 1],
                "header.l1_table_offset",
                40,
            ),
            (
                48,
                &[0, 0, 0, 0, 0, 0, 0, 0],
                "header.refcount_table_offset",
                48,
            ),
            (56, &[0, 0, 0, 0], "header.refcount_table_clusters", 56),
            (60, &[0xff, 0xff, 0xff, 0xff], "header.nb_snapshots", 60),
            (96, &[0, 0, 0, 7], "header.refcount_order", 96),
            (100, &[0, 0, 0, 100], "header.header_length", 100),
            (100, &[0, 0, 0, 106], "header.header_length", 100),
            (104, &[2], "header.compression_type", 104),
            (104, &[1], "header.compression_type", 104),
            (24, &[0x80, 0, 0, 0, 0, 0, 0, 0], "header.size", 24),
        ];
        for (at, bytes, field, offset) in cases {
            let mut b = base.clone();
            b[*at..*at + bytes.len()].copy_from_slice(bytes);
            let e = Header::parse(&b).unwrap_err();
            assert_eq!((e.field, e.offset), (*field, *offset), "patch at {at}: {e}");
        }
    }

    #[test]
    fn truncated_files_are_errors() {
        let mut b = minimal_v3().encode().unwrap();
        b.resize(65536, 0);
        for len in [0, 3, 4, 50, 71, 103, 111] {
            assert!(Header::parse(&b[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn extension_running_past_cluster_is_refused() {
        let mut b = minimal_v3().encode().unwrap();
        b.resize(65536, 0);
        // The feature name table's length field sits right after its type.
        b[112 + 4..112 + 8].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.field, "header_extension.length");
        assert_eq!(e.offset, 116);
    }

    #[test]
    fn version2_layout() {
        let mut h = minimal_v3();
        h.version = 2;
        h.header_length = V2_HEADER_LENGTH;
        h.additional_fields_tail.clear();
        h.extensions.clear();
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), 72 + 8);
        let mut padded = bytes.clone();
        padded.resize(65536, 0);
        let parsed = Header::parse(&padded).unwrap();
        assert_eq!(parsed, h);
    }
}
