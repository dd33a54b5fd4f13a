//! `qblk check`: qemu-img check's report, JSON and exit codes, on top of the
//! engine's consistency check.

use std::path::Path;

use serde::Serialize;

use qblk_engine::check::{CheckReport, RepairMode, check};
use qblk_engine::file::CacheMode;
use qblk_engine::runtime::block_on;

use crate::image::{ImageFormat, open_read, probe};
use crate::{Error, Result};

/// Exit code: no problems.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: the check could not be completed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: corruption found.
pub const EXIT_CORRUPT: u8 = 2;
/// Exit code: only leaked clusters found.
pub const EXIT_LEAKS: u8 = 3;
/// Exit code: the format has no consistency check (raw).
pub const EXIT_UNSUPPORTED: u8 = 63;

/// qemu-img check's JSON object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckJson {
    #[serde(rename = "image-end-offset")]
    pub image_end_offset: u64,
    #[serde(rename = "total-clusters", skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    #[serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    #[serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(rename = "check-errors")]
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    #[serde(rename = "fragmented-clusters", skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    #[serde(rename = "compressed-clusters", skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    pub filename: String,
    pub format: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A finished check: the report, its rendering, and the exit code.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The state after any repair.
    pub report: CheckReport,
    /// The findings before repair, when a repair ran.
    pub repaired_from: Option<CheckReport>,
    pub json: CheckJson,
}

impl Checked {
    pub fn exit_code(&self) -> u8 {
        if self.report.check_errors > 0 {
            EXIT_FAILED
        } else if self.report.corruptions > 0 {
            EXIT_CORRUPT
        } else if self.report.leaks > 0 {
            EXIT_LEAKS
        } else {
            EXIT_CLEAN
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.json.serialize(&mut ser).expect("CheckJson serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// qemu-img check's human summary.
    pub fn to_human(&self) -> String {
        let r = &self.report;
        let mut s = String::new();
        // qemu-img says what it repaired only when it repaired something.
        if self.json.leaks_fixed > 0 || self.json.corruptions_fixed > 0 {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.json.leaks_fixed, self.json.corruptions_fixed
            ));
        }
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        }
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        let pct = |n: u64, d: u64| {
            if d == 0 {
                0.0
            } else {
                n as f64 * 100.0 / d as f64
            }
        };
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        ));
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
        s
    }
}

/// Checks (and with `repair`, repairs) the image at `path`. `Ok(None)`
/// means the format has no check.
///
/// The image is locked as a reader (as a writer to repair) unless
/// `force_share` (`-U`), which repairs refuse, as qemu-img does.
pub fn check_image(
    path: &Path,
    format: Option<ImageFormat>,
    repair: Option<RepairMode>,
    force_share: bool,
) -> Result<Option<Checked>> {
    if force_share && repair.is_some() {
        return Err(Error::Usage(
            "force-share (-U) can only be used with read-only images: not with -r".into(),
        ));
    }
    let format = match format {
        Some(f) => f,
        None => probe(&open_read(path)?, path)?,
    };
    if format == ImageFormat::Raw {
        return Ok(None);
    }
    let engine_err = |e| Error::Engine {
        path: path.to_owned(),
        source: Box::new(e),
    };
    if repair == Some(RepairMode::Leaks) {
        // qemu-img check -r leaks fails on damage only a rebuild of the
        // refcount structure repairs, after reporting what it found.
        let before = block_on(check(path, CacheMode::Writeback, false)).map_err(engine_err)?;
        if before.needs_rebuild {
            return Err(Error::RepairRefused {
                path: path.to_owned(),
                messages: before.messages,
            });
        }
    }
    let (report, repaired_from) = match repair {
        None => (
            block_on(check(path, CacheMode::Writeback, force_share)).map_err(engine_err)?,
            None,
        ),
        Some(mode) => {
            let out = block_on(qblk_engine::check::repair(path, mode)).map_err(engine_err)?;
            (out.after, Some(out.before))
        }
    };
    let fixed = |f: fn(&CheckReport) -> u64| {
        repaired_from
            .as_ref()
            .map_or(0, |b| f(b).saturating_sub(f(&report)))
    };
    let json = CheckJson {
        leaks_fixed: fixed(|r| r.leaks),
        corruptions_fixed: fixed(|r| r.corruptions),
        image_end_offset: report.image_end_offset,
        total_clusters: report.total_clusters,
        check_errors: report.check_errors,
        corruptions: report.corruptions,
        leaks: report.leaks,
        allocated_clusters: report.allocated_clusters,
        fragmented_clusters: report.fragmented_clusters,
        compressed_clusters: report.compressed_clusters,
        filename: path.to_string_lossy().into_owned(),
        format: "qcow2".into(),
    };
    Ok(Some(Checked {
        report,
        repaired_from,
        json,
    }))
}
