//! `qblk snapshot`: qemu-img snapshot's list, create, apply and delete of
//! internal snapshots, through the engine (`Image::snapshot_*`).

use std::path::PathBuf;

use qblk_engine::Image;
use qblk_engine::runtime::block_on;
use qblk_qcow2::snapshot::SnapshotEntry;

use crate::image::ImageFormat;
use crate::options::human_size;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub image: PathBuf,
    pub format: Option<ImageFormat>,
    pub op: SnapshotOp,
    /// `-U`: list an image another program has open for writing.
    pub force_share: bool,
}

/// Runs the request; for a list, returns what qemu-img prints (nothing
/// when there are no snapshots).
pub fn snapshot(req: &SnapshotRequest) -> Result<String> {
    if req.format.is_some_and(|f| f != ImageFormat::Qcow2) {
        return Err(Error::Usage(format!(
            "Could not open '{}': the format has no internal snapshots",
            req.image.display()
        )));
    }
    let writable = req.op != SnapshotOp::List;
    if writable && req.force_share {
        return Err(Error::Usage(
            "force-share is only supported with --list (-l)".into(),
        ));
    }
    // Backing files are not needed for snapshots.
    let opts = crate::chain::tool_open_options(writable, false, req.force_share);
    block_on(async {
        let img = Image::open(&req.image, &opts)
            .await
            .map_err(|e| Error::Engine {
                path: req.image.clone(),
                source: Box::new(e),
            })?;
        let failed = |e: qblk_engine::image::Error| match e {
            qblk_engine::image::Error::Unsupported { what, .. } => Error::Usage(what),
            other => Error::Engine {
                path: req.image.clone(),
                source: Box::new(other),
            },
        };
        let r = match &req.op {
            SnapshotOp::List => img.snapshots().await.map(|s| list(&s)),
            SnapshotOp::Create(n) => img.snapshot_create(n).await.map(|()| String::new()),
            SnapshotOp::Apply(n) => img.snapshot_apply(n).await.map(|()| String::new()),
            SnapshotOp::Delete(n) => img.snapshot_delete(n).await.map(|()| String::new()),
        };
        let closed = img.close().await;
        let out = r.map_err(failed)?;
        closed.map_err(failed)?;
        Ok(out)
    })
}

/// qemu-img's snapshot list (bdrv_snapshot_dump's columns).
fn list(snaps: &[SnapshotEntry]) -> String {
    if snaps.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    ));
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        out.push_str(&format!(
            "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n",
            s.id_lossy(),
            s.name_lossy(),
            human_size(s.vm_state_size()),
            crate::info::format_date(u64::from(s.date_sec)),
            clock,
            s.icount().map(|i| i.to_string()).unwrap_or_default()
        ));
    }
    out
}
