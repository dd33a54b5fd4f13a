//! A guest's split virtqueue from arbitrary bytes: the descriptor table,
//! the avail ring, indirect tables, headers and buffers all come from the
//! input. Chains are popped and walked as the queue worker does (qblk's
//! own split ring and descriptor walker) and parsed into virtio-blk
//! requests; neither may panic, and whatever the parser accepts must
//! satisfy what the engine relies on.
#![no_main]

use std::sync::Arc;

use qblk_serve::request::{self, Desc, Limits, Op, Parsed};
use qblk_serve::vhost::chain;
use qblk_serve::vhost::vring::{RingLayout, SplitRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Two regions with a hole between them, so chains can straddle the gap.
const LOW: (u64, usize) = (0, 0x8000);
const HIGH: (u64, usize) = (0x9000, 0x8000);
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (ctl, body) = data.split_at(12);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW.0), LOW.1),
        (GuestAddress(HIGH.0), HIGH.1),
    ])
    .expect("guest memory");
    // The input fills the low region (rings, tables, headers) and then the
    // high one.
    let low = body.len().min(LOW.1);
    mem.write_slice(&body[..low], GuestAddress(LOW.0))
        .expect("fill low region");
    let high = (body.len() - low).min(HIGH.1);
    mem.write_slice(&body[low..low + high], GuestAddress(HIGH.0))
        .expect("fill high region");

    let size = 1u16 << (ctl[0] % 9); // 1..=256
    let limits = Limits {
        // Any capacity, including ones that are not a multiple of 512.
        size: u64::from_le_bytes(ctl[1..9].try_into().expect("8 bytes")) >> (ctl[9] % 64),
        readonly: ctl[10] & 1 == 1,
    };
    let layout = RingLayout {
        size,
        desc: GuestAddress(DESC_TABLE),
        avail: GuestAddress(AVAIL),
        used: GuestAddress(USED),
    };
    let Ok((mut ring, _)) = SplitRing::start(layout, ctl[11] & 1 == 1, 0, None, &mem) else {
        return;
    };
    let shared = Arc::new(mem.clone());
    // At most one ring's worth, as the worker's in-flight bound allows.
    for _ in 0..size {
        let Ok(Some(head)) = ring.pop(&mem) else {
            break;
        };
        let descs: Vec<Desc> = match chain::walk(&mem, layout.desc, size, head) {
            Ok(descs) => descs,
            Err(_) => {
                // Refused chains complete with length 0 (a head outside
                // the queue gets no used entry at all).
                if head < size {
                    let _ = ring.push_used(&mem, head, 0);
                }
                continue;
            }
        };
        assert!(head < size, "a chain behind head {head}");
        assert!(
            descs.len() <= usize::from(chain::MAX_INDIRECT).max(usize::from(size)),
            "chain of {} descriptors",
            descs.len()
        );
        match request::parse(&descs, &shared, &limits) {
            Parsed::Request(r) => check(&r, &descs, &mem, &limits),
            Parsed::Reject { status, .. } => {
                assert!(mem.check_range(status, 1), "status byte outside memory");
            }
            Parsed::Broken { .. } => {}
        }
        let _ = ring.push_used(&mem, head, 0);
        let _ = ring.needs_notification(&mem);
    }
});

/// What the engine and the completion path rely on in an accepted request.
fn check(r: &request::Request, descs: &[Desc], mem: &GuestMemoryMmap<()>, limits: &Limits) {
    assert!(mem.check_range(r.status, 1), "status byte outside memory");
    let chain_bytes: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let in_memory = |ptr: *mut u8, len: usize| {
        mem.iter().any(|region| {
            let base = region.as_ptr() as usize;
            let p = ptr as usize;
            p >= base && p + len <= base + region.len() as usize
        })
    };
    match &r.op {
        Op::Read { offset, bufs } | Op::Write { offset, bufs } => {
            let len: usize = bufs.iter().map(|b| b.len).sum();
            // Zero-length requests are valid (QEMU serves them too).
            assert!(len % 512 == 0, "length {len}");
            assert!(offset % 512 == 0);
            assert!(offset + len as u64 <= limits.size, "past capacity");
            assert!((len as u64) < chain_bytes, "more data than the chain has");
            for b in bufs {
                assert!(in_memory(b.ptr, b.len), "buffer outside guest memory");
            }
            if matches!(r.op, Op::Read { .. }) {
                let mut spans: Vec<(usize, usize)> =
                    bufs.iter().map(|b| (b.ptr as usize, b.len)).collect();
                spans.sort_unstable();
                assert!(
                    spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
                    "overlapping read buffers"
                );
            }
            if matches!(r.op, Op::Write { .. }) {
                assert!(!limits.readonly, "write on a read-only device");
            }
        }
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            assert!(!limits.readonly);
            assert!(offset % 512 == 0 && len % 512 == 0);
            assert!(offset + len <= limits.size, "past capacity");
        }
        Op::GetId { dst } => {
            for &(addr, len) in dst {
                assert!(mem.check_range(addr, len), "GET_ID buffer outside memory");
            }
        }
        Op::Flush => {}
    }
}
