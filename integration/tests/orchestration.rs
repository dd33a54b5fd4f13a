//! `qblk serve` under orchestration: systemd's notify protocol (READY=1,
//! STATUS= lines, STOPPING=1), socket activation and `--fd` (sockets the
//! daemon did not make: served, never unlinked, never shut down), QEMU's
//! backend program conventions (`--print-capabilities`, `--socket-path`,
//! `--blk-file`, `--read-only`, the shipped description file and
//! wrapper), `--pidfile`, `--socket-owner`/`--socket-mode`, and
//! `--log-format json`.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qblk_integration::qmp::Qmp;
use qblk_integration::vhost::Client;
use qblk_integration::*;
use serde_json::{Value, json};

/// A service manager's notify socket.
struct Notify(UnixDatagram);

impl Notify {
    fn bind(d: &Path) -> Self {
        let s = UnixDatagram::bind(d.join("notify")).expect("bind notify socket");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Notify(s)
    }

    fn path(&self) -> PathBuf {
        self.0
            .local_addr()
            .expect("address")
            .as_pathname()
            .expect("path")
            .to_owned()
    }

    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).expect("a message from the daemon");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Messages up to and including the first that holds `line` as one of
    /// its lines.
    fn until(&self, line: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let m = self.next();
            let done = m.lines().any(|l| l == line || l.starts_with(line));
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

/// A `qblk serve` child whose stderr goes to a file; killed if the test
/// fails before it stops.
struct Serve {
    child: Option<Child>,
    log: PathBuf,
}

impl Serve {
    /// The next message from the daemon (READY=1 ...), failing at once
    /// with its log if it exits first.
    fn ready(&mut self, n: &Notify) -> String {
        n.0.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        let got = loop {
            match n.0.recv(&mut buf) {
                Ok(len) => break String::from_utf8_lossy(&buf[..len]).into_owned(),
                Err(_) if Instant::now() < deadline => {
                    let c = self.child.as_mut().expect("running");
                    if let Some(status) = c.try_wait().expect("wait") {
                        panic!("daemon exited ({status}) before READY=1:\n{}", self.log());
                    }
                }
                Err(e) => panic!("no READY=1 within 60 s ({e}):\n{}", self.log()),
            }
        };
        n.0.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        got
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and the exit status (60 s at most).
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_exit(&mut c, &self.log)
    }

    /// Waits for the daemon to exit by itself.
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        wait_exit(&mut c, &self.log)
    }
}

fn wait_exit(c: &mut Child, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!(
                "daemon did not exit within 60 s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}--- end ---", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How to start the daemon: its arguments, the descriptors it inherits
/// (ours, at the numbers it sees), extra environment, and whether
/// `LISTEN_PID` is set to its own pid (through `sh`, which keeps its pid
/// across `exec`).
#[derive(Default)]
struct Start<'a> {
    args: Vec<&'a str>,
    fds: Vec<(RawFd, RawFd)>,
    env: Vec<(&'a str, String)>,
    listen_pid: bool,
    log: &'a str,
}

fn start(d: &Path, s: Start<'_>) -> Serve {
    let log = d.join(if s.log.is_empty() { "serve.log" } else { s.log });
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut cmd = if s.listen_pid {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(qblk_bin());
        c
    } else {
        Command::new(qblk_bin())
    };
    cmd.arg("serve")
        .args(&s.args)
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(log_file);
    for (k, v) in &s.env {
        cmd.env(k, v);
    }
    // Our descriptors first go above the targets, so that no dup2 below
    // overwrites a source it has yet to copy.
    let moved: Vec<(RawFd, RawFd)> = s
        .fds
        .iter()
        .map(|&(ours, theirs)| {
            // SAFETY: F_DUPFD_CLOEXEC of a descriptor we hold open.
            let high = unsafe { libc::fcntl(ours, libc::F_DUPFD_CLOEXEC, 100) };
            assert!(high >= 0, "dup fd {ours}");
            (high, theirs)
        })
        .collect();
    if !moved.is_empty() {
        let pairs = moved.clone();
        let hook = move || {
            for &(high, target) in &pairs {
                // SAFETY: dup2(2) of descriptors the child inherited.
                if unsafe { libc::dup2(high, target) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: only dup2(2), which is async-signal-safe, runs between
        // fork and exec.
        unsafe { cmd.pre_exec(hook) };
    }
    let child = cmd.spawn().expect("start qblk serve");
    for (high, _) in moved {
        // SAFETY: closing the duplicates made above, ours alone.
        unsafe { libc::close(high) };
    }
    Serve {
        child: Some(child),
        log,
    }
}

fn notify_env(n: &Notify) -> (&'static str, String) {
    (
        "NOTIFY_SOCKET",
        n.path().to_str().expect("utf-8").to_owned(),
    )
}

/// A write and a read back through a vhost-user client on `socket`.
fn io_through(socket: &Path, pattern: u8) {
    let mut c = Client::connect(socket, 1).expect("vhost-user client");
    c.write_all(1 << 20, &[pattern; 4096]);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.read_vec(1 << 20, 4096), vec![pattern; 4096]);
}

#[test]
fn a_service_manager_hears_ready_status_lines_and_stopping() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let notify = Notify::bind(d);
    let mut serve = start(
        d,
        Start {
            args: vec!["--socket", "a.sock", "a.qcow2"],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    let ready = serve.ready(&notify);
    assert_eq!(
        ready, "READY=1\nSTATUS=serving a.qcow2 on a.sock",
        "the first message is readiness with what is served where"
    );
    io_through(&d.join("a.sock"), 0x5a);
    let seen = notify.until("STATUS=frontend disconnected");
    assert_eq!(
        seen,
        [
            "STATUS=frontend connected",
            "STATUS=frontend disconnected, waiting for the next one"
        ]
    );
    let pid = serve.pid();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert_eq!(notify.next(), "STOPPING=1");
    assert!(
        notify.next().starts_with("STATUS=stopping"),
        "a status line says the daemon is stopping"
    );
    assert!(serve.wait().success(), "{}", serve.log());
}

#[test]
fn socket_activation_serves_the_passed_sockets_and_leaves_them_listening() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    // What systemd does for qblk@.socket: bind and listen, then pass the
    // sockets from fd 3 on, named.
    let vhost = UnixListener::bind(d.join("act.sock")).expect("bind");
    let qmp = UnixListener::bind(d.join("act.qmp")).expect("bind");
    let notify = Notify::bind(d);
    let activated = |log: &'static str| Start {
        args: vec!["a.qcow2"],
        // Control first: the names, not the order, decide.
        fds: vec![(qmp.as_raw_fd(), 3), (vhost.as_raw_fd(), 4)],
        env: vec![
            ("LISTEN_FDS", "2".into()),
            ("LISTEN_FDNAMES", "control:vhost-user".into()),
            notify_env(&notify),
        ],
        listen_pid: true,
        log,
    };
    let mut serve = start(d, activated("first.log"));
    let ready = serve.ready(&notify);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains("act.sock (fd 4 from socket activation)"),
        "{ready}"
    );
    io_through(&d.join("act.sock"), 0x11);
    let (mut q, _) = Qmp::connect(&d.join("act.qmp"));
    q.ok("qmp_capabilities", json!({}));
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["type"], "vhost-user-blk");
    drop(q);
    assert!(serve.stop().success(), "{}", serve.log());

    // The sockets are systemd's: still there, still listening (not shut
    // down), and the next daemon serves on them.
    assert!(d.join("act.sock").exists() && d.join("act.qmp").exists());
    UnixStream::connect(d.join("act.sock")).expect("vhost-user socket still listening");
    UnixStream::connect(d.join("act.qmp")).expect("control socket still listening");
    // Those two connections wait in the backlog; the next daemon takes
    // them (and sees them go) before the client below.
    let mut again = start(d, activated("second.log"));
    notify.until("READY=1");
    io_through(&d.join("act.sock"), 0x22);
    assert!(again.stop().success(), "{}", again.log());
    assert!(d.join("act.sock").exists());

    // LISTEN_PID naming another process: the variables are not ours, so
    // without a path there is no socket.
    let out = {
        let mut s = start(
            d,
            Start {
                args: vec!["a.qcow2"],
                fds: vec![(vhost.as_raw_fd(), 3)],
                env: vec![("LISTEN_FDS", "1".into()), ("LISTEN_PID", "1".into())],
                log: "notours.log",
                ..Start::default()
            },
        );
        let status = s.wait();
        (status, s.log())
    };
    assert_eq!(out.0.code(), Some(1), "{}", out.1);
    assert!(out.1.contains("no vhost-user socket"), "{}", out.1);
}

#[test]
fn an_inherited_fd_is_served_and_never_unlinked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let l = UnixListener::bind(d.join("fd.sock")).expect("bind");
    let notify = Notify::bind(d);
    let mut serve = start(
        d,
        Start {
            args: vec!["--fd", "5", "a.qcow2"],
            fds: vec![(l.as_raw_fd(), 5)],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    let ready = serve.ready(&notify);
    assert!(ready.contains("fd.sock (fd 5)"), "{ready}");
    io_through(&d.join("fd.sock"), 0x33);
    assert!(serve.stop().success(), "{}", serve.log());
    assert!(
        d.join("fd.sock").exists(),
        "an inherited socket was unlinked"
    );
    UnixStream::connect(d.join("fd.sock")).expect("the socket still listens");
}

#[test]
fn a_bad_fd_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let file = std::fs::File::create(d.join("plain")).expect("file");
    let (connected, _peer) = UnixStream::pair().expect("pair");
    let bound_only = {
        // SAFETY: socket(2); the result is checked and closed at the end.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        fd
    };
    let datagram = UnixDatagram::bind(d.join("dgram")).expect("datagram");
    let cases: [(&str, Option<RawFd>, &str); 5] = [
        (
            "regular file",
            Some(file.as_raw_fd()),
            "fd 5: is a regular file",
        ),
        (
            "connected socket",
            Some(connected.as_raw_fd()),
            "fd 5: is a unix stream socket that is not listening",
        ),
        (
            "unbound socket",
            Some(bound_only),
            "fd 5: is a unix stream socket that is not listening",
        ),
        (
            "datagram socket",
            Some(datagram.as_raw_fd()),
            "not SOCK_STREAM",
        ),
        ("closed fd", None, "fd 5: not open"),
    ];
    for (what, fd, expect) in cases {
        let mut s = start(
            d,
            Start {
                args: vec!["--fd", "5", "a.qcow2"],
                fds: fd.map(|fd| (fd, 5)).into_iter().collect(),
                log: "bad.log",
                ..Start::default()
            },
        );
        let status = s.wait();
        let log = s.log();
        assert_eq!(status.code(), Some(1), "{what}: {log}");
        assert!(log.starts_with("qblk: "), "{what}: {log}");
        assert!(log.contains(expect), "{what}: {log}");
    }
    // SAFETY: closing the socket made above.
    unsafe { libc::close(bound_only) };

    // Socket activation validates the same way.
    let mut s = start(
        d,
        Start {
            args: vec!["a.qcow2"],
            fds: vec![(file.as_raw_fd(), 3)],
            env: vec![("LISTEN_FDS", "1".into())],
            listen_pid: true,
            log: "bad.log",
        },
    );
    let status = s.wait();
    let log = s.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("fd 3: is a regular file"), "{log}");
}

#[test]
fn print_capabilities_follows_the_vhost_user_conventions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let conventions = Conventions::load();
    for args in [
        &["serve", "--print-capabilities"][..],
        // "Other options and arguments should be ignored, and the back-end
        // program should not perform its normal function."
        &[
            "serve",
            "--socket-path",
            "x.sock",
            "--blk-file",
            "missing.qcow2",
            "--print-capabilities",
        ][..],
    ] {
        let out = qblk(args, d);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        conventions.check_capabilities(&v);
        assert!(!d.join("x.sock").exists());
    }

    // The description file and the wrapper it names.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .to_owned();
    let desc: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("contrib/50-qblk-vhost-user-blk.json"))
            .expect("contrib/50-qblk-vhost-user-blk.json"),
    )
    .expect("JSON");
    conventions.check_description(&desc);
    let binary = desc["binary"].as_str().expect("binary");
    assert!(binary.starts_with('/'), "binary must be absolute: {binary}");
    assert_eq!(
        Path::new(binary).file_name(),
        Some(std::ffi::OsStr::new("qblk-vhost-user-blk"))
    );
    let wrapper = root.join("contrib/qblk-vhost-user-blk");
    let bin_dir = qblk_bin().parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg(&wrapper)
        .arg("--print-capabilities")
        .env("PATH", path)
        .output()
        .expect("run the wrapper");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from the wrapper");
    conventions.check_capabilities(&v);
}

/// What QEMU's docs/interop/vhost-user.json allows, read from
/// tests/fixtures/vhost-user-backend-schema.json (the names of its
/// definitions, from repository qemu/qemu at commit 45018fbb0a73).
struct Conventions(Value);

impl Conventions {
    fn load() -> Conventions {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vhost-user-backend-schema.json");
        let text = std::fs::read_to_string(&path).expect("the vhost-user schema fixture");
        Conventions(serde_json::from_str(&text).expect("fixture JSON"))
    }

    /// The values of the enum `name`.
    fn values(&self, name: &str) -> Vec<&str> {
        self.0[name]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("no enum {name} in the fixture"))
            .iter()
            .map(|v| v.as_str().expect("enum value"))
            .collect()
    }

    /// The members of the struct `name`: (key, optional).
    fn members(&self, name: &str) -> Vec<(&str, bool)> {
        self.0[name]["struct"]
            .as_object()
            .unwrap_or_else(|| panic!("no struct {name} in the fixture"))
            .keys()
            .map(|k| match k.strip_prefix('*') {
                Some(k) => (k, true),
                None => (k.as_str(), false),
            })
            .collect()
    }

    /// `v` has every mandatory member of `name` and no other than its
    /// members and `extra`.
    fn check_members(&self, name: &str, v: &Value, extra: &[&str]) {
        let obj = v.as_object().unwrap_or_else(|| panic!("{v} is no object"));
        let members = self.members(name);
        for key in obj.keys() {
            assert!(
                extra.contains(&key.as_str()) || members.iter().any(|(m, _)| m == key),
                "{key} is not a member of {name}: {v}"
            );
        }
        for (m, optional) in members {
            assert!(optional || obj.contains_key(m), "{name} lacks {m}: {v}");
        }
    }

    /// `--print-capabilities`: a VHostUserBackendCapabilities of type
    /// "block" (the union's base member beside the block struct's
    /// members), every VHostUserBackendBlockFeature (qblk has both
    /// options), each once.
    fn check_capabilities(&self, v: &Value) {
        let base = self.0["VHostUserBackendCapabilities"]["discriminator"]
            .as_str()
            .expect("discriminator");
        assert!(self.values("VHostUserBackendType").contains(&"block"));
        assert_eq!(v[base], "block", "{v}");
        self.check_members("VHostUserBackendCapabilitiesBlock", v, &[base]);
        let mut features: Vec<&str> = v["features"]
            .as_array()
            .expect("features")
            .iter()
            .map(|f| f.as_str().expect("feature name"))
            .collect();
        features.sort_unstable();
        let mut all = self.values("VHostUserBackendBlockFeature");
        all.sort_unstable();
        assert_eq!(features, all, "{v}");
    }

    /// The description file: a VhostUserBackend.
    fn check_description(&self, v: &Value) {
        self.check_members("VhostUserBackend", v, &[]);
        let ty = v["type"].as_str().expect("type");
        assert!(self.values("VHostUserBackendType").contains(&ty), "{v}");
        assert_eq!(ty, "block");
        assert!(
            v["description"].is_string() && v["binary"].is_string(),
            "{v}"
        );
        if let Some(tags) = v.get("tags") {
            assert!(
                tags.as_array()
                    .is_some_and(|t| t.iter().all(Value::is_string)),
                "{v}"
            );
        }
    }
}

#[test]
fn the_pidfile_is_written_when_ready_held_and_removed_at_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    create_qcow2(d, "b.qcow2", "64M");
    let notify = Notify::bind(d);
    let mut first = start(
        d,
        Start {
            args: vec!["--socket", "a.sock", "--pidfile", "qblk.pid", "a.qcow2"],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    assert!(first.ready(&notify).starts_with("READY=1\n"));
    let pid = std::fs::read_to_string(d.join("qblk.pid")).expect("pid file once ready");
    assert_eq!(pid, format!("{}\n", first.pid()));

    // Another daemon (another disk, another socket) with the same pid
    // file refuses before it binds anything.
    let mut second = start(
        d,
        Start {
            args: vec!["--socket", "b.sock", "--pidfile", "qblk.pid", "b.qcow2"],
            log: "second.log",
            ..Start::default()
        },
    );
    let status = second.wait();
    let log = second.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("held by process {}", first.pid())),
        "{log}"
    );
    assert!(!d.join("b.sock").exists());
    assert!(d.join("a.sock").exists());
    assert_eq!(
        std::fs::read_to_string(d.join("qblk.pid")).expect("still there"),
        pid
    );

    assert!(first.stop().success(), "{}", first.log());
    assert!(!d.join("qblk.pid").exists(), "pid file left after exit");

    // A stale pid file (its daemon killed) is taken over.
    std::fs::write(d.join("qblk.pid"), "999999\n").expect("stale");
    let mut third = start(
        d,
        Start {
            args: vec!["--socket", "b.sock", "--pidfile", "qblk.pid", "b.qcow2"],
            env: vec![notify_env(&notify)],
            log: "third.log",
            ..Start::default()
        },
    );
    notify.until("READY=1");
    assert_eq!(
        std::fs::read_to_string(d.join("qblk.pid")).expect("pid file"),
        format!("{}\n", third.pid())
    );
    assert!(third.stop().success(), "{}", third.log());
    assert!(!d.join("qblk.pid").exists());
}

#[test]
fn the_socket_gets_its_owner_and_mode_before_ready() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    // SAFETY: getgid(2) cannot fail.
    let gid = unsafe { libc::getgid() };
    let owner = format!("{uid}:{gid}");
    let notify = Notify::bind(d);
    let mut serve = start(
        d,
        Start {
            args: vec![
                "--socket",
                "a.sock",
                "--socket-owner",
                &owner,
                "--socket-mode",
                "0604",
                "a.qcow2",
            ],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    assert!(serve.ready(&notify).starts_with("READY=1\n"));
    // Checked at READY=1, the moment a manager may hand the socket out.
    let m = std::fs::metadata(d.join("a.sock")).expect("socket");
    assert_eq!(m.permissions().mode() & 0o7777, 0o604, "socket mode");
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    io_through(&d.join("a.sock"), 0x44);
    assert!(serve.stop().success(), "{}", serve.log());

    for (args, expect) in [
        (
            &["--socket-owner", "no-such-user-qblk"][..],
            "--socket-owner 'no-such-user-qblk': no such user: no-such-user-qblk",
        ),
        (
            &["--socket-owner", "root:no-such-group-qblk"][..],
            "no such group: no-such-group-qblk",
        ),
        (
            &["--socket-mode", "0999"][..],
            "--socket-mode '0999': not an octal mode",
        ),
        (&["--socket-mode", "u+rw"][..], "not an octal mode"),
    ] {
        let mut full = vec!["serve", "--socket", "bad.sock"];
        full.extend_from_slice(args);
        full.push("a.qcow2");
        let out = qblk(&full, d);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(!d.join("bad.sock").exists());
    }

    // An inherited socket's owner and mode are its maker's business.
    let l = UnixListener::bind(d.join("fd.sock")).expect("bind");
    let mut s = start(
        d,
        Start {
            args: vec!["--fd", "5", "--socket-mode", "0600", "a.qcow2"],
            fds: vec![(l.as_raw_fd(), 5)],
            log: "inherited.log",
            ..Start::default()
        },
    );
    let status = s.wait();
    assert_eq!(status.code(), Some(1), "{}", s.log());
    assert!(
        s.log()
            .contains("an inherited socket gets its owner and mode from its maker")
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_level_and_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    let notify = Notify::bind(d);
    let mut serve = start(
        d,
        Start {
            args: vec!["--socket", "a.sock", "--log-format", "json", "a.qcow2"],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    assert!(serve.ready(&notify).starts_with("READY=1\n"));
    io_through(&d.join("a.sock"), 0x55);
    assert!(serve.stop().success(), "{}", serve.log());
    let log = serve.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 4, "{log}");
    for v in &lines {
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "{v}"
        );
        assert!(v["message"].is_string(), "{v}");
    }
    let listening = lines
        .iter()
        .find(|v| v["message"] == "listening")
        .expect("a listening line");
    assert_eq!(listening["socket"], "a.sock", "fields are kept");
    assert!(lines.iter().any(|v| v["message"] == "frontend connected"));
    assert!(lines.iter().any(|v| v["message"] == "disk closed cleanly"));
}

#[test]
fn qemu_convention_aliases_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "a.qcow2", "64M");
    sh(d, &["qemu-io", "-c", "write -P 0x66 0 64k", "a.qcow2"]);
    let notify = Notify::bind(d);
    let mut serve = start(
        d,
        Start {
            args: vec![
                "--socket-path",
                "a.sock",
                "--blk-file",
                "a.qcow2",
                "--read-only",
            ],
            env: vec![notify_env(&notify)],
            ..Start::default()
        },
    );
    assert!(serve.ready(&notify).starts_with("READY=1\n"));
    {
        // Read-only: blkio refuses to start read-write on it.
        assert!(Client::connect_with(&d.join("a.sock"), 1, false).is_err());
        let mut c = Client::connect_with(&d.join("a.sock"), 1, true).expect("client");
        assert_eq!(c.capacity(), 64 << 20);
        assert_eq!(c.read_vec(0, 4096), vec![0x66; 4096]);
    }
    assert!(serve.stop().success(), "{}", serve.log());
    assert!(!d.join("a.sock").exists(), "a socket qblk bound is removed");

    // An image given twice is refused, as is no image at all.
    for args in [
        &[
            "serve",
            "--socket",
            "b.sock",
            "--blk-file",
            "a.qcow2",
            "a.qcow2",
        ][..],
        &["serve", "--socket", "b.sock"][..],
        &["serve", "a.qcow2"][..],
    ] {
        let out = qblk(args, d);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!d.join("b.sock").exists());
    }
}

/// `systemd-analyze verify` accepts contrib/systemd's units, with
/// `ExecStart=` pointed at the built binary (verify checks that the
/// command is executable) and nothing else changed. Any complaint about
/// them — even one systemd only warns of, like an unknown key — fails
/// the test. Skipped, saying so, where systemd-analyze is not installed.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let units = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join("contrib/systemd");
    let service = std::fs::read_to_string(units.join("qblk@.service")).expect("qblk@.service");
    assert!(
        service.contains("ExecStart=/usr/bin/qblk "),
        "the unit no longer starts /usr/bin/qblk: update this test"
    );
    let service = service.replace(
        "ExecStart=/usr/bin/qblk ",
        &format!("ExecStart={} ", qblk_bin().display()),
    );
    std::fs::write(d.join("qblk@.service"), service).expect("write the service");
    std::fs::copy(units.join("qblk@.socket"), d.join("qblk@.socket")).expect("copy the socket");
    let out = run(
        "systemd-analyze",
        &["verify", "./qblk@.service", "./qblk@.socket"],
        d,
    );
    let err = stderr(&out);
    let about_ours: Vec<&str> = err.lines().filter(|l| l.contains("qblk@")).collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
}
