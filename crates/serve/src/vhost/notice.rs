//! Telling a frontend that the configuration space changed (a live
//! `block_resize`): `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend
//! request channel. The frontend answers by reading the configuration with
//! `GET_CONFIG` on the main channel and, if the capacity moved, raising a
//! config interrupt in the guest.
//!
//! What QEMU (7.2 and later) does with the notice decides when it is sent:
//! - it drops it while its vhost device is not started, and otherwise
//!   reads the configuration only when it first connects. So the notice
//!   goes out when the capacity changes while a ring runs, and again
//!   whenever a ring starts and the frontend's last `GET_CONFIG` showed a
//!   capacity other than the current one (a resize while the guest
//!   rebooted, or one whose notice was dropped);
//! - it reads the configuration *before* acking the notice, on its main
//!   thread, while the protocol thread must answer. So the notice is sent
//!   from a thread of its own, holding nothing the protocol thread needs;
//!   it waits for the ack (when REPLY_ACK was negotiated) there.
//!
//! vhost 0.18 has no sender for the message; qblk's patch of the crate
//! adds one (`vendor/vhost/QBLK-PATCH.md`). Frontends that set up no
//! backend channel (cloud-hypervisor before its PR #8824) never hear of a
//! resize: the guest sees the new size when it next probes the device.

use crate::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// No `GET_CONFIG` covering the capacity was answered yet.
const UNSEEN: u64 = u64::MAX;

/// One connection's notices.
#[derive(Default)]
pub(crate) struct ConfigNotice {
    channel: Mutex<Option<Backend>>,
    /// Capacity in sectors the frontend last read.
    seen: AtomicU64,
    /// Some ring runs: the frontend's device is started.
    started: AtomicBool,
    /// Notices sent (for tests and logs).
    sent: AtomicU64,
}

impl std::fmt::Debug for ConfigNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigNotice")
            .field("channel", &lock(&self.channel).is_some())
            .field("seen", &self.seen)
            .field("started", &self.started)
            .field("sent", &self.sent)
            .finish()
    }
}

impl ConfigNotice {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: AtomicU64::new(UNSEEN),
            ..Self::default()
        })
    }

    /// SET_BACKEND_REQ_FD: the channel to send notices on.
    pub(crate) fn set_channel(&self, backend: Backend) {
        *lock(&self.channel) = Some(backend);
    }

    /// GET_CONFIG answered with `capacity` (sectors).
    pub(crate) fn config_read(&self, capacity: u64) {
        self.seen.store(capacity, Ordering::Release);
    }

    /// Whether some ring runs; when one starts, the frontend hears of a
    /// capacity it has not read.
    pub(crate) fn set_started(&self, started: bool, capacity: u64) {
        let was = self.started.swap(started, Ordering::AcqRel);
        // A frontend that has not read the configuration yet reads it
        // when it sets the device up.
        if started && !was && self.seen.load(Ordering::Acquire) != UNSEEN {
            self.notify_if_stale(capacity);
        }
    }

    /// The capacity changed to `capacity` sectors.
    pub(crate) fn capacity_changed(&self, capacity: u64) {
        if self.started.load(Ordering::Acquire) {
            self.notify_if_stale(capacity);
        } else {
            debug!("capacity changed while the device is stopped: notice at its next start");
        }
    }

    fn notify_if_stale(&self, capacity: u64) {
        if self.seen.load(Ordering::Acquire) == capacity {
            return;
        }
        let Some(channel) = lock(&self.channel).clone() else {
            info!(
                "the frontend set up no backend channel: the guest sees the new size when it next probes the disk"
            );
            return;
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("qblk-notice".into())
            .spawn(move || match channel.handle_config_change() {
                Ok(_) => debug!(capacity, "config change notice acknowledged"),
                Err(e) => warn!("config change notice failed: {e}"),
            });
        if let Err(e) = spawned {
            warn!("cannot start a thread for the config change notice: {e}");
        }
    }

    /// Notices sent so far.
    #[allow(dead_code)]
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}
