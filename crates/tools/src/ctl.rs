//! `qblk ctl`: a small QMP client for the daemon's control socket (or any
//! QMP socket: qemu-storage-daemon's, QEMU's), for operators and scripts.
//!
//! `qblk ctl SOCKET COMMAND [KEY=VALUE ...]` sends one command after the
//! capabilities negotiation and prints its result as indented JSON (or
//! nothing for an empty one). Values that read as JSON (numbers, `true`,
//! `false`, `null`, arrays, objects) are sent as such, anything else as a
//! string; a single argument that is a JSON object is taken whole as the
//! arguments. An error reply is printed as `CLASS: DESC` and is an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::{Error, Result};

/// The arguments object of `KEY=VALUE` words (or one JSON object).
pub fn arguments(words: &[String]) -> Result<Map<String, Value>> {
    if let [one] = words {
        if one.trim_start().starts_with('{') {
            return match serde_json::from_str(one) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) | Err(_) => Err(Error::Usage(format!(
                    "'{one}' is not a JSON object of arguments"
                ))),
            };
        }
    }
    let mut m = Map::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(Error::Usage(format!(
                "'{w}': arguments are KEY=VALUE (or one JSON object)"
            )));
        };
        let value = match serde_json::from_str::<Value>(v) {
            Ok(j) if !j.is_string() => j,
            _ => Value::String(v.to_owned()),
        };
        m.insert(k.to_owned(), value);
    }
    Ok(m)
}

fn io<'a>(socket: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(socket, op, e)
}

/// Sends `command` with `args` to the QMP socket and returns its result.
pub fn execute(socket: &Path, command: &str, args: Map<String, Value>) -> Result<Value> {
    let stream = UnixStream::connect(socket).map_err(io(socket, "connect"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(io(socket, "set a timeout"))?;
    let mut out = stream.try_clone().map_err(io(socket, "clone"))?;
    let mut lines = BufReader::new(stream);
    let mut read = || -> Result<Value> {
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line).map_err(io(socket, "read"))? == 0 {
                return Err(Error::Usage(format!(
                    "{}: the server hung up",
                    socket.display()
                )));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| Error::Usage(format!("{}: not QMP: {e}: {line}", socket.display())))?;
            // Events may come between replies.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = read()?;
    if greeting.get("QMP").is_none() {
        return Err(Error::Usage(format!(
            "{}: no QMP greeting: {greeting}",
            socket.display()
        )));
    }
    let mut send = |v: Value| -> Result<()> {
        let mut bytes = serde_json::to_vec(&v).expect("JSON encodes");
        bytes.push(b'\n');
        out.write_all(&bytes).map_err(io(socket, "write"))
    };
    send(json!({"execute": "qmp_capabilities"}))?;
    reply(read()?)?;
    send(json!({"execute": command, "arguments": args}))?;
    reply(read()?)
}

fn reply(v: Value) -> Result<Value> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let e = &v["error"];
    Err(Error::Usage(format!(
        "{}: {}",
        e["class"].as_str().unwrap_or("Error"),
        e["desc"].as_str().unwrap_or("(no description)")
    )))
}

/// The result as printed: nothing for `{}`, else indented JSON.
pub fn render(v: &Value) -> String {
    if v.as_object().is_some_and(Map::is_empty) {
        return String::new();
    }
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_that_read_as_json_are_sent_as_json() {
        let m = arguments(&words(&[
            "node=disk",
            "granularity=65536",
            "persistent=true",
            "name=7x",
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"node": "disk", "granularity": 65536, "persistent": true, "name": "7x"})
        );
        let m = arguments(&words(&[r#"{"bitmaps": ["a"], "target": "b"}"#])).unwrap();
        assert_eq!(m["bitmaps"], json!(["a"]));
        assert!(arguments(&words(&["novalue"])).is_err());
        assert!(arguments(&words(&["{not json"])).is_err());
    }
}
