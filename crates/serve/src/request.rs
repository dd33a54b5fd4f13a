//! Turning a descriptor chain into a virtio-blk request (virtio 1.2, 5.2.6).
//!
//! Everything here is untrusted guest input: descriptor addresses and
//! lengths, their order and directions, the header and the discard
//! segments. The parser checks all of it against guest memory and the
//! device's capacity before anything reaches the engine, and says exactly
//! what the guest gets back when it refuses: `IOERR`, `UNSUPP`, or — when
//! the chain has no place for a status byte at all — nothing but a used
//! entry of length 0.
//!
//! Descriptor layout is free (virtio 1.x, "message framing"): the header
//! may be split across descriptors and data may share a descriptor with
//! the header or the status byte. All that is required is device-readable
//! descriptors first, then device-writable ones, ending in the status byte.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{MAX_DISCARD_SECTORS, MAX_REQUEST_BYTES, SECTOR_SIZE};

/// Guest memory as this daemon maps it.
pub type Mem = GuestMemoryMmap<()>;

/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const SEGMENT_LEN: u64 = 16;

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A run of guest memory, contiguous in this process's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSeg {
    pub ptr: *mut u8,
    pub len: usize,
}

/// What a request asks the engine to do. Offsets and lengths are in bytes
/// and lie within the device.
#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        bufs: Vec<IoSeg>,
    },
    Write {
        offset: u64,
        bufs: Vec<IoSeg>,
    },
    Flush,
    /// Write the serial (at most 20 bytes, not NUL-terminated when it fills
    /// them) to these guest ranges.
    GetId {
        dst: Vec<(GuestAddress, usize)>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Keeps the guest memory the [`IoSeg`]s point into mapped until the
    /// request completes, even if the frontend replaces the memory table.
    pub mem: Arc<Mem>,
}

impl Request {
    /// Bytes of the chain the device writes when `op` succeeds (the used
    /// length): data read plus the status byte.
    pub fn used_len(&self, id_len: usize) -> u32 {
        let data = match &self.op {
            Op::Read { bufs, .. } => bufs.iter().map(|b| b.len).sum(),
            Op::GetId { .. } => id_len,
            _ => 0,
        };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub enum Parsed {
    Request(Request),
    /// Refused: write `code` to `status` and complete with length 1.
    Reject {
        status: GuestAddress,
        code: u8,
        why: String,
    },
    /// No usable status byte: complete with length 0.
    Broken {
        why: String,
    },
}

/// What the parser needs to know about the device.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    pub readonly: bool,
}

fn ioerr(status: GuestAddress, why: impl Into<String>) -> Parsed {
    Parsed::Reject {
        status,
        code: VIRTIO_BLK_S_IOERR as u8,
        why: why.into(),
    }
}

fn unsupp(status: GuestAddress, why: impl Into<String>) -> Parsed {
    Parsed::Reject {
        status,
        code: VIRTIO_BLK_S_UNSUPP as u8,
        why: why.into(),
    }
}

/// A byte range of the chain: `(guest address, length)` pieces.
type Pieces = Vec<(GuestAddress, u64)>;

/// Drops the first `n` bytes of `pieces`.
fn skip(pieces: &Pieces, mut n: u64) -> Pieces {
    let mut out = Vec::with_capacity(pieces.len());
    for &(addr, len) in pieces {
        if n >= len {
            n -= len;
            continue;
        }
        out.push((GuestAddress(addr.0 + n), len - n));
        n = 0;
    }
    out
}

fn total(pieces: &Pieces) -> u64 {
    pieces.iter().map(|p| p.1).sum()
}

/// Copies the first `out.len()` bytes of `pieces` out of guest memory.
fn gather(mem: &Mem, pieces: &Pieces, out: &mut [u8]) -> Option<()> {
    let mut done = 0usize;
    for &(addr, len) in pieces {
        if done == out.len() {
            break;
        }
        let n = (len as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], addr).ok()?;
        done += n;
    }
    (done == out.len()).then_some(())
}

/// Maps `pieces` to host memory, merging runs that are contiguous there.
fn map(mem: &Mem, pieces: &Pieces) -> Option<Vec<IoSeg>> {
    let mut out: Vec<IoSeg> = Vec::with_capacity(pieces.len());
    for &(addr, len) in pieces {
        let len = usize::try_from(len).ok()?;
        // Every byte must be mapped: the slice iterator may also just end
        // early at the edge of guest memory.
        if !mem.check_range(addr, len) {
            return None;
        }
        for slice in mem.get_slices(addr, len) {
            let slice = slice.ok()?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            let len = slice.len();
            match out.last_mut() {
                Some(last) if last.ptr.wrapping_add(last.len) == ptr => last.len += len,
                _ => out.push(IoSeg { ptr, len }),
            }
        }
    }
    Some(out)
}

/// Whether any two runs share a byte (a device-writable buffer listed
/// twice would let two engine reads write the same memory at once).
fn overlapping(bufs: &[IoSeg]) -> bool {
    let mut spans: Vec<(usize, usize)> = bufs.iter().map(|b| (b.ptr as usize, b.len)).collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
}

/// Checks that `[sector, sector + bytes)` lies on the device.
fn range(limits: &Limits, sector: u64, bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= limits.size - limits.size % SECTOR_SIZE).then_some(offset)
}

/// Parses one descriptor chain.
pub fn parse(descs: &[Desc], mem: &Arc<Mem>, limits: &Limits) -> Parsed {
    // The status byte: the last byte of the last descriptor, which must be
    // device-writable and inside guest memory.
    let Some(last) = descs.last() else {
        return Parsed::Broken {
            why: "empty descriptor chain".into(),
        };
    };
    if !last.writable || last.len == 0 {
        return Parsed::Broken {
            why: "the last descriptor is not a writable status byte".into(),
        };
    }
    let Some(status) = last.addr.0.checked_add(u64::from(last.len) - 1) else {
        return Parsed::Broken {
            why: "status byte address overflows".into(),
        };
    };
    let status = GuestAddress(status);
    if !mem.check_range(status, 1) {
        return Parsed::Broken {
            why: format!("status byte at {:#x} is outside guest memory", status.0),
        };
    }

    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return ioerr(status, "device-readable descriptor after a writable one");
    }
    let readable: Pieces = descs[..first_writable]
        .iter()
        .map(|d| (d.addr, u64::from(d.len)))
        .collect();
    let mut writable: Pieces = descs[first_writable..]
        .iter()
        .map(|d| (d.addr, u64::from(d.len)))
        .collect();
    // Drop the status byte from the writable range.
    if let Some(w) = writable.last_mut() {
        w.1 -= 1;
        if w.1 == 0 {
            writable.pop();
        }
    }

    if total(&readable) < HEADER_LEN {
        return ioerr(status, "request header shorter than 16 bytes");
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if gather(mem, &readable, &mut header).is_none() {
        return ioerr(status, "request header outside guest memory");
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let data_out = skip(&readable, HEADER_LEN);
    let data_in = writable;

    let rw = |pieces: &Pieces, write: bool| -> Result<(u64, Vec<IoSeg>), Parsed> {
        let len = total(pieces);
        if len % SECTOR_SIZE != 0 {
            return Err(ioerr(
                status,
                format!("data length {len} is not a multiple of 512"),
            ));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(ioerr(
                status,
                format!("data length {len} exceeds the device limit"),
            ));
        }
        let Some(offset) = range(limits, sector, len) else {
            return Err(ioerr(
                status,
                format!(
                    "sectors {sector}+{} past the end of the device",
                    len / SECTOR_SIZE
                ),
            ));
        };
        if write && limits.readonly {
            return Err(ioerr(status, "write to a read-only device"));
        }
        let Some(bufs) = map(mem, pieces) else {
            return Err(ioerr(status, "data buffer outside guest memory"));
        };
        if !write && overlapping(&bufs) {
            return Err(ioerr(status, "read into overlapping buffers"));
        }
        Ok((offset, bufs))
    };

    let op = match kind {
        VIRTIO_BLK_T_IN => {
            if total(&data_out) != 0 {
                return ioerr(status, "read request with device-readable data");
            }
            match rw(&data_in, false) {
                Ok((offset, bufs)) => Op::Read { offset, bufs },
                Err(p) => return p,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if total(&data_in) != 0 {
                return ioerr(status, "write request with device-writable data");
            }
            match rw(&data_out, true) {
                Ok((offset, bufs)) => Op::Write { offset, bufs },
                Err(p) => return p,
            }
        }
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let mut dst = Vec::new();
            let mut want = VIRTIO_BLK_ID_BYTES as u64;
            for &(addr, len) in &data_in {
                let n = len.min(want);
                if n == 0 {
                    break;
                }
                if !mem.check_range(addr, n as usize) {
                    return ioerr(status, "GET_ID buffer outside guest memory");
                }
                dst.push((addr, n as usize));
                want -= n;
            }
            if dst.is_empty() {
                return ioerr(status, "GET_ID without a buffer");
            }
            Op::GetId { dst }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let what = if kind == VIRTIO_BLK_T_DISCARD {
                "discard"
            } else {
                "write-zeroes"
            };
            let len = total(&data_out);
            if len == 0 || len % SEGMENT_LEN != 0 {
                return ioerr(status, format!("{what} payload of {len} bytes"));
            }
            if len > SEGMENT_LEN {
                return unsupp(
                    status,
                    format!("{what} with {} segments", len / SEGMENT_LEN),
                );
            }
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if gather(mem, &data_out, &mut seg).is_none() {
                return ioerr(status, format!("{what} segment outside guest memory"));
            }
            let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return unsupp(status, format!("{what} with reserved flags {flags:#x}"));
            }
            if kind == VIRTIO_BLK_T_DISCARD && unmap {
                return unsupp(status, "discard with the unmap flag");
            }
            if limits.readonly {
                return ioerr(status, format!("{what} on a read-only device"));
            }
            if sectors > MAX_DISCARD_SECTORS {
                return ioerr(
                    status,
                    format!("{what} of {sectors} sectors exceeds the limit"),
                );
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = range(limits, seg_sector, bytes) else {
                return ioerr(
                    status,
                    format!("{what} of sectors {seg_sector}+{sectors} past the end of the device"),
                );
            };
            if kind == VIRTIO_BLK_T_DISCARD {
                Op::Discard { offset, len: bytes }
            } else {
                Op::WriteZeroes {
                    offset,
                    len: bytes,
                    unmap,
                }
            }
        }
        other => return unsupp(status, format!("request type {other}")),
    };
    Parsed::Request(Request {
        op,
        status,
        mem: mem.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x10000;
    const SIZE: usize = 0x100000;

    fn mem() -> Arc<Mem> {
        Arc::new(Mem::from_ranges(&[(GuestAddress(BASE), SIZE)]).unwrap())
    }

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            readonly: false,
        }
    }

    fn header(mem: &Mem, at: u64, kind: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Desc {
            addr: GuestAddress(at),
            len: 16,
            writable: false,
        }
    }

    fn d(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn status() -> Desc {
        d(BASE + 0x800, 1, true)
    }

    fn code(p: &Parsed) -> u8 {
        match p {
            Parsed::Reject { code, .. } => *code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn read_maps_data_and_merges_contiguous_buffers() {
        let m = mem();
        let chain = [
            header(&m, BASE, VIRTIO_BLK_T_IN, 8),
            d(BASE + 0x1000, 512, true),
            d(BASE + 0x1200, 512, true),
            d(BASE + 0x3000, 1024, true),
            status(),
        ];
        let Parsed::Request(r) = parse(&chain, &m, &limits()) else {
            panic!()
        };
        let Op::Read { offset, bufs } = &r.op else {
            panic!()
        };
        assert_eq!(*offset, 4096);
        assert_eq!(bufs.len(), 2, "{bufs:?}");
        assert_eq!(bufs[0].len, 1024);
        assert_eq!(bufs[1].len, 1024);
        assert_eq!(r.status, GuestAddress(BASE + 0x800));
        assert_eq!(r.used_len(0), 2049);
    }

    #[test]
    fn header_and_data_may_share_descriptors() {
        let m = mem();
        // Header + 512 bytes of data in one descriptor, status appended to
        // nothing else.
        let h = header(&m, BASE, VIRTIO_BLK_T_OUT, 1);
        let chain = [d(h.addr.0, 16 + 512, false), status()];
        let Parsed::Request(r) = parse(&chain, &m, &limits()) else {
            panic!()
        };
        let Op::Write { offset, bufs } = &r.op else {
            panic!()
        };
        assert_eq!(*offset, 512);
        assert_eq!(bufs.iter().map(|b| b.len).sum::<usize>(), 512);
        // Header split over two descriptors.
        let chain = [d(BASE, 8, false), d(BASE + 8, 8, false), status()];
        header(&m, BASE, VIRTIO_BLK_T_FLUSH, 0);
        assert!(matches!(
            parse(&chain, &m, &limits()),
            Parsed::Request(Request { op: Op::Flush, .. })
        ));
    }

    #[test]
    fn bad_chains_are_refused() {
        let m = mem();
        let l = limits();
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        let h = |kind, sector| header(&m, BASE, kind, sector);
        // No status byte at all.
        assert!(matches!(parse(&[], &m, &l), Parsed::Broken { .. }));
        assert!(matches!(
            parse(&[h(VIRTIO_BLK_T_IN, 0)], &m, &l),
            Parsed::Broken { .. }
        ));
        assert!(matches!(
            parse(&[h(VIRTIO_BLK_T_IN, 0), d(1 << 40, 1, true)], &m, &l),
            Parsed::Broken { .. }
        ));
        // Header too short, or outside memory.
        assert_eq!(code(&parse(&[d(BASE, 8, false), status()], &m, &l)), ioerr);
        assert_eq!(
            code(&parse(&[d(1 << 40, 16, false), status()], &m, &l)),
            ioerr
        );
        // Wrong directions.
        let wrong = [
            h(VIRTIO_BLK_T_IN, 0),
            d(BASE + 0x1000, 512, true),
            d(BASE + 0x2000, 512, false),
            status(),
        ];
        assert_eq!(code(&parse(&wrong, &m, &l)), ioerr);
        let wrong = [
            h(VIRTIO_BLK_T_IN, 0),
            d(BASE + 0x1000, 512, false),
            status(),
        ];
        assert_eq!(code(&parse(&wrong, &m, &l)), ioerr);
        let wrong = [
            h(VIRTIO_BLK_T_OUT, 0),
            d(BASE + 0x1000, 512, true),
            status(),
        ];
        assert_eq!(code(&parse(&wrong, &m, &l)), ioerr);
        // Data outside guest memory, not whole sectors, past capacity.
        let out = [
            h(VIRTIO_BLK_T_IN, 0),
            d(BASE + SIZE as u64 - 512, 1024, true),
            status(),
        ];
        assert_eq!(code(&parse(&out, &m, &l)), ioerr);
        let odd = [h(VIRTIO_BLK_T_IN, 0), d(BASE + 0x1000, 100, true), status()];
        assert_eq!(code(&parse(&odd, &m, &l)), ioerr);
        let past = [
            h(VIRTIO_BLK_T_IN, 2047),
            d(BASE + 0x1000, 1024, true),
            status(),
        ];
        assert_eq!(code(&parse(&past, &m, &l)), ioerr);
        let wrap = [
            h(VIRTIO_BLK_T_IN, u64::MAX / 256),
            d(BASE + 0x1000, 512, true),
            status(),
        ];
        assert_eq!(code(&parse(&wrap, &m, &l)), ioerr);
        // Absurd length (more than seg_max * size_max).
        let huge = [
            h(VIRTIO_BLK_T_IN, 0),
            d(BASE, u32::MAX - 511, true),
            status(),
        ];
        assert_eq!(code(&parse(&huge, &m, &l)), ioerr);
        // A read into the same buffer twice.
        let twice = [
            h(VIRTIO_BLK_T_IN, 0),
            d(BASE + 0x1000, 1024, true),
            d(BASE + 0x1200, 512, true),
            status(),
        ];
        assert_eq!(code(&parse(&twice, &m, &l)), ioerr);
        // Unknown type.
        assert_eq!(code(&parse(&[h(99, 0), status()], &m, &l)), unsupp);
        // Writes to a read-only device.
        let ro = Limits {
            readonly: true,
            ..l
        };
        let w = [
            h(VIRTIO_BLK_T_OUT, 0),
            d(BASE + 0x1000, 512, false),
            status(),
        ];
        assert_eq!(code(&parse(&w, &m, &ro)), ioerr);
        assert!(matches!(parse(&w, &m, &l), Parsed::Request(_)));
    }

    fn segment(m: &Mem, sector: u64, sectors: u32, flags: u32) -> Desc {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(BASE + 0x400)).unwrap();
        d(BASE + 0x400, 16, false)
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let l = limits();
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let wz = |sector, sectors, flags| {
            let h = header(&m, BASE, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            parse(&[h, segment(&m, sector, sectors, flags), status()], &m, &l)
        };
        let Parsed::Request(r) = wz(8, 16, unmap) else {
            panic!()
        };
        assert!(matches!(
            r.op,
            Op::WriteZeroes {
                offset: 4096,
                len: 8192,
                unmap: true
            }
        ));
        assert_eq!(code(&wz(8, 16, 2)), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(code(&wz(2040, 16, 0)), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(
            code(&wz(0, MAX_DISCARD_SECTORS + 1, 0)),
            VIRTIO_BLK_S_IOERR as u8
        );
        let h = header(&m, BASE, VIRTIO_BLK_T_DISCARD, 0);
        let s = segment(&m, 0, 8, unmap);
        assert_eq!(
            code(&parse(&[h, s, status()], &m, &l)),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        // Two segments: more than max_discard_seg.
        let s = segment(&m, 0, 8, 0);
        let two = [h, d(s.addr.0, 32, false), status()];
        assert_eq!(code(&parse(&two, &m, &l)), VIRTIO_BLK_S_UNSUPP as u8);
        let short = [h, d(s.addr.0, 8, false), status()];
        assert_eq!(code(&parse(&short, &m, &l)), VIRTIO_BLK_S_IOERR as u8);
        let Parsed::Request(r) = parse(&[h, s, status()], &m, &l) else {
            panic!()
        };
        assert!(matches!(
            r.op,
            Op::Discard {
                offset: 0,
                len: 4096
            }
        ));
    }

    #[test]
    fn get_id_takes_at_most_20_bytes() {
        let m = mem();
        let h = header(&m, BASE, VIRTIO_BLK_T_GET_ID, 0);
        let chain = [h, d(BASE + 0x1000, 512, true), status()];
        let Parsed::Request(r) = parse(&chain, &m, &limits()) else {
            panic!()
        };
        let Op::GetId { dst } = &r.op else { panic!() };
        assert_eq!(dst, &[(GuestAddress(BASE + 0x1000), 20)]);
        assert_eq!(r.used_len(20), 21);
        assert_eq!(
            code(&parse(&[h, status()], &m, &limits())),
            VIRTIO_BLK_S_IOERR as u8
        );
    }
}
