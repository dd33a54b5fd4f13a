//! Real Linux guests under QEMU TCG, attached to vhost-user-blk daemons.
//!
//! The guest is Debian's kernel with an initramfs made here: busybox for
//! the shell and tools, fio, mke2fs and resize2fs with their shared
//! libraries, and the virtio and ext4 modules. `/init` loads the modules, runs the scenario's `/test.sh`
//! and prints `QBLK-E2E-PASS` or `QBLK-E2E-FAIL` on the serial console
//! before powering off. A scenario prints `MD5 <name> <sum>` lines that the
//! host compares with what QEMU's own tools read from the images.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one VM may run.
pub const VM_TIMEOUT: Duration = Duration::from_secs(600);

/// Guest RAM (shared memfd, as vhost-user requires).
const GUEST_MEM: &str = "512M";

fn cmd_out(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The installed kernel version and image (`linux-image-amd64`).
pub fn kernel() -> (String, PathBuf) {
    let mut versions: Vec<String> = std::fs::read_dir("/lib/modules")
        .expect("/lib/modules: is linux-image-amd64 installed? (`cargo xtask e2e` installs it)")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
        .collect();
    versions.sort();
    let v = versions
        .pop()
        .expect("no /boot/vmlinuz-* with modules: install linux-image-amd64");
    let image = PathBuf::from(format!("/boot/vmlinuz-{v}"));
    (v, image)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
echo QBLK-E2E-START
# Wait for the disks the scenario expects.
for i in $(seq 100); do
    [ "$(ls /sys/block | grep -c '^vd')" -ge "$(cat /disks)" ] && break
    sleep 0.1
done
if sh -e -x /test.sh; then echo QBLK-E2E-PASS; else echo QBLK-E2E-FAIL; fi
sync
poweroff -f
"#;

/// Staging directory with everything but the scenario (built once).
fn staging() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let (version, _) = kernel();
        let root = std::env::temp_dir().join(format!("qblk-e2e-initramfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["bin", "modules", "lib", "lib64", "usr/lib"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir staging");
        }
        let copy = |src: &Path, dst: &Path| {
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
            std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        };
        copy(Path::new("/bin/busybox"), &root.join("bin/busybox"));
        // Dynamically linked tools (in /bin: busybox links its own mke2fs
        // into /sbin), with their shared libraries at the
        // paths the loader looks in (PATH has /usr/sbin for root, not for
        // every CI user, so the sbin tools are looked up there too).
        for tool in ["fio", "mke2fs", "resize2fs"] {
            let found = cmd_out(
                "sh",
                &[
                    "-c",
                    &format!("PATH=$PATH:/usr/sbin:/sbin command -v {tool}"),
                ],
            );
            let found = found.trim();
            copy(Path::new(found), &root.join("bin").join(tool));
            for line in cmd_out("ldd", &[found]).lines() {
                let path = line
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(str::to_owned);
                if let Some(p) = path {
                    let real = std::fs::canonicalize(&p).expect("resolve library");
                    copy(&real, &root.join(p.trim_start_matches('/')));
                }
            }
        }
        // mke2fs reads its file system types (ext4's features) from here.
        copy(Path::new("/etc/mke2fs.conf"), &root.join("etc/mke2fs.conf"));
        // Modules in dependency order.
        let mut order = String::new();
        let mut seen = std::collections::HashSet::new();
        for m in ["virtio_pci", "virtio_blk", "ext4"] {
            for line in cmd_out("modprobe", &["-S", &version, "--show-depends", m]).lines() {
                let Some(path) = line.strip_prefix("insmod ") else {
                    continue;
                };
                let path = path.trim();
                let name = Path::new(path)
                    .file_name()
                    .expect("module file")
                    .to_string_lossy()
                    .into_owned();
                if seen.insert(name.clone()) {
                    copy(Path::new(path), &root.join("modules").join(&name));
                    writeln!(order, "{name}").expect("string");
                }
            }
        }
        std::fs::write(root.join("modules.order"), order).expect("write modules.order");
        std::fs::write(root.join("init"), INIT).expect("write init");
        cmd_out(
            "chmod",
            &["755", root.join("init").to_str().expect("utf-8")],
        );
        root
    })
}

/// An initramfs for `script`, expecting `disks` virtio disks.
pub fn initramfs(out: &Path, script: &str, disks: usize) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = staging();
    std::fs::write(root.join("test.sh"), script).expect("write test.sh");
    std::fs::write(root.join("disks"), disks.to_string()).expect("write disks");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed");
}

/// One vhost-user-blk device of a VM.
#[derive(Debug, Clone)]
pub struct Disk {
    pub socket: PathBuf,
    pub queues: u16,
    /// `reconnect=1` on the chardev.
    pub reconnect: bool,
}

/// A guest run: its console output.
#[derive(Debug)]
pub struct Console(pub String);

impl Console {
    pub fn passed(&self) -> bool {
        self.0.contains("QBLK-E2E-PASS") && !self.0.contains("QBLK-E2E-FAIL")
    }

    /// The last `MD5 <name> <sum>` line for each name.
    pub fn md5s(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for line in self.0.lines() {
            let mut w = line.split_whitespace();
            if w.next() == Some("MD5") {
                if let (Some(name), Some(sum)) = (w.next(), w.next()) {
                    m.insert(name.to_owned(), sum.to_owned());
                }
            }
        }
        m
    }
}

/// A running VM.
///
/// Each has a QMP monitor (`NAME.qmp`, see [`Vm::qmp`]). A VM made by
/// [`Vm::incoming`] is the same machine (every argument the same but its
/// console, QMP socket and `-incoming`) waiting for a migration stream; the
/// guest's output continues on its own console file, and its
/// [`Vm::console`] is the source's followed by its own.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    /// The machine: every argument the migration source and destination
    /// share.
    machine: Vec<String>,
    /// The consoles of the machines this guest ran on, this one's last.
    consoles: Vec<PathBuf>,
    qmp: PathBuf,
    started: Instant,
}

impl Vm {
    /// Boots the kernel with `script` and `disks` attached. `reboot`
    /// allows the guest to reboot (otherwise a reboot ends the VM).
    pub fn start(dir: &Path, name: &str, script: &str, disks: &[Disk], reboot: bool) -> Self {
        let (_, kernel) = kernel();
        let initrd = dir.join(format!("{name}.cpio"));
        initramfs(&initrd, script, disks.len());
        let mut machine: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            GUEST_MEM.into(),
            // Two vCPUs: Linux gives virtio-blk at most one queue per CPU.
            "-smp".into(),
            "2".into(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={GUEST_MEM},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            "console=ttyS0 panic=-1 quiet loglevel=3".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-nodefaults".into(),
        ];
        if !reboot {
            machine.push("-no-reboot".into());
        }
        for (i, d) in disks.iter().enumerate() {
            let reconnect = if d.reconnect { ",reconnect=1" } else { "" };
            machine.push("-chardev".into());
            machine.push(format!(
                "socket,id=vu{i},path={}{reconnect}",
                d.socket.display()
            ));
            machine.push("-device".into());
            machine.push(format!(
                "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                d.queues
            ));
        }
        Self::launch(dir, name, machine, Vec::new(), None)
    }

    /// A new QEMU process for this same machine, waiting for the guest
    /// to come in on `uri` (`-incoming`: `unix:PATH`, `exec:cat FILE`).
    /// Its console continues this VM's.
    pub fn incoming(&self, dir: &Path, name: &str, uri: &str) -> Self {
        Self::launch(
            dir,
            name,
            self.machine.clone(),
            self.consoles.clone(),
            Some(uri),
        )
    }

    /// [`Vm::incoming`] with its disks on other sockets: `(from, to)`
    /// pairs (a migration to another host, whose daemon serves the disk on
    /// a socket of its own).
    pub fn incoming_on(&self, dir: &Path, name: &str, uri: &str, moves: &[(&Path, &Path)]) -> Self {
        let machine = self
            .machine
            .iter()
            .map(|a| {
                moves.iter().fold(a.clone(), |a, (from, to)| {
                    a.replace(
                        &format!("path={}", from.display()),
                        &format!("path={}", to.display()),
                    )
                })
            })
            .collect();
        Self::launch(dir, name, machine, self.consoles.clone(), Some(uri))
    }

    fn launch(
        dir: &Path,
        name: &str,
        machine: Vec<String>,
        mut consoles: Vec<PathBuf>,
        incoming: Option<&str>,
    ) -> Self {
        let console = dir.join(format!("{name}.console"));
        let qmp = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let mut args = machine.clone();
        args.push("-serial".into());
        args.push(format!("file:{}", console.display()));
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(uri) = incoming {
            args.push("-incoming".into());
            args.push(uri.into());
        }
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.log"))).expect("log"))
            .spawn()
            .expect("start qemu-system-x86_64 (cargo xtask e2e installs qemu-system-x86)");
        consoles.push(console);
        Self {
            child: Some(child),
            machine,
            consoles,
            qmp,
            started: Instant::now(),
        }
    }

    /// A QMP client on this VM's monitor (capabilities negotiated), once
    /// QEMU listens.
    pub fn qmp(&mut self) -> crate::qmp::Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.qmp.exists() {
            assert!(self.alive(), "qemu exited before its QMP socket appeared");
            assert!(Instant::now() < deadline, "no QMP socket after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (mut q, greeting) = crate::qmp::Qmp::connect(&self.qmp);
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.ok("qmp_capabilities", serde_json::json!({}));
        q
    }

    /// Whether the QEMU process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends `quit` and waits (at most 60 s) for QEMU to exit: its status.
    pub fn quit(&mut self, mut qmp: crate::qmp::Qmp) -> std::process::ExitStatus {
        qmp.ok("quit", serde_json::json!({}));
        drop(qmp);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().expect("wait qemu") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("qemu did not quit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The console so far: the guest's output on every machine it ran
    /// on, oldest first.
    pub fn console(&self) -> String {
        self.consoles
            .iter()
            .map(|c| std::fs::read_to_string(c).unwrap_or_default())
            .collect()
    }

    /// Waits until the console shows `marker` (or the VM ends or times out).
    pub fn wait_for(&mut self, marker: &str) -> bool {
        while self.started.elapsed() < VM_TIMEOUT {
            if self.console().contains(marker) {
                return true;
            }
            if self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                return self.console().contains(marker);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits for the VM to power off; panics with the console on timeout.
    pub fn finish(mut self) -> Console {
        let mut child = self.child.take().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait qemu") {
                let console = Console(self.console());
                assert!(
                    status.success(),
                    "qemu exited with {status}; console:\n{}",
                    console.0
                );
                return console;
            }
            if self.started.elapsed() > VM_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "VM still running after {VM_TIMEOUT:?}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// md5 of a file, as hex.
pub fn md5_file(path: &Path) -> String {
    let out = cmd_out("md5sum", &[path.to_str().expect("utf-8 path")]);
    out.split_whitespace()
        .next()
        .expect("md5sum output")
        .to_owned()
}

/// md5 of what QEMU reads from `image` (`qemu-img convert -O raw`).
pub fn qemu_md5(dir: &Path, image: &str) -> String {
    let raw = format!("{image}.as-raw");
    crate::sh(dir, &["qemu-img", "convert", "-O", "raw", image, &raw]);
    let sum = md5_file(&dir.join(&raw));
    let _ = std::fs::remove_file(dir.join(&raw));
    sum
}

/// Waits (at most 60 s) for `path` to exist (a socket a QEMU listens on).
pub fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within 60 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a migration ended, from the source's `query-migrate`.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The last `query-migrate` answer (status `completed`).
    pub info: serde_json::Value,
    /// When the source saw it completed.
    pub at: Instant,
}

impl Migrated {
    /// `downtime` (ms) as QEMU measured it.
    pub fn downtime_ms(&self) -> u64 {
        self.info["downtime"]
            .as_u64()
            .unwrap_or_else(|| panic!("no downtime in query-migrate: {}", self.info))
    }

    /// `total-time` (ms).
    pub fn total_ms(&self) -> u64 {
        self.info["total-time"].as_u64().unwrap_or(0)
    }
}

/// Sends `migrate` to `uri` and polls `query-migrate` every 50 ms until it
/// completes (at most `timeout`). A refused `migrate`, a failed or
/// cancelled migration or a timeout is an `Err` with QEMU's words.
pub fn migrate(
    src: &mut crate::qmp::Qmp,
    uri: &str,
    timeout: Duration,
) -> Result<Migrated, String> {
    start_migration(src, uri)?;
    let info = migration_reaches(src, "completed", timeout)?;
    Ok(Migrated {
        info,
        at: Instant::now(),
    })
}

/// Sends `migrate` to `uri`.
pub fn start_migration(src: &mut crate::qmp::Qmp, uri: &str) -> Result<(), String> {
    let r = src.cmd("migrate", serde_json::json!({ "uri": uri }));
    match r.get("return") {
        Some(_) => Ok(()),
        None => Err(format!("migrate refused: {}", r["error"])),
    }
}

/// Polls the source's `query-migrate` every 50 ms (at most `timeout`)
/// until the migration's status is `status` (`completed`, or
/// `pre-switchover` with that capability on); its answer then. A failed
/// or cancelled migration or a timeout is an `Err` with QEMU's words.
pub fn migration_reaches(
    src: &mut crate::qmp::Qmp,
    status: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = src.ok("query-migrate", serde_json::json!({}));
        match info["status"].as_str().unwrap_or("") {
            s if s == status => return Ok(info),
            "failed" | "cancelled" | "cancelling" => {
                return Err(format!("migration ended: {info}"));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("migration not {status} after {timeout:?}: {info}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_state(q: &mut crate::qmp::Qmp) -> String {
    q.ok("query-status", serde_json::json!({}))["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Polls `query-status` (every 20 ms, at most `timeout`) until it is
/// `status`; the time it was seen.
pub fn wait_state(q: &mut crate::qmp::Qmp, status: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let now = run_state(q);
        if now == status {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the VM is {now}, not {status}, after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
