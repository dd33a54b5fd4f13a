//! The crash journal: where the metadata of acknowledged writes survives a
//! daemon crash.
//!
//! # What it is for
//!
//! A write is acknowledged when its data is in the kernel and its L2 entry
//! is in this process's memory; the tables reach the file with the next
//! writeback (at the guest's flush, or when enough is dirty). A power cut
//! may take such writes: the guest did not flush, that is the contract of
//! a volatile write cache. A *process* crash (kill -9, a panic, the OOM
//! killer) must not: the guest saw no power cut and its disk stays
//! attached while the daemon restarts. So every change to an L1 or L2 table
//! is also stored, as it is made, into this journal: a file next to the
//! image, mapped shared, so a store is a write into the page cache — no
//! system call, and it survives the process the moment it is made. Nothing
//! ever syncs it: a power cut loses it, and a journal from another boot is
//! never replayed.
//!
//! # Layout
//!
//! The file (`.<image name>.qblk-journal` beside the image) is a 4 KiB
//! header — magic, the boot id, the stamp (16 bytes, of which the 31 bits
//! the image's header holds are used), the ring's capacity, the
//! checkpoint — then a ring of 32-byte records: sequence number, address
//! (with the kind in its low bits), value, check. Record `n` lives in slot
//! `n % capacity`. The check (a hash of the other fields and the stamp) is
//! stored last, so a record the process died in the middle of, or a
//! record from another incarnation, never counts. Numbers are in the
//! machine's byte order: a journal is only ever read on the machine and in
//! the boot that wrote it.
//!
//! Kinds: an L2 table word (its host offset; extended L2 entries are two
//! words), a new L2 table (zeros over the cluster, before its words), a
//! copy of an L2 table shared with a snapshot (the new table's offset and
//! the old one's, whose content the copy starts from: one record, where
//! its words would be up to 8192 — after a snapshot, every table's first
//! write copies it), and an L1 entry (by index, so a resize that moved the L1 table in memory
//! but not yet on disk cannot misdirect it). Refcounts are not journaled:
//! a replay rebuilds them from the tables (see below).
//!
//! # Checkpoints and space
//!
//! Records are appended under the allocator lock, in the step that makes
//! the change, so every record numbered up to the sequence a writeback's
//! snapshot reads (under the same lock) describes a change the snapshot
//! holds. When that writeback has committed, the checkpoint moves to it
//! and those slots may be reused. Half a ring of unchecked records asks
//! for a writeback; a full ring drops records, and then every record after
//! (one replayed without an earlier one could not be trusted), and every
//! write waits for a writeback before it is acknowledged, until a
//! checkpoint passes the last dropped record.
//!
//! # Whether a journal may be replayed
//!
//! While the journal is live the image's header says so in its autoclear
//! field: bit 63 set, and bits 32-62 the journal's stamp (31 random bits
//! chosen at each open); a clean close clears them and removes the file.
//! Autoclear bits are the qcow2 format's own answer to "did a program that
//! does not know this feature write the image?": every writer that does
//! not know a bit — every QEMU tool — clears it before writing, so an
//! image changed after the crash is recognised, and an older copy of the
//! image put back has another stamp. The field is one 8-byte word in the
//! header's first sector: setting it moves nothing, and no write of it can
//! be torn. A journal is replayed only if bit 63 is still set, the stamps
//! match, and it was written in this boot
//! (`/proc/sys/kernel/random/boot_id`). Only a writer that holds the
//! image's write lock opens the journal, so the image's locks cover it.
//!
//! # Replay
//!
//! Before anything else opens the image for writing: the data already in
//! the file is made durable, the dirty bit is set durably, the L2 tables
//! the records touch are written with them applied, then the L1 table —
//! each step durable before the next — after which the open that follows
//! rebuilds the refcounts from the tables, as for any dirty image (this
//! also frees what the crashed daemon had allocated but not yet mapped,
//! and finishes the releases it had deferred). Applying final values
//! twice is harmless, so a crash during replay just replays again.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};

use qblk_qcow2::Header;
use qblk_qcow2::header::{AutoclearFeatures, IncompatibleFeatures};
use tracing::{info, warn};

use crate::buf::AlignedBuf;
use crate::commit::{Commit, Edge, End, header_buf};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::shm::{SharedMap, boot_id};

const MAGIC: &[u8; 8] = b"QBLKJRN1";
/// Header: magic, boot id, stamp, capacity, checkpoint.
const HEADER_LEN: usize = 4096;
const OFF_BOOT: usize = 8;
const OFF_STAMP: usize = 24;
const OFF_CAPACITY: usize = 40;
const OFF_CHECKPOINT: usize = 48;
const RECORD: usize = 32;
/// Records in the ring: 8 MiB of them.
pub(crate) const DEFAULT_CAPACITY: u64 = (8 << 20) / RECORD as u64;

const KIND_MASK: u64 = 7;
const KIND_L2_WORD: u64 = 0;
const KIND_L2_NEW: u64 = 1;
const KIND_L1: u64 = 2;
const KIND_L2_COPY: u64 = 3;

/// The journal file of the image at `image`.
pub fn sidecar(image: &Path) -> PathBuf {
    crate::shm::sidecar_path(image, "qblk-journal")
}

/// A fresh stamp: 31 random bits (what the header has room for), the
/// rest of the 16 bytes zero.
fn random_stamp() -> io::Result<[u8; 16]> {
    let mut r = [0u8; 4];
    // SAFETY: getrandom(2) writes at most `r.len()` bytes into `r`.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if n != r.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let mut s = [0u8; 16];
    s[..4].copy_from_slice(&(u32::from_ne_bytes(r) & 0x7fff_ffff).to_ne_bytes());
    Ok(s)
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn stamp_key(stamp: &[u8; 16]) -> u64 {
    let (a, b) = stamp.split_at(8);
    mix(u64::from_ne_bytes(a.try_into().expect("8 bytes")))
        ^ mix(u64::from_ne_bytes(b.try_into().expect("8 bytes")) ^ 0x6a6f_7572)
}

fn check(key: u64, seq: u64, addr: u64, value: u64) -> u64 {
    mix(key ^ mix(seq ^ mix(addr ^ mix(value))))
}

/// The live journal of an image open for writing (held in the allocator
/// state: every method runs under the allocator lock).
pub(crate) struct Journal {
    path: PathBuf,
    /// The shared mapping of the whole file.
    map: SharedMap,
    key: u64,
    capacity: u64,
    /// The last record's sequence number.
    seq: u64,
    /// Records up to this one are in a committed writeback.
    checkpoint: u64,
    /// The last record that was dropped (no room): until a checkpoint
    /// passes it, every record is dropped and every write commits.
    dropped_upto: u64,
    #[cfg(feature = "fault-injection")]
    rec: Option<std::sync::Arc<crate::fault::Recorder>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("seq", &self.seq)
            .field("checkpoint", &self.checkpoint)
            .field("dropped_upto", &self.dropped_upto)
            .finish()
    }
}

impl Journal {
    /// Creates (or empties) the journal of `image` with a fresh stamp.
    pub(crate) fn create(image: &Path, capacity: u64) -> io::Result<(Self, [u8; 16])> {
        let boot = boot_id()?;
        let stamp = random_stamp()?;
        let path = sidecar(image);
        let len = HEADER_LEN + capacity as usize * RECORD;
        let map = SharedMap::create(&path, len)?;
        let mut j = Journal {
            path,
            map,
            key: stamp_key(&stamp),
            capacity,
            seq: 0,
            checkpoint: 0,
            dropped_upto: 0,
            #[cfg(feature = "fault-injection")]
            rec: crate::fault::Recorder::for_path(image),
        };
        #[cfg(feature = "fault-injection")]
        if let Some(r) = &j.rec {
            r.journal_created(len);
        }
        let mut head = [0u8; 56];
        head[..8].copy_from_slice(MAGIC);
        head[OFF_BOOT..OFF_BOOT + 16].copy_from_slice(&boot);
        head[OFF_STAMP..OFF_STAMP + 16].copy_from_slice(&stamp);
        head[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_ne_bytes());
        j.store(0, &head);
        Ok((j, stamp))
    }

    /// Stores `bytes` at `offset` of the mapping.
    fn store(&mut self, offset: usize, bytes: &[u8]) {
        self.map.store(offset, bytes);
        #[cfg(feature = "fault-injection")]
        if let Some(r) = &self.rec {
            r.journal_store(offset as u64, bytes);
        }
    }

    /// Stores record `seq` (numbered by the caller, one after another).
    fn put(&mut self, seq: u64, addr: u64, value: u64) {
        self.seq = self.seq.max(seq);
        if seq.saturating_sub(self.checkpoint) > self.capacity || self.overflowed() {
            // No room: this change reaches the file only with a writeback,
            // which every write waits for until a checkpoint passes here.
            // Later records are dropped too until then: one replayed
            // without this one (a word of a table whose creation is not
            // journaled) could not be trusted.
            self.dropped_upto = seq;
            return;
        }
        let slot = HEADER_LEN + (seq % self.capacity) as usize * RECORD;
        let mut body = [0u8; 24];
        body[..8].copy_from_slice(&seq.to_ne_bytes());
        body[8..16].copy_from_slice(&addr.to_ne_bytes());
        body[16..].copy_from_slice(&value.to_ne_bytes());
        self.store(slot, &body);
        // The check goes last: a record is whole once it is there.
        fence(Ordering::Release);
        let c = check(self.key, seq, addr, value);
        self.store(slot + 24, &c.to_ne_bytes());
    }

    /// Change `seq`: the L2 table word at host offset `offset` now holds
    /// `value` (stored big-endian in the file, as every table word).
    pub(crate) fn l2_word(&mut self, seq: u64, offset: u64, value: u64) {
        debug_assert_eq!(offset & KIND_MASK, 0);
        self.put(seq, offset | KIND_L2_WORD, value);
    }

    /// Change `seq`: a new L2 table of `len` bytes at `offset`, zeros
    /// before its words.
    pub(crate) fn l2_new(&mut self, seq: u64, offset: u64, len: u64) {
        self.put(seq, offset | KIND_L2_NEW, len);
    }

    /// Change `seq`: the L2 table at `offset` starts as a copy of the one at
    /// `source`. The source is shared with a snapshot and never changed in
    /// place, and the reference the copy drops is released only after the
    /// writeback that covers this record: its content on disk is the copy's
    /// until the checkpoint passes this record.
    pub(crate) fn l2_copy(&mut self, seq: u64, offset: u64, source: u64) {
        self.put(seq, offset | KIND_L2_COPY, source);
    }

    /// Change `seq`: L1 entry `index` now holds `value`.
    pub(crate) fn l1(&mut self, seq: u64, index: u64, value: u64) {
        self.put(seq, index << 3 | KIND_L1, value);
    }

    /// Changes up to `seq` are committed: their slots may be reused.
    pub(crate) fn checkpoint(&mut self, seq: u64) {
        if seq <= self.checkpoint {
            return;
        }
        self.checkpoint = seq;
        self.store(OFF_CHECKPOINT, &seq.to_ne_bytes());
    }

    /// Some change past the checkpoint is in no record: writes wait for a
    /// writeback that covers it.
    pub(crate) fn overflowed(&self) -> bool {
        self.dropped_upto > self.checkpoint
    }

    /// Half the ring holds unchecked records: time for a writeback.
    pub(crate) fn wants_writeback(&self) -> bool {
        self.seq.saturating_sub(self.checkpoint) > self.capacity / 2
    }

    /// The image was closed cleanly: the journal goes away.
    pub(crate) fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(journal = %self.path.display(), "cannot remove the crash journal: {e}");
        }
    }
}

/// Autoclear bits 32-62: the stamp, while bit 63 says a journal is live.
const STAMP_BITS: u64 = 0x7fff_ffff << 32;

/// The stamp as the header holds it (31 bits).
fn stamp_bits(stamp: &[u8; 16]) -> u64 {
    u64::from(u32::from_ne_bytes(stamp[..4].try_into().expect("4 bytes"))) << 32 & STAMP_BITS
}

/// The stamp the image's header names, if its journal is live.
pub(crate) fn header_stamp(h: &Header) -> Option<[u8; 16]> {
    let bits = h.autoclear_features.bits();
    if bits & AutoclearFeatures::QBLK_JOURNAL.bits() == 0 {
        return None;
    }
    let mut stamp = [0u8; 16];
    stamp[..4].copy_from_slice(&(((bits & STAMP_BITS) >> 32) as u32).to_ne_bytes());
    Some(stamp)
}

/// Names the journal with `stamp` in `h` (or, with `None`, no journal).
/// Only the autoclear field changes: one 8-byte word in the header's
/// first sector, so a power cut cannot tear it, and nothing moves.
pub(crate) fn set_header_stamp(h: &mut Header, stamp: Option<[u8; 16]>) {
    let live = AutoclearFeatures::QBLK_JOURNAL.bits();
    let mut bits = h.autoclear_features.bits() & !(STAMP_BITS | live);
    if let Some(s) = stamp {
        bits |= live | stamp_bits(&s);
    }
    h.autoclear_features = AutoclearFeatures::from_bits_retain(bits);
}

/// Whether the image at `path` names a live journal (its writer did not
/// close it): autoclear bit 63 of a version 3 header. Reads the header's
/// first 96 bytes; anything unreadable is "no".
pub(crate) fn pending(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 96];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    read.is_ok()
        && head[..4] == *b"QFI\xfb"
        && u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")) >= 3
        && u64::from_be_bytes(head[88..96].try_into().expect("8 bytes"))
            & AutoclearFeatures::QBLK_JOURNAL.bits()
            != 0
}

/// One valid record.
#[derive(Debug, Clone, Copy)]
struct Record {
    seq: u64,
    addr: u64,
    value: u64,
}

/// Why a journal is not replayed.
fn unusable(image: &Path, why: impl std::fmt::Display) {
    warn!(
        image = %image.display(),
        "crash journal not replayed: {why}; writes a crashed daemon acknowledged after the last flush may be lost"
    );
}

/// The records a journal file holds past its checkpoint, in order, if it
/// belongs to this image (`stamp`) and this boot.
fn read_records(image: &Path, stamp: &[u8; 16]) -> Option<Vec<Record>> {
    let path = sidecar(image);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            unusable(image, format_args!("{}: {e}", path.display()));
            return None;
        }
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        unusable(
            image,
            format_args!("{} is not a qblk journal", path.display()),
        );
        return None;
    }
    match boot_id() {
        Ok(b) if b[..] == bytes[OFF_BOOT..OFF_BOOT + 16] => {}
        Ok(_) => {
            unusable(image, "it was written before the machine restarted");
            return None;
        }
        Err(e) => {
            unusable(image, format_args!("cannot read the boot id: {e}"));
            return None;
        }
    }
    if bytes[OFF_STAMP..OFF_STAMP + 16] != stamp[..] {
        unusable(image, "it belongs to another incarnation of the image");
        return None;
    }
    let capacity = u64_at(OFF_CAPACITY).unwrap_or(0);
    let checkpoint = u64_at(OFF_CHECKPOINT).unwrap_or(0);
    if capacity == 0 || (bytes.len() - HEADER_LEN) / RECORD < capacity as usize {
        unusable(image, "its ring is truncated");
        return None;
    }
    let key = stamp_key(stamp);
    let mut records: Vec<Record> = (0..capacity as usize)
        .filter_map(|i| {
            let o = HEADER_LEN + i * RECORD;
            let (seq, addr, value, c) =
                (u64_at(o)?, u64_at(o + 8)?, u64_at(o + 16)?, u64_at(o + 24)?);
            let valid =
                seq > checkpoint && seq % capacity == i as u64 && c == check(key, seq, addr, value);
            valid.then_some(Record { seq, addr, value })
        })
        .collect();
    records.sort_by_key(|r| r.seq);
    Some(records)
}

/// Replays the journal of a crashed writer into `img` (open writable,
/// before anything else wrote to it), if the header names one that may be
/// replayed. Returns whether it did: the image is then dirty and must be
/// opened again (which rebuilds its refcounts).
pub(crate) async fn recover(img: &Image) -> Result<bool> {
    let h = img.header().clone();
    let Some(stamp) = header_stamp(&h) else {
        return Ok(false);
    };
    let Some(records) = read_records(img.path(), &stamp) else {
        return Ok(false);
    };
    // Even with nothing to replay the writer crashed: what it had
    // allocated for writes it never finished (and may have counted on
    // disk already) is freed by the rebuild that the dirty bit asks for.
    let g = img.geometry();
    let cs = g.cluster_size();
    let path = img.path();
    let bad = |what: String| Error::Unsupported {
        path: path.to_owned(),
        what: format!(
            "its crash journal ({}) does not fit it: {what}; move the journal away to open the image as it is",
            sidecar(path).display()
        ),
    };
    let file_limit = img
        .file()
        .file_len()
        .map_err(Error::io(path, "stat", None))?
        .saturating_add(1 << 30);
    let l1_offset = h.l1_table_offset;
    let l1_len = u64::from(h.l1_size) * 8;
    let rt = (
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    let overlaps_fixed = |off: u64| {
        off < cs
            || (off + cs > l1_offset && off < l1_offset + l1_len)
            || (off + cs > rt.0 && off < rt.0 + rt.1)
    };
    // The L2 tables (by cluster) and L1 entries the records change.
    let mut tables: BTreeMap<u64, AlignedBuf> = BTreeMap::new();
    let mut l1: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &records {
        match r.addr & KIND_MASK {
            KIND_L2_WORD | KIND_L2_NEW | KIND_L2_COPY => {
                let kind = r.addr & KIND_MASK;
                let off = r.addr & !KIND_MASK;
                let table = off - off % cs;
                if off >= file_limit || overlaps_fixed(table) {
                    return Err(bad(format!("an L2 table at {table:#x}")));
                }
                // A new table's content: zeros, or its source's.
                let base = match kind {
                    KIND_L2_NEW => Some(AlignedBuf::zeroed(cs as usize)),
                    KIND_L2_COPY => {
                        let source = r.value;
                        if source % cs != 0 || source >= file_limit || overlaps_fixed(source) {
                            return Err(bad(format!("an L2 table copied from {source:#x}")));
                        }
                        Some(
                            img.file()
                                .read(source, cs as usize)
                                .await
                                .map_err(Error::io(path, "read L2 table", source))?,
                        )
                    }
                    _ => None,
                };
                match (tables.entry(table), base) {
                    (std::collections::btree_map::Entry::Occupied(mut e), Some(base)) => {
                        e.insert(base);
                    }
                    (std::collections::btree_map::Entry::Vacant(e), Some(base)) => {
                        e.insert(base);
                    }
                    (std::collections::btree_map::Entry::Occupied(mut e), None) => {
                        let at = (off - table) as usize;
                        e.get_mut()[at..at + 8].copy_from_slice(&r.value.to_be_bytes());
                    }
                    (std::collections::btree_map::Entry::Vacant(e), None) => {
                        let mut buf = img
                            .file()
                            .read(table, cs as usize)
                            .await
                            .map_err(Error::io(path, "read L2 table", table))?;
                        let at = (off - table) as usize;
                        buf[at..at + 8].copy_from_slice(&r.value.to_be_bytes());
                        e.insert(buf);
                    }
                }
            }
            KIND_L1 => {
                let index = r.addr >> 3;
                if index >= u64::from(h.l1_size) {
                    return Err(bad(format!("L1 index {index}")));
                }
                l1.insert(index, r.value);
            }
            k => return Err(bad(format!("record kind {k}"))),
        }
    }
    let mut dirty = h.clone();
    dirty.incompatible_features |= IncompatibleFeatures::DIRTY;
    let mut c = Commit::new(End::Durable);
    // The dirty bit after the data already in the file (the tables name
    // it), then the tables, then the L1 table.
    let head = c.write("write header", 0, header_buf(path, &dirty)?);
    c.after_guest_data(head);
    let mut ids = Vec::new();
    for (off, buf) in tables {
        let id = c.write("write L2 table", off, buf);
        c.after(id, head, Edge::Durable);
        ids.push(id);
    }
    if !l1.is_empty() {
        let mut table = img
            .file()
            .read(l1_offset, l1_len as usize)
            .await
            .map_err(Error::io(path, "read L1 table", l1_offset))?;
        for (index, value) in &l1 {
            let at = *index as usize * 8;
            table[at..at + 8].copy_from_slice(&value.to_be_bytes());
        }
        let id = c.write("write L1 table", l1_offset, table);
        c.after(id, head, Edge::Durable);
        c.after_all(id, &ids, Edge::Durable);
    }
    c.run(img.commit_files()).await?;
    info!(
        image = %path.display(),
        records = records.len(),
        "replayed the crash journal of a writer that did not close the image: every write it acknowledged is on disk"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(capacity: u64) -> (tempfile::TempDir, PathBuf, Journal, [u8; 16]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("t.qcow2");
        let (j, stamp) = Journal::create(&image, capacity).expect("create");
        (dir, image, j, stamp)
    }

    #[test]
    fn records_past_the_checkpoint_read_back_in_order_across_the_ring() {
        let (_d, image, mut j, stamp) = journal(8);
        for seq in 1..=6 {
            j.l2_word(seq, 0x10000 + 8 * seq, seq * 100);
        }
        j.checkpoint(4);
        // Slots of 1..=4 are reused by 9..=12.
        for seq in 7..=12 {
            j.l1(seq, seq, seq * 1000);
        }
        assert!(!j.overflowed());
        let got: Vec<u64> = read_records(&image, &stamp)
            .expect("valid")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, (5..=12).collect::<Vec<_>>());
        // Another stamp: nothing is this image's.
        let mut other = stamp;
        other[0] ^= 1;
        assert!(read_records(&image, &other).is_none());
    }

    #[test]
    fn a_full_ring_drops_records_until_a_checkpoint_covers_the_last_dropped() {
        let (_d, image, mut j, stamp) = journal(4);
        for seq in 1..=4 {
            j.l2_word(seq, 0x10000, seq);
        }
        assert!(!j.overflowed());
        j.l2_word(5, 0x10000, 5);
        assert!(j.overflowed(), "no room for 5");
        // Room again, but 6 would be replayed without 5: dropped too.
        j.checkpoint(3);
        j.l2_word(6, 0x10000, 6);
        assert!(j.overflowed());
        j.checkpoint(5);
        assert!(j.overflowed(), "6 is still in no record");
        j.checkpoint(6);
        assert!(!j.overflowed());
        j.l2_word(7, 0x10000, 7);
        let got: Vec<u64> = read_records(&image, &stamp)
            .expect("valid")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, vec![7]);
    }

    #[test]
    fn a_torn_record_does_not_count() {
        let (_d, image, mut j, stamp) = journal(8);
        j.l2_word(1, 0x10000, 1);
        j.l2_word(2, 0x10008, 2);
        // The process died between a record's fields and its check.
        let slot = HEADER_LEN + 2 * RECORD;
        j.store(slot + 16, &99u64.to_ne_bytes());
        let got: Vec<u64> = read_records(&image, &stamp)
            .expect("valid")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, vec![1]);
    }

    #[test]
    fn the_stamp_lives_in_the_autoclear_word_only() {
        let mut h = qblk_qcow2::create::CreatePlan::new(&qblk_qcow2::create::CreateSpec {
            size: 1 << 30,
            ..Default::default()
        })
        .expect("plan")
        .header()
        .clone();
        let before = h.encode().expect("encode");
        let stamp = random_stamp().expect("stamp");
        set_header_stamp(&mut h, Some(stamp));
        assert_eq!(header_stamp(&h), Some(stamp));
        let after = h.encode().expect("encode");
        assert_eq!(before.len(), after.len());
        let differ: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(differ.iter().all(|&i| (88..96).contains(&i)), "{differ:?}");
        set_header_stamp(&mut h, None);
        assert_eq!(h.encode().expect("encode"), before);
        assert_eq!(header_stamp(&h), None);
    }
}
