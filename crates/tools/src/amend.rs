//! `qblk amend`: qemu-img amend's option changes on an existing qcow2
//! image, through the engine (`qblk_engine::amend`).

use std::path::PathBuf;

use qblk_engine::amend::Amend;
use qblk_engine::runtime::block_on;

use crate::image::ImageFormat;
use crate::options::{parse_bool, parse_size};
use crate::{Error, Result};

/// The options amend understands, with qemu-img's help text.
pub const AMEND_OPTIONS: &[(&str, &str)] = &[
    ("backing_file=<str>", "File name of a base image"),
    ("backing_fmt=<str>", "Image format of the base image"),
    (
        "compat=<str>",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    ("data_file=<str>", "File name of an external data file"),
    (
        "data_file_raw=<bool (on/off)>",
        "The external data file must stay valid as a raw image",
    ),
    (
        "lazy_refcounts=<bool (on/off)>",
        "Postpone refcount updates",
    ),
    (
        "refcount_bits=<num>",
        "Width of a reference count entry in bits",
    ),
    ("size=<size>", "Virtual disk size"),
];

/// Options only `create` takes.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
];

#[derive(Debug, Clone)]
pub struct AmendRequest {
    pub image: PathBuf,
    pub format: Option<ImageFormat>,
    pub options: Vec<(String, String)>,
}

/// Parses `-o` options into the engine's request, with qemu-img's
/// refusals.
pub fn parse(options: &[(String, String)]) -> Result<Amend> {
    let usage = |m: String| Error::Usage(m);
    if options.is_empty() {
        return Err(usage("Must specify options (-o)".into()));
    }
    let mut a = Amend::default();
    for (k, v) in options {
        match k.as_str() {
            "compat" => {
                a.v3 = Some(match v.as_str() {
                    "0.10" | "v2" => false,
                    "1.1" | "v3" => true,
                    other => return Err(usage(format!("Unknown compatibility level {other}"))),
                })
            }
            "lazy_refcounts" => a.lazy_refcounts = Some(parse_bool(k, v)?),
            "refcount_bits" => {
                a.refcount_bits = Some(v.parse().map_err(|_| {
                    usage(
                        "Parameter 'refcount_bits' expects a non-negative number below 2^64".into(),
                    )
                })?)
            }
            "data_file" => a.data_file = Some(v.clone()),
            "data_file_raw" => a.data_file_raw = Some(parse_bool(k, v)?),
            "size" => a.size = Some(parse_size(v)?),
            "backing_file" | "backing_fmt" => {
                return Err(usage(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ));
            }
            k if CREATE_ONLY.contains(&k) => {
                return Err(usage(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )));
            }
            k if k.starts_with("encrypt.") => {
                return Err(usage(format!(
                    "'{k}': changing LUKS key slots is not supported by qblk (use qemu-img amend)"
                )));
            }
            k => return Err(usage(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(a)
}

pub fn amend(req: &AmendRequest) -> Result<()> {
    if req.format.is_some_and(|f| f != ImageFormat::Qcow2) {
        return Err(Error::Usage(
            "Format driver 'raw' does not support option amendment".into(),
        ));
    }
    let a = parse(&req.options)?;
    block_on(qblk_engine::amend::amend(&req.image, &a)).map_err(|e| match e {
        qblk_engine::image::Error::Unsupported { what, .. } => Error::Usage(what),
        other => Error::Engine {
            path: req.image.clone(),
            source: Box::new(other),
        },
    })
}
