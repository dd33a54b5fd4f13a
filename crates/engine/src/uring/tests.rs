//! Tests of the ring: submission, completion, ownership on error paths,
//! registered buffers.

use super::fixed::{FIXED_BUF_MAX, FIXED_BUF_OVERLAP, fixed_buffers};
use super::*;
use crate::runtime::block_on;
use std::io::Write;

#[test]
fn read_write_fsync_round_trip() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[7u8; 8192]).unwrap();
    let fd = f.as_raw_fd();
    block_on(async move {
        let ring = Ring::current().unwrap();
        let (r, buf) = ring.read(fd, 4096, vec![0u8; 4096], 4096).await;
        assert_eq!(r.unwrap(), 4096);
        assert!(buf.iter().all(|&b| b == 7));
        let (r, _) = ring.write(fd, 100, vec![9u8; 10], 10).await;
        assert_eq!(r.unwrap(), 10);
        ring.fsync(fd, true).await.0.unwrap();
        let (r, buf) = ring.read(fd, 96, vec![0u8; 16], 16).await;
        assert_eq!(r.unwrap(), 16);
        assert_eq!(&buf[..], &[7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 7, 7]);
    });
    drop(f);
}

#[test]
fn many_concurrent_ops_share_submissions() {
    let mut f = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i / 4096) as u8).collect();
    f.write_all(&data).unwrap();
    let fd = f.as_raw_fd();
    block_on(async move {
        let ring = Ring::current().unwrap();
        let before = ring.stats();
        let mut tasks = Vec::new();
        for i in 0..256u64 {
            let ring = ring.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let (r, buf) = ring.read(fd, i * 4096, vec![0u8; 4096], 4096).await;
                assert_eq!(r.unwrap(), 4096);
                assert!(buf.iter().all(|&b| b == i as u8));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let after = ring.stats();
        assert_eq!(after.ops - before.ops, 256);
        // Batched: one enter call per SUBMIT_BATCH operations (and
        // one for a tail), far fewer than operations.
        let calls = after.submit_calls - before.submit_calls;
        assert!(
            calls <= u64::from(256 / SUBMIT_BATCH) + 1,
            "{before:?} {after:?}"
        );
    });
    drop(f);
}

#[test]
fn dropped_ops_keep_their_buffers_until_completion() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[1u8; 65536]).unwrap();
    let fd = f.as_raw_fd();
    block_on(async move {
        let ring = Ring::current().unwrap();
        for i in 0..64 {
            // Dropped right after submission.
            drop(ring.read(fd, i * 1024, vec![0u8; 1024], 1024));
        }
        let (r, _) = ring.read(fd, 0, vec![0u8; 16], 16).await;
        assert_eq!(r.unwrap(), 16);
    });
    drop(f);
}

#[test]
fn errors_come_back_as_io_errors() {
    block_on(async {
        let ring = Ring::current().unwrap();
        let (r, _) = ring.read(-1, 0, vec![0u8; 16], 16).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    });
}

/// A read buffer whose lifetime the test can see.
struct Tracked {
    buf: Vec<u8>,
    _alive: Rc<()>,
}

impl AsMut<[u8]> for Tracked {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

fn tracked(alive: &Rc<()>, len: usize) -> Tracked {
    Tracked {
        buf: vec![0u8; len],
        _alive: alive.clone(),
    }
}

/// A file of 4 KiB blocks, block `i` filled with `i`.
fn blocks_file(n: u8) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    for i in 0..n {
        f.write_all(&[i; 4096]).unwrap();
    }
    f
}

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(f).poll(&mut cx)
}

#[test]
fn submit_failures_leave_entries_queued_and_their_buffers_owned() {
    let f = blocks_file(16);
    let fd = f.as_raw_fd();
    block_on(async move {
        let ring = Ring::current().unwrap();
        let inner = ring.inner.clone();
        inner
            .inject
            .borrow_mut()
            .extend([Inject::Fail(libc::EAGAIN); 64]);
        let alive = Rc::new(());
        let mut ops: Vec<_> = (0..16u64)
            .map(|i| ring.read(fd, i * 4096, tracked(&alive, 4096), 4096))
            .collect();
        // Every enter failed: all sixteen are still queued, none done.
        assert_eq!(inner.count(|s| *s == State::Queued), 16);
        assert_eq!(inner.count(|s| matches!(s, State::Done(_))), 0);
        for op in &mut ops {
            assert!(poll_once(op).is_pending(), "resolved while queued");
        }
        // Half of the futures go away: their buffers stay with the ring.
        let kept: Vec<_> = ops.drain(8..).collect();
        drop(ops);
        assert_eq!(Rc::strong_count(&alive), 17, "no buffer freed early");
        // EBUSY and EINTR keep them queued as well; a partial enter
        // takes only the first entries.
        *inner.inject.borrow_mut() = [
            Inject::Fail(libc::EBUSY),
            Inject::Fail(libc::EINTR),
            Inject::Partial(5),
        ]
        .into();
        assert!(inner.submit().is_err(), "EBUSY is reported to the caller");
        assert_eq!(inner.count(|s| *s == State::Queued), 16);
        inner.submit().unwrap();
        assert_eq!(inner.count(|s| *s == State::Queued), 0);
        // Every read gets its own block.
        for (i, op) in (8..16u8).zip(kept) {
            let (r, buf) = op.await;
            assert_eq!(r.unwrap(), 4096);
            assert!(buf.buf.iter().all(|&b| b == i), "block {i}");
        }
        for _ in 0..100 {
            if Rc::strong_count(&alive) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(Rc::strong_count(&alive), 1, "orphans freed on completion");
    });
    drop(f);
}

#[test]
fn a_full_submission_queue_fails_only_the_entry_that_did_not_fit() {
    let f = blocks_file(1);
    let fd = f.as_raw_fd();
    block_on(async move {
        let ring = Ring::current().unwrap();
        let inner = ring.inner.clone();
        inner
            .inject
            .borrow_mut()
            .extend([Inject::Fail(libc::EBUSY); 1024]);
        let alive = Rc::new(());
        let ops: Vec<_> = (0..RING_ENTRIES)
            .map(|i| ring.read(fd, u64::from(i % 8) * 512, tracked(&alive, 512), 512))
            .collect();
        assert_eq!(inner.count(|s| *s == State::Queued), RING_ENTRIES as usize);
        // No room and the kernel takes nothing: this one fails at once,
        // and only this one (it never reached the queue).
        let mut extra = ring.read(fd, 0, tracked(&alive, 512), 512);
        match poll_once(&mut extra) {
            Poll::Ready((r, _)) => {
                assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBUSY))
            }
            Poll::Pending => panic!("an entry that was never queued must fail"),
        }
        assert_eq!(inner.count(|s| *s == State::Queued), RING_ENTRIES as usize);
        inner.inject.borrow_mut().clear();
        inner.submit_wanted.notify_one();
        for op in ops {
            let (r, buf) = op.await;
            assert_eq!(r.unwrap(), 512);
            assert!(buf.buf.iter().all(|&b| b == 0));
        }
        drop(extra);
        assert_eq!(Rc::strong_count(&alive), 1);
    });
    drop(f);
}

#[test]
fn a_stale_completion_never_reaches_the_slot_reused_since() {
    let f = blocks_file(2);
    let fd = f.as_raw_fd();
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 fills the two descriptors it is given.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: the read end is fresh and ours.
    let rx = unsafe { OwnedFd::from_raw_fd(pipe[0]) };
    // SAFETY: the write end is fresh and ours.
    let tx = unsafe { OwnedFd::from_raw_fd(pipe[1]) };
    block_on(async move {
        let ring = Ring::current().unwrap();
        let (r, _) = ring.read(fd, 4096, vec![0u8; 16], 16).await;
        assert_eq!(r.unwrap(), 16);
        // The next operation reuses the slot; it waits on an empty pipe.
        let mut waiting = ring.read(rx.as_raw_fd(), 0, vec![0u8; 4], 4);
        assert!(poll_once(&mut waiting).is_pending());
        // Let the submitter hand it to the kernel.
        tokio::task::yield_now().await;
        assert_eq!(ring.inner.count(|s| *s == State::InKernel), 1);
        let (key, generation) = {
            let slots = ring.inner.slots.borrow();
            (waiting.key, slots[waiting.key].generation)
        };
        // A completion carrying the slot's previous user_data arrives.
        let stale = opcode::Nop::new()
            .build()
            .user_data(user_data(key, generation.wrapping_sub(1)));
        {
            let mut r = ring.inner.ring.borrow_mut();
            // SAFETY: a nop points at no memory.
            unsafe { r.submission().push(&stale) }.unwrap();
            r.submit().unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            poll_once(&mut waiting).is_pending(),
            "an older operation's completion reached the reused slot"
        );
        // SAFETY: writing 4 bytes from a valid buffer to our pipe.
        let n = unsafe { libc::write(tx.as_raw_fd(), b"qblk".as_ptr().cast(), 4) };
        assert_eq!(n, 4);
        let (r, buf) = waiting.await;
        assert_eq!(r.unwrap(), 4);
        assert_eq!(&buf, b"qblk");
    });
    drop(f);
}

#[test]
fn big_regions_are_cut_into_overlapping_buffers() {
    let gib = 1usize << 30;
    let base = 0x7f00_0000_0000usize;
    let bufs = fixed_buffers(&[
        ((base + 4 * gib) as *mut u8, 4096),
        (base as *mut u8, 2 * gib + 8192),
    ])
    .unwrap();
    let step = FIXED_BUF_MAX - FIXED_BUF_OVERLAP;
    assert_eq!(
        bufs,
        vec![
            (base, gib),
            (base + step, gib),
            (base + 2 * step, 2 * gib + 8192 - 2 * step),
            (base + 4 * gib, 4096),
        ]
    );
    let fixed = Fixed {
        bufs,
        _keep: Box::new(()),
    };
    // Every 1 MiB transfer of the big region lies inside one buffer,
    // including those across a cut.
    for at in [
        0,
        step - 1,
        gib - (1 << 20),
        gib - 4096,
        2 * step + 1,
        2 * gib + 8192 - (1 << 20),
    ] {
        let i = fixed.find(base + at, 1 << 20).expect("covered") as usize;
        let (start, len) = fixed.bufs[i];
        assert!(
            start <= base + at && base + at + (1 << 20) <= start + len,
            "{at}"
        );
    }
    assert_eq!(fixed.find(base + 4 * gib, 4096), Some(3));
    assert_eq!(fixed.find(base + 4 * gib, 4097), None);
    assert_eq!(fixed.find(base + 2 * gib + 8192 - 1, 2), None);
    assert_eq!(fixed.find(base - 1, 1), None);
    assert_eq!(fixed.find(usize::MAX, 2), None);
}
