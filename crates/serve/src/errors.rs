//! What a failed guest request does (`--werror`, `--rerror`: QEMU's
//! `BlockdevOnError`), and the device's run state: running, stopped after
//! an I/O error, or stopped by the operator (QMP `stop`, `cont`,
//! `query-status`).
//!
//! - `report` fails the request (VIRTIO_BLK_S_IOERR).
//! - `stop` holds it: the device stops (its [`Gate`] closes, so no new
//!   request goes into the disk; requests inside finish), the request
//!   waits *outside* the gate (it holds no pass: a snapshot or resize
//!   meanwhile does not wait for it), and `BLOCK_IO_ERROR` (action
//!   `stop`) and `STOP` are sent. `cont` retries every held request — in
//!   the order they first arrived, each queue's ahead of the requests
//!   that arrived there while the device was stopped (virtio orders
//!   nothing between requests in flight together, so across queues
//!   nothing more is promised) — and opens the gate (`RESUME`). A retry
//!   that fails again is held again.
//! - `enospc` stops when the error is a full file system (`nospace`),
//!   and reports otherwise. The default for writes, as for QEMU's
//!   `-drive`; `report` is the default for reads.
//! - `ignore` (QEMU completes the failed request as if it had succeeded)
//!   is refused: the guest would take lost writes, or reads of buffers
//!   nobody filled, for data.
//!
//! Writes mean every request that changes the disk, and flushes (as in
//! QEMU): write, write-zeroes, discard, flush.
//!
//! A failed fdatasync is not a full disk, whatever errno it came with:
//! the engine remembers it and fails every later flush until the image is
//! reopened ([`qblk_engine::file::SyncFailed`]), so a held flush that
//! `cont` retries fails again (and is held again under `stop`); its
//! `BLOCK_IO_ERROR` has `nospace: false` and a reason that says so.
//!
//! Held requests and the frontend: when a ring stops while requests are
//! held (or wait at the stopped gate) — the frontend disconnects, resets
//! the device, or the daemon is told to quit — the ring's drain does not
//! wait for them. A frontend with inflight tracking (QEMU's
//! vhost-user-blk) keeps them in its inflight region: they are left
//! unfinished there, and whoever serves that ring next (this daemon after
//! a reconnect, or a restarted one) runs them again. A device reset
//! empties the region (the guest starts over). Without an inflight
//! region they would never complete, so they fail with IOERR instead,
//! and so does a request held after a failed fdatasync in any case: a
//! new daemon would retry it on a fresh open of the image and report
//! durable what the kernel dropped.

use crate::lock;
use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::{Notify, oneshot};

use crate::disk::DiskError;
use crate::events::Events;
use crate::gate::Gate;

/// What a failed request does (QEMU's `BlockdevOnError`, without
/// `ignore` and `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fail the request.
    Report,
    /// Hold it and stop the device.
    Stop,
    /// Stop on a full file system, report anything else.
    Enospc,
}

impl OnError {
    /// QEMU's `-drive` default for writes.
    pub const WRITE_DEFAULT: OnError = OnError::Enospc;
    /// QEMU's `-drive` default for reads.
    pub const READ_DEFAULT: OnError = OnError::Report;

    /// Parses `--werror` (`write`) or `--rerror` values, with QEMU's
    /// names; the message says why a value is refused.
    pub fn parse(s: &str, write: bool) -> Result<OnError, String> {
        let (flag, allowed) = if write {
            ("--werror", "report, stop, enospc")
        } else {
            ("--rerror", "report, stop")
        };
        match s {
            "report" => Ok(OnError::Report),
            "stop" => Ok(OnError::Stop),
            "enospc" if write => Ok(OnError::Enospc),
            "enospc" => Err(format!(
                "{flag} enospc: a read never fails for want of space (as in QEMU, enospc is for writes); use one of {allowed}"
            )),
            "ignore" => Err(format!(
                "{flag} ignore is not supported: it completes a failed request as if it had succeeded, so the guest would take {} for data; use one of {allowed}",
                if write {
                    "a lost write"
                } else {
                    "a buffer nobody filled"
                }
            )),
            other => Err(format!(
                "{flag} '{other}' is not an error policy; use one of {allowed}"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Stop => "stop",
            OnError::Enospc => "enospc",
        }
    }
}

/// What is done with one failed request (`BLOCK_IO_ERROR`'s `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Report,
    Stop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Report => "report",
            Action::Stop => "stop",
        }
    }
}

/// The device's run state, in QEMU's `RunState` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Running,
    /// Stopped by a request's I/O error (`stop`, `enospc`).
    IoError,
    /// Stopped by the operator (QMP `stop`).
    Paused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::IoError => "io-error",
            Status::Paused => "paused",
        }
    }
}

/// Why a request failed, as far as the policies care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The file system is full: freeing space and retrying may succeed.
    NoSpace,
    /// An fdatasync failed, now or earlier: no retry can succeed until
    /// the image is reopened.
    SyncFailed,
    /// Anything else.
    Other,
}

impl Cause {
    pub fn of(e: &DiskError) -> Cause {
        if qblk_engine::file::sync_failure(e).is_some() {
            return Cause::SyncFailed;
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.raw_os_error() == Some(libc::ENOSPC) {
                    return Cause::NoSpace;
                }
            }
            source = s.source();
        }
        Cause::Other
    }
}

/// When a request arrived: its number on its queue (each queue counts
/// its own, so no counter is shared on the data path), and the queue.
/// Retries go in this order, which orders each queue's requests; virtio
/// orders nothing between requests in flight together, so the order
/// across queues does not matter.
pub type Arrival = (u64, usize);

/// The policies and the run state of one device.
#[derive(Debug)]
pub struct RunState {
    pub werror: OnError,
    pub rerror: OnError,
    state: Mutex<State>,
    /// Woken whenever the device stops.
    stopped: Notify,
}

#[derive(Debug, Default)]
struct State {
    status: Status,
    /// The held requests by arrival; sending lets one retry.
    held: BTreeMap<Arrival, oneshot::Sender<()>>,
}

/// A held request's place in the queue of retries. Dropped without a
/// retry (the ring stopped), it leaves the queue.
#[derive(Debug)]
pub struct Ticket<'a> {
    run: &'a RunState,
    arrival: Arrival,
    go: oneshot::Receiver<()>,
}

impl Ticket<'_> {
    /// Waits for `cont`.
    pub async fn retry(&mut self) {
        // An error means the sender is gone, which only `cont` does after
        // sending: either way, retry.
        let _ = (&mut self.go).await;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        lock(&self.run.state).held.remove(&self.arrival);
    }
}

impl RunState {
    pub fn new(werror: OnError, rerror: OnError) -> Self {
        Self {
            werror,
            rerror,
            state: Mutex::default(),
            stopped: Notify::new(),
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    /// Whether the device is stopped (after an error or by the operator).
    pub fn is_stopped(&self) -> bool {
        self.status() != Status::Running
    }

    /// How many requests are held.
    pub fn held(&self) -> usize {
        lock(&self.state).held.len()
    }

    /// A future woken at the next stop (register it, then look at
    /// [`RunState::is_stopped`]).
    pub fn stop_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.stopped.notified()
    }

    /// What the policy says about a request that failed with `cause`.
    pub fn action(&self, cause: Cause, write: bool) -> Action {
        let policy = if write { self.werror } else { self.rerror };
        match (policy, cause) {
            (OnError::Report, _) => Action::Report,
            (OnError::Stop, _) => Action::Stop,
            (OnError::Enospc, Cause::NoSpace) => Action::Stop,
            (OnError::Enospc, Cause::SyncFailed | Cause::Other) => Action::Report,
        }
    }

    /// Holds the request that arrived as `arrival` and stops the device
    /// (`STOP` if it was running).
    pub fn hold(&self, arrival: Arrival, gate: &Gate, events: &Events) -> Ticket<'_> {
        let (tx, go) = oneshot::channel();
        let was = {
            let mut s = lock(&self.state);
            s.held.insert(arrival, tx);
            std::mem::replace(&mut s.status, Status::IoError)
        };
        gate.stop();
        self.stopped.notify_waiters();
        if was == Status::Running {
            events.emit("STOP", serde_json::json!({}));
        }
        Ticket {
            run: self,
            arrival,
            go,
        }
    }

    /// QMP `stop`: no new request goes into the disk until `cont`.
    /// Whether the device was running.
    pub fn stop(&self, gate: &Gate, events: &Events) -> bool {
        {
            let mut s = lock(&self.state);
            if s.status != Status::Running {
                return false;
            }
            s.status = Status::Paused;
        }
        gate.stop();
        self.stopped.notify_waiters();
        events.emit("STOP", serde_json::json!({}));
        true
    }

    /// QMP `cont`: the held requests are retried, in the order they
    /// arrived and ahead of the requests waiting at the gate, which then
    /// opens. Returns how many were held (nothing happens if the device
    /// was running).
    pub fn cont(&self, gate: &Gate, events: &Events) -> usize {
        let held = {
            let mut s = lock(&self.state);
            if s.status == Status::Running {
                return 0;
            }
            s.status = Status::Running;
            std::mem::take(&mut s.held)
        };
        let n = held.len();
        // Retries enter even while the gate is stopped: woken first, they
        // are ahead of the requests the gate lets go below.
        for (_, go) in held {
            let _ = go.send(());
        }
        gate.resume();
        events.emit("RESUME", serde_json::json!({}));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_qemu_names_them_and_refuse_ignore() {
        assert_eq!(OnError::parse("stop", true), Ok(OnError::Stop));
        assert_eq!(OnError::parse("enospc", true), Ok(OnError::Enospc));
        assert_eq!(OnError::parse("report", false), Ok(OnError::Report));
        let e = OnError::parse("ignore", true).unwrap_err();
        assert!(e.contains("--werror ignore is not supported"), "{e}");
        let e = OnError::parse("enospc", false).unwrap_err();
        assert!(e.starts_with("--rerror enospc"), "{e}");
        let e = OnError::parse("halt", true).unwrap_err();
        assert!(e.contains("report, stop, enospc"), "{e}");
    }

    fn io(errno: i32) -> DiskError {
        DiskError::Raw {
            path: "r".into(),
            op: "write",
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn enospc_stops_on_a_full_disk_only_and_never_on_a_failed_sync() {
        let run = RunState::new(OnError::Enospc, OnError::Report);
        assert_eq!(Cause::of(&io(libc::ENOSPC)), Cause::NoSpace);
        assert_eq!(run.action(Cause::NoSpace, true), Action::Stop);
        assert_eq!(run.action(Cause::of(&io(libc::EIO)), true), Action::Report);
        let sync = DiskError::Raw {
            path: "r".into(),
            op: "flush",
            source: qblk_engine::file::SyncFailed {
                errno: libc::ENOSPC,
                earlier: false,
            }
            .into(),
        };
        assert_eq!(Cause::of(&sync), Cause::SyncFailed);
        assert_eq!(run.action(Cause::SyncFailed, true), Action::Report);
        let stop = RunState::new(OnError::Stop, OnError::Stop);
        assert_eq!(stop.action(Cause::SyncFailed, true), Action::Stop);
        assert_eq!(stop.action(Cause::Other, false), Action::Stop);
    }

    #[test]
    fn cont_retries_every_held_request_and_opens_the_gate() {
        let run = RunState::new(OnError::Stop, OnError::Report);
        let gate = Gate::default();
        let events = Events::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut late = run.hold((7, 0), &gate, &events);
        let mut early = run.hold((3, 0), &gate, &events);
        let dropped = run.hold((5, 0), &gate, &events);
        assert_eq!(run.status(), Status::IoError);
        assert!(gate.is_closed());
        drop(dropped);
        assert_eq!(run.held(), 2);
        // `stop` on a stopped device changes nothing.
        assert!(!run.stop(&gate, &events));
        assert_eq!(run.cont(&gate, &events), 2);
        assert_eq!(run.status(), Status::Running);
        assert!(!gate.is_closed());
        rt.block_on(async {
            early.retry().await;
            late.retry().await;
        });
        assert!(run.stop(&gate, &events));
        assert_eq!(run.status(), Status::Paused);
        assert_eq!(run.cont(&gate, &events), 0);
    }
}
