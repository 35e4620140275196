//! The control socket (`STATE_DIR/control.sock`): one line in (`status`), one JSON document out.
//! `blkmirror status` is its client. Binding it is the daemon's job (`daemon::serve_control`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Answer on `listener` on a thread of its own.
pub fn serve(listener: UnixListener, status: StatusFn) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let status = status.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, &status) {
                            tracing::debug!("control client: {e}");
                        }
                    });
            }
        })?;
    Ok(())
}

fn answer(stream: UnixStream, status: &StatusFn) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let reply = match line?.trim() {
            "status" => status(),
            other => {
                serde_json::json!({ "error": format!("unknown command {other:?}; try: status") })
            }
        };
        serde_json::to_writer(&mut w, &reply)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Why `status` could not get a status document.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no daemon answers on {path}: {source} (is it running? its control socket is STATE_DIR/control.sock unless --control says otherwise)", path = .path.display())]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("{path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: the answer is not a status document: {reason}", path = .path.display())]
    BadReply { path: PathBuf, reason: String },
}

/// Ask a daemon for its status.
pub fn query(path: &Path) -> Result<serde_json::Value, QueryError> {
    let failed = |source: io::Error| {
        use io::ErrorKind::*;
        let path = path.to_path_buf();
        match source.kind() {
            // No socket, a stale one, a daemon that dies or hangs while asked.
            NotFound | ConnectionRefused | ConnectionReset | BrokenPipe | UnexpectedEof
            | WouldBlock | TimedOut => QueryError::NotRunning { path, source },
            _ => QueryError::Io { path, source },
        }
    };
    let s = UnixStream::connect(path).map_err(failed)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(failed)?;
    let mut w = s.try_clone().map_err(failed)?;
    w.write_all(b"status\n").map_err(failed)?;
    let mut line = String::new();
    if BufReader::new(s).read_line(&mut line).map_err(failed)? == 0 {
        return Err(failed(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed the connection without answering",
        )));
    }
    serde_json::from_str(&line).map_err(|e| QueryError::BadReply {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The volumes of a status document that should be replicating and are not, each with why
/// (`status` exits non-zero on any). A volume is replicating when its `state` says so, or,
/// where there is no `state` (or the mirror's older "consistent"), when its link is up and it
/// holds a complete copy: no `initial_copy` in progress (primary), `consistent` (mirror).
/// Volumes with `replicated: false` (a primary without --mirror) do not count.
pub fn not_replicating(doc: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for vol in doc["volumes"].as_array().into_iter().flatten() {
        if vol["replicated"] == false {
            continue;
        }
        let name = vol["name"].as_str().unwrap_or("?").to_string();
        let why = match vol["state"].as_str() {
            Some("replicating") => None,
            Some(state) if state != "consistent" => Some(format!("state: {state}")),
            _ if vol["link"] != "up" => Some(format!(
                "link {}",
                vol["link"].as_str().unwrap_or("unknown")
            )),
            _ if vol.get("initial_copy").is_some_and(|c| !c.is_null()) => {
                Some("initial copy in progress".to_string())
            }
            _ if vol.get("consistent").is_some_and(|c| c != true) => {
                Some("not consistent".to_string())
            }
            _ => None,
        };
        if let Some(why) = why {
            out.push((name, why));
        }
    }
    out
}

/// A human-readable rendering of a status document.
pub fn render(v: &serde_json::Value) -> String {
    let mut out = format!("role: {}\n", v["role"].as_str().unwrap_or("?"));
    let cols = [
        "name",
        "link",
        "lag_seconds",
        "lag_bytes",
        "journal_bytes",
        "sent_bytes",
        "wire_bytes",
        "acked_set",
        "applied_set",
        "reconnects",
        "consistent",
    ];
    out.push_str(&cols.join("  "));
    out.push('\n');
    for vol in v["volumes"].as_array().into_iter().flatten() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match &vol[*c] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&cells.join("  "));
        out.push('\n');
        if let Some(e) = vol["last_error"].as_str().filter(|e| !e.is_empty()) {
            out.push_str(&format!("  last error: {e}\n"));
        }
        if let Some(p) = vol.get("initial_copy").filter(|p| !p.is_null()) {
            out.push_str(&format!(
                "  initial copy: {} / {} bytes\n",
                p["done_bytes"], p["total_bytes"]
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(doc: serde_json::Value) -> Vec<String> {
        not_replicating(&doc).into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn which_volumes_are_not_replicating() {
        let primary = json!({ "role": "primary", "volumes": [
            { "name": "plain", "link": "none", "replicated": false },
            { "name": "ok", "replicated": true, "link": "up", "initial_copy": null },
            { "name": "down", "replicated": true, "link": "down", "initial_copy": null },
            { "name": "copying", "replicated": true, "link": "up",
              "initial_copy": { "done_bytes": 1, "total_bytes": 2 } },
            { "name": "stated", "replicated": true, "link": "up", "initial_copy": null,
              "state": "refused" },
            { "name": "says-so", "replicated": true, "link": "down", "state": "replicating" },
        ]});
        assert_eq!(names(primary), ["down", "copying", "stated"]);
        let mirror = json!({ "role": "mirror", "volumes": [
            { "name": "ok", "link": "up", "consistent": true, "state": "consistent" },
            { "name": "down", "link": "down", "consistent": true, "state": "consistent" },
            { "name": "behind", "link": "up", "consistent": false,
              "state": "initial copy not complete: NOT consistent" },
            { "name": "no-state", "link": "up", "consistent": false },
        ]});
        assert_eq!(names(mirror), ["down", "behind", "no-state"]);
        assert!(names(json!({ "role": "primary", "volumes": [] })).is_empty());
    }
}
