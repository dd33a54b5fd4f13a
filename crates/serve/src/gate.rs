//! The gate every guest request passes on its way into the disk, so the
//! control side can drain and hold them: a live snapshot, a resize, a
//! stopped device (`--werror stop`, QMP `stop`).
//!
//! A request holds a [`Pass`] while it is inside the disk. [`Gate::pause`]
//! closes the gate and waits until no pass is out; requests arriving
//! meanwhile wait at the gate (still in flight for the guest, nothing
//! started in the engine) until the last [`Paused`] guard is dropped.
//! Passing an open gate costs two atomic read-modify-writes and a load.
//!
//! [`Gate::stop`] closes it too, without draining and without a guard,
//! until [`Gate::resume`]: the device is stopped (after an I/O error, or
//! by the operator). Requests held after an error wait outside the gate,
//! holding no pass, so a pause meanwhile does not wait for them; when
//! they are retried they go in with [`Gate::enter_retry`], which only a
//! pause holds back, so they run before the requests that arrived while
//! the device was stopped.

use crate::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Gate {
    /// Requests inside the disk.
    inside: AtomicU64,
    /// Holders of a [`Paused`] guard (the gate is closed while non-zero).
    closers: AtomicU64,
    /// The device is stopped: closed to new requests (not to retries).
    stopped: AtomicBool,
    /// Woken when `inside` reaches zero while the gate is closed.
    drained: (Mutex<()>, Condvar),
    /// Woken when the gate opens.
    opened: Notify,
}

/// A request's way through the gate; dropping it leaves.
#[derive(Debug)]
pub struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The gate held closed, with nothing inside; dropping it reopens.
#[derive(Debug)]
pub struct Paused<'a> {
    gate: &'a Gate,
    /// How long the drain took.
    pub drain: Duration,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.gate.reopen();
    }
}

impl Paused<'_> {
    /// Keeps the gate closed past this guard, until [`Gate::reopen_kept`]:
    /// the disk was handed over to another daemon (`blockdev-set-active`).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Gate {
    /// A gate closed from the start, as if by a kept [`Paused`] guard: the
    /// device of a daemon started inactive.
    pub fn closed() -> Self {
        let g = Self::default();
        g.closers.store(1, Ordering::SeqCst);
        g
    }

    /// Lets go of the closing of [`Paused::keep`] or [`Gate::closed`].
    pub fn reopen_kept(&self) {
        self.reopen();
    }

    /// Waits until the gate is open and goes in.
    pub async fn enter(&self) -> Pass<'_> {
        self.enter_when(true).await
    }

    /// Waits until no pause holds the gate and goes in, even while the
    /// device is stopped: a held request's retry.
    pub async fn enter_retry(&self) -> Pass<'_> {
        self.enter_when(false).await
    }

    fn shut(&self, heed_stop: bool) -> bool {
        self.closers.load(Ordering::SeqCst) > 0 || heed_stop && self.stopped.load(Ordering::SeqCst)
    }

    async fn enter_when(&self, heed_stop: bool) -> Pass<'_> {
        loop {
            self.inside.fetch_add(1, Ordering::SeqCst);
            if !self.shut(heed_stop) {
                return Pass(self);
            }
            // Closed: step back out and wait for it to open. The waiter is
            // registered before looking again, so an opening in between is
            // not missed.
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            self.leave();
            if !self.shut(heed_stop) {
                continue;
            }
            opened.await;
        }
    }

    /// Closes the gate to new requests until [`Gate::resume`]; requests
    /// inside go on. Whether it was open to them before.
    pub fn stop(&self) -> bool {
        !self.stopped.swap(true, Ordering::SeqCst)
    }

    /// Opens the gate closed by [`Gate::stop`] (a pause still holds it).
    pub fn resume(&self) {
        self.stopped.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Whether [`Gate::stop`] holds the gate closed.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn leave(&self) {
        if self.inside.fetch_sub(1, Ordering::SeqCst) == 1
            && self.closers.load(Ordering::SeqCst) > 0
        {
            let _g = lock(&self.drained.0);
            self.drained.1.notify_all();
        }
    }

    /// Closes the gate and waits up to `timeout` for the requests inside
    /// to leave. On timeout the gate opens again and the number still
    /// inside is the error.
    pub fn pause(&self, timeout: Duration) -> Result<Paused<'_>, u64> {
        let began = Instant::now();
        self.closers.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.drained.0);
        loop {
            let inside = self.inside.load(Ordering::SeqCst);
            if inside == 0 {
                drop(g);
                return Ok(Paused {
                    gate: self,
                    drain: began.elapsed(),
                });
            }
            let Some(left) = timeout.checked_sub(began.elapsed()) else {
                drop(g);
                self.reopen();
                return Err(inside);
            };
            // Bounded waits: a leave that raced the closing may have
            // skipped the notification.
            g = self
                .drained
                .1
                .wait_timeout(g, left.min(Duration::from_millis(1)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn reopen(&self) {
        if self.closers.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Retries go in now; new requests only if not stopped (they
            // look again).
            self.opened.notify_waiters();
        }
    }

    /// Whether the gate is closed to new requests (paused or stopped).
    pub fn is_closed(&self) -> bool {
        self.shut(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn pause_waits_for_requests_inside_and_holds_new_ones() {
        let gate = Arc::new(Gate::default());
        let pass = rt().block_on(gate.enter());
        // A request is inside: the drain times out and the gate reopens.
        assert_eq!(gate.pause(Duration::from_millis(20)).err(), Some(1));
        assert!(!gate.is_closed());

        let g = gate.clone();
        let paused_at = Arc::new(AtomicBool::new(false));
        let p = paused_at.clone();
        let pauser = std::thread::spawn(move || {
            let paused = g.pause(Duration::from_secs(10)).expect("drained");
            p.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            drop(paused);
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !paused_at.load(Ordering::SeqCst),
            "paused with a request inside"
        );
        drop(pass);
        while !paused_at.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Closed: a new request waits until the pauser lets go.
        let g = gate.clone();
        let entered = std::thread::spawn(move || {
            let _pass = rt().block_on(g.enter());
            paused_at.load(Ordering::SeqCst)
        });
        pauser.join().unwrap();
        assert!(entered.join().unwrap());
        assert!(!gate.is_closed());
        assert_eq!(gate.inside.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn requests_never_run_while_paused() {
        let gate = Arc::new(Gate::default());
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (gate, paused, stop) = (gate.clone(), paused.clone(), stop.clone());
                std::thread::spawn(move || {
                    let rt = rt();
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let _pass = rt.block_on(gate.enter());
                        assert!(!paused.load(Ordering::SeqCst), "inside while paused");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..200 {
            let p = gate.pause(Duration::from_secs(10)).expect("drained");
            paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            paused.store(false, Ordering::SeqCst);
            drop(p);
        }
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            assert!(w.join().unwrap() > 0);
        }
    }

    #[test]
    fn a_stopped_gate_holds_new_requests_but_not_retries_and_pauses_at_once() {
        let gate = Arc::new(Gate::default());
        assert!(gate.stop());
        assert!(!gate.stop(), "stopped already");
        // A pause does not wait for anything: nothing is inside.
        let p = gate
            .pause(Duration::from_millis(100))
            .expect("nothing inside");
        drop(p);
        assert!(gate.is_closed() && gate.is_stopped(), "still stopped");
        let g = gate.clone();
        let entered = Arc::new(AtomicBool::new(false));
        let e = entered.clone();
        let waiter = std::thread::spawn(move || {
            let _pass = rt().block_on(g.enter());
            e.store(true, Ordering::SeqCst);
        });
        // A retry goes in while stopped; a new request does not.
        drop(rt().block_on(gate.enter_retry()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "went in while stopped");
        gate.resume();
        waiter.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert!(!gate.is_closed());
    }
}
