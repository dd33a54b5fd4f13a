//! NBD exports of point-in-time views of the disk (`qblk serve --nbd`,
//! QMP `nbd-server-start` and `block-export-add`): backup tools read an
//! internal snapshot of the served image — and, through QEMU's
//! `qemu:dirty-bitmap:NAME` meta context, which blocks changed — while
//! the guest goes on writing.
//!
//! Each export is an internal snapshot (`qblk-export-ID`) taken with the
//! guest's requests held, read through the engine's
//! [`SnapshotView`], with a copy of the
//! chosen persistent bitmaps' bits made in the same held moment. Exports
//! are read-only: writes, trims and write-zeroes are refused with EPERM.
//!
//! Threads: one accept thread; one thread per client (at most
//! [`MAX_CLIENTS`]), which runs its engine calls on its own ring. A
//! client has [`HANDSHAKE_TIMEOUT`] to negotiate and may then idle
//! [`IDLE_TIMEOUT`] between requests; one that sends what the protocol
//! does not allow is hung up. The wire format is `proto.rs`.
//!
//! TLS (`tls.rs`): a server started with credentials is in QEMU's "TLS
//! required" mode. Before `NBD_OPT_STARTTLS` a client may only start TLS
//! or abort (other options get `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME`
//! a hang-up); after it, the rustls handshake runs on the same socket and
//! the option haggling and transmission go on inside TLS (`Conn`).

pub mod proto;
pub mod tls;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qblk_engine::view::SnapshotView;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tracing::{debug, info, warn};

use crate::disk::Disk;
use crate::lock;
use crate::orchestration::Wake;
use proto::*;

/// Most clients connected at once; more are hung up at once.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take over each handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a reply may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Options a client may send before it picks an export.
const MAX_OPTIONS: usize = 1024;
/// Extents one block status chunk holds at most.
const MAX_EXTENTS: usize = 16384;
/// How long removing an export waits for its clients' threads to let go.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    /// `HOST:PORT`, as `TcpListener::bind` takes it.
    Tcp(String),
}

impl NbdAddr {
    /// `unix:PATH` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(s.to_owned()))
            }
            _ => Err(format!(
                "'{s}' is no NBD address: give unix:PATH or HOST:PORT"
            )),
        }
    }
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => f.write_str(a),
        }
    }
}

/// A persistent bitmap's bits as they were when the export was made.
#[derive(Debug)]
pub struct FrozenBitmap {
    pub name: String,
    pub granularity: u64,
    /// Bit `i` (bit `i % 8` of byte `i / 8`) is granule `i`.
    pub bits: Vec<u8>,
}

impl FrozenBitmap {
    fn dirty(&self, granule: u64) -> bool {
        usize::try_from(granule / 8)
            .ok()
            .and_then(|i| self.bits.get(i))
            .is_some_and(|b| b >> (granule % 8) & 1 == 1)
    }
}

/// One export: a snapshot of the disk and frozen bitmaps.
pub struct Export {
    pub id: String,
    pub name: String,
    /// The internal snapshot the export reads.
    pub snapshot: String,
    disk: Arc<Disk>,
    view: SnapshotView,
    pub bitmaps: Vec<FrozenBitmap>,
    /// The connected clients' sockets (hung up when the export ends).
    clients: Mutex<Vec<(u64, Sock)>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

impl Export {
    pub fn new(
        id: String,
        name: String,
        snapshot: String,
        disk: Arc<Disk>,
        view: SnapshotView,
        bitmaps: Vec<FrozenBitmap>,
    ) -> Self {
        Self {
            id,
            name,
            snapshot,
            disk,
            view,
            bitmaps,
            clients: Mutex::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.view.size()
    }

    /// The meta contexts it offers; a context's ID is its index + 1.
    fn contexts(&self) -> Vec<String> {
        let mut c = vec![BASE_ALLOCATION.to_string()];
        c.extend(
            self.bitmaps
                .iter()
                .map(|b| format!("{DIRTY_BITMAP_PREFIX}{}", b.name)),
        );
        c
    }

    fn image(&self) -> Result<&qblk_engine::Image, String> {
        match &*self.disk {
            Disk::Qcow2(img) => Ok(img),
            Disk::Raw(_) => Err("a raw disk has no snapshots".into()),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let img = self.image()?;
        qblk_engine::runtime::block_on(img.view_read(&self.view, offset, buf))
            .map_err(|e| crate::error_chain(&e))
    }

    /// `base:allocation` extents from `pos` over `len` bytes.
    fn allocation(&self, pos: u64, len: u64, one: bool) -> Result<Vec<(u32, u32)>, String> {
        let img = self.image()?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let end = pos + len;
        let mut at = pos;
        while at < end && out.len() < MAX_EXTENTS {
            let (s, n) =
                qblk_engine::runtime::block_on(img.view_block_status(&self.view, at, end - at))
                    .map_err(|e| crate::error_chain(&e))?;
            if n == 0 {
                break;
            }
            let n = n.min(end - at);
            let flags = if s.data { 0 } else { STATE_HOLE } | if s.zero { STATE_ZERO } else { 0 };
            match out.last_mut() {
                // Runs split at L2 tables merge back (lengths fit: `len`
                // is a request's u32).
                Some((l, f)) if *f == flags => *l += n as u32,
                _ => out.push((n as u32, flags)),
            }
            at += n;
            if one {
                break;
            }
        }
        Ok(out)
    }

    /// A frozen bitmap's extents (dirty or not) from `pos` over `len`.
    fn dirty(&self, b: &FrozenBitmap, pos: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
        let g = b.granularity.max(1);
        let end = pos + len;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = pos;
        while at < end && out.len() < MAX_EXTENTS {
            let d = b.dirty(at / g);
            let mut next = (at / g + 1) * g;
            while next < end && b.dirty(next / g) == d {
                next += g;
            }
            let n = next.min(end) - at;
            out.push((n as u32, if d { STATE_DIRTY } else { 0 }));
            at += n;
            if one {
                break;
            }
        }
        out
    }
}

/// The exports, shared by the control socket and the server's threads.
type Exports = Arc<Mutex<Vec<Arc<Export>>>>;

/// The NBD server and its exports.
#[derive(Default)]
pub struct Nbd {
    exports: Exports,
    server: Mutex<Option<Server>>,
    /// TLS credentials by ID (`--object tls-creds-x509`), fixed at start.
    creds: Mutex<Vec<Arc<tls::TlsCreds>>>,
}

impl std::fmt::Debug for Nbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbd")
            .field("exports", &*lock(&self.exports))
            .finish()
    }
}

impl Nbd {
    /// Adds TLS credentials; their ID must be new.
    pub fn add_creds(&self, c: tls::TlsCreds) -> Result<(), String> {
        let mut list = lock(&self.creds);
        if list.iter().any(|o| o.spec.id == c.spec.id) {
            return Err(format!("attempt to add duplicate property '{}'", c.spec.id));
        }
        list.push(Arc::new(c));
        Ok(())
    }

    /// Starts the server on `addr`, requiring TLS with credentials
    /// `tls_creds` if given.
    pub fn start(&self, addr: &NbdAddr, tls_creds: Option<&str>) -> Result<(), String> {
        let creds = match tls_creds {
            Some(id) => Some(
                lock(&self.creds)
                    .iter()
                    .find(|c| c.spec.id == id)
                    .cloned()
                    .ok_or_else(|| format!("No TLS credentials with id '{id}'"))?,
            ),
            None => None,
        };
        let mut s = lock(&self.server);
        if let Some(s) = &*s {
            return Err(format!("An NBD server is already running on {}", s.addr));
        }
        *s = Some(Server::start(addr, self.exports.clone(), creds)?);
        Ok(())
    }

    /// Whether the server runs.
    pub fn running(&self) -> bool {
        lock(&self.server).is_some()
    }

    /// Stops the server (its clients are hung up); false if none ran.
    pub fn stop(&self) -> bool {
        let s = lock(&self.server).take();
        match s {
            Some(s) => {
                s.stop();
                true
            }
            None => false,
        }
    }

    pub fn exports(&self) -> Vec<Arc<Export>> {
        lock(&self.exports).clone()
    }

    /// Whether snapshot `name` is an export's.
    pub fn exports_snapshot(&self, name: &str) -> bool {
        lock(&self.exports).iter().any(|e| e.snapshot == name)
    }

    /// Adds an export; its ID and name must be new (checked before the
    /// snapshot is taken too, by [`Nbd::conflict`]).
    pub fn add(&self, e: Export) -> Result<(), String> {
        let mut list = lock(&self.exports);
        if let Some(m) = conflict(&list, &e.id, &e.name) {
            return Err(m);
        }
        info!(id = %e.id, name = %e.name, snapshot = %e.snapshot, "NBD export added");
        list.push(Arc::new(e));
        Ok(())
    }

    /// Why an export with `id` and `name` cannot be added, if it cannot.
    pub fn conflict(&self, id: &str, name: &str) -> Option<String> {
        conflict(&lock(&self.exports), id, name)
    }

    /// Ends export `id`: hangs up its clients and waits until none reads
    /// it any more; the caller deletes its snapshot.
    pub fn remove(&self, id: &str) -> Result<Arc<Export>, String> {
        let e = {
            let mut list = lock(&self.exports);
            let Some(i) = list.iter().position(|e| e.id == id) else {
                return Err(format!("Export '{id}' is not found"));
            };
            list.remove(i)
        };
        if let Err(m) = release(&e) {
            // Still read: it stays listed, so its snapshot stays protected.
            lock(&self.exports).push(e);
            return Err(m);
        }
        Ok(e)
    }

    /// Ends every export (the server stopping): see [`Nbd::remove`].
    pub fn remove_all(&self) -> Vec<Arc<Export>> {
        let all = std::mem::take(&mut *lock(&self.exports));
        for e in &all {
            if let Err(m) = release(e) {
                warn!("{m}");
            }
        }
        all
    }
}

fn conflict(list: &[Arc<Export>], id: &str, name: &str) -> Option<String> {
    if list.iter().any(|e| e.id == id) {
        return Some(format!("Block export id '{id}' is already in use"));
    }
    if list.iter().any(|e| e.name == name) {
        return Some(format!("NBD server already has export named '{name}'"));
    }
    None
}

/// Hangs up an export's clients and waits for their threads to drop it.
fn release(e: &Arc<Export>) -> Result<(), String> {
    let began = Instant::now();
    loop {
        // Again each round: a client that was finishing its handshake
        // registers late.
        for (_, s) in lock(&e.clients).iter() {
            s.shutdown();
        }
        if Arc::strong_count(e) == 1 {
            return Ok(());
        }
        if began.elapsed() > RELEASE_TIMEOUT {
            return Err(format!(
                "export '{}': a client still reads it after {} s",
                e.id,
                RELEASE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client's socket.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn set_timeouts(&self, read: Duration) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Self::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                s.set_nodelay(true)
            }
        }
    }
}

/// A client's connection: plain, or inside TLS once `NBD_OPT_STARTTLS`
/// succeeded.
enum Conn {
    Plain(Sock),
    Tls(Box<StreamOwned<ServerConnection, Sock>>),
}

impl Conn {
    fn sock(&self) -> &Sock {
        match self {
            Self::Plain(s) => s,
            Self::Tls(t) => &t.sock,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Replies `NBD_REP_ACK` to STARTTLS, then runs the TLS handshake on
    /// the socket; the connection goes on inside TLS.
    fn start_tls(&mut self, config: &Arc<ServerConfig>) -> std::io::Result<()> {
        if self.is_tls() {
            return Err(invalid("TLS is already on"));
        }
        reply(self, OPT_STARTTLS, REP_ACK, &[])?;
        // A second descriptor of the socket; the plain one is dropped.
        let sock = self.sock().try_clone()?;
        let conn = ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
        let mut t = StreamOwned::new(conn, sock);
        while t.conn.is_handshaking() {
            if t.conn.complete_io(&mut t.sock)? == (0, 0) {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        *self = Self::Tls(Box::new(t));
        Ok(())
    }

    /// Ends the connection (TLS with a close_notify).
    fn close(&mut self) {
        if let Self::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        self.sock().shutdown();
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            // Each write goes out at once, as on a plain socket.
            Self::Tls(t) => {
                let n = t.write(buf)?;
                t.flush()?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(t) => t.flush(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Self::Unix(l) => l.as_raw_fd(),
            Self::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Self::Unix(l) => Sock::Unix(l.accept()?.0),
            Self::Tcp(l) => Sock::Tcp(l.accept()?.0),
        })
    }
}

type Clients = Arc<Mutex<Vec<(Sock, std::thread::JoinHandle<()>)>>>;

/// The running server.
struct Server {
    addr: NbdAddr,
    /// The credentials' ID if TLS is required.
    tls: Option<String>,
    wake: Arc<Wake>,
    accept: Option<std::thread::JoinHandle<()>>,
    clients: Clients,
}

impl Server {
    fn start(
        addr: &NbdAddr,
        exports: Exports,
        creds: Option<Arc<tls::TlsCreds>>,
    ) -> Result<Server, String> {
        let listener = match addr {
            NbdAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)
                    .map_err(|e| format!("{}: cannot listen: {e}", p.display()))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                Listener::Unix(l)
            }
            NbdAddr::Tcp(a) => Listener::Tcp(
                TcpListener::bind(a.as_str()).map_err(|e| format!("{a}: cannot listen: {e}"))?,
            ),
        };
        let wake = Arc::new(Wake::default());
        let clients: Clients = Arc::default();
        let woken = wake.clone();
        let list = clients.clone();
        let tls = creds.as_ref().map(|c| c.spec.id.clone());
        let config = creds.map(|c| c.config.clone());
        let accept = std::thread::Builder::new()
            .name("qblk-nbd-accept".into())
            .spawn(move || accept_loop(&listener, &woken, &list, &exports, config.as_ref()))
            .map_err(|e| format!("cannot start the NBD accept thread: {e}"))?;
        info!(nbd = %addr, tls_creds = tls.as_deref().unwrap_or("none"), "NBD server listening");
        Ok(Server {
            addr: addr.clone(),
            tls,
            wake,
            accept: Some(accept),
            clients,
        })
    }

    fn stop(mut self) {
        self.wake.wake();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let clients = std::mem::take(&mut *lock(&self.clients));
        for (s, _) in &clients {
            s.shutdown();
        }
        for (_, t) in clients {
            let _ = t.join();
        }
        if let NbdAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
        info!(nbd = %self.addr, tls_creds = self.tls.as_deref().unwrap_or("none"), "NBD server stopped");
    }
}

fn accept_loop(
    listener: &Listener,
    wake: &Wake,
    clients: &Clients,
    exports: &Exports,
    tls: Option<&Arc<ServerConfig>>,
) {
    while let Ok(true) = wake.wait_for_connection(listener.fd(), || false) {
        let Ok(sock) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let mut list = lock(clients);
        // Reap the clients that are done.
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|(_, t)| t.is_finished());
        *list = live;
        for (_, t) in done {
            let _ = t.join();
        }
        if list.len() >= MAX_CLIENTS {
            warn!("NBD: {MAX_CLIENTS} clients are connected; one more is turned away");
            sock.shutdown();
            continue;
        }
        let Ok(keep) = sock.try_clone() else {
            continue;
        };
        let exports = exports.clone();
        let tls = tls.cloned();
        let t = std::thread::Builder::new()
            .name("qblk-nbd".into())
            .spawn(move || serve_client(sock, &exports, tls.as_ref()));
        match t {
            Ok(t) => list.push((keep, t)),
            Err(e) => warn!("cannot start an NBD client thread: {e}"),
        }
    }
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

fn serve_client(s: Sock, exports: &Exports, tls: Option<&Arc<ServerConfig>>) {
    let mut s = Conn::Plain(s);
    let r = s
        .sock()
        .set_timeouts(HANDSHAKE_TIMEOUT)
        .and_then(|()| handshake(&mut s, exports, tls));
    let session = match r {
        Ok(Some(session)) => session,
        Ok(None) => {
            s.close();
            return;
        }
        Err(e) => {
            debug!(tls = s.is_tls(), "NBD client dropped in the handshake: {e}");
            s.close();
            return;
        }
    };
    // Registered with its export, which hangs it up when it ends.
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = s.sock().try_clone() {
        lock(&session.export.clients).push((id, c));
    }
    let r = s
        .sock()
        .set_timeouts(IDLE_TIMEOUT)
        .and_then(|()| transmission(&mut s, &session));
    if let Err(e) = r {
        debug!(export = %session.export.name, "NBD client dropped: {e}");
    }
    lock(&session.export.clients).retain(|(i, _)| *i != id);
    s.close();
}

/// What a client negotiated.
struct Session {
    export: Arc<Export>,
    structured: bool,
    /// The selected meta contexts: ID and index into `contexts()`.
    meta: Vec<u32>,
}

impl Session {
    /// Transmission on export `e`: the meta contexts selected count only
    /// if they were selected for it (`meta_export`).
    fn start(
        e: Arc<Export>,
        structured: bool,
        mut meta: Vec<u32>,
        meta_export: Option<&str>,
    ) -> Self {
        if meta_export != Some(e.name.as_str()) {
            meta.clear();
        }
        Session {
            export: e,
            structured,
            meta,
        }
    }
}

fn invalid(m: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

fn find(exports: &Exports, name: &str) -> Option<Arc<Export>> {
    let list = lock(exports);
    if name.is_empty() && list.len() == 1 {
        // The default export: the only one there is.
        return list.first().cloned();
    }
    list.iter().find(|e| e.name == name).cloned()
}

fn reply(s: &mut Conn, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&option_reply(opt, kind, data))
}

fn handshake(
    s: &mut Conn,
    exports: &Exports,
    tls: Option<&Arc<ServerConfig>>,
) -> std::io::Result<Option<Session>> {
    s.write_all(&greeting())?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f)?;
    let flags = parse_client_flags(f).map_err(invalid)?;
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta: Vec<u32> = Vec::new();
    let mut meta_export: Option<String> = None;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h)?;
        let (opt, len) = parse_option_header(&h).map_err(invalid)?;
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if tls.is_some() && !s.is_tls() {
            match before_tls(opt) {
                BeforeTls::Handle => {}
                BeforeTls::RefuseTlsRequired => {
                    let m = format!("Option {opt:#x} not permitted before TLS");
                    reply(s, opt, REP_ERR_TLS_REQD, m.as_bytes())?;
                    continue;
                }
                BeforeTls::HangUp => {
                    return Err(invalid("NBD_OPT_EXPORT_NAME before TLS"));
                }
            }
        }
        let parsed = match parse_option(opt, &data) {
            Ok(o) => o,
            Err(m) => {
                reply(s, opt, REP_ERR_INVALID, m.as_bytes())?;
                continue;
            }
        };
        match parsed {
            Opt::Abort => {
                let _ = reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            Opt::StartTls => match tls {
                _ if s.is_tls() => reply(s, opt, REP_ERR_INVALID, b"TLS already enabled")?,
                None => reply(s, opt, REP_ERR_POLICY, b"TLS not configured")?,
                Some(config) => {
                    if let Err(e) = s.start_tls(config) {
                        info!("NBD client's TLS handshake failed: {e}");
                        return Err(e);
                    }
                }
            },
            Opt::Unknown(_) => reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
            Opt::List => {
                for e in lock(exports).iter() {
                    reply(s, opt, REP_SERVER, &rep_server(&e.name))?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            Opt::StructuredReply => {
                structured = true;
                reply(s, opt, REP_ACK, &[])?;
            }
            Opt::ListMeta(m) | Opt::SetMeta(m) => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !structured {
                    reply(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )?;
                    continue;
                }
                let Some(e) = find(exports, &m.export) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let available = e.contexts();
                let mut chosen: Vec<u32> = Vec::new();
                if !set && m.queries.is_empty() {
                    chosen.extend(1..=available.len() as u32);
                }
                for q in &m.queries {
                    for c in matching(q, &available, !set) {
                        let id = available.iter().position(|a| a == c).unwrap_or(0) as u32 + 1;
                        if !chosen.contains(&id) {
                            chosen.push(id);
                        }
                    }
                }
                for id in &chosen {
                    let name = available.get(*id as usize - 1).map_or("", String::as_str);
                    reply(s, opt, REP_META_CONTEXT, &rep_meta_context(*id, name))?;
                }
                reply(s, opt, REP_ACK, &[])?;
                if set {
                    meta = chosen;
                    meta_export = Some(e.name.clone());
                }
            }
            Opt::Info { go, name, requests } => {
                let Some(e) = find(exports, &name) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                reply(
                    s,
                    opt,
                    REP_INFO,
                    &info_export(e.size(), transmission_flags()),
                )?;
                if requests.contains(&INFO_NAME) {
                    reply(s, opt, REP_INFO, &info_name(&e.name))?;
                }
                reply(s, opt, REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD))?;
                reply(s, opt, REP_ACK, &[])?;
                if go {
                    return Ok(Some(Session::start(
                        e,
                        structured,
                        meta,
                        meta_export.as_deref(),
                    )));
                }
            }
            Opt::ExportName(name) => {
                let Some(e) = find(exports, &name) else {
                    return Err(invalid(format!("no export named '{name}'")));
                };
                let mut b = e.size().to_be_bytes().to_vec();
                b.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(Session::start(
                    e,
                    structured,
                    meta,
                    meta_export.as_deref(),
                )));
            }
        }
    }
    Err(invalid("too many options"))
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

fn error_reply(
    s: &mut Conn,
    structured: bool,
    cookie: u64,
    err: u32,
    msg: &str,
) -> std::io::Result<()> {
    if structured {
        s.write_all(&error_chunk(cookie, err, msg))
    } else {
        s.write_all(&simple_reply(cookie, err))
    }
}

fn ok_reply(s: &mut Conn, structured: bool, cookie: u64) -> std::io::Result<()> {
    if structured {
        s.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
    } else {
        s.write_all(&simple_reply(cookie, 0))
    }
}

fn transmission(s: &mut Conn, session: &Session) -> std::io::Result<()> {
    let e = &session.export;
    let st = session.structured;
    loop {
        let mut h = [0u8; REQUEST_LEN];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        }
        let r = parse_request(&h).map_err(invalid)?;
        let out_of_range = r
            .offset
            .checked_add(u64::from(r.length))
            .is_none_or(|end| end > e.size());
        match r.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if r.length > MAX_PAYLOAD {
                    return Err(invalid("a write payload beyond 32 MiB"));
                }
                std::io::copy(
                    &mut (&mut *s).take(u64::from(r.length)),
                    &mut std::io::sink(),
                )?;
                error_reply(s, st, r.cookie, EPERM, "the export is read-only")?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES | CMD_RESIZE => {
                error_reply(s, st, r.cookie, EPERM, "the export is read-only")?
            }
            CMD_FLUSH => ok_reply(s, st, r.cookie)?,
            CMD_READ => {
                if r.length > MAX_PAYLOAD {
                    error_reply(s, st, r.cookie, EINVAL, "a read beyond 32 MiB")?;
                    continue;
                }
                if out_of_range {
                    error_reply(s, st, r.cookie, EINVAL, "a read beyond the end")?;
                    continue;
                }
                let n = r.length as usize;
                let head = if st { 28 } else { 16 };
                let mut b = vec![0u8; head + n];
                if let Err(m) = e.read(r.offset, &mut b[head..]) {
                    warn!(export = %e.name, offset = r.offset, len = n, "NBD read failed: {m}");
                    error_reply(s, st, r.cookie, EIO, &m)?;
                    continue;
                }
                if st {
                    b[..20].copy_from_slice(&chunk_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        r.cookie,
                        8 + r.length,
                    ));
                    b[20..28].copy_from_slice(&r.offset.to_be_bytes());
                } else {
                    b[..16].copy_from_slice(&simple_reply(r.cookie, 0));
                }
                s.write_all(&b)?;
            }
            CMD_BLOCK_STATUS => {
                if !st || session.meta.is_empty() {
                    error_reply(s, st, r.cookie, EINVAL, "no meta context was negotiated")?;
                    continue;
                }
                if r.length == 0 || out_of_range {
                    error_reply(s, st, r.cookie, EINVAL, "a range outside the export")?;
                    continue;
                }
                let one = r.flags & CMD_FLAG_REQ_ONE != 0;
                let mut chunks = Vec::new();
                let mut failed = None;
                for id in &session.meta {
                    let ext = if *id == 1 {
                        e.allocation(r.offset, u64::from(r.length), one)
                    } else {
                        match e.bitmaps.get(*id as usize - 2) {
                            Some(b) => Ok(e.dirty(b, r.offset, u64::from(r.length), one)),
                            None => Err("no such context".to_string()),
                        }
                    };
                    match ext {
                        Ok(x) => chunks.push((*id, x)),
                        Err(m) => {
                            failed = Some(m);
                            break;
                        }
                    }
                }
                if let Some(m) = failed {
                    warn!(export = %e.name, "NBD block status failed: {m}");
                    error_reply(s, st, r.cookie, EIO, &m)?;
                    continue;
                }
                let last = chunks.len().saturating_sub(1);
                let mut b = Vec::new();
                for (i, (id, x)) in chunks.iter().enumerate() {
                    b.extend_from_slice(&block_status_chunk(r.cookie, i == last, *id, x));
                }
                s.write_all(&b)?;
            }
            _ => error_reply(s, st, r.cookie, EINVAL, "command not supported")?,
        }
    }
}
