//! `make sim`: schedules of the deterministic simulator (`blkmirror::sim`), from random seeds
//! or from one given seed. Prints one line per failing seed (with the command that replays
//! it) and, last, `N schedules, V violations`. Exit status 0 when no schedule failed, 1 when
//! one did, 2 for a bad argument.
//!
//! Environment: `SEEDS` (schedules to run, default 15000: about 5 minutes on 2 cores),
//! `BLKMIRROR_SIM_SEED` (replay that one seed, with its trace), `BLKMIRROR_SIM_STEPS`
//! (steps per schedule, default 3000), `BLKMIRROR_SIM_BUG` (plant a known mistake:
//! `ack-one-set-early`, `ack-before-sync`, `apply-resync-in-place`, `verify-unsettled`,
//! `verify-forgets-differences`, `history-after-write`, `demote-unacknowledged` or `forget-takeover`, to see the simulator catch it),
//! `BLKMIRROR_SIM_SCENARIO` (only the seeds of that scenario, by name: `Switchover`, ...),
//! `BLKMIRROR_SIM_FAILING_SYNCS` (`1`: disks may fail syncs in every schedule, `0`: in
//! none; by default in every odd seed's).

use blkmirror::repl::core::PlantedBugs;
use blkmirror::sim;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn env_u64(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

/// What the schedules covered, summed.
#[derive(Default)]
struct Totals {
    stats: sim::Stats,
    /// Schedules whose copy of the primary was refused.
    split_brains: u64,
    scenarios: std::collections::BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, out: &sim::Outcome) {
        self.stats.absorb(&out.stats);
        self.split_brains += u64::from(out.stats.clone_refused);
        *self
            .scenarios
            .entry(format!("{:?}", out.scenario))
            .or_default() += 1;
    }

    fn line(&self) -> String {
        use blkmirror::repl::frame::Mode;
        let s = &self.stats;
        let decided = |m: Mode| s.decisions.iter().filter(|&&d| d == m).count();
        let scenarios: Vec<String> = self
            .scenarios
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "covered: {} writes, crashes primary {} mirror {}, partitions {}; decisions: \
             resume {}, full copy {}, compare {} (of unrecorded mirror data {}); copies \
             of the primary refused {}; stalls ended {}; journal tails rotated out {}; \
             journal folds {}, staged resyncs completed {}, crashes while staged {}; \
             verifies {} (differing {} B, repaired {} B); history points checked {}; \
             disks failing syncs {}; \
             switchovers {}, forced promotions {} (writes lost {}), failbacks {} (saved {} B; {} kept the old primary's data), \
             role changes cut by a crash {}; schedules: {}",
            s.writes,
            s.primary_crashes,
            s.mirror_crashes,
            s.partitions,
            decided(Mode::Resume),
            decided(Mode::FullCopy),
            decided(Mode::Compare),
            s.preseeded_compares,
            self.split_brains,
            s.stalls,
            s.tail_rotations,
            s.folds,
            s.staged_commits,
            s.crashes_while_staged,
            s.verifies,
            s.verify_differing_bytes,
            s.verify_repaired_bytes,
            s.history_points_checked,
            s.sync_faults,
            s.switchovers,
            s.forced_promotions,
            s.writes_lost_to_disaster,
            s.failbacks,
            s.failback_saved_bytes,
            s.promoted_gave_up,
            s.role_change_crashes,
            scenarios.join(", ")
        )
    }
}

fn main() -> ExitCode {
    // BLKMIRROR_LOG=debug shows the daemons' own log lines (for replaying one seed).
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BLKMIRROR_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let parsed = (|| -> Result<(Option<u64>, u64, usize, PlantedBugs), String> {
        let bugs = match std::env::var("BLKMIRROR_SIM_BUG").as_deref() {
            Err(_) | Ok("") => PlantedBugs::default(),
            Ok("ack-one-set-early") => PlantedBugs {
                ack_one_set_early: true,
                ..Default::default()
            },
            Ok("ack-before-sync") => PlantedBugs {
                ack_before_sync: true,
                ..Default::default()
            },
            Ok("demote-unacknowledged") => PlantedBugs {
                demote_unacknowledged: true,
                ..Default::default()
            },
            Ok("forget-takeover") => PlantedBugs {
                forget_takeover: true,
                ..Default::default()
            },
            Ok("history-after-write") => PlantedBugs {
                history_after_write: true,
                ..Default::default()
            },
            Ok("verify-unsettled") => PlantedBugs {
                verify_unsettled: true,
                ..Default::default()
            },
            Ok("verify-forgets-differences") => PlantedBugs {
                verify_forgets_differences: true,
                ..Default::default()
            },
            Ok("apply-resync-in-place") => PlantedBugs {
                apply_resync_in_place: true,
                ..PlantedBugs::default()
            },
            Ok(other) => return Err(format!("BLKMIRROR_SIM_BUG={other:?}: unknown")),
        };
        Ok((
            env_u64("BLKMIRROR_SIM_SEED")?,
            env_u64("SEEDS")?.unwrap_or(15_000),
            env_u64("BLKMIRROR_SIM_STEPS")?.unwrap_or(3000) as usize,
            bugs,
        ))
    })();
    let (one, count, steps, bugs) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("blkmirror-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let seeds: Vec<u64> = match one {
        Some(s) => vec![s],
        None => {
            let base = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            (0..count)
                .map(|i| base.wrapping_add(i * 0x9E37_79B9))
                .collect()
        }
    };
    let only = std::env::var("BLKMIRROR_SIM_SCENARIO").ok();
    if let Some(name) = &only {
        if !sim::Scenario::ALL.iter().any(|s| format!("{s:?}") == *name) {
            eprintln!("blkmirror-sim: BLKMIRROR_SIM_SCENARIO={name:?}: unknown");
            return ExitCode::from(2);
        }
    }
    // Disks that fail syncs in every odd seed's schedule, unless the environment says.
    let failing_syncs = std::env::var("BLKMIRROR_SIM_FAILING_SYNCS").ok();
    let mut violations = 0;
    let mut totals = Totals::default();
    let mut ran = 0u64;
    for &seed in &seeds {
        let mut cfg = sim::config_for_seed(seed);
        cfg.failing_syncs = match failing_syncs.as_deref() {
            Some(v) => v == "1",
            None => seed % 2 == 1,
        };
        if one.is_none() {
            if let Some(name) = &only {
                if format!("{:?}", cfg.scenario) != *name {
                    continue;
                }
            }
        }
        ran += 1;
        cfg.steps = steps;
        cfg.bugs = bugs;
        let out = match std::panic::catch_unwind(|| sim::run(seed, &cfg)) {
            Ok(out) => out,
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                sim::Outcome {
                    seed,
                    scenario: cfg.scenario,
                    violations: vec![format!("panicked: {what}")],
                    stats: Default::default(),
                    trace: Vec::new(),
                }
            }
        };
        if one.is_some() {
            println!("{:?} {:?}", out.scenario, out.stats);
            for line in &out.trace {
                println!("  {line}");
            }
        }
        totals.add(&out);
        if !out.violations.is_empty() {
            violations += out.violations.len();
            // The replay names the failing-syncs switch when the environment set it.
            let env = failing_syncs.as_deref().map_or(String::new(), |v| {
                format!("BLKMIRROR_SIM_FAILING_SYNCS={v} ")
            });
            println!(
                "seed {seed} ({:?}) FAILED: {}\n  replay: {env}BLKMIRROR_SIM_SEED={seed} make sim",
                out.scenario,
                out.violations.join("\n  ")
            );
        }
    }
    println!("{}", totals.line());
    println!(
        "{ran} schedules, {violations} violations ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    if violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
