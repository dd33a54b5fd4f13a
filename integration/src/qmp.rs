//! A QMP client for the tests of `qblk serve --control`: raw JSON lines,
//! with the events the daemon sends between replies kept aside.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QMP client on a raw socket.
#[allow(missing_debug_implementations)]
pub struct Qmp {
    out: UnixStream,
    lines: BufReader<UnixStream>,
    /// Events read while waiting for a reply, oldest first.
    events: VecDeque<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> (Qmp, Value) {
        let s = UnixStream::connect(path).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut q = Qmp {
            out: s.try_clone().expect("clone"),
            lines: BufReader::new(s),
            events: VecDeque::new(),
        };
        let greeting = q.message();
        (q, greeting)
    }

    /// The next message, event or not.
    fn message(&mut self) -> Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("read a reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// The next reply; events met on the way are kept for [`Qmp::event`].
    pub fn read(&mut self) -> Value {
        loop {
            let m = self.message();
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return m;
            }
        }
    }

    /// Waits up to `timeout` for the event named `name` (events before it
    /// are dropped) and returns it.
    pub fn event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["event"] == name {
                    return Some(e);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.lines
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            let mut line = String::new();
            let got = self.lines.read_line(&mut line);
            self.lines
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            match got {
                Ok(n) if n > 0 => {
                    let m: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("message {line:?}: {e}"));
                    if m.get("event").is_some() {
                        self.events.push_back(m);
                    }
                }
                _ => return None,
            }
        }
    }

    pub fn raw(&mut self, bytes: &[u8]) -> Value {
        self.out.write_all(bytes).expect("send");
        self.read()
    }

    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let req = json!({"execute": execute, "arguments": arguments, "id": execute});
        let r = self.raw(&serde_json::to_vec(&req).expect("json"));
        assert_eq!(r["id"], execute, "{r}");
        r
    }

    pub fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let r = self.cmd(execute, arguments);
        assert!(r.get("return").is_some(), "{execute}: {r}");
        r["return"].clone()
    }

    pub fn err(&mut self, execute: &str, arguments: Value) -> (String, String) {
        let r = self.cmd(execute, arguments);
        let e = &r["error"];
        assert!(e.is_object(), "{execute} should fail: {r}");
        (
            e["class"].as_str().unwrap_or("").to_owned(),
            e["desc"].as_str().unwrap_or("").to_owned(),
        )
    }

    /// Whether the daemon has closed the connection (nothing but events
    /// left to read).
    pub fn hung_up(&mut self) -> bool {
        loop {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) if line.contains("\"event\"") => continue,
                _ => return false,
            }
        }
    }
}
