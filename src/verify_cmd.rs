//! `blkmirror verify`: start an online verify on a primary (its control socket's `verify`
//! command), follow it in the status document, and sum it up. Exit codes: 0 both sides hold
//! the same bytes, 8 differences were found by a verify that finished (repaired with
//! `--repair`: the summary says how much), 6 the verify could not run or finish (link lost,
//! a resync running, chunks that never settled: what it found so far is still printed), 7 a
//! verify of the other kind (with or without repair) runs, 4 no daemon answers, 2 usage.
//! With `--json`, stdout always holds one JSON document, also when it is refused.

use crate::control::{self, human_bytes, QueryError};
use crate::exit::Exit;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often the status is read while a verify runs, and how often progress is shown.
const POLL: Duration = Duration::from_millis(250);
const SHOW_EVERY: Duration = Duration::from_secs(2);

/// Run it; the exit code and, on failure, what to print.
pub fn run(
    socket: &Path,
    volume: Option<&str>,
    repair: bool,
    json_out: bool,
) -> Result<Exit, (Exit, String)> {
    let query_failed = |e: QueryError| (e.exit_code(), format!("verify: {e}"));
    let mut command = String::from("verify");
    if repair {
        command.push_str(" --repair");
    }
    if let Some(v) = volume {
        command.push(' ');
        command.push_str(v);
    }
    let started = control::request(socket, &command).map_err(query_failed)?;
    if let Some(err) = started["error"].as_str() {
        let code = match started["code"].as_str() {
            Some("usage") => Exit::Usage,
            Some("not-replicating") => Exit::Degraded,
            Some("busy") => Exit::Busy,
            _ => Exit::Internal,
        };
        if json_out {
            println!(
                "{}",
                json!({ "error": err, "code": started["code"], "volumes": [] })
            );
        }
        return Err((code, format!("verify: {err}")));
    }
    let runs: Vec<(String, u64)> = started["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?.to_string(), v["run"].as_u64()?)))
        .collect();
    for v in started["volumes"].as_array().into_iter().flatten() {
        if v["result"] == "already" {
            eprintln!(
                "verify: {}: a verify runs already (run {}): following it",
                v["name"].as_str().unwrap_or("?"),
                v["run"]
            );
        }
    }
    let t0 = Instant::now();
    let mut shown = Instant::now();
    let mut last_seen: Vec<Value> = vec![Value::Null; runs.len()];
    let finished = loop {
        std::thread::sleep(POLL);
        let doc = match control::query(socket) {
            Ok(d) => d,
            Err(e) => {
                // The daemon went away: what was found so far still counts.
                report(&runs, &last_seen, t0.elapsed().as_secs_f64(), json_out);
                return Err(query_failed(e));
            }
        };
        let entries: Vec<Value> = runs
            .iter()
            .map(|(name, run)| {
                doc["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == name.as_str())
                    .map(|v| v["verify"].clone())
                    .filter(|v| v["run"] == *run)
                    .unwrap_or(Value::Null)
            })
            .collect();
        let running = entries
            .iter()
            .any(|e| matches!(e["state"].as_str(), Some("starting" | "running")));
        last_seen.clone_from(&entries);
        if !running {
            break entries;
        }
        if shown.elapsed() >= SHOW_EVERY {
            shown = Instant::now();
            for ((name, _), e) in runs.iter().zip(&entries) {
                eprintln!("verify: {name}: {}", progress_line(e));
            }
        }
    };
    let (differences, incomplete) = report(&runs, &finished, t0.elapsed().as_secs_f64(), json_out);
    // A verify that did not finish says only what it saw so far: never "differences found"
    // (a script would take a repair that stopped midway for a done one).
    Ok(if incomplete {
        Exit::Degraded
    } else if differences {
        Exit::Differences
    } else {
        Exit::Ok
    })
}

/// Print each volume's summary (or the JSON document); returns (differences found, some
/// verify did not finish or left chunks unverified).
fn report(runs: &[(String, u64)], entries: &[Value], secs: f64, json_out: bool) -> (bool, bool) {
    let mut differences = false;
    let mut incomplete = false;
    let mut report = Vec::new();
    for ((name, run), e) in runs.iter().zip(entries) {
        let state = e["state"].as_str().unwrap_or("lost");
        let differing = e["differing_bytes"].as_u64().unwrap_or(0);
        differences |= differing > 0;
        incomplete |= state != "done" || e["unverified_range_count"].as_u64().unwrap_or(0) > 0;
        if !json_out {
            println!("{name}: {}", summary_line(e, secs));
            for r in e["differing_ranges"].as_array().into_iter().flatten() {
                println!(
                    "  differs: offset {} length {}",
                    r["offset"],
                    human_bytes(r["length"].as_u64().unwrap_or(0))
                );
            }
        }
        let mut entry = if e.is_null() {
            json!({ "state": "lost" })
        } else {
            e.clone()
        };
        entry["name"] = json!(name);
        entry["run"] = json!(run);
        entry["seconds"] = json!(secs);
        report.push(entry);
    }
    if json_out {
        println!(
            "{}",
            json!({ "volumes": report, "differences": differences, "complete": !incomplete })
        );
    }
    (differences, incomplete)
}

fn progress_line(e: &Value) -> String {
    let (done, total) = (
        e["compared_bytes"].as_u64().unwrap_or(0),
        e["total_bytes"].as_u64().unwrap_or(0),
    );
    let pct = if total > 0 {
        done as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    let rate = e["rate_bytes_per_second"].as_f64().unwrap_or(0.0);
    let eta = e["eta_seconds"]
        .as_f64()
        .map_or("?".to_string(), |s| format!("{s:.0} s"));
    format!(
        "{pct:.0}% ({} of {}), {}/s, ETA {eta}, {} differing",
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64),
        human_bytes(e["differing_bytes"].as_u64().unwrap_or(0))
    )
}

fn summary_line(e: &Value, secs: f64) -> String {
    let compared = human_bytes(e["compared_bytes"].as_u64().unwrap_or(0));
    let differing = e["differing_bytes"].as_u64().unwrap_or(0);
    let unverified = e["unverified_range_count"].as_u64().unwrap_or(0);
    let mut line = match e["state"].as_str() {
        Some("done") if differing == 0 => {
            format!("identical ({compared} compared in {secs:.1} s)")
        }
        Some("done") => format!(
            "{} in {} range(s) DIFFER ({compared} compared in {secs:.1} s)",
            human_bytes(differing),
            e["differing_range_count"]
        ),
        Some("interrupted") => format!(
            "verify interrupted after {compared}: {}",
            e["interrupted_by"].as_str().unwrap_or("?")
        ),
        _ => "the verify's result is gone (was the daemon restarted?)".to_string(),
    };
    if e["repair"] == true && differing > 0 {
        line.push_str(&format!(
            "; repaired {}",
            human_bytes(e["repaired_bytes"].as_u64().unwrap_or(0))
        ));
    }
    if unverified > 0 {
        line.push_str(&format!(
            "; {unverified} range(s) kept changing and were not verified"
        ));
    }
    line
}
