//! The mirror's rules for one volume, without I/O of its own: the decision when a primary
//! connects, which set may come next, what is durable and acknowledged, what is applied, what
//! a checkpoint saves. The driver (`repl::mirror`: a redo writer, a sync and an applier thread
//! per volume) and the simulator both call these, so both keep the same rules:
//!
//! - a set is accepted only if it is the next one and lies inside the volume;
//! - checksums are answered only right after the set they name as the last one sent before
//!   them ([`MirrorCore::sums_in_order`]);
//! - a set is acknowledged only once the redo log holding it is synced ([`MirrorCore::synced`]);
//! - sets are applied in order, and leave the redo log only once a checkpoint synced the
//!   volume after them;
//! - a session's decision (resume, full copy, compare, refuse) comes from
//!   `repl::identity::decide`, taken only once everything durable is applied, and is persisted
//!   before it is answered.

use super::ReplState;
use crate::disk::fingerprint::Fingerprint;
use crate::repl::apply::{CopyState, Stager, Staging, Step, VolumeState};
use crate::repl::frame::{
    DeltaSet, Message, Mode, RefuseCode, SetKind, OLDEST_PROTOCOL_VERSION, OLDEST_SESSION_VERSION,
    PROTOCOL_VERSION, RESYNC_IN_IDENTIFY_VERSION,
};
use crate::repl::identity::{
    decide, foreign, staged_resync_continues, Decision, GenId, MirrorHolds, PrimaryClaim,
    RefuseKind, VolumeUuid,
};

/// A refusal: its code and why.
pub type Refusal = (RefuseCode, String);

/// How far the redo log has got: the last set written (or durable) and the journal sequence
/// and copy state after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub set: u64,
    pub seq: u64,
    pub copy_done: bool,
}

/// A session accepted: the Decision to send once the state is saved.
#[derive(Debug)]
pub struct Accept {
    /// To send before the decision (Takeover messages: a divergent tail this side gave up).
    pub before: Vec<Message>,
    pub decision: Message,
    pub mode: Mode,
    pub reason: String,
}

/// A set accepted into the redo log.
#[derive(Debug)]
pub struct Accepted {
    /// The redo log's position once the set is written.
    pub after: Durable,
    /// An acknowledgement to send right away: only ever from a planted bug.
    pub ack_now: Option<Message>,
}

/// A failure of the mirror's own storage: status says which part failed, sessions are
/// refused with it, and it clears when the part works again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: RefuseCode,
    pub why: String,
}

/// The mirror's rules for one volume (module doc).
pub struct MirrorCore {
    name: String,
    size: u64,
    /// What is applied (in memory; saved at checkpoints and decisions).
    state: VolumeState,
    /// The redo writer's position (written, maybe not yet synced).
    written: Durable,
    /// Synced in the redo log, acknowledged.
    durable: Durable,
    /// The applied set as of the last checkpoint (volume synced, state saved).
    checkpointed: u64,
    /// Sessions started so far.
    sessions: u64,
    /// The newest session whose barrier has passed the redo writer: sets of older sessions
    /// arriving after it are dropped (their primary re-sends them).
    session: u64,
    failure: Option<Failure>,
    /// A failure only a restart ends: the redo log or the history failed a sync, and what it
    /// holds may never reach the disk whatever later syncs say (Linux marks pages whose
    /// writeback failed clean). No other failure replaces it and nothing clears it: a record
    /// appended after those would sit behind a hole after a power cut.
    lasting: Option<Failure>,
    /// A permanent refusal of the last session (split brain, unrelated), for status.
    refused: Option<(ReplState, String)>,
    /// This session's decision named writes this side gave up (Takeover): the first set must
    /// be the primary's resync of them (a Copy set, which the volume stages). A journal set
    /// first, applied, would land on those writes and make a state nobody wrote.
    resync_first: bool,
    /// The volume held data when the daemon started (see [`MirrorCore::new`]).
    volume_holds_data: bool,
    /// A resync being staged (`apply::Stager`): its sets are durable, not applied.
    stager: Stager,
    /// A staged resync being applied: the state at its end, which the volume holds once its
    /// sets (durable in the redo log) are applied, as a replay after a crash would.
    committing: Option<VolumeState>,
    /// The applier waits (its history is full, `--history-full wait`): sets are still
    /// received and made durable in the redo log; the volume stays at its older point.
    waiting: Option<String>,
    #[cfg(any(test, feature = "test-hooks"))]
    pub bugs: super::PlantedBugs,
}

/// What a Hello must say before anything else is read: the protocol version this mirror
/// speaks (an older primary sends no Identify: it cannot say whose data it holds) and the
/// volume's size here. The driver checks it on arrival; [`MirrorCore::hello`] again.
pub fn check_hello(version: u16, volume: &str, size: u64, here: u64) -> Result<(), Refusal> {
    if !(OLDEST_SESSION_VERSION..=PROTOCOL_VERSION).contains(&version) {
        let why = if (OLDEST_PROTOCOL_VERSION..OLDEST_SESSION_VERSION).contains(&version) {
            format!(
                "protocol version {version} has no volume identities; this mirror needs \
                 version {OLDEST_SESSION_VERSION} to {PROTOCOL_VERSION}: upgrade the primary"
            )
        } else {
            format!(
                "protocol version {version} unsupported (this mirror speaks \
                 {OLDEST_SESSION_VERSION} to {PROTOCOL_VERSION})"
            )
        };
        return Err((RefuseCode::Version, why));
    }
    if size != here {
        return Err((
            RefuseCode::SizeMismatch,
            format!("volume {volume}: primary has {size} bytes, mirror has {here}"),
        ));
    }
    Ok(())
}

impl MirrorCore {
    /// Check the volume's disk, as found before the redo log was replayed, against what its
    /// state said of it then (`known`; the replay seals the state again):
    /// a disk that is not the one the state describes, or that changed since the state sealed
    /// it (`sealed_valid`: nothing was applied after the seal), makes the volume not
    /// consistent until a resync completes. Call it after the replay.
    pub fn check_disk(
        name: &str,
        state: &mut VolumeState,
        known: Option<&Fingerprint>,
        disk: Option<&Fingerprint>,
        sealed_valid: bool,
    ) {
        let (Some(known), Some(now)) = (known, disk) else {
            return;
        };
        let why = if !known.same_disk(now) {
            Some(format!(
                "the volume is not the disk this state describes: it was {}, it is {}",
                known.describe(),
                now.describe()
            ))
        } else if sealed_valid && now.changed_since(known) {
            Some("the volume changed while the mirror was not applying to it".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            tracing::error!(volume = %name, "{why}: NOT consistent until the primary resyncs it");
            state.volume_changed = Some(why);
        }
    }

    /// The rules for a volume of `size` bytes whose persisted, checked and replayed state is
    /// `state`; `disk` is its disk now (after the replay); `volume_holds_data` whether the
    /// volume holds data (`ApplyTarget::holds_data`), which matters only while no copy was
    /// ever received.
    pub fn new(
        name: &str,
        size: u64,
        mut state: VolumeState,
        disk: Option<Fingerprint>,
        volume_holds_data: bool,
        staged: Option<Staging>,
    ) -> MirrorCore {
        if disk.is_some() {
            state.identity.fingerprint = disk;
        }
        // A staged resync's sets are durable: the redo log holds them past the applied state.
        let ahead = staged.as_ref().map_or(&state, |s| &s.shadow);
        let durable = Durable {
            set: ahead.applied_set,
            seq: ahead.applied_seq,
            copy_done: ahead.copy == CopyState::Done,
        };
        MirrorCore {
            name: name.to_string(),
            size,
            checkpointed: state.applied_set,
            state,
            written: durable,
            durable,
            sessions: 0,
            session: 0,
            failure: None,
            lasting: None,
            refused: None,
            resync_first: false,
            volume_holds_data,
            stager: Stager { staging: staged },
            committing: None,
            waiting: None,
            #[cfg(any(test, feature = "test-hooks"))]
            bugs: super::PlantedBugs::default(),
        }
    }

    /// The resync being staged: (its first set, the last set staged), if one is.
    pub fn staging(&self) -> Option<(u64, u64)> {
        self.stager
            .staging
            .as_ref()
            .map(|s| (s.first, s.shadow.applied_set))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> &VolumeState {
        &self.state
    }

    pub fn durable(&self) -> Durable {
        self.durable
    }

    pub fn checkpointed(&self) -> u64 {
        self.checkpointed
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.lasting.as_ref().or(self.failure.as_ref())
    }

    pub fn refused(&self) -> Option<&(ReplState, String)> {
        self.refused.as_ref()
    }

    /// A new session begins: its number. Once its barrier reaches the redo writer
    /// ([`MirrorCore::enter_session`]), sets of older sessions are dropped.
    pub fn new_session(&mut self) -> u64 {
        self.sessions += 1;
        self.sessions
    }

    /// Session `id`'s barrier reached the redo writer: what older sessions queued before it
    /// was written; what they send after it is stale.
    pub fn enter_session(&mut self, id: u64) {
        self.session = self.session.max(id);
    }

    /// The redo writer's position.
    pub fn written_position(&self) -> Durable {
        self.written
    }

    /// A claim from another volume pair's primary, refused on arrival, before its connection
    /// may replace a session (`identity::foreign`: the identities alone say so). While this
    /// pair's own session is `live` the stranger does not change what status says of it.
    pub fn screen(&mut self, claim: &PrimaryClaim, live: bool) -> Result<(), Refusal> {
        let id = &self.state.identity;
        let Some(why) = id
            .uuid
            .and_then(|mu| foreign(claim, mu, id.peer_fingerprint.as_ref()))
        else {
            return Ok(());
        };
        if !live {
            self.refused = Some((ReplState::Unrelated, why.clone()));
        }
        Err((RefuseCode::Unrelated, why))
    }

    /// The decision on Hello + Identify. Call it only once everything durable is applied and
    /// checkpointed (the driver's barrier). On `Ok`, save [`MirrorCore::state`] durably before
    /// sending the decision: a full copy or comparison marks the volume not consistent first.
    /// `new_uuid` names a pair seen for the first time (random in production, the seed's in the
    /// simulator).
    pub fn hello(
        &mut self,
        version: u16,
        volume: &str,
        size: u64,
        claim: &PrimaryClaim,
        new_uuid: impl FnOnce() -> VolumeUuid,
    ) -> Result<Accept, Refusal> {
        if volume != self.name {
            return Err((
                RefuseCode::UnknownVolume,
                format!("no volume named {volume:?} here"),
            ));
        }
        check_hello(version, volume, size, self.size)?;
        if let Some(f) = &self.lasting {
            return Err((f.code, f.why.clone()));
        }
        match &self.failure {
            // The redo log is retried by the session itself: if it is still full or broken,
            // its first write fails again and says so.
            Some(f) if f.code == RefuseCode::RedoFailed => {
                tracing::info!(volume = %self.name, "retrying the redo log after: {}", f.why);
                self.failure = None;
            }
            Some(f) => return Err((f.code, f.why.clone())),
            None => {}
        }
        // The applier waits on its history: nothing more is taken until it goes on (the
        // primary keeps the writes; it is told why and tries again).
        if let Some(why) = &self.waiting {
            return Err((RefuseCode::RedoFailed, why.clone()));
        }
        assert_eq!(
            self.written, self.durable,
            "a decision is taken with nothing unsynced"
        );
        assert_eq!(
            self.durable.set,
            self.stager.next_set(&self.state) - 1,
            "a decision is taken with everything durable applied or staged"
        );
        let st = &self.state;
        let holds = MirrorHolds {
            uuid: st.identity.uuid,
            lineage: st.identity.lineage.clone(),
            position: st.consistent().then_some(st.applied_seq),
            durable_seq: self.durable.seq,
            position_gen: st.position_gen,
            staged: self
                .stager
                .staging
                .as_ref()
                .is_some_and(|s| s.shadow.copy != CopyState::Done),
            has_data: st.copy != CopyState::None,
            unrecorded_data: st.copy == CopyState::None && self.volume_holds_data,
            peer_fingerprint: st.identity.peer_fingerprint.clone(),
        };
        let decision = if version < RESYNC_IN_IDENTIFY_VERSION && holds.staged {
            // A primary older than version 5 cannot say whether its dirty map still covers
            // the regions the stage lacks (it may have cleared those the mirror holds staged):
            // neither finishing nor dropping the stage is safe.
            Decision::Compare {
                why: format!(
                    "a resync is staged and a version-{version} primary cannot say whether it \
                     can finish it: compared"
                ),
            }
        } else {
            decide(claim, &holds)
        };
        tracing::info!(volume = %self.name, primary_uuid = ?claim.uuid,
            mirror_uuid = ?holds.uuid, primary_gen = ?claim.lineage.current().map(|s| s.gen),
            mirror_gen = ?self.state.position_gen, mirror_position = ?holds.position,
            ?decision, "decision on connect");
        let (mode, reason) = match decision {
            Decision::Refuse { kind, why } => {
                let (code, state) = match kind {
                    RefuseKind::Unrelated => (RefuseCode::Unrelated, ReplState::Unrelated),
                    RefuseKind::SplitBrain => (RefuseCode::SplitBrain, ReplState::SplitBrain),
                };
                self.refused = Some((state, why.clone()));
                return Err((code, why));
            }
            Decision::Resume { from_seq } => {
                debug_assert!(
                    from_seq == self.durable.seq || !staged_resync_continues(claim, &holds)
                );
                (Mode::Resume, "same data: resuming".to_string())
            }
            Decision::FullCopy { why } => (Mode::FullCopy, why),
            Decision::Compare { why } => (Mode::Compare, why),
        };
        self.refused = None;
        // A tail this side gave up is the peer's to resync only while the volume still is that
        // state with the tail on it: a resync that moved the volume on (its stage committed,
        // a comparison) replaced it.
        if self.state.takeover.is_some() && !self.state.holds_given_up_writes() {
            tracing::info!(volume = %self.name, "the divergent tail given up is replaced by the peer's data");
            self.state.takeover = None;
        }
        #[allow(unused_mut)]
        let mut before: Vec<Message> = match (self.state.given_up_regions(self.size), mode) {
            (Some(regions), Mode::Resume) => regions
                .chunks(crate::repl::frame::MAX_TAKEOVER_RANGES)
                .map(|c| Message::Takeover {
                    regions: c.to_vec(),
                })
                .collect(),
            _ => Vec::new(),
        };
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.forget_takeover {
            before.clear();
        }
        self.resync_first = !before.is_empty();
        let uuid = claim
            .uuid
            .or(self.state.identity.uuid)
            .unwrap_or_else(new_uuid);
        let st = &mut self.state;
        st.identity.uuid = Some(uuid);
        st.identity.lineage = claim.lineage.clone();
        // A primary writes again: whatever it said of a demotion is over.
        st.peer_demoted = None;
        let mut peer = claim.fingerprint.clone();
        peer.ctime = None;
        st.identity.peer_fingerprint = Some(peer);
        // A staged resync is abandoned (its sets never applied) for a copy or comparison,
        // which sends whatever differs, or when this primary cannot finish it.
        if mode != Mode::Resume || !staged_resync_continues(claim, &holds) {
            if let Some(staging) = self.stager.staging.take() {
                tracing::warn!(volume = %self.name, first_set = staging.first,
                    "a staged resync is abandoned for a {mode:?}: {reason}");
                st.applied_set = staging.shadow.applied_set;
                self.durable.seq = st.applied_seq;
                self.written = self.durable;
            }
        }
        if mode != Mode::Resume {
            // Chunks will be overwritten: not a state of the primary's until the copy ends.
            st.copy = CopyState::Running;
            st.applied_seq = 0;
            st.consistent_after_seq = 0;
            st.position_gen = None;
            self.durable.seq = 0;
            self.durable.copy_done = false;
            self.written = self.durable;
        } else {
            st.identity.synced = claim.lineage.current().map(|s| s.gen);
        }
        Ok(Accept {
            before,
            decision: Message::Decision {
                uuid,
                mode,
                durable_set: self.durable.set,
                durable_seq: self.durable.seq,
                reason: reason.clone(),
            },
            mode,
            reason,
        })
    }

    /// A set arrived for session `session`. `Ok(None)`: it belongs to a replaced session and is
    /// dropped (its primary re-sends it after the new session's decision).
    pub fn accept(&mut self, session: u64, set: &DeltaSet) -> Result<Option<Accepted>, Refusal> {
        if session < self.session {
            return Ok(None);
        }
        if let Some(f) = self.failure() {
            return Err((f.code, f.why.clone()));
        }
        if let Some(why) = &self.waiting {
            return Err((RefuseCode::RedoFailed, why.clone()));
        }
        let w = self.written;
        if set.set != w.set + 1 {
            let what = if set.set > w.set + 1 {
                "from the future"
            } else {
                "already durable"
            };
            return Err((
                RefuseCode::BadSet,
                format!("set {} is {what} (next expected {})", set.set, w.set + 1),
            ));
        }
        if let Some(e) = set.extents.iter().find(|e| e.end() > self.size) {
            return Err((
                RefuseCode::BadSet,
                format!(
                    "set {} writes past the volume's end ({} > {})",
                    set.set,
                    e.end(),
                    self.size
                ),
            ));
        }
        if self.resync_first {
            if !matches!(set.kind, SetKind::Copy { .. }) {
                return Err((
                    RefuseCode::BadSet,
                    format!(
                        "set {} is no resync set, but this side gave up writes of its own \
                         (Takeover): the primary's resync of them must come first",
                        set.set
                    ),
                ));
            }
            self.resync_first = false;
        }
        let mut d = w;
        d.set = set.set;
        match set.kind {
            SetKind::Journal => d.seq = d.seq.max(set.last_seq),
            SetKind::Copy { done } => {
                d.copy_done = done;
                if done {
                    d.seq = d.seq.max(set.first_seq);
                }
            }
            SetKind::Repair => {}
        }
        self.written = d;
        #[allow(unused_mut)]
        let mut ack_now = None;
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.ack_before_sync {
            ack_now = Some(self.ack_message(d));
        }
        Ok(Some(Accepted { after: d, ack_now }))
    }

    /// Checksums (a comparison's or a verify's) arrived for session `session`, sent after set
    /// `after_set` (None: a primary older than version 8, which does not say). `Ok(false)`:
    /// they belong to a replaced session and are dropped, as its sets are. They must come
    /// right after that set, in stream order: answered before it, or after a later one, they
    /// would compare the primary's chunks with another state than theirs and report a
    /// difference that is none (or miss one). A transport that reorders is refused; the
    /// session starts again from the durable set.
    pub fn sums_in_order(&self, session: u64, after_set: Option<u64>) -> Result<bool, Refusal> {
        if session < self.session {
            return Ok(false);
        }
        match after_set {
            Some(a) if a != self.written.set => Err((
                RefuseCode::BadMessage,
                format!(
                    "checksums that follow set {a} arrived after set {}: out of stream order",
                    self.written.set
                ),
            )),
            _ => Ok(true),
        }
    }

    /// Writing sets to the redo log failed: they are forgotten (the primary re-sends them) and
    /// the log's tail is rewritten from `back_to`, the position before them.
    pub fn write_failed(&mut self, back_to: Durable, failure: Failure) {
        self.written = back_to;
        self.fail(failure);
    }

    /// The redo log is synced up to `after` (a set written earlier): it is durable. Returns the
    /// acknowledgement to send.
    pub fn synced(&mut self, after: Durable) -> Option<Message> {
        debug_assert!(after.set <= self.written.set);
        // Sets written after a failed sync sit behind what it may have lost: never durable.
        if self.lasting.is_some() {
            return None;
        }
        self.durable = after;
        // The storage works again: a failure of the redo log clears itself.
        if self
            .failure
            .as_ref()
            .is_some_and(|f| f.code == RefuseCode::RedoFailed)
        {
            tracing::info!(volume = %self.name, "redo log works again");
            self.failure = None;
        }
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.ack_before_sync {
            return None;
        }
        Some(self.ack_message(after))
    }

    fn ack_message(&self, d: Durable) -> Message {
        Message::Ack {
            set: d.set,
            last_seq: d.seq,
            applied_set: self.state.applied_set,
        }
    }

    /// What the applier does with `set`, the next durable set (sets are applied in order,
    /// each once; a staged resync's sets wait for its end: `apply::Stager`). Call
    /// [`MirrorCore::applied`] for each set then applied.
    /// `received_ms`: when `set` arrived (a stage's end point is as recent as its last set).
    pub fn next_step(&mut self, set: &DeltaSet, received_ms: u64) -> Result<Step, String> {
        self.check_apply(set)?;
        #[allow(unused_mut)]
        let mut step = self.stager.step(&self.state, set);
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.apply_resync_in_place && step == Step::Stage {
            self.stager.staging = None;
            step = Step::Apply;
        }
        match &step {
            Step::Stage
                if self
                    .stager
                    .staging
                    .as_ref()
                    .is_some_and(|s| s.first == set.set) =>
            {
                tracing::info!(volume = %self.name, first_set = set.set,
                    "resync staged: the volume keeps its consistent state until the resync's \
                     end point is durable");
            }
            Step::Commit { first, state } => {
                tracing::info!(volume = %self.name, first_set = first, last_set = set.set,
                    "staged resync complete: applying it");
                let mut end = (**state).clone();
                end.newest_received_ms = end.newest_received_ms.max(received_ms);
                // The peer's data replaces the writes this side gave up (saved): at its end
                // the volume is the peer's copy.
                end.takeover = None;
                self.committing = Some(end);
            }
            _ => {}
        }
        Ok(step)
    }

    /// `set` is the next set the applier may take.
    fn check_apply(&self, set: &DeltaSet) -> Result<(), String> {
        let next = self.stager.next_set(&self.state);
        if set.set != next {
            return Err(format!(
                "set {} reached the applier after set {}",
                set.set,
                next - 1
            ));
        }
        if set.set > self.durable.set {
            return Err(format!(
                "set {} reached the applier before it was durable (durable: {})",
                set.set, self.durable.set
            ));
        }
        Ok(())
    }

    /// `set` was written to the volume (not yet synced), received at `received_ms` (this
    /// host's clock).
    pub fn applied(&mut self, set: &DeltaSet, received_ms: u64) {
        self.state.advance(set);
        self.state.newest_received_ms = self.state.newest_received_ms.max(received_ms);
        if self
            .committing
            .as_ref()
            .is_some_and(|c| set.set >= c.applied_set)
        {
            self.committing = None;
        }
        if self.state.consistent() {
            self.state.identity.synced = self.state.position_gen;
        }
    }

    /// The primary says it was demoted with its data at (`gen`, `seq`). Recorded (save
    /// [`MirrorCore::state`] before answering) when this volume holds exactly that state:
    /// everything durable applied up to `seq`, consistent, `gen` in its lineage. A promotion
    /// without `--force` then continues it (`role::promoted`).
    pub fn peer_demoted(&mut self, gen: GenId, seq: u64) -> Result<(), String> {
        let st = &self.state;
        if self.stager.staging.is_some() || self.committing.is_some() {
            return Err("a staged resync is not finished".into());
        }
        #[cfg(any(test, feature = "test-hooks"))]
        let seq_matters = !self.bugs.demote_unacknowledged;
        #[cfg(not(any(test, feature = "test-hooks")))]
        let seq_matters = true;
        if !st.consistent()
            || (seq_matters && st.applied_seq != seq)
            || self.durable.set != st.applied_set
        {
            return Err(format!(
                "the peer was demoted at seq {seq}; this side holds {} (consistent {}, durable \
                 set {}, applied set {})",
                st.applied_seq,
                st.consistent(),
                self.durable.set,
                st.applied_set
            ));
        }
        if !st.identity.lineage.spans.iter().any(|s| s.gen == gen) {
            return Err(format!(
                "the peer's generation {gen} is not in this side's lineage"
            ));
        }
        // (With the planted mistake, the notice is taken for whatever this side holds.)
        self.state.peer_demoted = Some((gen, if seq_matters { seq } else { st.applied_seq }));
        Ok(())
    }

    /// Whether the volume may be promoted now, as `blkmirror promote` says it: every durable
    /// set applied (the driver drains first), and the volume a consistent copy. A resync
    /// staged on top of it cannot be finished without its primary: without `force` that is a
    /// reason to wait; with it the staged sets are dropped and the volume keeps the consistent
    /// state it holds. Save [`MirrorCore::state`] before the promotion is committed.
    pub fn prepare_promotion(&mut self, force: bool) -> Result<(), String> {
        if self.committing.is_some() {
            return Err("a staged resync is being applied".into());
        }
        if let Some(staging) = &self.stager.staging {
            if !force {
                return Err(format!(
                    "a resync from the primary is staged from set {} and not finished: the \
                     volume holds the older consistent state (promote --force keeps it)",
                    staging.first
                ));
            }
        }
        if self.stager.next_set(&self.state) <= self.durable.set {
            return Err(format!(
                "sets up to {} are durable but applied only up to {}",
                self.durable.set,
                self.stager.next_set(&self.state) - 1
            ));
        }
        if !self.state.consistent() {
            return Err(
                "the volume is not a consistent copy (a full copy or comparison has not \
                 finished)"
                    .into(),
            );
        }
        if let Some(staging) = self.stager.staging.take() {
            tracing::warn!(volume = %self.name, first_set = staging.first,
                "promotion: the staged resync is dropped, the volume keeps its consistent state");
            self.state.applied_set = staging.shadow.applied_set;
            self.durable.seq = self.state.applied_seq;
            self.written = self.durable;
        }
        Ok(())
    }

    /// The state a checkpoint saves, once the volume is synced; `disk` is the volume's disk
    /// now (sealing its change time: nothing applied since the sync).
    pub fn checkpoint_state(&mut self, disk: Option<Fingerprint>) -> VolumeState {
        if let Some(d) = disk {
            self.state.identity.fingerprint = Some(d);
        }
        self.state.clone()
    }

    /// A checkpoint saved the state with sets up to `set` applied and synced: they may leave
    /// the redo log.
    pub fn checkpoint_done(&mut self, set: u64) {
        self.checkpointed = self.checkpointed.max(set);
    }

    /// The failure only a restart ends, if there is one (see `lasting`).
    pub fn lasting_failure(&self) -> Option<&Failure> {
        self.lasting.as_ref()
    }

    /// A failure only a restart ends (see `lasting`); the first one is kept.
    pub fn fail_until_restart(&mut self, failure: Failure) {
        if self.lasting.is_none() {
            tracing::error!(volume = %self.name, code = ?failure.code, "{}", failure.why);
            self.lasting = Some(failure);
        }
    }

    /// A part of the mirror's storage failed (I2: never silent).
    pub fn fail(&mut self, failure: Failure) {
        // Logged once, not at every retry of the same failure.
        if self.failure.as_ref() != Some(&failure) {
            tracing::error!(volume = %self.name, code = ?failure.code, "{}", failure.why);
        }
        self.failure = Some(failure);
    }

    /// The part that failed with `failure` works again: it is over, unless another failure
    /// has replaced it since.
    pub fn works_again(&mut self, failure: &Failure) {
        if self.failure.as_ref() == Some(failure) {
            tracing::info!(volume = %self.name, "works again after: {}", failure.why);
            self.failure = None;
        }
    }

    /// The applier cannot apply the next set for now (its history is full and keeps every
    /// point): not a failure (the volume is consistent at its older point, and says so), but
    /// no more sets are taken until it goes on: the primary keeps them and is told why.
    /// Logged once.
    pub fn apply_waits(&mut self, why: String) {
        if self.waiting.as_ref() != Some(&why) {
            tracing::warn!(volume = %self.name, "{why}");
        }
        self.waiting = Some(why);
    }

    /// The applier applied a set: whatever it waited for is over.
    pub fn apply_goes_on(&mut self) {
        if self.waiting.take().is_some() {
            tracing::info!(volume = %self.name, "applying again");
        }
    }

    /// Why the applier waits, if it does.
    pub fn waiting(&self) -> Option<&str> {
        self.waiting.as_deref()
    }

    /// The volume accepted writes again after failing: the failure is over.
    pub fn volume_works(&mut self) {
        if self
            .failure
            .as_ref()
            .is_some_and(|f| f.code == RefuseCode::VolumeFailed)
        {
            tracing::info!(volume = %self.name, "the mirror volume works again");
            self.failure = None;
        }
    }

    /// What the volume holds for anyone who reads it after a replay of the redo log (status,
    /// RPO): the state, or while a staged resync is being applied, the state at its end (its
    /// sets are durable: a crash mid-way replays them; the on-disk mix in between is never
    /// served).
    pub fn visible_state(&self) -> &VolumeState {
        self.committing.as_ref().unwrap_or(&self.state)
    }

    /// A staged resync's sets are being applied.
    pub fn committing(&self) -> bool {
        self.committing.is_some()
    }

    /// What status shows of the volume's replication state.
    pub fn repl_state(&self, link_up: bool) -> ReplState {
        if self.failure().is_some() {
            return ReplState::Failed;
        }
        if let Some((s, _)) = &self.refused {
            return *s;
        }
        if !link_up {
            return ReplState::Connecting;
        }
        if self.visible_state().consistent() {
            ReplState::Replicating
        } else {
            ReplState::Resyncing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a completed stage is applied, status's consistency and data age are the stage's
    /// end point's: its newest write, received when its last set arrived (found in review:
    /// the age counted from before the resync).
    #[test]
    fn a_committing_stage_shows_its_end_point() {
        let st = VolumeState {
            applied_set: 5,
            applied_seq: 10,
            copy: CopyState::Done,
            newest_write_ms: 1_000,
            newest_received_ms: 1_000,
            ..Default::default()
        };
        let mut core = MirrorCore::new("v", 1 << 20, st, None, false, None);
        let s = core.new_session();
        core.enter_session(s);
        let set = |n: u64, kind: SetKind, first: u64, last: u64, w: u64| DeltaSet {
            set: n,
            first_seq: first,
            last_seq: last,
            newest_write_ms: w,
            kind,
            extents: Vec::new(),
        };
        let sets = [
            set(6, SetKind::Copy { done: false }, 10, 11, 0),
            set(7, SetKind::Copy { done: true }, 10, 12, 0),
            set(8, SetKind::Journal, 11, 12, 600_000),
        ];
        for x in &sets {
            let a = core.accept(s, x).unwrap().unwrap();
            core.synced(a.after);
        }
        let steps: Vec<Step> = sets
            .iter()
            .map(|x| core.next_step(x, 600_500).unwrap())
            .collect();
        assert_eq!(steps[0], Step::Stage);
        assert!(
            matches!(steps[2], Step::Commit { first: 6, .. }),
            "{steps:?}"
        );
        core.applied(&sets[0], 600_500);
        let v = core.visible_state();
        assert!(core.committing() && v.consistent());
        assert_eq!((v.applied_set, v.newest_write_ms), (8, 600_000));
        assert_eq!(v.newest_received_ms, 600_500);
        assert!(
            !core.state().consistent(),
            "in place, the stage is half applied"
        );
        core.applied(&sets[1], 600_500);
        core.applied(&sets[2], 600_500);
        assert!(!core.committing() && core.state().consistent());
    }

    /// Checksums are answered only right after the set the primary sent last before them: a
    /// set that overtook them, or that they overtook (the simulator's link reorders frames),
    /// refuses the session, which starts again. Seed 1796504585016706238 had the mirror answer
    /// a verify's checksums before the set with a write to that chunk, a difference that was
    /// none.
    #[test]
    fn checksums_are_answered_only_in_stream_order() {
        let st = VolumeState {
            applied_set: 53,
            copy: CopyState::Done,
            ..Default::default()
        };
        let mut core = MirrorCore::new("v", 1 << 20, st, None, false, None);
        let s = core.new_session();
        core.enter_session(s);
        // Before any set of the session: right after the durable set.
        assert_eq!(core.sums_in_order(s, Some(53)), Ok(true));
        let (code, why) = core.sums_in_order(s, Some(54)).unwrap_err();
        assert_eq!(code, RefuseCode::BadMessage);
        assert!(!code.permanent(), "the session starts again");
        assert_eq!(
            why,
            "checksums that follow set 54 arrived after set 53: out of stream order"
        );
        let set = DeltaSet {
            set: 54,
            first_seq: 1,
            last_seq: 1,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents: Vec::new(),
        };
        core.accept(s, &set).unwrap().unwrap();
        assert_eq!(core.sums_in_order(s, Some(54)), Ok(true));
        let (_, why) = core.sums_in_order(s, Some(53)).unwrap_err();
        assert_eq!(
            why,
            "checksums that follow set 53 arrived after set 54: out of stream order"
        );
        // A primary older than version 8 does not say: answered as before.
        assert_eq!(core.sums_in_order(s, None), Ok(true));
        // A replaced session's checksums are dropped, whatever they say.
        let next = core.new_session();
        core.enter_session(next);
        assert_eq!(core.sums_in_order(s, Some(7)), Ok(false));
        assert_eq!(core.sums_in_order(next, Some(54)), Ok(true));
    }

    /// A mirror serves primaries of versions 3 (identities, no repair sets) and 4; older ones
    /// are told to upgrade, newer ones that this mirror does not speak their version.
    #[test]
    fn hello_versions_served_and_refused() {
        assert!(check_hello(3, "v", 10, 10).is_ok());
        assert!(check_hello(PROTOCOL_VERSION, "v", 10, 10).is_ok());
        let (code, why) = check_hello(2, "v", 10, 10).unwrap_err();
        assert_eq!(code, RefuseCode::Version);
        assert!(why.contains("upgrade the primary"), "{why}");
        let (code, why) = check_hello(PROTOCOL_VERSION + 1, "v", 10, 10).unwrap_err();
        assert_eq!(code, RefuseCode::Version);
        assert!(why.contains("unsupported"), "{why}");
        let (code, _) = check_hello(3, "v", 10, 20).unwrap_err();
        assert_eq!(code, RefuseCode::SizeMismatch);
    }
}
