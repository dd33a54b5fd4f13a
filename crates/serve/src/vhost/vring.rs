//! A split virtqueue as the device sees it (virtio 1.2, 2.7): taking heads
//! from the avail ring, publishing used elements, and deciding whether
//! the driver wants to hear about them (VIRTIO_RING_F_EVENT_IDX).
//!
//! The rings live in guest memory and the driver changes them under us:
//! every access goes through vm-memory's bounds-checked loads and stores,
//! an index from the driver is checked before use, and a ring that
//! contradicts itself (an avail index more than a queue ahead) is broken:
//! nothing more is taken from it until the frontend sets it up again.
//!
//! Ordering: the avail index is loaded with Acquire before the entries it
//! covers are read; used elements are written before the used index is
//! stored with Release; and a full fence separates our store of an index
//! from our load of the driver's suppression field (`flags` or
//! `used_event`/`avail_event`), the store-load pair both sides of the
//! event_idx protocol rely on.
//!
//! [`SplitRing::push_used`] is the one place used elements are written:
//! dirty-page logging for live migration (VHOST_F_LOG_ALL) belongs there.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::inflight::{InflightQueue, Recovery};
use crate::request::Mem;

/// `VRING_USED_F_NO_NOTIFY`: the device does not need kicks.
const USED_F_NO_NOTIFY: u16 = 1;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not need interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Where a ring is and how big: what the frontend set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of entries, a power of two.
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingLayout {
    /// The used ring's bytes (flags, idx, the elements, `avail_event`):
    /// what the device writes in guest memory besides request data.
    pub fn used_area(&self) -> (GuestAddress, u64) {
        (self.used, 4 + 8 * u64::from(self.size) + 2)
    }

    /// Bytes of each part: descriptor table, avail ring (flags, idx, ring,
    /// used_event), used ring (flags, idx, ring, avail_event).
    fn parts(&self) -> [(GuestAddress, u64, u64); 3] {
        let n = u64::from(self.size);
        [
            (self.desc, 16 * n, 16),
            (self.avail, 6 + 2 * n, 2),
            (self.used, 6 + 8 * n, 4),
        ]
    }

    /// Checks that each part is aligned as the spec requires and lies in
    /// guest memory.
    pub fn check(&self, mem: &Mem) -> Result<(), RingError> {
        if !self.size.is_power_of_two() {
            return Err(RingError::Size(self.size));
        }
        for (addr, len, align) in self.parts() {
            if addr.0 % align != 0 {
                return Err(RingError::Unaligned(addr.0));
            }
            let fits = usize::try_from(len).is_ok_and(|len| mem.check_range(addr, len));
            if !fits {
                return Err(RingError::Outside(addr.0, len));
            }
        }
        Ok(())
    }
}

/// Why a ring cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two")]
    Size(u16),
    #[error("ring part at {0:#x} is not aligned as virtio requires")]
    Unaligned(u64),
    #[error("ring part at {0:#x} ({1} bytes) is outside guest memory")]
    Outside(u64, u64),
    #[error("ring access at {0:#x} failed (guest memory changed under the ring)")]
    Access(u64),
    #[error("avail idx {avail} is more than a queue of {size} ahead of {next}")]
    AvailAhead { avail: u16, next: u16, size: u16 },
}

/// A started ring: the device side's indices and suppression state.
#[derive(Debug)]
pub struct SplitRing {
    layout: RingLayout,
    event_idx: bool,
    /// Next avail entry to take (the ring's "base").
    next_avail: u16,
    /// The used ring's idx as we last published it.
    next_used: u16,
    /// The used idx at the last notification decision (event_idx).
    signalled_used: Option<u16>,
    inflight: Option<InflightQueue>,
}

impl SplitRing {
    /// A ring starting at avail entry `base`, its used index read from
    /// guest memory. With an inflight area, returns the heads an earlier
    /// backend left unfinished (to run again, in order) and takes the
    /// avail ring from past them.
    pub fn start(
        layout: RingLayout,
        event_idx: bool,
        base: u16,
        mut inflight: Option<InflightQueue>,
        mem: &Mem,
    ) -> Result<(Self, Option<Recovery>), RingError> {
        layout.check(mem)?;
        let used_idx = load16(mem, layout.used.0 + 2, Ordering::Acquire)?;
        if inflight
            .as_ref()
            .is_some_and(|q| q.desc_num() < layout.size)
        {
            // Heads past the area could not be recorded.
            inflight = None;
        }
        let recovery = inflight.as_mut().map(|q| q.start(used_idx, layout.size));
        let next_avail = match &recovery {
            Some(r) if r.resumed => {
                // The frontend reset the ring to its used idx: every entry
                // before used_idx + (heads still in flight) was taken.
                // `resubmit` holds at most `size` heads.
                used_idx.wrapping_add(r.resubmit.len() as u16)
            }
            _ => base,
        };
        let ring = Self {
            layout,
            event_idx,
            next_avail,
            next_used: used_idx,
            signalled_used: None,
            inflight,
        };
        Ok((ring, recovery))
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// The next avail entry to take: what GET_VRING_BASE answers.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    pub fn tracks_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    fn avail_idx(&self, mem: &Mem) -> Result<u16, RingError> {
        load16(mem, self.layout.avail.0 + 2, Ordering::Acquire)
    }

    /// Takes the next head from the avail ring, if the driver published
    /// one, and records it in the inflight area.
    pub fn pop(&mut self, mem: &Mem) -> Result<Option<u16>, RingError> {
        let avail = self.avail_idx(mem)?;
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.layout.size {
            return Err(RingError::AvailAhead {
                avail,
                next: self.next_avail,
                size: self.layout.size,
            });
        }
        let slot = u64::from(self.next_avail % self.layout.size);
        // The Acquire load of the index orders this read after it.
        let head = load16(mem, self.layout.avail.0 + 4 + 2 * slot, Ordering::Relaxed)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        if let Some(q) = &mut self.inflight {
            q.popped(head);
        }
        Ok(Some(head))
    }

    /// Writes one used element and moves the used index past it; with
    /// inflight tracking, brackets it as the inflight protocol says, so a
    /// crash at any point leaves the area able to tell whether the guest
    /// has seen it. The one place used-ring memory is written.
    pub fn push_used(&mut self, mem: &Mem, head: u16, len: u32) -> Result<(), RingError> {
        self.write_used_elem(mem, head, len)?;
        if let Some(q) = &self.inflight {
            q.completing(head);
        }
        self.next_used = self.next_used.wrapping_add(1);
        store16(
            mem,
            self.layout.used.0 + 2,
            self.next_used,
            Ordering::Release,
        )?;
        if let Some(q) = &self.inflight {
            q.completed(head, self.next_used);
        }
        Ok(())
    }

    /// Publishes `done` (head, used length) entries. Without inflight
    /// tracking the used index moves once for the whole batch; with it,
    /// once per entry (a batch under one index update would leave several
    /// entries ambiguous after a crash).
    pub fn push_used_batch(&mut self, mem: &Mem, done: &[(u16, u32)]) -> Result<(), RingError> {
        if self.inflight.is_some() {
            for &(head, len) in done {
                self.push_used(mem, head, len)?;
            }
            return Ok(());
        }
        for &(head, len) in done {
            self.write_used_elem(mem, head, len)?;
            self.next_used = self.next_used.wrapping_add(1);
        }
        store16(
            mem,
            self.layout.used.0 + 2,
            self.next_used,
            Ordering::Release,
        )
    }

    /// The used element at the current used index (not yet published).
    fn write_used_elem(&self, mem: &Mem, head: u16, len: u32) -> Result<(), RingError> {
        let slot = u64::from(self.next_used % self.layout.size);
        let at = self.layout.used.0 + 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(at))
            .map_err(|_| RingError::Access(at))
    }

    /// Whether the driver wants an interrupt for what was published since
    /// the last decision.
    pub fn needs_notification(&mut self, mem: &Mem) -> Result<bool, RingError> {
        // Our used idx store before the driver's suppression field.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            let flags = load16(mem, self.layout.avail.0, Ordering::Relaxed)?;
            return Ok(flags & AVAIL_F_NO_INTERRUPT == 0);
        }
        let new = self.next_used;
        let Some(old) = self.signalled_used.replace(new) else {
            return Ok(true);
        };
        let used_event = load16(
            mem,
            self.layout.avail.0 + 4 + 2 * u64::from(self.layout.size),
            Ordering::Relaxed,
        )?;
        Ok(need_event(used_event, new, old))
    }

    /// Asks the driver not to kick while we drain the ring (without
    /// event_idx; with it, not updating `avail_event` does that).
    pub fn disable_notification(&mut self, mem: &Mem) -> Result<(), RingError> {
        if self.event_idx {
            return Ok(());
        }
        self.set_used_flags(mem, USED_F_NO_NOTIFY)
    }

    /// Asks for kicks again; true when the driver published more in the
    /// meantime (the caller drains again).
    pub fn enable_notification(&mut self, mem: &Mem) -> Result<bool, RingError> {
        if self.event_idx {
            let at = self.layout.used.0 + 4 + 8 * u64::from(self.layout.size);
            store16(mem, at, self.next_avail, Ordering::Relaxed)?;
        } else {
            self.set_used_flags(mem, 0)?;
        }
        // Our store before our look at the avail index.
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != self.next_avail)
    }

    fn set_used_flags(&self, mem: &Mem, flags: u16) -> Result<(), RingError> {
        store16(mem, self.layout.used.0, flags, Ordering::Relaxed)
    }
}

/// virtio's `vring_need_event`: whether `event` lies in `[old, new)`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn load16(mem: &Mem, at: u64, order: Ordering) -> Result<u16, RingError> {
    mem.load::<u16>(GuestAddress(at), order)
        .map(u16::from_le)
        .map_err(|_| RingError::Access(at))
}

fn store16(mem: &Mem, at: u64, v: u16, order: Ordering) -> Result<(), RingError> {
    mem.store(v.to_le(), GuestAddress(at), order)
        .map_err(|_| RingError::Access(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;

    fn setup() -> (Mem, RingLayout) {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let layout = RingLayout {
            size: SIZE,
            desc: GuestAddress(0x1000),
            avail: GuestAddress(0x2000),
            used: GuestAddress(0x3000),
        };
        (mem, layout)
    }

    fn publish(mem: &Mem, l: &RingLayout, idx: u16, heads: &[u16]) -> u16 {
        let mut idx = idx;
        for &h in heads {
            let slot = u64::from(idx % l.size);
            mem.write_obj(h.to_le(), GuestAddress(l.avail.0 + 4 + 2 * slot))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write_obj(idx.to_le(), GuestAddress(l.avail.0 + 2))
            .unwrap();
        idx
    }

    fn used(mem: &Mem, l: &RingLayout) -> (u16, Vec<(u32, u32)>) {
        let idx: u16 = mem.read_obj(GuestAddress(l.used.0 + 2)).unwrap();
        let elems = (0..l.size)
            .map(|i| {
                let at = l.used.0 + 4 + 8 * u64::from(i);
                (
                    mem.read_obj(GuestAddress(at)).unwrap(),
                    mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect();
        (idx, elems)
    }

    #[test]
    fn pop_and_push_wrap_around() {
        let (mem, l) = setup();
        // Start near the wrap of the 16-bit indices.
        mem.write_obj(65534u16, GuestAddress(l.used.0 + 2)).unwrap();
        let (mut ring, rec) = SplitRing::start(l, false, 65534, None, &mem).unwrap();
        assert!(rec.is_none());
        publish(&mem, &l, 65534, &[3, 5, 1]);
        assert_eq!(ring.pop(&mem).unwrap(), Some(3));
        assert_eq!(ring.pop(&mem).unwrap(), Some(5));
        assert_eq!(ring.pop(&mem).unwrap(), Some(1));
        assert_eq!(ring.pop(&mem).unwrap(), None);
        assert_eq!(ring.next_avail(), 1);
        ring.push_used_batch(&mem, &[(5, 10), (3, 20), (1, 0)])
            .unwrap();
        let (idx, elems) = used(&mem, &l);
        assert_eq!(idx, 1);
        assert_eq!(elems[6], (5, 10));
        assert_eq!(elems[7], (3, 20));
        assert_eq!(elems[0], (1, 0));
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_ring() {
        let (mem, l) = setup();
        let (mut ring, _) = SplitRing::start(l, false, 0, None, &mem).unwrap();
        mem.write_obj((SIZE + 1).to_le(), GuestAddress(l.avail.0 + 2))
            .unwrap();
        assert!(matches!(ring.pop(&mem), Err(RingError::AvailAhead { .. })));
        // Exactly a queue ahead is fine.
        mem.write_obj(SIZE.to_le(), GuestAddress(l.avail.0 + 2))
            .unwrap();
        assert!(ring.pop(&mem).unwrap().is_some());
    }

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let (mem, l) = setup();
        let bad = [
            RingLayout { size: 6, ..l },
            RingLayout {
                desc: GuestAddress(0x1008),
                ..l
            },
            RingLayout {
                used: GuestAddress(0x3002),
                ..l
            },
            RingLayout {
                avail: GuestAddress(0xfff0),
                ..l
            },
            RingLayout {
                used: GuestAddress(u64::MAX - 3),
                ..l
            },
        ];
        for b in bad {
            assert!(SplitRing::start(b, false, 0, None, &mem).is_err(), "{b:?}");
        }
    }

    #[test]
    fn event_idx_suppression() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(10, 10, 3));
        assert!(need_event(65535, 2, 65530), "across the wrap");
        let (mem, l) = setup();
        let (mut ring, _) = SplitRing::start(l, true, 0, None, &mem).unwrap();
        publish(&mem, &l, 0, &[0, 1, 2]);
        for _ in 0..3 {
            ring.pop(&mem).unwrap();
        }
        // The driver wants to hear when entry 1 is used.
        let used_event = GuestAddress(l.avail.0 + 4 + 2 * u64::from(SIZE));
        mem.write_obj(1u16, used_event).unwrap();
        ring.push_used_batch(&mem, &[(0, 1)]).unwrap();
        assert!(ring.needs_notification(&mem).unwrap(), "first decision");
        ring.push_used_batch(&mem, &[(1, 1)]).unwrap();
        assert!(ring.needs_notification(&mem).unwrap(), "crossed 1");
        ring.push_used_batch(&mem, &[(2, 1)]).unwrap();
        assert!(!ring.needs_notification(&mem).unwrap(), "1 already passed");
        // enable_notification publishes avail_event and re-checks.
        assert!(!ring.enable_notification(&mem).unwrap());
        let avail_event: u16 = mem
            .read_obj(GuestAddress(l.used.0 + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(avail_event, 3);
        publish(&mem, &l, 3, &[4]);
        assert!(ring.enable_notification(&mem).unwrap());
    }

    #[test]
    fn no_event_idx_uses_the_flags() {
        let (mem, l) = setup();
        let (mut ring, _) = SplitRing::start(l, false, 0, None, &mem).unwrap();
        ring.disable_notification(&mem).unwrap();
        assert_eq!(mem.read_obj::<u16>(l.used).unwrap(), USED_F_NO_NOTIFY);
        assert!(!ring.enable_notification(&mem).unwrap());
        assert_eq!(mem.read_obj::<u16>(l.used).unwrap(), 0);
        assert!(ring.needs_notification(&mem).unwrap());
        mem.write_obj(AVAIL_F_NO_INTERRUPT, l.avail).unwrap();
        assert!(!ring.needs_notification(&mem).unwrap());
    }

    #[test]
    fn inflight_ring_publishes_one_entry_at_a_time_and_recovers() {
        use super::super::inflight::{InflightQueue, Region, create};
        use std::sync::Arc;
        let (mem, l) = setup();
        let (file, size) = create(1, SIZE, 1, SIZE).unwrap();
        let region = Arc::new(Region::map(&file, size, 0, 1, SIZE, 1, SIZE).unwrap());
        let q = InflightQueue::new(region.clone(), 0);
        let (mut ring, rec) = SplitRing::start(l, false, 0, q, &mem).unwrap();
        assert!(!rec.unwrap().resumed);
        publish(&mem, &l, 0, &[2, 4, 6]);
        for _ in 0..3 {
            ring.pop(&mem).unwrap();
        }
        ring.push_used_batch(&mem, &[(4, 1)]).unwrap();
        drop(ring);
        // The frontend resets the base to the used idx (1).
        let q = InflightQueue::new(region.clone(), 0);
        let (ring, rec) = SplitRing::start(l, false, 1, q, &mem).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.resubmit, vec![2, 6]);
        assert_eq!(ring.next_avail(), 3, "used idx 1 + 2 resubmitted");
    }
}
