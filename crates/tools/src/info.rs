//! `qblk info`: what qemu-img info reports, under qemu-img's JSON names.
//!
//! The JSON shape follows QEMU's ImageInfo so scripts written against
//! `qemu-img info --output=json` keep working: the same keys, the same
//! values, the same nesting (including the `file` child node).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use qblk_qcow2::Header;
use qblk_qcow2::bitmap::{BitmapFlags, parse_bitmap_directory};
use qblk_qcow2::error::Problem;
use qblk_qcow2::header::CryptMethod;
use qblk_qcow2::luks::{LUKS_HEADER_BYTES, LuksHeader};
use qblk_qcow2::snapshot::{
    SNAPSHOT_TABLE_FIRST_READ, SnapshotEntry, next_snapshot_table_read, parse_snapshot_table,
};

use crate::image::{ImageFormat, combine_like_qemu, open_read, probe, read_at, read_header};
use crate::options::human_size;
use crate::{Error, Result};

/// qemu-img's ImageInfo, for the formats qblk handles.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageInfo {
    pub children: Vec<ChildInfo>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<String>,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    pub filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: String,
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
}

/// A child node: the protocol-level view of the file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChildInfo {
    pub name: String,
    pub info: FileInfo,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileInfo {
    pub children: Vec<ChildInfo>,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    pub filename: String,
    pub format: String,
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    #[serde(rename = "format-specific")]
    pub format_specific: FileSpecific,
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Qcow2Specific,
}

/// `format-specific.data` for qcow2, in qemu-img's key order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Qcow2Specific {
    pub compat: String,
    #[serde(rename = "compression-type")]
    pub compression_type: String,
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    #[serde(rename = "refcount-bits")]
    pub refcount_bits: u32,
    #[serde(rename = "data-file", skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(rename = "data-file-raw", skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<EncryptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// `format-specific.data.encrypt`: the format, and for LUKS its header.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EncryptInfo {
    #[serde(rename = "ivgen-alg", skip_serializing_if = "Option::is_none")]
    pub ivgen_alg: Option<String>,
    #[serde(rename = "ivgen-hash-alg", skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    #[serde(rename = "detached-header", skip_serializing_if = "Option::is_none")]
    pub detached_header: Option<bool>,
    #[serde(rename = "hash-alg", skip_serializing_if = "Option::is_none")]
    pub hash_alg: Option<String>,
    #[serde(rename = "cipher-alg", skip_serializing_if = "Option::is_none")]
    pub cipher_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub format: String,
    #[serde(rename = "cipher-mode", skip_serializing_if = "Option::is_none")]
    pub cipher_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<LuksSlotInfo>>,
    #[serde(rename = "payload-offset", skip_serializing_if = "Option::is_none")]
    pub payload_offset: Option<u64>,
    #[serde(rename = "master-key-iters", skip_serializing_if = "Option::is_none")]
    pub master_key_iters: Option<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LuksSlotInfo {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    #[serde(rename = "key-offset")]
    pub key_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
}

impl EncryptInfo {
    fn plain(format: &str) -> Self {
        Self {
            ivgen_alg: None,
            ivgen_hash_alg: None,
            detached_header: None,
            hash_alg: None,
            cipher_alg: None,
            uuid: None,
            format: format.to_owned(),
            cipher_mode: None,
            slots: None,
            payload_offset: None,
            master_key_iters: None,
        }
    }

    fn luks(h: &LuksHeader) -> Self {
        Self {
            ivgen_alg: h.ivgen().map(str::to_owned),
            ivgen_hash_alg: h.ivgen_hash().map(str::to_owned),
            detached_header: Some(false),
            hash_alg: Some(h.hash_spec.clone()),
            cipher_alg: Some(h.cipher_alg()),
            uuid: Some(h.uuid.clone()),
            format: "luks".into(),
            cipher_mode: Some(h.mode().to_owned()),
            slots: Some(
                h.slots
                    .iter()
                    .map(|s| LuksSlotInfo {
                        active: s.active,
                        iters: s.active.then_some(s.iterations),
                        key_offset: s.key_offset,
                        stripes: s.active.then_some(s.stripes),
                    })
                    .collect(),
            ),
            payload_offset: Some(h.payload_offset),
            master_key_iters: Some(h.master_key_iterations),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BitmapInfo {
    pub flags: Vec<String>,
    pub name: String,
    pub granularity: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SnapshotInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    #[serde(rename = "vm-clock-nsec")]
    pub vm_clock_nsec: u64,
    pub name: String,
    #[serde(rename = "date-sec")]
    pub date_sec: u64,
    #[serde(rename = "date-nsec")]
    pub date_nsec: u64,
    #[serde(rename = "vm-clock-sec")]
    pub vm_clock_sec: u64,
    pub id: String,
    #[serde(rename = "vm-state-size")]
    pub vm_state_size: u64,
}

impl SnapshotInfo {
    fn from_entry(e: &SnapshotEntry) -> Self {
        Self {
            icount: e.icount(),
            vm_clock_nsec: e.vm_clock_nsec % 1_000_000_000,
            name: e.name_lossy(),
            date_sec: e.date_sec.into(),
            date_nsec: e.date_nsec.into(),
            vm_clock_sec: e.vm_clock_nsec / 1_000_000_000,
            id: e.id_lossy(),
            vm_state_size: e.vm_state_size(),
        }
    }
}

/// Describes the image at `path` (named `name` as the user typed it).
/// `format` forces a format; otherwise it is probed (qcow2 magic, else raw).
///
/// The image is locked as qemu-img info locks it (metadata only: refused
/// while a writer holds it) unless `force_share` (`-U`).
pub fn image_info(
    path: &Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> Result<ImageInfo> {
    let name = path.to_string_lossy().into_owned();
    let file = open_read(path)?;
    crate::lock_file(
        &file,
        path,
        qblk_engine::lock::Access::METADATA,
        force_share,
    )?;
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    let actual_size = meta.blocks() * 512;
    // QEMU's file layer reports lengths in whole 512-byte sectors.
    let file_len = meta.len().next_multiple_of(512);
    let child = ChildInfo {
        name: "file".into(),
        info: FileInfo {
            children: vec![],
            virtual_size: file_len,
            filename: name.clone(),
            format: "file".into(),
            actual_size,
            format_specific: FileSpecific {
                kind: "file".into(),
                data: serde_json::Map::new(),
            },
            dirty_flag: false,
        },
    };
    let format = match format {
        Some(f) => f,
        None => probe(&file, path)?,
    };
    match format {
        ImageFormat::Raw => Ok(ImageInfo {
            children: vec![child],
            backing_filename_format: None,
            virtual_size: file_len,
            filename: name,
            cluster_size: None,
            format: "raw".into(),
            actual_size,
            encrypted: None,
            format_specific: None,
            full_backing_filename: None,
            backing_filename: None,
            snapshots: None,
            dirty_flag: false,
        }),
        ImageFormat::Qcow2 => {
            let header = read_header(&file, path)?;
            let snapshots = read_snapshots(&file, path, &header)?;
            let bitmaps = read_bitmaps(&file, path, &header)?;
            let v3 = header.is_v3();
            let encrypted = header.crypt_method != CryptMethod::None;
            let data = Qcow2Specific {
                compat: header.compat_name().into(),
                compression_type: header.compression_type.name().into(),
                lazy_refcounts: v3.then(|| header.lazy_refcounts()),
                bitmaps,
                refcount_bits: header.refcount_bits(),
                data_file: header
                    .has_external_data_file()
                    .then(|| header.external_data_file().map(str::to_owned))
                    .flatten(),
                data_file_raw: header
                    .has_external_data_file()
                    .then(|| header.data_file_is_raw()),
                encrypt: read_encryption(&file, path, &header)?,
                corrupt: v3.then(|| header.is_corrupt()),
                extended_l2: v3.then(|| header.extended_l2()),
            };
            Ok(ImageInfo {
                children: vec![child],
                backing_filename_format: header
                    .backing_file
                    .as_ref()
                    .and(header.backing_format().map(str::to_owned)),
                virtual_size: header.size,
                full_backing_filename: header
                    .backing_file
                    .as_ref()
                    .map(|b| combine_like_qemu(&name, b)),
                backing_filename: header.backing_file.clone(),
                filename: name,
                cluster_size: Some(header.cluster_size()),
                format: "qcow2".into(),
                actual_size,
                encrypted: encrypted.then_some(true),
                format_specific: Some(FormatSpecific {
                    kind: "qcow2".into(),
                    data,
                }),
                snapshots: (!snapshots.is_empty())
                    .then(|| snapshots.iter().map(SnapshotInfo::from_entry).collect()),
                dirty_flag: header.is_dirty(),
            })
        }
    }
}

/// Describes the image at `path` and every image of its backing chain in
/// turn, as `qemu-img info --backing-chain` does: each backing file by the
/// name qemu-img gives it (the stored name joined to the directory of the
/// name before), in its recorded format (probed when none is recorded).
/// Every image is described before anything is returned, so a chain with a
/// missing file or a loop is an error as a whole.
pub fn image_info_chain(
    path: &Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> Result<Vec<ImageInfo>> {
    let mut chain: Vec<ImageInfo> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = Some((path.to_owned(), format));
    while let Some((path, format)) = next.take() {
        let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, "open", e))?;
        if !seen.insert(real) {
            return Err(Error::Usage(format!(
                "backing file '{}' creates an infinite loop",
                path.display()
            )));
        }
        if chain.len() > MAX_CHAIN_IMAGES {
            return Err(Error::Usage(format!(
                "{}: backing chain longer than {MAX_CHAIN_IMAGES} images",
                chain[0].filename
            )));
        }
        let info = image_info(&path, format, force_share)?;
        if let Some(full) = &info.full_backing_filename {
            let format = info
                .backing_filename_format
                .as_deref()
                .map(ImageFormat::parse)
                .transpose()
                .map_err(|_| Error::Unsupported {
                    path: path.clone(),
                    what: format!(
                        "backing file format '{}' is not supported",
                        info.backing_filename_format.as_deref().unwrap_or_default()
                    ),
                })?;
            next = Some((full.into(), format));
        }
        chain.push(info);
    }
    Ok(chain)
}

/// The longest backing chain `info --backing-chain` follows (images below
/// the top one); the engine follows no deeper one.
const MAX_CHAIN_IMAGES: usize = qblk_engine::image::DEFAULT_MAX_CHAIN_DEPTH as usize;

/// JSON of a backing chain: an array of qemu-img info objects.
pub fn chain_to_json(chain: &[ImageInfo]) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    chain.serialize(&mut ser).expect("ImageInfo serializes");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Human report of a backing chain: each image's, a blank line between.
pub fn chain_to_human(chain: &[ImageInfo]) -> String {
    chain
        .iter()
        .map(ImageInfo::to_human)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads the snapshot table, growing the read until it holds every entry
/// (bounded by QEMU's 64 MiB table limit and the file size).
pub fn read_snapshots(file: &File, path: &Path, header: &Header) -> Result<Vec<SnapshotEntry>> {
    if header.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len();
    let mut want = SNAPSHOT_TABLE_FIRST_READ;
    loop {
        let buf = read_at(file, path, header.snapshots_offset, want as usize)?;
        match parse_snapshot_table(
            &buf,
            header.snapshots_offset,
            header.nb_snapshots,
            header.cluster_size(),
        ) {
            Ok((entries, _)) => return Ok(entries),
            Err(e) if matches!(e.problem, Problem::Truncated { .. }) => {
                match next_snapshot_table_read(
                    want,
                    file_len.saturating_sub(header.snapshots_offset),
                ) {
                    Some(more) => want = more,
                    None => {
                        return Err(Error::Format {
                            path: path.to_owned(),
                            source: e,
                        });
                    }
                }
            }
            Err(source) => {
                return Err(Error::Format {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

fn read_encryption(file: &File, path: &Path, header: &Header) -> Result<Option<EncryptInfo>> {
    match header.crypt_method {
        CryptMethod::None => Ok(None),
        CryptMethod::Aes => Ok(Some(EncryptInfo::plain("aes"))),
        CryptMethod::Luks => {
            // Header::parse guarantees the pointer exists for LUKS.
            let Some(p) = header.encryption_header() else {
                return Ok(Some(EncryptInfo::plain("luks")));
            };
            let buf = read_at(file, path, p.offset, LUKS_HEADER_BYTES)?;
            let luks = LuksHeader::parse(&buf, p.offset).map_err(|source| Error::Format {
                path: path.to_owned(),
                source,
            })?;
            Ok(Some(EncryptInfo::luks(&luks)))
        }
    }
}

fn read_bitmaps(file: &File, path: &Path, header: &Header) -> Result<Option<Vec<BitmapInfo>>> {
    let Some(ext) = header.bitmaps_extension() else {
        return Ok(None);
    };
    let buf = read_at(
        file,
        path,
        ext.bitmap_directory_offset,
        ext.bitmap_directory_size as usize,
    )?;
    let entries = parse_bitmap_directory(&buf, ext, header.size, header.cluster_size()).map_err(
        |source| Error::Format {
            path: path.to_owned(),
            source,
        },
    )?;
    Ok(Some(
        entries
            .iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.flags.contains(BitmapFlags::IN_USE) {
                    flags.push("in-use".to_owned());
                }
                if e.flags.contains(BitmapFlags::AUTO) {
                    flags.push("auto".to_owned());
                }
                BitmapInfo {
                    flags,
                    name: e.name_lossy(),
                    granularity: e.granularity(),
                }
            })
            .collect(),
    ))
}

impl ImageInfo {
    /// JSON with qemu-img's four-space indentation.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serializing plain structs of strings and integers cannot fail.
        self.serialize(&mut ser).expect("ImageInfo serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// Human-readable report in qemu-img's layout.
    pub fn to_human(&self) -> String {
        let mut s = String::new();
        let mut line = |t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(format!("image: {}", self.filename));
        line(format!("file format: {}", self.format));
        line(format!(
            "virtual size: {} ({} bytes)",
            human_size(self.virtual_size),
            self.virtual_size
        ));
        line(format!("disk size: {}", human_size(self.actual_size)));
        if let Some(cs) = self.cluster_size {
            line(format!("cluster_size: {cs}"));
        }
        if self.encrypted == Some(true) {
            line("encrypted: yes".into());
        }
        if let Some(b) = &self.backing_filename {
            match &self.full_backing_filename {
                Some(full) if full != b => line(format!("backing file: {b} (actual path: {full})")),
                _ => line(format!("backing file: {b}")),
            }
        }
        if let Some(f) = &self.backing_filename_format {
            line(format!("backing file format: {f}"));
        }
        if let Some(snaps) = &self.snapshots {
            line("Snapshot list:".into());
            line(format!(
                "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
                "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
            ));
            for sn in snaps {
                let secs = sn.vm_clock_sec;
                let clock = format!(
                    "{:04}:{:02}:{:02}.{:03}",
                    secs / 3600,
                    (secs / 60) % 60,
                    secs % 60,
                    sn.vm_clock_nsec / 1_000_000
                );
                line(format!(
                    "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
                    sn.id,
                    sn.name,
                    human_size(sn.vm_state_size),
                    format_date(sn.date_sec),
                    clock,
                    sn.icount.map(|i| i.to_string()).unwrap_or_default()
                ));
            }
        }
        if let Some(fs) = &self.format_specific {
            let d = &fs.data;
            line("Format specific information:".into());
            line(format!("    compat: {}", d.compat));
            line(format!("    compression type: {}", d.compression_type));
            if let Some(v) = d.lazy_refcounts {
                line(format!("    lazy refcounts: {v}"));
            }
            if let Some(bitmaps) = &d.bitmaps {
                line("    bitmaps:".into());
                for (i, b) in bitmaps.iter().enumerate() {
                    line(format!("        [{i}]:"));
                    line("            flags:".into());
                    for (j, f) in b.flags.iter().enumerate() {
                        line(format!("                [{j}]: {f}"));
                    }
                    line(format!("            name: {}", b.name));
                    line(format!("            granularity: {}", b.granularity));
                }
            }
            line(format!("    refcount bits: {}", d.refcount_bits));
            if let Some(df) = &d.data_file {
                line(format!("    data file: {df}"));
            }
            if let Some(raw) = d.data_file_raw {
                line(format!("    data file raw: {raw}"));
            }
            if let Some(e) = &d.encrypt {
                line("    encrypt:".into());
                if let Some(v) = &e.ivgen_alg {
                    line(format!("        ivgen alg: {v}"));
                }
                if let Some(v) = &e.hash_alg {
                    line(format!("        hash alg: {v}"));
                }
                if let Some(v) = &e.cipher_alg {
                    line(format!("        cipher alg: {v}"));
                }
                if let Some(v) = &e.uuid {
                    line(format!("        uuid: {v}"));
                }
                line(format!("        format: {}", e.format));
                if let Some(v) = &e.cipher_mode {
                    line(format!("        cipher mode: {v}"));
                }
                if let Some(slots) = &e.slots {
                    line("        slots:".into());
                    for (i, s) in slots.iter().enumerate() {
                        line(format!("            [{i}]:"));
                        line(format!("                active: {}", s.active));
                        line(format!("                key offset: {}", s.key_offset));
                    }
                }
                if let Some(v) = e.payload_offset {
                    line(format!("        payload offset: {v}"));
                }
            }
            if let Some(c) = d.corrupt {
                line(format!("    corrupt: {c}"));
            }
            if let Some(x) = d.extended_l2 {
                line(format!("    extended l2: {x}"));
            }
        }
        for c in &self.children {
            line(format!("Child node '/{}':", c.name));
            line(format!("    filename: {}", c.info.filename));
            line(format!("    protocol type: {}", c.info.format));
            line(format!(
                "    file length: {} ({} bytes)",
                human_size(c.info.virtual_size),
                c.info.virtual_size
            ));
            line(format!("    disk size: {}", human_size(c.info.actual_size)));
        }
        s
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for a Unix time.
pub(crate) fn format_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for any u32 time.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_547_588), "2026-11-24 19:13:08");
    }
}
