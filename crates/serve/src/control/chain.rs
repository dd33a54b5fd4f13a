//! The control commands that change the backing chain: external
//! snapshots (`blockdev-snapshot-sync`), live commit and stream jobs
//! (`block-commit`, `block-stream`, `jobs.rs`), and the job commands.
//!
//! The active image is the node `disk`; the layers below it are
//! `disk-backing1` (its backing file), `disk-backing2` and so on, as
//! `query-named-block-nodes` lists them. Commands that name a layer take
//! its node name or its file name, as QEMU's do.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tracing::info;

use super::{Args, Context, NODE_NAME, QmpError, generic, inactive, node_of};
use crate::Format;
use crate::device::OpenTarget;
use crate::disk::Disk;
use crate::jobs::{Kind, Plan};

/// A layer of the served chain: depth (0 is the active image), file,
/// format.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub depth: u32,
    pub path: PathBuf,
    pub format: Format,
}

/// The node name of the layer at `depth`.
pub(super) fn node_name(depth: u32) -> String {
    if depth == 0 {
        NODE_NAME.to_owned()
    } else {
        format!("{NODE_NAME}-backing{depth}")
    }
}

/// The served chain, top down.
pub(super) fn layers(ctx: &Context) -> Result<Vec<Layer>, QmpError> {
    let disk = ctx.device.disk().ok_or_else(inactive)?;
    let image = ctx.device.image();
    let mut out = vec![Layer {
        depth: 0,
        path: image.path,
        format: image.format,
    }];
    if let Disk::Qcow2(img) = &*disk {
        out.extend(img.chain().into_iter().map(|l| Layer {
            depth: l.depth,
            path: l.path,
            format: if l.format == "raw" {
                Format::Raw
            } else {
                Format::Qcow2
            },
        }));
    }
    Ok(out)
}

/// The layer a command names by node (`node_key`) or file (`file_key`);
/// `None` when it names neither.
fn named_layer(
    ctx: &Context,
    a: &Args<'_>,
    file_key: &str,
    node_key: &str,
) -> Result<Option<Layer>, QmpError> {
    let file = if file_key.is_empty() {
        None
    } else {
        a.opt_string(file_key)?
    };
    let node = a.opt_string(node_key)?;
    let chain = layers(ctx)?;
    match (file, node) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(generic(format!(
            "'{file_key}' and '{node_key}' are mutually exclusive"
        ))),
        (None, Some(node)) => chain
            .into_iter()
            .find(|l| node_name(l.depth) == node)
            .map(Some)
            .ok_or_else(|| generic(format!("Cannot find node '{node}'"))),
        (Some(file), None) => {
            let real = std::fs::canonicalize(&file).ok();
            chain
                .into_iter()
                .find(|l| real.is_some() && std::fs::canonicalize(&l.path).ok() == real)
                .map(Some)
                .ok_or_else(|| generic(format!("Can't find '{file}' in the backing chain")))
        }
    }
}

/// What every chain-changing command checks first.
fn may_change_chain(ctx: &Context, what: &str) -> Result<(), QmpError> {
    if ctx.readonly {
        return Err(generic(format!("Device '{NODE_NAME}' is read only")));
    }
    ctx.device.jobs.refuse_if_busy(what).map_err(generic)?;
    if !ctx.device.nbd.exports().is_empty() {
        return Err(generic(format!(
            "NBD exports read the disk's snapshots: remove them (block-export-del) to {what}"
        )));
    }
    Ok(())
}

/// `blockdev-snapshot-sync`: a new qcow2 overlay over the active image
/// becomes the active image (the old one is then opened read-only as its
/// backing file), with the guest's requests held only for the switch.
pub(super) fn snapshot_sync(ctx: &Context, a: &Args<'_>) -> Result<Value, QmpError> {
    a.only(&[
        "device",
        "node-name",
        "snapshot-file",
        "snapshot-node-name",
        "format",
        "mode",
    ])?;
    node_of(a, "device", "node-name")?;
    let file = PathBuf::from(a.string("snapshot-file")?);
    if let Some(f) = a.opt_string("format")? {
        if f != "qcow2" {
            return Err(generic(format!(
                "qblk makes qcow2 overlays only: 'format' '{f}'"
            )));
        }
    }
    if let Some(n) = a.opt_string("snapshot-node-name")? {
        if n != NODE_NAME {
            return Err(generic(format!(
                "the active image is always node '{NODE_NAME}': leave out 'snapshot-node-name' or give '{NODE_NAME}' (not '{n}')"
            )));
        }
    }
    let existing = match a.opt_string("mode")?.as_deref() {
        None | Some("absolute-paths") => false,
        Some("existing") => true,
        Some(m) => return Err(generic(format!("Invalid parameter '{m}' for 'mode'"))),
    };
    let _admin = ctx.device.admin();
    may_change_chain(ctx, "take an external snapshot")?;
    let disk = ctx.device.disk().ok_or_else(inactive)?;
    let size = disk.size();
    drop(disk);
    let old = ctx.device.image();
    let old_real = std::fs::canonicalize(&old.path)
        .map_err(|e| generic(format!("{}: {e}", old.path.display())))?;
    if existing {
        check_existing_overlay(&file, &old_real, size)?;
    } else {
        if file.exists() {
            return Err(generic(format!(
                "{} already exists: remove it, or give mode 'existing' for an overlay made beforehand",
                file.display()
            )));
        }
        let req = qblk_tools::create::CreateRequest {
            path: file.clone(),
            format: Some(qblk_tools::image::ImageFormat::Qcow2),
            size: Some(size),
            backing_file: Some(old_real.display().to_string()),
            backing_format: Some(old.format.as_str().to_owned()),
            // The daemon holds the image: its size is known, and opening
            // it again would meet the daemon's own locks.
            unsafe_backing: true,
            ..Default::default()
        };
        qblk_tools::create::create(&req)
            .map_err(|e| generic(format!("{}: {}", file.display(), crate::error_chain(&e))))?;
    }
    let held = ctx
        .device
        .hold_guest()
        .map_err(|e| generic(format!("{e}: no snapshot")));
    let held = match held {
        Ok(h) => h,
        Err(e) => {
            if !existing {
                let _ = std::fs::remove_file(&file);
            }
            return Err(e);
        }
    };
    let began = std::time::Instant::now();
    let mut trusted = old.trusted_dirs.clone();
    trusted.extend(old_real.parent().map(Path::to_owned));
    let switched = ctx.device.switch_disk(
        held,
        || {
            (ctx.open)(&OpenTarget {
                path: file.clone(),
                format: Format::Qcow2,
                trusted_dirs: trusted.clone(),
                shared: Vec::new(),
            })
        },
        || (ctx.open)(&ctx.device.open_target()),
    );
    if let Err(e) = switched {
        if !existing && ctx.device.is_active() {
            let _ = std::fs::remove_file(&file);
        }
        return Err(generic(e));
    }
    ctx.device.set_image(&file, Format::Qcow2);
    info!(
        overlay = %file.display(),
        backing = %old_real.display(),
        held_us = began.elapsed().as_micros() as u64,
        "external snapshot: the overlay is the active image"
    );
    Ok(json!({}))
}

/// An overlay made beforehand (`mode: existing`) must be qcow2, name the
/// active image as its backing file and be as large as the disk.
fn check_existing_overlay(file: &Path, old: &Path, size: u64) -> Result<(), QmpError> {
    let f = std::fs::File::open(file).map_err(|e| generic(format!("{}: {e}", file.display())))?;
    let info = qblk_tools::image::read_header(&f, file)
        .map_err(|e| generic(format!("{}: {}", file.display(), crate::error_chain(&e))))?;
    let named = info
        .backing_file
        .as_deref()
        .map(|b| qblk_tools::image::resolve_relative(file, b));
    if named.and_then(|b| std::fs::canonicalize(b).ok()).as_deref() != Some(old) {
        return Err(generic(format!(
            "{} does not name the active image {} as its backing file",
            file.display(),
            old.display()
        )));
    }
    if info.size != size {
        return Err(generic(format!(
            "{} is {} bytes, the disk {size}",
            file.display(),
            info.size
        )));
    }
    Ok(())
}

/// The arguments both jobs take, besides `own`: the device (the disk),
/// the base, the backing file name, and the job options — id, speed,
/// on-error, auto-finalize, auto-dismiss (and no filter node). Returns the
/// id, the speed and auto-dismiss.
fn job_options(a: &Args<'_>, own: &[&str]) -> Result<(String, u64, bool), QmpError> {
    const COMMON: &[&str] = &[
        "job-id",
        "device",
        "base",
        "base-node",
        "backing-file",
        "backing-mask-protocol",
        "speed",
        "on-error",
        "filter-node-name",
        "auto-finalize",
        "auto-dismiss",
    ];
    a.only(&[COMMON, own].concat())?;
    node_of(a, "device", "")?;
    if a.opt_string("filter-node-name")?.is_some() {
        return Err(generic(
            "qblk inserts no filter node: leave out 'filter-node-name'",
        ));
    }
    let id = a
        .opt_string("job-id")?
        .unwrap_or_else(|| NODE_NAME.to_owned());
    let speed = match a.map.get("speed") {
        None => 0,
        Some(_) => a.uint("speed")?,
    };
    if let Some(e) = a.opt_string("on-error")? {
        if e != "report" {
            return Err(generic(format!(
                "qblk's jobs stop at an error and report it: 'on-error' '{e}' is not supported"
            )));
        }
    }
    if a.flag("auto-finalize")? == Some(false) {
        return Err(generic(
            "qblk's jobs finalize themselves: 'auto-finalize' false is not supported",
        ));
    }
    let auto_dismiss = a.flag("auto-dismiss")?.unwrap_or(true);
    Ok((id, speed, auto_dismiss))
}

/// `block-commit` of the active image into a layer below it.
pub(super) fn commit(ctx: &Context, a: &Args<'_>) -> Result<Value, QmpError> {
    let (id, speed, auto_dismiss) = job_options(a, &["top-node", "top"])?;
    if let Some(top) = named_layer(ctx, a, "top", "top-node")? {
        if top.depth != 0 {
            return Err(generic(format!(
                "qblk commits the active image only ('top' is {}, a backing file): stream or commit from the top instead",
                top.path.display()
            )));
        }
    }
    if a.opt_string("backing-file")?.is_some() {
        return Err(generic(
            "'backing-file' cannot be given when the top is the active image",
        ));
    }
    let _admin = ctx.device.admin();
    may_change_chain(ctx, "commit")?;
    let chain = layers(ctx)?;
    let base = match named_layer(ctx, a, "base", "base-node")? {
        Some(b) => b,
        None => chain
            .last()
            .filter(|l| l.depth > 0)
            .cloned()
            .ok_or_else(|| {
                generic(format!(
                    "Device '{NODE_NAME}' has no backing file: nothing to commit into"
                ))
            })?,
    };
    if base.depth == 0 {
        return Err(generic("the base must lie below the active image"));
    }
    let plan = Plan {
        id,
        kind: Kind::Commit,
        base: Some(base.depth),
        base_file: Some((base.path.clone(), base.format)),
        backing_name: None,
        speed,
        auto_dismiss,
    };
    crate::jobs::start(&ctx.device, &ctx.open, plan).map_err(generic)?;
    info!(base = %base.path.display(), "block-commit started");
    Ok(json!({}))
}

/// `block-stream` of the layers above `base` into the active image.
pub(super) fn stream(ctx: &Context, a: &Args<'_>) -> Result<Value, QmpError> {
    let (id, speed, auto_dismiss) = job_options(a, &["bottom"])?;
    let _admin = ctx.device.admin();
    may_change_chain(ctx, "stream")?;
    if !matches!(&*ctx.device.disk().ok_or_else(inactive)?, Disk::Qcow2(_)) {
        return Err(generic("a raw disk has no backing file to stream from"));
    }
    let base = match (
        named_layer(ctx, a, "base", "base-node")?,
        named_layer(ctx, a, "", "bottom")?,
    ) {
        (Some(_), Some(_)) => {
            return Err(generic("'base' and 'bottom' are mutually exclusive"));
        }
        (Some(b), None) => Some(b),
        // The bottom is the last layer copied: the base is the one below.
        (None, Some(bottom)) => layers(ctx)?
            .into_iter()
            .find(|l| l.depth == bottom.depth + 1),
        (None, None) => None,
    };
    if base.as_ref().is_some_and(|b| b.depth == 0) {
        return Err(generic("the base must lie below the active image"));
    }
    let top = ctx.device.image();
    let backing_name = match (a.opt_string("backing-file")?, &base) {
        (Some(name), Some(_)) => Some(name),
        (Some(_), None) => {
            return Err(generic("'backing-file' needs a base to name"));
        }
        (None, Some(b)) => Some(crate::jobs::backing_name(&top.path, &b.path)),
        (None, None) => None,
    };
    let plan = Plan {
        id,
        kind: Kind::Stream,
        base: base.as_ref().map(|b| b.depth),
        base_file: base.as_ref().map(|b| (b.path.clone(), b.format)),
        backing_name,
        speed,
        auto_dismiss,
    };
    crate::jobs::start(&ctx.device, &ctx.open, plan).map_err(generic)?;
    info!(
        base = base
            .as_ref()
            .map(|b| b.path.display().to_string())
            .unwrap_or_default(),
        "block-stream started"
    );
    Ok(json!({}))
}

/// The job commands: `query-jobs`, `query-block-jobs`, `job-*` and
/// `block-job-*`. `None` for any other command.
pub(super) fn job_command(ctx: &Context, a: &Args<'_>) -> Option<Result<Value, QmpError>> {
    let jobs = &ctx.device.jobs;
    let by = |key: &str| a.string(key);
    let done = |r: Result<(), String>| {
        r.map(|()| json!({})).map_err(|desc| QmpError {
            class: "GenericError",
            desc,
        })
    };
    Some(match a.name {
        "query-jobs" => a
            .none()
            .map(|()| Value::Array(jobs.list().iter().map(|j| j.to_json()).collect())),
        "query-block-jobs" => a.none().map(|()| {
            Value::Array(
                jobs.list()
                    .iter()
                    .filter(|j| j.status() != crate::jobs::Status::Null)
                    .map(|j| j.to_block_json())
                    .collect(),
            )
        }),
        "job-complete" => a
            .only(&["id"])
            .and_then(|()| done(jobs.complete(&by("id")?))),
        "block-job-complete" => a
            .only(&["device"])
            .and_then(|()| done(jobs.complete(&by("device")?))),
        "job-cancel" => a.only(&["id"]).and_then(|()| done(jobs.cancel(&by("id")?))),
        "block-job-cancel" => a.only(&["device", "force"]).and_then(|()| {
            a.flag("force")?;
            done(jobs.cancel(&by("device")?))
        }),
        "job-dismiss" | "block-job-dismiss" => a
            .only(&["id"])
            .and_then(|()| done(jobs.dismiss(&ctx.device, &by("id")?))),
        "job-finalize" | "block-job-finalize" => a.only(&["id"]).and_then(|()| {
            let id = by("id")?;
            let state = jobs
                .find(&id)
                .map(|j| j.status().as_str())
                .ok_or_else(|| generic(format!("Job '{id}' not found")))?;
            Err(generic(format!(
                "Job '{id}' in state '{state}' cannot accept command verb 'finalize'"
            )))
        }),
        "block-job-set-speed" => a.only(&["device", "speed"]).and_then(|()| {
            let speed = a.uint("speed")?;
            done(jobs.set_speed(&by("device")?, speed))
        }),
        _ => return None,
    })
}

/// The job commands, for `query-commands`.
pub(super) const COMMANDS: &[&str] = &[
    "blockdev-snapshot-sync",
    "block-commit",
    "block-stream",
    "query-jobs",
    "query-block-jobs",
    "job-complete",
    "job-cancel",
    "job-dismiss",
    "job-finalize",
    "block-job-complete",
    "block-job-cancel",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-set-speed",
];
