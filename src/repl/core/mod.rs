//! The replication protocol as plain state machines, apart from any I/O driver (quinn-proto
//! and rustls are the model): they take messages, the journal, the volume and `now`, and hand
//! out messages to send, state to persist and the next timer. `repl::shipper` and
//! `repl::mirror` drive them over quinn and threads; `sim` drives them over a virtual link in
//! virtual time, with crashes.
//!
//! - [`primary`]: one session of the primary with its mirror (identify, decision, cutting and
//!   windowing sets, the full copy and the comparison, acknowledgements, the stall watchdog),
//!   and the primary's per-volume state (identity, generations, the volume's fingerprint).
//! - [`mirror`]: the mirror's per-volume rules (the decision on connect, which set comes next,
//!   what is durable and acknowledged, what is applied, what may leave the redo log).

pub mod mirror;
pub mod primary;

use std::fmt;

/// Where replication of a volume stands, as status shows it (`state`; a contract: extend,
/// never rename).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplState {
    /// No session: connecting, or waiting to retry.
    #[default]
    Connecting,
    /// Up, shipping the journal; the mirror is a consistent copy.
    Replicating,
    /// Up, copying or comparing the whole volume: the mirror is not consistent yet.
    Resyncing,
    /// The peer refused for good (version, size, unknown volume): see `last_error`.
    Refused,
    /// Both sides wrote since their last common state: nothing is shipped.
    SplitBrain,
    /// The peer holds another volume pair's data: nothing is shipped.
    Unrelated,
    /// This side's volume is not the disk its state describes (replaced, or changed while the
    /// daemon was stopped): nothing is shipped until an admin accepts it.
    VolumeChanged,
    /// The mirror's disk or redo log failed.
    Failed,
    /// The peer is a primary too (promoted while this side was away, or a second primary):
    /// nothing is shipped until one of the two is demoted.
    BothPrimary,
}

impl fmt::Display for ReplState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).expect("serialises");
        write!(f, "{}", s.as_str().unwrap_or("?"))
    }
}

/// Mistakes planted on purpose, to prove the simulator finds them (test builds only).
#[cfg(any(test, feature = "test-hooks"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// The primary trims its journal up to the set after the one acknowledged.
    pub ack_one_set_early: bool,
    /// The mirror acknowledges sets written to its redo log before they are synced.
    pub ack_before_sync: bool,
    /// The mirror applies a resync's sets as they come instead of staging them.
    pub apply_resync_in_place: bool,
    /// The online verify compares chunks with writes not yet sent (false alarms).
    pub verify_unsettled: bool,
    /// The online verify drops what it found different (nothing is repaired).
    pub verify_forgets_differences: bool,
    /// The mirror saves a set's before-images in its history after writing the set (they
    /// hold the new content then).
    pub history_after_write: bool,
    /// A primary is demoted before the mirror acknowledged all its writes, and the mirror
    /// takes the demotion's notice whatever it holds.
    pub demote_unacknowledged: bool,
    /// A failed-back secondary does not name the regions it gave up (Takeover): the
    /// primary resyncs only its own changes.
    pub forget_takeover: bool,
}
