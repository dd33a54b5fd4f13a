//! `qblk measure`: how large a new image would be, with qemu-img
//! measure's figures, options and refusals.
//!
//! For a size alone, the image's metadata plus its data when fully
//! allocated. For a source image, the clusters its guest data needs (read
//! through its backing chain by block status: runs that read as zeros
//! need none), plus the metadata of a fully allocated image of its size, as
//! QEMU estimates it; and, for a qcow2 target of a qcow2 source, the space
//! the source's persistent bitmaps would take.

use std::path::PathBuf;

use serde::Serialize;

use qblk_engine::runtime::block_on;
use qblk_qcow2::bitmap::parse_bitmap_directory;
use qblk_qcow2::create::Preallocation;
use qblk_qcow2::measure::MeasureGeometry;

use crate::image::{ImageFormat, open_read, read_at};
use crate::options::{parse_bool, parse_size};
use crate::source::Source;
use crate::{Error, Result};

/// What `qblk measure` was asked for.
#[derive(Debug, Clone)]
pub struct MeasureRequest {
    /// `--size`: measure an empty image of this size.
    pub size: Option<u64>,
    /// Measure a copy of this image.
    pub source: Option<PathBuf>,
    /// `-f`; probed when `None`.
    pub source_format: Option<ImageFormat>,
    /// `-O` (qemu-img's default is raw).
    pub target_format: ImageFormat,
    /// `-o` options of the target, in order (later ones win).
    pub options: Vec<(String, String)>,
    /// `-U`: read the source whoever else holds it.
    pub force_share: bool,
}

/// qemu-img measure's answer, under its JSON names and in its order.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Measurement {
    /// Space for the source's persistent bitmaps (qcow2 version 3 source
    /// and target only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
    /// The file size the new image needs.
    pub required: u64,
    /// The file size of the new image fully allocated.
    #[serde(rename = "fully-allocated")]
    pub fully_allocated: u64,
}

impl Measurement {
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.serialize(&mut ser).expect("Measurement serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    pub fn to_human(&self) -> String {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            self.required, self.fully_allocated
        );
        if let Some(b) = self.bitmaps {
            s.push_str(&format!("bitmaps size: {b}\n"));
        }
        s
    }
}

/// The qcow2 target options measure reads (qemu-img measure accepts every
/// create option and validates only these).
#[derive(Debug, Clone, Copy)]
struct Qcow2Target {
    geometry: MeasureGeometry,
    version: u32,
    preallocation: Preallocation,
    has_backing_file: bool,
    size: u64,
    /// The LUKS area of an encrypted target, in bytes.
    luks_bytes: Option<u64>,
}

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

/// Reads the target options as qemu-img measure does: in QEMU's order of
/// checks (extended_l2, cluster_size, compat, refcount_bits,
/// preallocation), other create options taken without a look beyond their
/// type.
fn qcow2_target(options: &[(String, String)], size: Option<u64>) -> Result<Qcow2Target> {
    let last = |key: &str| {
        options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    for (k, v) in options {
        match k.as_str() {
            "lazy_refcounts" | "extended_l2" | "data_file_raw" => {
                parse_bool(k, v)?;
            }
            "size" | "cluster_size" => {
                parse_size(v)?;
            }
            "compat" | "refcount_bits" | "preallocation" | "compression_type" | "backing_file"
            | "backing_fmt" | "data_file" => {}
            // Checked together below, as create checks them.
            "encryption" => {
                parse_bool(k, v)?;
            }
            k if k.starts_with("encrypt.") => {}
            _ => return Err(usage(format!("invalid parameter '{k}'"))),
        }
    }
    let extended_l2 = last("extended_l2")
        .map(|v| parse_bool("extended_l2", v))
        .transpose()?
        .unwrap_or(false);
    let cluster_size = last("cluster_size")
        .map(parse_size)
        .transpose()?
        .unwrap_or(64 << 10);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(usage(format!(
            "invalid cluster_size {cluster_size}: must be a power of two between 512 and 2M"
        )));
    }
    if extended_l2 && cluster_size < 16 << 10 {
        return Err(usage(
            "extended_l2 needs a cluster_size of at least 16384 bytes".into(),
        ));
    }
    let version = match last("compat") {
        None | Some("1.1" | "v3") => 3,
        Some("0.10" | "v2") => 2,
        Some(v) => {
            return Err(usage(format!("invalid compat '{v}': expected 0.10 or 1.1")));
        }
    };
    let refcount_bits = match last("refcount_bits") {
        None => 16,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| usage(format!("invalid refcount_bits '{v}': expected a number")))?,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(usage(format!(
            "invalid refcount_bits {refcount_bits}: must be a power of two between 1 and 64"
        )));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(usage(
            "refcount_bits other than 16 require compat=1.1".into(),
        ));
    }
    let preallocation = match last("preallocation") {
        None => Preallocation::Off,
        Some(v) => Preallocation::parse(v).ok_or_else(|| {
            usage(format!(
                "invalid preallocation '{v}': expected off, metadata, falloc or full"
            ))
        })?,
    };
    let size = match size {
        Some(s) => s,
        None => last("size").map(parse_size).transpose()?.unwrap_or(0),
    };
    Ok(Qcow2Target {
        geometry: MeasureGeometry {
            cluster_bits: cluster_size.trailing_zeros(),
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2,
        },
        version,
        preallocation,
        has_backing_file: last("backing_file").is_some(),
        size,
        luks_bytes: crate::create::luks_area_bytes(options)?,
    })
}

fn raw_target(options: &[(String, String)]) -> Result<()> {
    for (k, v) in options {
        match k.as_str() {
            "size" => {
                parse_size(v)?;
            }
            "preallocation" => {}
            _ => return Err(usage(format!("invalid parameter '{k}'"))),
        }
    }
    Ok(())
}

fn too_large() -> Error {
    usage("the image size is too large (try using a larger cluster size)".into())
}

/// Measures.
pub fn measure(req: &MeasureRequest) -> Result<Measurement> {
    match (&req.source, req.size) {
        (Some(_), Some(_)) => {
            return Err(usage(
                "--size cannot be used together with a source image".into(),
            ));
        }
        (None, None) => {
            return Err(usage(
                "either --size or one source image must be given".into(),
            ));
        }
        _ => {}
    }
    block_on(async {
        let source = match &req.source {
            Some(path) => Some(Source::open(path, req.source_format, req.force_share).await?),
            None => None,
        };
        match req.target_format {
            ImageFormat::Raw => {
                raw_target(&req.options)?;
                let required = match (&source, req.size) {
                    (Some(s), _) => s.size(),
                    (None, size) => size
                        .unwrap_or(0)
                        .checked_next_multiple_of(512)
                        .ok_or_else(too_large)?,
                };
                Ok(Measurement {
                    bitmaps: None,
                    required,
                    fully_allocated: required,
                })
            }
            ImageFormat::Qcow2 => {
                let target = qcow2_target(&req.options, req.size)?;
                measure_qcow2(&target, source.as_ref()).await
            }
        }
    })
}

async fn measure_qcow2(target: &Qcow2Target, source: Option<&Source>) -> Result<Measurement> {
    let g = target.geometry;
    let cs = 1u64 << g.cluster_bits;
    if !g.l1_fits(target.size) {
        return Err(too_large());
    }
    let mut virtual_size = target
        .size
        .checked_next_multiple_of(cs)
        .ok_or_else(too_large)?;
    let mut required = 0u64;
    if let Some(src) = source {
        let size = src.size();
        virtual_size = size.checked_next_multiple_of(cs).ok_or_else(too_large)?;
        if target.has_backing_file {
            // The new image's backing file may share nothing with the
            // source: every cluster may need writing.
            required = virtual_size;
        } else {
            let mut pos = 0;
            while pos < size {
                let (status, mut len) = src.status(pos).await?;
                if !status.zero && status.data && status.allocated {
                    // Up to the end of the cluster, and the part of the
                    // first cluster before `pos` too (QEMU's estimate,
                    // which counts a cluster split between runs twice).
                    len = (pos + len).next_multiple_of(cs) - pos;
                    required += pos % cs + len;
                }
                pos += len;
            }
        }
    }
    if matches!(
        target.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) {
        required = virtual_size;
    }
    let fully_allocated = g.fully_allocated(virtual_size).ok_or_else(too_large)?;
    let required = (fully_allocated - virtual_size)
        .checked_add(required)
        .ok_or_else(too_large)?;
    // The LUKS header and key material, in whole clusters, as QEMU adds.
    let luks = target
        .luks_bytes
        .map_or(Some(0), |n| n.checked_next_multiple_of(cs))
        .ok_or_else(too_large)?;
    let (required, fully_allocated) = (
        required.checked_add(luks).ok_or_else(too_large)?,
        fully_allocated.checked_add(luks).ok_or_else(too_large)?,
    );
    let bitmaps = match source {
        Some(Source::Qcow2(img)) if target.version >= 3 && img.header().is_v3() => {
            Some(bitmaps_size(&g, img)?)
        }
        _ => None,
    };
    Ok(Measurement {
        bitmaps,
        required,
        fully_allocated,
    })
}

/// The space the source's persistent bitmaps take in a target of geometry
/// `g`: each bitmap fully allocated with its table, and the directory.
fn bitmaps_size(g: &MeasureGeometry, img: &qblk_engine::Image) -> Result<u64> {
    let header = img.header();
    let Some(ext) = header.bitmaps_extension() else {
        return Ok(0);
    };
    let path = img.path();
    let file = open_read(path)?;
    let buf = read_at(
        &file,
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
    let mut total = g.bitmap_directory_size(entries.iter().map(|e| e.name.len()));
    for e in &entries {
        let one = g
            .bitmap_size(img.size(), e.granularity())
            .ok_or_else(too_large)?;
        total = total.checked_add(one).ok_or_else(too_large)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<(String, String)> {
        crate::options::split_options(s).expect("options")
    }

    #[test]
    fn defaults_and_the_last_value_win() {
        let t = qcow2_target(&[], Some(1 << 30)).expect("defaults");
        assert_eq!(t.geometry.cluster_bits, 16);
        assert_eq!(t.geometry.refcount_order, 4);
        assert_eq!(t.version, 3);
        assert!(!t.has_backing_file);
        let t = qcow2_target(
            &opts("cluster_size=4k,cluster_size=2M,backing_file=b"),
            None,
        )
        .expect("options");
        assert_eq!(t.geometry.cluster_bits, 21);
        assert!(t.has_backing_file);
        assert_eq!(t.size, 0);
    }

    #[test]
    fn what_qemu_img_refuses_is_refused() {
        for bad in [
            "cluster_size=3k",
            "cluster_size=4M",
            "extended_l2=on,cluster_size=8k",
            "compat=2",
            "compat=0.10,refcount_bits=8",
            "refcount_bits=3",
            "refcount_bits=128",
            "preallocation=sometimes",
            "lazy_refcounts=maybe",
            "frobnicate=1",
            // Encryption as create refuses it.
            "encrypt.format=aes",
            "encrypt.format=luks,encrypt.cipher-alg=twofish-256",
            "encrypt.cipher-alg=aes-128",
        ] {
            assert!(qcow2_target(&opts(bad), Some(1 << 20)).is_err(), "{bad}");
        }
        let luks = qcow2_target(&opts("encrypt.format=luks"), Some(1 << 20)).unwrap();
        // aes-256-xts: 4 KiB of header, 8 slots of 256000 bytes (4 KiB-aligned).
        assert_eq!(luks.luks_bytes, Some(4096 + 8 * 258_048));
        assert!(raw_target(&opts("cluster_size=4k")).is_err());
        assert!(raw_target(&opts("preallocation=full,size=1M")).is_ok());
    }
}
