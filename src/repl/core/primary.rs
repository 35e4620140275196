//! The primary's side of replication, without I/O of its own: the per-volume state it keeps
//! (identity, generations, the volume's fingerprint) and one session with the mirror.
//!
//! A session: Hello and Identify out; the mirror's Decision in (resume, full copy, compare, or
//! a refusal); then delta sets cut from the journal, up to [`Limits::window_sets`] in flight,
//! each trimmed from the journal once acknowledged. A full copy or a comparison interleaves
//! with the journal, one unit of each in turn, so neither starves. The session ends on any
//! error (the driver starts a new one from the mirror's durable point), on a refusal, or when
//! no acknowledgement arrives for [`Limits::stall_timeout`] while sets are in flight.

use super::ReplState;
use crate::disk::fingerprint::Fingerprint;
use crate::env::{write_atomic, FileSystem};
use crate::extent::{Extent, Payload};
use crate::journal::{Journal, LastStop};
use crate::repl::fold::Folder;
use crate::repl::frame::{DeltaSet, KnownCrcs, Message, Mode, RefuseCode, SetKind, SUM_LEN};
use crate::repl::identity::{GenId, PrimaryClaim, VolumeIdentity, VolumeUuid};
use crate::volume::VolumeRead;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "verify.rs"]
mod verify;
pub use verify::{VerifyProgress, VerifyRefusal, SETTLE_LIMIT};

/// The session's limits, named and explained (the defaults are what production runs).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Raw bytes per delta set, at most (a single larger write goes alone in its set).
    pub set_max_bytes: u64,
    /// Delta sets in flight (sent, not yet acknowledged), at most: enough to fill a
    /// 1 Gbit/s link with a 30 ms round trip.
    pub window_sets: usize,
    /// A set smaller than this waits up to `linger` for more records while earlier sets are in
    /// flight: a set costs both sides the same fixed work (encode, redo write, ack, apply
    /// batch) whatever its size; 4 KiB random writes made ~8-record sets, 2,000 a second.
    pub set_target_bytes: u64,
    pub linger: Duration,
    /// The unit of the full copy and of the comparison.
    pub copy_chunk: u64,
    /// Chunks summed per Sums message (one volume read of this many chunks per message).
    pub sums_per_message: usize,
    /// Sums messages awaiting their reply, at most (bounds how far the comparison reads
    /// ahead of the mirror).
    pub sums_in_flight: usize,
    /// How long the mirror may take to answer Hello.
    pub decision_timeout: Duration,
    /// No acknowledgement (nor comparison reply) for this long while something is in flight,
    /// with the link up, is a stalled stream: the session is ended and started again. Long
    /// enough for a window of sets over a slow link and a mirror's fsync; short enough that a
    /// stalled volume is noticed in well under a minute.
    pub stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            set_max_bytes: 8 << 20,
            window_sets: 32,
            set_target_bytes: 1 << 20,
            linger: Duration::from_millis(4),
            copy_chunk: 1 << 20,
            sums_per_message: 8,
            sums_in_flight: 16,
            decision_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The mirror refused (`code` says whether retrying helps).
    #[error("mirror refused: {reason}")]
    Refused { code: u16, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("stalled: {0}")]
    Stalled(String),
    /// The journal folded into the dirty map: what was in flight is in the map now, and the
    /// next session resyncs it.
    #[error(
        "the journal folded into the dirty map (it was full, or could not be written): \
             the next session resyncs the dirty regions"
    )]
    Folded,
    /// A local file or disk failed; the error names which (see [`local`]).
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
}

/// An I/O error with the part of this host that failed (the journal, the volume, the state
/// file) in front, so status tells an admin where to look.
pub fn local(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl SessionEnd {
    /// A refusal retrying cannot cure (until an admin acts).
    pub fn permanent(&self) -> bool {
        matches!(self, SessionEnd::Refused { code, .. }
            if RefuseCode::from_u16(*code).is_some_and(RefuseCode::permanent))
    }

    /// The state status shows after this end.
    pub fn state(&self) -> ReplState {
        match self {
            SessionEnd::Refused { code, .. } => match RefuseCode::from_u16(*code) {
                Some(RefuseCode::SplitBrain) => ReplState::SplitBrain,
                Some(RefuseCode::Unrelated) => ReplState::Unrelated,
                Some(RefuseCode::BothPrimary) => ReplState::BothPrimary,
                Some(c) if c.permanent() => ReplState::Refused,
                Some(RefuseCode::VolumeFailed | RefuseCode::RedoFailed) => ReplState::Failed,
                _ => ReplState::Connecting,
            },
            SessionEnd::Folded => ReplState::Resyncing,
            _ => ReplState::Connecting,
        }
    }
}

/// What a session hands the driver to send.
#[derive(Debug)]
pub enum Transmit {
    /// Encode and send (`known`: CRCs the journal already computed for whole records).
    Set {
        set: DeltaSet,
        known: KnownCrcs,
    },
    Message(Message),
}

/// What the driver should do after a message was handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The mirror's decision arrived: the link is up.
    Up {
        mode: Mode,
        durable_set: u64,
        durable_seq: u64,
        reason: String,
    },
    /// The pair's UUID, new to this side: persist it before anything else.
    AdoptUuid(VolumeUuid),
    /// Set `set` is durable at the mirror (and the journal trimmed up to its seq); sets up to
    /// `applied_set` are applied there.
    Acked { set: u64, applied_set: u64 },
    /// The mirror durably holds a consistent copy from now on (its copy or comparison is
    /// done and the journal up to that point is durable there).
    MirrorConsistent,
    /// The peer is a primary too: what it knows of its data (its refusal follows).
    PeerPrimary(Box<PrimaryClaim>),
    /// The peer gave up writes of its own in these ranges: they are in the dirty map now,
    /// and this session resyncs them (`bytes` in all).
    TakenOver { ranges: usize, bytes: u64 },
}

#[derive(Debug)]
struct InFlight {
    set: u64,
    /// The durable sequence number the mirror reports once this set is durable.
    durable_seq: u64,
    /// Dirty regions this set resyncs: clean once it is durable.
    resynced: Vec<(u64, u64)>,
    /// This set ends a resync: once durable, the journal's dirty map is done with (`Whole`:
    /// a full copy or comparison, which covered every region).
    ends_resync: Option<Covered>,
    /// Bytes of an online verify's repair this set carries.
    repaired: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    AwaitDecision,
    Running,
}

/// What a finished resync covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Covered {
    Dirty,
    Whole,
}

/// What a resync sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResyncKind {
    /// Every chunk of the volume.
    Full,
    /// The chunks whose checksums differ at the mirror.
    Compare,
    /// The dirty map's regions (after the journal folded); the mirror stages them.
    Dirty,
}

/// The full copy, the comparison or the resync of dirty regions in progress.
#[derive(Debug)]
struct Resync {
    kind: ResyncKind,
    /// Dirty: the first set was sent (no journal set may go before it: the mirror stages
    /// from the first resync set on, and a journal set applied before it would leave the
    /// mirror without the folded writes).
    started: bool,
    /// Bytes to send (the volume's size, or the dirty bytes when it began).
    total: u64,
    /// The journal's end when it began: the copy holds every write up to here.
    start_seq: u64,
    /// Next byte to copy (full) or to sum (compare).
    pos: u64,
    /// Compare: Sums sent, awaiting replies (offset, chunks).
    awaiting: VecDeque<(u64, usize)>,
    /// Compare: chunks the mirror said differ, to send.
    differ: VecDeque<u64>,
    bytes_done: u64,
}

/// One session with the mirror (module doc).
pub struct Session {
    limits: Limits,
    size: u64,
    uuid: Option<VolumeUuid>,
    phase: Phase,
    next_set: u64,
    shipped_seq: u64,
    in_flight: VecDeque<InFlight>,
    resync: Option<Resync>,
    /// The last unit sent was from the journal: a resync unit goes next.
    resync_turn: bool,
    /// The same for a running verify: a busy journal must not starve it.
    verify_turn: bool,
    linger_until: Option<Instant>,
    /// The mirror's durable seq as of the last acknowledgement (or its decision): what a
    /// copy set's acknowledgement reports until a journal set moves it.
    floor: u64,
    /// When the mirror must have answered or acknowledged something.
    deadline: Instant,
    /// After a copy or comparison: the mirror is consistent once the set with this number is
    /// durable there (None: it already is, or no resync ended yet).
    consistent_at_set: Option<u64>,
    /// The copy-done set's seq, until a journal set reaching it is sent.
    consistent_after_seq: Option<u64>,
    /// A chunk to read was busy (a change in flight): try again then.
    busy_retry: Option<Instant>,
    /// The journal's folds when the session began: another fold ends it.
    folds: u64,
    /// The online verify running or done in this session.
    verify: Option<verify::Verify>,
    /// Mistakes planted to prove the simulator catches them.
    #[cfg(any(test, feature = "test-hooks"))]
    pub bugs: super::PlantedBugs,
}

/// Milliseconds since the Unix epoch by this host's clock (0 if the clock is before 1970).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Session {
    /// A new session: the messages that open it (Hello, Identify) and the session.
    pub fn start(
        limits: Limits,
        volume: &str,
        size: u64,
        claim: PrimaryClaim,
        now: Instant,
    ) -> (Session, Vec<Message>) {
        let hello = vec![
            Message::Hello {
                version: crate::repl::frame::PROTOCOL_VERSION,
                volume: volume.to_string(),
                size,
            },
            Message::Identify(Box::new(claim.clone())),
        ];
        let deadline = now + limits.decision_timeout;
        (
            Session {
                limits,
                size,
                uuid: claim.uuid,
                phase: Phase::AwaitDecision,
                next_set: 0,
                shipped_seq: 0,
                in_flight: VecDeque::new(),
                resync: None,
                resync_turn: false,
                verify_turn: false,
                linger_until: None,
                floor: 0,
                deadline,
                consistent_at_set: None,
                consistent_after_seq: None,
                busy_retry: None,
                folds: 0,
                verify: None,
                #[cfg(any(test, feature = "test-hooks"))]
                bugs: super::PlantedBugs::default(),
            },
            hello,
        )
    }

    /// Copy, comparison or dirty-region resync progress: (bytes done, total), while one runs.
    pub fn resync_progress(&self) -> Option<(u64, u64)> {
        self.resync.as_ref().map(|r| (r.bytes_done, r.total))
    }

    pub fn comparing(&self) -> bool {
        self.resync
            .as_ref()
            .is_some_and(|r| r.kind == ResyncKind::Compare)
    }

    /// A resync of the dirty map's regions runs (the mirror stays consistent meanwhile).
    pub fn resyncing_dirty(&self) -> bool {
        self.resync
            .as_ref()
            .is_some_and(|r| r.kind == ResyncKind::Dirty)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Why a planned demotion would lose a write now, with the clients' writes stopped
    /// (None: it would not). Everything the journal holds must be durable at the mirror, in
    /// this session, with nothing in flight and no copy or resync running: the mirror then
    /// holds exactly the volume's data, and its lineage (this session's) names it. Writes
    /// still being made (`writes_in_flight`) may yet be journaled.
    pub fn demote_blocker(&self, journal: &Journal, writes_in_flight: usize) -> Option<String> {
        #[cfg(any(test, feature = "test-hooks"))]
        let acked_matters = !self.bugs.demote_unacknowledged;
        #[cfg(not(any(test, feature = "test-hooks")))]
        let acked_matters = true;
        if self.phase != Phase::Running {
            Some("the mirror has not answered yet".into())
        } else if writes_in_flight > 0 {
            Some(format!("{writes_in_flight} writes in flight"))
        } else if let Some((done, total)) = self.resync_progress() {
            Some(format!("a copy or resync runs ({done} of {total} bytes)"))
        } else if journal.fold().is_some() || journal.stats().dirty_ranges > 0 {
            Some("a resync of changed regions is due".into())
        } else if acked_matters && !self.in_flight.is_empty() {
            Some(format!(
                "{} sets not yet acknowledged",
                self.in_flight.len()
            ))
        } else if acked_matters && journal.acked_seq() < journal.last_seq() {
            Some(format!(
                "the mirror acknowledged up to seq {} of {}",
                journal.acked_seq(),
                journal.last_seq()
            ))
        } else {
            None
        }
    }

    /// The next moment [`Session::on_timeout`] must run.
    pub fn poll_timeout(&self) -> Instant {
        [self.linger_until, self.busy_retry]
            .into_iter()
            .flatten()
            .fold(self.deadline, Instant::min)
    }

    /// Time passed: the decision is late, or the stream stalled (an error), or lingering ends.
    pub fn on_timeout(&mut self, now: Instant) -> Result<(), SessionEnd> {
        if self.busy_retry.is_some_and(|t| now >= t) {
            self.busy_retry = None;
        }
        if now >= self.deadline {
            return match self.phase {
                Phase::AwaitDecision => Err(SessionEnd::Protocol(format!(
                    "no answer to hello within {} s",
                    self.limits.decision_timeout.as_secs()
                ))),
                Phase::Running if self.waiting_for_mirror() => Err(SessionEnd::Stalled(format!(
                    "no acknowledgement for {} s while {} sets and {} comparisons are in \
                     flight with the link up",
                    self.limits.stall_timeout.as_secs(),
                    self.in_flight.len(),
                    self.resync.as_ref().map_or(0, |r| r.awaiting.len())
                        + self.verify.as_ref().map_or(0, |v| v.awaiting.len())
                ))),
                Phase::Running => {
                    self.deadline = now + self.limits.stall_timeout;
                    Ok(())
                }
            };
        }
        Ok(())
    }

    fn waiting_for_mirror(&self) -> bool {
        !self.in_flight.is_empty()
            || self.resync.as_ref().is_some_and(|r| !r.awaiting.is_empty())
            || self.verify.as_ref().is_some_and(|v| !v.awaiting.is_empty())
    }

    /// The mirror made progress: the stall watchdog starts again.
    fn progress(&mut self, now: Instant) {
        self.deadline = now + self.limits.stall_timeout;
    }

    /// A message from the mirror.
    pub fn on_message(
        &mut self,
        msg: Message,
        now: Instant,
        journal: &Journal,
    ) -> Result<Vec<Event>, SessionEnd> {
        match (msg, &self.phase) {
            (Message::Refuse { code, reason }, _) => Err(SessionEnd::Refused { code, reason }),
            (Message::Identify(claim), Phase::AwaitDecision) => Ok(vec![Event::PeerPrimary(claim)]),
            (Message::Takeover { regions }, Phase::AwaitDecision) => {
                journal.take_over(&regions).map_err(local("journal"))?;
                let bytes = regions.iter().map(|&(_, l)| l).sum();
                tracing::warn!(
                    ranges = regions.len(),
                    bytes,
                    "the peer gave up writes of its own: their regions are resynced from here"
                );
                Ok(vec![Event::TakenOver {
                    ranges: regions.len(),
                    bytes,
                }])
            }
            (
                Message::Decision {
                    uuid,
                    mode,
                    durable_set,
                    durable_seq,
                    reason,
                },
                Phase::AwaitDecision,
            ) => self.on_decision(uuid, mode, durable_set, durable_seq, reason, now, journal),
            (
                Message::Ack {
                    set,
                    last_seq,
                    applied_set,
                },
                Phase::Running,
            ) => self.on_ack(set, last_seq, applied_set, now, journal),
            (
                Message::SumsReply {
                    offset,
                    chunk,
                    differ,
                },
                Phase::Running,
            ) => {
                if self.comparing() {
                    self.on_sums_reply(offset, chunk, differ)?;
                } else {
                    self.on_verify_reply(offset, chunk, differ, now)?;
                }
                self.progress(now);
                Ok(Vec::new())
            }
            (other, phase) => Err(SessionEnd::Protocol(format!(
                "unexpected {} while {phase:?}",
                describe(&other)
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_decision(
        &mut self,
        uuid: VolumeUuid,
        mode: Mode,
        durable_set: u64,
        durable_seq: u64,
        reason: String,
        now: Instant,
        journal: &Journal,
    ) -> Result<Vec<Event>, SessionEnd> {
        let mut events = Vec::new();
        match self.uuid {
            Some(mine) if mine != uuid => {
                return Err(SessionEnd::Protocol(format!(
                    "the mirror answered for volume {uuid}, this is {mine}"
                )))
            }
            Some(_) => {}
            None => {
                self.uuid = Some(uuid);
                events.push(Event::AdoptUuid(uuid));
            }
        }
        let trim = |seq: u64| {
            journal
                .ack(seq)
                .map_err(|e| SessionEnd::Protocol(format!("decision: {e}")))
        };
        // The mirror is reachable: writes are journaled again from here (the fold's regions
        // are read after this, so they hold every write the map took).
        let fold = journal.fold();
        if fold.is_some() {
            journal.resume_journaling();
        }
        self.folds = journal.folds();
        match mode {
            Mode::Resume => {
                // The mirror resumes only where the journal still holds what follows.
                if durable_seq < journal.holds_after() {
                    return Err(SessionEnd::Protocol(format!(
                        "the mirror resumes after seq {durable_seq}, but the journal holds \
                         only the writes after {}",
                        journal.holds_after()
                    )));
                }
                trim(durable_seq)?;
                self.shipped_seq = durable_seq;
                if let Some(fold) = fold {
                    // Folded records are not shipped: their regions are, read afresh. Every
                    // write up to the fold (the map's tracked ones at `folded_through`) is in
                    // the mirror once the resync is applied.
                    self.shipped_seq = durable_seq.max(fold.folded_through);
                    let total = journal.stats().dirty_bytes;
                    tracing::info!(
                        dirty_bytes = total,
                        from_seq = self.shipped_seq,
                        "resync of the dirty regions starts"
                    );
                    self.resync = Some(Resync {
                        kind: ResyncKind::Dirty,
                        started: false,
                        total,
                        start_seq: self.shipped_seq,
                        pos: 0,
                        awaiting: VecDeque::new(),
                        differ: VecDeque::new(),
                        bytes_done: 0,
                    });
                }
            }
            Mode::FullCopy | Mode::Compare => {
                // The copy carries everything journaled so far; later records follow it.
                let seq = journal.last_seq();
                trim(seq)?;
                self.shipped_seq = seq;
                self.resync = Some(Resync {
                    kind: if mode == Mode::Compare {
                        ResyncKind::Compare
                    } else {
                        ResyncKind::Full
                    },
                    started: true,
                    total: self.size,
                    start_seq: seq,
                    pos: 0,
                    awaiting: VecDeque::new(),
                    differ: VecDeque::new(),
                    bytes_done: 0,
                });
            }
        }
        self.floor = durable_seq;
        self.next_set = durable_set + 1;
        self.phase = Phase::Running;
        self.progress(now);
        events.push(Event::Up {
            mode,
            durable_set,
            durable_seq,
            reason,
        });
        Ok(events)
    }

    fn on_ack(
        &mut self,
        set: u64,
        last_seq: u64,
        applied_set: u64,
        now: Instant,
        journal: &Journal,
    ) -> Result<Vec<Event>, SessionEnd> {
        let Some(front) = self.in_flight.front() else {
            return Err(SessionEnd::Protocol(format!(
                "acknowledgement of set {set}, but no set is in flight"
            )));
        };
        if front.set != set || front.durable_seq != last_seq {
            return Err(SessionEnd::Protocol(format!(
                "acknowledgement of set {set} (seq {last_seq}), expected set {} (seq {})",
                front.set, front.durable_seq
            )));
        }
        #[allow(unused_mut)]
        let mut trim_to = last_seq;
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.ack_one_set_early {
            if let Some(next) = self.in_flight.get(1) {
                trim_to = next.durable_seq;
            }
        }
        journal
            .ack(trim_to)
            .map_err(|e| SessionEnd::Protocol(format!("acknowledgement of set {set}: {e}")))?;
        let done = self.in_flight.pop_front().expect("checked");
        if !done.resynced.is_empty() {
            journal.resynced(&done.resynced, self.folds);
        }
        if let Some(c) = done.ends_resync {
            journal.resync_complete(self.folds, c == Covered::Whole);
        }
        if done.repaired > 0 {
            self.verify_repaired(done.repaired);
        }
        self.verify_acked(set, now);
        self.floor = last_seq;
        self.progress(now);
        let mut events = vec![Event::Acked { set, applied_set }];
        if self.consistent_at_set.is_some_and(|c| set >= c) {
            self.consistent_at_set = None;
            events.push(Event::MirrorConsistent);
        }
        Ok(events)
    }

    fn on_sums_reply(
        &mut self,
        offset: u64,
        chunk: u32,
        differ: Vec<bool>,
    ) -> Result<(), SessionEnd> {
        let r = self
            .resync
            .as_mut()
            .filter(|r| r.kind == ResyncKind::Compare)
            .ok_or_else(|| SessionEnd::Protocol("a comparison reply, but none runs".into()))?;
        take_reply(
            &mut r.awaiting,
            |a| a,
            offset,
            chunk,
            differ.len(),
            self.limits.copy_chunk,
        )?;
        for (i, d) in differ.into_iter().enumerate() {
            let at = offset + i as u64 * u64::from(chunk);
            if d {
                r.differ.push_back(at);
            } else {
                r.bytes_done += u64::from(chunk).min(self.size - at);
            }
        }
        Ok(())
    }

    /// The next thing to send, if any is due now: a journal set, a copy or comparison unit,
    /// or nothing (the window is full, the journal is empty, or a small set lingers: see
    /// [`Session::poll_timeout`]). Reads the journal and the volume.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        journal: &Journal,
        volume: &dyn VolumeRead,
    ) -> Result<Option<Transmit>, SessionEnd> {
        if !matches!(self.phase, Phase::Running) {
            return Ok(None);
        }
        if journal.folds() != self.folds {
            return Err(SessionEnd::Folded);
        }
        if let Some(r) = self.resync.as_ref().filter(|r| !r.started) {
            debug_assert_eq!(r.kind, ResyncKind::Dirty);
            // The resync's first set goes before any journal set.
            if self.in_flight.len() >= self.limits.window_sets {
                return Ok(None);
            }
            return self.resync_unit(now, journal, volume);
        }
        if !resync_dirty(journal, volume)? {
            self.busy_retry = Some(now + BUSY_RETRY);
        }
        if self.resync_turn && self.in_flight.len() < self.limits.window_sets {
            if let Some(t) = self.resync_unit(now, journal, volume)? {
                self.resync_turn = false;
                return Ok(Some(t));
            }
        }
        if self.verify_turn {
            self.verify_turn = false;
            if let Some(t) = self.verify_unit(now, journal, volume)? {
                return Ok(Some(t));
            }
        }
        if self.in_flight.len() >= self.limits.window_sets {
            // Comparisons need no room in the window.
            return self.verify_unit(now, journal, volume);
        }
        let (records, covered) = journal
            .collect(self.shipped_seq, self.limits.set_max_bytes)
            .map_err(local("journal"))?;
        if covered > self.shipped_seq {
            let bytes: u64 = records.iter().map(|r| r.extent.len()).sum();
            let idle = self.in_flight.is_empty() || self.resync.is_some();
            if !idle && bytes < self.limits.set_target_bytes {
                let until = *self.linger_until.get_or_insert(now + self.limits.linger);
                if now < until {
                    return Ok(None);
                }
            }
            self.linger_until = None;
            // The journal's CRCs of the records, for the pieces folding leaves whole.
            let mut known = KnownCrcs::default();
            for r in &records {
                if let (Payload::Data(data), Some(crc)) = (&r.extent.payload, r.crc) {
                    known.insert(data, crc);
                }
            }
            let newest_write_ms = records.iter().map(|r| r.written_ms).max().unwrap_or(0);
            let mut folder = Folder::new();
            for r in records {
                folder.add(r.extent);
            }
            let set = DeltaSet {
                set: self.next_set,
                first_seq: self.shipped_seq + 1,
                last_seq: covered,
                newest_write_ms,
                kind: SetKind::Journal,
                extents: folder.into_extents(),
            };
            self.shipped_seq = covered;
            self.resync_turn = true;
            self.verify_turn = self.verify.as_ref().is_some_and(|v| !v.progress.done);
            return Ok(Some(self.sent(set, known)));
        }
        self.linger_until = None;
        if self.in_flight.len() < self.limits.window_sets {
            if let Some(t) = self.resync_unit(now, journal, volume)? {
                return Ok(Some(t));
            }
        }
        self.verify_unit(now, journal, volume)
    }

    /// Account a set handed out for sending.
    fn sent(&mut self, set: DeltaSet, known: KnownCrcs) -> Transmit {
        // What the mirror will report as durable after this set: a journal set moves its
        // position, a copy set leaves it where the set before left it.
        let before = self.in_flight.back().map_or(self.floor, |f| f.durable_seq);
        let durable_seq = match set.kind {
            SetKind::Journal => before.max(set.last_seq),
            SetKind::Copy { done: true } => before.max(set.first_seq),
            SetKind::Copy { done: false } | SetKind::Repair => before,
        };
        match set.kind {
            SetKind::Copy { done: true } => {
                if self.shipped_seq >= set.last_seq {
                    self.consistent_at_set = Some(set.set);
                } else {
                    self.consistent_after_seq = Some(set.last_seq);
                }
            }
            SetKind::Journal => {
                if self.consistent_after_seq.is_some_and(|s| set.last_seq >= s) {
                    self.consistent_after_seq = None;
                    self.consistent_at_set = Some(set.set);
                }
            }
            SetKind::Copy { done: false } | SetKind::Repair => {}
        }
        self.in_flight.push_back(InFlight {
            set: set.set,
            durable_seq,
            resynced: Vec::new(),
            ends_resync: None,
            repaired: 0,
        });
        self.next_set += 1;
        Transmit::Set { set, known }
    }

    /// The next unit of the full copy or the comparison, if one is due. A chunk with a change
    /// in flight is left for a moment later (the unit ends before it).
    fn resync_unit(
        &mut self,
        now: Instant,
        journal: &Journal,
        volume: &dyn VolumeRead,
    ) -> Result<Option<Transmit>, SessionEnd> {
        let size = self.size;
        let chunk = self.limits.copy_chunk;
        // The mirror checks that checksums come right after this set (frame: version 8).
        let last_set_sent = self.next_set - 1;
        let Some(r) = self.resync.as_mut() else {
            return Ok(None);
        };
        let mut busy = false;
        if r.kind == ResyncKind::Dirty {
            return self.dirty_unit(now, journal, volume);
        }
        if r.kind == ResyncKind::Full {
            // Full copy: the next piece of the volume.
            let mut folder = Folder::new();
            let mut at = r.pos;
            while at < size && folder.data_bytes() < self.limits.set_max_bytes {
                let len = chunk.min(size - at);
                let Some(e) = read_chunk(volume, at, len)? else {
                    busy = true;
                    break;
                };
                folder.add(e);
                at += len;
            }
            if busy {
                self.busy_retry = Some(now + BUSY_RETRY);
            }
            if at > r.pos {
                r.bytes_done = at;
                r.pos = at;
                let set = self.copy_set(journal, folder.into_extents(), false);
                return Ok(Some(set));
            }
        }
        // Compare: first send what differs, then ask about more, then finish.
        let compare = r.kind == ResyncKind::Compare;
        if compare && !r.differ.is_empty() {
            let mut folder = Folder::new();
            while let Some(&at) = r.differ.front() {
                if folder.data_bytes() >= self.limits.set_max_bytes {
                    break;
                }
                let len = chunk.min(size - at);
                let Some(e) = read_chunk(volume, at, len)? else {
                    busy = true;
                    break;
                };
                r.differ.pop_front();
                folder.add(e);
                r.bytes_done += len;
            }
            if busy {
                self.busy_retry = Some(now + BUSY_RETRY);
            }
            if folder.is_empty() {
                return Ok(None);
            }
            let set = self.copy_set(journal, folder.into_extents(), false);
            return Ok(Some(set));
        }
        if compare && r.pos < size && r.awaiting.len() < self.limits.sums_in_flight {
            let offset = r.pos;
            let mut sums = Vec::with_capacity(self.limits.sums_per_message);
            let mut buf = vec![0u8; chunk as usize];
            while r.pos < size && sums.len() < self.limits.sums_per_message {
                let len = chunk.min(size - r.pos);
                let b = &mut buf[..len as usize];
                if !volume.read_settled(r.pos, b).map_err(local("volume"))? {
                    self.busy_retry = Some(now + BUSY_RETRY);
                    break;
                }
                sums.push(chunk_sum(b));
                r.pos += len;
            }
            if sums.is_empty() {
                return Ok(None);
            }
            r.awaiting.push_back((offset, sums.len()));
            return Ok(Some(Transmit::Message(Message::Sums {
                offset,
                chunk: u32::try_from(chunk).expect("chunks are small"),
                after_set: Some(last_set_sent),
                sums,
            })));
        }
        if r.pos >= size && r.awaiting.is_empty() && r.differ.is_empty() {
            // Everything copied (or compared, and what differed sent): the copy is complete
            // once the journal up to now is applied. Not while a range waits to be re-read:
            // the copy may hold a write whose record is still to come.
            if journal.stats().dirty_ranges > 0 {
                self.busy_retry = Some(now + BUSY_RETRY);
                return Ok(None);
            }
            let set = self.copy_set(journal, Vec::new(), true);
            // The copy holds every region the dirty map may have.
            self.in_flight.back_mut().expect("just sent").ends_resync = Some(Covered::Whole);
            return Ok(Some(set));
        }
        Ok(None)
    }

    /// The next unit of the dirty regions' resync: the regions from where the last one ended,
    /// read under their range locks, as a Copy set the mirror stages; at the end (and never
    /// while a range waits to be re-read), the set that closes it. The first set always goes,
    /// even empty: the mirror's staging starts with it.
    fn dirty_unit(
        &mut self,
        now: Instant,
        journal: &Journal,
        volume: &dyn VolumeRead,
    ) -> Result<Option<Transmit>, SessionEnd> {
        let chunk = self.limits.copy_chunk;
        let r = self.resync.as_mut().expect("a dirty resync runs");
        let runs = journal.dirty_runs(r.pos, self.limits.set_max_bytes, chunk);
        let mut folder = Folder::new();
        let mut resynced = Vec::new();
        let mut busy = false;
        for &(at, len) in &runs {
            let Some(e) = read_chunk(volume, at, len)? else {
                busy = true;
                break;
            };
            folder.add(e);
            resynced.push((at, len));
            r.pos = at + len;
            r.bytes_done += len;
        }
        if busy {
            self.busy_retry = Some(now + BUSY_RETRY);
        }
        if !resynced.is_empty() {
            r.started = true;
            let t = self.copy_set(journal, folder.into_extents(), false);
            self.in_flight.back_mut().expect("just sent").resynced = resynced;
            return Ok(Some(t));
        }
        if !runs.is_empty() {
            // Busy: a moment later.
            return Ok(None);
        }
        if journal.stats().dirty_ranges > 0 {
            self.busy_retry = Some(now + BUSY_RETRY);
            return Ok(None);
        }
        let t = self.copy_set(journal, Vec::new(), true);
        self.in_flight.back_mut().expect("just sent").ends_resync = Some(Covered::Dirty);
        Ok(Some(t))
    }

    /// A Copy set of `extents`: `first_seq` is where the copy began (every write up to it is
    /// in the copy), `last_seq` the journal's end now. Blocks read now may be newer than the
    /// sets sent so far: the mirror is consistent only once journal sets up to `last_seq` are
    /// applied.
    fn copy_set(&mut self, journal: &Journal, extents: Vec<Extent>, done: bool) -> Transmit {
        let seq = journal.last_seq();
        let start = self.resync.as_ref().map_or(seq, |r| r.start_seq);
        if done {
            self.resync = None;
        }
        let set = DeltaSet {
            set: self.next_set,
            first_seq: start,
            last_seq: seq,
            newest_write_ms: 0,
            kind: SetKind::Copy { done },
            extents,
        };
        self.resync_turn = false;
        self.sent(set, KnownCrcs::default())
    }
}

fn describe(m: &Message) -> String {
    format!("{m:?}").chars().take(80).collect()
}

/// SHA-256 of one chunk as the comparison sends it.
pub fn chunk_sum(data: &[u8]) -> [u8; SUM_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; SUM_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// How soon a read that found a change in flight is tried again.
const BUSY_RETRY: Duration = Duration::from_millis(1);

/// One chunk of the volume as an extent: a zero extent where it reads as zeroes (holes cost
/// nothing on the wire), else its data; None while a change to it is in flight.
fn read_chunk(volume: &dyn VolumeRead, at: u64, len: u64) -> io::Result<Option<Extent>> {
    Ok(read_chunk_bytes(volume, at, len)?.map(|buf| extent_of(at, buf)))
}

/// The bytes of a chunk read under its range lock, or None if a change to it is in flight.
fn read_chunk_bytes(volume: &dyn VolumeRead, at: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; len as usize];
    // A hole is read too (under the lock): a change may be filling it right now.
    if !volume.read_settled(at, &mut buf).map_err(local("volume"))? {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// A chunk read at `at` as an extent: zeroes cost nothing on the wire.
fn extent_of(at: u64, buf: Vec<u8>) -> Extent {
    let payload = if buf.iter().all(|&b| b == 0) {
        Payload::Zero(u32::try_from(buf.len()).expect("chunks are small"))
    } else {
        Payload::Data(Bytes::from(buf))
    };
    Extent {
        offset: at,
        payload,
    }
}

/// The reply to the oldest Sums message awaiting one (`awaiting`: offset, chunks, and what
/// else its caller keeps), checked against it: any other is a protocol error.
fn take_reply<T: Copy + std::fmt::Debug>(
    awaiting: &mut VecDeque<T>,
    key: impl Fn(T) -> (u64, usize),
    offset: u64,
    chunk: u32,
    count: usize,
    copy_chunk: u64,
) -> Result<T, SessionEnd> {
    match awaiting.front().copied() {
        Some(a) if key(a) == (offset, count) && u64::from(chunk) == copy_chunk => {
            awaiting.pop_front();
            Ok(a)
        }
        front => Err(SessionEnd::Protocol(format!(
            "a comparison reply for offset {offset}, expected {front:?}"
        ))),
    }
}

/// Largest piece re-read at once from a range the journal could not vouch for.
const RESYNC_PIECE: u64 = 1 << 20;

/// Re-read ranges whose content the journal could not vouch for (writes in flight at a crash,
/// failed writes, records that could not be written) and journal their current content.
/// A range that cannot be read now (a change to it is in flight, or the read fails) is kept
/// for the next try; returns whether every range was done.
pub fn resync_dirty(journal: &Journal, volume: &dyn VolumeRead) -> io::Result<bool> {
    let mut ranges = journal.take_dirty().into_iter();
    while let Some(d) = ranges.next() {
        tracing::info!(
            offset = d.offset,
            len = d.len,
            "re-reading a range the journal could not vouch for"
        );
        let end = (d.offset + d.len).min(volume.size());
        let mut at = d.offset;
        let mut done = Ok(true);
        while at < end {
            let n = RESYNC_PIECE.min(end - at);
            let mut buf = vec![0u8; n as usize];
            // The last piece closes the range's intent.
            let closes = (at + n >= end).then_some(&d);
            // Journaled while the range is locked: a client write to it that completes after
            // the read is journaled after this record, never before it (the mirror would
            // otherwise apply the older content last).
            let mut journaled = Ok(());
            let read = volume.read_settled_then(at, &mut buf, &mut |data| {
                journaled = journal
                    .resync(at, Bytes::copy_from_slice(data), closes)
                    .map(|_| ());
                Ok(())
            });
            done = match (read, journaled) {
                (Ok(true), Ok(())) => Ok(true),
                (Ok(true), Err(e)) => Err(local("journal")(e)),
                (other, _) => other.map_err(local("volume")),
            };
            if !matches!(done, Ok(true)) {
                break;
            }
            at += n;
        }
        if !matches!(done, Ok(true)) {
            // Read again from the start next time: the pieces read so far are journaled, and
            // reading them again is harmless.
            journal.give_back(std::iter::once(d).chain(ranges));
            return done;
        }
    }
    Ok(true)
}

/// The primary's per-volume state (`STATE/volumes/NAME.json`): which pair this volume belongs
/// to, its generations, and the disk it was last seen on.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrimaryVolumeState {
    /// Always "primary": a daemon of the other role refuses this state directory.
    pub role: String,
    pub identity: VolumeIdentity,
    /// The volume's disk is not what this state describes (replaced, or changed while the
    /// daemon was stopped), and no admin has accepted it: nothing is shipped. Kept across
    /// restarts until accepted.
    #[serde(default)]
    pub volume_changed: Option<String>,
    /// How this side last changed role (`promote`, `promote --force`, `demote`): a daemon
    /// started as the other role follows it instead of refusing the state directory.
    #[serde(default)]
    pub changed_role: Option<String>,
    /// A split brain seen: this side served its clients while its peer was a primary
    /// promoted from its data (the peer's promoted generation). A restart then does not fail
    /// back on its own (its writes since are its clients', not a tail): an admin resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_brain: Option<GenId>,
    /// It served its clients without its peer's word (the peer did not answer at start, or
    /// an admin said to serve): writes the peer may never see, made knowingly. Should the
    /// peer turn out to be promoted, that is a split brain, not a tail to fail back from.
    /// Cleared once the peer answers as a secondary.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub served_unconfirmed: bool,
}

impl PrimaryVolumeState {
    pub fn path(state_dir: &Path, volume: &str) -> PathBuf {
        state_dir.join("volumes").join(format!("{volume}.json"))
    }

    pub fn load(fs: &dyn FileSystem, path: &Path) -> io::Result<Option<PrimaryVolumeState>> {
        match fs.read(path) {
            Ok(b) => {
                let st: PrimaryVolumeState = serde_json::from_slice(&b).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                if st.role != "primary" {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} belongs to a {} (this daemon is a primary)",
                            path.display(),
                            st.role
                        ),
                    ));
                }
                Ok(Some(st))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(fs, path, &bytes)
    }

    /// The state at a start of the primary: loaded (or new), the volume's disk checked against
    /// it, and a new generation minted at `next_seq` (continuous unless the host crashed or
    /// the state is new, or the journal no longer reaches where the lineage says writes were
    /// numbered). Persist it, then mark the journal running, before any write is taken.
    pub fn at_start(
        loaded: Option<PrimaryVolumeState>,
        disk: &Fingerprint,
        last_stop: LastStop,
        next_seq: u64,
        gen: GenId,
    ) -> PrimaryVolumeState {
        let mut st = loaded.unwrap_or_else(|| PrimaryVolumeState {
            role: "primary".into(),
            ..Default::default()
        });
        if st.volume_changed.is_none() {
            if let Some(known) = &st.identity.fingerprint {
                if !known.same_disk(disk) {
                    st.volume_changed = Some(format!(
                        "the volume is not the disk this state describes: it was {}, it is {}",
                        known.describe(),
                        disk.describe()
                    ));
                } else if last_stop == LastStop::Clean && disk.changed_since(known) {
                    st.volume_changed = Some(format!(
                        "the volume changed while the daemon was stopped ({} was sealed at \
                         the clean stop)",
                        known.describe()
                    ));
                }
            }
        }
        let fresh = st.identity.lineage.spans.is_empty();
        // Records the lineage knows were written are gone from the journal: a break, whatever
        // the journal says of the last stop.
        let lost = st
            .identity
            .lineage
            .current()
            .is_some_and(|c| next_seq < c.first_seq);
        let continuous = !fresh && !lost && last_stop != LastStop::HostCrash;
        st.identity.lineage.mint(gen, next_seq, continuous);
        if st.volume_changed.is_none() {
            // Not sealed while running: the daemon's own writes move the change time.
            let mut seen = disk.clone();
            seen.ctime = None;
            st.identity.fingerprint = Some(seen);
        }
        st
    }

    /// An admin accepts the volume as it is now (after a replacement or a change while
    /// stopped): its disk is recorded, and a new generation with a break starts at
    /// `next_seq`, so the mirror is brought to it by a comparison, never resumed on a guess.
    /// Returns false (and changes nothing) when the volume is not marked changed: a session may
    /// be running on the current generation, and there is nothing to accept.
    pub fn accept_volume(&mut self, disk: &Fingerprint, next_seq: u64, gen: GenId) -> bool {
        if self.volume_changed.is_none() {
            return false;
        }
        self.volume_changed = None;
        let mut seen = disk.clone();
        seen.ctime = None;
        self.identity.fingerprint = Some(seen);
        self.identity.lineage.mint_accepted(gen, next_seq);
        true
    }

    /// The claim this state makes in Identify.
    pub fn claim(&self, journal: &Journal, disk: &Fingerprint) -> PrimaryClaim {
        PrimaryClaim {
            uuid: self.identity.uuid,
            lineage: self.identity.lineage.clone(),
            journal_acked: journal.holds_after(),
            journal_last: journal.last_seq(),
            fingerprint: disk.clone(),
            resync_from: journal.fold().and_then(|f| f.covers_after),
        }
    }
}
