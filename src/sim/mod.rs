//! The deterministic simulator (TigerBeetle's VOPR is the model): one seed drives a primary
//! and a mirror through a random write workload with flushes, link faults (loss, duplication,
//! reordering, corruption, delay, partitions), full file systems and crashes of either host
//! (kill -9 or a power cut, restarted with what their storage kept), all in virtual time.
//! The real cores (`repl::core`), journal, redo log, applier rules and state files run over
//! `env::mem::MemFs` and `disk::MemDisk`; only the drivers are the simulator's.
//!
//! Checked on every schedule (docs/DESIGN.md):
//! - I1: whenever the mirror says it is consistent (after every recovery, and after applies),
//!   its volume is exactly the primary's state after a prefix of its writes: the one its
//!   generation and applied sequence number name ([`model::Model`]).
//! - Durability: after a crash of the mirror, every set it ever acknowledged is still there.
//! - Honesty: a decision never has to fall back to a comparison because the mirror lost what
//!   it had acknowledged.
//! - I2: once faults stop and writes end, both sides converge within a bounded virtual time
//!   and the mirror equals the primary, byte for byte.
//!
//! A failing seed replays exactly: `BLKMIRROR_SIM_SEED=S make sim`.

pub mod disk;
pub mod hosts;
pub mod link;
pub mod model;
pub mod rng;

use crate::repl::core::PlantedBugs;
use crate::repl::frame::Mode;
use hosts::{Clock, Crash, MirrorHost, PrimaryHost, VOLUME_BYTES};
use link::{Dir, Link};
use rng::Prng;
use std::time::Duration;

/// What a schedule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Random writes, faults and crashes.
    Random,
    /// The primary's state directory is lost while it is down (a reinstall).
    LostPrimaryState,
    /// The primary's volume is replaced by a blank disk while it is down; later an admin
    /// accepts it.
    BlankPrimaryDisk,
    /// Another primary (another disk, no shared history) connects to the mirror.
    ForeignPrimary,
    /// A copy of the primary's state and disk (another disk, as a cloned machine's image is)
    /// runs as a second primary: both write.
    SplitBrain,
    /// The mirror's volume is replaced by a blank disk while it is down.
    BlankMirrorDisk,
    /// The mirror's state directory is lost while it is down.
    LostMirrorState,
    /// The primary's dirty map is lost while it is down (a resync may be open: the journal
    /// no longer reaches back to the mirror's point).
    LostDirtyMap,
    /// Blocks of the mirror's volume rot (their content changes, nothing else shows it); an
    /// online verify with repair finds and mends them.
    CorruptMirror,
    /// Planned switchovers back and forth under load: the primary is demoted once its peer
    /// acknowledged every write, the mirror promoted, replication reverses; each role change
    /// may be cut by a crash at any of its durable steps.
    Switchover,
    /// The primary's site is lost for good; the mirror is promoted with `--force` (a staged
    /// resync dropped), takes writes, and a new blank site becomes its mirror.
    Disaster,
    /// The link is cut while the primary writes on (a tail the mirror never gets), then its
    /// host dies; the mirror is promoted with `--force` and takes writes. The old site comes
    /// back and fails back: its own writes saved, it becomes the new primary's secondary, and
    /// the staged resync of both sides' changes since they parted makes it a copy again.
    /// Every step may be cut by a crash.
    Failback,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::Random,
        Scenario::LostPrimaryState,
        Scenario::BlankPrimaryDisk,
        Scenario::ForeignPrimary,
        Scenario::SplitBrain,
        Scenario::BlankMirrorDisk,
        Scenario::LostMirrorState,
        Scenario::LostDirtyMap,
        Scenario::CorruptMirror,
        Scenario::Switchover,
        Scenario::Disaster,
        Scenario::Failback,
    ];
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Random steps before the quiet phase.
    pub steps: usize,
    /// Lost, duplicated, reordered, corrupted frames.
    pub link_faults: bool,
    /// Chances in 10,000 per step of each fault: a crash of each host, a partition, a file
    /// system filling up.
    pub crash_rate: u64,
    pub partition_rate: u64,
    pub full_disk_rate: u64,
    /// Of the crashes, how many in 100 are power cuts (the rest kill -9).
    pub power_cuts: u64,
    pub bugs: PlantedBugs,
    pub scenario: Scenario,
    /// A journal of twice the largest write (64 KiB, writes up to 32 KiB), as `--journal-size
    /// 64M` is to NBD's 32 MiB writes.
    pub small_journal: bool,
    /// What the primary's full journal does (`--on-journal-full`), and its dirty map's region.
    pub on_full: crate::journal::OnFull,
    pub region_bytes: u64,
    /// The mirror's state is checked against the model after every this many applies (each
    /// check reads the whole image: 1 catches a short-lived violation, 8 keeps suites quick).
    pub check_every_applies: u64,
    /// A file system that fills up may instead fail its next few syncs (EIO). Off in
    /// [`config_for_seed`], whose schedules the regression tests replay; `make sim` turns it on
    /// for every odd seed.
    pub failing_syncs: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            steps: 3000,
            link_faults: true,
            crash_rate: 40,
            partition_rate: 20,
            full_disk_rate: 20,
            power_cuts: 50,
            bugs: PlantedBugs::default(),
            scenario: Scenario::Random,
            small_journal: false,
            on_full: crate::journal::OnFull::Track,
            region_bytes: 4096,
            check_every_applies: 8,
            failing_syncs: false,
        }
    }
}

/// Counters of one schedule.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub steps: usize,
    pub writes: u64,
    pub primary_crashes: u64,
    pub mirror_crashes: u64,
    pub partitions: u64,
    /// Times a host's file system was made to fail its next syncs.
    pub sync_faults: u64,
    /// Sessions of the primary that the stall watchdog ended.
    pub stalls: u64,
    /// Acknowledged journal tails rotated out because they alone kept a write from fitting.
    pub tail_rotations: u64,
    /// Folds of a full (or failing) journal into the dirty map.
    pub folds: u64,
    /// Staged resyncs the mirror completed (applied at once).
    pub staged_commits: u64,
    /// Crashes of either host while the mirror held a staged resync.
    pub crashes_while_staged: u64,
    /// Staged resyncs a decision dropped unapplied (a copy, a comparison, a primary that lost
    /// the dirty map it would finish them from).
    pub abandoned_stagings: u64,
    /// Decisions to compare a mirror volume that held data it had no record of.
    pub preseeded_compares: u64,
    pub decisions: Vec<Mode>,
    pub virtual_ms: u64,
    pub frames: u64,
    pub frames_dropped: u64,
    /// The copy of the primary was refused (scenario SplitBrain).
    pub clone_refused: bool,
    /// Online verifies that finished, bytes they found different, bytes they repaired.
    pub verifies: u64,
    pub verify_differing_bytes: u64,
    pub verify_repaired_bytes: u64,
    /// History points read back and found exact.
    pub history_points_checked: u64,
    /// Role changes completed: planned switchovers, forced promotions; role changes cut by a
    /// crash at one of their durable steps (then finished or retried from what the site
    /// recorded); writes a forced promotion lost (the old primary's unshipped tail).
    pub switchovers: u64,
    pub forced_promotions: u64,
    pub role_change_crashes: u64,
    pub writes_lost_to_disaster: u64,
    /// Old primaries that failed back, and bytes of their own writes they saved.
    pub failbacks: u64,
    pub failback_saved_bytes: u64,
    /// Of the failbacks, how many gave the promoted side's writes up instead (the admin kept
    /// the old primary's data).
    pub promoted_gave_up: u64,
}

impl Stats {
    /// Add `other`'s counters to these (totals over schedules; `clone_refused` of a total
    /// says whether any schedule refused the copy).
    pub fn absorb(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.writes += other.writes;
        self.primary_crashes += other.primary_crashes;
        self.mirror_crashes += other.mirror_crashes;
        self.partitions += other.partitions;
        self.sync_faults += other.sync_faults;
        self.stalls += other.stalls;
        self.tail_rotations += other.tail_rotations;
        self.folds += other.folds;
        self.staged_commits += other.staged_commits;
        self.crashes_while_staged += other.crashes_while_staged;
        self.abandoned_stagings += other.abandoned_stagings;
        self.preseeded_compares += other.preseeded_compares;
        self.decisions.extend_from_slice(&other.decisions);
        self.virtual_ms += other.virtual_ms;
        self.frames += other.frames;
        self.frames_dropped += other.frames_dropped;
        self.clone_refused |= other.clone_refused;
        self.verifies += other.verifies;
        self.verify_differing_bytes += other.verify_differing_bytes;
        self.verify_repaired_bytes += other.verify_repaired_bytes;
        self.history_points_checked += other.history_points_checked;
        self.switchovers += other.switchovers;
        self.forced_promotions += other.forced_promotions;
        self.role_change_crashes += other.role_change_crashes;
        self.writes_lost_to_disaster += other.writes_lost_to_disaster;
        self.failbacks += other.failbacks;
        self.failback_saved_bytes += other.failback_saved_bytes;
        self.promoted_gave_up += other.promoted_gave_up;
    }
}

/// How one schedule ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: Scenario,
    pub violations: Vec<String>,
    pub stats: Stats,
    /// The last lines both hosts logged (for a failure's report).
    pub trace: Vec<String>,
}

/// The virtual time allowed to converge once faults stop (a comparison of the whole volume
/// included, and a slow retry after a permanent refusal in the scenarios that expect one).
const CONVERGE_WITHIN: Duration = Duration::from_secs(3600);

struct World {
    rng: Prng,
    clock: Clock,
    link: Link,
    primary: PrimaryHost,
    mirror: MirrorHost,
    /// A second primary (the foreign or cloned one of a scenario).
    other: Option<PrimaryHost>,
    cfg: SimConfig,
    violations: Vec<String>,
    stats: Stats,
    /// Applies since the last I1 check.
    applies: u64,
    /// The admin means to accept the primary's changed volume (as soon as it runs).
    accept_pending: bool,
    /// Blocks of the mirror's volume overwritten behind its back (scenario CorruptMirror):
    /// the I1 checks look past them, a verify may report them.
    corrupted: std::collections::BTreeSet<u64>,
    /// Verifies of the primary already checked.
    verifies_checked: usize,
    /// A change of roles under way.
    switch: Option<Switch>,
    /// Role changes so far (new connection numbers and disks for each).
    epoch: u64,
    /// After a planned switchover: the decision at this index of the primary's must resume
    /// (a switchover copies nothing), unless a crash of the primary's host broke its journal
    /// since.
    expect_resume_at: Option<usize>,
    /// Scenario Failback: when the primary's host dies (the link was cut before, so that it
    /// has a tail of its own).
    failback_loss_at: Option<Duration>,
    /// The old primary after the promotion, until it has failed back (its site's mirror
    /// waits meanwhile).
    old_primary: Option<PrimaryHost>,
    /// The old primary's volume as it failed back: what the secondary must hold while the
    /// tail it gave up is still on it (until the staged resync's end).
    takeover_snapshot: Option<Vec<u8>>,
    /// Scenario Failback, one schedule in two: the admin keeps the old primary's data
    /// instead (`resolve --discard-local` on the promoted side, which gives up its writes
    /// since the promotion and becomes the old primary's secondary).
    keep_old_primary: bool,
    /// The primary's decisions from this index on may compare without anybody having lost
    /// data: a promoted side that gave its writes up had dropped, when promoted with
    /// --force, a staged resync the old primary had seen acknowledged.
    compares_expected_from: Option<usize>,
}

/// A change of roles under way (scenarios Switchover and Disaster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// `blkmirror demote` on the primary: its writes wait until its peer acknowledged them all.
    Demoting,
    /// `blkmirror promote` on the mirror (`--force` when the primary is lost) once it applied
    /// what it holds; `lost_site`: the old primary's site is gone, a new blank one becomes the
    /// mirror; `demoted`: the name the demoted primary gives its data, which it tells the
    /// mirror before the mirror may be promoted without `--force`.
    Promoting {
        force: bool,
        lost_site: bool,
        demoted: Option<(crate::repl::identity::GenId, u64)>,
    },
}

/// The schedule a seed stands for: mostly random ones; one seed in four is an identity
/// scenario (lost state, replaced disks, a foreign or cloned primary).
pub fn config_for_seed(seed: u64) -> SimConfig {
    let mut rng = Prng::new(seed ^ 0x5ce7_a210);
    let scenario = if rng.chance(1, 4) {
        Scenario::ALL[1 + rng.below(Scenario::ALL.len() as u64 - 1) as usize]
    } else {
        Scenario::Random
    };
    // How rough the schedule is: calm ones exercise the paths faults interrupt (resuming
    // after a blip), rough ones the recovery paths.
    let (link_faults, crash_rate, partition_rate, full_disk_rate, power_cuts) = match rng.below(4) {
        0 => (false, 0, 5, 0, 0),
        1 => (true, 5, 20, 5, 10),
        2 => (true, 20, 20, 20, 30),
        _ => (true, 40, 20, 20, 50),
    };
    let small_journal = rng.chance(1, 4) || scenario == Scenario::LostDirtyMap;
    let on_full = if rng.chance(1, 4) && scenario != Scenario::LostDirtyMap {
        crate::journal::OnFull::Block
    } else {
        crate::journal::OnFull::Track
    };
    let region_bytes = 4096 << rng.below(3);
    SimConfig {
        scenario,
        small_journal,
        on_full,
        region_bytes,
        link_faults,
        crash_rate,
        partition_rate,
        full_disk_rate,
        power_cuts,
        ..SimConfig::default()
    }
}

/// Run one schedule.
pub fn run(seed: u64, cfg: &SimConfig) -> Outcome {
    let clock = Clock::new();
    let mut w = World {
        rng: Prng::new(seed),
        link: Link::new(Duration::from_millis(10)),
        primary: PrimaryHost::new("primary", 1, 0, &clock),
        mirror: MirrorHost::new(100, &clock),
        clock,
        other: None,
        cfg: cfg.clone(),
        violations: Vec::new(),
        stats: Stats::default(),
        applies: 0,
        accept_pending: false,
        corrupted: Default::default(),
        verifies_checked: 0,
        switch: None,
        epoch: 0,
        expect_resume_at: None,
        failback_loss_at: None,
        old_primary: None,
        takeover_snapshot: None,
        keep_old_primary: false,
        compares_expected_from: None,
    };
    w.primary.bugs = cfg.bugs;
    w.primary.on_full = cfg.on_full;
    w.primary.region_bytes = cfg.region_bytes;
    if cfg.small_journal {
        w.primary.journal_cap = 64 << 10;
        w.primary.max_write_blocks = 8;
    }
    w.mirror.bugs = cfg.bugs;
    if cfg.link_faults {
        w.link.faults = link::Faults {
            loss: 2,
            duplicate: 2,
            corrupt: 2,
            reorder: 5,
            reorder_ms: 30,
        };
    }
    w.run();
    let mut trace: Vec<String> = w.primary.log.clone();
    trace.extend(w.mirror.log.iter().cloned());
    for o in w.other.iter().chain(w.old_primary.iter()) {
        trace.extend(o.log.iter().cloned());
    }
    trace.sort();
    w.stats.virtual_ms = w.clock.now().as_millis() as u64;
    w.stats.frames = w.link.sent;
    w.stats.frames_dropped = w.link.dropped;
    w.stats.stalls = w.primary.stalls;
    w.stats.tail_rotations = w.primary.tail_rotations();
    w.stats.folds = w.primary.folds();
    w.stats.staged_commits = w.mirror.commits;
    w.stats.abandoned_stagings = w.mirror.abandoned_stagings;
    w.stats.verifies = w.primary.verifies.len() as u64;
    for v in &w.primary.verifies {
        w.stats.verify_differing_bytes += v.differing_bytes();
        w.stats.verify_repaired_bytes += v.repaired_bytes;
    }
    Outcome {
        seed,
        scenario: cfg.scenario,
        violations: w.violations,
        stats: w.stats,
        trace,
    }
}

impl World {
    fn violation(&mut self, what: String) {
        if self.violations.len() < 5 {
            self.violations
                .push(format!("[{} ms] {what}", self.clock.now().as_millis()));
        }
    }

    fn run(&mut self) {
        self.start_primary();
        self.start_mirror();
        let steps = self.cfg.steps;
        let mut scenario_done = false;
        let mut accept_at = usize::MAX;
        for step in 0..steps {
            self.stats.steps = step;
            // The event comes once the pair is paired (the mirror knows the primary's volume),
            // a third of the way in at the earliest.
            // A disaster strikes while the mirror holds a consistent copy (else there is nothing
            // to promote: the admin would wait for the primary).
            let ready = !matches!(self.cfg.scenario, Scenario::Disaster | Scenario::Failback)
                || self.mirror_consistent();
            if !scenario_done && step >= steps / 3 && self.paired() && ready {
                self.scenario_event();
                scenario_done = true;
                accept_at = step + steps / 4;
            }
            if self
                .failback_loss_at
                .is_some_and(|at| self.clock.now() >= at)
            {
                self.failback_loss_at = None;
                self.lose_primary_host();
            }
            // Switchovers go on back and forth, one every eighth of the schedule.
            if self.cfg.scenario == Scenario::Switchover
                && scenario_done
                && self.switch.is_none()
                && step.is_multiple_of(steps / 8)
                && self.paired()
            {
                self.begin_switchover();
            }
            if self.cfg.scenario == Scenario::BlankPrimaryDisk && scenario_done && step == accept_at
            {
                // The admin accepts the blank disk as the volume's content from now on.
                self.accept_pending = true;
            }
            self.accept_if_pending();
            self.step(true);
            if !self.violations.is_empty() {
                return;
            }
        }
        // An admin who has not accepted the replaced disk by now does.
        if self.cfg.scenario == Scenario::BlankPrimaryDisk && scenario_done {
            self.accept_pending = true;
        }
        self.quiesce();
    }

    /// The mirror holds the primary's volume identity.
    fn paired(&self) -> bool {
        let m = self.mirror.core().and_then(|c| c.state().identity.uuid);
        let p = self.primary.state().and_then(|s| s.identity.uuid);
        m.is_some() && m == p
    }

    fn accept_if_pending(&mut self) {
        if self.accept_pending && self.primary.is_up() {
            match self.primary.accept_volume(&mut self.rng) {
                Ok(()) => self.accept_pending = false,
                Err(e) => self.primary.note(format!("accept failed: {e}")),
            }
        }
    }

    fn start_primary(&mut self) {
        if let Err(e) = self.primary.start(&self.clock, &mut self.rng) {
            self.primary.note(format!("start failed: {e}"));
            self.primary.down_until = self.clock.now() + Duration::from_secs(1);
        }
    }

    fn start_mirror(&mut self) {
        match self.mirror.start(&self.clock) {
            Ok(()) => self.after_mirror_start(),
            Err(e) => {
                self.mirror.note(format!("start failed: {e}"));
                self.mirror.down_until = self.clock.now() + Duration::from_secs(1);
            }
        }
    }

    /// Checks after the mirror recovered: durability and I1.
    fn after_mirror_start(&mut self) {
        let Some(core) = self.mirror.core() else {
            return;
        };
        let durable = core.durable().set;
        if durable < self.mirror.max_acked_set {
            let what = format!(
                "durability: the mirror acknowledged set {} but holds only up to set {durable} \
                 after restarting",
                self.mirror.max_acked_set
            );
            self.violation(what);
        }
        self.check_i1("after the mirror restarted");
        self.check_history("after the mirror restarted");
    }

    fn mirror_consistent(&self) -> bool {
        self.mirror.core().is_some_and(|c| c.state().consistent())
    }

    /// The mirror's history: its oldest point, its newest and one at random read exactly as
    /// the state each names (generation, sequence), whatever the volume holds now.
    fn check_history(&mut self, when: &str) {
        let Some(h) = self.mirror.history() else {
            return;
        };
        let points = h.points().to_vec();
        if points.is_empty() {
            return;
        }
        let live = self.mirror.disk.content();
        let picks = [
            points[0],
            points[points.len() - 1],
            points[self.rng.below(points.len() as u64) as usize],
        ];
        for p in picks {
            let mut view = vec![0u8; live.len()];
            let read = h.read_at(p.set, 0, &mut view, &mut |o, out| {
                out.copy_from_slice(&live[o as usize..o as usize + out.len()]);
                Ok(())
            });
            if let Err(e) = read {
                return self.violation(format!("{when}: history point {p:?} cannot be read: {e}"));
            }
            let gen = crate::repl::identity::GenId(p.gen);
            let want = std::iter::once(&self.primary.model)
                .chain(self.other.as_ref().map(|o| &o.model))
                .find_map(|m| m.state(gen, p.seq));
            let Some(want) = want else {
                return self.violation(format!(
                    "{when}: history point {p:?} names a state no primary made"
                ));
            };
            for &b in &self.corrupted {
                let r = b as usize * 4096..(b as usize + 1) * 4096;
                view[r.clone()].copy_from_slice(&want[r]);
            }
            if let Some((block, count)) = model::first_difference(&view, &want) {
                return self.violation(format!(
                    "{when}: history point at set {} (generation {gen}, seq {}) reads \
                     {count} block(s) differently from that state, the first block {block}",
                    p.set, p.seq
                ));
            }
            self.stats.history_points_checked += 1;
        }
    }

    /// I1: a mirror that says it is consistent holds exactly the state it names.
    fn check_i1(&mut self, when: &str) {
        let Some(core) = self.mirror.core() else {
            return;
        };
        let st = core.state();
        if !st.consistent() {
            return;
        }
        {
            if st.holds_given_up_writes() && !core.committing() {
                // A failed-back volume keeps its old state (the tail it gave up on it) until
                // the staged resync's end.
                let Some(want) = &self.takeover_snapshot else {
                    return;
                };
                if let Some((block, count)) =
                    model::first_difference(&self.mirror.disk.content(), want)
                {
                    let what = format!(
                        "{when}: the failed-back volume changed before the resync's end: \
                         {count} block(s) differ from its old state, the first block {block}"
                    );
                    self.violation(what);
                }
                return;
            }
        }
        let Some(gen) = st.position_gen else {
            let what = format!(
                "{when}: consistent, but no generation for seq {}",
                st.applied_seq
            );
            return self.violation(what);
        };
        let span = crate::repl::identity::Span {
            gen,
            first_seq: 0,
            continuous: true,
            accepted: false,
            promoted: false,
        };
        let seq = st.applied_seq;
        let models =
            std::iter::once(&self.primary.model).chain(self.other.as_ref().map(|o| &o.model));
        let expected: Vec<Vec<u8>> = models.filter_map(|m| m.state(span.gen, seq)).collect();
        let Some(want) = expected.first() else {
            let what = format!(
                "{when}: the mirror says it holds generation {} up to seq {seq}, which no \
                 primary made",
                span.gen
            );
            return self.violation(what);
        };
        let mut have = self.mirror.disk.content();
        for &b in &self.corrupted {
            let r = b as usize * 4096..(b as usize + 1) * 4096;
            have[r.clone()].copy_from_slice(&want[r]);
        }
        if let Some((block, count)) = model::first_difference(&have, want) {
            let primary_now = self.primary.disk.content();
            let b = block * 4096..(block + 1) * 4096;
            let what = format!(
                "I1 {when}: the mirror says it is consistent at generation {} seq {seq}, but \
                 {count} block(s) differ from that state, the first block {block} (the \
                 primary's disk holds {} there now; writes to it: {:?})",
                span.gen,
                if primary_now[b.clone()] == have[b.clone()] {
                    "what the mirror holds"
                } else if primary_now[b.clone()] == want[b] {
                    "that state's content"
                } else {
                    "something else"
                },
                self.primary.model.writes_to(block as u64 * 4096, 4096)
            );
            self.violation(what);
        }
    }

    /// One step of the world.
    fn step(&mut self, faults: bool) {
        let now = self.clock.now();
        // Hosts come back after a crash.
        if !self.primary.is_up() && now >= self.primary.down_until {
            self.start_primary();
        }
        if !self.mirror.is_up() && now >= self.mirror.down_until {
            self.start_mirror();
        }
        if let Some(o) = self.other.as_mut() {
            if !o.is_up() && now >= o.down_until {
                let _ = o.start(&self.clock, &mut self.rng);
            }
        }
        self.advance_switch();
        self.advance_failback();
        self.check_switchover_resumed();
        let too_far: Vec<String> = std::iter::once(&self.primary)
            .chain(self.other.as_ref())
            .filter_map(|p| p.trimmed_too_far().map(|why| format!("{}: {why}", p.label)))
            .collect();
        for what in too_far {
            self.violation(what);
        }
        self.check_verifies();
        self.deliver();
        let writing = faults;
        if faults {
            let c = &self.cfg;
            let (crash, part, full) = (c.crash_rate, c.partition_rate, c.full_disk_rate);
            if self.rng.chance(crash, 10_000) {
                self.crash_primary();
            }
            if self.rng.chance(crash, 10_000) {
                self.crash_mirror();
            }
            if self.rng.chance(part, 10_000) {
                let d = Duration::from_millis(self.rng.range(100, 40_000));
                self.link.partitioned_until = now + d;
                self.stats.partitions += 1;
            }
            if self.rng.chance(full, 10_000) {
                self.fill_a_disk();
            }
            if self.rng.chance(full * 2, 10_000) {
                self.primary.fs.set_faults(Default::default());
                self.mirror.fs.set_faults(Default::default());
                self.mirror.history_fs.set_faults(Default::default());
            }
        }
        let r = self.rng.below(1000);
        match r {
            0..=149 if writing => {
                self.primary.begin_change(&mut self.rng);
                self.stats.writes += 1;
            }
            150..=299 if writing => self.primary.progress_change(&mut self.rng),
            300..=319 if writing => self.primary.flush(),
            320..=449 => self
                .primary
                .tick(&self.clock, &mut self.link, &mut self.rng),
            450..=549 => self.mirror.sync(&self.clock, &mut self.link, &mut self.rng),
            550..=699 => {
                let was_consistent = self.mirror_consistent();
                let applied = self
                    .mirror
                    .apply_one(&self.clock, &mut self.link, &mut self.rng);
                self.applies += u64::from(applied);
                // Only a decision (a copy, a comparison) may make a consistent mirror stop
                // being one; a resync within a resumed session is staged.
                if was_consistent
                    && !self.mirror_consistent()
                    && self.mirror.last_mode == Some(Mode::Resume)
                {
                    let what = "I1 while resyncing: a consistent mirror stopped being one within a resumed \
                                session (a resync must be staged)"
                        .to_string();
                    self.violation(what);
                }
                if applied
                    && self
                        .applies
                        .is_multiple_of(self.cfg.check_every_applies.max(1))
                {
                    self.check_i1("after applying");
                    self.check_history("after applying");
                }
            }
            700..=729 => self.mirror.checkpoint(&self.clock, false),
            800..=801 if self.primary.verify_wanted.is_none() => {
                self.primary.verify_wanted = Some(self.rng.chance(1, 2));
            }
            730..=799 => {
                if let Some(o) = self.other.as_mut() {
                    if writing {
                        o.begin_change(&mut self.rng);
                        o.progress_change(&mut self.rng);
                    }
                    o.tick(&self.clock, &mut self.link, &mut self.rng);
                }
            }
            _ => {}
        }
        // Time passes: a little, or to the next thing due when nothing else is going on.
        let d = if self.rng.chance(1, 50) {
            Duration::from_millis(self.rng.range(50, 3000))
        } else {
            Duration::from_millis(self.rng.below(3))
        };
        self.clock.advance(d);
    }

    fn deliver(&mut self) {
        let now = self.clock.now();
        for (dir, f) in self.link.due(now) {
            match dir {
                Dir::ToMirror => self
                    .mirror
                    .receive(f, &self.clock, &mut self.link, &mut self.rng),
                Dir::ToPrimary => {
                    // Connection numbers tell the two primaries' frames apart.
                    match self.other.as_mut() {
                        Some(o) if f.conn >= 1_000_000 => o.receive(f, &self.clock, &mut self.rng),
                        _ => self.primary.receive(f, &self.clock, &mut self.rng),
                    }
                }
            }
        }
    }

    /// A verify reports only real differences: blocks overwritten behind the mirror's back.
    /// Anything else is a false alarm (a write in flight taken for a difference) or a mirror
    /// that says it is consistent and is not.
    fn check_verifies(&mut self) {
        while self.verifies_checked < self.primary.verifies.len() {
            let v = self.primary.verifies[self.verifies_checked].clone();
            self.verifies_checked += 1;
            for &(at, len) in &v.differing {
                let blocks = at / 4096..(at + len).div_ceil(4096);
                if !self.corrupted.iter().any(|b| blocks.contains(b)) {
                    self.violation(format!(
                        "verify reported {len} bytes at {at} different, where nothing was \
                         corrupted"
                    ));
                }
            }
            if v.compared_bytes + v.unverified.iter().map(|r| r.1).sum::<u64>() < v.total_bytes {
                self.violation(format!(
                    "verify done after comparing {} of {} bytes",
                    v.compared_bytes, v.total_bytes
                ));
            }
        }
    }

    fn count_crash_while_staged(&mut self) {
        if self.mirror.core().is_some_and(|c| c.staging().is_some()) {
            self.stats.crashes_while_staged += 1;
        }
    }

    fn crash_primary(&mut self) {
        if !self.primary.is_up() {
            return;
        }
        self.count_crash_while_staged();
        self.stats.primary_crashes += 1;
        if !self.rng.chance(self.cfg.power_cuts, 100) {
            self.primary.note("kill -9".into());
            self.primary.kill();
        } else {
            self.primary.note("power cut".into());
            self.primary.power_cut(&mut self.rng);
            // A host crash breaks the journal's continuity: a comparison is right then.
            self.expect_resume_at = None;
        }
        self.primary.down_until =
            self.clock.now() + Duration::from_millis(self.rng.range(10, 20_000));
    }

    fn crash_mirror(&mut self) {
        if !self.mirror.is_up() {
            return;
        }
        self.count_crash_while_staged();
        self.stats.mirror_crashes += 1;
        if !self.rng.chance(self.cfg.power_cuts, 100) {
            self.mirror.note("kill -9".into());
            self.mirror.kill();
        } else {
            self.mirror.note("power cut".into());
            self.mirror.power_cut(&mut self.rng);
        }
        self.mirror.down_until =
            self.clock.now() + Duration::from_millis(self.rng.range(10, 20_000));
    }

    /// One host's file system fills up for a while.
    fn fill_a_disk(&mut self) {
        let primary = self.rng.chance(1, 2);
        let fs = if primary {
            self.primary.fs.clone()
        } else {
            self.mirror.fs.clone()
        };
        // Or its disk fails the next few syncs (EIO): a FLUSH in track mode still succeeds,
        // its records folded into the dirty map.
        let faults = if self.cfg.failing_syncs && self.rng.chance(1, 3) {
            let n = self.rng.range(1, 4) as u32;
            self.stats.sync_faults += 1;
            let failing = crate::env::mem::Faults {
                failing_syncs: n,
                ..Default::default()
            };
            if primary {
                self.primary.note(format!(
                    "the state directory's disk fails the next {n} syncs"
                ));
                failing
            } else {
                // A mirror's history shares its state directory in production (a device of
                // its own here, for the history's own capacity faults): its syncs fail too,
                // or only they do, or only the redo log's and the state's.
                let which = self.rng.below(3);
                let what = [
                    "the state directory's disk",
                    "the history's disk",
                    "both disks",
                ];
                self.mirror
                    .note(format!("{} fails the next {n} syncs", what[which as usize]));
                if which > 0 {
                    self.mirror.history_fs.set_faults(failing.clone());
                }
                if which == 1 {
                    return;
                }
                failing
            }
        } else {
            crate::env::mem::Faults {
                capacity: Some(fs.used_bytes() + self.rng.below(64 << 10)),
                ..Default::default()
            }
        };
        fs.set_faults(faults);
    }

    /// The scenario's event, a third of the way in.
    fn scenario_event(&mut self) {
        match self.cfg.scenario {
            Scenario::Random => {}
            Scenario::LostPrimaryState => {
                self.primary.kill();
                self.primary.fs = crate::env::mem::MemFs::new();
                self.primary.note("state directory lost".into());
                self.primary.down_until = self.clock.now();
            }
            Scenario::BlankPrimaryDisk => {
                self.primary.kill();
                self.primary.disk = std::sync::Arc::new(disk::MemDisk::new(2, VOLUME_BYTES));
                self.primary.note("volume replaced by a blank disk".into());
                self.primary.down_until = self.clock.now();
            }
            Scenario::ForeignPrimary => {
                let mut o = PrimaryHost::new("foreign", 3, 1_000_000, &self.clock);
                let _ = o.start(&self.clock, &mut self.rng);
                self.other = Some(o);
            }
            Scenario::SplitBrain => {
                // A copy of the primary's state and disk, taken while it runs.
                // A copy of the disk is another disk (a cloned machine's image).
                let mut o = PrimaryHost::new("clone", 4, 1_000_000, &self.clock);
                self.primary.flush();
                o.fs = self.primary.fs.snapshot();
                o.disk.fill(&self.primary.disk.content());
                o.model = self.primary.model.fork();
                o.inherit_acks(&self.primary);
                let _ = o.start(&self.clock, &mut self.rng);
                self.other = Some(o);
            }
            Scenario::LostDirtyMap => {
                self.primary.kill();
                let map = crate::repl::role::journal_dir(
                    std::path::Path::new(hosts::ROOT),
                    hosts::VOLUME,
                )
                .join(crate::journal::DIRTY_MAP);
                let fs: crate::env::Fs = std::sync::Arc::new(self.primary.fs.clone());
                // What the map held is what the disk holds there now, writes in flight at the
                // kill included (as the start records when the map survives): the comparison
                // that follows its loss ships exactly that.
                let open = crate::journal::dirty::DirtyMap::open(&fs, &map, VOLUME_BYTES)
                    .ok()
                    .filter(|m| m.fold().covers_after.is_some());
                if let Some(m) = &open {
                    let content = self.primary.disk.content();
                    for (o, l) in m.runs() {
                        let data = content[o as usize..(o + l) as usize].to_vec();
                        self.primary.model.record(
                            m.fold().folded_through,
                            true,
                            &hosts::extent_at(o, data),
                        );
                    }
                }
                let _ = fs.remove_file(&map);
                self.primary.note(format!(
                    "dirty map lost (a resync was open: {})",
                    open.is_some()
                ));
                self.primary.down_until = self.clock.now();
            }
            Scenario::BlankMirrorDisk => {
                self.mirror.kill();
                self.mirror.disk = std::sync::Arc::new(disk::MemDisk::new(101, VOLUME_BYTES));
                self.mirror.max_acked_set = 0;
                self.mirror.note("volume replaced by a blank disk".into());
                self.mirror.down_until = self.clock.now();
            }
            Scenario::CorruptMirror => {
                // A few blocks rot: nothing but their content shows it.
                for _ in 0..1 + self.rng.below(3) {
                    let block = self.rng.below(VOLUME_BYTES / 4096);
                    let garbage: Vec<u8> = (0..4096).map(|_| self.rng.below(256) as u8).collect();
                    self.mirror.disk.rot(block * 4096, &garbage);
                    self.corrupted.insert(block);
                }
                self.mirror.note(format!(
                    "blocks {:?} overwritten behind its back",
                    self.corrupted
                ));
                self.primary.verify_wanted = Some(true);
            }
            Scenario::Switchover => self.begin_switchover(),
            Scenario::Disaster => {
                let last = self.primary.journal().map_or(0, |j| j.last_seq());
                let held = self.mirror.core().map_or(0, |c| c.state().applied_seq);
                self.stats.writes_lost_to_disaster += last.saturating_sub(held);
                self.primary.note("the site is lost".into());
                self.primary.power_cut(&mut self.rng);
                self.primary.down_until = Duration::MAX;
                self.switch = Some(Switch::Promoting {
                    force: true,
                    lost_site: true,
                    demoted: None,
                });
            }
            Scenario::Failback => {
                let cut = Duration::from_millis(self.rng.range(300, 3000));
                self.link.partitioned_until = self.clock.now() + cut;
                self.primary
                    .note(format!("the link is cut for {} ms", cut.as_millis()));
                self.failback_loss_at = Some(self.clock.now() + cut / 2);
            }
            Scenario::LostMirrorState => {
                self.mirror.kill();
                self.mirror.fs = crate::env::mem::MemFs::new();
                // The history lives in the state directory too.
                self.mirror.history_fs = crate::env::mem::MemFs::new();
                self.mirror.max_acked_set = 0;
                self.mirror.note("state directory lost".into());
                self.mirror.down_until = self.clock.now();
            }
        }
    }

    /// Scenario Failback: the primary's host dies (it comes back once the mirror is
    /// promoted); the mirror is promoted with `--force`.
    fn lose_primary_host(&mut self) {
        let last = self.primary.journal().map_or(0, |j| j.last_seq());
        let held = self.mirror.core().map_or(0, |c| c.state().applied_seq);
        self.stats.writes_lost_to_disaster += last.saturating_sub(held);
        self.primary
            .note("the host dies; its site will come back".into());
        self.primary.crash(&mut self.rng);
        self.primary.down_until = Duration::MAX;
        self.switch = Some(Switch::Promoting {
            force: true,
            lost_site: false,
            demoted: None,
        });
    }

    /// Scenario Failback, after the promotion: the old primary starts, learns its peer was
    /// promoted from its data (the daemon's start gate) and fails back. Checked: every block
    /// where its volume differs from the state both held is saved, exactly; the site then
    /// runs as the new primary's secondary.
    fn advance_failback(&mut self) {
        if self.keep_old_primary {
            return self.advance_resolve_on_promoted();
        }
        let Some(mut old) = self.old_primary.take() else {
            return;
        };
        let peer = match (self.primary.state(), self.primary.journal()) {
            (Some(st), Some(j)) => st.claim(
                j,
                &crate::disk::Storage::fingerprint(&*self.primary.disk).expect("disk"),
            ),
            // The peer's answer comes once it runs.
            _ => {
                self.old_primary = Some(old);
                return;
            }
        };
        if old.site().role() != Some(crate::repl::role::Role::Secondary) {
            if !old.is_up() {
                if self.clock.now() < old.down_until {
                    self.old_primary = Some(old);
                    return;
                }
                if let Err(e) = old.start(&self.clock, &mut self.rng) {
                    old.note(format!("start failed: {e}"));
                    self.old_primary = Some(old);
                    return;
                }
            }
            if let Err(e) =
                crate::repl::role::parting_point(old.state().expect("started"), &peer.lineage)
            {
                return self.violation(format!("the old primary cannot fail back: {e}"));
            }
            let site = old.site();
            self.arm_crash(&site.fs);
            let result = old.give_up(&peer, self.clock.wall_ms());
            if !site.fs.halted() {
                site.fs.set_halt(None);
                if let Err(e) = result {
                    // A full file system: the daemon stops, and fails back at its next start.
                    old.note(format!("failback failed: {e}"));
                    old.kill();
                    old.down_until = self.clock.now() + Duration::from_secs(1);
                    self.old_primary = Some(old);
                    return;
                }
            } else {
                old.note(format!("the host died during the failback: {result:?}"));
                self.stats.role_change_crashes += 1;
                old.crash(&mut self.rng);
                if old.site().role() != Some(crate::repl::role::Role::Secondary) {
                    // Still a primary: it starts again and fails back again.
                    self.old_primary = Some(old);
                    return;
                }
            }
        }
        self.check_tail_saved(&old);
        self.takeover_snapshot = Some(old.disk.content());
        self.stats.failbacks += 1;
        let mut log = std::mem::take(&mut old.log);
        self.mirror.log.append(&mut log);
        self.mirror.down_until = self.clock.now();
    }

    /// Scenario Failback, keeping the old primary's data: the old primary starts (and holds
    /// its clients back), the promoted side gives its writes since the promotion up (saved,
    /// checked as a failback's are) and becomes the old primary's secondary, which resyncs
    /// both sides' changes since they parted, staged. Each durable step may be cut by a crash.
    fn advance_resolve_on_promoted(&mut self) {
        let Some(mut old) = self.old_primary.take() else {
            return;
        };
        if !old.is_up() {
            if let Err(e) = old.start(&self.clock, &mut self.rng) {
                old.note(format!("start failed: {e}"));
                self.old_primary = Some(old);
                return;
            }
        }
        let keeper = old.state().expect("started").claim(
            old.journal().expect("started"),
            &crate::disk::Storage::fingerprint(&*old.disk).expect("disk"),
        );
        let site = self.primary.site();
        if site.role() != Some(crate::repl::role::Role::Secondary) {
            let Some(st) = self.primary.state() else {
                // The promoted side restarts after a crash; the admin asks again then.
                self.old_primary = Some(old);
                return;
            };
            if let Err(e) = crate::repl::role::parting_point(st, &keeper.lineage) {
                return self.violation(format!("the promoted side cannot give way: {e}"));
            }
            self.arm_crash(&site.fs);
            let result = self.primary.give_up(&keeper, self.clock.wall_ms());
            let halted = site.fs.halted();
            site.fs.set_halt(None);
            if let Err(e) = result {
                self.primary.note(format!("resolve failed: {e}"));
                if halted {
                    self.stats.role_change_crashes += 1;
                }
                self.primary.crash(&mut self.rng);
                // The admin asks again a moment later (a full file system: once space is freed).
                self.primary.down_until = self.clock.now() + Duration::from_secs(1);
                if site.role() != Some(crate::repl::role::Role::Secondary) {
                    self.old_primary = Some(old);
                    return;
                }
            }
        }
        // The promoted side is a secondary now: the old primary's history is the one that
        // goes on, and the promoted side's given-up writes are checked against it.
        let mut given_up = std::mem::replace(&mut self.primary, old);
        self.primary.inherit(&mut given_up);
        self.compares_expected_from = Some(self.primary.decisions.len());
        given_up.kill();
        self.check_given_up_saved(&given_up.site(), &self.primary.model.clone());
        self.takeover_snapshot = Some(given_up.disk.content());
        self.stats.failbacks += 1;
        self.stats.promoted_gave_up += 1;
        let mut mirror = MirrorHost::on_site(given_up.site(), &self.clock);
        mirror.inherit(&mut self.mirror);
        let mut log = std::mem::take(&mut given_up.log);
        mirror.log.append(&mut log);
        self.mirror = mirror;
        self.link.cut_all();
        let now = self.clock.now();
        self.mirror.down_until = now;
        self.primary.down_until = now;
        self.primary
            .note("the promoted side gave its writes up: this side is the primary again".into());
    }

    /// Every block where the failed-back volume differs from the state both sides held is in
    /// the saved tail, with the volume's content.
    fn check_tail_saved(&mut self, old: &PrimaryHost) {
        let model = self.primary.model.clone();
        self.check_given_up_saved(&old.site(), &model);
    }

    /// Every byte where `site`'s volume, given up, differs from the state both sides held (by
    /// `model`) is in its saved tail, with the volume's content.
    fn check_given_up_saved(&mut self, site: &hosts::Site, model: &model::Model) {
        let fs: crate::env::Fs = std::sync::Arc::new(site.fs.clone());
        let root = std::path::Path::new(hosts::ROOT);
        let st = crate::repl::apply::VolumeState::load(
            &*fs,
            &crate::repl::apply::VolumeState::path(root, hosts::VOLUME),
        )
        .expect("a committed failback's state");
        let Some(t) = st.takeover.clone() else {
            return self.violation("a failed-back volume names no tail it gave up".into());
        };
        let Some(saved) =
            crate::repl::divergent::find(&*fs, root, &t.saved).expect("saved tail read")
        else {
            return self.violation(format!("the saved tail {} is missing", t.saved));
        };
        self.stats.failback_saved_bytes += saved.bytes;
        let Some(base) = model.state(t.gen, t.seq) else {
            return self.violation(format!(
                "parted at generation {} seq {}, which no primary made",
                t.gen, t.seq
            ));
        };
        let image = fs.read(&saved.image_path(root)).expect("the saved image");
        let now = site.disk.content();
        for block in 0..(hosts::VOLUME_BYTES / 4096) as usize {
            let r = block * 4096..(block + 1) * 4096;
            if now[r.clone()] == base[r.clone()] {
                continue;
            }
            // Byte by byte: writes may be smaller than a block.
            let lost = r.clone().find(|&i| {
                now[i] != base[i]
                    && !(saved
                        .ranges
                        .iter()
                        .any(|&(o, l)| o as usize <= i && i < (o + l) as usize)
                        && image[i] == now[i])
            });
            if let Some(i) = lost {
                return self.violation(format!(
                    "the old primary's own write at byte {i} (block {block}) is not saved (its \
                     writes there: {:?}; saved {:?})",
                    model.writes_to((i / 4096 * 4096) as u64, 4096),
                    saved.ranges
                ));
            }
        }
    }

    /// `blkmirror demote` on the primary: its clients' new writes wait from now on.
    fn begin_switchover(&mut self) {
        self.primary.writes_paused = true;
        self.primary.note("demote: writes paused".into());
        self.switch = Some(Switch::Demoting);
    }

    /// Maybe cut the next role change at one of its durable steps.
    fn arm_crash(&mut self, fs: &crate::env::mem::MemFs) {
        let halt = self.rng.chance(1, 3).then(|| self.rng.range(1, 8));
        fs.set_halt(halt);
    }

    /// A role change failed at a durable step: the host crashes (kill -9 or power cut) and
    /// its site comes back in the role its state file records.
    fn crash_in_role_change(&mut self, primary: bool) -> Option<crate::repl::role::Role> {
        self.stats.role_change_crashes += 1;
        let (power_cut, site) = if primary {
            (self.primary.crash(&mut self.rng), self.primary.site())
        } else {
            (self.mirror.crash(&mut self.rng), self.mirror.site())
        };
        if power_cut {
            self.expect_resume_at = None;
        }
        site.role()
    }

    /// Move a change of roles on, as far as it can go now.
    fn advance_switch(&mut self) {
        match self.switch {
            None => {}
            Some(Switch::Demoting) => {
                if self.primary.demote_blocker().is_some() {
                    return;
                }
                let site = self.primary.site();
                self.arm_crash(&site.fs);
                let result = self.primary.demote();
                if !site.fs.halted() {
                    site.fs.set_halt(None);
                    match result {
                        Ok(()) => self.demotion_committed(),
                        Err(e) => self.primary.note_once(format!("demote refused: {e}")),
                    }
                    return;
                }
                self.primary
                    .note(format!("the host died during the demotion: {result:?}"));
                if self.crash_in_role_change(true) == Some(crate::repl::role::Role::Secondary) {
                    self.primary.note("the demotion had committed".into());
                    self.demotion_committed();
                } else {
                    // Still a primary: it restarts (its writes still paused) and the admin
                    // demotes again.
                    self.primary.down_until = self.clock.now() + Duration::from_millis(10);
                    self.expect_resume_at = None;
                }
            }
            Some(Switch::Promoting {
                force,
                lost_site,
                demoted,
            }) => {
                if !self.mirror.is_up() {
                    return;
                }
                self.mirror
                    .drain(&self.clock, &mut self.link, &mut self.rng);
                if let Some((gen, seq)) = demoted {
                    let known = self.mirror.core().and_then(|c| c.state().peer_demoted);
                    if known != Some((gen, seq)) {
                        if let Err(e) = self.mirror.learn_peer_demoted(gen, seq) {
                            self.mirror
                                .note_once(format!("demotion notice refused: {e}"));
                            return;
                        }
                    }
                }
                let site = self.mirror.site();
                self.arm_crash(&site.fs);
                let gen = crate::repl::identity::GenId(self.rng.next_u64().max(1));
                let result = self.mirror.promote(gen, force);
                if !site.fs.halted() {
                    site.fs.set_halt(None);
                    match result {
                        Ok(()) => self.swap_roles(lost_site),
                        // Not promotable yet (sets still to apply): the admin tries again.
                        Err(e) => self.mirror.note_once(format!("promote refused: {e}")),
                    }
                    return;
                }
                self.mirror
                    .note(format!("the host died during the promotion: {result:?}"));
                if self.crash_in_role_change(false) == Some(crate::repl::role::Role::Primary) {
                    self.mirror.note("the promotion had committed".into());
                    self.swap_roles(lost_site);
                } else {
                    self.mirror.down_until = self.clock.now() + Duration::from_millis(10);
                }
            }
        }
    }

    /// The primary's site is a secondary now (stopped until the mirror is promoted): the mirror
    /// is told the name of the data it gave up.
    fn demotion_committed(&mut self) {
        self.primary.down_until = Duration::MAX;
        self.switch = Some(Switch::Promoting {
            force: false,
            lost_site: false,
            demoted: self.primary.site().demoted_at(),
        });
    }

    /// The promoted site becomes the primary, the demoted one (or a new blank site) the
    /// mirror. The writes' history goes on from the state the promoted mirror held, which must
    /// be exactly that state (I1 at the moment of promotion).
    fn swap_roles(&mut self, lost_site: bool) {
        let promoted = self.mirror.site();
        let fs: crate::env::Fs = std::sync::Arc::new(promoted.fs.clone());
        let st = crate::repl::core::primary::PrimaryVolumeState::load(
            &*fs,
            &crate::repl::core::primary::PrimaryVolumeState::path(
                std::path::Path::new(hosts::ROOT),
                hosts::VOLUME,
            ),
        )
        .ok()
        .flatten()
        .expect("a committed promotion left a primary's state");
        let spans = &st.identity.lineage.spans;
        let new = *spans.last().expect("a promoted generation");
        assert!(
            new.promoted,
            "the promotion's generation is the current one"
        );
        let held_gen = spans[spans.len() - 2].gen;
        let held_seq = new.first_seq - 1;
        let model = self.primary.model.clone();
        // An old primary that will come back goes on with its own history, without the
        // promoted generation's writes.
        let old_history =
            (self.cfg.scenario == Scenario::Failback && !lost_site).then(|| model.fork());
        let Some(base) = model.state(held_gen, held_seq) else {
            return self.violation(format!(
                "promoted from generation {held_gen} seq {held_seq}, which no primary made"
            ));
        };
        if let Some((block, count)) = model::first_difference(&promoted.disk.content(), &base) {
            return self.violation(format!(
                "I1 at promotion: the mirror promoted from generation {held_gen} seq {held_seq} \
                 differs from that state in {count} block(s), the first block {block}"
            ));
        }
        model.mint(new.gen, new.first_seq, Some(base));
        self.epoch += 1;
        let mut primary =
            PrimaryHost::on_site("primary", promoted, self.epoch * 10_000, &self.clock, model);
        primary.inherit(&mut self.primary);
        let old_site = if lost_site {
            hosts::Site::new(100 + self.epoch)
        } else {
            self.primary.site()
        };
        let failback = self.cfg.scenario == Scenario::Failback && !lost_site;
        let mut mirror = MirrorHost::on_site(old_site, &self.clock);
        mirror.inherit(&mut self.mirror);
        let mut old = std::mem::replace(&mut self.primary, primary);
        self.mirror = mirror;
        self.link.cut_all();
        let now = self.clock.now();
        self.primary.down_until = now;
        self.mirror.down_until = now;
        if failback {
            // Its own history goes on apart from the promoted side's.
            old.model = old_history.expect("forked above");
            self.keep_old_primary = self.rng.chance(1, 2);
            old.down_until = now;
            self.old_primary = Some(old);
            self.mirror.down_until = Duration::MAX;
            self.stats.forced_promotions += 1;
            self.switch = None;
            self.primary.note(format!(
                "roles changed: primary from generation {held_gen} seq {held_seq}, new {}; \
                 the old primary will fail back",
                new.gen
            ));
            return;
        }
        self.switch = None;
        if lost_site {
            self.stats.forced_promotions += 1;
            self.expect_resume_at = None;
        } else {
            self.stats.switchovers += 1;
            self.expect_resume_at = Some(self.primary.decisions.len());
        }
        self.primary.note(format!(
            "roles changed: primary from generation {held_gen} seq {held_seq}, new {}",
            new.gen
        ));
    }

    /// A planned switchover copies nothing: the new primary's first decision resumes.
    fn check_switchover_resumed(&mut self) {
        let Some(at) = self.expect_resume_at else {
            return;
        };
        let Some((mode, why)) = self.primary.decisions.get(at).cloned() else {
            return;
        };
        self.expect_resume_at = None;
        if mode != Mode::Resume {
            self.violation(format!(
                "a planned switchover was followed by a {mode:?} instead of resuming: {why}"
            ));
        }
    }

    /// Faults stop, writes end: both sides must converge, and then hold the same bytes.
    fn quiesce(&mut self) {
        self.primary.fs.set_faults(Default::default());
        self.mirror.fs.set_faults(Default::default());
        self.mirror.history_fs.set_faults(Default::default());
        self.link.faults = link::Faults::default();
        self.link.partitioned_until = self.clock.now();
        // A mirror whose redo log failed a sync trusts it again only after a restart: the
        // runbook's step once the disk is fixed.
        if self
            .mirror
            .core()
            .and_then(|c| c.failure())
            .is_some_and(|f| f.why.contains("restart the mirror"))
        {
            self.mirror
                .note("the admin restarts the mirror: its disk works again".into());
            self.mirror.kill();
            self.mirror.down_until = self.clock.now();
        }
        // The second primary of a scenario goes away (an admin stopped it); its history stays
        // known to the checks.
        if let Some(o) = self.other.as_mut() {
            o.kill();
            o.down_until = Duration::MAX;
        }
        let deadline = self.clock.now() + CONVERGE_WITHIN;
        // Writes in flight complete.
        while self.primary.is_up() && self.primary.changes() > 0 {
            self.primary.progress_change(&mut self.rng);
        }
        self.primary.flush();
        // Once quiet, a last verify with repair mends what the corruption left.
        let mut final_verify = self.cfg.scenario == Scenario::CorruptMirror;
        loop {
            if self.primary.quiet() && self.mirror.quiet() && self.link.in_flight() == 0 {
                if std::mem::take(&mut final_verify) {
                    self.primary.verify_wanted = Some(true);
                    continue;
                }
                break;
            }
            if self.clock.now() > deadline {
                break;
            }
            self.settle_step();
            if !self.violations.is_empty() {
                return;
            }
        }
        self.check_end();
    }

    /// A quiet step: every host does what is due, then time moves to the next thing due.
    fn settle_step(&mut self) {
        self.accept_if_pending();
        self.advance_switch();
        self.advance_failback();
        self.check_switchover_resumed();
        let now = self.clock.now();
        if !self.primary.is_up() && now >= self.primary.down_until {
            self.start_primary();
        }
        if !self.mirror.is_up() && now >= self.mirror.down_until {
            self.start_mirror();
        }
        self.check_verifies();
        self.deliver();
        self.primary
            .tick(&self.clock, &mut self.link, &mut self.rng);
        self.mirror.sync(&self.clock, &mut self.link, &mut self.rng);
        while self
            .mirror
            .apply_one(&self.clock, &mut self.link, &mut self.rng)
        {}
        self.mirror.checkpoint(&self.clock, false);
        self.check_i1("while settling");
        self.primary
            .tick(&self.clock, &mut self.link, &mut self.rng);
        if self.mirror.has_work() || self.link.in_flight() > 0 {
            let next = self.link.next_due().unwrap_or(now).max(now);
            let step = next
                .saturating_sub(now)
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            self.clock.advance(step);
            return;
        }
        let mut next = now + Duration::from_secs(1);
        for t in [
            self.primary.next_event(&self.clock),
            self.mirror.next_checkpoint(),
            Some(self.primary.down_until),
            Some(self.mirror.down_until),
        ]
        .into_iter()
        .flatten()
        {
            if t > now {
                next = next.min(t);
            }
        }
        self.clock
            .advance((next - now).max(Duration::from_millis(1)));
    }

    /// What must hold at the end, by scenario.
    fn check_end(&mut self) {
        self.stats.decisions = self.primary.decisions.iter().map(|(m, _)| *m).collect();
        self.stats.preseeded_compares = self
            .primary
            .decisions
            .iter()
            .filter(|(m, why)| *m == Mode::Compare && why.contains("pre-seeded"))
            .count() as u64;
        let expected_from = self.compares_expected_from.unwrap_or(usize::MAX);
        let map_lost_at = self.primary.map_lost_at.clone();
        let lying: Vec<String> = self
            .primary
            .decisions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < expected_from && !map_lost_at.contains(i))
            .map(|(_, d)| d)
            // (A primary that lost its dirty map is the one that lost data: the comparison is
            // what must happen then.)
            .filter(|(m, why)| {
                *m == Mode::Compare
                    && why.contains("lost durable data")
                    && self.cfg.scenario != Scenario::LostDirtyMap
            })
            .map(|(_, why)| why.clone())
            .collect();
        for why in lying {
            self.violation(format!(
                "a decision had to compare because the mirror lost data it had acknowledged: {why}"
            ));
        }
        match self.cfg.scenario {
            Scenario::SplitBrain => {
                // The copy runs on another disk than its state describes: it must never ship
                // (it stops itself; the mirror would refuse it too). The mirror never mixes the
                // two histories (I1 against both, all along).
                self.stats.clone_refused =
                    self.other.as_ref().is_some_and(|o| o.decisions.is_empty());
                if self.other.as_ref().is_some_and(|o| !o.decisions.is_empty()) {
                    self.violation("a copy of the primary on another disk was accepted".into());
                }
                self.check_i1("at the end");
                return;
            }
            // It may never have reached the mirror (partitions, crashes); if it did, it was
            // refused.
            Scenario::ForeignPrimary
                if self.other.as_ref().is_some_and(|o| !o.decisions.is_empty()) =>
            {
                self.violation("a foreign primary was accepted by the mirror".into());
            }
            _ => {}
        }
        if !(self.primary.quiet() && self.mirror.quiet()) {
            let p = self.primary.state().map(|s| s.volume_changed.clone());
            let what = format!(
                "no convergence within {} s of virtual time after faults stopped (primary up {}, \
                 quiet {}, volume changed {p:?}; mirror up {}, quiet {})",
                CONVERGE_WITHIN.as_secs(),
                self.primary.is_up(),
                self.primary.quiet(),
                self.mirror.is_up(),
                self.mirror.quiet()
            );
            return self.violation(what);
        }
        let consistent = self.mirror.core().is_some_and(|c| c.state().consistent());
        if !consistent {
            return self.violation("quiet, but the mirror is not consistent".into());
        }
        let (p, m) = (self.primary.disk.content(), self.mirror.disk.content());
        if let Some((block, count)) = model::first_difference(&p, &m) {
            let what = format!(
                "I2: after quiesce the mirror differs from the primary in {count} block(s), the \
                 first block {block}"
            );
            self.violation(what);
        }
        self.check_i1("at the end");
        self.check_history("at the end");
    }
}
