//! Whose data, which generation (promise I6): volume UUIDs, data generations, and the decision
//! both sides take on every connect. Pure code: no I/O, no clock.
//!
//! - A replicated volume pair has a **volume UUID**, minted at the pair's first contact and
//!   kept by both sides.
//! - The primary numbers every write with a journal sequence number. A **generation** is a
//!   random 64-bit ID naming a stretch of that numbering; the primary mints a new one at every
//!   start, whenever it loses its peer, and whenever the continuity of its numbering breaks
//!   (the host crashed and may have lost unsynced records and volume writes; its state was
//!   lost and rebuilt; the admin accepted a changed volume). The list of generations with the
//!   sequence number each starts at is the **lineage**; a stretch that starts with a break is
//!   marked not `continuous`.
//! - A data state is named by (generation, sequence number): the mirror holds the state after
//!   every write up to `seq` of the lineage it was given. One writer mints a generation, so a
//!   generation found in two lineages with the same first sequence number names the same
//!   writes up to where each side's copy of it ends.
//!
//! DRBD's data generation UUIDs are the model (current, bitmap, history); a DRBD bitmap UUID
//! marks where change tracking started, which here is the journal's sequence numbering, so a
//! position inside a generation is exact, not only the generation.

use crate::disk::fingerprint::Fingerprint;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Spans kept in a lineage: older ones are forgotten (see [`Lineage::forgotten_below`]).
pub const MAX_SPANS: usize = 64;

/// The identity of a replicated volume pair.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeUuid(pub [u8; 16]);

impl VolumeUuid {
    /// A new random UUID (version 4 layout).
    pub fn random() -> VolumeUuid {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system has randomness");
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        VolumeUuid(b)
    }
}

impl fmt::Display for VolumeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for VolumeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for VolumeUuid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return Err(format!("{s:?} is not a UUID"));
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{s:?} is not a UUID"))?;
        }
        Ok(VolumeUuid(b))
    }
}

impl Serialize for VolumeUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeUuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A data generation: random, never 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenId(pub u64);

impl GenId {
    pub fn random() -> GenId {
        let mut b = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system has randomness");
        GenId(u64::from_be_bytes(b).max(1))
    }
}

impl fmt::Display for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for GenId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16)
            .map(GenId)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a generation")))
    }
}

/// One generation of the primary's numbering: writes from `first_seq` on, until the next span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub gen: GenId,
    pub first_seq: u64,
    /// The writer's data continues the previous span's without a break: every write before
    /// `first_seq` that the previous spans name is still what the volume holds. False after a
    /// host crash, a lost state, an accepted volume change.
    pub continuous: bool,
    /// The break is an admin accepting another disk as the volume (`accept-volume`): from
    /// here on the primary's disk may differ from the one the mirror last saw. Any other break
    /// keeps the disk.
    #[serde(default)]
    pub accepted: bool,
    /// This generation starts where a mirror was promoted (`role::promoted`): its writer took
    /// over from the data it held, the previous generation's writes past `first_seq - 1` (an
    /// old primary's unshipped tail) are not in it. Always continuous.
    #[serde(default)]
    pub promoted: bool,
}

/// The spans of the primary's numbering, oldest first, with where the forgotten ones ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub spans: Vec<Span>,
    /// Positions below this lay in spans that were forgotten ([`MAX_SPANS`]): they cannot be
    /// placed.
    #[serde(default)]
    pub forgotten_below: u64,
}

impl Lineage {
    /// The current generation (None for an empty lineage).
    pub fn current(&self) -> Option<&Span> {
        self.spans.last()
    }

    /// Start a new generation at `first_seq`. Only a generation that starts with a break may
    /// start before the current one: a host crash lost records (their numbers are given
    /// again, to writes of the new generation).
    pub fn mint(&mut self, gen: GenId, first_seq: u64, continuous: bool) {
        self.push(Span {
            gen,
            first_seq,
            continuous,
            accepted: false,
            promoted: false,
        });
    }

    /// Start the generation of a promoted mirror at `first_seq`, right after the data it
    /// holds, which belongs to generation `held`: spans the old primary began after `held`
    /// are dropped (the promoted side never held their data), so the new generation continues
    /// exactly the state it holds. False (nothing changed) when this lineage has no `held`.
    pub fn mint_promoted(&mut self, held: GenId, gen: GenId, first_seq: u64) -> bool {
        let Some(i) = self.spans.iter().rposition(|s| s.gen == held) else {
            return false;
        };
        if self.spans[i].first_seq > first_seq {
            return false;
        }
        self.spans.truncate(i + 1);
        self.push(Span {
            gen,
            first_seq,
            continuous: true,
            accepted: false,
            promoted: true,
        });
        true
    }

    /// The latest generation a promotion began (its index): the point a split brain or a
    /// failback is told by.
    pub fn latest_promoted(&self) -> Option<usize> {
        self.spans.iter().rposition(|s| s.promoted)
    }

    /// Start a new generation with a break where an admin accepted another disk.
    pub fn mint_accepted(&mut self, gen: GenId, first_seq: u64) {
        self.push(Span {
            gen,
            first_seq,
            continuous: false,
            accepted: true,
            promoted: false,
        });
    }

    fn push(&mut self, span: Span) {
        if let Some(last) = self.spans.last() {
            assert!(
                span.first_seq >= last.first_seq || !span.continuous,
                "a continuous generation starts at {}, before the current one's {}",
                span.first_seq,
                last.first_seq
            );
        }
        self.spans.push(span);
        while self.spans.len() > MAX_SPANS {
            let dropped = self.spans.remove(0);
            // The forgotten span named every number up to where the next one starts (many
            // spans start at the same number when nothing was written in between: restarts,
            // link losses): none of them can be placed any more.
            let next = self.spans.first().map_or(0, |s| s.first_seq);
            self.forgotten_below = self.forgotten_below.max(dropped.first_seq + 1).max(next);
        }
    }

    /// The span holding write `seq` in the history as it is now: the newest one starting at
    /// or before it (a newer generation that started lower, after a crash lost records, owns
    /// the numbers it gave again).
    pub fn span_at(&self, seq: u64) -> Option<(usize, &Span)> {
        self.spans
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| s.first_seq <= seq)
    }

    /// The generation a data state after write `seq` belongs to: the span holding `seq`, or
    /// the first span for a state before any of its writes (a copy taken at its start).
    pub fn holding(&self, seq: u64) -> Option<&Span> {
        self.span_at(seq)
            .map(|(_, s)| s)
            .or_else(|| self.spans.first())
    }

    /// Where span `gen` (starting at `first_seq`) is, if this lineage has it.
    fn find(&self, gen: GenId, first_seq: u64) -> Option<usize> {
        self.spans
            .iter()
            .position(|s| s.gen == gen && s.first_seq == first_seq)
    }

    /// The last sequence number of span `i` as far as this lineage knows (`end` for the
    /// current one: the writer's last written seq), and the span that ended it: the later one
    /// starting lowest.
    fn span_end(&self, i: usize, end: u64) -> (u64, Option<&Span>) {
        match self.spans[i + 1..].iter().min_by_key(|s| s.first_seq) {
            Some(next) => (next.first_seq.saturating_sub(1), Some(next)),
            None => (end, None),
        }
    }
}

/// What a side persists of its volume's identity (in its per-volume state file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeIdentity {
    pub uuid: Option<VolumeUuid>,
    /// Primary: its own numbering. Mirror: the lineage of the data it holds, as the primary
    /// that wrote it described it.
    pub lineage: Lineage,
    /// The generation when this side was last in sync with its peer.
    pub synced: Option<GenId>,
    /// The disk behind this side's volume, as last seen (with its change time sealed).
    pub fingerprint: Option<Fingerprint>,
    /// Mirror: the disk behind the primary's volume, to recognise it when the primary has
    /// lost its state.
    pub peer_fingerprint: Option<Fingerprint>,
}

/// What the primary says of its data on connect (`Identify`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryClaim {
    /// None: the primary has no record of this volume (new, or its state was lost).
    pub uuid: Option<VolumeUuid>,
    pub lineage: Lineage,
    /// The journal holds every record after this.
    pub journal_acked: u64,
    /// The last sequence number written.
    pub journal_last: u64,
    pub fingerprint: Fingerprint,
    /// An open resync from the primary's dirty map: every write after this seq is in its
    /// journal or its map (`journal::dirty::Fold::covers_after`). A mirror's staged resync
    /// can only be finished by a primary that still has it (see [`staged_resync_continues`]).
    pub resync_from: Option<u64>,
}

/// What the mirror holds, as it decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorHolds {
    pub uuid: Option<VolumeUuid>,
    pub lineage: Lineage,
    /// The mirror holds the state after every write up to this seq of `lineage`, durably;
    /// None when it is no such state (a copy or comparison not finished, its volume changed).
    pub position: Option<u64>,
    /// The journal sequence its redo log durably reaches: `position`, or further while a
    /// resync is staged (`apply::Stager`; those sets are applied once the resync completes).
    pub durable_seq: u64,
    /// The generation of that state, where the mirror recorded it (else the lineage says).
    pub position_gen: Option<GenId>,
    /// A resync is staged on top of `position` (its sets durable, not applied) and its closing
    /// set has not arrived: regions may still be missing, which only the primary's dirty map
    /// knows. (A stage whose closing set is durable lacks only journal sets, which the
    /// primary's journal holds.)
    pub staged: bool,
    /// It ever received data of a primary (a legacy mirror from before volume UUIDs has data
    /// but no UUID).
    pub has_data: bool,
    /// Its volume holds data although it never received any (pre-seeded from a backup or a
    /// shipped disk): compared, so that only what differs crosses the link.
    pub unrecorded_data: bool,
    pub peer_fingerprint: Option<Fingerprint>,
}

/// How a session proceeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same data: ship the journal after `from_seq`.
    Resume { from_seq: u64 },
    /// A new mirror: copy the whole volume.
    FullCopy { why: String },
    /// The primary cannot prove what the mirror holds: compare every chunk by checksum and
    /// send the ones that differ. Never a trim or a skip on a guess.
    Compare { why: String },
    /// Refused for good (until an admin acts): `kind` says why.
    Refuse { kind: RefuseKind, why: String },
}

/// Refusals that retrying cannot cure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseKind {
    /// Another volume pair: another disk or another primary.
    Unrelated,
    /// Both sides wrote since their last common state.
    SplitBrain,
}

/// Whether lineage `ours` continues, through its latest promotion, data that lineage
/// `theirs` wrote: the generation before `ours`' latest promoted one is in `theirs`, and the
/// promoted one is not (`theirs` never continued it). The writer of `theirs` is then the old
/// primary this side was promoted from, come back as a primary: it must not serve, this side
/// goes on. (Earlier promotions, of switchovers both sides went through, are in both.)
pub fn supersedes(ours: &Lineage, theirs: &Lineage) -> bool {
    let has = |l: &Lineage, s: &Span| {
        l.spans
            .iter()
            .any(|t| t.gen == s.gen && t.first_seq == s.first_seq)
    };
    let Some(i) = ours.latest_promoted() else {
        return false;
    };
    let before = &ours.spans[i.saturating_sub(1)];
    // Both promoted from the same data (two secondaries promoted at once): neither goes on
    // on a guess.
    let they_too = theirs
        .spans
        .windows(2)
        .any(|w| w[1].promoted && w[0].gen == before.gen && w[0].first_seq == before.first_seq);
    i > 0 && has(theirs, before) && !has(theirs, &ours.spans[i]) && !they_too
}

/// Where two primaries' data parted: the last state both held, (generation, seq). One of
/// the two lineages [`supersedes`] the other: its latest promotion continued the other's
/// generation right after that seq; everything either side wrote since is its own. None
/// when neither continues the other (no common state is known).
pub fn parting_point(ours: &Lineage, theirs: &Lineage) -> Option<(GenId, u64)> {
    let promoted = if supersedes(theirs, ours) {
        theirs
    } else if supersedes(ours, theirs) {
        ours
    } else {
        return None;
    };
    let i = promoted.latest_promoted()?;
    let before = promoted.spans.get(i.checked_sub(1)?)?;
    Some((before.gen, promoted.spans[i].first_seq - 1))
}

/// Why a primary's claim is another volume pair's, from the identities alone (whatever the
/// mirror's position): another volume UUID, or no record of one from a disk other than the
/// one the mirror last saw. `None` when the claim may be this pair's. The mirror checks it
/// before a connection may disturb a running session, and [`decide`] first.
pub fn foreign(
    p: &PrimaryClaim,
    mirror_uuid: VolumeUuid,
    peer_fingerprint: Option<&Fingerprint>,
) -> Option<String> {
    match p.uuid {
        Some(pu) if pu != mirror_uuid => Some(format!(
            "unrelated data: the primary's volume is {pu}, the mirror holds {mirror_uuid}"
        )),
        Some(_) => None,
        None => match peer_fingerprint {
            Some(f) if f.same_disk(&p.fingerprint) => None,
            other => Some(format!(
                "unrelated data: the mirror holds volume {mirror_uuid} of {}, the primary has \
                 no record of it and serves {}",
                other.map_or("an unknown disk".into(), |f| f.describe()),
                p.fingerprint.describe()
            )),
        },
    }
}

/// Whether the mirror's staged resync (if any) can be finished by this primary: it still has
/// an open resync whose map covers every write after the mirror's consistent point. A primary
/// that lost its dirty map (or folded anew after losing it) cannot say which regions the
/// staged part still lacks: the staged sets are dropped, never committed half-done.
pub fn staged_resync_continues(p: &PrimaryClaim, m: &MirrorHolds) -> bool {
    match (m.staged, m.position) {
        (false, _) => true,
        (true, Some(at)) => p.resync_from.is_some_and(|covers| covers <= at),
        (true, None) => false,
    }
}

/// The decision on connect (module doc). `uuid` of the result is the pair's UUID: the
/// primary's, or the mirror's when the primary lost its record, or a new one.
pub fn decide(p: &PrimaryClaim, m: &MirrorHolds) -> Decision {
    let Some(mu) = m.uuid else {
        if !m.has_data && m.unrecorded_data {
            return Decision::Compare {
                why: "the mirror's volume holds data it has no record of (pre-seeded?): \
                      compared, only the chunks that differ are sent"
                    .into(),
            };
        }
        if !m.has_data {
            return Decision::FullCopy {
                why: "the mirror holds no data yet".into(),
            };
        }
        return Decision::Compare {
            why: "the mirror's data predates volume identities: compared once".into(),
        };
    };
    if let Some(why) = foreign(p, mu, m.peer_fingerprint.as_ref()) {
        return Decision::Refuse {
            kind: RefuseKind::Unrelated,
            why,
        };
    }
    let Some(pu) = p.uuid else {
        return Decision::Compare {
            why: format!(
                "the primary has no record of volume {mu} but serves the same disk ({}): its \
                 state was lost",
                p.fingerprint.describe()
            ),
        };
    };
    debug_assert_eq!(pu, mu, "foreign() refuses another UUID");
    let Some(at) = m.position else {
        return Decision::Compare {
            why: "the mirror is not a consistent copy (a copy or comparison did not finish, \
                  or its volume changed)"
                .into(),
        };
    };
    let recorded = m
        .position_gen
        .and_then(|g| m.lineage.spans.iter().rev().find(|s| s.gen == g));
    let Some(held) = recorded.or_else(|| m.lineage.holding(at)) else {
        return Decision::Compare {
            why: format!("the mirror cannot name the generation of its data at seq {at}"),
        };
    };
    // A primary on another disk than the one the mirror last saw, with no admin's acceptance
    // of a new disk since: a copy of the primary (a cloned machine or image) claiming its
    // identity. Its data is not the mirror's to take.
    if let (Some(known), Some(i)) = (
        &m.peer_fingerprint,
        p.lineage.find(held.gen, held.first_seq),
    ) {
        let accepted_since = p.lineage.spans[i + 1..].iter().any(|s| s.accepted);
        if !known.same_disk(&p.fingerprint) && !accepted_since {
            return Decision::Refuse {
                kind: RefuseKind::Unrelated,
                why: format!(
                    "another disk claims volume {mu}: the mirror's data came from {}, this \
                     primary serves {} and no admin accepted a new disk (a copy of the \
                     primary?)",
                    known.describe(),
                    p.fingerprint.describe()
                ),
            };
        }
    }
    let Some(i) = p.lineage.find(held.gen, held.first_seq) else {
        if at < p.lineage.forgotten_below {
            return Decision::Compare {
                why: format!(
                    "the mirror's data (generation {}, seq {at}) is older than the primary's \
                     history",
                    held.gen
                ),
            };
        }
        if p.lineage.spans.first().is_some_and(|s| !s.continuous) {
            return Decision::Compare {
                why: format!(
                    "the primary's history starts with a break (generation {}): it cannot \
                     place the mirror's generation {}",
                    p.lineage.spans[0].gen, held.gen
                ),
            };
        }
        return Decision::Refuse {
            kind: RefuseKind::SplitBrain,
            why: format!(
                "split brain: the mirror holds writes of generation {} up to seq {at}, which \
                 this primary never made (another primary with the same volume?)",
                held.gen
            ),
        };
    };
    let (end, ended_by) = p.lineage.span_end(i, p.journal_last);
    if at > end {
        return match ended_by {
            Some(next) if !next.continuous => Decision::Compare {
                why: format!(
                    "the primary lost writes the mirror holds (generation {} ends at seq {end} \
                     here, the mirror holds up to {at}; a crash of the primary's host?)",
                    held.gen
                ),
            },
            _ => Decision::Refuse {
                kind: RefuseKind::SplitBrain,
                why: format!(
                    "split brain: the mirror holds writes of generation {} up to seq {at}, \
                     past the primary's {end}, with no break recorded (two primaries?)",
                    held.gen
                ),
            },
        };
    }
    if let Some(b) = p.lineage.spans[i + 1..].iter().find(|s| !s.continuous) {
        return Decision::Compare {
            why: format!(
                "the primary's data has a break at seq {} (generation {}) after the mirror's \
                 seq {at}",
                b.first_seq, b.gen
            ),
        };
    }
    if !staged_resync_continues(p, m) && at < p.journal_acked {
        return Decision::Compare {
            why: format!(
                "the mirror's staged resync cannot be finished: the primary has no open resync \
                 from seq {at} (its dirty map was lost?) and its journal holds only the writes \
                 after {}",
                p.journal_acked
            ),
        };
    }
    // A staged resync the primary cannot finish is dropped: the mirror resumes from its
    // consistent point.
    let durable = if staged_resync_continues(p, m) {
        m.durable_seq.max(at)
    } else {
        at
    };
    if durable < p.journal_acked {
        return Decision::Compare {
            why: format!(
                "the mirror holds up to seq {durable} but the primary's journal holds only \
                 the writes after {} (the mirror lost durable data? the primary its dirty \
                 map?)",
                p.journal_acked
            ),
        };
    }
    Decision::Resume { from_seq: durable }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fingerprint::{DiskKind, Stamp};

    fn disk(ino: u64) -> Fingerprint {
        Fingerprint {
            kind: DiskKind::File,
            dev: 1,
            ino,
            born: Some(Stamp { sec: 5, nsec: 7 }),
            serial: None,
            size: 1 << 20,
            ctime: None,
        }
    }

    fn lineage(spans: &[(u64, u64, bool)]) -> Lineage {
        let mut l = Lineage::default();
        for &(g, first, cont) in spans {
            l.mint(GenId(g), first, cont);
        }
        l
    }

    const U: VolumeUuid = VolumeUuid([1; 16]);

    fn primary(spans: &[(u64, u64, bool)], acked: u64, last: u64) -> PrimaryClaim {
        PrimaryClaim {
            uuid: Some(U),
            lineage: lineage(spans),
            journal_acked: acked,
            journal_last: last,
            fingerprint: disk(10),
            resync_from: None,
        }
    }

    fn mirror(spans: &[(u64, u64, bool)], position: Option<u64>) -> MirrorHolds {
        MirrorHolds {
            uuid: Some(U),
            lineage: lineage(spans),
            position,
            durable_seq: position.unwrap_or(0),
            position_gen: None,
            staged: false,
            has_data: true,
            unrecorded_data: false,
            peer_fingerprint: Some(disk(10)),
        }
    }

    fn is_compare(d: &Decision) -> bool {
        matches!(d, Decision::Compare { .. })
    }

    #[test]
    fn same_data_resumes_where_the_mirror_is() {
        // The primary restarted twice and lost its peer once since; all continuous.
        let p = primary(&[(1, 1, true), (2, 50, true), (3, 90, true)], 40, 120);
        let m = mirror(&[(1, 1, true), (2, 50, true)], Some(60));
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 60 });
        // The mirror exactly at the end of a generation, and the primary with nothing new.
        let m = mirror(&[(1, 1, true)], Some(49));
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 49 });
        let p = primary(&[(1, 1, true)], 49, 49);
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 49 });
    }

    #[test]
    fn a_mirror_holding_no_write_yet_resumes() {
        // A full copy taken before the primary's first write: position 0, before any span.
        let p = primary(&[(1, 1, false), (2, 3, true)], 0, 8);
        let m = mirror(&[(1, 1, false)], Some(0));
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 0 });
    }

    /// After a host crash the content at the break's start (copied before any new write)
    /// sits at a number where the lost history also had a state: the recorded generation
    /// says which one the mirror holds.
    #[test]
    fn the_recorded_generation_names_a_state_at_a_break() {
        let p = primary(&[(1, 1, true), (2, 139, false), (3, 139, true)], 138, 138);
        let mut m = mirror(&[(1, 1, true), (2, 139, false)], Some(138));
        m.position_gen = Some(GenId(2));
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 138 });
        m.position_gen = Some(GenId(1));
        assert!(is_compare(&decide(&p, &m)), "the lost history's state");
    }

    /// A mirror with a resync staged on top of seq 68 (its redo log reaches seq 80): a
    /// primary whose open resync covers the writes after 68 finishes it; one that lost its
    /// dirty map (no open resync; its journal starts after the fold's number 72) cannot say
    /// which regions the staged part lacks: compared, never resumed past them.
    #[test]
    fn a_staged_resync_is_finished_only_by_a_primary_that_still_has_it() {
        let mut m = mirror(&[(1, 1, true)], Some(68));
        m.staged = true;
        m.durable_seq = 80;
        let mut p = primary(&[(1, 1, true), (2, 73, true)], 68, 97);
        p.resync_from = Some(66);
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 80 });
        // Its acknowledged journal trimmed past the staged point: still its resync.
        p.journal_acked = 78;
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 80 });
        // The map lost: the journal vouches only for the writes after the fold.
        p.resync_from = None;
        p.journal_acked = 72;
        assert!(is_compare(&decide(&p, &m)), "{:?}", decide(&p, &m));
        // ... or a fold after that loss, which covers only what came after it.
        p.resync_from = Some(72);
        assert!(is_compare(&decide(&p, &m)), "{:?}", decide(&p, &m));
        // Nothing lost before the mirror's point: resumed from it, the staging dropped.
        p.resync_from = None;
        p.journal_acked = 60;
        assert!(!staged_resync_continues(&p, &m));
        assert_eq!(decide(&p, &m), Decision::Resume { from_seq: 68 });
    }

    #[test]
    fn new_and_legacy_mirrors() {
        let p = primary(&[(1, 1, true)], 0, 10);
        let fresh = MirrorHolds {
            uuid: None,
            lineage: Lineage::default(),
            position: None,
            durable_seq: 0,
            position_gen: None,
            staged: false,
            has_data: false,
            unrecorded_data: false,
            peer_fingerprint: None,
        };
        assert!(matches!(decide(&p, &fresh), Decision::FullCopy { .. }));
        // A new mirror whose volume already holds data (a restored backup): compared.
        let preseeded = MirrorHolds {
            unrecorded_data: true,
            ..fresh.clone()
        };
        assert!(
            matches!(decide(&p, &preseeded), Decision::Compare { ref why } if why.contains("pre-seeded"))
        );
        let legacy = MirrorHolds {
            has_data: true,
            unrecorded_data: false,
            position: Some(10),
            ..fresh
        };
        assert!(is_compare(&decide(&p, &legacy)));
    }

    #[test]
    fn a_primary_that_lost_its_state_is_recognised_by_its_disk() {
        let mut p = primary(&[(9, 1, false)], 0, 0);
        p.uuid = None;
        let m = mirror(&[(1, 1, true)], Some(70));
        assert!(is_compare(&decide(&p, &m)), "same disk: compare");
        p.fingerprint = disk(11);
        match decide(&p, &m) {
            Decision::Refuse {
                kind: RefuseKind::Unrelated,
                why,
            } => assert!(why.contains("unrelated data"), "{why}"),
            d => panic!("another disk must be unrelated, got {d:?}"),
        }
    }

    #[test]
    fn another_pair_is_unrelated() {
        let mut p = primary(&[(1, 1, true)], 0, 10);
        p.uuid = Some(VolumeUuid([2; 16]));
        let m = mirror(&[(1, 1, true)], Some(5));
        assert!(matches!(
            decide(&p, &m),
            Decision::Refuse {
                kind: RefuseKind::Unrelated,
                ..
            }
        ));
    }

    #[test]
    fn a_host_crash_that_lost_writes_the_mirror_holds_means_compare() {
        // Generation 1 ends at seq 40 on the primary after its host crashed (generation 2
        // starts with a break); the mirror holds up to 45 of generation 1.
        let p = primary(&[(1, 1, true), (2, 41, false)], 30, 60);
        let m = mirror(&[(1, 1, true)], Some(45));
        assert!(is_compare(&decide(&p, &m)));
        // Even when the mirror holds less than survived: the volume may have lost writes
        // the journal kept (unflushed), so the break itself forces the comparison.
        let m = mirror(&[(1, 1, true)], Some(35));
        assert!(is_compare(&decide(&p, &m)));
    }

    /// A host crash lost records after a generation minted at peer loss: the new generation
    /// starts lower, giving those numbers again. A mirror holding writes of the lost
    /// generation is compared, not taken for a split brain; one holding less of the older
    /// generation is compared too (the break lies after it).
    #[test]
    fn a_generation_that_lost_its_writes_is_compared() {
        let p = primary(&[(1, 1, true), (2, 17, true), (3, 16, false)], 10, 30);
        let m = mirror(&[(1, 1, true), (2, 17, true)], Some(20));
        assert!(is_compare(&decide(&p, &m)), "{:?}", decide(&p, &m));
        let m = mirror(&[(1, 1, true)], Some(12));
        assert!(is_compare(&decide(&p, &m)), "{:?}", decide(&p, &m));
        // Numbers given again belong to the newest generation.
        assert_eq!(p.lineage.span_at(20).map(|(_, s)| s.gen), Some(GenId(3)));
        assert_eq!(p.lineage.span_at(15).map(|(_, s)| s.gen), Some(GenId(1)));
    }

    #[test]
    fn two_writers_of_one_generation_are_a_split_brain() {
        // A clone of the primary's state ran on: the mirror holds more of generation 1 than
        // this primary made, with no break recorded here.
        let p = primary(&[(1, 1, true), (3, 41, true)], 30, 60);
        let m = mirror(&[(1, 1, true)], Some(45));
        assert!(matches!(
            decide(&p, &m),
            Decision::Refuse {
                kind: RefuseKind::SplitBrain,
                ..
            }
        ));
        // Or the mirror holds a generation this primary never minted, after a common one.
        let m = mirror(&[(1, 1, true), (7, 41, true)], Some(50));
        assert!(matches!(
            decide(&p, &m),
            Decision::Refuse {
                kind: RefuseKind::SplitBrain,
                ..
            }
        ));
    }

    /// A copy of the primary (same identity, same history, another disk) is refused, even
    /// when its copy shows a break (a cloned machine boots: a host crash to its journal); the
    /// same disk after a real host crash is compared, and another disk an admin accepted is
    /// compared too.
    #[test]
    fn another_disk_with_the_same_identity_is_refused_unless_accepted() {
        let mut p = primary(&[(1, 1, true), (2, 41, false)], 30, 60);
        let m = mirror(&[(1, 1, true)], Some(45));
        assert!(is_compare(&decide(&p, &m)), "same disk, host crash");
        p.fingerprint = disk(77);
        assert!(matches!(
            decide(&p, &m),
            Decision::Refuse {
                kind: RefuseKind::Unrelated,
                ..
            }
        ));
        p.lineage.mint_accepted(GenId(3), 61);
        assert!(is_compare(&decide(&p, &m)), "accepted by an admin");
    }

    #[test]
    fn what_the_primary_cannot_prove_is_compared() {
        // The mirror is behind what the primary's journal still holds.
        let p = primary(&[(1, 1, true)], 50, 90);
        let m = mirror(&[(1, 1, true)], Some(20));
        assert!(is_compare(&decide(&p, &m)));
        // The mirror is not a consistent copy.
        let m = mirror(&[(1, 1, true)], None);
        assert!(is_compare(&decide(&p, &m)));
        // The mirror's generation fell out of the primary's history.
        let mut p = primary(&[(1, 1, true)], 0, 0);
        for g in 2..(MAX_SPANS as u64 + 10) {
            p.lineage.mint(GenId(g), g * 10, true);
        }
        p.journal_last = 10_000;
        let m = mirror(&[(1, 1, true)], Some(5));
        assert!(is_compare(&decide(&p, &m)));
    }

    /// A primary restarted again and again with no write in between (or whose link dropped
    /// again and again) mints a generation each time, all starting at the same sequence
    /// number. Once the one the mirror's data belongs to is forgotten, the mirror's position
    /// lies before every generation the primary remembers: compared, never refused as a
    /// split brain.
    #[test]
    fn a_generation_pushed_out_by_idle_restarts_is_compared() {
        let mut l = lineage(&[(1, 1, false)]);
        for g in 2..(MAX_SPANS as u64 + 2) {
            l.mint(GenId(g), 3, true);
        }
        assert!(
            l.find(GenId(1), 1).is_none(),
            "the first generation is forgotten"
        );
        let p = PrimaryClaim {
            lineage: l,
            ..primary(&[], 2, 2)
        };
        let mut m = mirror(&[(1, 1, false), (2, 3, true)], Some(2));
        m.position_gen = Some(GenId(1));
        assert!(is_compare(&decide(&p, &m)), "{:?}", decide(&p, &m));
    }

    #[test]
    fn identities_serialise_as_text() {
        let u = VolumeUuid::random();
        let s = serde_json::to_string(&u).unwrap();
        assert_eq!(s.len(), 38, "{s}");
        assert_eq!(serde_json::from_str::<VolumeUuid>(&s).unwrap(), u);
        let g = GenId(0xabc);
        assert_eq!(serde_json::to_string(&g).unwrap(), "\"0000000000000abc\"");
        assert_eq!(
            serde_json::from_str::<GenId>("\"0000000000000abc\"").unwrap(),
            g
        );
        assert!("xyz".parse::<VolumeUuid>().is_err());
    }

    #[test]
    fn a_promotion_supersedes_the_primary_it_continued_and_only_that_one() {
        let mut a = Lineage::default();
        a.mint(GenId(1), 1, false);
        // A switchover earlier: b promoted, then a promoted back; both lineages have them.
        let mut b = a.clone();
        b.mint_promoted(GenId(1), GenId(2), 11);
        let mut a2 = b.clone();
        a2.mint_promoted(GenId(2), GenId(3), 21);
        a2.mint(GenId(4), 30, true);
        let mut b2 = a2.clone();
        b2.spans.truncate(3);
        // b is force-promoted from a2's generation 3 while a2 went on (generation 4).
        b2.mint_promoted(GenId(3), GenId(5), 25);
        assert!(
            supersedes(&b2, &a2),
            "b2's promotion continued a2's generation 3"
        );
        assert!(!supersedes(&a2, &b2), "a2's own promotion is in b2 too");
        // Unrelated lineages, or one without a promotion: nobody supersedes.
        let mut c = Lineage::default();
        c.mint(GenId(9), 1, false);
        assert!(!supersedes(&c, &a2) && !supersedes(&a2, &c) && !supersedes(&a, &b2));
        // Two secondaries promoted from the same data: neither supersedes the other.
        let mut twin = a2.clone();
        twin.spans.truncate(3);
        twin.mint_promoted(GenId(3), GenId(6), 25);
        assert!(!supersedes(&b2, &twin) && !supersedes(&twin, &b2));
        // Where they parted: after seq 24 of generation 3, whichever side asks.
        assert_eq!(parting_point(&a2, &b2), Some((GenId(3), 24)));
        assert_eq!(parting_point(&b2, &a2), Some((GenId(3), 24)));
        assert_eq!(parting_point(&b2, &twin), None);
        assert_eq!(parting_point(&c, &a2), None);
    }
}
