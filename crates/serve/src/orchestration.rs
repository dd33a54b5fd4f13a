//! What service managers and VMM management layers expect of a vhost-user
//! backend, beside serving the device:
//!
//! - **Where the sockets come from.** `qblk serve` binds a path it is
//!   given (and removes it at exit), or takes a listening socket someone
//!   else made: `--fd N` (QEMU's backend program conventions, in
//!   `docs/interop/vhost-user.rst`) or systemd's socket activation
//!   (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; descriptors from 3 on).
//!   An inherited socket is validated (a listening `AF_UNIX`
//!   `SOCK_STREAM` socket), never unlinked, and never shut down: its
//!   maker (systemd) keeps listening on the same socket after the daemon
//!   exits, so the accept loops wait on it with `poll(2)` beside a
//!   [`Wake`] event rather than being woken by `shutdown(2)`.
//! - **The socket's owner and mode** (`--socket-owner`, `--socket-mode`)
//!   when qblk binds it, applied before readiness is announced.
//! - **Readiness and progress.** systemd's notify protocol (`READY=1`,
//!   `STATUS=...`, `STOPPING=1`; `notify_service_manager` in `lib.rs`) and
//!   a pid file as QEMU writes one (`qemu_write_pidfile`): created, locked
//!   and filled with the pid once the daemon is ready, held locked while
//!   it runs, removed when it exits. A pid file a live process holds
//!   makes a second daemon refuse to start, before it touches anything.
//! - **Capabilities** (`--print-capabilities`) in the format of QEMU's
//!   `docs/interop/vhost-user.json`.
//!
//! Nothing here knows about virtio or the image.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tracing::warn;

/// The names `LISTEN_FDNAMES` gives the sockets when systemd passes two
/// (`FileDescriptorName=` in the socket units).
pub const FDNAME_VHOST_USER: &str = "vhost-user";
pub const FDNAME_CONTROL: &str = "control";

/// Where a socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// Bind this path (replacing a stale socket); removed at exit.
    Path(PathBuf),
    /// A listening socket made by someone else (`--fd`, socket
    /// activation), validated by [`inherit_listener`]. The daemon takes
    /// ownership of the descriptor once, when it starts listening.
    Inherited(InheritedSocket),
}

impl ListenOn {
    /// How the socket is named in logs and status lines.
    pub fn describe(&self) -> String {
        match self {
            ListenOn::Path(p) => p.display().to_string(),
            ListenOn::Inherited(s) => s.describe(),
        }
    }
}

/// A validated inherited listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedSocket {
    pub fd: RawFd,
    /// The path it is bound to, if any (for messages only: it is never
    /// unlinked).
    pub path: Option<PathBuf>,
    pub origin: Origin,
}

/// How an inherited socket was handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--fd N`.
    FdOption,
    /// systemd's `LISTEN_FDS`.
    SocketActivation,
}

impl InheritedSocket {
    pub fn describe(&self) -> String {
        let how = match self.origin {
            Origin::FdOption => format!("fd {}", self.fd),
            Origin::SocketActivation => format!("fd {} from socket activation", self.fd),
        };
        match &self.path {
            Some(p) => format!("{} ({how})", p.display()),
            None => how,
        }
    }

    /// The listener, owning the descriptor from now on.
    ///
    /// # Safety
    ///
    /// `self.fd` must be open and owned by no one else in this process,
    /// and this must be called at most once per inherited socket.
    pub unsafe fn into_listener(&self) -> UnixListener {
        // SAFETY: the caller guarantees the descriptor is ours alone.
        unsafe { UnixListener::from_raw_fd(self.fd) }
    }
}

/// A failure of the orchestration conventions: all at start-up, before
/// the daemon serves anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fd {fd}: {what}")]
    BadFd { fd: RawFd, what: String },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("--socket-owner '{spec}': {what}")]
    Owner { spec: String, what: String },
    #[error("--socket-mode '{0}': not an octal mode within 0..=0777")]
    Mode(String),
    #[error("{}: cannot set the socket's owner or mode", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--socket-owner and --socket-mode apply to a socket qblk binds; an inherited socket gets its owner and mode from its maker (SocketUser=, SocketGroup=, SocketMode= in a systemd socket unit)"
    )]
    PermissionsOfInherited,
    #[error("pid file {}: held by {holder}", path.display())]
    PidfileHeld { path: PathBuf, holder: String },
    #[error("pid file {}", path.display())]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn sockopt_int(fd: RawFd, name: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `value`, which
    // is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if r < 0 {
        Err(last_os_error())
    } else {
        Ok(value)
    }
}

/// Checks that `fd` is a listening unix stream socket, marks it
/// close-on-exec and learns its path. Takes no ownership.
pub fn inherit_listener(fd: RawFd, origin: Origin) -> Result<InheritedSocket, Error> {
    let bad = |what: String| Error::BadFd { fd, what };
    if fd < 0 {
        return Err(bad("not a file descriptor".into()));
    }
    // SAFETY: fstat(2) fills the zeroed struct; any fd number is safe to ask.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above; `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd, &raw mut st) } < 0 {
        let e = last_os_error();
        return Err(bad(if e.raw_os_error() == Some(libc::EBADF) {
            "not open (the vhost-user socket must be passed to qblk as this descriptor)".into()
        } else {
            format!("cannot stat it: {e}")
        }));
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => None,
        libc::S_IFREG => Some("a regular file"),
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFBLK => Some("a block device"),
        libc::S_IFIFO => Some("a pipe"),
        libc::S_IFLNK => Some("a symbolic link"),
        _ => Some("not a socket"),
    };
    if let Some(kind) = kind {
        return Err(bad(format!(
            "is {kind}, not a listening unix socket for vhost-user"
        )));
    }
    let domain = sockopt_int(fd, libc::SO_DOMAIN)
        .map_err(|e| bad(format!("cannot ask the socket's domain: {e}")))?;
    if domain != libc::AF_UNIX {
        return Err(bad(format!(
            "is a socket of address family {domain}, not AF_UNIX (vhost-user needs a unix socket)"
        )));
    }
    let ty = sockopt_int(fd, libc::SO_TYPE)
        .map_err(|e| bad(format!("cannot ask the socket's type: {e}")))?;
    if ty != libc::SOCK_STREAM {
        return Err(bad(
            "is a unix socket, but not SOCK_STREAM (vhost-user needs a stream socket)".into(),
        ));
    }
    let listening = sockopt_int(fd, libc::SO_ACCEPTCONN)
        .map_err(|e| bad(format!("cannot ask whether the socket listens: {e}")))?;
    if listening == 0 {
        return Err(bad(
            "is a unix stream socket that is not listening (bind it and call listen(2) before passing it)".into(),
        ));
    }
    // SAFETY: F_SETFD on a descriptor just checked to be open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(bad(format!(
            "cannot mark it close-on-exec: {}",
            last_os_error()
        )));
    }
    Ok(InheritedSocket {
        fd,
        path: socket_path(fd),
        origin,
    })
}

/// The path a unix socket is bound to, if it is bound to one.
fn socket_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname(2) writes at most `len` bytes into `addr`.
    let r = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len) };
    if r < 0 {
        return None;
    }
    let offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let n = (len as usize)
        .saturating_sub(offset)
        .min(addr.sun_path.len());
    let bytes: Vec<u8> = addr.sun_path[..n].iter().map(|&c| c as u8).collect();
    // Unnamed (n == 0) and abstract (leading NUL) sockets have no path.
    if bytes.first().is_none_or(|&b| b == 0) {
        return None;
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[..end])))
}

/// The sockets systemd passed, by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activation {
    pub vhost_user: Option<InheritedSocket>,
    pub control: Option<InheritedSocket>,
}

/// Descriptors passed by socket activation, each with its
/// `LISTEN_FDNAMES` name if the variable was set.
pub type PassedFds = Vec<(RawFd, Option<String>)>;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Reads systemd's socket activation variables, as `sd_listen_fds(3)`
/// does: `None` unless `LISTEN_PID` is our pid and `LISTEN_FDS` is set;
/// otherwise the descriptors from 3 on with their `LISTEN_FDNAMES`
/// names (if given, one per descriptor). Pure: the caller reads the
/// environment.
pub fn parse_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    our_pid: u32,
) -> Result<Option<PassedFds>, Error> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| Error::Activation(format!("LISTEN_PID '{pid}' is not a pid")))?;
    if pid != our_pid {
        // Meant for another process (our parent's, say).
        return Ok(None);
    }
    let count: RawFd = fds
        .trim()
        .parse()
        .map_err(|_| Error::Activation(format!("LISTEN_FDS '{fds}' is not a count")))?;
    if !(0..=64).contains(&count) {
        return Err(Error::Activation(format!(
            "LISTEN_FDS {count} is outside 0..=64"
        )));
    }
    if count == 0 {
        return Ok(None);
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        Some(n) => {
            let names: Vec<Option<String>> = n.split(':').map(|s| Some(s.to_owned())).collect();
            if names.len() != count as usize {
                return Err(Error::Activation(format!(
                    "LISTEN_FDNAMES '{n}' names {} descriptors, LISTEN_FDS says {count}",
                    names.len()
                )));
            }
            names
        }
        None => vec![None; count as usize],
    };
    Ok(Some(
        (LISTEN_FDS_START..LISTEN_FDS_START + count)
            .zip(names)
            .collect(),
    ))
}

/// Which passed socket is which: one socket is the vhost-user socket
/// (unless it is named `control`); two must be named `vhost-user` and
/// `control`.
/// Returns (vhost-user, control).
pub fn assign_roles(
    fds: &[(RawFd, Option<String>)],
) -> Result<(Option<RawFd>, Option<RawFd>), Error> {
    match fds {
        [(fd, name)] => {
            if name.as_deref() == Some(FDNAME_CONTROL) {
                Ok((None, Some(*fd)))
            } else {
                Ok((Some(*fd), None))
            }
        }
        [_, _] => {
            let mut vhost = None;
            let mut control = None;
            for (fd, name) in fds {
                let slot = match name.as_deref() {
                    Some(FDNAME_VHOST_USER) => &mut vhost,
                    Some(FDNAME_CONTROL) => &mut control,
                    other => {
                        return Err(Error::Activation(format!(
                            "two sockets passed, fd {fd} named {}: name them '{FDNAME_VHOST_USER}' and '{FDNAME_CONTROL}' (FileDescriptorName=)",
                            other.map_or_else(|| "nothing".to_owned(), |n| format!("'{n}'"))
                        )));
                    }
                };
                if slot.replace(*fd).is_some() {
                    return Err(Error::Activation(format!(
                        "two sockets passed under the same name '{}'",
                        name.as_deref().unwrap_or_default()
                    )));
                }
            }
            Ok((vhost, control))
        }
        _ => Err(Error::Activation(format!(
            "{} sockets passed; qblk takes one (the vhost-user socket) or two (named '{FDNAME_VHOST_USER}' and '{FDNAME_CONTROL}')",
            fds.len()
        ))),
    }
}

/// Takes systemd's socket activation: reads `LISTEN_PID`, `LISTEN_FDS`
/// and `LISTEN_FDNAMES`, removes them from the environment (children do
/// not inherit them, as `sd_listen_fds(1)` does), and validates the
/// descriptors meant for this process.
///
/// # Safety
///
/// Changes the process environment: call it before any other thread
/// exists (first thing in `main`).
pub unsafe fn take_socket_activation() -> Result<Activation, Error> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees no other thread reads or writes
        // the environment meanwhile.
        unsafe { std::env::remove_var(k) };
    }
    let Some(passed) = parse_listen_fds(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(Activation::default());
    };
    let (vhost, control) = assign_roles(&passed)?;
    Ok(Activation {
        vhost_user: vhost
            .map(|fd| inherit_listener(fd, Origin::SocketActivation))
            .transpose()?,
        control: control
            .map(|fd| inherit_listener(fd, Origin::SocketActivation))
            .transpose()?,
    })
}

/// `--socket-owner`: a user and/or a group, resolved at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What `qblk serve` is told about its service manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceOptions {
    /// QEMU's `--pidfile`: written once ready, removed at exit.
    pub pidfile: Option<PathBuf>,
    /// Owner of the vhost-user socket qblk binds.
    pub socket_owner: Option<SocketOwner>,
    /// Permission bits of the vhost-user socket qblk binds.
    pub socket_mode: Option<u32>,
}

impl ServiceOptions {
    /// Refuses what cannot work together, before anything is opened.
    pub fn check(&self, socket: &ListenOn) -> Result<(), Error> {
        if matches!(socket, ListenOn::Inherited(_))
            && (self.socket_owner.is_some() || self.socket_mode.is_some())
        {
            return Err(Error::PermissionsOfInherited);
        }
        Ok(())
    }
}

/// Parses `USER`, `USER:GROUP` or `:GROUP`, names or numeric ids, as
/// chown(1) does (`USER:` takes the user's login group).
pub fn parse_socket_owner(spec: &str) -> Result<SocketOwner, Error> {
    let err = |what: String| Error::Owner {
        spec: spec.to_owned(),
        what,
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() && group.is_none_or(str::is_empty) {
        return Err(err("give USER, USER:GROUP or :GROUP".into()));
    }
    let mut owner = SocketOwner::default();
    let mut login_group = None;
    if !user.is_empty() {
        let (uid, gid) = lookup_user(user).map_err(err)?;
        owner.uid = Some(uid);
        login_group = gid;
    }
    match group {
        Some("") => {
            owner.gid = Some(login_group.ok_or_else(|| {
                err(format!(
                    "user {user} is numeric and has no passwd entry to take a login group from"
                ))
            })?);
        }
        Some(g) => owner.gid = Some(lookup_group(g).map_err(err)?),
        None => {}
    }
    Ok(owner)
}

/// A user's uid and login group (the latter unknown for a numeric id
/// without a passwd entry).
fn lookup_user(name: &str) -> Result<(u32, Option<u32>), String> {
    let numeric = name.parse::<u32>().ok();
    let cname =
        std::ffi::CString::new(name).map_err(|_| format!("user name '{name}' holds a NUL"))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given; the strings
    // getpwnam_r stores point into `buf`, which we do not read.
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &raw mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut result,
        )
    };
    if r == 0 && !result.is_null() {
        return Ok((pw.pw_uid, Some(pw.pw_gid)));
    }
    match numeric {
        Some(uid) => Ok((uid, None)),
        None if r != 0 => Err(format!(
            "cannot look up user {name}: {}",
            std::io::Error::from_raw_os_error(r)
        )),
        None => Err(format!("no such user: {name}")),
    }
}

fn lookup_group(name: &str) -> Result<u32, String> {
    let numeric = name.parse::<u32>().ok();
    let cname =
        std::ffi::CString::new(name).map_err(|_| format!("group name '{name}' holds a NUL"))?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: an all-zero group is a valid value for getgrnam_r to fill.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given.
    let r = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &raw mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut result,
        )
    };
    if r == 0 && !result.is_null() {
        return Ok(gr.gr_gid);
    }
    match numeric {
        Some(gid) => Ok(gid),
        None if r != 0 => Err(format!(
            "cannot look up group {name}: {}",
            std::io::Error::from_raw_os_error(r)
        )),
        None => Err(format!("no such group: {name}")),
    }
}

/// Parses an octal mode such as `0660` or `660`.
pub fn parse_socket_mode(spec: &str) -> Result<u32, Error> {
    let digits = spec.strip_prefix("0o").unwrap_or(spec);
    if digits.is_empty() || digits.len() > 4 {
        return Err(Error::Mode(spec.to_owned()));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(Error::Mode(spec.to_owned())),
    }
}

/// Gives a socket qblk bound its owner, then its mode.
pub fn apply_permissions(path: &Path, service: &ServiceOptions) -> Result<(), Error> {
    let fail = |source| Error::Permissions {
        path: path.to_owned(),
        source,
    };
    if let Some(o) = service.socket_owner {
        std::os::unix::fs::chown(path, o.uid, o.gid).map_err(fail)?;
    }
    if let Some(mode) = service.socket_mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    Ok(())
}

/// Tells the service manager what the daemon is doing (`STATUS=`, shown
/// by `systemctl status`).
pub fn status(text: &str) {
    crate::notify_service_manager(&format!("STATUS={text}"));
}

/// `--print-capabilities`: QEMU's `VHostUserBackendCapabilities` for a
/// block backend (`docs/interop/vhost-user.json`): the `--read-only` and
/// `--blk-file` options are supported.
/// Written out by hand so that `type` comes first, as in the
/// conventions' example.
pub const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

/// An eventfd that wakes accept loops waiting on a listening socket,
/// which must not be shut down: an inherited one is shared with its
/// maker. Once woken it stays readable.
#[derive(Debug)]
pub struct Wake {
    fd: Option<OwnedFd>,
    /// Set by `wake`, for when there is no eventfd to poll.
    woken: std::sync::atomic::AtomicBool,
}

impl Default for Wake {
    fn default() -> Self {
        // SAFETY: eventfd(2) with valid flags; a non-negative result is a
        // new descriptor nobody else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            warn!("cannot create an eventfd: {}", last_os_error());
            return Wake {
                fd: None,
                woken: false.into(),
            };
        }
        // SAFETY: see above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Wake {
            fd: Some(fd),
            woken: false.into(),
        }
    }
}

impl Wake {
    pub fn wake(&self) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        if let Some(fd) = &self.fd {
            let one = 1u64.to_ne_bytes();
            // SAFETY: write(2) of 8 bytes from a live buffer to our eventfd.
            let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// Waits until `listener` has a connection to accept (true) or this
    /// was woken or `stopped` says so (false). Without an eventfd, polls
    /// every 100 ms.
    pub fn wait_for_connection(
        &self,
        listener: RawFd,
        stopped: impl Fn() -> bool,
    ) -> std::io::Result<bool> {
        loop {
            if stopped() || self.woken.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = if self.fd.is_some() { -1 } else { 100 };
            // SAFETY: poll(2) on an array of two pollfds we own; a negative
            // fd is ignored by the kernel.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 {
                let e = last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
            if fds[0].revents != 0 {
                return Err(std::io::Error::other(format!(
                    "the listening socket reports poll events {:#x}",
                    fds[0].revents
                )));
            }
        }
    }
}

/// QEMU's pid file: locked (an OFD write lock over the whole file, which
/// QEMU's `lockf` locks and this one exclude each other), holding the
/// pid, kept locked while the daemon runs, removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    /// Holds the lock; closed after the file is removed.
    file: File,
}

fn lock_whole(file: &File) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock on an open descriptor.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw mut fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => format!("process {} (still running)", s.trim()),
        _ => "another process".into(),
    }
}

impl Pidfile {
    /// Refuses early (before the daemon opens its image or binds its
    /// socket) when a live process holds `path`. Takes nothing.
    pub fn check_free(path: &Path) -> Result<(), Error> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Pidfile {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        match lock_whole(&file) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::PidfileHeld {
                path: path.to_owned(),
                holder: holder(path),
            }),
            Err(source) => Err(Error::Pidfile {
                path: path.to_owned(),
                source,
            }),
        }
        // Closing `file` releases the probe's lock.
    }

    /// Creates (or takes over a stale) `path`, locks it and writes our pid.
    pub fn write(path: &Path) -> Result<Pidfile, Error> {
        let fail = |source| Error::Pidfile {
            path: path.to_owned(),
            source,
        };
        // A stale file removed and made again between our open and our
        // lock would leave us locking a file no one sees: try again.
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(fail)?;
            if !lock_whole(&file).map_err(fail)? {
                return Err(Error::PidfileHeld {
                    path: path.to_owned(),
                    holder: holder(path),
                });
            }
            let ours = file.metadata().map_err(fail)?;
            match std::fs::metadata(path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
                _ => continue,
            }
            file.set_len(0).map_err(fail)?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(fail)?;
            return Ok(Pidfile {
                path: path.to_owned(),
                file,
            });
        }
        Err(fail(std::io::Error::other(
            "replaced again and again while being locked",
        )))
    }

    /// The pid the file holds (for tests and messages).
    pub fn read_pid(path: &Path) -> Option<u32> {
        let mut s = String::new();
        File::open(path).ok()?.read_to_string(&mut s).ok()?;
        s.trim().parse().ok()
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Only our own file: someone may have replaced it meanwhile.
        if let (Ok(ours), Ok(now)) = (self.file.metadata(), std::fs::metadata(&self.path)) {
            if ours.dev() == now.dev() && ours.ino() == now.ino() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_follow_sd_listen_fds() {
        // Not for us, or not set: nothing.
        assert_eq!(parse_listen_fds(None, Some("1"), None, 7).unwrap(), None);
        assert_eq!(
            parse_listen_fds(Some("8"), Some("1"), None, 7).unwrap(),
            None
        );
        assert_eq!(parse_listen_fds(Some("7"), None, None, 7).unwrap(), None);
        assert_eq!(
            parse_listen_fds(Some("7"), Some("0"), None, 7).unwrap(),
            None
        );
        assert_eq!(
            parse_listen_fds(Some("7"), Some("2"), Some("vhost-user:control"), 7).unwrap(),
            Some(vec![
                (3, Some("vhost-user".into())),
                (4, Some("control".into()))
            ])
        );
        assert_eq!(
            parse_listen_fds(Some("7"), Some("1"), None, 7).unwrap(),
            Some(vec![(3, None)])
        );
        assert!(parse_listen_fds(Some("x"), Some("1"), None, 7).is_err());
        assert!(parse_listen_fds(Some("7"), Some("-1"), None, 7).is_err());
        assert!(parse_listen_fds(Some("7"), Some("2"), Some("a"), 7).is_err());
    }

    #[test]
    fn roles_by_name() {
        let one = |n: Option<&str>| vec![(3, n.map(str::to_owned))];
        assert_eq!(assign_roles(&one(None)).unwrap(), (Some(3), None));
        assert_eq!(
            assign_roles(&one(Some("qblk@vm1.socket"))).unwrap(),
            (Some(3), None)
        );
        assert_eq!(
            assign_roles(&one(Some("control"))).unwrap(),
            (None, Some(3))
        );
        let two = |a: &str, b: &str| vec![(3, Some(a.to_owned())), (4, Some(b.to_owned()))];
        assert_eq!(
            assign_roles(&two("control", "vhost-user")).unwrap(),
            (Some(4), Some(3))
        );
        assert!(assign_roles(&two("vhost-user", "vhost-user")).is_err());
        assert!(assign_roles(&two("vhost-user", "qmp")).is_err());
        assert!(assign_roles(&[(3, None), (4, None)]).is_err());
        assert!(assign_roles(&[(3, None), (4, None), (5, None)]).is_err());
    }

    #[test]
    fn capabilities_are_vhost_user_json() {
        let v: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]})
        );
    }

    #[test]
    fn owners_and_modes() {
        assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_socket_mode("660").unwrap(), 0o660);
        assert_eq!(parse_socket_mode("0o600").unwrap(), 0o600);
        for bad in ["", "8", "0999", "1777", "rw", "07777"] {
            assert!(parse_socket_mode(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_socket_owner("0:0").unwrap(),
            SocketOwner {
                uid: Some(0),
                gid: Some(0)
            }
        );
        assert_eq!(parse_socket_owner("root").unwrap().uid, Some(0));
        assert_eq!(
            parse_socket_owner(":12345").unwrap(),
            SocketOwner {
                uid: None,
                gid: Some(12345)
            }
        );
        let e = parse_socket_owner("no-such-user-qblk").unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
        let e = parse_socket_owner("root:no-such-group-qblk").unwrap_err();
        assert!(e.to_string().contains("no such group"), "{e}");
        assert!(parse_socket_owner(":").is_err());
    }

    #[test]
    fn a_wake_ends_the_wait_and_leaves_the_listener_listening() {
        let d = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(d.path().join("s")).unwrap();
        let wake = Wake::default();
        let _c = std::os::unix::net::UnixStream::connect(d.path().join("s")).unwrap();
        assert!(wake.wait_for_connection(l.as_raw_fd(), || false).unwrap());
        wake.wake();
        assert!(!wake.wait_for_connection(l.as_raw_fd(), || false).unwrap());
        // Stays woken; the listener was not touched.
        assert!(!wake.wait_for_connection(l.as_raw_fd(), || false).unwrap());
        let _again = std::os::unix::net::UnixStream::connect(d.path().join("s")).unwrap();
        let s = inherit_listener(l.as_raw_fd(), Origin::FdOption).unwrap();
        assert_eq!(s.path.as_deref(), Some(d.path().join("s").as_path()));
    }

    #[test]
    fn a_pidfile_is_exclusive_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.pid");
        Pidfile::check_free(&p).unwrap();
        let held = Pidfile::write(&p).unwrap();
        assert_eq!(Pidfile::read_pid(&p), Some(std::process::id()));
        // OFD locks exclude other open file descriptions, also our own.
        assert!(matches!(
            Pidfile::check_free(&p),
            Err(Error::PidfileHeld { .. })
        ));
        assert!(matches!(Pidfile::write(&p), Err(Error::PidfileHeld { .. })));
        drop(held);
        assert!(!p.exists());
        // A stale file (its writer gone) is taken over.
        std::fs::write(&p, "999999\n").unwrap();
        Pidfile::check_free(&p).unwrap();
        let again = Pidfile::write(&p).unwrap();
        assert_eq!(Pidfile::read_pid(&p), Some(std::process::id()));
        drop(again);
    }
}
