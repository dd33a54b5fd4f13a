//! `qblk map`: qemu-img map's JSON and human output.

use std::path::Path;

use qblk_engine::file::{CacheMode, HostFile};
use qblk_engine::image::BackingPolicy;
use qblk_engine::lock::Access;
use qblk_engine::map::{MapEntry, raw_map};
use qblk_engine::runtime::block_on;
use qblk_engine::{Image, OpenOptions};

use crate::image::{ImageFormat, open_read, probe};
use crate::{Error, Result};

/// The map of the image at `path` (a raw image is one run of its file).
///
/// The image is locked as a reader unless `force_share` (`-U`).
pub fn map_image(
    path: &Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> Result<Vec<MapEntry>> {
    let format = match format {
        Some(f) => f,
        None => probe(&open_read(path)?, path)?,
    };
    if format == ImageFormat::Raw {
        let file = HostFile::open(path, false, CacheMode::Writeback)
            .map_err(|e| Error::io(path, "open", e))?;
        crate::lock_file(&file, path, Access::READER, force_share)?;
        // QEMU's file layer counts whole sectors.
        let size = file
            .file_len()
            .map_err(|e| Error::io(path, "stat", e))?
            .next_multiple_of(512);
        return Ok(raw_map(&file, size));
    }
    block_on(async {
        let opts = OpenOptions {
            cache: CacheMode::Writeback,
            backing: BackingPolicy {
                allow_any_dir: true,
                ..BackingPolicy::default()
            },
            force_share,
            ..OpenOptions::default()
        };
        let img = Image::open(path, &opts).await.map_err(|e| Error::Engine {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        img.map().await.map_err(|e| Error::Engine {
            path: path.to_owned(),
            source: Box::new(e),
        })
    })
}

/// qemu-img map --output=json: one entry per line.
pub fn to_json(entries: &[MapEntry]) -> String {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut s = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                s.push_str(&format!(", \"offset\": {o}"));
            }
            s.push('}');
            s
        })
        .collect();
    format!("[{}]", lines.join(",\n"))
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// qemu-img map's human table: the runs whose data lives at a known
/// host offset, adjacent ones in the same file merged. Data without a
/// plain host offset (compressed clusters) cannot be shown this way: the
/// header is returned with the error, as qemu-img prints it.
pub fn to_human(entries: &[MapEntry]) -> Result<String, (String, Error)> {
    let head = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    if entries.iter().any(|e| e.data && e.offset.is_none()) {
        return Err((
            head,
            Error::Usage("File contains external, encrypted or compressed clusters.".into()),
        ));
    }
    let mut rows: Vec<(u64, u64, u64, String)> = Vec::new();
    for e in entries {
        let (Some(offset), Some(file), true, false) = (e.offset, &e.file, e.data, e.zero) else {
            continue;
        };
        let file = file.to_string_lossy().into_owned();
        match rows.last_mut() {
            Some(last)
                if last.0 + last.1 == e.start && last.2 + last.1 == offset && last.3 == file =>
            {
                last.1 += e.length
            }
            _ => rows.push((e.start, e.length, offset, file)),
        }
    }
    let mut s = head;
    for (start, len, offset, file) in rows {
        s.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            hex(start),
            hex(len),
            hex(offset),
            file
        ));
    }
    Ok(s)
}
