//! QMP events: what happened to the disk, told to every control client
//! that has negotiated capabilities, as QEMU tells them (`{"event": NAME,
//! "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`).
//!
//! Anything may emit — a queue worker that saw an I/O error, the control
//! thread that resized the disk — and none of them waits for a client: an
//! event goes into a bounded queue, and one delivery thread writes it to
//! the subscribed sockets. A full queue drops the event (counted and
//! logged); a client that does not read for [`WRITE_TIMEOUT`] is hung up.

use crate::lock;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tracing::warn;

/// Events waiting for the delivery thread.
const QUEUE_LEN: usize = 1024;

/// How long a write to one client may block before it is hung up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A control client's socket, shared by its own thread (replies) and the
/// delivery thread (events) so their lines never interleave.
pub type Out = Arc<Mutex<UnixStream>>;

/// Writes one QMP message (a JSON line) to a client.
pub fn send(out: &Out, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    lock(out).write_all(&line)
}

/// The event source of one daemon.
#[derive(Debug)]
pub struct Events {
    queue: SyncSender<Value>,
    subscribers: Arc<Mutex<Vec<Weak<Mutex<UnixStream>>>>>,
    dropped: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// Starts the delivery thread (it ends when this is dropped).
    pub fn new() -> Self {
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let subscribers: Arc<Mutex<Vec<Weak<Mutex<UnixStream>>>>> = Arc::default();
        let subs = subscribers.clone();
        let spawned = std::thread::Builder::new()
            .name("qblk-events".into())
            .spawn(move || deliver(&rx, &subs));
        if let Err(e) = spawned {
            // Events are then dropped at the full queue; the daemon serves.
            warn!("cannot start the event thread, no events will be sent: {e}");
        }
        Self {
            queue,
            subscribers,
            dropped: AtomicU64::new(0),
        }
    }

    /// `out` hears every event from now on (until its socket fails or it
    /// is dropped).
    pub fn subscribe(&self, out: &Out) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(out));
    }

    /// Queues event `name` with `data`, stamped now. Never blocks.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n < 16 || n % 1000 == 0 {
                    warn!(
                        dropped = n + 1,
                        event = name,
                        "event queue full: event dropped"
                    );
                }
            }
        }
    }
}

fn deliver(rx: &Receiver<Value>, subscribers: &Mutex<Vec<Weak<Mutex<UnixStream>>>>) {
    for event in rx {
        let subs: Vec<Out> = lock(subscribers).iter().filter_map(Weak::upgrade).collect();
        for out in subs {
            if let Err(e) = send(&out, &event) {
                // A client that does not read its events is hung up; its
                // thread sees the end of its stream and finishes.
                warn!("control client not reading its events, hung up: {e}");
                let _ = lock(&out).shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn subscribers_hear_events_in_order_with_timestamps() {
        let events = Events::new();
        let (a, b) = UnixStream::pair().unwrap();
        let out: Out = Arc::new(Mutex::new(a));
        events.emit("BEFORE", json!({}));
        events.subscribe(&out);
        // The event before the subscription may or may not arrive; the
        // ones after it must, in order.
        std::thread::sleep(Duration::from_millis(50));
        events.emit("ONE", json!({"n": 1}));
        events.emit("TWO", json!({"n": 2}));
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut lines = BufReader::new(b).lines();
        let mut got = Vec::new();
        while got.len() < 2 {
            let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            if v["event"] != "BEFORE" {
                assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
                assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
                got.push(v);
            }
        }
        assert_eq!(got[0]["event"], "ONE");
        assert_eq!(got[1]["data"]["n"], 2);
    }
}
