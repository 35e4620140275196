//! Roles that change without a restart (docs/FAILOVER.md): what a promotion and a demotion do
//! to a volume's recorded state, and the crash-safe steps on disk around them. The rules are
//! pure functions of the states; the file steps go through `env::FileSystem`, so the simulator
//! can crash them at any step.
//!
//! A volume's role is the `role` of its state file (`STATE/volumes/NAME.json`: `primary`, or
//! `mirror` for a secondary), and that file's atomic rename is the one commit point of a
//! change. What the new role needs is prepared before it (a promoted volume's journal, numbered
//! on from the data it holds); what only the old role used is removed after it (the redo log
//! and history of a mirror, the journal of a primary). A crash before the rename leaves the
//! old role with a leftover the next change prepares again; a crash after it leaves the new
//! role with a leftover [`clear_leftovers`] removes at start.
//!
//! - **Promotion** continues the data the mirror holds: a new generation, marked `promoted`,
//!   starts right after the mirror's applied sequence number (`Lineage::mint_promoted`), and
//!   the journal numbers on from there. The primary it took over from may hold writes past
//!   that point (its unshipped tail): the lineages show where the two part.
//! - **Demotion** keeps the primary's data as a mirror's consistent state at the journal's last
//!   write. A planned demotion waits until the peer acknowledged every write, so the peer's
//!   promotion then continues exactly that state: the reverse direction resumes, nothing is
//!   copied.
//!
//! A mirror's history describes the volume as the mirror applied it, with before-images saved
//! by its applier: once the volume takes writes of its own it no longer holds, so promotion
//! ends it (`blkmirror promote --set/--at` chooses a point of it first), and a demoted volume
//! starts a new one.

use crate::disk::fingerprint::Fingerprint;
use crate::env::{remove_files_in, Fs};
use crate::repl::apply::{self, CopyState, VolumeState};
use crate::repl::core::primary::PrimaryVolumeState;
use crate::repl::identity::GenId;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// What a volume is to its pair right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes from its clients and ships them.
    Primary,
    /// Receives and applies its peer's writes; its clients may only read history points.
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }

    /// The `role` a state file of this role carries (`mirror` for a secondary, as files of
    /// releases before role changes say).
    pub fn in_state_file(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "mirror",
        }
    }
}

/// The journal directory of a primary's volume.
pub fn journal_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("journal").join(volume)
}

/// The role recorded for `volume` in `state_dir` (None: no state yet).
pub fn recorded(fs: &Fs, state_dir: &Path, volume: &str) -> io::Result<Option<Role>> {
    #[derive(Deserialize)]
    struct OnlyRole {
        #[serde(default)]
        role: Option<String>,
    }
    let path = VolumeState::path(state_dir, volume);
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let r: OnlyRole = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    // A mirror's file from before roles were recorded has none.
    match r.role.as_deref() {
        Some("primary") => Ok(Some(Role::Primary)),
        Some("mirror") | None => Ok(Some(Role::Secondary)),
        Some(other) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unknown role {other:?}", path.display()),
        )),
    }
}

/// The state a mirror holding `st` has as a primary once promoted, and the sequence number
/// its journal goes on at. `gen` is the promotion's generation; `disk` the volume's disk now
/// (sealed: a promotion is a clean stop of the mirror role).
///
/// Refused (with the reason) unless the volume holds a consistent state of a known pair: a
/// half-done copy or comparison is no state anybody wrote. Without `force`, the primary must
/// have told this side it was demoted with exactly the data held here (`peer_demoted`): the
/// new generation then continues the name the demoted side gives its data, and the reverse
/// direction resumes. With `force` (the primary is gone) it continues the mirror's own
/// position, and every generation the old primary began after it is dropped: the old
/// primary's writes past this point (its unshipped tail) are not this side's.
pub fn promoted(
    st: &VolumeState,
    gen: GenId,
    disk: &Fingerprint,
    force: bool,
) -> Result<(PrimaryVolumeState, u64), String> {
    let held = continued_generation(st, force)?;
    let next_seq = st.applied_seq + 1;
    let mut identity = st.identity.clone();
    if !identity.lineage.mint_promoted(held, gen, next_seq) {
        return Err(format!(
            "the volume's generation {held} does not place seq {} in its lineage",
            st.applied_seq
        ));
    }
    identity.fingerprint = Some(disk.clone());
    let state = PrimaryVolumeState {
        role: Role::Primary.in_state_file().into(),
        identity,
        volume_changed: None,
        changed_role: Some(if force { "promote --force" } else { "promote" }.into()),
        split_brain: None,
        served_unconfirmed: false,
    };
    Ok((state, next_seq))
}

/// Whether a mirror holding `st` may be promoted (`force`: `--force`), and the generation
/// its promotion continues ([`promoted`] says why it is refused).
pub fn continued_generation(st: &VolumeState, force: bool) -> Result<GenId, String> {
    if let Some(why) = &st.volume_changed {
        return Err(format!("the volume is not the mirror's copy: {why}"));
    }
    if st.identity.uuid.is_none() || st.copy == CopyState::None {
        return Err("the volume never received a primary's data".into());
    }
    if !st.consistent() {
        return Err(format!(
            "the volume is not a consistent copy (a {} has not finished): promoting it would \
             serve a state no primary ever had",
            if st.copy == CopyState::Running {
                "full copy or comparison"
            } else {
                "catch-up after a copy"
            }
        ));
    }
    if let (Some(t), false) = (&st.takeover, force) {
        if st.holds_given_up_writes() {
            return Err(format!(
                "this side gave up its own writes for its peer's (saved as {}) and the peer's \
                 resync has not finished: the volume holds this side's old data; promote \
                 --force serves that",
                t.saved
            ));
        }
    }
    let lineage = &st.identity.lineage;
    let own = st
        .position_gen
        .or_else(|| lineage.holding(st.applied_seq).map(|s| s.gen));
    let held = match st.peer_demoted {
        Some((g, seq)) if seq == st.applied_seq && lineage.spans.iter().any(|s| s.gen == g) => g,
        _ if force => own.ok_or_else(|| {
            format!(
                "the volume's data (seq {}) belongs to no generation it knows",
                st.applied_seq
            )
        })?,
        Some((g, seq)) => {
            return Err(format!(
                "the peer was demoted at generation {g} seq {seq}, but this side holds seq {} \
                 (promote --force takes what it holds)",
                st.applied_seq
            ))
        }
        None => {
            return Err(
                "the peer is not known to be demoted: demote it first (blkmirror demote on \
                 the primary), or promote --force if it is lost"
                    .into(),
            )
        }
    };
    Ok(held)
}

/// The state a primary with `st`, whose journal's last write is `last_seq`, has as a mirror
/// once demoted: consistent at that write, named by generation `held` — the one current
/// while its peer acknowledged every write, in a live session (so the peer's lineage has it;
/// a generation minted since, when that session ended, holds no write: the writes stopped
/// first). `disk` is the volume's disk now, sealed (the primary role stopped cleanly);
/// `newest_write_ms` when that write completed.
pub fn demoted(
    st: &PrimaryVolumeState,
    last_seq: u64,
    held: GenId,
    disk: &Fingerprint,
    newest_write_ms: u64,
) -> Result<VolumeState, String> {
    if let Some(why) = &st.volume_changed {
        return Err(format!(
            "the volume is not the one this state describes ({why}): accept it first"
        ));
    }
    let uuid = st.identity.uuid.ok_or_else(|| {
        "the volume was never replicated: there is no peer to take over from it".to_string()
    })?;
    if !st.identity.lineage.spans.iter().any(|s| s.gen == held) {
        return Err(format!("generation {held} is not in the volume's lineage"));
    }
    let mut identity = st.identity.clone();
    identity.uuid = Some(uuid);
    identity.fingerprint = Some(disk.clone());
    Ok(VolumeState {
        role: Role::Secondary.in_state_file().into(),
        applied_set: 0,
        applied_seq: last_seq,
        copy: CopyState::Done,
        consistent_after_seq: 0,
        identity,
        newest_write_ms,
        newest_received_ms: 0,
        volume_changed: None,
        position_gen: Some(held),
        peer_demoted: None,
        changed_role: Some("demote".into()),
        takeover: None,
    })
}

/// The state a primary with `st` has as a secondary of a peer primary that says `peer` of
/// its data (its lineage and disk), giving up the writes it made since the two parted
/// (`identity::parting_point`): the state both held, with this side's own writes in
/// `regions` ([`given_up_regions`]) and saved as `saved`. `how` names the change
/// (`failback`, `resolve --discard-local`). The peer resyncs `regions` with its own changes
/// since the point, staged, so that the volume stays this side's old state until the
/// resync's end.
pub fn discarded(
    st: &PrimaryVolumeState,
    peer: &crate::repl::identity::PrimaryClaim,
    regions: Vec<(u64, u64)>,
    disk: &Fingerprint,
    how: &str,
    saved: String,
) -> Result<VolumeState, String> {
    let (gen, seq) = parting_point(st, &peer.lineage)?;
    if st.identity.uuid.is_none() {
        return Err("the volume was never replicated".into());
    }
    let mut identity = st.identity.clone();
    let keep = identity
        .lineage
        .spans
        .iter()
        .rposition(|s| s.gen == gen)
        .expect("parting_point names a generation of both lineages");
    identity.lineage.spans.truncate(keep + 1);
    identity.fingerprint = Some(disk.clone());
    let mut peer_disk = peer.fingerprint.clone();
    peer_disk.ctime = None;
    identity.peer_fingerprint = Some(peer_disk);
    identity.synced = Some(gen);
    Ok(VolumeState {
        role: Role::Secondary.in_state_file().into(),
        applied_seq: seq,
        copy: CopyState::Done,
        identity,
        position_gen: Some(gen),
        changed_role: Some(how.into()),
        takeover: Some(apply::Takeover {
            gen,
            seq,
            regions,
            saved,
        }),
        ..VolumeState::default()
    })
}

/// What a side giving its writes up since it parted from its peer at (`gen`, `seq`) must
/// name (its volume differs from that state in those places, the peer resyncs them): the
/// regions of its journal's records after `Some(after_seq)` (with the dirty map's), or
/// `None`: the whole volume. The records after `seq` name them when every generation it
/// began since continues without a break past `seq`, and the journal still holds every
/// record after `seq` (`holds_after`, where its knowledge starts). Otherwise they cannot be
/// told: a host crash may have lost writes of its disk anywhere (a break), or records were
/// trimmed that the peer no longer holds (it was promoted from an older state than it had
/// acknowledged: a staged resync it dropped).
pub fn given_up_after(
    lineage: &crate::repl::identity::Lineage,
    gen: GenId,
    seq: u64,
    holds_after: u64,
) -> Option<u64> {
    let i = lineage.spans.iter().rposition(|s| s.gen == gen)?;
    let unbroken = lineage.spans[i + 1..]
        .iter()
        .all(|s| s.continuous && s.first_seq > seq);
    (unbroken && holds_after <= seq).then_some(seq)
}

/// The regions a side gives up since it parted at `parted` ([`given_up_after`]), from its
/// journal and dirty map, and whether that is the whole volume (of `volume_bytes`).
pub fn given_up_regions(
    journal: &crate::journal::Journal,
    lineage: &crate::repl::identity::Lineage,
    parted: (GenId, u64),
    volume_bytes: u64,
) -> (Vec<(u64, u64)>, bool) {
    // An open resync clears the map's regions as its sets are acknowledged, staged at the
    // peer: a peer promoted from a state before the fold's end dropped that stage, and the
    // regions cleared are known nowhere.
    let cleared_unknown = journal.fold().is_some_and(|f| parted.1 < f.folded_through);
    match given_up_after(lineage, parted.0, parted.1, journal.holds_after()) {
        Some(after) if !cleared_unknown => (journal.regions_after(after), false),
        _ => (vec![(0, volume_bytes)], true),
    }
}

/// Where this side's data and its peer primary's parted (their lineages `st`'s and
/// `peer`), or why a side cannot give its own writes up for the peer's.
pub fn parting_point(
    st: &PrimaryVolumeState,
    peer: &crate::repl::identity::Lineage,
) -> Result<(GenId, u64), String> {
    if let Some(why) = &st.volume_changed {
        return Err(format!(
            "the volume is not the one this state describes ({why}): accept it first"
        ));
    }
    crate::repl::identity::parting_point(&st.identity.lineage, peer).ok_or_else(|| {
        "neither side's data continues the other's (no promotion of one from the other's \
         data is known): no common state to resync from"
            .to_string()
    })
}

/// Where a volume's mirror-side history lives (on its own file system in the simulator).
pub struct HistoryDir<'a> {
    pub fs: &'a Fs,
    pub dir: PathBuf,
}

/// Where the journal of a mirror holding `mirror` starts once promoted ([`promoted`]'s
/// `next_seq`): a volume that still holds writes it gave up (`--force` before the peer's
/// resync ended) resyncs them first, for a peer at the point both held lacks them.
pub fn journal_start(
    mirror: &VolumeState,
    next_seq: u64,
    volume_bytes: u64,
) -> crate::journal::JournalStart {
    crate::journal::JournalStart {
        next_seq,
        resync: mirror.given_up_regions(volume_bytes).unwrap_or_default(),
        volume_bytes,
    }
}

/// Commit a promotion on disk: the journal prepared to number on at `start`, then the
/// state file (the commit), then the mirror's redo log and history removed.
pub fn commit_promotion(
    fs: &Fs,
    state_dir: &Path,
    volume: &str,
    st: &PrimaryVolumeState,
    start: &crate::journal::JournalStart,
    boot_id: &str,
    history: Option<HistoryDir<'_>>,
) -> io::Result<()> {
    crate::journal::create_at(fs, &journal_dir(state_dir, volume), start, boot_id)?;
    st.save(&**fs, &PrimaryVolumeState::path(state_dir, volume))?;
    clear_leftovers(fs, state_dir, volume, Role::Primary, history)
}

/// Commit a demotion on disk: a stale redo log or history of an earlier time as a mirror
/// removed, then the state file (the commit), then the journal removed.
pub fn commit_demotion(
    fs: &Fs,
    state_dir: &Path,
    volume: &str,
    st: &VolumeState,
    history: Option<HistoryDir<'_>>,
) -> io::Result<()> {
    // Still a primary until the commit: what no primary keeps goes first.
    clear_leftovers(fs, state_dir, volume, Role::Primary, history)?;
    st.save(&**fs, &VolumeState::path(state_dir, volume))?;
    clear_leftovers(fs, state_dir, volume, Role::Secondary, None)
}

/// Remove what only the other role uses, left by a role change that crashed after its commit
/// (or done by it): a primary has no redo log or history, a mirror no journal.
pub fn clear_leftovers(
    fs: &Fs,
    state_dir: &Path,
    volume: &str,
    now: Role,
    history: Option<HistoryDir<'_>>,
) -> io::Result<()> {
    match now {
        Role::Primary => {
            remove_files_in(&**fs, &apply::redo_dir(state_dir, volume))?;
            if let Some(h) = history {
                remove_files_in(&**h.fs, &h.dir)?;
            }
        }
        Role::Secondary => {
            remove_files_in(&**fs, &journal_dir(state_dir, volume))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::mem::MemFs;
    use crate::journal::{Journal, JournalOptions, LastStop};
    use crate::repl::identity::{decide, Decision, Lineage, MirrorHolds, PrimaryClaim};
    use crate::repl::identity::{VolumeIdentity, VolumeUuid};
    use std::sync::Arc;

    fn disk(id: u64) -> Fingerprint {
        Fingerprint {
            kind: crate::disk::fingerprint::DiskKind::Memory,
            dev: 0,
            ino: id,
            born: None,
            serial: None,
            size: 1 << 20,
            ctime: None,
        }
    }

    fn primary_state(spans: &[(u64, u64)]) -> PrimaryVolumeState {
        let mut lineage = Lineage::default();
        for &(g, first) in spans {
            lineage.mint(GenId(g), first, true);
        }
        PrimaryVolumeState {
            role: "primary".into(),
            identity: VolumeIdentity {
                uuid: Some(VolumeUuid([7; 16])),
                lineage,
                fingerprint: Some(disk(1)),
                ..Default::default()
            },
            volume_changed: None,
            changed_role: None,
            split_brain: None,
            served_unconfirmed: false,
        }
    }

    fn claim(st: &PrimaryVolumeState, acked: u64, last: u64, d: u64) -> PrimaryClaim {
        PrimaryClaim {
            uuid: st.identity.uuid,
            lineage: st.identity.lineage.clone(),
            journal_acked: acked,
            journal_last: last,
            fingerprint: disk(d),
            resync_from: None,
        }
    }

    fn holds(st: &VolumeState) -> MirrorHolds {
        MirrorHolds {
            uuid: st.identity.uuid,
            lineage: st.identity.lineage.clone(),
            position: st.consistent().then_some(st.applied_seq),
            durable_seq: st.applied_seq,
            position_gen: st.position_gen,
            staged: false,
            has_data: st.copy != CopyState::None,
            unrecorded_data: false,
            peer_fingerprint: st.identity.peer_fingerprint.clone(),
        }
    }

    /// The mirror's state after receiving `p`'s writes up to `seq`.
    fn mirror_of(p: &PrimaryVolumeState, seq: u64) -> VolumeState {
        VolumeState {
            applied_set: 40,
            applied_seq: seq,
            copy: CopyState::Done,
            identity: VolumeIdentity {
                uuid: p.identity.uuid,
                lineage: p.identity.lineage.clone(),
                fingerprint: Some(disk(2)),
                peer_fingerprint: Some(disk(1)),
                ..Default::default()
            },
            position_gen: p.identity.lineage.holding(seq).map(|s| s.gen),
            ..Default::default()
        }
    }

    #[test]
    fn a_planned_switchover_resumes_both_ways_without_a_copy() {
        // The primary wrote 1..=100 in two generations; the mirror holds all of it.
        let p = primary_state(&[(1, 1), (2, 61)]);
        let m = mirror_of(&p, 100);
        assert_eq!(
            decide(&claim(&p, 100, 100, 1), &holds(&m)),
            Decision::Resume { from_seq: 100 }
        );
        // Switchover: the primary is demoted at 100, the mirror promoted.
        let old = demoted(&p, 100, GenId(2), &disk(1), 5).unwrap();
        assert!(old.consistent());
        assert_eq!(old.position_gen, Some(GenId(2)));
        // Not without knowing the primary was demoted (or --force).
        assert!(promoted(&m, GenId(3), &disk(2), false)
            .unwrap_err()
            .contains("not known to be demoted"));
        let mut m = m;
        m.peer_demoted = Some((GenId(2), 100));
        let (new, next) = promoted(&m, GenId(3), &disk(2), false).unwrap();
        assert_eq!(next, 101);
        let cur = new.identity.lineage.current().unwrap();
        assert!(cur.promoted && cur.continuous && cur.first_seq == 101);
        // The new primary wrote nothing yet, or 20 writes: the old one resumes as a mirror.
        for last in [100, 120] {
            assert_eq!(
                decide(&claim(&new, 100, last, 2), &holds(&old)),
                Decision::Resume { from_seq: 100 },
                "new primary at {last}"
            );
        }
        // And back: the new primary demoted at 120 once acknowledged, the old one promoted.
        let mut old_as_mirror = old.clone();
        old_as_mirror.identity.lineage = new.identity.lineage.clone();
        old_as_mirror.applied_seq = 120;
        old_as_mirror.position_gen = Some(GenId(3));
        let new_demoted = demoted(
            &new,
            120,
            new.identity.lineage.current().unwrap().gen,
            &disk(2),
            6,
        )
        .unwrap();
        old_as_mirror.peer_demoted = Some((GenId(3), 120));
        let (back, next) = promoted(&old_as_mirror, GenId(4), &disk(1), false).unwrap();
        assert_eq!(next, 121);
        assert_eq!(
            decide(&claim(&back, 120, 150, 1), &holds(&new_demoted)),
            Decision::Resume { from_seq: 120 }
        );
    }

    #[test]
    fn a_forced_promotion_drops_the_generations_the_mirror_never_held() {
        // The mirror holds 1..=80 of generation 2; the primary went on to 100 and started
        // generation 9 at 95 (a lost link) before its site was lost.
        let p = primary_state(&[(1, 1), (2, 61), (9, 95)]);
        let m = mirror_of(&p, 80);
        let (new, next) = promoted(&m, GenId(3), &disk(2), true).unwrap();
        assert_eq!(next, 81);
        let gens: Vec<u64> = new.identity.lineage.spans.iter().map(|s| s.gen.0).collect();
        assert_eq!(gens, vec![1, 2, 3]);
        // The old primary coming back with its tail is never resumed as the same data: its
        // writes past 80 are not the new primary's.
        let old = demoted(&p, 100, GenId(9), &disk(1), 0).unwrap();
        assert!(matches!(
            decide(&claim(&new, 80, 90, 2), &holds(&old)),
            Decision::Refuse {
                kind: crate::repl::identity::RefuseKind::SplitBrain,
                ..
            }
        ));
    }

    #[test]
    fn an_old_primary_giving_its_tail_up_resumes_from_where_the_two_parted() {
        // As above: the mirror holds 1..=80 of generation 2 and is promoted with --force; the
        // old primary wrote on to 100 (generation 9 from 95).
        let p = primary_state(&[(1, 1), (2, 61), (9, 95)]);
        let (new, _) = promoted(&mirror_of(&p, 80), GenId(3), &disk(2), true).unwrap();
        let peer = claim(&new, 80, 90, 2);
        assert_eq!(parting_point(&p, &new.identity.lineage), Ok((GenId(2), 80)));
        // Its journal's records after 80 are its own writes (no break since).
        assert_eq!(
            given_up_after(&p.identity.lineage, GenId(2), 80, 75),
            Some(80)
        );
        // A journal trimmed past the parting point (the peer acknowledged a resync it dropped
        // when promoted) cannot name them: the whole volume.
        assert_eq!(given_up_after(&p.identity.lineage, GenId(2), 80, 81), None);
        let tail = vec![(4096, 8192)];
        let gave_up = discarded(&p, &peer, tail.clone(), &disk(1), "failback", "t".into()).unwrap();
        assert_eq!(gave_up.role, "mirror");
        assert!(gave_up.consistent());
        assert_eq!(
            (gave_up.position_gen, gave_up.applied_seq),
            (Some(GenId(2)), 80)
        );
        let gens: Vec<u64> = gave_up
            .identity
            .lineage
            .spans
            .iter()
            .map(|s| s.gen.0)
            .collect();
        assert_eq!(gens, vec![1, 2], "its own generations since are given up");
        assert_eq!(gave_up.takeover.as_ref().unwrap().regions, tail);
        // The new primary's journal holds every write after 80: it resumes from there (the
        // tail's regions go with its own changes, as a staged resync).
        assert_eq!(
            decide(&peer, &holds(&gave_up)),
            Decision::Resume { from_seq: 80 }
        );
        // The promoted side giving its writes up instead parts at the same point.
        let mut as_primary = new.clone();
        as_primary.volume_changed = None;
        assert_eq!(
            parting_point(&as_primary, &p.identity.lineage),
            Ok((GenId(2), 80))
        );
        // After a break (a host crash may have lost writes of its disk anywhere): the whole
        // volume.
        let crashed = primary_state(&[(1, 1), (2, 61)]);
        let mut crashed = crashed;
        crashed.identity.lineage.mint(GenId(10), 70, false);
        assert_eq!(
            given_up_after(&crashed.identity.lineage, GenId(2), 80, 0),
            None
        );
        // Unrelated lineages have no common point.
        let stranger = primary_state(&[(40, 1)]);
        assert!(parting_point(&stranger, &new.identity.lineage).is_err());
    }

    /// An admin who deletes a saved tail (`STATE/divergent/ID`) before the peer's resync
    /// replaced it: the volume still holds those writes somewhere, so the whole volume is
    /// resynced (named to the peer, and carried over by a forced promotion), never nothing.
    #[test]
    fn a_saved_tail_deleted_before_the_resync_gives_up_the_whole_volume() {
        let fs: Fs = Arc::new(MemFs::new());
        let root = Path::new("/s");
        let p = primary_state(&[(1, 1), (2, 61)]);
        let (new, _) = promoted(&mirror_of(&p, 80), GenId(3), &disk(2), true).unwrap();
        let tail = vec![(4096, 8192)];
        let volume = vec![7u8; 1 << 20];
        let saved = crate::repl::divergent::save(
            &*fs,
            root,
            &crate::repl::divergent::Tail {
                volume: "v",
                size: 1 << 20,
                why: "failback",
                parted: (GenId(2), 80),
                ranges: &tail,
                time_ms: 1,
            },
            &mut |at, b| {
                b.copy_from_slice(&volume[at as usize..at as usize + b.len()]);
                Ok(())
            },
        )
        .unwrap();
        let st = discarded(
            &p,
            &claim(&new, 80, 90, 2),
            tail.clone(),
            &disk(1),
            "failback",
            saved.id,
        )
        .unwrap();
        let path = VolumeState::path(root, "v");
        st.save(&*fs, &path).unwrap();
        let loaded = VolumeState::load(&*fs, &path).unwrap();
        assert_eq!(loaded.given_up_regions(1 << 20), Some(tail.clone()));
        assert_eq!(journal_start(&loaded, 81, 1 << 20).resync, tail);
        remove_files_in(
            &*fs,
            &crate::repl::divergent::dir(root).join(&loaded.takeover.unwrap().saved),
        )
        .unwrap();
        let lost = VolumeState::load(&*fs, &path).unwrap();
        assert_eq!(lost.given_up_regions(1 << 20), Some(vec![(0, 1 << 20)]));
        assert_eq!(journal_start(&lost, 81, 1 << 20).resync, vec![(0, 1 << 20)]);
    }

    #[test]
    fn only_a_consistent_copy_of_a_known_pair_is_promoted() {
        let p = primary_state(&[(1, 1)]);
        let mut m = mirror_of(&p, 10);
        m.copy = CopyState::Running;
        assert!(promoted(&m, GenId(5), &disk(2), true)
            .unwrap_err()
            .contains("not a consistent copy"));
        let blank = VolumeState::default();
        assert!(promoted(&blank, GenId(5), &disk(2), true)
            .unwrap_err()
            .contains("never received"));
        let mut changed = mirror_of(&p, 10);
        changed.volume_changed = Some("replaced".into());
        assert!(promoted(&changed, GenId(5), &disk(2), true).is_err());
        let mut unpaired = primary_state(&[(1, 1)]);
        unpaired.identity.uuid = None;
        assert!(demoted(&unpaired, 3, GenId(1), &disk(1), 0).is_err());
    }

    fn journal_opts(fs: &Fs, dir: &Path) -> JournalOptions {
        let mut o = JournalOptions::new(fs.clone(), dir.to_path_buf(), 1 << 20);
        o.segment_bytes = 64 << 10;
        o
    }

    #[test]
    fn a_promoted_volume_s_journal_numbers_on_after_its_data() {
        let fs: Fs = Arc::new(MemFs::new());
        let dir = Path::new("/s/journal/v");
        // A stale journal of an earlier time as primary is replaced.
        fs.create_dir_all(dir).unwrap();
        fs.open(
            &dir.join("00000000000000000007.jnl"),
            crate::env::OpenOptions::write().create(),
        )
        .unwrap();
        let start = crate::journal::JournalStart {
            next_seq: 501,
            resync: Vec::new(),
            volume_bytes: 1 << 20,
        };
        crate::journal::create_at(&fs, dir, &start, "boot").unwrap();
        let j = Journal::open(journal_opts(&fs, dir)).unwrap();
        assert_eq!(j.last_stop(), LastStop::Clean);
        assert_eq!(j.last_seq(), 500);
        assert_eq!(j.holds_after(), 500);
    }

    #[test]
    fn a_role_change_commits_at_the_state_file_and_clears_the_other_role_s_logs() {
        let fs: Fs = Arc::new(MemFs::new());
        let root = Path::new("/s");
        let p = primary_state(&[(1, 1)]);
        let m = mirror_of(&p, 10);
        m.save(&*fs, &VolumeState::path(root, "v")).unwrap();
        let redo = apply::redo_dir(root, "v");
        fs.create_dir_all(&redo).unwrap();
        fs.open(
            &redo.join("1.redo"),
            crate::env::OpenOptions::write().create(),
        )
        .unwrap();
        assert_eq!(recorded(&fs, root, "v").unwrap(), Some(Role::Secondary));
        let (st, next) = promoted(&m, GenId(9), &disk(2), true).unwrap();
        let start = crate::journal::JournalStart {
            next_seq: next,
            resync: Vec::new(),
            volume_bytes: 1 << 20,
        };
        commit_promotion(&fs, root, "v", &st, &start, "b", None).unwrap();
        assert_eq!(recorded(&fs, root, "v").unwrap(), Some(Role::Primary));
        assert!(fs.read_dir(&redo).unwrap().is_empty());
        let back = demoted(&st, 10, GenId(9), &disk(2), 0).unwrap();
        commit_demotion(&fs, root, "v", &back, None).unwrap();
        assert_eq!(recorded(&fs, root, "v").unwrap(), Some(Role::Secondary));
        assert!(fs.read_dir(&journal_dir(root, "v")).unwrap().is_empty());
        assert!(VolumeState::load(&*fs, &VolumeState::path(root, "v"))
            .unwrap()
            .consistent());
    }
}
