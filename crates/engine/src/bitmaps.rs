//! Persistent dirty bitmaps, kept up to date while the image is written.
//!
//! # What a writer owes a bitmap
//!
//! A persistent dirty bitmap (qcow2's "bitmaps" extension) has one bit per
//! granule of the disk, set when the granule may have changed since the
//! bitmap was created or cleared: backup tools read it to copy only what
//! changed. A writer that opens an image with bitmaps must (the spec, and
//! QEMU's practice):
//!
//! - before its first write, mark every bitmap it keeps *in use* on disk:
//!   a bitmap left in use after a crash is inconsistent and only good for
//!   removal (the next backup must be a full one);
//! - set the bits of every written, zeroed and discarded range of the
//!   enabled (`auto`) bitmaps, before the request completes;
//! - on close, store the bitmaps with the in-use flag cleared, and keep
//!   the bitmaps autoclear bit (every writer that does not know bitmaps
//!   clears it, after which QEMU drops them all as inconsistent).
//!
//! A bitmap found in use at open is kept as it is on disk (inconsistent),
//! never updated. So is one this engine cannot keep (unknown extra data
//! not marked compatible), unless it is enabled: then the image is only
//! opened read-only, since writing would make it silently stale.
//!
//! # In memory
//!
//! One bit per granule in 64-bit words (a 1 TiB disk at 64 KiB granularity
//! is 2 MiB), set with atomic ORs from any worker thread with no lock but a
//! shared read lock of the bitmap list; a word whose bits are set already
//! is only read. Writes to an image without enabled bitmaps pay one
//! relaxed load.
//!
//! # Surviving a daemon crash
//!
//! With a crash journal (`crate::journal`) the words live in a shared
//! mapping of a second sidecar file, `.<image>.qblk-bitmaps`, so every bit
//! set before a completion is in the page cache the moment it is set and
//! outlives the process. It carries the journal's stamp and the boot id:
//! after a daemon crash (same boot, the image's header still naming that
//! stamp) the next writable open takes an in-use bitmap's bits from it, and
//! the bitmap is consistent again — its bits are metadata of acknowledged
//! writes like the journal's records. After a power cut (another boot) or
//! any other writer, in-use bitmaps stay inconsistent, as in QEMU.
//!
//! On disk a bitmap is a bitmap table (one entry per cluster of bitmap
//! data: 0 for all zeros, or the data cluster) and its directory entry.
//! The store writes new data clusters, tables and directory, then (durable)
//! the header naming the new directory; the old clusters are freed after
//! that, as any structure the writeback replaces (`crate::write`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use qblk_qcow2::bitmap::{
    BITMAP_TYPE_DIRTY_TRACKING, BitmapDirectoryEntry, BitmapFlags, BitmapTableEntry,
    MAX_BITMAP_NAME_BYTES, MAX_BITMAPS, bitmap_data_bytes, bitmap_table_entries,
    parse_bitmap_directory,
};
use qblk_qcow2::header::AutoclearFeatures;
use qblk_qcow2::{FormatError, Header, Problem};
use tracing::warn;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::layout::MetaMap;
use crate::shm::{SharedMap, boot_id};

/// The finest granularity kept (QEMU's limit too): 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// The coarsest granularity kept (QEMU's limit too): 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;

/// The sidecar holding the bitmaps' words of the image at `image`.
pub fn sidecar(image: &Path) -> PathBuf {
    crate::shm::sidecar_path(image, "qblk-bitmaps")
}

/// What an operator sees of a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Tracks writes (`auto`).
    pub enabled: bool,
    /// Not kept up to date by this writer: found in use at open (a writer
    /// crashed), or not understood. Only removal is allowed.
    pub inconsistent: bool,
    /// Bytes of the disk marked dirty (granules × granularity, clipped to
    /// the disk); 0 for an inconsistent bitmap.
    pub dirty_bytes: u64,
}

/// The words of one bitmap.
enum Words {
    Heap(Box<[AtomicU64]>),
    /// In the sidecar: `count` words from byte `offset`.
    Mapped {
        map: Arc<SharedMap>,
        offset: usize,
        count: usize,
    },
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Words::Heap(w) => write!(f, "Heap({} words)", w.len()),
            Words::Mapped { offset, count, .. } => write!(f, "Mapped({count} words at {offset})"),
        }
    }
}

impl Words {
    fn heap(count: usize) -> Words {
        Words::Heap((0..count).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self) -> &[AtomicU64] {
        match self {
            Words::Heap(w) => w,
            Words::Mapped { map, offset, count } => map.words(*offset, *count),
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.get()
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    fn fill_from(&self, src: &[u64]) {
        for (w, &v) in self.get().iter().zip(src) {
            w.store(v, Ordering::Relaxed);
        }
    }
}

/// Words for a disk of `size` bytes at `granularity_bits`.
fn word_count(size: u64, granularity_bits: u8) -> usize {
    bitmap_data_bytes(size, granularity_bits).div_ceil(8) as usize
}

/// Sets bits `first..=last`.
fn set_bits(words: &[AtomicU64], first: u64, last: u64) {
    let mut i = first;
    while i <= last {
        let (word, lo) = ((i / 64) as usize, i % 64);
        let hi = (last - (i - lo)).min(63);
        let mask = if hi - lo == 63 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo + 1)) - 1) << lo
        };
        let Some(w) = words.get(word) else { return };
        // Already set (the common case for a hot range): no store, no
        // cache line taken from the other workers.
        if w.load(Ordering::Relaxed) & mask != mask {
            w.fetch_or(mask, Ordering::Relaxed);
        }
        i = i - lo + 64;
    }
}

/// Bits set in `words`.
fn count_bits(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// One entry of the bitmap directory.
#[derive(Debug)]
pub(crate) struct Bitmap {
    /// The entry as the next store writes it (table offset and size as on
    /// disk now; the in-use flag as on disk).
    pub(crate) entry: BitmapDirectoryEntry,
    /// `None`: kept as found (inconsistent, or not understood).
    words: Option<Words>,
    /// The clusters its table and data use on disk now, freed once a
    /// store replaced them.
    pub(crate) clusters: Vec<u64>,
}

impl Bitmap {
    fn name(&self) -> String {
        self.entry.name_lossy()
    }

    fn consistent(&self) -> bool {
        self.words.is_some()
    }

    fn enabled(&self) -> bool {
        self.consistent() && self.entry.flags.contains(BitmapFlags::AUTO)
    }
}

/// The bitmaps of a writable image.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    /// Some bitmap tracks writes: the only thing a write reads otherwise.
    enabled: AtomicBool,
    state: RwLock<State>,
}

#[derive(Debug)]
pub(crate) struct State {
    /// The disk size the bitmaps cover.
    size: u64,
    pub(crate) bitmaps: Vec<Bitmap>,
    /// The directory on disk (offset, bytes), freed once a store replaced
    /// it.
    pub(crate) dir: Option<(u64, u64)>,
    /// Clusters of bitmaps removed since the last store, freed by the next.
    pub(crate) removed: Vec<u64>,
    /// Where the words survive a crash, if they do.
    sidecar: Option<Sidecar>,
}

/// The sidecar's identity (to rebuild it when the bitmaps change).
#[derive(Debug, Clone)]
struct Sidecar {
    path: PathBuf,
    stamp: [u8; 16],
}

impl Bitmaps {
    #[cfg(test)]
    pub(crate) fn none(size: u64) -> Bitmaps {
        Bitmaps {
            enabled: AtomicBool::new(false),
            state: RwLock::new(State {
                size,
                bitmaps: Vec::new(),
                dir: None,
                removed: Vec::new(),
                sidecar: None,
            }),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_enabled(&self, s: &State) {
        self.enabled
            .store(s.bitmaps.iter().any(Bitmap::enabled), Ordering::Release);
    }

    /// Marks `[offset, offset + len)` dirty in every enabled bitmap.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let s = self.read();
        let end = offset.saturating_add(len).min(s.size);
        if offset >= end {
            return;
        }
        for b in s.bitmaps.iter().filter(|b| b.enabled()) {
            let g = b.entry.granularity_bits;
            if let Some(w) = &b.words {
                set_bits(w.get(), offset >> g, (end - 1) >> g);
            }
        }
    }

    /// Whether the words live in a sidecar.
    pub(crate) fn has_sidecar(&self) -> bool {
        self.read().sidecar.is_some()
    }

    pub(crate) fn info(&self) -> Vec<BitmapInfo> {
        let s = self.read();
        s.bitmaps
            .iter()
            .map(|b| {
                let dirty_bytes = b.words.as_ref().map_or(0, |w| {
                    let g = b.entry.granularity();
                    (count_bits(&w.snapshot()) * g).min(s.size)
                });
                BitmapInfo {
                    name: b.name(),
                    granularity: b.entry.granularity(),
                    enabled: b.entry.flags.contains(BitmapFlags::AUTO),
                    inconsistent: !b.consistent(),
                    dirty_bytes,
                }
            })
            .collect()
    }

    /// The words of every consistent bitmap as they are now, with its
    /// directory entry (for a store).
    pub(crate) fn snapshot(&self) -> (u64, Vec<(usize, Vec<u64>)>) {
        let s = self.read();
        let words = s
            .bitmaps
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.words.as_ref().map(|w| (i, w.snapshot())))
            .collect();
        (s.size, words)
    }

    /// The bits of bitmap `name` (its granularity bits and words).
    pub(crate) fn bits_of(&self, name: &str) -> Option<(u8, Vec<u64>)> {
        let s = self.read();
        let b = s.bitmaps.iter().find(|b| b.entry.name == name.as_bytes())?;
        Some((b.entry.granularity_bits, b.words.as_ref()?.snapshot()))
    }

    /// The disk grew to `size`: every consistent bitmap grows with it (new
    /// granules clean, as QEMU has them).
    pub(crate) fn resize(&self, size: u64) {
        let mut s = self.write();
        s.size = size;
        self.rebuild_words(&mut s);
    }

    /// Adds an empty bitmap.
    pub(crate) fn add(
        &self,
        path: &Path,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<()> {
        let refuse = |what: String| {
            Err(Error::Unsupported {
                path: path.to_owned(),
                what,
            })
        };
        let mut s = self.write();
        if name.is_empty() {
            return refuse("Bitmap name cannot be empty".into());
        }
        if name.len() > usize::from(MAX_BITMAP_NAME_BYTES) {
            return refuse(format!(
                "Bitmap name is longer than {MAX_BITMAP_NAME_BYTES} bytes"
            ));
        }
        if s.bitmaps.iter().any(|b| b.entry.name == name.as_bytes()) {
            return refuse(format!("Bitmap already exists: {name}"));
        }
        if s.bitmaps.len() >= MAX_BITMAPS as usize {
            return refuse(format!("the image holds {MAX_BITMAPS} bitmaps already"));
        }
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS)
                .contains(&(granularity.trailing_zeros() as u8))
        {
            // QEMU's words (it says the same of one above 2 GiB).
            return refuse("Granularity must be power of 2 and at least 512".into());
        }
        let g = granularity.trailing_zeros() as u8;
        let mut flags = BitmapFlags::IN_USE;
        if enabled {
            flags |= BitmapFlags::AUTO;
        }
        let size = s.size;
        s.bitmaps.push(Bitmap {
            entry: BitmapDirectoryEntry {
                bitmap_table_offset: 0,
                bitmap_table_size: 0,
                flags,
                bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
                granularity_bits: g,
                extra_data: Vec::new(),
                name: name.as_bytes().to_vec(),
            },
            words: Some(Words::heap(word_count(size, g))),
            clusters: Vec::new(),
        });
        self.rebuild_words(&mut s);
        Ok(())
    }

    /// Runs `f` on bitmap `name`; `consistent` refuses an inconsistent one.
    fn with<T>(
        &self,
        path: &Path,
        name: &str,
        consistent: bool,
        f: impl FnOnce(&mut State, usize) -> T,
    ) -> Result<T> {
        let mut s = self.write();
        let Some(i) = s
            .bitmaps
            .iter()
            .position(|b| b.entry.name == name.as_bytes())
        else {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: format!("Dirty bitmap '{name}' not found"),
            });
        };
        if consistent && !s.bitmaps[i].consistent() {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: format!(
                    "Bitmap '{name}' is inconsistent and cannot be used; try removing it"
                ),
            });
        }
        let r = f(&mut s, i);
        self.update_enabled(&s);
        Ok(r)
    }

    /// Removes bitmap `name`; its clusters are freed by the next store.
    pub(crate) fn remove(&self, path: &Path, name: &str) -> Result<()> {
        self.with(path, name, false, |s, i| {
            let gone = s.bitmaps.remove(i);
            s.removed.extend(gone.clusters);
        })
    }

    pub(crate) fn clear(&self, path: &Path, name: &str) -> Result<()> {
        self.with(path, name, true, |s, i| {
            if let Some(w) = &s.bitmaps[i].words {
                w.fill_from(&vec![0; w.get().len()]);
            }
        })
    }

    pub(crate) fn set_enabled(&self, path: &Path, name: &str, enabled: bool) -> Result<()> {
        self.with(path, name, true, |s, i| {
            s.bitmaps[i].entry.flags.set(BitmapFlags::AUTO, enabled);
        })
    }

    /// ORs `src` (words at `src_bits` granularity, for a disk of at least
    /// this one's size) into bitmap `name`.
    pub(crate) fn merge(&self, path: &Path, name: &str, src_bits: u8, src: &[u64]) -> Result<()> {
        self.with(path, name, true, |s, i| {
            let size = s.size;
            let b = &s.bitmaps[i];
            let g = b.entry.granularity_bits;
            let Some(w) = &b.words else { return };
            let words = w.get();
            // Every set source granule marks the granules it overlaps.
            for (wi, &v) in src.iter().enumerate() {
                let mut v = v;
                while v != 0 {
                    let bit = wi as u64 * 64 + u64::from(v.trailing_zeros());
                    v &= v - 1;
                    let start = bit << src_bits;
                    if start >= size {
                        break;
                    }
                    let end = ((bit + 1) << src_bits).min(size);
                    set_bits(words, start >> g, (end - 1) >> g);
                }
            }
        })
    }

    /// Moves the words of every consistent bitmap to new storage of the
    /// right size: the sidecar rebuilt (when there is one), or the heap.
    fn rebuild_words(&self, s: &mut State) {
        let size = s.size;
        let live: Vec<(usize, Vec<u64>)> = s
            .bitmaps
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.words.as_ref().map(|w| (i, w.snapshot())))
            .collect();
        let wanted: Vec<(usize, usize)> = live
            .iter()
            .map(|(i, _)| (*i, word_count(size, s.bitmaps[*i].entry.granularity_bits)))
            .collect();
        let mapped = s.sidecar.clone().and_then(|sc| {
            let entries: Vec<(&BitmapDirectoryEntry, usize)> = wanted
                .iter()
                .map(|&(i, n)| (&s.bitmaps[i].entry, n))
                .collect();
            match write_sidecar(&sc, size, &entries) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(
                        sidecar = %sc.path.display(),
                        "cannot keep the dirty bitmaps where a daemon crash leaves them: {e}; after a crash they will be inconsistent"
                    );
                    None
                }
            }
        });
        if mapped.is_none() {
            s.sidecar = None;
        }
        let mut mapped = mapped.map(Vec::into_iter);
        for ((i, old), (_, n)) in live.into_iter().zip(wanted) {
            let words = mapped
                .as_mut()
                .and_then(Iterator::next)
                .unwrap_or_else(|| Words::heap(n));
            let g = s.bitmaps[i].entry.granularity_bits;
            words.fill_from(&old[..old.len().min(n)]);
            clear_past(&words, size, g);
            s.bitmaps[i].words = Some(words);
        }
        self.update_enabled(s);
    }

    /// The bitmaps are stored: their directory entries and clusters are
    /// as `stored` says.
    pub(crate) fn stored(
        &self,
        stored: Vec<(BitmapDirectoryEntry, Vec<u64>)>,
        dir: Option<(u64, u64)>,
    ) {
        let mut s = self.write();
        for (b, (entry, clusters)) in s.bitmaps.iter_mut().zip(stored) {
            b.entry = entry;
            b.clusters = clusters;
        }
        s.dir = dir;
    }

    /// The sidecar goes away (a clean close).
    pub(crate) fn remove_sidecar(&self) {
        let mut s = self.write();
        if let Some(sc) = s.sidecar.take() {
            // The words stay readable from the heap for any late reader.
            let size = s.size;
            for b in s.bitmaps.iter_mut() {
                if let Some(w) = b.words.take() {
                    let n = word_count(size, b.entry.granularity_bits);
                    let heap = Words::heap(n);
                    heap.fill_from(&w.snapshot());
                    b.words = Some(heap);
                }
            }
            if let Err(e) = std::fs::remove_file(&sc.path) {
                warn!(sidecar = %sc.path.display(), "cannot remove the bitmaps sidecar: {e}");
            }
        }
    }
}

/// Clears the bits of the last word that lie past the disk's end.
fn clear_past(words: &Words, size: u64, g: u8) {
    let bits = size.div_ceil(1u64 << g);
    let w = words.get();
    let full = (bits / 64) as usize;
    if bits % 64 != 0 {
        if let Some(last) = w.get(full) {
            last.fetch_and((1u64 << (bits % 64)) - 1, Ordering::Relaxed);
        }
    }
    for x in w.iter().skip(full + usize::from(bits % 64 != 0)) {
        x.store(0, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The sidecar file
//
// 0: magic, 8: boot id, 24: stamp, 40: disk size, 48: count, 56: directory
// length; from 64 the directory: per bitmap its words' byte offset, word
// count, granularity bits, name length, then the name padded to 8 bytes.
// The words follow, each bitmap's from a page boundary. Native byte order:
// a sidecar is only read on the machine and in the boot that wrote it.

const MAGIC: &[u8; 8] = b"QBLKBMP1";
const PAGE: usize = 4096;

fn write_sidecar(
    sc: &Sidecar,
    size: u64,
    entries: &[(&BitmapDirectoryEntry, usize)],
) -> std::io::Result<Vec<Words>> {
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&boot_id()?);
    head.extend_from_slice(&sc.stamp);
    head.extend_from_slice(&size.to_ne_bytes());
    head.extend_from_slice(&(entries.len() as u64).to_ne_bytes());
    let dir_len: usize = entries
        .iter()
        .map(|(e, _)| 32 + e.name.len().div_ceil(8) * 8)
        .sum();
    head.extend_from_slice(&(dir_len as u64).to_ne_bytes());
    let mut at = (64 + dir_len).div_ceil(PAGE) * PAGE;
    let mut places = Vec::new();
    for (e, n) in entries {
        head.extend_from_slice(&(at as u64).to_ne_bytes());
        head.extend_from_slice(&(*n as u64).to_ne_bytes());
        head.extend_from_slice(&u64::from(e.granularity_bits).to_ne_bytes());
        head.extend_from_slice(&(e.name.len() as u64).to_ne_bytes());
        head.extend_from_slice(&e.name);
        head.resize(head.len().div_ceil(8) * 8, 0);
        places.push((at, *n));
        at += (n * 8).div_ceil(PAGE).max(1) * PAGE;
    }
    // Built aside and renamed over the old one: a crash meanwhile leaves
    // one whole sidecar or the other.
    let tmp = sc.path.with_extension("qblk-bitmaps-new");
    let mut map = SharedMap::create(&tmp, at)?;
    map.store(0, &head);
    std::fs::rename(&tmp, &sc.path)?;
    let map = Arc::new(map);
    Ok(places
        .into_iter()
        .map(|(offset, count)| Words::Mapped {
            map: map.clone(),
            offset,
            count,
        })
        .collect())
}

/// A bitmap's granularity bits and words, as a crashed writer left them.
type RecoveredBits = (u8, Vec<u64>);

/// What a crashed writer's sidecar holds, by bitmap name: granularity
/// bits and words. `None` unless it belongs to `stamp`, this boot and a
/// disk of `size` bytes.
fn read_sidecar(
    image: &Path,
    stamp: &[u8; 16],
    size: u64,
) -> Option<HashMap<Vec<u8>, RecoveredBits>> {
    let bytes = std::fs::read(sidecar(image)).ok()?;
    let u64_at = |o: usize| {
        bytes
            .get(o..o.checked_add(8)?)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.get(..8)? != MAGIC
        || bytes.get(8..24)? != boot_id().ok()?.as_slice()
        || bytes.get(24..40)? != stamp.as_slice()
        || u64_at(40)? != size
    {
        return None;
    }
    let count = u64_at(48)?;
    let mut pos = 64usize;
    let mut out = HashMap::new();
    for _ in 0..count.min(u64::from(MAX_BITMAPS)) {
        let offset = usize::try_from(u64_at(pos)?).ok()?;
        let n = usize::try_from(u64_at(pos + 8)?).ok()?;
        let g = u8::try_from(u64_at(pos + 16)?).ok()?;
        let name_len = usize::try_from(u64_at(pos + 24)?).ok()?;
        let name = bytes
            .get(pos + 32..(pos + 32).checked_add(name_len)?)?
            .to_vec();
        pos += 32 + name_len.div_ceil(8) * 8;
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&g) || n != word_count(size, g) {
            return None;
        }
        let area = bytes.get(offset..offset.checked_add(n.checked_mul(8)?)?)?;
        let words = area
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect();
        out.insert(name, (g, words));
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Loading at a writable open

/// The bitmaps as a writable open found them.
#[derive(Debug)]
pub(crate) struct Loaded {
    bitmaps: Vec<(BitmapDirectoryEntry, Option<Vec<u64>>, Vec<u64>)>,
    dir: Option<(u64, u64)>,
    /// The header has a bitmaps extension this writer does not keep (no
    /// autoclear bit, or a version 2 image): it is dropped, as QEMU does.
    pub(crate) drop_extension: bool,
}

impl Loaded {
    /// The directory with every consistent bitmap marked in use, if that
    /// changes it: written in place before the first guest write.
    pub(crate) fn in_use_directory(&self) -> Option<(u64, Vec<u8>)> {
        let (offset, _) = self.dir?;
        let mut changed = false;
        let mut buf = Vec::new();
        for (e, words, _) in &self.bitmaps {
            let mut e = e.clone();
            if words.is_some() && !e.flags.contains(BitmapFlags::IN_USE) {
                e.flags |= BitmapFlags::IN_USE;
                changed = true;
            }
            e.encode(&mut buf);
        }
        changed.then_some((offset, buf))
    }

    /// Whether there are bitmaps to keep.
    pub(crate) fn is_empty(&self) -> bool {
        self.bitmaps.is_empty()
    }

    /// The in-memory bitmaps: words in a sidecar named by `stamp` (the
    /// crash journal's) when there is one, else on the heap.
    pub(crate) fn into_bitmaps(self, image: &Path, size: u64, stamp: Option<[u8; 16]>) -> Bitmaps {
        let state = State {
            size,
            bitmaps: self
                .bitmaps
                .into_iter()
                .map(|(mut entry, words, clusters)| {
                    let w = words.map(|v| {
                        let w = Words::heap(v.len());
                        w.fill_from(&v);
                        // Kept in use on disk from here on.
                        entry.flags |= BitmapFlags::IN_USE;
                        w
                    });
                    Bitmap {
                        entry,
                        words: w,
                        clusters,
                    }
                })
                .collect(),
            dir: self.dir,
            removed: Vec::new(),
            sidecar: stamp.map(|stamp| Sidecar {
                path: sidecar(image),
                stamp,
            }),
        };
        let b = Bitmaps {
            enabled: AtomicBool::new(false),
            state: RwLock::new(state),
        };
        {
            let mut s = b.write();
            if s.bitmaps.iter().any(Bitmap::consistent) {
                b.rebuild_words(&mut s);
            } else {
                s.sidecar = None;
            }
        }
        b
    }
}

/// QEMU's words for a bitmaps extension a writer without bitmap support
/// left behind, which a writable open drops as QEMU does.
fn warn_dropped(path: &Path) {
    warn!(
        image = %path.display(),
        "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent; dropping them (run qblk check -r all to free their clusters)"
    );
}

/// Reads the bitmaps of a writable image: the directory, and every
/// consistent bitmap's table and data (or, for one a crashed writer left
/// in use, its words from that writer's sidecar). Damage is refused with
/// the field and its offset before anything is written.
pub(crate) async fn load(img: &Image, h: &Header, meta: &MetaMap, file_len: u64) -> Result<Loaded> {
    let path = img.path();
    let stale = h
        .extensions
        .iter()
        .any(|e| e.kind() == qblk_qcow2::header::ext_type::BITMAPS);
    let Some(ext) = h.bitmaps_extension() else {
        if stale {
            // Without the autoclear bit the extension is stale.
            warn_dropped(path);
        }
        return Ok(Loaded {
            bitmaps: Vec::new(),
            dir: None,
            drop_extension: stale,
        });
    };
    if !h.is_v3() || !h.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
        warn_dropped(path);
        return Ok(Loaded {
            bitmaps: Vec::new(),
            dir: None,
            drop_extension: true,
        });
    }
    let g = img.geometry();
    let cs = g.cluster_size();
    let format = |field: &'static str, at: u64, problem: Problem| Error::Format {
        path: path.to_owned(),
        source: FormatError::new(field, at, problem),
    };
    // Clusters a bitmap structure names must be inside the file and hold
    // no other metadata.
    let check_clusters = |field: &'static str, at: u64, offset: u64, len: u64| -> Result<()> {
        let end = offset.saturating_add(len);
        if end > file_len {
            return Err(format(
                field,
                at,
                Problem::PastEndOfFile {
                    value: offset,
                    file_len,
                },
            ));
        }
        let mut c = offset / cs;
        while c * cs < end {
            if let Some(kind) = meta.kind(c) {
                return Err(format(
                    field,
                    at,
                    Problem::Overlaps {
                        offset: c * cs,
                        what: kind.name(),
                    },
                ));
            }
            c += 1;
        }
        Ok(())
    };
    let dir_off = ext.bitmap_directory_offset;
    check_clusters(
        "bitmaps.bitmap_directory_offset",
        dir_off,
        dir_off,
        ext.bitmap_directory_size,
    )?;
    let dir = img
        .file()
        .read(dir_off, ext.bitmap_directory_size as usize)
        .await
        .map_err(Error::io(path, "read bitmap directory", dir_off))?;
    let entries = parse_bitmap_directory(&dir, ext, h.size, cs).map_err(Error::format(path))?;
    let recovered = crate::journal::header_stamp(h)
        .and_then(|stamp| read_sidecar(path, &stamp, h.size))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut pos = dir_off;
    for e in entries {
        let at = pos;
        pos += e.encoded_len() as u64;
        let name = e.name_lossy();
        let table_len = u64::from(e.bitmap_table_size) * 8;
        check_clusters(
            "bitmap_directory.bitmap_table_offset",
            at,
            e.bitmap_table_offset,
            table_len,
        )?;
        let understood =
            e.extra_data.is_empty() || e.flags.contains(BitmapFlags::EXTRA_DATA_COMPATIBLE);
        let granularity_ok =
            (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits);
        let in_use = e.flags.contains(BitmapFlags::IN_USE);
        if !(understood && granularity_ok) {
            if e.flags.contains(BitmapFlags::AUTO) && !in_use {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    what: format!(
                        "bitmap '{name}' is enabled but qblk cannot keep it ({}): the image may only be opened read-only",
                        if understood {
                            format!("granularity 2^{} is outside 2^9..2^31", e.granularity_bits)
                        } else {
                            "unknown extra data not marked compatible".into()
                        }
                    ),
                });
            }
            out.push((e, None, Vec::new()));
            continue;
        }
        // The table's clusters, and (for a consistent bitmap) its data.
        let table = img
            .file()
            .read(e.bitmap_table_offset, table_len as usize)
            .await
            .map_err(Error::io(path, "read bitmap table", e.bitmap_table_offset))?;
        let mut clusters: Vec<u64> = (0..g.clusters_for(table_len))
            .map(|k| e.bitmap_table_offset / cs + k)
            .collect();
        let mut data = Vec::new();
        for (i, raw) in qblk_qcow2::decode_table(&table).enumerate() {
            let at = e.bitmap_table_offset + i as u64 * 8;
            let entry = BitmapTableEntry::decode(raw, cs, at).map_err(Error::format(path))?;
            if let BitmapTableEntry::Allocated(off) = entry {
                check_clusters("bitmap_table.entry", at, off.0, cs)?;
                clusters.push(off.0 / cs);
            }
            data.push(entry);
        }
        let words = if in_use {
            match recovered.get(&e.name) {
                Some((gb, words)) if *gb == e.granularity_bits => {
                    tracing::info!(
                        image = %path.display(),
                        bitmap = %name,
                        "bitmap left in use by a crashed writer: its bits were recovered from the bitmaps sidecar"
                    );
                    Some(words.clone())
                }
                _ => {
                    warn!(
                        image = %path.display(),
                        bitmap = %name,
                        "bitmap is inconsistent (its writer did not save it): kept as it is, never updated; remove it and start over with a full backup"
                    );
                    None
                }
            }
        } else {
            Some(read_data(img, &e, &data, h.size).await?)
        };
        out.push((e, words, clusters));
    }
    Ok(Loaded {
        bitmaps: out,
        dir: Some((dir_off, ext.bitmap_directory_size)),
        drop_extension: false,
    })
}

/// The bits of consistent bitmap `name` of `img` as its disk holds them
/// (granularity bits and words); `None` if it has no such bitmap, and an
/// error if it is in use or cannot be read.
pub(crate) async fn read_bits(img: &Image, name: &str) -> Result<Option<(u8, Vec<u64>)>> {
    if let Some(w) = img.writer() {
        return Ok(w.bitmaps.bits_of(name));
    }
    let h = img.header();
    let Some(ext) = h.bitmaps_extension() else {
        return Ok(None);
    };
    let path = img.path();
    let cs = img.geometry().cluster_size();
    let dir = img
        .file()
        .read(
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size as usize,
        )
        .await
        .map_err(Error::io(
            path,
            "read bitmap directory",
            ext.bitmap_directory_offset,
        ))?;
    let entries = parse_bitmap_directory(&dir, ext, h.size, cs).map_err(Error::format(path))?;
    let Some(e) = entries.into_iter().find(|e| e.name == name.as_bytes()) else {
        return Ok(None);
    };
    if e.flags.contains(BitmapFlags::IN_USE)
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits)
    {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            what: format!("Bitmap '{name}' is inconsistent and cannot be used"),
        });
    }
    let table = img
        .file()
        .read(e.bitmap_table_offset, e.bitmap_table_size as usize * 8)
        .await
        .map_err(Error::io(path, "read bitmap table", e.bitmap_table_offset))?;
    let mut data = Vec::new();
    for (i, raw) in qblk_qcow2::decode_table(&table).enumerate() {
        let at = e.bitmap_table_offset + i as u64 * 8;
        data.push(BitmapTableEntry::decode(raw, cs, at).map_err(Error::format(path))?);
    }
    let words = read_data(img, &e, &data, h.size).await?;
    Ok(Some((e.granularity_bits, words)))
}

/// A consistent bitmap's words from its data clusters.
async fn read_data(
    img: &Image,
    e: &BitmapDirectoryEntry,
    table: &[BitmapTableEntry],
    size: u64,
) -> Result<Vec<u64>> {
    let cs = img.geometry().cluster_size() as usize;
    let data_len = bitmap_data_bytes(size, e.granularity_bits) as usize;
    let mut bytes = vec![0u8; data_len.div_ceil(8) * 8];
    let entries = bitmap_table_entries(size, e.granularity_bits, cs as u64) as usize;
    for (k, entry) in table.iter().take(entries).enumerate() {
        let start = k * cs;
        let end = ((k + 1) * cs).min(data_len);
        match entry {
            BitmapTableEntry::Zeros => {}
            BitmapTableEntry::Ones => bytes[start..end].fill(0xff),
            BitmapTableEntry::Allocated(off) => {
                let buf = img.file().read(off.0, cs).await.map_err(Error::io(
                    img.path(),
                    "read bitmap data",
                    off.0,
                ))?;
                bytes[start..end].copy_from_slice(&buf[..end - start]);
            }
        }
    }
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    // Bits past the disk's end mean nothing (and QEMU writes none).
    let bits = size.div_ceil(e.granularity());
    if bits % 64 != 0 {
        if let Some(last) = words.get_mut((bits / 64) as usize) {
            *last &= (1u64 << (bits % 64)) - 1;
        }
    }
    Ok(words)
}

/// Bitmap data bytes (the on-disk form: bit `i` is bit `i % 8` of byte
/// `i / 8`) of `words` for a disk of `size` bytes.
pub(crate) fn data_bytes(words: &[u64], size: u64, granularity_bits: u8) -> Vec<u8> {
    let len = bitmap_data_bytes(size, granularity_bits) as usize;
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.resize(len, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Box<[AtomicU64]> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn bits(w: &[AtomicU64]) -> Vec<u64> {
        w.iter().map(|x| x.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn set_bits_covers_exactly_the_range_across_words() {
        let w = words(4);
        set_bits(&w, 3, 3);
        assert_eq!(bits(&w), [8, 0, 0, 0]);
        set_bits(&w, 62, 130);
        assert_eq!(bits(&w), [8 | 3 << 62, u64::MAX, 7, 0]);
        set_bits(&w, 192, 255);
        assert_eq!(bits(&w)[3], u64::MAX);
        // Past the words: ignored, no panic.
        set_bits(&w, 250, 10_000);
    }

    #[test]
    fn data_bytes_put_the_first_granule_in_bit_0_of_byte_0() {
        let b = data_bytes(&[1 | 1 << 9], 64 * 65536, 16);
        assert_eq!(b, [1, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(data_bytes(&[u64::MAX], 3 * 512, 9), [0xff]);
    }

    #[test]
    fn marks_clip_to_the_disk_and_skip_disabled_bitmaps() {
        let b = Bitmaps::none(1 << 20);
        let p = Path::new("x");
        b.add(p, "on", 65536, true).unwrap();
        b.add(p, "off", 65536, false).unwrap();
        b.mark(65536 * 3 + 100, 65536);
        b.mark((1 << 20) - 1, 1 << 30);
        assert_eq!(b.bits_of("on").unwrap().1, [1 << 3 | 1 << 4 | 1 << 15]);
        assert_eq!(b.bits_of("off").unwrap().1, [0]);
        assert!(b.add(p, "on", 65536, true).is_err());
        assert!(b.add(p, "g", 1000, true).is_err());
        b.set_enabled(p, "off", true).unwrap();
        b.mark(0, 1);
        assert_eq!(b.bits_of("off").unwrap().1, [1]);
        b.clear(p, "on").unwrap();
        assert_eq!(b.bits_of("on").unwrap().1, [0]);
        // Merging a 512-byte-granularity bitmap: bit 130 covers 65 KiB+.
        b.merge(p, "on", 9, &[0, 0, 1 << 2]).unwrap();
        assert_eq!(b.bits_of("on").unwrap().1, [1 << 1]);
    }

    #[test]
    fn a_resize_keeps_the_bits_and_adds_clean_granules() {
        let b = Bitmaps::none(1 << 20);
        b.add(Path::new("x"), "a", 65536, true).unwrap();
        b.mark(0, 1 << 20);
        b.resize(8 << 20);
        let (_, w) = b.bits_of("a").unwrap();
        assert_eq!(w, [0xffff, 0]);
        b.mark(8 << 20, 1);
        assert_eq!(b.bits_of("a").unwrap().1, [0xffff, 0]);
    }
}
