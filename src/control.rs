//! The control socket (`STATE_DIR/control.sock`): one command per line in, one JSON document
//! per line out. `status` answers the status document; admin commands (`accept-volume NAME`,
//! `retry [NAME]`) answer `{"ok": true, "result": ..., "message": ...}` or `{"error": ...,
//! "code": ...}`. `blkmirror status`, `accept-volume` and `retry` are its clients. Binding it is
//! the daemon's job (`daemon::serve_control`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Answers one command (its words) with one JSON document.
pub type Handler = Arc<dyn Fn(&[&str]) -> serde_json::Value + Send + Sync>;

/// A handler that knows only `status`.
pub fn status_only(status: impl Fn() -> serde_json::Value + Send + Sync + 'static) -> Handler {
    Arc::new(move |words: &[&str]| match words {
        ["status"] => status(),
        other => unknown(other, "status"),
    })
}

/// The answer to a command the daemon does not know.
pub fn unknown(words: &[&str], known: &str) -> serde_json::Value {
    serde_json::json!({
        "error": format!("unknown command {:?}; this daemon knows: {known}", words.join(" ")),
        "code": "usage",
    })
}

pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Answer on `listener` on a thread of its own.
/// Answer commands on `listener` until `stop` is set (each client on its own thread).
pub fn serve(
    listener: UnixListener,
    handler: Handler,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => continue,
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                let handler = handler.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, &handler) {
                            tracing::debug!("control client: {e}");
                        }
                    });
            }
        })?;
    Ok(())
}

fn answer(stream: UnixStream, handler: &Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = handler(&words);
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
    request(path, "status")
}

/// Send one command to a daemon; its JSON answer.
pub fn request(path: &Path, command: &str) -> Result<serde_json::Value, QueryError> {
    request_waiting(path, command, Duration::from_secs(10))
}

/// [`request`] for a command that may take up to `wait` to answer (`demote`, `promote`).
pub fn request_waiting(
    path: &Path,
    command: &str,
    wait: Duration,
) -> Result<serde_json::Value, QueryError> {
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
    s.set_read_timeout(Some(wait)).map_err(failed)?;
    let mut w = s.try_clone().map_err(failed)?;
    w.write_all(format!("{command}\n").as_bytes())
        .map_err(failed)?;
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
        let link = vol["link"].as_str().unwrap_or("unknown");
        let why = match vol["state"].as_str() {
            // Writes cannot be journaled: the mirror falls behind (in track mode the writes
            // go on, their regions tracked; in block mode clients get errors).
            _ if vol["journal_error"].is_string() => Some(format!(
                "journal failing: {}",
                vol["journal_error"].as_str().unwrap_or_default()
            )),
            Some("replicating") => None,
            _ if link != "up" => Some(format!("link {link}")),
            Some(state) => Some(format!("state: {state}")),
            // A daemon from before the `state` key.
            None if vol.get("initial_copy").is_some_and(|c| !c.is_null()) => {
                Some("initial copy in progress".to_string())
            }
            None if vol.get("consistent").is_some_and(|c| c != true) => {
                Some("not consistent".to_string())
            }
            None => None,
        };
        if let Some(why) = why {
            out.push((name, why));
        }
    }
    out
}

/// A number of bytes as people read them: `1.2 GiB`, `350 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

/// A duration in seconds as people read it: `350 ms`, `4.2 s`, `3 min 20 s`, `2 h 5 min`.
pub fn human_seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, s as u64 % 60)
    } else {
        format!("{} h {} min", (s / 3600.0) as u64, s as u64 % 3600 / 60)
    }
}

/// A human-readable rendering of a status document: a table whose columns line up, sizes
/// and ages readable, then a line per volume that has something to say.
pub fn render(v: &serde_json::Value) -> String {
    let mut out = format!("role: {}\n", v["role"].as_str().unwrap_or("?"));
    if let Some(why) = v["not_serving_why"].as_str() {
        out.push_str(&format!("NOT serving its clients: {why}\n"));
    }
    let cols: [(&str, &str); 11] = [
        ("name", "VOLUME"),
        ("role", "ROLE"),
        ("disk_state", "DISK"),
        ("state", "STATE"),
        ("link", "LINK"),
        ("lag_seconds", "LAG"),
        ("lag_bytes", "LAG BYTES"),
        ("journal_bytes", "LOG"),
        ("acked_set", "ACKED SET"),
        ("applied_set", "APPLIED SET"),
        ("reconnects", "RECONNECTS"),
    ];
    let mut rows: Vec<Vec<String>> = vec![cols.iter().map(|(_, h)| h.to_string()).collect()];
    let vols: Vec<&serde_json::Value> = v["volumes"].as_array().into_iter().flatten().collect();
    for vol in &vols {
        rows.push(
            cols.iter()
                .map(|(key, _)| match (&vol[*key], *key) {
                    (serde_json::Value::Null, _) => "-".into(),
                    (serde_json::Value::String(s), _) => s.clone(),
                    (n, "lag_seconds") => n.as_f64().map_or("-".into(), human_seconds),
                    (n, "lag_bytes" | "journal_bytes") => {
                        n.as_u64().map_or("-".into(), human_bytes)
                    }
                    (other, _) => other.to_string(),
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..cols.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for vol in vols {
        let name = vol["name"].as_str().unwrap_or("?");
        if let Some(d) = vol["state_detail"].as_str().filter(|d| *d != "consistent") {
            out.push_str(&format!("  {name}: {d}\n"));
        }
        if let Some(e) = vol["last_error"].as_str().filter(|e| !e.is_empty()) {
            out.push_str(&format!("  {name}: last error: {e}\n"));
        }
        if let Some(e) = vol["journal_error"].as_str() {
            out.push_str(&format!("  {name}: journal: {e}\n"));
        }
        if let Some(p) = vol.get("initial_copy").filter(|p| !p.is_null()) {
            let what = match p["kind"].as_str() {
                Some("dirty") => "resync of dirty regions (the mirror stays consistent)",
                _ if p["compare"] == true => "comparison",
                _ => "full copy",
            };
            out.push_str(&format!(
                "  {name}: {what}: {} of {}{}\n",
                human_bytes(p["done_bytes"].as_u64().unwrap_or(0)),
                human_bytes(p["total_bytes"].as_u64().unwrap_or(0)),
                rate_and_eta(p)
            ));
        }
        if let Some(v) = vol.get("verify").filter(|v| !v.is_null()) {
            let differing = v["differing_bytes"].as_u64().unwrap_or(0);
            let state = v["state"].as_str().unwrap_or("?");
            let mut line = format!(
                "  {name}: verify {state}: {} of {} compared, {} differing",
                human_bytes(v["compared_bytes"].as_u64().unwrap_or(0)),
                human_bytes(v["total_bytes"].as_u64().unwrap_or(0)),
                human_bytes(differing)
            );
            if v["repair"] == true {
                line.push_str(&format!(
                    ", {} repaired",
                    human_bytes(v["repaired_bytes"].as_u64().unwrap_or(0))
                ));
            }
            if state == "running" {
                line.push_str(&rate_and_eta(v));
            }
            if let Some(why) = v["interrupted_by"].as_str() {
                line.push_str(&format!(" ({why})"));
            }
            out.push_str(&line);
            out.push('\n');
        }
        if let Some(t) = vol["newest_write_at"].as_str() {
            out.push_str(&format!(
                "  {name}: newest write held: {t} (received {})\n",
                vol["received_at"].as_str().unwrap_or("-")
            ));
        }
    }
    out
}

/// The answer of `history` as a table per volume: SET, TIME, BYTES (before-images kept for
/// going back to that point), oldest first.
pub fn render_history(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for vol in v["volumes"].as_array().into_iter().flatten() {
        let points = vol["points"].as_array().cloned().unwrap_or_default();
        out.push_str(&format!(
            "{}: {} point(s), history {} (keeps {}, at most {})\n",
            vol["name"].as_str().unwrap_or("?"),
            points.len(),
            human_bytes(vol["history_bytes"].as_u64().unwrap_or(0)),
            human_seconds(vol["keep_seconds"].as_f64().unwrap_or(0.0)),
            human_bytes(vol["max_bytes"].as_u64().unwrap_or(0)),
        ));
        let rows: Vec<[String; 3]> = points
            .iter()
            .map(|p| {
                [
                    p["set"].to_string(),
                    p["time"].as_str().unwrap_or("-").to_string(),
                    human_bytes(p["bytes"].as_u64().unwrap_or(0)),
                ]
            })
            .collect();
        let w = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(3);
        out.push_str(&format!("  {:<w$}  {:<24}  BYTES\n", "SET", "TIME"));
        for r in rows {
            out.push_str(&format!("  {:<w$}  {:<24}  {}\n", r[0], r[1], r[2]));
        }
    }
    out
}

/// `, 120 MiB/s, 35 s left` from a progress entry's `rate_bytes_per_second` and `eta_seconds`.
fn rate_and_eta(p: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(r) = p["rate_bytes_per_second"].as_f64() {
        out.push_str(&format!(", {}/s", human_bytes(r as u64)));
    }
    if let Some(eta) = p["eta_seconds"].as_f64() {
        out.push_str(&format!(", {} left", human_seconds(eta)));
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
            { "name": "no-journal", "replicated": true, "link": "up", "state": "replicating",
              "journal_error": "cannot append to the journal: No space left on device" },
        ]});
        assert_eq!(names(primary), ["down", "copying", "stated", "no-journal"]);
        let mirror = json!({ "role": "mirror", "volumes": [
            { "name": "ok", "link": "up", "consistent": true, "state": "replicating" },
            { "name": "down", "link": "down", "consistent": true, "state": "connecting" },
            { "name": "behind", "link": "up", "consistent": false, "state": "resyncing" },
            { "name": "no-state", "link": "up", "consistent": false },
        ]});
        assert_eq!(names(mirror), ["down", "behind", "no-state"]);
        assert!(names(json!({ "role": "primary", "volumes": [] })).is_empty());
    }

    #[test]
    fn sizes_and_ages_read_like_people_write_them() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(human_bytes(350 << 10), "350 KiB");
        assert_eq!(human_seconds(0.35), "350 ms");
        assert_eq!(human_seconds(4.25), "4.2 s");
        assert_eq!(human_seconds(200.0), "3 min 20 s");
        assert_eq!(human_seconds(7500.0), "2 h 5 min");
    }

    #[test]
    fn the_table_lines_up() {
        let doc = json!({ "role": "primary", "volumes": [
            { "name": "a-long-volume-name", "state": "replicating", "link": "up",
              "lag_seconds": 0.012, "lag_bytes": 0, "journal_bytes": 1_288_490_189u64,
              "acked_set": 12, "applied_set": 11, "reconnects": 0 },
            { "name": "b", "state": "connecting", "link": "down", "lag_seconds": null,
              "lag_bytes": 4096, "journal_bytes": 8192, "acked_set": 1, "applied_set": 1,
              "reconnects": 3, "last_error": "mirror refused: no",
              "journal_error": "cannot sync the journal: Input/output error" },
        ]});
        let text = render(&doc);
        let lines: Vec<&str> = text.lines().collect();
        let col = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(col(lines[1], "STATE"), col(lines[2], "replicating"));
        assert_eq!(col(lines[1], "STATE"), col(lines[3], "connecting"));
        assert_eq!(col(lines[1], "LOG"), col(lines[2], "1.2 GiB"));
        assert!(text.contains("12 ms"), "{text}");
        assert!(text.contains("b: last error: mirror refused: no"), "{text}");
        assert!(
            text.contains("b: journal: cannot sync the journal: Input/output error"),
            "{text}"
        );
    }

    /// A resync and a verify each get a line with what is done, the rate and what is left.
    #[test]
    fn resync_and_verify_show_rate_and_time_left() {
        let doc = json!({ "role": "primary", "volumes": [
            { "name": "v", "state": "resyncing", "link": "up",
              "initial_copy": { "kind": "dirty", "done_bytes": 1u64 << 30,
                "total_bytes": 3u64 << 30, "rate_bytes_per_second": 104_857_600.0,
                "eta_seconds": 20.5 },
              "verify": { "state": "running", "compared_bytes": 1u64 << 20,
                "total_bytes": 1u64 << 30, "differing_bytes": 4096, "repair": true,
                "repaired_bytes": 0, "rate_bytes_per_second": 1_048_576.0,
                "eta_seconds": 1023.0, "interrupted_by": null } },
        ]});
        let text = render(&doc);
        assert!(
            text.contains("v: resync of dirty regions (the mirror stays consistent): 1.0 GiB of 3.0 GiB, 100 MiB/s, 20.5 s left"),
            "{text}"
        );
        assert!(
            text.contains("v: verify running: 1.0 MiB of 1.0 GiB compared, 4.0 KiB differing, 0 B repaired, 1.0 MiB/s, 17 min 3 s left"),
            "{text}"
        );
    }
}
