//! The two simulated hosts: a primary (a journal and a volume over a `MemFs` and a `MemDisk`,
//! a writing workload, the primary session core) and a mirror (the mirror core, its redo log
//! and state over another `MemFs`, its volume on a `MemDisk`), each driven step by step the
//! way the real drivers drive them, and each able to crash at any step.

use super::disk::{MemApplier, MemDisk};
use super::link::{Dir, Frame, Link};
use super::model::Model;
use super::rng::Prng;
use crate::disk::buf::BlockBytes;
use crate::disk::Storage;
use crate::env::mem::MemFs;
use crate::env::{Fs, Handle};
use crate::extent::{Extent, Payload};
use crate::journal::{Intent, Journal, JournalOptions, Observed, OnFull};
use crate::repl::apply::{self, ApplyTarget, VolumeState};
use crate::repl::core::mirror::{Durable, Failure, MirrorCore};
use crate::repl::core::primary::{
    chunk_sum, Event, Limits, PrimaryVolumeState, Session, SessionEnd, Transmit, VerifyProgress,
    VerifyRefusal,
};
use crate::repl::core::{PlantedBugs, ReplState};
use crate::repl::divergent;
use crate::repl::frame::{self, DeltaSet, Message, Mode, RefuseCode, SUM_LEN};
use crate::repl::history::{History, Keeper, Retention, WithHistory};
use crate::repl::identity::{GenId, PrimaryClaim};
use crate::repl::redo::RedoLog;
use crate::repl::role::{self, HistoryDir, Role};
use crate::volume::VolumeRead;
use bytes::Bytes;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The simulated volume: 64 blocks of 4 KiB.
pub const VOLUME_BYTES: u64 = 64 * 4096;
pub const VOLUME: &str = "vol";
/// Every host's state directory (on its own `MemFs`): the same for both roles, so a site can
/// change role on the files it has, as a daemon does.
pub const ROOT: &str = "/s";
/// The history's directory, on the site's history device.
const HISTORY_ROOT: &str = "/h";
const JOURNAL_SEGMENT: u64 = 16 << 10;
const JOURNAL_CAP: u64 = 160 << 10;
const REDO_SEGMENT: u64 = 32 << 10;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// The simulated history's cap (four volumes of before-images) and its segments (small, so
/// that retention and the cap free them one by one and many points stay).
const HISTORY_CAP: u64 = 4 * VOLUME_BYTES;
const HISTORY_SEGMENT: u64 = 16 << 10;

/// `apply` through the history, as the mirror's applier does it: a full history makes room
/// (`Keeper::make_room`) and the apply is tried again while that changed anything.
fn with_room<T>(
    keeper: &mut Keeper,
    clock: &Clock,
    mut apply: impl FnMut(&mut History) -> std::io::Result<T>,
) -> std::io::Result<T> {
    loop {
        match apply(&mut keeper.log) {
            Err(e)
                if e.kind() == std::io::ErrorKind::StorageFull
                    && keeper.make_room(clock.wall_ms()).unwrap_or(false) => {}
            other => return other,
        }
    }
}

/// The simulated mirror's history: a minute of virtual time (schedules run a few), thinned
/// after 5 s to a point a second and after 20 s to one per 5 s (tiers as `--history-thin`),
/// capped at [`HISTORY_CAP`] with the oldest points dropped at the cap: retention, thinning
/// and the cap all act.
fn history_retention() -> Retention {
    let secs = |s: &str| -> Result<Duration, String> {
        let n: u64 = s
            .trim_end_matches('s')
            .parse()
            .map_err(|e| format!("{e}"))?;
        Ok(Duration::from_secs(n))
    };
    Retention {
        keep: Duration::from_secs(60),
        max_bytes: Some(HISTORY_CAP),
        thin: crate::repl::history::parse_thinning("5s:1s,20s:5s", secs).expect("valid tiers"),
        // The cap (the volume's size, a few schedules' worth) drops the oldest points: the
        // simulated applier does not wait and retry as the mirror's does.
        when_full: crate::repl::history::WhenFull::DropOldest,
    }
}

/// After a permanent refusal the simulated primary retries this rarely (as the real one).
const SLOW_RETRY: Duration = Duration::from_secs(600);

/// The limits of the simulated sessions: small, so that a short schedule cuts many sets,
/// fills the window and the journal, and copies and compares a volume in many units.
pub fn sim_limits() -> Limits {
    Limits {
        set_max_bytes: 16 << 10,
        window_sets: 4,
        set_target_bytes: 8 << 10,
        linger: Duration::from_millis(4),
        copy_chunk: 16 << 10,
        sums_per_message: 2,
        sums_in_flight: 2,
        decision_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(30),
    }
}

/// Virtual time shared by both hosts and their journals' wall clocks.
#[derive(Clone)]
pub struct Clock {
    base: Instant,
    now_ms: Arc<AtomicU64>,
}

/// The virtual wall clock starts here (a plausible date), so write times look real.
const EPOCH_MS: u64 = 1_790_000_000_000;

impl Clock {
    pub fn new() -> Clock {
        Clock {
            base: Instant::now(),
            now_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    pub fn now(&self) -> Duration {
        Duration::from_millis(self.now_ms.load(Ordering::Relaxed))
    }
    pub fn instant(&self) -> Instant {
        self.base + self.now()
    }
    pub fn advance(&self, d: Duration) {
        self.now_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn wall_ms(&self) -> u64 {
        EPOCH_MS + self.now_ms.load(Ordering::Relaxed)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A trace line: virtual time, host, message.
fn stamp(clock: &Clock, label: &str, msg: String) -> String {
    format!("{:>9} ms {label}: {msg}", clock.now().as_millis())
}

fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(m, &mut out);
    out
}

/// A change in flight on the primary: announced to the journal, maybe done on the disk.
struct Change {
    intent: Intent,
    offset: u64,
    payload: Payload,
    on_disk: bool,
}

impl Change {
    /// The blocks the change holds (its range lock).
    fn blocks(&self) -> (u64, u64) {
        (
            self.offset / 4096,
            (self.offset + self.payload.len() - 1) / 4096,
        )
    }
}

/// The volume as the primary's session reads it: a range with a change in flight is busy
/// (the real volume's range locks).
struct SimReader<'a> {
    disk: &'a MemDisk,
    busy: Vec<(u64, u64)>,
}

impl VolumeRead for SimReader<'_> {
    fn size(&self) -> u64 {
        VOLUME_BYTES
    }

    fn read_settled_then(
        &self,
        offset: u64,
        out: &mut [u8],
        then: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        let (a, z) = (offset / 4096, (offset + out.len() as u64 - 1) / 4096);
        if self.busy.iter().any(|&(ca, cz)| ca <= z && a <= cz) {
            return Ok(false);
        }
        self.disk.read_at(offset, out);
        then(out).map(|()| true)
    }

    fn is_hole(&self, _offset: u64, _len: u64) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// A site's devices: its state directory, its history's device, its volume. A site keeps
/// them through a change of role.
#[derive(Clone)]
pub struct Site {
    pub fs: MemFs,
    pub history_fs: MemFs,
    pub disk: Arc<MemDisk>,
}

impl Site {
    pub fn new(disk_id: u64) -> Site {
        Site {
            fs: MemFs::new(),
            history_fs: MemFs::new(),
            disk: Arc::new(MemDisk::new(disk_id, VOLUME_BYTES)),
        }
    }

    /// The role its state directory records.
    pub fn role(&self) -> Option<Role> {
        let fs: Fs = Arc::new(self.fs.clone());
        role::recorded(&fs, Path::new(ROOT), VOLUME).expect("a readable state file")
    }

    /// The (generation, seq) a demoted site's state names its data by.
    pub fn demoted_at(&self) -> Option<(GenId, u64)> {
        let fs: Fs = Arc::new(self.fs.clone());
        let st = VolumeState::load(&*fs, &state_path()).ok()?;
        Some((st.position_gen?, st.applied_seq))
    }

    fn history_dir(&self) -> (Fs, PathBuf) {
        (
            Arc::new(self.history_fs.clone()),
            Keeper::dir(Path::new(HISTORY_ROOT), VOLUME),
        )
    }
}

/// A simulated host that can die.
pub trait Crash {
    /// kill -9: the process is gone, the page cache and the disk keep what was written.
    fn kill(&mut self);
    /// A power cut: unsynced data of the file system and the disk is partly lost.
    fn power_cut(&mut self, rng: &mut Prng);
    /// The host dies: a kill -9 or a power cut, one in two; true for a power cut.
    fn crash(&mut self, rng: &mut Prng) -> bool {
        let power_cut = rng.chance(1, 2);
        if power_cut {
            self.power_cut(rng);
        } else {
            self.kill();
        }
        power_cut
    }
}

impl Crash for PrimaryHost {
    fn kill(&mut self) {
        PrimaryHost::kill(self)
    }
    fn power_cut(&mut self, rng: &mut Prng) {
        PrimaryHost::power_cut(self, rng)
    }
}

impl Crash for MirrorHost {
    fn kill(&mut self) {
        MirrorHost::kill(self)
    }
    fn power_cut(&mut self, rng: &mut Prng) {
        MirrorHost::power_cut(self, rng)
    }
}

/// A running primary.
struct PrimaryUp {
    journal: Arc<Journal>,
    state: PrimaryVolumeState,
    session: Option<(u64, Session)>,
    /// The session got its decision: losing it now is losing the peer.
    up: bool,
    connect_at: Duration,
    backoff: Duration,
    changes: Vec<Change>,
}

/// A primary host (see the module doc).
pub struct PrimaryHost {
    pub label: &'static str,
    pub fs: MemFs,
    /// The site's history device (a mirror's; kept while the site is a primary).
    pub history_fs: MemFs,
    pub disk: Arc<MemDisk>,
    /// A demotion is under way: the exports take no new writes.
    pub writes_paused: bool,
    boot: u64,
    up: Option<PrimaryUp>,
    pub down_until: Duration,
    pub model: Model,
    pub bugs: PlantedBugs,
    /// Permanent refusals seen, by state (split brain, unrelated, ...).
    pub refusals: Vec<ReplState>,
    /// Sessions the stall watchdog ended (no acknowledgement with sets in flight).
    pub stalls: u64,
    /// The journal's cap and the largest write, in 4 KiB blocks, the workload makes: a small
    /// journal (twice the largest write, as 64 MiB is to NBD's 32 MiB) reaches its paths for
    /// a full journal whose tail alone is in the way.
    pub journal_cap: u64,
    pub max_write_blocks: u64,
    /// How far the journal may be trimmed: decisions' points, then what acknowledgements said
    /// was durable, across restarts (a check against trimming on a guess; an open resync
    /// remembers the mirror's point through a restart).
    may_trim: u64,
    /// What a full journal does, and the dirty map's region.
    pub on_full: OnFull,
    pub region_bytes: u64,
    tail_rotations: u64,
    folds: u64,
    pub decisions: Vec<(Mode, String)>,
    pub log: Vec<String>,
    next_conn: u64,
    clock: Clock,
    /// An admin asked for an online verify (with repair or not): started once a session is up,
    /// started again if the session ends before it is done.
    pub verify_wanted: Option<bool>,
    /// The session (connection) running the verify asked for, and whether it repairs.
    verify_running: Option<(u64, bool)>,
    /// Verifies that finished, in order.
    pub verifies: Vec<VerifyProgress>,
    /// Ranges of the writes the dirty map took that had reached the disk (or, after a power
    /// cut, may have) when the process last ended before completing them.
    tracked_in_flight_at_stop: Vec<(u64, u64)>,
    /// The first decision after each stop that lost the dirty map (it could not be saved),
    /// by index in `decisions`: a comparison is what must happen there.
    pub map_lost_at: Vec<usize>,
}

impl PrimaryHost {
    /// A line of the host's trace, stamped with the virtual time.
    pub fn note(&mut self, msg: String) {
        self.log.push(stamp(&self.clock, self.label, msg));
    }

    /// A line of the trace, unless it repeats the last one (a refusal asked again and again).
    pub fn note_once(&mut self, msg: String) {
        if !self.log.last().is_some_and(|l| l.ends_with(&msg)) {
            self.note(msg);
        }
    }

    pub fn new(label: &'static str, disk_id: u64, conn_base: u64, clock: &Clock) -> PrimaryHost {
        Self::on_site(
            label,
            Site::new(disk_id),
            conn_base,
            clock,
            Model::default(),
        )
    }

    /// A primary on `site`'s devices (a promoted mirror's), writing the history `model` goes on
    /// with.
    pub fn on_site(
        label: &'static str,
        site: Site,
        conn_base: u64,
        clock: &Clock,
        model: Model,
    ) -> PrimaryHost {
        PrimaryHost {
            label,
            fs: site.fs,
            history_fs: site.history_fs,
            writes_paused: false,
            disk: site.disk,
            boot: 1,
            up: None,
            down_until: Duration::ZERO,
            model,
            bugs: PlantedBugs::default(),
            refusals: Vec::new(),
            stalls: 0,
            journal_cap: JOURNAL_CAP,
            max_write_blocks: 3,
            may_trim: 0,
            on_full: OnFull::Block,
            region_bytes: 4096,
            tail_rotations: 0,
            tracked_in_flight_at_stop: Vec::new(),
            map_lost_at: Vec::new(),
            folds: 0,
            decisions: Vec::new(),
            log: Vec::new(),
            next_conn: conn_base,
            clock: clock.clone(),
            verify_wanted: None,
            verify_running: None,
            verifies: Vec::new(),
        }
    }

    fn fs(&self) -> Fs {
        Arc::new(self.fs.clone())
    }

    fn state_path() -> PathBuf {
        PrimaryVolumeState::path(Path::new(ROOT), VOLUME)
    }

    pub fn is_up(&self) -> bool {
        self.up.is_some()
    }

    /// Start (or restart after a crash): open the journal, check the disk against the
    /// state, mint a generation, persist it. A start that fails (a full file system) is
    /// retried later.
    pub fn start(&mut self, clock: &Clock, rng: &mut Prng) -> Result<(), String> {
        let clock2 = clock.clone();
        let opts = JournalOptions {
            fs: self.fs(),
            dir: role::journal_dir(Path::new(ROOT), VOLUME),
            max_disk_bytes: self.journal_cap,
            ram_bytes: 16 << 10,
            segment_bytes: JOURNAL_SEGMENT,
            boot_id: format!("boot-{}", self.boot),
            clock: Arc::new(move || clock2.wall_ms()),
            on_full: self.on_full,
            volume_bytes: VOLUME_BYTES,
            region_bytes: self.region_bytes,
            // Pacing changes when writes arrive, not what the protocol does with them.
            pace_above: None,
        };
        let journal = Arc::new(Journal::open(opts).map_err(|e| format!("journal: {e}"))?);
        let model = self.model.clone();
        let disk = self.disk.clone();
        journal.observe(Box::new(move |o| match o {
            Observed::Record(seq, e) => model.record(seq, false, e),
            Observed::Tracked(seq, e) => model.record(seq, true, e),
            Observed::Adopted { seq, offset, len } => {
                let end = (offset + len).min(VOLUME_BYTES);
                let mut data = vec![0u8; (end - offset) as usize];
                disk.read_at(offset, &mut data);
                model.record(seq, true, &extent_at(offset, data));
            }
        }));
        let fs = self.fs();
        let (hfs, hdir) = self.site().history_dir();
        role::clear_leftovers(
            &fs,
            Path::new(ROOT),
            VOLUME,
            Role::Primary,
            Some(HistoryDir {
                fs: &hfs,
                dir: hdir,
            }),
        )
        .map_err(|e| format!("leftovers: {e}"))?;
        let loaded = PrimaryVolumeState::load(&*fs, &Self::state_path())
            .map_err(|e| format!("state: {e}"))?;
        let disk = self.disk.fingerprint().expect("a simulated disk");
        let gen = GenId(rng.next_u64().max(1));
        let next_seq = journal.last_seq() + 1;
        let st = PrimaryVolumeState::at_start(loaded, &disk, journal.last_stop(), next_seq, gen);
        st.save(&*fs, &Self::state_path())
            .map_err(|e| format!("state save: {e}"))?;
        journal
            .mark_running()
            .map_err(|e| format!("journal marker: {e}"))?;
        let span = *st.identity.lineage.current().expect("just minted");
        self.model.mint(
            gen,
            next_seq,
            (!span.continuous).then(|| self.disk.content()),
        );
        // A write the map took, in flight at the stop, is on the disk or not: the state
        // after it is what the disk holds now. The map's regions below say so; if the map was
        // lost with the process (it could not be saved), only a comparison of the mirror
        // ships it, and the model places it where the lost fold's writes were.
        let tracked_in_flight = std::mem::take(&mut self.tracked_in_flight_at_stop);
        if journal.fold().is_none() {
            let content = self.disk.content();
            for (o, l) in tracked_in_flight {
                let data = content[o as usize..(o + l) as usize].to_vec();
                self.model.record(next_seq - 1, true, &extent_at(o, data));
            }
        }
        // The dirty regions hold whatever the disk holds now: a write the map took that was
        // in flight at the crash is on the disk, or not, and the resync ships what is there
        // (as a re-read record does for the journal's own writes in flight).
        if let Some(fold) = journal.fold() {
            let content = self.disk.content();
            for (o, l) in journal.dirty_runs(0, u64::MAX, u64::MAX) {
                let end = (o + l).min(VOLUME_BYTES);
                let data = content[o as usize..end as usize].to_vec();
                self.model
                    .record(fold.folded_through, true, &extent_at(o, data));
            }
        }
        self.note(format!(
            "start: last stop {:?}, gen {gen} at {next_seq} continuous {}, changed {:?}, \
             resync {:?} of {} bytes",
            journal.last_stop(),
            span.continuous,
            st.volume_changed,
            journal.fold(),
            journal.stats().dirty_bytes,
        ));
        self.up = Some(PrimaryUp {
            journal,
            state: st,
            session: None,
            up: false,
            connect_at: clock.now(),
            backoff: Duration::from_millis(100),
            changes: Vec::new(),
        });
        Ok(())
    }

    /// kill -9: the process and everything in memory is gone; the page cache and the disk
    /// keep what was written.
    pub fn kill(&mut self) {
        self.stop_counting();
        self.fs.restart();
        self.history_fs.restart();
    }

    /// A power cut of the host: unsynced data of the file system and the disk is partly lost.
    pub fn power_cut(&mut self, rng: &mut Prng) {
        self.stop_counting();
        self.fs.crash(rng);
        self.history_fs.crash(rng);
        self.disk.crash(rng);
        self.boot += 1;
    }

    /// The process ends: what its journal counted is kept for the schedule's stats.
    fn stop_counting(&mut self) {
        if let Some(u) = self.up.take() {
            if u.journal.stats().map_failure.is_some() {
                self.map_lost_at.push(self.decisions.len());
            }
            self.tracked_in_flight_at_stop.extend(
                u.changes
                    .iter()
                    .filter(|c| c.on_disk && c.intent.in_map(&u.journal))
                    .map(|c| (c.offset, c.payload.len())),
            );
            self.tail_rotations += u.journal.stats().tail_rotations;
            self.folds += u.journal.stats().folds;
        }
    }

    /// Folds of the journal into the dirty map, over every run so far.
    pub fn folds(&self) -> u64 {
        self.folds + self.journal().map_or(0, |j| j.stats().folds)
    }

    /// Tail rotations of every run of the journal so far, the current one included.
    pub fn tail_rotations(&self) -> u64 {
        self.tail_rotations + self.journal().map_or(0, |j| j.stats().tail_rotations)
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.up.as_ref().map(|u| &u.journal)
    }

    pub fn state(&self) -> Option<&PrimaryVolumeState> {
        self.up.as_ref().map(|u| &u.state)
    }

    /// Announce a random write, zeroing or trim (it waits if the journal is full).
    pub fn begin_change(&mut self, rng: &mut Prng) {
        let Some(u) = self.up.as_mut() else { return };
        if u.changes.len() >= 8 || self.writes_paused {
            return;
        }
        let blocks = VOLUME_BYTES / 4096;
        let first = rng.below(blocks);
        let n = rng.range(1, self.max_write_blocks + 1).min(blocks - first);
        // Unaligned now and then: a write of part of a block.
        let (offset, len) = if rng.chance(1, 8) {
            let off = first * 4096 + rng.below(4096);
            (off, rng.range(1, 4096).min(VOLUME_BYTES - off))
        } else {
            (first * 4096, n * 4096)
        };
        let zero = rng.chance(1, 6);
        // Changes sharing a block go one at a time (the volume's range locks).
        let (a, z) = (offset / 4096, (offset + len - 1) / 4096);
        if u.changes.iter().any(|c| {
            let (ca, cz) = c.blocks();
            ca <= z && a <= cz
        }) {
            return;
        }
        let Ok(Some(intent)) = u.journal.begin(offset, len as u32, !zero) else {
            return;
        };
        let payload = if zero {
            Payload::Zero(len as u32)
        } else {
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d);
            Payload::Data(Bytes::from(d))
        };
        u.changes.push(Change {
            intent,
            offset,
            payload,
            on_disk: false,
        });
    }

    /// Move one change forward: write it to the disk, or complete it in the journal.
    pub fn progress_change(&mut self, rng: &mut Prng) {
        let Some(u) = self.up.as_mut() else { return };
        if u.changes.is_empty() {
            return;
        }
        let i = rng.below(u.changes.len() as u64) as usize;
        let c = &mut u.changes[i];
        if !c.on_disk {
            match &c.payload {
                Payload::Data(d) => self.disk.write_at(c.offset, d),
                Payload::Zero(n) => self.disk.zero(c.offset, u64::from(*n)),
            }
            c.on_disk = true;
            return;
        }
        let c = u.changes.swap_remove(i);
        // A record that cannot be written leaves the range to be re-read: nothing to do here.
        let _ = u.journal.complete(c.intent, c.offset, c.payload);
    }

    /// A client FLUSH: the disk, then the journal.
    pub fn flush(&mut self) {
        let Some(u) = self.up.as_ref() else { return };
        self.disk.sync();
        let _ = u.journal.sync();
    }

    /// Writes in flight.
    pub fn changes(&self) -> usize {
        self.up.as_ref().map_or(0, |u| u.changes.len())
    }

    /// Connect when it is time, send what the session hands out, keep time.
    pub fn tick(&mut self, clock: &Clock, link: &mut Link, rng: &mut Prng) {
        let now = clock.now();
        let Some(u) = self.up.as_mut() else { return };
        if u.session.is_none() {
            if u.state.volume_changed.is_some() || now < u.connect_at {
                return;
            }
            self.next_conn += 1;
            let conn = self.next_conn;
            let disk = self.disk.fingerprint().expect("simulated disk");
            let claim = u.state.claim(&u.journal, &disk);
            let (mut s, opening) =
                Session::start(sim_limits(), VOLUME, VOLUME_BYTES, claim, clock.instant());
            s.bugs = self.bugs;
            for m in &opening {
                link.send(
                    now,
                    Dir::ToMirror,
                    Frame {
                        conn,
                        bytes: encode(m),
                    },
                    rng,
                );
            }
            u.session = Some((conn, s));
            u.up = false;
            return;
        }
        let (conn, sess) = u.session.as_mut().expect("checked");
        let conn = *conn;
        let mut end = None;
        let reader = SimReader {
            disk: &self.disk,
            busy: u.changes.iter().map(|c| c.blocks()).collect(),
        };
        for _ in 0..4 {
            match sess.poll_transmit(clock.instant(), &u.journal, &reader) {
                Ok(Some(t)) => {
                    let m = match t {
                        Transmit::Set { set, .. } => Message::Set(set),
                        Transmit::Message(m) => m,
                    };
                    link.send(
                        now,
                        Dir::ToMirror,
                        Frame {
                            conn,
                            bytes: encode(&m),
                        },
                        rng,
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        if end.is_none() && clock.instant() >= sess.poll_timeout() {
            end = sess.on_timeout(clock.instant()).err();
        }
        if let Some(e) = end {
            return self.end_session(e, clock, rng);
        }
        // The admin's verify: started once the session is up, again in the next session if
        // this one ends first.
        match self.verify_running {
            Some((c, repair)) if c != conn => {
                self.verify_running = None;
                self.verify_wanted = Some(repair);
            }
            Some((_, _)) => {
                if let Some(p) = sess.verify_progress().filter(|p| p.done) {
                    let line = format!(
                        "verify done: {} bytes compared, differing {:?}, {} repaired, unverified {:?}",
                        p.compared_bytes, p.differing, p.repaired_bytes, p.unverified
                    );
                    self.verifies.push(p.clone());
                    self.verify_running = None;
                    self.note(line);
                }
                return;
            }
            None => {}
        }
        if let Some(repair) = self.verify_wanted.filter(|_| u.up) {
            match sess.start_verify(repair, clock.instant()) {
                Ok(()) => {
                    self.verify_wanted = None;
                    self.verify_running = Some((conn, repair));
                    self.note(format!("verify starts (repair {repair})"));
                }
                Err(VerifyRefusal::Running) => self.verify_wanted = None,
                Err(VerifyRefusal::NotConnected | VerifyRefusal::Resyncing) => {}
            }
        }
    }

    /// The next moment something is due on this host.
    pub fn next_event(&self, clock: &Clock) -> Option<Duration> {
        let u = self.up.as_ref()?;
        match &u.session {
            None if u.state.volume_changed.is_none() => Some(u.connect_at),
            None => None,
            Some((_, s)) => Some(s.poll_timeout().saturating_duration_since(clock.base)),
        }
    }

    /// A frame from the mirror.
    pub fn receive(&mut self, f: Frame, clock: &Clock, rng: &mut Prng) {
        let Some(u) = self.up.as_mut() else { return };
        let Some((conn, sess)) = u.session.as_mut() else {
            return;
        };
        if f.conn != *conn {
            return;
        }
        let msg = match frame::decode_one(&f.bytes) {
            Ok(Some((m, used))) if used == f.bytes.len() => m,
            Ok(_) => {
                return self.end_session(
                    SessionEnd::Protocol("a torn frame from the mirror".into()),
                    clock,
                    rng,
                )
            }
            Err(e) => return self.end_session(SessionEnd::Protocol(e.to_string()), clock, rng),
        };
        match &msg {
            Message::Ack { last_seq, .. } => self.may_trim = self.may_trim.max(*last_seq),
            // Resuming trims to the mirror's durable point; a copy covers the journal so far.
            Message::Decision {
                mode, durable_seq, ..
            } => {
                let point = match mode {
                    Mode::Resume => *durable_seq,
                    Mode::FullCopy | Mode::Compare => u.journal.last_seq(),
                };
                self.may_trim = self.may_trim.max(point);
            }
            _ => {}
        }
        match sess.on_message(msg, clock.instant(), &u.journal) {
            Ok(events) => {
                for ev in events {
                    match ev {
                        Event::AdoptUuid(uuid) => {
                            // Persisted before anything else, or the session ends (as the
                            // shipper does).
                            let mut st = u.state.clone();
                            st.identity.uuid = Some(uuid);
                            let fs: Fs = Arc::new(self.fs.clone());
                            if let Err(e) = st.save(&*fs, &Self::state_path()) {
                                return self.end_session(SessionEnd::Io(e), clock, rng);
                            }
                            u.state = st;
                        }
                        Event::Up { mode, reason, .. } => {
                            u.up = true;
                            u.backoff = Duration::from_millis(100);
                            self.decisions.push((mode, reason));
                        }
                        Event::Acked { .. }
                        | Event::MirrorConsistent
                        | Event::PeerPrimary(_)
                        | Event::TakenOver { .. } => {}
                    }
                }
            }
            Err(e) => self.end_session(e, clock, rng),
        }
    }

    fn end_session(&mut self, e: SessionEnd, clock: &Clock, rng: &mut Prng) {
        let now = clock.now();
        let Some(u) = self.up.as_mut() else { return };
        u.session = None;
        if matches!(e, SessionEnd::Stalled(_)) {
            self.stalls += 1;
        }
        self.log.push(stamp(
            &self.clock,
            self.label,
            format!("session ended: {e}"),
        ));
        if u.up {
            // Peer lost: a new generation for the writes the mirror has not seen.
            let gen = GenId(rng.next_u64().max(1));
            let first = u.journal.last_seq() + 1;
            u.state.identity.lineage.mint(gen, first, true);
            let fs: Fs = Arc::new(self.fs.clone());
            if u.state.save(&*fs, &Self::state_path()).is_ok() {
                self.model.mint(gen, first, None);
            } else {
                u.state.identity.lineage.spans.pop();
            }
        }
        u.up = false;
        if e.permanent() {
            self.refusals.push(e.state());
            u.connect_at = now + SLOW_RETRY;
        } else {
            u.connect_at = now + u.backoff;
            u.backoff = (u.backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// A copy of `other`'s state directory knows what `other`'s mirror acknowledged.
    pub fn inherit_acks(&mut self, other: &PrimaryHost) {
        self.may_trim = other.may_trim;
    }

    /// The journal was trimmed past what the mirror said was durable.
    pub fn trimmed_too_far(&self) -> Option<String> {
        let u = self.up.as_ref()?;
        let acked = u.journal.acked_seq();
        (acked > self.may_trim).then(|| {
            format!(
                "the journal was trimmed to seq {acked}, but the mirror only acknowledged up to \
                 {}",
                self.may_trim
            )
        })
    }

    /// The admin accepts a changed volume (`blkmirror accept-volume`).
    pub fn accept_volume(&mut self, rng: &mut Prng) -> Result<(), String> {
        let Some(u) = self.up.as_mut() else {
            return Err("not running".into());
        };
        if u.state.volume_changed.is_none() {
            // Nothing to accept (as the command answers "already").
            return Ok(());
        }
        let disk = self.disk.fingerprint().expect("simulated disk");
        let gen = GenId(rng.next_u64().max(1));
        let next = u.journal.last_seq() + 1;
        let mut st = u.state.clone();
        st.accept_volume(&disk, next, gen);
        let fs: Fs = Arc::new(self.fs.clone());
        st.save(&*fs, &Self::state_path())
            .map_err(|e| e.to_string())?;
        u.state = st;
        self.model.mint(gen, next, Some(self.disk.content()));
        Ok(())
    }

    pub fn site(&self) -> Site {
        Site {
            fs: self.fs.clone(),
            history_fs: self.history_fs.clone(),
            disk: self.disk.clone(),
        }
    }

    /// Why a planned demotion would lose a write now (None: it would not): the session's
    /// rule (`Session::demote_blocker`), with a session up.
    pub fn demote_blocker(&self) -> Option<String> {
        let Some(u) = self.up.as_ref() else {
            return Some("not running".into());
        };
        match &u.session {
            // Its peer's lineage holds the generation it names its data by only once a
            // session shows it (a session's loss mints a new one).
            None => Some("not connected to its peer".into()),
            Some((_, s)) => s.demote_blocker(&u.journal, u.changes.len()),
        }
    }

    /// Demote (`blkmirror demote`, once [`PrimaryHost::demote_blocker`] says nothing): the
    /// journal closed cleanly, then the role change committed on disk. On an error (a host
    /// that died mid-way, [`crate::env::mem::Faults::halt_after_syncs`]) the caller crashes
    /// the site and starts it in the role its state file records.
    pub fn demote(&mut self) -> Result<(), String> {
        let u = self.up.as_ref().ok_or("not running")?;
        let disk = self.disk.fingerprint().expect("simulated disk");
        let held = u.state.identity.lineage.current().ok_or("no lineage")?.gen;
        let st = role::demoted(&u.state, u.journal.last_seq(), held, &disk, 0)?;
        // The volume durable before the journal says nothing was lost (a clean stop).
        self.disk.sync();
        u.journal
            .close()
            .map_err(|e| format!("journal close: {e}"))?;
        self.commit_as_secondary(&st)
            .map_err(|e| format!("demotion: {e}"))?;
        let sess = u
            .session
            .as_ref()
            .map(|(c, s)| (*c, s.resync_progress(), s.in_flight()));
        self.note(format!(
            "demoted at seq {} (generation {:?}; session {sess:?}, acked {})",
            st.applied_seq,
            st.position_gen,
            u.journal.acked_seq()
        ));
        self.stop_counting();
        Ok(())
    }

    /// The role change to a secondary holding `st`, on disk (`role::commit_demotion`).
    fn commit_as_secondary(&self, st: &VolumeState) -> std::io::Result<()> {
        let (hfs, hdir) = self.site().history_dir();
        role::commit_demotion(
            &self.fs(),
            Path::new(ROOT),
            VOLUME,
            st,
            Some(HistoryDir {
                fs: &hfs,
                dir: hdir,
            }),
        )
    }

    /// Fail back (what `primary::commit_discards` does, after the daemon learnt that `peer`'s
    /// promotion continued this side's data): its own writes since the two parted saved,
    /// then the volume committed as a secondary's (`role::discarded`). On an error (a host
    /// that died mid-way) the caller crashes the site and starts again.
    pub fn give_up(&mut self, peer: &PrimaryClaim, now_ms: u64) -> Result<(), String> {
        let u = self.up.as_ref().ok_or("not running")?;
        let parted = role::parting_point(&u.state, &peer.lineage)?;
        // The volume durable before the journal says nothing was lost (a clean stop).
        self.disk.sync();
        u.journal
            .close()
            .map_err(|e| format!("journal close: {e}"))?;
        let (regions, whole) =
            role::given_up_regions(&u.journal, &u.state.identity.lineage, parted, VOLUME_BYTES);
        let disk = self.disk.clone();
        let saved = divergent::save(
            &self.fs,
            Path::new(ROOT),
            &divergent::Tail {
                volume: VOLUME,
                size: VOLUME_BYTES,
                why: "failback",
                parted,
                ranges: &regions,
                time_ms: now_ms,
            },
            &mut |at, b| {
                disk.read_at(at, b);
                Ok(())
            },
        )
        .map_err(|e| format!("saving the tail: {e}"))?;
        let fp = self.disk.fingerprint().expect("simulated disk");
        let st = role::discarded(&u.state, peer, regions, &fp, "failback", saved.id.clone())?;
        self.commit_as_secondary(&st)
            .map_err(|e| format!("failback: {e}"))?;
        self.note(format!(
            "failed back: parted at generation {} seq {}, {} bytes of its own saved as {} \
             (whole volume: {whole})",
            parted.0, parted.1, saved.bytes, saved.id
        ));
        self.stop_counting();
        Ok(())
    }

    /// Take over the counters and traces of the primary this one replaces on the other site.
    pub fn inherit(&mut self, old: &mut PrimaryHost) {
        let mut log = std::mem::take(&mut old.log);
        log.append(&mut self.log);
        self.log = log;
        self.decisions = std::mem::take(&mut old.decisions);
        // Indexes into `decisions`: they move with it.
        self.map_lost_at = std::mem::take(&mut old.map_lost_at);
        self.refusals = std::mem::take(&mut old.refusals);
        self.verifies = std::mem::take(&mut old.verifies);
        self.stalls += old.stalls;
        self.folds += old.folds();
        self.tail_rotations += old.tail_rotations();
        self.bugs = old.bugs;
        self.on_full = old.on_full;
        self.region_bytes = old.region_bytes;
        self.journal_cap = old.journal_cap;
        self.max_write_blocks = old.max_write_blocks;
    }

    /// The primary has nothing left to ship and is connected.
    pub fn quiet(&self) -> bool {
        self.verify_wanted.is_none()
            && self.verify_running.is_none()
            && self.up.as_ref().is_some_and(|u| {
                u.up && u.changes.is_empty()
                    && u.journal.stats().lag_bytes == 0
                    && u.journal.stats().dirty_ranges == 0
                    && u.journal.acked_seq() == u.journal.last_seq()
                    && u.session
                        .as_ref()
                        .is_some_and(|(_, s)| s.in_flight() == 0 && s.resync_progress().is_none())
            })
    }
}

/// An item of the mirror's pipeline, in arrival order.
enum Item {
    Set {
        set: DeltaSet,
        after: Durable,
        durable: bool,
        received_ms: u64,
        conn: u64,
    },
    Sums {
        offset: u64,
        chunk: u32,
        sums: Vec<[u8; SUM_LEN]>,
        conn: u64,
    },
}

struct MirrorUp {
    core: MirrorCore,
    redo: RedoLog,
    conn: Option<u64>,
    session: u64,
    /// A Hello waiting for its Identify: (conn, version, volume, size).
    hello: Option<(u64, u16, String, u64)>,
    pipeline: VecDeque<Item>,
    unsynced: Vec<Handle>,
    last_checkpoint: Duration,
    unsaved: bool,
    history: Keeper,
    /// A staged resync whose commit failed part-way, from its first set: retried, as the
    /// mirror's applier retries it, without asking the core for the step again.
    committing: Option<u64>,
}

/// The mirror host (see the module doc).
pub struct MirrorHost {
    pub fs: MemFs,
    /// The history's own device (a full or failing state directory is not simulated for it
    /// yet): crashes keep what was synced, like the state directory's.
    pub history_fs: MemFs,
    pub disk: Arc<MemDisk>,
    up: Option<MirrorUp>,
    pub down_until: Duration,
    /// The highest set any Ack ever said was durable.
    pub max_acked_set: u64,
    pub log: Vec<String>,
    pub bugs: PlantedBugs,
    clock: Clock,
    /// Sets held in a staged resync, and staged resyncs completed (applied at once).
    pub staged_sets: u64,
    pub commits: u64,
    /// Staged resyncs dropped by a decision (a copy, a comparison, a primary that cannot
    /// finish them).
    pub abandoned_stagings: u64,
    /// The mode of the last session the mirror accepted.
    pub last_mode: Option<Mode>,
}

fn state_path() -> PathBuf {
    VolumeState::path(Path::new(ROOT), VOLUME)
}

impl MirrorHost {
    /// A line of the host's trace, stamped with the virtual time.
    pub fn note(&mut self, msg: String) {
        self.log.push(stamp(&self.clock, "mirror", msg));
    }

    /// A line of the trace, unless it repeats the last one (a refusal asked again and again).
    pub fn note_once(&mut self, msg: String) {
        if !self.log.last().is_some_and(|l| l.ends_with(&msg)) {
            self.note(msg);
        }
    }

    pub fn new(disk_id: u64, clock: &Clock) -> MirrorHost {
        Self::on_site(Site::new(disk_id), clock)
    }

    /// A mirror on `site`'s devices (a demoted primary's, or a new site's).
    pub fn on_site(site: Site, clock: &Clock) -> MirrorHost {
        MirrorHost {
            fs: site.fs,
            history_fs: site.history_fs,
            disk: site.disk,
            up: None,
            down_until: Duration::ZERO,
            max_acked_set: 0,
            log: Vec::new(),
            bugs: PlantedBugs::default(),
            clock: clock.clone(),
            staged_sets: 0,
            commits: 0,
            abandoned_stagings: 0,
            last_mode: None,
        }
    }

    fn fs(&self) -> Fs {
        Arc::new(self.fs.clone())
    }

    pub fn is_up(&self) -> bool {
        self.up.is_some()
    }

    pub fn core(&self) -> Option<&MirrorCore> {
        self.up.as_ref().map(|u| &u.core)
    }

    /// Start (or restart): open the redo log, check the disk, replay, persist.
    pub fn start(&mut self, clock: &Clock) -> Result<(), String> {
        let fs = self.fs();
        role::clear_leftovers(&fs, Path::new(ROOT), VOLUME, Role::Secondary, None)
            .map_err(|e| format!("leftovers: {e}"))?;
        let mut redo =
            RedoLog::open_with(&fs, &apply::redo_dir(Path::new(ROOT), VOLUME), REDO_SEGMENT)
                .map_err(|e| format!("redo: {e}"))?;
        let mut state =
            VolumeState::load(&*fs, &state_path()).map_err(|e| format!("state: {e}"))?;
        let disk = self.disk.fingerprint().expect("simulated disk");
        let sealed_valid = redo.last_set().is_none_or(|l| l <= state.applied_set);
        let known = state.identity.fingerprint.clone();
        let loaded_set = state.applied_set;
        let mut history = Keeper::open(
            Arc::new(self.history_fs.clone()),
            Path::new(HISTORY_ROOT),
            VOLUME,
            VOLUME_BYTES,
            history_retention(),
        )
        .map_err(|e| format!("history: {e}"))?;
        history.log = History::open_with(
            Arc::new(self.history_fs.clone()),
            &Keeper::dir(Path::new(HISTORY_ROOT), VOLUME),
            HISTORY_SEGMENT,
        )
        .map_err(|e| format!("history: {e}"))?;
        let replayed = apply::replay(
            &mut WithHistory {
                target: &mut MemApplier(&self.disk),
                history: &mut history.log,
            },
            &mut redo,
            &mut state,
            &*fs,
            &state_path(),
        )
        .map_err(|e| format!("replay: {e}"))?;
        // After the replay (which must not clear what it finds: an old copy's end replayed on
        // a replaced disk proves nothing), with the disk as it was found.
        MirrorCore::check_disk(
            VOLUME,
            &mut state,
            known.as_ref(),
            Some(&disk),
            sealed_valid,
        );
        let mut core = MirrorCore::new(
            VOLUME,
            VOLUME_BYTES,
            state,
            Some(self.disk.fingerprint().expect("simulated disk")),
            apply::ApplyTarget::holds_data(&MemApplier(&self.disk)).expect("simulated disk"),
            replayed.staged,
        );
        let replayed_sets = replayed.sets;
        core.bugs = self.bugs;
        // The mirror's start rule: a history of another disk, or ahead of the state, is
        // dropped; a consistent state is a point.
        let dropped = history
            .opened(core.state(), clock.wall_ms())
            .map_err(|e| format!("history: {e}"))?;
        core.state()
            .save(&*fs, &state_path())
            .map_err(|e| format!("state save: {e}"))?;
        self.note(format!(
            "start: applied set {} seq {}, consistent {}, changed {:?}, replayed {} sets \
             (state said set {loaded_set}), staged {:?}, history dropped {dropped:?}",
            core.state().applied_set,
            core.state().applied_seq,
            core.state().consistent(),
            core.state().volume_changed,
            replayed_sets,
            core.staging(),
        ));
        self.up = Some(MirrorUp {
            core,
            redo,
            conn: None,
            session: 0,
            hello: None,
            pipeline: VecDeque::new(),
            unsynced: Vec::new(),
            last_checkpoint: clock.now(),
            unsaved: false,
            history,
            committing: None,
        });
        Ok(())
    }

    pub fn site(&self) -> Site {
        Site {
            fs: self.fs.clone(),
            history_fs: self.history_fs.clone(),
            disk: self.disk.clone(),
        }
    }

    /// Promote (`blkmirror promote`, `force` for `--force`) once everything durable is applied
    /// ([`MirrorHost::drain`]): the state checkpointed, then the role change committed on disk.
    /// On an error after
    /// the checks (a host that died mid-way) the caller crashes the site and starts it in the
    /// role its state file records.
    /// The demoted primary told this mirror its data's name (`blkmirror demote`'s notice to
    /// its peer), recorded durably.
    pub fn learn_peer_demoted(&mut self, gen: GenId, seq: u64) -> Result<(), String> {
        let u = self.up.as_mut().ok_or("not running")?;
        u.core.peer_demoted(gen, seq)?;
        // Saved as a checkpoint saves (the disk synced, its change time sealed with the
        // applied set), never a state newer than its seal.
        u.unsaved = true;
        self.checkpoint(&self.clock.clone(), true);
        if self.up.as_ref().is_some_and(|u| u.unsaved) {
            return Err("the state could not be saved".into());
        }
        self.note(format!(
            "the peer was demoted at generation {gen} seq {seq}"
        ));
        Ok(())
    }

    pub fn promote(&mut self, gen: GenId, force: bool) -> Result<(), String> {
        let u = self.up.as_mut().ok_or("not running")?;
        if !u.pipeline.is_empty() || !u.unsynced.is_empty() {
            return Err("sets received but not yet durable and applied".into());
        }
        u.core.prepare_promotion(force)?;
        u.unsaved = true;
        self.checkpoint(&self.clock.clone(), true);
        if self.up.as_ref().expect("checked").unsaved {
            // The core dropped its staged resync for the promotion, the disk still holds it:
            // the daemon runs as a secondary again from its state directory.
            self.note("promotion failed (the state could not be saved): a secondary again".into());
            self.kill();
            self.down_until = self.clock.now();
            return Err("the state could not be saved".into());
        }
        let u = self.up.as_ref().expect("checked");
        let disk = self.disk.fingerprint().expect("simulated disk");
        let st = u.core.state().clone();
        let (pst, next) = role::promoted(&st, gen, &disk, force)?;
        let (hfs, hdir) = self.site().history_dir();
        role::commit_promotion(
            &self.fs(),
            Path::new(ROOT),
            VOLUME,
            &pst,
            &role::journal_start(&st, next, VOLUME_BYTES),
            "sim",
            Some(HistoryDir {
                fs: &hfs,
                dir: hdir,
            }),
        )
        .map_err(|e| format!("promotion: {e}"))?;
        self.note(format!("promoted: generation {gen} from seq {next}"));
        self.up = None;
        Ok(())
    }

    /// Take over the counters and traces of the mirror this one replaces on the other site.
    pub fn inherit(&mut self, old: &mut MirrorHost) {
        let mut log = std::mem::take(&mut old.log);
        log.append(&mut self.log);
        self.log = log;
        self.staged_sets += old.staged_sets;
        self.commits += old.commits;
        self.abandoned_stagings += old.abandoned_stagings;
        self.bugs = old.bugs;
    }

    pub fn kill(&mut self) {
        self.up = None;
        self.fs.restart();
        self.history_fs.restart();
    }

    pub fn power_cut(&mut self, rng: &mut Prng) {
        self.up = None;
        self.fs.crash(rng);
        self.history_fs.crash(rng);
        self.disk.crash(rng);
    }

    /// The history's recoverable points (none while down).
    pub fn history(&self) -> Option<&History> {
        self.up.as_ref().map(|u| &u.history.log)
    }

    fn send(u: &MirrorUp, conn: u64, m: &Message, clock: &Clock, link: &mut Link, rng: &mut Prng) {
        let _ = u;
        link.send(
            clock.now(),
            Dir::ToPrimary,
            Frame {
                conn,
                bytes: encode(m),
            },
            rng,
        );
    }

    fn refuse(
        &mut self,
        conn: u64,
        code: RefuseCode,
        why: String,
        clock: &Clock,
        link: &mut Link,
        rng: &mut Prng,
    ) {
        self.note(format!("refused conn {conn}: {why}"));
        if let Some(u) = self.up.as_mut() {
            if u.conn == Some(conn) {
                u.conn = None;
            }
            let m = Message::Refuse {
                code: code as u16,
                reason: why,
            };
            Self::send(u, conn, &m, clock, link, rng);
        }
    }

    /// A frame from a primary.
    pub fn receive(&mut self, f: Frame, clock: &Clock, link: &mut Link, rng: &mut Prng) {
        if self.up.is_none() {
            return;
        }
        let msg = match frame::decode_one(&f.bytes) {
            Ok(Some((m, used))) if used == f.bytes.len() => m,
            Ok(_) => {
                return self.refuse(
                    f.conn,
                    RefuseCode::BadMessage,
                    "a torn frame".into(),
                    clock,
                    link,
                    rng,
                )
            }
            Err(e) => {
                return self.refuse(
                    f.conn,
                    RefuseCode::BadMessage,
                    e.to_string(),
                    clock,
                    link,
                    rng,
                )
            }
        };
        match msg {
            Message::Hello {
                version,
                volume,
                size,
            } => {
                let u = self.up.as_mut().expect("up");
                u.hello = Some((f.conn, version, volume, size));
            }
            Message::Identify(claim) => {
                let u = self.up.as_mut().expect("up");
                let Some((conn, version, volume, size)) = u.hello.take().filter(|h| h.0 == f.conn)
                else {
                    return self.refuse(
                        f.conn,
                        RefuseCode::BadMessage,
                        "Identify without Hello".into(),
                        clock,
                        link,
                        rng,
                    );
                };
                // Another pair's primary is refused before it can replace the session, as the
                // driver does.
                let live = u.conn.is_some();
                if let Err((code, why)) = u.core.screen(&claim, live) {
                    return self.refuse(conn, code, why, clock, link, rng);
                }
                // A new connection replaces the session: nothing more of the old one counts.
                u.conn = None;
                // The barrier: everything durable applied and checkpointed, nothing unsynced (a
                // decision saves the state: it must not claim sets the volume has not synced).
                self.drain(clock, link, rng);
                self.checkpoint(clock, true);
                let Some(u) = self.up.as_mut() else { return };
                // The applier cannot take its next set (it retries): the mirror's barrier
                // waits for it, so the Identify goes unanswered (the primary times out), unless
                // a failure only a restart ends refuses it (the decision does).
                let stuck = u
                    .pipeline
                    .iter()
                    .any(|i| matches!(i, Item::Set { durable: true, .. }));
                if stuck && u.core.lasting_failure().is_none() {
                    let why = u.core.failure().map(|f| f.why.clone()).unwrap_or_default();
                    self.log.push(stamp(
                        &self.clock,
                        "mirror",
                        format!("conn {conn}: no answer: the applier retries a set ({why})"),
                    ));
                    return;
                }
                let before = format!(
                    "(claim acked {} last {}; mirror at set {} seq {} consistent {} staged {:?})",
                    claim.journal_acked,
                    claim.journal_last,
                    u.core.state().applied_set,
                    u.core.state().applied_seq,
                    u.core.state().consistent(),
                    u.core.staging(),
                );
                let was_staged = u.core.staging().is_some();
                let session = u.core.new_session();
                u.core.enter_session(session);
                let mut bytes = [0u8; 16];
                rng.fill(&mut bytes);
                match u.core.hello(version, &volume, size, &claim, || {
                    crate::repl::identity::VolumeUuid(bytes)
                }) {
                    Ok(accept) => {
                        let state = u.core.state().clone();
                        let fs: Fs = Arc::new(self.fs.clone());
                        if let Err(e) = state.save(&*fs, &state_path()) {
                            return self.refuse(
                                conn,
                                RefuseCode::RedoFailed,
                                format!("state: {e}"),
                                clock,
                                link,
                                rng,
                            );
                        }
                        let u = self.up.as_mut().expect("up");
                        u.conn = Some(conn);
                        u.session = session;
                        if was_staged && u.core.staging().is_none() {
                            self.abandoned_stagings += 1;
                        }
                        self.last_mode = Some(accept.mode);
                        self.log.push(stamp(
                            &self.clock,
                            "mirror",
                            format!("conn {conn}: {:?}: {} {before}", accept.mode, accept.reason),
                        ));
                        for m in &accept.before {
                            Self::send(u, conn, m, clock, link, rng);
                        }
                        Self::send(u, conn, &accept.decision, clock, link, rng);
                    }
                    Err((code, why)) => self.refuse(conn, code, why, clock, link, rng),
                }
            }
            Message::Set(set) => {
                let u = self.up.as_mut().expect("up");
                if u.conn != Some(f.conn) {
                    return;
                }
                let from = u.core.written_position();
                match u.core.accept(u.session, &set) {
                    Ok(Some(acc)) => {
                        let raw = BlockBytes::copy_from(&f.bytes);
                        match u.redo.write(&[(set.set, &raw)]) {
                            Ok(h) => {
                                if !u.unsynced.iter().any(|x| Arc::ptr_eq(x, &h)) {
                                    u.unsynced.push(h);
                                }
                                if let Some(ack) = acc.ack_now {
                                    if let Message::Ack { set, .. } = &ack {
                                        self.max_acked_set = self.max_acked_set.max(*set);
                                    }
                                    Self::send(u, f.conn, &ack, clock, link, rng);
                                }
                                u.pipeline.push_back(Item::Set {
                                    set,
                                    after: acc.after,
                                    durable: false,
                                    received_ms: clock.wall_ms(),
                                    conn: f.conn,
                                });
                            }
                            Err(e) => {
                                let why = format!("mirror redo log failed: {e}");
                                u.core.write_failed(
                                    from,
                                    Failure {
                                        code: RefuseCode::RedoFailed,
                                        why: why.clone(),
                                    },
                                );
                                self.refuse(f.conn, RefuseCode::RedoFailed, why, clock, link, rng);
                            }
                        }
                    }
                    Ok(None) => {}
                    Err((code, why)) => self.refuse(f.conn, code, why, clock, link, rng),
                }
            }
            Message::Sums {
                offset,
                chunk,
                after_set,
                sums,
            } => {
                let u = self.up.as_mut().expect("up");
                if u.conn != Some(f.conn) {
                    return;
                }
                // Sets are taken on arrival here: the redo writer's position is the last set
                // before the checksums, as in the driver's redo writer.
                match u.core.sums_in_order(u.session, after_set) {
                    Ok(true) => u.pipeline.push_back(Item::Sums {
                        offset,
                        chunk,
                        sums,
                        conn: f.conn,
                    }),
                    Ok(false) => {}
                    Err((code, why)) => self.refuse(f.conn, code, why, clock, link, rng),
                }
            }
            other => {
                let what = format!("{other:?}").chars().take(40).collect();
                self.refuse(f.conn, RefuseCode::BadMessage, what, clock, link, rng)
            }
        }
    }

    /// Sync the redo log: what was written is durable and acknowledged.
    pub fn sync(&mut self, clock: &Clock, link: &mut Link, rng: &mut Prng) {
        let Some(u) = self.up.as_mut() else { return };
        if u.unsynced.is_empty() {
            return;
        }
        for h in std::mem::take(&mut u.unsynced) {
            if let Err(e) = h.sync_data() {
                u.core.fail_until_restart(Failure {
                    code: RefuseCode::VolumeFailed,
                    why: format!(
                        "mirror redo log failed: sync: {e} (restart the mirror once its disk \
                         is fixed)"
                    ),
                });
                return;
            }
        }
        let mut acks = Vec::new();
        for item in u.pipeline.iter_mut() {
            if let Item::Set {
                after,
                durable,
                conn,
                ..
            } = item
            {
                if !*durable {
                    *durable = true;
                    if let Some(ack) = u.core.synced(*after) {
                        acks.push((*conn, ack));
                    }
                }
            }
        }
        for (conn, ack) in acks {
            if let Message::Ack { set, .. } = &ack {
                self.max_acked_set = self.max_acked_set.max(*set);
            }
            Self::send(u, conn, &ack, clock, link, rng);
        }
    }

    /// Apply the next durable set, or answer the next comparison. Returns whether it did.
    pub fn apply_one(&mut self, clock: &Clock, link: &mut Link, rng: &mut Prng) -> bool {
        let Some(u) = self.up.as_mut() else {
            return false;
        };
        match u.pipeline.front() {
            Some(Item::Set { durable: true, .. }) => {
                let Some(Item::Set {
                    set,
                    after,
                    received_ms,
                    conn,
                    ..
                }) = u.pipeline.pop_front()
                else {
                    unreachable!()
                };
                let step = match u.committing {
                    Some(first) => Ok(apply::Step::Commit {
                        first,
                        state: Box::default(),
                    }),
                    None => u.core.next_step(&set, received_ms),
                };
                // As the mirror's applier: a set whose before-images or commit failed stays
                // first, tried again later (the redo log holds it; none may be skipped).
                let failed = |u: &mut MirrorUp, set, why: String| {
                    let failure = Failure {
                        code: RefuseCode::RedoFailed,
                        why,
                    };
                    if u.history.log.failed().is_some() {
                        u.core.fail_until_restart(failure);
                    } else {
                        u.core.fail(failure);
                    }
                    u.pipeline.push_front(Item::Set {
                        set,
                        after,
                        durable: true,
                        received_ms,
                        conn,
                    });
                };
                match step {
                    Err(why) => {
                        u.core.fail(Failure {
                            code: RefuseCode::VolumeFailed,
                            why,
                        });
                        return false;
                    }
                    Ok(apply::Step::Stage) => {
                        self.staged_sets += 1;
                        return true;
                    }
                    Ok(apply::Step::Apply) => {}
                    Ok(apply::Step::Commit { first, .. }) => {
                        // The staged sets, read back from the redo log as the applier does.
                        let segments = u.redo.segments_between(first - 1, set.set - 1);
                        let fs: Fs = Arc::new(self.fs.clone());
                        let core = &mut u.core;
                        let disk = &self.disk;
                        let committed = with_room(&mut u.history, clock, |history| {
                            // A retry starts from the first set not yet applied, as the
                            // mirror's does.
                            let from = core.state().applied_set.max(first - 1);
                            apply::apply_from_redo(
                                &fs,
                                &segments,
                                from,
                                set.set - 1,
                                &mut WithHistory {
                                    target: &mut MemApplier(disk),
                                    history,
                                },
                                |s| core.applied(s, received_ms),
                            )
                        });
                        if let Err(e) = committed {
                            u.committing = Some(first);
                            failed(u, set, format!("mirror state directory failed: {e}"));
                            return false;
                        }
                        u.committing = None;
                        self.commits += 1;
                    }
                }
                #[allow(unused_mut)]
                let mut target = MemApplier(&self.disk);
                #[cfg(any(test, feature = "test-hooks"))]
                if self.bugs.history_after_write {
                    target.apply(&set).expect("simulated disk");
                }
                let saved = with_room(&mut u.history, clock, |history| {
                    WithHistory {
                        target: &mut target,
                        history,
                    }
                    .apply(&set)
                });
                if let Err(e) = saved {
                    failed(
                        u,
                        set,
                        format!("mirror state directory failed: history: {e}"),
                    );
                    return false;
                }
                u.core.applied(&set, received_ms);
                u.unsaved = true;
                true
            }
            Some(Item::Sums { .. }) => {
                let Some(Item::Sums {
                    offset,
                    chunk,
                    sums,
                    conn,
                }) = u.pipeline.pop_front()
                else {
                    unreachable!()
                };
                let content = self.disk.content();
                let differ = sums
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let at = offset + i as u64 * u64::from(chunk);
                        if at >= VOLUME_BYTES {
                            return true;
                        }
                        let end = (at + u64::from(chunk)).min(VOLUME_BYTES);
                        chunk_sum(&content[at as usize..end as usize]) != *s
                    })
                    .collect();
                let m = Message::SumsReply {
                    offset,
                    chunk,
                    differ,
                };
                Self::send(u, conn, &m, clock, link, rng);
                true
            }
            _ => false,
        }
    }

    /// A checkpoint, when due (or `force`d): sync the volume, save the state, trim the redo.
    pub fn checkpoint(&mut self, clock: &Clock, force: bool) {
        let Some(u) = self.up.as_mut() else { return };
        if !u.unsaved || (!force && clock.now() < u.last_checkpoint + CHECKPOINT_EVERY) {
            return;
        }
        self.disk.sync();
        let fp = self.disk.fingerprint().expect("simulated disk");
        let state = u.core.checkpoint_state(Some(fp));
        let fs: Fs = Arc::new(self.fs.clone());
        if state.save(&*fs, &state_path()).is_err() {
            return;
        }
        u.core.checkpoint_done(state.applied_set);
        // A point per checkpoint, as the mirror makes them; one that cannot be recorded is a
        // point less (the mirror logs it), never a failure.
        let _ = u.history.checkpointed(&state, clock.wall_ms());
        let _ = u.redo.trim(state.applied_set);
        u.last_checkpoint = clock.now();
        u.unsaved = false;
    }

    /// Everything written is synced and applied (a new session's barrier; a clean stop).
    pub fn drain(&mut self, clock: &Clock, link: &mut Link, rng: &mut Prng) {
        self.sync(clock, link, rng);
        while self.apply_one(clock, link, rng) {}
        // Sets of a replaced session not yet written are dropped with their pipeline place.
        if let Some(u) = self.up.as_mut() {
            u.pipeline
                .retain(|i| matches!(i, Item::Set { durable: true, .. }));
        }
    }

    /// Applied everything durable, nothing pending.
    pub fn quiet(&self) -> bool {
        self.up.as_ref().is_some_and(|u| {
            u.pipeline.is_empty()
                && u.unsynced.is_empty()
                && u.core.durable().set == u.core.state().applied_set
        })
    }

    pub fn next_checkpoint(&self) -> Option<Duration> {
        let u = self.up.as_ref()?;
        u.unsaved.then_some(u.last_checkpoint + CHECKPOINT_EVERY)
    }

    pub fn has_work(&self) -> bool {
        self.up
            .as_ref()
            .is_some_and(|u| !u.pipeline.is_empty() || !u.unsynced.is_empty())
    }
}

/// The claim a primary would make now (for the scenarios that need one by hand).
pub fn extent_at(offset: u64, data: Vec<u8>) -> Extent {
    Extent {
        offset,
        payload: Payload::Data(Bytes::from(data)),
    }
}
