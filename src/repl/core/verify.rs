//! The online verify (`blkmirror verify`): the primary's volume compared with the mirror's,
//! chunk by chunk with checksums on the wire, while replication runs; with `repair`, the
//! chunks that differ are sent again.
//!
//! A chunk is compared only when it is *settled*: read under its range lock while the journal
//! holds no change to it after the last record sent ([`Journal::settled_since`]). It then
//! holds exactly what the sets sent so far made it, and its Sums message, sent right after
//! them on the same stream, is answered once the mirror has applied just those sets: a
//! difference is a real one, never a write in flight. A chunk that is not settled is tried
//! again a little later, for up to [`SETTLE_LIMIT`] (then it is reported unverified). A
//! repair is the same settled read sent as a Repair set: the chunk as it must be at the
//! mirror's position then, so the mirror stays a valid crash state.

use super::{extent_of, read_chunk_bytes, take_reply, Session, SessionEnd, Transmit, BUSY_RETRY};
use crate::journal::{ChangedChunks, Journal};
use crate::repl::fold::Folder;
use crate::repl::frame::{DeltaSet, KnownCrcs, Message, SetKind};
use crate::volume::VolumeRead;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a chunk that keeps changing (a write the mirror has not been sent is always
/// pending on it) is tried before it is reported unverified.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How soon an unsettled chunk is tried again.
const SETTLE_RETRY: Duration = Duration::from_millis(20);
/// How long one survey of the unshipped changes ([`Journal::changed_chunks`]) serves: it costs
/// a pass over them, and what arrives after it is checked per chunk anyway.
const SURVEY_FOR: Duration = Duration::from_millis(10);
/// Chunks looked at in one call, at most (bounds the time the shipper spends on the verify
/// before it serves the journal again).
const CHUNKS_PER_CALL: usize = 64;

/// What a verify found so far (status shows it; `done` once every chunk is compared and every
/// repair acknowledged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyProgress {
    pub repair: bool,
    pub total_bytes: u64,
    pub compared_bytes: u64,
    /// Ranges found different (merged, in the order found).
    pub differing: Vec<(u64, u64)>,
    /// Bytes of repair sets the mirror acknowledged (durable there).
    pub repaired_bytes: u64,
    /// Ranges never settled within [`SETTLE_LIMIT`]: not compared (or, differing, not
    /// repaired).
    pub unverified: Vec<(u64, u64)>,
    pub done: bool,
}

impl VerifyProgress {
    pub fn differing_bytes(&self) -> u64 {
        self.differing.iter().map(|r| r.1).sum()
    }
}

/// A chunk waiting to settle: its offset, when it was first found unsettled, when to try again.
#[derive(Debug)]
struct Waiting {
    at: u64,
    since: Instant,
    next: Instant,
}

#[derive(Debug)]
pub(super) struct Verify {
    pub(super) progress: VerifyProgress,
    /// Next chunk of the first pass.
    pos: u64,
    /// Sums sent, awaiting their reply: (offset, chunks, the last set sent before them).
    pub(super) awaiting: VecDeque<(u64, usize, u64)>,
    /// Chunks the mirror answered as different, credited only once every set sent before
    /// their checksums is acknowledged (the mirror then surely compared after them):
    /// (that set, offset, length).
    unconfirmed: VecDeque<(u64, u64, u64)>,
    /// Chunks to compare once settled.
    deferred: VecDeque<Waiting>,
    /// Chunks found different, to send again once settled (repair only).
    to_repair: VecDeque<Waiting>,
    /// Repair bytes sent, not yet acknowledged.
    pub(super) repairs_in_flight: u64,
    /// The last survey of unshipped changes: when, and what.
    survey: Option<(Instant, ChangedChunks)>,
}

fn push_range(ranges: &mut Vec<(u64, u64)>, at: u64, len: u64) {
    match ranges.last_mut() {
        Some(last) if last.0 + last.1 == at => last.1 += len,
        _ => ranges.push((at, len)),
    }
}

/// A chunk that was not settled: back in `queue` for a moment later, or, once it has been
/// waiting for [`SETTLE_LIMIT`], reported unverified (`why`).
fn unsettled(
    mut w: Waiting,
    len: u64,
    now: Instant,
    queue: &mut VecDeque<Waiting>,
    unverified: &mut Vec<(u64, u64)>,
    why: &str,
) {
    if now.duration_since(w.since) >= SETTLE_LIMIT {
        tracing::warn!(offset = w.at, "verify: {why}");
        push_range(unverified, w.at, len);
    } else {
        w.next = now + SETTLE_RETRY;
        queue.push_back(w);
    }
}

/// Why a verify cannot start now.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyRefusal {
    /// Not connected, or the mirror's decision is still to come.
    NotConnected,
    /// A copy, a comparison or a resync of dirty regions runs (or the mirror is not yet
    /// consistent after one): verify after it.
    Resyncing,
    /// One runs already.
    Running,
}

impl Session {
    /// Start a verify (module doc). A finished one's result is replaced.
    pub fn start_verify(&mut self, repair: bool, now: Instant) -> Result<(), VerifyRefusal> {
        if !matches!(self.phase, super::Phase::Running) {
            return Err(VerifyRefusal::NotConnected);
        }
        if self.resync.is_some()
            || self.consistent_at_set.is_some()
            || self.consistent_after_seq.is_some()
        {
            return Err(VerifyRefusal::Resyncing);
        }
        if self.verify.as_ref().is_some_and(|v| !v.progress.done) {
            return Err(VerifyRefusal::Running);
        }
        tracing::info!(repair, bytes = self.size, "online verify starts");
        self.verify = Some(Verify {
            progress: VerifyProgress {
                repair,
                total_bytes: self.size,
                ..VerifyProgress::default()
            },
            pos: 0,
            awaiting: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            deferred: VecDeque::new(),
            to_repair: VecDeque::new(),
            repairs_in_flight: 0,
            survey: None,
        });
        self.busy_retry = Some(now);
        Ok(())
    }

    /// The running or last verify of this session.
    pub fn verify_progress(&self) -> Option<&VerifyProgress> {
        self.verify.as_ref().map(|v| &v.progress)
    }

    /// The verify's reply to a Sums message.
    pub(super) fn on_verify_reply(
        &mut self,
        offset: u64,
        chunk: u32,
        differ: Vec<bool>,
        now: Instant,
    ) -> Result<(), SessionEnd> {
        let size = self.size;
        let v = self
            .verify
            .as_mut()
            .ok_or_else(|| SessionEnd::Protocol("a comparison reply, but none runs".into()))?;
        let (_, _, after_set) = take_reply(
            &mut v.awaiting,
            |(o, n, _)| (o, n),
            offset,
            chunk,
            differ.len(),
            self.limits.copy_chunk,
        )?;
        let acked = self.in_flight.front().is_none_or(|f| f.set > after_set);
        #[cfg(any(test, feature = "test-hooks"))]
        let differ = if self.bugs.verify_forgets_differences {
            vec![false; differ.len()]
        } else {
            differ
        };
        for (i, d) in differ.into_iter().enumerate() {
            let at = offset + i as u64 * u64::from(chunk);
            let len = u64::from(chunk).min(size - at);
            v.progress.compared_bytes += len;
            if d {
                v.unconfirmed.push_back((after_set, at, len));
            }
        }
        if acked {
            self.verify_acked(after_set, now);
        }
        Ok(())
    }

    /// Every set up to `set` is acknowledged: the differences answered after them are real.
    pub(super) fn verify_acked(&mut self, set: u64, now: Instant) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        while let Some(&(after, at, len)) = v.unconfirmed.front() {
            if after > set {
                break;
            }
            v.unconfirmed.pop_front();
            tracing::warn!(offset = at, len, "verify: the mirror's chunk differs");
            push_range(&mut v.progress.differing, at, len);
            if v.progress.repair {
                v.to_repair.push_back(Waiting {
                    at,
                    since: now,
                    next: now,
                });
            }
        }
    }

    /// A repair set is durable at the mirror.
    pub(super) fn verify_repaired(&mut self, bytes: u64) {
        if let Some(v) = self.verify.as_mut() {
            v.repairs_in_flight -= bytes;
            v.progress.repaired_bytes += bytes;
        }
    }

    /// The next Sums message or repair set of a running verify, if one is due now.
    pub(super) fn verify_unit(
        &mut self,
        now: Instant,
        journal: &Journal,
        volume: &dyn VolumeRead,
    ) -> Result<Option<Transmit>, SessionEnd> {
        let (size, chunk) = (self.size, self.limits.copy_chunk);
        #[allow(unused_mut)]
        let mut shipped = Some(self.shipped_seq);
        #[cfg(any(test, feature = "test-hooks"))]
        if self.bugs.verify_unsettled {
            shipped = None;
        }
        let window_free = self.in_flight.len() < self.limits.window_sets;
        // Checksums go after every set sent so far: the mirror compares after applying them,
        // and refuses them if it took another last set (frame: version 8). Before any set of
        // this session, the last is the durable set the decision named.
        let last_set_sent = self.next_set - 1;
        let Some(v) = self.verify.as_mut().filter(|v| !v.progress.done) else {
            return Ok(None);
        };
        // A survey taken when less was sent still serves: the chunks it counts as changed
        // are a superset of those changed since (they settle at the next survey).
        if v.survey
            .as_ref()
            .is_none_or(|(when, _)| now.duration_since(*when) >= SURVEY_FOR)
        {
            let s = shipped.unwrap_or(0);
            v.survey = Some((now, journal.changed_chunks(s, chunk)));
        }
        let (_, survey) = v.survey.as_ref().expect("just made");
        let settle = Settle {
            journal,
            volume,
            survey: shipped.map(|_| survey),
            chunk,
        };
        let mut looked = 0;
        let mut retry_at: Option<Instant> = None;
        // Repairs first: they shorten the time the mirror holds a bad chunk.
        if window_free && v.to_repair.front().is_some_and(|w| w.next <= now) {
            let mut folder = Folder::new();
            let mut bytes = 0;
            let mut tries = v.to_repair.len();
            while tries > 0 && folder.data_bytes() < self.limits.set_max_bytes {
                tries -= 1;
                looked += 1;
                let w = v.to_repair.pop_front().expect("counted");
                let len = chunk.min(size - w.at);
                match settle.read(w.at, len)? {
                    Some(e) => {
                        folder.add(e);
                        bytes += len;
                    }
                    None => unsettled(
                        w,
                        len,
                        now,
                        &mut v.to_repair,
                        &mut v.progress.unverified,
                        "a differing chunk never settled: not repaired",
                    ),
                }
            }
            if bytes > 0 {
                v.repairs_in_flight += bytes;
                let set = DeltaSet {
                    set: self.next_set,
                    first_seq: self.shipped_seq,
                    last_seq: self.shipped_seq,
                    newest_write_ms: 0,
                    kind: SetKind::Repair,
                    extents: folder.into_extents(),
                };
                let t = self.sent(set, KnownCrcs::default());
                self.in_flight.back_mut().expect("just sent").repaired = bytes;
                return Ok(Some(t));
            }
        }
        if v.awaiting.len() < self.limits.sums_in_flight {
            // The first pass, then the chunks that were not settled.
            let mut offset = None;
            let mut sums = Vec::new();
            if v.pos < size {
                while v.pos < size
                    && sums.len() < self.limits.sums_per_message
                    && looked < CHUNKS_PER_CALL
                {
                    looked += 1;
                    let len = chunk.min(size - v.pos);
                    match settle.sum(v.pos, len)? {
                        Some(s) => {
                            offset.get_or_insert(v.pos);
                            sums.push(s);
                        }
                        None if sums.is_empty() => v.deferred.push_back(Waiting {
                            at: v.pos,
                            since: now,
                            next: now + SETTLE_RETRY,
                        }),
                        None => break,
                    }
                    v.pos += len;
                }
            } else if v.deferred.front().is_some_and(|w| w.next <= now) {
                let w = v.deferred.pop_front().expect("checked");
                let len = chunk.min(size - w.at);
                match settle.sum(w.at, len)? {
                    Some(s) => {
                        offset = Some(w.at);
                        sums.push(s);
                    }
                    None => unsettled(
                        w,
                        len,
                        now,
                        &mut v.deferred,
                        &mut v.progress.unverified,
                        "a chunk never settled: not compared",
                    ),
                }
            }
            if let Some(offset) = offset {
                v.awaiting.push_back((offset, sums.len(), last_set_sent));
                return Ok(Some(Transmit::Message(Message::Sums {
                    offset,
                    chunk: u32::try_from(chunk).expect("chunks are small"),
                    after_set: Some(last_set_sent),
                    sums,
                })));
            }
        }
        for w in v.deferred.iter().chain(&v.to_repair) {
            retry_at = Some(retry_at.map_or(w.next, |r| r.min(w.next)));
        }
        if v.pos >= size
            && v.awaiting.is_empty()
            && v.unconfirmed.is_empty()
            && v.deferred.is_empty()
            && v.to_repair.is_empty()
            && v.repairs_in_flight == 0
        {
            v.progress.done = true;
            let p = &v.progress;
            tracing::info!(
                compared_bytes = p.compared_bytes,
                differing_bytes = p.differing_bytes(),
                ranges = p.differing.len(),
                repaired_bytes = p.repaired_bytes,
                unverified_ranges = p.unverified.len(),
                "online verify done"
            );
        }
        if let Some(t) = retry_at {
            let t = t.max(now + BUSY_RETRY);
            self.busy_retry = Some(self.busy_retry.map_or(t, |b| b.min(t)));
        }
        Ok(None)
    }
}

/// Reads chunks if they are settled (module doc).
struct Settle<'a> {
    journal: &'a Journal,
    volume: &'a dyn VolumeRead,
    /// None only for a planted mistake that skips the check.
    survey: Option<&'a ChangedChunks>,
    chunk: u64,
}

impl Settle<'_> {
    /// The chunk at `at`, if it is settled: untouched by what the survey saw, and, before the
    /// read and after it, by anything since (a change holds the range's lock from before its
    /// journal intent to after its record, so none came in between).
    fn read_bytes(&self, at: u64, len: u64) -> Result<Option<Vec<u8>>, SessionEnd> {
        let settled = || {
            self.survey.is_none_or(|s| {
                !s.touched(at / self.chunk) && self.journal.settled_since(s.as_of, at, len)
            })
        };
        if !settled() {
            return Ok(None);
        }
        let Some(buf) = read_chunk_bytes(self.volume, at, len)? else {
            return Ok(None);
        };
        Ok(settled().then_some(buf))
    }

    /// The settled chunk as an extent (a repair).
    fn read(&self, at: u64, len: u64) -> Result<Option<crate::extent::Extent>, SessionEnd> {
        Ok(self.read_bytes(at, len)?.map(|buf| extent_of(at, buf)))
    }

    /// The checksum of the settled chunk.
    fn sum(
        &self,
        at: u64,
        len: u64,
    ) -> Result<Option<[u8; crate::repl::frame::SUM_LEN]>, SessionEnd> {
        Ok(self.read_bytes(at, len)?.map(|buf| super::chunk_sum(&buf)))
    }
}
