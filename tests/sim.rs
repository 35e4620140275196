//! The deterministic simulator (`blkmirror::sim`, docs/TESTING.md) as part of `make test`: a
//! fixed set of schedules that must keep every promise, the planted mistakes it must catch,
//! and the exact replay of a seed. `make sim` runs random seeds on top.
#![cfg(feature = "test-hooks")]

use blkmirror::repl::core::PlantedBugs;
use blkmirror::sim::{self, Scenario, SimConfig};

/// Schedules `make test` runs (`BLKMIRROR_SIM_SCHEDULES` overrides): seeds 1..=N, so CI runs
/// the same ones every time; `make sim` explores new ones.
fn schedules() -> u64 {
    std::env::var("BLKMIRROR_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Runs the seeds; returns a report line for each schedule that broke a promise, and what
/// the schedules went through, summed.
fn run_all(
    seeds: impl Iterator<Item = u64>,
    f: impl Fn(u64) -> SimConfig,
) -> (Vec<String>, sim::Stats) {
    let mut reached = sim::Stats::default();
    let failed = seeds
        .filter_map(|seed| {
            let out = sim::run(seed, &f(seed));
            reached.absorb(&out.stats);
            (!out.violations.is_empty()).then(|| {
                format!(
                    "seed {seed} ({:?}): {}\n  replay: BLKMIRROR_SIM_SEED={seed} make sim",
                    out.scenario,
                    out.violations.join("; ")
                )
            })
        })
        .collect();
    (failed, reached)
}

fn failures(seeds: impl Iterator<Item = u64>, f: impl Fn(u64) -> SimConfig) -> Vec<String> {
    run_all(seeds, f).0
}

/// Runs the seeds, each of which must keep every promise; returns what they went through.
fn all_pass(seeds: impl Iterator<Item = u64>, f: impl Fn(u64) -> SimConfig) -> sim::Stats {
    let (failed, reached) = run_all(seeds, f);
    assert!(
        failed.is_empty(),
        "{} schedules failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    reached
}

/// Every schedule keeps I1/I2, and the schedules reach the paths that only rough ones do:
/// partitions that swallow sets in flight (the link "up", no acknowledgement ever coming)
/// are ended by the stall watchdog; a journal of twice the largest write, full with only its
/// acknowledged tail in the way, rotates the tail out (crashes fall at every step of it); a
/// mirror that lost its state but not its volume is compared, not copied over. A path never
/// reached would prove nothing.
#[test]
fn every_schedule_keeps_the_promises() {
    let n = schedules();
    let (failed, reached) = run_all(1..=n, sim::config_for_seed);
    assert!(
        failed.is_empty(),
        "{} of {n} schedules violated a promise:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(
        reached.stalls >= n / 100,
        "the stall watchdog ended only {} sessions in {n} schedules",
        reached.stalls
    );
    assert!(
        reached.tail_rotations > 0,
        "no journal tail was rotated out"
    );
    assert!(
        reached.preseeded_compares > 0,
        "no mirror volume with unrecorded data was compared"
    );
    assert!(
        reached.history_points_checked >= n,
        "only {} history points were read back in {n} schedules",
        reached.history_points_checked
    );
    assert!(
        reached.verifies >= n / 2,
        "only {} online verifies finished in {n} schedules",
        reached.verifies
    );
    assert!(
        reached.folds > 0 && reached.staged_commits > 0 && reached.crashes_while_staged > 0,
        "the overflow ladder was not reached: {} folds, {} staged resyncs completed, {} \
         crashes while one was staged",
        reached.folds,
        reached.staged_commits,
        reached.crashes_while_staged
    );
    eprintln!(
        "{n} schedules: the stall watchdog ended {} sessions, {} journal tails rotated out, \
         {} unrecorded mirror volumes compared, {} journal folds, {} staged resyncs \
         completed, {} crashes while one was staged",
        reached.stalls,
        reached.tail_rotations,
        reached.preseeded_compares,
        reached.folds,
        reached.staged_commits,
        reached.crashes_while_staged
    );
}

/// The simulator must be able to fail: with a known mistake planted, it finds a violation
/// within a few dozen seeds.
fn caught(bugs: PlantedBugs) -> usize {
    failures(1..=60, |seed| SimConfig {
        bugs,
        ..sim::config_for_seed(seed)
    })
    .len()
}

#[test]
fn an_acknowledgement_applied_one_set_early_is_caught() {
    let n = caught(PlantedBugs {
        ack_one_set_early: true,
        ..Default::default()
    });
    assert!(
        n > 0,
        "the primary trimming one set early went unnoticed in 60 schedules"
    );
}

#[test]
fn a_set_acknowledged_before_its_sync_is_caught() {
    let n = caught(PlantedBugs {
        ack_before_sync: true,
        ..Default::default()
    });
    assert!(
        n > 0,
        "the mirror acknowledging unsynced sets went unnoticed in 60 schedules"
    );
}

#[test]
fn a_resync_applied_in_place_instead_of_staged_is_caught() {
    // Journals that overflow, so that resyncs run.
    let n = failures(1..=60, |seed| SimConfig {
        bugs: PlantedBugs {
            apply_resync_in_place: true,
            ..Default::default()
        },
        small_journal: true,
        on_full: blkmirror::journal::OnFull::Track,
        ..sim::config_for_seed(seed)
    })
    .len();
    assert!(
        n > 0,
        "the mirror applying a resync in place (not a prefix state meanwhile) went unnoticed \
         in 60 schedules"
    );
}

/// Blocks of the mirror's volume overwritten behind its back are found by the online verify
/// and mended by its repair (the mirror equals the primary at the end), while writes,
/// crashes and link faults go on; and the verify reports nothing else.
#[test]
fn a_corrupted_mirror_is_found_and_repaired_by_verify() {
    let reached = all_pass(1..=60, |seed| SimConfig {
        scenario: Scenario::CorruptMirror,
        ..sim::config_for_seed(seed)
    });
    assert!(
        reached.verify_differing_bytes > 0 && reached.verify_repaired_bytes > 0,
        "no verify found and repaired a corrupted chunk: {reached:?}"
    );
}

/// A verify that compares a chunk with a write still to be sent raises false alarms.
#[test]
fn a_verify_of_unsettled_chunks_is_caught() {
    let n = caught(PlantedBugs {
        verify_unsettled: true,
        ..Default::default()
    });
    assert!(
        n > 0,
        "a verify raising false alarms went unnoticed in 60 schedules"
    );
}

/// A verify that finds the corruption but repairs nothing leaves the mirror different.
#[test]
fn a_verify_that_repairs_nothing_is_caught() {
    // No crashes and no full disks: their comparisons would mend the rot too (and so do the
    // writes that land on a rotted block: many seeds, so that some rot outlives them).
    let n = failures(1..=300, |seed| SimConfig {
        scenario: Scenario::CorruptMirror,
        bugs: PlantedBugs {
            verify_forgets_differences: true,
            ..Default::default()
        },
        crash_rate: 0,
        full_disk_rate: 0,
        ..sim::config_for_seed(seed)
    })
    .len();
    assert!(
        n > 0,
        "a verify that repairs nothing went unnoticed in 60 schedules"
    );
}

/// The mirror's history saving a set's before-images after writing it (so they hold the new
/// content) is caught by the check of its points.
#[test]
fn a_history_saved_after_the_write_is_caught() {
    let n = caught(PlantedBugs {
        history_after_write: true,
        ..Default::default()
    });
    assert!(
        n > 0,
        "a history saved after the write went unnoticed in 60 schedules"
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 1234, 987_654_321] {
        let cfg = sim::config_for_seed(seed);
        let (a, b) = (sim::run(seed, &cfg), sim::run(seed, &cfg));
        assert_eq!(a.trace, b.trace, "seed {seed}: the traces differ");
        assert_eq!(format!("{:?}", a.stats), format!("{:?}", b.stats));
        assert_eq!(a.violations, b.violations);
    }
}

/// Each identity case of docs/IDENTITY.md, simulated on its own over many seeds: a lost
/// state directory on either side, a blank replacement disk on either side, a foreign
/// primary, a copy of the primary. No promise is broken, and the cases happen.
#[test]
fn every_identity_case_keeps_the_promises() {
    for scenario in Scenario::ALL {
        let failed = failures(1..=40, |seed| SimConfig {
            scenario,
            ..sim::config_for_seed(seed)
        });
        assert!(
            failed.is_empty(),
            "{scenario:?}: {} schedules failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    // The copy of the primary reached the point of being refused in some schedules.
    let refused = (1..=40)
        .filter(|&seed| {
            sim::run(
                seed,
                &SimConfig {
                    scenario: Scenario::SplitBrain,
                    ..sim::config_for_seed(seed)
                },
            )
            .stats
            .clone_refused
        })
        .count();
    assert!(refused > 0, "no schedule got as far as refusing the copy");
}

/// A primary that loses its dirty map while the mirror stages the resync from it cannot say
/// which regions the staged part still lacks: the mirror drops the staged sets and is
/// compared, never resumed into committing half a resync (I1, checked after every apply: the
/// window is a few applies long). Seed 29 once committed it.
#[test]
fn a_dirty_map_lost_mid_resync_never_commits_half_of_it() {
    let reached = all_pass(1..=150, |seed| SimConfig {
        scenario: Scenario::LostDirtyMap,
        check_every_applies: 1,
        ..sim::config_for_seed(seed)
    });
    assert!(
        reached.abandoned_stagings > 0,
        "no decision dropped a staged resync: {reached:?}"
    );
}

/// Planned switchovers back and forth under load (scenario Switchover): the primary is
/// demoted once its mirror acknowledged every write, the mirror promoted, replication
/// reverses and resumes without a copy (checked: the first decision after each switchover
/// resumes); crashes cut the role changes at each of their durable steps, and the site comes
/// back in the role its state file records. A forced promotion after the primary's site is
/// lost (scenario Disaster) continues exactly the state the mirror held (I1 at promotion),
/// and a new blank site becomes its mirror. I1 is checked after every apply.
#[test]
fn switchovers_and_forced_promotions_keep_the_promises() {
    let planned = all_pass(1..=120, |seed| SimConfig {
        scenario: Scenario::Switchover,
        check_every_applies: 1,
        ..sim::config_for_seed(seed)
    });
    assert!(planned.switchovers >= 120, "{planned:?}");
    assert!(planned.role_change_crashes > 20, "{planned:?}");
    let disaster = all_pass(1..=120, |seed| SimConfig {
        scenario: Scenario::Disaster,
        check_every_applies: 1,
        ..sim::config_for_seed(seed)
    });
    assert!(disaster.forced_promotions > 10, "{disaster:?}");
    assert!(disaster.writes_lost_to_disaster > 0, "{disaster:?}");
}

/// Failback (scenario Failback): the link is cut while the primary writes on, its host dies,
/// the mirror is promoted with --force and takes writes; the old primary comes back, saves
/// every write of its own since the two parted (checked byte by byte against the state they
/// both held), becomes the new primary's secondary, and keeps its old state until the staged
/// resync of both sides' changes ends (checked after every apply); then the pair converges.
/// Crashes cut the failback at each of its durable steps. In one schedule in two the admin
/// keeps the old primary's data instead: the promoted side gives its writes up (`resolve
/// --discard-local`), checked the same way.
#[test]
fn an_old_primary_fails_back_saving_its_own_writes() {
    let reached = all_pass(1..=200, |seed| SimConfig {
        scenario: Scenario::Failback,
        check_every_applies: 1,
        ..sim::config_for_seed(seed)
    });
    assert!(reached.failbacks >= 25, "{reached:?}");
    assert!(
        reached.promoted_gave_up >= 8,
        "the other way round too: {reached:?}"
    );
    assert!(reached.failback_saved_bytes > 0, "{reached:?}");
    assert!(reached.role_change_crashes > 5, "{reached:?}");
}

/// A Takeover overtaken by its decision (the simulated link reorders frames; QUIC would
/// not): the primary resumed without resyncing the given-up regions and its first journal
/// set would have landed on them. The secondary refuses any set but the resync's first, the
/// session starts again and the pair converges. Seed 1796497080838570547 once broke I1.
#[test]
fn a_journal_set_never_lands_on_writes_given_up() {
    let seed = 1796497080838570547;
    let out = sim::run(seed, &sim::config_for_seed(seed));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.scenario, Scenario::Failback);
    assert_eq!(out.stats.failbacks, 1, "{:?}", out.stats);
}

/// A verify's checksums overtaken by the set before them (the simulated link delayed set 54
/// by 20 ms; QUIC would not): the mirror answered them against a state without the write of
/// set 54 to that chunk, and the verify reported 16 KiB different where nothing was. The
/// checksums name the set they follow now: the mirror refuses them out of stream order, the
/// session starts again and the verify finds nothing. Seed 1796504585016706238 broke this.
#[test]
fn a_verify_never_compares_against_a_set_it_overtook() {
    let seed = 1796504585016706238;
    let out = sim::run(seed, &sim::config_for_seed(seed));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert!(out.stats.verifies >= 1, "{:?}", out.stats);
    assert_eq!(out.stats.verify_differing_bytes, 0, "{:?}", out.stats);
    assert!(
        out.trace.iter().any(|l| l.contains("out of stream order")),
        "the reordering is what this seed tests"
    );
}

/// A primary whose dirty map could not be saved is killed, restarted, and later switched over:
/// the comparison its lost map makes due must still be expected of it after the new primary
/// takes over the record of decisions (the simulator's waiver moved with them). Seed
/// 1796516613943686061 (failing syncs) broke this.
#[test]
fn a_lost_map_still_explains_its_comparison_after_a_switchover() {
    let seed = 1796516613943686061;
    let cfg = SimConfig {
        failing_syncs: true,
        ..sim::config_for_seed(seed)
    };
    let out = sim::run(seed, &cfg);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.scenario, Scenario::Switchover);
    assert!(out.stats.sync_faults >= 1, "{:?}", out.stats);
    assert!(
        out.trace
            .iter()
            .any(|l| l.contains("holds only the writes after")),
        "the comparison after the lost map is what this seed tests"
    );
}

/// A failed-back secondary that does not name the regions it gave up keeps its old writes
/// there after the resync: the pair never converges, and the simulator says so.
#[test]
fn a_failback_that_forgets_its_own_writes_is_caught() {
    let bugs = PlantedBugs {
        forget_takeover: true,
        ..Default::default()
    };
    let failed = failures(1..=200, |seed| SimConfig {
        scenario: Scenario::Failback,
        bugs,
        ..sim::config_for_seed(seed)
    });
    assert!(!failed.is_empty(), "the forgotten takeover went unnoticed");
}

/// A primary demoted before its mirror acknowledged every write, with a mirror that takes
/// the notice whatever it holds, is caught: the old primary's unacknowledged writes are not
/// the new primary's, and the pair never converges (refused as a split brain, not merged).
#[test]
fn a_demotion_before_every_write_is_acknowledged_is_caught() {
    let bugs = PlantedBugs {
        demote_unacknowledged: true,
        ..Default::default()
    };
    let failed = failures(1..=120, |seed| SimConfig {
        scenario: Scenario::Switchover,
        bugs,
        ..sim::config_for_seed(seed)
    });
    assert!(
        !failed.is_empty(),
        "the planted early demotion went unnoticed"
    );
}

/// Disks that fail syncs (EIO) for a while, on either host: every promise still holds. The
/// primary's journal folds at a failed sync (the FLUSH succeeds), a dirty map that cannot be
/// saved is dropped and the mirror compared instead, a mirror whose redo log failed a sync is
/// restarted by the admin once its disk works; schedules must reach both folds and failing
/// syncs, or they prove nothing.
#[test]
fn disks_that_fail_syncs_keep_the_promises() {
    let n = (schedules() / 2).max(1);
    let reached = all_pass(1..=n, |seed| SimConfig {
        failing_syncs: true,
        ..sim::config_for_seed(seed)
    });
    assert!(
        reached.sync_faults >= n / 20,
        "only {} disks failed syncs in {n} schedules",
        reached.sync_faults
    );
    assert!(reached.folds > 0, "no journal folded");
}
