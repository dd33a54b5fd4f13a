//! `qblk create`: qemu-img create's options, defaults and refusals.
//!
//! Everything is validated and laid out before any file is touched. The
//! image is written to a temporary file beside the target, synced, and
//! renamed into place, so a failed or interrupted create never leaves a
//! half-written image under the target name.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use qblk_qcow2::create::{CreatePlan, CreateSpec, Preallocation};
use qblk_qcow2::header::CompressionType;
use qblk_qcow2::luks::{LuksCipherAlg, LuksCipherMode, LuksHash, LuksIvgen, LuksSpec};

use crate::image::{ImageFormat, open_read, probe, read_header, resolve_relative};
use crate::options::{parse_bool, parse_size};
use crate::{Error, Result};

/// What the user asked `qblk create` for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub path: PathBuf,
    /// qcow2 unless `-f raw`.
    pub format: Option<ImageFormat>,
    /// Virtual size; may be omitted when a backing file gives it.
    pub size: Option<u64>,
    /// `-o` options, in order (later ones win).
    pub options: Vec<(String, String)>,
    /// `-b`
    pub backing_file: Option<String>,
    /// `-F`
    pub backing_format: Option<String>,
    /// `-u`: do not open the backing file (size must then be given).
    pub unsafe_backing: bool,
    /// The passphrase of a LUKS-encrypted image (`--key-file`; qemu-img
    /// takes it from the secret object `encrypt.key-secret` names).
    pub key: Option<Vec<u8>>,
}

/// What `-o encrypt.*` asked for: a LUKS header made with these settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksRequest {
    pub spec: LuksSpec,
    pub iter_time_ms: u64,
}

/// The options `qblk create -f qcow2 -o help` lists.
pub const QCOW2_OPTIONS: &[(&str, &str)] = &[
    ("backing_file", "File name of a base image"),
    (
        "backing_fmt",
        "Image format of the base image (qcow2 or raw)",
    ),
    (
        "cluster_size",
        "qcow2 cluster size, 512 to 2M, a power of two (default 64k)",
    ),
    ("compat", "Compatibility level (0.10 or 1.1, default 1.1)"),
    (
        "compression_type",
        "Compression method for compressed clusters (zlib or zstd, default zlib)",
    ),
    ("data_file", "File name of an external data file"),
    (
        "encrypt.cipher-alg",
        "Encryption cipher: aes-128, aes-192 or aes-256 (default aes-256)",
    ),
    (
        "encrypt.cipher-mode",
        "Encryption cipher mode: xts or cbc (default xts)",
    ),
    (
        "encrypt.format",
        "Encrypt the image: luks (the passphrase comes from --key-file)",
    ),
    (
        "encrypt.hash-alg",
        "PBKDF2 and anti-forensic hash: sha1, sha224, sha256, sha384, sha512 (default sha256)",
    ),
    (
        "encrypt.iter-time",
        "Milliseconds of PBKDF2 to unlock the key (default 2000)",
    ),
    (
        "encrypt.ivgen-alg",
        "IV generator: plain64 or essiv (default plain64)",
    ),
    (
        "encrypt.ivgen-hash-alg",
        "Hash of the essiv IV generator: sha256 (the default)",
    ),
    (
        "encrypt.key-secret",
        "Accepted for qemu-img command lines; qblk reads the passphrase from --key-file",
    ),
    (
        "data_file_raw",
        "The external data file must stay valid as a raw image (on/off)",
    ),
    (
        "extended_l2",
        "Extended L2 tables with 32 subclusters per cluster (on/off)",
    ),
    ("lazy_refcounts", "Postpone refcount updates (on/off)"),
    (
        "preallocation",
        "Preallocation mode (off, metadata, falloc, full)",
    ),
    (
        "refcount_bits",
        "Width of a reference count entry in bits (1 to 64, default 16)",
    ),
    ("size", "Virtual disk size"),
];

/// The options `qblk create -f raw -o help` lists.
pub const RAW_OPTIONS: &[(&str, &str)] = &[
    ("preallocation", "Preallocation mode (off, falloc, full)"),
    ("size", "Virtual disk size"),
];

/// What was created, for the "Formatting ..." line.
#[derive(Debug, Clone)]
pub struct Created {
    pub format: ImageFormat,
    pub size: u64,
    /// `key=value` pairs in qemu-img's order.
    pub settings: Vec<(String, String)>,
}

impl Created {
    /// qemu-img's line: `Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 ...`.
    pub fn describe(&self, path: &Path) -> String {
        let mut s = format!(
            "Formatting '{}', fmt={}",
            path.display(),
            self.format.name()
        );
        for (k, v) in &self.settings {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// Translates a request into a validated qcow2 spec and, for an encrypted
/// image, what its LUKS header must be (no file is written). The spec's
/// `luks_area_bytes` is left for the caller, who makes the header.
pub fn qcow2_spec(req: &CreateRequest) -> Result<(CreateSpec, Option<LuksRequest>)> {
    let mut spec = CreateSpec::default();
    let mut encrypt = EncryptOptions::default();
    let mut size = req.size;
    spec.backing_file = req.backing_file.clone();
    spec.backing_format = req.backing_format.clone();
    for (k, v) in &req.options {
        match k.as_str() {
            "size" => size = Some(parse_size(v)?),
            "compat" => {
                spec.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(Error::Usage(format!(
                            "invalid compat '{v}': expected 0.10 or 1.1"
                        )));
                    }
                }
            }
            "cluster_size" => {
                let cs = parse_size(v)?;
                if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                    return Err(Error::Usage(format!(
                        "invalid cluster_size '{v}': must be a power of two between 512 and 2M"
                    )));
                }
                spec.cluster_bits = cs.trailing_zeros();
            }
            "refcount_bits" => {
                let bits: u64 = v.parse().map_err(|_| {
                    Error::Usage(format!("invalid refcount_bits '{v}': expected a number"))
                })?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(Error::Usage(format!(
                        "invalid refcount_bits '{v}': must be a power of two between 1 and 64"
                    )));
                }
                spec.refcount_order = bits.trailing_zeros();
            }
            "lazy_refcounts" => spec.lazy_refcounts = parse_bool(k, v)?,
            "extended_l2" => spec.extended_l2 = parse_bool(k, v)?,
            "data_file_raw" => spec.data_file_raw = parse_bool(k, v)?,
            "compression_type" => {
                spec.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(Error::Usage(format!(
                            "invalid compression_type '{v}': expected zlib or zstd"
                        )));
                    }
                }
            }
            "backing_file" => spec.backing_file = non_empty(k, v)?,
            "backing_fmt" => spec.backing_format = non_empty(k, v)?,
            "data_file" => spec.data_file = non_empty(k, v)?,
            "preallocation" => {
                spec.preallocation = Preallocation::parse(v).ok_or_else(|| {
                    Error::Usage(format!(
                        "invalid preallocation '{v}': expected off, metadata, falloc or full"
                    ))
                })?
            }
            "encryption" => encrypt.legacy = parse_bool(k, v)?,
            _ if k.starts_with("encrypt.") => encrypt.set(k, v)?,
            _ => return Err(Error::Usage(format!("invalid parameter '{k}'"))),
        }
    }
    if let Some(fmt) = &spec.backing_format {
        ImageFormat::parse(fmt).map_err(|_| {
            Error::Usage(format!(
                "backing format '{fmt}' is not supported: qblk backs images with qcow2 or raw files"
            ))
        })?;
    }
    if spec.backing_file.is_some() {
        let (probed_size, probed_format) = if req.unsafe_backing {
            (None, None)
        } else {
            let b = spec.backing_file.as_deref().unwrap_or_default();
            let (s, f) = backing_size(&req.path, b, spec.backing_format.as_deref())?;
            (Some(s), Some(f))
        };
        if spec.backing_format.is_none() {
            let detected = probed_format
                .map(|f| format!(" (detected format: {})", f.name()))
                .unwrap_or_default();
            return Err(Error::Usage(format!(
                "backing file specified without backing format{detected}: add -F FORMAT or -o backing_fmt=FORMAT"
            )));
        }
        if size.is_none() {
            size = probed_size;
        }
    }
    spec.size = size.ok_or_else(|| {
        Error::Usage("image creation needs a size (SIZE argument or -o size=...)".into())
    })?;
    let luks = encrypt.request(req.key.is_some())?;
    // Validate with a stand-in area size; the real one is the header's.
    let mut check = spec.clone();
    check.luks_area_bytes = luks.as_ref().map(|_| 1);
    check.validate().map_err(|source| Error::Create {
        path: req.path.clone(),
        source,
    })?;
    Ok((spec, luks))
}

/// The bytes the LUKS area of a new image with these `-o` options takes
/// (what `measure` adds), or `None` when they ask for no encryption; the
/// same refusals as `create`, except that no passphrase is needed.
pub(crate) fn luks_area_bytes(options: &[(String, String)]) -> Result<Option<u64>> {
    let mut e = EncryptOptions::default();
    for (k, v) in options {
        match k.as_str() {
            "encryption" => e.legacy = parse_bool(k, v)?,
            k if k.starts_with("encrypt.") => e.set(k, v)?,
            _ => {}
        }
    }
    Ok(e.request(true)?.map(|l| {
        qblk_qcow2::luks::LuksHeader::new_qemu_layout(&l.spec, String::new()).payload_offset
    }))
}

/// The `encrypt.*` options as given.
#[derive(Debug, Default)]
struct EncryptOptions {
    /// `encryption=on`: QEMU's legacy AES.
    legacy: bool,
    format: Option<String>,
    key_secret: Option<String>,
    cipher_alg: Option<String>,
    cipher_mode: Option<String>,
    ivgen_alg: Option<String>,
    ivgen_hash_alg: Option<String>,
    hash_alg: Option<String>,
    iter_time: Option<String>,
}

impl EncryptOptions {
    fn set(&mut self, k: &str, v: &str) -> Result<()> {
        let slot = match k {
            "encrypt.format" => &mut self.format,
            "encrypt.key-secret" => &mut self.key_secret,
            "encrypt.cipher-alg" => &mut self.cipher_alg,
            "encrypt.cipher-mode" => &mut self.cipher_mode,
            "encrypt.ivgen-alg" => &mut self.ivgen_alg,
            "encrypt.ivgen-hash-alg" => &mut self.ivgen_hash_alg,
            "encrypt.hash-alg" => &mut self.hash_alg,
            "encrypt.iter-time" => &mut self.iter_time,
            _ => return Err(Error::Usage(format!("invalid parameter '{k}'"))),
        };
        *slot = Some(v.to_owned());
        Ok(())
    }

    /// What to make, refusing what qemu-img refuses and what qblk cannot
    /// make, each by name.
    fn request(&self, have_key: bool) -> Result<Option<LuksRequest>> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.legacy && self.format.is_some() {
            return usage(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            );
        }
        let legacy = "QEMU's legacy AES encryption (encrypt.format=aes, encryption=on) is insecure and qblk does not create it; use encrypt.format=luks";
        let format = match (self.legacy, self.format.as_deref()) {
            (true, _) | (_, Some("aes")) => return usage(legacy.into()),
            (false, Some("luks")) => true,
            (false, Some(other)) => {
                return usage(format!(
                    "invalid encrypt.format '{other}': qblk creates luks"
                ));
            }
            (false, None) => false,
        };
        if !format {
            let given = [
                ("encrypt.key-secret", self.key_secret.is_some()),
                ("encrypt.cipher-alg", self.cipher_alg.is_some()),
                ("encrypt.cipher-mode", self.cipher_mode.is_some()),
                ("encrypt.ivgen-alg", self.ivgen_alg.is_some()),
                ("encrypt.ivgen-hash-alg", self.ivgen_hash_alg.is_some()),
                ("encrypt.hash-alg", self.hash_alg.is_some()),
                ("encrypt.iter-time", self.iter_time.is_some()),
            ];
            if let Some((k, _)) = given.iter().find(|(_, on)| *on) {
                return usage(format!("parameter '{k}' needs encrypt.format=luks"));
            }
            return Ok(None);
        }
        if !have_key {
            return usage(
                "encrypt.format=luks needs a passphrase: give it with --key-file PATH (convert: --target-key-file PATH), where qemu-img takes --object secret,id=ID,file=PATH -o encrypt.key-secret=ID".into(),
            );
        }
        let spec_err = |e: qblk_qcow2::luks::LuksSpecError| Error::Usage(e.to_string());
        let default = LuksSpec::default();
        let cipher = match &self.cipher_alg {
            Some(v) => LuksCipherAlg::parse(v).map_err(spec_err)?,
            None => default.cipher,
        };
        let mode = match &self.cipher_mode {
            Some(v) => LuksCipherMode::parse(v).map_err(spec_err)?,
            None => default.mode,
        };
        let hash = match &self.hash_alg {
            Some(v) => LuksHash::parse(v).map_err(spec_err)?,
            None => default.hash,
        };
        // QEMU's default ESSIV hash is sha256; with plain64 it is ignored.
        let ivgen_hash = match &self.ivgen_hash_alg {
            Some(v) => LuksHash::parse(v).map_err(spec_err)?,
            None => LuksHash::Sha256,
        };
        let ivgen = LuksIvgen::parse(self.ivgen_alg.as_deref().unwrap_or("plain64"), ivgen_hash)
            .map_err(spec_err)?;
        if (cipher, mode) == (LuksCipherAlg::Aes192, LuksCipherMode::Cbc) {
            // 24-byte keys in 4000 stripes are 187.5 sectors of key
            // material; QEMU asserts on that and dies opening the image.
            return usage(
                "aes-192 in cbc mode is refused: QEMU cannot open such an image (qemu-img aborts on its key material, which is not a whole number of sectors); use aes-128 or aes-256, or xts".into(),
            );
        }
        let iter_time_ms = match &self.iter_time {
            None => qblk_engine::crypto::DEFAULT_ITER_TIME_MS,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|&n| n <= qblk_engine::crypto::MAX_ITER_TIME_MS)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "invalid encrypt.iter-time '{v}': expected milliseconds, 0 to {}",
                        qblk_engine::crypto::MAX_ITER_TIME_MS
                    ))
                })?,
        };
        Ok(Some(LuksRequest {
            spec: LuksSpec {
                cipher,
                mode,
                ivgen,
                hash,
            },
            iter_time_ms,
        }))
    }

    /// The `encrypt.*` settings in qemu-img's order, as given.
    fn settings(&self, out: &mut Vec<(String, String)>) {
        let given = [
            ("encrypt.key-secret", &self.key_secret),
            ("encrypt.cipher-alg", &self.cipher_alg),
            ("encrypt.cipher-mode", &self.cipher_mode),
            ("encrypt.ivgen-alg", &self.ivgen_alg),
            ("encrypt.ivgen-hash-alg", &self.ivgen_hash_alg),
            ("encrypt.hash-alg", &self.hash_alg),
            ("encrypt.iter-time", &self.iter_time),
        ];
        if let Some(f) = &self.format {
            out.push(("encrypt.format".into(), f.clone()));
        }
        for (k, v) in given {
            if let Some(v) = v {
                out.push((k.into(), v.clone()));
            }
        }
    }
}

fn non_empty(k: &str, v: &str) -> Result<Option<String>> {
    if v.is_empty() {
        return Err(Error::Usage(format!("parameter '{k}' needs a value")));
    }
    Ok(Some(v.to_owned()))
}

/// Opens the backing file the way the image will name it, and returns its
/// virtual size and probed format.
fn backing_size(image: &Path, backing: &str, format: Option<&str>) -> Result<(u64, ImageFormat)> {
    let path = resolve_relative(image, backing);
    let file = open_read(&path).map_err(|e| match e {
        Error::Io { path, source, .. } => Error::Io {
            path,
            op: "open backing file",
            source,
        },
        other => other,
    })?;
    let probed = probe(&file, &path)?;
    let format = match format {
        Some(f) => ImageFormat::parse(f)?,
        None => probed,
    };
    let size = match format {
        ImageFormat::Qcow2 => read_header(&file, &path)?.size,
        ImageFormat::Raw => file
            .metadata()
            .map_err(|e| Error::io(&path, "stat backing file", e))?
            .len(),
    };
    Ok((size, probed))
}

/// Creates the image the request describes.
pub fn create(req: &CreateRequest) -> Result<Created> {
    match req.format.unwrap_or(ImageFormat::Qcow2) {
        ImageFormat::Qcow2 => create_qcow2(req),
        ImageFormat::Raw => create_raw(req),
    }
}

fn create_qcow2(req: &CreateRequest) -> Result<Created> {
    let (mut spec, luks) = qcow2_spec(req)?;
    let luks_area = match (&luks, &req.key) {
        (Some(l), Some(key)) => {
            let area = qblk_engine::crypto::create_luks_area(&l.spec, key, l.iter_time_ms)
                .map_err(|source| Error::Crypto {
                    path: req.path.clone(),
                    source,
                })?;
            spec.luks_area_bytes = Some(area.len() as u64);
            Some(area)
        }
        _ => None,
    };
    let plan = CreatePlan::new(&spec).map_err(|source| Error::Create {
        path: req.path.clone(),
        source,
    })?;

    if let Some(df) = &spec.data_file {
        let data_path = resolve_relative(&req.path, df);
        let len = plan.data_file_len().unwrap_or(0);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| Error::io(&data_path, "create data file", e))?;
        // Like qemu-img: the data file starts empty (zeros) at the virtual size.
        f.set_len(0)
            .and_then(|()| f.set_len(len))
            .map_err(|e| Error::io(&data_path, "size data file", e))?;
        preallocate(&f, &data_path, spec.preallocation, 0, len)?;
        f.sync_all()
            .map_err(|e| Error::io(&data_path, "sync data file", e))?;
    }

    write_atomically(&req.path, |file, path| {
        for (offset, bytes) in plan.metadata_clusters() {
            file.write_all_at(&bytes, offset.0)
                .map_err(|e| Error::io(path, "write", e))?;
        }
        file.set_len(plan.image_len())
            .map_err(|e| Error::io(path, "resize", e))?;
        if let (Some((offset, _)), Some(area)) = (plan.encryption_area(), &luks_area) {
            file.write_all_at(area, offset.0)
                .map_err(|e| Error::io(path, "write LUKS header", e))?;
        }
        if spec.data_file.is_none() {
            if let Some((off, len)) = plan.preallocated_data_range() {
                preallocate(file, path, spec.preallocation, off, len)?;
            }
        }
        Ok(())
    })?;

    let on_off = |b: bool| if b { "on" } else { "off" }.to_owned();
    let mut settings = Vec::new();
    if luks.is_some() {
        let mut encrypt = EncryptOptions::default();
        for (k, v) in &req.options {
            if k.starts_with("encrypt.") {
                encrypt.set(k, v)?;
            }
        }
        encrypt.settings(&mut settings);
    }
    settings.push((
        "cluster_size".to_owned(),
        plan.geometry().cluster_size().to_string(),
    ));
    settings.push(("extended_l2".to_owned(), on_off(spec.extended_l2)));
    if spec.preallocation != Preallocation::Off {
        settings.push(("preallocation".into(), spec.preallocation.name().into()));
    }
    settings.push((
        "compression_type".into(),
        spec.compression_type.name().into(),
    ));
    settings.push(("size".into(), plan.size().to_string()));
    if let Some(b) = &spec.backing_file {
        settings.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &spec.backing_format {
        settings.push(("backing_fmt".into(), f.clone()));
    }
    if let Some(d) = &spec.data_file {
        settings.push(("data_file".into(), d.clone()));
        settings.push(("data_file_raw".into(), on_off(spec.data_file_raw)));
    }
    if spec.version < 3 {
        settings.push(("compat".into(), "0.10".into()));
    }
    settings.push(("lazy_refcounts".into(), on_off(spec.lazy_refcounts)));
    settings.push((
        "refcount_bits".into(),
        (1u32 << spec.refcount_order).to_string(),
    ));
    Ok(Created {
        format: ImageFormat::Qcow2,
        size: plan.size(),
        settings,
    })
}

fn create_raw(req: &CreateRequest) -> Result<Created> {
    let mut size = req.size;
    let mut prealloc = Preallocation::Off;
    if req.backing_file.is_some() || req.backing_format.is_some() {
        return Err(Error::Usage("raw images cannot have a backing file".into()));
    }
    for (k, v) in &req.options {
        match k.as_str() {
            "size" => size = Some(parse_size(v)?),
            "preallocation" => {
                prealloc = match Preallocation::parse(v) {
                    Some(
                        p @ (Preallocation::Off | Preallocation::Falloc | Preallocation::Full),
                    ) => p,
                    _ => {
                        return Err(Error::Usage(format!(
                            "invalid preallocation '{v}' for raw: expected off, falloc or full"
                        )));
                    }
                }
            }
            _ => return Err(Error::Usage(format!("invalid parameter '{k}' for raw"))),
        }
    }
    let size = size
        .ok_or_else(|| Error::Usage("image creation needs a size".into()))?
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::Usage("size too large".into()))?;
    write_atomically(&req.path, |file, path| {
        file.set_len(size)
            .map_err(|e| Error::io(path, "resize", e))?;
        preallocate(file, path, prealloc, 0, size)
    })?;
    let mut settings = vec![];
    if prealloc != Preallocation::Off {
        settings.push(("preallocation".into(), prealloc.name().into()));
    }
    settings.push(("size".into(), size.to_string()));
    Ok(Created {
        format: ImageFormat::Raw,
        size,
        settings,
    })
}

/// Reserves or zero-fills `len` bytes at `offset` as the mode asks.
fn preallocate(file: &File, path: &Path, mode: Preallocation, offset: u64, len: u64) -> Result<()> {
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => {
            if len == 0 {
                return Ok(());
            }
            rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len)
                .map_err(|e| Error::io(path, "fallocate", e.into()))
        }
        Preallocation::Full => {
            const CHUNK: usize = 1 << 20;
            let zeros = vec![0u8; CHUNK];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)
                    .map_err(|e| Error::io(path, "write zeros", e))?;
                done += n as u64;
            }
            Ok(())
        }
    }
}

/// Writes a new file at `target` through `fill`. A regular file (or no
/// file) is replaced atomically via a synced temporary file in the same
/// directory; anything else (a block device, say) is written in place, as
/// qemu-img would.
fn write_atomically(target: &Path, fill: impl FnOnce(&File, &Path) -> Result<()>) -> Result<()> {
    let real = match std::fs::canonicalize(target) {
        Ok(p) => p,
        Err(_) => target.to_owned(),
    };
    if let Ok(meta) = std::fs::metadata(&real) {
        let ft = meta.file_type();
        if ft.is_block_device() || ft.is_char_device() {
            let f = OpenOptions::new()
                .write(true)
                .open(&real)
                .map_err(|e| Error::io(&real, "open", e))?;
            fill(&f, &real)?;
            return f.sync_all().map_err(|e| Error::io(&real, "sync", e));
        }
    }
    // An image someone holds (a running VM, qemu-img, qblk serve) is not
    // replaced under them: lock the one there as a writer would, and keep
    // the lock until the new one has taken its place.
    let _held = match File::open(&real) {
        Ok(old) => {
            crate::lock_file(&old, &real, qblk_engine::lock::Access::WRITER, false)?;
            Some(old)
        }
        Err(_) => None,
    };
    let dir = match real.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = real
        .file_name()
        .ok_or_else(|| Error::Usage(format!("'{}' is not a file name", target.display())))?;
    let tmp = dir.join(format!(
        ".{}.qblk-create-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&real, "create", e))?;
        fill(&f, &tmp)?;
        f.flush().map_err(|e| Error::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "sync", e))?;
        std::fs::rename(&tmp, &real).map_err(|e| Error::io(&real, "rename into place", e))?;
        if let Ok(d) = File::open(&dir) {
            // Make the rename durable; failure here does not undo the create.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(dir: &Path, opts: &[(&str, &str)]) -> CreateRequest {
        CreateRequest {
            path: dir.join("t.qcow2"),
            size: Some(1 << 30),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..CreateRequest::default()
        }
    }

    #[test]
    fn refused_requests_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[&[(&str, &str)]] = &[
            &[("cluster_size", "3000")],
            &[("cluster_size", "4M")],
            &[("refcount_bits", "3")],
            &[("compat", "0.10"), ("lazy_refcounts", "on")],
            &[("extended_l2", "on"), ("cluster_size", "8k")],
            &[("data_file_raw", "on")],
            &[("foo", "bar")],
            &[("compression_type", "lz4")],
            &[("preallocation", "sparse")],
            &[("backing_file", "base.qcow2")],
        ];
        for opts in cases {
            let r = req(dir.path(), opts);
            assert!(create(&r).is_err(), "{opts:?}");
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "{opts:?}"
            );
        }
    }

    #[test]
    fn encryption_refusals_name_what_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let luks = ("encrypt.format", "luks");
        /// Options, whether a key is given, and what the error must say.
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a str);
        let cases: &[Case] = &[
            (&[luks], false, "--key-file"),
            (&[("encrypt.format", "aes")], true, "legacy AES"),
            (&[("encryption", "on")], true, "legacy AES"),
            (&[("encryption", "on"), luks], true, "at the same time"),
            (
                &[("encrypt.cipher-alg", "aes-128")],
                true,
                "needs encrypt.format=luks",
            ),
            (
                &[luks, ("encrypt.cipher-alg", "twofish-256")],
                true,
                "cipher twofish-256 is not supported",
            ),
            (
                &[luks, ("encrypt.cipher-mode", "ecb")],
                true,
                "cipher mode ecb",
            ),
            (
                &[luks, ("encrypt.ivgen-alg", "plain")],
                true,
                "IV generator plain ",
            ),
            (&[luks, ("encrypt.hash-alg", "md5")], true, "hash md5"),
            (
                &[
                    luks,
                    ("encrypt.ivgen-alg", "essiv"),
                    ("encrypt.ivgen-hash-alg", "sha1"),
                ],
                true,
                "essiv with sha1",
            ),
            (
                &[
                    luks,
                    ("encrypt.cipher-alg", "aes-192"),
                    ("encrypt.cipher-mode", "cbc"),
                ],
                true,
                "aes-192 in cbc mode",
            ),
            (
                &[luks, ("encrypt.iter-time", "-1")],
                true,
                "encrypt.iter-time",
            ),
            (
                &[luks, ("encrypt.slot", "0")],
                true,
                "invalid parameter 'encrypt.slot'",
            ),
        ];
        for (opts, key, want) in cases {
            let mut r = req(dir.path(), opts);
            r.key = key.then(|| b"pw".to_vec());
            let e = create(&r).unwrap_err().to_string();
            assert!(e.contains(want), "{opts:?}: {e}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn encrypted_image_has_luks_area_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req(
            dir.path(),
            &[
                ("encrypt.hash-alg", "sha1"),
                ("encrypt.format", "luks"),
                ("encrypt.iter-time", "1"),
                ("encrypt.cipher-mode", "cbc"),
                ("encrypt.ivgen-alg", "essiv"),
            ],
        );
        r.key = Some(b"pw".to_vec());
        let c = create(&r).unwrap();
        assert!(
            c.describe(&r.path).contains(
                "fmt=qcow2 encrypt.format=luks encrypt.cipher-mode=cbc encrypt.ivgen-alg=essiv encrypt.hash-alg=sha1 encrypt.iter-time=1 cluster_size=65536"
            ),
            "{}",
            c.describe(&r.path)
        );
        let f = open_read(&r.path).unwrap();
        let h = read_header(&f, &r.path).unwrap();
        let p = h.encryption_header().unwrap();
        let mut area = vec![0u8; p.length as usize];
        f.read_exact_at(&mut area, p.offset).unwrap();
        let luks = qblk_qcow2::luks::LuksHeader::parse(&area, p.offset).unwrap();
        assert_eq!(
            (
                luks.cipher_mode.as_str(),
                luks.hash_spec.as_str(),
                luks.key_bytes
            ),
            ("cbc-essiv:sha256", "sha1", 32)
        );
        qblk_engine::crypto::Crypto::unlock(&luks, &area, b"pw").unwrap();
    }

    #[test]
    fn backing_without_format_names_detected_format() {
        let dir = tempfile::tempdir().unwrap();
        create(&req(dir.path(), &[])).unwrap();
        let mut r = req(dir.path(), &[]);
        r.path = dir.path().join("top.qcow2");
        r.size = None;
        r.backing_file = Some("t.qcow2".into());
        let e = create(&r).unwrap_err().to_string();
        assert!(e.contains("detected format: qcow2"), "{e}");
        r.backing_format = Some("qcow2".into());
        create(&r).unwrap();
        let f = open_read(&r.path).unwrap();
        let h = read_header(&f, &r.path).unwrap();
        assert_eq!(h.size, 1 << 30, "size taken from the backing file");
        assert_eq!(h.backing_file.as_deref(), Some("t.qcow2"));
    }

    #[test]
    fn create_then_read_header() {
        let dir = tempfile::tempdir().unwrap();
        let r = req(
            dir.path(),
            &[
                ("cluster_size", "4k"),
                ("refcount_bits", "1"),
                ("lazy_refcounts", "on"),
            ],
        );
        let c = create(&r).unwrap();
        assert!(c.describe(&r.path).contains("cluster_size=4096"));
        let f = open_read(&r.path).unwrap();
        let h = read_header(&f, &r.path).unwrap();
        assert_eq!(
            (h.cluster_bits, h.refcount_order, h.lazy_refcounts()),
            (12, 0, true)
        );
    }
}
