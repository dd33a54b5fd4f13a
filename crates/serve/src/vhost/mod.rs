//! qblk's vhost-user backend layer: the protocol messages of one frontend
//! connection turned into device state (`handler.rs`), split virtqueues
//! (`vring.rs`), descriptor chains (`chain.rs`) and inflight I/O tracking
//! (`inflight.rs`). The socket framing, message validation and replies are
//! the vhost crate's (`BackendReqHandler`); everything after that is here.
//!
//! Why not vhost-user-backend: its request handler is private and answers
//! GET_INFLIGHT_FD with "not supported", and virtio-queue cannot build a
//! descriptor chain from a head found in an inflight region
//! (`DescriptorChain::new` is crate-private), so neither can survive a
//! backend crash. Owning the layer also drops the library's per-queue
//! epoll threads: a ring's kick eventfd goes straight to its queue worker
//! when the ring starts.

pub mod chain;
pub(crate) mod handler;
pub mod inflight;
pub(crate) mod log;
pub(crate) mod notice;
pub mod vring;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use tracing::debug;

/// A ring's call eventfd: how the guest hears of completions. The
/// frontend may replace it while the ring runs (QEMU does when it masks
/// and unmasks interrupt vectors), so the worker looks it up at each
/// notification.
#[derive(Debug, Default)]
pub(crate) struct Call {
    fd: Mutex<Option<File>>,
}

impl Call {
    /// Replaces the eventfd. It is made non-blocking: a counter the guest
    /// never drains (or a hostile frontend's full pipe) must not block a
    /// queue worker; such a write fails with EAGAIN, when an interrupt is
    /// pending anyway.
    pub(crate) fn set(&self, fd: Option<File>) {
        if let Some(f) = &fd {
            let raw = f.as_raw_fd();
            // SAFETY: fcntl on a descriptor we own, integer arguments only.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
            if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
                // SAFETY: as above.
                unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) };
            }
        }
        *crate::lock(&self.fd) = fd;
    }

    /// Interrupts the guest (if there is an eventfd to do it with).
    pub(crate) fn signal(&self) {
        let guard = crate::lock(&self.fd);
        if let Some(mut f) = guard.as_ref() {
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                debug!("cannot signal the call eventfd: {e}");
            }
        }
    }
}
