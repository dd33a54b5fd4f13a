//! The `qblk` command: parses arguments and calls the library crates.
//! Only this file reads argv and decides exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use qblk_engine::check::RepairMode;
use qblk_tools::amend::{AMEND_OPTIONS, AmendRequest, amend};
use qblk_tools::bitmap::{BitmapRequest, bitmap};
use qblk_tools::check::{EXIT_UNSUPPORTED, check_image};
use qblk_tools::commit::{CommitRequest, commit};
use qblk_tools::compare::{CompareFailure, CompareRequest, Verdict, compare};
use qblk_tools::convert::{ConvertRequest, convert};
use qblk_tools::create::{CreateRequest, QCOW2_OPTIONS, RAW_OPTIONS, create};
use qblk_tools::image::ImageFormat;
use qblk_tools::info::{chain_to_human, chain_to_json, image_info, image_info_chain};
use qblk_tools::map::{self, map_image};
use qblk_tools::measure::{MeasureRequest, measure};
use qblk_tools::options::{parse_size, split_options};
use qblk_tools::rebase::{RebaseRequest, rebase};
use qblk_tools::resize::{NewSize, Preallocation, ResizeRequest, resize};
use qblk_tools::snapshot::{SnapshotOp, SnapshotRequest, snapshot};

#[derive(Parser, Debug)]
#[command(
    name = "qblk",
    version,
    about = "vhost-user-blk daemon and tools for qcow2 images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve IMAGE as a vhost-user-blk device on a unix socket until SIGTERM
    /// or SIGINT (then drain, flush and leave the image clean).
    #[command(after_help = "Attach from QEMU with\n  \
-chardev socket,id=qblk0,path=SOCKET -device vhost-user-blk-pci,chardev=qblk0,num-queues=N\n\
(guest RAM must be shared: -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem)\n\
and from cloud-hypervisor with --disk vhost_user=true,socket=SOCKET,num_queues=N.")]
    Serve {
        /// Unix socket to listen on (replaced if it exists, removed at
        /// exit). Under socket activation it only names the socket systemd
        /// passed, which is used instead.
        #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Serve on this inherited listening unix socket instead of binding
        /// one (QEMU's backend program conventions); it is never unlinked.
        #[arg(long, value_name = "FDNUM", conflicts_with = "socket")]
        fd: Option<i32>,
        /// Print the vhost-user backend capabilities as JSON (QEMU's
        /// vhost-user.json) and exit; needs no image.
        #[arg(long)]
        print_capabilities: bool,
        /// Image format. Never probed: a raw disk is served only when this
        /// says raw.
        #[arg(long, value_enum, default_value_t = ServeFormat::Qcow2)]
        format: ServeFormat,
        /// Export the disk read-only (the guest sees VIRTIO_BLK_F_RO).
        #[arg(long, visible_alias = "read-only")]
        readonly: bool,
        /// Serial number the guest reads with GET_ID (at most 20 bytes).
        #[arg(long, value_name = "ID")]
        serial: Option<String>,
        /// Host cache: `none` opens the image O_DIRECT (QEMU's cache=none),
        /// `writeback` goes through the host page cache.
        #[arg(long, value_enum, default_value_t = Cache::None)]
        cache: Cache,
        /// Metadata (L2 table) cache size, e.g. 64M; refcount blocks get a
        /// quarter of it on top. Default 32M, which maps 256 GiB of 64 KiB
        /// clusters.
        #[arg(long, value_name = "SIZE")]
        cache_size: Option<String>,
        /// Number of virtqueues.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Worker threads serving the queues (default: one per queue);
        /// queue i is served by thread i mod N, and a thread's queues share
        /// one io_uring.
        #[arg(long, value_name = "N")]
        threads: Option<u16>,
        /// Create IMAGE with this virtual size (default options) if it does
        /// not exist.
        #[arg(long, value_name = "SIZE")]
        create: Option<String>,
        /// A directory backing files may lie under, besides the image's
        /// own; may repeat.
        #[arg(long = "allow-backing-dir", value_name = "DIR")]
        allow_backing_dir: Vec<PathBuf>,
        /// File holding the passphrase of a LUKS-encrypted image.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// Register guest memory with io_uring while a frontend is
        /// connected: the kernel pins all of it once (faulting it in)
        /// instead of pinning each request's pages, which halves the CPU
        /// cost of large transfers. Needs CAP_IPC_LOCK or a memlock limit
        /// above guest RAM. Do not use when the VMM discards guest memory
        /// (virtio-balloon, virtio-mem, free page reporting): I/O would go
        /// to pages the guest no longer sees.
        #[arg(long)]
        pin_guest_memory: bool,
        /// QMP control socket (mode 0600): qemu-storage-daemon's commands
        /// for bitmaps and queries, usable with QEMU's QMP clients.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Serve Prometheus metrics at GET /metrics over HTTP on ADDR: a
        /// unix socket path (or unix:PATH; mode 0600) or a loopback
        /// address such as 127.0.0.1:9100 or `[::1]:9100` (port 0 picks a
        /// free port, logged). Other addresses are refused: the endpoint
        /// has no authentication.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        #[command(flatten)]
        nbd: Box<NbdArgs>,
        /// What a failed write, write-zeroes, discard or flush does, as
        /// QEMU's -drive werror: `report` fails it, `stop` holds it and
        /// stops the device until QMP `cont` retries it, `enospc` stops
        /// on a full file system and reports anything else.
        #[arg(long, value_name = "POLICY", default_value = "enospc",
              value_parser = |s: &str| qblk_serve::errors::OnError::parse(s, true))]
        werror: qblk_serve::errors::OnError,
        /// What a failed read does: `report` or `stop` (as --werror).
        #[arg(long, value_name = "POLICY", default_value = "report",
              value_parser = |s: &str| qblk_serve::errors::OnError::parse(s, false))]
        rerror: qblk_serve::errors::OnError,
        /// Start inactive: look at the image without holding it (no locks,
        /// no metadata kept) and answer the frontend, but let no guest
        /// request into the disk until `blockdev-set-active` on the control
        /// socket (needs --control) activates the daemon. The incoming
        /// side of a migration across hosts on shared storage (README).
        #[arg(long)]
        inactive: bool,
        /// I/O limits for the disk across all queues, QEMU's throttle-group
        /// names: bps-total, bps-read, bps-write, iops-total, iops-read,
        /// iops-write (each also -max for a burst rate and -max-length for
        /// its seconds), iops-size; e.g. `iops-total=500,bps-write=50M`.
        /// Changed live by QMP `block_set_io_throttle`.
        #[arg(long, value_name = "LIMITS", default_value = "",
              value_parser = |s: &str| qblk_serve::throttle::Config::parse(s).map(Box::new))]
        throttle: Box<qblk_serve::throttle::Config>,
        /// Write the daemon's pid to PATH once it is ready, keep the file
        /// locked while it runs and remove it at exit; refuse to start if a
        /// live process holds it.
        #[arg(long, value_name = "PATH")]
        pidfile: Option<PathBuf>,
        /// Owner of the vhost-user socket: USER, USER:GROUP or :GROUP
        /// (names or numeric ids).
        #[arg(long, value_name = "USER[:GROUP]")]
        socket_owner: Option<String>,
        /// Permission bits of the vhost-user socket, in octal (e.g. 0660).
        #[arg(long, value_name = "MODE")]
        socket_mode: Option<String>,
        /// Log level (error, warn, info, debug, trace) or a tracing filter.
        #[arg(long, value_name = "LEVEL", default_value = "info")]
        log_level: String,
        /// Log lines as text (default) or as one JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Image file (QEMU's conventions: --blk-file PATH).
        #[arg(long = "blk-file", value_name = "PATH", conflicts_with = "image")]
        blk_file: Option<PathBuf>,
        /// Image file.
        image: Option<PathBuf>,
    },
    /// Drive a vhost-user-blk socket (qblk's, qemu-storage-daemon's, any)
    /// without a VM and report IOPS, bandwidth and latency percentiles.
    Bench {
        /// The daemon's unix socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// randread, randwrite, read, write or randrw (half and half).
        #[arg(long, default_value = "randread")]
        rw: String,
        /// Request size (K, M suffixes; a multiple of 512).
        #[arg(long, default_value = "4k")]
        bs: String,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 32)]
        iodepth: usize,
        /// Queues (one client thread each).
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// How long to run: 10s, 500ms, 2m, or seconds.
        #[arg(long, default_value = "10s")]
        runtime: String,
        /// Use only the first SIZE bytes of the disk (default: all).
        #[arg(long, value_name = "SIZE")]
        span: Option<String>,
        /// Random offsets are multiples of SIZE (default: --bs), each
        /// visited once before any repeats; `--stride 64k` on an empty
        /// image makes every write allocate a cluster.
        #[arg(long, value_name = "SIZE")]
        stride: Option<String>,
        /// The commit pattern of databases and file systems: writes in
        /// batches of N, each batch followed by a flush once it completed
        /// (1: write, flush, write, flush); --iodepth does not apply.
        /// Reports flush latency too.
        #[arg(long, value_name = "N")]
        fsync_every: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove, clear, enable, disable or merge persistent dirty
    /// bitmaps (qemu-img bitmap's options; operations run in order).
    #[command(
        override_usage = "qblk bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP",
        disable_help_flag = true
    )]
    Bitmap {
        /// Operations, options, FILENAME and BITMAP, as for qemu-img bitmap.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// List, create, apply or delete internal snapshots (qemu-img
    /// snapshot's options; listing is the default).
    Snapshot {
        /// List the snapshots.
        #[arg(short = 'l')]
        list: bool,
        /// Revert the disk to snapshot ID or NAME.
        #[arg(short = 'a', value_name = "SNAPSHOT")]
        apply: Option<String>,
        /// Create snapshot NAME.
        #[arg(short = 'c', value_name = "SNAPSHOT")]
        create: Option<String>,
        /// Delete snapshot NAME.
        #[arg(short = 'd', value_name = "SNAPSHOT")]
        delete: Option<String>,
        /// Image format (qcow2; raw images have no snapshots).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Quiet (nothing is printed but the list).
        #[arg(short = 'q')]
        quiet: bool,
        /// Open an image in use by another program (listing only).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Change format options of an existing qcow2 image (qemu-img
    /// amend): compat, lazy_refcounts, refcount_bits, data_file,
    /// data_file_raw, size.
    Amend {
        /// Options, comma separated; may repeat. `-o help` lists them.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Image format (qcow2).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Show progress (accepted for qemu-img compatibility).
        #[arg(short = 'p')]
        progress: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Send one QMP command to a daemon's control socket (`serve
    /// --control`) and print the result.
    #[command(
        after_help = "Values that read as JSON (numbers, true, false, arrays, objects) are sent as JSON, others as strings; a single JSON object is taken as the arguments.\nExample: qblk ctl /run/qblk/vm1.qmp block-dirty-bitmap-add node=disk name=backup persistent=true"
    )]
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// The command, e.g. query-blockstats.
        command: String,
        /// Arguments: KEY=VALUE ..., or one JSON object.
        args: Vec<String>,
    },
    /// Create a new image (qemu-img create's options and defaults).
    #[command(
        after_help = "OPTIONS for qcow2 (-o): cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2, \
compression_type, backing_file, backing_fmt, data_file, data_file_raw, preallocation, size, \
encrypt.format=luks (with --key-file), encrypt.cipher-alg, encrypt.cipher-mode, encrypt.ivgen-alg, \
encrypt.ivgen-hash-alg, encrypt.hash-alg, encrypt.iter-time. \
Use -o help for descriptions.\nSIZE takes K, M, G, T, P and E suffixes (powers of 1024)."
    )]
    Create {
        /// Image format to create.
        #[arg(short = 'f', value_name = "FMT", default_value = "qcow2")]
        format: String,
        /// Format options, comma separated (`,,` is a literal comma); may repeat.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Backing file (same as -o backing_file=).
        #[arg(short = 'b', value_name = "BACKING_FILE")]
        backing_file: Option<String>,
        /// Backing file format (same as -o backing_fmt=).
        #[arg(short = 'F', value_name = "BACKING_FMT")]
        backing_format: Option<String>,
        /// Do not open the backing file (SIZE is then required).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// File holding the passphrase of the new image when
        /// `-o encrypt.format=luks` encrypts it; its bytes are the
        /// passphrase, as in a QEMU secret file.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// Do not print the "Formatting ..." line.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file to create (replaced if it exists, as with qemu-img).
        image: Option<PathBuf>,
        /// Virtual size, e.g. 10G. Optional with a backing file.
        size: Option<String>,
    },
    /// Check an image's consistency (qemu-img check's findings and exit
    /// codes: 0 clean, 2 corruption, 3 leaks only, 1 check failed, 63 format
    /// without checks).
    Check {
        /// Image format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Do not print the summary (findings still go to stderr).
        #[arg(short = 'q')]
        quiet: bool,
        /// Repair: `leaks` lowers leaked refcounts; `all` rebuilds the
        /// refcount structure and the COPIED flags from the references.
        #[arg(short = 'r', value_enum)]
        repair: Option<Repair>,
        /// Share the image with every other user, even a writer (qemu-img's
        /// -U): read-only; what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Copy an image's contents into a new raw or qcow2 image (sparse,
    /// optionally compressed), like qemu-img convert.
    Convert {
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Write compressed clusters (qcow2 target; the target's
        /// compression_type decides zlib or zstd).
        #[arg(short = 'c')]
        compress: bool,
        /// Source format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Target format.
        #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
        output_format: String,
        /// Target image options (as for create), comma separated; may repeat.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Zero runs of at least this many bytes are not written (0: write
        /// everything).
        #[arg(short = 'S', value_name = "SPARSE_SIZE", default_value = "4k")]
        sparse: String,
        /// Do not print anything.
        #[arg(short = 'q')]
        quiet: bool,
        /// File holding the passphrase of an encrypted (LUKS) source; its
        /// bytes are the passphrase, as in a QEMU secret file.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// File holding the passphrase of the target when
        /// `-o encrypt.format=luks` encrypts it.
        #[arg(long, value_name = "PATH")]
        target_key_file: Option<PathBuf>,
        /// Share the source with every other user, even a writer (qemu-img's
        /// -U): read-only; what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Compare the contents of two images, through their backing chains
    /// (qemu-img compare: exit 0 identical, 1 different, 2 an image could
    /// not be opened, 3 block status failed, 4 a read failed).
    Compare {
        /// Format of the first image; probed when omitted.
        #[arg(short = 'f', value_name = "FMT")]
        first_format: Option<String>,
        /// Format of the second image; probed when omitted.
        #[arg(short = 'F', value_name = "FMT")]
        second_format: Option<String>,
        /// Strict: images that differ in size or allocation are different
        /// even if they read the same.
        #[arg(short = 's')]
        strict: bool,
        /// Share the images with every other user, even a writer
        /// (qemu-img's -U): what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Print nothing on stdout (the exit code tells).
        #[arg(short = 'q')]
        quiet: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        first: PathBuf,
        second: PathBuf,
    },
    /// How large a new image would be: empty of --size bytes, or a copy
    /// of SRC (qemu-img measure's figures).
    Measure {
        /// Measure an empty image of this size (K, M, G, T, P, E suffixes).
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        /// Source format; probed when omitted.
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Target format.
        #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
        output_format: String,
        /// Target image options (as for create), comma separated; may repeat.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Share the source with every other user, even a writer (qemu-img's
        /// -U): what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Source image.
        src: Option<PathBuf>,
    },
    /// Show where each guest range lives (qemu-img map's output).
    Map {
        /// Image format; probed when omitted.
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Share the image with every other user, even a writer (qemu-img's
        /// -U): read-only; what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Show what an image is (qemu-img info's fields and JSON names).
    Info {
        /// Image format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Describe every image of the backing chain in turn (JSON: an
        /// array).
        #[arg(long)]
        backing_chain: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Share the image with every other user, even a writer (qemu-img's
        /// -U): read-only; what is read may be changing underneath.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Change the backing file an image names (qemu-img rebase). Safe mode
    /// copies into IMAGE what differs between the old and the new backing
    /// chain, so the guest sees the same disk; -u only rewrites the header.
    Rebase {
        /// Image format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// The new backing file, as it is to be recorded (relative names
        /// are relative to IMAGE's directory); "" (or no -b with -u)
        /// removes it.
        #[arg(short = 'b', value_name = "BACKING_FILE")]
        backing: Option<String>,
        /// The new backing file's format (qcow2 or raw).
        #[arg(short = 'F', value_name = "BACKING_FMT")]
        backing_format: Option<String>,
        /// Unsafe mode: rewrite the header only, copy nothing.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        /// Share the backing files with every other user, even a writer.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Do not print anything.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Commit an image's data into its backing file (qemu-img commit); the
    /// image is emptied afterwards unless -d or -b.
    Commit {
        /// Image format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Commit into this image of the backing chain instead of the
        /// immediate backing file (implies -d).
        #[arg(short = 'b', value_name = "BASE")]
        base: Option<PathBuf>,
        /// Do not empty IMAGE afterwards.
        #[arg(short = 'd')]
        keep: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Do not print anything.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        image: PathBuf,
    },
    /// Grow or shrink an image's virtual disk (qemu-img resize's options,
    /// messages and exit codes).
    Resize {
        /// Image format; probed when omitted (qcow2 magic, else raw).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Allow a smaller size (what lies past the new end is lost).
        #[arg(long)]
        shrink: bool,
        /// Preallocate the new space: off, metadata (clusters mapped, file
        /// sparse), falloc (file blocks allocated too) or full (zeros
        /// written).
        #[arg(long, value_name = "MODE")]
        preallocation: Option<String>,
        /// Do not print "Image resized.".
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        image: PathBuf,
        /// New size, or +SIZE / -SIZE relative to the current one (use
        /// `--` before a negative one, as with qemu-img).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ServeFormat {
    Qcow2,
    Raw,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Cache {
    None,
    Writeback,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Repair {
    Leaks,
    All,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

fn main() -> ExitCode {
    // systemd's socket activation variables are taken (and removed from
    // the environment) before any thread exists.
    // SAFETY: no other thread has been started yet.
    let activation = unsafe { qblk_serve::orchestration::take_socket_activation() };
    let cli = Cli::parse();
    if let Command::Serve { .. } = cli.command {
        if let Err(e) = &activation {
            eprintln!("qblk: {}", error_chain(e));
            return ExitCode::FAILURE;
        }
    }
    let activation = activation.unwrap_or_default();
    match run(cli, activation) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qblk: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// "outer: cause: root cause".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// qemu-img's progress line, redrawn in place on stderr.
fn print_progress(done: u64, total: u64) {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    eprint!("    ({pct:.2}/100%)\r");
}

/// `qblk serve`'s NBD server and its TLS credentials.
#[derive(Debug, clap::Args)]
struct NbdArgs {
    /// Start an NBD server on ADDR (`unix:PATH`, mode 0600, or
    /// HOST:PORT on an address you name; TLS with --nbd-tls-creds):
    /// QMP block-export-add then exports point-in-time snapshots of
    /// the disk, read-only, with dirty-bitmap block status.
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Require TLS on --nbd's server with the credentials of
    /// `--object tls-creds-x509,id=ID,...` (QMP nbd-server-start takes
    /// the same ID as "tls-creds").
    #[arg(long, value_name = "ID")]
    nbd_tls_creds: Option<String>,
    /// TLS credentials as QEMU's -object:
    /// `tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]`;
    /// DIR holds ca-cert.pem, server-cert.pem and server-key.pem.
    /// verify-peer=on (the default) admits only clients whose
    /// certificate ca-cert.pem signed. May be repeated.
    #[arg(long, value_name = "OBJECT",
          value_parser = |s: &str| qblk_serve::nbd::tls::CredsSpec::parse(s))]
    object: Vec<qblk_serve::nbd::tls::CredsSpec>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The passphrase in a key file: its bytes, as QEMU reads a secret file.
fn read_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read key file: {e}", path.display()))
}

/// "10s", "500ms", "2m" or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("bad duration '{s}': use e.g. 10s, 500ms, 2m");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    if !(secs > 0.0 && secs < 86400.0) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// qemu-img's progress line, on stderr.
fn show_progress(show: bool, done: u64, total: u64) {
    if show {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        eprint!("    ({pct:.2}/100%)\r");
    }
}

/// A size for resize, with qemu-img's message when it is not one.
fn parse_resize_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|_| {
        "Parameter 'size' expects a non-negative number below 2^64\n\
Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
and exabytes, respectively."
            .to_owned()
    })
}

fn run(cli: Cli, activation: qblk_serve::orchestration::Activation) -> Result<ExitCode, BoxError> {
    match cli.command {
        Command::Bench {
            socket,
            rw,
            bs,
            iodepth,
            queues,
            runtime,
            span,
            stride,
            fsync_every,
            json,
        } => {
            let opts = qblk_bench::BenchOptions {
                socket,
                rw: qblk_bench::Rw::parse(&rw).ok_or_else(|| {
                    format!("--rw '{rw}': use randread, randwrite, read, write or randrw")
                })?,
                bs: parse_size(&bs)?,
                iodepth,
                queues,
                runtime: parse_duration(&runtime)?,
                span: span.as_deref().map(parse_size).transpose()?,
                stride: stride.as_deref().map(parse_size).transpose()?,
                fsync_every,
                progress: true,
            };
            let result = qblk_bench::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!("{}", result.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            socket,
            fd,
            print_capabilities,
            format,
            readonly,
            serial,
            cache,
            cache_size,
            queues,
            threads,
            create,
            allow_backing_dir,
            key_file,
            pin_guest_memory,
            control,
            metrics,
            nbd,
            werror,
            rerror,
            inactive,
            throttle,
            pidfile,
            socket_owner,
            socket_mode,
            log_level,
            log_format,
            blk_file,
            image,
        } => {
            use qblk_serve::orchestration as orch;
            if print_capabilities {
                // QEMU's conventions: other options are ignored.
                println!("{}", orch::CAPABILITIES);
                return Ok(ExitCode::SUCCESS);
            }
            let filter = tracing_subscriber::EnvFilter::try_new(&log_level)
                .map_err(|e| format!("--log-level '{log_level}': {e}"))?;
            let logs = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            match log_format {
                LogFormat::Text => logs
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .init(),
                // One object per line, the message and fields at the top
                // level beside timestamp, level and target.
                LogFormat::Json => logs.json().flatten_event(true).init(),
            }
            let image = image
                .or(blk_file)
                .ok_or("no image: give IMAGE or --blk-file PATH")?;
            let socket = match (fd, activation.vhost_user, socket) {
                (Some(_), Some(_), _) => {
                    return Err(
                        "--fd and socket activation (LISTEN_FDS) both give the vhost-user socket"
                            .into(),
                    );
                }
                (Some(fd), None, _) => {
                    orch::ListenOn::Inherited(orch::inherit_listener(fd, orch::Origin::FdOption)?)
                }
                (None, Some(passed), _) => orch::ListenOn::Inherited(passed),
                (None, None, Some(path)) => orch::ListenOn::Path(path),
                (None, None, None) => {
                    return Err("no vhost-user socket: give --socket PATH or --fd FDNUM, or start qblk through socket activation".into());
                }
            };
            let control = match (activation.control, control) {
                (Some(passed), _) => Some(orch::ListenOn::Inherited(passed)),
                (None, path) => path.map(orch::ListenOn::Path),
            };
            let service = orch::ServiceOptions {
                pidfile,
                socket_owner: socket_owner
                    .as_deref()
                    .map(orch::parse_socket_owner)
                    .transpose()?,
                socket_mode: socket_mode
                    .as_deref()
                    .map(orch::parse_socket_mode)
                    .transpose()?,
            };
            let key = key_file.as_deref().map(read_key).transpose()?;
            let opts = qblk_serve::ServeOptions {
                socket,
                image,
                format: match format {
                    ServeFormat::Qcow2 => qblk_serve::Format::Qcow2,
                    ServeFormat::Raw => qblk_serve::Format::Raw,
                },
                readonly,
                serial,
                cache: match cache {
                    Cache::None => qblk_engine::file::CacheMode::None,
                    Cache::Writeback => qblk_engine::file::CacheMode::Writeback,
                },
                cache_size: cache_size.as_deref().map(parse_size).transpose()?,
                queues,
                threads,
                create: create.as_deref().map(parse_size).transpose()?,
                backing_dirs: allow_backing_dir,
                key,
                pin_guest_memory,
                control,
                metrics: metrics
                    .as_deref()
                    .map(qblk_serve::metrics::MetricsAddr::parse)
                    .transpose()?,
                nbd: nbd
                    .nbd
                    .as_deref()
                    .map(qblk_serve::nbd::NbdAddr::parse)
                    .transpose()
                    .map_err(|e| format!("--nbd: {e}"))?,
                objects: nbd.object,
                nbd_tls_creds: nbd.nbd_tls_creds,
                werror,
                rerror,
                inactive,
                throttle: *throttle,
                service,
            };
            qblk_serve::serve(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Create {
            format,
            options,
            backing_file,
            backing_format,
            unsafe_backing,
            key_file,
            quiet,
            image,
            size,
        } => {
            let format = ImageFormat::parse(&format)?;
            let mut parsed = Vec::new();
            for o in &options {
                parsed.extend(split_options(o)?);
            }
            if parsed.iter().any(|(k, _)| k == "help" || k == "?") {
                let list = match format {
                    ImageFormat::Qcow2 => QCOW2_OPTIONS,
                    ImageFormat::Raw => RAW_OPTIONS,
                };
                println!("Supported {} options:", format.name());
                for (name, help) in list {
                    println!("  {name:<18} {help}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let image = image.ok_or("create needs an IMAGE argument")?;
            let req = CreateRequest {
                path: image,
                format: Some(format),
                size: size.as_deref().map(parse_size).transpose()?,
                options: parsed,
                backing_file,
                backing_format,
                unsafe_backing,
                key: key_file.as_deref().map(read_key).transpose()?,
            };
            let created = create(&req)?;
            if !quiet {
                println!("{}", created.describe(&req.path));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            format,
            output,
            quiet,
            repair,
            force_share,
            image,
        } => {
            let format = format.as_deref().map(ImageFormat::parse).transpose()?;
            let repair = repair.map(|r| match r {
                Repair::Leaks => RepairMode::Leaks,
                Repair::All => RepairMode::All,
            });
            let checked = match check_image(&image, format, repair, force_share) {
                Err(qblk_tools::Error::RepairRefused { path, messages }) => {
                    // qemu-img's findings, then why nothing was repaired.
                    for m in &messages {
                        eprintln!("{m}");
                    }
                    eprintln!("ERROR need to rebuild refcount structures");
                    return Err(qblk_tools::Error::RepairRefused {
                        path,
                        messages: Vec::new(),
                    }
                    .into());
                }
                other => other?,
            };
            let Some(checked) = checked else {
                eprintln!(
                    "qblk: {}: this image format does not support checks",
                    image.display()
                );
                return Ok(ExitCode::from(EXIT_UNSUPPORTED));
            };
            if let Some(before) = &checked.repaired_from {
                for m in &before.messages {
                    eprintln!("{m}");
                }
            }
            for m in &checked.report.messages {
                eprintln!("{m}");
            }
            if !quiet {
                match output {
                    Output::Json => println!("{}", checked.to_json()),
                    Output::Human => print!("{}", checked.to_human()),
                }
            }
            Ok(ExitCode::from(checked.exit_code()))
        }
        Command::Convert {
            progress,
            compress,
            format,
            output_format,
            options,
            sparse,
            quiet,
            key_file,
            target_key_file,
            force_share,
            src,
            dst,
        } => {
            let src_key = key_file.as_deref().map(read_key).transpose()?;
            let dst_key = target_key_file.as_deref().map(read_key).transpose()?;
            let mut parsed = Vec::new();
            for o in &options {
                parsed.extend(split_options(o)?);
            }
            let req = ConvertRequest {
                src,
                src_format: format.as_deref().map(ImageFormat::parse).transpose()?,
                dst,
                dst_format: ImageFormat::parse(&output_format)?,
                options: parsed,
                compress,
                min_sparse: parse_size(&sparse)?,
                src_key,
                src_force_share: force_share,
                dst_key,
            };
            let show = progress && !quiet;
            convert(&req, |done, total| {
                if show {
                    print_progress(done, total);
                }
            })?;
            if show {
                eprintln!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            first_format,
            second_format,
            strict,
            force_share,
            quiet,
            progress,
            first,
            second,
        } => {
            // A format qblk does not read is an image it cannot open (2).
            let parsed = (
                first_format.as_deref().map(ImageFormat::parse).transpose(),
                second_format.as_deref().map(ImageFormat::parse).transpose(),
            );
            let (first_format, second_format) = match parsed {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("qblk: {}", error_chain(&e));
                    return Ok(ExitCode::from(2));
                }
            };
            let req = CompareRequest {
                first,
                first_format,
                second,
                second_format,
                strict,
                force_share,
            };
            let show = progress && !quiet;
            let compared = compare(&req, |done, total| {
                if show {
                    print_progress(done, total);
                }
            });
            if show {
                eprintln!();
            }
            if !quiet {
                for m in &compared.messages {
                    println!("{m}");
                }
            }
            // qemu-img compare's exit codes.
            let code = match &compared.outcome {
                Ok(Verdict::Identical) => 0,
                Ok(Verdict::Different) => 1,
                Err(failure) => {
                    eprintln!("qblk: {}", error_chain(failure.error()));
                    match failure {
                        CompareFailure::Open(_) => 2,
                        CompareFailure::Status(_) => 3,
                        CompareFailure::Read(_) => 4,
                    }
                }
            };
            Ok(ExitCode::from(code))
        }
        Command::Measure {
            size,
            format,
            output_format,
            options,
            output,
            force_share,
            src,
        } => {
            let mut parsed = Vec::new();
            for o in &options {
                parsed.extend(split_options(o)?);
            }
            let req = MeasureRequest {
                size: size.as_deref().map(parse_size).transpose()?,
                source: src,
                source_format: format.as_deref().map(ImageFormat::parse).transpose()?,
                target_format: ImageFormat::parse(&output_format)?,
                options: parsed,
                force_share,
            };
            let m = measure(&req)?;
            match output {
                Output::Json => println!("{}", m.to_json()),
                Output::Human => print!("{}", m.to_human()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Map {
            format,
            output,
            force_share,
            image,
        } => {
            let format = format.as_deref().map(ImageFormat::parse).transpose()?;
            let entries = map_image(&image, format, force_share)?;
            match output {
                Output::Json => println!("{}", map::to_json(&entries)),
                Output::Human => match map::to_human(&entries) {
                    Ok(table) => print!("{table}"),
                    Err((head, e)) => {
                        print!("{head}");
                        return Err(e.into());
                    }
                },
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot {
            list,
            apply,
            create,
            delete,
            format,
            quiet: _,
            force_share,
            image,
        } => {
            let chosen = usize::from(list)
                + usize::from(apply.is_some())
                + usize::from(create.is_some())
                + usize::from(delete.is_some());
            if chosen > 1 {
                return Err("Cannot mix '-l', '-a', '-c', '-d'".into());
            }
            let op = match (apply, create, delete) {
                (Some(n), _, _) => SnapshotOp::Apply(n),
                (_, Some(n), _) => SnapshotOp::Create(n),
                (_, _, Some(n)) => SnapshotOp::Delete(n),
                _ => SnapshotOp::List,
            };
            let req = SnapshotRequest {
                image,
                format: format.as_deref().map(ImageFormat::parse).transpose()?,
                op,
                force_share,
            };
            print!("{}", snapshot(&req)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Amend {
            options,
            format,
            quiet: _,
            progress: _,
            image,
        } => {
            let mut parsed = Vec::new();
            for o in &options {
                parsed.extend(split_options(o)?);
            }
            if parsed.iter().any(|(k, _)| k == "help" || k == "?") {
                println!("Amend options for 'qcow2':");
                for (name, help) in AMEND_OPTIONS {
                    println!("  {name:<22} - {help}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let req = AmendRequest {
                image,
                format: format.as_deref().map(ImageFormat::parse).transpose()?,
                options: parsed,
            };
            amend(&req)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl {
            socket,
            command,
            args,
        } => {
            let args = qblk_tools::ctl::arguments(&args)?;
            let result = qblk_tools::ctl::execute(&socket, &command, args)?;
            print!("{}", qblk_tools::ctl::render(&result));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bitmap { args } => {
            let req = BitmapRequest::parse(&args)?;
            bitmap(&req)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebase {
            format,
            backing,
            backing_format,
            unsafe_mode,
            force_share,
            progress,
            quiet,
            image,
        } => {
            // Like qemu-img: unsafe mode without -b removes the backing file.
            let backing = match backing {
                Some(b) => b,
                None if unsafe_mode => String::new(),
                None => {
                    return Err("Must specify backing file (-b) or use unsafe mode (-u)".into());
                }
            };
            let req = RebaseRequest {
                path: image,
                format: format.as_deref().map(ImageFormat::parse).transpose()?,
                backing,
                backing_format,
                unsafe_mode,
                force_share,
            };
            let show = progress && !quiet;
            rebase(&req, |done, total| show_progress(show, done, total))?;
            if show {
                eprintln!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Commit {
            format,
            base,
            keep,
            progress,
            quiet,
            image,
        } => {
            let req = CommitRequest {
                path: image,
                format: format.as_deref().map(ImageFormat::parse).transpose()?,
                base,
                keep_top: keep,
            };
            let show = progress && !quiet;
            commit(&req, |done, total| show_progress(show, done, total))?;
            if show {
                eprintln!();
            }
            if !quiet {
                println!("Image committed.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resize {
            format,
            shrink,
            preallocation,
            quiet,
            image,
            size,
        } => {
            let size = match size.as_bytes().first() {
                Some(b'+') => NewSize::Grow(parse_resize_size(&size[1..])?),
                Some(b'-') => NewSize::Shrink(parse_resize_size(&size[1..])?),
                _ => NewSize::Absolute(parse_resize_size(&size)?),
            };
            let req = ResizeRequest {
                path: image,
                format: format.as_deref().map(ImageFormat::parse).transpose()?,
                size,
                shrink,
                preallocation: preallocation
                    .as_deref()
                    .map(Preallocation::parse)
                    .transpose()?,
            };
            resize(&req)?;
            if !quiet {
                println!("Image resized.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Info {
            format,
            backing_chain,
            output,
            force_share,
            image,
        } => {
            let format = format.as_deref().map(ImageFormat::parse).transpose()?;
            if backing_chain {
                let chain = image_info_chain(&image, format, force_share)?;
                match output {
                    Output::Json => println!("{}", chain_to_json(&chain)),
                    Output::Human => print!("{}", chain_to_human(&chain)),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let info = image_info(&image, format, force_share)?;
            match output {
                Output::Json => println!("{}", info.to_json()),
                Output::Human => print!("{}", info.to_human()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
