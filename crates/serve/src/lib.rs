//! `qblk serve`: a vhost-user-blk daemon over the qcow2 engine.
//!
//! Threads: the main thread accepts frontends and owns the lifecycle; one
//! protocol thread per connection reads its vhost-user messages
//! (`vhost/handler.rs`) — several frontends may be connected at once (a VM
//! migrating on this host), a queue serving one connection's ring at a
//! time; each queue has a worker thread
//! (`worker.rs`) that watches the ring's kick eventfd and serves its
//! requests with the engine. A signal thread turns SIGTERM/SIGINT into an
//! orderly stop. Where the sockets come from and how the daemon reports
//! to its service manager (sd_notify, pid file) is `orchestration.rs`.
//!
//! A connection's vhost-user state (features, memory table, rings,
//! inflight region) lives in a `Handler` made for that connection and
//! dropped when it ends, so every frontend — a rebooted VM's QEMU
//! reconnecting, or a new VM — starts from a fresh device. The disk and
//! the workers outlive connections.

pub mod config;
pub mod control;
pub mod device;
pub mod disk;
pub mod errors;
pub mod events;
pub mod gate;
pub mod jobs;
pub mod metrics;
pub mod nbd;
pub mod orchestration;
mod pin;
pub mod request;
pub mod stats;
pub mod throttle;
pub mod vhost;
mod worker;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ::vhost::vhost_user::{BackendListener, Listener};
use qblk_engine::file::CacheMode;
use qblk_engine::image::{BackingPolicy, Image, OpenOptions, Secret};
use tracing::{error, info, warn};

use crate::config::DeviceConfig;
use crate::device::Device;
use crate::disk::{Disk, RawDisk};
use crate::orchestration::{ListenOn, Pidfile, ServiceOptions, Wake};
use crate::vhost::handler::Handler;
use crate::worker::QueueHandle;

/// The format of the served image. Never guessed: a raw disk whose guest
/// wrote a qcow2 header must not turn into a qcow2 image on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Everything `qblk serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The vhost-user socket: a path to bind, or an inherited listener.
    pub socket: ListenOn,
    pub image: PathBuf,
    pub format: Format,
    pub readonly: bool,
    /// GET_ID answer; at most 20 bytes.
    pub serial: Option<String>,
    pub cache: CacheMode,
    /// Metadata cache budget in bytes (L2 tables; refcount blocks get a
    /// quarter of it on top).
    pub cache_size: Option<u64>,
    pub queues: u16,
    /// Worker threads serving the queues (queue i on thread i mod
    /// threads); `None`: one per queue.
    pub threads: Option<u16>,
    /// Create the image with this size (default options) if it is missing.
    pub create: Option<u64>,
    /// Directories besides the image's own that backing files may lie in.
    pub backing_dirs: Vec<PathBuf>,
    /// LUKS passphrase.
    pub key: Option<Vec<u8>>,
    /// Register guest memory with the workers' io_uring instances: pins it
    /// all for the connection's life, and spares the kernel pinning the
    /// pages of every request. Not for guests whose memory the VMM
    /// discards (balloon, virtio-mem, free page reporting).
    pub pin_guest_memory: bool,
    /// The QMP control socket (`control.rs`), if any.
    pub control: Option<ListenOn>,
    /// Pid file and the vhost-user socket's owner and mode.
    pub service: ServiceOptions,
    /// The Prometheus metrics endpoint (`metrics.rs`), if any.
    pub metrics: Option<metrics::MetricsAddr>,
    /// The NBD server's address (`nbd/`), if it starts with the daemon.
    pub nbd: Option<nbd::NbdAddr>,
    /// TLS credentials (`--object tls-creds-x509,...`) by ID, for the NBD
    /// server started here or over QMP.
    pub objects: Vec<nbd::tls::CredsSpec>,
    /// The ID of the credentials that `--nbd`'s server requires TLS with.
    pub nbd_tls_creds: Option<String>,
    /// What a failed write, write-zeroes, discard or flush does
    /// (`--werror`, `errors.rs`).
    pub werror: errors::OnError,
    /// What a failed read does (`--rerror`).
    pub rerror: errors::OnError,
    /// Start inactive (`--inactive`): the image is looked at, not held —
    /// no locks, no metadata kept — until the control socket's
    /// `blockdev-set-active` activates the daemon. The incoming side of a
    /// migration across hosts on shared storage.
    pub inactive: bool,
    /// I/O limits (`--throttle`, QEMU's throttle-group names).
    pub throttle: throttle::Config,
}

/// A failure that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: cannot create the image", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: qblk_tools::Error,
    },
    #[error("cannot open the disk")]
    Open(#[source] disk::DiskError),
    #[error(
        "cannot open the disk (backing files may lie only under the image's directory or a directory given with --allow-backing-dir)"
    )]
    OpenBacking(#[source] disk::DiskError),
    #[error("{}: cannot open raw disk", path.display())]
    OpenRaw {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot listen", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: ::vhost::vhost_user::Error,
    },
    #[error("cannot start: {0}")]
    Start(String),
    #[error(transparent)]
    Orchestration(#[from] orchestration::Error),
    #[error("cannot close the disk cleanly")]
    Close(#[source] disk::DiskError),
}

/// Most queues a device may have (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

fn validate(opts: &ServeOptions) -> Result<(), ServeError> {
    if opts.queues == 0 || opts.queues > MAX_QUEUES {
        return Err(ServeError::Usage(format!(
            "--queues {} is outside 1..={MAX_QUEUES}",
            opts.queues
        )));
    }
    if let Some(t) = opts.threads {
        if t == 0 || t > opts.queues {
            return Err(ServeError::Usage(format!(
                "--threads {t} is outside 1..={} (the number of queues)",
                opts.queues
            )));
        }
    }
    if let Some(s) = &opts.serial {
        if s.len() > virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize {
            return Err(ServeError::Usage(format!(
                "--serial '{s}' is longer than 20 bytes"
            )));
        }
    }
    if opts.inactive && opts.create.is_some() {
        return Err(ServeError::Usage(
            "--inactive serves an image another daemon holds; --create cannot make it".into(),
        ));
    }
    if opts.inactive && opts.control.is_none() {
        return Err(ServeError::Usage(
            "--inactive needs --control: only blockdev-set-active on it activates the daemon"
                .into(),
        ));
    }
    if opts.nbd.is_some() && (opts.readonly || opts.format == Format::Raw) {
        return Err(ServeError::Usage(
            "--nbd exports internal snapshots, which only a writable qcow2 image can take".into(),
        ));
    }
    for (i, o) in opts.objects.iter().enumerate() {
        if opts.objects[..i].iter().any(|p| p.id == o.id) {
            return Err(ServeError::Usage(format!(
                "--object: attempt to add duplicate property '{}'",
                o.id
            )));
        }
    }
    if let Some(id) = &opts.nbd_tls_creds {
        if opts.nbd.is_none() {
            return Err(ServeError::Usage(
                "--nbd-tls-creds is for the server --nbd starts: give --nbd too".into(),
            ));
        }
        if !opts.objects.iter().any(|o| &o.id == id) {
            return Err(ServeError::Usage(format!(
                "--nbd-tls-creds {id}: no --object tls-creds-x509 has id={id}"
            )));
        }
    }
    if opts.create.is_some() && opts.readonly {
        return Err(ServeError::Usage(
            "--create makes a new image, which --readonly could never write".into(),
        ));
    }
    opts.service.check(&opts.socket)?;
    if let Some(p) = &opts.service.pidfile {
        Pidfile::check_free(p)?;
    }
    Ok(())
}

/// Creates the image if asked and it does not exist yet.
fn create_if_missing(opts: &ServeOptions) -> Result<(), ServeError> {
    let Some(size) = opts.create else {
        return Ok(());
    };
    if opts.image.exists() {
        return Ok(());
    }
    let format = match opts.format {
        Format::Qcow2 => qblk_tools::image::ImageFormat::Qcow2,
        Format::Raw => qblk_tools::image::ImageFormat::Raw,
    };
    let req = qblk_tools::create::CreateRequest {
        path: opts.image.clone(),
        format: Some(format),
        size: Some(size),
        options: Vec::new(),
        backing_file: None,
        backing_format: None,
        unsafe_backing: false,
        key: None,
    };
    let created = qblk_tools::create::create(&req).map_err(|source| ServeError::Create {
        path: opts.image.clone(),
        source,
    })?;
    info!("{}", created.describe(&opts.image));
    Ok(())
}

/// Opens the disk the way the options say.
pub fn open_disk(opts: &ServeOptions) -> Result<Disk, ServeError> {
    open_disk_as(opts, false, Vec::new())
}

/// Opens what a control operation asks for (`device::OpenTarget`) with the
/// daemon's options.
fn open_target(opts: &ServeOptions, t: &device::OpenTarget) -> Result<Disk, String> {
    let mut o = opts.clone();
    o.image = t.path.clone();
    o.format = t.format;
    o.backing_dirs.extend(t.trusted_dirs.iter().cloned());
    open_disk_as(&o, false, t.shared.clone()).map_err(|e| error_chain(&e))
}

/// Opens the disk, or with `look` only looks at it: read-only, without
/// locks (sharing everything, as `qemu-img -U`), no journal replayed —
/// what an inactive daemon needs to answer the frontend (size, block
/// sizes) while another daemon writes the image.
fn open_disk_as(
    opts: &ServeOptions,
    look: bool,
    shared_layers: Vec<Arc<Image>>,
) -> Result<Disk, ServeError> {
    match opts.format {
        Format::Raw => RawDisk::open(&opts.image, !opts.readonly && !look, opts.cache, !look)
            .map(Disk::Raw)
            .map_err(|source| ServeError::OpenRaw {
                path: opts.image.clone(),
                source,
            }),
        Format::Qcow2 => {
            let mut o = OpenOptions {
                writable: !opts.readonly,
                cache: opts.cache,
                backing: BackingPolicy {
                    allowed_dirs: opts.backing_dirs.clone(),
                    ..BackingPolicy::default()
                },
                key: opts.key.clone().map(Secret),
                // A crash of the daemon must not lose what the guest was
                // told is written.
                crash_journal: !opts.readonly,
                shared_layers,
                ..OpenOptions::default()
            };
            if look {
                o.writable = false;
                o.force_share = true;
                o.crash_journal = false;
                o.key = None;
            }
            if let Some(bytes) = opts.cache_size {
                o.l2_cache_bytes = bytes;
                o.refcount_cache_bytes = (bytes / 4).max(1);
            }
            qblk_engine::runtime::block_on(Image::open(&opts.image, &o))
                .map(Disk::Qcow2)
                .map_err(|e| match e {
                    qblk_engine::image::Error::Backing { .. } => ServeError::OpenBacking(e.into()),
                    e => ServeError::Open(e.into()),
                })
        }
    }
}

/// What the signal thread can reach to stop the daemon.
#[derive(Default)]
struct Stop {
    requested: AtomicBool,
    /// Wakes the main thread waiting for a frontend. (Not `shutdown(2)`
    /// of the listener: an inherited one is shared with its maker, who
    /// listens on after we exit.)
    wake: Wake,
    /// The frontend connections (their sockets are clones: shutting one
    /// down ends its protocol thread's wait for a message).
    connections: Mutex<Vec<Connection>>,
    /// The queue workers, drained before the connection is closed.
    queues: Mutex<Option<Arc<Vec<QueueHandle>>>>,
}

impl Stop {
    fn request(&self) {
        if !self.requested.swap(true, Ordering::AcqRel) {
            notify_service_manager("STOPPING=1");
            orchestration::status("stopping: finishing requests in flight, closing the image");
        }
        self.wake.wake();
        // Finish what the frontend handed over while it can still see the
        // completions; only then hang up.
        let queues = lock(&self.queues).clone();
        if let Some(queues) = queues {
            for q in queues.iter() {
                q.close();
            }
        }
        self.hang_up();
    }

    /// Hangs up every frontend.
    fn hang_up(&self) {
        for c in lock(&self.connections).iter() {
            if let Some(s) = &c.socket {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns once the disk is closed
/// cleanly.
pub fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    validate(opts)?;
    // Read before the disk is opened: bad credentials stop the start.
    let creds = opts
        .objects
        .iter()
        .map(|o| nbd::tls::TlsCreds::load(o.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServeError::Usage)?;
    create_if_missing(opts)?;
    let disk = open_disk_as(opts, opts.inactive, Vec::new())?;
    let config = DeviceConfig {
        size: disk.size(),
        readonly: opts.readonly,
        num_queues: opts.queues,
        physical_block: disk.io_alignment().max(512),
        cluster_size: disk.cluster_size(),
    };
    let serial = opts.serial.clone().unwrap_or_default().into_bytes();
    // Inactive: what the frontend needs is known; nothing more is kept.
    let disk = (!opts.inactive).then_some(disk);
    let mut device = Device::new(disk, config, serial);
    device.pin_memory = opts.pin_guest_memory;
    device.set_error_policies(opts.werror, opts.rerror);
    device.throttle.set(opts.throttle.clone());
    device.set_image(&opts.image, opts.format);
    for c in creds {
        device.nbd.add_creds(c).map_err(ServeError::Usage)?;
    }
    let device = Arc::new(device);
    info!(
        image = %opts.image.display(),
        size = config.size,
        queues = opts.queues,
        threads = opts.threads.unwrap_or(opts.queues),
        readonly = opts.readonly,
        werror = opts.werror.as_str(),
        rerror = opts.rerror.as_str(),
        active = !opts.inactive,
        "{}",
        if opts.inactive {
            "disk looked at, not held: inactive until blockdev-set-active"
        } else {
            "disk open"
        }
    );

    let stop = Arc::new(Stop::default());
    let signals = {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .map_err(|e| ServeError::Start(format!("cannot install signal handlers: {e}")))?;
        let handle = signals.handle();
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qblk-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!(signal = sig, "stopping");
                    stop.request();
                }
            })
            .map_err(|e| ServeError::Start(format!("cannot start the signal thread: {e}")))?;
        (handle, thread)
    };

    // Stopped when dropped, so an early return below closes it too.
    let metrics = match &opts.metrics {
        Some(addr) => Some(
            metrics::Metrics::start(addr, device.clone())
                .map_err(|e| ServeError::Start(format!("--metrics {addr}: cannot listen: {e}")))?,
        ),
        None => None,
    };

    let control = match &opts.control {
        Some(source) => {
            let stop = stop.clone();
            Some(
                control::Control::start(
                    source,
                    device.clone(),
                    opts.readonly,
                    Arc::new(move || {
                        info!("stopping: quit on the control socket");
                        stop.request();
                    }),
                    {
                        let opts = opts.clone();
                        Arc::new(move |t: &device::OpenTarget| open_target(&opts, t))
                    },
                )
                .map_err(|e| {
                    ServeError::Start(format!("{}: cannot listen: {e}", source.describe()))
                })?,
            )
        }
        None => None,
    };

    if let Some(addr) = &opts.nbd {
        if let Err(e) = device.nbd.start(addr, opts.nbd_tls_creds.as_deref()) {
            if let Some(c) = control {
                c.stop();
            }
            return Err(ServeError::Start(format!("--nbd {addr}: {e}")));
        }
    }

    // Held (locked) from readiness until the image is closed.
    let mut pidfile: Option<Pidfile> = None;
    let result = run(opts, &device, &stop, &mut pidfile);

    if let Some(m) = metrics {
        m.stop();
    }

    // No control command is inside the engine once this returns.
    if let Some(c) = control {
        c.stop();
    }
    signals.0.close();
    let _ = signals.1.join();
    end_nbd_exports(&device);
    // A job's images are closed (a commit's base) before the disk is.
    device.jobs.cancel_all(std::time::Duration::from_secs(60));
    let disk = device.disk();
    let closed = match &disk {
        Some(d) => qblk_engine::runtime::block_on(d.close()),
        None => Ok(()),
    };
    // A socket someone else made stays theirs.
    if let ListenOn::Path(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(s) = disk.as_ref().and_then(|d| d.stats()) {
        info!(
            allocating_writes = s.allocating_writes,
            in_place_writes = s.in_place_writes,
            metadata_writes = s.metadata_writes,
            fsyncs = s.fsyncs,
            cow_bytes = s.cow_bytes,
            direct_ios = s.direct_ios,
            bounced_ios = s.bounced_ios,
            fixed_ios = s.fixed_ios,
            "engine counters"
        );
    }
    result?;
    closed.map_err(ServeError::Close)?;
    info!("disk closed cleanly");
    drop(pidfile);
    Ok(())
}

/// Stops the NBD server and deletes the snapshots of the exports left:
/// an export lives no longer than the daemon (the guest is gone; nothing
/// else is in the engine).
fn end_nbd_exports(device: &Device) {
    device.nbd.stop();
    let exports = device.nbd.remove_all();
    let Some(disk) = device.disk() else {
        return;
    };
    if let Disk::Qcow2(img) = &*disk {
        for e in exports {
            match qblk_engine::runtime::block_on(img.snapshot_delete(&e.snapshot)) {
                Ok(()) => {
                    info!(id = %e.id, snapshot = %e.snapshot, "NBD export ended with the daemon, its snapshot deleted")
                }
                Err(err) => {
                    warn!(snapshot = %e.snapshot, "cannot delete an NBD export's snapshot: {}", error_chain(&err))
                }
            }
        }
    }
}

/// Accepts frontends one after another until asked to stop.
fn run(
    opts: &ServeOptions,
    device: &Arc<Device>,
    stop: &Arc<Stop>,
    pidfile: &mut Option<Pidfile>,
) -> Result<(), ServeError> {
    // Queue i is served by thread i mod threads.
    let threads = usize::from(opts.threads.unwrap_or(opts.queues));
    let mut queues: Vec<Option<QueueHandle>> = (0..opts.queues).map(|_| None).collect();
    for t in 0..threads {
        let indices: Vec<usize> = (t..usize::from(opts.queues)).step_by(threads).collect();
        let handles = QueueHandle::spawn_thread(&indices, device)
            .map_err(|e| ServeError::Start(format!("cannot start worker thread {t}: {e}")))?;
        for (i, h) in indices.into_iter().zip(handles) {
            queues[i] = Some(h);
        }
    }
    let queues: Vec<QueueHandle> = queues.into_iter().flatten().collect();
    let queues = Arc::new(queues);
    *lock(&stop.queues) = Some(queues.clone());
    let mut listener = match &opts.socket {
        ListenOn::Path(path) => {
            let l = Listener::new(path, true).map_err(|source| ServeError::Listen {
                path: path.clone(),
                source,
            })?;
            orchestration::apply_permissions(path, &opts.service)?;
            l
        }
        // SAFETY: validated at start; this is the one place that takes it.
        ListenOn::Inherited(s) => Listener::from(unsafe { s.into_listener() }),
    };
    info!(socket = %opts.socket.describe(), "listening");
    if let Some(path) = &opts.service.pidfile {
        *pidfile = Some(Pidfile::write(path)?);
    }
    notify_service_manager(&format!(
        "READY=1\nSTATUS=serving {} on {}",
        opts.image.display(),
        opts.socket.describe()
    ));
    let result = accept_loop(&mut listener, device, &queues, stop);
    *lock(&stop.queues) = None;
    for q in queues.iter() {
        q.exit();
    }
    for q in queues.iter() {
        q.join();
    }
    result
}

/// One frontend connection: its socket (a clone, to hang up at stop) and
/// its protocol thread.
struct Connection {
    id: u64,
    /// Taken (and shut down) when the connection ends.
    socket: Option<UnixStream>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Accepts frontends until asked to stop. Several may be connected at
/// once — a VM migrating on this host has its incoming QEMU connect while
/// the outgoing one still serves — each with its own protocol thread and
/// `Handler`; a queue serves one connection's ring at a time (`Handler`
/// starts a ring only once the queue is free).
fn accept_loop(
    listener: &mut Listener,
    device: &Arc<Device>,
    queues: &Arc<Vec<QueueHandle>>,
    stop: &Arc<Stop>,
) -> Result<(), ServeError> {
    let listener_fd = listener.as_raw_fd();
    let mut next_id = 0u64;
    let result = loop {
        if stop.requested() {
            break Ok(());
        }
        next_id += 1;
        let id = next_id;
        let handler = Arc::new(Mutex::new(Handler::new(id, device.clone(), queues.clone())));
        let mut backend = match BackendListener::new(listener, handler.clone()) {
            Ok(b) => b,
            Err(e) => break Err(ServeError::Start(e.to_string())),
        };
        // The wake stays set once a stop is requested: none is missed.
        match stop
            .wake
            .wait_for_connection(listener_fd, || stop.requested())
        {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(ServeError::Start(format!("waiting for a frontend: {e}"))),
        }
        let mut conn = match backend.accept() {
            Ok(Some(conn)) => conn,
            Ok(None) => continue,
            Err(_) if stop.requested() => break Ok(()),
            Err(e) => break Err(ServeError::Start(format!("accepting a frontend: {e}"))),
        };
        lock(&handler).connected();
        info!(connection = id, "frontend connected");
        orchestration::status("frontend connected");
        {
            let mut conns = lock(&stop.connections);
            conns.retain(|c| c.thread.as_ref().is_none_or(|t| !t.is_finished()));
            conns.push(Connection {
                id,
                socket: conn.try_clone_connection().ok(),
                thread: None,
            });
        }
        let finished_device = device.clone();
        let finished_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("qblk-vhost{id}"))
            .spawn(move || {
                let e = loop {
                    if let Err(e) = conn.handle_request() {
                        break e;
                    }
                };
                match e {
                    ::vhost::vhost_user::Error::Disconnected
                    | ::vhost::vhost_user::Error::PartialMessage => {
                        info!(connection = id, "frontend disconnected")
                    }
                    e if finished_stop.requested() => {
                        info!(connection = id, "connection closed to stop: {e}")
                    }
                    e => warn!(connection = id, "frontend connection ended: {e}"),
                }
                // The frontend sees the end at once (the stop's clone of
                // the socket would keep it open).
                drop(conn);
                let clone = lock(&finished_stop.connections)
                    .iter_mut()
                    .find(|c| c.id == id)
                    .and_then(|c| c.socket.take());
                if let Some(s) = clone {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                // Requests the frontend left behind finish before its
                // queues serve anyone else; the disk is flushed either way.
                lock(&handler).end();
                let disk = finished_device.disk();
                if let Some(Err(e)) = disk.map(|d| qblk_engine::runtime::block_on(d.flush())) {
                    error!("flush after disconnect failed: {e}");
                }
                drop(handler);
                if !finished_stop.requested() {
                    orchestration::status("frontend disconnected, waiting for the next one");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                break Err(ServeError::Start(format!(
                    "cannot start the protocol thread: {e}"
                )));
            }
        };
        if let Some(c) = lock(&stop.connections).iter_mut().find(|c| c.id == id) {
            c.thread = Some(thread);
        }
        if stop.requested() {
            stop.hang_up();
        }
    };
    // Every connection's rings are drained by now (the stop closed the
    // queues); hang up and wait for the protocol threads.
    stop.hang_up();
    let conns = std::mem::take(&mut *lock(&stop.connections));
    for c in conns {
        if c.thread.is_some_and(|t| t.join().is_err()) {
            error!(connection = c.id, "the protocol thread panicked");
        }
    }
    result
}

/// Tells a service manager (systemd's `Type=notify`, or anything that
/// speaks its protocol) how the daemon is doing, if `NOTIFY_SOCKET` names
/// one: `READY=1` once the vhost-user socket (and the control socket) take
/// connections, `STOPPING=1` when a stop begins. Best effort: a manager
/// that cannot be reached is logged and otherwise ignored.
pub fn notify_service_manager(state: &str) {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&target))?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        warn!(
            "cannot notify the service manager at {}: {e}",
            target.to_string_lossy()
        );
    }
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Locks `m`, taking the data of a poisoned lock as it is (no lock of
/// the daemon guards an invariant a panic could break half-way).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
