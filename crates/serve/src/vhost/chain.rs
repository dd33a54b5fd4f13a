//! Walking a descriptor chain of a split virtqueue (virtio 1.2, 2.7.5 and
//! 2.7.5.3, indirect descriptors).
//!
//! The descriptor table, every `next` link, every flag and every indirect
//! table are written by the guest: untrusted. The walker reads each
//! descriptor through bounds-checked guest-memory accesses, follows a link
//! only to an index inside its table, and stops a chain that is longer
//! than its table allows (which is also how a loop ends). What it returns
//! is the list of buffers as the guest described them; whether those
//! buffers lie inside guest memory is for the request parser to decide
//! (it answers IOERR for that, with a status byte; a chain the walker
//! refuses has no trustworthy status byte and completes with length 0).
//!
//! The same walker serves chains freshly popped from the avail ring and
//! chains resubmitted from the inflight region after a crash.

use vm_memory::{Bytes, GuestAddress};

use crate::request::{Desc, Mem};

/// `VIRTQ_DESC_F_NEXT`: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable buffer.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// Size of one `struct virtq_desc`.
pub const DESC_SIZE: u64 = 16;

/// Most descriptors an indirect table may hold. The spec bounds a chain
/// by the queue size, but Linux builds indirect tables of up to seg_max
/// plus 2 entries whatever the queue size (QEMU accepts up to 1024, its
/// VIRTQUEUE_MAX_SIZE): the same bound here.
pub const MAX_INDIRECT: u16 = 1024;

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head {head} is outside the queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("descriptor {index} at {addr:#x} is outside guest memory")]
    Unreadable { index: u16, addr: u64 },
    #[error("descriptor {index} links to {next}, outside its table of {size}")]
    NextOutOfRange { index: u16, next: u16, size: u16 },
    #[error("chain longer than its table of {size} descriptors (a loop)")]
    TooLong { size: u16 },
    #[error("indirect table of {len} bytes (not a whole number of 1..={MAX_INDIRECT} descriptors)")]
    IndirectSize { len: u32 },
    #[error("indirect descriptor with the next flag, or not at the head of its chain")]
    IndirectMisplaced,
    #[error("indirect descriptor inside an indirect table")]
    IndirectNested,
}

/// One raw descriptor-table entry.
#[derive(Debug, Clone, Copy)]
struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &Mem, table: GuestAddress, index: u16) -> Result<Raw, ChainError> {
    let at = table
        .0
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(ChainError::Unreadable {
            index,
            addr: u64::MAX,
        })?;
    let mut b = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut b, GuestAddress(at))
        .map_err(|_| ChainError::Unreadable { index, addr: at })?;
    let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    Ok(Raw {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: le16(12),
        next: le16(14),
    })
}

fn to_desc(d: Raw) -> Desc {
    Desc {
        addr: GuestAddress(d.addr),
        len: d.len,
        writable: d.flags & F_WRITE != 0,
    }
}

/// Follows the `next` links of `table` (of `size` entries) from `first`
/// (already read as `index`), appending each descriptor to `out`.
fn follow(
    mem: &Mem,
    table: GuestAddress,
    size: u16,
    mut index: u16,
    mut d: Raw,
    indirect: bool,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    // Each descriptor of the table at most once: more is a loop.
    let mut left = size;
    loop {
        if d.flags & F_INDIRECT != 0 {
            return Err(if indirect {
                ChainError::IndirectNested
            } else {
                ChainError::IndirectMisplaced
            });
        }
        left = left.checked_sub(1).ok_or(ChainError::TooLong { size })?;
        out.push(to_desc(d));
        if d.flags & F_NEXT == 0 {
            return Ok(());
        }
        if d.next >= size {
            return Err(ChainError::NextOutOfRange {
                index,
                next: d.next,
                size,
            });
        }
        if left == 0 {
            return Err(ChainError::TooLong { size });
        }
        index = d.next;
        d = read_desc(mem, table, index)?;
    }
}

/// The descriptors of the chain starting at `head` in the descriptor table
/// at `table` of a queue of `queue_size` entries, in chain order, with an
/// indirect table (only as the head descriptor, as the spec requires)
/// replaced by its contents.
pub fn walk(
    mem: &Mem,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Desc>, ChainError> {
    if head >= queue_size {
        return Err(ChainError::HeadOutOfRange {
            head,
            size: queue_size,
        });
    }
    let first = read_desc(mem, table, head)?;
    let mut out = Vec::new();
    if first.flags & F_INDIRECT == 0 {
        follow(mem, table, queue_size, head, first, false, &mut out)?;
        return Ok(out);
    }
    if first.flags & F_NEXT != 0 {
        return Err(ChainError::IndirectMisplaced);
    }
    let entries = first.len / DESC_SIZE as u32;
    if first.len % DESC_SIZE as u32 != 0 || entries == 0 || entries > u32::from(MAX_INDIRECT) {
        return Err(ChainError::IndirectSize { len: first.len });
    }
    // `entries` fits u16: bounded by MAX_INDIRECT just above.
    let entries = entries as u16;
    let itable = GuestAddress(first.addr);
    let d = read_desc(mem, itable, 0)?;
    out.reserve(usize::from(entries));
    follow(mem, itable, entries, 0, d, true, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = 0x1000;
    const IND: u64 = 0x4000;
    const SIZE: u16 = 8;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &Mem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&e, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn direct_chain_in_link_order() {
        let m = mem();
        put(&m, TABLE, 3, 0x8000, 16, F_NEXT, 5);
        put(&m, TABLE, 5, 0x9000, 512, F_NEXT | F_WRITE, 1);
        put(&m, TABLE, 1, 0xa000, 1, F_WRITE, 7);
        let c = walk(&m, GuestAddress(TABLE), SIZE, 3).unwrap();
        assert_eq!(
            c,
            vec![
                Desc {
                    addr: GuestAddress(0x8000),
                    len: 16,
                    writable: false
                },
                Desc {
                    addr: GuestAddress(0x9000),
                    len: 512,
                    writable: true
                },
                Desc {
                    addr: GuestAddress(0xa000),
                    len: 1,
                    writable: true
                },
            ]
        );
        // Buffers outside guest memory are the parser's business.
        put(&m, TABLE, 0, 1 << 40, 16, 0, 0);
        assert_eq!(walk(&m, GuestAddress(TABLE), SIZE, 0).unwrap().len(), 1);
    }

    #[test]
    fn indirect_table_replaces_the_head() {
        let m = mem();
        put(&m, TABLE, 2, IND, 3 * 16, F_INDIRECT, 0);
        put(&m, IND, 0, 0x8000, 16, F_NEXT, 1);
        put(&m, IND, 1, 0x9000, 4096, F_NEXT | F_WRITE, 2);
        put(&m, IND, 2, 0xa000, 1, F_WRITE, 0);
        let c = walk(&m, GuestAddress(TABLE), SIZE, 2).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].len, 4096);
        assert!(c[2].writable);
        // Indirect tables may hold more entries than the queue size.
        for i in 0..20u16 {
            put(&m, IND, i, 0x8000, 16, F_NEXT, i + 1);
        }
        put(&m, IND, 20, 0xa000, 1, F_WRITE, 0);
        put(&m, TABLE, 2, IND, 21 * 16, F_INDIRECT, 0);
        assert_eq!(walk(&m, GuestAddress(TABLE), SIZE, 2).unwrap().len(), 21);
    }

    #[test]
    fn bad_chains_are_refused() {
        let m = mem();
        let t = GuestAddress(TABLE);
        // Head outside the queue.
        assert!(matches!(
            walk(&m, t, SIZE, SIZE),
            Err(ChainError::HeadOutOfRange { .. })
        ));
        // A loop, and a link outside the table.
        put(&m, TABLE, 0, 0x8000, 16, F_NEXT, 1);
        put(&m, TABLE, 1, 0x8000, 16, F_NEXT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::TooLong { .. })
        ));
        put(&m, TABLE, 0, 0x8000, 16, F_NEXT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::TooLong { .. })
        ));
        put(&m, TABLE, 0, 0x8000, 16, F_NEXT, SIZE);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::NextOutOfRange { .. })
        ));
        // Exactly the queue size is fine; one more is too long.
        for i in 0..SIZE {
            put(&m, TABLE, i, 0x8000, 16, F_NEXT, i + 1);
        }
        put(&m, TABLE, SIZE - 1, 0xa000, 1, F_WRITE, 0);
        assert_eq!(walk(&m, t, SIZE, 0).unwrap().len(), usize::from(SIZE));
        // A descriptor table outside guest memory.
        assert!(matches!(
            walk(&m, GuestAddress(1 << 40), SIZE, 0),
            Err(ChainError::Unreadable { .. })
        ));
        assert!(matches!(
            walk(&m, GuestAddress(u64::MAX - 8), SIZE, 1),
            Err(ChainError::Unreadable { .. })
        ));
        // Indirect tables: wrong sizes, outside memory, nested, loops,
        // with the next flag, not at the head.
        for len in [0, 17, 16 * (u32::from(MAX_INDIRECT) + 1)] {
            put(&m, TABLE, 0, IND, len, F_INDIRECT, 0);
            assert!(
                matches!(walk(&m, t, SIZE, 0), Err(ChainError::IndirectSize { .. })),
                "{len}"
            );
        }
        put(&m, TABLE, 0, 1 << 40, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::Unreadable { .. })
        ));
        put(&m, TABLE, 0, IND, 32, F_INDIRECT, 0);
        put(&m, IND, 0, IND, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::IndirectNested)
        ));
        put(&m, IND, 0, 0x8000, 16, F_NEXT, 1);
        put(&m, IND, 1, 0x8000, 16, F_NEXT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::TooLong { .. })
        ));
        put(&m, IND, 1, 0x8000, 16, F_NEXT, 2);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::NextOutOfRange { .. })
        ));
        put(&m, TABLE, 0, IND, 32, F_INDIRECT | F_NEXT, 1);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::IndirectMisplaced)
        ));
        put(&m, TABLE, 0, 0x8000, 16, F_NEXT, 1);
        put(&m, TABLE, 1, IND, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, t, SIZE, 0),
            Err(ChainError::IndirectMisplaced)
        ));
    }
}
