//! `qblk bitmap`: qemu-img bitmap's operations on persistent dirty
//! bitmaps, applied in the order given, through the engine (which keeps
//! the bitmaps of every writable image; `qblk_engine::bitmaps`).

use std::path::{Path, PathBuf};

use qblk_engine::Image;
use qblk_engine::runtime::block_on;

use crate::chain::tool_open_options;
use crate::image::ImageFormat;
use crate::options::parse_size;
use crate::{Error, Result};

/// One operation, on the bitmap the request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOp {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge this bitmap (of the image, or of `source_file`) into it.
    Merge(String),
}

impl BitmapOp {
    fn name(&self) -> &'static str {
        match self {
            BitmapOp::Add => "add",
            BitmapOp::Remove => "remove",
            BitmapOp::Clear => "clear",
            BitmapOp::Enable => "enable",
            BitmapOp::Disable => "disable",
            BitmapOp::Merge(_) => "merge",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BitmapRequest {
    pub image: PathBuf,
    pub format: Option<ImageFormat>,
    pub ops: Vec<BitmapOp>,
    /// `-g`: the granularity of an added bitmap.
    pub granularity: Option<u64>,
    /// `-b`/`-F`: where `--merge` finds its source bitmap.
    pub source_file: Option<PathBuf>,
    pub source_format: Option<ImageFormat>,
    pub bitmap: String,
}

impl BitmapRequest {
    /// Parses qemu-img bitmap's arguments (after the subcommand).
    pub fn parse(args: &[String]) -> Result<BitmapRequest> {
        let usage = |m: &str| Error::Usage(m.to_owned());
        let mut req = BitmapRequest::default();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            // --opt=value and -xVALUE forms, as getopt takes them.
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ if a.len() > 2 && a.starts_with('-') && !a.starts_with("--") => {
                    (&a[..2], Some(a[2..].to_owned()))
                }
                _ => (a.as_str(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| usage(&format!("option '{name}' requires an argument")))
            };
            match flag {
                "--add" => req.ops.push(BitmapOp::Add),
                "--remove" => req.ops.push(BitmapOp::Remove),
                "--clear" => req.ops.push(BitmapOp::Clear),
                "--enable" => req.ops.push(BitmapOp::Enable),
                "--disable" => req.ops.push(BitmapOp::Disable),
                "--merge" => req.ops.push(BitmapOp::Merge(value("--merge")?)),
                "-g" | "--granularity" => {
                    let g = value("-g")?;
                    req.granularity = Some(parse_size(&g).map_err(|e| usage(&e.to_string()))?);
                }
                "-b" | "--source-file" => req.source_file = Some(value("-b")?.into()),
                "-F" | "--source-format" => {
                    req.source_format = Some(ImageFormat::parse(&value("-F")?)?)
                }
                "-f" | "--format" => req.format = Some(ImageFormat::parse(&value("-f")?)?),
                "--object" | "--image-opts" => {
                    return Err(usage(&format!("{flag} is not supported by qblk")));
                }
                f if f.starts_with('-') && f.len() > 1 => {
                    return Err(usage(&format!("unrecognized option '{a}'")));
                }
                _ => positional.push(a.clone()),
            }
        }
        if req.ops.is_empty() {
            return Err(usage(
                "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
            ));
        }
        if req.granularity.is_some() && !req.ops.contains(&BitmapOp::Add) {
            return Err(usage("granularity only supported with --add"));
        }
        if req.source_format.is_some() && req.source_file.is_none() {
            return Err(usage("-F only supported with -b"));
        }
        if req.source_file.is_some() && !req.ops.iter().any(|o| matches!(o, BitmapOp::Merge(_))) {
            return Err(usage("-b only supported with --merge"));
        }
        let [image, bitmap] = <[String; 2]>::try_from(positional)
            .map_err(|_| usage("Expecting filename and bitmap name"))?;
        req.image = image.into();
        req.bitmap = bitmap;
        Ok(req)
    }
}

fn engine(path: &Path, e: qblk_engine::image::Error) -> Error {
    Error::Engine {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

/// An image that does not open, in qemu-img's words.
fn not_opened(path: &Path, e: qblk_engine::image::Error) -> Error {
    let why = match &e {
        qblk_engine::image::Error::Io {
            op: "open", source, ..
        } => {
            // "No such file or directory", without the "(os error 2)".
            let s = source.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_owned()
        }
        _ => return engine(path, e),
    };
    Error::Usage(format!(
        "Could not open '{0}': Could not open '{0}': {why}",
        path.display()
    ))
}

/// What an operation's failure says, as qemu-img words it.
fn op_failed(op: &BitmapOp, bitmap: &str, e: qblk_engine::image::Error) -> Error {
    let why = match e {
        qblk_engine::image::Error::Unsupported { what, .. } => what,
        other => other.to_string(),
    };
    Error::Usage(format!(
        "Operation {} on bitmap {bitmap} failed: {why}",
        op.name()
    ))
}

/// Runs the request's operations in order. Those done before one fails
/// stay done, as with qemu-img.
pub fn bitmap(req: &BitmapRequest) -> Result<()> {
    if req.format.is_some_and(|f| f != ImageFormat::Qcow2) {
        let op = req.ops.first().expect("parse requires an operation");
        return Err(Error::Usage(format!(
            "Operation {} on bitmap {} failed: Can't store persistent bitmaps to {}: Operation not supported",
            op.name(),
            req.bitmap,
            req.image.display()
        )));
    }
    if req.source_format.is_some_and(|f| f != ImageFormat::Qcow2) {
        return Err(Error::Usage(
            "a --merge source must be a qcow2 image (raw images have no bitmaps)".into(),
        ));
    }
    block_on(async {
        let source = match &req.source_file {
            Some(p) => Some(
                Image::open(p, &tool_open_options(false, true, false))
                    .await
                    .map_err(|e| not_opened(p, e))?,
            ),
            None => None,
        };
        // After the source: from here on the image is closed on every path
        // (an open writer has marked its bitmaps in use).
        let img = Image::open(&req.image, &tool_open_options(true, true, false))
            .await
            .map_err(|e| not_opened(&req.image, e))?;
        let mut result = Ok(());
        for op in &req.ops {
            let r = match op {
                BitmapOp::Add => {
                    let g = req.granularity.unwrap_or_else(|| default_granularity(&img));
                    // --disable applies after --add (qemu-img's order); a
                    // disabled add is the same bitmap.
                    img.bitmap_add(&req.bitmap, g, true).await
                }
                BitmapOp::Remove => img.bitmap_remove(&req.bitmap).await,
                BitmapOp::Clear => img.bitmap_clear(&req.bitmap).await,
                BitmapOp::Enable => img.bitmap_set_enabled(&req.bitmap, true).await,
                BitmapOp::Disable => img.bitmap_set_enabled(&req.bitmap, false).await,
                BitmapOp::Merge(src) => img.bitmap_merge(&req.bitmap, source.as_ref(), src).await,
            };
            if let Err(e) = r {
                result = Err(op_failed(op, &req.bitmap, e));
                break;
            }
        }
        let closed = img.close().await.map_err(|e| engine(&req.image, e));
        result.and(closed)
    })
}

/// QEMU's default: the cluster size, at least 4 KiB and at most 64 KiB.
fn default_granularity(img: &Image) -> u64 {
    img.cluster_size().clamp(4096, 65536)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BitmapRequest> {
        BitmapRequest::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operations_keep_their_order_and_options_their_forms() {
        let r = parse(&[
            "--add",
            "-g64k",
            "--merge=src",
            "-b",
            "s.qcow2",
            "a.qcow2",
            "b0",
        ])
        .unwrap();
        assert_eq!(r.ops, [BitmapOp::Add, BitmapOp::Merge("src".into())]);
        assert_eq!(r.granularity, Some(65536));
        assert_eq!(r.source_file, Some(PathBuf::from("s.qcow2")));
        assert_eq!(
            (r.image, r.bitmap),
            (PathBuf::from("a.qcow2"), "b0".to_owned())
        );
    }

    #[test]
    fn qemu_img_refusals() {
        let msg = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(msg(&["a", "b"]).starts_with("Need at least one of"));
        assert_eq!(
            msg(&["--remove", "-g", "64k", "a", "b"]),
            "granularity only supported with --add"
        );
        assert_eq!(
            msg(&["--add", "-F", "qcow2", "a", "b"]),
            "-F only supported with -b"
        );
        assert_eq!(
            msg(&["--disable", "a", "b", "c"]),
            "Expecting filename and bitmap name"
        );
    }
}
