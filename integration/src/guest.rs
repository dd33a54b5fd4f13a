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
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    console: PathBuf,
    started: Instant,
}

impl Vm {
    /// Boots the kernel with `script` and `disks` attached. `reboot`
    /// allows the guest to reboot (otherwise a reboot ends the VM).
    pub fn start(dir: &Path, name: &str, script: &str, disks: &[Disk], reboot: bool) -> Self {
        let (_, kernel) = kernel();
        let initrd = dir.join(format!("{name}.cpio"));
        initramfs(&initrd, script, disks.len());
        let console = dir.join(format!("{name}.console"));
        let mut args: Vec<String> = vec![
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
            "-serial".into(),
            format!("file:{}", console.display()),
            "-nodefaults".into(),
        ];
        if !reboot {
            args.push("-no-reboot".into());
        }
        for (i, d) in disks.iter().enumerate() {
            let reconnect = if d.reconnect { ",reconnect=1" } else { "" };
            args.push("-chardev".into());
            args.push(format!(
                "socket,id=vu{i},path={}{reconnect}",
                d.socket.display()
            ));
            args.push("-device".into());
            args.push(format!(
                "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                d.queues
            ));
        }
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.log"))).expect("log"))
            .spawn()
            .expect("start qemu-system-x86_64 (cargo xtask e2e installs qemu-system-x86)");
        Self {
            child: Some(child),
            console,
            started: Instant::now(),
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
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
