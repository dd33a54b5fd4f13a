//! The control socket (`qblk serve --control PATH`): QEMU's machine
//! protocol (QMP), so QEMU's own clients (`qemu.qmp`, `qmp-shell`,
//! libvirt's QMP code) can drive the daemon.
//!
//! The protocol as QEMU speaks it: a greeting on connect, then JSON
//! objects `{"execute": NAME, "arguments": {...}, "id": ID}` answered with
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}` (with the
//! request's `id`); nothing but `qmp_capabilities` is accepted before the
//! capabilities are negotiated. Several clients may be connected at once
//! (at most [`MAX_CLIENTS`]: one more gets an error instead of the greeting
//! and is hung up), each on a thread of its own; engine calls run on that
//! thread's own ring. A socket qblk binds is made mode 0600; one it inherits (socket
//! activation) keeps what its maker gave it.
//!
//! Commands so far: `qmp_capabilities`, `query-version`,
//! `query-commands`, `query-block-exports`, `query-named-block-nodes`,
//! `query-blockstats` (`stats.rs`), `block-dirty-bitmap-add`/`-remove`/`-clear`/`-enable`/`-disable`/
//! `-merge`, `block_resize`, internal snapshots, `stop`, `cont` and
//! `query-status` (the run state and held requests of `errors.rs`),
//! `blockdev-set-active` (the hand-over between two daemons,
//! `Device::set_active`), `nbd-server-start`/`-stop` and
//! `block-export-add`/`-del` (NBD exports of snapshots, `nbd/`),
//! `blockdev-snapshot-sync`, `block-commit`, `block-stream` and the job
//! commands (`control/chain.rs`, `jobs.rs`), and `quit`. The disk's node
//! is named `disk`.
//!
//! Bad input — unparsable JSON, a request that is no object, unknown
//! commands or arguments — gets an error reply; a client that sends
//! something that cannot be parsed at all is disconnected. Nothing a
//! client sends stops the daemon but `quit`.

use crate::lock;
use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::device::{Device, Opener};
use crate::disk::Disk;

mod chain;
use crate::events::{Out, WRITE_TIMEOUT, send};
use crate::orchestration::{ListenOn, Wake};

/// The name the disk's block node answers to.
pub const NODE_NAME: &str = "disk";

/// An error reply: QMP's class and description.
#[derive(Debug)]
struct QmpError {
    class: &'static str,
    desc: String,
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError {
        class: "GenericError",
        desc: desc.into(),
    }
}

/// The running control socket.
pub struct Control {
    /// The socket's description, for logs.
    name: String,
    /// The path qblk bound, removed at stop (not an inherited socket's).
    path: Option<PathBuf>,
    /// Wakes the accept thread (the listener is not shut down: an
    /// inherited one is shared with its maker).
    wake: Arc<Wake>,
    accept: Option<std::thread::JoinHandle<()>>,
    clients: Clients,
}

/// Every client's socket (to hang up at stop) and thread.
type Clients = Arc<Mutex<Vec<(UnixStream, std::thread::JoinHandle<()>)>>>;

/// Control clients served at once (each has a thread and an io_uring ring
/// of its own); one more is told so and hung up.
pub const MAX_CLIENTS: usize = 32;

/// Tells a client beyond [`MAX_CLIENTS`] so, instead of the greeting, and
/// hangs up.
fn refuse_client(stream: UnixStream) {
    warn!("control client refused: {MAX_CLIENTS} are connected");
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok() {
        let out: Out = Arc::new(Mutex::new(stream));
        let _ = send(
            &out,
            &json!({"error": {"class": "GenericError",
                "desc": format!("too many control clients: at most {MAX_CLIENTS} at once")}}),
        );
        let _ = lock(&out).shutdown(std::net::Shutdown::Both);
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("socket", &self.name)
            .finish()
    }
}

impl Control {
    /// Listens on `source`: binds a path (replacing a stale socket), or
    /// takes an inherited listener. `quit` calls `on_quit`;
    /// `blockdev-set-active` opens the disk with `open`.
    pub fn start(
        source: &ListenOn,
        device: Arc<Device>,
        readonly: bool,
        on_quit: Arc<dyn Fn() + Send + Sync>,
        open: Opener,
    ) -> std::io::Result<Control> {
        let (listener, path) = match source {
            ListenOn::Path(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                (listener, Some(path.clone()))
            }
            // SAFETY: validated at start; this is the one place that takes it.
            ListenOn::Inherited(s) => (unsafe { s.into_listener() }, None),
        };
        let wake = Arc::new(Wake::default());
        let clients: Clients = Arc::default();
        let ctx = Arc::new(Context {
            device,
            readonly,
            on_quit,
            open,
        });
        let list = clients.clone();
        let woken = wake.clone();
        let accept = std::thread::Builder::new()
            .name("qblk-control".into())
            .spawn(move || {
                let fd = listener.as_raw_fd();
                while let Ok(true) = woken.wait_for_connection(fd, || false) {
                    let Ok((stream, _)) = listener.accept() else {
                        // Transient (a client gone, out of descriptors).
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    };
                    let mut clients = lock(&list);
                    // The threads of clients that left are done: forget them.
                    clients.retain(|(_, t)| !t.is_finished());
                    if clients.len() >= MAX_CLIENTS {
                        drop(clients);
                        refuse_client(stream);
                        continue;
                    }
                    let Ok(keep) = stream.try_clone() else {
                        continue;
                    };
                    let ctx = ctx.clone();
                    let t = std::thread::Builder::new()
                        .name("qblk-qmp".into())
                        .spawn(move || serve_client(stream, &ctx));
                    match t {
                        Ok(t) => clients.push((keep, t)),
                        Err(e) => warn!("cannot start a control client thread: {e}"),
                    }
                }
            })?;
        info!(control = %source.describe(), "control socket listening");
        Ok(Control {
            name: source.describe(),
            path,
            wake,
            accept: Some(accept),
            clients,
        })
    }

    /// Stops accepting, hangs up every client and waits for their threads
    /// (none is inside an engine call afterwards), removes the socket it
    /// bound.
    pub fn stop(mut self) {
        self.wake.wake();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let clients = std::mem::take(&mut *lock(&self.clients));
        for (s, _) in &clients {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for (_, t) in clients {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Context {
    device: Arc<Device>,
    readonly: bool,
    on_quit: Arc<dyn Fn() + Send + Sync>,
    /// Opens the disk when the daemon is activated (`blockdev-set-active`)
    /// and when the chain changes (`chain.rs`).
    open: Opener,
}

fn version() -> Value {
    let v: Vec<u64> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    json!({
        "qemu": {"major": v.first().copied().unwrap_or(0), "minor": v.get(1).copied().unwrap_or(0), "micro": v.get(2).copied().unwrap_or(0)},
        "package": format!("qblk {}", env!("CARGO_PKG_VERSION")),
    })
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-block-exports",
    "query-named-block-nodes",
    "query-blockstats",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "block_resize",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "blockdev-set-active",
    "block_set_io_throttle",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "stop",
    "cont",
    "query-status",
    "quit",
];

fn serve_client(stream: UnixStream, ctx: &Context) {
    let Ok(out) = stream.try_clone() else {
        return;
    };
    // A client that stops reading is hung up rather than holding this
    // thread (or the event thread) in a write.
    if out.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    // The accept thread keeps a clone (to hang up at stop): a client this
    // thread is done with is hung up here, or it would never see EOF.
    let hang_up = out.try_clone();
    let out: Out = Arc::new(Mutex::new(out));
    converse(stream, &out, ctx);
    if let Ok(s) = hang_up {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

fn converse(stream: UnixStream, out: &Out, ctx: &Context) {
    if send(
        out,
        &json!({"QMP": {"version": version(), "capabilities": []}}),
    )
    .is_err()
    {
        return;
    }
    let mut negotiated = false;
    let mut subscribed = false;
    let requests =
        serde_json::Deserializer::from_reader(BufReader::new(stream)).into_iter::<Value>();
    for req in requests {
        let req = match req {
            Ok(v) => v,
            Err(e) if e.is_eof() || e.is_io() => return,
            Err(e) => {
                // The stream cannot be resynchronised: answer and hang up.
                let _ = send(
                    out,
                    &json!({"error": {"class": "GenericError", "desc": format!("JSON parse error, {e}")}}),
                );
                return;
            }
        };
        let id = req.get("id").cloned();
        let reply = match handle(&req, ctx, &mut negotiated) {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        let mut reply = reply;
        if let (Some(id), Some(o)) = (id, reply.as_object_mut()) {
            o.insert("id".into(), id);
        }
        if send(out, &reply).is_err() {
            return;
        }
        if !subscribed && negotiated {
            // Events from the end of the negotiation on, as QEMU sends them.
            ctx.device.events.subscribe(out);
            subscribed = true;
        }
        if req.get("execute").and_then(Value::as_str) == Some("quit") && negotiated {
            (ctx.on_quit)();
            return;
        }
    }
}

/// Dispatches one request.
fn handle(req: &Value, ctx: &Context, negotiated: &mut bool) -> Result<Value, QmpError> {
    let Some(obj) = req.as_object() else {
        return Err(generic("QMP input must be a JSON object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["execute", "arguments", "id"].contains(&k.as_str()))
    {
        return Err(generic(format!("QMP input member '{k}' is unexpected")));
    }
    let Some(name) = obj.get("execute").and_then(Value::as_str) else {
        return Err(generic("QMP input lacks member 'execute'"));
    };
    let args = match obj.get("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(generic("QMP input member 'arguments' must be an object")),
    };
    if !*negotiated {
        if name != "qmp_capabilities" {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        if args
            .get("enable")
            .is_some_and(|e| e.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(generic(
                "Parameter 'enable' does not accept capabilities qblk has not",
            ));
        }
        *negotiated = true;
        return Ok(json!({}));
    }
    let a = Args { name, map: &args };
    match name {
        "qmp_capabilities" => Err(QmpError {
            class: "CommandNotFound",
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        "query-version" => a.none().map(|()| version()),
        "query-commands" => a
            .none()
            .map(|()| {
                Value::Array(
                    COMMANDS
                        .iter()
                        .chain(chain::COMMANDS)
                        .map(|c| json!({"name": c}))
                        .collect(),
                )
            }),
        "query-block-exports" => a.none().map(|()| {
            let mut list = vec![
                json!({"type": "vhost-user-blk", "id": NODE_NAME, "node-name": NODE_NAME, "shutting-down": false}),
            ];
            list.extend(ctx.device.nbd.exports().iter().map(|e| {
                json!({
                    "type": "nbd",
                    "id": e.id,
                    "node-name": NODE_NAME,
                    "shutting-down": false,
                    "x-name": e.name,
                    "x-snapshot": e.snapshot,
                    "x-size": e.size(),
                    "x-bitmaps": e.bitmaps.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
                })
            }));
            Value::Array(list)
        }),
        "nbd-server-start" => {
            a.only(&["addr", "tls-creds", "tls-authz", "max-connections"])?;
            if a.map.contains_key("tls-authz") {
                return Err(generic("qblk's NBD server has no 'tls-authz': verify-peer=on in --object tls-creds-x509 admits any client certificate its CA signed"));
            }
            let tls_creds = match a.map.get("tls-creds") {
                None => None,
                Some(Value::String(id)) => Some(id.as_str()),
                Some(_) => return Err(generic("Parameter 'tls-creds' expects a string")),
            };
            let addr = nbd_addr(a.map.get("addr"))?;
            ctx.device.nbd.start(&addr, tls_creds).map(|()| json!({})).map_err(generic)
        }
        "nbd-server-stop" => {
            a.none()?;
            if !ctx.device.nbd.running() {
                return Err(generic("NBD server not running"));
            }
            ctx.device.nbd.stop();
            // As QEMU: the server's exports end with it.
            let _admin = ctx.device.admin();
            for e in ctx.device.nbd.remove_all() {
                delete_export_snapshot(ctx, &e)?;
            }
            Ok(json!({}))
        }
        "block-export-add" => {
            a.only(&["type", "id", "node-name", "name", "writable", "bitmaps", "description", "writethrough"])?;
            export_add(ctx, &a)
        }
        "block-export-del" => {
            a.only(&["id", "mode"])?;
            let id = a.string("id")?;
            if let Some(m) = a.opt_string("mode")? {
                if m != "safe" && m != "hard" {
                    return Err(generic(format!("Parameter 'mode' does not accept value '{m}'")));
                }
            }
            if id == NODE_NAME {
                return Err(generic("the vhost-user-blk export ends with the daemon"));
            }
            let _admin = ctx.device.admin();
            let e = ctx.device.nbd.remove(&id).map_err(generic)?;
            delete_export_snapshot(ctx, &e)?;
            info!(id = %e.id, snapshot = %e.snapshot, "NBD export removed, its snapshot deleted");
            Ok(json!({}))
        }
        "query-named-block-nodes" => a
            .only(&["flat"])
            .and_then(|()| a.flag("flat"))
            .map(|_| named_nodes(ctx)),
        "query-blockstats" => a
            .only(&["query-nodes"])
            .and_then(|()| a.flag("query-nodes"))
            .map(|_| blockstats(ctx)),
        "block-dirty-bitmap-add" => {
            a.only(&["node", "name", "granularity", "persistent", "disabled"])?;
            bitmap_image(ctx, &a, |img| {
                let name = a.string("name")?;
                if !a.flag("persistent")?.unwrap_or(false) {
                    return Err(generic(
                        "qblk keeps persistent bitmaps only: add it with \"persistent\": true",
                    ));
                }
                let granularity = match a.map.get("granularity") {
                    None => img.cluster_size().clamp(4096, 65536),
                    Some(v) => v
                        .as_u64()
                        .ok_or_else(|| generic("Parameter 'granularity' expects uint32"))?,
                };
                let disabled = a.flag("disabled")?.unwrap_or(false);
                engine(img.path(), || img.bitmap_add(&name, granularity, !disabled))
            })
        }
        "block-dirty-bitmap-remove" => {
            a.only(&["node", "name"])?;
            bitmap_image(ctx, &a, |img| {
                let name = a.string("name")?;
                engine(img.path(), || img.bitmap_remove(&name))
            })
        }
        "block-dirty-bitmap-clear" => {
            a.only(&["node", "name"])?;
            bitmap_image(ctx, &a, |img| {
                let name = a.string("name")?;
                engine(img.path(), || img.bitmap_clear(&name))
            })
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            a.only(&["node", "name"])?;
            bitmap_image(ctx, &a, |img| {
                let name = a.string("name")?;
                let on = name_is_enable(a.name);
                engine(img.path(), || img.bitmap_set_enabled(&name, on))
            })
        }
        "block-dirty-bitmap-merge" => {
            a.only(&["node", "target", "bitmaps"])?;
            let target = a.string("target")?;
            let Some(sources) = a.map.get("bitmaps").and_then(Value::as_array) else {
                return Err(generic("Parameter 'bitmaps' is missing"));
            };
            let mut names = Vec::new();
            for s in sources {
                match s {
                    Value::String(n) => names.push(n.clone()),
                    Value::Object(o) => {
                        let node = o.get("node").and_then(Value::as_str).unwrap_or("");
                        if node != NODE_NAME {
                            return Err(generic(format!(
                                "Cannot find device='{node}' nor node-name='{node}'"
                            )));
                        }
                        let n = o
                            .get("name")
                            .and_then(Value::as_str)
                            .ok_or_else(|| generic("Parameter 'name' is missing"))?;
                        names.push(n.to_owned());
                    }
                    _ => return Err(generic("Invalid parameter type for 'bitmaps'")),
                }
            }
            bitmap_image(ctx, &a, |img| {
                for n in names {
                    engine(img.path(), || img.bitmap_merge(&target, None, &n))?;
                }
                Ok(json!({}))
            })
        }
        "block_resize" => {
            a.only(&["device", "node-name", "size"])?;
            node_of(&a, "device", "node-name")?;
            let size = a.uint("size")?;
            let _admin = ctx.device.admin();
            ctx.device.jobs.refuse_if_busy("resize").map_err(generic)?;
            qblk_engine::runtime::block_on(ctx.device.grow(size))
                .map(|()| json!({}))
                .map_err(generic)
        }
        "block_set_io_throttle" => {
            let mut known = crate::throttle::Config::qmp_keys();
            known.extend(["device".into(), "id".into(), "group".into()]);
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            a.only(&known)?;
            node_of(&a, "device", "id")?;
            if a.opt_string("group")?.is_some() {
                return Err(generic(
                    "throttle groups span disks; a qblk daemon serves one: leave out 'group'",
                ));
            }
            let config = crate::throttle::Config::from_qmp(a.map).map_err(generic)?;
            info!(?config, "I/O limits set");
            ctx.device.throttle.set(config);
            Ok(json!({}))
        }
        "blockdev-set-active" => {
            a.only(&["node-name", "active"])?;
            if let Some(node) = a.opt_string("node-name")? {
                if node != NODE_NAME {
                    return Err(generic(format!("Cannot find node-name='{node}'")));
                }
            }
            let active = a
                .flag("active")?
                .ok_or_else(|| generic("Parameter 'active' is missing"))?;
            let _admin = ctx.device.admin();
            if !active {
                ctx.device
                    .jobs
                    .refuse_if_busy("hand the disk over")
                    .map_err(generic)?;
            }
            if !active && !ctx.device.nbd.exports().is_empty() {
                return Err(generic(
                    "NBD exports read this daemon's disk: remove them (block-export-del) before handing it over",
                ));
            }
            ctx.device
                .set_active(active, || (ctx.open)(&ctx.device.open_target()))
                .map(|()| json!({}))
                .map_err(generic)
        }
        "blockdev-snapshot-internal-sync" => {
            a.only(&["device", "name"])?;
            node_of(&a, "device", "")?;
            let name = a.string("name")?;
            snapshot_create(ctx, &name)
        }
        "blockdev-snapshot-delete-internal-sync" => {
            a.only(&["device", "id", "name"])?;
            node_of(&a, "device", "")?;
            let id = a.opt_string("id")?;
            let name = a.opt_string("name")?;
            snapshot_delete(ctx, id.as_deref(), name.as_deref())
        }
        "stop" => {
            a.none()?;
            stop(ctx)
        }
        "cont" => {
            a.none()?;
            let d = &ctx.device;
            let held = d.run.cont(&d.gate, &d.events);
            if held > 0 {
                info!(held, "cont: held requests retried");
            }
            Ok(json!({}))
        }
        "query-status" => a.none().map(|()| {
            let status = ctx.device.run.status();
            json!({
                "running": status == crate::errors::Status::Running,
                "singlestep": false,
                "status": status.as_str(),
            })
        }),
        "quit" => a.none().map(|()| json!({})),
        "blockdev-snapshot-sync" => chain::snapshot_sync(ctx, &a),
        "block-commit" => chain::commit(ctx, &a),
        "block-stream" => chain::stream(ctx, &a),
        other => chain::job_command(ctx, &a).unwrap_or_else(|| {
            Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            })
        }),
    }
}

/// QMP `stop`: no new guest request goes into the disk until `cont`, and
/// the ones inside are waited for (as QEMU drains its block devices when
/// the VM stops), at most [`crate::device::DRAIN_TIMEOUT`].
fn stop(ctx: &Context) -> Result<Value, QmpError> {
    let d = &ctx.device;
    if !d.run.stop(&d.gate, &d.events) {
        return Ok(json!({}));
    }
    // A pause of the stopped gate drains it; the stop outlasts the pause.
    let drained = d.hold_guest().map(drop);
    info!("stopped: no guest request goes into the disk until cont");
    drained
        .map(|()| json!({}))
        .map_err(|e| generic(format!("stopped, but {e}")))
}

fn name_is_enable(name: &str) -> bool {
    name == "block-dirty-bitmap-enable"
}

/// A command's arguments.
struct Args<'a> {
    name: &'a str,
    map: &'a Map<String, Value>,
}

impl Args<'_> {
    fn none(&self) -> Result<(), QmpError> {
        self.only(&[])
    }

    /// Refuses arguments the command does not take.
    fn only(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }

    fn string(&self, key: &str) -> Result<String, QmpError> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{key}', expected: string"
            ))),
            None => Err(generic(format!("Parameter '{key}' is missing"))),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn uint(&self, key: &str) -> Result<u64, QmpError> {
        match self.map.get(key) {
            Some(v) => v.as_u64().ok_or_else(|| {
                generic(format!(
                    "Invalid parameter type for '{key}', expected: integer"
                ))
            }),
            None => Err(generic(format!("Parameter '{key}' is missing"))),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            ))),
        }
    }
}

/// Checks that a command names the disk: by `device` or (where the
/// command has it) `node_key`, exactly one of them.
fn node_of(a: &Args<'_>, device_key: &str, node_key: &str) -> Result<(), QmpError> {
    let device = a.opt_string(device_key)?;
    let node = if node_key.is_empty() {
        None
    } else {
        a.opt_string(node_key)?
    };
    let name = match (device, node) {
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) if node_key.is_empty() => {
            return Err(generic(format!("Parameter '{device_key}' is missing")));
        }
        _ => {
            return Err(generic(format!(
                "Need exactly one of '{device_key}' and '{node_key}'"
            )));
        }
    };
    if name != NODE_NAME {
        return Err(QmpError {
            class: "DeviceNotFound",
            desc: format!("Cannot find device='{name}' nor node-name='{name}'"),
        });
    }
    Ok(())
}

/// Runs `f` on the served qcow2 image holding the device's admin lock
/// (no hand-over, resize or other change meanwhile); `readonly` and `raw`
/// are the refusals for a disk that is no writable qcow2 image.
fn on_image<T>(
    ctx: &Context,
    readonly: &str,
    raw: &str,
    f: impl FnOnce(&qblk_engine::Image) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    let _admin = ctx.device.admin();
    let disk = ctx.device.disk().ok_or_else(inactive)?;
    match &*disk {
        Disk::Qcow2(img) if img.is_writable() => f(img),
        Disk::Qcow2(_) => Err(generic(readonly)),
        Disk::Raw(_) => Err(generic(raw)),
    }
}

fn inactive() -> QmpError {
    generic(crate::disk::DiskError::Inactive.to_string())
}

/// [`on_image`] for an internal snapshot operation.
fn snapshot_image<T>(
    ctx: &Context,
    f: impl FnOnce(&qblk_engine::Image) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    on_image(
        ctx,
        &format!("Device '{NODE_NAME}' is read only"),
        &format!(
            "Block format 'raw' used by device '{NODE_NAME}' does not support internal snapshots"
        ),
        f,
    )
}

/// Runs `op` on the image with the guest's requests drained and held,
/// and logs how long they were held.
fn with_guest_held<T>(
    ctx: &Context,
    what: &str,
    op: impl std::future::Future<Output = qblk_engine::Result<T>>,
) -> Result<T, QmpError> {
    let began = std::time::Instant::now();
    let paused = ctx
        .device
        .hold_guest()
        .map_err(|e| generic(format!("{e}: no {what}")))?;
    let drain = paused.drain;
    let r = qblk_engine::runtime::block_on(op);
    drop(paused);
    info!(
        drain_us = drain.as_micros() as u64,
        held_us = began.elapsed().as_micros() as u64,
        "{what}: guest requests held"
    );
    r.map_err(|e| {
        generic(format!(
            "{}: {}",
            ctx.device.image().path.display(),
            crate::error_chain(&e)
        ))
    })
}

fn snapshot_create(ctx: &Context, name: &str) -> Result<Value, QmpError> {
    snapshot_image(ctx, |img| snapshot_create_in(ctx, img, name))
}

fn snapshot_create_in(
    ctx: &Context,
    img: &qblk_engine::Image,
    name: &str,
) -> Result<Value, QmpError> {
    if name.is_empty() {
        return Err(generic("Name is empty"));
    }
    let list = qblk_engine::runtime::block_on(img.snapshots())
        .map_err(|e| generic(crate::error_chain(&e)))?;
    if list.iter().any(|s| s.name == name.as_bytes()) {
        return Err(generic(format!(
            "Snapshot with name '{name}' already exists on device '{NODE_NAME}'"
        )));
    }
    with_guest_held(ctx, "internal snapshot", img.snapshot_create(name))?;
    Ok(json!({}))
}

fn snapshot_delete(ctx: &Context, id: Option<&str>, name: Option<&str>) -> Result<Value, QmpError> {
    snapshot_image(ctx, |img| snapshot_delete_in(ctx, img, id, name))
}

fn snapshot_delete_in(
    ctx: &Context,
    img: &qblk_engine::Image,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<Value, QmpError> {
    if id.is_none() && name.is_none() {
        return Err(generic("Name or id must be provided"));
    }
    let list = qblk_engine::runtime::block_on(img.snapshots())
        .map_err(|e| generic(crate::error_chain(&e)))?;
    let found = list.iter().find(|s| {
        id.is_none_or(|i| s.id == i.as_bytes()) && name.is_none_or(|n| s.name == n.as_bytes())
    });
    let Some(sn) = found else {
        return Err(generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{NODE_NAME}'",
            id.unwrap_or("(null)"),
            name.unwrap_or("(null)")
        )));
    };
    let sn_name = String::from_utf8_lossy(&sn.name).into_owned();
    if ctx.device.nbd.exports_snapshot(&sn_name) {
        return Err(generic(format!(
            "snapshot '{sn_name}' is read by an NBD export: remove the export (block-export-del) instead"
        )));
    }
    if list.iter().filter(|s| s.name == sn.name).count() > 1 && id.is_some() {
        // The engine deletes the first snapshot of a name.
        return Err(generic(format!(
            "several snapshots are named '{sn_name}': delete them by name"
        )));
    }
    let info = json!({
        "id": String::from_utf8_lossy(&sn.id),
        "name": sn_name,
        "vm-state-size": sn.vm_state_size(),
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    });
    with_guest_held(ctx, "snapshot delete", img.snapshot_delete(&sn_name))?;
    Ok(info)
}

/// [`on_image`] for the qcow2 image behind `node`, for a bitmap
/// operation.
fn bitmap_image<T>(
    ctx: &Context,
    a: &Args<'_>,
    f: impl FnOnce(&qblk_engine::Image) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    let node = a.string("node")?;
    if node != NODE_NAME {
        return Err(generic(format!(
            "Cannot find device='{node}' nor node-name='{node}'"
        )));
    }
    on_image(
        ctx,
        "the disk is served read-only",
        "a raw disk has no persistent bitmaps",
        f,
    )
}

/// Runs an engine operation on this thread's ring; its error is the reply.
fn engine<F, Fut>(path: &Path, op: F) -> Result<Value, QmpError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = qblk_engine::Result<()>>,
{
    qblk_engine::runtime::block_on(op())
        .map(|()| json!({}))
        .map_err(|e| match e {
            qblk_engine::Error::Unsupported { what, .. } => generic(what),
            other => generic(format!("{}: {other}", path.display())),
        })
}

/// QEMU's `query-blockstats` for the disk: the totals in QEMU's names,
/// and each queue's under `x-queues`.
fn blockstats(ctx: &Context) -> Value {
    let queues: Vec<&crate::stats::QueueStats> = ctx.device.queue_stats.iter().collect();
    let per_queue: Vec<Value> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| json!({"queue": i, "stats": crate::stats::to_json(&[q])}))
        .collect();
    json!([{
        "device": "",
        "node-name": NODE_NAME,
        "qdev": NODE_NAME,
        "stats": crate::stats::to_json(&queues),
        "x-queues": per_queue,
    }])
}

fn named_nodes(ctx: &Context) -> Value {
    let file = ctx.device.image().path.display().to_string();
    let Some(disk) = ctx.device.disk() else {
        // Inactive: nothing is read from the image (another daemon writes
        // it); what the device was started with.
        let mut node = json!({
            "node-name": NODE_NAME,
            "file": file,
            "ro": ctx.readonly,
            "active": false,
            "image": {
                "filename": file,
                "virtual-size": ctx.device.size(),
                "cluster-size": ctx.device.config.cluster_size,
            },
            "dirty-bitmaps": [],
        });
        with_throttle(ctx, &mut node);
        return json!([node]);
    };
    let (drv, bitmaps) = match &*disk {
        Disk::Qcow2(img) => (
            "qcow2",
            img.bitmaps()
                .into_iter()
                .map(|b| {
                    json!({
                        "name": b.name,
                        "recording": b.enabled && !b.inconsistent,
                        "persistent": true,
                        "busy": false,
                        "inconsistent": b.inconsistent,
                        "granularity": b.granularity,
                        "count": b.dirty_bytes,
                    })
                })
                .collect::<Vec<_>>(),
        ),
        Disk::Raw(_) => ("raw", Vec::new()),
    };
    let mut node = json!({
        "node-name": NODE_NAME,
        "drv": drv,
        "file": file,
        "ro": ctx.readonly,
        "active": true,
        "image": {
            "filename": file,
            "format": drv,
            "virtual-size": disk.size(),
            "actual-size": crate::metrics::allocated_bytes(disk.path()).unwrap_or(0),
            "cluster-size": disk.cluster_size(),
        },
        "dirty-bitmaps": bitmaps,
    });
    with_throttle(ctx, &mut node);
    drop(disk);
    // The backing chain, top down (`chain.rs` names the layers).
    let below: Vec<chain::Layer> = chain::layers(ctx)
        .unwrap_or_default()
        .into_iter()
        .skip(1)
        .collect();
    if let (Some(first), Value::Object(m)) = (below.first(), &mut node) {
        m.insert(
            "backing_file".into(),
            json!(first.path.display().to_string()),
        );
        m.insert("backing_file_depth".into(), json!(below.len()));
    }
    let mut list = vec![node];
    list.extend(below.iter().map(|l| {
        let file = l.path.display().to_string();
        json!({
            "node-name": chain::node_name(l.depth),
            "drv": l.format.as_str(),
            "file": file,
            "ro": true,
            "active": true,
            "image": {"filename": file, "format": l.format.as_str()},
            "dirty-bitmaps": [],
        })
    }));
    Value::Array(list)
}

/// The I/O limits, in `BlockDeviceInfo`'s fields.
fn with_throttle(ctx: &Context, node: &mut Value) {
    if let Value::Object(m) = node {
        m.extend(ctx.device.throttle.config().to_json());
    }
}

/// QEMU's `SocketAddressLegacy` (`{"type": "unix", "data": {"path":
/// ...}}`, `{"type": "inet", "data": {"host": ..., "port": ...}}`) or the
/// flat `SocketAddress` (`{"type": "unix", "path": ...}`).
fn nbd_addr(v: Option<&Value>) -> Result<crate::nbd::NbdAddr, QmpError> {
    let Some(Value::Object(o)) = v else {
        return Err(generic("Parameter 'addr' is missing or not an object"));
    };
    let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
    let fields = match o.get("data") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err(generic("Parameter 'addr.data' must be an object")),
        None => o,
    };
    let field = |k: &str| -> Result<String, QmpError> {
        match fields.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(generic(format!("Parameter 'addr.{k}' is missing"))),
        }
    };
    match kind {
        "unix" => Ok(crate::nbd::NbdAddr::Unix(field("path")?.into())),
        "inet" => {
            let host = field("host")?;
            let port = field("port")?;
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            crate::nbd::NbdAddr::parse(&format!("{host}:{port}")).map_err(generic)
        }
        other => Err(generic(format!(
            "NBD server address type '{other}' is not supported: give unix or inet"
        ))),
    }
}

/// The snapshot an export reads.
fn export_snapshot_name(id: &str) -> String {
    format!("qblk-export-{id}")
}

/// `block-export-add` of an NBD export: an internal snapshot taken with
/// the guest held, and the bitmaps' bits copied in the same moment.
fn export_add(ctx: &Context, a: &Args<'_>) -> Result<Value, QmpError> {
    let kind = a.string("type")?;
    if kind != "nbd" {
        return Err(generic(format!(
            "qblk adds NBD exports only (the vhost-user-blk one is the daemon's): 'type' '{kind}'"
        )));
    }
    let id = a.string("id")?;
    let node = a.string("node-name")?;
    if node != NODE_NAME {
        return Err(generic(format!("Cannot find node '{node}'")));
    }
    let name = a.opt_string("name")?.unwrap_or_else(|| node.clone());
    if a.flag("writable")?.unwrap_or(false) {
        return Err(generic(
            "qblk's NBD exports are point-in-time snapshots of the disk and cannot be written: leave 'writable' false",
        ));
    }
    let bitmaps: Vec<String> = match a.map.get("bitmaps") {
        None => Vec::new(),
        Some(Value::Array(v)) => v
            .iter()
            .map(|b| match b {
                Value::String(s) => Ok(s.clone()),
                Value::Object(o) => o
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| generic("Parameter 'bitmaps' holds an object without 'name'")),
                _ => Err(generic("Parameter 'bitmaps' expects bitmap names")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(generic("Parameter 'bitmaps' expects an array")),
    };
    if id.is_empty() || name.len() > crate::nbd::proto::MAX_STRING {
        return Err(generic("'id' must not be empty, 'name' at most 4096 bytes"));
    }
    if !ctx.device.nbd.running() {
        return Err(generic("NBD server not running"));
    }
    if let Some(m) = ctx.device.nbd.conflict(&id, &name) {
        return Err(generic(m));
    }
    let snapshot = export_snapshot_name(&id);
    snapshot_image(ctx, |img| {
        ctx.device
            .jobs
            .refuse_if_busy("export the disk over NBD")
            .map_err(generic)?;
        let known = img.bitmaps();
        for b in &bitmaps {
            match known.iter().find(|k| &k.name == b) {
                None => return Err(generic(format!("Bitmap '{b}' is not found"))),
                Some(k) if k.inconsistent => {
                    return Err(generic(format!(
                        "Bitmap '{b}' is inconsistent and cannot be used"
                    )));
                }
                Some(_) => {}
            }
        }
        let list = qblk_engine::runtime::block_on(img.snapshots())
            .map_err(|e| generic(crate::error_chain(&e)))?;
        if list.iter().any(|s| s.name == snapshot.as_bytes()) {
            return Err(generic(format!(
                "an internal snapshot named '{snapshot}' exists already (a daemon stopped without ending the export?): delete it first"
            )));
        }
        let disk = ctx.device.disk().ok_or_else(inactive)?;
        let frozen = with_guest_held(ctx, "NBD export", async {
            img.snapshot_create(&snapshot).await?;
            // The bits as the snapshot's disk has them: nothing wrote in
            // between.
            Ok(bitmaps
                .iter()
                .filter_map(|b| {
                    img.bitmap_data(b)
                        .map(|(granularity, bits)| crate::nbd::FrozenBitmap {
                            name: b.clone(),
                            granularity,
                            bits,
                        })
                })
                .collect::<Vec<_>>())
        })?;
        let view = qblk_engine::runtime::block_on(img.snapshot_view(&snapshot));
        let added = view.map_err(|e| crate::error_chain(&e)).and_then(|view| {
            ctx.device.nbd.add(crate::nbd::Export::new(
                id.clone(),
                name.clone(),
                snapshot.clone(),
                disk.clone(),
                view,
                frozen,
            ))
        });
        if let Err(m) = added {
            let _ = with_guest_held(ctx, "snapshot delete", img.snapshot_delete(&snapshot));
            return Err(generic(m));
        }
        Ok(json!({}))
    })
}

/// Tells the clients an export ended (`BLOCK_EXPORT_DELETED`) and deletes
/// its snapshot (the caller holds the admin lock).
fn delete_export_snapshot(ctx: &Context, e: &crate::nbd::Export) -> Result<(), QmpError> {
    ctx.device
        .events
        .emit("BLOCK_EXPORT_DELETED", json!({"id": e.id}));
    let disk = ctx.device.disk().ok_or_else(inactive)?;
    match &*disk {
        Disk::Qcow2(img) => {
            with_guest_held(ctx, "snapshot delete", img.snapshot_delete(&e.snapshot))
        }
        Disk::Raw(_) => Ok(()),
    }
}
