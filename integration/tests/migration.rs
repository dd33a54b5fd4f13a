//! Live migration, daemon side: dirty-page logging (VHOST_F_LOG_ALL,
//! SET_LOG_BASE with LOG_SHMFD). While logging is on, every guest page
//! the daemon writes — data read from the disk, status bytes, the used
//! ring — is marked in the frontend's log before the completion is
//! published; off, nothing is.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use qblk_integration::rawq::{D, DATA, MEM_SIZE, RawFrontend, USED};
use qblk_integration::vhost::Daemon;
use qblk_integration::*;

const T_IN: u32 = 0;
const LOG_BYTES: u64 = (MEM_SIZE as u64) / 4096 / 8;

fn marked(log: &File) -> Vec<u64> {
    let mut bytes = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut bytes, 0).expect("read the log");
    let mut pages = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn clear(log: &File) {
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0)
        .expect("clear the log");
}

/// Reads 8 KiB from sector 8 into guest memory at `buf` (unaligned:
/// three pages), status at DATA + 64.
fn read(raw: &mut RawFrontend, buf: u64) {
    let status = DATA + 64;
    let h = raw.header(DATA, T_IN, 8);
    let (len, st) = raw.roundtrip(&[h, D(buf, 8192, true), D(status, 1, true)], status);
    assert_eq!((len, st), (8193, 0));
}

#[test]
fn with_logging_on_every_page_the_daemon_writes_is_marked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    create_qcow2(d, "l.qcow2", "16M");
    let mut daemon = Daemon::qblk(d, "l.sock", &["l.qcow2"]);
    let mut raw = RawFrontend::connect(&daemon.socket);
    let log = tempfile::tempfile().expect("log file");
    log.set_len(LOG_BYTES).expect("size the log");

    // Logging on: the data pages, the status byte's page and the used
    // ring's page are marked; what the daemon only reads is not.
    raw.set_logging(Some((&log, LOG_BYTES)), true);
    let buf = DATA + 0x21800;
    read(&mut raw, buf);
    let got = marked(&log);
    let data_pages: Vec<u64> = (buf / 4096..=(buf + 8191) / 4096).collect();
    for p in data_pages.iter().chain([&(DATA / 4096), &(USED / 4096)]) {
        assert!(got.contains(p), "page {p:#x} not marked: {got:x?}");
    }
    let written: Vec<u64> = data_pages
        .iter()
        .copied()
        .chain([DATA / 4096, USED / 4096])
        .collect();
    let extra: Vec<u64> = got
        .iter()
        .copied()
        .filter(|p| !written.contains(p))
        .collect();
    assert!(
        extra.is_empty(),
        "pages marked the daemon never wrote: {extra:x?}"
    );

    // Off: nothing is marked.
    clear(&log);
    raw.set_logging(None, false);
    read(&mut raw, DATA + 0x40000);
    assert_eq!(marked(&log), Vec::<u64>::new(), "marked with logging off");

    // On again, with the log handed over before.
    raw.set_logging(None, true);
    read(&mut raw, DATA + 0x50000);
    let got = marked(&log);
    assert!(
        got.contains(&(0x50000 / 4096 + DATA / 4096)),
        "{got:x?}\n{}",
        daemon.log()
    );
    drop(raw);
    std::thread::sleep(Duration::from_millis(50));
    assert!(daemon.stop().success(), "{}", daemon.log());
}
