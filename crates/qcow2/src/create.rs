//! Planning a new image: what `qblk create` writes, computed without I/O.
//!
//! [`CreateSpec`] is what the user asked for; [`CreateSpec::validate`]
//! refuses the combinations qemu-img refuses. [`CreatePlan`] lays the image
//! out the way QEMU does (header, refcount table, refcount blocks, L1 table,
//! then preallocated L2 tables and data clusters) and produces its clusters
//! one at a time, so a preallocated multi-terabyte image never needs its
//! metadata in memory at once.

use crate::error::FormatError;
use crate::header::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, CryptMethod, Header, HeaderExtension,
    IncompatibleFeatures, MAX_BACKING_FORMAT_BYTES, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
    standard_feature_names,
};
use crate::mapping::{L1Entry, L2Entry, SubclusterBitmap};
use crate::refcount::{RefcountTableEntry, set_refcount};
use crate::types::{
    Geometry, GeometryError, HostOffset, MAX_BACKING_FILE_NAME_BYTES, MAX_CLUSTER_BITS,
    MAX_L1_TABLE_BYTES, MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, MIN_CLUSTER_BITS_EXTENDED_L2,
};

/// Smallest cluster size whose header cluster gets a feature name table.
const MIN_CLUSTER_SIZE_FOR_FEATURE_TABLE: u64 = 8192;

/// How much of the image to allocate up front (qemu-img's `preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the minimal metadata.
    #[default]
    Off,
    /// L2 tables and data cluster mappings; data clusters are sparse.
    Metadata,
    /// As `Metadata`, and the data clusters are reserved with fallocate.
    Falloc,
    /// As `Metadata`, and the data clusters are written with zeros.
    Full,
}

impl Preallocation {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "metadata" => Some(Self::Metadata),
            "falloc" => Some(Self::Falloc),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// The image a user asked for, with qemu-img's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Virtual size in bytes; rounded up to 512 as qemu-img does.
    pub size: u64,
    pub cluster_bits: u32,
    pub refcount_order: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub preallocation: Preallocation,
    /// LUKS encryption (crypt_method 2): the length in bytes of the
    /// encryption header area (LUKS header and key material) to reserve.
    /// Its contents are the caller's to write at
    /// [`CreatePlan::encryption_area`].
    pub luks_area_bytes: Option<u64>,
}

impl Default for CreateSpec {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            luks_area_bytes: None,
        }
    }
}

/// Why an image cannot be created as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    #[error("cluster size must be a power of two between {} and {} bytes", 1u64 << MIN_CLUSTER_BITS, 1u64 << MAX_CLUSTER_BITS)]
    ClusterSize,
    #[error("refcount_bits must be a power of two between 1 and 64")]
    RefcountBits,
    #[error("compat=0.10 images need refcount_bits=16")]
    V2RefcountBits,
    #[error("{0} requires compat=1.1 or later")]
    NeedsV3(&'static str),
    #[error("extended_l2 requires a cluster size of at least {} bytes", 1u64 << MIN_CLUSTER_BITS_EXTENDED_L2)]
    ExtendedL2ClusterSize,
    #[error("data_file_raw requires data_file")]
    DataFileRawWithoutDataFile,
    #[error("a backing file cannot be used with data_file_raw")]
    BackingWithRawDataFile,
    #[error("backing_fmt requires backing_file")]
    BackingFormatWithoutBackingFile,
    #[error("backing file and preallocation can only be used together with extended_l2=on")]
    BackingWithPreallocation,
    #[error("backing file name longer than {MAX_BACKING_FILE_NAME_BYTES} bytes")]
    BackingFileNameTooLong,
    #[error("backing format name longer than {MAX_BACKING_FORMAT_BYTES} bytes")]
    BackingFormatTooLong,
    #[error("image size {size} is too large for cluster size {cluster_size} (the L1 table would exceed {} MiB)", MAX_L1_TABLE_BYTES >> 20)]
    SizeTooLarge { size: u64, cluster_size: u64 },
    #[error("metadata for this image would need a refcount table larger than {} MiB; use a larger cluster size or smaller refcount_bits", MAX_REFCOUNT_TABLE_BYTES >> 20)]
    RefcountTableTooLarge,
    #[error("an encryption header area of {0} bytes is empty or too large")]
    LuksAreaBytes(u64),
    #[error("header, extensions and backing file name do not fit in one {0}-byte cluster")]
    HeaderTooLarge(u64),
    #[error("internal error building the header: {0}")]
    Header(#[from] FormatError),
}

impl CreateSpec {
    /// Refuses the combinations qemu-img refuses.
    pub fn validate(&self) -> Result<Geometry, CreateError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(CreateError::ClusterSize);
        }
        if self.refcount_order > 6 {
            return Err(CreateError::RefcountBits);
        }
        if self.version < 3 {
            if self.refcount_order != 4 {
                return Err(CreateError::V2RefcountBits);
            }
            let v3_only = [
                (self.lazy_refcounts, "lazy_refcounts"),
                (self.extended_l2, "extended_l2"),
                (
                    self.compression_type != CompressionType::Zlib,
                    "compression_type=zstd",
                ),
                (self.data_file.is_some(), "data_file"),
            ];
            if let Some((_, what)) = v3_only.iter().find(|(on, _)| *on) {
                return Err(CreateError::NeedsV3(what));
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(CreateError::DataFileRawWithoutDataFile);
        }
        if self.backing_file.is_some() && self.data_file_raw {
            return Err(CreateError::BackingWithRawDataFile);
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(CreateError::BackingFormatWithoutBackingFile);
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(CreateError::BackingWithPreallocation);
        }
        if self
            .backing_file
            .as_ref()
            .is_some_and(|b| b.is_empty() || b.len() > MAX_BACKING_FILE_NAME_BYTES as usize)
        {
            return Err(CreateError::BackingFileNameTooLong);
        }
        if self
            .backing_format
            .as_ref()
            .is_some_and(|f| f.len() > MAX_BACKING_FORMAT_BYTES)
        {
            return Err(CreateError::BackingFormatTooLong);
        }
        // Far more than any LUKS1 header with 8 slots of 4000 stripes of a
        // 64-byte key (about 2 MiB) needs.
        const MAX_LUKS_AREA_BYTES: u64 = 64 << 20;
        if let Some(n) = self.luks_area_bytes {
            if n == 0 || n > MAX_LUKS_AREA_BYTES {
                return Err(CreateError::LuksAreaBytes(n));
            }
        }
        let geometry = Geometry::new(self.cluster_bits, self.extended_l2, self.refcount_order)
            .map_err(|e| match e {
                GeometryError::ClusterBits(_) => CreateError::ClusterSize,
                GeometryError::ExtendedL2ClusterBits(_) => CreateError::ExtendedL2ClusterSize,
                GeometryError::RefcountOrder(_) => CreateError::RefcountBits,
            })?;
        let size = self.rounded_size()?;
        if geometry.l1_entries_for(size) > MAX_L1_TABLE_BYTES / 8 {
            return Err(CreateError::SizeTooLarge {
                size,
                cluster_size: geometry.cluster_size(),
            });
        }
        Ok(geometry)
    }

    /// The virtual size rounded up to 512 bytes, as qemu-img rounds it.
    pub fn rounded_size(&self) -> Result<u64, CreateError> {
        self.size
            .checked_next_multiple_of(512)
            .filter(|&s| s <= i64::MAX as u64)
            .ok_or(CreateError::SizeTooLarge {
                size: self.size,
                cluster_size: 1 << self.cluster_bits,
            })
    }

    /// Whether L2 tables and data mappings are written (data_file_raw
    /// implies metadata preallocation, as in QEMU: the mapping must be 1:1).
    pub fn preallocates_metadata(&self) -> bool {
        self.preallocation != Preallocation::Off || self.data_file_raw
    }
}

/// A region of the new image, in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Run {
    first: u64,
    count: u64,
}

impl Run {
    fn end(self) -> u64 {
        self.first + self.count
    }
    fn contains(self, cluster: u64) -> bool {
        cluster >= self.first && cluster < self.end()
    }
}

/// The layout of a new image, computed from a validated [`CreateSpec`].
#[derive(Debug, Clone)]
pub struct CreatePlan {
    spec: CreateSpec,
    geometry: Geometry,
    size: u64,
    header: Header,
    refcount_table: Run,
    refcount_blocks: Run,
    l1_table: Run,
    l1_entries: u64,
    l2_tables: Run,
    /// Data clusters in the image file (empty with an external data file).
    data: Run,
    /// The encryption header area (LUKS), after everything else as QEMU
    /// puts it (it sets up encryption last).
    luks: Run,
    /// Guest clusters that get a mapping (0 without preallocation).
    mapped_clusters: u64,
    /// Clusters 0..allocated all have refcount 1; no others are in use.
    allocated: u64,
}

impl CreatePlan {
    pub fn new(spec: &CreateSpec) -> Result<Self, CreateError> {
        let geometry = spec.validate()?;
        let size = spec.rounded_size()?;
        let l1_entries = geometry.l1_entries_for(size);
        let l1_clusters = geometry.clusters_for(l1_entries * 8);
        let (mapped_clusters, l2_count) = if spec.preallocates_metadata() {
            (geometry.clusters_for(size), l1_entries)
        } else {
            (0, 0)
        };
        let data_in_image = if spec.data_file.is_some() {
            0
        } else {
            mapped_clusters
        };

        let luks_clusters = spec.luks_area_bytes.map_or(0, |n| geometry.clusters_for(n));
        // Refcount blocks count every cluster including themselves and the
        // refcount table.
        let fixed = 1 + l1_clusters + l2_count + data_in_image + luks_clusters;
        let layout = crate::refcount::refcount_layout(
            &geometry,
            crate::types::HostCluster(0),
            crate::types::ClusterCount(fixed),
            Some(0),
            |_| false,
        )
        .ok_or(CreateError::RefcountTableTooLarge)?;
        let (rt, rb) = (layout.table_clusters.0, layout.new_blocks.len() as u64);

        let refcount_table = Run {
            first: 1,
            count: rt,
        };
        let refcount_blocks = Run {
            first: refcount_table.end(),
            count: rb,
        };
        let l1_table = Run {
            first: refcount_blocks.end(),
            count: l1_clusters,
        };
        let l2_tables = Run {
            first: l1_table.end(),
            count: l2_count,
        };
        let data = Run {
            first: l2_tables.end(),
            count: data_in_image,
        };
        let luks = Run {
            first: data.end(),
            count: luks_clusters,
        };
        let allocated = luks.end();

        let header = Self::build_header(
            spec,
            &geometry,
            size,
            l1_entries,
            l1_table,
            refcount_table,
            luks,
        )?;
        Ok(Self {
            spec: spec.clone(),
            geometry,
            size,
            header,
            refcount_table,
            refcount_blocks,
            l1_table,
            l1_entries,
            l2_tables,
            data,
            luks,
            mapped_clusters,
            allocated,
        })
    }

    fn build_header(
        spec: &CreateSpec,
        geometry: &Geometry,
        size: u64,
        l1_entries: u64,
        l1_table: Run,
        refcount_table: Run,
        luks: Run,
    ) -> Result<Header, CreateError> {
        let cs = geometry.cluster_size();
        let v3 = spec.version >= 3;
        let mut incompatible = IncompatibleFeatures::empty();
        incompatible.set(
            IncompatibleFeatures::EXTERNAL_DATA_FILE,
            spec.data_file.is_some(),
        );
        incompatible.set(
            IncompatibleFeatures::COMPRESSION_TYPE,
            spec.compression_type != CompressionType::Zlib,
        );
        incompatible.set(IncompatibleFeatures::EXTENDED_L2, spec.extended_l2);
        let mut compatible = CompatibleFeatures::empty();
        compatible.set(CompatibleFeatures::LAZY_REFCOUNTS, spec.lazy_refcounts);
        let mut autoclear = AutoclearFeatures::empty();
        autoclear.set(AutoclearFeatures::RAW_EXTERNAL_DATA, spec.data_file_raw);

        let mut extensions = Vec::new();
        if let Some(fmt) = &spec.backing_format {
            extensions.push(HeaderExtension::BackingFormat(fmt.clone()));
        }
        if let Some(df) = &spec.data_file {
            extensions.push(HeaderExtension::ExternalDataFile(df.clone()));
        }
        if let Some(length) = spec.luks_area_bytes {
            extensions.push(HeaderExtension::FullDiskEncryption(
                crate::header::EncryptionHeaderPointer {
                    offset: luks.first * cs,
                    length,
                },
            ));
        }
        let mut header = Header {
            version: spec.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: geometry.cluster_bits(),
            size,
            crypt_method: if spec.luks_area_bytes.is_some() {
                CryptMethod::Luks
            } else {
                CryptMethod::None
            },
            l1_size: u32::try_from(l1_entries).map_err(|_| CreateError::SizeTooLarge {
                size,
                cluster_size: cs,
            })?,
            l1_table_offset: if l1_entries == 0 {
                0
            } else {
                l1_table.first * cs
            },
            refcount_table_offset: refcount_table.first * cs,
            refcount_table_clusters: u32::try_from(refcount_table.count)
                .map_err(|_| CreateError::RefcountTableTooLarge)?,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if v3 {
                incompatible
            } else {
                IncompatibleFeatures::empty()
            },
            compatible_features: if v3 {
                compatible
            } else {
                CompatibleFeatures::empty()
            },
            autoclear_features: if v3 {
                autoclear
            } else {
                AutoclearFeatures::empty()
            },
            refcount_order: spec.refcount_order,
            header_length: if v3 {
                V3_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            },
            compression_type: spec.compression_type,
            additional_fields_tail: if v3 { vec![0; 7] } else { Vec::new() },
            extensions,
            backing_file: spec.backing_file.clone(),
        };
        // The feature name table is a courtesy to older readers. QEMU adds it
        // to version 3 images with clusters of 8 KiB or more, leaving small
        // header clusters room for a backing file name set later.
        if v3 && cs >= MIN_CLUSTER_SIZE_FOR_FEATURE_TABLE {
            let mut with_table = header.clone();
            with_table
                .extensions
                .push(HeaderExtension::FeatureNameTable(standard_feature_names()));
            if with_table.encode().is_ok() {
                header = with_table;
            }
        }
        header
            .encode()
            .map_err(|_| CreateError::HeaderTooLarge(cs))?;
        header.validate()?;
        // Record what encode() computes, so header() describes the bytes.
        let bytes = header.encode()?;
        Ok(Header::parse(&padded(bytes, cs))?)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn spec(&self) -> &CreateSpec {
        &self.spec
    }

    /// Virtual size in bytes (rounded up to 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Length of the image file.
    pub fn image_len(&self) -> u64 {
        self.allocated * self.geometry.cluster_size()
    }

    /// Length of the external data file, if the image has one.
    pub fn data_file_len(&self) -> Option<u64> {
        self.spec.data_file.as_ref().map(|_| self.size)
    }

    /// Host byte ranges holding preallocated guest data, in the image file
    /// or (with an external data file) in the data file, for fallocate or
    /// zero-filling.
    pub fn preallocated_data_range(&self) -> Option<(u64, u64)> {
        if self.mapped_clusters == 0 {
            return None;
        }
        let cs = self.geometry.cluster_size();
        Some(if self.spec.data_file.is_some() {
            (0, self.size)
        } else {
            (self.data.first * cs, self.data.count * cs)
        })
    }

    /// Where the encryption header area goes (offset, length in bytes):
    /// its clusters read as zeros until the caller writes the LUKS header
    /// and key material there, as QEMU zeroes them first.
    pub fn encryption_area(&self) -> Option<(HostOffset, u64)> {
        let cs = self.geometry.cluster_size();
        self.spec
            .luks_area_bytes
            .map(|n| (HostOffset(self.luks.first * cs), n))
    }

    /// Every metadata cluster of the image with its contents, in file
    /// order; clusters not produced (preallocated data) read as zeros.
    pub fn metadata_clusters(&self) -> impl Iterator<Item = (HostOffset, Vec<u8>)> + '_ {
        let cs = self.geometry.cluster_size();
        (0..self.data.first).map(move |c| (HostOffset(c * cs), self.cluster(c)))
    }

    fn cluster(&self, c: u64) -> Vec<u8> {
        let cs = self.geometry.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        if c == 0 {
            let h = self
                .header
                .encode()
                .expect("header encoded in CreatePlan::new");
            buf[..h.len()].copy_from_slice(&h);
        } else if self.refcount_table.contains(c) {
            let per = self.geometry.refcount_table_entries_per_cluster();
            let first_entry = (c - self.refcount_table.first) * per;
            for i in 0..per {
                let block = first_entry + i;
                if block >= self.refcount_blocks.count {
                    break;
                }
                let entry = RefcountTableEntry::new(HostOffset(
                    (self.refcount_blocks.first + block) * cs as u64,
                ));
                put_u64(&mut buf, i as usize, entry.0);
            }
        } else if self.refcount_blocks.contains(c) {
            let entries = self.geometry.refcount_block_entries();
            let first_cluster = (c - self.refcount_blocks.first) * entries;
            let order = self.geometry.refcount_order();
            for i in 0..entries {
                if first_cluster + i >= self.allocated {
                    break;
                }
                set_refcount(&mut buf, order, i as usize, 1).expect("refcount 1 fits any width");
            }
        } else if self.l1_table.contains(c) {
            let per = cs as u64 / 8;
            let first_entry = (c - self.l1_table.first) * per;
            for i in 0..per {
                let l1_index = first_entry + i;
                if l1_index >= self.l1_entries || l1_index >= self.l2_tables.count {
                    break;
                }
                let l2 = L1Entry::new(
                    HostOffset((self.l2_tables.first + l1_index) * cs as u64),
                    true,
                );
                put_u64(&mut buf, i as usize, l2.0);
            }
        } else if self.l2_tables.contains(c) {
            let entries = self.geometry.l2_entries();
            let first_guest = (c - self.l2_tables.first) * entries;
            for i in 0..entries {
                let guest = first_guest + i;
                if guest >= self.mapped_clusters {
                    break;
                }
                let host = if self.spec.data_file.is_some() {
                    guest * cs as u64
                } else {
                    (self.data.first + guest) * cs as u64
                };
                // QEMU leaves every subcluster unallocated in preallocated
                // extended L2 entries (the host cluster is reserved only).
                let e = L2Entry::standard(HostOffset(host), true, SubclusterBitmap(0));
                e.write(&mut buf, &self.geometry, i as usize);
            }
        }
        buf
    }
}

fn put_u64(buf: &mut [u8], index: usize, v: u64) {
    crate::be::encode_table([v], &mut buf[index * 8..]);
}

fn padded(mut bytes: Vec<u8>, cluster_size: u64) -> Vec<u8> {
    bytes.resize(cluster_size as usize, 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::ClusterDescriptor;
    use crate::refcount::get_refcount;

    fn plan(f: impl FnOnce(&mut CreateSpec)) -> Result<CreatePlan, CreateError> {
        let mut s = CreateSpec {
            size: 1 << 30,
            ..CreateSpec::default()
        };
        f(&mut s);
        CreatePlan::new(&s)
    }

    /// Assembles the whole image in memory (small images only).
    fn image(p: &CreatePlan) -> Vec<u8> {
        let mut img = vec![0u8; p.image_len() as usize];
        for (off, bytes) in p.metadata_clusters() {
            img[off.0 as usize..off.0 as usize + bytes.len()].copy_from_slice(&bytes);
        }
        img
    }

    #[test]
    fn default_layout_matches_qemu() {
        let p = plan(|_| {}).unwrap();
        let h = p.header();
        assert_eq!(h.refcount_table_offset, 0x10000);
        assert_eq!(h.l1_table_offset, 0x30000);
        assert_eq!(h.l1_size, 2);
        assert_eq!(h.header_length, 112);
        assert_eq!(p.image_len(), 0x40000);
        let img = image(&p);
        let parsed = Header::parse(&img).unwrap();
        assert_eq!(&parsed, h);
        // Clusters 0..4 have refcount 1, the rest 0.
        let block = &img[0x20000..0x30000];
        for i in 0..8 {
            assert_eq!(get_refcount(block, 4, i), u64::from(i < 4), "cluster {i}");
        }
    }

    #[test]
    fn combinations_refused_like_qemu_img() {
        use CreateError::*;
        type Edit = Box<dyn Fn(&mut CreateSpec)>;
        let cases: Vec<(Edit, CreateError)> = vec![
            (Box::new(|s| s.cluster_bits = 8), ClusterSize),
            (Box::new(|s| s.cluster_bits = 22), ClusterSize),
            (Box::new(|s| s.refcount_order = 7), RefcountBits),
            (
                Box::new(|s| {
                    s.version = 2;
                    s.refcount_order = 3
                }),
                V2RefcountBits,
            ),
            (
                Box::new(|s| {
                    s.version = 2;
                    s.lazy_refcounts = true
                }),
                NeedsV3("lazy_refcounts"),
            ),
            (
                Box::new(|s| {
                    s.version = 2;
                    s.extended_l2 = true
                }),
                NeedsV3("extended_l2"),
            ),
            (
                Box::new(|s| {
                    s.version = 2;
                    s.compression_type = CompressionType::Zstd
                }),
                NeedsV3("compression_type=zstd"),
            ),
            (
                Box::new(|s| {
                    s.version = 2;
                    s.data_file = Some("d".into())
                }),
                NeedsV3("data_file"),
            ),
            (
                Box::new(|s| {
                    s.extended_l2 = true;
                    s.cluster_bits = 13
                }),
                ExtendedL2ClusterSize,
            ),
            (
                Box::new(|s| s.data_file_raw = true),
                DataFileRawWithoutDataFile,
            ),
            (
                Box::new(|s| {
                    s.data_file = Some("d".into());
                    s.data_file_raw = true;
                    s.backing_file = Some("b".into())
                }),
                BackingWithRawDataFile,
            ),
            (
                Box::new(|s| s.backing_format = Some("raw".into())),
                BackingFormatWithoutBackingFile,
            ),
            (
                Box::new(|s| {
                    s.backing_file = Some("b".into());
                    s.preallocation = Preallocation::Metadata
                }),
                BackingWithPreallocation,
            ),
            (
                Box::new(|s| {
                    s.cluster_bits = 9;
                    s.size = 1 << 40
                }),
                SizeTooLarge {
                    size: 1 << 40,
                    cluster_size: 512,
                },
            ),
        ];
        for (i, (f, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(f).unwrap_err(), want, "case {i}");
        }
    }

    #[test]
    fn preallocated_metadata_maps_every_cluster() {
        for (ext, data_file) in [(false, false), (true, false), (false, true)] {
            let p = plan(|s| {
                s.size = 3 << 20;
                s.extended_l2 = ext;
                s.preallocation = Preallocation::Metadata;
                if data_file {
                    s.data_file = Some("data.raw".into());
                }
            })
            .unwrap();
            let img = image(&p);
            let h = Header::parse(&img).unwrap();
            let geo = h.geometry();
            let l1 = u64::from_be_bytes(img[h.l1_table_offset as usize..][..8].try_into().unwrap());
            let l2_off = L1Entry(l1).l2_offset().unwrap().0 as usize;
            for c in 0..48usize {
                let e = L2Entry::read(&img[l2_off..l2_off + 65536], &geo, c).unwrap();
                let d = e.decode(&geo, true, data_file, 0).unwrap();
                let host = d.host_cluster_offset().expect("mapped");
                if data_file {
                    assert_eq!(host.0, c as u64 * 65536);
                } else {
                    assert!(host.0 >= p.image_len() - 48 * 65536);
                }
            }
            let e = L2Entry::read(&img[l2_off..l2_off + 65536], &geo, 48).unwrap();
            assert_eq!(
                e.decode(&geo, true, data_file, 0).unwrap(),
                ClusterDescriptor::Unallocated
            );
        }
    }

    #[test]
    fn refcounts_cover_every_cluster_for_every_width() {
        for order in 0..=6 {
            for bits in [9, 12, 16] {
                let p = plan(|s| {
                    s.size = 64 << 20;
                    s.cluster_bits = bits;
                    s.refcount_order = order;
                    s.preallocation = Preallocation::Metadata;
                })
                .unwrap();
                let img_len = p.image_len();
                let geo = p.geometry();
                let h = p.header();
                let clusters = img_len / geo.cluster_size();
                let img = image(&p);
                // Walk the refcount structures as a reader would.
                let mut counted = 0;
                for c in 0..clusters + geo.refcount_block_entries() {
                    let rt_index = geo.refcount_table_index(crate::types::HostCluster(c));
                    let rt_entry = u64::from_be_bytes(
                        img[(h.refcount_table_offset + rt_index * 8) as usize..][..8]
                            .try_into()
                            .unwrap(),
                    );
                    let Some(block) = RefcountTableEntry(rt_entry).block_offset() else {
                        assert!(c >= clusters);
                        continue;
                    };
                    let block = &img[block.0 as usize..][..geo.cluster_size() as usize];
                    let rc = get_refcount(
                        block,
                        order,
                        geo.refcount_block_index(crate::types::HostCluster(c)),
                    );
                    assert_eq!(
                        rc,
                        u64::from(c < clusters),
                        "order {order} bits {bits} cluster {c}"
                    );
                    counted += rc;
                }
                assert_eq!(counted, clusters);
            }
        }
    }

    #[test]
    fn luks_area_follows_everything_like_qemu() {
        // qemu-img 7.2, 1 MiB, default options: LUKS at cluster 4, 2068480
        // bytes (32 clusters); with preallocation=metadata after the 16
        // data clusters (cluster 21).
        let area = 4040 * 512;
        let p = plan(|s| {
            s.size = 1 << 20;
            s.luks_area_bytes = Some(area)
        })
        .unwrap();
        assert_eq!(p.encryption_area(), Some((HostOffset(0x40000), area)));
        assert_eq!(p.image_len(), 0x240000);
        let h = p.header();
        assert_eq!(h.crypt_method, CryptMethod::Luks);
        assert_eq!(
            h.encryption_header(),
            Some(crate::header::EncryptionHeaderPointer {
                offset: 0x40000,
                length: area
            })
        );
        let img = image(&p);
        let block = &img[0x20000..0x30000];
        for i in 0..40 {
            assert_eq!(get_refcount(block, 4, i), u64::from(i < 36), "cluster {i}");
        }
        let p = plan(|s| {
            s.size = 1 << 20;
            s.preallocation = Preallocation::Metadata;
            s.luks_area_bytes = Some(area)
        })
        .unwrap();
        assert_eq!(p.encryption_area(), Some((HostOffset(0x150000), area)));
        // Small clusters: the area needs more refcount blocks, and every
        // cluster of it is counted.
        let p = plan(|s| {
            s.size = 1 << 20;
            s.cluster_bits = 9;
            s.luks_area_bytes = Some(area)
        })
        .unwrap();
        let (off, len) = p.encryption_area().unwrap();
        assert_eq!(off.0 + len.next_multiple_of(512), p.image_len());
        assert_eq!(
            plan(|s| s.luks_area_bytes = Some(0)).unwrap_err(),
            CreateError::LuksAreaBytes(0)
        );
    }

    #[test]
    fn small_clusters_drop_feature_table() {
        let p = plan(|s| s.cluster_bits = 9).unwrap();
        assert!(p.header().feature_names().is_empty());
        let p = plan(|s| s.cluster_bits = 12).unwrap();
        assert!(p.header().feature_names().is_empty());
        let p = plan(|s| s.cluster_bits = 13).unwrap();
        assert_eq!(p.header().feature_names().len(), 8);
    }

    #[test]
    fn zero_size_image() {
        let p = plan(|s| s.size = 0).unwrap();
        assert_eq!(p.header().l1_size, 0);
        assert_eq!(p.header().l1_table_offset, 0);
        assert_eq!(p.image_len(), 3 * 65536);
    }

    #[test]
    fn size_rounds_up_to_sectors() {
        let p = plan(|s| s.size = 1000).unwrap();
        assert_eq!(p.size(), 1024);
    }
}
