//! Driving `qblk serve` without a VM: the daemon as a child process, and a
//! vhost-user-blk client (the blkio crate's virtio-blk-vhost-user driver).

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::qblk_bin;

/// A running `qblk serve` (or any vhost-user-blk daemon), stopped with
/// SIGTERM when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `qblk serve --socket SOCKET ARGS...` in `dir` and waits for the
    /// socket to appear.
    pub fn qblk(dir: &Path, socket: &str, args: &[&str]) -> Self {
        Self::try_qblk(dir, socket, args).unwrap_or_else(|(status, log)| {
            panic!("daemon exited ({status}) before listening:\n{log}")
        })
    }

    /// Like [`Daemon::qblk`], but a daemon that exits before listening is
    /// an `Err` of its exit status and log, not a panic.
    pub fn try_qblk(dir: &Path, socket: &str, args: &[&str]) -> Result<Self, (ExitStatus, String)> {
        let mut full = vec!["serve", "--socket", socket];
        full.extend_from_slice(args);
        Self::try_spawn(qblk_bin(), &full, dir, socket)
    }

    /// Starts any program that listens on `socket` in `dir`.
    pub fn spawn(program: &Path, args: &[&str], dir: &Path, socket: &str) -> Self {
        Self::try_spawn(program, args, dir, socket).unwrap_or_else(|(status, log)| {
            panic!("daemon exited ({status}) before listening:\n{log}")
        })
    }

    fn try_spawn(
        program: &Path,
        args: &[&str],
        dir: &Path,
        socket: &str,
    ) -> Result<Self, (ExitStatus, String)> {
        let socket = dir.join(socket);
        let _ = std::fs::remove_file(&socket);
        let log = dir.join(format!(
            "{}.log",
            socket
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("daemon")
        ));
        let log_file = std::fs::File::create(&log).expect("create daemon log");
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut d = Self {
            child: Some(child),
            socket,
            log,
        };
        d.wait_for_socket()?;
        Ok(d)
    }

    fn wait_for_socket(&mut self) -> Result<(), (ExitStatus, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err((status, self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends `signal` (none if 0) and waits (at most 60 s) for the exit
    /// status.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().expect("wait for daemon") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 60 s) for the daemon to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        self.stop_with(0)
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ---\n{}--- end of daemon log ---",
                self.log()
            );
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The value of `name=N` in a daemon log (the closing engine counters).
pub fn log_counter(log: &str, name: &str) -> u64 {
    let at = log
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name} in {log}"));
    log[at + name.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("counter value")
}

/// A vhost-user-blk client: one blkio instance, its queues and a shared
/// memory region for buffers.
pub struct Client {
    blkio: Blkio,
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// Size of the client's buffer region.
pub const REGION_BYTES: usize = 64 << 20;

impl Client {
    /// Connects to `socket` with `queues` queues.
    pub fn connect(socket: &Path, queues: i32) -> Result<Self, blkio::Error> {
        Self::connect_with(socket, queues, false)
    }

    pub fn connect_with(socket: &Path, queues: i32, read_only: bool) -> Result<Self, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        let started = b.start()?;
        let region = b.alloc_mem_region(REGION_BYTES)?;
        b.map_mem_region(&region)?;
        Ok(Self {
            blkio: b,
            queues: started.queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect("property")
    }

    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio.get_u64(name).expect("property")
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio.get_bool(name).expect("property")
    }

    /// The shared buffer region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is REGION_BYTES of memory blkio mapped for us;
        // only this client touches it between requests.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Address of byte `at` of the region.
    pub fn ptr(&self, at: usize) -> *mut u8 {
        assert!(at <= self.region.len);
        (self.region.addr + at) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns (user_data, ret).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::with_capacity(n);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(60);
            let got = self.queues[q]
                .do_io(&mut completions[..want], want, Some(&mut timeout), None)
                .expect("do_io");
            assert!(got > 0, "no completion within 60 s");
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    /// One request on queue 0, waited for: the return value (0 or -errno).
    fn one(&mut self, submit: impl FnOnce(&mut Blkioq)) -> i32 {
        submit(&mut self.queues[0]);
        self.wait(0, 1)[0].1
    }

    /// Reads `len` bytes at `offset` into the region at `at`.
    pub fn read(&mut self, offset: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.one(|q| q.read(offset, p, len, 0, ReqFlags::empty()))
    }

    pub fn write(&mut self, offset: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.one(|q| q.write(offset, p, len, 0, ReqFlags::empty()))
    }

    pub fn flush(&mut self) -> i32 {
        self.one(|q| q.flush(0, ReqFlags::empty()))
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.one(|q| q.discard(offset, len, 0, ReqFlags::empty()))
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.one(|q| q.write_zeroes(offset, len, 0, flags))
    }

    /// Reads into a vector.
    pub fn read_vec(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let r = self.read(offset, 0, len);
        assert_eq!(r, 0, "read [{offset}, +{len}) failed: {r}");
        self.buf()[..len].to_vec()
    }

    /// Writes `data` (staged at the start of the region).
    pub fn write_all(&mut self, offset: u64, data: &[u8]) {
        self.buf()[..data.len()].copy_from_slice(data);
        let r = self.write(offset, 0, data.len());
        assert_eq!(r, 0, "write [{offset}, +{}) failed: {r}", data.len());
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
