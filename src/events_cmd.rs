//! `blkmirror events --control SOCK [--now]`: one JSON object per line for each change of what
//! a script waits for (role, serving, and per volume its role, peer's role, disk state,
//! replication state, link, consistency, resync progress by tenths, whether a promotion is
//! allowed, the last error), so that a script waits on a line instead of polling status itself.
//! First one `exists` line per item as it is now; `--now` stops there. Otherwise it follows the
//! daemon (asking its status every [`POLL`]; role changes keep the control socket) until the
//! daemon stops: then a last `gone` line, exit 4.
//!
//! Lines (keys are a contract): `{"time": RFC 3339, "type": "exists" | "change" | "gone",
//! "volume": NAME or null, "key": KEY, "value": ..., "old": ... (changes)}`.

use crate::control;
use crate::exit::Exit;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How often the daemon's status is read: a change shows within this.
pub const POLL: Duration = Duration::from_millis(200);

/// The items a status document has, keyed by (volume or "", key).
fn items(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for key in ["role", "serving", "changing_role"] {
        if !doc[key].is_null() {
            out.insert((String::new(), key.to_string()), doc[key].clone());
        }
    }
    for v in doc["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        for key in [
            "role",
            "peer_role",
            "disk_state",
            "state",
            "link",
            "consistent",
            "last_error",
        ] {
            if !v[key].is_null() {
                out.insert((name.clone(), key.to_string()), v[key].clone());
            }
        }
        if let Some(allowed) = v["promotion"]["allowed"].as_bool() {
            out.insert((name.clone(), "promotion_allowed".into()), allowed.into());
        }
        // A resync's progress, by tenths: enough to follow it, not a line per set.
        let copy = &v["initial_copy"];
        let progress = if copy.is_null() {
            Value::Null
        } else {
            let done = copy["done_bytes"].as_u64().unwrap_or(0);
            let total = copy["total_bytes"].as_u64().unwrap_or(0).max(1);
            json!({
                "kind": copy["kind"],
                "percent": (done * 10 / total).min(10) * 10,
            })
        };
        out.insert((name, "resync".into()), progress);
    }
    out
}

fn line(kind: &str, volume: &str, key: &str, value: &Value, old: Option<&Value>) -> Value {
    let now = crate::repl::core::primary::unix_ms(std::time::SystemTime::now());
    let mut l = json!({
        "time": crate::repl::mirror::fmt_time(now),
        "type": kind,
        "volume": if volume.is_empty() { Value::Null } else { volume.into() },
        "key": key,
        "value": value,
    });
    if let Some(o) = old {
        l["old"] = o.clone();
    }
    l
}

/// Run it; the exit code, or a failure with its code and message.
pub fn run(control: &Path, now: bool) -> Result<Exit, (Exit, String)> {
    let first = control::query(control).map_err(|e| (e.exit_code(), format!("events: {e}")))?;
    let mut out = std::io::stdout().lock();
    let mut emit = |l: Value| -> Result<(), (Exit, String)> {
        writeln!(out, "{l}")
            .and_then(|()| out.flush())
            // A reader that went away (a script done waiting) ends this quietly.
            .map_err(|_| (Exit::Ok, String::new()))
    };
    let mut seen = items(&first);
    for ((vol, key), value) in &seen {
        emit(line("exists", vol, key, value, None))?;
    }
    if now {
        return Ok(Exit::Ok);
    }
    loop {
        std::thread::sleep(POLL);
        let doc = match control::query(control) {
            Ok(d) => d,
            Err(e) => {
                emit(json!({
                    "time": crate::repl::mirror::fmt_time(crate::repl::core::primary::unix_ms(std::time::SystemTime::now())),
                    "type": "gone",
                    "volume": Value::Null,
                    "key": "daemon",
                    "value": e.to_string(),
                }))?;
                return Err((Exit::NotRunning, String::new()));
            }
        };
        let next = items(&doc);
        for (k, v) in &next {
            if seen.get(k) != Some(v) {
                emit(line(
                    "change",
                    &k.0,
                    &k.1,
                    v,
                    seen.get(k).or(Some(&Value::Null)),
                ))?;
            }
        }
        for (k, old) in &seen {
            if !next.contains_key(k) {
                emit(line("change", &k.0, &k.1, &Value::Null, Some(old)))?;
            }
        }
        seen = next;
    }
}
